"""Model-based test: random operations on the origin and its snapshots, checked against a
plain bytes model of every volume.

A hypothesis RuleBasedStateMachine writes unaligned ranges to the origin and to writable
snapshots, reads any volume, creates snapshots of the origin and of snapshots (clones),
deletes snapshots (parents too: their clones stay whole), flushes, resizes the origin
and the store (grows, shrinks, and shrinks that must be refused), and closes and
reopens the store (SharedStore: ``svc.close()``, ``SharedStore.open`` on the same device,
a new LocalService; also an unclean reopen that replays the journal; a no-op for a
MemoryStore).  Every read must equal the model.  After every step the store's exceptions
must follow the rules of versioned exceptions, its space accounting exact (no leaks) and
its per-snapshot space figures equal to a brute-force count (who reads each store chunk,
found by looking every snapshot up at every chunk); at teardown ``check()`` finds
nothing fatal, before and after a final reopen.

The stores are kept small so that StoreFull happens: a write that fails with it may
leave its own range old or new byte by byte, but no other volume may change.

Sizes (issue 9 item 4): the model of a volume is a bytearray of exactly its size.  A
snapshot keeps the size the origin had when it was taken, a clone takes its parent's;
an origin grow reads as zeroes past the old end (also where a shrink cut data off
before); a shrink of the origin is refused (ShrinkRefused, nothing changed) exactly
when a snapshot is bigger than the new size or the origin export is open.  A store
shrink is refused exactly when a store chunk past the new end is in use (found from the
exceptions and the metadata, not from the bitmap).  Every range drawn lies within the
volume's current size.
"""

from __future__ import annotations

import random

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from conftest import examples
from ddsnap import admin
from ddsnap.errors import ReadOnlyVolume, ShrinkRefused, StoreFull
from ddsnap.service.local import LocalService
from ddsnap.store.blockdev import MemoryDevice
from ddsnap.store.memory import MemoryStore
from ddsnap.store.shared import SharedStore
from ddsnap.volume import Origin, Snapshot


def tree_blocks(store: SharedStore) -> int:
    """Index nodes plus leaves reachable from the root of a shared store."""
    return len(tree_block_list(store))


def tree_block_list(store: SharedStore) -> list[int]:
    """The blocks of the index nodes and leaves reachable from the root."""
    out = []

    def walk(block, level):
        out.append(block)
        node = store.node(block)
        if level == store.state.levels - 1:
            out.extend(node.children)
        else:
            for c in node.children:
                walk(c, level + 1)
    walk(store.state.root, 0)
    return out


def bitmap_data_blocks(store: SharedStore) -> list[int]:
    """The allocation bitmap's blocks that lie in the data area (after a store resize
    the bitmap may live there)."""
    sb = store.sb
    return [b for b in range(sb.bitmap_start, sb.bitmap_start + sb.bitmap_blocks)
            if b >= store.data_start]


def used_blocks(store: SharedStore) -> set[int]:
    """Every data-area block in use, found from the tree (exceptions and the tree's own
    blocks) and the snapshot table, not from the bitmap; the live bitmap's blocks
    excluded."""
    bpc = store.bpc
    used = {sc * bpc + i for _o, _c, _t, sc in store.exceptions() for i in range(bpc)}
    used.update(tree_block_list(store))
    used.update(b for b in store.table_blocks if b >= store.data_start)
    return used


class StoreMachine(RuleBasedStateMachine):
    """The state machine; subclasses pick the store kind and its geometry."""

    SHARED = True
    CHUNK = 4096
    ORIGIN = 25 * 4096 + 1000  # the last chunk is partial
    STORE = 66 * 4096  # shared: device bytes (32 data chunks); memory: data bytes
    MAX_SNAPSHOTS = 0
    JOURNAL = 24
    MAX_WRITE = 3 * 4096 + 17
    CACHE_BLOCKS: int | None = None  # None: the store's default

    def __init__(self):
        super().__init__()
        seed = random.Random(self.ORIGIN).randbytes(self.ORIGIN)
        self.origin_dev = MemoryDevice(self.ORIGIN, seed)
        store: SharedStore | MemoryStore
        if self.SHARED:
            self.store_dev = MemoryDevice(self.STORE)
            store = SharedStore.create(self.store_dev, origin_size=self.ORIGIN,
                                       origin_path="origin", chunk_size=self.CHUNK,
                                       max_snapshots=self.MAX_SNAPSHOTS,
                                       journal_blocks=self.JOURNAL)
        else:
            store = MemoryStore(self.ORIGIN, self.STORE, self.CHUNK, self.MAX_SNAPSHOTS)
        self._tune(store)
        self.svc = LocalService(store, self.origin_dev)
        self.model: dict[str, bytearray] = {"origin": bytearray(seed)}
        self.infos = {}
        self.counter = 0
        self.full = 0
        self.resized = 0  # resizes of the origin or the store that happened
        self.stats_refused = 0  # shrinks refused (as the model said they must be)
        #: logical chunks any write (or resize) ever touched, in any volume: where diff
        #: may report a chunk whose bytes are the same in both volumes
        self.written: set[int] = set()

    # -- helpers ---------------------------------------------------------------------------

    @property
    def store(self):
        return self.svc.store

    def volume(self, name):
        if name == "origin":
            return Origin(self.svc, self.svc.data)
        return Snapshot(self.svc, self.svc.data, self.infos[name])

    def size(self, name) -> int:
        """The volume's size in bytes as the model has it (snapshots keep theirs)."""
        return len(self.model[name])

    def _range(self, data, name="origin"):
        size = self.size(name)
        off = data.draw(st.integers(0, size - 1), label="offset")
        n = data.draw(st.integers(1, min(self.MAX_WRITE, size - off)), label="length")
        return off, n

    def _check_all(self, what):
        """Every volume reads, whole, exactly as the model."""
        for name, want in self.model.items():
            vol = self.volume(name)
            assert vol.size == len(want), f"{what}: {name} is {vol.size} bytes, not {len(want)}"
            assert vol.read(0, len(want)) == want, f"{what}: {name} differs from the model"

    def _touch(self, off: int, n: int) -> None:
        self.written.update(range(off // self.CHUNK, (off + max(n, 1) - 1) // self.CHUNK + 1))

    def _write(self, name, off, payload, fua):
        self._touch(off, len(payload))
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
            self._touch(off, n)
        outcomes = Origin(self.svc, self.svc.data).write_many(writes)
        for (off, payload, _f), outcome in zip(writes, outcomes, strict=True):
            if outcome is None:
                self.model["origin"][off: off + len(payload)] = payload
            else:
                assert isinstance(outcome, StoreFull), outcome
                self.full += 1
        # A failed write's range may hold old or new bytes (as for single writes):
        # take what the origin reads there, after checking it is one of the two.
        for (off, payload, _f), outcome in zip(writes, outcomes, strict=True):
            if outcome is not None:
                got = Origin(self.svc, self.svc.data).read(off, len(payload))
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
            off, n = self._range(data, name)
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
        size = self.size(name)
        off = data.draw(st.integers(0, size), label="offset")
        n = data.draw(st.integers(0, min(4 * self.CHUNK, size - off)), label="length")
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
        assert self.infos[name].size == self.size("origin"), "a new snapshot's size"
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
        assert self.infos[name].size == self.size(parent), "a clone has its parent's size"
        self.model[name] = bytearray(self.model[parent])

    @precondition(lambda self: self.infos)
    @rule(data=st.data())
    def delete(self, data):
        name = data.draw(st.sampled_from(sorted(self.infos)), label="snapshot")
        self.svc.delete_snapshot(name)
        del self.infos[name]
        del self.model[name]

    @rule(data=st.data(), limit=st.integers(1, 8))
    def diff_lists_what_differs(self, data, limit):
        """``ddsnap diff`` of two volumes drawn (the same one too), in pages of 1 to 8
        entries: it lists every chunk whose bytes differ, and a chunk whose bytes are
        the same only where some write touched it (issue 13)."""
        names = sorted(self.model)
        a = data.draw(st.sampled_from(names))
        b = data.draw(st.sampled_from(names))
        listed: set[int] = set()
        start: int | None = 0
        pages = 0
        while start is not None:
            page = admin.diff(self.svc, a, b, start, limit)
            for first, last in page["runs"]:
                assert first >= start and not listed & set(range(first, last + 1))
                listed.update(range(first, last + 1))
            start = page["next"]
            pages += 1
            assert pages <= 4 * self.ORIGIN // self.CHUNK + 8, "diff pages never end"
        cs = self.CHUNK
        ma, mb = self.model[a], self.model[b]
        for c in range(-(-max(len(ma), len(mb)) // cs)):
            same = ma[c * cs:(c + 1) * cs] == mb[c * cs:(c + 1) * cs]
            if not same:
                assert c in listed, f"diff {a} {b} misses chunk {c}"
            elif c in listed:
                assert c in self.written, f"diff {a} {b} lists untouched chunk {c}"
        assert max(listed, default=-1) < -(-max(len(ma), len(mb)) // cs)
        if a == b:
            assert not listed

    @rule(data=st.data())
    def flush(self, data):
        name = data.draw(st.sampled_from(sorted(self.model)), label="volume")
        self.volume(name).flush()

    @rule(data=st.data(), kind=st.sampled_from(["grow", "shrink", "shrink-allowed"]),
          opened=st.sampled_from([False, False, False, True]))
    def resize_origin(self, data, kind, opened):
        """Grow or shrink the origin (a multiple of 512 bytes).  A shrink is refused with
        ShrinkRefused, changing nothing, exactly when a snapshot is bigger than the new
        size (a parent deleted while it has clones keeps its size through them) or the
        origin export is open.  Snapshots keep their size; the grown part reads zeroes,
        also where an earlier shrink cut data off."""
        old = self.size("origin")
        biggest = max((self.size(n) for n in self.infos), default=0)
        top = (self.ORIGIN + 3 * self.CHUNK) // 512
        if kind == "grow":
            lo = old // 512 + 1
            new = 512 * data.draw(st.integers(lo, max(lo, top)), label="sectors")
        elif kind == "shrink":
            new = 512 * data.draw(st.integers(1, max(1, old // 512)), label="sectors")
        else:
            lo = max(1, -(-biggest // 512))
            new = 512 * data.draw(st.integers(min(lo, old // 512), max(lo, old // 512)),
                                  label="sectors")
        refused = new < old and (biggest > new or opened)
        sizes = {n: i.size for n, i in self.infos.items()}
        if opened:
            self.svc.export_open("origin")
        try:
            if refused:
                try:
                    self.svc.resize_origin(new)
                except ShrinkRefused:
                    self.stats_refused += 1
                else:
                    raise AssertionError(f"origin shrink {old} -> {new} accepted with a "
                                         f"snapshot of {biggest} bytes (open: {opened})")
                assert self.store.origin_size == old and self.origin_dev.size == old
                self._check_all("after a refused origin shrink")
                return
            got = self.svc.resize_origin(new)
        finally:
            if opened:
                self.svc.export_close("origin")
        assert got == {"origin_size": new, "old_size": old}
        assert self.store.origin_size == new and self.origin_dev.size == new
        self._touch(min(old, new), abs(new - old))
        if new < old:
            del self.model["origin"][new:]
        else:
            self.model["origin"].extend(bytes(new - old))
        self.resized += 1
        live = {s.name: s.size for s in self.svc.snapshots()}
        assert live == sizes, "a snapshot's size changed with the origin's"
        self._check_all(f"after an origin resize {old} -> {new}")

    def _store_geometry(self) -> tuple[int, int, int]:
        """(chunks now, fewest chunks a resize accepts, most this machine tries)."""
        store, cs = self.store, self.CHUNK
        return store.store_size // cs, store.min_size // cs, self.STORE // cs + 8

    @rule(data=st.data(), grow=st.booleans())
    def resize_store(self, data, grow):
        """Grow the store, or shrink it: refused (ShrinkRefused, nothing changed)
        exactly when a chunk past the new end is in use, which is found here from the
        exceptions, the tree and the snapshot table.  A shared store may also refuse
        with StoreFull when it has no free, whole bitmap byte's worth of blocks for the
        new bitmap (nothing changed either).  Afterwards every volume reads as before."""
        store = self.store
        cs = self.CHUNK
        now, least, most = self._store_geometry()
        if grow:
            new = data.draw(st.integers(now + 1, max(now + 1, most)), label="chunks")
        else:
            new = data.draw(st.integers(least, max(least, now - 1)), label="chunks")
        if self.SHARED:
            bpc = store.bpc
            sb = store.sb
            old_run = set(range(sb.bitmap_start, sb.bitmap_start + sb.bitmap_blocks))
            self.svc.commit()
            used = used_blocks(store) - old_run
            past = sorted(b for b in used if b >= new * bpc)
            home = sb.snaptable_start + sb.snaptable_blocks
            q = store.bitmap
            free = {b for b in range(store.data_start, new * bpc)
                    if b not in used and b not in old_run and b not in q.q_blocks
                    and b // bpc not in q.q_chunks}
            has_byte = any(all(b in free for b in range(k, k + 8))
                           for k in range(-(-store.data_start // 8) * 8, new * bpc - 7, 8))
            room = sb.bitmap_start != home or has_byte  # the new bitmap's one block
            total = lambda n: n - store.data_start // bpc  # noqa: E731
        else:
            past = sorted({sc for _o, _c, _t, sc in store.exceptions() if sc >= new})
            room = True
            total = lambda n: n  # noqa: E731
        old_total = store.space()["chunks_total"]
        try:
            got = self.svc.resize_store(new * cs)
        except ShrinkRefused:
            assert new < now and past, f"store shrink {now} -> {new} chunks refused, " \
                                       "though nothing lives past the new end"
            self.stats_refused += 1
        except StoreFull:
            assert self.SHARED and not room, f"store resize {now} -> {new} chunks: " \
                                             "StoreFull with room for the new bitmap"
        else:
            assert not past, f"store shrink {now} -> {new} chunks accepted with blocks " \
                             f"{past[:5]} in use past the new end"
            assert got["chunks_total"] == total(new) == store.space()["chunks_total"]
            assert self.store.cow.size == new * cs
            self.resized += 1
            self._check_all(f"after a store resize {now} -> {new} chunks")
            return
        assert store.space()["chunks_total"] == old_total
        assert self.store.cow.size == now * cs
        self._check_all("after a refused store resize")

    @rule()
    def reopen(self):
        if not self.SHARED:
            return
        self.svc.close()
        store = SharedStore.open(self.store_dev)
        self._tune(store)
        self.svc = LocalService(store, self.origin_dev)
        self._refresh_infos()

    @precondition(lambda self: self.SHARED)
    @rule()
    def reopen_unclean(self):
        """Open a copy of the device as it is now, without closing: replays the journal."""
        self.svc.commit()
        self.store_dev = MemoryDevice(self.store_dev.size, bytes(self.store_dev.data))
        store = SharedStore.open(self.store_dev)
        self._tune(store)
        self.svc = LocalService(store, self.origin_dev)
        self._refresh_infos()

    def _tune(self, store):
        if self.CACHE_BLOCKS is not None:
            store.cache_blocks = self.CACHE_BLOCKS

    def _refresh_infos(self):
        live = {s.name: s for s in self.svc.snapshots()}
        assert set(live) == set(self.infos), "snapshots changed across a reopen"
        for name, info in self.infos.items():
            assert (live[name].id, live[name].parent, live[name].read_only,
                    live[name].created, live[name].size) == (
                        info.id, info.parent, info.read_only, info.created, info.size)
        self.infos = live

    # -- invariants --------------------------------------------------------------------------

    @invariant()
    def exceptions_are_consistent_and_nothing_leaks(self):
        store = self.store
        assert [s.id for s in store.snapshots()] == sorted(i.id for i in self.infos.values())
        assert not store.check_entries(), store.check_entries()
        seen = set()
        for _owner, chunk, _tag, sc in store.exceptions():
            assert 0 <= chunk < store.origin_chunks
            assert sc not in seen, f"store chunk {sc} used twice"
            seen.add(sc)
        used = store.space()["chunks_used"]
        assert store.origin_size == self.size("origin"), "the recorded origin size"
        if self.SHARED:
            if self.CHUNK == 4096:
                meta = (tree_blocks(store) + len(store.table_blocks) - 1
                        + len(bitmap_data_blocks(store)))
                assert used == len(seen) + meta, "space leaked or double-counted"
        else:
            assert used == len(seen), "space leaked or double-counted"

    @invariant()
    def space_figures_are_exact(self):
        """The incremental per-snapshot space figures (issue 3) against a brute-force
        count: look every live snapshot up at every chunk that has an exception (at
        others every volume reads the origin), count the readers of each store chunk;
        exclusive = read by that snapshot alone, shared = by it and another, and
        exceptions nobody reads are the sweep's (none once a delete returned).

        Sizes: a copy-out made for a snapshot past an older, smaller one's end is grouped
        with the older one, which the figures count as sharing it (docs/format.md
        "Resizing"), so the lookups here ignore sizes; but every exception must be read
        by some live snapshot within that snapshot's size: one only smaller snapshots
        are left for is swept with the delete that left them."""
        store = self.store
        readers: dict[int, list[int]] = {}
        within: set[int] = set()
        chunks = sorted({c for _o, c, _t, _sc in store.exceptions()})
        for info in self.infos.values():
            v = info.id
            for c in chunks:
                sc = store.snapshot_exception(v, c)[0]
                if sc is not None:
                    readers.setdefault(sc, []).append(v)
                    if c * self.CHUNK < info.size:
                        within.add(sc)
        want = {i.id: [0, 0] for i in self.infos.values()}
        for vs in readers.values():
            for v in vs:
                want[v][len(vs) > 1] += 1
        total = sum(1 for _ in store.exceptions())
        assert store.snapshot_space() == {v: tuple(x) for v, x in want.items()}
        assert (store.exception_chunks(), store.unswept_chunks()) == (total, total - len(readers))
        assert store.unswept_chunks() == 0
        kept = {sc for _o, _c, _t, sc in store.exceptions()} - within
        assert not kept, f"store chunks {sorted(kept)} kept though no snapshot reads them " \
                         "within its size"

    def teardown(self):
        self._check_all("teardown")
        self.svc.commit()
        fatal = [f for f in self.store.check() if f.severity == "fatal"]
        assert not fatal, fatal
        if self.SHARED:
            self.reopen()
            assert self.store.check() == []
            self._check_all("teardown, reopened")


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
