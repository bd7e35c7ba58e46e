"""The sans-IO NBD protocol object, driven with hand-built byte sequences."""

from __future__ import annotations

import errno
import struct

import pytest

from ddsnap.errors import ProtocolError
from ddsnap.nbd import wire as P
from ddsnap.nbd.events import Abort, Event, ExportSelected, ProtocolViolation, Request
from ddsnap.nbd.protocol import ServerConnection, State
from ddsnap.nbd.wire import Command
from nbd_helpers import MiB, Registry, go_data, meta_data, option, request


class SizedExport:
    """An export stand-in with only the attributes the protocol object reads."""

    def __init__(self, name: str, size: int, read_only: bool = False):
        self.name = name
        self.size = size
        self.read_only = read_only


def registry() -> Registry:
    return Registry(SizedExport("origin", 1 * MiB), SizedExport("snap", 1 * MiB, True),
                    SizedExport("big", 128 * MiB))


def out(conn: ServerConnection) -> bytes:
    return b"".join(conn.data_to_send())


def option_replies(data: bytes) -> list[tuple[int, int, bytes]]:
    """Split server output into (option, reply type, payload) triples."""
    replies = []
    while data:
        magic, opt, rtype, length = struct.unpack(">QIII", data[:20])
        assert magic == P.OPTION_REPLY_MAGIC
        replies.append((opt, rtype, data[20:20 + length]))
        data = data[20 + length:]
    return replies


def requests(events: list[Event]) -> list[Request]:
    """``events``, every one of which must be a transmission-phase :class:`Request`."""
    reqs = [e for e in events if isinstance(e, Request)]
    assert len(reqs) == len(events), events
    return reqs


def handshake(conn: ServerConnection, flags: int = P.FLAG_C_FIXED_NEWSTYLE | P.FLAG_C_NO_ZEROES):
    """Consume the greeting and send client flags."""
    greeting = out(conn)
    assert greeting == struct.pack(">QQH", P.NBDMAGIC, P.IHAVEOPT,
                                   P.FLAG_FIXED_NEWSTYLE | P.FLAG_NO_ZEROES)
    assert conn.receive_data(struct.pack(">I", flags)) == []


def connected(export: str = "origin", structured: bool = False, meta: bool = False,
              reg=None) -> ServerConnection:
    """A connection in the transmission phase, output drained."""
    conn = ServerConnection(reg or registry())
    handshake(conn)
    data = b""
    if structured:
        data += option(P.OPT_STRUCTURED_REPLY)
    if meta:
        data += option(P.OPT_SET_META_CONTEXT, meta_data(export, [P.BASE_ALLOCATION]))
    data += option(P.OPT_GO, go_data(export))
    events = conn.receive_data(data)
    assert len(events) == 1 and isinstance(events[0], ExportSelected)
    out(conn)
    assert conn.state is State.TRANSMISSION
    return conn


def simple(data: bytes) -> list[tuple[int, int]]:
    """Split output made only of simple replies into (handle, error) pairs."""
    replies = []
    while data:
        magic, error, handle = struct.unpack(">IIQ", data[:16])
        assert magic == P.SIMPLE_REPLY_MAGIC
        replies.append((handle, error))
        data = data[16:]
    return replies


def chunks(data: bytes) -> list[dict]:
    """Split output made of structured chunks."""
    result = []
    while data:
        magic, flags, rtype, handle, length = struct.unpack(">IHHQI", data[:20])
        assert magic == P.STRUCTURED_REPLY_MAGIC
        result.append({"flags": flags, "type": rtype, "handle": handle,
                       "payload": data[20:20 + length]})
        data = data[20 + length:]
    return result


# --- handshake ---------------------------------------------------------------------------


def test_greeting_is_queued_on_construction():
    conn = ServerConnection(registry())
    assert out(conn) == (b"NBDMAGIC" + b"IHAVEOPT" + b"\x00\x03")
    assert conn.state is State.HANDSHAKE


def test_unknown_client_flags_are_fatal():
    conn = ServerConnection(registry())
    out(conn)
    events = conn.receive_data(struct.pack(">I", 0x4 | P.FLAG_C_FIXED_NEWSTYLE))
    assert len(events) == 1 and isinstance(events[0], ProtocolViolation)
    assert isinstance(events[0].error, ProtocolError)
    assert conn.state is State.CLOSED
    assert conn.receive_data(option(P.OPT_LIST)) == []


@pytest.mark.parametrize("no_zeroes", [False, True])
def test_export_name_replies_size_flags_and_maybe_zeroes(no_zeroes):
    conn = ServerConnection(registry())
    flags = P.FLAG_C_FIXED_NEWSTYLE | (P.FLAG_C_NO_ZEROES if no_zeroes else 0)
    handshake(conn, flags)
    events = conn.receive_data(option(P.OPT_EXPORT_NAME, b"snap"))
    assert [type(e) for e in events] == [ExportSelected]
    sel = events[0]
    assert isinstance(sel, ExportSelected)  # as the line above says
    assert sel.name == "snap" and sel.size == 1 * MiB
    reply = out(conn)
    assert len(reply) == (10 if no_zeroes else 134)
    size, tflags = struct.unpack(">QH", reply[:10])
    assert size == 1 * MiB
    assert tflags & P.FLAG_READ_ONLY and tflags & P.FLAG_HAS_FLAGS
    assert reply[10:] == bytes(len(reply) - 10)
    assert conn.state is State.TRANSMISSION


def test_export_name_empty_selects_default_export():
    conn = ServerConnection(registry())
    handshake(conn)
    (event,) = conn.receive_data(option(P.OPT_EXPORT_NAME))
    assert isinstance(event, ExportSelected)
    assert event.name == "origin"


def test_export_name_unknown_hangs_up_without_reply():
    conn = ServerConnection(registry())
    handshake(conn)
    (event,) = conn.receive_data(option(P.OPT_EXPORT_NAME, b"nope"))
    assert isinstance(event, ProtocolViolation)
    assert out(conn) == b""


def test_client_without_fixed_newstyle_may_only_use_export_name():
    conn = ServerConnection(registry())
    handshake(conn, flags=0)
    (event,) = conn.receive_data(option(P.OPT_LIST))
    assert isinstance(event, ProtocolViolation)

    conn = ServerConnection(registry())
    handshake(conn, flags=0)
    (event,) = conn.receive_data(option(P.OPT_EXPORT_NAME, b"origin"))
    assert isinstance(event, ExportSelected)
    assert len(out(conn)) == 134


def test_bad_option_magic_is_fatal():
    conn = ServerConnection(registry())
    handshake(conn)
    (event,) = conn.receive_data(struct.pack(">QII", 0x1234, P.OPT_LIST, 0))
    assert isinstance(event, ProtocolViolation)


def test_list_sends_every_export_then_ack():
    conn = ServerConnection(registry())
    handshake(conn)
    assert conn.receive_data(option(P.OPT_LIST)) == []
    replies = option_replies(out(conn))
    names = [r[2][4:].decode() for r in replies if r[1] == P.REP_SERVER]
    assert names == ["origin", "snap", "big"]
    for _opt, _rtype, data in replies[:-1]:
        assert struct.unpack(">I", data[:4])[0] == len(data) - 4
    assert replies[-1][:2] == (P.OPT_LIST, P.REP_ACK)
    assert all(r[0] == P.OPT_LIST for r in replies)


def test_list_with_data_is_invalid():
    conn = ServerConnection(registry())
    handshake(conn)
    conn.receive_data(option(P.OPT_LIST, b"x"))
    assert [r[1] for r in option_replies(out(conn))] == [P.REP_ERR_INVALID]


def test_info_describes_export_and_stays_in_handshake():
    conn = ServerConnection(registry())
    handshake(conn)
    events = conn.receive_data(option(P.OPT_INFO, go_data("", (P.INFO_NAME, P.INFO_BLOCK_SIZE,
                                                                 P.INFO_DESCRIPTION, 999))))
    assert events == []
    assert conn.state is State.HANDSHAKE
    replies = option_replies(out(conn))
    assert all(r[0] == P.OPT_INFO for r in replies)
    assert replies[-1][1] == P.REP_ACK
    infos = {struct.unpack(">H", r[2][:2])[0]: r[2] for r in replies if r[1] == P.REP_INFO}
    _t, size, tflags = struct.unpack(">HQH", infos[P.INFO_EXPORT])
    assert size == 1 * MiB
    assert not tflags & P.FLAG_READ_ONLY
    assert infos[P.INFO_NAME][2:] == b"origin"
    assert struct.unpack(">HIII", infos[P.INFO_BLOCK_SIZE])[1:] == (1, 4096, 32 * MiB)
    assert set(infos) == {P.INFO_EXPORT, P.INFO_NAME, P.INFO_BLOCK_SIZE}


def test_go_unknown_export_errors_and_negotiation_continues():
    conn = ServerConnection(registry())
    handshake(conn)
    assert conn.receive_data(option(P.OPT_GO, go_data("missing"))) == []
    replies = option_replies(out(conn))
    assert [r[:2] for r in replies] == [(P.OPT_GO, P.REP_ERR_UNKNOWN)]
    assert b"missing" in replies[0][2]
    assert conn.state is State.HANDSHAKE
    (event,) = conn.receive_data(option(P.OPT_GO, go_data("snap")))
    assert isinstance(event, ExportSelected) and event.name == "snap"
    replies = option_replies(out(conn))
    assert replies[-1][1] == P.REP_ACK
    assert conn.export_name == "snap"


@pytest.mark.parametrize("payload", [
    b"\x00\x00",                                        # shorter than 6 bytes
    struct.pack(">I", 100) + b"origin" + b"\x00\x00",   # name overruns
    struct.pack(">I", 6) + b"origin" + b"\x00\x02\x00\x01",  # count says 2, has 1
    struct.pack(">I", 2) + b"\xff\xfe" + b"\x00\x00",   # name not UTF-8
])
def test_go_malformed_is_invalid(payload):
    conn = ServerConnection(registry())
    handshake(conn)
    assert conn.receive_data(option(P.OPT_GO, payload)) == []
    assert [r[1] for r in option_replies(out(conn))] == [P.REP_ERR_INVALID]
    assert conn.state is State.HANDSHAKE


def test_unknown_option_is_skipped_and_the_stream_kept():
    conn = ServerConnection(registry())
    handshake(conn)
    stream = option(99, bytes(range(256)) * 3) + option(P.OPT_STARTTLS) + option(P.OPT_LIST)
    events = []
    for i in range(0, len(stream), 7):  # awkward fragments
        events += conn.receive_data(stream[i:i + 7])
    assert events == []
    replies = option_replies(out(conn))
    assert replies[0][:2] == (99, P.REP_ERR_UNSUP)
    assert replies[1][:2] == (P.OPT_STARTTLS, P.REP_ERR_UNSUP)
    assert [r[1] for r in replies[2:]] == [P.REP_SERVER] * 3 + [P.REP_ACK]


def test_oversized_known_option_is_skipped_with_too_big():
    conn = ServerConnection(registry())
    handshake(conn)
    conn.receive_data(option(P.OPT_GO, bytes(P.MAX_OPTION_LENGTH + 1)))
    conn.receive_data(option(P.OPT_LIST))
    replies = option_replies(out(conn))
    assert replies[0][:2] == (P.OPT_GO, P.REP_ERR_TOO_BIG)
    assert replies[-1][:2] == (P.OPT_LIST, P.REP_ACK)


def test_oversized_export_name_is_fatal():
    conn = ServerConnection(registry())
    handshake(conn)
    (event,) = conn.receive_data(struct.pack(">QII", P.IHAVEOPT, P.OPT_EXPORT_NAME, 1 << 20))
    assert isinstance(event, ProtocolViolation)


def test_abort_acks_and_ends_input():
    conn = ServerConnection(registry())
    handshake(conn)
    events = conn.receive_data(option(P.OPT_ABORT) + option(P.OPT_LIST))
    assert events == [Abort()]
    assert option_replies(out(conn)) == [(P.OPT_ABORT, P.REP_ACK, b"")]
    assert conn.state is State.CLOSED
    assert conn.receive_data(option(P.OPT_LIST)) == []


def test_structured_reply_option():
    conn = ServerConnection(registry())
    handshake(conn)
    conn.receive_data(option(P.OPT_STRUCTURED_REPLY, b"junk"))
    assert [r[1] for r in option_replies(out(conn))] == [P.REP_ERR_INVALID]
    assert not conn.structured_replies
    conn.receive_data(option(P.OPT_STRUCTURED_REPLY))
    assert [r[1] for r in option_replies(out(conn))] == [P.REP_ACK]
    assert conn.structured_replies


def test_meta_context_needs_structured_replies():
    conn = ServerConnection(registry())
    handshake(conn)
    conn.receive_data(option(P.OPT_LIST_META_CONTEXT, meta_data("", [])))
    conn.receive_data(option(P.OPT_SET_META_CONTEXT, meta_data("", [P.BASE_ALLOCATION])))
    assert [r[1] for r in option_replies(out(conn))] == [P.REP_ERR_INVALID] * 2


def _meta(conn, opt, name, queries):
    conn.receive_data(option(opt, meta_data(name, queries)))
    return option_replies(out(conn))


@pytest.mark.parametrize("queries,listed", [
    ([], True),
    (["base:"], True),
    (["base:allocation"], True),
    (["base:other"], False),
    (["qemu:dirty-bitmap:x"], False),
    (["qemu:dirty-bitmap:x", "base:"], True),
])
def test_list_meta_context(queries, listed):
    conn = ServerConnection(registry())
    handshake(conn)
    conn.receive_data(option(P.OPT_STRUCTURED_REPLY))
    out(conn)
    replies = _meta(conn, P.OPT_LIST_META_CONTEXT, "origin", queries)
    assert replies[-1][1] == P.REP_ACK
    contexts = [r[2] for r in replies if r[1] == P.REP_META_CONTEXT]
    if listed:
        assert contexts == [struct.pack(">I", 0) + b"base:allocation"]
    else:
        assert contexts == []


def test_meta_context_errors():
    conn = ServerConnection(registry())
    handshake(conn)
    conn.receive_data(option(P.OPT_STRUCTURED_REPLY))
    out(conn)
    assert _meta(conn, P.OPT_LIST_META_CONTEXT, "origin", ["nocolon"])[0][1] == P.REP_ERR_INVALID
    assert _meta(conn, P.OPT_SET_META_CONTEXT, "gone", [P.BASE_ALLOCATION])[0][1] \
        == P.REP_ERR_UNKNOWN
    # a query length running past the option is invalid
    bad = meta_data("origin", []) [:-4] + struct.pack(">II", 1, 50) + b"base:"
    conn.receive_data(option(P.OPT_SET_META_CONTEXT, bad))
    assert option_replies(out(conn))[0][1] == P.REP_ERR_INVALID


def test_set_meta_context_selects_base_allocation_only_by_exact_name():
    conn = ServerConnection(registry())
    handshake(conn)
    conn.receive_data(option(P.OPT_STRUCTURED_REPLY))
    out(conn)
    replies = _meta(conn, P.OPT_SET_META_CONTEXT, "origin", ["base:"])
    assert [r[1] for r in replies] == [P.REP_ACK]
    replies = _meta(conn, P.OPT_SET_META_CONTEXT, "origin",
                    ["x-foo:bar", P.BASE_ALLOCATION, P.BASE_ALLOCATION])
    assert [r[1] for r in replies] == [P.REP_META_CONTEXT, P.REP_ACK]
    assert replies[0][2] == struct.pack(">I", P.BASE_ALLOCATION_ID) + b"base:allocation"


# --- ddsnap:changed:FROM contexts (issue 13) ---------------------------------------------


class ChangedExport(SizedExport):
    """An export offering ``ddsnap:changed:FROM``: ``changed_base`` knows the snapshots
    of its registry (the token is ``("base", name)``); never asked for a status here."""

    def __init__(self, name: str, size: int, snapshots: list[str]):
        super().__init__(name, size)
        self.snapshots = snapshots

    def changed_base(self, name: str):
        return ("base", name) if name in self.snapshots else None

    def changed_status(self, base, offset: int, length: int):
        raise AssertionError("the protocol object never calls the backend")


class SnapshotRegistry(Registry):
    """A :class:`Registry` that also lists snapshot names (``snapshot_names``)."""

    def __init__(self, snapshots: list[str]):
        self.snapshots = snapshots
        super().__init__(ChangedExport("origin", 1 * MiB, snapshots),
                         ChangedExport("s1", 1 * MiB, snapshots))

    def snapshot_names(self) -> list[str]:
        return list(self.snapshots)


def structured_conn(reg) -> ServerConnection:
    conn = ServerConnection(reg)
    handshake(conn)
    conn.receive_data(option(P.OPT_STRUCTURED_REPLY))
    out(conn)
    return conn


@pytest.mark.parametrize("queries,listed", [
    ([], ["base:allocation", "ddsnap:changed:s1", "ddsnap:changed:s2"]),
    (["ddsnap:"], ["ddsnap:changed:s1", "ddsnap:changed:s2"]),
    (["ddsnap:changed:"], ["ddsnap:changed:s1", "ddsnap:changed:s2"]),
    (["ddsnap:changed:s2"], ["ddsnap:changed:s2"]),
    (["ddsnap:changed:nope", "ddsnap:other"], []),
    (["ddsnap:changed:s2", "base:", "ddsnap:", "base:allocation"],
     ["ddsnap:changed:s2", "base:allocation", "ddsnap:changed:s1"]),
])
def test_list_meta_context_lists_a_changed_context_per_snapshot(queries, listed):
    conn = structured_conn(SnapshotRegistry(["s1", "s2"]))
    replies = _meta(conn, P.OPT_LIST_META_CONTEXT, "s1", queries)
    assert replies[-1][1] == P.REP_ACK
    assert [r[2] for r in replies if r[1] == P.REP_META_CONTEXT] == [
        struct.pack(">I", 0) + name.encode() for name in listed]


def test_set_meta_context_selects_changed_contexts_by_exact_name_only():
    reg = SnapshotRegistry(["s1", "s2"])
    conn = structured_conn(reg)
    # wildcards and unknown snapshots select nothing (the spec: ignore them)
    replies = _meta(conn, P.OPT_SET_META_CONTEXT, "s1",
                    ["ddsnap:", "ddsnap:changed:", "ddsnap:changed:nope"])
    assert [r[1] for r in replies] == [P.REP_ACK]
    replies = _meta(conn, P.OPT_SET_META_CONTEXT, "s1",
                    ["ddsnap:changed:s2", P.BASE_ALLOCATION, "ddsnap:changed:s1",
                     "ddsnap:changed:s2"])
    assert [(r[1], r[2]) for r in replies] == [
        (P.REP_META_CONTEXT, struct.pack(">I", 2) + b"ddsnap:changed:s2"),
        (P.REP_META_CONTEXT, struct.pack(">I", 1) + b"base:allocation"),
        (P.REP_META_CONTEXT, struct.pack(">I", 3) + b"ddsnap:changed:s1"),
        (P.REP_ACK, b"")]
    # resolved at SET: the registry changing afterwards does not change what is selected
    reg.snapshots.clear()
    conn.receive_data(option(P.OPT_GO, go_data("s1")))
    out(conn)
    assert [(c.id, c.name, c.base) for c in conn.meta_contexts] == [
        (2, "ddsnap:changed:s2", ("base", "s2")), (1, "base:allocation", None),
        (3, "ddsnap:changed:s1", ("base", "s1"))]


def test_set_meta_context_refuses_too_many_and_empty_namespaces():
    names = [f"s{i}" for i in range(P.MAX_META_CONTEXTS + 1)]
    conn = structured_conn(SnapshotRegistry(names))
    replies = _meta(conn, P.OPT_SET_META_CONTEXT, "origin",
                    ["ddsnap:changed:" + n for n in names[:-1]])
    assert len(replies) == P.MAX_META_CONTEXTS + 1 and replies[-1][1] == P.REP_ACK
    replies = _meta(conn, P.OPT_SET_META_CONTEXT, "origin",
                    ["ddsnap:changed:" + n for n in names])
    assert [r[1] for r in replies] == [P.REP_ERR_TOO_BIG]
    replies = _meta(conn, P.OPT_SET_META_CONTEXT, "origin", [":changed:s1"])
    assert [r[1] for r in replies] == [P.REP_ERR_INVALID]
    # a failed SET leaves nothing selected: BLOCK_STATUS is refused
    conn.receive_data(option(P.OPT_GO, go_data("origin")))
    out(conn)
    assert conn.meta_contexts == () and not conn.meta_context_enabled
    conn.receive_data(request(1, Command.BLOCK_STATUS, 0, 4096))
    (chunk,) = chunks(out(conn))
    assert chunk["type"] == P.REPLY_TYPE_ERROR
    assert struct.unpack(">I", chunk["payload"][:4])[0] == P.NBD_EINVAL


def test_export_without_changed_contexts_offers_none():
    # the plain registry lists no snapshots: base:allocation only, as before
    conn = structured_conn(registry())
    replies = _meta(conn, P.OPT_LIST_META_CONTEXT, "origin", ["ddsnap:"])
    assert [r[1] for r in replies] == [P.REP_ACK]
    replies = _meta(conn, P.OPT_SET_META_CONTEXT, "origin", ["ddsnap:changed:s1"])
    assert [r[1] for r in replies] == [P.REP_ACK]


def test_block_status_reply_has_a_chunk_per_context():
    conn = ServerConnection(SnapshotRegistry(["s1"]))
    handshake(conn)
    conn.receive_data(option(P.OPT_STRUCTURED_REPLY)
                      + option(P.OPT_SET_META_CONTEXT,
                               meta_data("origin", [P.BASE_ALLOCATION, "ddsnap:changed:s1"]))
                      + option(P.OPT_GO, go_data("origin")))
    out(conn)
    req = _one(conn, request(9, Command.BLOCK_STATUS, 0, 8192, flags=P.CMD_FLAG_REQ_ONE))
    conn.send_block_status(req, [(4096, 3), (4096, 0)], P.BASE_ALLOCATION_ID, done=False)
    conn.send_block_status(req, [(4096, 0), (4096, 1)], P.CHANGED_FIRST_ID)
    first, last = chunks(out(conn))
    assert (first["flags"], last["flags"]) == (0, P.REPLY_FLAG_DONE)
    assert first["handle"] == last["handle"] == 9
    assert struct.unpack(">III", first["payload"]) == (P.BASE_ALLOCATION_ID, 4096, 3)
    assert struct.unpack(">III", last["payload"]) == (P.CHANGED_FIRST_ID, 4096, 0)


# --- transmission flags ------------------------------------------------------------------


def test_transmission_flags_read_write_and_read_only():
    rw = connected("origin").transmission_flags
    for flag in (P.FLAG_HAS_FLAGS, P.FLAG_SEND_FLUSH, P.FLAG_SEND_FUA, P.FLAG_SEND_TRIM,
                 P.FLAG_SEND_WRITE_ZEROES, P.FLAG_CAN_MULTI_CONN, P.FLAG_SEND_CACHE,
                 P.FLAG_SEND_FAST_ZERO):
        assert rw & flag
    assert not rw & (P.FLAG_READ_ONLY | P.FLAG_SEND_DF)  # DF needs structured replies
    assert connected("origin", structured=True).transmission_flags & P.FLAG_SEND_DF
    ro = connected("snap").transmission_flags
    assert ro & P.FLAG_READ_ONLY and ro & P.FLAG_HAS_FLAGS
    assert not ro & (P.FLAG_SEND_TRIM | P.FLAG_SEND_WRITE_ZEROES | P.FLAG_SEND_FUA)


# --- requests ----------------------------------------------------------------------------


def test_requests_are_parsed_from_fragments():
    conn = connected("origin")
    stream = (request(1, Command.READ, 4096, 512)
              + request(2, Command.WRITE, 8192, 5, flags=P.CMD_FLAG_FUA, data=b"hello")
              + request(3, Command.FLUSH)
              + request(4, Command.TRIM, 0, 4096)
              + request(5, Command.WRITE_ZEROES, 0, 4096,
                        flags=P.CMD_FLAG_NO_HOLE | P.CMD_FLAG_FAST_ZERO)
              + request(6, Command.CACHE, 0, 65536)
              + request(7, Command.DISC)
              + request(8, Command.READ, 0, 1))  # after DISC: ignored
    events: list[Request] = []
    for b in stream:
        events += requests(conn.receive_data(bytes([b])))
    assert [(e.handle, e.command) for e in events] == [
        (1, Command.READ), (2, Command.WRITE), (3, Command.FLUSH), (4, Command.TRIM),
        (5, Command.WRITE_ZEROES), (6, Command.CACHE), (7, Command.DISC)]
    assert events[0].offset == 4096 and events[0].length == 512 and events[0].data == b""
    assert events[1].data == b"hello" and events[1].fua
    assert events[4].no_hole and events[4].fast_zero and not events[4].fua
    assert conn.state is State.CLOSED
    assert out(conn) == b""  # the protocol object answered nothing itself


def test_max_events_bounds_what_is_handed_out():
    conn = connected("origin")
    stream = b"".join(request(h, Command.READ, 0, 512) for h in range(5))
    assert [e.handle for e in requests(conn.receive_data(stream, max_events=2))] == [0, 1]
    assert [e.handle for e in requests(conn.receive_data(max_events=2))] == [2, 3]
    assert conn.receive_data(max_events=0) == []
    assert [e.handle for e in requests(conn.receive_data())] == [4]
    assert conn.receive_data() == []


@pytest.mark.parametrize("req,err", [
    (request(1, 42, 0, 512), P.NBD_EINVAL),                                  # unknown
    (request(1, 8, 0, 512), P.NBD_EINVAL),                                   # RESIZE
    (request(1, Command.READ, 0, 512, flags=P.CMD_FLAG_REQ_ONE), P.NBD_EINVAL),
    (request(1, Command.READ, 0, 512, flags=1 << 9), P.NBD_EINVAL),          # unknown flag
    (request(1, Command.READ, 0, 512, flags=P.CMD_FLAG_DF), P.NBD_EINVAL),   # no SR
    (request(1, Command.TRIM, 0, 512, flags=P.CMD_FLAG_NO_HOLE), P.NBD_EINVAL),
    (request(1, Command.READ, 0, 0), P.NBD_EINVAL),                          # length 0
    (request(1, Command.TRIM, 0, 0), P.NBD_EINVAL),
    (request(1, Command.READ, MiB - 512, 1024), P.NBD_EINVAL),               # past end
    (request(1, Command.READ, 2**64 - 1, 1), P.NBD_EINVAL),
    (request(1, Command.CACHE, MiB, 1), P.NBD_EINVAL),
    (request(1, Command.TRIM, MiB, 4096), P.NBD_EINVAL),
    (request(1, Command.WRITE_ZEROES, MiB - 1, 2), P.NBD_ENOSPC),
    (request(1, Command.FLUSH, 4096, 0), P.NBD_EINVAL),
    (request(1, Command.BLOCK_STATUS, 0, 4096), P.NBD_EINVAL),               # no context
])
def test_invalid_requests_get_an_error_and_the_stream_continues(req, err):
    conn = connected("origin")
    events = requests(conn.receive_data(req + request(2, Command.READ, 0, 512)))
    assert [(e.handle, e.command) for e in events] == [(2, Command.READ)]
    assert simple(out(conn)) == [(1, err)]
    assert conn.state is State.TRANSMISSION


def test_refused_write_payload_is_discarded():
    conn = connected("origin")
    payload = b"\xee" * 1024
    stream = (request(1, Command.WRITE, MiB - 512, 1024, data=payload)    # past end
              + request(2, Command.WRITE, 0, 3, flags=P.CMD_FLAG_DF, data=b"abc")  # bad flag
              + request(3, Command.WRITE, 0, 4, data=b"good"))
    events: list[Request] = []
    for i in range(0, len(stream), 100):
        events += requests(conn.receive_data(stream[i:i + 100]))
    assert [(e.handle, e.data) for e in events] == [(3, b"good")]
    assert simple(out(conn)) == [(1, P.NBD_ENOSPC), (2, P.NBD_EINVAL)]


def test_write_longer_than_max_block_size_is_discarded_then_refused():
    conn = connected("big")
    length = P.MAX_BLOCK_SIZE + 1
    assert conn.receive_data(request(1, Command.WRITE, 0, length)) == []
    chunk = bytes(1 * MiB)
    for _ in range(length // len(chunk)):
        assert conn.receive_data(chunk) == []
    events = requests(conn.receive_data(bytes(length % len(chunk)) + request(2, Command.FLUSH)))
    assert [(e.handle, e.command) for e in events] == [(2, Command.FLUSH)]
    assert simple(out(conn)) == [(1, P.NBD_EINVAL)]


def test_read_longer_than_max_block_size_is_refused():
    conn = connected("big")
    conn.receive_data(request(1, Command.READ, 0, P.MAX_BLOCK_SIZE + 1))
    assert simple(out(conn)) == [(1, P.NBD_EINVAL)]
    (event,) = requests(conn.receive_data(request(2, Command.READ, 0, P.MAX_BLOCK_SIZE)))
    assert event.length == P.MAX_BLOCK_SIZE
    # TRIM and WRITE_ZEROES carry no payload: no such limit
    events = requests(conn.receive_data(request(3, Command.TRIM, 0, 64 * MiB)
                                        + request(4, Command.WRITE_ZEROES, 0, 64 * MiB)))
    assert [e.handle for e in events] == [3, 4]


def test_huge_write_payload_is_fatal():
    conn = connected("big")
    (event,) = conn.receive_data(request(1, Command.WRITE, 0, P.MAX_DISCARD_PAYLOAD + 1))
    assert isinstance(event, ProtocolViolation)
    assert conn.state is State.CLOSED


def test_read_only_export_refuses_writes_with_eperm():
    conn = connected("snap")
    events = conn.receive_data(request(1, Command.WRITE, 0, 4, data=b"data")
                               + request(2, Command.TRIM, 0, 4096)
                               + request(3, Command.WRITE_ZEROES, 0, 4096)
                               + request(4, Command.READ, 0, 4096)
                               + request(5, Command.FLUSH))
    assert [e.handle for e in requests(events)] == [4, 5]
    assert simple(out(conn)) == [(1, P.NBD_EPERM), (2, P.NBD_EPERM), (3, P.NBD_EPERM)]


def test_bad_request_magic_is_fatal():
    conn = connected("origin")
    bad = struct.pack(">IHHQQI", 0x12345678, 0, 0, 1, 0, 512)
    events = conn.receive_data(request(1, Command.READ, 0, 512) + bad
                               + request(2, Command.READ, 0, 512))
    assert isinstance(events[0], Request)
    assert isinstance(events[1], ProtocolViolation) and len(events) == 2
    assert "magic" in str(events[1].error)
    assert conn.state is State.CLOSED
    assert conn.receive_data(request(3, Command.READ, 0, 512)) == []


# --- replies -----------------------------------------------------------------------------


def _one(conn, req_bytes):
    (event,) = conn.receive_data(req_bytes)
    return event


def test_simple_replies():
    conn = connected("origin")
    read = _one(conn, request(7, Command.READ, 512, 4))
    conn.send_read_data(read, b"abcd")
    assert out(conn) == struct.pack(">IIQ", P.SIMPLE_REPLY_MAGIC, 0, 7) + b"abcd"
    conn.send_error(read, errno.ENOSPC)
    assert simple(out(conn)) == [(7, P.NBD_ENOSPC)]  # no data after a READ error
    write = _one(conn, request(8, Command.WRITE, 0, 1, data=b"x"))
    conn.send_ok(write)
    assert simple(out(conn)) == [(8, 0)]
    with pytest.raises(ValueError):
        conn.send_read_data(read, b"abc")


def test_structured_read_is_one_offset_data_chunk_with_done():
    conn = connected("origin", structured=True)
    read = _one(conn, request(9, Command.READ, 4096, 6, flags=P.CMD_FLAG_DF))
    assert read.df
    conn.send_read_data(read, b"abcdef")
    (chunk,) = chunks(out(conn))
    assert chunk["type"] == P.REPLY_TYPE_OFFSET_DATA
    assert chunk["flags"] == P.REPLY_FLAG_DONE and chunk["handle"] == 9
    assert chunk["payload"] == struct.pack(">Q", 4096) + b"abcdef"


def test_structured_ok_and_error_chunks():
    conn = connected("origin", structured=True)
    flush = _one(conn, request(3, Command.FLUSH))
    conn.send_ok(flush)
    (chunk,) = chunks(out(conn))
    assert (chunk["type"], chunk["flags"], chunk["payload"]) == (P.REPLY_TYPE_NONE,
                                                                 P.REPLY_FLAG_DONE, b"")
    conn.send_error(flush, errno.EBUSY, "disk on fire")  # not an NBD error -> EIO
    (chunk,) = chunks(out(conn))
    assert chunk["type"] == P.REPLY_TYPE_ERROR and chunk["flags"] == P.REPLY_FLAG_DONE
    err, mlen = struct.unpack(">IH", chunk["payload"][:6])
    assert err == P.NBD_EIO and chunk["payload"][6:6 + mlen] == b"disk on fire"


def test_structured_errors_for_invalid_requests():
    conn = connected("origin", structured=True)
    conn.receive_data(request(4, Command.READ, MiB, 512))
    (chunk,) = chunks(out(conn))
    assert chunk["type"] == P.REPLY_TYPE_ERROR and chunk["handle"] == 4
    assert struct.unpack(">I", chunk["payload"][:4])[0] == P.NBD_EINVAL
    assert b"beyond" in chunk["payload"]


def test_block_status_needs_context_for_the_same_export():
    conn = ServerConnection(registry())
    handshake(conn)
    conn.receive_data(option(P.OPT_STRUCTURED_REPLY)
                      + option(P.OPT_SET_META_CONTEXT, meta_data("snap", [P.BASE_ALLOCATION]))
                      + option(P.OPT_GO, go_data("origin")))
    out(conn)
    assert not conn.meta_context_enabled
    assert conn.receive_data(request(1, Command.BLOCK_STATUS, 0, 4096)) == []
    assert chunks(out(conn))[0]["type"] == P.REPLY_TYPE_ERROR


def test_block_status_reply():
    conn = connected("origin", structured=True, meta=True)
    assert conn.meta_context_enabled
    req = _one(conn, request(5, Command.BLOCK_STATUS, 0, 12288))
    conn.send_block_status(req, [(4096, 0), (4096, 3), (4096, 3), (0, 0), (99999, 0)])
    (chunk,) = chunks(out(conn))
    assert chunk["type"] == P.REPLY_TYPE_BLOCK_STATUS and chunk["flags"] == P.REPLY_FLAG_DONE
    ctx, *pairs = struct.unpack(f">{len(chunk['payload']) // 4}I", chunk["payload"])
    assert ctx == P.BASE_ALLOCATION_ID
    # merged where flags repeat, capped at the request length
    assert pairs == [4096, 0, 8192, 3]


def test_block_status_req_one_and_empty_answers():
    conn = connected("origin", structured=True, meta=True)
    req = _one(conn, request(6, Command.BLOCK_STATUS, 0, 8192, flags=P.CMD_FLAG_REQ_ONE))
    assert req.req_one
    conn.send_block_status(req, [(65536, 3), (4096, 0)])
    (chunk,) = chunks(out(conn))
    assert struct.unpack(">III", chunk["payload"]) == (P.BASE_ALLOCATION_ID, 8192, 3)
    conn.send_block_status(req, [])  # nothing usable: whole range, status 0 (always safe)
    (chunk,) = chunks(out(conn))
    assert struct.unpack(">III", chunk["payload"]) == (P.BASE_ALLOCATION_ID, 8192, 0)


def test_fast_zero_is_passed_to_the_server():
    conn = connected("origin")
    req = _one(conn, request(1, Command.WRITE_ZEROES, 0, 4096, flags=P.CMD_FLAG_FAST_ZERO))
    assert req.fast_zero
    conn.send_error(req, errno.ENOTSUP)
    assert simple(out(conn)) == [(1, P.NBD_ENOTSUP)]


def test_errno_mapping():
    expected = {errno.EPERM: 1, errno.EIO: 5, errno.ENOMEM: 12, errno.EINVAL: 22,
                errno.ENOSPC: 28, errno.EOVERFLOW: 75, errno.ENOTSUP: 95,
                errno.ESHUTDOWN: 108, errno.EDQUOT: 28, errno.EFBIG: 28,
                errno.ENOENT: 5, errno.EBUSY: 5, 0: 5, None: 5}
    for err, nbd in expected.items():
        assert P.errno_to_nbd(err) == nbd, err
