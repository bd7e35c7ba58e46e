"""The B-tree of the on-disk store: the ordered map of versioned exceptions
(:mod:`ddsnap.store.versioned`), fixed 24-byte records keyed ``(owner, chunk, tag)`` in
leaves of up to ``LEAF_MAX`` records under index nodes of up to ``NODE_MAX`` children
(docs/format.md "The B-tree"; seed 000 ``add_exception_to_tree``, seed 001
``delete_tree_range``).

:class:`BTree` is a part of :class:`~ddsnap.store.shared.SharedStore`: the ``_kv_*``
methods are the ordered map :class:`~ddsnap.store.versioned.VersionedStore` is written
against (the memory store has its own), and :meth:`BTree.leaves`, :meth:`BTree.nodes`,
:meth:`BTree.node` and :meth:`BTree.leaf_of` are the public way to look at the tree
(``check``, tests, the bench).
"""


from __future__ import annotations

import bisect

from ..errors import CorruptMetadata, StoreFull
from .cache import BlockCache
from .format import LEAF_MAX, NODE_MAX, T_LEAF, T_NODE, Leaf, Node
from .model import State


class BTree(BlockCache):
    """Probe, edit, split and merge the tree; iterate it in key order."""

    state: State
    _spare: list[int]
    _state_dirty: bool

    def _probe(self, key: int, load: bool = True):
        """Path to the leaf covering ``key``: ``([(node_block, node, index)], leaf_block,
        leaf)``.  With ``load`` False a block not in memory raises NotCached."""
        path = []
        block = self.state.root
        cache = self._cache
        for _ in range(self.state.levels):
            node = cache.get(block)
            if type(node) is not Node:  # not cached (or a corrupt tree): the full check
                node = self._get(block, T_NODE, load)
            else:
                cache.move_to_end(block)
            i = bisect.bisect_right(node.keys, key) - 1
            if i < 0:
                i = 0
            path.append((block, node, i))
            block = node.children[i]
        leaf = cache.get(block)
        if type(leaf) is not Leaf:
            leaf = self._get(block, T_LEAF, load)
        else:
            cache.move_to_end(block)
        return path, block, leaf

    def _next_leaf(self, path, load: bool = True):
        """The leaf after the one ``path`` leads to: ``(path, block, leaf)`` or None."""
        path = list(path)
        while path:
            nblock, node, i = path.pop()
            if i + 1 < len(node.children):
                path.append((nblock, node, i + 1))
                block = node.children[i + 1]
                while len(path) < self.state.levels:
                    node = self._get(block, T_NODE, load)
                    path.append((block, node, 0))
                    block = node.children[0]
                return path, block, self._get(block, T_LEAF, load)
        return None

    def _prev_leaf(self, path):
        """The leaf before the one ``path`` leads to, or None."""
        path = list(path)
        while path:
            nblock, node, i = path.pop()
            if i > 0:
                path.append((nblock, node, i - 1))
                block = node.children[i - 1]
                while len(path) < self.state.levels:
                    node = self._read_node(block)
                    path.append((block, node, len(node.children) - 1))
                    block = node.children[-1]
                return path, block, self._read_leaf(block)
        return None

    def _kv_get(self, key, nowait=False):
        _path, _b, leaf = self._probe(key, not nowait)
        keys = leaf.keys
        i = bisect.bisect_left(keys, key)
        if i < len(keys) and keys[i] == key:
            return leaf.vals[i]
        return None

    def _kv_succ(self, key, nowait=False):
        path, _b, leaf = self._probe(key, not nowait)
        i = bisect.bisect_left(leaf.keys, key)
        while i == len(leaf.keys):
            nxt = self._next_leaf(path, not nowait)
            if nxt is None:
                return None
            path, _b, leaf = nxt
            i = 0
        return leaf.keys[i], leaf.vals[i]

    def _kv_pred(self, key):
        path, _b, leaf = self._probe(key)
        i = bisect.bisect_right(leaf.keys, key) - 1
        while i < 0:
            prv = self._prev_leaf(path)
            if prv is None:
                return None
            path, _b, leaf = prv
            i = len(leaf.keys) - 1
        return leaf.keys[i], leaf.vals[i]

    def _kv_range(self, lo, hi, limit=None):
        out: list[tuple[int, int]] = []
        path, _b, leaf = self._probe(lo)
        i = bisect.bisect_left(leaf.keys, lo)
        while True:
            keys, vals = leaf.keys, leaf.vals
            while i < len(keys):
                k = keys[i]
                if k >= hi or (limit is not None and len(out) >= limit):
                    return out
                out.append((k, vals[i]))
                i += 1
            nxt = self._next_leaf(path)
            if nxt is None:
                return out
            path, _b, leaf = nxt
            i = 0

    def _kv_reserve(self, keys) -> None:
        """Make sure inserting ``keys`` cannot fail half way: when a leaf they go to
        would split, allocate every block the splits may need now (all or none).

        Raises:
            StoreFull: not enough free blocks; nothing was changed.
        """
        per_leaf: dict[int, int] = {}
        for k in keys:
            _p, lb, leaf = self._probe(k)
            per_leaf[lb] = per_leaf.get(lb, len(leaf.keys)) + 1
        if all(n <= LEAF_MAX for n in per_leaf.values()):
            return
        # Per key, at worst: the new leaf, a new node at each index level, a new root.
        self._spare.extend(self._alloc_blocks(len(keys) * (self.state.levels + 2)))

    def _kv_release(self) -> None:
        """Give back the blocks :meth:`_kv_reserve` took that no split used."""
        while self._spare:
            self.bitmap.unalloc_block(self._spare.pop())

    def _take_block(self) -> int:
        if self._spare:
            return self._spare.pop()
        return self.bitmap.alloc_block()

    def _kv_put(self, key, value):
        path, lblock, leaf = self._probe(key)
        keys = leaf.keys
        i = bisect.bisect_left(keys, key)
        if i < len(keys) and keys[i] == key:
            leaf.vals[i] = value
            self._mark(lblock, leaf)
            return
        keys.insert(i, key)
        leaf.vals.insert(i, value)
        self._mark(lblock, leaf)
        if len(keys) > LEAF_MAX:
            self._split_leaf(path, lblock, leaf, i)

    def _split_leaf(self, path, lblock: int, leaf: Leaf, at: int) -> None:
        """Split an overfull leaf; ``at`` is where the new key went.  A key added at the
        end (copy-outs of a sequential write, new tags) leaves the left leaf full: the
        tree then grows full leaves, not half-full ones.  So does a key added at the end
        of its owner's run in the second half of the leaf (the origin's copy-outs, the
        merge markers and the tag index grow at three places near the end of the key
        space): the cut goes between the owners."""
        n = len(leaf.keys)
        keys = leaf.keys
        if at == n - 1:
            cut = n - 1
        elif at >= n // 2 and keys[at + 1] >> 96 != keys[at] >> 96:
            cut = at + 1
        else:
            cut = n // 2
        rblock = self._take_block()
        right = Leaf(leaf.keys[cut:], leaf.vals[cut:])
        del leaf.keys[cut:]
        del leaf.vals[cut:]
        self._put(rblock, right)
        self._mark(lblock, leaf)
        self._insert_child(path, len(path) - 1, right.keys[0], rblock)

    def _insert_child(self, path, level: int, key: int, child: int) -> None:
        """Insert ``child`` after ``path[level]``'s entry, splitting full nodes upward."""
        nblock, node, i = path[level]
        node.keys.insert(i + 1, key)
        node.children.insert(i + 1, child)
        self._mark(nblock, node)
        if len(node.keys) <= NODE_MAX:
            return
        half = len(node.keys) // 2
        right = Node(node.keys[half:], node.children[half:])
        del node.keys[half:]
        del node.children[half:]
        rblock = self._take_block()
        self._put(rblock, right)
        if level > 0:
            self._insert_child(path, level - 1, right.keys[0], rblock)
        else:
            # The root split: the tree grows a level (seed 000 add_exception_to_tree).
            root = self._take_block()
            self._put(root, Node([0, right.keys[0]], [nblock, rblock]))
            self.state.root = root
            self.state.levels += 1
            self._state_dirty = True

    def _kv_del(self, key):
        path, lblock, leaf = self._probe(key)
        i = bisect.bisect_left(leaf.keys, key)
        if i == len(leaf.keys) or leaf.keys[i] != key:
            raise CorruptMetadata(lblock, f"an exception the tree was asked to remove is "
                                          f"not in leaf {lblock}")
        del leaf.keys[i]
        del leaf.vals[i]
        self._mark(lblock, leaf)
        if len(leaf.keys) < LEAF_MAX // 2:
            self._rebalance(path, lblock, leaf)

    def _rebalance(self, path, lblock: int, leaf: Leaf) -> None:
        """An under-full leaf: merge it with a neighbour under the same index node when
        both fit in three quarters of a leaf (an empty one always goes); index nodes are
        merged the same way up the path, and a root with one child drops a level."""
        nblock, node, i = path[-1]
        if len(node.children) > 1:
            j = i + 1 if i + 1 < len(node.children) else i - 1
            other = self._read_leaf(node.children[j])
            if not leaf.keys or len(other.keys) + len(leaf.keys) <= LEAF_MAX * 3 // 4:
                lo, hi = min(i, j), max(i, j)
                left = leaf if lo == i else other
                right = other if lo == i else leaf
                left.keys.extend(right.keys)
                left.vals.extend(right.vals)
                self._mark(node.children[lo], left)
                self._free_meta(node.children[hi])
                del node.keys[hi]
                del node.children[hi]
                self._mark(nblock, node)
                self._rebalance_node(path, len(path) - 1)
        elif not leaf.keys and len(path) > 1:
            self._unlink(path, len(path) - 1)
        self._collapse_root()

    def _unlink(self, path, level: int) -> None:
        """Remove the empty subtree ``path[level]`` points into from its node, and the
        node too when that leaves it without children.  The tree's last leaf stays
        (empty), so a removal never needs a new block."""
        nblock, node, i = path[level]
        if level == 0 and len(node.children) == 1:
            return
        if len(node.children) == 1:
            self._unlink(path, level - 1)
            return
        # The subtree below: single-child nodes down to the empty leaf.
        for b, _n, _k in path[level + 1:]:
            self._free_meta(b)
        last_b, last_n, last_i = path[-1]
        self._free_meta(last_n.children[last_i])
        lower = node.keys[0]
        del node.keys[i]
        del node.children[i]
        node.keys[0] = lower  # the node still covers its whole range
        self._mark(nblock, node)

    def _rebalance_node(self, path, level: int) -> None:
        """Index node ``path[level]`` lost a child: merge it with a neighbour under its
        parent when both fit in three quarters of a node, and go on up."""
        if level == 0:
            return
        nblock, node, _i = path[level]
        pblock, parent, i = path[level - 1]
        if len(parent.children) < 2:
            return
        j = i + 1 if i + 1 < len(parent.children) else i - 1
        other = self._read_node(parent.children[j])
        if len(other.children) + len(node.children) > NODE_MAX * 3 // 4:
            return
        lo, hi = min(i, j), max(i, j)
        left = node if lo == i else other
        right = other if lo == i else node
        left.keys.extend(parent.keys[hi:hi + 1] + right.keys[1:])
        left.children.extend(right.children)
        self._mark(parent.children[lo], left)
        self._free_meta(parent.children[hi])
        del parent.keys[hi]
        del parent.children[hi]
        self._mark(pblock, parent)
        self._rebalance_node(path, level - 1)

    def _collapse_root(self) -> None:
        while self.state.levels > 1:
            root = self._read_node(self.state.root)
            if len(root.children) != 1:
                return
            old = self.state.root
            self.state.root = root.children[0]
            self.state.levels -= 1
            self._free_meta(old)
            self._state_dirty = True

    def _alloc_blocks(self, n: int) -> list[int]:
        """Allocate ``n`` metadata blocks, all or none.

        Raises:
            StoreFull: fewer than ``n`` free blocks (none is kept).
        """
        got = []
        try:
            for _ in range(n):
                got.append(self.bitmap.alloc_block())
        except StoreFull:
            for b in got:
                self.bitmap.unalloc_block(b)
            raise
        return got

    def _free_meta(self, block: int) -> None:
        self._cache.pop(block, None)
        self._dirty.pop(block, None)
        self.bitmap.free_block(block)

    def _free_data(self, store_chunk: int) -> None:
        self.bitmap.free_chunk(store_chunk)

    def _leaves(self):
        """Iterate ``(leaf_block, leaf)`` in key order (from the cache or disk)."""
        def walk(block, level):
            node = self._read_node(block)
            for child in list(node.children):
                if level == self.state.levels - 1:
                    yield child, self._read_leaf(child)
                else:
                    yield from walk(child, level + 1)
        yield from walk(self.state.root, 0)

    # -- inspection (public: check, tests, the bench) ----------------------------------

    def leaves(self):
        """Iterate ``(leaf_block, leaf)`` in key order (from the cache or disk).

        Raises:
            CorruptMetadata: a tree block is damaged (naming it).
        """
        return self._leaves()

    def nodes(self):
        """Iterate ``(block, level, node)`` over the index nodes, depth first in key
        order (level 0 is the root; leaves are below level ``state.levels - 1``).

        Raises:
            CorruptMetadata: a tree block is damaged (naming it).
        """
        def walk(block, level):
            node = self._read_node(block)
            yield block, level, node
            if level < self.state.levels - 1:
                for child in list(node.children):
                    yield from walk(child, level + 1)
        yield from walk(self.state.root, 0)

    def node(self, block: int) -> Node:
        """The index node at ``block`` (the root is ``state.root``).

        Raises:
            CorruptMetadata: the block is not a valid index node of this store.
        """
        return self._read_node(block)

    def leaf_of(self, key: int) -> tuple[int, Leaf]:
        """``(leaf_block, leaf)``: the leaf that holds ``key``, or would.

        Raises:
            CorruptMetadata: a tree block on the way is damaged (naming it).
        """
        _path, block, leaf = self._probe(key)
        return block, leaf

    def raw_put(self, key: int, value: int) -> None:
        """Put record ``key -> value`` into the tree alone, bypassing the rules of
        versioned exceptions, the space figures and the tag index (committed with the
        next commit): for repair tools and tests of what damage can look like."""
        self._kv_put(key, value)

    def raw_delete(self, key: int) -> None:
        """Remove record ``key`` from the tree alone (see :meth:`raw_put`).

        Raises:
            CorruptMetadata: no such record.
        """
        self._kv_del(key)

    def evict_clean(self) -> None:
        """Drop every clean block from the cache (changed ones stay): the next lookups
        read the tree from disk, or raise NotCached when told not to."""
        for b in list(self._cache):
            if b not in self._dirty:
                del self._cache[b]
