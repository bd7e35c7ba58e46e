"""How byte counts are written in messages: a human size with the exact count after it."""

from __future__ import annotations

from humanfriendly import format_size


def human_bytes(n: int) -> str:
    """``n`` bytes for a message: ``1.19 MiB (1245184 bytes)``, or ``512 bytes`` below
    1 KiB (binary units, as the command line's sizes)."""
    return f"{format_size(n, binary=True)} ({n} bytes)" if n >= 1024 else f"{n} bytes"
