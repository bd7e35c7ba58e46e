"""Read mapping: where a snapshot (or the merging origin) reads its chunks, with the
origin chunks it reads read-locked until released (seed 000 ``QUERY_SNAPSHOT_READ`` and
``FINISH_SNAPSHOT_READ``), and the no-wait mapping the event loop tries first."""


from __future__ import annotations

import threading

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
        ``QUERY_SNAPSHOT_READ``); origin chunks stay read-locked until released."""
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
            return ReadMap(first, sources, locked)

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

    def map_read_nowait(self, snap: SnapshotInfo | None, first: int, last: int
                        ) -> _NowaitMap:
        """The sources of chunks ``first..last`` of ``snap`` (None: the origin), as a
        context whose value is ``[store chunk or None per chunk]``, or None when the
        mapping needs a wait: the metadata lock for more than :data:`NOWAIT_LOCK_WAIT`,
        a tree block not in memory, a merge in progress, a failed store, a deleted
        snapshot (then :meth:`map_snapshot_read` answers, or raises the error).

        The NBD server tries reads on its event loop first.  The metadata lock is held
        until the context exits (the caller's page-cache copies: microseconds), which is
        what the read locks of :meth:`map_snapshot_read` otherwise ensure: no origin
        chunk mapped to the origin can be overwritten before the read is done.  The
        origin outside a merge needs no lock: it maps to itself.
        """
        if self._merging is not None:
            return _NO_MAP
        if snap is None:
            return _NowaitMap(None, [None] * (last - first + 1))
        # Worth a short wait: the lock is mostly held for microseconds (a mapping) by a
        # thread that needs the GIL, which waiting here releases; giving up at once made
        # every read that met a busy lock go to a thread, which kept the lock busier.
        if not self.lock.acquire(timeout=NOWAIT_LOCK_WAIT):
            return _NO_MAP
        try:
            v = snap.id
            if self._failed is not None or self._merging is not None or v not in self._ids:
                self.lock.release()
                return _NO_MAP
            lookup = self.store.snapshot_exception_nowait
            if first == last:  # the common small read
                return _NowaitMap(self.lock, [lookup(v, first)[0]])
            return _NowaitMap(self.lock, [lookup(v, c)[0] for c in range(first, last + 1)])
        except NotCached:
            self.lock.release()
            return _NO_MAP
        except BaseException:
            self.lock.release()
            raise


class _NowaitMap:
    """The context :meth:`LocalService.map_read_nowait` returns: its value is the
    sources (or None), and leaving it releases the metadata lock if it holds it."""

    __slots__ = ("lock", "sources")

    def __init__(self, lock: threading.Lock | None, sources: list[int | None] | None):
        self.lock = lock
        self.sources = sources

    def __enter__(self) -> list[int | None] | None:
        return self.sources

    def __exit__(self, *exc) -> None:
        if self.lock is not None:
            self.lock.release()


#: "needs a wait": no sources, no lock held
_NO_MAP = _NowaitMap(None, None)
