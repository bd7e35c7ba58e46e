"""The block cache of the on-disk store: decoded tree blocks (leaves and index nodes) in
memory, least recently used first, with the blocks changed since the last commit
(``_dirty``) and those of the commit being written (``_inflight``) pinned: their home
copies on disk may be older, so they are never reloaded from there.

:class:`BlockCache` is a part of :class:`~ddsnap.store.shared.SharedStore` (which sets
up the attributes it declares).
"""


from __future__ import annotations

from collections import OrderedDict

from ..errors import CorruptMetadata
from .alloc import Bitmap
from .api import NotCached
from .format import (
    T_LEAF,
    T_NODE,
    Leaf,
    Node,
    Superblock,
    check_header,
)

#: decoded leaves and nodes kept in memory (clean ones are evicted beyond this)
CACHE_BLOCKS = 16384


class BlockCache:
    """Tree blocks by block number, loaded on demand and checked (type, block number,
    store UUID, checksum) as they are."""

    uuid: bytes
    sb: Superblock
    bitmap: Bitmap
    #: decoded blocks kept in memory (clean ones are evicted beyond this)
    cache_blocks: int
    _cache: OrderedDict[int, object]
    _dirty: dict[int, object]
    _inflight: dict[int, object]

    def read_block(self, block: int) -> bytes:
        """The 4 KiB block ``block`` as recovery would leave it (``SharedStore``)."""
        raise NotImplementedError

    def _put(self, block: int, obj) -> None:
        self._cache[block] = obj
        self._cache.move_to_end(block)
        self._dirty[block] = obj

    def _get(self, block: int, kind: int, load: bool = True):
        obj = self._cache.get(block)
        if obj is None:
            # Changed since the last commit, or in the commit being written: its home
            # block may be stale, never reload it.
            obj = self._dirty.get(block) or self._inflight.get(block)
            if obj is not None:
                self._cache[block] = obj
        if obj is not None:
            self._cache.move_to_end(block)
            want = Leaf if kind == T_LEAF else Node
            if not isinstance(obj, want):
                raise CorruptMetadata(block, "tree points at a block of the wrong kind")
            return obj
        if not load:
            raise NotCached(block)
        obj = self._load(block, kind)
        self._cache[block] = obj
        if len(self._cache) > self.cache_blocks:
            for b in list(self._cache):
                if len(self._cache) <= self.cache_blocks * 3 // 4:
                    break
                if b not in self._dirty:
                    del self._cache[b]
        return obj

    def _load(self, block: int, kind: int):
        if not self.bitmap.data_start <= block < self.sb.blocks:
            raise CorruptMetadata(block, "tree points outside the metadata area")
        buf = self.read_block(block)
        check_header(buf, kind, block, self.uuid)
        if kind == T_LEAF:
            return Leaf.decode(buf, block)
        return Node.decode(buf, block)

    def _read_node(self, block: int) -> Node:
        return self._get(block, T_NODE)

    def _read_leaf(self, block: int) -> Leaf:
        return self._get(block, T_LEAF)

    def _mark(self, block: int, obj) -> None:
        # Back in the cache too: a clean object may have been evicted while the caller
        # held it, and a later _get must find this one, not reload the old one.
        self._put(block, obj)

    def cached_blocks(self) -> int:
        """Metadata blocks (tree nodes) kept in the block cache now."""
        return len(self._cache)
