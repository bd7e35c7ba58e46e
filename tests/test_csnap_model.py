"""Model-based test of the csnap protocol: one metadata server, several nodes, a bytes
model of every volume.

A :class:`~ddsnap.csnap.server.MetadataServer` serves a
:class:`~ddsnap.service.local.LocalService` (SharedStore and MemoryStore) to nodes that
are :class:`~ddsnap.csnap.client.RemoteService` objects over real socket pairs, each
with its own volumes doing their own data I/O (seed 000: data never passes the server).
The hypothesis machine writes and reads the origin and snapshots through any node,
creates and deletes snapshots through a node or the server's own service, writes to
the origin from one node while another takes a snapshot (also over chunks the writer
holds grants for, which the creation revokes), kills a node holding read locks, grants
and origin writes in flight (the server gives them back; a write waiting for the lock
then goes on) and starts a new node in its place, and restarts the server while a node
holds read locks and origin writes, granted ones too (the new server reopens the store,
the nodes reconnect and upload what they hold, and a write to a chunk still read-locked
waits for the reader as before).  A node that wrote a chunk keeps writing it without
asking until a snapshot of the origin: any write after it that skipped its copy-out
would show in that snapshot.  After every step every volume
read through every node matches the model, and at the end the server holds no lock and
``check()`` finds nothing.
"""

from __future__ import annotations

import random
import socket
import threading
import time

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from conftest import examples
from ddsnap.csnap.client import RemoteService
from ddsnap.csnap.server import MetadataServer
from ddsnap.errors import StoreFull
from ddsnap.service.local import LocalService
from ddsnap.store.blockdev import MemoryDevice
from ddsnap.store.memory import MemoryStore
from ddsnap.store.shared import SharedStore
from ddsnap.volume import Origin, Snapshot

#: seconds a test waits for something the server does on its own threads (a hang guard:
#: every wait ends as soon as the condition holds)
SETTLE = 10.0


def settle(cond, what: str) -> None:
    """Wait until ``cond()`` holds (the server acts on its own threads)."""
    deadline = time.monotonic() + SETTLE
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen")
        time.sleep(0.002)


class Dialer:
    """Connections to whichever server is up now, over socket pairs (refused while
    none is: a server restarting)."""

    def __init__(self, server: MetadataServer | None):
        self.server = server

    def __call__(self) -> socket.socket:
        if self.server is None:
            raise ConnectionRefusedError("no metadata server")
        a, b = socket.socketpair()
        self.server.accept(a)
        return b

    def node(self, data, name: str) -> RemoteService:
        return RemoteService(self, data, name=name, reconnect=SETTLE)


def kill(node: RemoteService) -> None:
    """The node's process dies: its socket closes with nothing said."""
    node.reconnect = 0
    node.close()


class CsnapMachine(RuleBasedStateMachine):
    SHARED = True
    CHUNK = 4096
    ORIGIN = 16 * 4096
    STORE = 80 * 4096
    MAX_WRITE = 3 * 4096 + 100
    NODES = 3

    def __init__(self):
        super().__init__()
        seed = random.Random(7).randbytes(self.ORIGIN)
        self.origin_dev = MemoryDevice(self.ORIGIN)
        self.origin_dev.pwrite(seed, 0)
        store: SharedStore | MemoryStore
        if self.SHARED:
            store = SharedStore.create(MemoryDevice(self.STORE), origin_size=self.ORIGIN,
                                       origin_path="origin", chunk_size=self.CHUNK,
                                       max_snapshots=0, journal_blocks=24)
        else:
            store = MemoryStore(self.ORIGIN, self.STORE, self.CHUNK, 0)
        self.store = store
        self.svc = LocalService(store, self.origin_dev)
        #: the devices every node does its I/O on (one process: the same objects)
        self.data = self.svc.data
        self.server = MetadataServer(self.svc, ack_timeout=SETTLE)
        self.dial = Dialer(self.server)
        self.nodes = [self.dial.node(self.data, f"n{i}") for i in range(self.NODES)]
        self.model: dict[str, bytearray] = {"origin": bytearray(seed)}
        self.counter = 0
        self.kills = 0

    def teardown(self):
        clean = False
        try:
            for n in self.nodes:
                n.reconnect = 0
                n.close()
            settle(lambda: not self.server.nodes(), "nodes leaving")
            stats = self.svc.statistics()
            assert stats.read_locks == 0 and stats.origin_writes == 0, stats
            assert self.svc.check() == []
            clean = True
        finally:
            # after a failure a query may be stuck on a lock nobody will release
            self.server.close(wait=clean)
            if clean:
                self.svc.close()

    # -- helpers ---------------------------------------------------------------------------

    def node(self, data) -> RemoteService:
        return self.nodes[data.draw(st.integers(0, len(self.nodes) - 1), label="node")]

    def volume(self, node: RemoteService, name: str):
        if name == "origin":
            return Origin(node, self.data)
        return Snapshot(node, self.data, node.snapshot(name))

    def pick(self, data, snapshots_only=False) -> str | None:
        names = [n for n in self.model if not (snapshots_only and n == "origin")]
        return data.draw(st.sampled_from(sorted(names)), label="volume") if names else None

    def span(self, data, size=None):
        size = size or self.ORIGIN
        off = data.draw(st.integers(0, size - 1), label="offset")
        n = data.draw(st.integers(1, min(self.MAX_WRITE, size - off)), label="length")
        return off, n

    def write(self, node, name, off, payload, nowait=False) -> None:
        try:
            vol = self.volume(node, name)
            # (as the NBD server does: an origin write offered to write_nowait first,
            # which takes it only if the node holds grants for its chunks)
            if not (nowait and name == "origin" and vol.write_nowait(off, payload)):
                vol.write(off, payload)
        except StoreFull:
            # a refused write may have written some chunks of its range: adopt what
            # the volume reads there, byte for byte old or new
            got = self.volume(node, name).read(off, len(payload))
            old = self.model[name][off:off + len(payload)]
            assert all(g in (o, p) for g, o, p in zip(got, old, payload, strict=True))
            self.model[name][off:off + len(payload)] = got
            return
        self.model[name][off:off + len(payload)] = payload

    # -- rules -----------------------------------------------------------------------------

    @rule(data=st.data(), seed=st.integers(0, 255), nowait=st.booleans())
    def write_volume(self, data, seed, nowait):
        name = self.pick(data)
        assert name is not None
        off, n = self.span(data)
        self.write(self.node(data), name, off, bytes([seed]) * n, nowait)

    def read(self, node, name, off, n) -> bytes:
        """Read as the NBD server does: on its event loop first (``read_into_nowait``:
        a snapshot from the mappings the node keeps), else on a thread (asking the
        server, which may let the node keep the mapping)."""
        vol = self.volume(node, name)
        buf = bytearray(n)
        if not vol.read_into_nowait(off, memoryview(buf)):
            vol.read_into(off, memoryview(buf))
        return bytes(buf)

    @rule(data=st.data())
    def read_volume(self, data):
        name = self.pick(data)
        assert name is not None
        off, n = self.span(data)
        assert self.read(self.node(data), name, off, n) == self.model[name][off:off + n]

    @rule(data=st.data(), via_node=st.booleans())
    def create(self, data, via_node):
        self.counter += 1
        name = f"s{self.counter}"
        if via_node:
            self.node(data).create_snapshot(name)
        else:
            self.svc.create_snapshot(name)
        self.model[name] = bytearray(self.model["origin"])
        # every node knows it at once (the creation waited for their acknowledgements)
        for n in self.nodes:
            assert n.snapshot(name).name == name

    @precondition(lambda self: len(self.model) > 1)
    @rule(data=st.data(), via_node=st.booleans())
    def delete(self, data, via_node):
        name = self.pick(data, snapshots_only=True)
        assert name is not None
        if via_node:
            self.node(data).delete_snapshot(name)
        else:
            self.svc.delete_snapshot(name)
        del self.model[name]
        for n in self.nodes:  # the notice is not waited for: it arrives soon
            settle(lambda n=n: all(s.name != name for s in n.snapshots()),
                   f"node {n.node} forgetting {name}")

    @rule(data=st.data(), count=st.integers(1, 6), seed=st.integers(0, 255),
          granted=st.booleans())
    def snapshot_during_origin_writes(self, data, count, seed, granted):
        """A node writes ``count`` chunks one after another while another node takes a
        snapshot: the snapshot holds the writes that completed before it, a prefix.
        With ``granted`` the writer wrote the chunks once before, so it holds grants
        for them and writes without asking until the creation revokes them."""
        writer, taker = self.nodes[0], self.nodes[1]
        chunks = data.draw(st.lists(st.integers(0, self.ORIGIN // self.CHUNK - 1),
                                    min_size=count, max_size=count, unique=True),
                           label="chunks")
        if granted:
            for c in chunks:
                self.write(writer, "origin", c * self.CHUNK, bytes([seed ^ 0x5A]) * self.CHUNK)
        before = bytes(self.model["origin"])
        payloads = [bytes([(seed + i) % 256]) * self.CHUNK for i in range(count)]
        errors: list[BaseException] = []

        def run():
            try:
                vol = Origin(writer, self.data)
                for c, p in zip(chunks, payloads, strict=True):
                    vol.write(c * self.CHUNK, p)
            except BaseException as e:  # pragma: no cover - reported below
                errors.append(e)

        t = threading.Thread(target=run)
        t.start()
        self.counter += 1
        name = f"s{self.counter}"
        taker.create_snapshot(name)
        t.join()
        assert not errors, errors
        for c, p in zip(chunks, payloads, strict=True):
            self.model["origin"][c * self.CHUNK:(c + 1) * self.CHUNK] = p
        got = self.volume(taker, name).read(0, self.ORIGIN)
        done = 0
        for c, p in zip(chunks, payloads, strict=True):
            part = got[c * self.CHUNK:(c + 1) * self.CHUNK]
            if part == p and done == chunks.index(c):
                done += 1
            else:
                assert part == before[c * self.CHUNK:(c + 1) * self.CHUNK], (c, done)
        expect = bytearray(before)
        for c, p in zip(chunks[:done], payloads[:done], strict=True):
            expect[c * self.CHUNK:(c + 1) * self.CHUNK] = p
        assert got == expect
        self.model[name] = expect

    @precondition(lambda self: len(self.model) > 1)
    @rule(data=st.data(), seed=st.integers(0, 255), writes=st.integers(0, 2))
    def node_dies_holding_locks(self, data, seed, writes):
        """A node holds read locks on a snapshot's origin chunks (and maybe origin writes
        prepared, not finished) and dies; another node's write to those chunks, which
        waits for the locks, then completes, and a new node takes the dead one's place."""
        k = data.draw(st.integers(0, len(self.nodes) - 1), label="victim")
        victim = self.nodes[k]
        name = self.pick(data, snapshots_only=True)
        assert name is not None
        first = data.draw(st.integers(0, self.ORIGIN // self.CHUNK - 1), label="first")
        rmap = victim.map_snapshot_read(victim.snapshot(name), first, first)
        # origin writes in flight elsewhere (on the locked chunk it would wait for itself)
        second = (first + 1) % (self.ORIGIN // self.CHUNK)
        for _ in range(writes):
            victim.prepare_origin_write(second, second)
        settle(lambda: self.svc.statistics().read_locks >= len(rmap.locked),
               "the read lock")
        other = self.nodes[(k + 1) % len(self.nodes)]
        done = threading.Event()
        failed: list[BaseException] = []
        payload = bytes([seed]) * self.CHUNK

        def writer():
            try:
                Origin(other, self.data).write(first * self.CHUNK, payload)
            except BaseException as e:  # pragma: no cover - reported below
                failed.append(e)
            done.set()

        t = threading.Thread(target=writer)
        t.start()
        if rmap.locked or writes:
            # the write waits for the read lock, or for the creation barrier of nothing:
            # it cannot have finished while the victim holds the chunk
            assert not (rmap.locked and done.is_set())
        kill(victim)
        t.join(SETTLE)
        assert not t.is_alive(), "a write waiting on a dead node's read lock never went on"
        assert not failed, failed
        self.model["origin"][first * self.CHUNK:(first + 1) * self.CHUNK] = payload
        self.kills += 1
        self.nodes[k] = self.dial.node(self.data, f"n{k}.{self.kills}")

    @precondition(lambda self: len(self.model) > 1)
    @rule(data=st.data(), seed=st.integers(0, 255), writes=st.integers(0, 2))
    def server_restarts(self, data, seed, writes):
        """The metadata server goes away while a node holds a read lock on a snapshot's
        origin chunk (and maybe origin writes in flight elsewhere); a new server opens
        the store, expecting the nodes; they reconnect and upload; another node's write
        to the locked chunk waits until the reader lets go."""
        holder = self.nodes[0]
        name = self.pick(data, snapshots_only=True)
        assert name is not None
        first = data.draw(st.integers(0, self.ORIGIN // self.CHUNK - 1), label="first")
        rmap = holder.map_snapshot_read(holder.snapshot(name), first, first)
        second = (first + 1) % (self.ORIGIN // self.CHUNK)
        for _ in range(writes):
            holder.prepare_origin_write(second, second)
        holder.export_open(name)  # a client has the snapshot open on that node
        reconnects = [n.reconnects for n in self.nodes]
        # the old server dies: nothing it held in memory survives
        self.dial.server = None
        self.server.close()
        if isinstance(self.store, SharedStore):  # reopened from its device (a memory
            self.store = SharedStore.open(self.store.dev)  # store keeps its object)
        self.svc = LocalService(self.store, self.origin_dev)
        self.server = MetadataServer(self.svc, ack_timeout=SETTLE, generation=1,
                                     expect=[n.name for n in self.nodes], grace=SETTLE)
        self.dial.server = self.server
        for n, before in zip(self.nodes, reconnects, strict=True):
            settle(lambda n=n, before=before: n.reconnects > before, f"{n.name} reconnecting")
        st_ = self.svc.statistics()
        assert st_.read_locks == len(rmap.locked) and st_.origin_writes == writes, st_
        # the open export was declared again: the snapshot cannot be deleted under it
        assert st_.exports_open == {name: 1}, st_
        other = self.nodes[1]
        done = threading.Event()
        payload = bytes([seed]) * self.CHUNK

        def writer():
            Origin(other, self.data).write(first * self.CHUNK, payload)
            done.set()

        t = threading.Thread(target=writer)
        t.start()
        if rmap.locked:
            assert not done.is_set()
        holder.release_read(rmap)
        for _ in range(writes):
            holder.finish_origin_write()
        holder.export_close(name)
        t.join(SETTLE)
        assert done.is_set(), "the write never went on after the reader let go"
        self.model["origin"][first * self.CHUNK:(first + 1) * self.CHUNK] = payload

    @invariant()
    def every_volume_matches_the_model_on_every_node(self):
        for node in self.nodes:
            for name, want in self.model.items():
                assert self.read(node, name, 0, self.ORIGIN) == want, (node.node, name)


class SharedCsnapMachine(CsnapMachine):
    SHARED = True


class MemoryCsnapMachine(CsnapMachine):
    SHARED = False


STATEFUL = settings(max_examples=examples(12), stateful_step_count=14)
TestSharedCsnapModel = SharedCsnapMachine.TestCase
TestSharedCsnapModel.settings = STATEFUL
TestMemoryCsnapModel = MemoryCsnapMachine.TestCase
TestMemoryCsnapModel.settings = STATEFUL
