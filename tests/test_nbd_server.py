"""The asyncio NBD server, driven by real NBD clients and by raw sockets.

The server runs on its own event loop thread, listening on a unix socket and on
tcp:127.0.0.1:0, serving bytearray-backed exports defined in ``nbd_helpers``.
"""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import socket
import struct
import subprocess
import threading

import pytest

from ddsnap.errors import InvalidArgument, ListenError, ReadOnlyVolume, StoreFull
from ddsnap.nbd import wire as P
from ddsnap.nbd.server import NbdServer, parse_listen
from ddsnap.nbd.wire import Command
from nbd_helpers import (
    KiB,
    MemoryExport,
    MiB,
    NowaitMemoryExport,
    RawClient,
    Registry,
    ServerThread,
    connect,
    option,
    recv_exact,
    request,
)

SIZE = 8 * MiB


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run an NBD client; skip the test if its binary is not installed."""
    if shutil.which(args[0]) is None:
        pytest.skip(f"{args[0]} is not installed")
    proc = subprocess.run(args, capture_output=True, text=True, timeout=60)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture
def origin():
    return MemoryExport("origin", SIZE)


@pytest.fixture
def snap():
    return MemoryExport("snap", SIZE, read_only=True, fill=0x5A)


@pytest.fixture
def srv(sockdir, origin, snap):
    st = ServerThread(Registry(origin, snap), [f"unix:{sockdir}/nbd.sock", "tcp:127.0.0.1:0"])
    yield st
    st.close()


def uri(st: ServerThread, export: str, transport: str = "unix") -> str:
    for address in st.addresses:
        kind, _, rest = address.partition(":")
        if kind == transport == "unix":
            return f"nbd+unix:///{export}?socket={rest}"
        if kind == transport == "tcp":
            return f"nbd://{rest}/{export}"
    raise AssertionError(f"no {transport} address in {st.addresses}")


def wait_closed(*exports: MemoryExport) -> None:
    """Every open() of the exports was matched by exactly one close()."""
    for e in exports:
        e.wait_for(lambda x: x.closes == x.opens)
        assert e.closes == e.opens


# --- listening ---------------------------------------------------------------------------


def test_addresses_report_the_bound_port(srv, sockdir):
    assert srv.addresses[0] == f"unix:{sockdir}/nbd.sock"
    host_port = srv.addresses[1]
    assert host_port.startswith("tcp:127.0.0.1:") and not host_port.endswith(":0")
    sock = connect(host_port)
    try:
        assert recv_exact(sock, 8) == b"NBDMAGIC"
        # the server's end of the connection has Nagle off
        (conn,) = srv.statistics().connections
        server_sock = srv.call(srv.server.connection_socket, conn.id)
        assert server_sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    finally:
        sock.close()


@pytest.mark.parametrize("bad", ["unix:", "tcp:127.0.0.1", "tcp:host:port", "http://x",
                                 "tcp:127.0.0.1:70000"])
def test_bad_listen_addresses(bad):
    with pytest.raises(InvalidArgument):
        parse_listen(bad)


def test_listen_address_forms():
    assert parse_listen("unix:/run/x.sock") == ("unix", "/run/x.sock")
    assert parse_listen("tcp:[::1]:10809") == ("tcp", ("::1", 10809))
    assert parse_listen("tcp::0") == ("tcp", (None, 0))


def test_live_unix_socket_is_not_stolen_but_a_stale_one_is_replaced(srv, sockdir, origin):
    path = f"{sockdir}/nbd.sock"
    with pytest.raises(ListenError) as info:
        ServerThread(Registry(origin), [f"unix:{path}"])
    assert info.value.errno == errno.EADDRINUSE and info.value.address == f"unix:{path}"
    assert os.path.exists(path)  # the running server keeps its socket

    stale = f"{sockdir}/stale.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(stale)
    s.close()  # a socket file nobody listens on
    st = ServerThread(Registry(origin), [f"unix:{stale}"])
    try:
        client = RawClient(st.addresses[0], "origin")
        client.close()
    finally:
        st.close()
    assert not os.path.exists(stale)  # removed on close


def test_listeners_bound_for_workers_queue_connections_before_anyone_accepts(sockdir):
    """``serve --workers`` binds its listeners and is ready (its control socket up)
    before a worker accepts: a client connecting meanwhile must wait, not be refused."""
    async def run():
        server = NbdServer(Registry(), None)
        await server.start([f"unix:{sockdir}/early.sock", "tcp:127.0.0.1:0"], serve=False)
        try:
            for addr in server.addresses:
                kind, where = parse_listen(addr)
                fam = socket.AF_UNIX if kind == "unix" else socket.AF_INET
                with socket.socket(fam) as c:
                    c.connect(where)  # (refused if the socket did not listen)
        finally:
            await server.close()

    asyncio.run(run())


# --- real clients ------------------------------------------------------------------------


@pytest.mark.clients
def test_nbdinfo_list(srv):
    out = run("nbdinfo", "--list", uri(srv, "")).stdout
    assert 'export="origin"' in out and 'export="snap"' in out
    assert "base:allocation" in out
    assert "block_size_minimum: 1" in out
    assert "block_size_preferred: 4096" in out
    assert f"block_size_maximum: {32 * MiB}" in out


@pytest.mark.clients
@pytest.mark.parametrize("what", ["flush", "fua", "trim", "zero", "df", "multi-conn",
                                  "cache", "fast-zero", "structured-reply"])
def test_nbdinfo_can(srv, what):
    assert run("nbdinfo", "--can", what, uri(srv, "origin", "tcp")).returncode == 0


@pytest.mark.clients
@pytest.mark.parametrize("what,expected", [("flush", 0), ("trim", 2), ("zero", 2),
                                           ("fua", 2), ("write", 2), ("cache", 0)])
def test_nbdinfo_can_on_read_only_export(srv, what, expected):
    assert run("nbdinfo", "--can", what, uri(srv, "snap"), check=False).returncode == expected


@pytest.mark.clients
def test_nbdinfo_is_read_only(srv):
    assert run("nbdinfo", "--is", "read-only", uri(srv, "snap")).returncode == 0
    assert run("nbdinfo", "--is", "read-only", uri(srv, "origin"),
               check=False).returncode == 2


@pytest.mark.clients
def test_nbdinfo_size_and_map(srv, origin):
    assert run("nbdinfo", "--size", uri(srv, "origin")).stdout.strip() == str(SIZE)
    origin.data[64 * KiB:128 * KiB] = b"\x01" * (64 * KiB)
    out = run("nbdinfo", "--map", uri(srv, "origin")).stdout.split("\n")
    rows = [line.split() for line in out if line.strip()]
    assert [r[:3] for r in rows] == [["0", str(64 * KiB), "3"],
                                     [str(64 * KiB), str(64 * KiB), "0"],
                                     [str(128 * KiB), str(SIZE - 128 * KiB), "3"]]


@pytest.mark.clients
def test_nbdinfo_unknown_export_fails_cleanly(srv):
    proc = run("nbdinfo", uri(srv, "nosuch"), check=False)
    assert proc.returncode != 0
    # the server is still fine
    assert run("nbdinfo", "--size", uri(srv, "snap")).stdout.strip() == str(SIZE)


@pytest.mark.clients
@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_qemu_io_pattern_write_and_verified_read(srv, origin, transport):
    target = uri(srv, "origin", transport)
    run("qemu-io", "-f", "raw", target,
        "-c", "write -P 0xab 0 64k",
        "-c", "write -P 0xcd 1M 256k",
        "-c", "write -z 1088k 64k",  # WRITE_ZEROES inside the 0xcd range
        "-c", "flush")
    assert origin.data[:64 * KiB] == b"\xab" * (64 * KiB)
    assert origin.data[MiB:MiB + 64 * KiB] == b"\xcd" * (64 * KiB)
    assert origin.data[MiB + 64 * KiB:MiB + 128 * KiB] == bytes(64 * KiB)
    assert origin.flushes >= 1
    out = run("qemu-io", "-f", "raw", target,
              "-c", "read -P 0xab 0 64k",
              "-c", "read -P 0 64k 64k",
              "-c", "read -P 0xcd 1M 64k",
              "-c", "read -P 0 1088k 64k",
              "-c", "read -P 0xcd 1152k 128k").stdout
    assert "Pattern verification failed" not in out
    assert out.count("read ") == 5
    # a wrong pattern is detected, so the checks above mean something
    out = run("qemu-io", "-f", "raw", target, "-c", "read -P 0x11 0 4k", check=False).stdout
    assert "Pattern verification failed" in out
    wait_closed(origin)


@pytest.mark.clients
def test_qemu_io_read_only_export(srv, snap):
    out = run("qemu-io", "-r", "-f", "raw", uri(srv, "snap", "tcp"),
              "-c", "read -P 0x5a 0 1M", "-c", f"read -P 0x5a {SIZE - 4096} 4k").stdout
    assert "Pattern verification failed" not in out and out.count("read ") == 2
    # qemu sees NBD_FLAG_READ_ONLY and refuses to open the export for writing
    proc = run("qemu-io", "-f", "raw", uri(srv, "snap"), "-c", "write -P 1 0 4k", check=False)
    assert proc.returncode != 0 and "wrote" not in proc.stdout
    assert "Permission denied" in proc.stderr
    assert snap.data[:4096] == b"\x5a" * 4096


def test_writes_to_a_read_only_export_fail_with_eperm(srv, snap):
    c = RawClient(srv.addresses[0], "snap", structured=True)
    try:
        c.send(1, Command.WRITE, 0, 4, data=b"nope")
        c.send(2, Command.TRIM, 0, 4096)
        c.send(3, Command.WRITE_ZEROES, 0, 4096)
        c.send(4, Command.FLUSH)
        errors = {r["handle"]: r["error"] for r in (c.read_reply() for _ in range(4))}
        assert errors == {1: P.NBD_EPERM, 2: P.NBD_EPERM, 3: P.NBD_EPERM, 4: 0}
        assert snap.data[:4096] == b"\x5a" * 4096
    finally:
        c.close()


def _image(path: str) -> bytes:
    """A raw image with data, zero holes and a partial sector pattern."""
    data = bytearray(SIZE)
    for i in range(0, SIZE, 512 * KiB):
        data[i:i + 100 * KiB] = bytes([(i // (512 * KiB)) % 251 + 1]) * (100 * KiB)
    data[SIZE - 777:] = os.urandom(777)
    with open(path, "wb") as f:
        f.write(data)
    return bytes(data)


@pytest.mark.clients
def test_qemu_img_convert_and_compare(srv, origin, sockdir):
    src = os.path.join(sockdir, "src.img")
    content = _image(src)
    origin.data[:] = b"\xff" * SIZE  # convert must overwrite the holes too
    run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", src, uri(srv, "origin"))
    assert bytes(origin.data) == content
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", src, uri(srv, "origin", "tcp"))
    back = os.path.join(sockdir, "back.img")
    run("qemu-img", "convert", "-f", "raw", "-O", "raw", uri(srv, "origin"), back)
    with open(back, "rb") as f:
        assert f.read() == content
    # compare notices a difference
    origin.data[5 * MiB] ^= 0xFF
    proc = run("qemu-img", "compare", "-f", "raw", "-F", "raw", src, uri(srv, "origin"),
               check=False)
    assert proc.returncode == 1
    wait_closed(origin)


@pytest.mark.clients
def test_nbdcopy_both_ways(srv, origin, snap, sockdir):
    src = os.path.join(sockdir, "src.img")
    content = _image(src)
    run("nbdcopy", "--flush", src, uri(srv, "origin"))
    assert bytes(origin.data) == content
    assert origin.flushes >= 1
    out = os.path.join(sockdir, "out.img")
    run("nbdcopy", uri(srv, "origin", "tcp"), out)
    with open(out, "rb") as f:
        assert f.read() == content
    run("nbdcopy", uri(srv, "snap"), out)
    with open(out, "rb") as f:
        assert f.read() == b"\x5a" * SIZE
    wait_closed(origin, snap)


# --- raw socket clients ------------------------------------------------------------------


def test_malformed_requests_then_a_good_one(srv, origin):
    origin.data[:4] = b"good"
    c = RawClient(srv.addresses[0], "origin")
    try:
        c.send(1, 42, 0, 512)                                    # unknown command
        c.send(2, Command.READ, 0, 512, flags=P.CMD_FLAG_REQ_ONE)  # invalid flag
        c.send(3, Command.WRITE, SIZE - 2, 4, data=b"oops")        # past the end
        c.send(4, Command.READ, 0, 4)
        replies = [c.read_reply({4: 4}) for _ in range(4)]
        by_handle = {r["handle"]: r for r in replies}
        assert by_handle[1]["error"] == P.NBD_EINVAL
        assert by_handle[2]["error"] == P.NBD_EINVAL
        assert by_handle[3]["error"] == P.NBD_ENOSPC
        assert by_handle[4]["error"] == 0 and by_handle[4]["data"] == b"good"
        assert origin.data[SIZE - 2:] == bytes(2)
        assert not [e for e in origin.log if e[0] == "write"]  # backend never saw them
    finally:
        c.close()
    wait_closed(origin)


def test_structured_replies_over_the_wire(srv, origin):
    origin.data[4096:8192] = b"\x07" * 4096
    c = RawClient(srv.addresses[1], "origin", structured=True, meta=True)
    try:
        c.send(1, Command.READ, 4090, 12, flags=P.CMD_FLAG_DF)
        r = c.read_reply()
        assert r["chunks"] == [(P.REPLY_TYPE_OFFSET_DATA, P.REPLY_FLAG_DONE)]
        assert r["offset"] == 4090 and r["data"] == bytes(6) + b"\x07" * 6
        c.send(2, Command.BLOCK_STATUS, 0, 16384)
        r = c.read_reply()
        assert r["context"] == P.BASE_ALLOCATION_ID
        assert r["extents"] == [(4096, 3), (4096, 0), (8192, 3)]
        c.send(3, Command.BLOCK_STATUS, 0, 16384, flags=P.CMD_FLAG_REQ_ONE)
        assert c.read_reply()["extents"] == [(4096, 3)]
        c.send(4, Command.WRITE_ZEROES, 0, 4096, flags=P.CMD_FLAG_FAST_ZERO)
        r = c.read_reply()
        assert r["handle"] == 4 and r["error"] == P.NBD_ENOTSUP
        c.send(5, Command.CACHE, 0, 65536)
        r = c.read_reply()
        assert r["handle"] == 5 and r["error"] == 0
        c.send(6, Command.READ, SIZE, 1)
        r = c.read_reply()
        assert r["error"] == P.NBD_EINVAL and "beyond" in r["message"]
        assert not [e for e in origin.log if e[0] == "write_zeroes"]
    finally:
        c.close()


@pytest.mark.parametrize("exc,expected", [
    (StoreFull(), P.NBD_ENOSPC),
    (ReadOnlyVolume("snapshot is read-only"), P.NBD_EPERM),
    (OSError(errno.EIO, "bad sector"), P.NBD_EIO),
    (OSError(errno.EDQUOT, "quota"), P.NBD_ENOSPC),
    (OSError(errno.ENOENT, "gone"), P.NBD_EIO),
    (ValueError("backend bug"), P.NBD_EIO),
])
def test_backend_errors_are_mapped(srv, origin, exc, expected):
    c = RawClient(srv.addresses[0], "origin", structured=True)
    try:
        origin.fail_next = exc
        c.send(1, Command.WRITE, 0, 4, data=b"abcd")
        r = c.read_reply()
        assert r["handle"] == 1 and r["error"] == expected
        c.send(2, Command.READ, 0, 4)  # the connection carries on
        r = c.read_reply()
        assert r["error"] == 0 and r["data"] == bytes(4)
    finally:
        c.close()


def test_command_flags_reach_the_backend(srv, origin):
    c = RawClient(srv.addresses[0], "origin")
    try:
        c.send(1, Command.WRITE, 0, 2, flags=P.CMD_FLAG_FUA, data=b"ok")
        c.send(2, Command.TRIM, 4096, 4096, flags=P.CMD_FLAG_FUA)
        c.send(3, Command.WRITE_ZEROES, 8192, 4096, flags=P.CMD_FLAG_NO_HOLE)
        c.send(4, Command.WRITE_ZEROES, 8192, 4096)
        assert sorted(c.read_reply()["handle"] for _ in range(4)) == [1, 2, 3, 4]
        calls = {e for e in origin.log if not e[0].endswith("-done")}
        assert calls == {("write", 0, 2, True), ("trim", 4096, 4096, True),
                         ("write_zeroes", 8192, 4096, False, True),
                         ("write_zeroes", 8192, 4096, False, False)}
    finally:
        c.close()


def test_replies_out_of_order_and_flush_waits_for_earlier_writes(srv, origin):
    origin.gate = threading.Event()
    origin.gated = ("write",)
    c = RawClient(srv.addresses[0], "origin")
    try:
        c.send(1, Command.WRITE, 0, 4, data=b"wxyz")
        origin.wait_for(lambda e: e.active == 1)  # the write is in the backend, held
        c.send(2, Command.FLUSH)
        c.send(3, Command.READ, 4096, 4)
        first = c.read_reply({3: 4})
        assert first["handle"] == 3  # the READ overtook the held WRITE
        # the FLUSH was parsed before the READ was, yet it must not have run
        assert origin.flushes == 0
        origin.gate.set()
        rest = {c.read_reply()["handle"] for _ in range(2)}
        assert rest == {1, 2}
        names = [e[0] for e in origin.log]
        assert names.index("write-done") < names.index("flush")
        assert origin.data[:4] == b"wxyz"
    finally:
        c.close()


@pytest.mark.parametrize("bound", [{"max_inflight_per_conn": 2},
                                   {"max_inflight_bytes_per_conn": 8 * KiB}])
def test_inflight_requests_are_bounded(sockdir, origin, bound):
    st = ServerThread(Registry(origin), [f"unix:{sockdir}/b.sock"], **bound)
    origin.gate = threading.Event()
    try:
        c = RawClient(st.addresses[0], "origin")
        try:
            for h in range(6):
                c.send(h, Command.READ, h * 4096, 4096)
            origin.wait_for(lambda e: e.active == 2)  # requests do run in parallel...
            origin.gate.set()
            handles = {c.read_reply({h: 4096 for h in range(6)})["handle"] for _ in range(6)}
            assert handles == set(range(6))
            assert origin.max_active == 2  # ...but never more than the bound
        finally:
            origin.gate.set()
            c.close()
    finally:
        st.close()
    wait_closed(origin)


def test_disc_finishes_inflight_requests_then_closes(srv, origin):
    origin.data[:3] = b"abc"
    origin.gate = threading.Event()
    c = RawClient(srv.addresses[0], "origin")
    try:
        c.send(1, Command.READ, 0, 3)
        origin.wait_for(lambda e: e.active == 1)
        c.send(2, Command.DISC)
        origin.gate.set()
        r = c.read_reply({1: 3})
        assert (r["handle"], r["error"], r["data"]) == (1, 0, b"abc")
        assert c.sock.recv(1) == b""  # then the server hangs up
    finally:
        c.close()
    wait_closed(origin)
    assert origin.opens == 1


def test_client_vanishing_mid_write_payload(srv, origin):
    c = RawClient(srv.addresses[0], "origin")
    c.sock.sendall(request(1, Command.WRITE, 0, 64 * KiB) + b"\x01" * (10 * KiB))
    c.close()
    wait_closed(origin)
    assert origin.opens == 1 and origin.data[:16] == bytes(16)
    # the server still serves
    c = RawClient(srv.addresses[1], "origin")
    c.send(2, Command.READ, 0, 4)
    assert c.read_reply({2: 4})["data"] == bytes(4)
    c.close()
    wait_closed(origin)


def test_client_vanishing_with_a_request_in_the_backend(srv, origin):
    origin.gate = threading.Event()
    c = RawClient(srv.addresses[0], "origin")
    c.send(1, Command.READ, 0, 1 * MiB)
    origin.wait_for(lambda e: e.active == 1)
    c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    c.close()  # RST while the backend still works on the read
    origin.gate.set()
    wait_closed(origin)
    assert origin.opens == 1
    origin.gate = None
    c = RawClient(srv.addresses[0], "snap")
    c.send(2, Command.READ, 0, 4)
    assert c.read_reply({2: 4})["data"] == b"\x5a" * 4
    c.close()


def test_bad_request_magic_drops_only_that_connection(srv, origin):
    other = RawClient(srv.addresses[0], "origin")
    c = RawClient(srv.addresses[0], "origin")
    c.sock.sendall(struct.pack(">IHHQQI", 0xDEADBEEF, 0, 0, 1, 0, 512))
    assert c.sock.recv(1) == b""
    c.close()
    other.send(1, Command.READ, 0, 4)
    assert other.read_reply({1: 4})["error"] == 0
    other.close()
    wait_closed(origin)


def test_option_abort_and_handshake_hangups(srv, origin):
    sock = connect(srv.addresses[0])
    recv_exact(sock, 18)
    sock.sendall(struct.pack(">I", P.FLAG_C_FIXED_NEWSTYLE) + option(P.OPT_ABORT))
    magic, opt, rtype, length = struct.unpack(">QIII", recv_exact(sock, 20))
    assert (magic, opt, rtype, length) == (P.OPTION_REPLY_MAGIC, P.OPT_ABORT, P.REP_ACK, 0)
    assert sock.recv(1) == b""
    sock.close()
    # EXPORT_NAME for an unknown export: the server can only hang up
    sock = connect(srv.addresses[0])
    recv_exact(sock, 18)
    sock.sendall(struct.pack(">I", P.FLAG_C_FIXED_NEWSTYLE) + option(P.OPT_EXPORT_NAME, b"x"))
    assert sock.recv(1) == b""
    sock.close()
    # a client leaving in the middle of the handshake
    sock = connect(srv.addresses[1])
    recv_exact(sock, 18)
    sock.sendall(struct.pack(">I", 1) + option(P.OPT_LIST)[:10])
    sock.close()
    assert origin.opens == 0
    c = RawClient(srv.addresses[1], "origin")
    c.close()
    wait_closed(origin)


def test_close_ends_connections_and_closes_exports(sockdir, origin, snap):
    st = ServerThread(Registry(origin, snap), [f"unix:{sockdir}/c.sock"])
    c1 = RawClient(st.addresses[0], "origin")
    c2 = RawClient(st.addresses[0], "snap")
    c1.send(1, Command.READ, 0, 4)
    assert c1.read_reply({1: 4})["error"] == 0
    st.close()
    assert (origin.opens, origin.closes, snap.opens, snap.closes) == (1, 1, 1, 1)
    assert c1.sock.recv(1) == b"" and c2.sock.recv(1) == b""
    c1.close()
    c2.close()
    assert not os.path.exists(f"{sockdir}/c.sock")


def test_failing_open_refuses_the_connection(sockdir):
    class Unopenable(MemoryExport):
        def open(self):
            raise StoreFull("cannot open")

    bad = Unopenable("bad", SIZE)
    st = ServerThread(Registry(bad), [f"unix:{sockdir}/o.sock"])
    try:
        with pytest.raises((EOFError, ConnectionError)):
            RawClient(st.addresses[0], "bad")
        assert bad.closes == 0  # close only follows a successful open
    finally:
        st.close()
    assert bad.closes == 0


def test_server_in_a_plain_asyncio_program(sockdir, origin):
    """NbdServer as the daemon uses it: start, serve, async context exit."""

    async def main():
        async with NbdServer(Registry(origin)) as server:
            await server.start([f"unix:{sockdir}/a.sock"])
            loop = asyncio.get_running_loop()

            def client():
                c = RawClient(server.addresses[0], "origin")
                c.send(1, Command.WRITE, 0, 2, data=b"hi")
                r = c.read_reply()
                c.close()
                return r

            return await loop.run_in_executor(None, client)

    reply = asyncio.run(main())
    assert reply["error"] == 0 and origin.data[:2] == b"hi"
    assert origin.opens == origin.closes == 1


@pytest.mark.parametrize("structured", [False, True])
def test_reads_answered_on_the_event_loop_or_in_a_thread(sockdir, structured):
    """A backend with read_into_nowait gets READs on the event loop (the reply filled in
    place); when it declines, the same READ is served from a thread; either way the
    bytes are right, simple or structured."""
    exp = NowaitMemoryExport("origin", SIZE)
    exp.data[:] = bytes(range(256)) * (SIZE // 256)
    st = ServerThread(Registry(exp), [f"unix:{sockdir}/i.sock"])
    try:
        c = RawClient(st.addresses[0], "origin", structured=structured)
        try:
            for refuse in (False, True):
                exp.refuse = refuse
                before = exp.inline
                for h in range(8):
                    c.send(h, Command.READ, h * 5000 + 7, 3000 + h)
                for _ in range(8):
                    r = c.read_reply({h: 3000 + h for h in range(8)})
                    h = r["handle"]
                    want = bytes(exp.data[h * 5000 + 7: h * 5000 + 7 + 3000 + h])
                    assert r["data"] == want, (refuse, h)
                assert exp.inline - before == (0 if refuse else 8)
            assert [e[0] for e in exp.log].count("read") == 8  # the refused ones
        finally:
            c.close()
    finally:
        st.close()


def test_replies_answered_on_the_loop_are_bounded_when_the_client_does_not_read(sockdir):
    """Replies answered at once hold no in-flight slot; a client asking for many large
    READs without reading the replies must still not make the server buffer them all:
    it stops reading requests once the socket's output backs up."""
    exp = NowaitMemoryExport("origin", SIZE)
    st = ServerThread(Registry(exp), [f"unix:{sockdir}/u.sock"])
    try:
        c = RawClient(st.addresses[0], "origin")
        try:
            n = 48  # 48 * 4 MiB = 192 MiB asked for
            c.sock.settimeout(10)
            for h in range(n):
                try:
                    c.send(h, Command.READ, 0, 4 * MiB)
                except TimeoutError:
                    break  # the server stopped reading: what we want
            (conn,) = st.statistics().connections
            buffered = conn.write_buffer_size
            assert exp.inline < n
            assert buffered <= 4 * MiB + 2 * (4 * MiB + 64)
            # Reading the replies lets it go on, and every answer arrives.
            got = 0
            c.sock.settimeout(30)
            for _ in range(exp.inline):
                c.read_reply({h: 4 * MiB for h in range(n)})
                got += 1
            assert got >= 1
        finally:
            c.close()
    finally:
        st.close()
