"""The NBD server under load: a burst of connections, and clients that never read.

* 300 clients connect to ``ddsnap serve`` at once (while the server is stopped with
  SIGSTOP, so every connection waits in the listen backlog) and all complete the
  handshake: asyncio's default backlog of 100 refused the rest.
* Eight clients send many 1 MiB READs and never read a reply: the memory the server holds
  for them (``NbdServer.reply_bytes_held``) stays within the configured bound (plus what
  the bound's documentation allows: one request and the transport's high-water mark per
  connection), a client that reads its replies is still served meanwhile, and the total
  returns to 0 once they have gone.

Real sockets, a real store (``ddsnap init``), the real server; nothing is mocked and
nothing is timed: waits poll a condition up to a generous deadline.
"""

from __future__ import annotations

import os
import signal
import socket
import struct

import pytest

from ddsnap import admin
from ddsnap.daemon import Exports
from ddsnap.nbd import wire as P
from ddsnap.nbd.wire import Command
from nbd_helpers import RawClient, ServerThread, go_data, option, recv_exact
from served import MiB, Served, children, ok, wait_until

KiB = 1024


def make_store(dirpath, origin_size: int) -> tuple[str, bytes]:
    """``ddsnap init`` a store for a random origin of ``origin_size`` bytes."""
    origin = os.path.join(dirpath, "origin.img")
    data = os.urandom(origin_size)
    with open(origin, "wb") as f:
        f.write(data)
    store = os.path.join(dirpath, "store.img")
    ok("init", store, "--origin", origin, "--size", "16M")
    return store, data


def handshake(sock: socket.socket, export: str = "origin") -> int:
    """Fixed newstyle handshake with NBD_OPT_GO on a connected socket; the export's size."""
    greeting = recv_exact(sock, 18)
    assert greeting[:16] == struct.pack(">QQ", P.NBDMAGIC, P.IHAVEOPT)
    sock.sendall(struct.pack(">I", P.FLAG_C_FIXED_NEWSTYLE | P.FLAG_C_NO_ZEROES)
                 + option(P.OPT_GO, go_data(export)))
    size = None
    while True:
        magic, _opt, rtype, length = struct.unpack(">QIII", recv_exact(sock, 20))
        assert magic == P.OPTION_REPLY_MAGIC
        data = recv_exact(sock, length)
        if rtype == P.REP_INFO and struct.unpack(">H", data[:2])[0] == P.INFO_EXPORT:
            size = struct.unpack(">HQH", data)[1]
        elif rtype == P.REP_ACK:
            assert size is not None, "GO acknowledged without NBD_INFO_EXPORT"
            return size
        elif rtype & (1 << 31):
            raise AssertionError(f"GO answered error 0x{rtype:x}: {data!r}")


@pytest.mark.parametrize("workers", [0, 2], ids=["one-process", "workers"])
def test_a_burst_of_300_connections_all_complete_the_handshake(tmp_path, workers):
    store, data = make_store(tmp_path, 4 * MiB)
    clients: list[socket.socket] = []
    with Served(store, workers=workers) as srv:
        # Stopped, the server accepts nothing: all 300 connections wait in its backlog
        # (the one every worker accepts on, with the same length).
        stopped = [srv.pid] + ([p for n, p in children(srv.pid).items() if n != "meta"]
                               if workers else [])
        for pid in stopped:
            os.kill(pid, signal.SIGSTOP)
        try:
            for i in range(300):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                clients.append(s)
                s.setblocking(False)
                try:
                    s.connect(str(srv.sock))  # a full backlog refuses with EAGAIN
                except BlockingIOError:
                    pytest.fail(f"connection {i + 1} of 300 refused: the listen backlog "
                                "is full")
        finally:
            for pid in stopped:
                os.kill(pid, signal.SIGCONT)
        try:
            for s in clients:
                s.setblocking(True)
                s.settimeout(60)
                assert handshake(s) == len(data)
            # and every connection is served: one READ on each
            for i, s in enumerate(clients):
                offset = (i * 4096) % len(data)
                s.sendall(struct.pack(">IHHQQI", P.REQUEST_MAGIC, 0, Command.READ, i,
                                      offset, 512))
            for i, s in enumerate(clients):
                magic, error, handle = struct.unpack(">IIQ", recv_exact(s, 16))
                assert (magic, error, handle) == (P.SIMPLE_REPLY_MAGIC, 0, i)
                offset = (i * 4096) % len(data)
                assert recv_exact(s, 512) == data[offset:offset + 512]
        finally:
            for s in clients:
                s.close()


@pytest.fixture(params=["cached", "uncached"])
def served_store(tmp_path, request):
    """A real store served in-process with a 16 MiB reply-memory bound:
    ``(ServerThread, origin bytes, bound)``.

    ``cached``: the origin is in the page cache, so READs are answered on the event loop;
    ``uncached``: it was dropped from the page cache first, so READs go to worker threads
    until their data is cached.
    """
    store, data = make_store(tmp_path, 32 * MiB)
    if request.param == "uncached":
        fd = os.open(tmp_path / "origin.img", os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    opened = admin.open_store(store)
    bound = 16 * MiB
    st = ServerThread(Exports(opened.service, opened.service.data), [f"unix:{tmp_path}/nbd.sock"],
                      max_reply_memory=bound)
    try:
        yield st, data, bound
    finally:
        try:
            st.close()
        finally:
            opened.close()


async def _held(server) -> int:
    return server.reply_bytes_held


def test_clients_that_never_read_hold_at_most_the_bound(served_store):
    st, data, bound = served_store
    address = st.addresses[0]
    n_slow, per_client, size = 8, 64, 1 * MiB
    slow: list[RawClient] = []
    try:
        for c in range(n_slow):
            client = RawClient(address, "origin")
            slow.append(client)
            # 64 MiB asked for by each, 512 MiB in all; none of it is ever read
            client.sock.sendall(b"".join(
                struct.pack(">IHHQQI", P.REQUEST_MAGIC, 0, Command.READ, h,
                            ((c * per_client + h) * size) % len(data), size)
                for h in range(per_client)))
        # The server answers until it holds its bound (the kernel's socket buffers take
        # a little of it first) ...
        wait_until(lambda: st.run(_held(st.server)) >= bound,
                   "the slow clients to fill the server's reply memory")
        # ... and meanwhile a client that reads its replies is still served.
        normal = RawClient(address, "origin")
        try:
            for h in range(16):
                offset = (h * 3 * MiB + 4 * KiB) % (len(data) - size)
                normal.send(h, Command.READ, offset, size)
                reply = normal.read_reply({h: size})
                assert reply["error"] == 0 and reply["handle"] == h
                assert reply["data"] == data[offset:offset + size]
            held = st.run(_held(st.server))
            assert held >= bound  # the slow clients still hold theirs
            # What the bound allows beyond itself: per connection one request in flight
            # and the transport's high-water mark (docs of NbdServer.reply_bytes_peak).
            # Without the bound, each slow client alone would hold 5 MiB or more.
            allowance = (n_slow + 1) * (size + 64 * KiB)
            assert st.server.reply_bytes_peak <= bound + allowance, (
                st.server.reply_bytes_peak, bound + allowance)
        finally:
            normal.close()
    finally:
        for client in slow:
            client.close()
    # Once they have gone, nothing is held.
    wait_until(lambda: st.run(_held(st.server)) == 0,
               "the server to release the memory of the clients that left")
    wait_until(lambda: st.server.connection_count == 0, "the connections to end")
    # and the server still serves
    again = RawClient(address, "origin")
    try:
        again.send(1, Command.READ, 5 * MiB, size)
        assert again.read_reply({1: size})["data"] == data[5 * MiB:6 * MiB]
    finally:
        again.close()
    wait_until(lambda: st.run(_held(st.server)) == 0, "the last client's reply to go")


def _memory_mib(pid: int) -> dict[str, float]:
    """The process's resident memory now and at its peak (VmRSS, VmHWM), MiB."""
    with open(f"/proc/{pid}/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return {k: int(fields[k].split()[0]) / 1024 for k in ("VmRSS", "VmHWM")}


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc")
def test_served_memory_stays_near_the_bound_and_is_given_back(tmp_path):
    """``ddsnap serve --max-reply-memory 64M`` and eight clients asking for 4 MiB READs of
    an origin not in the page cache, without reading them: the process's resident memory
    grows by about the bound (each reply waits in its own buffer, in flight, instead of
    being copied into an ever larger transport buffer), and once the clients have gone
    it is given back to the system."""
    origin = tmp_path / "origin.img"
    with open(origin, "wb") as f:
        for i in range(256):
            f.write(bytes([i]) * MiB)
        f.flush()
        os.fsync(f.fileno())
        # uncached: READs go to worker threads (from the page cache they would be
        # answered on the event loop, which holds at most 4 MiB per connection)
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    store = tmp_path / "store.img"
    ok("init", store, "--origin", origin, "--size", "16M")
    bound_mib, size = 64, 4 * MiB
    # one process: the bound and the memory measured are that process's (a worker has
    # a bound of its own)
    with Served(store, extra=("--max-reply-memory", f"{bound_mib}M", "-v"),
                workers=0) as srv:
        base = _memory_mib(srv.pid)["VmRSS"]
        slow = []
        try:
            for c in range(8):
                client = RawClient(f"unix:{srv.sock}", "origin")
                slow.append(client)
                client.sock.sendall(b"".join(
                    struct.pack(">IHHQQI", P.REQUEST_MAGIC, 0, Command.READ, h,
                                ((c * 64 + h) * size) % (256 * MiB), size)
                    for h in range(64)))
            # the server says when it holds its bound
            wait_until(lambda: "bytes held for replies clients have not read"
                       in srv.output(), "the server to reach its reply-memory bound")
            # a client that reads is served meanwhile
            normal = RawClient(f"unix:{srv.sock}", "origin")
            try:
                normal.send(1, Command.READ, 5 * MiB, size)
                expected = b"".join(bytes([i]) * MiB for i in range(5, 9))
                assert normal.read_reply({1: size})["data"] == expected
            finally:
                normal.close()
        finally:
            for client in slow:
                client.close()
        wait_until(lambda: _memory_mib(srv.pid)["VmRSS"] <= base + 16,
                   "the server to give the memory back")
        peak = _memory_mib(srv.pid)["VmHWM"] - base
    # the bound, what it allows beyond it (a 4 MiB request per connection) and the
    # interpreter's own; handing every reply to the transport at once took 2.4x
    assert peak <= bound_mib * 1.75, f"peak RSS {peak:.0f} MiB above the start"
    assert peak >= bound_mib / 2, f"peak RSS {peak:.0f} MiB: the load did not happen"
