"""``NbdServer.statistics()``: what it reports about the server and each connection.

Real sockets, the real server on its own event loop thread (``nbd_helpers.ServerThread``),
raw NBD clients speaking the wire protocol; the exports are the in-memory ones of
``nbd_helpers``, whose backend calls a test can hold at a gate.  Nothing is timed: a test
waits for a condition up to a deadline (``served.wait_until``), or for a backend call to
be under way (``MemoryExport.wait_for``).
"""

from __future__ import annotations

import dataclasses
import os
import threading

import pytest

from ddsnap.errors import StoreFull
from ddsnap.nbd import wire as P
from ddsnap.nbd.wire import Command
from nbd_helpers import (
    KiB,
    MemoryExport,
    MiB,
    RawClient,
    Registry,
    ServerThread,
    connect,
    recv_exact,
    request,
)
from served import wait_until

SIZE = 8 * MiB
#: bytes of a request header, and of a simple reply's header
REQUEST, REPLY = 28, 16


@pytest.fixture
def origin():
    return MemoryExport("origin", SIZE)


@pytest.fixture
def srv(sockdir, origin):
    snap = MemoryExport("snap", SIZE, read_only=True)
    st = ServerThread(Registry(origin, snap), [f"unix:{sockdir}/nbd.sock", "tcp:127.0.0.1:0"])
    yield st
    st.close()


def test_connections_appear_with_their_peer_and_export_and_go(srv, sockdir):
    stats = srv.statistics()
    assert stats.connections == () and stats.reply_bytes_held == 0
    raw = connect(srv.addresses[1])  # TCP, and no handshake yet
    try:
        assert recv_exact(raw, 18)[:8] == b"NBDMAGIC"
        (first,) = srv.statistics().connections
        host, port = raw.getsockname()
        assert first.peer == f"{host}:{port}"
        assert first.export is None
        assert (first.bytes_received, first.bytes_sent) == (0, 18)  # the greeting
        assert (first.requests_in_flight, first.bytes_in_flight, first.write_buffer_size,
                first.reply_bytes_held) == (0, 0, 0, 0)
        with pytest.raises(dataclasses.FrozenInstanceError):
            first.export = "origin"

        snap = RawClient(srv.addresses[0], "snap")
        default = RawClient(srv.addresses[0], "")  # the default export: origin
        try:
            conns = srv.statistics().connections
            assert [c.id for c in conns] == [first.id, first.id + 1, first.id + 2]
            assert [c.export for c in conns] == [None, "snap", "origin"]
            unix_peer = f"pid {os.getpid()} (uid {os.getuid()}) on unix:{sockdir}/nbd.sock"
            assert [c.peer for c in conns[1:]] == [unix_peer, unix_peer]
            assert all(c.bytes_received > 0 and c.bytes_sent > 18 for c in conns[1:])

            raw.close()
            wait_until(lambda: [c.id for c in srv.statistics().connections]
                       == [first.id + 1, first.id + 2], "the closed connection to go")
            with pytest.raises(KeyError):
                srv.call(srv.server.connection_socket, first.id)
        finally:
            snap.close()
            default.close()
        wait_until(lambda: srv.statistics().connections == (), "every connection to go")
    finally:
        raw.close()


def test_requests_in_flight_while_the_backend_holds_them(srv, origin):
    origin.gate = threading.Event()  # READs and WRITEs wait for it in the backend
    c = RawClient(srv.addresses[0], "origin")
    try:
        (before,) = srv.statistics().connections
        assert (before.requests_in_flight, before.bytes_in_flight) == (0, 0)
        c.send(1, Command.WRITE, 0, 64 * KiB, data=b"\x01" * (64 * KiB))
        c.send(2, Command.READ, 1 * MiB, 8 * KiB)
        c.send(3, Command.FLUSH)  # waits for the WRITE before it
        origin.wait_for(lambda e: e.active == 2)
        # nothing can complete while the gate is shut: once all three are in flight,
        # they stay so
        held = wait_until(
            lambda: next((s for s in srv.statistics().connections
                          if s.requests_in_flight == 3), None),
            "the WRITE, READ and FLUSH to be in flight")
        assert held.bytes_in_flight == 64 * KiB + 8 * KiB  # WRITE payload, READ buffer
        assert held.reply_bytes_held == held.bytes_in_flight + held.write_buffer_size
        assert held.bytes_received - before.bytes_received == 3 * REQUEST + 64 * KiB
        assert held.bytes_sent == before.bytes_sent  # no reply yet
        assert srv.statistics().reply_bytes_held >= held.bytes_in_flight
        origin.gate.set()
        replies = [c.read_reply({2: 8 * KiB}) for _ in range(3)]
        assert sorted((r["handle"], r["error"]) for r in replies) == [(1, 0), (2, 0), (3, 0)]
        after = wait_until(
            lambda: next((s for s in srv.statistics().connections
                          if s.requests_in_flight == 0), None),
            "the requests to leave the in-flight count")
        assert (after.bytes_in_flight, after.write_buffer_size, after.reply_bytes_held) \
            == (0, 0, 0)
        assert after.bytes_sent - before.bytes_sent == 3 * REPLY + 8 * KiB
        assert srv.statistics().reply_bytes_held == 0
    finally:
        origin.gate.set()
        c.close()


def test_reply_bytes_held_for_a_client_that_does_not_read(sockdir):
    """A client asks for 48 MiB of READs and reads nothing: the server holds replies until
    it reaches its 4 MiB bound and says so; once the client reads them all, nothing is
    held."""
    exp = MemoryExport("origin", SIZE)
    exp.data[:] = bytes(range(256)) * (SIZE // 256)
    bound, n, size = 4 * MiB, 48, 1 * MiB
    st = ServerThread(Registry(exp), [f"unix:{sockdir}/r.sock"], max_reply_memory=bound)
    try:
        c = RawClient(st.addresses[0], "origin")
        try:
            (before,) = st.statistics().connections
            c.sock.sendall(b"".join(request(h, Command.READ, (h * size) % SIZE, size)
                                    for h in range(n)))

            def holding():
                s = st.statistics()
                if s.reply_memory_bound_reached and s.connections[0].write_buffer_size:
                    return s
                return None

            # (once the kernel's socket buffer is full, the transport's fills up)
            stats = wait_until(holding, "the server to reach its bound of unread replies")
            (conn,) = stats.connections
            assert stats.max_reply_memory == bound
            # The total reached the bound then (it may be lower now: replies handed over
            # since then went partly to the kernel).
            assert stats.reply_bytes_peak >= bound
            assert conn.reply_bytes_held == conn.bytes_in_flight + conn.write_buffer_size
            assert stats.reply_bytes_held == conn.reply_bytes_held  # the only connection
            # it stopped answering: not every reply was handed over
            assert conn.bytes_sent - before.bytes_sent < n * (REPLY + size)

            for _ in range(n):
                r = c.read_reply({h: size for h in range(n)})
                offset = (r["handle"] * size) % SIZE
                assert r["error"] == 0 and r["data"] == exp.data[offset:offset + size]
            after = wait_until(
                lambda: next((s for s in st.statistics().connections
                              if s.reply_bytes_held == 0 and s.requests_in_flight == 0),
                             None),
                "the server to hold nothing once the client read every reply")
            assert after.bytes_sent - before.bytes_sent == n * (REPLY + size)
            assert after.bytes_received - before.bytes_received == n * REQUEST
        finally:
            c.close()
        wait_until(lambda: st.statistics().connections == (), "the connection to end")
        stats = st.statistics()
        assert stats.reply_bytes_held == 0 and not stats.reply_memory_bound_reached
        assert stats.reply_bytes_peak >= bound
    finally:
        st.close()


def test_enospc_episode(srv, origin):
    c = RawClient(srv.addresses[0], "origin")
    try:
        stats = srv.statistics()
        assert (stats.enospc_episode, stats.enospc_unlogged) == (False, 0)
        for handle in (1, 2, 3):
            origin.fail_next = StoreFull()
            c.send(handle, Command.WRITE, 0, 4, data=b"full")
            assert c.read_reply()["error"] == P.NBD_ENOSPC
            # (the episode is counted before the error is answered)
            stats = srv.statistics()
            assert (stats.enospc_episode, stats.enospc_unlogged) == (True, handle - 1)
        c.send(4, Command.WRITE, 0, 4, data=b"room")
        assert c.read_reply()["error"] == 0
        stats = srv.statistics()
        assert (stats.enospc_episode, stats.enospc_unlogged) == (False, 0)
    finally:
        c.close()
