"""The NBD wire format: numbers, message layouts, and the fixed messages as bytes.

Everything here is a constant or a pure function of its arguments, with no connection
state: the magic numbers, flags, option, reply and error values of the NBD protocol
document (``doc/proto.md`` of the NetworkBlockDevice/nbd repository), the limits ddsnap
announces, :class:`Command`, the ``struct`` layouts of the fixed-size messages, the
builders of the replies (option replies, simple replies, structured reply chunks) and
the decoders of the option payloads the handshake reads.  The state machine that uses
them is :class:`ddsnap.nbd.protocol.ServerConnection`; it is kept apart so that reading
it is reading the protocol's rules, not its byte layouts, and so that a client or a test
can build and check messages from one dependency-free module.

All sizes, offsets and lengths are in bytes; every integer on the wire is big-endian.
"""

from __future__ import annotations

import enum
import errno as _errno
import struct
from typing import TypeAlias

#: what replies are made of: header bytes, READ reply buffers filled in place
#: (:meth:`ddsnap.nbd.protocol.ServerConnection.read_reply_buffer`) and data as a
#: backend returned it
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

#: The spec's metadata context: which extents are holes (NBD_STATE_HOLE, NBD_STATE_ZERO).
BASE_ALLOCATION = "base:allocation"
#: Its id in NBD_REP_META_CONTEXT replies to NBD_OPT_SET_META_CONTEXT and in block
#: status chunks (any value works; the client treats it as opaque).
BASE_ALLOCATION_ID = 1
#: ddsnap's namespace of metadata contexts (issue 13); as a LIST query, every context
#: in it.  (Not a namespace registered with the NBD project, as ``qemu:`` is.)
DDSNAP_NAMESPACE = "ddsnap:"
#: ``ddsnap:changed:FROM``: per chunk, whether it may read differently on this export
#: than in snapshot FROM (any live snapshot's name).  As a LIST query without FROM,
#: every such context.
CHANGED_PREFIX = "ddsnap:changed:"
#: Its status flag: the extent may differ from FROM (clear: it reads the same).
STATE_CHANGED = 1 << 0
#: Ids of the ``ddsnap:changed:FROM`` contexts selected: this one, then the next ones in
#: the order the client's queries named them.
CHANGED_FIRST_ID = 2
#: Most metadata contexts one NBD_OPT_SET_META_CONTEXT may select (each costs a chunk
#: and a lookup per BLOCK_STATUS); more is NBD_REP_ERR_TOO_BIG.
MAX_META_CONTEXTS = 64

# --- message layouts ------------------------------------------------------------------

#: the server's first 18 bytes: NBDMAGIC, IHAVEOPT, handshake flags FIXED_NEWSTYLE | NO_ZEROES
GREETING = struct.pack(">QQH", NBDMAGIC, IHAVEOPT, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)
#: an option request's header: magic, option, length (then ``length`` payload bytes)
OPTION_HEADER = struct.Struct(">QII")
_OPTION_REPLY = struct.Struct(">QIII")  # magic, option, reply type, length
#: a request message (28 bytes): magic, flags, type, handle, offset, length
REQUEST_HEADER = struct.Struct(">IHHQQI")
#: a simple reply (16 bytes): magic, error, handle
SIMPLE_REPLY_HEADER = struct.Struct(">IIQ")
_CHUNK_HEADER = struct.Struct(">IHHQI")  # magic, flags, type, handle, length
#: an NBD_REPLY_TYPE_OFFSET_DATA chunk's header and offset field (28 bytes)
OFFSET_DATA_HEADER = struct.Struct(">IHHQIQ")
#: unsigned big-endian integers of 16, 32 and 64 bits
U16 = struct.Struct(">H")
U32 = struct.Struct(">I")
U64 = struct.Struct(">Q")

#: the padding after NBD_OPT_EXPORT_NAME's reply unless the client set NO_ZEROES
ZEROES_124 = bytes(124)


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
ALLOWED_FLAGS = {
    Command.READ: CMD_FLAG_DF,
    Command.WRITE: 0,
    Command.DISC: 0,
    Command.FLUSH: 0,
    Command.TRIM: 0,
    Command.CACHE: 0,
    Command.WRITE_ZEROES: CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
    Command.BLOCK_STATUS: CMD_FLAG_REQ_ONE,
}
#: Commands refused on a read-only export (NBD_EPERM).
WRITING = (Command.WRITE, Command.TRIM, Command.WRITE_ZEROES)
_RANGED = (Command.READ, Command.WRITE, Command.TRIM, Command.CACHE,
           Command.WRITE_ZEROES, Command.BLOCK_STATUS)
#: Commands whose length is bounded by MAX_BLOCK_SIZE ("Block size constraints").
SIZE_LIMITED = (Command.READ, Command.WRITE, Command.CACHE)

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


# --- reply builders (pure functions) --------------------------------------------------


def option_reply(option: int, reply_type: int, data: bytes = b"") -> bytes:
    """One fixed-newstyle option reply ("Fixed newstyle negotiation")."""
    return _OPTION_REPLY.pack(OPTION_REPLY_MAGIC, option, reply_type, len(data)) + data


def simple_reply(handle: int, error: int = 0) -> bytes:
    """A simple reply header (16 bytes, "Simple reply message"); READ data follows it."""
    return SIMPLE_REPLY_HEADER.pack(SIMPLE_REPLY_MAGIC, error, handle)


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
    return chunk_header(handle, REPLY_TYPE_OFFSET_DATA, flags, 8 + length) + U64.pack(offset)


def error_chunk(handle: int, error: int, message: str = "", done: bool = True) -> bytes:
    """NBD_REPLY_TYPE_ERROR chunk carrying NBD error value ``error`` and a message."""
    msg = message.encode("utf-8", "replace")[:MAX_STRING_LENGTH]
    payload = U32.pack(error) + U16.pack(len(msg)) + msg
    flags = REPLY_FLAG_DONE if done else 0
    return chunk_header(handle, REPLY_TYPE_ERROR, flags, len(payload)) + payload


def block_status_chunk(handle: int, context_id: int, extents: list[tuple[int, int]],
                       done: bool = True) -> bytes:
    """NBD_REPLY_TYPE_BLOCK_STATUS chunk: ``(length_bytes, status_flags)`` descriptors."""
    payload = bytearray(U32.pack(context_id))
    for length, flags in extents:
        payload += struct.pack(">II", length, flags)
    flags = REPLY_FLAG_DONE if done else 0
    return chunk_header(handle, REPLY_TYPE_BLOCK_STATUS, flags, len(payload)) + bytes(payload)


# --- option payloads ("Option types") -----------------------------------------------


class OptionError(Exception):
    """An option is answered with an error reply (type, message).

    Raised by the decoders below and by the handshake of
    :class:`~ddsnap.nbd.protocol.ServerConnection`, which answers it with
    :func:`option_reply`.

    Attributes:
        reply_type: the NBD_REP_ERR_* value to answer with.
        message: the text sent with it.
    """

    def __init__(self, reply_type: int, message: str):
        super().__init__(message)
        self.reply_type = reply_type
        self.message = message


def decode_string(raw: bytes, what: str) -> str:
    """A string of an option payload (export name, query): at most
    :data:`MAX_STRING_LENGTH` bytes of UTF-8 without NUL; else :class:`OptionError`
    (NBD_REP_ERR_INVALID) naming it as ``what``."""
    if len(raw) > MAX_STRING_LENGTH:
        raise OptionError(REP_ERR_INVALID, f"{what} longer than {MAX_STRING_LENGTH} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise OptionError(REP_ERR_INVALID, f"{what} is not UTF-8") from None
    if "\0" in text:
        raise OptionError(REP_ERR_INVALID, f"{what} contains NUL")
    return text


def decode_info_request(payload: bytes) -> tuple[str, set[int]]:
    """NBD_OPT_INFO / NBD_OPT_GO data: the export name and the NBD_INFO_* types asked
    for; :class:`OptionError` (NBD_REP_ERR_INVALID) if it is malformed."""
    if len(payload) < 6:
        raise OptionError(REP_ERR_INVALID, "option data shorter than 6 bytes")
    (name_len,) = U32.unpack_from(payload, 0)
    if name_len > len(payload) - 6:
        raise OptionError(REP_ERR_INVALID, "export name overruns the option")
    name = decode_string(payload[4:4 + name_len], "export name")
    (count,) = U16.unpack_from(payload, 4 + name_len)
    if 4 + name_len + 2 + 2 * count != len(payload):
        raise OptionError(REP_ERR_INVALID, "information request list has wrong length")
    wanted = set(struct.unpack_from(f">{count}H", payload, 6 + name_len))
    return name, wanted


def decode_meta_context_request(payload: bytes) -> tuple[str, list[str]]:
    """NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT data: the export name, then
    the counted queries (each ``namespace:...``); :class:`OptionError`
    (NBD_REP_ERR_INVALID) if it is malformed."""
    if len(payload) < 8:
        raise OptionError(REP_ERR_INVALID, "option data shorter than 8 bytes")
    (name_len,) = U32.unpack_from(payload, 0)
    if name_len > len(payload) - 8:
        raise OptionError(REP_ERR_INVALID, "export name overruns the option")
    name = decode_string(payload[4:4 + name_len], "export name")
    pos = 4 + name_len
    (count,) = U32.unpack_from(payload, pos)
    pos += 4
    queries = []
    for _ in range(count):
        if pos + 4 > len(payload):
            raise OptionError(REP_ERR_INVALID, "query overruns the option")
        (qlen,) = U32.unpack_from(payload, pos)
        pos += 4
        if pos + qlen > len(payload):
            raise OptionError(REP_ERR_INVALID, "query overruns the option")
        query = decode_string(payload[pos:pos + qlen], "query")
        pos += qlen
        if ":" not in query or query.startswith(":"):
            # "namespace:leaf", the namespace non-empty ("Metadata querying")
            raise OptionError(REP_ERR_INVALID, f"query without namespace: {query!r}")
        queries.append(query)
    if pos != len(payload):
        raise OptionError(REP_ERR_INVALID, "trailing bytes after the queries")
    return name, queries
