"""The allocation bitmap: one bit per 4 KiB store block.

Exception data takes whole, aligned chunks (``blocks_per_chunk`` bits); B-tree leaves and
index nodes take single blocks, packed together so they spoil as few chunks as possible.
The whole bitmap is held in memory (1 bit per 4 KiB: 32 MiB for a 1 TiB store) and the
4 KiB bitmap blocks it changes are journaled with the transaction.

Blocks freed by a transaction are *quarantined*: free on disk, but not handed out again
until the journal has been checkpointed.  Until then a crash could replay an older
transaction that still points at them (the revoke problem of block journals), and an
uncommitted delete could be undone by recovery while its chunks already held new data.

Source: seed 000 (csnap.c ``alloc_chunk_range``, ``free_chunk``, ``init_allocation``).
"""

from __future__ import annotations

import re
from collections import Counter

from ..errors import StoreFull
from .format import BITMAP_BYTES, BITS_PER_BITMAP

_NOT_FULL = re.compile(rb"[^\xff]")


class Bitmap:
    """Block allocation state.

    Args:
        bits: the bitmap bytes (bit ``b`` of the store is ``bits[b >> 3] >> (b & 7) & 1``),
            ``len(bits)`` a multiple of :data:`BITMAP_BYTES`.
        blocks: blocks in the store; bits at and past it are kept set.
        bpc: blocks per chunk (a power of two).
        data_start: first block exception data and metadata may use.
    """

    def __init__(self, bits: bytearray, blocks: int, bpc: int, data_start: int):
        self.bits = bits
        self.blocks = blocks
        self.bpc = bpc
        self.data_start = data_start
        self.dirty: set[int] = set()  # bitmap block indices changed since last commit
        self.q_blocks: set[int] = set()  # quarantined metadata blocks
        # chunks holding quarantined blocks, counted: one chunk can hold blocks freed by
        # different transactions, released at different checkpoints
        self.q_chunks: Counter[int] = Counter()
        # what was quarantined since the last take_new_quarantine()
        self._q_new: tuple[list[int], list[int]] = ([], [])
        self.chunk_cursor = data_start // bpc
        self.meta_cursor = data_start
        self.free_chunks = sum(1 for c in range(data_start // bpc, blocks // bpc)
                               if self._group_free(c)) if blocks // bpc < 1 << 16 else \
            self._count_free_groups()
        if bpc >= 8:
            self._group_re = re.compile(b"\x00" * (bpc // 8))

    # -- bit primitives ------------------------------------------------------------------

    def test(self, b: int) -> bool:
        return bool(self.bits[b >> 3] >> (b & 7) & 1)

    def set_bit(self, b: int, on: bool) -> None:
        """Mark block ``b`` used (``on``) or free in the bitmap alone, with no free
        counts or quarantine kept: for repair tools and damage tests."""
        self._set(b, on)

    def _set(self, b: int, on: bool) -> None:
        i = b >> 3
        if on:
            self.bits[i] |= 1 << (b & 7)
        else:
            self.bits[i] &= ~(1 << (b & 7)) & 0xFF
        self.dirty.add(b // BITS_PER_BITMAP)

    def _group_free(self, c: int) -> bool:
        bpc = self.bpc
        first = c * bpc
        if bpc >= 8:
            return not any(self.bits[first >> 3: (first + bpc) >> 3])
        byte = self.bits[first >> 3]
        mask = ((1 << bpc) - 1) << (first & 7)
        return not byte & mask

    def _count_free_groups(self) -> int:
        n = 0
        for c in range(self.data_start // self.bpc, self.blocks // self.bpc):
            if self._group_free(c):
                n += 1
        return n

    @property
    def free_blocks(self) -> int:
        used = int.from_bytes(self.bits, "little").bit_count()
        return max(0, len(self.bits) * 8 - used)

    # -- allocation ----------------------------------------------------------------------

    def alloc_chunk(self) -> int:
        """Allocate one whole chunk; return its chunk number.

        Raises:
            StoreFull: no free, unquarantined chunk.
        """
        nchunks = self.blocks // self.bpc
        first = -(-self.data_start // self.bpc)
        for lo, hi in ((self.chunk_cursor, nchunks), (first, self.chunk_cursor)):
            c = self._find_group(lo, hi)
            if c is not None:
                for b in range(c * self.bpc, (c + 1) * self.bpc):
                    self._set(b, True)
                self.free_chunks -= 1
                self.chunk_cursor = c + 1
                return c
        raise StoreFull()

    def _find_group(self, lo: int, hi: int) -> int | None:
        bpc = self.bpc
        if bpc >= 8:
            gb = bpc // 8
            pos = lo * gb
            end = hi * gb
            while pos < end:
                m = self._group_re.search(self.bits, pos, end)
                if not m:
                    return None
                p = m.start()
                if p % gb:
                    pos = p + gb - p % gb
                    continue
                c = p // gb
                if c not in self.q_chunks:
                    return c
                pos = p + gb
            return None
        # Sub-byte groups: scan for a byte that is not full, then look inside it.
        per_byte = 8 // bpc
        pos = (lo * bpc) >> 3
        end = -(-(hi * bpc) // 8)
        mask = (1 << bpc) - 1
        while pos < end:
            m = _NOT_FULL.search(self.bits, pos, end)
            if not m:
                return None
            p = m.start()
            byte = self.bits[p]
            for k in range(per_byte):
                c = p * per_byte + k
                if lo <= c < hi and not (byte >> (k * bpc)) & mask and c not in self.q_chunks:
                    return c
            pos = p + 1
        return None

    def alloc_block(self) -> int:
        """Allocate one 4 KiB metadata block; return its block number.

        Raises:
            StoreFull: no free block.
        """
        for lo, hi in ((self.meta_cursor, self.blocks), (self.data_start, self.meta_cursor)):
            pos = lo >> 3
            end = -(-hi // 8)
            while pos < end:
                m = _NOT_FULL.search(self.bits, pos, end)
                if not m:
                    break
                p = m.start()
                byte = self.bits[p]
                for k in range(8):
                    b = p * 8 + k
                    if lo <= b < hi and not byte >> k & 1 and b not in self.q_blocks:
                        c = b // self.bpc
                        if self._group_free(c):
                            self.free_chunks -= 1
                        self._set(b, True)
                        self.meta_cursor = b + 1
                        return b
                pos = p + 1
        raise StoreFull("snapshot store is full (no room for metadata)")

    def free_chunk(self, c: int) -> None:
        """Free chunk ``c`` (quarantined until the next checkpoint)."""
        for b in range(c * self.bpc, (c + 1) * self.bpc):
            self._set(b, False)
        self.free_chunks += 1
        self.q_chunks[c] += 1
        self._q_new[1].append(c)

    def free_block(self, b: int) -> None:
        """Free metadata block ``b`` (quarantined until the next checkpoint)."""
        self._set(b, False)
        c = b // self.bpc
        if self._group_free(c):
            self.free_chunks += 1
        self.q_blocks.add(b)
        self.q_chunks[c] += 1
        self._q_new[0].append(b)
        self._q_new[1].append(c)

    def unalloc_chunk(self, c: int) -> None:
        """Give back chunk ``c`` from :meth:`alloc_chunk` that nothing ever referenced.

        No transaction can point at it, so unlike :meth:`free_chunk` it is not quarantined.
        """
        for b in range(c * self.bpc, (c + 1) * self.bpc):
            self._set(b, False)
        self.free_chunks += 1

    def unalloc_block(self, b: int) -> None:
        """Give back block ``b`` from :meth:`alloc_block` that nothing ever referenced."""
        self._set(b, False)
        if self._group_free(b // self.bpc):
            self.free_chunks += 1

    def take_new_quarantine(self) -> tuple[list[int], list[int]]:
        """``(blocks, chunks)`` quarantined since the last call (a transaction's frees)."""
        new, self._q_new = self._q_new, ([], [])
        return new

    def release_quarantine(self, q_blocks, q_chunks) -> None:
        """After a checkpoint: what :meth:`take_new_quarantine` returned may be reused."""
        self.q_blocks.difference_update(q_blocks)
        for c in q_chunks:
            self.q_chunks[c] -= 1
            if self.q_chunks[c] <= 0:
                del self.q_chunks[c]

    def block_bytes(self, index: int) -> bytes:
        """The bit bytes stored in bitmap block ``index``."""
        return bytes(self.bits[index * BITMAP_BYTES:(index + 1) * BITMAP_BYTES])
