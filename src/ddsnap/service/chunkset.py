"""A set of logical chunk numbers as a bitmap that grows on demand: what a data path may
write without asking (origin-write grants, issue 11).

One bit per chunk, so a 1 TiB origin of 4 KiB chunks costs 32 MiB at most, and only as
far as the highest chunk added.  Ranges are inclusive ``first..last``.  Not thread-safe:
the owner holds its own lock.
"""

from __future__ import annotations

_FULL = 0xFF


class ChunkSet:
    """Chunks added since the last :meth:`clear`."""

    __slots__ = ("_bits",)

    def __init__(self) -> None:
        self._bits = bytearray()

    def add(self, first: int, last: int) -> None:
        """Add chunks ``first..last``."""
        bits = self._bits
        need = (last >> 3) + 1
        if need > len(bits):
            bits.extend(bytes(need - len(bits)))
        c = first
        while c <= last and c & 7:  # the bits before the first whole byte
            bits[c >> 3] |= 1 << (c & 7)
            c += 1
        whole = (last + 1 - c) >> 3
        if whole:
            bits[c >> 3:(c >> 3) + whole] = bytes([_FULL]) * whole
            c += whole << 3
        while c <= last:
            bits[c >> 3] |= 1 << (c & 7)
            c += 1

    def has(self, first: int, last: int) -> bool:
        """True if every chunk of ``first..last`` is in the set."""
        bits = self._bits
        if (last >> 3) >= len(bits):
            return False
        if first == last:  # the common case: a write inside one chunk
            return bool(bits[first >> 3] >> (first & 7) & 1)
        c = first
        while c <= last and c & 7:
            if not bits[c >> 3] >> (c & 7) & 1:
                return False
            c += 1
        whole = (last + 1 - c) >> 3
        if whole:
            lo = c >> 3
            if bits.count(_FULL, lo, lo + whole) != whole:
                return False
            c += whole << 3
        while c <= last:
            if not bits[c >> 3] >> (c & 7) & 1:
                return False
            c += 1
        return True

    def clear(self) -> None:
        """Empty the set (and give its memory back)."""
        self._bits = bytearray()

    def __len__(self) -> int:
        """How many chunks are in the set (counts every bit: for status, not hot paths)."""
        return int.from_bytes(self._bits, "little").bit_count()
