"""The full-store policy: what a write does when the store has no free chunk
(``error``: ENOSPC; ``delete-oldest``: the oldest snapshot is deleted to make room,
logged and recorded, never silently)."""


from __future__ import annotations

import logging
import time

from ..errors import StoreFull
from ..store.model import SnapshotInfo
from .core import ServiceCore

log = logging.getLogger("ddsnap.service")


class FullPolicy(ServiceCore):
    """The ``full-policy`` setting and the room it makes."""

    def _victim_locked(self, exclude: int | None = None) -> SnapshotInfo | None:
        """The oldest snapshot the ``delete-oldest`` policy may delete, if any: not
        ``exclude`` (a version id), not the one being merged."""
        if self.store.full_policy != "delete-oldest":
            return None
        for s in self._snaps:  # oldest first
            if s.id != exclude and s.id != self._merging:
                return s
        return None

    def _can_make_room_locked(self, exclude: int | None = None) -> bool:
        return self._victim_locked(exclude) is not None

    def _make_room_locked(self, exclude: int | None = None) -> None:
        """Delete the oldest snapshot to make room (``full-policy=delete-oldest``), lock
        held: its chunks are swept, committed and checkpointed so they can be reused.
        Logged and kept in :attr:`auto_deleted` for ``status`` (invariant 7: never silent).

        Raises:
            StoreFull: there is nothing to delete (callers ask :meth:`_can_make_room_locked`
                first, so this only guards the rule).
        """
        victim = self._victim_locked(exclude)
        if victim is None:
            raise StoreFull()
        self.store.note_auto_deleted(victim, time.time_ns())  # durable with the delete
        self.store.begin_delete(victim.name)
        self._refresh_snaps_locked()
        self._notify({"event": "snapshot-deleted", "snapshot": victim.id}, wait=False)
        while not self._sweep_step_locked():
            self._commit_now_locked()
        self._commit_now_locked()
        self.auto_deleted = self.store.auto_deleted()
        log.warning("snapshot store full: deleted the oldest snapshot %s "
                    "(full-policy=delete-oldest)", victim.name)

    def set_full_policy(self, policy: str) -> None:
        """Choose what a write does when the store is full (``error``/``delete-oldest``).

        ``delete-oldest`` deletes snapshots that are in use, whose store chunks a node
        keeping their read mappings could read after their reuse: nodes drop every
        mapping they keep first, and under that policy keep only origin mappings
        (see :meth:`map_snapshot_read`).

        Raises:
            InvalidArgument: an unknown policy.
        """
        with self._read_mappings_revoked(), self.lock:
            self._enter_locked()
            self.store.set_full_policy(policy)
        self.commit()
