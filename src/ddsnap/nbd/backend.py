"""What the NBD server serves: the export backend interface.

The NBD server (``ddsnap.nbd.server``) knows nothing of snapshots.  It serves objects
that satisfy :class:`ExportBackend`, found by name through an :class:`ExportRegistry`.
In ddsnap the backends are the volumes (``ddsnap.volume.Origin`` / ``Snapshot``); tests
may serve any object with this shape.

All backend methods are synchronous and may block on disk: the server calls them from a
thread pool, never on the event loop -- except the optional ``read_into_nowait`` and
``write_nowait``, which must not block and are called on the event loop (see
:class:`ExportBackend`).  Offsets
and lengths are in bytes; a range is
``[offset, offset + length)`` and the server has already checked it lies inside
``[0, size)``.  Errors are raised as ``ddsnap.errors.DdsnapError`` (whose ``errno``
attribute the server maps to an NBD error) or ``OSError`` (its ``errno``).
"""

from __future__ import annotations

from typing import Protocol


class ExportBackend(Protocol):
    """One NBD-visible volume."""

    #: export name as clients ask for it ("origin" or a snapshot name)
    name: str
    #: size in bytes (a multiple of 512)
    size: int
    #: True if writes are refused (exported with NBD_FLAG_READ_ONLY)
    read_only: bool

    def read(self, offset: int, length: int) -> bytes:
        """Return exactly ``length`` bytes."""

    # Optional, used when present (ddsnap's volumes have both):
    #
    # def read_into(self, offset: int, view: memoryview) -> None:
    #     """Fill ``view`` (``len(view)`` bytes) with the bytes at ``offset``: the reply
    #     buffer, filled in place instead of returning a copy."""
    #
    # def read_into_nowait(self, offset: int, view: memoryview) -> bool:
    #     """As ``read_into``, only if it needs no wait for the disk (or a lock held
    #     long); False means "not now": the server then calls ``read_into`` from a
    #     thread.  Called on the event loop, so it must never block."""
    #
    # def write_nowait(self, offset: int, data: bytes) -> bool:
    #     """As ``write`` (no FUA), only if it needs no wait for a lock, a server or the
    #     disk (a write into the page cache); False means "not now" and nothing was
    #     written: the server then writes from a thread.  Called on the event loop."""
    #
    # def write_many(self, writes: list[tuple[int, bytes, bool]]) -> list[Exception | None]:
    #     """The ``(offset, data, fua)`` WRITEs that arrived together, in order; per
    #     write None or the exception it failed with.  Without it the server calls
    #     ``write`` for each."""

    def write(self, offset: int, data: bytes, fua: bool = False) -> None:
        """Write ``data``; with ``fua`` it is durable before this returns."""

    def flush(self) -> None:
        """Make every write that completed before this call durable."""

    def trim(self, offset: int, length: int, fua: bool = False) -> None:
        """Discard hint; must never change what any *other* volume reads."""

    def write_zeroes(self, offset: int, length: int, fua: bool = False,
                     no_hole: bool = False) -> None:
        """Make the range read as zeroes."""

    def block_status(self, offset: int, length: int) -> list[tuple[int, int]]:
        """``base:allocation`` extents covering at least the start of the range.

        Returns a non-empty list of ``(length_bytes, flags)`` with flags a combination of
        NBD_STATE_HOLE (1) and NBD_STATE_ZERO (2); the lengths sum to at most ``length``
        (a prefix of the range is a valid answer: the client asks again for the rest).
        """

    # Optional, for the ``ddsnap:changed:FROM`` metadata contexts (issue 13); an export
    # without them offers none:
    #
    # def changed_base(self, name: str) -> object | None:
    #     """The snapshot ``name`` as FROM, or None if there is none: an opaque token
    #     kept from NBD_OPT_SET_META_CONTEXT on and given back to ``changed_status``.
    #     Called on the event loop, so it must never block."""
    #
    # def changed_status(self, base: object, offset: int, length: int
    #                    ) -> list[tuple[int, int]]:
    #     """As ``block_status``, with flags NBD ``STATE_CHANGED`` (1: may differ from
    #     ``base``) or 0 (reads the same)."""

    def open(self) -> None:
        """A client connection started using this export."""

    def close(self) -> None:
        """That client connection ended (cleanly or not)."""


class ExportRegistry(Protocol):
    """The set of exports, looked up on every option request (snapshots come and go)."""

    def names(self) -> list[str]:
        """Export names in listing order."""

    def get(self, name: str) -> ExportBackend | None:
        """The export called ``name``, or None."""

    # Optional: the names NBD_OPT_LIST_META_CONTEXT offers as FROM in
    # ``ddsnap:changed:FROM`` (without it, none):
    #
    # def snapshot_names(self) -> list[str]:
    #     """Every live snapshot's name, oldest first; must not block on disk."""

    @property
    def default_name(self) -> str:
        """The export a client gets when it asks for the empty name."""
