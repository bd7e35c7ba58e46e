"""The csnap metadata protocol, sans-IO: one end of a connection, bytes in, messages out.

:class:`Connection` is either end of a metadata connection (``Role.SERVER``: the
metadata server; ``Role.NODE``: a worker or client node), in the style of h11 and of
:class:`ddsnap.nbd.protocol.ServerConnection`: it never touches a socket.  The transport
feeds it what arrived (:meth:`~Connection.receive_data`), takes complete messages out
(:meth:`~Connection.next_message`) and turns messages into bytes to send
(:meth:`~Connection.send`).  Both ends enforce the same rules, so a broken peer is caught
at the message that broke them:

- every header has the magic, zero flags and a body of at most ``MAX_BODY`` bytes;
- each end sends only its own message types, and IDENTIFY (answered by IDENTIFY_OK or
  ERROR) comes first and once;
- a request that wants a reply uses an id not already in flight in its direction, and
  every reply answers a request in flight with that request's reply type or ERROR.

Layouts are in :mod:`ddsnap.csnap.wire`; the rules and the message list in
``docs/protocol.md`` ("The csnap metadata protocol").  Source of the idea: seed 000
(csnap's ``struct head`` framed messages, replies matched to requests).
"""

from __future__ import annotations

import enum

from ddsnap.errors import ProtocolError

from .wire import HEADER, MAGIC, MAX_BODY, REPLY, VERSION, IdentifyOk, Message, Type, decode

#: what each end may send
NODE_SENDS = frozenset({
    Type.IDENTIFY, Type.QUERY_ORIGIN_WRITE, Type.FINISH_ORIGIN_WRITE,
    Type.QUERY_SNAPSHOT_READ, Type.QUERY_ORIGIN_READ, Type.FINISH_SNAPSHOT_READ,
    Type.QUERY_SNAPSHOT_WRITE, Type.UPLOAD_LOCK, Type.FINISH_UPLOAD_LOCK, Type.CALL,
    Type.NOTICE_ACK, Type.RETURN_GRANTS})
SERVER_SENDS = frozenset({
    Type.IDENTIFY_OK, Type.ORIGIN_WRITE_OK, Type.SNAPSHOT_READ_OK, Type.ORIGIN_READ_OK,
    Type.SNAPSHOT_WRITE_OK, Type.UPLOAD_OK, Type.CALL_OK, Type.NOTICE, Type.ERROR})
#: requests answered by a reply (a NOTICE only when its id is not 0)
ANSWERED = frozenset({
    Type.IDENTIFY, Type.QUERY_ORIGIN_WRITE, Type.QUERY_SNAPSHOT_READ,
    Type.QUERY_ORIGIN_READ, Type.QUERY_SNAPSHOT_WRITE, Type.FINISH_UPLOAD_LOCK, Type.CALL,
    Type.NOTICE})


class Role(enum.Enum):
    SERVER = "server"
    NODE = "node"


class Connection:
    """One end of a csnap connection.

    Args:
        role: which end this is.

    Attributes:
        version: the protocol version agreed (None until IDENTIFY_OK went by).
        identified: IDENTIFY_OK has been sent (server) or received (node).
        eof: the peer closed its side (:meth:`receive_data` got ``b""``).
    """

    def __init__(self, role: Role):
        self.role = role
        self._sends = SERVER_SENDS if role is Role.SERVER else NODE_SENDS
        self._buf = bytearray()
        self.version: int | None = None
        self.identified = False
        self._identify_sent = False  # node: IDENTIFY went out; server: it came in
        self.eof = False
        #: ids of requests this end sent and awaits replies to: id -> request type
        self._mine: dict[int, Type] = {}
        #: ids of the peer's requests this end has not answered yet
        self._theirs: dict[int, Type] = {}

    # -- receiving -------------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Bytes from the peer; ``b""`` means the peer closed its side."""
        if not data:
            self.eof = True
        else:
            self._buf += data

    def next_message(self) -> Message | None:
        """The next complete message, or None until more bytes arrive.

        Raises:
            ProtocolError: bad magic or flags, a body over ``MAX_BODY``, a malformed
                body, a type this end may not receive, a message out of order, a reply
                to no request in flight, or a request id already in flight; also the
                peer closing in the middle of a message.  The connection is unusable
                after it.
        """
        buf = self._buf
        if len(buf) < HEADER.size:
            if self.eof and buf:
                raise ProtocolError("csnap peer closed the connection in a message header")
            return None
        magic, t, flags, length, id = HEADER.unpack_from(buf)
        if magic != MAGIC:
            raise ProtocolError(f"csnap message has magic {magic:#010x}, not {MAGIC:#010x}")
        if flags:
            raise ProtocolError(f"csnap message has flags {flags:#06x}; none are defined")
        if length > MAX_BODY:
            raise ProtocolError(f"csnap message body of {length} bytes is over the "
                                f"{MAX_BODY}-byte limit")
        end = HEADER.size + length
        if len(buf) < end:
            if self.eof:
                raise ProtocolError("csnap peer closed the connection in a message body")
            return None
        body = bytes(buf[HEADER.size:end])
        del buf[:end]
        msg = decode(t, id, body)
        self._check_incoming(msg)
        return msg

    def _check_incoming(self, msg: Message) -> None:
        t = msg.type
        if t in self._sends:
            raise ProtocolError(f"csnap {self.role.value} received {t.name}, which only "
                                f"a {self.role.value} sends")
        if self.role is Role.SERVER:
            if not self._identify_sent:
                if t is not Type.IDENTIFY:
                    raise ProtocolError(f"csnap node sent {t.name} before IDENTIFY")
                self._identify_sent = True
            elif t is Type.IDENTIFY:
                raise ProtocolError("csnap node sent IDENTIFY twice")
        elif not self.identified and t not in (Type.IDENTIFY_OK, Type.ERROR):
            raise ProtocolError(f"csnap server sent {t.name} before IDENTIFY_OK")
        if t & REPLY:  # a reply (ERROR included): it must answer a request in flight
            want = self._mine.pop(msg.id, None)
            if want is None or (t is not Type.ERROR and t != want | REPLY):
                raise ProtocolError(f"csnap {t.name} with id {msg.id} answers no request "
                                    "in flight")
            if isinstance(msg, IdentifyOk):
                self._agree(msg)
        elif t in ANSWERED and (t is not Type.NOTICE or msg.id):
            if msg.id in self._theirs:
                raise ProtocolError(f"csnap request id {msg.id} is already in flight")
            self._theirs[msg.id] = t

    def _agree(self, msg: IdentifyOk) -> None:
        if not (1 <= msg.version <= VERSION):
            raise ProtocolError(f"csnap server chose protocol version {msg.version}; this "
                                f"node speaks 1..{VERSION}")
        self.version = msg.version
        self.identified = True

    # -- sending ---------------------------------------------------------------------------

    def send(self, msg: Message) -> bytes:
        """The bytes of ``msg``, checked against the rules above.

        Raises:
            ValueError: this end may not send ``msg`` now (a bug on this side, never the
                peer's): a type of the other end, a request before IDENTIFY, an id
                already in flight, or a reply to nothing.
        """
        t = msg.type
        if t not in self._sends:
            raise ValueError(f"a csnap {self.role.value} does not send {t.name}")
        if t & REPLY:
            want = self._theirs.pop(msg.id, None)
            if want is None or (t is not Type.ERROR and t != want | REPLY):
                raise ValueError(f"{t.name} with id {msg.id} answers no request in flight")
            if isinstance(msg, IdentifyOk):
                self.version = msg.version
                self.identified = True
        else:
            if self.role is Role.NODE:
                if t is Type.IDENTIFY:
                    if self._identify_sent:
                        raise ValueError("IDENTIFY was sent already")
                    self._identify_sent = True
                elif not self.identified:
                    raise ValueError(f"{t.name} before IDENTIFY_OK")
            elif not self.identified:
                raise ValueError(f"{t.name} before IDENTIFY_OK")
            if t in ANSWERED and (t is not Type.NOTICE or msg.id):
                if msg.id in self._mine:
                    raise ValueError(f"request id {msg.id} is already in flight")
                self._mine[msg.id] = t
        return msg.encode()

    def in_flight(self) -> int:
        """Requests this end sent that are not answered yet."""
        return len(self._mine)
