"""SharedStore: the on-disk snapshot store shared by every snapshot of an origin.

Layout (format v3, ``docs/format.md``): superblocks in blocks 0 and 1, the first snapshot
table block, the allocation bitmap and the journal, then chunks for exception data and
4 KiB blocks for the B-tree and further table blocks.  The tree is the ordered map of
versioned exceptions (:mod:`ddsnap.store.versioned`): fixed 24-byte records keyed
``(owner, chunk, tag)``.  Changes go through journal transactions
(:mod:`ddsnap.store.journal`); a delete is swept in bounded, committed steps that free the
exceptions no live snapshot reads (seed 001 ``delete_tree_range``); the sweep resumes
after a crash.
"""

from __future__ import annotations

import bisect
import os
import time
from collections import OrderedDict
from dataclasses import dataclass

from humanfriendly import format_size

from ..errors import CorruptMetadata, FormatTooOld, InvalidArgument, NotAStore, StoreFull
from ..units import human_bytes
from .alloc import Bitmap
from .api import Finding, NotCached, SnapshotInfo
from .blockdev import BlockDevice
from .format import (
    AUTO_DELETED_MAX,
    BITMAP_BYTES,
    BITS_PER_BITMAP,
    BLOCK_SHIFT,
    BLOCK_SIZE,
    HEADER_SIZE,
    LEAF_MAX,
    MAGIC,
    MAX_ORIGIN_PATH,
    NODE_MAX,
    SNAPS_PER_BLOCK,
    T_BITMAP,
    T_LEAF,
    T_NODE,
    T_SNAPTABLE,
    VERSION_V1,
    VERSION_V2,
    AutoDeleted,
    Leaf,
    Node,
    SnapSlot,
    State,
    Superblock,
    check_header,
    decode_snaptable,
    encode_snaptable,
    header_version,
    seal,
)
from .journal import Journal, Replay, Transaction
from .memory import check_geometry
from .snapshots import SpaceAccount, VersionTable
from .versioned import VersionedStore

#: decoded leaves and nodes kept in memory (clean ones are evicted beyond this)
CACHE_BLOCKS = 16384


def _layout(blocks: int, bpc: int, max_snapshots: int, journal_blocks: int | None):
    """Where a store of ``blocks`` 4 KiB blocks puts its metadata: returns
    ``(snaptable blocks, bitmap blocks, journal blocks, first data block)``.  The table
    starts as one block; it grows as a chain of blocks from the data area."""
    st_blocks = 1
    bm_blocks = -(-blocks // BITS_PER_BITMAP)
    if journal_blocks is None:
        journal_blocks = min(2048, max(256, blocks // 16))
    j_start = 2 + st_blocks + bm_blocks
    data_start = -(-(j_start + journal_blocks) // bpc) * bpc
    return st_blocks, bm_blocks, journal_blocks, data_start


def _fits(blocks: int, bpc: int, data_start: int) -> bool:
    """The rule of :meth:`SharedStore.create`: the metadata, the tree's first two blocks
    and at least one data chunk fit in ``blocks``."""
    return data_start + 2 + bpc <= blocks


def min_store_size(chunk_size: int, max_snapshots: int = 0,
                   journal_blocks: int | None = None) -> int:
    """The smallest store, in bytes, :meth:`SharedStore.create` accepts for this geometry.

    That store holds its metadata, the tree's first leaf and index node and one data
    chunk; it is a whole number of chunks.  A bigger size is accepted too (the layout only
    grows with the size by less than the size does).

    Args:
        chunk_size: bytes per chunk (a power of two from 4 KiB to 1 MiB).
        max_snapshots: the snapshot limit (0: none; it does not change the layout).
        journal_blocks: journal size in 4 KiB blocks (default: as ``create`` chooses it).

    Raises:
        InvalidArgument: bad geometry.
    """
    check_geometry(chunk_size, max_snapshots)
    bpc = chunk_size >> BLOCK_SHIFT
    blocks = bpc
    while True:
        # The layout only grows with ``blocks``, so stepping up to what the last guess
        # needs reaches the least size that fits, from below.
        data_start = _layout(blocks, bpc, max_snapshots, journal_blocks)[3]
        if _fits(blocks, bpc, data_start):
            return blocks * BLOCK_SIZE
        need = data_start + 2 + bpc
        blocks = max(blocks + bpc, -(-need // bpc) * bpc)


@dataclass
class _Batch:
    tx: Transaction
    checkpoint: bool
    quarantine: tuple  # (blocks, chunks) this transaction freed


class SharedStore(VersionedStore):
    """The on-disk shared exception store.  Use :meth:`create` or :meth:`open`."""

    # -- construction --------------------------------------------------------------------

    def __init__(self, dev: BlockDevice, sb: Superblock, old_tail: int | None = None):
        self.dev = dev
        self.sb = sb
        self.uuid = sb.uuid
        self.chunk_size = sb.chunk_size
        self.origin_size = sb.origin_size
        self.origin_path = sb.origin_path
        self.max_snapshots = sb.max_snapshots
        self.cow = dev
        self.bpc = sb.blocks_per_chunk
        self.state = sb.state.copy()
        self._cache: OrderedDict[int, object] = OrderedDict()
        #: decoded blocks kept in memory (clean ones are evicted beyond this)
        self.cache_blocks = CACHE_BLOCKS
        self._dirty: dict[int, object] = {}
        #: the blocks of the batch being written: not dirty any more, but their home
        #: copies may still be old, so a cache miss must not reload them from disk
        self._inflight: dict[int, object] = {}
        self._state_dirty = False
        self._want_checkpoint = False
        # frees of written transactions, and of checkpointed ones (reusable once drained)
        # frees of transactions written since the last checkpoint, of those the last
        # checkpoint covered (still in the older superblock slot's replay window), and
        # of those both slots are past (reusable once drained)
        self._written_frees: list[tuple] = []
        self._ckpt_frees: list[tuple] = []
        self._released: list[tuple] = []
        #: opened for inspection or degraded serving: nothing is ever written
        self.read_only = False
        #: how the open went: superblock slot reports, the journal scan
        self.slot_reports: list[SlotReport] = []
        self.journal_scan: Replay | None = None
        #: read-only opens: block -> the journal image recovery would write to its
        #: home, read instead of the home (the replay, in memory only)
        self.replayed: dict[int, bytes] = {}
        # homes whose newest image is damaged (reading them is an error)
        self._untrusted: set[int] = set()
        self._untrusted_all = False
        #: metadata blocks an inspection open could not read (table, bitmap)
        self.unreadable: list[CorruptMetadata] = []
        self._versioned_init()
        #: the snapshot table's chain of blocks (slot i is in block i // 14)
        self.table_blocks: list[int] = [sb.snaptable_start]
        #: blocks reserved for the splits of the edit under way (see _kv_reserve)
        self._spare: list[int] = []
        #: per-snapshot space figures, kept incrementally (None: the walk at open failed)
        self._space: SpaceAccount | None = None
        self._space_error: CorruptMetadata | None = None
        self.recovered = 0
        #: root state of the last transaction written (what a checkpoint records)
        self._last_state = sb.state.copy()
        self.journal = Journal(dev, sb.uuid, sb.journal_start, sb.journal_blocks,
                               sb.journal_tail, sb.journal_seq, old_tail)

    @classmethod
    def create(cls, dev: BlockDevice, origin_size: int, origin_path: str = "",
               chunk_size: int = 65536, max_snapshots: int = 0,
               journal_blocks: int | None = None, progress=None) -> SharedStore:
        """Write an empty format-v3 store onto ``dev`` and return it opened.

        Args:
            dev: the store device; its whole size is used.
            origin_size: bytes of the origin.
            origin_path: recorded so ``open`` can find and verify the origin.
            chunk_size: bytes per chunk; max_snapshots: the snapshot limit (0: none).
            journal_blocks: journal size in 4 KiB blocks (default: 1/16 of the store,
                clamped to 256..2048).
            progress: if given, called as ``progress(done, total)`` while the metadata
                is written, in 4 KiB blocks (the allocation bitmap makes most of it:
                8192 blocks per TiB of store).

        Raises:
            InvalidArgument: bad geometry, or the device is smaller than
                :func:`min_store_size` (the metadata plus at least one data chunk).
        """
        check_geometry(chunk_size, max_snapshots)
        if origin_size <= 0:
            raise InvalidArgument("the origin is empty")
        cshift = chunk_size.bit_length() - 1
        bpc = chunk_size >> BLOCK_SHIFT
        chunks = dev.size // chunk_size
        blocks = chunks * bpc
        asked_journal = journal_blocks
        st_blocks, bm_blocks, journal_blocks, data_start = _layout(
            blocks, bpc, max_snapshots, journal_blocks)
        st_start = 2
        bm_start = st_start + st_blocks
        j_start = bm_start + bm_blocks
        if not _fits(blocks, bpc, data_start):
            need = min_store_size(chunk_size, max_snapshots, asked_journal)
            raise InvalidArgument(
                f"store too small: at least {human_bytes(need)} for "
                f"{format_size(chunk_size, binary=True)} chunks; {dev.path} has "
                f"{human_bytes(dev.size)}")
        sb = Superblock(os.urandom(16), blocks, cshift, max_snapshots, origin_size,
                        time.time_ns(), st_start, st_blocks, bm_start, bm_blocks, j_start,
                        journal_blocks, journal_tail=0, journal_seq=1, clean=False,
                        state=State(0, 1, 1), origin_path=origin_path, generation=0)
        bits = bytearray(bm_blocks * BITMAP_BYTES)
        for b in range(data_start):
            bits[b >> 3] |= 1 << (b & 7)
        for b in range(blocks, bm_blocks * BITS_PER_BITMAP):
            bits[b >> 3] |= 1 << (b & 7)
        self = cls(dev, sb)
        self.table = VersionTable([SnapSlot() for _ in range(SNAPS_PER_BLOCK)], max_snapshots)
        self.bitmap = Bitmap(bits, blocks, bpc, data_start)
        # The initial tree: a root index node over one empty leaf.
        leaf_block = self.bitmap.alloc_block()
        root_block = self.bitmap.alloc_block()
        self._put(leaf_block, Leaf())
        self._put(root_block, Node([0], [leaf_block]))
        self.state.root = root_block
        self.state.levels = 1
        self._space = SpaceAccount()
        # Everything goes to its home location directly; the journal starts empty.
        total = st_blocks + bm_blocks + len(self._dirty)
        for i in range(st_blocks):
            self._write_home(st_start + i, self._snaptable_image(i, 0))
        for i in range(bm_blocks):
            self._write_home(bm_start + i, self._bitmap_image(i, 0))
            if progress is not None and i % 256 == 255:
                progress(st_blocks + i + 1, total)
        for b, obj in self._dirty.items():
            self._write_home(b, self._node_image(b, obj, 0))
        if progress is not None:
            progress(total, total)
        self._dirty.clear()
        self.table.dirty.clear()
        self.bitmap.dirty.clear()
        dev.flush()
        self._last_state = self.state.copy()
        self._write_super(clean=False)
        self._write_super(clean=False)  # both slots valid from the start
        return self

    @classmethod
    def open(cls, dev: BlockDevice, mode: str = "rw") -> SharedStore:
        """Open the store on ``dev``, recovering its journal.

        ``mode``:

        * ``"rw"``: replay the journal to the home blocks and checkpoint; the store is
          then ready for changes.
        * ``"inspect"`` (``ddsnap check``): writes nothing.  The journal's committed
          transactions are read as an overlay on the home blocks; damage anywhere is
          recorded (:attr:`journal_scan`, :attr:`slot_reports`, :attr:`unreadable`) for
          the caller to report rather than raised, as far as the store can be read.
        * ``"degraded"`` (``serve --force-degraded``): writes nothing; like
          ``"inspect"``, and metadata only a damaged journal block could have brought up
          to date raises :class:`CorruptMetadata` when read (so the data it maps is
          never served).

        Raises:
            NotAStore: no superblock.
            FormatTooOld: a format-v1 or v2 store.
            CorruptMetadata: (``"rw"``, and the other modes where nothing can be read)
                a superblock, the journal, table or bitmap block fails its checks, or
                the device is smaller than the store; the error names the block.
        """
        if mode not in ("rw", "inspect", "degraded"):
            raise ValueError(f"unknown open mode {mode!r}")
        sb, reports = read_superblocks(dev)
        if dev.size < sb.blocks * BLOCK_SIZE:
            # Chunks past the end would read as zeroes: never serve them as data.
            raise CorruptMetadata(sb.slot,
                                  f"the store needs {human_bytes(sb.blocks * BLOCK_SIZE)} "
                                  f"but {dev.path} has {human_bytes(dev.size)} (truncated?)")
        tails = [r.journal_tail for r in reports if r.status == "ok" and r.journal_tail is not None]
        self = cls(dev, sb, old_tail=min(tails) if tails else None)
        self.slot_reports = reports
        scan = self.journal.scan()
        self.journal_scan = scan
        if mode == "rw":
            self.journal.apply(scan)
        else:
            self.read_only = True
            for tx in scan.transactions + scan.later:
                for t, img in tx.images:
                    self.replayed[t] = img
            self._untrusted = set(scan.untrusted)
            self._untrusted_all = scan.unknown
            self.journal.head, self.journal.next_seq = scan.end, scan.next_seq
        self.recovered = len(scan.transactions)
        state = scan.state
        if state is not None:
            self.state = state.copy()
            self._last_state = state.copy()
        tolerant = mode == "inspect"
        slots, self.table_blocks = self._read_table(tolerant)
        self.table = VersionTable(slots, sb.max_snapshots)
        bits = bytearray()
        for i in range(sb.bitmap_blocks):
            b = sb.bitmap_start + i
            try:
                buf = self.read_block(b)
                check_header(buf, T_BITMAP, b, sb.uuid)
                bits += buf[HEADER_SIZE:]
            except CorruptMetadata as e:
                if not tolerant:
                    raise
                self.unreadable.append(e)
                bits += b"\xff" * BITMAP_BYTES  # unknown: counted as in use
        self.bitmap = Bitmap(bits, sb.blocks, sb.blocks_per_chunk, self.data_start)
        if mode == "rw":
            self._read_node(self.state.root)  # fail now, not mid-request, on a bad root
        self._count_space()
        if mode == "rw":
            # Record the replay and mark the store in use, in both superblock slots:
            # the space the replayed transactions freed is reusable only once neither
            # slot's recovery would replay them again.
            dev.flush()
            self.journal.fully_checkpointed()
            self.sb.state = self.state.copy()
            self._write_super(clean=False)
            self._write_super(clean=False)
        return self

    def read_block(self, block: int) -> bytes:
        """The current 4 KiB image of metadata ``block``: the journal's (read-only opens,
        :attr:`replayed`) or its home's.

        Raises:
            CorruptMetadata: a degraded open cannot trust the block (its newest journal
                image is damaged).
        """
        if self._untrusted_all and block not in self.replayed and block >= self.data_start:
            raise CorruptMetadata(block, "a damaged journal transaction may have changed "
                                         "this block: it cannot be trusted")
        if block in self._untrusted:
            raise CorruptMetadata(block, "its newest journal image is damaged: the block "
                                         "cannot be trusted")
        img = self.replayed.get(block)
        if img is not None:
            return img
        return self.dev.pread(BLOCK_SIZE, block * BLOCK_SIZE)

    @property
    def data_start(self) -> int:
        """First block of the data area (past the journal, chunk aligned)."""
        end = self.sb.journal_start + self.sb.journal_blocks
        return -(-end // self.bpc) * self.bpc

    def _read_table(self, tolerant: bool) -> tuple[list[SnapSlot], list[int]]:
        """Read the snapshot table's chain of blocks from the first one.

        Raises:
            CorruptMetadata: a table block fails its checks, or the chain points outside
                the store or loops (naming the block); in a ``tolerant`` (inspect) open
                that ends the chain and is recorded in :attr:`unreadable` instead.
        """
        slots: list[SnapSlot] = []
        blocks: list[int] = []
        b = self.sb.snaptable_start
        while b:
            try:
                if b in blocks:
                    raise CorruptMetadata(blocks[-1], f"the snapshot table's chain loops "
                                                      f"back to block {b}")
                buf = self.read_block(b)
                check_header(buf, T_SNAPTABLE, b, self.uuid)
                part, nxt = decode_snaptable(buf, b)
                if nxt and not self.data_start <= nxt < self.sb.blocks:
                    raise CorruptMetadata(b, f"the snapshot table's next block {nxt} is "
                                             "outside the metadata area")
            except CorruptMetadata as e:
                if not tolerant:
                    raise
                self.unreadable.append(e)
                break
            blocks.append(b)
            slots.extend(part)
            b = nxt
        if not blocks:
            blocks.append(self.sb.snaptable_start)
            slots.extend(SnapSlot() for _ in range(SNAPS_PER_BLOCK))
        return slots, blocks

    def _count_space(self) -> None:
        """Count the per-snapshot space figures and the entries each snapshot owns from
        the tree: the one full walk, at open; from then on they are kept up to date
        incrementally.

        A damaged leaf or node does not refuse the open (the intact parts of the tree
        still serve and ``check`` names the block): the figures are then unavailable,
        and so is deleting (its sweep needs them).
        """
        try:
            self._space, counts = self._count_groups()
            self._set_counts(counts)
        except CorruptMetadata as e:
            self._space, self._space_error = None, e
            self._set_counts(None)

    def _space_account(self) -> SpaceAccount:
        if self._space is None:
            raise self._space_error or CorruptMetadata(self.state.root, "space not counted")
        return self._space

    def note_auto_deleted(self, info: SnapshotInfo, when_ns: int) -> None:
        # In the superblock (the newest AUTO_DELETED_MAX), written by the checkpoint
        # that ends the victim's delete.
        self.sb.auto_deleted.append(AutoDeleted(info.id, when_ns, info.name))
        del self.sb.auto_deleted[:-AUTO_DELETED_MAX]

    def auto_deleted(self) -> list[dict]:
        from .api import _utc
        return [{"name": r.name, "id": r.id, "deleted": _utc(r.deleted)}
                for r in self.sb.auto_deleted]

    def set_origin_path(self, path: str) -> None:
        """Record a new origin path (``ddsnap set STORE origin=PATH``); durable at the
        next checkpoint (:meth:`close` makes one).

        Raises:
            InvalidArgument: the path is longer than the superblock holds.
        """
        if len(path.encode()) > MAX_ORIGIN_PATH:
            raise InvalidArgument(f"origin path longer than {MAX_ORIGIN_PATH} bytes")
        self.origin_path = self.sb.origin_path = path

    def set_origin_size(self, size: int) -> None:
        """Record the origin's new size (bytes) in the superblock: the next commit makes
        a full checkpoint, so both slots carry it once that commit is durable."""
        super().set_origin_size(size)
        self.sb.origin_size = size
        self.request_checkpoint()

    @property
    def store_size(self) -> int:
        """Bytes the store uses (whole chunks; its device may be bigger)."""
        return self.sb.blocks * BLOCK_SIZE

    @property
    def min_size(self) -> int:
        """The fewest bytes a resize may leave the store: its metadata, the tree's first
        two blocks and one data chunk, in whole chunks (the rule of :meth:`create`)."""
        need = self.data_start + 2 + self.bpc
        return -(-need // self.bpc) * self.chunk_size

    def resize_store(self, size: int) -> int:
        """Grow or shrink the store to ``size`` bytes (whole chunks); return the new size.
        Call with every change committed and checkpointed (the service does).  See
        :func:`ddsnap.store.resize.resize_shared_store` for the steps and errors."""
        from .resize import resize_shared_store
        return resize_shared_store(self, size)

    # -- superblock and images -----------------------------------------------------------

    def _write_super(self, clean: bool, state: State | None = None) -> None:
        sb = self.sb
        sb.generation += 1
        sb.clean = clean
        sb.journal_tail = self.journal.tail
        sb.journal_seq = self.journal.next_seq
        if state is not None:
            sb.state = state.copy()
        else:
            sb.state = self.state.copy()
        self.dev.pwrite(sb.encode(), (sb.generation % 2) * BLOCK_SIZE)
        self.dev.flush()

    def _write_home(self, block: int, img: bytes) -> None:
        self.dev.pwrite(img, block * BLOCK_SIZE)

    def _snaptable_image(self, index: int, seq: int) -> bytearray:
        lo = index * SNAPS_PER_BLOCK
        nxt = self.table_blocks[index + 1] if index + 1 < len(self.table_blocks) else 0
        buf = encode_snaptable(self.table.slots[lo: lo + SNAPS_PER_BLOCK], nxt)
        return seal(buf, T_SNAPTABLE, self.table_blocks[index], seq, self.uuid)

    def _bitmap_image(self, index: int, seq: int) -> bytearray:
        buf = bytearray(BLOCK_SIZE)
        buf[HEADER_SIZE:] = self.bitmap.block_bytes(index)
        return seal(buf, T_BITMAP, self.sb.bitmap_start + index, seq, self.uuid)

    def _node_image(self, block: int, obj, seq: int) -> bytearray:
        if isinstance(obj, Leaf):
            return seal(obj.encode(), T_LEAF, block, seq, self.uuid)
        return seal(obj.encode(), T_NODE, block, seq, self.uuid)

    # -- block cache ---------------------------------------------------------------------

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

    # -- the B-tree: the ordered map of versioned exceptions ---------------------------

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
        out = []
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

    # -- snapshots -----------------------------------------------------------------------

    def create_snapshot(self, name, read_only=False, created=None, parent=0) -> SnapshotInfo:
        if not self.table.has_free_slot():
            # The table grows by a block, linked from the last one, before the slot is
            # taken: StoreFull leaves everything as it was.
            block = self.bitmap.alloc_block()
            self.table_blocks.append(block)
            self.table.extend(SNAPS_PER_BLOCK)
            self.table.dirty.add(len(self.table.slots) - SNAPS_PER_BLOCK - 1)
        try:
            return super().create_snapshot(name, read_only, created, parent)
        except BaseException:
            self._state_dirty = True
            raise

    def _table_changed(self) -> None:
        self._state_dirty = True

    def sweep_step(self) -> bool:
        done = super().sweep_step()
        # What it freed is reusable once both superblock slots are past it.
        self._want_checkpoint = True
        return done

    def add_origin_exception(self, chunk, store_chunk, tag) -> None:
        try:
            super().add_origin_exception(chunk, store_chunk, tag)
        finally:
            self._kv_release()

    def add_snapshot_exception(self, version, chunk, store_chunk, kept=None) -> None:
        try:
            super().add_snapshot_exception(version, chunk, store_chunk, kept)
        finally:
            self._kv_release()

    def mark_merged(self, chunk: int) -> None:
        try:
            super().mark_merged(chunk)
        finally:
            self._kv_release()

    def allocate_chunk(self) -> int:
        self._drain_released()
        try:
            return self.bitmap.alloc_chunk()
        except StoreFull:
            if self.bitmap.q_chunks:
                raise StoreFull("snapshot store is full until deleted snapshots' space "
                                "is released by the next checkpoint") from None
            raise

    def release_chunk(self, store_chunk: int) -> None:
        self.bitmap.unalloc_chunk(store_chunk)

    def reclaimable(self) -> bool:
        return bool(self.bitmap.q_chunks)

    def request_checkpoint(self) -> None:
        self._want_checkpoint = True
        self._state_dirty = True  # a commit happens even if nothing else changed

    def _drain_released(self) -> None:
        while self._released:
            qb, qc = self._released.pop()
            self.bitmap.release_quarantine(qb, qc)

    def _state_changed(self) -> None:
        self._state_dirty = True

    # -- commit --------------------------------------------------------------------------

    def pending_blocks(self) -> int:
        tables = len({i // SNAPS_PER_BLOCK for i in self.table.dirty})
        return len(self._dirty) + tables + len(self.bitmap.dirty)

    @property
    def commit_threshold(self) -> int:
        # A quarter of the journal: room for the batch, its descriptors and whatever
        # one more chunk edit (a split up the tree) adds before the next check.
        return max(8, self.journal.size // 4)

    def begin_commit(self):
        self._drain_released()
        if not (self._dirty or self.table.dirty or self.bitmap.dirty or self._state_dirty):
            return None
        seq = self.journal.next_seq
        images = []
        for b, obj in self._dirty.items():
            images.append((b, bytes(self._node_image(b, obj, seq))))
        for index in sorted({i // SNAPS_PER_BLOCK for i in self.table.dirty}):
            images.append((self.table_blocks[index], bytes(self._snaptable_image(index, seq))))
        for index in sorted(self.bitmap.dirty):
            images.append((self.sb.bitmap_start + index, bytes(self._bitmap_image(index, seq))))
        self._inflight = dict(self._dirty)
        self._dirty.clear()
        self.table.dirty.clear()
        self.bitmap.dirty.clear()
        self._state_dirty = False
        tx = Transaction(seq, images, self.state.copy())
        ckpt = self._want_checkpoint
        self._want_checkpoint = False
        return _Batch(tx, ckpt, self.bitmap.take_new_quarantine())

    def write_commit(self, batch: _Batch) -> None:
        tx = batch.tx
        if self.read_only:
            raise CorruptMetadata(self.sb.slot, "the store is open read-only")
        while not self.journal.room_for(tx):
            self._checkpoint(self._last_state)
        # Exception data (copy-outs, snapshot writes) durable before the commit point
        # (DESIGN.md invariant 3): the journal's first flush covers it.
        self.journal.commit(tx)
        for b, img in tx.images:
            self.dev.pwrite(img, b * BLOCK_SIZE)
        self._inflight = {}  # the home blocks are current: reloading them is safe now
        self._last_state = tx.state
        self._written_frees.append(batch.quarantine)
        if batch.checkpoint:
            self._checkpoint(tx.state, full=True)
        elif self.journal.used * 2 > self.journal.size:
            self._checkpoint(tx.state)

    def _checkpoint(self, state: State | None, full: bool = False) -> None:
        """Make every home write durable and record the journal head as the tail in
        the next superblock slot; with ``full``, in both slots.

        Space a transaction freed is reusable once *both* slots' tails are past it:
        until then the older slot's recovery (if the newer slot were damaged) could
        replay it over the reused blocks.
        """
        self.dev.flush()  # every home write of committed transactions is durable
        for _ in range(2 if full else 1):
            self.journal.checkpointed()
            self._write_super(clean=False, state=state or self._last_state)
            # (list.extend is atomic; the allocator drains it under the metadata lock)
            frees, self._ckpt_frees, self._written_frees = self._ckpt_frees, self._written_frees, []
            self._released.extend(frees)

    def close(self) -> None:
        if self.read_only:
            return
        self._want_checkpoint = True
        self.commit()
        self.dev.flush()
        self.journal.checkpointed()
        self._write_super(clean=True)

    # -- accounting, iteration, checks ---------------------------------------------------

    def cached_blocks(self) -> int:
        """Metadata blocks (tree nodes) kept in the block cache now."""
        return len(self._cache)

    def format_figures(self) -> dict:
        """The on-disk figures ``status`` shows (``ExceptionStore.format_figures``)."""
        scan = self.journal_scan
        return {"uuid": self.uuid.hex(), "tree_levels": self.state.levels,
                "journal_blocks": self.journal.size,
                "recovered_transactions": self.recovered,
                "journal_damage": None if scan is None else
                [(e.block, e.why) for e in scan.damage]}

    def space(self) -> dict:
        total = self.sb.chunks - self.bitmap.data_start // self.bpc
        free = self.bitmap.free_chunks
        return {"chunks_total": total, "chunks_free": free, "chunks_used": total - free}

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

    def check(self, leaks: list[int] | None = None) -> list[Finding]:
        """Walk the on-disk tree and bitmap; the caller commits first when serving.
        Leaked (allocated, unreferenced) blocks are appended to ``leaks`` if given."""
        from .check import check_store
        return check_store(self, leaks)

    def free_leaked(self, blocks: list[int]) -> None:
        """Free blocks ``check`` found allocated but unreferenced (``check --repair``).

        Each goes back to the bitmap at once (no transaction can point at it); the
        caller commits.
        """
        for b in blocks:
            self.bitmap.unalloc_block(b)


@dataclass
class SlotReport:
    """What one superblock slot holds: ``status`` is ``"ok"``, ``"stale"`` (valid but
    older than the generation before the newest), ``"damaged"`` (fails its checks) or
    ``"blank"`` (no ddsnap magic); ``generation`` when valid; ``why`` for the others."""

    slot: int
    status: str
    generation: int | None = None
    journal_tail: int | None = None
    journal_seq: int | None = None
    why: str = ""

    def finding(self) -> Finding | None:
        """A warning naming the slot, or None for a good one."""
        if self.status == "ok":
            return None
        return Finding("warning", self.slot, f"superblock slot {self.slot} is {self.status}"
                                             f"{': ' + self.why if self.why else ''}")


def read_superblocks(dev: BlockDevice) -> tuple[Superblock, list[SlotReport]]:
    """Read both superblock slots; return the newest valid one and a report per slot.

    A slot that fails its checks while the other is valid is a warning, not an error:
    the journal is never overwritten from the older slot's tail on and freed space is
    not reused until both slots are past it, so recovery from the older slot is safe.

    Raises:
        NotAStore: no slot has the ddsnap magic and nothing else says it is a store.
        CorruptMetadata: no slot checks out (block 0 or the slot that failed), for a
            device that is a ddsnap store by its other metadata.
        FormatTooOld: a format-v1 or v2 store (``ddsnap upgrade`` converts it).
    """
    if dev.size < 2 * BLOCK_SIZE:
        raise NotAStore(dev.path, "too small")
    found: list[Superblock] = []
    reports: list[SlotReport] = []
    v1 = 0  # the older format version found, if any
    for slot in (0, 1):
        buf = dev.pread(BLOCK_SIZE, slot * BLOCK_SIZE)
        if buf[:4] != MAGIC:
            reports.append(SlotReport(slot, "blank", why="no ddsnap magic"))
            continue
        try:
            sb = Superblock.decode(buf, slot)
        except CorruptMetadata as e:
            old = header_version(buf)
            if old in (VERSION_V1, VERSION_V2):
                try:
                    Superblock.decode(buf, slot, version=old)
                    v1 = old
                except CorruptMetadata:
                    pass
            reports.append(SlotReport(slot, "damaged", why=e.why))
            continue
        found.append(sb)
        reports.append(SlotReport(slot, "ok", sb.generation, sb.journal_tail, sb.journal_seq))
    if not found:
        if v1:
            raise FormatTooOld(dev.path, v1)
        if all(r.status == "blank" for r in reports):
            # Both slots overwritten is damage, not "not a store", if the rest says store.
            if _looks_like_store(dev):
                raise CorruptMetadata(0, "both superblock slots are damaged (no ddsnap "
                                         "magic), but the rest of the device is a store")
            raise NotAStore(dev.path)
        bad = next(r for r in reports if r.status == "damaged")
        raise CorruptMetadata(bad.slot, f"no valid superblock: slot {bad.slot}: {bad.why}")
    sb = max(found, key=lambda s: s.generation)
    for r in reports:
        if r.status == "ok" and r.generation != sb.generation and r.generation != sb.generation - 1:
            r.status = "stale"
            r.why = f"generation {r.generation}, the other slot has {sb.generation}"
        elif (r.status == "ok" and r.generation == sb.generation - 1
              and sb.journal_tail < (r.journal_tail or 0)):
            r.status = "stale"
            r.why = "its journal tail is past the newer slot's"
    return sb, reports


def read_superblock(dev: BlockDevice) -> Superblock:
    """The newest valid superblock of ``dev`` (see :func:`read_superblocks`)."""
    return read_superblocks(dev)[0]


def _looks_like_store(dev: BlockDevice) -> bool:
    """True if block 2 (the first snapshot table block) carries ddsnap's magic."""
    if dev.size < 3 * BLOCK_SIZE:
        return False
    buf = dev.pread(BLOCK_SIZE, 2 * BLOCK_SIZE)
    return buf[:4] == MAGIC and buf[4:6] == T_SNAPTABLE.to_bytes(2, "little")
