"""The snapshot table and the exception-list operations both stores share.

The table maps sharemap bits to snapshots (seed 000 ``snaplist`` with ``tag``/``bit``;
seed 001 wishes for a name table, which format v1 has).  The exception-list helpers work
on one logical chunk's exceptions, a list of ``[sharemap, store_chunk]`` pairs, exactly as
seed 000's leaf operations (``origin_chunk_unique``, ``snapshot_chunk_unique``,
``add_exception_to_leaf``) do on the encoded leaf.
"""

from __future__ import annotations

import time

from ..errors import InvalidArgument, SnapshotExists, SnapshotNotFound, TooManySnapshots
from .api import SnapshotInfo
from .format import MAX_NAME, SLOT_DELETING, SLOT_FREE, SLOT_LIVE, SnapSlot


def validate_name(name: str) -> None:
    """Check a snapshot name: 1..255 bytes of UTF-8, no '/', no NUL, not ``origin``.

    Raises:
        InvalidArgument: the name is not acceptable.
    """
    raw = name.encode("utf-8", errors="strict") if isinstance(name, str) else b""
    if not raw or len(raw) > MAX_NAME:
        raise InvalidArgument(f"snapshot name must be 1 to {MAX_NAME} bytes of UTF-8")
    if "/" in name or "\0" in name:
        raise InvalidArgument("snapshot name must not contain '/' or NUL")
    if name == "origin":
        raise InvalidArgument("'origin' is the origin's export name, not a snapshot name")


class SnapshotTable:
    """Snapshot slots indexed by sharemap bit, with the changes since the last commit.

    Attributes:
        slots: one :class:`SnapSlot` per bit.
        dirty: bits whose slot changed since :meth:`take_dirty`.
    """

    def __init__(self, slots: list[SnapSlot]):
        self.slots = slots
        self.dirty: set[int] = set()

    def live(self) -> list[SnapshotInfo]:
        out = [SnapshotInfo(s.name, s.id, bit, s.created, s.read_only)
               for bit, s in enumerate(self.slots) if s.state == SLOT_LIVE]
        out.sort(key=lambda i: i.id)
        return out

    @property
    def live_mask(self) -> int:
        m = 0
        for bit, s in enumerate(self.slots):
            if s.state == SLOT_LIVE:
                m |= 1 << bit
        return m

    @property
    def deleting_mask(self) -> int:
        m = 0
        for bit, s in enumerate(self.slots):
            if s.state == SLOT_DELETING:
                m |= 1 << bit
        return m

    def find(self, name: str) -> int:
        for bit, s in enumerate(self.slots):
            if s.state == SLOT_LIVE and s.name == name:
                return bit
        raise SnapshotNotFound(name)

    def create(self, name: str, read_only: bool, sid: int, created: int | None) -> SnapshotInfo:
        """Take the lowest free bit for a new snapshot (seed 000 ``create_snapshot``)."""
        validate_name(name)
        if any(s.state == SLOT_LIVE and s.name == name for s in self.slots):
            raise SnapshotExists(name)
        for bit, s in enumerate(self.slots):
            if s.state == SLOT_FREE:
                break
        else:
            deleting = sum(1 for s in self.slots if s.state == SLOT_DELETING)
            more = f" ({deleting} still being deleted)" if deleting else ""
            raise TooManySnapshots(
                f"all {len(self.slots)} snapshot slots are in use{more}; delete a snapshot first")
        created = time.time_ns() if created is None else created
        self.slots[bit] = SnapSlot(SLOT_LIVE, read_only, sid, created, name)
        self.dirty.add(bit)
        return SnapshotInfo(name, sid, bit, created, read_only)

    def begin_delete(self, name: str) -> SnapshotInfo:
        bit = self.find(name)
        s = self.slots[bit]
        info = SnapshotInfo(s.name, s.id, bit, s.created, s.read_only)
        self.slots[bit] = SnapSlot(SLOT_DELETING, False, s.id, s.created, "")
        self.dirty.add(bit)
        return info

    def finish_delete(self, mask: int) -> None:
        """Free the slots of the swept bits in ``mask``."""
        for bit, s in enumerate(self.slots):
            if mask >> bit & 1 and s.state == SLOT_DELETING:
                self.slots[bit] = SnapSlot()
                self.dirty.add(bit)


# -- one logical chunk's exceptions: a list of [sharemap, store_chunk] -------------------

def exc_sharers(excs: list[list[int]] | None, live: int) -> int:
    """Live bits that have no exception here and so read the origin."""
    used = 0
    for share, _c in excs or ():
        used |= share
    return live & ~used


def exc_lookup(excs: list[list[int]] | None, bit: int) -> tuple[int | None, bool]:
    """``(store_chunk, unique)`` of snapshot ``bit`` in this list."""
    mask = 1 << bit
    for share, c in excs or ():
        if share & mask:
            return c, share == mask
    return None, False


def exc_remove_bits(excs: list[list[int]], mask: int) -> list[int]:
    """Clear ``mask`` from every sharemap; drop emptied exceptions; return their chunks."""
    freed = []
    keep = []
    for e in excs:
        if e[0] & mask:
            e[0] &= ~mask
            if not e[0]:
                freed.append(e[1])
                continue
        keep.append(e)
    excs[:] = keep
    return freed


def exc_add_snapshot(excs: list[list[int]], bit: int, store_chunk: int) -> list[int]:
    """Move ``bit`` from its old exception (if any) to a new one at ``store_chunk``.

    Returns store chunks whose exceptions became empty (normally none: a caller only
    makes a chunk unique when it was shared).
    """
    freed = exc_remove_bits(excs, 1 << bit)
    excs.append([1 << bit, store_chunk])
    return freed
