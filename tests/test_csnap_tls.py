"""TLS for csnap between hosts (ddsnap.csnap.tls), over real sockets with real
certificates: data crosses whole and in order both ways, with many threads sending while
one receives and both sides' buffers full; a peer outside the cluster, without a
certificate or without TLS is refused on both sides with a clear TlsRefused; bad TLS
files give a clear TlsFileError naming the file; EOF, shutdown and TLS errors end a
receive the way the csnap reader loops expect.

Nothing here asserts timing: a hang (the deadlock the design avoids) fails a join with a
generous deadline.
"""

from __future__ import annotations

import random
import select
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import certs
from certs import Identity, Pki, encrypt_key
from ddsnap import errors
from ddsnap.csnap import tls
from ddsnap.csnap.tls import TlsSocket
from ddsnap.errors import DdsnapError, TlsFileError, TlsRefused

#: the session's certificates (a fixture)
pki = certs.pki

#: seconds any one step may take before the test calls it a hang
DEADLINE = 60.0
#: a message: payload length, sender number, sequence number; then the payload
HEADER = struct.Struct("!IIQ")
#: payload sizes, around TLS's 16 KiB record and tls.SEND_CHUNK, up to several MiB
SIZES = [0, 1, 7, 1000, 16383, 16384, 16385, 100_000, (1 << 18) + 1, 1 << 20, 3 << 20]


# -- helpers ----------------------------------------------------------------------------

def contexts(server: Identity, client: Identity) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    return tls.server_context(*server.files), tls.client_context(*client.files)


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """A connected TCP pair on 127.0.0.1: ``(server end, client end)``."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname()[:2], timeout=DEADLINE)
        client.settimeout(None)
        server, _ = listener.accept()
    return server, client


def raw_pair(kind: str) -> tuple[socket.socket, socket.socket]:
    if kind == "tcp":
        return tcp_pair()
    a, b = socket.socketpair()
    return a, b


class Hung(AssertionError):
    """A thread was still running after DEADLINE seconds (a deadlock, say)."""


def run_threads(targets: list[Callable[[], Any]]) -> list[Any]:
    """Run each target in a thread of its own; their results (or the exceptions they
    raised), after all ended; a :class:`Hung` for one still running after DEADLINE
    seconds (a daemon thread: a hung one does not keep pytest from ending)."""
    results: list[Any] = [Hung(f"thread {i} still running") for i in range(len(targets))]

    def run(i: int, target: Callable[[], Any]) -> None:
        try:
            results[i] = target()
        except Exception as e:  # (the caller asserts which)
            results[i] = e

    threads = [threading.Thread(target=run, args=(i, t), daemon=True)
               for i, t in enumerate(targets)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + DEADLINE
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    return results


class Background:
    """``fn()`` running in a daemon thread; :meth:`outcome` waits for its result."""

    def __init__(self, fn: Callable[[], Any]):
        self.result: Any = Hung("still running")
        self.thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self.thread.start()

    def _run(self, fn: Callable[[], Any]) -> None:
        try:
            self.result = fn()
        except Exception as e:  # (the caller asserts which)
            self.result = e

    def outcome(self) -> Any:
        """Its result, or the exception it raised, or a :class:`Hung` after DEADLINE."""
        self.thread.join(DEADLINE)
        return self.result


def handshake(server_raw: socket.socket, client_raw: socket.socket,
              server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext,
              timeout: float = DEADLINE) -> tuple[Any, Any]:
    """Both ends' :func:`tls.wrap` run at once: ``(server outcome, client outcome)``,
    each a TlsSocket or the exception it raised."""
    server, client = run_threads([lambda: tls.wrap(server_raw, server_ctx, True, timeout),
                                  lambda: tls.wrap(client_raw, client_ctx, False, timeout)])
    return server, client


@pytest.fixture(params=["socketpair", "tcp"])
def kind(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def connected(pki: Pki, kind: str) -> Iterator[tuple[TlsSocket, TlsSocket]]:
    """A server and a client TlsSocket connected to each other over ``kind``."""
    server, client = handshake(*raw_pair(kind), *contexts(pki.server, pki.client))
    assert isinstance(server, TlsSocket), server
    assert isinstance(client, TlsSocket), client
    yield server, client
    server.close()
    client.close()


def recv_exactly(sock: TlsSocket | socket.socket | ssl.SSLSocket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        data = sock.recv(min(n - len(buf), 1 << 16))
        if not data:
            raise EOFError(f"EOF after {len(buf)} of {n} bytes")
        buf += data
    return bytes(buf)


def common_name(sock: TlsSocket | ssl.SSLSocket) -> str | None:
    """The CN of the certificate the peer of ``sock`` presented (and ``sock`` verified)."""
    cert = sock.getpeercert()
    if not cert:
        return None
    subject: Any = cert["subject"]  # (((key, value), ...), ...)
    names = [value for rdn in subject for key, value in rdn if key == "commonName"]
    return names[0] if names else None


def payload(sender: int, seq: int, size: int) -> bytes:
    """Distinct content for each (sender, seq)."""
    return random.Random(sender << 32 | seq).randbytes(size)


def message(sender: int, seq: int, size: int) -> bytes:
    return HEADER.pack(size, sender, seq) + payload(sender, seq, size)


def read_messages(sock: TlsSocket | socket.socket | ssl.SSLSocket, count: int
                  ) -> list[tuple[int, int]]:
    """Read ``count`` messages; check each payload is the one its header names; return
    their ``(sender, seq)`` in arrival order."""
    seen = []
    for _ in range(count):
        size, sender, seq = HEADER.unpack(recv_exactly(sock, HEADER.size))
        assert size <= max(SIZES), f"garbled header: size {size} sender {sender} seq {seq}"
        data = recv_exactly(sock, size)
        assert data == payload(sender, seq, size), f"message {sender}/{seq} garbled"
        seen.append((sender, seq))
    return seen


def plan(senders: int, per_sender: int) -> dict[int, list[int]]:
    """Payload sizes of each sender's messages: every size in SIZES, in a different
    order per sender."""
    return {s: [SIZES[(s * 3 + i) % len(SIZES)] for i in range(per_sender)]
            for s in range(senders)}


def sender(sock: TlsSocket, who: int, sizes: list[int]) -> Callable[[], None]:
    def send() -> None:
        for seq, size in enumerate(sizes):
            sock.sendall(message(who, seq, size))
    return send


def check_arrivals(seen: list[tuple[int, int]], sizes: dict[int, list[int]]) -> None:
    """Every message arrived once, each sender's in the order it sent them."""
    for who, own in sizes.items():
        assert [seq for s, seq in seen if s == who] == list(range(len(own))), who


def small_buffers(kind: str, *socks: socket.socket) -> None:
    """Socket buffers far smaller than the messages (not below 64 KiB for TCP: there a
    tiny window crawls at kB/s)."""
    size = 1 << 16 if kind == "tcp" else 4096
    for s in socks:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)


# -- data -------------------------------------------------------------------------------

def test_round_trip_both_ways(connected: tuple[TlsSocket, TlsSocket], kind: str):
    server, client = connected
    client.sendall(b"hello server")
    assert recv_exactly(server, 12) == b"hello server"
    server.sendall(bytearray(b"hello client"))
    assert recv_exactly(client, 12) == b"hello client"
    assert server.version() == client.version() == "TLSv1.3"
    # each end verified the other: its certificate names it
    assert common_name(server) == "client"
    assert common_name(client) == "server"
    assert isinstance(server.getpeercert(binary_form=True), bytes)
    family = socket.AF_INET if kind == "tcp" else socket.AF_UNIX
    assert server.family == client.family == family
    assert server.fileno() >= 0
    # the handshake's timeout is gone: the socket blocks
    assert server.gettimeout() is None and client.gettimeout() is None


def test_large_messages_round_trip(connected: tuple[TlsSocket, TlsSocket]):
    """MiBs each way at once (many records, partial sends)."""
    server, client = connected
    up, down = payload(1, 1, 5 << 20), payload(2, 2, 3 << 20)
    results = run_threads([lambda: recv_exactly(server, len(up)),
                           lambda: recv_exactly(client, len(down)),
                           lambda: client.sendall(up), lambda: server.sendall(down)])
    assert results[2:] == [None, None], results[2:]
    assert results[0] == up and results[1] == down


@pytest.mark.parametrize("senders", [8])
def test_concurrent_senders_do_not_interleave(connected: tuple[TlsSocket, TlsSocket],
                                              senders: int):
    """Many threads send messages of up to MiBs at once while another receives: each
    arrives whole, unmixed with others, each sender's in order."""
    server, client = connected
    sizes = plan(senders, len(SIZES))
    total = sum(len(v) for v in sizes.values())
    results = run_threads([lambda: read_messages(server, total)]
                          + [sender(client, s, own) for s, own in sizes.items()])
    assert results[1:] == [None] * senders, results[1:]
    assert isinstance(results[0], list), results[0]
    check_arrivals(results[0], sizes)


def test_both_ways_at_once_with_full_buffers(pki: Pki, kind: str):
    """Both sides send MiBs from several threads each while each side's receiver
    reads, over sockets with small buffers: the buffers fill both ways, and a receiver
    must not wait behind its side's blocked senders (that would deadlock)."""
    server_raw, client_raw = raw_pair(kind)
    small_buffers(kind, server_raw, client_raw)
    server, client = handshake(server_raw, client_raw, *contexts(pki.server, pki.client))
    assert isinstance(server, TlsSocket) and isinstance(client, TlsSocket)
    with server, client:
        sizes = plan(3, len(SIZES))
        total = sum(len(v) for v in sizes.values())
        results = run_threads(
            [lambda: read_messages(server, total), lambda: read_messages(client, total)]
            + [sender(client, s, own) for s, own in sizes.items()]
            + [sender(server, s, own) for s, own in sizes.items()])
        assert results[2:] == [None] * 6, results[2:]
        for seen in results[:2]:
            assert isinstance(seen, list), seen
            check_arrivals(seen, sizes)


def test_empty_sendall_sends_nothing(connected: tuple[TlsSocket, TlsSocket]):
    server, client = connected
    client.sendall(b"")
    client.sendall(b"x")
    assert server.recv(10) == b"x"


# -- what a receive does when the connection ends ---------------------------------------

def test_peer_close_is_eof(connected: tuple[TlsSocket, TlsSocket]):
    """A peer that closes (no close_notify: TlsSocket sends none) ends the stream after
    all it sent: recv returns b"", then again b""."""
    server, client = connected
    client.sendall(b"last words")
    client.close()
    assert recv_exactly(server, 10) == b"last words"
    assert server.recv(100) == b""
    assert server.recv(100) == b""


def test_close_notify_is_eof(pki: Pki):
    """A standard ``ssl.SSLSocket`` client that ends with close_notify: the TlsSocket
    server reads its data, then b""."""
    server_raw, client_raw = socket.socketpair()
    server_ctx, client_ctx = contexts(pki.server, pki.client)
    wrapping = Background(lambda: tls.wrap(server_raw, server_ctx, True, DEADLINE))
    std = client_ctx.wrap_socket(client_raw)
    server = wrapping.outcome()
    assert isinstance(server, TlsSocket), server
    with server, std:
        std.sendall(b"bye")
        # (unwrap sends close_notify, then waits for the server's, which never comes:
        # it ends when the server closes)
        unwrapping = Background(std.unwrap)
        assert recv_exactly(server, 3) == b"bye"
        assert server.recv(100) == b""
        assert server.recv(100) == b""
        server.close()
        unwrapping.outcome()


def test_shutdown_unblocks_a_blocked_recv(connected: tuple[TlsSocket, TlsSocket]):
    """Another thread's shutdown ends a recv blocked on a silent peer with b"" (the
    csnap server's drop and the client's close rely on it)."""
    server, _client = connected
    started = threading.Event()

    def receive() -> bytes:
        started.set()
        return server.recv(100)

    receiving = Background(receive)
    assert started.wait(DEADLINE)
    server.shutdown(socket.SHUT_RDWR)
    assert receiving.outcome() == b""


def test_shutdown_fails_a_blocked_sendall(connected: tuple[TlsSocket, TlsSocket]):
    """A sendall blocked on a peer that reads nothing fails with OSError when another
    thread shuts the socket down, and so does every later sendall."""
    server, _client = connected
    sending = threading.Event()

    def flood() -> None:
        sending.set()
        for _ in range(1000):  # (far more than the socket buffers hold)
            server.sendall(bytes(1 << 20))

    flooding = Background(flood)
    assert sending.wait(DEADLINE)
    # (the shutdown may come before or after the flood blocks: it fails either way)
    server.shutdown(socket.SHUT_RDWR)
    assert isinstance(flooding.outcome(), OSError)
    with pytest.raises(OSError):
        server.sendall(b"more")


def test_tls_error_on_recv_is_oserror(pki: Pki):
    """A forged record (bytes that are not the peer's encryption) makes recv raise an
    OSError, not return data or b"": the reader loops end the connection."""
    server_raw, client_raw = socket.socketpair()
    server, client = handshake(server_raw, client_raw, *contexts(pki.server, pki.client))
    assert isinstance(server, TlsSocket) and isinstance(client, TlsSocket)
    with server, client:
        server.sendall(b"genuine")
        assert recv_exactly(client, 7) == b"genuine"
        forged = bytes([23, 3, 3, 0, 40]) + random.Random(7).randbytes(40)
        server_raw.sendall(forged)  # (around the TLS layer)
        with pytest.raises(OSError):
            client.recv(100)
        with pytest.raises(OSError):  # (and stays failed)
            client.recv(100)


# -- post-handshake messages: a read that makes bytes to send ---------------------------

def pha_pair(pki: Pki, member: Identity | None = None, sndbuf: int = 0
             ) -> tuple[ssl.SSLSocket, TlsSocket]:
    """A standard SSLSocket server that asks for the client's certificate only after
    the handshake (TLS 1.3 post-handshake authentication), and a TlsSocket client: a
    CertificateRequest the server sends makes the client's SSLObject.read produce the
    client's Certificate, CertificateVerify and Finished, which the TlsSocket must send
    by itself.  The client is ``member`` (by default ``pki.client``), its socket's send
    buffer ``sndbuf`` bytes if given.  Returns ``(server, client)``."""
    server_raw, client_raw = socket.socketpair()
    if sndbuf:
        client_raw.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    server_ctx, client_ctx = contexts(pki.server, member or pki.client)
    server_ctx.post_handshake_auth = True  # (no certificate asked in the handshake)
    client_ctx.post_handshake_auth = True
    wrapping = Background(lambda: server_ctx.wrap_socket(server_raw, server_side=True))
    client = tls.wrap(client_raw, client_ctx, server_side=False, timeout=DEADLINE)
    server = wrapping.outcome()
    assert isinstance(server, ssl.SSLSocket), server
    assert not server.getpeercert()  # (none yet)
    return server, client


def readable(sock: ssl.SSLSocket) -> bool:
    """Bytes wait on the socket under ``sock`` (which has read nothing ahead)."""
    return bool(select.select([sock], [], [], DEADLINE)[0])


def test_receiver_sends_what_a_read_makes(pki: Pki):
    """With no sender active, the receiver itself sends the client's answer to the
    server's CertificateRequest (it does not wait for the next sendall)."""
    server, client = pha_pair(pki)
    with server, client:
        server.verify_client_post_handshake()
        server.sendall(b"!")
        [got] = run_threads([lambda: client.recv(10)])
        assert got == b"!"
        # the answer arrives with nothing sent by the client's application
        assert readable(server), "the client never answered the CertificateRequest"
        client.sendall(b"end")
        assert recv_exactly(server, 3) == b"end"
        assert common_name(server) == "client"


def test_receiver_does_not_block_on_a_full_send_buffer(pki: Pki):
    """The client's send buffer is full (the server reads nothing) when its receiver
    reads a CertificateRequest, and its answer (a 64 KiB certificate) cannot go out:
    recv returns anyway, and the answer goes out, in order after the data already sent,
    once the server reads."""
    server, client = pha_pair(pki, pki.bulky, sndbuf=8192)
    with server, client:
        server.verify_client_post_handshake()
        server.sendall(b"!")
        # fill the client's socket buffer: send while the socket polls writable
        poller = select.poll()
        poller.register(client.fileno(), select.POLLOUT)
        sent = 0
        while poller.poll(0):
            client.sendall(message(0, sent, 1000))
            sent += 1
        # a receiver blocked sending its answer would never return here (the server
        # reads only after)
        [got] = run_threads([lambda: client.recv(10)])
        assert got == b"!"
        # (the server reads all in one go: the answer goes out as it reads, and the
        # last sendall waits for it)
        reading = Background(lambda: (read_messages(server, sent), recv_exactly(server, 3)))
        client.sendall(b"end")
        assert reading.outcome() == ([(0, i) for i in range(sent)], b"end")
        assert common_name(server) == "bulky"


def test_post_handshake_answer_among_busy_senders(pki: Pki):
    """Senders are busy when the receiver reads the CertificateRequest: the answer and
    the senders' records reach the server in an order it accepts, nothing garbled."""
    server, client = pha_pair(pki)
    with server, client:
        sizes = plan(4, 5)
        total = sum(len(v) for v in sizes.values())

        def serve() -> list[tuple[int, int]]:
            seen = read_messages(server, 3)
            server.verify_client_post_handshake()
            server.sendall(b"!")
            return seen + read_messages(server, total - 3)

        results = run_threads([serve, lambda: client.recv(10)]
                              + [sender(client, s, own) for s, own in sizes.items()])
        assert results[1] == b"!"
        assert results[2:] == [None] * 4, results[2:]
        assert isinstance(results[0], list), results[0]
        check_arrivals(results[0], sizes)
        client.sendall(b"end")
        assert recv_exactly(server, 3) == b"end"
        assert common_name(server) == "client"


# -- refusals ---------------------------------------------------------------------------

def refused(result: Any, *words: str) -> str:
    assert isinstance(result, TlsRefused), result
    msg = str(result)
    for w in words:
        assert w in msg, msg
    return msg


def test_client_certificate_from_another_ca_is_refused(pki: Pki, kind: str):
    """A client whose certificate another CA signed (it trusts the cluster CA): the
    server says the certificate is not the cluster CA's, the client that its
    certificate was refused; both raw sockets are closed."""
    server_raw, client_raw = raw_pair(kind)
    server, client = handshake(server_raw, client_raw, *contexts(pki.server, pki.impostor))
    refused(server, "the peer's certificate is not signed by the cluster CA")
    refused(client, "the peer refused our certificate")
    assert server_raw.fileno() == -1 and client_raw.fileno() == -1


def test_server_from_another_cluster_is_refused(pki: Pki):
    """A client of another cluster (its CA and certificate): it refuses the server's
    certificate, and the server learns that its certificate was refused."""
    server, client = handshake(*tcp_pair(), *contexts(pki.server, pki.outsider))
    refused(client, "the peer's certificate is not signed by the cluster CA")
    refused(server, "the peer refused our certificate")


def test_self_signed_client_is_refused(pki: Pki):
    server, client = handshake(*tcp_pair(), *contexts(pki.server, pki.self_signed))
    refused(server, "not signed by the cluster CA", "self-signed")
    refused(client, "refused our certificate")


def test_certificate_for_servers_only_is_refused_as_client(pki: Pki):
    server, client = handshake(*tcp_pair(), *contexts(pki.server, pki.server_only))
    refused(server, "not for this use", "clientAuth")
    refused(client, "refused our certificate")


def test_client_without_certificate_is_refused(pki: Pki):
    bare = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    bare.check_hostname = False
    bare.load_verify_locations(pki.ca.cert)
    server, client = handshake(*tcp_pair(), tls.server_context(*pki.server.files), bare)
    refused(server, "the peer sent no certificate")
    refused(client, "requires a certificate")


def test_tls12_client_is_refused(pki: Pki):
    server_ctx, old = contexts(pki.server, pki.client)
    old.minimum_version = ssl.TLSVersion.TLSv1_2
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    server, client = handshake(*tcp_pair(), server_ctx, old)
    refused(server, "does not speak TLS 1.3")
    refused(client, "does not speak TLS 1.3")


def test_plain_text_client_is_refused(pki: Pki):
    """A client that speaks its protocol in plain text: the server refuses it (and
    closes the connection: the client reads EOF)."""
    server_raw, client_raw = tcp_pair()
    with client_raw:
        client_raw.sendall(b"\x00\x00\x00\x20IDENTIFY node-1 in plain text")
        [result] = run_threads([lambda: tls.wrap(server_raw, tls.server_context(
            *pki.server.files), server_side=True, timeout=DEADLINE)])
        refused(result, "the peer does not speak TLS", "IDENTIFY")
        assert server_raw.fileno() == -1
        client_raw.settimeout(DEADLINE)
        assert client_raw.recv(100) == b""


def test_silent_client_is_refused_within_the_timeout(pki: Pki):
    """A client that connects and sends nothing (a plain-text client waiting for the
    server to speak first) is refused once the handshake timeout passes."""
    server_raw, client_raw = tcp_pair()
    with client_raw:
        [result] = run_threads([lambda: tls.wrap(server_raw, tls.server_context(
            *pki.server.files), server_side=True, timeout=0.3)])
        refused(result, "no TLS handshake within 0.3 s")
        assert server_raw.fileno() == -1


def test_plain_server_that_hangs_up_is_refused(pki: Pki):
    """A TLS client connecting to a plain-text server that reads the ClientHello and
    closes the connection."""
    server_raw, client_raw = tcp_pair()

    def plain_server() -> bytes:
        with server_raw:
            return server_raw.recv(4096)

    hello, result = run_threads([plain_server, lambda: tls.wrap(
        client_raw, tls.client_context(*pki.client.files), server_side=False,
        timeout=DEADLINE)])
    assert isinstance(hello, bytes) and hello[:1] == b"\x16"  # (a TLS handshake record)
    refused(result, "the peer closed the connection during the TLS handshake")
    assert client_raw.fileno() == -1


def test_plain_server_that_answers_is_refused(pki: Pki):
    """A TLS client connecting to a plain-text server that answers in plain text."""
    server_raw, client_raw = tcp_pair()

    def plain_server() -> None:
        with server_raw:
            server_raw.recv(4096)
            server_raw.sendall(b"-ERR unknown command\r\n")
            server_raw.recv(4096)  # (until the client hangs up)

    done, result = run_threads([plain_server, lambda: tls.wrap(
        client_raw, tls.client_context(*pki.client.files), server_side=False,
        timeout=DEADLINE)])
    assert done is None, done
    refused(result, "the peer does not speak TLS", "-ERR")


def test_tls_errors_have_their_exit_codes_and_cross_the_control_socket():
    assert issubclass(TlsRefused, DdsnapError) and issubclass(TlsFileError, DdsnapError)
    assert (TlsRefused.exit_code, TlsFileError.exit_code) == (28, 29)
    assert errors.BY_NAME["TlsRefused"] is TlsRefused
    for err in (TlsRefused("the peer sent no certificate"),
                TlsFileError("/etc/ca.pem", "CA certificate", "no such file or directory")):
        back = errors.from_dict(err.to_dict())
        assert type(back) is type(err) and str(back) == str(err)
        assert back.exit_code == err.exit_code


# -- TLS files --------------------------------------------------------------------------

MAKERS = [tls.server_context, tls.client_context]


def file_error(maker: Callable[..., ssl.SSLContext], files: tuple[str, str, str],
               path: str, *words: str) -> None:
    with pytest.raises(TlsFileError) as e:
        maker(*files)
    msg = str(e.value)
    assert e.value.path == path and path in msg, msg
    for w in words:
        assert w in msg, msg


@pytest.mark.parametrize("maker", MAKERS)
def test_missing_files_are_named(maker: Callable[..., ssl.SSLContext], pki: Pki,
                                 tmp_path: Path):
    ca, cert, key = pki.client.files
    gone = str(tmp_path / "gone.pem")
    file_error(maker, (gone, cert, key), gone, "CA certificate", "no such file")
    file_error(maker, (ca, gone, key), gone, "TLS certificate", "no such file")
    file_error(maker, (ca, cert, gone), gone, "private key", "no such file")
    file_error(maker, (ca, str(tmp_path), key), str(tmp_path), "is a directory")


@pytest.mark.parametrize("maker", MAKERS)
def test_garbage_files_are_named(maker: Callable[..., ssl.SSLContext], pki: Pki,
                                 tmp_path: Path):
    ca, cert, key = pki.client.files
    text = tmp_path / "notes.txt"
    text.write_text("not a certificate\n")
    fake = tmp_path / "fake.pem"
    fake.write_text("-----BEGIN CERTIFICATE-----\nbm90IERFUg==\n-----END CERTIFICATE-----\n")
    for bad in (str(text), str(fake)):
        file_error(maker, (bad, cert, key), bad, "CA certificate")
        file_error(maker, (ca, bad, key), bad, "TLS certificate")
        file_error(maker, (ca, cert, bad), bad, "private key")
    file_error(maker, (ca, cert, str(text)), str(text), "not a PEM file")
    file_error(maker, (ca, cert, str(fake)), str(fake), "no private key")
    file_error(maker, (ca, str(fake), key), str(fake), "no certificate")
    # a key where the certificate should be, and the other way round
    file_error(maker, (ca, key, key), key, "TLS certificate", "no certificate")
    file_error(maker, (ca, cert, cert), cert, "private key", "no private key")


@pytest.mark.parametrize("maker", MAKERS)
def test_wrong_files_are_named(maker: Callable[..., ssl.SSLContext], pki: Pki,
                               tmp_path: Path):
    ca, cert, key = pki.client.files
    # another member's key
    file_error(maker, (ca, cert, pki.server.key), pki.server.key, "not the key of", cert)
    # a member's certificate as the CA
    file_error(maker, (pki.server.cert, cert, key), pki.server.cert, "no CA certificate")
    # an encrypted key: refused, not prompted for on the terminal
    encrypted = encrypt_key(key, tmp_path)
    file_error(maker, (ca, cert, encrypted), encrypted, "encrypted with a passphrase")


def test_contexts_are_tls13_with_certificates_required(pki: Pki):
    server_ctx, client_ctx = contexts(pki.server, pki.client)
    for ctx in (server_ctx, client_ctx):
        assert ctx.minimum_version == ssl.TLSVersion.TLSv1_3
        assert ctx.verify_mode == ssl.CERT_REQUIRED
        # the cluster CA is the only trust root
        assert ctx.cert_store_stats()["x509_ca"] == 1
    assert client_ctx.check_hostname is False
