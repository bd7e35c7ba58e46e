"""The csnap metadata server against bad and slow nodes, over real sockets: a malformed
or hostile message drops only that node's connection (and gives back what it held); a
node for another store or protocol version is refused with a clear error; a node that
never acknowledges a snapshot creation is cut off and the creation goes on; errors cross
the protocol with their class and errno."""

from __future__ import annotations

import errno
import signal
import socket
import struct
import subprocess
import sys
import threading

import pytest

from ddsnap.csnap.client import RemoteService, Stream
from ddsnap.csnap.server import MetadataServer
from ddsnap.csnap.wire import (
    MAGIC,
    VERSION,
    FinishSnapshotRead,
    Identify,
    IdentifyOk,
    OriginWriteOk,
    QueryOriginWrite,
    Type,
    decode,
)
from ddsnap.errors import OriginMismatch, SnapshotNotFound, StoreFull
from ddsnap.service.api import SnapshotInfo
from ddsnap.service.local import LocalService
from ddsnap.store.blockdev import MemoryDevice
from ddsnap.store.memory import MemoryStore
from ddsnap.volume import Origin, Snapshot
from test_csnap_model import SETTLE, settle
from test_service import lock_held_elsewhere

CS = 4096
SIZE = 16 * CS
UUID = bytes(range(16))


@pytest.fixture
def server():
    svc = LocalService(MemoryStore(SIZE, 4 * CS, CS, 0), MemoryDevice(SIZE))
    srv = MetadataServer(svc, UUID, ack_timeout=0.5)
    yield srv
    srv.close()
    svc.close()


def node(srv: MetadataServer, name: str = "n", uuid: bytes = bytes(16),
         keep_group: int = 1) -> RemoteService:
    """A node on a socket pair; it asks for no more mappings than it reads (unless
    ``keep_group``), so that what it keeps is what the test read."""
    def dial():
        a, b = socket.socketpair()
        srv.accept(a)
        return b
    return RemoteService(dial, srv.service.data, name=name, uuid=uuid,
                         keep_group=keep_group)


def raw(srv: MetadataServer) -> socket.socket:
    """A node's socket with nothing said yet."""
    a, b = socket.socketpair()
    srv.accept(a)
    b.settimeout(30)
    return b


def read_message(sock: Stream):
    """The next csnap message on ``sock`` (a socket or a TLS stream), or None at a
    clean end of stream; AssertionError if it ends inside a message."""
    head = b""
    while len(head) < 20:
        part = sock.recv(20 - len(head))
        if not part:
            assert not head, "closed in the middle of a message header"
            return None
        head += part
    _magic, t, _flags, length, id = struct.unpack(">IHHIQ", head)
    body = b""
    while len(body) < length:
        part = sock.recv(length - len(body))
        assert part, "closed in the middle of a message"
        body += part
    return decode(t, id, body)


def identified(srv: MetadataServer) -> socket.socket:
    sock = raw(srv)
    sock.sendall(Identify(1, name="raw").encode())
    assert isinstance(read_message(sock), IdentifyOk)
    return sock


@pytest.mark.parametrize("garbage", [
    b"GET / HTTP/1.1\r\n\r\n" + bytes(20),                       # not csnap at all
    struct.pack(">IHHIQ", MAGIC, Type.QUERY_ORIGIN_WRITE, 0, 4, 9) + bytes(4),  # no range
    struct.pack(">IHHIQ", MAGIC, Type.IDENTIFY_OK, 0, 0, 9),     # a server's message
    struct.pack(">IHHIQ", MAGIC, 0x4242, 0, 0, 9),               # unknown type
    struct.pack(">IHHIQ", MAGIC, Type.CALL, 0, 1 << 30, 9),      # a 1 GiB body
    FinishSnapshotRead(0, [(3, 3)]).encode(),                    # a lock it never held
])
def test_a_malformed_message_drops_only_that_node(server, garbage):
    good = node(server, "good")
    holder = node(server, "holder")
    info = good.create_snapshot("s")
    rmap = holder.map_snapshot_read(info, 0, 1)  # read locks on chunks 0 and 1
    assert server.service.statistics().read_locks == 2
    bad = identified(server)
    bad.sendall(garbage)
    # the server closes the bad connection ...
    assert read_message(bad) is None
    settle(lambda: len(server.nodes()) == 2, "the bad node dropped")
    # ... and the others are served as before
    Origin(good, server.service.data).write(5 * CS, b"x" * CS)
    assert Snapshot(good, server.service.data, info).read(5 * CS, CS) == bytes(CS)
    holder.release_read(rmap)  # (the holder keeps the mapping and its locks)
    good.close()
    holder.close()
    settle(lambda: server.service.statistics().read_locks == 0, "the locks released")


def test_a_dropped_node_gives_back_its_locks_and_origin_writes(server):
    n = node(server)
    info = n.create_snapshot("s")
    n.map_snapshot_read(info, 2, 4)
    n.prepare_origin_write(8, 8)
    st = server.service.statistics()
    # (the write, and the node's grant: one origin write of the service until returned)
    assert (st.read_locks, st.origin_writes) == (3, 2)
    assert server.nodes()[0]["read_locks"] == 3 and server.nodes()[0]["granted"]
    n.reconnect = 0
    n.close()
    settle(lambda: server.service.statistics().read_locks == 0, "locks given back")
    assert server.service.statistics().origin_writes == 0
    assert server.nodes() == []


def test_a_node_expecting_another_store_is_refused(server):
    with pytest.raises(OriginMismatch, match=f"serves store {UUID.hex()}"):
        node(server, uuid=bytes(16 * [7]))
    assert node(server, uuid=UUID).uuid == UUID  # the right one is welcome


def test_a_node_speaking_no_common_version_is_refused(server):
    sock = raw(server)
    sock.sendall(Identify(1, low=VERSION + 1, high=VERSION + 5).encode())
    reply = read_message(sock)
    assert reply is not None and reply.type is Type.ERROR
    assert f"version {VERSION}" in reply.message and reply.error == "ProtocolError"
    assert read_message(sock) is None  # then the server hangs up


def test_a_node_that_never_acknowledges_is_cut_off_and_the_creation_goes_on(server):
    live = node(server, "live")
    mute = identified(server)  # identified, then never reads or answers again
    info = live.create_snapshot("s")  # waits up to ack_timeout for the mute node
    assert info.name == "s" and live.snapshot("s") == info
    settle(lambda: len(server.nodes()) == 1, "the mute node cut off")
    mute.close()
    live.close()


def test_errors_cross_with_their_class_and_errno(server):
    n = node(server)
    with pytest.raises(SnapshotNotFound):
        n.delete_snapshot("nope")
    info = n.create_snapshot("s")
    vol = Origin(n, server.service.data)
    # 4 store chunks: the fifth copy-out finds the store full
    for c in range(4):
        vol.write(c * CS, b"y" * CS)
    with pytest.raises(StoreFull) as e:
        vol.write(4 * CS, b"y" * CS)
    assert e.value.errno == errno.ENOSPC
    assert Snapshot(n, server.service.data, info).read(0, 5 * CS) == bytes(5 * CS)
    n.close()


def test_a_local_node_process_that_stops_answering_is_killed_before_the_creation(
        server, tmp_path):
    """The fence: a node process on this host that does not acknowledge (stopped, say)
    is killed before the snapshot creation goes on, so it cannot write afterwards."""
    path = str(tmp_path / "meta.sock")
    server.listen(path)
    script = (
        "import socket, sys, time\n"
        "from ddsnap.csnap.wire import Identify\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        f"s.connect({path!r})\n"
        "s.sendall(Identify(1, name='mute').encode())\n"
        "assert s.recv(64)\n"  # IDENTIFY_OK: the server counts it from now on
        "print('identified', flush=True)\n"
        "time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "identified\n"
        server.service.create_snapshot("s")  # waits ack_timeout, fences, goes on
        assert proc.wait(timeout=30) == -signal.SIGKILL
        assert server.nodes() == []
    finally:
        proc.kill()
        proc.wait()


# --- origin-write grants ------------------------------------------------------------------


def test_a_granted_chunk_is_written_again_without_asking(server):
    n = node(server)
    vol = Origin(n, server.service.data)
    vol.write(3 * CS, b"a" * CS)  # asked: made unique, and granted
    assert n.grants_held == 1 and server.nodes()[0]["granted"]
    settle(lambda: server.service.statistics().origin_writes == 1, "the write finished")
    n.prepare_origin_write(3, 3)
    # no query: the service counts the grant alone, not a second write
    assert n.granted_writes == 1 and server.service.statistics().origin_writes == 1
    n.finish_origin_write()
    assert n.granted_writes == 0
    n.prepare_origin_write(4, 4)  # a chunk not granted is asked for (and granted)
    assert n.granted_writes == 0 and server.service.statistics().origin_writes == 2
    n.finish_origin_write()
    assert n.grants_held == 2
    n.close()
    settle(lambda: server.service.statistics().origin_writes == 0, "all given back")


def test_a_snapshot_waits_for_granted_writes_in_flight_and_revokes_the_grants(server):
    """The snapshot barrier over processes: the creation revokes the writer's grants and
    waits until its granted write in flight is done; the next write asks again, so the
    snapshot keeps what it saw."""
    writer, taker = node(server, "writer"), node(server, "taker")
    data = server.service.data
    vol = Origin(writer, data)
    vol.write(3 * CS, b"a" * CS)
    writer.prepare_origin_write(3, 3)  # a granted write in flight
    made: dict[str, SnapshotInfo] = {}
    t = threading.Thread(target=lambda: made.update(info=taker.create_snapshot("s")))
    t.start()
    settle(lambda: writer.grants_held == 0, "the revocation reaching the writer")
    t.join(0.3)  # (a chance for a creation that does not wait to finish)
    assert t.is_alive(), "the snapshot was taken with a granted write in flight"
    assert {d["name"]: d["granted"] for d in server.nodes()}["writer"]
    data.origin.pwrite(b"b" * CS, 3 * CS)
    writer.finish_origin_write()  # the acknowledgement goes with the last write
    t.join(SETTLE)
    assert not t.is_alive()
    snap = Snapshot(taker, data, made["info"])
    assert snap.read(3 * CS, CS) == b"b" * CS  # the write completed before: included
    assert not any(d["granted"] for d in server.nodes())
    vol.write(3 * CS, b"c" * CS)  # asks again: the chunk is copied out first
    assert snap.read(3 * CS, CS) == b"b" * CS and vol.read(3 * CS, CS) == b"c" * CS
    assert writer.grants_held == 1  # granted again after the creation
    writer.close()
    taker.close()


def test_a_node_that_keeps_its_grants_is_cut_off_and_the_creation_goes_on(server):
    live = node(server, "live")
    greedy = identified(server)
    greedy.sendall(QueryOriginWrite(5, [(2, 2)]).encode())
    reply = read_message(greedy)
    assert isinstance(reply, OriginWriteOk) and reply.results == [None] and reply.granted
    # it never reads again, so never acknowledges the revocation
    info = live.create_snapshot("s")  # waits ack_timeout for it, cuts it off
    assert info.name == "s"
    settle(lambda: len(server.nodes()) == 1, "the greedy node cut off")
    assert server.service.statistics().origin_writes == 0  # its write and grant void
    Origin(live, server.service.data).write(2 * CS, b"z" * CS)
    assert Snapshot(live, server.service.data, info).read(2 * CS, CS) == bytes(CS)
    greedy.close()
    live.close()


def test_no_grant_during_a_merge(server):
    n = node(server)
    vol = Origin(n, server.service.data)
    n.create_snapshot("s")
    vol.write(1 * CS, b"m" * CS)
    assert n.grants_held == 1
    n.start_merge("s")  # (not run: the merge stays in progress)
    assert n.grants_held == 0  # revoked before the merge started
    vol.write(5 * CS, b"w" * CS)
    assert n.grants_held == 0 and not server.nodes()[0]["granted"]
    n.close()


@pytest.mark.parametrize("how", ["close", "break"])
def test_a_local_node_process_with_grants_is_killed_unless_it_returns_them(
        server, tmp_path, how):
    """A node that goes away holding grants may still have granted writes on their
    way, so a process on this host is killed first; one that closes in order returns
    its grants (RETURN_GRANTS) and is left alone."""
    path = str(tmp_path / "meta.sock")
    server.listen(path)
    script = (
        "import socket, sys\n"
        "from ddsnap.csnap.client import RemoteService\n"
        "def dial():\n"
        "    s = socket.socket(socket.AF_UNIX)\n"
        f"    s.connect({path!r})\n"
        "    return s\n"
        "n = RemoteService(dial, name='p')\n"
        "n.prepare_origin_write(2, 2)\n"
        "n.finish_origin_write()\n"
        "print('granted', n.grants_held, flush=True)\n"
        f"if {how!r} == 'close':\n"
        "    n.close()\n"
        "else:\n"
        "    n.sock.shutdown(socket.SHUT_RDWR)\n"
        "print('gone', flush=True)\n"
        "sys.stdin.read()\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "granted 1\n"
        # (a broken connection may get the process killed before it says so)
        assert proc.stdout.readline() in ("gone\n", "" if how == "break" else "gone\n")
        settle(lambda: server.nodes() == [], "the node dropped")
        assert server.service.statistics().origin_writes == 0
        if how == "close":
            assert proc.poll() is None  # not killed
        else:
            assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        proc.kill()
        proc.wait()


# --- snapshot read mappings a node keeps --------------------------------------------------


def read_nowait(vol, offset: int, n: int) -> bytes | None:
    """The bytes the NBD event loop would read with no query, or None (it would ask)."""
    buf = bytearray(n)
    return bytes(buf) if vol.read_into_nowait(offset, memoryview(buf)) else None


def origin_write_in_thread(n: RemoteService, data, offset: int):
    """Write one chunk of b"w" to the origin through ``n`` on a thread of its own; the
    thread and the event set when the write is done."""
    done = threading.Event()

    def write():
        Origin(n, data).write(offset, b"w" * CS)
        done.set()

    t = threading.Thread(target=write)
    t.start()
    return t, done


def test_a_kept_mapping_is_read_again_without_asking(server):
    n = node(server)
    data = server.service.data
    data.origin.pwrite(b"o" * SIZE, 0)
    info = n.create_snapshot("s")
    snap = Snapshot(n, data, info)
    assert read_nowait(snap, 0, 2 * CS) is None  # nothing kept yet: it asks
    assert snap.read(0, 2 * CS) == b"o" * 2 * CS  # asked; the node keeps the map
    assert n.kept_chunks == 2
    assert server.service.statistics().read_locks == 2  # kept with their locks
    with lock_held_elsewhere(server.service):  # a query now would wait
        assert read_nowait(snap, 100, CS) == b"o" * CS
        assert read_nowait(snap, 0, 3 * CS) is None  # chunk 2 is not kept
    n.close()
    settle(lambda: server.service.statistics().read_locks == 0, "the locks given back")


def test_a_read_in_a_thread_uses_the_mappings_the_node_keeps(server):
    """The blocking read path (a thread, as O_DIRECT devices always take) reads kept
    mappings with no query, as the event loop's page-cache path does."""
    n = node(server)
    data = server.service.data
    data.origin.pwrite(b"o" * SIZE, 0)
    info = n.create_snapshot("s")
    snap = Snapshot(n, data, info)
    assert snap.read(0, 2 * CS) == b"o" * 2 * CS  # asked; kept, with 2 read locks
    rmap = n.map_snapshot_read(info, 0, 1)
    # a query would have taken 2 more read locks for the read (given back after it)
    assert server.nodes()[0]["read_locks"] == 2, "a read of kept mappings asked"
    assert rmap.sources == [None, None]
    n.release_read(rmap)
    assert snap.read(CS // 2, CS) == b"o" * CS
    assert server.nodes()[0]["read_locks"] == 2
    n.close()
    settle(lambda: server.service.statistics().read_locks == 0, "the locks given back")


def test_a_recall_waits_for_a_read_in_progress_from_a_kept_mapping(server):
    """While a thread reads an origin chunk through a kept mapping, a recall of its
    read lock (an origin write to the chunk) waits for that read to end: the chunk
    is not overwritten under it; afterwards the snapshot reads its copy-out."""
    reader, writer = node(server, "reader"), node(server, "writer")
    data = server.service.data
    data.origin.pwrite(b"o" * SIZE, 0)
    info = writer.create_snapshot("s")
    snap = Snapshot(reader, data, info)
    assert snap.read(CS, CS) == b"o" * CS and reader.kept_chunks == 1
    rmap = reader.map_snapshot_read(info, 1, 1)  # a read from the kept mapping begins
    t, done = origin_write_in_thread(writer, data, CS)
    t.join(0.5)
    assert not done.is_set(), "the origin write did not wait for the read"
    assert data.origin.pread(CS, CS) == b"o" * CS  # what the read reads meanwhile
    reader.release_read(rmap)
    t.join(SETTLE)
    assert done.is_set() and data.origin.pread(CS, CS) == b"w" * CS
    assert snap.read(CS, CS) == b"o" * CS  # its copy-out now
    reader.close()
    writer.close()


def test_a_delete_waits_for_a_read_in_progress_from_a_kept_store_chunk(server):
    """A thread reads a copy-out through a kept mapping (no query) while the snapshot is
    deleted elsewhere: the node acknowledges the delete, which frees the chunk, only
    once that read is done (within the server's acknowledgement timeout)."""
    server.ack_timeout = SETTLE
    reader, deleter = node(server, "reader"), node(server, "deleter")
    data = server.service.data
    info = deleter.create_snapshot("s")
    Origin(deleter, data).write(0, b"w" * CS)  # chunk 0 of s: a copy-out
    snap = Snapshot(reader, data, info)
    assert snap.read(0, CS) == bytes(CS) and reader.kept_chunks == 1
    rmap = reader.map_snapshot_read(info, 0, 0)  # a read of the kept copy-out begins
    assert rmap.sources[0] is not None
    assert server.nodes()[0]["read_locks"] == 0  # (no query: nothing asked)
    done = threading.Event()

    def delete() -> None:
        deleter.delete_snapshot("s")
        done.set()

    t = threading.Thread(target=delete)
    t.start()
    settle(lambda: reader.kept_chunks == 0, "the delete reaching the reader")
    t.join(0.5)
    assert not done.is_set(), "the delete went on under a read of its chunk"
    assert data.cow.pread(CS, rmap.sources[0] * CS) == bytes(CS)  # still the snapshot's
    reader.release_read(rmap)
    t.join(SETTLE)
    assert done.is_set()
    reader.close()
    deleter.close()


def test_an_origin_write_recalls_the_read_locks_a_node_keeps(server):
    reader, writer = node(server, "reader"), node(server, "writer")
    data = server.service.data
    data.origin.pwrite(b"o" * SIZE, 0)
    info = writer.create_snapshot("s")
    snap = Snapshot(reader, data, info)
    assert snap.read(0, 4 * CS) == b"o" * 4 * CS
    assert reader.kept_chunks == 4
    t, done = origin_write_in_thread(writer, data, 2 * CS)
    t.join(SETTLE)
    assert done.is_set(), "the origin write waited for a kept read lock forever"
    # the recalled chunk is read from its copy-out now; the others are still kept
    assert reader.kept_chunks == 3
    assert read_nowait(snap, 2 * CS, CS) is None
    assert snap.read(0, 4 * CS) == b"o" * 4 * CS
    assert read_nowait(snap, 0, 4 * CS) == b"o" * 4 * CS  # (kept again, the copy-out)
    reader.close()
    writer.close()


def test_a_map_recalled_during_its_read_is_not_kept(server):
    reader, writer = node(server, "reader"), node(server, "writer")
    data = server.service.data
    info = writer.create_snapshot("s")
    rmap = reader.map_snapshot_read(info, 1, 1)  # a read in progress
    t, done = origin_write_in_thread(writer, data, CS)
    settle(lambda: reader.kept_drops > 0, "the recall reaching the reader")
    assert not done.is_set()  # the write waits for the read ...
    reader.release_read(rmap)  # ... which ends: its lock goes back, not kept
    t.join(SETTLE)
    assert done.is_set() and reader.kept_chunks == 0
    reader.close()
    writer.close()


def test_a_snapshot_write_revokes_the_mappings_nodes_keep(server):
    reader, writer = node(server, "reader"), node(server, "writer")
    data = server.service.data
    data.origin.pwrite(b"o" * SIZE, 0)
    info = writer.create_snapshot("s")
    seen = Snapshot(reader, data, info)
    assert seen.read(0, 2 * CS) == b"o" * 2 * CS and reader.kept_chunks == 2
    Snapshot(writer, data, info).write(0, b"v" * CS)
    assert reader.kept_chunks == 0  # dropped before the write was done
    assert read_nowait(seen, 0, CS) is None
    assert seen.read(0, 2 * CS) == b"v" * CS + b"o" * CS
    reader.close()
    writer.close()


def test_only_origin_mappings_are_kept_under_delete_oldest(server):
    n = node(server)
    data = server.service.data
    info = n.create_snapshot("s")
    Origin(n, data).write(0, b"w" * CS)  # chunk 0 of s is a copy-out now
    snap = Snapshot(n, data, info)
    snap.read(0, 2 * CS)
    assert n.kept_chunks == 2
    n.set_full_policy("delete-oldest")  # (its snapshots in use may be deleted)
    assert n.kept_chunks == 0
    snap.read(0, 2 * CS)
    assert n.kept_chunks == 0  # a map with a store chunk is not kept ...
    snap.read(CS, CS)
    assert n.kept_chunks == 1  # ... one of origin chunks is
    n.close()


def test_a_merge_start_drops_kept_mappings_and_none_is_kept_during_it(server):
    n = node(server)
    data = server.service.data
    keep = n.create_snapshot("keep")
    n.create_snapshot("merged")
    Snapshot(n, data, keep).read(0, 2 * CS)
    assert n.kept_chunks == 2
    n.start_merge("merged")  # (not run: the merge stays in progress)
    assert n.kept_chunks == 0 and server.service.statistics().read_locks == 0
    Snapshot(n, data, keep).read(0, 2 * CS)
    assert n.kept_chunks == 0
    n.close()


def test_a_delete_waits_until_nodes_dropped_the_snapshots_kept_mappings(server):
    reader, deleter = node(server, "reader"), node(server, "deleter")
    info = deleter.create_snapshot("s")
    Origin(deleter, server.service.data).write(0, b"w" * CS)  # chunk 0: a copy-out
    Snapshot(reader, server.service.data, info).read(0, CS)
    assert reader.kept_chunks == 1
    deleter.delete_snapshot("s")  # (its chunks are free for reuse when it returns)
    assert reader.kept_chunks == 0
    settle(lambda: server.service.statistics().read_locks == 0, "the locks given back")
    reader.close()
    deleter.close()


def test_a_node_asks_for_the_rest_of_a_group_it_read_from_in_the_background(server):
    n = node(server, keep_group=8)
    data = server.service.data
    data.origin.pwrite(b"o" * SIZE, 0)
    info = n.create_snapshot("s")
    Origin(n, data).write(10 * CS, b"w" * CS)  # chunk 10 of s: a copy-out
    snap = Snapshot(n, data, info)
    snap.read(9 * CS, CS)  # group 8..15
    settle(lambda: n.kept_chunks == 8, "the rest of the group kept")
    with lock_held_elsewhere(server.service):  # no query from here
        # (chunk 10 from its copy-out in the store, the others from the origin)
        assert read_nowait(snap, 8 * CS, 8 * CS) == b"o" * 8 * CS
    assert server.service.statistics().read_locks == 7  # (chunk 10 reads the store)
    n.close()


def test_a_node_stops_asking_for_groups_while_they_serve_no_read(server):
    n = node(server, keep_group=2)
    n.prefetch_window = 2  # (judged every 2 maps kept after a query)
    data = server.service.data
    snap = Snapshot(n, data, n.create_snapshot("s"))
    snap.read(0, CS)
    settle(lambda: n.kept_chunks == 2, "chunk 1 asked for with its group")
    snap.read(4 * CS, CS)  # the window ends: no read was served from kept mappings
    assert not n.prefetching
    snap.read(8 * CS, CS)
    assert n.kept_chunks == 4  # chunks 5 and 9 were not asked for
    for _ in range(3):  # reads served from kept mappings: groups pay again
        assert read_nowait(snap, 0, 2 * CS) is not None
    snap.read(12 * CS, CS)  # the window ends: 3 reads served, 2 maps kept
    assert n.prefetching
    settle(lambda: n.kept_chunks == 6, "chunk 13 asked for with its group")
    n.close()
