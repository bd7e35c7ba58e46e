"""``ddsnap upgrade``: convert a format-v1 (ddsnap 0.1) or format-v2 (ddsnap 0.2) store to
format v3, in place.

Formats v1 and v2 keep a snapshot's exceptions as sharemaps: per logical chunk, a list of
``[sharemap, store_chunk]`` (bit ``s`` set: the snapshot in table slot ``s`` reads that
chunk), in a B-tree keyed by logical chunk, and a fixed table of ``max_snapshots`` slots.
Format v3 keeps *versioned* exceptions, one 24-byte record each, keyed ``(owner, chunk,
tag)`` (:mod:`ddsnap.store.versioned`), and a chain of table blocks.  The upgrade:

1. reads (:mod:`ddsnap.store.legacy`) the newest superblock slot of version 1 or 2 and,
   if the store was not shut down cleanly, its journal (v1's rule: a transaction counts
   when every block through its FINAL descriptor checks out; v2's:
   :class:`~ddsnap.store.journal.Journal` with ``version=2``), *in memory*: the
   committed images are read in place of their home blocks and nothing is written;
2. reads the old snapshot table and the whole old tree, and recomputes the allocation
   from them (the old bitmap on disk is never read: see below);
3. converts every logical chunk's exceptions (:func:`_convert_chunk`): an exception read
   by exactly one live snapshot ``v`` becomes ``v``'s own entry ``(v, c, INF)``; the
   other live snapshots, in id order, are cut into runs reading the same thing, and each
   run but a last one reading the origin becomes one origin entry ``(0, c, newest id of
   the run)``: the old chunk itself the first time, else a *copy* in a new chunk (a
   chunk read by runs that are not adjacent, or the origin's data read by a run between
   runs reading copies: both only after a v2 merge).  Exceptions only snapshots being
   deleted read are dropped;
4. refuses before writing anything if the store has no room for the copies and the new
   metadata (:class:`~ddsnap.errors.StoreFull`) or copies of the origin are needed and
   it cannot be opened (:class:`~ddsnap.errors.OriginMismatch`);
5. writes the copies, the new table chain and the new tree (full leaves, then the index
   levels) into space *free in the old store*, flushes; writes the v3 bitmap over the
   old one, flushes; then superblock slot ``g + 1`` as v3 (an empty journal from position
   0, shut down cleanly), flushes, and slot ``g + 2``, flushes.

Crash safety: until a v3 superblock slot is durable, the old superblock describes the
old store, and everything it uses (its tree, its data, its journal) is intact: new
blocks only go where the old tree has nothing, and the old journal is not written.  The
only old block overwritten before then is the bitmap, which is why the allocation is
recomputed from the tree and never read: a second ``ddsnap upgrade`` after a crash
converts the store again from the start.  Once slot ``g + 1`` is durable the store
opens as v3 (the other slot, still old, is reported damaged and rewritten by the first
open); a torn slot ``g + 1`` is not valid, and the old slot ``g`` still is.  The old
journal's blocks stay in the journal area: their version differs, so the v3 journal
(which starts at position 0, sequence 1) never accepts them.

The first table block of an upgraded store is in the data area (the old table's blocks
stay reserved and unused): the superblock says where it is.
"""

from __future__ import annotations

from ..errors import (
    CorruptMetadata,
    DdsnapError,
    OriginMismatch,
    StoreFull,
    StoreNotFound,
)
from ..units import human_bytes
from .alloc import Bitmap
from .blockdev import BlockDevice, FileDevice
from .format import (
    BITMAP_BYTES,
    BITS_PER_BITMAP,
    BLOCK_SIZE,
    HEADER_SIZE,
    INF,
    LEAF_MAX,
    MAX_VERSION,
    NODE_MAX,
    ORIGIN,
    SLOT_LIVE,
    SNAPS_PER_BLOCK,
    T_BITMAP,
    T_LEAF,
    T_NODE,
    T_SNAPTABLE,
    Leaf,
    Node,
    SnapSlot,
    Superblock,
    encode_snaptable,
    index_key,
    pack_key,
    seal,
)
from .legacy import (
    OLD_SLOT_DELETING,
    OLD_SLOT_LIVE,
    data_area_start,
    read_old_store,
    read_old_superblock,
)
from .model import NO_MERGE, State

#: most blocks written by one ``pwrite`` (consecutive metadata blocks are batched)
_WRITE_RUN = 256


# ---------------------------------------------------------------------------------------
# The conversion

def _mark(bits: bytearray, first: int, n: int) -> None:
    """Set bits ``first .. first + n - 1``."""
    end = first + n
    while first < end and first & 7:
        bits[first >> 3] |= 1 << (first & 7)
        first += 1
    whole = (end - first) >> 3
    if whole:
        bits[first >> 3: (first >> 3) + whole] = b"\xff" * whole
        first += whole << 3
    while first < end:
        bits[first >> 3] |= 1 << (first & 7)
        first += 1


def _reserved_bits(sb: Superblock) -> bytearray:
    """A bitmap with only the fixed area (superblocks, table, bitmap, journal, up to the
    data area) and the bits past the store's end set."""
    bits = bytearray(sb.bitmap_blocks * BITMAP_BYTES)
    _mark(bits, 0, data_area_start(sb))
    _mark(bits, sb.blocks, sb.bitmap_blocks * BITS_PER_BITMAP - sb.blocks)
    return bits


# ---------------------------------------------------------------------------------------
# The conversion

#: a copy to make: ``(source, number)``, source "origin" (a logical chunk of the origin)
#: or "store" (a store chunk)
_Copy = tuple[str, int]


def _convert_chunk(chunk: int, excs: list[tuple[int, int]], rank_of: list[int],
                   ids: list[int], live_mask: int, out: list[tuple[int, int]],
                   copies: list[_Copy], leaf: int) -> int:
    """Convert the exceptions of logical ``chunk`` (see the module docstring), read from
    old leaf block ``leaf`` (named by errors).

    ``rank_of[bit]`` is the id order of the live snapshot in slot ``bit`` (-1 if not
    live), ``ids[rank]`` its id.  Appends ``(key, store_chunk)`` entries to ``out``; an
    entry that needs a copy gets the placeholder ``-k`` as its store chunk, where
    ``copies[k - 1]`` says what to copy.  Returns the exceptions dropped (read by no
    live snapshot).
    """
    dropped = 0
    own = 0  # ranks (as a mask) of snapshots with an entry of their own here
    members: list[tuple[int, int]] = []  # (rank, store chunk) of shared exceptions
    seen = 0
    for share, sc in excs:
        if not share or share & seen:
            raise CorruptMetadata(leaf, f"logical chunk {chunk}: an exception with an empty "
                                        "sharemap, or two sharing a snapshot")
        seen |= share
        lb = share & live_mask
        if not lb:
            dropped += 1
        elif not lb & (lb - 1):
            r = rank_of[lb.bit_length() - 1]
            own |= 1 << r
            out.append((pack_key(ids[r], chunk, INF), sc))
        else:
            while lb:
                low = lb & -lb
                members.append((rank_of[low.bit_length() - 1], sc))
                lb ^= low
    if not members:
        return dropped  # the others all read the origin: the newest ones, no entry
    members.sort()
    shared = 0
    for r, _sc in members:
        shared |= 1 << r
    all_ranks = (1 << len(ids)) - 1
    from_origin = all_ranks & ~own & ~shared
    runs: list[list] = []  # [source (store chunk, or None: the origin), newest rank]
    prev = -1
    for r, sc in members:
        between = from_origin & ((1 << r) - 1) & ~((1 << (prev + 1)) - 1)
        if between:
            runs.append([None, between.bit_length() - 1])
        if runs and runs[-1][0] == sc:
            runs[-1][1] = r
        else:
            runs.append([sc, r])
        prev = r
    used: set[int] = set()
    for src, r in runs:
        key = pack_key(ORIGIN, chunk, ids[r])
        if src is not None and src not in used:
            used.add(src)
            out.append((key, src))
            continue
        copies.append(("origin", chunk) if src is None else ("store", src))
        out.append((key, -len(copies)))
    return dropped


def _tree_shape(n: int) -> list[int]:
    """Blocks per level of a bulk-loaded tree of ``n`` entries: leaves first, then each
    index level up to the root (always at least one index level)."""
    shape = [max(1, -(-n // LEAF_MAX))]
    while True:
        shape.append(-(-shape[-1] // NODE_MAX))
        if shape[-1] == 1:
            return shape


def _build_tree(entries: list[tuple[int, int]], blocks: list[int], uuid: bytes
                ) -> tuple[int, int, dict[int, bytearray]]:
    """Bulk-load ``entries`` (sorted ``(key, store_chunk)``) into full leaves and full
    index nodes in ``blocks`` (as many as :func:`_tree_shape` says, in its order).
    Returns the root block, the index levels and ``{block: sealed v3 image}``."""
    images: dict[int, bytearray] = {}
    it = iter(blocks)
    level: list[tuple[int, int]] = []  # (lower bound, block) of the level just built
    for i in range(0, max(1, len(entries)), LEAF_MAX):
        part = entries[i:i + LEAF_MAX]
        leaf = Leaf([k for k, _v in part], [v for _k, v in part])
        b = next(it)
        images[b] = seal(leaf.encode(), T_LEAF, b, 0, uuid)
        level.append((part[0][0] if i else 0, b))
    levels = 0
    while True:
        up = []
        for i in range(0, len(level), NODE_MAX):
            part = level[i:i + NODE_MAX]
            node = Node([lo for lo, _b in part], [b for _lo, b in part])
            b = next(it)
            images[b] = seal(node.encode(), T_NODE, b, 0, uuid)
            up.append((part[0][0], b))
        levels += 1
        level = up
        if len(level) == 1:
            return level[0][1], levels, images


class UpgradeResult(int):
    """What :func:`upgrade_store` did.  Its value is the 4 KiB blocks it wrote (data
    copies, table, tree, bitmap and superblocks); the attributes say the rest.

    Attributes:
        from_version: the format the store was in (1 or 2).
        snapshots: live snapshots kept.
        dropped_snapshots: snapshots being deleted, dropped (their space is free).
        exceptions: exceptions (entries) in the v3 tree.
        copies: chunks copied to keep the old sharing (0 unless a v2 merge left a
            snapshot reading the origin between snapshots reading a copy-out).
        dropped_exceptions: exceptions only snapshots being deleted read (not carried
            over: their chunks are free).
        replayed: the store was not shut down cleanly: its journal was read (and the
            transactions committed in it converted).
    """

    from_version: int
    snapshots: int
    dropped_snapshots: int
    exceptions: int
    dropped_exceptions: int
    copies: int
    replayed: bool


def _result(blocks: int, **attrs) -> UpgradeResult:
    r = UpgradeResult(blocks)
    for k, v in attrs.items():
        setattr(r, k, v)
    return r


def _open_origin(origin, sb: Superblock, store_path: str, ncopies: int
                 ) -> tuple[BlockDevice, bool]:
    """The origin device to copy ``ncopies`` chunks from, and whether it was opened here.

    Raises:
        OriginMismatch: it cannot be opened, or its size is not the store's origin size.
    """
    opened = False
    if origin is None or isinstance(origin, str):
        path = sb.origin_path if origin is None else origin
        try:
            origin = FileDevice(path, writable=False, what="origin")
            opened = True
        except (StoreNotFound, DdsnapError, OSError) as e:
            raise OriginMismatch(
                f"upgrading {store_path} needs copies of {ncopies} chunk(s) of its origin, "
                f"but the origin {path or '(none recorded)'} cannot be opened ({e}); give "
                "its path with `ddsnap upgrade --origin PATH`. Nothing was changed") from None
    if origin.size != sb.origin_size:
        if opened:
            origin.close()
        raise OriginMismatch(
            f"upgrading {store_path} needs copies of {ncopies} chunk(s) of its origin, but "
            f"the origin {origin.path} is {human_bytes(origin.size)} and the store was made "
            f"for {human_bytes(sb.origin_size)}. Nothing was changed")
    return origin, opened


def upgrade_store(dev: BlockDevice, origin: BlockDevice | str | None = None,
                  progress=None) -> UpgradeResult:
    """Convert the format-v1 or v2 store on ``dev`` to format v3, in place (see the module
    docstring for how, and why a crash at any point is safe: run it again).

    Args:
        dev: the store device, writable; nobody may be serving it.
        origin: where to read origin chunks the conversion must copy (rare: only after a
            v2 merge, see :func:`_convert_chunk`): a device, a path, or None for the path
            the store records.  Opened only if copies of the origin are needed.
        progress: if given, called as ``progress(done, total)`` in 4 KiB blocks read
            (the old tree) and written; ``total`` grows once, when the conversion knows
            what it writes.

    Returns:
        An :class:`UpgradeResult`: an int, the blocks written, with the counts of
        snapshots, exceptions and copies.

    Raises:
        NotAStore: no ddsnap superblock.
        DdsnapError: the store is already format v3.
        CorruptMetadata: an old block fails its checks or the old tree is inconsistent
            (naming the block), the old journal is damaged, or the device is smaller
            than the store; nothing was written.
        StoreFull: no room for the copies or the new metadata; nothing was written.
        OriginMismatch: origin chunks must be copied and the origin cannot be opened or
            has the wrong size; nothing was written.
    """
    sb, version = read_old_superblock(dev)
    if dev.size < sb.blocks * BLOCK_SIZE:
        raise CorruptMetadata(sb.slot, f"the store needs {human_bytes(sb.blocks * BLOCK_SIZE)} "
                                       f"but {dev.path} has {human_bytes(dev.size)} "
                                       "(truncated?)")
    old = read_old_store(dev, sb, version, progress)
    state = old.state
    read_blocks = len(old.tree_blocks)

    live = sorted((s.id, bit) for bit, s in enumerate(old.slots) if s.state == OLD_SLOT_LIVE)
    ids = [sid for sid, _b in live]
    if len(set(ids)) != len(ids) or (ids and not 0 < ids[-1] <= MAX_VERSION):
        raise CorruptMetadata(sb.snaptable_start, "snapshot ids in the table are not unique "
                                                  "or out of range")
    if ids and state.next_snapshot_id <= ids[-1]:
        raise CorruptMetadata(sb.slot, f"next snapshot id {state.next_snapshot_id} is not "
                                       f"past snapshot id {ids[-1]}")
    rank_of = [-1] * len(old.slots)
    live_mask = 0
    for r, (_sid, bit) in enumerate(live):
        rank_of[bit] = r
        live_mask |= 1 << bit
    merge = NO_MERGE
    if state.merge_version != NO_MERGE:
        bit = state.merge_version
        if bit >= len(old.slots) or rank_of[bit] < 0:
            raise CorruptMetadata(sb.slot, f"the snapshot being merged (slot {bit}) is not a "
                                           "live snapshot")
        merge = old.slots[bit].id

    # Allocation as the old store has it, recomputed from its tree (never read: a crashed
    # upgrade may have overwritten the old bitmap blocks already).
    bpc = sb.blocks_per_chunk
    nchunks = sb.blocks // bpc
    data_start = data_area_start(sb)
    bits = _reserved_bits(sb)
    meta_chunks = set()
    for b in old.tree_blocks:
        _mark(bits, b, 1)
        meta_chunks.add(b // bpc)
    origin_chunks = -(-sb.origin_size // sb.chunk_size)
    refs: dict[int, int] = {}
    entries: list[tuple[int, int]] = []
    copies: list[_Copy] = []
    dropped = 0
    for c, excs, leaf in zip(old.chunks, old.excs, old.leaf_of, strict=True):
        if c >= origin_chunks:
            raise CorruptMetadata(leaf, f"exception for logical chunk {c}, past the end of "
                                        "the origin")
        for _share, sc in excs:
            if not data_start // bpc <= sc < nchunks:
                raise CorruptMetadata(leaf, f"chunk {c}: store chunk {sc} out of range")
            if sc in refs or sc in meta_chunks:
                what = (f"logical chunk {refs[sc]}" if sc in refs else "a tree block")
                raise CorruptMetadata(leaf, f"store chunk {sc} of logical chunk {c} is also "
                                            f"used by {what}")
            refs[sc] = c
            _mark(bits, sc * bpc, bpc)
        dropped += _convert_chunk(c, excs, rank_of, ids, live_mask, entries, copies, leaf)
    entries.sort()

    # Everything new goes where the old store has nothing: allocate it all now, so a
    # full store is refused before anything is written.
    bm = Bitmap(bits, sb.blocks, bpc, data_start)
    # Each history entry of the origin also has its tag index record (format.index_key).
    n_index = sum(1 for k, _v in entries if k >> 96 == ORIGIN)
    shape = _tree_shape(len(entries) + n_index)
    table_n = max(1, -(-len(ids) // SNAPS_PER_BLOCK))
    free = bm.free_chunks
    try:
        dst = [bm.alloc_chunk() for _ in copies]
        table_blocks = [bm.alloc_block() for _ in range(table_n)]
        tree_blocks = [bm.alloc_block() for _ in range(sum(shape))]
    except StoreFull:
        raise StoreFull(
            f"{dev.path} has no room to upgrade: the conversion needs {len(copies)} "
            f"chunk(s) for copies and {table_n + sum(shape)} blocks for the new metadata, "
            f"and {free} chunk(s) are free. Nothing was changed: free some space with the "
            f"ddsnap that made the store (delete a snapshot), then upgrade again") from None
    entries = [(k, dst[-v - 1] if v < 0 else v) for k, v in entries]
    index = sorted((index_key(k & 0xFFFFFFFF, (k >> 32) & ((1 << 64) - 1)), v)
                   for k, v in entries if k >> 96 == ORIGIN)
    entries += index  # index keys sort after every entry

    src = None
    opened = False
    if any(what == "origin" for what, _n in copies):
        src, opened = _open_origin(origin, sb, dev.path, len(copies))

    # The v3 metadata, sealed.
    uuid = sb.uuid
    slots = [SnapSlot(SLOT_LIVE, old.slots[bit].read_only, sid, old.slots[bit].created,
                      old.slots[bit].name, ORIGIN, sb.origin_size) for sid, bit in live]
    images: dict[int, bytearray] = {}
    for k, b in enumerate(table_blocks):
        nxt = table_blocks[k + 1] if k + 1 < len(table_blocks) else 0
        buf = encode_snaptable(slots[k * SNAPS_PER_BLOCK:(k + 1) * SNAPS_PER_BLOCK], nxt)
        images[b] = seal(buf, T_SNAPTABLE, b, 0, uuid)
    root, levels, tree = _build_tree(entries, tree_blocks, uuid)
    images.update(tree)
    new_bits = _reserved_bits(sb)
    for b in list(images):
        _mark(new_bits, b, 1)
    for _k, sc in entries:
        _mark(new_bits, sc * bpc, bpc)

    total = read_blocks + len(copies) * bpc + len(images) + sb.bitmap_blocks + 2
    done = read_blocks
    written = 0

    def step(n: int) -> None:
        nonlocal done, written
        done += n
        written += n
        if progress is not None:
            progress(done, total)

    try:
        cs = sb.chunk_size
        for (what, n), d in zip(copies, dst, strict=True):
            from_dev = src if what == "origin" else dev
            if from_dev is None:  # copies from the origin open it above
                raise AssertionError("an origin copy without the origin open")
            data = from_dev.pread(cs, n * cs)
            dev.pwrite(data, d * cs)
            step(bpc)
    finally:
        if opened and src is not None:
            src.close()
    for first, run in _runs(sorted(images.items())):
        dev.pwrite(b"".join(run), first * BLOCK_SIZE)
        step(len(run))
    dev.flush()

    bm_images = []
    for i in range(sb.bitmap_blocks):
        buf = bytearray(BLOCK_SIZE)
        buf[HEADER_SIZE:] = new_bits[i * BITMAP_BYTES:(i + 1) * BITMAP_BYTES]
        bm_images.append((sb.bitmap_start + i, seal(buf, T_BITMAP, sb.bitmap_start + i, 0,
                                                    uuid)))
    for first, run in _runs(bm_images):
        dev.pwrite(b"".join(run), first * BLOCK_SIZE)
        step(len(run))
    dev.flush()

    new = Superblock(
        uuid, sb.blocks, sb.chunk_shift, 0, sb.origin_size, sb.created, table_blocks[0], 1,
        sb.bitmap_start, sb.bitmap_blocks, sb.journal_start, sb.journal_blocks,
        journal_tail=0, journal_seq=1, clean=True,
        state=State(root, levels, state.next_snapshot_id, merge, state.merge_keep,
                    state.merge_cursor if merge != NO_MERGE else 0, state.full_policy),
        origin_path=sb.origin_path, generation=sb.generation,
        # The identity recorded at the last clean shutdown still describes the origin
        # only if the store was shut down cleanly since (else the origin may have been
        # written after it): without one the next open does not compare.
        identity=sb.identity if sb.clean else None, auto_deleted=list(sb.auto_deleted))
    for _ in range(2):
        new.generation += 1
        dev.pwrite(new.encode(), new.slot * BLOCK_SIZE)
        dev.flush()
        step(1)
    return _result(written, from_version=version, snapshots=len(ids),
                   dropped_snapshots=sum(1 for s in old.slots if s.state == OLD_SLOT_DELETING),
                   exceptions=len(entries), copies=len(copies), dropped_exceptions=dropped,
                   replayed=not sb.clean)


def _runs(items):
    """Group ``(block, image)`` pairs (ascending blocks) into runs of consecutive
    blocks, at most :data:`_WRITE_RUN` long: yields ``(first block, [images])``."""
    first = 0
    run: list[bytes] = []
    for b, img in items:
        if run and (b != first + len(run) or len(run) >= _WRITE_RUN):
            yield first, run
            run = []
        if not run:
            first = b
        run.append(img)
    if run:
        yield first, run


__all__ = ["UpgradeResult", "upgrade_store"]
