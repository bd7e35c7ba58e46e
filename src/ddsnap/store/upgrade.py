"""``ddsnap upgrade``: convert a format-v1 store (ddsnap 0.1) to format v2, in place.

The two formats lay out every block the same way; v2 adds the journal's commit block,
the superblock's origin identity and auto-deleted records (both empty after an upgrade)
and new version numbers.  So the upgrade is: recover the v1 journal if the store was not
shut down cleanly (v1's rule: a transaction counts when every block through its FINAL
descriptor checks out), re-seal every reachable metadata block with version 2 (the
snapshot table, the bitmap, every index node and leaf), flush, then write both superblock
slots as v2, one after the other with a flush between.

A crash at any point leaves a store that a second ``ddsnap upgrade`` finishes: blocks
already re-sealed are accepted as v2, and once one superblock slot is v2 the store opens
as v2 (the other slot is reported stale-or-damaged and rewritten by the next open).
"""

from __future__ import annotations

from ..errors import CorruptMetadata, DdsnapError
from .blockdev import BlockDevice
from .format import (BLOCK_SIZE, HEADER, MAGIC, T_BITMAP, T_JOURNAL, T_LEAF, T_NODE,
                     T_SNAPTABLE, VERSION, VERSION_V1, Node, Superblock,
                     check_header, decode_descriptor, header_version, peek_header, seal)


def _read_v1_superblock(dev: BlockDevice) -> Superblock:
    found = []
    for slot in (0, 1):
        buf = dev.pread(BLOCK_SIZE, slot * BLOCK_SIZE)
        for version in (VERSION_V1, VERSION):
            try:
                sb = Superblock.decode(buf, slot, version=version)
            except CorruptMetadata:
                continue
            found.append((sb.generation, version, sb))
    if not found:
        raise CorruptMetadata(0, "no valid v1 superblock to upgrade")
    _gen, version, sb = max(found, key=lambda t: t[0])
    if version == VERSION:
        raise DdsnapError(f"{dev.path} is already format v{VERSION}")
    return sb


def _replay_v1(dev: BlockDevice, sb: Superblock) -> tuple[int, int]:
    """Apply the v1 journal's complete transactions to their homes (v1's rule);
    returns the journal head and the next sequence."""
    size, start, uuid = sb.journal_blocks, sb.journal_start, sb.uuid
    pos, seq = sb.journal_tail, sb.journal_seq

    def read(p: int) -> tuple[int, bytes]:
        b = start + p % size
        return b, dev.pread(BLOCK_SIZE, b * BLOCK_SIZE)

    while True:
        images, p, done = [], pos, False
        while p - pos < size:
            dblock, buf = read(p)
            try:
                check_header(buf, T_JOURNAL, dblock, uuid, seq, version=VERSION_V1)
                targets, final, state = decode_descriptor(buf)
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
                sb.state = state
                break
        if not done:
            return pos, seq
        for t, img in images:
            dev.pwrite(img, t * BLOCK_SIZE)
        pos, seq = p, seq + 1


def _reseal(dev: BlockDevice, block: int, kind: int, uuid: bytes) -> bytes:
    """Re-seal ``block`` (a v1 or already-v2 block of ``kind``) as v2; return it."""
    buf = dev.pread(BLOCK_SIZE, block * BLOCK_SIZE)
    if header_version(buf) == VERSION:
        check_header(buf, kind, block, uuid)
        return buf
    check_header(buf, kind, block, uuid, version=VERSION_V1)
    seq = HEADER.unpack_from(buf, 0)[6]
    out = seal(bytearray(buf), kind, block, seq, uuid)
    dev.pwrite(out, block * BLOCK_SIZE)
    return bytes(out)


def upgrade_store(dev: BlockDevice) -> int:
    """Convert the v1 store on ``dev`` to format v2; returns the blocks re-sealed.

    Raises:
        NotAStore: no ddsnap superblock.
        CorruptMetadata: a v1 block fails its checks (naming it); nothing was changed
            that a second run would not redo.
        DdsnapError: the store is already v2.
    """
    first = dev.pread(4, 0)
    second = dev.pread(4, BLOCK_SIZE)
    if first != MAGIC and second != MAGIC:
        from ..errors import NotAStore
        raise NotAStore(dev.path)
    sb = _read_v1_superblock(dev)
    uuid = sb.uuid
    head, seq = sb.journal_tail, sb.journal_seq
    if not sb.clean:
        head, seq = _replay_v1(dev, sb)
        dev.flush()
    n = 0
    for i in range(sb.snaptable_blocks):
        _reseal(dev, sb.snaptable_start + i, T_SNAPTABLE, uuid)
        n += 1
    for i in range(sb.bitmap_blocks):
        _reseal(dev, sb.bitmap_start + i, T_BITMAP, uuid)
        n += 1

    def walk(block: int, level: int) -> None:
        nonlocal n
        leaf = level == sb.state.levels
        buf = _reseal(dev, block, T_LEAF if leaf else T_NODE, uuid)
        n += 1
        if not leaf:
            for child in Node.decode(buf, block).children:
                walk(child, level + 1)

    walk(sb.state.root, 0)
    dev.flush()
    sb.journal_tail, sb.journal_seq = head, seq
    sb.clean = False  # the next open checkpoints (and records the origin identity)
    for _ in range(2):
        sb.generation += 1
        dev.pwrite(sb.encode(), sb.slot * BLOCK_SIZE)
        dev.flush()
    return n


__all__ = ["upgrade_store"]
