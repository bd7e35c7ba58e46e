"""Byte counts as people write them: parsing sizes (``64K``, ``1M``, ``10G``, bytes) and
showing them in messages (a human size with the exact count after it).  Binary units
throughout (1K = 1024 bytes), as ``lvcreate -L`` and ``qemu-img`` take them."""

from __future__ import annotations

from humanfriendly import InvalidSize, format_size
from humanfriendly import parse_size as _parse_size

from .errors import InvalidArgument


def parse_size(text: str, what: str = "size", positive: bool = False) -> int:
    """Bytes in ``text``: ``65536``, ``64K``, ``64KiB``, ``1.5M``, ``10G`` (binary units).

    ``what`` names the value in the error (``--chunk-size``, ``DDSNAP_MERGE_STEP=...``).

    Raises:
        InvalidArgument: ``text`` is not a size (or, with ``positive``, is zero).
    """
    try:
        n = _parse_size(text, binary=True)
    except InvalidSize:
        n = -1
    if n < 0 or (positive and n == 0):
        raise InvalidArgument(f"{what} {text!r} is not a size (try 64K, 1M, 10G)")
    return n


def human_bytes(n: int) -> str:
    """``n`` bytes for a message: ``1.19 MiB (1245184 bytes)``, or ``512 bytes`` below
    1 KiB (binary units, as the command line's sizes)."""
    return f"{format_size(n, binary=True)} ({n} bytes)" if n >= 1024 else f"{n} bytes"
