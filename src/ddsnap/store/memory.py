"""MemoryStore: the transient, in-memory exception store.

It satisfies the same API as the on-disk :class:`~ddsnap.store.shared.SharedStore` and
passes the same conformance suite; tests use it as the shared store's twin, and it serves
anyone who wants snapshots that need not survive the process.  Its versioned exceptions
(:mod:`ddsnap.store.versioned`) are a sorted dict from packed key to store chunk;
exception data lives in a :class:`~ddsnap.store.blockdev.MemoryDevice`.
"""

from __future__ import annotations

import heapq
import os

from sortedcontainers import SortedDict

from ..errors import InvalidArgument, ShrinkRefused, StoreFull
from .blockdev import MemoryDevice
from .model import Finding, State, check_geometry
from .snapshots import VersionTable
from .space import SpaceAccount
from .versioned import VersionedStore


class MemoryStore(VersionedStore):
    """An exception store held in memory.

    Args:
        origin_size: origin bytes.
        store_size: bytes of exception data space (``store_size // chunk_size`` chunks).
        chunk_size: bytes per chunk, a power of two from 4 KiB to 1 MiB.
        max_snapshots: most snapshots held at once, 0 for no limit.
    """

    def __init__(self, origin_size: int, store_size: int, chunk_size: int = 65536,
                 max_snapshots: int = 0, origin_path: str = "<memory>"):
        check_geometry(chunk_size, max_snapshots)
        self.chunk_size = chunk_size
        self.origin_size = origin_size
        self.origin_path = origin_path
        self.max_snapshots = max_snapshots
        self.uuid = os.urandom(16)
        self.cow = MemoryDevice(store_size // chunk_size * chunk_size)
        self._nchunks = store_size // chunk_size
        self._free = list(range(self._nchunks))  # a heap: lowest chunk first
        self._map = SortedDict()
        self.table = VersionTable([], max_snapshots)
        self.state = State()
        self._space = SpaceAccount()
        self._versioned_init()
        self.commits = 0
        self._dirty = False

    # -- the ordered map -------------------------------------------------------------------

    def _kv_get(self, key, nowait=False):
        return self._map.get(key)

    def _kv_succ(self, key, nowait=False):
        m = self._map
        i = m.bisect_left(key)
        if i == len(m):
            return None
        k = m.keys()[i]
        return k, m[k]

    def _kv_pred(self, key):
        m = self._map
        i = m.bisect_right(key)
        if not i:
            return None
        k = m.keys()[i - 1]
        return k, m[k]

    def _kv_put(self, key, value):
        self._map[key] = value
        self._dirty = True

    def _kv_del(self, key):
        del self._map[key]
        self._dirty = True

    def _kv_range(self, lo, hi, limit=None):
        out = []
        for k in self._map.irange(lo, hi, inclusive=(True, False)):
            out.append((k, self._map[k]))
            if limit is not None and len(out) >= limit:
                break
        return out

    def _free_data(self, store_chunk):
        heapq.heappush(self._free, store_chunk)

    def _table_changed(self) -> None:
        self._dirty = True

    # -- the rest of the API ---------------------------------------------------------------

    def allocate_chunk(self) -> int:
        if not self._free:
            raise StoreFull()
        self._dirty = True
        return heapq.heappop(self._free)

    def release_chunk(self, store_chunk: int) -> None:
        heapq.heappush(self._free, store_chunk)
        self._dirty = True

    def _state_changed(self) -> None:
        self._dirty = True

    def begin_commit(self):
        if not self._dirty:
            return None
        self._dirty = False
        return True

    def write_commit(self, batch) -> None:
        self.commits += 1

    @property
    def store_size(self) -> int:
        """Bytes of exception data space (whole chunks)."""
        return self._nchunks * self.chunk_size

    @property
    def min_size(self) -> int:
        """The fewest bytes a resize may leave: one chunk."""
        return self.chunk_size

    def resize_store(self, size: int) -> int:
        """Grow or shrink the chunks available to ``size // chunk_size``; return the new
        size in bytes.

        Raises:
            InvalidArgument: not even one chunk.
            ShrinkRefused: chunks past the new end are in use.
        """
        n = size // self.chunk_size
        if size < self.min_size:
            raise InvalidArgument(f"a store of {size} bytes holds no chunk")
        if n < self._nchunks:
            used = sorted({sc for _o, _c, _t, sc in self.exceptions() if sc >= n})
            if used:
                raise ShrinkRefused(f"cannot shrink the store to {n} chunks: {len(used)} "
                                    f"chunks past the new end are in use (e.g. store chunk "
                                    f"{used[0]}); nothing was changed")
            self._free = [c for c in self._free if c < n]
            heapq.heapify(self._free)
        else:
            for c in range(self._nchunks, n):
                heapq.heappush(self._free, c)
        self.cow.resize(n * self.chunk_size)
        self._nchunks = n
        self._dirty = True
        return n * self.chunk_size

    def space(self) -> dict:
        free = len(self._free)
        return {"chunks_total": self._nchunks, "chunks_free": free,
                "chunks_used": self._nchunks - free}

    def _space_account(self) -> SpaceAccount:
        if self._space is None:  # counted at creation, kept ever since
            raise AssertionError("a memory store without space figures")
        return self._space

    def check(self) -> list[Finding]:
        findings = self.check_entries()
        findings += self.check_index(list(self.exceptions()), self.index_records())
        used = {sc for _o, _c, _t, sc in self.exceptions()}
        if used & set(self._free):
            findings.append(Finding("fatal", None, "a referenced chunk is on the free list"))
        truth, _counts = self._count_groups()
        drift = self._space_account().drift(truth, self.table,
                                            lambda v: self.table.slot(v).name)
        for msg in drift:
            findings.append(Finding("fatal", None, msg))
        return findings

    def close(self) -> None:
        pass
