"""MemoryStore: the transient, in-memory exception store.

It satisfies the same API as the on-disk :class:`~ddsnap.store.shared.SharedStore` and
passes the same conformance suite; tests use it as the shared store's twin, and it serves
anyone who wants snapshots that need not survive the process.  Exceptions are a dict from
logical chunk to its list of ``[sharemap, store_chunk]``; exception data lives in a
:class:`~ddsnap.store.blockdev.MemoryDevice`.
"""

from __future__ import annotations

import heapq

from ..errors import InvalidArgument, StoreFull
from .api import ExceptionStore, Finding, SnapshotInfo
from .blockdev import MemoryDevice
from .format import SnapSlot, State
from .snapshots import (SnapshotTable, SpaceAccount, exc_add_snapshot, exc_lookup,
                        exc_remove_bits, exc_sharers)


class MemoryStore(ExceptionStore):
    """An exception store held in memory.

    Args:
        origin_size: origin bytes.
        store_size: bytes of exception data space (``store_size // chunk_size`` chunks).
        chunk_size: bytes per chunk, a power of two from 4 KiB to 1 MiB.
        max_snapshots: sharemap width, a multiple of 64 up to 1024.
    """

    def __init__(self, origin_size: int, store_size: int, chunk_size: int = 65536,
                 max_snapshots: int = 64, origin_path: str = "<memory>"):
        check_geometry(chunk_size, max_snapshots)
        self.chunk_size = chunk_size
        self.origin_size = origin_size
        self.origin_path = origin_path
        self.max_snapshots = max_snapshots
        self.cow = MemoryDevice(store_size // chunk_size * chunk_size)
        self._nchunks = store_size // chunk_size
        self._free = list(range(self._nchunks))  # a heap: lowest chunk first
        self._excs: dict[int, list[list[int]]] = {}
        self._table = SnapshotTable([SnapSlot() for _ in range(max_snapshots)])
        self.state = State()
        self._space = SpaceAccount(max_snapshots)
        self.commits = 0
        self._dirty = False

    def snapshots(self) -> list[SnapshotInfo]:
        return self._table.live()

    def create_snapshot(self, name, read_only=False, created=None) -> SnapshotInfo:
        info = self._table.create(name, read_only, self.state.next_snapshot_id, created)
        self.state.next_snapshot_id += 1
        self._space.created(info.bit)
        self._dirty = True
        return info

    def begin_delete(self, name) -> SnapshotInfo:
        info = self._table.begin_delete(name)
        self._space.deleted(info.bit)
        self._dirty = True
        return info

    def sweep_step(self) -> bool:
        mask = self._table.deleting_mask
        if not mask:
            return True
        for chunk in list(self._excs):
            excs = self._excs[chunk]
            for share, _sc in excs:
                if share & mask:
                    self._space.change(share, share & ~mask)
            for c in exc_remove_bits(excs, mask):
                heapq.heappush(self._free, c)
            if not excs:
                del self._excs[chunk]
        self._table.finish_delete(mask)
        self._dirty = True
        return True

    @property
    def live_mask(self) -> int:
        return self._table.live_mask

    def origin_sharers(self, chunk: int) -> int:
        return exc_sharers(self._excs.get(chunk), self._table.live_mask)

    def snapshot_exception(self, bit: int, chunk: int):
        return exc_lookup(self._excs.get(chunk), bit)

    def allocate_chunk(self) -> int:
        if not self._free:
            raise StoreFull()
        self._dirty = True
        return heapq.heappop(self._free)

    def release_chunk(self, store_chunk: int) -> None:
        heapq.heappush(self._free, store_chunk)
        self._dirty = True

    def add_origin_exception(self, chunk, store_chunk, sharemap) -> None:
        self._excs.setdefault(chunk, []).append([sharemap, store_chunk])
        self._space.change(0, sharemap)
        self._dirty = True

    def _state_changed(self) -> None:
        self._dirty = True

    def snapshot_exceptions_from(self, bit, start, limit):
        out = []
        for chunk in sorted(c for c in self._excs if c >= start):
            sc, _u = exc_lookup(self._excs[chunk], bit)
            if sc is not None:
                out.append((chunk, sc))
                if len(out) >= limit:
                    break
        return out

    def drop_snapshot_exception(self, bit, chunk) -> None:
        excs = self._excs.get(chunk)
        if not excs:
            return
        before = [list(e) for e in excs]
        for c in exc_remove_bits(excs, 1 << bit):
            heapq.heappush(self._free, c)
        if not excs:
            del self._excs[chunk]
        self._space.diff(before, excs)
        self._dirty = True

    def add_snapshot_exception(self, bit, chunk, store_chunk) -> None:
        excs = self._excs.setdefault(chunk, [])
        before = [list(e) for e in excs]
        for c in exc_add_snapshot(excs, bit, store_chunk):
            heapq.heappush(self._free, c)
        self._space.diff(before, excs)
        self._dirty = True

    def begin_commit(self):
        if not self._dirty:
            return None
        self._dirty = False
        return True

    def write_commit(self, batch) -> None:
        self.commits += 1

    def space(self) -> dict:
        free = len(self._free)
        return {"chunks_total": self._nchunks, "chunks_free": free,
                "chunks_used": self._nchunks - free}

    def exceptions(self):
        for chunk in sorted(self._excs):
            yield chunk, self._excs[chunk]

    def _space_account(self) -> SpaceAccount:
        return self._space

    def check(self) -> list[Finding]:
        findings = []
        allowed = self._table.live_mask | self._table.deleting_mask
        seen: set[int] = set()
        for chunk, excs in self.exceptions():
            for share, c in excs:
                if not share or share & ~allowed:
                    findings.append(Finding("fatal", None,
                                            f"chunk {chunk}: sharemap {share:#x} not within live snapshots"))
                if c in seen:
                    findings.append(Finding("fatal", None, f"store chunk {c} referenced twice"))
                seen.add(c)
        if seen & set(self._free):
            findings.append(Finding("fatal", None, "a referenced chunk is on the free list"))
        truth = SpaceAccount.from_exceptions(self.max_snapshots, self._table.live_mask,
                                             self.exceptions())
        for msg in self._space.drift(truth, lambda b: self._table.slots[b].name):
            findings.append(Finding("fatal", None, msg))
        return findings

    def close(self) -> None:
        pass


def check_geometry(chunk_size: int, max_snapshots: int) -> None:
    """Validate ``--chunk-size`` and ``--max-snapshots``.

    Raises:
        InvalidArgument: chunk size not a power of two in [4 KiB, 1 MiB], or sharemap width
            not a multiple of 64 in [64, 1024].
    """
    if chunk_size < 4096 or chunk_size > 1 << 20 or chunk_size & (chunk_size - 1):
        raise InvalidArgument(f"chunk size must be a power of two from 4K to 1M, not {chunk_size}")
    if max_snapshots < 64 or max_snapshots > 1024 or max_snapshots % 64:
        raise InvalidArgument(f"max snapshots must be a multiple of 64 up to 1024, not {max_snapshots}")
