"""The NBD protocol, sans-IO: bytes in, events out; replies out as bytes.

:class:`ServerConnection` is the server side of one NBD connection, in the style of h11:
it never touches a socket.  The transport feeds it what the client sent with
:meth:`~ServerConnection.receive_data`, gets back :class:`Event` objects, asks it to build
replies (:meth:`~ServerConnection.send_read_data`, :meth:`~ServerConnection.send_ok`,
:meth:`~ServerConnection.send_error`, :meth:`~ServerConnection.send_block_status`) and
writes whatever :meth:`~ServerConnection.data_to_send` returns.

The whole fixed-newstyle handshake is answered here against an
:class:`~ddsnap.nbd.backend.ExportRegistry`; the transport only hears about it through an
:class:`ExportSelected` event.  In the transmission phase every request is validated here
(command, flags, range, read-only, block size limits); a request that fails validation is
answered with an error reply by this object and never reaches the transport.

Spec followed: the NBD protocol document, ``doc/proto.md`` of the NetworkBlockDevice/nbd
repository ("Fixed newstyle negotiation", "Option types", "Transmission", "Request types",
"Structured reply chunk message", "Block size constraints", "Metadata querying", "Error
values").  What ddsnap serves is summarised in ``docs/protocol.md``.  All sizes, offsets
and lengths are in bytes; every integer on the wire is big-endian.
"""

from __future__ import annotations

import enum
import errno as _errno
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeAlias

from ddsnap.errors import ProtocolError

if TYPE_CHECKING:  # pragma: no cover - typing only
    from ddsnap.nbd.backend import ExportBackend, ExportRegistry

#: what replies are made of: header bytes, READ reply buffers filled in place
#: (:meth:`ServerConnection.read_reply_buffer`) and data as a backend returned it
Buffer: TypeAlias = bytes | bytearray | memoryview

# --- magic numbers ("Handshake", "Transmission") --------------------------------------

NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
OPTION_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

# --- handshake flags (server, 16 bits) and client flags (32 bits) ---------------------

FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
FLAG_C_FIXED_NEWSTYLE = 1 << 0
FLAG_C_NO_ZEROES = 1 << 1

# --- transmission flags (16 bits) -----------------------------------------------------

FLAG_HAS_FLAGS = 1 << 0
FLAG_READ_ONLY = 1 << 1
FLAG_SEND_FLUSH = 1 << 2
FLAG_SEND_FUA = 1 << 3
FLAG_ROTATIONAL = 1 << 4
FLAG_SEND_TRIM = 1 << 5
FLAG_SEND_WRITE_ZEROES = 1 << 6
FLAG_SEND_DF = 1 << 7
FLAG_CAN_MULTI_CONN = 1 << 8
FLAG_SEND_RESIZE = 1 << 9
FLAG_SEND_CACHE = 1 << 10
FLAG_SEND_FAST_ZERO = 1 << 11

# --- options --------------------------------------------------------------------------

OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_PEEK_EXPORT = 4
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10
OPT_EXTENDED_HEADERS = 11

# --- option reply types ---------------------------------------------------------------

REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
_REP_ERR = 1 << 31
REP_ERR_UNSUP = _REP_ERR + 1
REP_ERR_POLICY = _REP_ERR + 2
REP_ERR_INVALID = _REP_ERR + 3
REP_ERR_PLATFORM = _REP_ERR + 4
REP_ERR_TLS_REQD = _REP_ERR + 5
REP_ERR_UNKNOWN = _REP_ERR + 6
REP_ERR_SHUTDOWN = _REP_ERR + 7
REP_ERR_BLOCK_SIZE_REQD = _REP_ERR + 8
REP_ERR_TOO_BIG = _REP_ERR + 9

# --- NBD_REP_INFO information types ---------------------------------------------------

INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# --- command flags (16 bits) ----------------------------------------------------------

CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4

# --- structured replies ---------------------------------------------------------------

REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = (1 << 15) + 1
REPLY_TYPE_ERROR_OFFSET = (1 << 15) + 2

# --- base:allocation status flags -----------------------------------------------------

STATE_HOLE = 1 << 0
STATE_ZERO = 1 << 1

# --- error values ("Error values") ----------------------------------------------------

NBD_EPERM = 1
NBD_EIO = 5
NBD_ENOMEM = 12
NBD_EINVAL = 22
NBD_ENOSPC = 28
NBD_EOVERFLOW = 75
NBD_ENOTSUP = 95
NBD_ESHUTDOWN = 108

# --- limits served by ddsnap (bytes) --------------------------------------------------

#: NBD_INFO_BLOCK_SIZE minimum: any byte offset/length is accepted.
MIN_BLOCK_SIZE = 1
#: NBD_INFO_BLOCK_SIZE preferred: smaller or unaligned writes cost a read-modify-write.
PREFERRED_BLOCK_SIZE = 4096
#: NBD_INFO_BLOCK_SIZE maximum: longest READ, WRITE or CACHE payload accepted (32 MiB).
MAX_BLOCK_SIZE = 32 * 1024 * 1024
#: A refused WRITE payload up to this many bytes is read and thrown away so the stream
#: survives; a longer one is treated as abuse and the connection is dropped (64 MiB).
MAX_DISCARD_PAYLOAD = 64 * 1024 * 1024
#: Longest option payload buffered during the handshake (64 KiB); a longer one is
#: skipped and answered NBD_REP_ERR_TOO_BIG (or NBD_REP_ERR_UNSUP if unknown).
MAX_OPTION_LENGTH = 64 * 1024
#: Longest string (export name, context query) the spec allows (4096 bytes).
MAX_STRING_LENGTH = 4096

#: The one metadata context served.
BASE_ALLOCATION = "base:allocation"
#: Its id in NBD_REP_META_CONTEXT replies to NBD_OPT_SET_META_CONTEXT and in block
#: status chunks (any value works; the client treats it as opaque).
BASE_ALLOCATION_ID = 1

_GREETING = struct.pack(">QQH", NBDMAGIC, IHAVEOPT, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)
_OPTION_HEADER = struct.Struct(">QII")  # magic, option, length
_OPTION_REPLY = struct.Struct(">QIII")  # magic, option, reply type, length
_REQUEST = struct.Struct(">IHHQQI")  # magic, flags, type, handle, offset, length
_SIMPLE_REPLY = struct.Struct(">IIQ")  # magic, error, handle
_CHUNK_HEADER = struct.Struct(">IHHQI")  # magic, flags, type, handle, length
_OFFSET_DATA_HEADER = struct.Struct(">IHHQIQ")  # chunk header, then the offset
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")

_ZEROES_124 = bytes(124)


class Command(enum.IntEnum):
    """NBD request types ("Request types")."""

    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7


#: Flags valid per command besides FUA, which the spec makes valid on every command.
_ALLOWED_FLAGS = {
    Command.READ: CMD_FLAG_DF,
    Command.WRITE: 0,
    Command.DISC: 0,
    Command.FLUSH: 0,
    Command.TRIM: 0,
    Command.CACHE: 0,
    Command.WRITE_ZEROES: CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
    Command.BLOCK_STATUS: CMD_FLAG_REQ_ONE,
}
_WRITING = (Command.WRITE, Command.TRIM, Command.WRITE_ZEROES)
_RANGED = (Command.READ, Command.WRITE, Command.TRIM, Command.CACHE,
           Command.WRITE_ZEROES, Command.BLOCK_STATUS)
#: Commands whose length is bounded by MAX_BLOCK_SIZE ("Block size constraints").
_SIZE_LIMITED = (Command.READ, Command.WRITE, Command.CACHE)

#: POSIX errno -> NBD error value ("Error values"); anything else becomes NBD_EIO.
_NBD_ERRORS = {
    _errno.EPERM: NBD_EPERM,
    _errno.EIO: NBD_EIO,
    _errno.ENOMEM: NBD_ENOMEM,
    _errno.EINVAL: NBD_EINVAL,
    _errno.ENOSPC: NBD_ENOSPC,
    _errno.EOVERFLOW: NBD_EOVERFLOW,
    _errno.ENOTSUP: NBD_ENOTSUP,
    _errno.EOPNOTSUPP: NBD_ENOTSUP,
    _errno.ESHUTDOWN: NBD_ESHUTDOWN,
    # the spec asks for these two to be reported as "no space"
    _errno.EDQUOT: NBD_ENOSPC,
    _errno.EFBIG: NBD_ENOSPC,
}


def errno_to_nbd(err: int | None) -> int:
    """Map a POSIX errno to the NBD error value sent on the wire ("Error values").

    EPERM 1, EIO 5, ENOMEM 12, EINVAL 22, ENOSPC 28 (also EDQUOT, EFBIG), EOVERFLOW 75,
    ENOTSUP 95, ESHUTDOWN 108; anything else (including None or 0) is EIO 5.
    """
    return _NBD_ERRORS.get(err or 0, NBD_EIO)


# --- events ---------------------------------------------------------------------------


class Event:
    """Base class of everything :meth:`ServerConnection.receive_data` returns."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class ExportSelected(Event):
    """The handshake ended (NBD_OPT_GO acknowledged or NBD_OPT_EXPORT_NAME answered).

    The transport should call ``export.open()`` before serving the requests that follow,
    and ``export.close()`` once when the connection ends.  The reply ending the handshake
    is already queued in :meth:`ServerConnection.data_to_send`.

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
class Abort(Event):
    """The client sent NBD_OPT_ABORT; the ACK is queued.  Send it, then close."""


@dataclass(frozen=True, slots=True)
class ProtocolViolation(Event):
    """Fatal: the stream cannot be resynchronised or the spec requires hanging up.

    Causes: a bad magic number, unknown client flags, an over-long WRITE payload, or
    NBD_OPT_EXPORT_NAME naming an unknown export (which cannot be answered with an
    error).  Send what :meth:`ServerConnection.data_to_send` holds, then close.
    """

    error: ProtocolError


class State(enum.Enum):
    """Where the client side of the stream is."""

    HANDSHAKE = "handshake"
    TRANSMISSION = "transmission"
    #: no more input is parsed (after DISC, ABORT or a fatal error); replies to
    #: requests already handed out can still be built.
    CLOSED = "closed"


class _OptionError(Exception):
    """An option is answered with an error reply (type, message)."""

    def __init__(self, reply_type: int, message: str):
        super().__init__(message)
        self.reply_type = reply_type
        self.message = message


def _decode_string(raw: bytes, what: str) -> str:
    if len(raw) > MAX_STRING_LENGTH:
        raise _OptionError(REP_ERR_INVALID, f"{what} longer than {MAX_STRING_LENGTH} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _OptionError(REP_ERR_INVALID, f"{what} is not UTF-8") from None
    if "\0" in text:
        raise _OptionError(REP_ERR_INVALID, f"{what} contains NUL")
    return text


# --- reply builders (pure functions) --------------------------------------------------


def option_reply(option: int, reply_type: int, data: bytes = b"") -> bytes:
    """One fixed-newstyle option reply ("Fixed newstyle negotiation")."""
    return _OPTION_REPLY.pack(OPTION_REPLY_MAGIC, option, reply_type, len(data)) + data


def simple_reply(handle: int, error: int = 0) -> bytes:
    """A simple reply header (16 bytes, "Simple reply message"); READ data follows it."""
    return _SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, handle)


def chunk_header(handle: int, reply_type: int, flags: int, length: int) -> bytes:
    """A structured reply chunk header (20 bytes); ``length`` payload bytes follow."""
    return _CHUNK_HEADER.pack(STRUCTURED_REPLY_MAGIC, flags, reply_type, handle, length)


def none_chunk(handle: int) -> bytes:
    """NBD_REPLY_TYPE_NONE with NBD_REPLY_FLAG_DONE: the request succeeded."""
    return chunk_header(handle, REPLY_TYPE_NONE, REPLY_FLAG_DONE, 0)


def offset_data_chunk_header(handle: int, offset: int, length: int,
                             done: bool = True) -> bytes:
    """Header and offset field of an NBD_REPLY_TYPE_OFFSET_DATA chunk.

    ``length`` data bytes (at least 1) must follow it on the wire.
    """
    flags = REPLY_FLAG_DONE if done else 0
    return chunk_header(handle, REPLY_TYPE_OFFSET_DATA, flags, 8 + length) + _U64.pack(offset)


def error_chunk(handle: int, error: int, message: str = "", done: bool = True) -> bytes:
    """NBD_REPLY_TYPE_ERROR chunk carrying NBD error value ``error`` and a message."""
    msg = message.encode("utf-8", "replace")[:MAX_STRING_LENGTH]
    payload = _U32.pack(error) + _U16.pack(len(msg)) + msg
    flags = REPLY_FLAG_DONE if done else 0
    return chunk_header(handle, REPLY_TYPE_ERROR, flags, len(payload)) + payload


def block_status_chunk(handle: int, context_id: int, extents: list[tuple[int, int]],
                       done: bool = True) -> bytes:
    """NBD_REPLY_TYPE_BLOCK_STATUS chunk: ``(length_bytes, status_flags)`` descriptors."""
    payload = bytearray(_U32.pack(context_id))
    for length, flags in extents:
        payload += struct.pack(">II", length, flags)
    flags = REPLY_FLAG_DONE if done else 0
    return chunk_header(handle, REPLY_TYPE_BLOCK_STATUS, flags, len(payload)) + bytes(payload)


# --- the connection -------------------------------------------------------------------


def _no_continuation(_events: list[Event]) -> None:
    """What follows a skip when none is pending (a skip always sets its own)."""


class ServerConnection:
    """Server side of one NBD connection, without I/O (fixed newstyle; "Handshake").

    Construction queues the greeting (NBDMAGIC, IHAVEOPT, handshake flags
    FIXED_NEWSTYLE | NO_ZEROES; 18 bytes).  Then:

    * :meth:`receive_data` takes client bytes and returns events: :class:`ExportSelected`
      once, :class:`Request` per valid request, and :class:`Abort` or
      :class:`ProtocolViolation` at the end.  Options are answered internally.
    * The ``send_*`` methods queue the reply to a :class:`Request`, simple or structured
      depending on whether NBD_OPT_STRUCTURED_REPLY was negotiated.
    * :meth:`data_to_send` returns the queued output.

    Not thread-safe: use it from one thread (the event loop).

    Args:
        registry: the exports, consulted on every option naming one.
    """

    def __init__(self, registry: ExportRegistry):
        self._registry = registry
        self._state = State.HANDSHAKE
        self._out: list[Buffer] = [_GREETING]
        self._buf = bytearray()
        # what the parser waits for: ``_need`` bytes, then ``_handler(bytes, events)``
        self._need = 4
        self._handler: Callable[[bytes, list[Event]], None] = self._on_client_flags
        # bytes still to skip, then ``_after_discard(events)``
        self._discard = 0
        self._after_discard: Callable[[list[Event]], None] = _no_continuation
        self._fixed = False
        self._no_zeroes = False
        self._structured = False
        # canonical export name for which base:allocation was selected, or None
        self._meta_export: str | None = None
        self._meta_enabled = False
        self._option = 0
        self._export: ExportBackend | None = None
        self._export_name: str | None = None
        self._size = 0
        self._tflags = 0
        self._read_only = False

    # -- public state ------------------------------------------------------------------

    @property
    def state(self) -> State:
        """Current :class:`State` of the input side."""
        return self._state

    @property
    def structured_replies(self) -> bool:
        """True once NBD_OPT_STRUCTURED_REPLY was acknowledged."""
        return self._structured

    @property
    def meta_context_enabled(self) -> bool:
        """True if BLOCK_STATUS (base:allocation) is usable in this transmission phase."""
        return self._meta_enabled

    @property
    def export(self) -> ExportBackend | None:
        """The selected export's backend, None during the handshake."""
        return self._export

    @property
    def export_name(self) -> str | None:
        """The selected export's canonical name, None during the handshake."""
        return self._export_name

    @property
    def transmission_flags(self) -> int:
        """The transmission flags sent when the export was selected (0 before)."""
        return self._tflags

    # -- I/O-facing API ----------------------------------------------------------------

    def data_to_send(self) -> list[Buffer]:
        """Return and forget the queued output, as a list of buffers to write in order.

        Large READ payloads are returned as their own buffer rather than copied.
        """
        out, self._out = self._out, []
        return out

    def pending_output(self) -> int:
        """Number of buffers queued for :meth:`data_to_send`."""
        return len(self._out)

    def receive_data(self, data: bytes = b"", max_events: int | None = None) -> list[Event]:
        """Feed bytes received from the client; return the events they complete.

        At most ``max_events`` events are returned; the rest of the input stays buffered
        and is parsed by the next call (``receive_data(b"")`` parses without new input).
        This is how the transport bounds the requests it has in flight.  Input after the
        state became CLOSED is ignored.
        """
        if self._state is State.CLOSED:
            return []
        if data:
            self._buf += data
        events: list[Event] = []
        pos = 0
        buf = self._buf
        limit = max_events if max_events is not None else 1 << 62
        while self._state is not State.CLOSED:
            if len(events) >= limit:
                break
            avail = len(buf) - pos
            if self._handler == self._on_request_header and not self._discard:
                # Plain READs in a row, the hot path of a busy export: unpacked in place,
                # without the per-request handler dispatch (same checks as there).
                size = self._size
                while avail >= 28 and len(events) < limit:
                    magic, flags, ctype, handle, offset, length = _REQUEST.unpack_from(buf, pos)
                    if (ctype or flags or magic != REQUEST_MAGIC or not 0 < length <= MAX_BLOCK_SIZE
                            or not 0 <= offset <= size - length):
                        break
                    events.append(Request(handle, Command.READ, 0, offset, length))
                    pos += 28
                    avail -= 28
                if len(events) >= limit:
                    break
            if self._discard:
                n = min(self._discard, avail)
                pos += n
                self._discard -= n
                if self._discard:
                    break
                after, self._after_discard = self._after_discard, _no_continuation
                after(events)
                continue
            need = self._need
            if avail < need:
                break
            if need > 64:
                with memoryview(buf) as view:
                    chunk = bytes(view[pos:pos + need])  # one copy of a payload
            else:
                chunk = bytes(buf[pos:pos + need])  # headers: cheaper than a view
            pos += need
            self._handler(chunk, events)
        if self._state is State.CLOSED:
            self._buf = bytearray()
        else:
            del buf[:pos]
        return events

    # -- replies to requests ("Transmission") ------------------------------------------

    def send_read_data(self, request: Request, data: Buffer) -> None:
        """Queue the successful reply to a READ: ``data`` must be ``request.length`` bytes.

        Structured: one NBD_REPLY_TYPE_OFFSET_DATA chunk flagged DONE (all data is in hand,
        so no error can follow, and one chunk satisfies NBD_CMD_FLAG_DF).  Simple: the
        16-byte header followed by the data.
        """
        if request.command is not Command.READ:
            raise ValueError("send_read_data answers READ requests only")
        if len(data) != request.length:
            raise ValueError(f"READ of {request.length} bytes answered with {len(data)}")
        if self._structured:
            self._out.append(offset_data_chunk_header(request.handle, request.offset,
                                                      request.length))
        else:
            self._out.append(simple_reply(request.handle))
        self._out.append(data)

    def read_reply_buffer(self, request: Request) -> tuple[bytearray, memoryview]:
        """A whole successful READ reply with room for its data, to fill in place.

        Returns ``(reply, payload)``: ``reply`` is the reply header (as
        :meth:`send_read_data` would frame it) followed by ``request.length`` bytes, and
        ``payload`` a view of those bytes.  Fill ``payload``, then queue ``reply`` with
        :meth:`send_read_reply`.  This saves copying the data into a separate reply.
        """
        if request.command is not Command.READ:
            raise ValueError("read_reply_buffer is for READ requests only")
        if self._structured:
            reply = bytearray(28 + request.length)  # chunk header + offset, then data
            _OFFSET_DATA_HEADER.pack_into(reply, 0, STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE,
                                          REPLY_TYPE_OFFSET_DATA, request.handle,
                                          8 + request.length, request.offset)
            return reply, memoryview(reply)[28:]
        reply = bytearray(16 + request.length)
        _SIMPLE_REPLY.pack_into(reply, 0, SIMPLE_REPLY_MAGIC, 0, request.handle)
        return reply, memoryview(reply)[16:]

    def send_read_reply(self, reply: bytearray) -> None:
        """Queue a reply made by :meth:`read_reply_buffer` (its payload filled in)."""
        self._out.append(reply)

    def send_ok(self, request: Request) -> None:
        """Queue a success reply without payload (WRITE, FLUSH, TRIM, CACHE, ...).

        Structured replies negotiated: NBD_REPLY_TYPE_NONE with DONE, so the stream stays
        context-free; otherwise a simple reply with error 0.
        """
        if request.command in (Command.READ, Command.BLOCK_STATUS):
            raise ValueError(f"{request.command.name} success needs a payload")
        self._out.append(none_chunk(request.handle) if self._structured
                         else simple_reply(request.handle))

    def send_error(self, request: Request, err: int, message: str = "") -> None:
        """Queue an error reply; ``err`` is a POSIX errno, mapped by :func:`errno_to_nbd`.

        Structured: an NBD_REPLY_TYPE_ERROR chunk with DONE and ``message``; simple: the
        error value only (a READ error carries no data).
        """
        self._reply_error(request.handle, errno_to_nbd(err), message)

    def send_block_status(self, request: Request, extents: list[tuple[int, int]]) -> None:
        """Queue the reply to BLOCK_STATUS: one NBD_REPLY_TYPE_BLOCK_STATUS chunk.

        ``extents`` are ``(length_bytes, flags)`` from the backend.  They are trimmed to
        the request (zero lengths dropped, the total capped at ``request.length``, one
        extent if NBD_CMD_FLAG_REQ_ONE), neighbours with equal flags merged; if nothing is
        left the whole range is reported with status 0, which the spec says is always safe.
        """
        if request.command is not Command.BLOCK_STATUS:
            raise ValueError("send_block_status answers BLOCK_STATUS requests only")
        out: list[list[int]] = []
        total = 0
        for length, flags in extents:
            length = int(length)
            flags = int(flags) & 0xFFFFFFFF
            if length <= 0:
                continue
            length = min(length, request.length - total)
            if out and out[-1][1] == flags:
                out[-1][0] += length
            else:
                out.append([length, flags])
            total += length
            if total >= request.length or (request.req_one and out):
                break
        if not out:
            out = [[request.length, 0]]
        if request.req_one:
            out = out[:1]
        self._out.append(block_status_chunk(request.handle, BASE_ALLOCATION_ID,
                                            [(n, f) for n, f in out]))

    def _reply_error(self, handle: int, nbd_err: int, message: str) -> None:
        if self._structured:
            self._out.append(error_chunk(handle, nbd_err, message))
        else:
            self._out.append(simple_reply(handle, nbd_err))

    # -- parser internals --------------------------------------------------------------

    def _expect(self, need: int, handler: Callable[[bytes, list[Event]], None]) -> None:
        self._need = need
        self._handler = handler

    def _skip(self, count: int, after: Callable[[list[Event]], None]) -> None:
        self._discard = count
        self._after_discard = after
        if not count:
            # nothing to skip: run the continuation at the next loop turn
            self._discard = 0
            self._need = 0
            self._handler = lambda _chunk, events: after(events)

    def _fatal(self, events: list[Event], message: str) -> None:
        events.append(ProtocolViolation(ProtocolError(message)))
        self._state = State.CLOSED

    # -- handshake ---------------------------------------------------------------------

    def _on_client_flags(self, chunk: bytes, events: list[Event]) -> None:
        (flags,) = _U32.unpack(chunk)
        if flags & ~(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES):
            # the spec makes the server drop the connection on unknown client flags
            self._fatal(events, f"unknown client flags 0x{flags:08x}")
            return
        self._fixed = bool(flags & FLAG_C_FIXED_NEWSTYLE)
        self._no_zeroes = bool(flags & FLAG_C_NO_ZEROES)
        self._expect(_OPTION_HEADER.size, self._on_option_header)

    def _on_option_header(self, chunk: bytes, events: list[Event]) -> None:
        magic, option, length = _OPTION_HEADER.unpack(chunk)
        if magic != IHAVEOPT:
            self._fatal(events, f"bad option magic 0x{magic:016x}")
            return
        self._option = option
        if not self._fixed and option != OPT_EXPORT_NAME:
            # a non-fixed newstyle client cannot parse option replies
            self._fatal(events, f"option {option} from a client without fixed newstyle")
            return
        known = option in self._OPTIONS
        if known and length <= MAX_OPTION_LENGTH:
            self._expect(length, self._on_option_payload)
            return
        if option == OPT_EXPORT_NAME:
            self._fatal(events, f"NBD_OPT_EXPORT_NAME of {length} bytes")
            return
        # skip the payload without buffering it, so the stream stays in step
        reply = REP_ERR_TOO_BIG if known else REP_ERR_UNSUP
        text = (f"option {option} payload of {length} bytes is too long" if known
                else f"option {option} is not supported")

        def answer(_events: list[Event]) -> None:
            self._out.append(option_reply(option, reply, text.encode()))
            self._expect(_OPTION_HEADER.size, self._on_option_header)

        self._skip(length, answer)

    def _on_option_payload(self, payload: bytes, events: list[Event]) -> None:
        option = self._option
        self._expect(_OPTION_HEADER.size, self._on_option_header)
        try:
            self._OPTIONS[option](self, payload, events)
        except _OptionError as exc:
            self._out.append(option_reply(option, exc.reply_type, exc.message.encode()))

    def _lookup(self, name: str) -> tuple[str, ExportBackend]:
        canonical = self._registry.default_name if name == "" else name
        backend = self._registry.get(canonical)
        if backend is None:
            raise _OptionError(REP_ERR_UNKNOWN, f"unknown export: {name!r}")
        return canonical, backend

    def _flags_for(self, backend: ExportBackend) -> int:
        flags = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_CAN_MULTI_CONN | FLAG_SEND_CACHE
        if backend.read_only:
            # write-side features are not offered on a read-only export
            flags |= FLAG_READ_ONLY
        else:
            flags |= (FLAG_SEND_FUA | FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES
                      | FLAG_SEND_FAST_ZERO)
        if self._structured:
            # DF only makes sense with structured replies; ddsnap always sends one chunk
            flags |= FLAG_SEND_DF
        return flags

    def _opt_export_name(self, payload: bytes, events: list[Event]) -> None:
        try:
            name = _decode_string(payload, "export name")
            canonical, backend = self._lookup(name)
        except _OptionError as exc:
            # NBD_OPT_EXPORT_NAME cannot be answered with an error: hang up
            self._fatal(events, exc.message)
            return
        tflags = self._flags_for(backend)
        reply = _U64.pack(backend.size) + _U16.pack(tflags)
        if not self._no_zeroes:
            reply += _ZEROES_124
        self._out.append(reply)
        self._enter_transmission(canonical, backend, tflags, events)

    def _opt_abort(self, payload: bytes, events: list[Event]) -> None:
        # the spec asks servers to ignore any payload sent with ABORT
        self._out.append(option_reply(OPT_ABORT, REP_ACK))
        events.append(Abort())
        self._state = State.CLOSED

    def _opt_list(self, payload: bytes, events: list[Event]) -> None:
        if payload:
            raise _OptionError(REP_ERR_INVALID, "NBD_OPT_LIST takes no data")
        for name in self._registry.names():
            raw = name.encode("utf-8")
            self._out.append(option_reply(OPT_LIST, REP_SERVER, _U32.pack(len(raw)) + raw))
        self._out.append(option_reply(OPT_LIST, REP_ACK))

    def _opt_info_or_go(self, payload: bytes, events: list[Event]) -> None:
        option = self._option
        if len(payload) < 6:
            raise _OptionError(REP_ERR_INVALID, "option data shorter than 6 bytes")
        (name_len,) = _U32.unpack_from(payload, 0)
        if name_len > len(payload) - 6:
            raise _OptionError(REP_ERR_INVALID, "export name overruns the option")
        name = _decode_string(payload[4:4 + name_len], "export name")
        (count,) = _U16.unpack_from(payload, 4 + name_len)
        if 4 + name_len + 2 + 2 * count != len(payload):
            raise _OptionError(REP_ERR_INVALID, "information request list has wrong length")
        wanted = set(struct.unpack_from(f">{count}H", payload, 6 + name_len))
        canonical, backend = self._lookup(name)
        tflags = self._flags_for(backend)
        self._out.append(option_reply(option, REP_INFO, struct.pack(
            ">HQH", INFO_EXPORT, backend.size, tflags)))
        if INFO_NAME in wanted:
            self._out.append(option_reply(option, REP_INFO, _U16.pack(INFO_NAME)
                                          + canonical.encode("utf-8")))
        # sent even unrequested: the maximum is stricter than the default, and clients
        # ignore information they did not ask for
        self._out.append(option_reply(option, REP_INFO, struct.pack(
            ">HIII", INFO_BLOCK_SIZE, MIN_BLOCK_SIZE, PREFERRED_BLOCK_SIZE, MAX_BLOCK_SIZE)))
        self._out.append(option_reply(option, REP_ACK))
        if option == OPT_GO:
            self._enter_transmission(canonical, backend, tflags, events)

    def _opt_structured_reply(self, payload: bytes, events: list[Event]) -> None:
        if payload:
            raise _OptionError(REP_ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data")
        self._structured = True
        self._out.append(option_reply(OPT_STRUCTURED_REPLY, REP_ACK))

    def _parse_meta(self, payload: bytes) -> tuple[str, list[str]]:
        """Parse LIST/SET_META_CONTEXT data: export name, then counted queries."""
        if len(payload) < 8:
            raise _OptionError(REP_ERR_INVALID, "option data shorter than 8 bytes")
        (name_len,) = _U32.unpack_from(payload, 0)
        if name_len > len(payload) - 8:
            raise _OptionError(REP_ERR_INVALID, "export name overruns the option")
        name = _decode_string(payload[4:4 + name_len], "export name")
        pos = 4 + name_len
        (count,) = _U32.unpack_from(payload, pos)
        pos += 4
        queries = []
        for _ in range(count):
            if pos + 4 > len(payload):
                raise _OptionError(REP_ERR_INVALID, "query overruns the option")
            (qlen,) = _U32.unpack_from(payload, pos)
            pos += 4
            if pos + qlen > len(payload):
                raise _OptionError(REP_ERR_INVALID, "query overruns the option")
            query = _decode_string(payload[pos:pos + qlen], "query")
            pos += qlen
            if ":" not in query:
                raise _OptionError(REP_ERR_INVALID, f"query without namespace: {query!r}")
            queries.append(query)
        if pos != len(payload):
            raise _OptionError(REP_ERR_INVALID, "trailing bytes after the queries")
        return name, queries

    def _opt_list_meta_context(self, payload: bytes, events: list[Event]) -> None:
        if not self._structured:
            raise _OptionError(REP_ERR_INVALID, "negotiate structured replies first")
        name, queries = self._parse_meta(payload)
        self._lookup(name)
        # no query lists everything; "base:" is the namespace wildcard
        if not queries or any(q in ("base:", BASE_ALLOCATION) for q in queries):
            # the context id in LIST replies is reserved: send 0
            self._out.append(option_reply(OPT_LIST_META_CONTEXT, REP_META_CONTEXT,
                                          _U32.pack(0) + BASE_ALLOCATION.encode()))
        self._out.append(option_reply(OPT_LIST_META_CONTEXT, REP_ACK))

    def _opt_set_meta_context(self, payload: bytes, events: list[Event]) -> None:
        # the previous selection is dropped even when this request fails
        self._meta_export = None
        if not self._structured:
            raise _OptionError(REP_ERR_INVALID, "negotiate structured replies first")
        name, queries = self._parse_meta(payload)
        canonical, _backend = self._lookup(name)
        # only the exact name selects; "base:" and unknown leaves select nothing
        if BASE_ALLOCATION in queries:
            self._meta_export = canonical
            self._out.append(option_reply(OPT_SET_META_CONTEXT, REP_META_CONTEXT,
                                          _U32.pack(BASE_ALLOCATION_ID)
                                          + BASE_ALLOCATION.encode()))
        self._out.append(option_reply(OPT_SET_META_CONTEXT, REP_ACK))

    _OPTIONS = {
        OPT_EXPORT_NAME: _opt_export_name,
        OPT_ABORT: _opt_abort,
        OPT_LIST: _opt_list,
        OPT_INFO: _opt_info_or_go,
        OPT_GO: _opt_info_or_go,
        OPT_STRUCTURED_REPLY: _opt_structured_reply,
        OPT_LIST_META_CONTEXT: _opt_list_meta_context,
        OPT_SET_META_CONTEXT: _opt_set_meta_context,
    }

    def _enter_transmission(self, name: str, backend: ExportBackend, tflags: int,
                            events: list[Event]) -> None:
        self._state = State.TRANSMISSION
        self._export = backend
        self._export_name = name
        self._size = backend.size
        self._tflags = tflags
        self._read_only = bool(backend.read_only)
        # BLOCK_STATUS needs the context selected for this same export
        self._meta_enabled = self._structured and self._meta_export == name
        self._expect(_REQUEST.size, self._on_request_header)
        events.append(ExportSelected(name, backend, self._size, tflags))

    # -- transmission ------------------------------------------------------------------

    def _on_request_header(self, chunk: bytes, events: list[Event]) -> None:
        magic, flags, ctype, handle, offset, length = _REQUEST.unpack(chunk)
        if magic != REQUEST_MAGIC:
            # no way to find the next request boundary: the connection is lost
            self._fatal(events, f"bad request magic 0x{magic:08x}")
            return
        problem = self._validate(ctype, flags, offset, length)
        if ctype == Command.WRITE:
            if length > MAX_DISCARD_PAYLOAD:
                self._fatal(events, f"WRITE payload of {length} bytes")
                return
            if problem is None:
                self._expect(length, lambda data, evs: self._on_write_payload(
                    handle, flags, offset, length, data, evs))
                return
            err, text = problem

            def answer(_events: list[Event]) -> None:
                self._reply_error(handle, err, text)
                self._expect(_REQUEST.size, self._on_request_header)

            self._skip(length, answer)
            return
        if problem is not None:
            self._reply_error(handle, *problem)
            return
        command = Command(ctype)
        events.append(Request(handle, command, flags, offset, length))
        if command is Command.DISC:
            # the client must not send anything after DISC
            self._state = State.CLOSED

    def _on_write_payload(self, handle: int, flags: int, offset: int, length: int,
                          data: bytes, events: list[Event]) -> None:
        self._expect(_REQUEST.size, self._on_request_header)
        events.append(Request(handle, Command.WRITE, flags, offset, length, data))

    def _validate(self, ctype: int, flags: int, offset: int,
                  length: int) -> tuple[int, str] | None:
        """Return (NBD error, message) if the request must be refused, else None."""
        try:
            command = Command(ctype)
        except ValueError:
            return NBD_EINVAL, f"unknown command {ctype}"
        if command is Command.DISC:
            return None
        bad = flags & ~(CMD_FLAG_FUA | _ALLOWED_FLAGS[command])
        if bad:
            return NBD_EINVAL, f"flags 0x{bad:x} invalid for {command.name}"
        if flags & CMD_FLAG_DF and not self._structured:
            return NBD_EINVAL, "DF without structured replies"
        if command is Command.FLUSH:
            if offset or length:
                return NBD_EINVAL, "FLUSH offset and length must be 0"
            return None
        if command in _WRITING and self._read_only:
            return NBD_EPERM, "export is read-only"
        if command is Command.WRITE_ZEROES and flags & CMD_FLAG_FAST_ZERO \
                and not self._tflags & FLAG_SEND_FAST_ZERO:
            return NBD_EINVAL, "FAST_ZERO not negotiated"
        if command is Command.BLOCK_STATUS and not self._meta_enabled:
            return NBD_EINVAL, "no metadata context negotiated"
        if length == 0:
            return NBD_EINVAL, f"{command.name} of length 0"
        if offset + length > self._size:
            # the spec asks for ENOSPC when writing past the end, EINVAL otherwise
            err = NBD_ENOSPC if command in (Command.WRITE, Command.WRITE_ZEROES) else NBD_EINVAL
            return err, f"{command.name} [{offset}, +{length}) beyond export size {self._size}"
        if command in _SIZE_LIMITED and length > MAX_BLOCK_SIZE:
            return NBD_EINVAL, f"{command.name} of {length} bytes exceeds {MAX_BLOCK_SIZE}"
        return None
