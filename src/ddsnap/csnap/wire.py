"""The csnap metadata protocol's wire format: message numbers, layouts, encode and decode.

Seed 000 (csnap) has the data path ask one metadata server for mappings and locks over
a socket: ``IDENTIFY``, ``QUERY_WRITE``/``ORIGIN_WRITE_OK``, ``QUERY_SNAPSHOT_READ``/
``SNAPSHOT_READ_OK`` (answered with origin ranges read-locked until
``FINISH_SNAPSHOT_READ``, plus store chunk addresses), ``QUERY_SNAPSHOT_WRITE``,
``UPLOAD_LOCK``/``FINISH_UPLOAD_LOCK`` after a server restart.  This module is ddsnap's
encoding of those messages (and the few it adds: calls, notices, errors carrying the
error class) as pure functions and dataclasses with no connection state; the state
machine using them is :mod:`ddsnap.csnap.protocol`.  ``docs/protocol.md`` ("The csnap
metadata protocol") documents every message byte by byte.

Every message is a 20-byte header and a body::

    u32 magic (0x63736E70, "csnp") | u16 type | u16 flags (0) | u32 body length | u64 id

A reply carries its request's id and type ``request type | 0x8000``; an error reply is
type :data:`ERROR`.  Messages with no reply (the FINISH messages) may use any id.
Units: chunks are logical chunks of the store's chunk size, ranges of chunks inclusive
``first..last``; every integer is big-endian.
"""

from __future__ import annotations

import enum
import json
import struct
from dataclasses import dataclass, field
from typing import ClassVar

from ddsnap.errors import BY_NAME, DdsnapError, ProtocolError

#: the versions this code speaks (IDENTIFY carries the range a node speaks)
VERSION = 3
MAGIC = 0x63736E70
HEADER = struct.Struct(">IHHIQ")
#: largest body accepted (bytes): 65,536 ranges fit with room to spare
MAX_BODY = 1 << 20
#: most ranges in one QUERY_ORIGIN_WRITE, FINISH_SNAPSHOT_READ or UPLOAD_LOCK
MAX_RANGES = 1 << 16
#: most chunks one read or write query may cover
MAX_QUERY_CHUNKS = 1 << 16
#: the source of a chunk read from the origin, in a read map's runs
ORIGIN = (1 << 64) - 1
#: read map reply flags: a map follows; the node may keep it (SNAPSHOT_READ_OK only)
MAP_PRESENT = 0x01
MAP_CACHEABLE = 0x02
REPLY = 0x8000


class Type(enum.IntEnum):
    """Message types (u16).  A reply is ``request | REPLY``; ERROR answers any request."""

    IDENTIFY = 1
    QUERY_ORIGIN_WRITE = 2
    FINISH_ORIGIN_WRITE = 3
    QUERY_SNAPSHOT_READ = 4
    QUERY_ORIGIN_READ = 5
    FINISH_SNAPSHOT_READ = 6
    QUERY_SNAPSHOT_WRITE = 7
    UPLOAD_LOCK = 8
    FINISH_UPLOAD_LOCK = 9
    CALL = 10
    NOTICE = 11
    RETURN_GRANTS = 12
    IDENTIFY_OK = IDENTIFY | REPLY
    ORIGIN_WRITE_OK = QUERY_ORIGIN_WRITE | REPLY
    SNAPSHOT_READ_OK = QUERY_SNAPSHOT_READ | REPLY
    ORIGIN_READ_OK = QUERY_ORIGIN_READ | REPLY
    SNAPSHOT_WRITE_OK = QUERY_SNAPSHOT_WRITE | REPLY
    UPLOAD_OK = FINISH_UPLOAD_LOCK | REPLY
    CALL_OK = CALL | REPLY
    NOTICE_ACK = NOTICE | REPLY
    ERROR = 0xFFFF


_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_Q = struct.Struct(">Q")
_RANGE = struct.Struct(">QQ")
_RUN = struct.Struct(">IQ")
_SNAP_RANGE = struct.Struct(">IQQ")
_ERR_HEAD = struct.Struct(">IH")
_IDENTIFY = struct.Struct(">HH16sH")
_IDENTIFY_OK = struct.Struct(">HI16sIQI")


def _bad(what: str) -> ProtocolError:
    return ProtocolError(f"malformed csnap message: {what}")


# --- the messages -------------------------------------------------------------------------


@dataclass
class Message:
    """A protocol message; ``id`` matches a reply to its request (u64)."""

    type: ClassVar[Type]
    id: int = 0

    def body(self) -> bytes:
        """The encoded body (everything after the header)."""
        return b""

    def encode(self) -> bytes:
        """Header and body, ready to send."""
        b = self.body()
        return HEADER.pack(MAGIC, self.type, 0, len(b), self.id) + b


@dataclass
class Identify(Message):
    """Node → server, first message: the versions it speaks (``low..high``), the store it
    expects (16-byte UUID; all zero: any) and a label for status displays (≤ 255 bytes
    of UTF-8)."""

    type: ClassVar[Type] = Type.IDENTIFY
    low: int = VERSION
    high: int = VERSION
    uuid: bytes = bytes(16)
    name: str = ""

    def body(self) -> bytes:
        n = self.name.encode()
        return _IDENTIFY.pack(self.low, self.high, self.uuid, len(n)) + n


@dataclass
class IdentifyOk(Message):
    """Server → node: the version chosen, the node's id, the store's UUID, its chunk
    size (bytes), the origin's size (bytes) and the server's generation (its restarts,
    so that a node can tell it must re-upload its locks)."""

    type: ClassVar[Type] = Type.IDENTIFY_OK
    version: int = VERSION
    node: int = 0
    uuid: bytes = bytes(16)
    chunk_size: int = 0
    origin_size: int = 0
    generation: int = 0

    def body(self) -> bytes:
        return _IDENTIFY_OK.pack(self.version, self.node, self.uuid, self.chunk_size,
                                 self.origin_size, self.generation)


@dataclass
class ErrorReply(Message):
    """Any request's failure: the :class:`~ddsnap.errors.DdsnapError` class name, the
    errno an NBD reply would carry, and the message (UTF-8)."""

    type: ClassVar[Type] = Type.ERROR
    error: str = "DdsnapError"
    errno: int = 5
    message: str = ""

    def body(self) -> bytes:
        return encode_error(self.error, self.errno, self.message)

    @classmethod
    def of(cls, id: int, e: BaseException) -> ErrorReply:
        """The reply for exception ``e`` (non-ddsnap errors travel as DdsnapError)."""
        name, code, msg = describe_error(e)
        return cls(id, name, code, msg)

    def exception(self) -> DdsnapError:
        """The error rebuilt on this side: its class by name, errno and message."""
        return rebuild_error(self.error, self.errno, self.message)


@dataclass
class QueryOriginWrite(Message):
    """Make origin chunk ranges unique (seed 000 ``QUERY_WRITE`` on the origin).  The
    reply lists, for the first ranges (possibly not all), prepared or an error; ranges
    past its list were not started.  Each prepared range is an origin write in flight
    until a FINISH_ORIGIN_WRITE counts it done."""

    type: ClassVar[Type] = Type.QUERY_ORIGIN_WRITE
    ranges: list[tuple[int, int]] = field(default_factory=list)

    def body(self) -> bytes:
        return encode_ranges(self.ranges)


@dataclass
class OriginWriteOk(Message):
    """Per range of the query (the first ``len(results)``): None (prepared) or the error
    ``(class name, errno, message)``; ``granted``: the node may write the prepared
    ranges again without asking until the server revokes its grants (a
    ``grants-revoked`` NOTICE)."""

    type: ClassVar[Type] = Type.ORIGIN_WRITE_OK
    results: list[tuple[str, int, str] | None] = field(default_factory=list)
    granted: bool = False

    def body(self) -> bytes:
        out = [bytes([self.granted]), _U32.pack(len(self.results))]
        for r in self.results:
            if r is None:
                out.append(b"\0")
            else:
                out.append(b"\1" + encode_error(*r))
        return b"".join(out)


@dataclass
class FinishOriginWrite(Message):
    """``count`` prepared origin writes are done (no reply)."""

    type: ClassVar[Type] = Type.FINISH_ORIGIN_WRITE
    count: int = 1

    def body(self) -> bytes:
        return _U32.pack(self.count)


@dataclass
class SnapshotRangeQuery(Message):
    """A query about snapshot ``snap``'s (its id) chunks ``first..last``: u32, u64, u64."""

    snap: int = 0
    first: int = 0
    last: int = 0

    def body(self) -> bytes:
        return _SNAP_RANGE.pack(self.snap, self.first, self.last)


@dataclass
class QuerySnapshotRead(SnapshotRangeQuery):
    """Where snapshot ``snap`` reads chunks ``first..last`` (seed 000
    ``QUERY_SNAPSHOT_READ``); the reply's origin chunks are read-locked."""

    type: ClassVar[Type] = Type.QUERY_SNAPSHOT_READ


@dataclass
class QueryOriginRead(Message):
    """Where the origin reads chunks ``first..last`` while a merge runs; the reply's
    store chunks (those not merged yet) are read-locked."""

    type: ClassVar[Type] = Type.QUERY_ORIGIN_READ
    first: int = 0
    last: int = 0

    def body(self) -> bytes:
        return _RANGE.pack(self.first, self.last)


@dataclass
class ReadMapReply(Message):
    """A read mapping: per chunk from ``first`` a store chunk or None (the origin), sent
    as runs; ``sources`` None (origin reads only) means "no merge: read the origin
    itself", with nothing locked.  ``cacheable``: the node may keep the mapping, and
    the read locks of its origin chunks, after the read (docs/protocol.md "Read
    mappings a node keeps").  Flags byte: bit 0 a map follows, bit 1 cacheable."""

    type: ClassVar[Type] = Type.SNAPSHOT_READ_OK
    first: int = 0
    sources: list[int | None] | None = None
    cacheable: bool = False

    def body(self) -> bytes:
        if self.sources is None:
            return b"\0" + _Q.pack(self.first)
        return (bytes([MAP_PRESENT | (MAP_CACHEABLE if self.cacheable else 0)])
                + _Q.pack(self.first) + encode_sources(self.sources))


@dataclass
class OriginReadMapReply(ReadMapReply):
    """:class:`ReadMapReply` answering QUERY_ORIGIN_READ."""

    type: ClassVar[Type] = Type.ORIGIN_READ_OK


@dataclass
class FinishSnapshotRead(Message):
    """Drop one read lock on each chunk of these ranges (seed 000
    ``FINISH_SNAPSHOT_READ``; no reply)."""

    type: ClassVar[Type] = Type.FINISH_SNAPSHOT_READ
    ranges: list[tuple[int, int]] = field(default_factory=list)

    def body(self) -> bytes:
        return encode_ranges(self.ranges)


@dataclass
class QuerySnapshotWrite(SnapshotRangeQuery):
    """Make snapshot ``snap``'s chunks ``first..last`` unique to it (seed 000
    ``QUERY_SNAPSHOT_WRITE``); the reply gives their store chunks."""

    type: ClassVar[Type] = Type.QUERY_SNAPSHOT_WRITE


@dataclass
class SnapshotWriteOk(Message):
    """The store chunk of each chunk of the query, in order (sent as runs)."""

    type: ClassVar[Type] = Type.SNAPSHOT_WRITE_OK
    chunks: list[int] = field(default_factory=list)

    def body(self) -> bytes:
        return encode_sources(list(self.chunks))


@dataclass
class UploadLock(Message):
    """After a server restart, a node re-declares what it holds (seed 000
    ``UPLOAD_LOCK``): read locks on these ranges (one per chunk per range) and
    ``origin_writes`` origin writes in flight.  No reply; may come several times."""

    type: ClassVar[Type] = Type.UPLOAD_LOCK
    ranges: list[tuple[int, int]] = field(default_factory=list)
    origin_writes: int = 0

    def body(self) -> bytes:
        return _U32.pack(self.origin_writes) + encode_ranges(self.ranges)


@dataclass
class FinishUploadLock(Message):
    """The node's uploads are complete; the reply (UPLOAD_OK) comes once the server
    has them all."""

    type: ClassVar[Type] = Type.FINISH_UPLOAD_LOCK


@dataclass
class UploadOk(Message):
    type: ClassVar[Type] = Type.UPLOAD_OK


@dataclass
class Call(Message):
    """A cold-path request as JSON: ``{"op": name, "args": {...}}`` (snapshot list,
    create, delete, merge control, status; the ops are listed in docs/protocol.md)."""

    type: ClassVar[Type] = Type.CALL
    op: str = ""
    args: dict = field(default_factory=dict)

    def body(self) -> bytes:
        return json.dumps({"op": self.op, "args": self.args}).encode()


@dataclass
class CallOk(Message):
    """A call's result as JSON: ``{"result": value}``."""

    type: ClassVar[Type] = Type.CALL_OK
    result: object = None

    def body(self) -> bytes:
        return json.dumps({"result": self.result}).encode()


@dataclass
class Notice(Message):
    """Server → node, unrequested: ``{"event": name, ...}`` as JSON (snapshot created or
    deleted, merge state, origin resized).  A non-zero id asks for a NOTICE_ACK once the
    node has applied it."""

    type: ClassVar[Type] = Type.NOTICE
    event: dict = field(default_factory=dict)

    def body(self) -> bytes:
        return json.dumps(self.event).encode()


@dataclass
class NoticeAck(Message):
    type: ClassVar[Type] = Type.NOTICE_ACK


@dataclass
class ReturnGrants(Message):
    """Node → server, no reply: the node gives back its origin-write grants; it holds
    none and has no granted write in flight (sent before an orderly close)."""

    type: ClassVar[Type] = Type.RETURN_GRANTS


# --- body pieces --------------------------------------------------------------------------


def describe_error(e: BaseException) -> tuple[str, int, str]:
    """``(class name, errno, message)`` of an exception, as ERROR carries it."""
    if isinstance(e, DdsnapError):
        return type(e).__name__, int(getattr(e, "errno", 5) or 5), str(e)
    if isinstance(e, OSError):
        return "HostIOError", e.errno or 5, str(e)
    return "DdsnapError", 5, f"{type(e).__name__}: {e}"


def rebuild_error(name: str, code: int, message: str) -> DdsnapError:
    """The error named ``name`` (DdsnapError for names this side does not know), with
    ``errno`` and message as sent."""
    cls = BY_NAME.get(name, DdsnapError)
    err = DdsnapError.__new__(cls)
    Exception.__init__(err, message)
    err.errno = code
    return err


def encode_error(name: str, code: int, message: str) -> bytes:
    n = name.encode()[:255]
    m = message.encode()[:65535]
    return _ERR_HEAD.pack(code, len(n)) + n + _U16.pack(len(m)) + m


def encode_ranges(ranges: list[tuple[int, int]]) -> bytes:
    return _U32.pack(len(ranges)) + b"".join(_RANGE.pack(a, b) for a, b in ranges)


def encode_sources(sources: list[int | None]) -> bytes:
    """Runs ``(u32 count, u64 first source)``: consecutive origin chunks, or store chunks
    that follow each other, make one run (csnap ``addto_response``)."""
    runs: list[bytes] = []
    n = len(sources)
    i = 0
    while i < n:
        s = sources[i]
        j = i + 1
        if s is None:
            while j < n and sources[j] is None:
                j += 1
            runs.append(_RUN.pack(j - i, ORIGIN))
        else:
            while j < n and sources[j] == s + (j - i):
                j += 1
            runs.append(_RUN.pack(j - i, s))
        i = j
    return _U32.pack(len(runs)) + b"".join(runs)


def coalesce(chunks: list[int]) -> list[tuple[int, int]]:
    """Sorted chunk numbers as inclusive ranges of consecutive chunks (a chunk listed
    twice gives two ranges, so counts survive)."""
    out: list[tuple[int, int]] = []
    for c in chunks:
        if out and out[-1][1] + 1 == c:
            out[-1] = (out[-1][0], c)
        else:
            out.append((c, c))
    return out


class _Reader:
    """A cursor over one body; every shortfall is a :class:`ProtocolError`."""

    __slots__ = ("at", "buf", "what")

    def __init__(self, buf: bytes | memoryview, what: str):
        self.buf = buf
        self.at = 0
        self.what = what

    def take(self, st: struct.Struct) -> tuple:
        if self.at + st.size > len(self.buf):
            raise _bad(f"{self.what} body is too short")
        v = st.unpack_from(self.buf, self.at)
        self.at += st.size
        return v

    def raw(self, n: int) -> bytes:
        if self.at + n > len(self.buf):
            raise _bad(f"{self.what} body is too short")
        v = bytes(self.buf[self.at:self.at + n])
        self.at += n
        return v

    def text(self, n: int) -> str:
        try:
            return self.raw(n).decode()
        except UnicodeDecodeError:
            raise _bad(f"{self.what} has text that is not UTF-8") from None

    def end(self) -> None:
        if self.at != len(self.buf):
            raise _bad(f"{self.what} body has {len(self.buf) - self.at} bytes too many")

    def ranges(self) -> list[tuple[int, int]]:
        (n,) = self.take(_U32)
        if n > MAX_RANGES:
            raise _bad(f"{self.what} has {n} ranges (at most {MAX_RANGES})")
        if self.at + n * _RANGE.size > len(self.buf):
            raise _bad(f"{self.what} body is too short for {n} ranges")
        out = [_RANGE.unpack_from(self.buf, self.at + k * _RANGE.size) for k in range(n)]
        self.at += n * _RANGE.size
        for a, b in out:
            if a > b:
                raise _bad(f"{self.what} has range {a}..{b} (first after last)")
        return out

    def sources(self, limit: int) -> list[int | None]:
        (n,) = self.take(_U32)
        if self.at + n * _RUN.size > len(self.buf):
            raise _bad(f"{self.what} body is too short for {n} runs")
        out: list[int | None] = []
        for k in range(n):
            count, s = _RUN.unpack_from(self.buf, self.at + k * _RUN.size)
            if count == 0 or len(out) + count > limit:
                raise _bad(f"{self.what} has a run of {count} chunks past {limit}")
            if s == ORIGIN:
                out.extend([None] * count)
            elif s + count > ORIGIN:
                raise _bad(f"{self.what} has a run past the last store chunk")
            else:
                out.extend(range(s, s + count))
        self.at += n * _RUN.size
        return out

    def error(self) -> tuple[str, int, str]:
        code, n = self.take(_ERR_HEAD)
        name = self.text(n)
        (m,) = self.take(_U16)
        return name, code, self.text(m)

    def json(self) -> object:
        try:
            return json.loads(bytes(self.buf[self.at:]))
        except (ValueError, UnicodeDecodeError):
            raise _bad(f"{self.what} body is not JSON") from None
        finally:
            self.at = len(self.buf)



def _chunk_range(r: _Reader, first: int, last: int) -> None:
    if first > last or last - first >= MAX_QUERY_CHUNKS:
        raise _bad(f"{r.what} range {first}..{last} is empty or over "
                   f"{MAX_QUERY_CHUNKS} chunks")


def decode(type_code: int, id: int, body: bytes | memoryview) -> Message:
    """The message of type ``type_code`` with this ``id`` and ``body``.

    Raises:
        ProtocolError: an unknown type, or a body that is not that message's layout
            (short, long, a range with first after last, a count over its limit, text
            that is not UTF-8, JSON that does not parse or is not an object).
    """
    try:
        t = Type(type_code)
    except ValueError:
        raise _bad(f"unknown message type {type_code:#06x}") from None
    r = _Reader(body, t.name)
    msg: Message
    if t is Type.IDENTIFY:
        low, high, uuid, n = r.take(_IDENTIFY)
        msg = Identify(id, low, high, uuid, r.text(n))
    elif t is Type.IDENTIFY_OK:
        version, node, uuid, cs, size, gen = r.take(_IDENTIFY_OK)
        msg = IdentifyOk(id, version, node, uuid, cs, size, gen)
    elif t is Type.ERROR:
        msg = ErrorReply(id, *r.error())
    elif t is Type.QUERY_ORIGIN_WRITE:
        ranges = r.ranges()
        if not ranges:
            raise _bad("QUERY_ORIGIN_WRITE has no range")
        msg = QueryOriginWrite(id, ranges)
    elif t is Type.ORIGIN_WRITE_OK:
        (granted,) = r.raw(1)
        if granted not in (0, 1):
            raise _bad(f"ORIGIN_WRITE_OK has grant flag {granted}")
        (n,) = r.take(_U32)
        if n > MAX_RANGES:
            raise _bad(f"ORIGIN_WRITE_OK has {n} results (at most {MAX_RANGES})")
        results: list[tuple[str, int, str] | None] = []
        for _ in range(n):
            (flag,) = r.raw(1)
            if flag == 0:
                results.append(None)
            elif flag == 1:
                results.append(r.error())
            else:
                raise _bad(f"ORIGIN_WRITE_OK has result flag {flag}")
        msg = OriginWriteOk(id, results, bool(granted))
    elif t is Type.FINISH_ORIGIN_WRITE:
        (count,) = r.take(_U32)
        if count == 0:
            raise _bad("FINISH_ORIGIN_WRITE counts no write")
        msg = FinishOriginWrite(id, count)
    elif t in (Type.QUERY_SNAPSHOT_READ, Type.QUERY_SNAPSHOT_WRITE):
        snap, first, last = r.take(_SNAP_RANGE)
        _chunk_range(r, first, last)
        cls = QuerySnapshotRead if t is Type.QUERY_SNAPSHOT_READ else QuerySnapshotWrite
        msg = cls(id, snap, first, last)
    elif t is Type.QUERY_ORIGIN_READ:
        first, last = r.take(_RANGE)
        _chunk_range(r, first, last)
        msg = QueryOriginRead(id, first, last)
    elif t in (Type.SNAPSHOT_READ_OK, Type.ORIGIN_READ_OK):
        (flag,) = r.raw(1)
        (first,) = r.take(_Q)
        allowed = ((0, MAP_PRESENT, MAP_PRESENT | MAP_CACHEABLE)
                   if t is Type.SNAPSHOT_READ_OK else (0, MAP_PRESENT))
        if flag not in allowed:
            raise _bad(f"{t.name} has map flags {flag:#04x}")
        sources = r.sources(MAX_QUERY_CHUNKS) if flag else None
        rcls = ReadMapReply if t is Type.SNAPSHOT_READ_OK else OriginReadMapReply
        msg = rcls(id, first, sources, bool(flag & MAP_CACHEABLE))
    elif t is Type.FINISH_SNAPSHOT_READ:
        msg = FinishSnapshotRead(id, r.ranges())
    elif t is Type.SNAPSHOT_WRITE_OK:
        chunks = r.sources(MAX_QUERY_CHUNKS)
        if any(c is None for c in chunks):
            raise _bad("SNAPSHOT_WRITE_OK maps a chunk to the origin")
        msg = SnapshotWriteOk(id, [c for c in chunks if c is not None])
    elif t is Type.UPLOAD_LOCK:
        (writes,) = r.take(_U32)
        msg = UploadLock(id, r.ranges(), writes)
    elif t in (Type.FINISH_UPLOAD_LOCK, Type.UPLOAD_OK, Type.NOTICE_ACK,
               Type.RETURN_GRANTS):
        msg = {Type.FINISH_UPLOAD_LOCK: FinishUploadLock, Type.UPLOAD_OK: UploadOk,
               Type.NOTICE_ACK: NoticeAck, Type.RETURN_GRANTS: ReturnGrants}[t](id)
    elif t is Type.CALL:
        d = r.json()
        if (not isinstance(d, dict) or not isinstance(d.get("op"), str)
                or not isinstance(d.get("args", {}), dict)):
            raise _bad("CALL is not {\"op\": name, \"args\": {...}}")
        msg = Call(id, d["op"], d.get("args", {}))
    elif t is Type.CALL_OK:
        d = r.json()
        if not isinstance(d, dict) or "result" not in d:
            raise _bad("CALL_OK is not {\"result\": value}")
        msg = CallOk(id, d["result"])
    else:  # NOTICE
        d = r.json()
        if not isinstance(d, dict) or not isinstance(d.get("event"), str):
            raise _bad("NOTICE is not {\"event\": name, ...}")
        msg = Notice(id, d)
    r.end()
    return msg
