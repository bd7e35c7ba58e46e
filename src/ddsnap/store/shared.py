"""SharedStore: the on-disk snapshot store shared by every snapshot of an origin.

Layout (format v3, ``docs/format.md``): superblocks in blocks 0 and 1, the first snapshot
table block, the allocation bitmap and the journal, then chunks for exception data and
4 KiB blocks for the B-tree and further table blocks.  The tree is the ordered map of
versioned exceptions (:mod:`ddsnap.store.versioned`): fixed 24-byte records keyed
``(owner, chunk, tag)``.  Changes go through journal transactions
(:mod:`ddsnap.store.journal`); a delete is swept in bounded, committed steps that free the
exceptions no live snapshot reads (seed 001 ``delete_tree_range``); the sweep resumes
after a crash.

The parts are their own modules: the block cache (:mod:`~.cache`), the B-tree
(:mod:`~.btree`), the superblock slots and layout (:mod:`~.superblock`), resizing
(:mod:`~.resize`), ``check`` (:mod:`~.check`).  What stays here is opening and creating a
store and its transactions (commit, checkpoint, the quarantine of freed space).
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from dataclasses import dataclass

from humanfriendly import format_size

from ..errors import CorruptMetadata, InvalidArgument, StaleEpoch, StoreFull
from ..units import human_bytes
from .alloc import Bitmap
from .blockdev import BlockDevice
from .btree import BTree
from .cache import CACHE_BLOCKS
from .format import (
    AUTO_DELETED_MAX,
    BITMAP_BYTES,
    BITS_PER_BITMAP,
    BLOCK_SHIFT,
    BLOCK_SIZE,
    HEADER_SIZE,
    MAX_ORIGIN_PATH,
    SNAPS_PER_BLOCK,
    T_BITMAP,
    T_LEAF,
    T_NODE,
    T_SNAPTABLE,
    AutoDeleted,
    Leaf,
    Node,
    SnapSlot,
    Superblock,
    check_header,
    decode_snaptable,
    encode_snaptable,
    seal,
)
from .journal import Journal, Replay, Transaction
from .model import Finding, SnapshotInfo, State, check_geometry, utc_iso
from .snapshots import VersionTable
from .space import SpaceAccount
from .superblock import (
    SlotReport,
    fits,
    layout,
    min_store_size,
    read_superblocks,
)
from .versioned import VersionedStore


@dataclass
class _Batch:
    tx: Transaction
    checkpoint: bool
    quarantine: tuple  # (blocks, chunks) this transaction freed


class SharedStore(BTree, VersionedStore):
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
        self.journal.min_epoch = sb.epoch
        #: the highest cluster epoch that wrote the store (superblock or journal;
        #: issue 12's fencing), 0 if no cluster server ever did
        self.epoch = sb.epoch

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
        st_blocks, bm_blocks, journal_blocks, data_start = layout(
            blocks, bpc, max_snapshots, journal_blocks)
        st_start = 2
        bm_start = st_start + st_blocks
        j_start = bm_start + bm_blocks
        if not fits(blocks, bpc, data_start):
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
        self.write_superblock(clean=False)
        self.write_superblock(clean=False)  # both slots valid from the start
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
        self.epoch = max([sb.epoch, *(tx.epoch for tx in scan.transactions)])
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
            self.write_superblock(clean=False)
            self.write_superblock(clean=False)
        return self

    def claim_epoch(self, epoch: int) -> None:
        """Write every transaction from now on as cluster epoch ``epoch`` (the election
        term of the metadata server that opened the store, from etcd: issue 12's
        fencing).  Recovery refuses a journal where an older epoch follows a newer one.

        Raises:
            StaleEpoch: a server of a newer epoch has already written the store (this
                server lost its election without knowing).
        """
        if epoch < self.epoch:
            raise StaleEpoch(f"{self.dev.path} was written by the metadata server of "
                             f"cluster epoch {self.epoch}; this server's epoch {epoch} is "
                             "older: another server took over")
        self.epoch = epoch
        self.journal.epoch = epoch
        # Stake the claim in both superblock slots now: a stale server's transactions
        # written after this are refused by recovery, and its own next commit or
        # checkpoint sees this epoch and stops (_check_superseded).
        self.write_superblock(clean=False)
        self.write_superblock(clean=False)

    def _check_superseded(self) -> None:
        """In a cluster (an epoch claimed), refuse to commit or checkpoint once a server
        of a newer epoch has written either superblock slot: a storage-level check
        under the lease's, for a server that was paused past its lease.

        Raises:
            StaleEpoch: a newer epoch is recorded on the device.
        """
        if not self.journal.epoch:
            return
        newest = 0
        for slot in (0, 1):
            buf = self.dev.pread(BLOCK_SIZE, slot * BLOCK_SIZE)
            try:
                newest = max(newest, Superblock.decode(buf, slot).epoch)
            except CorruptMetadata:
                continue
        if newest > self.journal.epoch:
            raise StaleEpoch(f"{self.dev.path} records cluster epoch {newest}, newer than "
                             f"this metadata server's {self.journal.epoch}: another server "
                             "took over; this one writes nothing more")

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
        return [{"name": r.name, "id": r.id, "deleted": utc_iso(r.deleted)}
                for r in self.sb.auto_deleted]

    def receive_state(self):
        return self.sb.receiving, self.sb.received

    def record_receive(self, receiving, received) -> None:
        # In the superblock: committed, then a full checkpoint writes both slots, so
        # neither slot a later open may use holds the old record.
        self.commit()
        self.sb.receiving, self.sb.received = receiving, received
        self._checkpoint(None, full=True)

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

    def write_superblock(self, clean: bool, state: State | None = None) -> None:
        """Write the next superblock slot (slots alternate by generation) from the store's
        geometry, journal window and root ``state`` (default: the current one), and flush.
        ``clean`` marks a clean shutdown.  Two calls in a row update both slots."""
        self._check_superseded()
        sb = self.sb
        sb.generation += 1
        sb.clean = clean
        sb.epoch = max(sb.epoch, self.journal.epoch)
        sb.journal_tail = self.journal.tail
        # (the transaction expected at the tail: the next one only once checkpointed)
        sb.journal_seq = self.journal.tail_seq
        if state is not None:
            sb.state = state.copy()
        else:
            sb.state = self.state.copy()
        self.dev.pwrite(sb.encode(), (sb.generation % 2) * BLOCK_SIZE)
        self.dev.flush()

    def _write_home(self, block: int, img: bytes | bytearray) -> None:
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
        self._check_superseded()
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
            self.write_superblock(clean=False, state=state or self._last_state)
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
        self.write_superblock(clean=True)

    # -- accounting, iteration, checks ---------------------------------------------------

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

    def has_uncommitted(self) -> bool:
        """True if anything changed since the last commit (tree, table, bitmap, blocks
        reserved for splits), or a commit is being written."""
        return bool(self._dirty or self._inflight or self.table.dirty or self.bitmap.dirty
                    or self._spare)

    def recount_space(self, entries=None) -> SpaceAccount:
        """The per-snapshot space figures counted afresh from the tree in memory, or from
        ``entries`` (``(owner, chunk, tag, store_chunk)`` in key order, as ``check`` read
        them from disk).

        Raises:
            CorruptMetadata: a tree block could not be read.
        """
        return self._count_groups(entries)[0]

    def space_drift(self, counted: SpaceAccount, name) -> list[str]:
        """How the figures kept incrementally differ from ``counted``
        (:meth:`recount_space`): one message per difference, naming the snapshot
        (``name(version) -> str``); one message if they could not be kept at all."""
        if self._space is None:
            return [f"space accounting unavailable: {self._space_error}"]
        return list(self._space.drift(counted, self.table, name))

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


