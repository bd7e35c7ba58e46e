"""What ``ddsnap serve -v`` logs, and how ``serve`` reports addresses it cannot listen on.

* Each connection is logged when it ends: who (pid and uid on a unix socket, host:port
  on TCP), the export, why it ended, how long it lasted and the exact bytes read and
  written (counted here by the client).
* Each error answered to a client is logged with the export and the request: refusals
  made by the protocol (EPERM on a read-only snapshot, EINVAL past the end) and errors
  of the backend (ENOTSUP, ENOSPC).  A full store's ENOSPC is logged once per episode:
  the first failure, then nothing until a write succeeds again, which is logged with
  the number of ENOSPC errors answered meanwhile.
* An NBD address that cannot be listened on exits 19 (``ListenError``), a control socket
  path that cannot be used exits 20 (``ControlPathError``), each naming what failed
  (not the other one), leaving nothing behind.

Real ``ddsnap serve`` processes on unix sockets and loopback TCP, a client written here
from the NBD spec; no timing assertions.
"""

from __future__ import annotations

import os
import re
import socket
import struct

import pytest

from ddsnap.nbd import wire as P
from ddsnap.nbd.wire import Command
from nbd_helpers import go_data, option
from served import KiB, MiB, Served, fails, make_origin, ok, ok_json, wait_until

CHUNK = 64 * KiB


class Client:
    """An NBD client that counts every byte it sends and receives (fixed newstyle,
    NBD_OPT_GO, simple replies)."""

    def __init__(self, address, export: str = "origin"):
        family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.settimeout(60)
        self.sock.connect(address)
        self.sent = self.received = 0
        greeting = self.recv(18)
        assert greeting[:16] == struct.pack(">QQ", P.NBDMAGIC, P.IHAVEOPT)
        self.send(struct.pack(">I", P.FLAG_C_FIXED_NEWSTYLE | P.FLAG_C_NO_ZEROES))
        self.send(option(P.OPT_GO, go_data(export)))
        while True:
            magic, _opt, rtype, length = struct.unpack(">QIII", self.recv(20))
            assert magic == P.OPTION_REPLY_MAGIC
            data = self.recv(length)
            if rtype == P.REP_ACK:
                break
            assert not rtype & (1 << 31), f"GO refused: 0x{rtype:x} {data!r}"

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)
        self.sent += len(data)

    def recv(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise EOFError(f"EOF after {len(buf)} of {n} bytes")
            buf += chunk
        self.received += n
        return bytes(buf)

    def request(self, handle: int, command: int, offset: int = 0, length: int = 0,
                data: bytes = b"", flags: int = 0) -> int:
        """Send one request and read its simple reply; return the NBD error (0: ok)."""
        self.send(struct.pack(">IHHQQI", P.REQUEST_MAGIC, flags, command, handle, offset,
                              length) + data)
        magic, error, got = struct.unpack(">IIQ", self.recv(16))
        assert (magic, got) == (P.SIMPLE_REPLY_MAGIC, handle)
        if command == Command.READ and not error:
            self.recv(length)
        return error

    def disconnect(self) -> None:
        self.send(struct.pack(">IHHQQI", P.REQUEST_MAGIC, 0, Command.DISC, 0, 0, 0))
        assert self.sock.recv(1) == b""  # the server closes after DISC
        self.sock.close()


def store_for(tmp_path, origin_size: int = 4 * MiB, store_size: str = "16M"):
    origin = tmp_path / "origin.img"
    data = make_origin(origin, origin_size)
    store = tmp_path / "store.img"
    ok("init", store, "--origin", origin, "--size", store_size)
    return store, data


def lines(srv: Served, pattern: str) -> list[str]:
    """The server's log lines matching the regular expression ``pattern``."""
    return [ln for ln in srv.output().splitlines() if re.search(pattern, ln)]


def wait_for_line(srv: Served, pattern: str) -> str:
    def last() -> str | None:
        found = lines(srv, pattern)
        return found[-1] if found else None

    return wait_until(last, f"a log line matching {pattern!r}")


# --- connections ----------------------------------------------------------------------


def test_each_connection_is_logged_when_it_ends(tmp_path):
    store, data = store_for(tmp_path)
    with Served(store, tcp=True, extra=("-v",)) as srv:
        c = Client(str(srv.sock))
        assert c.request(1, Command.READ, 8192, 4096) == 0
        c.disconnect()
        line = wait_for_line(srv, r"NBD connection #\d+ from pid \d+ .*disconnected")
        m = re.search(r"NBD connection #\d+ from pid (\d+) \(uid (\d+)\) on unix:(\S+), "
                      r"export 'origin': disconnected \(NBD_CMD_DISC\) after \d+\.\d{3} s, "
                      r"(\d+) bytes read, (\d+) bytes written$", line)
        assert m, line
        assert (int(m[1]), int(m[2]), m[3]) == (os.getpid(), os.getuid(), str(srv.sock))
        assert (int(m[4]), int(m[5])) == (c.sent, c.received)

        # on TCP: the client's address and port; ended by closing the socket
        assert srv.tcp is not None  # served with tcp=True
        host, port = srv.tcp.rsplit(":", 1)
        t = Client((host, int(port)))
        assert t.request(2, Command.WRITE, 0, 512, b"x" * 512) == 0
        local_port = t.sock.getsockname()[1]
        t.sock.close()
        line = wait_for_line(srv, rf"from 127\.0\.0\.1:{local_port},")
        assert re.search(r"export 'origin': closed by the client after \d+\.\d{3} s, "
                         rf"{t.sent} bytes read, {t.received} bytes written$", line), line

        # a client that never selects an export
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(srv.sock))
            assert s.recv(18)
        line = wait_for_line(srv, r", no export: closed by the client")
        assert re.search(r"after \d+\.\d{3} s, 0 bytes read, 18 bytes written$", line), line


def test_no_connection_lines_without_verbose(tmp_path):
    store, _data = store_for(tmp_path)
    with Served(store) as srv:
        c = Client(str(srv.sock))
        c.request(1, Command.READ, 0, 512)
        c.disconnect()
        with socket.socket(socket.AF_UNIX) as s:  # a later connection: the first ended
            s.connect(str(srv.sock))
            assert s.recv(18)
        assert not lines(srv, "NBD connection"), srv.output()


# --- errors answered ------------------------------------------------------------------


def test_refused_requests_are_logged_with_the_export(tmp_path):
    store, data = store_for(tmp_path)
    ok("snap", "create", store, "frozen", "--read-only")
    with Served(store, extra=("-v",)) as srv:
        c = Client(str(srv.sock), "frozen")
        assert c.request(0x51, Command.WRITE, 0, 512, b"y" * 512) == P.NBD_EPERM
        assert c.request(0x52, Command.READ, len(data), 512) == P.NBD_EINVAL
        assert c.request(0x53, Command.READ, 0, 512) == 0
        c.disconnect()
        wait_for_line(srv, r"export 'frozen': disconnected")
        eperm, = lines(srv, "EPERM")
        assert re.search(r"NBD connection #\d+ from pid \d+ .*, export 'frozen': request "
                         r"\(handle 0x51\) refused: EPERM \(export is read-only\)$", eperm)
        einval, = lines(srv, "EINVAL")
        assert re.search(r"export 'frozen': request \(handle 0x52\) refused: EINVAL "
                         rf"\(READ \[{len(data)}, \+512\) beyond export size", einval)
        assert not lines(srv, "0x53"), "a request that succeeded was logged"


def test_backend_errors_are_logged_with_the_request(tmp_path):
    store, _data = store_for(tmp_path)
    with Served(store, extra=("-v",)) as srv:
        c = Client(str(srv.sock))
        flags = P.CMD_FLAG_FAST_ZERO
        assert c.request(7, Command.WRITE_ZEROES, 4096, 8192, flags=flags) == P.NBD_ENOTSUP
        line = wait_for_line(srv, "ENOTSUP")
        assert re.search(r"export 'origin': WRITE_ZEROES of 8192 bytes at offset 4096 "
                         r"\(handle 0x7\) failed: ENOTSUP \(fast zero not supported\)$",
                         line), line
        c.disconnect()


def test_a_full_store_is_logged_once_per_episode(tmp_path):
    # a 4 MiB store holds a few dozen 64 KiB chunks: not enough to copy out 64 of them
    store, _data = store_for(tmp_path, origin_size=8 * MiB, store_size="4M")
    ok("snap", "create", store, "before")
    with Served(store, extra=("-v",)) as srv:
        c = Client(str(srv.sock))
        results = [c.request(h, Command.WRITE, h * CHUNK, 512, b"z" * 512)
                   for h in range(64)]
        failed = [h for h, e in enumerate(results) if e]
        assert failed and all(results[h] == P.NBD_ENOSPC for h in failed), results
        assert len(failed) >= 2, "the test needs several ENOSPC errors in a row"
        first = failed[0]
        assert results[0] == 0  # chunk 0 was copied out before the store filled up
        # one line for the whole episode, naming the first write that failed
        line = wait_for_line(srv, "failed: ENOSPC")
        assert re.search(rf"export 'origin': WRITE of 512 bytes at offset {first * CHUNK} "
                         rf"\(handle {first:#x}\) failed: ENOSPC \(.*\); further ENOSPC "
                         r"errors are not logged until a write succeeds$", line), line
        assert len(lines(srv, "ENOSPC")) == 1, srv.output()

        # a write that needs no new chunk succeeds: the episode ends, with its count
        assert c.request(100, Command.WRITE, 0, 512, b"w" * 512) == 0
        line = wait_for_line(srv, "writes succeed again")
        assert re.search(rf"NBD: writes succeed again \(export 'origin'\); "
                         rf"{len(failed) - 1} more ENOSPC error\(s\) were answered "
                         r"meanwhile$", line), line
        # the store is still full: the next failure starts a new episode, logged again
        assert c.request(101, Command.WRITE, failed[-1] * CHUNK, 512, b"v" * 512) \
            == P.NBD_ENOSPC
        wait_until(lambda: len(lines(srv, "failed: ENOSPC")) == 2,
                   "the second episode's ENOSPC to be logged")
        assert "(handle 0x65)" in lines(srv, "failed: ENOSPC")[1]
        c.disconnect()


# --- addresses that cannot be listened on ---------------------------------------------


def _not_served(store) -> None:
    """Nothing was left behind: the store opens locally, no control socket remains."""
    assert ok_json("status", store)["served"] is False
    assert not os.path.exists(f"{store}.ctl")


def test_control_path_errors_exit_20_naming_the_path(tmp_path):
    store, _data = store_for(tmp_path)
    sock = tmp_path / "n.sock"
    missing = tmp_path / "no-such-dir" / "c.ctl"
    line = fails(20, "serve", store, "--listen", f"unix:{sock}", "--control", missing)
    assert line == f"ddsnap: cannot use control socket {missing}: No such file or directory"
    assert not sock.exists()
    _not_served(store)

    regular = tmp_path / "notes.txt"
    regular.write_text("keep me")
    line = fails(20, "serve", store, "--listen", f"unix:{sock}", "--control", regular)
    assert line == f"ddsnap: cannot use control socket {regular}: exists and is not a socket"
    assert regular.read_text() == "keep me"  # not replaced by a socket
    _not_served(store)

    # in use by another server (of another store)
    (tmp_path / "b").mkdir()
    other, _ = store_for(tmp_path / "b")
    with Served(other) as srv:
        line = fails(20, "serve", store, "--listen", f"unix:{sock}", "--control", srv.ctl)
        assert line == (f"ddsnap: cannot use control socket {srv.ctl}: in use by another "
                        "server")
        assert srv.ctl.exists()
    _not_served(store)


def test_listen_errors_exit_19_naming_the_address(tmp_path):
    store, _data = store_for(tmp_path)
    missing = tmp_path / "no-such-dir" / "n.sock"
    line = fails(22, "serve", store, "--listen", f"unix:{missing}")
    assert line == f"ddsnap: cannot listen on unix:{missing}: No such file or directory"
    _not_served(store)

    regular = tmp_path / "notes.txt"
    regular.write_text("keep me")
    line = fails(22, "serve", store, "--listen", f"unix:{regular}")
    assert line == f"ddsnap: cannot listen on unix:{regular}: exists and is not a socket"
    assert regular.read_text() == "keep me"
    _not_served(store)

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # the second address fails: the first, already bound, is released too
        sock = tmp_path / "first.sock"
        line = fails(22, "serve", store, "--listen", f"unix:{sock}", "--listen",
                     f"tcp:127.0.0.1:{port}")
        assert line == f"ddsnap: cannot listen on tcp:127.0.0.1:{port}: Address already in use"
        assert not sock.exists()
    _not_served(store)


@pytest.mark.parametrize("value", ["lots", "0", "-1M"])
def test_bad_max_reply_memory_is_a_usage_error(tmp_path, value):
    store, _data = store_for(tmp_path)
    fails(2, "serve", store, "--listen", f"unix:{tmp_path}/n.sock",
          "--max-reply-memory", value, match="--max-reply-memory")
    _not_served(store)
