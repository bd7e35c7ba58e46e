"""The csnap metadata protocol's sans-IO core, byte by byte: layouts as docs/protocol.md
gives them, every message surviving encode and decode, and every way a peer can break
the rules refused with ProtocolError (the connection is then dropped by its owner)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ddsnap.csnap import wire
from ddsnap.csnap.protocol import Connection, Role
from ddsnap.csnap.wire import (
    MAGIC,
    ORIGIN,
    Call,
    CallOk,
    ErrorReply,
    FinishOriginWrite,
    FinishSnapshotRead,
    FinishUploadLock,
    Identify,
    IdentifyOk,
    Notice,
    NoticeAck,
    OriginReadMapReply,
    OriginWriteOk,
    QueryOriginRead,
    QueryOriginWrite,
    QuerySnapshotRead,
    QuerySnapshotWrite,
    ReadMapReply,
    ReturnGrants,
    SnapshotWriteOk,
    Type,
    UploadLock,
    UploadOk,
)
from ddsnap.errors import ProtocolError, SnapshotNotFound, StoreFull

U64 = st.integers(0, (1 << 64) - 2)


def header(t: int, length: int, id: int, flags: int = 0, magic: int = MAGIC) -> bytes:
    return struct.pack(">IHHIQ", magic, t, flags, length, id)


def pair() -> tuple[Connection, Connection]:
    """A server and a node end, identified."""
    server, node = Connection(Role.SERVER), Connection(Role.NODE)
    server.receive_data(node.send(Identify(1, name="n")))
    assert isinstance(server.next_message(), Identify)
    node.receive_data(server.send(IdentifyOk(1, 1, 7, bytes(16), 4096, 1 << 20, 0)))
    assert isinstance(node.next_message(), IdentifyOk)
    return server, node


def test_header_and_query_origin_write_bytes():
    """20-byte header (magic, type, flags, length, id), then u32 count and u64 pairs."""
    b = QueryOriginWrite(0x0102030405060708, [(1, 2), (10, 10)]).encode()
    assert b[:20] == (b"csnp" + b"\x00\x02" + b"\x00\x00" + b"\x00\x00\x00\x24"
                      + bytes.fromhex("0102030405060708"))
    assert b[20:] == (b"\x00\x00\x00\x02" + (1).to_bytes(8, "big") + (2).to_bytes(8, "big")
                      + (10).to_bytes(8, "big") + (10).to_bytes(8, "big"))


def test_origin_write_ok_bytes():
    """u8 grant flag, u32 count, then per result 0 (prepared) or 1 and the error."""
    b = OriginWriteOk(3, [None, ("StoreFull", 28, "full")], granted=True).body()
    assert b == (b"\1" + b"\0\0\0\2" + b"\0" + b"\1" + struct.pack(">IH", 28, 9)
                 + b"StoreFull" + struct.pack(">H", 4) + b"full")
    assert OriginWriteOk(3, [None]).body() == b"\0\0\0\0\1\0"
    assert ReturnGrants(0).encode() == b"csnp\x00\x0c" + bytes(14)


def test_read_map_is_sent_as_runs():
    """Origin chunks make one run (source all ones), store chunks that follow each other
    one run (csnap addto_response): 6 chunks here are 3 runs."""
    b = ReadMapReply(5, 100, [None, None, 7, 8, 9, 3]).body()
    assert b[0] == 1 and struct.unpack(">Q", b[1:9]) == (100,)
    assert struct.unpack(">I", b[9:13]) == (3,)
    runs = [struct.unpack(">IQ", b[13 + 12 * i: 25 + 12 * i]) for i in range(3)]
    assert runs == [(2, ORIGIN), (3, 7), (1, 3)]
    assert len(b) == 13 + 36
    # no map at all (no merge): flag 0 and the first chunk only
    assert OriginReadMapReply(5, 9, None).body() == b"\0" + (9).to_bytes(8, "big")
    # a map the node may keep: flag bit 1 as well, the rest alike
    kept = ReadMapReply(5, 100, [None, None, 7, 8, 9, 3], cacheable=True).body()
    assert kept[0] == 3 and kept[1:] == b[1:]
    assert wire.decode(Type.SNAPSHOT_READ_OK, 5, kept) == ReadMapReply(
        5, 100, [None, None, 7, 8, 9, 3], cacheable=True)
    assert wire.decode(Type.SNAPSHOT_READ_OK, 5, b) == ReadMapReply(
        5, 100, [None, None, 7, 8, 9, 3], cacheable=False)


def test_error_reply_bytes_and_rebuilt_class():
    b = ErrorReply.of(3, StoreFull()).body()
    assert b[:4] == (28).to_bytes(4, "big")  # ENOSPC
    n = int.from_bytes(b[4:6], "big")
    assert b[6:6 + n] == b"StoreFull"
    e = wire.decode(Type.ERROR, 3, b)
    assert isinstance(e, ErrorReply)
    err = e.exception()
    assert isinstance(err, StoreFull) and err.errno == 28 and "full" in str(err)
    # a class this side does not know still arrives as a DdsnapError with its errno
    odd = wire.decode(Type.ERROR, 3, wire.encode_error("FutureError", 5, "later"))
    assert isinstance(odd, ErrorReply)
    assert type(odd.exception()).__name__ == "DdsnapError"


MESSAGES = st.one_of(
    st.builds(Identify, U64, st.integers(0, 65535), st.integers(0, 65535),
              st.binary(min_size=16, max_size=16), st.text(max_size=20)),
    st.builds(IdentifyOk, U64, st.integers(0, 65535), st.integers(0, (1 << 32) - 1),
              st.binary(min_size=16, max_size=16), st.integers(0, (1 << 32) - 1), U64,
              st.integers(0, (1 << 32) - 1)),
    st.builds(ErrorReply, U64, st.sampled_from(["StoreFull", "SnapshotNotFound"]),
              st.integers(0, 200), st.text(max_size=50)),
    st.builds(QueryOriginWrite, U64, st.lists(st.tuples(U64, U64).map(sorted).map(tuple),
                                              min_size=1, max_size=5)),
    st.builds(OriginWriteOk, U64, st.lists(st.none() | st.tuples(
        st.just("StoreFull"), st.integers(0, 200), st.text(max_size=10)), max_size=5),
        st.booleans()),
    st.builds(ReturnGrants, U64),
    st.builds(FinishOriginWrite, U64, st.integers(1, (1 << 32) - 1)),
    st.builds(QuerySnapshotRead, U64, st.integers(0, (1 << 32) - 1), st.just(5),
              st.integers(5, 100)),
    st.builds(QuerySnapshotWrite, U64, st.integers(0, (1 << 32) - 1), st.just(0),
              st.integers(0, 100)),
    st.builds(QueryOriginRead, U64, st.just(3), st.integers(3, 50)),
    st.builds(ReadMapReply, U64, U64, st.none() | st.lists(
        st.none() | st.integers(0, 1 << 40), min_size=1, max_size=40)),
    st.builds(ReadMapReply, U64, U64, st.lists(
        st.none() | st.integers(0, 1 << 40), min_size=1, max_size=40), st.booleans()),
    st.builds(OriginReadMapReply, U64, U64, st.none() | st.lists(
        st.none() | st.integers(0, 1 << 40), min_size=1, max_size=40)),
    st.builds(FinishSnapshotRead, U64, st.lists(st.tuples(U64, U64).map(sorted).map(tuple),
                                                max_size=5)),
    st.builds(SnapshotWriteOk, U64, st.lists(st.integers(0, 1 << 40), max_size=40)),
    st.builds(UploadLock, U64, st.lists(st.tuples(U64, U64).map(sorted).map(tuple),
                                        max_size=5), st.integers(0, 1000)),
    st.builds(FinishUploadLock, U64), st.builds(UploadOk, U64), st.builds(NoticeAck, U64),
    st.builds(Call, U64, st.text(max_size=10), st.dictionaries(
        st.text(max_size=5), st.integers() | st.text(max_size=5), max_size=3)),
    st.builds(CallOk, U64, st.none() | st.integers() | st.lists(st.integers(), max_size=3)),
    st.builds(Notice, U64, st.fixed_dictionaries({"event": st.text(max_size=10)})),
)


@given(MESSAGES)
def test_every_message_survives_encode_and_decode(msg):
    b = msg.encode()
    magic, t, flags, length, id = struct.unpack(">IHHIQ", b[:20])
    assert (magic, t, flags, length, id) == (MAGIC, msg.type, 0, len(b) - 20, msg.id)
    back = wire.decode(t, id, b[20:])
    assert back == msg
    assert type(back) is type(msg)


NODE_MESSAGES = st.lists(st.one_of(
    st.builds(FinishOriginWrite, U64, st.integers(1, 9)),
    st.builds(FinishSnapshotRead, U64, st.lists(st.tuples(U64, U64).map(sorted).map(tuple),
                                                max_size=3)),
    st.builds(UploadLock, U64, st.lists(st.tuples(U64, U64).map(sorted).map(tuple),
                                        max_size=3), st.integers(0, 9)),
    st.builds(QueryOriginWrite, st.just(0), st.lists(st.tuples(U64, U64).map(sorted)
                                                     .map(tuple), min_size=1, max_size=3)),
), max_size=6)


@given(NODE_MESSAGES, st.data())
def test_messages_fed_in_pieces_come_out_once_each(msgs, data):
    """Framing: the bytes of several messages arrive in any split; each message comes out
    once, when complete, in order."""
    for i, m in enumerate(msgs):
        if isinstance(m, QueryOriginWrite):
            m.id = 1000 + i  # requests in flight need distinct ids
    server, _node = pair()
    b = b"".join(m.encode() for m in msgs)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(b)), max_size=5)))
    got = []
    for lo, hi in zip([0, *cuts], [*cuts, len(b)], strict=True):
        if hi > lo:
            server.receive_data(b[lo:hi])
        while (m := server.next_message()) is not None:
            got.append(m)
    assert got == msgs


BAD_BODIES = [
    (Type.QUERY_ORIGIN_WRITE, b"\0\0\0\0", "no range"),
    (Type.QUERY_ORIGIN_WRITE, b"\0\0\0\1" + struct.pack(">QQ", 5, 4), "first after last"),
    (Type.QUERY_ORIGIN_WRITE, b"\0\0\0\2" + struct.pack(">QQ", 1, 2), "too short"),
    (Type.QUERY_ORIGIN_WRITE, struct.pack(">I", wire.MAX_RANGES + 1), "ranges"),
    (Type.QUERY_SNAPSHOT_READ, struct.pack(">IQQ", 1, 9, 3), "empty"),
    (Type.QUERY_SNAPSHOT_READ, struct.pack(">IQQ", 1, 0, wire.MAX_QUERY_CHUNKS), "over"),
    (Type.QUERY_SNAPSHOT_READ, struct.pack(">IQQ", 1, 0, 3) + b"x", "too many"),
    (Type.FINISH_ORIGIN_WRITE, b"\0\0\0\0", "no write"),
    (Type.IDENTIFY, struct.pack(">HH16sH", 1, 1, bytes(16), 2) + b"\xff\xfe", "UTF-8"),
    (Type.CALL, b"{not json", "not JSON"),
    (Type.CALL, b'{"op": 3}', "op"),
    (Type.NOTICE, b"[]", "event"),
    (Type.SNAPSHOT_READ_OK, b"\2" + bytes(8), "map flag"),
    (Type.ORIGIN_READ_OK, b"\3" + bytes(8) + struct.pack(">IIQ", 1, 1, 5), "map flag"),
    (Type.SNAPSHOT_READ_OK, b"\1" + bytes(8) + struct.pack(">IIQ", 1, 0, 5), "run"),
    (Type.SNAPSHOT_WRITE_OK, struct.pack(">IIQ", 1, 2, ORIGIN), "origin"),
    (Type.ORIGIN_WRITE_OK, b"\0\0\0\0\1\7", "result flag"),
    (Type.ORIGIN_WRITE_OK, b"\2\0\0\0\0", "grant flag"),
    (Type.RETURN_GRANTS, b"\0", "too many"),
    (0x7777, b"", "unknown message type"),
]


@pytest.mark.parametrize(("t", "body", "why"), BAD_BODIES,
                         ids=[f"{t}-{why}" for t, _b, why in BAD_BODIES])
def test_malformed_bodies_are_refused(t, body, why):
    with pytest.raises(ProtocolError, match=why):
        wire.decode(t, 1, body)


@pytest.mark.parametrize(("raw", "why"), [
    (header(Type.IDENTIFY, 0, 1, magic=0x12345678), "magic"),
    (header(Type.IDENTIFY, 0, 1, flags=1), "flags"),
    (header(Type.IDENTIFY, wire.MAX_BODY + 1, 1), "limit"),
])
def test_bad_headers_are_refused(raw, why):
    conn = Connection(Role.SERVER)
    conn.receive_data(raw)
    with pytest.raises(ProtocolError, match=why):
        conn.next_message()


def test_a_peer_closing_mid_message_is_an_error_and_between_messages_is_not():
    conn = Connection(Role.SERVER)
    b = Identify(1).encode()
    conn.receive_data(b[:30])
    assert conn.next_message() is None
    conn.receive_data(b"")
    with pytest.raises(ProtocolError, match="closed the connection in a message body"):
        conn.next_message()
    clean = Connection(Role.SERVER)
    clean.receive_data(b"")
    assert clean.next_message() is None and clean.eof


def test_order_rules_on_the_server_side():
    # anything before IDENTIFY
    s = Connection(Role.SERVER)
    s.receive_data(QueryOriginWrite(1, [(0, 0)]).encode())
    with pytest.raises(ProtocolError, match="before IDENTIFY"):
        s.next_message()
    # IDENTIFY twice
    s, _n = pair()
    s.receive_data(Identify(9).encode())
    with pytest.raises(ProtocolError, match="IDENTIFY twice"):
        s.next_message()
    # a message only a server sends
    s, _n = pair()
    s.receive_data(Notice(0, {"event": "x"}).encode())
    with pytest.raises(ProtocolError, match="only a server sends"):
        s.next_message()
    # a request id already in flight
    s, _n = pair()
    s.receive_data(QuerySnapshotRead(4, 1, 0, 0).encode() * 2)
    assert s.next_message() is not None
    with pytest.raises(ProtocolError, match="already in flight"):
        s.next_message()
    # ... which is free again once answered
    s.send(ReadMapReply(4, 0, [None]))
    s.receive_data(QuerySnapshotRead(4, 1, 0, 0).encode())
    assert isinstance(s.next_message(), QuerySnapshotRead)
    # a reply to a notice nobody sent
    s, _n = pair()
    s.receive_data(NoticeAck(77).encode())
    with pytest.raises(ProtocolError, match="answers no request"):
        s.next_message()


def test_order_rules_on_the_node_side():
    n = Connection(Role.NODE)
    with pytest.raises(ValueError, match="before IDENTIFY_OK"):
        n.send(QueryOriginWrite(1, [(0, 0)]))
    n.send(Identify(1))
    with pytest.raises(ValueError, match="already"):
        n.send(Identify(2))
    # a server speaking before it answered IDENTIFY
    n.receive_data(Notice(0, {"event": "x"}).encode())
    with pytest.raises(ProtocolError, match="before IDENTIFY_OK"):
        n.next_message()
    # replies: to a request in flight, with the matching type or ERROR
    _s, n = pair()
    n.send(QuerySnapshotRead(5, 1, 0, 0))
    n.receive_data(SnapshotWriteOk(5, [1]).encode())
    with pytest.raises(ProtocolError, match="answers no request"):
        n.next_message()
    _s, n = pair()
    n.send(QuerySnapshotRead(5, 1, 0, 0))
    n.receive_data(ErrorReply.of(5, SnapshotNotFound("x")).encode())
    assert isinstance(n.next_message(), ErrorReply)
    assert n.in_flight() == 0
    # a version this node does not speak
    n = Connection(Role.NODE)
    n.send(Identify(1))
    n.receive_data(IdentifyOk(1, 9).encode())
    with pytest.raises(ProtocolError, match="version 9"):
        n.next_message()


def test_an_end_refuses_to_send_what_is_not_its_own():
    s, n = pair()
    with pytest.raises(ValueError, match="does not send"):
        s.send(QueryOriginWrite(1, [(0, 0)]))
    with pytest.raises(ValueError, match="does not send"):
        n.send(ReadMapReply(1, 0, [None]))
    with pytest.raises(ValueError, match="answers no request"):
        s.send(CallOk(99, None))


def test_coalesce_keeps_repeated_chunks():
    assert wire.coalesce([1, 2, 3, 7, 7, 8]) == [(1, 3), (7, 7), (7, 8)]
    assert wire.coalesce([]) == []
