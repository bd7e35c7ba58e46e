"""What the NBD protocol object tells its transport: the events of one connection.

:meth:`ddsnap.nbd.protocol.ServerConnection.receive_data` turns client bytes into these:
:class:`ExportSelected` once the handshake ends, a :class:`Request` per valid request of
the transmission phase, and :class:`Abort` or :class:`ProtocolViolation` at the end.
They are plain data with no behaviour beyond reading their flags, kept apart from the
state machine that makes them (as h11 keeps its events apart from its connection) so
that the transport, the log and tests can name them without the parser.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ddsnap.errors import ProtocolError
from ddsnap.nbd.wire import (
    CMD_FLAG_DF,
    CMD_FLAG_FAST_ZERO,
    CMD_FLAG_FUA,
    CMD_FLAG_NO_HOLE,
    CMD_FLAG_REQ_ONE,
    Command,
)

if TYPE_CHECKING:  # pragma: no cover - typing only
    from ddsnap.nbd.backend import ExportBackend


class Event:
    """Base class of everything
    :meth:`~ddsnap.nbd.protocol.ServerConnection.receive_data` returns."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class ExportSelected(Event):
    """The handshake ended (NBD_OPT_GO acknowledged or NBD_OPT_EXPORT_NAME answered).

    The transport should call ``export.open()`` before serving the requests that follow,
    and ``export.close()`` once when the connection ends.  The reply ending the handshake
    is already queued in :meth:`~ddsnap.nbd.protocol.ServerConnection.data_to_send`.

    Attributes:
        name: canonical export name (the default export's name if the client sent "").
        export: the backend serving it.
        size: export size in bytes as told to the client.
        transmission_flags: the 16-bit NBD_FLAG_* set sent to the client.
    """

    name: str
    export: ExportBackend
    size: int
    transmission_flags: int


@dataclass(slots=True)
class Request(Event):
    """One validated transmission-phase request ("Request message").

    Only requests the transport must act on are returned: the protocol object has already
    answered invalid ones.  ``offset + length`` lies inside the export for ranged
    commands; ``data`` is the WRITE payload (``length`` bytes), else empty.

    Attributes:
        handle: the client's 64-bit cookie, echoed in the reply.
        command: the request type.
        flags: NBD_CMD_FLAG_* bits (only ones valid for this command).
        offset: byte offset into the export.
        length: length in bytes.
        data: WRITE payload.
    """

    handle: int
    command: Command
    flags: int
    offset: int
    length: int
    data: bytes = field(default=b"", repr=False)

    @property
    def cookie(self) -> int:
        """Alias of :attr:`handle` (newer spec wording)."""
        return self.handle

    @property
    def fua(self) -> bool:
        """NBD_CMD_FLAG_FUA: the reply must wait until the data is durable."""
        return bool(self.flags & CMD_FLAG_FUA)

    @property
    def no_hole(self) -> bool:
        """NBD_CMD_FLAG_NO_HOLE on WRITE_ZEROES: keep the range allocated."""
        return bool(self.flags & CMD_FLAG_NO_HOLE)

    @property
    def df(self) -> bool:
        """NBD_CMD_FLAG_DF on READ: one content chunk only (always true of ddsnap)."""
        return bool(self.flags & CMD_FLAG_DF)

    @property
    def req_one(self) -> bool:
        """NBD_CMD_FLAG_REQ_ONE on BLOCK_STATUS: answer with exactly one extent."""
        return bool(self.flags & CMD_FLAG_REQ_ONE)

    @property
    def fast_zero(self) -> bool:
        """NBD_CMD_FLAG_FAST_ZERO on WRITE_ZEROES: fail with ENOTSUP unless fast."""
        return bool(self.flags & CMD_FLAG_FAST_ZERO)


@dataclass(frozen=True, slots=True)
class MetaContext:
    """A metadata context the client selected (NBD_OPT_SET_META_CONTEXT), which
    BLOCK_STATUS answers with one NBD_REPLY_TYPE_BLOCK_STATUS chunk.

    Attributes:
        id: its context id in the replies.
        name: ``base:allocation`` or ``ddsnap:changed:FROM``.
        base: None for ``base:allocation``; for ``ddsnap:changed:FROM``, what the
            export's ``changed_base(FROM)`` returned when it was selected (opaque here),
            given back to its ``changed_status``.
    """

    id: int
    name: str
    base: object | None = None


@dataclass(frozen=True, slots=True)
class Abort(Event):
    """The client sent NBD_OPT_ABORT; the ACK is queued.  Send it, then close."""


@dataclass(frozen=True, slots=True)
class ProtocolViolation(Event):
    """Fatal: the stream cannot be resynchronised or the spec requires hanging up.

    Causes: a bad magic number, unknown client flags, an over-long WRITE payload, or
    NBD_OPT_EXPORT_NAME naming an unknown export (which cannot be answered with an
    error).  Send what :meth:`~ddsnap.nbd.protocol.ServerConnection.data_to_send` holds,
    then close.
    """

    error: ProtocolError
