"""Unit tests of the store's building blocks: format v3 encoding (fixed-record leaves and
index nodes, the chained snapshot table), the allocation bitmap, the journal, the
superblock pair, and how damaged metadata is detected and reported.

Everything runs on the real parts: MemoryDevice / FileDevice, the real Journal, Bitmap
and SharedStore.
"""

from __future__ import annotations

import os
import random
import struct
from itertools import pairwise

import crc32c
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import examples
from ddsnap.errors import CorruptMetadata, InvalidArgument, JournalError, NotAStore, StoreFull
from ddsnap.service.local import LocalService
from ddsnap.store import format as fmt
from ddsnap.store.alloc import Bitmap
from ddsnap.store.blockdev import FileDevice, MemoryDevice
from ddsnap.store.format import (
    BLOCK_SIZE,
    HEADER_SIZE,
    INF,
    JD_MAX,
    LEAF_MAX,
    NODE_MAX,
    SNAPS_PER_BLOCK,
    T_JOURNAL,
    T_LEAF,
    T_NODE,
    T_SNAPTABLE,
    T_SUPER,
    TABLE_NEXT_OFF,
    Leaf,
    Node,
    SnapSlot,
    State,
    Superblock,
    check_header,
    decode_descriptor,
    decode_snaptable,
    encode_descriptor,
    encode_snaptable,
    pack_key,
    peek_header,
    seal,
    unpack_key,
)
from ddsnap.store.journal import Journal, Transaction
from ddsnap.store.memory import MemoryStore
from ddsnap.store.model import Received, Receiving
from ddsnap.store.shared import SharedStore
from ddsnap.store.superblock import read_superblock
from ddsnap.testing.crash import CrashNow, RecordingDevice
from ddsnap.volume import Origin, Snapshot

UUID = bytes(range(16))
OTHER_UUID = bytes(range(16, 32))
U32 = (1 << 32) - 1
U64 = (1 << 64) - 1
U128 = (1 << 128) - 1


# ---------------------------------------------------------------------------------------
# Encode / decode round trips

#: packed keys: spread over every field (owner, chunk, tag), plus raw 128-bit values
#: whose halves differ only in the high or only in the low 64 bits
keys_st = st.one_of(
    st.builds(pack_key, st.integers(0, U32), st.integers(0, U64), st.integers(0, U32)),
    st.integers(0, U128),
    st.integers(0, 3).map(lambda k: k << 64),
)


@st.composite
def leaves(draw, max_keys: int = LEAF_MAX):
    """A Leaf that fits one block: ascending distinct keys, u64 values."""
    keys = sorted(draw(st.sets(keys_st, max_size=max_keys)))
    vals = draw(st.lists(st.integers(0, U64), min_size=len(keys), max_size=len(keys)))
    return Leaf(keys, vals)


@settings(max_examples=examples(60))
@given(leaves(), st.integers(0, U64), st.integers(0, (1 << 63)))
def test_leaf_round_trip(leaf, block, seq):
    assert leaf.fits()
    buf = seal(leaf.encode(), T_LEAF, block, seq, UUID)
    assert check_header(bytes(buf), T_LEAF, block, UUID, seq) == seq
    out = Leaf.decode(bytes(buf), block)
    assert out.keys == leaf.keys
    assert out.vals == leaf.vals


def test_leaf_round_trip_full_leaf():
    keys = [pack_key(o, c, t) for o in (0, 7) for c in range(28) for t in (1, 2, INF)]
    assert len(keys) == LEAF_MAX
    leaf = Leaf(keys, list(range(LEAF_MAX)))
    out = Leaf.decode(bytes(seal(leaf.encode(), T_LEAF, 5, 1, UUID)), 5)
    assert (out.keys, out.vals) == (keys, list(range(LEAF_MAX)))


def test_leaf_and_node_byte_layout():
    """docs/format.md's layout: count u32 at 48, 24-byte records from 56, each the key's
    low u64, its high u64, then the value."""
    assert (fmt.LEAF_ENTRIES_OFF, fmt.NODE_ENTRIES_OFF, fmt.REC_SIZE) == (56, 56, 24)
    assert LEAF_MAX == NODE_MAX == (BLOCK_SIZE - 56) // 24 == 168
    k0 = pack_key(1, 2, 3)
    k1 = pack_key(0xAABBCCDD, 0x1122334455667788, INF)
    for obj in (Leaf([k0, k1], [10, U64]), Node([k0, k1], [10, U64])):
        buf = obj.encode()
        assert struct.unpack_from("<I", buf, 48) == (2,)
        assert struct.unpack_from("<3Q", buf, 56) == (k0 & U64, k0 >> 64, 10)
        assert struct.unpack_from("<3Q", buf, 80) == (k1 & U64, k1 >> 64, U64)
        assert buf[104:] == bytes(BLOCK_SIZE - 104)  # nothing past the records
    # The key packs (owner, chunk, tag) so that one order sorts by all three.
    assert k1 >> 64 == (0xAABBCCDD << 32) | 0x11223344
    assert k1 & U64 == (0x55667788 << 32) | INF


@settings(max_examples=examples(60))
@given(st.integers(0, U32), st.integers(0, U64), st.integers(0, U32),
       st.integers(0, U32), st.integers(0, U64), st.integers(0, U32))
def test_pack_key_round_trip_and_order(o, c, t, o2, c2, t2):
    k = pack_key(o, c, t)
    assert 0 <= k <= U128 and unpack_key(k) == (o, c, t)
    assert (k < pack_key(o2, c2, t2)) == ((o, c, t) < (o2, c2, t2))


def test_leaf_overflow_is_refused():
    keys = list(range(LEAF_MAX + 1))
    leaf = Leaf(keys, keys)
    assert not leaf.fits()
    with pytest.raises(ValueError):
        leaf.encode()
    assert Leaf(keys[:-1], keys[:-1]).fits()
    Leaf(keys[:-1], keys[:-1]).encode()


@settings(max_examples=examples(60))
@given(st.sets(keys_st, min_size=1, max_size=NODE_MAX), st.data())
def test_node_round_trip(keys, data):
    keys = sorted(keys)
    children = data.draw(st.lists(st.integers(0, U64), min_size=len(keys),
                                  max_size=len(keys)))
    node = Node(keys, children)
    buf = seal(node.encode(), T_NODE, 77, 5, UUID)
    out = Node.decode(bytes(buf), 77)
    assert out.keys == keys and out.children == children


def test_node_overflow_and_empty_node():
    with pytest.raises(ValueError):
        Node(list(range(NODE_MAX + 1)), list(range(NODE_MAX + 1))).encode()
    buf = seal(Node().encode(), T_NODE, 9, 1, UUID)
    with pytest.raises(CorruptMetadata) as e:
        Node.decode(bytes(buf), 9)
    assert e.value.block == 9


state_st = st.builds(
    State, st.integers(0, U64), st.integers(1, U32), st.integers(0, U64),
    st.integers(0, U32), st.booleans(), st.integers(0, U64), st.integers(0, U32))


names_st = st.text(max_size=255).filter(lambda s: len(s.encode()) <= fmt.MAX_NAME)


@st.composite
def receivings(draw):
    """A receive in progress as the superblock records it (its offset within its size)."""
    size = draw(st.integers(0, U64))
    return Receiving(draw(st.binary(min_size=16, max_size=16)), draw(st.integers(0, U32)),
                     draw(st.integers(0, U32)), draw(st.integers(0, size)), size,
                     draw(names_st), draw(st.integers(0, U64)), draw(st.booleans()))


received_st = st.builds(Received, st.binary(min_size=16, max_size=16),
                        st.integers(0, U32), st.integers(0, U32))


@settings(max_examples=examples(60))
@given(st.builds(
    Superblock,
    uuid=st.binary(min_size=16, max_size=16),
    blocks=st.integers(0, U64),
    chunk_shift=st.integers(12, 20),
    max_snapshots=st.one_of(st.just(0), st.integers(1, U32)),  # a limit, 0: none
    origin_size=st.integers(0, U64),
    created=st.integers(0, U64),
    snaptable_start=st.integers(0, U64),
    snaptable_blocks=st.integers(0, U32),
    bitmap_start=st.integers(0, U64),
    bitmap_blocks=st.integers(0, U32),
    journal_start=st.integers(0, U64),
    journal_blocks=st.integers(0, U32),
    journal_tail=st.integers(0, U64),
    journal_seq=st.integers(0, U64),
    clean=st.booleans(),
    state=state_st,
    origin_path=st.text(max_size=200).filter(lambda s: len(s.encode()) <= fmt.MAX_ORIGIN_PATH),
    generation=st.integers(0, (1 << 63)),
    receiving=st.one_of(st.none(), receivings()),
    received=st.one_of(st.none(), received_st),
))
def test_superblock_round_trip(sb):
    buf = sb.encode()
    slot = sb.generation % 2
    out = Superblock.decode(bytes(buf), slot)
    assert out == sb
    # A superblock is only valid in the slot its generation names.
    with pytest.raises(CorruptMetadata) as e:
        Superblock.decode(bytes(buf), 1 - slot)
    assert e.value.block == 1 - slot


@pytest.mark.parametrize("damage", ["flags", "name length", "offset"])
def test_superblock_receive_damage_names_the_slot(damage):
    """A receive record that cannot be right (an unknown flag, a name longer than 255
    bytes, more applied than the volume holds) is damage naming the slot, not a
    receive to resume."""
    r = Receiving(UUID, 2, 1, 4096, 8192, "s2", 0, True)
    sb = Superblock(UUID, 100, 12, 64, 4096, 0, 2, 5, 7, 1, 8, 16, generation=1,
                    receiving=r, received=Received(UUID, 1, 1))
    buf = sb.encode()
    # (the offsets of docs/format.md's superblock table)
    assert struct.unpack_from("<IQ", buf, 3464) == (1, 4096)
    if damage == "flags":
        struct.pack_into("<I", buf, 3440, 0x11)
    elif damage == "name length":
        struct.pack_into("<H", buf, 3492, fmt.MAX_NAME + 1)
    else:
        struct.pack_into("<Q", buf, 3468, 8193)
    seal(buf, T_SUPER, 1, 1, UUID)
    with pytest.raises(CorruptMetadata) as e:
        Superblock.decode(bytes(buf), 1)
    assert e.value.block == 1


def test_receive_record_survives_reopens_and_a_crash():
    """``record_receive`` is durable when it returns: both slots carry it, so a reopen
    after a crash (the device as it is) finds it, and the last completed receive too."""
    dev = MemoryDevice(4 << 20)
    store = SharedStore.create(dev, origin_size=1 << 20, origin_path="o", chunk_size=4096)
    r = Receiving(UUID, 2, 1, 4096, 1 << 20, "s2", 5, False)
    done = Received(UUID, 1, 3)
    store.record_receive(r, done)
    crashed = SharedStore.open(MemoryDevice(dev.size, bytes(dev.pread(dev.size, 0))))
    assert crashed.receive_state() == (r, done)
    for slot in (0, 1):
        assert Superblock.decode(dev.pread(fmt.BLOCK_SIZE, slot * fmt.BLOCK_SIZE),
                                 slot).receiving == r
    store.record_receive(None, done)
    store.close()
    assert SharedStore.open(dev).receive_state() == (None, done)


def test_superblock_origin_path_limits():
    sb = Superblock(UUID, 100, 12, 64, 4096, 0, 2, 5, 7, 1, 8, 16, origin_path="/dev/x")
    with pytest.raises(ValueError):
        Superblock(UUID, 100, 12, 64, 4096, 0, 2, 5, 7, 1, 8, 16,
                   origin_path="p" * (fmt.MAX_ORIGIN_PATH + 1)).encode()
    buf = sb.encode()
    # Claim a path longer than the format allows, and re-seal so only that is wrong.
    off = fmt.SB_PATH_OFF
    struct.pack_into("<H", buf, off, fmt.MAX_ORIGIN_PATH + 1)
    seal(buf, T_SUPER, 0, 0, UUID)
    with pytest.raises(CorruptMetadata) as e:
        Superblock.decode(bytes(buf), 0)
    assert e.value.block == 0


@st.composite
def slots(draw):
    """A well-formed table slot: a version (id 1..MAX_VERSION, parent below it) in any
    used state, or a free slot."""
    state = draw(st.sampled_from([fmt.SLOT_FREE, fmt.SLOT_LIVE, fmt.SLOT_DELETING,
                                  fmt.SLOT_GHOST]))
    if state == fmt.SLOT_FREE:
        return SnapSlot()
    vid = draw(st.one_of(st.integers(1, 100), st.integers(1, fmt.MAX_VERSION)))
    return SnapSlot(state, draw(st.booleans()), vid, draw(st.integers(0, U64)),
                    draw(names_st), draw(st.integers(0, vid - 1)), draw(st.integers(0, U64)))


@settings(max_examples=examples(40))
@given(st.lists(slots(), min_size=0, max_size=SNAPS_PER_BLOCK),
       st.one_of(st.just(0), st.integers(1, U64)), st.integers(2, U64))
def test_snaptable_round_trip(table, nxt, block):
    buf = seal(encode_snaptable(table, nxt), T_SNAPTABLE, block, 9, UUID)
    check_header(bytes(buf), T_SNAPTABLE, block, UUID)
    got, got_next = decode_snaptable(bytes(buf), block)
    # A block always holds SNAPS_PER_BLOCK slots: the ones not given are free.
    assert got == table + [SnapSlot()] * (SNAPS_PER_BLOCK - len(table))
    assert got_next == nxt
    assert struct.unpack_from("<Q", buf, TABLE_NEXT_OFF) == (nxt,)


def test_snaptable_geometry():
    assert SNAPS_PER_BLOCK == 14 and fmt.SNAP_SLOT == 288
    assert TABLE_NEXT_OFF == HEADER_SIZE + 14 * 288 == 4080
    assert TABLE_NEXT_OFF + 8 <= BLOCK_SIZE


def _slot_field(buf: bytearray, i: int, field: str, value: int) -> None:
    """Overwrite one field of slot ``i`` (state, flags, namelen, id, parent)."""
    off = HEADER_SIZE + i * fmt.SNAP_SLOT
    at, fmt_ = {"state": (0, "<B"), "namelen": (2, "<H"), "id": (4, "<I"),
                "parent": (8, "<I")}[field]
    struct.pack_into(fmt_, buf, off + at, value)


@pytest.mark.parametrize("field,value", [
    ("state", 4), ("state", 0xFF),           # no such slot state
    ("namelen", fmt.MAX_NAME + 1),           # name longer than the slot holds
    ("id", 0),                               # a used slot without a version id
    ("id", fmt.MAX_VERSION + 1),             # ids above MAX_VERSION are reserved tags
    ("parent", 5), ("parent", 9),            # taken of itself, or of a later version
])
@pytest.mark.parametrize("where", [0, 13])
def test_snaptable_malformed_slot(field, value, where):
    table = [SnapSlot(fmt.SLOT_LIVE, False, 5, 2, "a", 0)] * SNAPS_PER_BLOCK
    buf = encode_snaptable(table)
    decode_snaptable(bytes(buf), 4)  # well formed as made
    _slot_field(buf, where, field, value)
    with pytest.raises(CorruptMetadata) as e:
        decode_snaptable(bytes(buf), 4)
    assert e.value.block == 4
    assert f"slot {where} " in e.value.why


def test_snaptable_free_slot_fields_are_not_judged():
    """A free slot's other fields mean nothing (a freed slot is zeroed, but a decoder
    must not refuse stale bytes there)."""
    buf = encode_snaptable([SnapSlot(fmt.SLOT_FREE, False, 0, 0, "")])
    _slot_field(buf, 0, "parent", 7)
    assert decode_snaptable(bytes(buf), 4)[0][0].state == fmt.SLOT_FREE


@settings(max_examples=examples(40))
@given(st.lists(st.integers(0, U64), max_size=JD_MAX), st.booleans(), state_st)
def test_descriptor_round_trip(targets, final, state):
    buf = seal(encode_descriptor(targets, final, state), T_JOURNAL, 12, 3, UUID)
    assert decode_descriptor(bytes(buf)) == (targets, final, state)


# ---------------------------------------------------------------------------------------
# Header checks: every kind of damage raises CorruptMetadata naming the block

def _sealed_leaf(block=100, seq=7, uuid=UUID) -> bytearray:
    leaf = Leaf([pack_key(0, 5, 1), pack_key(0, 9, 3), pack_key(2, 9, INF)], [1000, 1001, 1002])
    return seal(leaf.encode(), T_LEAF, block, seq, uuid)


def _reseal_keep_crc_valid(buf: bytearray) -> bytearray:
    struct.pack_into("<I", buf, 8, 0)
    struct.pack_into("<I", buf, 8, crc32c.crc32c(buf))
    return buf


def _damage(kind: str) -> tuple[bytes, dict]:
    """A leaf image for block 100 damaged in one way, and the check_header arguments."""
    buf = _sealed_leaf()
    args = dict(btype=T_LEAF, block=100, uuid=UUID)
    if kind == "magic":
        buf[0:4] = b"XXXX"
    elif kind == "magic-resealed":
        buf[0:4] = b"DDSX"
        _reseal_keep_crc_valid(buf)
    elif kind == "crc-field":
        buf[8] ^= 0x01
    elif kind == "payload-bit":
        buf[HEADER_SIZE + 20] ^= 0x10
    elif kind == "last-byte":
        buf[-1] ^= 0xFF
    elif kind == "block-number":
        buf = seal(Leaf().encode(), T_LEAF, 101, 7, UUID)
    elif kind == "uuid":
        buf = _sealed_leaf(uuid=OTHER_UUID)
    elif kind == "type":
        buf = seal(Node([0], [5]).encode(), T_NODE, 100, 7, UUID)
    elif kind == "version":
        struct.pack_into("<H", buf, 6, fmt.VERSION + 1)
        _reseal_keep_crc_valid(buf)
    elif kind == "old-version":
        buf = seal(bytearray(buf), T_LEAF, 100, 7, UUID, version=fmt.VERSION_V2)
    elif kind == "sequence":
        args["seq"] = 8
    elif kind == "short":
        buf = buf[:BLOCK_SIZE - 1]
    elif kind == "zeroes":
        buf = bytearray(BLOCK_SIZE)
    else:
        raise ValueError(kind)
    return bytes(buf), args


DAMAGE = ["magic", "magic-resealed", "crc-field", "payload-bit", "last-byte", "block-number",
          "uuid", "type", "version", "old-version", "sequence", "short", "zeroes"]


@pytest.mark.parametrize("kind", DAMAGE)
def test_header_damage_raises_corrupt_metadata_naming_block(kind):
    buf, args = _damage(kind)
    with pytest.raises(CorruptMetadata) as e:
        check_header(buf, **args)
    assert e.value.block == 100
    assert "block 100" in str(e.value)
    if kind not in ("sequence", "uuid", "block-number", "type"):
        assert peek_header(buf) is None


def test_intact_header_passes_and_peeks():
    buf = bytes(_sealed_leaf())
    assert check_header(buf, T_LEAF, 100, UUID, 7) == 7
    assert peek_header(buf) == (T_LEAF, 100, 7)


def _records(buf: bytearray, keys, vals) -> None:
    """Write raw records (key low, key high, value) from offset 56, as the format does."""
    for i, (k, v) in enumerate(zip(keys, vals, strict=True)):
        struct.pack_into("<3Q", buf, 56 + 24 * i, k & U64, k >> 64, v)


@pytest.mark.parametrize("btype", [T_LEAF, T_NODE])
@settings(max_examples=examples(150))
@given(payload=st.binary(min_size=BLOCK_SIZE - HEADER_SIZE, max_size=BLOCK_SIZE - HEADER_SIZE),
       count=st.one_of(st.integers(0, 200), st.integers(0, U32)),
       planted=st.one_of(st.none(), st.lists(keys_st, max_size=LEAF_MAX)),
       ascending=st.booleans())
def test_decode_of_checksummed_garbage_raises_only_corrupt_metadata(btype, payload, count,
                                                                    planted, ascending):
    """A block whose header and crc are right but whose body is nonsense (a software bug
    or a hostile image) must be refused as CorruptMetadata, never crash the decoder, and
    whatever it accepts is a well-formed leaf or node."""
    buf = bytearray(BLOCK_SIZE)
    buf[HEADER_SIZE:] = payload
    struct.pack_into("<I", buf, HEADER_SIZE, count)
    if planted is not None:  # plausible-looking records: keys in order, or not
        keys = sorted(set(planted)) if ascending else planted
        _records(buf, keys, range(len(keys)))
    seal(buf, btype, 42, 1, UUID)
    try:
        obj = (Leaf if btype == T_LEAF else Node).decode(bytes(buf), 42)
    except CorruptMetadata as e:
        assert e.block == 42
        return
    n = len(obj.keys)
    assert n == count
    assert (0 if btype == T_LEAF else 1) <= n <= LEAF_MAX
    assert all(a < b for a, b in pairwise(obj.keys))
    # It re-encodes to the very records it was decoded from.
    again = obj.encode()
    assert again[48:56 + 24 * n] == buf[48:52] + bytes(4) + buf[56:56 + 24 * n]


@pytest.mark.parametrize("btype", [T_LEAF, T_NODE])
@pytest.mark.parametrize("count", [LEAF_MAX + 1, 1000, U32])
def test_count_out_of_range_is_corrupt(btype, count):
    """A count past what a block holds is refused, not read past the buffer."""
    cls = Leaf if btype == T_LEAF else Node
    buf = cls([1, 2], [10, 11]).encode()
    struct.pack_into("<I", buf, HEADER_SIZE, count)
    seal(buf, btype, 42, 1, UUID)
    with pytest.raises(CorruptMetadata) as e:
        cls.decode(bytes(buf), 42)
    assert e.value.block == 42 and "count" in e.value.why


def test_node_count_zero_is_corrupt_but_an_empty_leaf_is_not():
    for cls, ok in ((Leaf, True), (Node, False)):
        buf = cls([7], [8]).encode()
        struct.pack_into("<I", buf, HEADER_SIZE, 0)
        if ok:
            assert cls.decode(bytes(buf), 42).keys == []
        else:
            with pytest.raises(CorruptMetadata) as e:
                cls.decode(bytes(buf), 42)
            assert e.value.block == 42


@pytest.mark.parametrize("btype", [T_LEAF, T_NODE])
@pytest.mark.parametrize("order", ["swapped", "equal", "high-half-descends",
                                   "low-half-descends", "last-pair"])
def test_keys_out_of_order_are_corrupt(btype, order):
    """Keys must strictly ascend as 128-bit numbers: the high half decides first."""
    keys = [pack_key(1, 1, 1), pack_key(1, 2, 1), pack_key(3, 0, 2), pack_key(3, 0, INF)]
    if order == "swapped":
        keys[0], keys[1] = keys[1], keys[0]
    elif order == "equal":
        keys[2] = keys[1]
    elif order == "high-half-descends":  # low half larger, high half smaller
        keys[2] = ((keys[1] >> 64) - 1) << 64 | U64
    elif order == "low-half-descends":  # same high half, smaller low half
        keys[2] = keys[1] - 1
    elif order == "last-pair":
        keys[3] = keys[2]
    buf = bytearray(BLOCK_SIZE)
    struct.pack_into("<I", buf, HEADER_SIZE, len(keys))
    _records(buf, keys, range(len(keys)))
    seal(buf, btype, 42, 1, UUID)
    with pytest.raises(CorruptMetadata) as e:
        (Leaf if btype == T_LEAF else Node).decode(bytes(buf), 42)
    assert e.value.block == 42 and "order" in e.value.why


def test_keys_ascending_by_the_high_half_decode():
    """The counterpart of the above: a low half that descends while the high half
    ascends is in order (the low u64 is stored first, but the high one ranks first)."""
    keys = [(1 << 64) | U64, (2 << 64) | 0, (2 << 64) | 5]
    buf = bytearray(BLOCK_SIZE)
    struct.pack_into("<I", buf, HEADER_SIZE, len(keys))
    _records(buf, keys, [1, 2, 3])
    seal(buf, T_LEAF, 42, 1, UUID)
    assert Leaf.decode(bytes(buf), 42).keys == keys


# ---------------------------------------------------------------------------------------
# Allocation bitmap

def make_bitmap(bpc: int, chunks: int, reserved_blocks: int) -> Bitmap:
    """A bitmap as SharedStore.create lays it out: ``reserved_blocks`` (rounded up to a
    chunk) in use, ``chunks`` chunks of ``bpc`` blocks, bits past the end set."""
    blocks = chunks * bpc
    data_start = -(-reserved_blocks // bpc) * bpc
    nbytes = -(-blocks // fmt.BITS_PER_BITMAP) * fmt.BITMAP_BYTES
    bits = bytearray(nbytes)
    for b in list(range(data_start)) + list(range(blocks, nbytes * 8)):
        bits[b >> 3] |= 1 << (b & 7)
    return Bitmap(bits, blocks, bpc, data_start)


CHUNK_SIZES = [4096 << i for i in range(9)]  # 4K .. 1M


@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
def test_bitmap_chunks_are_aligned_and_never_overlap_metadata(chunk_size):
    bpc = chunk_size // BLOCK_SIZE
    chunks = 40
    bm = make_bitmap(bpc, chunks, reserved_blocks=3)
    first = bm.data_start // bpc
    assert bm.free_chunks == chunks - first
    rng = random.Random(chunk_size)
    owner: dict[int, str] = {}
    got_chunks = []
    while True:
        if rng.random() < 0.3:
            try:
                b = bm.alloc_block()
            except StoreFull:
                break
            assert b >= bm.data_start and b not in owner
            owner[b] = "meta"
        else:
            try:
                c = bm.alloc_chunk()
            except StoreFull:
                break
            assert first <= c < chunks
            blocks = range(c * bpc, (c + 1) * bpc)
            assert not any(b in owner for b in blocks), "chunk overlaps an allocated block"
            for b in blocks:
                owner[b] = f"chunk {c}"
                assert bm.test(b)
            got_chunks.append(c)
    # Allocation stopped only because nothing is left of the kind asked for.
    with pytest.raises(StoreFull):
        bm.alloc_chunk()
    assert bm.free_chunks == 0
    assert len(set(got_chunks)) == len(got_chunks)
    # Every allocated block is set, nothing else is.
    for b in range(bm.data_start, chunks * bpc):
        assert bm.test(b) == (b in owner)
    # Metadata blocks are packed: they spoil few chunks.
    meta = [b for b, o in owner.items() if o == "meta"]
    assert len({b // bpc for b in meta}) <= -(-len(meta) // bpc) + 1


@pytest.mark.parametrize("chunk_size", [4096, 16384, 65536, 1 << 20])
def test_bitmap_quarantine_until_release(chunk_size):
    bpc = chunk_size // BLOCK_SIZE
    bm = make_bitmap(bpc, 6, reserved_blocks=1)
    chunks = []
    while True:
        try:
            chunks.append(bm.alloc_chunk())
        except StoreFull:
            break
    assert len(chunks) == 5
    victim = chunks[2]
    bm.free_chunk(victim)
    assert bm.free_chunks == 1
    assert not bm.test(victim * bpc)
    # Freed but quarantined: not handed out again yet.
    with pytest.raises(StoreFull):
        bm.alloc_chunk()
    bm.release_quarantine(set(), {victim})
    assert bm.alloc_chunk() == victim
    with pytest.raises(StoreFull):
        bm.alloc_chunk()


def test_bitmap_freed_metadata_block_is_quarantined():
    bm = make_bitmap(4, 3, reserved_blocks=1)
    blocks = []
    while True:
        try:
            blocks.append(bm.alloc_block())
        except StoreFull:
            break
    assert blocks == list(range(4, 12))
    bm.free_block(6)
    with pytest.raises(StoreFull):
        bm.alloc_block()
    bm.release_quarantine({6}, {1})
    assert bm.alloc_block() == 6


def test_bitmap_chunk_with_quarantined_block_is_not_reused():
    bm = make_bitmap(4, 3, reserved_blocks=1)  # chunks 1 and 2 free
    b = bm.alloc_block()
    assert b // 4 == 1
    assert bm.alloc_chunk() == 2
    bm.free_block(b)
    assert bm.free_chunks == 1
    with pytest.raises(StoreFull):
        bm.alloc_chunk()  # chunk 1 is free but holds a quarantined block
    bm.release_quarantine({b}, {1})
    assert bm.alloc_chunk() == 1


def test_store_bitmap_marks_the_tail_past_the_device_in_use():
    # A device size that is not a whole number of chunks or bitmap blocks.
    dev = MemoryDevice(3 * 65536 * 4 + 12345)
    store = SharedStore.create(dev, origin_size=1 << 20, chunk_size=65536, journal_blocks=16)
    bm = store.bitmap
    assert bm.blocks == store.sb.chunks * store.bpc
    for b in range(bm.blocks, len(bm.bits) * 8):
        assert bm.test(b)
    total = store.space()["chunks_total"]
    got = []
    while True:
        try:
            got.append(store.allocate_chunk())
        except StoreFull:
            break
    assert got and max(got) < store.sb.chunks
    assert len(got) == total - 1  # one chunk holds the initial leaf and root


# ---------------------------------------------------------------------------------------
# Journal

J_START, J_SIZE = 8, 64


def _image(home: int, seq: int, tag: int, uuid: bytes = UUID) -> bytes:
    """A sealed 4 KiB metadata image for block ``home`` of transaction ``seq``, its body
    filled with bytes particular to (home, seq, tag) so any tear changes it."""
    buf = bytearray(BLOCK_SIZE)
    buf[HEADER_SIZE:] = random.Random(f"{home}/{seq}/{tag}").randbytes(BLOCK_SIZE - HEADER_SIZE)
    return bytes(seal(buf, T_LEAF, home, seq, uuid))


def _tx(seq: int, homes, tag: int = 0) -> Transaction:
    return Transaction(seq, [(h, _image(h, seq, tag)) for h in homes], State(1000 + seq, 1, seq))


def _home(dev: MemoryDevice, home: int) -> bytes:
    return dev.pread(BLOCK_SIZE, home * BLOCK_SIZE)


def _journal(dev, tail=0, seq=1, size=J_SIZE, uuid=UUID) -> Journal:
    return Journal(dev, uuid, J_START, size, tail, seq)


def test_journal_append_and_replay():
    dev = MemoryDevice(4 << 20)
    j = _journal(dev)
    j.commit(_tx(1, [200, 201, 202]))
    j.commit(_tx(2, [201, 300]))
    assert j.head == 5 + 4 and j.next_seq == 3  # descriptor, images, commit block
    assert _home(dev, 200) == bytes(BLOCK_SIZE)  # the journal never writes home blocks
    r = _journal(dev)
    state, applied = r.replay()
    assert applied == 2
    assert state == State(1002, 1, 2)
    assert _home(dev, 200) == _image(200, 1, 0)
    assert _home(dev, 201) == _image(201, 2, 0)  # the later transaction wins
    assert _home(dev, 300) == _image(300, 2, 0)
    assert (r.head, r.next_seq) == (j.head, j.next_seq)
    # Replaying again is idempotent.
    assert _journal(dev).replay() == (state, 2)


@pytest.mark.parametrize("mode", ["drop", "subset", "torn", "all"])
def test_journal_a_crash_anywhere_in_a_commit_is_never_damage(mode):
    """A power cut at each write and flush of a commit (body, flush, commit block,
    flush) leaves either the transaction before it or both, never an error: only a
    commit block written after a durable body counts, so a crash cannot look like
    damage."""
    tx2 = _tx(2, [300, 301, 302])
    for crash_at in range(1, 5):
        dev = RecordingDevice(4 << 20)
        j = _journal(dev)
        j.commit(_tx(1, [200]))
        dev.crash_after = dev.ops + crash_at
        with pytest.raises(CrashNow):
            j.commit(tx2)
        seen = set()
        for seed in range(12):
            img = MemoryDevice(dev.size, bytes(dev.crash_image(random.Random(seed), mode)))
            state, applied = _journal(img).replay()
            seen.add(applied)
            assert applied in (1, 2), (crash_at, seed)
            for h, want in tx2.images:
                assert _home(img, h) == (want if applied == 2 else bytes(BLOCK_SIZE))
        if crash_at <= 3:
            assert seen == {1}, "committed before its commit block was written"


def test_journal_empty_transaction_carries_state():
    dev = MemoryDevice(1 << 20)
    _journal(dev).commit(_tx(1, []))
    assert _journal(dev).replay() == (State(1001, 1, 1), 1)
    assert _journal(MemoryDevice(1 << 20)).replay() == (None, 0)


@pytest.mark.parametrize("where", ["descriptor", "first-image", "last-image", "torn-image",
                                   "none"])
def test_journal_transaction_without_its_commit_block_is_torn(where):
    """A transaction whose commit block never landed (a crash before the commit point)
    is discarded, whatever else of it landed; the journal ends there."""
    dev = MemoryDevice(4 << 20)
    j = _journal(dev)
    j.commit(_tx(1, [200, 201]))
    start2 = j.head
    tx2 = _tx(2, [300, 301, 302])
    j.append(tx2)
    slot = {"descriptor": start2, "first-image": start2 + 1, "last-image": start2 + 3,
            "torn-image": start2 + 2, "none": None}[where]
    if slot is not None:
        off = (J_START + slot) * BLOCK_SIZE
        if where == "torn-image":
            dev.pwrite(bytes(BLOCK_SIZE - 1536), off + 1536)  # only 3 sectors landed
        else:
            dev.pwrite(bytes(BLOCK_SIZE), off)  # the write never landed
    r = _journal(dev)
    state, applied = r.replay()
    assert applied == 1 and state == State(1001, 1, 1)
    assert r.head == start2
    assert _home(dev, 201) == _image(201, 1, 0)
    for home in (300, 301, 302):
        assert _home(dev, home) == bytes(BLOCK_SIZE), "part of a torn transaction was applied"


@pytest.mark.parametrize("where", ["descriptor", "image", "both-commit-copies"])
@pytest.mark.parametrize("last", [True, False])
def test_journal_damage_to_a_committed_transaction_is_reported(where, last):
    """A flipped byte in a committed transaction is damage, not a torn commit: recovery
    names the block and applies nothing.  For the last transaction its own commit
    record proves it committed; for an earlier one, the next transaction's does (and
    then even both copies of its own commit record damaged are caught)."""
    if where == "both-commit-copies" and last:
        pytest.skip("the documented limit: no proof left (see the next test)")
    dev = MemoryDevice(4 << 20)
    j = _journal(dev)
    j.commit(_tx(1, [200]))
    start2 = j.head
    j.commit(_tx(2, [300, 301]))
    if not last:
        j.commit(_tx(3, [400]))
    slot = {"descriptor": start2, "image": start2 + 2, "both-commit-copies": start2 + 3}[where]
    off = (J_START + slot) * BLOCK_SIZE
    flips = [100] if where != "both-commit-copies" else [100, 2048 + 100]
    for at in flips:
        b = dev.pread(1, off + at)
        dev.pwrite(bytes([b[0] ^ 0x40]), off + at)
    with pytest.raises(CorruptMetadata) as e:
        _journal(dev).replay()
    assert e.value.block == J_START + slot
    assert _home(dev, 200) == bytes(BLOCK_SIZE)  # nothing applied
    scan = _journal(dev).scan()
    assert len(scan.transactions) == 1 and scan.damage


def test_journal_one_damaged_commit_copy_is_a_warning():
    dev = MemoryDevice(4 << 20)
    j = _journal(dev)
    j.commit(_tx(1, [200]))
    for k in (0, 1):
        d = MemoryDevice(dev.size, bytes(dev.data))
        off = (J_START + 2) * BLOCK_SIZE + k * 2048 + 60
        d.pwrite(bytes([d.pread(1, off)[0] ^ 1]), off)
        scan = _journal(d).scan()
        assert len(scan.transactions) == 1 and not scan.damage
        assert [w.block for w in scan.warnings] == [J_START + 2]
        assert _journal(d).replay() == (State(1001, 1, 1), 1)


def test_journal_limit_both_commit_copies_of_the_last_transaction():
    """The documented limit: both copies of the last transaction's commit record
    damaged, nothing after it: it reads as a commit that never happened."""
    dev = MemoryDevice(4 << 20)
    j = _journal(dev)
    j.commit(_tx(1, [200]))
    off = (J_START + 2) * BLOCK_SIZE
    dev.pwrite(bytes(BLOCK_SIZE), off)
    assert _journal(dev).replay() == (None, 0)


def test_journal_multi_record_transaction():
    n = 2 * JD_MAX + 7  # three records
    homes = list(range(1300, 1300 + n))  # past the journal's 1200 slots
    dev = MemoryDevice(16 << 20)
    j = _journal(dev, size=1200)
    tx = _tx(1, homes)
    assert tx.journal_blocks == n + 4
    j.commit(tx)
    assert j.head == n + 4
    # Only the last descriptor is flagged final.
    finals = []
    for k in range(3):
        pos = k * (JD_MAX + 1)
        buf = dev.pread(BLOCK_SIZE, (J_START + pos) * BLOCK_SIZE)
        check_header(buf, T_JOURNAL, J_START + pos, UUID, 1)
        targets, final, _ = decode_descriptor(buf)
        finals.append(final)
        assert targets == homes[k * JD_MAX:(k + 1) * JD_MAX]
    assert finals == [False, False, True]
    image_dev = MemoryDevice(dev.size, bytes(dev.data))
    assert _journal(image_dev, size=1200).replay() == (tx.state, 1)
    assert all(_home(image_dev, h) == _image(h, 1, 0) for h in homes)
    # Committed, a lost block of any record is damage naming it.
    for lost in (2 * JD_MAX + 2, 2 * JD_MAX + 2 + 5, JD_MAX + 1):
        torn = MemoryDevice(dev.size, bytes(dev.data))
        torn.pwrite(bytes(BLOCK_SIZE), (J_START + lost) * BLOCK_SIZE)
        with pytest.raises(CorruptMetadata) as e:
            _journal(torn, size=1200).replay()
        assert e.value.block == J_START + lost
        assert all(_home(torn, h) == bytes(BLOCK_SIZE) for h in homes)


def test_journal_wraps_around():
    size = 16
    dev = MemoryDevice(4 << 20)
    j = _journal(dev, size=size)
    expected: dict[int, bytes] = {}
    tail_seq = 1
    # Fill, checkpoint, and go round the ring; each transaction takes 7 slots, so
    # transactions straddle the end of the ring.
    for seq in range(1, 8):
        homes = [500 + seq, 600 + seq, 700, 800 + seq % 3, 900]
        tx = _tx(seq, homes, tag=seq)
        if not j.room_for(tx):
            j.fully_checkpointed()
            expected.clear()
            tail_seq = seq
        j.commit(tx)
        for h, img in tx.images:
            expected[h] = img
    assert j.head > size and j.tail % size + (j.head - j.tail) > size, "no wrap to test"
    fresh = MemoryDevice(dev.size, bytes(dev.data))
    r = Journal(fresh, UUID, J_START, size, j.tail, tail_seq)
    state, applied = r.replay()
    assert applied == 7 - tail_seq + 1 and state == State(1007, 1, 7)
    for h, img in expected.items():
        assert _home(fresh, h) == img
    # The slots past the head hold transactions of an earlier lap: never replayed.
    assert r.head == j.head and r.next_seq == 8


def test_journal_never_overwrites_the_older_superblock_slots_window():
    """After one checkpoint the older superblock slot still replays from the previous
    tail: room is counted from there, so that window stays intact."""
    j = _journal(MemoryDevice(4 << 20), size=16)
    j.commit(_tx(1, [100, 101, 102, 103, 104]))  # 7 slots
    j.checkpointed()  # tail 7, older tail 0
    assert not j.room_for(_tx(2, range(200, 208)))  # 10 slots: would reach slot 16 = 0
    assert j.room_for(_tx(2, range(200, 205)))  # 7 slots: up to 13
    j.checkpointed()
    assert j.room_for(_tx(2, range(200, 208)))


def test_journal_stale_lap_and_foreign_blocks_are_not_replayed():
    dev = MemoryDevice(4 << 20)
    j = _journal(dev, size=8)
    j.commit(_tx(1, [100, 101, 102]))  # slots 0..4
    j.fully_checkpointed()
    j.commit(_tx(2, [103]))  # slots 5..7
    j.fully_checkpointed()
    j.commit(_tx(3, [104, 105]))  # slots 0..3 (wraps over transaction 1)
    # Replay from transaction 3: transaction 1's leftover in slot 4 is stale.
    replayed = MemoryDevice(dev.size, bytes(dev.data))
    state, applied = _journal(replayed, tail=8, seq=3, size=8).replay()
    assert applied == 1 and state is not None and state.root == 1003
    # A journal of another store (same place, other UUID) replays nothing.
    other = MemoryDevice(dev.size, bytes(dev.data))
    assert _journal(other, tail=8, seq=3, size=8, uuid=OTHER_UUID).replay() == (None, 0)


def test_journal_refuses_oversized_and_out_of_order_transactions():
    dev = MemoryDevice(4 << 20)
    j = _journal(dev, size=8)
    with pytest.raises(JournalError):
        j.append(_tx(1, range(100, 107)))
    with pytest.raises(JournalError):
        j.append(_tx(2, [100]))
    j.commit(_tx(1, [100]))
    assert _journal(dev, size=8).replay()[1] == 1


# ---------------------------------------------------------------------------------------
# Superblocks, NotAStore

def _small_store(dev, origin_path="o", **kw):
    kw.setdefault("chunk_size", 4096)
    kw.setdefault("max_snapshots", 64)
    return SharedStore.create(dev, origin_size=256 << 10, origin_path=origin_path, **kw)


def _populate(store, origin):
    svc = LocalService(store, origin)
    o = Origin(svc, svc.data)
    o.write(0, b"A" * 20000)
    snap = svc.create_snapshot("s1")
    o.write(5000, b"B" * 30000)
    Snapshot(svc, svc.data, snap).write(100, b"C" * 5000)
    return svc


def _expected_views(svc, size: int = 64 << 10):
    views = {"origin": Origin(svc, svc.data).read(0, size)}
    for info in svc.snapshots():
        views[info.name] = Snapshot(svc, svc.data, info).read(0, size)
    return views


@pytest.mark.parametrize("where", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("new_first", [True, False])
def test_torn_newest_superblock_falls_back_to_older(where, new_first):
    """The last superblock write lands only in part: a prefix (or suffix) of it is new,
    the rest is what that slot held before.  Open must use the older slot."""
    dev = MemoryDevice(2 << 20)
    origin = MemoryDevice(256 << 10)
    store = _small_store(dev, origin_path="/dev/disk/by-id/" + "x" * 1000)
    svc = _populate(store, origin)
    views = _expected_views(svc)
    before_close = bytes(dev.data)
    svc.close()
    gen = store.sb.generation
    slot = gen % 2
    new = dev.pread(BLOCK_SIZE, slot * BLOCK_SIZE)
    old = before_close[slot * BLOCK_SIZE:(slot + 1) * BLOCK_SIZE]
    differ = [i for i in range(BLOCK_SIZE) if new[i] != old[i]]
    # Everything that changes between generations lies in the first sector, so a
    # sector-atomic device cannot tear a superblock; a finer tear must still be caught.
    assert differ and differ[-1] < 512
    cut = differ[0] + 1 + int(where * (differ[-1] - differ[0] - 1))
    torn_block = new[:cut] + old[cut:] if new_first else old[:cut] + new[cut:]
    torn = MemoryDevice(dev.size, bytes(dev.data))
    torn.pwrite(torn_block, slot * BLOCK_SIZE)
    assert read_superblock(torn).generation == gen - 1
    store2 = SharedStore.open(torn)
    assert store2.check() == []
    svc2 = LocalService(store2, origin)
    assert _expected_views(svc2) == views


def test_both_slots_valid_after_create_and_newest_wins():
    dev = MemoryDevice(2 << 20)
    store = _small_store(dev)
    g = store.sb.generation
    a = Superblock.decode(dev.pread(BLOCK_SIZE, 0), 0)
    b = Superblock.decode(dev.pread(BLOCK_SIZE, BLOCK_SIZE), 1)
    assert {a.generation, b.generation} == {g, g - 1}
    assert read_superblock(dev).generation == g
    # Both slots damaged: the store is corrupt, not "not a store".
    for slot in (0, 1):
        dev.data[slot * BLOCK_SIZE + 100] ^= 0xFF
    with pytest.raises(CorruptMetadata):
        SharedStore.open(dev)


def test_open_replays_the_journal_without_a_clean_close():
    dev = MemoryDevice(2 << 20)
    origin = MemoryDevice(256 << 10)
    svc = _populate(_small_store(dev), origin)
    views = _expected_views(svc)
    # No close: the image is whatever the last commit left (journal not checkpointed).
    image = MemoryDevice(dev.size, bytes(dev.data))
    store2 = SharedStore.open(image)
    assert not read_superblock(image).clean
    assert store2.check() == []
    assert _expected_views(LocalService(store2, origin)) == views


def test_clean_close_is_recorded():
    dev = MemoryDevice(2 << 20)
    store = _small_store(dev)
    store.close()
    assert read_superblock(dev).clean
    SharedStore.open(dev)
    assert not read_superblock(dev).clean  # in use again


@pytest.mark.parametrize("content", ["zero", "garbage", "tiny"])
def test_opening_a_non_store_raises_not_a_store(tmp_path, content):
    path = tmp_path / "thing.img"
    if content == "zero":
        path.write_bytes(bytes(1 << 20))
    elif content == "garbage":
        path.write_bytes(random.Random(5).randbytes(1 << 20))
    else:
        path.write_bytes(b"DDSN")
    dev = FileDevice(str(path))
    try:
        with pytest.raises(NotAStore) as e:
            SharedStore.open(dev)
        assert str(path) in str(e.value)
    finally:
        dev.close()


@pytest.mark.parametrize("seed", range(5))
def test_opening_random_memory_garbage_raises_not_a_store(seed):
    dev = MemoryDevice(256 << 10, random.Random(seed).randbytes(256 << 10))
    with pytest.raises(NotAStore):
        SharedStore.open(dev)


# ---------------------------------------------------------------------------------------
# Damaged tree blocks: reads refuse them, check() names them

TREE_ORIGIN = 2 << 20  # 512 chunks of 4 KiB: more copy-outs than three leaves hold


def _tree_store():
    """A closed store whose tree is one index node over at least four leaves: snapshot
    ``s`` of a random origin, then a copy-out of every origin chunk.  Returns
    ``(dev, origin, views, snap)``, ``views`` every volume's whole content."""
    dev = MemoryDevice(8 << 20)
    origin = MemoryDevice(TREE_ORIGIN)
    store = SharedStore.create(dev, origin_size=TREE_ORIGIN, chunk_size=4096)
    svc = LocalService(store, origin)
    o = Origin(svc, svc.data)
    o.write(0, random.Random(3).randbytes(TREE_ORIGIN))
    snap = svc.create_snapshot("s")
    for c in range(TREE_ORIGIN // 4096):
        o.write(c * 4096 + 10, b"new")
    assert store.state.levels == 1
    assert len(_leaf_blocks(store)) >= 4
    views = _expected_views(svc, TREE_ORIGIN)
    svc.close()
    return dev, origin, views, snap


def _leaf_blocks(store) -> list[int]:
    return store.node(store.state.root).children


def _copy(dev: MemoryDevice) -> MemoryDevice:
    return MemoryDevice(dev.size, bytes(dev.data))


def _inspect_findings(dev: MemoryDevice):
    """What ``ddsnap check`` finds on an unserved store: an inspection open (which
    writes nothing) and its check."""
    return SharedStore.open(_copy(dev), mode="inspect").check()


LEAF_DAMAGE = ["payload", "magic", "uuid", "other-leaf", "node-image", "bad-count",
               "huge-count", "key-order"]


@pytest.mark.parametrize("kind", LEAF_DAMAGE)
def test_corrupt_leaf_fails_reads_and_check_names_it(kind):
    dev, origin, views, snap = _tree_store()
    store = SharedStore.open(_copy(dev))
    leaves = _leaf_blocks(store)
    victim = leaves[1]
    lo = store.node(store.state.root).keys[1]
    owner, chunk, tag = unpack_key(lo)
    assert (owner, tag) == (0, snap.id)  # the first copy-out the victim holds
    image = _copy(dev)
    off = victim * BLOCK_SIZE
    buf = bytearray(image.pread(BLOCK_SIZE, off))
    if kind == "payload":
        buf[BLOCK_SIZE - 3] ^= 0x04  # past the records: only the crc can tell
    elif kind == "magic":
        buf[1] ^= 0x20
    elif kind == "uuid":
        buf[40] ^= 0x01
        _reseal_keep_crc_valid(buf)
    elif kind == "other-leaf":
        buf = bytearray(image.pread(BLOCK_SIZE, leaves[2] * BLOCK_SIZE))
    elif kind == "node-image":
        buf = seal(Node([lo], [leaves[0]]).encode(), T_NODE, victim, 1, store.uuid)
    elif kind in ("bad-count", "huge-count"):
        struct.pack_into("<I", buf, HEADER_SIZE, LEAF_MAX + 1 if kind == "bad-count" else U32)
        _reseal_keep_crc_valid(buf)
    elif kind == "key-order":
        first = bytes(buf[56:80])
        buf[56:80] = buf[80:104]
        buf[80:104] = first
        _reseal_keep_crc_valid(buf)
    image.pwrite(buf, off)

    # ddsnap check (nothing written) names the leaf, and only it.
    fatal = [f for f in _inspect_findings(image) if f.severity == "fatal"]
    assert fatal and all(f.block == victim for f in fatal), fatal
    store2 = SharedStore.open(image)  # the root is fine: open succeeds
    findings = store2.check()
    fatal = [f for f in findings if f.severity == "fatal"]
    assert fatal and all(f.block == victim for f in fatal), findings
    svc = LocalService(store2, origin)
    # Reads and writes that need the damaged leaf refuse, naming it...
    with pytest.raises(CorruptMetadata) as e:
        Snapshot(svc, svc.data, snap).read(chunk * 4096, 4096)
    assert e.value.block == victim
    before = origin.pread(4096, chunk * 4096)
    with pytest.raises(CorruptMetadata) as e:
        Origin(svc, svc.data).write(chunk * 4096, b"x" * 4096)
    assert e.value.block == victim
    assert origin.pread(4096, chunk * 4096) == before, "origin written despite unknown sharing"
    # ...while the parts of the tree that are intact still serve.
    assert Snapshot(svc, svc.data, snap).read(0, 4096) == views["s"][:4096]
    end = TREE_ORIGIN - 4096
    assert Snapshot(svc, svc.data, snap).read(end, 4096) == views["s"][end:]




@pytest.mark.parametrize("which", ["root", "last-leaf"])
def test_check_reports_damage_on_the_path_to_the_last_leaf(which):
    """Damage anywhere in the tree is a finding naming the block: check's walk catches
    it for every block, the root and the last leaf included."""
    dev, _origin, _views, _snap = _tree_store()
    store = SharedStore.open(_copy(dev), mode="inspect")
    block = store.state.root if which == "root" else _leaf_blocks(store)[-1]
    image = _copy(dev)
    image.data[block * BLOCK_SIZE + 2000] ^= 0x08
    fatal = [f for f in _inspect_findings(image) if f.severity == "fatal"]
    assert fatal and all(f.block == block for f in fatal), fatal




@pytest.mark.parametrize("mode", ["rw", "degraded"])
def test_a_damaged_leaf_does_not_hide_a_snapshots_writes_elsewhere(mode):
    """A snapshot's own write lives in an intact leaf while another leaf is damaged:
    reading it returns what the snapshot wrote or fails, never other bytes."""
    dev = MemoryDevice(8 << 20)
    origin = MemoryDevice(TREE_ORIGIN)
    svc = LocalService(SharedStore.create(dev, TREE_ORIGIN, "o", 4096), origin)
    snap = svc.create_snapshot("s")
    for c in range(200):  # 200 copy-outs: two leaves of the origin's exceptions
        Origin(svc, svc.data).write(c * 4096, b"o" * 4096)
    Snapshot(svc, svc.data, snap).write(400 * 4096, b"s" * 4096)  # its own data, in the last leaf
    svc.close()
    store = svc.store
    first, last = _leaf_blocks(store)[0], _leaf_blocks(store)[-1]
    assert first != last
    assert (snap.id, 400, INF) in {(o, c, t) for o, c, t, _sc in store.exceptions()}
    dev.data[first * BLOCK_SIZE + 4000] ^= 0x01  # chunks 0.. of the origin's copy-outs
    svc2 = LocalService(SharedStore.open(dev, mode=mode), origin)
    try:
        got = Snapshot(svc2, svc2.data, snap).read(400 * 4096, 4096)
    except CorruptMetadata:
        return
    assert got == b"s" * 4096, f"served {got[:8]!r}... instead of the snapshot's write"


def test_corrupt_root_refuses_open():
    dev, origin, views, snap = _tree_store()
    store = SharedStore.open(_copy(dev))
    root = store.state.root
    image = _copy(dev)
    image.data[root * BLOCK_SIZE + 200] ^= 1
    with pytest.raises(CorruptMetadata) as e:
        SharedStore.open(image)
    assert e.value.block == root


def test_bitmap_or_table_damage_refuses_open():
    dev, origin, views, snap = _tree_store()
    store = SharedStore.open(_copy(dev))
    for block in (store.sb.snaptable_start, store.sb.bitmap_start):
        image = _copy(dev)
        image.data[block * BLOCK_SIZE + 3000] ^= 0x80
        with pytest.raises(CorruptMetadata) as e:
            SharedStore.open(image)
        assert e.value.block == block
        fatal = [f for f in _inspect_findings(image) if f.severity == "fatal"]
        assert [f.block for f in fatal] == [block], fatal


def test_check_reports_bitmap_disagreement_and_leaks():
    dev, origin, views, snap = _tree_store()
    store = SharedStore.open(_copy(dev))
    assert store.check() == []
    leaf = _leaf_blocks(store)[0]
    # A referenced leaf marked free in the bitmap is fatal and names the leaf.
    store.bitmap.set_bit(leaf, False)
    fatal = [f for f in store.check() if f.severity == "fatal"]
    assert [f.block for f in fatal] == [leaf]
    store.bitmap.set_bit(leaf, True)
    # An allocated chunk nothing references is a leak: a warning, not fatal.
    c = store.allocate_chunk()
    findings = store.check()
    assert [f.severity for f in findings] == ["warning"]
    assert findings[0].block == c * store.bpc


def test_check_reports_a_data_chunk_that_overlaps_the_tree():
    """Invariant 5: a store chunk that is also a tree block is allocated twice."""
    store = SharedStore.create(MemoryDevice(2 << 20), origin_size=1 << 20, chunk_size=4096)
    a = store.create_snapshot("a")
    root = store.state.root
    store.add_origin_exception(3, root, a.id)  # bypasses the allocator
    store.commit()
    fatal = [f for f in store.check() if f.severity == "fatal"]
    assert fatal and any(f.block == root for f in fatal), fatal


def test_check_reports_one_store_chunk_behind_two_exceptions():
    store = SharedStore.create(MemoryDevice(2 << 20), origin_size=1 << 20, chunk_size=4096)
    a = store.create_snapshot("a")
    b = store.create_snapshot("b")
    sc = store.allocate_chunk()
    store.add_origin_exception(3, store.allocate_chunk(), a.id)
    store.add_origin_exception(5, sc, a.id)
    store.add_origin_exception(5, sc, b.id)  # the same data chunk again
    store.commit()
    assert store.check_entries()  # the rules of versioned exceptions see it too
    leaf = _leaf_blocks(store)[0]
    fatal = [f for f in store.check() if f.severity == "fatal"]
    named = [f for f in fatal if f.block == leaf]
    assert named and all(f"store chunk {sc}" in f.message for f in fatal), fatal


@pytest.mark.parametrize("what", ["future-tag", "unknown-owner", "origin-current",
                                  "past-origin-end", "chunk-out-of-range"])
def test_check_reports_exceptions_that_break_the_versioned_rules(what):
    """Invariant 6: every exception is owned by a version in the table and tagged with
    a version that existed; only snapshots have current data; and the block-level
    rules: its chunk lies within the origin, its data within the store."""
    store = SharedStore.create(MemoryDevice(2 << 20), origin_size=1 << 20, chunk_size=4096)
    a = store.create_snapshot("a")
    sc = store.allocate_chunk()
    key, phrase = {
        "future-tag": (pack_key(0, 3, a.id + 1), "tag names no version yet"),
        "unknown-owner": (pack_key(a.id + 7, 3, INF), f"version {a.id + 7} is not in"),
        "origin-current": (pack_key(0, 3, INF), "the origin has no current entries"),
        "past-origin-end": (pack_key(0, 256, a.id), "past the end of the origin"),
        "chunk-out-of-range": (pack_key(0, 3, a.id), "out of range"),
    }[what]
    if what == "chunk-out-of-range":
        sc = store.sb.chunks + 5
    store.raw_put(key, sc)  # the B-tree alone: what a damaged leaf could hold
    store.commit()
    fatal = [f for f in store.check() if f.severity == "fatal"]
    assert any(phrase in f.message for f in fatal), fatal
    # A clean store has none of these.
    store.raw_delete(key)
    store.commit()
    assert not [f for f in store.check() if f.severity == "fatal" and phrase in f.message]


# ---------------------------------------------------------------------------------------
# The snapshot table's chain of blocks

SNAP_ORIGIN = 256 << 10  # 64 chunks


def _chain_store(n: int, own_writes: bool = False):
    """A store with ``n`` snapshots, served (not closed): each snapshot is followed by
    an origin write, so each has a copy-out tagged with its id; with ``own_writes``
    each snapshot also writes the chunk the next origin write copies out (so the tree
    holds entries owned by snapshots).  Returns ``(dev, origin, svc, want)``, ``want``
    each volume's whole content."""
    dev = MemoryDevice(4 << 20)
    origin = MemoryDevice(SNAP_ORIGIN, random.Random(n).randbytes(SNAP_ORIGIN))
    svc = LocalService(SharedStore.create(dev, origin_size=SNAP_ORIGIN, origin_path="o",
                                             chunk_size=4096), origin)
    want = {}
    for i in range(n):
        info = svc.create_snapshot(f"s{i:02d}")
        want[info.name] = origin.pread(SNAP_ORIGIN, 0)
        c = i % 64
        if own_writes:
            data = bytes([i + 1]) * 4096
            Snapshot(svc, svc.data, info).write(c * 4096, data)
            want[info.name] = want[info.name][:c * 4096] + data + want[info.name][(c + 1) * 4096:]
        Origin(svc, svc.data).write(c * 4096, bytes([0x80 | i]) * 4096)
    want["origin"] = origin.pread(SNAP_ORIGIN, 0)
    return dev, origin, svc, want


def _read_all(svc, want) -> None:
    for name, content in want.items():
        vol = (Origin(svc, svc.data) if name == "origin"
               else Snapshot(svc, svc.data, svc.snapshot(name)))
        assert vol.read(0, SNAP_ORIGIN) == content, name


def _chain_on_disk(dev, store) -> tuple[list[int], list[SnapSlot]]:
    """Follow the table's chain in ``dev``'s home blocks, checking every block."""
    blocks, slots = [], []
    b = store.sb.snaptable_start
    while b:
        assert b not in blocks
        buf = dev.pread(BLOCK_SIZE, b * BLOCK_SIZE)
        check_header(buf, T_SNAPTABLE, b, store.uuid)
        part, b_next = decode_snaptable(buf, b)
        blocks.append(b)
        slots += part
        b = b_next
    return blocks, slots


def test_table_grows_a_chain_block_per_14_snapshots():
    dev, _origin, svc, _want = _chain_store(0)
    store = svc.store
    assert store.table_blocks == [store.sb.snaptable_start] == [2]
    lengths = []
    for i in range(2 * SNAPS_PER_BLOCK + 1):
        svc.create_snapshot(f"s{i}")
        lengths.append(len(store.table_blocks))
    assert lengths == [1] * 14 + [2] * 14 + [3]
    assert len(store.table.slots) == 3 * SNAPS_PER_BLOCK
    svc.commit()
    # The blocks beyond the first come from the data area and are allocated there.
    more = store.table_blocks[1:]
    assert len(set(more)) == 2
    assert all(store.data_start <= b < store.sb.blocks and store.bitmap.test(b) for b in more)
    # On disk: each block links to the next, the last to none, and they hold the slots.
    blocks, slots = _chain_on_disk(dev, store)
    assert blocks == store.table_blocks
    assert slots == store.table.slots
    assert [s.name for s in slots if s.state == fmt.SLOT_LIVE] == [f"s{i}" for i in range(29)]
    assert store.check() == []


@pytest.mark.parametrize("how", ["close", "crash"])
def test_table_chain_survives_reopen(how):
    dev, origin, svc, want = _chain_store(30, own_writes=True)
    store = svc.store
    blocks = list(store.table_blocks)
    assert len(blocks) == 3
    infos = svc.snapshots()
    if how == "close":
        svc.close()
        image = dev
    else:  # killed after its last commit: the journal has what the homes may not
        svc.commit()
        image = _copy(dev)
    store2 = SharedStore.open(image)
    assert store2.table_blocks == blocks
    assert store2.snapshots() == infos
    assert store2.check() == []
    svc2 = LocalService(store2, _copy(origin))
    _read_all(svc2, want)
    # It grows on from there, and that survives too.
    for i in range(30, 42):  # 42 slots in three blocks
        svc2.create_snapshot(f"s{i:02d}")
    assert store2.table_blocks == blocks
    svc2.create_snapshot("s42")
    assert store2.table_blocks[:3] == blocks and len(store2.table_blocks) == 4
    svc2.close()
    store3 = SharedStore.open(image)
    assert store3.table_blocks == store2.table_blocks
    assert [s.name for s in store3.snapshots()] == [f"s{i:02d}" for i in range(43)]
    assert store3.check() == []


def test_deleted_snapshots_free_their_slots_and_the_chain_keeps_its_blocks():
    dev, origin, svc, want = _chain_store(20, own_writes=True)
    store = svc.store
    blocks = list(store.table_blocks)
    for name in ("s03", "s15", "s19"):
        svc.delete_snapshot(name)
        del want[name]
    assert store.table_blocks == blocks
    gone = [store.table.slots[i] for i in (3, 15, 19)]
    assert all(s.state == fmt.SLOT_FREE for s in gone)
    # Freed slots are taken again, lowest first, before the chain would grow.
    for name in ("t1", "t2", "t3"):
        svc.create_snapshot(name)
        want[name] = origin.pread(SNAP_ORIGIN, 0)
    assert [store.table.slots[i].name for i in (3, 15, 19)] == ["t1", "t2", "t3"]
    assert store.table_blocks == blocks
    svc.close()
    store2 = SharedStore.open(dev)
    assert store2.table_blocks == blocks
    assert store2.check() == []
    _read_all(LocalService(store2, origin), want)


def test_table_growth_that_finds_the_store_full_changes_nothing():
    dev, _origin, svc, _want = _chain_store(SNAPS_PER_BLOCK)
    store = svc.store
    svc.commit()
    taken = []
    while True:
        try:
            taken.append(store.bitmap.alloc_block())
        except StoreFull:
            break
    infos = svc.snapshots()
    with pytest.raises(StoreFull):
        svc.create_snapshot("one-too-many")
    assert store.table_blocks == [2] and len(store.table.slots) == SNAPS_PER_BLOCK
    assert svc.snapshots() == infos
    for b in taken:
        store.bitmap.unalloc_block(b)
    svc.commit()
    assert store.check() == []
    svc.create_snapshot("one-too-many")
    assert len(store.table_blocks) == 2
    svc.close()
    assert SharedStore.open(dev).check() == []


def test_snapshot_limit_refusal_at_a_block_boundary_leaves_a_consistent_store():
    dev = MemoryDevice(4 << 20)
    store = SharedStore.create(dev, origin_size=SNAP_ORIGIN, chunk_size=4096,
                               max_snapshots=SNAPS_PER_BLOCK)
    for i in range(SNAPS_PER_BLOCK):
        store.create_snapshot(f"s{i}")
    from ddsnap.errors import TooManySnapshots
    with pytest.raises(TooManySnapshots):
        store.create_snapshot("over")
    store.commit()
    assert store.check() == []
    store.close()
    store2 = SharedStore.open(dev)
    assert [s.name for s in store2.snapshots()] == [f"s{i}" for i in range(SNAPS_PER_BLOCK)]
    assert store2.check() == []


@pytest.mark.parametrize("where", ["header", "slot", "next-pointer"])
def test_check_names_a_damaged_second_table_block(where):
    dev, _origin, svc, _want = _chain_store(20)
    svc.close()
    victim = svc.store.table_blocks[1]
    image = _copy(dev)
    at = {"header": 20, "slot": HEADER_SIZE + 5 * fmt.SNAP_SLOT + 40,
          "next-pointer": TABLE_NEXT_OFF + 1}[where]
    image.data[victim * BLOCK_SIZE + at] ^= 0x10
    for mode in ("rw", "degraded"):
        with pytest.raises(CorruptMetadata) as e:
            SharedStore.open(_copy(image), mode=mode)
        assert e.value.block == victim
    fatal = [f for f in _inspect_findings(image) if f.severity == "fatal"]
    assert [f.block for f in fatal] == [victim], fatal


def test_check_of_an_open_store_rereads_every_table_block():
    """check() of a served store reads the chain from the device again: damage that
    happened after the open is found in any block of it."""
    dev, _origin, svc, _want = _chain_store(30)
    svc.commit()
    store = svc.store
    assert store.check() == []
    for victim in store.table_blocks:
        good = dev.pread(BLOCK_SIZE, victim * BLOCK_SIZE)
        dev.data[victim * BLOCK_SIZE + 1000] ^= 0x01
        fatal = [f for f in store.check() if f.severity == "fatal"]
        assert [f.block for f in fatal] == [victim], fatal
        dev.pwrite(good, victim * BLOCK_SIZE)
    assert store.check() == []




@pytest.mark.parametrize("which", [0, 1])
def test_check_names_a_damaged_table_block_holding_snapshots_with_writes(which):
    """As above, where the snapshots whose slots are lost wrote to chunks that also
    have copy-outs (the tree holds their exceptions)."""
    dev, _origin, svc, _want = _chain_store(16, own_writes=True)
    svc.close()
    victim = svc.store.table_blocks[which]
    image = _copy(dev)
    image.data[victim * BLOCK_SIZE + 300] ^= 0x10
    findings = _inspect_findings(image)
    assert any(f.severity == "fatal" and f.block == victim for f in findings), findings


def _reseal_table_block(dev, store, block: int, edit) -> None:
    """Change table block ``block`` of ``dev`` with ``edit(buf)`` and re-seal it as it
    was (same sequence): only the edit is wrong."""
    buf = bytearray(dev.pread(BLOCK_SIZE, block * BLOCK_SIZE))
    seq = check_header(bytes(buf), T_SNAPTABLE, block, store.uuid)
    edit(buf)
    dev.pwrite(bytes(seal(buf, T_SNAPTABLE, block, seq, store.uuid)), block * BLOCK_SIZE)


@pytest.mark.parametrize("kind", ["next-past-end", "next-into-journal", "next-to-superblock",
                                  "next-to-first-block", "loop-to-self", "loop-back",
                                  "next-to-a-leaf", "malformed-slot"])
def test_malformed_table_chain_is_refused(kind):
    """A chain that is checksummed but wrong (a software bug, a hostile image): open
    refuses it naming the block, and never loops."""
    dev, _origin, svc, _want = _chain_store(30)
    svc.close()
    store = svc.store
    first, a, b = store.table_blocks
    leaf = _leaf_blocks(store)[0]
    holder, target, expect = {
        "next-past-end": (b, store.sb.blocks, b),
        "next-into-journal": (b, store.sb.journal_start, b),
        "next-to-superblock": (a, 1, a),
        "next-to-first-block": (a, first, a),
        "loop-to-self": (b, b, b),
        "loop-back": (b, a, b),
        "next-to-a-leaf": (a, leaf, leaf),  # not a table block: its header says so
        "malformed-slot": (a, None, a),
    }[kind]
    image = _copy(dev)
    if target is None:
        _reseal_table_block(image, store, holder, lambda buf: _slot_field(buf, 3, "state", 9))
    else:
        _reseal_table_block(image, store, holder,
                            lambda buf: struct.pack_into("<Q", buf, TABLE_NEXT_OFF, target))
    with pytest.raises(CorruptMetadata) as e:
        SharedStore.open(_copy(image))
    assert e.value.block == expect, e.value
    fatal = [f for f in _inspect_findings(image) if f.severity == "fatal"]
    assert fatal and fatal[0].block == expect, fatal


def test_truncated_store_device_is_refused(tmp_path):
    """A store file cut short would read its missing chunks as zeroes: refuse to open."""
    path = tmp_path / "store.img"
    dev = FileDevice(str(path), create_size=4 << 20)
    origin = MemoryDevice(256 << 10)
    svc = _populate(_small_store(dev), origin)
    svc.close()
    dev.close()
    os.truncate(path, (4 << 20) - 4096)
    dev = FileDevice(str(path))
    try:
        with pytest.raises(CorruptMetadata) as e:
            SharedStore.open(dev)
        assert e.value.block in (0, 1) and "bytes" in str(e.value)
    finally:
        dev.close()
    # A device larger than the store is fine (the store uses its first part).
    big = MemoryDevice((4 << 20) + 65536)
    big.pwrite(path.read_bytes(), 0)
    assert SharedStore.open(big).check() == []


@pytest.mark.parametrize("kw", [dict(chunk_size=2048), dict(chunk_size=3 * 4096),
                                dict(chunk_size=2 << 20), dict(max_snapshots=-1),
                                dict(max_snapshots=fmt.MAX_VERSION + 1),
                                dict(origin_size=0)])
def test_bad_geometry_is_refused(kw):
    args = dict(origin_size=1 << 20, chunk_size=4096, max_snapshots=64) | kw
    with pytest.raises(InvalidArgument):
        SharedStore.create(MemoryDevice(4 << 20), **args)
    if "origin_size" not in kw:
        with pytest.raises(InvalidArgument):
            MemoryStore(1 << 20, 4 << 20, args["chunk_size"], args["max_snapshots"])


@pytest.mark.parametrize("limit", [0, 1, 32, 100, 2048, fmt.MAX_VERSION])
def test_snapshot_limit_is_any_count(limit):
    """Format v3: max_snapshots is a limit (0: none), not a table size; it is recorded
    and enforced, and does not change the layout."""
    dev = MemoryDevice(4 << 20)
    store = SharedStore.create(dev, origin_size=1 << 20, chunk_size=4096, max_snapshots=limit)
    assert store.data_start == SharedStore.create(MemoryDevice(4 << 20), origin_size=1 << 20,
                                                  chunk_size=4096).data_start
    store.close()
    assert read_superblock(dev).max_snapshots == limit
    store = SharedStore.open(dev)
    n = min(limit, 3) if limit else 3
    for i in range(n):
        store.create_snapshot(f"s{i}")
    if limit and limit <= 3:
        from ddsnap.errors import TooManySnapshots
        with pytest.raises(TooManySnapshots):
            store.create_snapshot("over")


def test_store_device_too_small_is_refused():
    with pytest.raises(InvalidArgument) as e:
        SharedStore.create(MemoryDevice(1 << 20, path="small.img"), origin_size=1 << 20,
                           chunk_size=1 << 20)
    assert "small.img" in str(e.value)
