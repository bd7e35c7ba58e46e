"""Read mapping: where a snapshot (or the merging origin) reads its chunks, with the
origin chunks it reads read-locked until released (seed 000 ``QUERY_SNAPSHOT_READ`` and
``FINISH_SNAPSHOT_READ``), and the no-wait mapping the event loop tries first."""


from __future__ import annotations

from ..store.api import NotCached
from ..store.model import SnapshotInfo
from .api import ReadMap
from .core import ServiceCore

#: longest the event loop waits for the metadata lock before a READ goes to a thread (s)
NOWAIT_LOCK_WAIT = 0.001


class ReadMapping(ServiceCore):
    """Snapshot and merging-origin read mappings and their read locks."""

    def map_snapshot_read(self, snap: SnapshotInfo, first: int, last: int) -> ReadMap:
        """Where snapshot ``snap`` reads chunks ``first..last`` (seed 000
        ``QUERY_SNAPSHOT_READ``); origin chunks stay read-locked until released.

        The map is ``cacheable`` (a node may keep it, see docs/protocol.md "Read
        mappings a node keeps") unless a merge runs or the read barrier is up, and,
        when it maps a store chunk, only if nothing waits for a commit (a mapping a
        failed commit could take back is never kept) and the full-store policy is
        ``error`` (``delete-oldest`` deletes snapshots in use, whose chunks a kept
        mapping could then read after their reuse).
        """
        with self.lock:
            self._enter_locked()
            v = self._version(snap)
            sources, locked = [], []
            lookup = self.store.snapshot_chunk
            for c in range(first, last + 1):
                sc = lookup(v, c)
                if sc is None:
                    self._readlocks[c] += 1
                    locked.append(c)
                sources.append(sc)
            cacheable = (self._merging is None and not self._read_barrier
                         and (len(locked) == len(sources)
                              or (not self._pending
                                  and self.store.full_policy == "error")))
            return ReadMap(first, sources, locked, cacheable)

    def map_origin_read(self, first: int, last: int) -> ReadMap | None:
        """Where the origin reads chunks ``first..last`` while a merge runs, else None.

        During a merge the origin already shows the merging snapshot's content: a chunk
        not merged yet is read from that snapshot's exception (read-locked, so the merge
        step waits for the read) (seed 003: reads of the merging origin).
        """
        if self._merging is None:
            return None
        with self.lock:
            self._enter_locked()
            if self.store.merging is None:
                return None
            sources, locked = [], []
            for c in range(first, last + 1):
                sc = self.store.merge_source(c)
                if sc is not None:
                    self._readlocks[c] += 1
                    locked.append(c)
                sources.append(sc)
            return ReadMap(first, sources, locked)

    def release_read(self, rmap: ReadMap) -> None:
        """Drop the read locks of a read map (seed 000 ``FINISH_SNAPSHOT_READ``)."""
        if not rmap.locked:
            return
        with self.lock:
            wake = False
            for c in rmap.locked:
                self._readlocks[c] -= 1
                if not self._readlocks[c]:
                    del self._readlocks[c]
                    wake = True
            if wake:
                self.cond.notify_all()

    release_snapshot_read = release_read

    def origin_reads_itself(self) -> bool:
        """True while no merge is in progress: every origin chunk reads from the origin
        device, with no mapping and no lock (never waits)."""
        return self._merging is None

    def map_snapshot_read_nowait(self, snap: SnapshotInfo, first: int, last: int
                                 ) -> list[int | None] | None:
        """Where ``snap`` reads chunks ``first..last`` (per chunk a store chunk, or None
        for the origin) if that needs no wait: the metadata lock within
        :data:`NOWAIT_LOCK_WAIT`, every tree block in memory, no merge, no failed store,
        ``snap`` live.  Else None, and :meth:`map_snapshot_read` answers (or raises).

        A mapping returned stays valid until :meth:`finish_snapshot_read_nowait`, which
        the caller must call on the same thread as soon as its page-cache copies are
        done: the metadata lock is held meanwhile (microseconds), which is what the read
        locks of :meth:`map_snapshot_read` otherwise ensure (no origin chunk mapped to
        the origin is overwritten before the read is done).  The NBD server tries this
        on its event loop before handing a READ to a worker thread.
        """
        # Worth a short wait: the lock is mostly held for microseconds (a mapping) by a
        # thread that needs the GIL, which waiting here releases; giving up at once made
        # every read that met a busy lock go to a thread, which kept the lock busier.
        if self._merging is not None or not self.lock.acquire(timeout=NOWAIT_LOCK_WAIT):
            return None
        try:
            v = snap.id
            if self._failed is not None or self._merging is not None or v not in self._ids:
                self.lock.release()
                return None
            lookup = self.store.snapshot_exception_nowait
            if first == last:  # the common small read
                return [lookup(v, first)[0]]
            return [lookup(v, c)[0] for c in range(first, last + 1)]
        except NotCached:
            self.lock.release()
            return None
        except BaseException:
            self.lock.release()
            raise

    def finish_snapshot_read_nowait(self) -> None:
        """The reads of a mapping from :meth:`map_snapshot_read_nowait` are done."""
        self.lock.release()
