"""Formats v1 (ddsnap 0.1) and v2 (ddsnap 0.2), read for ``ddsnap upgrade``
(:mod:`ddsnap.store.upgrade`): the decoders of ddsnap 0.2's ``format.py`` as far as the
upgrade reads, and the reading of a whole old store.

v1 and v2 have the same layout; only the header's version field differs.  A snapshot's
exceptions are sharemaps: per logical chunk, a list of ``[sharemap, store_chunk]`` (bit
``s`` set: the snapshot in table slot ``s`` reads that chunk), in a B-tree keyed by
logical chunk, and a fixed table of ``max_snapshots`` slots.

Nothing here writes.  A store that was not shut down cleanly is read through its journal
*in memory* (v1's rule: a transaction counts when every block through its FINAL
descriptor checks out; v2's: :class:`~ddsnap.store.journal.Journal` with
``version=2``): the committed images are read in place of their home blocks.  The old
allocation bitmap is never read (a crashed upgrade may have overwritten it already); the
upgrade recomputes the allocation from the tree read here.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ..errors import CorruptMetadata, DdsnapError, NotAStore
from .blockdev import BlockDevice
from .format import (
    BLOCK_SIZE,
    HEADER_SIZE,
    MAGIC,
    MAX_NAME,
    SNAPS_PER_BLOCK,
    T_JOURNAL,
    T_LEAF,
    T_NODE,
    T_SNAPTABLE,
    VERSION,
    VERSION_V1,
    VERSION_V2,
    Superblock,
    check_header,
    decode_descriptor,
    header_version,
    peek_header,
)
from .journal import Journal
from .model import State

#: the formats :func:`~ddsnap.store.upgrade.upgrade_store` converts
OLD_VERSIONS = (VERSION_V1, VERSION_V2)


# ---------------------------------------------------------------------------------------
# Formats v1 and v2 (the same layout; only the header version differs): the decoders of
# ddsnap 0.2's format.py, as far as the upgrade reads.

#: state flags namelen reserved id created_ns
_V2_SLOT = struct.Struct("<BBHIQQ")
_V2_SNAP_SLOT = 288
#: a v1/v2 table slot's state: free, a live snapshot, a snapshot being deleted
OLD_SLOT_FREE, OLD_SLOT_LIVE, OLD_SLOT_DELETING = 0, 1, 2
_V2_FLAG_READ_ONLY = 1
#: count, reserved, base_chunk; then the map of ``{offset: u32, rchunk: u32}``
_V2_LEAF_HEAD = struct.Struct("<IIQ")
_V2_LEAF_MAP_OFF = HEADER_SIZE + _V2_LEAF_HEAD.size  # 64
_V2_MAP = struct.Struct("<II")
#: count, reserved; then entries ``{key: u64, child: u64}``
_V2_NODE_HEAD = struct.Struct("<II")
_V2_NODE_ENTRIES_OFF = HEADER_SIZE + _V2_NODE_HEAD.size  # 56
_V2_ENTRY = struct.Struct("<QQ")
_V2_NODE_MAX = (BLOCK_SIZE - _V2_NODE_ENTRIES_OFF) // _V2_ENTRY.size  # 252


@dataclass
class OldSlot:
    """A v1/v2 snapshot table slot (its index is the snapshot's sharemap bit)."""

    state: int
    read_only: bool
    id: int
    created: int
    name: str


def _v2_decode_snaptable(buf: bytes, block: int, n: int) -> list[OldSlot]:
    out = []
    for i in range(n):
        off = HEADER_SIZE + i * _V2_SNAP_SLOT
        st, flags, nlen, _r, sid, created = _V2_SLOT.unpack_from(buf, off)
        if st not in (OLD_SLOT_FREE, OLD_SLOT_LIVE, OLD_SLOT_DELETING) or nlen > MAX_NAME:
            raise CorruptMetadata(block, f"snapshot slot {i} is malformed")
        name = bytes(buf[off + _V2_SLOT.size: off + _V2_SLOT.size + nlen]).decode(
            errors="replace")
        out.append(OldSlot(st, bool(flags & _V2_FLAG_READ_ONLY), sid, created, name))
    return out


def _v2_decode_leaf(buf: bytes, block: int, smbytes: int
                    ) -> tuple[list[int], list[list[tuple[int, int]]]]:
    """A v1/v2 leaf: its logical chunks, ascending, and each one's ``(sharemap,
    store_chunk)`` exceptions."""
    n, _r, base = _V2_LEAF_HEAD.unpack_from(buf, HEADER_SIZE)
    esize = smbytes + 8
    if _V2_LEAF_MAP_OFF + 8 * (n + 1) > BLOCK_SIZE:
        raise CorruptMetadata(block, f"leaf count {n} out of range")
    offs = [_V2_MAP.unpack_from(buf, _V2_LEAF_MAP_OFF + 8 * i) for i in range(n + 1)]
    if offs[n][0] != BLOCK_SIZE:
        raise CorruptMetadata(block, "leaf sentinel does not mark the block end")
    keys: list[int] = []
    excs: list[list[tuple[int, int]]] = []
    prev = -1
    for i in range(n):
        start, rchunk = offs[i]
        end = offs[i + 1][0]
        if (start < _V2_LEAF_MAP_OFF + 8 * (n + 1) or end < start or end > BLOCK_SIZE
                or (end - start) % esize):
            raise CorruptMetadata(block, f"leaf map entry {i} has bad offsets")
        key = base + rchunk
        if key <= prev:
            raise CorruptMetadata(block, f"leaf keys out of order at entry {i}")
        prev = key
        ex = []
        for off in range(start, end, esize):
            share = int.from_bytes(buf[off: off + smbytes], "little")
            (chunk,) = struct.unpack_from("<Q", buf, off + smbytes)
            ex.append((share, chunk))
        keys.append(key)
        excs.append(ex)
    return keys, excs


def _v2_decode_node(buf: bytes, block: int) -> list[int]:
    """A v1/v2 index node's children (its keys are not needed: the walk is in order)."""
    n, _r = _V2_NODE_HEAD.unpack_from(buf, HEADER_SIZE)
    if not 1 <= n <= _V2_NODE_MAX:
        raise CorruptMetadata(block, f"index node count {n} out of range")
    keys: list[int] = []
    children: list[int] = []
    for i in range(n):
        k, c = _V2_ENTRY.unpack_from(buf, _V2_NODE_ENTRIES_OFF + _V2_ENTRY.size * i)
        if keys and k <= keys[-1]:
            raise CorruptMetadata(block, f"index keys out of order at entry {i}")
        keys.append(k)
        children.append(c)
    return children


# ---------------------------------------------------------------------------------------
# Reading the old store

def read_old_superblock(dev: BlockDevice) -> tuple[Superblock, int]:
    """The newest valid superblock slot and its format version (1 or 2).

    Raises:
        NotAStore: neither slot has ddsnap's magic.
        CorruptMetadata: no slot checks out.
        DdsnapError: the newest slot is already format v3.
    """
    if dev.size < 2 * BLOCK_SIZE:
        raise NotAStore(dev.path, "too small")
    found: list[tuple[int, int, Superblock]] = []
    magic = False
    for slot in (0, 1):
        buf = dev.pread(BLOCK_SIZE, slot * BLOCK_SIZE)
        magic = magic or buf[:4] == MAGIC
        version = header_version(buf)
        if version not in (*OLD_VERSIONS, VERSION):
            continue
        try:
            sb = Superblock.decode(buf, slot, version=version)
        except CorruptMetadata:
            continue
        found.append((sb.generation, version, sb))
    if not magic:
        raise NotAStore(dev.path)
    if not found:
        raise CorruptMetadata(0, "no valid superblock of format v1, v2 or v3 to upgrade")
    _gen, version, sb = max(found, key=lambda t: t[0])
    if version == VERSION:
        raise DdsnapError(f"{dev.path} is already format v{VERSION}")
    return sb, version


def _v1_journal(dev: BlockDevice, sb: Superblock) -> tuple[dict[int, bytes], State | None]:
    """The v1 journal's complete transactions from the tail (v1's rule: every block
    through the FINAL descriptor checks out): ``(home block -> newest image, root state
    after the last one)``.  Writes nothing."""
    size, start, uuid = sb.journal_blocks, sb.journal_start, sb.uuid
    pos, seq = sb.journal_tail, sb.journal_seq
    overlay: dict[int, bytes] = {}
    state = None

    def read(p: int) -> tuple[int, bytes]:
        b = start + p % size
        return b, dev.pread(BLOCK_SIZE, b * BLOCK_SIZE)

    while pos - sb.journal_tail < size:
        images, p, done, st = [], pos, False, None
        while p - pos < size:
            dblock, buf = read(p)
            try:
                check_header(buf, T_JOURNAL, dblock, uuid, seq, version=VERSION_V1)
                targets, final, st = decode_descriptor(buf)
            except (CorruptMetadata, ValueError):
                break
            p += 1
            ok = True
            for t in targets:
                _b, img = read(p)
                h = peek_header(img, version=VERSION_V1)
                if h is None or h[1] != t or h[2] != seq or img[32:48] != uuid:
                    ok = False
                    break
                images.append((t, img))
                p += 1
            if not ok:
                break
            if final:
                done = True
                break
        if not done:
            break
        for t, img in images:
            overlay[t] = img
        state = st
        pos, seq = p, seq + 1
    return overlay, state


def _v2_journal(dev: BlockDevice, sb: Superblock) -> tuple[dict[int, bytes], State | None]:
    """The v2 journal's committed transactions from the tail, as v2's recovery reads
    them: ``(home block -> newest image, root state after the last one)``.  Writes
    nothing.

    Raises:
        CorruptMetadata: a committed transaction is damaged (naming the block).
    """
    j = Journal(dev, sb.uuid, sb.journal_start, sb.journal_blocks, sb.journal_tail,
                sb.journal_seq, version=VERSION_V2)
    scan = j.scan()
    if scan.damage:
        raise scan.damage[0]
    overlay: dict[int, bytes] = {}
    for tx in scan.transactions:
        for t, img in tx.images:
            overlay[t] = img
    return overlay, scan.state


@dataclass
class OldStore:
    """The old store as read: superblock, format version, root state (journal applied),
    table slots (index = sharemap bit), every tree block, and per logical chunk (in
    order) its ``(sharemap, store_chunk)`` exceptions and the leaf they are in."""

    sb: Superblock
    version: int
    state: State
    slots: list[OldSlot]
    tree_blocks: list[int]
    chunks: list[int]
    excs: list[list[tuple[int, int]]]
    leaf_of: list[int]


def data_area_start(sb: Superblock) -> int:
    """First block of the data area: past the journal, chunk aligned (all formats)."""
    bpc = sb.blocks_per_chunk
    return -(-(sb.journal_start + sb.journal_blocks) // bpc) * bpc


def read_old_store(dev: BlockDevice, sb: Superblock, version: int, progress) -> OldStore:
    """Read the old store's table and tree (through its journal if not shut down
    cleanly), writing nothing.  ``sb`` and ``version`` are what :func:`read_old_superblock`
    returned; ``progress``, if given, is called as ``progress(done, total)`` in 4 KiB
    blocks of the tree read.

    Raises:
        CorruptMetadata: a block fails its checks or the tree is inconsistent (naming
            the block), or a committed v2 journal transaction is damaged.
    """
    overlay: dict[int, bytes] = {}
    state = sb.state
    if not sb.clean:
        overlay, st = (_v1_journal if version == VERSION_V1 else _v2_journal)(dev, sb)
        if st is not None:
            state = st
    uuid = sb.uuid
    # ddsnap 0.2's own upgrade (v1 to v2) re-sealed a v1 store's blocks as v2 before it
    # wrote a v2 superblock: one it left half done has both.
    accepted = OLD_VERSIONS if version == VERSION_V1 else (version,)

    def read(block: int, kind: int) -> bytes:
        buf = overlay.get(block)
        if buf is None:
            buf = dev.pread(BLOCK_SIZE, block * BLOCK_SIZE)
        v = header_version(buf)
        check_header(buf, kind, block, uuid,
                     version=v if v is not None and v in accepted else version)
        return buf

    nslots = sb.max_snapshots
    if nslots <= 0 or nslots % 8 or -(-nslots // SNAPS_PER_BLOCK) != sb.snaptable_blocks:
        raise CorruptMetadata(sb.slot, f"max_snapshots {nslots} does not fit a v{version} "
                                       f"table of {sb.snaptable_blocks} blocks")
    slots: list[OldSlot] = []
    for k in range(sb.snaptable_blocks):
        b = sb.snaptable_start + k
        slots += _v2_decode_snaptable(read(b, T_SNAPTABLE), b,
                                      min(SNAPS_PER_BLOCK, nslots - k * SNAPS_PER_BLOCK))

    data_start = data_area_start(sb)
    seen: set[int] = set()

    def tree_block(b: int, parent: int) -> int:
        if not data_start <= b < sb.blocks:
            raise CorruptMetadata(parent, f"tree points at block {b}, outside the data area")
        if b in seen:
            raise CorruptMetadata(parent, f"tree block {b} is referenced twice")
        seen.add(b)
        return b

    level = [tree_block(state.root, sb.slot)]
    done = 0
    for _ in range(state.levels):
        nxt = []
        for b in level:
            nxt += [tree_block(c, b) for c in _v2_decode_node(read(b, T_NODE), b)]
        done += len(level)
        if progress is not None:
            progress(done, done + len(nxt))
        level = nxt
    smbytes = nslots // 8
    chunks: list[int] = []
    excs: list[list[tuple[int, int]]] = []
    leaf_of: list[int] = []
    total = done + len(level)
    for i, b in enumerate(level):
        keys, ex = _v2_decode_leaf(read(b, T_LEAF), b, smbytes)
        if keys and chunks and keys[0] <= chunks[-1]:
            raise CorruptMetadata(b, "leaf keys out of order with the previous leaf")
        chunks += keys
        excs += ex
        leaf_of += [b] * len(keys)
        if progress is not None and (i % 64 == 63 or i == len(level) - 1):
            progress(done + i + 1, total)
    return OldStore(sb, version, state, slots, sorted(seen), chunks, excs, leaf_of)

