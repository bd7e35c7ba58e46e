"""Growing and shrinking the snapshot store (``ddsnap resize STORE --store-size``).

The allocation bitmap has one bit per 4 KiB block, so a store of another size needs
another number of bitmap blocks.  The bitmap is one run of blocks named by the
superblock (``bitmap_start``, ``bitmap_blocks``).  A resize writes the whole new bitmap
to a run of blocks that holds nothing (never over the live bitmap), makes it durable,
and then switches both superblock slots to the new geometry: a crash before the switch
leaves the old store as it was (the new run was free space), a crash after it leaves
the new one.  The first run (after the first snapshot table block, before the journal)
is used again whenever the bitmap fits there and does not live there now; otherwise the
new run is taken from the data area, where ``check`` counts it as in use.

The caller (``MetadataService.resize_store``) holds the metadata lock with every change
committed and checkpointed, so the bitmap in memory is the bitmap on disk and no
journal transaction remains to be replayed onto the old geometry.

Shrinking refuses (:class:`~ddsnap.errors.ShrinkRefused`) when a block past the new end
holds anything but the old bitmap, naming what: exception data (by snapshot) or metadata
(B-tree, snapshot table).  Nothing is moved to make room, as ``lvreduce`` does not move
extents (``pvmove`` is a separate step).

Sources: seed 000 (csnap.c ``init_allocation``: the bitmap covers the whole store);
docs/format.md "Resizing".
"""

from __future__ import annotations

import re

from ..errors import InvalidArgument, ShrinkRefused, StoreFull
from ..units import human_bytes
from .alloc import Bitmap
from .format import (
    BITMAP_BYTES,
    BITS_PER_BITMAP,
    BLOCK_SIZE,
    HEADER_SIZE,
    INF,
    T_BITMAP,
    seal,
)


def resize_shared_store(store, size: int) -> int:
    """Make ``store`` (a :class:`~ddsnap.store.shared.SharedStore`) ``size`` bytes,
    rounded down to whole chunks (at least ``store.min_size``); return the new size in
    bytes.  A file is extended before the switch and truncated after it; a block device
    must already hold the new size.

    Raises:
        InvalidArgument: too small for the metadata, or a block device smaller than
            ``size``.
        ShrinkRefused: something lives past the new end (named).
        StoreFull: no free run of blocks for the new bitmap.
        OSError: the host failed a write, a flush or the truncate (nothing switched).
    """
    sb = store.sb
    bpc = store.bpc
    cs = store.chunk_size
    new_blocks = size // cs * bpc
    old_blocks = sb.blocks
    data_start = store.data_start
    if new_blocks == old_blocks:
        return old_blocks * BLOCK_SIZE
    if new_blocks * BLOCK_SIZE < store.min_size:
        raise InvalidArgument(f"a store of {human_bytes(size)} is too small for its "
                              "metadata and one chunk of data")
    if store.has_uncommitted():
        raise AssertionError("resize with uncommitted changes")
    old = store.bitmap
    old_run = range(sb.bitmap_start, sb.bitmap_start + sb.bitmap_blocks)
    if new_blocks < old_blocks:
        busy = [b for b in _used(old, new_blocks, old_blocks) if b not in old_run]
        if busy:
            raise ShrinkRefused(f"cannot shrink the store to {human_bytes(size)}: "
                                f"{_describe(store, busy, new_blocks)} past the new end. "
                                "Delete the snapshots using it (or shrink less); nothing "
                                "was changed")
    count = -(-new_blocks // BITS_PER_BITMAP)
    bits = _resized_bits(old, old_blocks, new_blocks, count, old_run, data_start)
    home = sb.snaptable_start + sb.snaptable_blocks
    if count <= sb.journal_start - home and sb.bitmap_start != home:
        start = home
    else:
        start = _free_run(bits, old, count, data_start, new_blocks, old_run)
    for b in range(start, start + count):
        if b >= data_start:
            bits[b >> 3] |= 1 << (b & 7)
    if new_blocks > old_blocks:
        store.dev.resize(new_blocks * BLOCK_SIZE)
    seq = store.journal.next_seq
    for i in range(count):
        buf = bytearray(BLOCK_SIZE)
        buf[HEADER_SIZE:] = bits[i * BITMAP_BYTES:(i + 1) * BITMAP_BYTES]
        store.dev.pwrite(seal(buf, T_BITMAP, start + i, seq, store.uuid),
                         (start + i) * BLOCK_SIZE)
    store.dev.flush()  # the new bitmap (and a grown file's size) before the switch
    sb.blocks, sb.bitmap_start, sb.bitmap_blocks = new_blocks, start, count
    store.journal.checkpointed()
    store.write_superblock(clean=False)
    store.write_superblock(clean=False)  # both slots: neither may name the old bitmap
    if new_blocks < old_blocks:
        store.dev.resize(new_blocks * BLOCK_SIZE)
        store.dev.flush()
    fresh = Bitmap(bits, new_blocks, bpc, data_start)
    fresh.q_blocks = {b for b in old.q_blocks if b < new_blocks}
    fresh.q_chunks.update({c: n for c, n in old.q_chunks.items() if (c + 1) * bpc <= new_blocks})
    store.bitmap = fresh
    return new_blocks * BLOCK_SIZE


_NONZERO = re.compile(rb"[^\x00]")


def _used(bitmap: Bitmap, lo: int, hi: int) -> list[int]:
    """Blocks in ``[lo, hi)`` the bitmap has in use (whole free bytes skipped fast: a
    shrink of a big store looks at millions of bits)."""
    out = []
    for m in _NONZERO.finditer(bitmap.bits, lo >> 3, -(-hi // 8)):
        base = m.start() * 8
        for b in range(max(base, lo), min(base + 8, hi)):
            if bitmap.test(b):
                out.append(b)
    return out


def _resized_bits(old: Bitmap, old_blocks: int, new_blocks: int, count: int,
                  old_run: range, data_start: int) -> bytearray:
    """The bitmap bytes of a store of ``new_blocks``: the old bits below both ends, the
    old bitmap's run free again where it lay in the data area, bits past the end set."""
    bits = bytearray(count * BITMAP_BYTES)
    keep = min(old_blocks, new_blocks)
    whole = keep >> 3
    bits[:whole] = old.bits[:whole]
    for b in range(whole << 3, keep):
        if old.test(b):
            bits[b >> 3] |= 1 << (b & 7)
    for b in old_run:
        if data_start <= b < keep:
            bits[b >> 3] &= ~(1 << (b & 7)) & 0xFF
    end = count * BITS_PER_BITMAP
    b = new_blocks
    while b < end and b & 7:
        bits[b >> 3] |= 1 << (b & 7)
        b += 1
    bits[b >> 3:] = b"\xff" * (len(bits) - (b >> 3))
    return bits


def _free_run(bits: bytearray, old: Bitmap, count: int, lo: int, hi: int,
              avoid: range) -> int:
    """The first block of ``count`` free, unquarantined blocks in ``[lo, hi)`` of
    ``bits`` outside ``avoid`` (the live bitmap), byte aligned (whole zero bytes are
    found fast).

    Raises:
        StoreFull: there is none.
    """
    want = -(-count // 8)
    pat = re.compile(b"\x00{%d}" % want)
    pos = -(-lo // 8)
    while True:
        m = pat.search(bits, pos, hi >> 3)
        if m is None:
            raise StoreFull(f"no room for the new allocation bitmap: it needs {count} "
                            f"free blocks in a row ({want * 8}, as whole bitmap bytes); "
                            "delete a snapshot first, or grow the store by more")
        start = m.start() * 8
        run = range(start, start + count)
        bad = [b for b in run
               if b in avoid or b in old.q_blocks or b // old.bpc in old.q_chunks]
        if not bad:
            return start
        pos = bad[-1] // 8 + 1


def _describe(store, busy: list[int], new_blocks: int) -> str:
    """Name what the blocks ``busy`` (past ``new_blocks``) hold: exception data by the
    snapshot that reads it, B-tree and snapshot table blocks."""
    bpc = store.bpc
    chunks = {b // bpc for b in busy}
    first_chunk = new_blocks // bpc
    kinds: dict[str, list[int]] = {}
    for o, _c, t, sc in store.exceptions():
        if sc >= first_chunk and sc in chunks:
            if t != INF:  # history an owner keeps for its snapshots up to ``t``
                who = f"old data kept for snapshot {_name(store, t)}"
            else:
                who = f"data written to snapshot {_name(store, o)}"
            kinds.setdefault(who, []).append(sc)
    meta = set(busy) - {b for sc_list in kinds.values() for sc in sc_list
                        for b in range(sc * bpc, (sc + 1) * bpc)}
    table = [b for b in store.table_blocks if b in meta]
    if table:
        kinds["the snapshot table"] = [b // bpc for b in table]
        meta -= set(table)
    if meta:
        kinds["B-tree metadata"] = sorted(b // bpc for b in meta)
    parts = []
    for who, scs in kinds.items():
        scs = sorted(set(scs))
        parts.append(f"{who} ({len(scs)} chunk{'s' if len(scs) != 1 else ''}, e.g. store "
                     f"chunk {scs[0]})")
    n = len(chunks)
    return f"{n} chunk{'s' if n != 1 else ''} in use ({'; '.join(parts)})"


def _name(store, vid: int) -> str:
    try:
        name = store.table.slot(vid).name
    except KeyError:
        return f"#{vid}"
    return name or f"#{vid} (deleted, kept for its clones)"

