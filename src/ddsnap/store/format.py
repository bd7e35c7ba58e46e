"""Format v3 of the snapshot store: every on-disk structure, encoded and decoded.

``docs/format.md`` describes the same layout byte by byte; keep the two in step.  All
integers are little-endian.  The store is an array of 4 KiB metadata blocks; a chunk of
``chunk_size`` bytes is ``chunk_size // 4096`` consecutive blocks, chunk ``c`` starting at
byte ``c * chunk_size``.

Every metadata block starts with the 48-byte :data:`HEADER`: magic, type, version, crc32c,
block number, transaction sequence and store UUID (DESIGN.md invariant 4).  Decoding a
block checks all of them and raises :class:`~ddsnap.errors.CorruptMetadata` naming the
block on any mismatch.

It is a little over 600 lines on purpose: every block kind's layout, next to the others
and in the order of docs/format.md, so the two can be read side by side.

Sources: seed 000 (csnap.c: ``struct eleaf`` with its directory map and exceptions,
``struct enode``, ``struct disksuper``, ``struct commit_block``), seed 001 (the on-disk
header with root, levels and snapmask).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import crc32c

from ..errors import CorruptMetadata
from .model import Received, Receiving, State

BLOCK_SIZE = 4096
BLOCK_SHIFT = 12
MAGIC = b"DDSN"
VERSION = 3
#: the formats ddsnap 0.1 and 0.2 wrote; ``ddsnap upgrade`` converts them
#: (``store/upgrade.py``)
VERSION_V1 = 1
VERSION_V2 = 2

# Block types
T_SUPER = 1
T_SNAPTABLE = 2
T_BITMAP = 3
T_LEAF = 4
T_NODE = 5
T_JOURNAL = 6
T_COMMIT = 7

TYPE_NAMES = {T_SUPER: "superblock", T_SNAPTABLE: "snapshot table", T_BITMAP: "bitmap",
              T_LEAF: "leaf", T_NODE: "index node", T_JOURNAL: "journal descriptor",
              T_COMMIT: "journal commit block"}

#: magic[4] type:u16 version:u16 crc32c:u32 reserved:u32 block:u64 sequence:u64 uuid[16]
HEADER = struct.Struct("<4sHHII QQ16s")
HEADER_SIZE = HEADER.size  # 48
_CRC_OFF = 8

MAX_NAME = 255


def seal(buf: bytearray, btype: int, block: int, seq: int, uuid: bytes,
         version: int = VERSION) -> bytearray:
    """Write the common header into ``buf`` (a 4 KiB bytearray) and fill in its crc32c."""
    HEADER.pack_into(buf, 0, MAGIC, btype, version, 0, 0, block, seq, uuid)
    struct.pack_into("<I", buf, _CRC_OFF, crc32c.crc32c(buf))
    return buf


def check_header(buf: bytes, btype: int, block: int, uuid: bytes | None,
                 seq: int | None = None, version: int = VERSION) -> int:
    """Verify the header of a block read from ``block``; return its sequence.

    Raises:
        CorruptMetadata: wrong magic, type, version, block number, UUID, sequence or crc.
    """
    if len(buf) != BLOCK_SIZE:
        raise CorruptMetadata(block, f"short block ({len(buf)} bytes)")
    magic, t, ver, crc, _r, bno, bseq, buuid = HEADER.unpack_from(buf, 0)
    want = TYPE_NAMES.get(btype, str(btype))
    if magic != MAGIC:
        raise CorruptMetadata(block, f"bad magic, expected a {want} block")
    tmp = bytearray(buf)
    struct.pack_into("<I", tmp, _CRC_OFF, 0)
    if crc32c.crc32c(tmp) != crc:
        raise CorruptMetadata(block, f"crc32c mismatch in {want} block")
    if ver != version:
        raise CorruptMetadata(block, f"format version {ver}, expected {version}")
    if t != btype:
        raise CorruptMetadata(block, f"expected a {want} block, found type {TYPE_NAMES.get(t, t)}")
    if bno != block:
        raise CorruptMetadata(block, f"block claims to be block {bno}")
    if uuid is not None and buuid != uuid:
        raise CorruptMetadata(block, "block belongs to another store (UUID mismatch)")
    if seq is not None and bseq != seq:
        raise CorruptMetadata(block, f"sequence {bseq}, expected {seq}")
    return bseq


def peek_header(buf: bytes, version: int = VERSION) -> tuple[int, int, int] | None:
    """Return ``(type, block, sequence)`` if ``buf`` has a valid header and crc, else None."""
    if len(buf) != BLOCK_SIZE or buf[:4] != MAGIC:
        return None
    magic, t, ver, crc, _r, bno, bseq, _u = HEADER.unpack_from(buf, 0)
    tmp = bytearray(buf)
    struct.pack_into("<I", tmp, _CRC_OFF, 0)
    if crc32c.crc32c(tmp) != crc or ver != version:
        return None
    return t, bno, bseq


def header_version(buf: bytes | bytearray) -> int | None:
    """The format version a block's header claims (unverified), or None without magic."""
    if len(buf) < HEADER_SIZE or buf[:4] != MAGIC:
        return None
    return HEADER.unpack_from(buf, 0)[2]


# ---------------------------------------------------------------------------------------
# Superblock (blocks 0 and 1; the copy with the higher valid sequence wins)

_SB = struct.Struct("<QIIQQ QI QI QI QQ I")
_SB_OFF = HEADER_SIZE
MAX_ORIGIN_PATH = 1024

#: root, levels, next_snapshot_id, merge_version, merge_keep, merge_cursor, full_policy
_STATE = struct.Struct("<QIQIIQI")  # 40 bytes
_SB_STATE_OFF = _SB_OFF + _SB.size  # 136


def pack_state(state: State, buf, off: int) -> None:
    """Write ``state`` (40 bytes) into ``buf`` at ``off``: superblock, journal
    descriptor and commit block all carry it."""
    _STATE.pack_into(buf, off, state.root, state.levels, state.next_snapshot_id,
                     state.merge_version, 1 if state.merge_keep else 0, state.merge_cursor,
                     state.full_policy)


def unpack_state(buf, off: int) -> State:
    """The :class:`State` packed at ``off`` in ``buf`` (:func:`pack_state`)."""
    root, levels, next_id, mbit, keep, cursor, policy = _STATE.unpack_from(buf, off)
    return State(root, levels, next_id, mbit, bool(keep & 1), cursor, policy)
SB_PATH_OFF = _SB_STATE_OFF + _STATE.size  # 176: path length, then the path


@dataclass
class OriginIdentity:
    """What the origin was when the store was last shut down cleanly (format v2).

    ``size`` in bytes; ``dev``/``ino`` the file's device and inode numbers;
    ``mtime_ns``/``ctime_ns`` its modification and change times (0 for a block device,
    whose times say nothing about its content).  Compared at the next open to notice an
    origin changed while nobody served it.
    """

    size: int
    dev: int = 0
    ino: int = 0
    mtime_ns: int = 0
    ctime_ns: int = 0


@dataclass
class AutoDeleted:
    """A snapshot the ``delete-oldest`` full-store policy deleted (``deleted``: ns since
    the Unix epoch, UTC)."""

    id: int
    deleted: int
    name: str


#: superblock flag bits
SB_CLEAN = 1
SB_IDENTITY = 2  # the origin identity fields are valid
#: superblock offsets (format v2) of the origin identity and the auto-deleted records
_SB_ID_OFF = 1208
_SB_ID = struct.Struct("<QQQQQ")  # dev ino mtime_ns ctime_ns size
_SB_AUTO_OFF = _SB_ID_OFF + _SB_ID.size  # 1248: count u32, then records
_AUTO = struct.Struct("<QQH")  # id deleted_ns name_len, then the name (255 bytes)
_AUTO_SIZE = _AUTO.size + MAX_NAME  # 273
#: auto-deleted snapshots the superblock remembers (the newest)
AUTO_DELETED_MAX = 8
#: the cluster epoch: the highest election epoch of a metadata server that wrote the
#: store (u64; 0: never served by a cluster; in a former zero area of format v3)
_SB_EPOCH_OFF = 4000
#: send/receive (issue 13; in a former zero area of format v3): flags u32 (bit 0 a
#: receive is in progress, bit 1 a receive completed, bit 2 the snapshot received is
#: read-only), then the receive in progress: source UUID, snapshot id u32, base id u32,
#: offset u64, size u64, created u64, name length u16, name (255 bytes); then the last
#: completed one: source UUID, snapshot id u32, local id u32
_SB_RECV_OFF = 3440
_RECV = struct.Struct("<I16sIIQQQH")
_RECV_DONE_OFF = 3752
_RECV_DONE = struct.Struct("<16sII")
SB_RECV_ACTIVE, SB_RECV_DONE, SB_RECV_READ_ONLY = 1, 2, 4


@dataclass
class Superblock:
    """The store's geometry and the root of its metadata (seed 000 ``struct disksuper``).

    Sizes: ``blocks`` in 4 KiB blocks; ``origin_size`` in bytes; ``chunk_shift`` is
    log2(chunk size in bytes).  ``journal_tail`` is a monotonically increasing journal
    position (in blocks; the slot is ``tail % journal_blocks``) from which recovery
    replays, expecting transaction ``journal_seq`` first.  ``identity`` is the origin as
    of the last clean shutdown (None if not recorded); ``auto_deleted`` the newest
    snapshots the full-store policy deleted, oldest first.
    """

    uuid: bytes
    blocks: int
    chunk_shift: int
    max_snapshots: int
    origin_size: int
    created: int
    snaptable_start: int
    snaptable_blocks: int
    bitmap_start: int
    bitmap_blocks: int
    journal_start: int
    journal_blocks: int
    journal_tail: int = 0
    journal_seq: int = 1
    clean: bool = True
    state: State = field(default_factory=State)
    origin_path: str = ""
    generation: int = 0
    identity: OriginIdentity | None = None
    auto_deleted: list[AutoDeleted] = field(default_factory=list)
    epoch: int = 0
    receiving: Receiving | None = None
    received: Received | None = None

    @property
    def chunk_size(self) -> int:
        return 1 << self.chunk_shift

    @property
    def blocks_per_chunk(self) -> int:
        return 1 << (self.chunk_shift - BLOCK_SHIFT)

    @property
    def chunks(self) -> int:
        return self.blocks >> (self.chunk_shift - BLOCK_SHIFT)

    @property
    def slot(self) -> int:
        """The superblock slot (block 0 or 1) this generation is written to."""
        return self.generation % 2

    def encode(self, version: int = VERSION) -> bytearray:
        buf = bytearray(BLOCK_SIZE)
        path = self.origin_path.encode()
        if len(path) > MAX_ORIGIN_PATH:
            raise ValueError("origin path too long")
        flags = (SB_CLEAN if self.clean else 0) | (SB_IDENTITY if self.identity else 0)
        _SB.pack_into(
            buf, _SB_OFF, self.blocks, self.chunk_shift, self.max_snapshots,
            self.origin_size, self.created, self.snaptable_start, self.snaptable_blocks,
            self.bitmap_start, self.bitmap_blocks, self.journal_start, self.journal_blocks,
            self.journal_tail, self.journal_seq, flags)
        pack_state(self.state, buf, _SB_STATE_OFF)
        struct.pack_into("<H", buf, SB_PATH_OFF, len(path))
        buf[SB_PATH_OFF + 2: SB_PATH_OFF + 2 + len(path)] = path
        if version >= 2:
            if self.identity is not None:
                i = self.identity
                _SB_ID.pack_into(buf, _SB_ID_OFF, i.dev, i.ino, i.mtime_ns, i.ctime_ns, i.size)
            recs = self.auto_deleted[-AUTO_DELETED_MAX:]
            struct.pack_into("<I", buf, _SB_AUTO_OFF, len(recs))
            off = _SB_AUTO_OFF + 4
            for r in recs:
                name = r.name.encode()[:MAX_NAME]
                _AUTO.pack_into(buf, off, r.id, r.deleted, len(name))
                buf[off + _AUTO.size: off + _AUTO.size + len(name)] = name
                off += _AUTO_SIZE
        if version >= 3:
            struct.pack_into("<Q", buf, _SB_EPOCH_OFF, self.epoch)
            self._encode_receive(buf)
        return seal(buf, T_SUPER, self.slot, self.generation, self.uuid, version)

    def _encode_receive(self, buf: bytearray) -> None:
        r, d = self.receiving, self.received
        flags = ((SB_RECV_ACTIVE if r else 0) | (SB_RECV_DONE if d else 0)
                 | (SB_RECV_READ_ONLY if r and r.read_only else 0))
        if r is not None:
            name = r.name.encode()[:MAX_NAME]
            _RECV.pack_into(buf, _SB_RECV_OFF, flags, r.source, r.snapshot, r.base, r.offset,
                            r.size, r.created, len(name))
            buf[_SB_RECV_OFF + _RECV.size: _SB_RECV_OFF + _RECV.size + len(name)] = name
        else:
            struct.pack_into("<I", buf, _SB_RECV_OFF, flags)
        if d is not None:
            _RECV_DONE.pack_into(buf, _RECV_DONE_OFF, d.source, d.snapshot, d.local)

    @staticmethod
    def _decode_receive(buf: bytes, block: int) -> tuple[Receiving | None, Received | None]:
        (flags, source, snap, base, offset, size, created, nlen) = _RECV.unpack_from(
            buf, _SB_RECV_OFF)
        receiving = received = None
        if flags & ~(SB_RECV_ACTIVE | SB_RECV_DONE | SB_RECV_READ_ONLY):
            raise CorruptMetadata(block, f"receive flags 0x{flags:x} unknown")
        if flags & SB_RECV_ACTIVE:
            if nlen > MAX_NAME or offset > size:
                raise CorruptMetadata(block, "the receive in progress is malformed")
            off = _SB_RECV_OFF + _RECV.size
            name = bytes(buf[off: off + nlen]).decode(errors="replace")
            receiving = Receiving(bytes(source), snap, base, offset, size, name, created,
                                  bool(flags & SB_RECV_READ_ONLY))
        if flags & SB_RECV_DONE:
            source, snap, local = _RECV_DONE.unpack_from(buf, _RECV_DONE_OFF)
            received = Received(bytes(source), snap, local)
        return receiving, received

    @classmethod
    def decode(cls, buf: bytes, block: int, version: int = VERSION) -> Superblock:
        """Decode superblock slot ``block``.

        Raises:
            CorruptMetadata: the header, crc or a field is wrong (naming ``block``).
        """
        seq = check_header(buf, T_SUPER, block, None, version=version)
        uuid = bytes(buf[32:48])
        (blocks, cshift, maxsnap, osize, created, st_start, st_blocks, bm_start, bm_blocks,
         j_start, j_blocks, j_tail, j_seq, flags) = _SB.unpack_from(buf, _SB_OFF)
        state = unpack_state(buf, _SB_STATE_OFF)
        (plen,) = struct.unpack_from("<H", buf, SB_PATH_OFF)
        if plen > MAX_ORIGIN_PATH:
            raise CorruptMetadata(block, "origin path length out of range")
        if seq % 2 != block:
            raise CorruptMetadata(block, f"generation {seq} does not belong in slot {block}")
        off = SB_PATH_OFF + 2
        path = bytes(buf[off: off + plen]).decode(errors="replace")
        identity, auto = None, []
        if version >= 2:
            if flags & SB_IDENTITY:
                dev, ino, mtime, ctime, size = _SB_ID.unpack_from(buf, _SB_ID_OFF)
                identity = OriginIdentity(size, dev, ino, mtime, ctime)
            (n,) = struct.unpack_from("<I", buf, _SB_AUTO_OFF)
            if n > AUTO_DELETED_MAX:
                raise CorruptMetadata(block, f"{n} auto-deleted records (at most "
                                             f"{AUTO_DELETED_MAX})")
            off = _SB_AUTO_OFF + 4
            for _ in range(n):
                sid, when, nlen = _AUTO.unpack_from(buf, off)
                if nlen > MAX_NAME:
                    raise CorruptMetadata(block, "auto-deleted record name out of range")
                name = bytes(buf[off + _AUTO.size: off + _AUTO.size + nlen]).decode(
                    errors="replace")
                auto.append(AutoDeleted(sid, when, name))
                off += _AUTO_SIZE
        epoch = struct.unpack_from("<Q", buf, _SB_EPOCH_OFF)[0] if version >= 3 else 0
        receiving, received = cls._decode_receive(buf, block) if version >= 3 else (None, None)
        return cls(uuid, blocks, cshift, maxsnap, osize, created, st_start, st_blocks,
                   bm_start, bm_blocks, j_start, j_blocks, j_tail, j_seq,
                   bool(flags & SB_CLEAN), state, path, seq, identity, auto, epoch,
                   receiving, received)


# ---------------------------------------------------------------------------------------
# Snapshot table (format v3): a chain of table blocks, 14 slots of 288 bytes each, one
# slot per version (snapshot) of the origin; the chain grows as snapshots are made.

SNAP_SLOT = 288
SNAPS_PER_BLOCK = (BLOCK_SIZE - HEADER_SIZE) // SNAP_SLOT  # 14
#: offset of the next table block's number (0: the last block of the chain)
TABLE_NEXT_OFF = HEADER_SIZE + SNAPS_PER_BLOCK * SNAP_SLOT  # 4080
#: state flags namelen id parent reserved created
_SLOT = struct.Struct("<BBHIIIQ")
_SLOT_SIZE_OFF = 280  # volume size in bytes (u64)

SLOT_FREE = 0
SLOT_LIVE = 1
SLOT_DELETING = 2
#: deleted by the user, kept because snapshots taken of it still read through it
SLOT_GHOST = 3
FLAG_READ_ONLY = 1

#: the origin's version id; snapshots are 1, 2, ... (never reused)
ORIGIN = 0
#: the highest version id (ids are u32; :data:`INF` is reserved as a tag)
MAX_VERSION = 0xFFFFFFFD
#: the tag of a version's own current data (a "current" entry, see docs/format.md)
INF = 0xFFFFFFFF
#: owner of the merge's progress markers: chunks merged ahead of the merge cursor
MERGED = 0xFFFFFFFE


@dataclass
class SnapSlot:
    """One snapshot table slot: a version of the origin (format v3).

    ``id`` is the version id (1..:data:`MAX_VERSION`, never reused); ``parent`` the
    version it was taken of (:data:`ORIGIN` or a snapshot's id); ``created`` is
    nanoseconds since the Unix epoch (UTC); ``size`` the volume size in bytes.
    """

    state: int = SLOT_FREE
    read_only: bool = False
    id: int = 0
    created: int = 0
    name: str = ""
    parent: int = ORIGIN
    size: int = 0


def encode_snaptable(slots: list[SnapSlot], next_block: int = 0) -> bytearray:
    """Encode up to :data:`SNAPS_PER_BLOCK` slots and the chain's next block number
    into a block body (header unsealed)."""
    buf = bytearray(BLOCK_SIZE)
    for i, s in enumerate(slots):
        off = HEADER_SIZE + i * SNAP_SLOT
        name = s.name.encode()
        _SLOT.pack_into(buf, off, s.state, FLAG_READ_ONLY if s.read_only else 0, len(name),
                        s.id, s.parent, 0, s.created)
        buf[off + _SLOT.size: off + _SLOT.size + len(name)] = name
        struct.pack_into("<Q", buf, off + _SLOT_SIZE_OFF, s.size)
    struct.pack_into("<Q", buf, TABLE_NEXT_OFF, next_block)
    return buf


def decode_snaptable(buf: bytes, block: int) -> tuple[list[SnapSlot], int]:
    """Decode a table block: its :data:`SNAPS_PER_BLOCK` slots and the next block of the
    chain (0 if none).

    Raises:
        CorruptMetadata: a slot is malformed (naming ``block``).
    """
    out = []
    for i in range(SNAPS_PER_BLOCK):
        off = HEADER_SIZE + i * SNAP_SLOT
        st, flags, nlen, sid, parent, _r, created = _SLOT.unpack_from(buf, off)
        (size,) = struct.unpack_from("<Q", buf, off + _SLOT_SIZE_OFF)
        if (st not in (SLOT_FREE, SLOT_LIVE, SLOT_DELETING, SLOT_GHOST) or nlen > MAX_NAME
                or (st != SLOT_FREE and not (0 < sid <= MAX_VERSION and parent < sid))):
            raise CorruptMetadata(block, f"snapshot slot {i} is malformed")
        name = bytes(buf[off + _SLOT.size: off + _SLOT.size + nlen]).decode(errors="replace")
        out.append(SnapSlot(st, bool(flags & FLAG_READ_ONLY), sid, created, name, parent, size))
    (nxt,) = struct.unpack_from("<Q", buf, TABLE_NEXT_OFF)
    return out, nxt


# ---------------------------------------------------------------------------------------
# Allocation bitmap: one bit per 4 KiB block, 4048 bytes of bits per bitmap block

BITMAP_BYTES = BLOCK_SIZE - HEADER_SIZE  # 4048
BITS_PER_BITMAP = BITMAP_BYTES * 8  # 32384


# ---------------------------------------------------------------------------------------
# B-tree of versioned exceptions (format v3).  A key is (owner version, logical chunk,
# tag) packed into one 128-bit integer, so that one ordered map holds them all and the
# lookups are successor/predecessor probes (docs/format.md, "Versioned exceptions").

_OWNER_SHIFT = 96
_CHUNK_SHIFT = 32
_TAG_MASK = 0xFFFFFFFF
_CHUNK_MASK = (1 << 64) - 1


def pack_key(owner: int, chunk: int, tag: int) -> int:
    """The B-tree key of an exception: ``owner`` version (u32), logical ``chunk`` (u64),
    ``tag`` (u32; :data:`INF` for the owner's current data)."""
    return (owner << _OWNER_SHIFT) | (chunk << _CHUNK_SHIFT) | tag


def unpack_key(key: int) -> tuple[int, int, int]:
    """``(owner, chunk, tag)`` of a packed key."""
    return key >> _OWNER_SHIFT, (key >> _CHUNK_SHIFT) & _CHUNK_MASK, key & _TAG_MASK


#: the owner field of a *tag index* record: ``(INDEX, tag, chunk)`` for every history
#: entry of the origin ``(ORIGIN, chunk, tag)``, with the same value, so that a delete
#: finds the copy-outs tagged with a version without walking all of them
#: (docs/format.md, "Versioned exceptions").  No version has this id.
INDEX = INF
_INDEX_BASE = INDEX << _OWNER_SHIFT


def index_key(tag: int, chunk: int) -> int:
    """The key of the tag index record of the origin's history entry ``(chunk, tag)``:
    owner :data:`INDEX`, then ``tag`` (u32) and ``chunk`` (u64) in the 96 bits below."""
    return _INDEX_BASE | (tag << 64) | chunk


def unpack_index(key: int) -> tuple[int, int]:
    """``(tag, chunk)`` of a tag index key."""
    return (key >> 64) & _TAG_MASK, key & _CHUNK_MASK


#: key u128 (two u64, low first), value u64
_REC = struct.Struct("<QQQ")
REC_SIZE = _REC.size  # 24
_LEAF_HEAD = struct.Struct("<II")  # count, reserved
LEAF_ENTRIES_OFF = HEADER_SIZE + _LEAF_HEAD.size  # 56
LEAF_MAX = (BLOCK_SIZE - LEAF_ENTRIES_OFF) // REC_SIZE  # 168
_NODE_HEAD = struct.Struct("<II")  # count, reserved
NODE_ENTRIES_OFF = HEADER_SIZE + _NODE_HEAD.size  # 56
NODE_MAX = (BLOCK_SIZE - NODE_ENTRIES_OFF) // REC_SIZE  # 168
_LOW = (1 << 64) - 1


def _pack_records(buf: bytearray, off: int, keys: list[int], vals: list[int]) -> None:
    flat = []
    for k, v in zip(keys, vals, strict=True):
        flat.append(k & _LOW)
        flat.append(k >> 64)
        flat.append(v)
    struct.pack_into(f"<{len(flat)}Q", buf, off, *flat)


def _unpack_records(buf: bytes, off: int, n: int, block: int, what: str):
    flat = struct.unpack_from(f"<{3 * n}Q", buf, off)
    keys = [flat[i] | (flat[i + 1] << 64) for i in range(0, 3 * n, 3)]
    vals = list(flat[2::3])
    for i in range(1, n):
        if keys[i] <= keys[i - 1]:
            raise CorruptMetadata(block, f"{what} keys out of order at entry {i}")
    return keys, vals


class Leaf:
    """A decoded leaf: ascending packed keys (:func:`pack_key`) and, for each, the store
    chunk holding that exception's data.  Encoded as ``count`` and up to
    :data:`LEAF_MAX` 24-byte records ``{key: u128, store_chunk: u64}``.
    """

    __slots__ = ("keys", "vals")

    def __init__(self, keys=None, vals=None):
        self.keys: list[int] = keys if keys is not None else []
        self.vals: list[int] = vals if vals is not None else []

    def fits(self) -> bool:
        """True if this leaf encodes into one block."""
        return len(self.keys) <= LEAF_MAX

    def encode(self) -> bytearray:
        n = len(self.keys)
        if n > LEAF_MAX:
            raise ValueError("leaf overflow")
        buf = bytearray(BLOCK_SIZE)
        _LEAF_HEAD.pack_into(buf, HEADER_SIZE, n, 0)
        if n:
            _pack_records(buf, LEAF_ENTRIES_OFF, self.keys, self.vals)
        return buf

    @classmethod
    def decode(cls, buf: bytes, block: int) -> Leaf:
        n, _r = _LEAF_HEAD.unpack_from(buf, HEADER_SIZE)
        if n > LEAF_MAX:
            raise CorruptMetadata(block, f"leaf count {n} out of range")
        keys, vals = _unpack_records(buf, LEAF_ENTRIES_OFF, n, block, "leaf")
        return cls(keys, vals)


class Node:
    """A decoded index node: ``keys[i]`` is the lowest key child ``i`` covers.

    Encoded as ``count`` (1..:data:`NODE_MAX`) and 24-byte records ``{key: u128,
    child block: u64}``.  ``keys[0]`` equals the lower bound the parent gives this node
    (0 for the root) but lookups never need it, as in seed 000.
    """

    __slots__ = ("keys", "children")

    def __init__(self, keys=None, children=None):
        self.keys: list[int] = keys if keys is not None else []
        self.children: list[int] = children if children is not None else []

    def encode(self) -> bytearray:
        n = len(self.keys)
        if n > NODE_MAX:
            raise ValueError("node overflow")
        buf = bytearray(BLOCK_SIZE)
        _NODE_HEAD.pack_into(buf, HEADER_SIZE, n, 0)
        _pack_records(buf, NODE_ENTRIES_OFF, self.keys, self.children)
        return buf

    @classmethod
    def decode(cls, buf: bytes, block: int) -> Node:
        n, _r = _NODE_HEAD.unpack_from(buf, HEADER_SIZE)
        if not 1 <= n <= NODE_MAX:
            raise CorruptMetadata(block, f"index node count {n} out of range")
        keys, children = _unpack_records(buf, NODE_ENTRIES_OFF, n, block, "index")
        return cls(keys, children)


# ---------------------------------------------------------------------------------------
# Journal descriptor: lists the home blocks of the block images that follow it

_JD = struct.Struct("<II")  # count, flags; the root State follows at offset 56
_JD_STATE_OFF = HEADER_SIZE + 8
JD_ENTRIES_OFF = _JD_STATE_OFF + _STATE.size  # 96
JD_MAX = (BLOCK_SIZE - JD_ENTRIES_OFF) // 8  # 500
JD_FINAL = 1


def encode_descriptor(targets: list[int], final: bool, state: State) -> bytearray:
    buf = bytearray(BLOCK_SIZE)
    _JD.pack_into(buf, HEADER_SIZE, len(targets), JD_FINAL if final else 0)
    pack_state(state, buf, _JD_STATE_OFF)
    struct.pack_into(f"<{len(targets)}Q", buf, JD_ENTRIES_OFF, *targets)
    return buf


def decode_descriptor(buf: bytes) -> tuple[list[int], bool, State]:
    n, flags = _JD.unpack_from(buf, HEADER_SIZE)
    if n > JD_MAX:
        raise ValueError("descriptor count out of range")
    targets = list(struct.unpack_from(f"<{n}Q", buf, JD_ENTRIES_OFF))
    return targets, bool(flags & JD_FINAL), unpack_state(buf, _JD_STATE_OFF)


# ---------------------------------------------------------------------------------------
# Journal commit block (format v2): the commit point of a transaction, written after
# the transaction's descriptors and images are durable.  It holds two identical
# 2048-byte copies of the commit record, each with its own crc32c: one damaged copy
# leaves the other, so damage to it cannot pass for a commit that never happened.

COMMIT_COPY = BLOCK_SIZE // 2
#: magic type version crc reserved block seq uuid | start:u64 blocks:u32 flags:u32
_COMMIT = struct.Struct("<4sHHII QQ16s QII")
_COMMIT_STATE_OFF = _COMMIT.size  # 64
_COMMIT_CRC_OFF = 8
#: the cluster epoch of the server that wrote the transaction (u64, after the state)
_COMMIT_EPOCH_OFF = _COMMIT_STATE_OFF + _STATE.size  # 104


@dataclass
class CommitRecord:
    """One transaction's commit record.

    ``start`` is the journal position of its first descriptor, ``blocks`` the number of
    descriptor and image blocks before the commit block (so the commit block is at
    position ``start + blocks``); ``state`` the root state after the transaction;
    ``epoch`` the cluster epoch of the metadata server that wrote it (0: no cluster).
    """

    seq: int
    start: int
    blocks: int
    state: State
    epoch: int = 0


def encode_commit(rec: CommitRecord, block: int, uuid: bytes,
                  version: int = VERSION) -> bytearray:
    """The commit block for ``rec`` written at journal block ``block``: two copies
    (``version``: the format version it carries)."""
    half = bytearray(COMMIT_COPY)
    _COMMIT.pack_into(half, 0, MAGIC, T_COMMIT, version, 0, 0, block, rec.seq, uuid,
                      rec.start, rec.blocks, 0)
    pack_state(rec.state, half, _COMMIT_STATE_OFF)
    if version >= 3:
        struct.pack_into("<Q", half, _COMMIT_EPOCH_OFF, rec.epoch)
    struct.pack_into("<I", half, _COMMIT_CRC_OFF, crc32c.crc32c(half))
    return half + half


def decode_commit(buf: bytes, block: int, uuid: bytes,
                  version: int = VERSION) -> tuple[CommitRecord | None, list[int]]:
    """Decode the commit block read from journal block ``block``.

    Returns ``(record, bad)``: the record from the first copy that checks out (None if
    neither does) and the indexes (0, 1) of copies that do not check out.  A copy checks
    out when its magic, type, version (``version``: the format being read), crc32c,
    block number and UUID are right; a copy that disagrees with the other one is
    reported bad too.
    """
    recs: list[CommitRecord | None] = []
    for k in (0, 1):
        half = bytearray(buf[k * COMMIT_COPY:(k + 1) * COMMIT_COPY])
        rec = None
        if half[:4] == MAGIC:
            (magic, t, ver, crc, _r, bno, seq, buuid, start, blocks,
             _f) = _COMMIT.unpack_from(half, 0)
            struct.pack_into("<I", half, _COMMIT_CRC_OFF, 0)
            if (t == T_COMMIT and ver == version and bno == block and buuid == uuid
                    and crc32c.crc32c(half) == crc):
                epoch = (struct.unpack_from("<Q", half, _COMMIT_EPOCH_OFF)[0]
                         if version >= 3 else 0)
                rec = CommitRecord(seq, start, blocks, unpack_state(half, _COMMIT_STATE_OFF),
                                   epoch)
        recs.append(rec)
    good = [r for r in recs if r is not None]
    if len(good) == 2 and good[0] != good[1]:
        return None, [0, 1]
    bad = [k for k, r in enumerate(recs) if r is None]
    return (good[0] if good else None), bad
