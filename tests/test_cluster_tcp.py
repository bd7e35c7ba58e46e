"""The csnap metadata protocol between hosts, in one process over real TCP: TLS with
client certificates (refused cleanly on both sides when a certificate does not verify,
when one side speaks plain text), a protocol version mismatch and fuzzed streams inside
TLS refused with the server still up, and what a node on TCP held kept for its grace
period after its connection ends (docs/protocol.md "Nodes on other hosts")."""

from __future__ import annotations

import logging
import random
import socket
import struct

import pytest

from certs import Pki
from ddsnap.csnap import tls
from ddsnap.csnap.client import RemoteService, tcp_connector
from ddsnap.csnap.server import MetadataServer
from ddsnap.csnap.wire import (
    MAGIC,
    VERSION,
    FinishUploadLock,
    Identify,
    IdentifyOk,
    QuerySnapshotRead,
    ReadMapReply,
    Type,
    UploadLock,
    UploadOk,
)
from ddsnap.errors import OriginMismatch, ServiceFailed, TlsRefused
from ddsnap.service.local import LocalService
from ddsnap.store.blockdev import MemoryDevice
from ddsnap.store.memory import MemoryStore
from ddsnap.volume import Origin, Snapshot
from served import wait_until
from test_csnap_server import read_message

CS = 4096
SIZE = 16 * CS
UUID = bytes(range(16))


def make_server(context, node_grace: float = 60.0) -> tuple[MetadataServer, int]:
    svc = LocalService(MemoryStore(SIZE, 4 * CS, CS, 0), MemoryDevice(SIZE))
    srv = MetadataServer(svc, UUID, ack_timeout=5, node_grace=node_grace)
    address = srv.listen_tcp("127.0.0.1", 0, context)
    return srv, int(address.rpartition(":")[2])


@pytest.fixture
def tls_server(pki: Pki):
    srv, port = make_server(tls.server_context(*pki.server.files))
    yield srv, port
    srv.close()
    srv.service.close()


@pytest.fixture
def plain_server():
    srv, port = make_server(None)
    yield srv, port
    srv.close()
    srv.service.close()


def tcp_node(srv: MetadataServer, port: int, files, name: str = "n",
             uuid: bytes = bytes(16)) -> RemoteService:
    context = tls.client_context(*files) if files else None
    return RemoteService(tcp_connector("127.0.0.1", port, context, timeout=10),
                         srv.service.data, name=name, uuid=uuid, keep_group=1)


def raw_tls(port: int, files) -> tls.TlsSocket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    return tls.wrap(sock, tls.client_context(*files), server_side=False, timeout=10)


def still_serves(srv: MetadataServer, port: int, pki: Pki) -> None:
    """A good node is served after whatever happened: write, snapshot, read."""
    n = tcp_node(srv, port, pki.client.files, name="good")
    try:
        info = n.create_snapshot(f"s{random.getrandbits(32)}")
        Origin(n, srv.service.data).write(0, b"y" * CS)
        assert Snapshot(n, srv.service.data, info).read(0, CS) != b"y" * CS
    finally:
        n.close()


def test_a_node_over_tls_writes_and_reads_snapshots(tls_server, pki):
    srv, port = tls_server
    n = tcp_node(srv, port, pki.client.files, uuid=UUID)
    data = srv.service.data
    Origin(n, data).write(3 * CS, b"a" * CS)
    info = n.create_snapshot("s1")
    Origin(n, data).write(3 * CS, b"b" * CS)  # copies chunk 3 out for s1
    assert Snapshot(n, data, info).read(3 * CS, CS) == b"a" * CS
    assert Origin(n, data).read(3 * CS, CS) == b"b" * CS
    (desc,) = srv.nodes()
    assert desc["name"] == "n" and desc["peer"].startswith("127.0.0.1:")
    n.close()


def test_a_node_for_another_store_is_refused_over_tls(tls_server, pki):
    srv, port = tls_server
    with pytest.raises(OriginMismatch, match=f"serves store {UUID.hex()}"):
        tcp_node(srv, port, pki.client.files, uuid=bytes(16 * [9]))
    still_serves(srv, port, pki)


@pytest.mark.parametrize("who, why", [
    # another CA's member, trusting its own CA: the node refuses the server
    ("outsider", "the peer's certificate is not signed by the cluster CA"),
    # another CA's certificate, or a self-signed one, trusting ours: the server refuses
    ("impostor", "the peer refused our certificate: it is not signed by the peer's CA"),
    ("self_signed", "the peer refused our certificate"),
])
def test_a_node_whose_certificate_does_not_verify_is_refused_on_both_sides(
        tls_server, pki, caplog, who, why):
    srv, port = tls_server
    caplog.set_level(logging.WARNING, logger="ddsnap.csnap")
    with pytest.raises(TlsRefused) as e:
        tcp_node(srv, port, getattr(pki, who).files)
    assert why in str(e.value)
    wait_until(lambda: "refused a node connecting from 127.0.0.1:" in caplog.text,
               "the server to log the refusal")
    assert srv.nodes() == []
    still_serves(srv, port, pki)


def test_a_plain_text_node_is_refused_by_a_tls_server(tls_server, pki, caplog):
    srv, port = tls_server
    caplog.set_level(logging.WARNING, logger="ddsnap.csnap")
    with pytest.raises(ServiceFailed, match="closed the connection"):
        tcp_node(srv, port, None)
    wait_until(lambda: "does not speak TLS" in caplog.text, "the server to log why")
    still_serves(srv, port, pki)


def test_a_tls_node_is_refused_by_a_plain_server(plain_server, pki):
    srv, port = plain_server
    with pytest.raises(TlsRefused):
        tcp_node(srv, port, pki.client.files)
    # the plain server still serves plain nodes
    n = tcp_node(srv, port, None)
    assert n.snapshots() == []
    n.close()


def test_a_node_speaking_no_common_version_is_refused_inside_tls(tls_server, pki):
    srv, port = tls_server
    sock = raw_tls(port, pki.client.files)
    sock.sendall(Identify(1, low=VERSION + 1, high=VERSION + 3).encode())
    reply = read_message(sock)
    assert reply is not None and reply.type is Type.ERROR
    assert reply.error == "ProtocolError" and f"version {VERSION}" in reply.message
    assert read_message(sock) is None
    sock.close()
    still_serves(srv, port, pki)


def fuzzed_streams(count: int, seed: int = 12):
    """Streams a broken or hostile node might send after its TLS handshake: random
    bytes, a good IDENTIFY followed by random bytes, and valid headers over random
    bodies."""
    rng = random.Random(seed)
    good = Identify(1, name="fuzz").encode()
    for i in range(count):
        junk = rng.randbytes(rng.randrange(1, 3000))
        if i % 3 == 0:
            yield junk
        elif i % 3 == 1:
            yield good + junk
        else:
            t = rng.choice(list(Type))
            body = rng.randbytes(rng.randrange(0, 64))
            yield good + struct.pack(">IHHIQ", MAGIC, t, 0, len(body), rng.randrange(9)) + body


@pytest.mark.parametrize("stream", list(fuzzed_streams(12)))
def test_a_fuzzed_stream_inside_tls_drops_only_that_node(tls_server, pki, stream):
    srv, port = tls_server
    holder = tcp_node(srv, port, pki.client.files, name="holder")
    info = holder.create_snapshot("s")
    rmap = holder.map_snapshot_read(info, 0, 1)
    sock = raw_tls(port, pki.client.files)
    with_fuzz = stream + Identify(2, name="again").encode() * 2  # a second IDENTIFY at least
    try:
        sock.sendall(with_fuzz)
        while (msg := read_message(sock)) is not None:
            assert msg.type in (Type.IDENTIFY_OK, Type.ERROR) or msg.type & 0x8000
    except (OSError, AssertionError) as e:
        assert not isinstance(e, AssertionError) or "middle of a message" in str(e)
    sock.close()
    wait_until(lambda: [d["name"] for d in srv.nodes()] == ["holder"],
               "the fuzzing node dropped")
    assert srv.service.statistics().read_locks == 2  # the holder's locks are untouched
    holder.release_read(rmap)
    holder.close()
    still_serves(srv, port, pki)


def lock_and_vanish(port: int, files, name: str) -> None:
    """A node on TCP that takes read locks on chunks 0..1 of snapshot 1, then its
    connection ends."""
    sock = raw_tls(port, files)
    sock.sendall(Identify(1, name=name).encode())
    assert isinstance(read_message(sock), IdentifyOk)
    sock.sendall(QuerySnapshotRead(2, 1, 0, 1).encode())
    while not isinstance(reply := read_message(sock), ReadMapReply):
        assert reply is not None
    sock.close()


def test_what_a_lost_tcp_node_held_is_kept_until_it_uploads_again(tls_server, pki):
    srv, port = tls_server  # node_grace 60 s: only the upload gives it back here
    admin = tcp_node(srv, port, pki.client.files, name="admin")
    admin.create_snapshot("s")
    lock_and_vanish(port, pki.client.files, "far")
    wait_until(lambda: srv.lapsed() == {"far": 1}, "the lost node's holdings kept")
    assert srv.service.statistics().read_locks == 2  # not given back at the disconnect
    # the node comes back and uploads what it still holds (one of the two locks)
    sock = raw_tls(port, pki.client.files)
    sock.sendall(Identify(1, name="far").encode())
    assert isinstance(read_message(sock), IdentifyOk)
    sock.sendall(UploadLock(0, [(1, 1)], 0).encode() + FinishUploadLock(2).encode())
    assert isinstance(read_message(sock), UploadOk)
    assert srv.lapsed() == {}
    assert srv.service.statistics().read_locks == 1  # the upload's, not the old two
    sock.close()
    admin.close()


def test_what_a_lost_tcp_node_held_is_given_back_after_the_grace_period(pki):
    srv, port = make_server(tls.server_context(*pki.server.files), node_grace=0.2)
    try:
        admin = tcp_node(srv, port, pki.client.files, name="admin")
        info = admin.create_snapshot("s")
        lock_and_vanish(port, pki.client.files, "far")
        wait_until(lambda: srv.service.statistics().read_locks == 0,
                   "the grace period to end")
        assert srv.lapsed() == {}
        # an origin write to the chunks it had locked goes on
        Origin(admin, srv.service.data).write(0, b"z" * CS)
        assert Snapshot(admin, srv.service.data, info).read(0, CS) == bytes(CS)
        admin.close()
    finally:
        srv.close()
        srv.service.close()
