"""Model-based test: random operations on the origin and its snapshots, checked against a
plain bytes model of every volume.

A hypothesis RuleBasedStateMachine writes unaligned ranges to the origin and to writable
snapshots, reads any volume, creates snapshots of the origin and of snapshots (clones),
deletes snapshots (parents too: their clones stay whole), flushes, and closes and
reopens the store (SharedStore: ``svc.close()``, ``SharedStore.open`` on the same device,
a new MetadataService; also an unclean reopen that replays the journal; a no-op for a
MemoryStore).  Every read must equal the model.  After every step the store's exceptions
must follow the rules of versioned exceptions, its space accounting exact (no leaks) and
its per-snapshot space figures equal to a brute-force count (who reads each store chunk,
found by looking every snapshot up at every chunk); at teardown ``check()`` finds
nothing fatal, before and after a final reopen.

The stores are kept small so that StoreFull happens: a write that fails with it may
leave its own range old or new byte by byte, but no other volume may change.
"""

from __future__ import annotations

import random

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from conftest import examples
from ddsnap.errors import ReadOnlyVolume, StoreFull
from ddsnap.store.blockdev import MemoryDevice
from ddsnap.store.memory import MemoryStore
from ddsnap.store.service import MetadataService
from ddsnap.store.shared import SharedStore
from ddsnap.volume import Origin, Snapshot


def tree_blocks(store: SharedStore) -> int:
    """Index nodes plus leaves reachable from the root of a shared store."""
    def count(block, level):
        node = store._read_node(block)
        if level == store.state.levels - 1:
            return 1 + len(node.children)
        return 1 + sum(count(c, level + 1) for c in node.children)
    return count(store.state.root, 0)


class StoreMachine(RuleBasedStateMachine):
    """The state machine; subclasses pick the store kind and its geometry."""

    SHARED = True
    CHUNK = 4096
    ORIGIN = 25 * 4096 + 1000  # the last chunk is partial
    STORE = 66 * 4096  # shared: device bytes (32 data chunks); memory: data bytes
    MAX_SNAPSHOTS = 0
    JOURNAL = 24
    MAX_WRITE = 3 * 4096 + 17
    CACHE_BLOCKS = None  # None: the store's default

    def __init__(self):
        super().__init__()
        seed = random.Random(self.ORIGIN).randbytes(self.ORIGIN)
        self.origin_dev = MemoryDevice(self.ORIGIN, seed)
        if self.SHARED:
            self.store_dev = MemoryDevice(self.STORE)
            store = SharedStore.create(self.store_dev, origin_size=self.ORIGIN,
                                       origin_path="origin", chunk_size=self.CHUNK,
                                       max_snapshots=self.MAX_SNAPSHOTS,
                                       journal_blocks=self.JOURNAL)
        else:
            store = MemoryStore(self.ORIGIN, self.STORE, self.CHUNK, self.MAX_SNAPSHOTS)
        self._tune(store)
        self.svc = MetadataService(store, self.origin_dev)
        self.model: dict[str, bytearray] = {"origin": bytearray(seed)}
        self.infos = {}
        self.counter = 0
        self.full = 0

    # -- helpers ---------------------------------------------------------------------------

    @property
    def store(self):
        return self.svc.store

    def volume(self, name):
        if name == "origin":
            return Origin(self.svc)
        return Snapshot(self.svc, self.infos[name])

    def _range(self, data):
        off = data.draw(st.integers(0, self.ORIGIN - 1), label="offset")
        n = data.draw(st.integers(1, min(self.MAX_WRITE, self.ORIGIN - off)), label="length")
        return off, n

    def _write(self, name, off, payload, fua):
        vol = self.volume(name)
        try:
            vol.write(off, payload, fua=fua)
        except StoreFull:
            self.full += 1
            # The failed write's own range may hold old or new bytes; nothing else changes.
            got = vol.read(off, len(payload))
            old = self.model[name][off: off + len(payload)]
            for i, b in enumerate(got):
                assert b in (old[i], payload[i]), f"{name} byte {off + i} is neither old nor new"
            self.model[name][off: off + len(payload)] = got
            return
        self.model[name][off: off + len(payload)] = payload

    def _payload(self, n, seed):
        self.counter += 1
        return random.Random(seed * 7919 + self.counter).randbytes(n)

    # -- rules -------------------------------------------------------------------------------

    @rule(data=st.data(), seed=st.integers(0, 1 << 16), fua=st.booleans(),
          count=st.integers(1, 4))
    def write_origin(self, data, seed, fua, count):
        for _ in range(count):
            off, n = self._range(data)
            self._write("origin", off, self._payload(n, seed), fua)

    @rule(data=st.data(), seed=st.integers(0, 1 << 16), fua=st.booleans(),
          count=st.integers(2, 6))
    def write_origin_batch(self, data, seed, fua, count):
        """Writes gathered as the NBD server gathers them (``Origin.write_many``): they
        land in order, overlapping ones too; one that fails leaves the others done."""
        writes = []
        for _ in range(count):
            off, n = self._range(data)
            writes.append((off, self._payload(n, seed), fua))
        outcomes = Origin(self.svc).write_many(writes)
        for (off, payload, _f), outcome in zip(writes, outcomes):
            if outcome is None:
                self.model["origin"][off: off + len(payload)] = payload
            else:
                assert isinstance(outcome, StoreFull), outcome
                self.full += 1
        # A failed write's range may hold old or new bytes (as for single writes):
        # take what the origin reads there, after checking it is one of the two.
        for (off, payload, _f), outcome in zip(writes, outcomes):
            if outcome is not None:
                got = Origin(self.svc).read(off, len(payload))
                old = self.model["origin"][off: off + len(payload)]
                for i, b in enumerate(got):
                    assert b in (old[i], payload[i]), f"origin byte {off + i}"
                self.model["origin"][off: off + len(payload)] = got

    @precondition(lambda self: len(self.model) > 1)
    @rule(data=st.data(), seed=st.integers(0, 1 << 16), fua=st.booleans(),
          count=st.integers(1, 3))
    def write_snapshot(self, data, seed, fua, count):
        name = data.draw(st.sampled_from(sorted(self.infos)), label="snapshot")
        for _ in range(count):
            off, n = self._range(data)
            payload = self._payload(n, seed)
            if self.infos[name].read_only:
                try:
                    self.volume(name).write(off, payload, fua=fua)
                except ReadOnlyVolume:
                    continue
                raise AssertionError("a read-only snapshot accepted a write")
            self._write(name, off, payload, fua)

    @rule(data=st.data())
    def read(self, data):
        name = data.draw(st.sampled_from(sorted(self.model)), label="volume")
        off = data.draw(st.integers(0, self.ORIGIN), label="offset")
        n = data.draw(st.integers(0, min(4 * self.CHUNK, self.ORIGIN - off)), label="length")
        vol = self.volume(name)
        want = self.model[name][off: off + n]
        assert vol.read(off, n) == want, name
        # The NBD server's event-loop path: it may decline, never answer wrongly.
        buf = bytearray(n)
        if vol.read_into_nowait(off, memoryview(buf)):
            assert buf == want, f"{name}: no-wait read differs"

    @precondition(lambda self: len(self.infos) < 8)
    @rule(read_only=st.sampled_from([False, False, False, True]))
    def create(self, read_only):
        self.counter += 1
        name = f"s{self.counter}"
        self.infos[name] = self.svc.create_snapshot(name, read_only=read_only)
        self.model[name] = bytearray(self.model["origin"])

    @precondition(lambda self: 0 < len(self.infos) < 8)
    @rule(data=st.data(), read_only=st.sampled_from([False, False, True]))
    def create_from(self, data, read_only):
        """A snapshot of a snapshot: it reads what its parent reads now."""
        parent = data.draw(st.sampled_from(sorted(self.infos)), label="parent")
        self.counter += 1
        name = f"c{self.counter}"
        self.infos[name] = self.svc.create_snapshot(name, read_only=read_only, parent=parent)
        assert self.infos[name].parent == self.infos[parent].id
        self.model[name] = bytearray(self.model[parent])

    @precondition(lambda self: self.infos)
    @rule(data=st.data())
    def delete(self, data):
        name = data.draw(st.sampled_from(sorted(self.infos)), label="snapshot")
        self.svc.delete_snapshot(name)
        del self.infos[name]
        del self.model[name]

    @rule(data=st.data())
    def flush(self, data):
        name = data.draw(st.sampled_from(sorted(self.model)), label="volume")
        self.volume(name).flush()

    @rule()
    def reopen(self):
        if not self.SHARED:
            return
        self.svc.close()
        store = SharedStore.open(self.store_dev)
        self._tune(store)
        self.svc = MetadataService(store, self.origin_dev)
        self._refresh_infos()

    @precondition(lambda self: self.SHARED)
    @rule()
    def reopen_unclean(self):
        """Open a copy of the device as it is now, without closing: replays the journal."""
        self.svc.commit()
        self.store_dev = MemoryDevice(self.store_dev.size, self.store_dev.data)
        store = SharedStore.open(self.store_dev)
        self._tune(store)
        self.svc = MetadataService(store, self.origin_dev)
        self._refresh_infos()

    def _tune(self, store):
        if self.CACHE_BLOCKS is not None:
            store.cache_blocks = self.CACHE_BLOCKS

    def _refresh_infos(self):
        live = {s.name: s for s in self.svc.snapshots()}
        assert set(live) == set(self.infos), "snapshots changed across a reopen"
        for name, info in self.infos.items():
            assert (live[name].id, live[name].parent, live[name].read_only,
                    live[name].created) == (info.id, info.parent, info.read_only, info.created)
        self.infos = live

    # -- invariants --------------------------------------------------------------------------

    @invariant()
    def exceptions_are_consistent_and_nothing_leaks(self):
        store = self.store
        assert [s.id for s in store.snapshots()] == sorted(i.id for i in self.infos.values())
        assert not store.check_entries(), store.check_entries()
        seen = set()
        for owner, chunk, _tag, sc in store.exceptions():
            assert 0 <= chunk < store.origin_chunks
            assert sc not in seen, f"store chunk {sc} used twice"
            seen.add(sc)
        used = store.space()["chunks_used"]
        if self.SHARED:
            if self.CHUNK == 4096:
                meta = tree_blocks(store) + len(store.table_blocks) - 1
                assert used == len(seen) + meta, "space leaked or double-counted"
        else:
            assert used == len(seen), "space leaked or double-counted"

    @invariant()
    def space_figures_are_exact(self):
        """The incremental per-snapshot space figures (issue 3) against a brute-force
        count: look every live snapshot up at every chunk, count the readers of each
        store chunk; exclusive = read by that snapshot alone, shared = by it and another,
        and exceptions nobody reads are the sweep's (none once a delete returned)."""
        store = self.store
        readers: dict[int, list[int]] = {}
        ids = [i.id for i in self.infos.values()]
        for v in ids:
            for c in range(store.origin_chunks):
                sc = store.snapshot_exception(v, c)[0]
                if sc is not None:
                    readers.setdefault(sc, []).append(v)
        want = {v: [0, 0] for v in ids}
        for sc, vs in readers.items():
            for v in vs:
                want[v][len(vs) > 1] += 1
        total = sum(1 for _ in store.exceptions())
        assert store.snapshot_space() == {v: tuple(x) for v, x in want.items()}
        assert (store.exception_chunks(), store.unswept_chunks()) == (total, total - len(readers))
        assert store.unswept_chunks() == 0

    def teardown(self):
        for name, want in self.model.items():
            assert self.volume(name).read(0, self.ORIGIN) == want, name
        self.svc.commit()
        fatal = [f for f in self.store.check() if f.severity == "fatal"]
        assert not fatal, fatal
        if self.SHARED:
            self.reopen()
            assert self.store.check() == []
            for name, want in self.model.items():
                assert self.volume(name).read(0, self.ORIGIN) == want, name


STATEFUL = settings(max_examples=examples(60), stateful_step_count=100, deadline=None)


class SharedMachine(StoreMachine):
    SHARED = True


class MemoryMachine(StoreMachine):
    SHARED = False
    STORE = 40 * 4096


class SharedWideMachine(StoreMachine):
    """A bigger origin and long writes: hundreds of exceptions, so leaves split and
    merge (a leaf holds 168)."""

    SHARED = True
    ORIGIN = 400 * 4096 + 333
    STORE = 600 * 4096
    JOURNAL = 48
    MAX_WRITE = 120 * 4096


class SharedBigChunkMachine(StoreMachine):
    """64 KiB chunks: metadata blocks pack into chunks, copies move 16 blocks."""

    SHARED = True
    CHUNK = 65536
    ORIGIN = 9 * 65536 + 4097
    STORE = 20 * 65536
    JOURNAL = 40
    MAX_WRITE = 2 * 65536 + 5000


class SharedTinyCacheMachine(SharedWideMachine):
    """A cache of 4 decoded blocks: tree blocks are evicted and reloaded from disk all
    the time, even while an operation is using them."""

    CACHE_BLOCKS = 4


TestSharedStoreModel = SharedMachine.TestCase
TestSharedStoreModel.settings = STATEFUL
TestMemoryStoreModel = MemoryMachine.TestCase
TestMemoryStoreModel.settings = STATEFUL
TestSharedWideModel = SharedWideMachine.TestCase
TestSharedWideModel.settings = settings(STATEFUL, max_examples=examples(40))
TestSharedBigChunkModel = SharedBigChunkMachine.TestCase
TestSharedBigChunkModel.settings = settings(STATEFUL, max_examples=examples(40))
TestSharedTinyCacheModel = SharedTinyCacheMachine.TestCase
TestSharedTinyCacheModel.settings = settings(STATEFUL, max_examples=examples(40))
