"""Conformance suite: one set of tests every exception store must pass.

Parametrized over SharedStore on a MemoryDevice, SharedStore on a FileDevice in
``tmp_path`` and MemoryStore, first at the ExceptionStore API level (sharers, exceptions,
allocation, snapshot lifecycle and names), then at the volume level through the real
LocalService, Origin and Snapshot (copy-out, unsharing, partial writes, a full store,
space accounting of deletes, tree compaction).
"""

from __future__ import annotations

import errno
import random

import pytest

from ddsnap.errors import (
    InvalidArgument,
    ReadOnlyVolume,
    SnapshotBusy,
    SnapshotExists,
    SnapshotNotFound,
    StoreFull,
    TooManySnapshots,
)
from ddsnap.service.local import LocalService
from ddsnap.store.blockdev import MemoryDevice
from ddsnap.store.format import INF, LEAF_MAX, NODE_MAX, index_key, pack_key
from ddsnap.store.memory import MemoryStore
from ddsnap.store.shared import SharedStore
from ddsnap.volume import Origin, Snapshot

KINDS = ["shared-memory", "shared-file", "memory"]
SHARED_KINDS = ["shared-memory", "shared-file"]


@pytest.fixture(params=KINDS)
def kind(request):
    return request.param


def sweep_all(store) -> None:
    """Run sweep steps until the store says nothing is left (at most 1000 steps)."""
    for _ in range(1000):
        done = store.sweep_step()
        store.commit()
        if done:
            return
    raise AssertionError("sweep never finished")


def no_fatal(store) -> None:
    """Assert ``store.check()`` finds nothing fatal."""
    fatal = [f for f in store.check() if f.severity == "fatal"]
    assert not fatal, fatal


def exc_dict(store) -> dict:
    """The store's exceptions as ``{(owner, chunk, tag): store_chunk}``."""
    return {(o, c, t): sc for o, c, t, sc in store.exceptions()}


def cur(version: int, chunk: int) -> tuple:
    """The key of ``version``'s own current data at ``chunk``."""
    return (version, chunk, INF)


# =======================================================================================
# ExceptionStore API level

def test_no_snapshots_means_no_sharers(make_store, kind):
    store = make_store(kind)
    assert store.snapshots() == []
    assert store.origin_chunks == (1 << 20) // 4096
    for c in (0, 1, 255):
        assert store.origin_sharers(c) == 0
    assert list(store.exceptions()) == []
    assert store.check() == []


def test_sharers_follow_the_live_snapshots(make_store, kind):
    store = make_store(kind)
    a = store.create_snapshot("a")
    b = store.create_snapshot("b", read_only=True, created=123456789)
    assert b.id > a.id > 0
    assert (b.read_only, b.created, a.read_only) == (True, 123456789, False)
    assert (a.parent, a.parent_name) == (0, "origin")
    assert [s.name for s in store.snapshots()] == ["a", "b"]
    assert store.snapshot("b") == b
    for c in (0, 17, 255):
        # A copy-out is tagged with the newest snapshot: it serves every older one too.
        assert store.origin_sharers(c) == b.id
        assert store.snapshot_exception(a.id, c) == (None, False)


def test_origin_and_snapshot_exceptions(make_store, kind):
    store = make_store(kind)
    a = store.create_snapshot("a")
    b = store.create_snapshot("b")
    sc = store.allocate_chunk()
    store.add_origin_exception(5, sc, store.origin_sharers(5))
    assert store.origin_sharers(5) == 0
    assert store.origin_sharers(4) == b.id and store.origin_sharers(6) == b.id
    assert store.snapshot_exception(a.id, 5) == (sc, False)
    assert store.snapshot_exception(b.id, 5) == (sc, False)
    # a takes a chunk of its own: the copy-out stays, b alone reads it now (in place).
    assert not store.snapshot_write_keeps(a.id, 5)
    mine = store.allocate_chunk()
    assert mine != sc
    store.add_snapshot_exception(a.id, 5, mine)
    assert store.snapshot_exception(a.id, 5) == (mine, True)
    assert store.snapshot_exception(b.id, 5) == (sc, True)
    # A snapshot can also diverge at a chunk it still shares with the origin.
    own = store.allocate_chunk()
    store.add_snapshot_exception(b.id, 9, own)
    assert store.snapshot_exception(b.id, 9) == (own, True)
    assert store.origin_sharers(9) == b.id  # a still reads the origin there
    # A snapshot created now reads the origin everywhere.
    c = store.create_snapshot("c")
    assert store.origin_sharers(5) == c.id
    assert store.origin_sharers(9) == c.id
    assert store.snapshot_exception(c.id, 5) == (None, False)
    store.commit()
    want = {(0, 5, b.id): sc, cur(a.id, 5): mine, cur(b.id, 9): own}
    assert exc_dict(store) == want
    assert store.snapshot_space() == {a.id: (1, 0), b.id: (2, 0), c.id: (0, 0)}
    no_fatal(store)
    store = make_store.reopen(store)
    assert exc_dict(store) == want
    assert [s.name for s in store.snapshots()] == ["a", "b", "c"]
    assert store.snapshot_space() == {a.id: (1, 0), b.id: (2, 0), c.id: (0, 0)}
    assert store.check() == []


def test_a_copy_out_one_snapshot_reads_is_written_in_place(make_store, kind):
    store = make_store(kind)
    a = store.create_snapshot("a")
    sc = store.allocate_chunk()
    store.add_origin_exception(3, sc, store.origin_sharers(3))
    assert store.snapshot_exception(a.id, 3) == (sc, True)
    store.commit()
    assert store.check() == []


def test_snapshots_of_snapshots(make_store, kind):
    store = make_store(kind)
    a = store.create_snapshot("a")
    store.add_origin_exception(1, store.allocate_chunk(), store.origin_sharers(1))
    ca = store.create_snapshot("ca", parent=a.id)
    assert (ca.parent, ca.parent_name) == (a.id, "a")
    assert store.snapshot_exception(ca.id, 1) == store.snapshot_exception(a.id, 1)
    assert store.snapshot_exception(ca.id, 2) == (None, False)  # both read the origin
    assert store.origin_sharers(2) == a.id  # a copy-out for a serves ca through it
    # a writes chunk 1, which only a and ca read: the copy-out becomes ca's (no copy).
    assert not store.snapshot_write_keeps(a.id, 1)
    old = store.snapshot_exception(a.id, 1)[0]
    new = store.allocate_chunk()
    store.add_snapshot_exception(a.id, 1, new)
    assert store.snapshot_exception(a.id, 1) == (new, True)
    assert store.snapshot_exception(ca.id, 1) == (old, True)
    # a writes chunk 2, where both read the origin: ca keeps a copy of the origin data.
    assert store.snapshot_write_keeps(a.id, 2)
    new2, kept = store.allocate_chunk(), store.allocate_chunk()
    store.add_snapshot_exception(a.id, 2, new2, kept)
    assert store.snapshot_exception(ca.id, 2) == (kept, True)
    assert store.snapshot_exception(a.id, 2) == (new2, True)
    # ca writes chunk 3 (reads the origin through a): a is not concerned.
    assert not store.snapshot_write_keeps(ca.id, 3)
    store.add_snapshot_exception(ca.id, 3, store.allocate_chunk())
    assert store.snapshot_exception(a.id, 3) == (None, False)
    assert store.snapshot_space() == {a.id: (2, 0), ca.id: (3, 0)}
    store.commit()
    no_fatal(store)
    # Deleting the parent keeps the child whole: a lives on as a ghost.
    before = {c: store.snapshot_exception(ca.id, c)[0] for c in range(5)}
    store.begin_delete("a")
    sweep_all(store)
    assert [s.name for s in store.snapshots()] == ["ca"]
    assert store.snapshots()[0].parent_name is None
    assert {c: store.snapshot_exception(ca.id, c)[0] for c in range(5)} == before
    assert store.snapshot_space() == {ca.id: (3, 0)}
    assert store.space()["chunks_used"] == 3 + (store.space()["chunks_used"] - 3)
    no_fatal(store)
    store = make_store.reopen(store)
    assert {c: store.snapshot_exception(ca.id, c)[0] for c in range(5)} == before
    assert store.snapshot_space() == {ca.id: (3, 0)}
    store.begin_delete("ca")
    sweep_all(store)
    assert list(store.exceptions()) == [] and store.table.index == {}
    assert store.check() == []


def test_many_exceptions_of_one_chunk(make_store, kind):
    """No per-chunk cap: the same chunk copied out between 600 snapshot creations."""
    store = make_store(kind, store_size=8 << 20)
    ids = []
    for i in range(600):
        ids.append(store.create_snapshot(f"s{i}").id)
        tag = store.origin_sharers(7)
        assert tag == ids[-1]
        store.add_origin_exception(7, store.allocate_chunk(), tag)
        if i % 100 == 99:
            store.commit()
    store.commit()
    assert len(exc_dict(store)) == 600
    chunks = {store.snapshot_exception(v, 7)[0] for v in ids}
    assert len(chunks) == 600
    assert all(store.snapshot_exception(v, 7)[1] for v in ids)
    no_fatal(store)
    store = make_store.reopen(store)
    assert {store.snapshot_exception(v, 7)[0] for v in ids} == chunks
    assert store.check() == []


def test_unsharing_a_copy_out_with_other_readers_leaves_it_to_them(make_store, kind):
    store = make_store(kind)
    a = store.create_snapshot("a")
    b = store.create_snapshot("b")
    sc = store.allocate_chunk()
    store.add_origin_exception(3, sc, store.origin_sharers(3))
    free = store.space()["chunks_free"]
    new = store.allocate_chunk()
    store.add_snapshot_exception(a.id, 3, new)
    assert store.space()["chunks_free"] == free - 1
    assert exc_dict(store) == {(0, 3, b.id): sc, cur(a.id, 3): new}
    store.commit()
    assert store.check() == []


def test_delete_and_sweep(make_store, kind):
    store = make_store(kind)
    a = store.create_snapshot("a")
    only_a = []
    for c in (1, 2, 3):  # copy-outs only a reads
        only_a.append(store.allocate_chunk())
        store.add_origin_exception(c, only_a[-1], store.origin_sharers(c))
    b = store.create_snapshot("b")
    only_b = store.allocate_chunk()
    store.add_origin_exception(3, only_b, store.origin_sharers(3))  # a has its own
    both = store.allocate_chunk()
    store.add_origin_exception(4, both, store.origin_sharers(4))  # a and b
    store.commit()
    free = store.space()["chunks_free"]
    assert store.snapshot_space() == {a.id: (3, 1), b.id: (1, 1)}
    info = store.begin_delete("a")
    assert info.name == "a" and info.id == a.id
    assert [s.name for s in store.snapshots()] == ["b"]
    assert store.unswept_chunks() == 3
    with pytest.raises(SnapshotNotFound):
        store.snapshot("a")
    with pytest.raises(SnapshotNotFound):
        store.begin_delete("a")
    store.commit()
    sweep_all(store)
    assert exc_dict(store) == {(0, 3, b.id): only_b, (0, 4, b.id): both}
    assert store.space()["chunks_free"] == free + 3  # a's own chunks came back
    assert store.snapshot_space() == {b.id: (2, 0)}
    assert store.check() == []
    # A new snapshot gets a new id and sees none of a's data.
    c = store.create_snapshot("c")
    assert c.id > b.id
    assert store.snapshot_exception(c.id, 2) == (None, False)
    assert store.snapshot_exception(c.id, 4) == (None, False)
    assert store.origin_sharers(2) == c.id
    # The old name is free too.
    store.create_snapshot("a")
    store.commit()
    assert store.check() == []


def test_sweep_with_nothing_deleted_is_done(make_store, kind):
    store = make_store(kind)
    store.create_snapshot("a")
    assert store.sweep_step() is True


@pytest.mark.parametrize("name", ["", "x" * 256, "é" * 128, "origin", "a/b", "/", "a\0b"])
def test_bad_snapshot_names(make_store, kind, name):
    store = make_store(kind)
    with pytest.raises(InvalidArgument):
        store.create_snapshot(name)
    assert store.snapshots() == []


def test_snapshot_name_rules(make_store, kind):
    store = make_store(kind)
    longest = "é" * 127 + "x"  # 255 bytes of UTF-8
    assert len(longest.encode()) == 255
    for name in (longest, "Origin", "origin2", "snap shot", "日本"):
        store.create_snapshot(name)
    with pytest.raises(SnapshotExists) as e:
        store.create_snapshot(longest)
    assert e.value.name == longest
    with pytest.raises(SnapshotNotFound):
        store.snapshot("nope")
    with pytest.raises(SnapshotNotFound):
        store.begin_delete("nope")
    store.commit()
    store = make_store.reopen(store)
    names = [s.name for s in store.snapshots()]
    assert names == [longest, "Origin", "origin2", "snap shot", "日本"]


def test_snapshot_limit(make_store, kind):
    """``--max-snapshots`` is a limit the user chose (none by default)."""
    store = make_store(kind, max_snapshots=20)
    for i in range(20):
        store.create_snapshot(f"s{i}")
    with pytest.raises(TooManySnapshots):
        store.create_snapshot("one-more")
    store.begin_delete("s10")
    # The version stays until the delete is swept.
    with pytest.raises(TooManySnapshots):
        store.create_snapshot("one-more")
    sweep_all(store)
    info = store.create_snapshot("one-more")
    assert info.id == 21
    store.commit()
    store = make_store.reopen(store)
    assert len(store.snapshots()) == 20
    assert store.check() == []


def test_no_snapshot_limit_by_default(make_store, kind):
    """More snapshots than any v2 store held (1,024), kept in a table that grows."""
    store = make_store(kind, store_size=4 << 20)
    for i in range(1100):
        store.create_snapshot(f"s{i}")
        if i % 200 == 0:
            store.commit()
    store.begin_delete("s3")
    sweep_all(store)
    store.create_snapshot("again")
    store.commit()
    store = make_store.reopen(store)
    names = [s.name for s in store.snapshots()]
    assert len(names) == 1100 and names[-1] == "again" and "s3" not in names
    assert store.check() == []


def test_create_is_constant_time(make_store, kind):
    """Creating a snapshot touches no per-chunk state: the exceptions are unchanged and
    the new snapshot reads the origin everywhere without any tree change."""
    store = make_store(kind, origin_size=4 << 20, store_size=8 << 20)
    a = store.create_snapshot("a")
    for c in range(0, 1024, 2):
        store.add_origin_exception(c, store.allocate_chunk(), store.origin_sharers(c))
    store.commit()
    assert store.snapshot_space()[a.id] == (512, 0)
    before = exc_dict(store)
    space = store.space()
    b = store.create_snapshot("b")
    assert exc_dict(store) == before
    assert store.space() == space
    assert store.origin_sharers(2) == b.id
    assert store.origin_sharers(3) == b.id
    assert store.snapshot_exception(b.id, 2) == (None, False)


@pytest.mark.parametrize("kind", SHARED_KINDS)
def test_create_commit_size_does_not_depend_on_the_tree(make_store, kind):
    """A SharedStore commits a snapshot creation as one snapshot-table block, whether the
    tree is a single leaf or hundreds."""
    sizes = []
    for exceptions in (0, 20000):
        store = make_store(kind, origin_size=128 << 20, store_size=128 << 20)
        a = store.create_snapshot("a")
        for c in range(exceptions):
            store.add_origin_exception(c, store.allocate_chunk(), a.id)
            if c % 5000 == 0:
                store.commit()
        store.commit()
        store.create_snapshot("b")
        batch = store.begin_commit()
        sizes.append(len(batch.tx.images))
        store.write_commit(batch)
        if exceptions:
            assert sum(1 for _ in store.leaves()) > 100
    assert sizes == [1, 1]


# =======================================================================================
# Volume level

class Rig:
    """An origin device, an exception store of one kind and a LocalService over them,
    with a bytes model of every volume.

    ``write(volume, offset, data)`` / ``read(volume, offset, length)`` address the
    origin as ``"origin"`` and snapshots by name; ``verify()`` reads every volume whole
    and compares it with the model.
    """

    def __init__(self, make_store, kind, origin_size=256 << 10, store_size=4 << 20,
                 chunk_size=4096, max_snapshots=0, seed=0, journal_blocks=None):
        self.make_store = make_store
        self.kind = kind
        self.store = make_store(kind, origin_size=origin_size, store_size=store_size,
                                chunk_size=chunk_size, max_snapshots=max_snapshots,
                                journal_blocks=journal_blocks)
        self.origin_dev = MemoryDevice(origin_size,
                                       random.Random(seed).randbytes(origin_size))
        self.svc = LocalService(self.store, self.origin_dev)
        self.model = {"origin": bytearray(self.origin_dev.data)}
        self.infos = {}

    def volume(self, name):
        """The Origin or Snapshot volume called ``name``."""
        if name == "origin":
            return Origin(self.svc, self.svc.data)
        return Snapshot(self.svc, self.svc.data, self.infos[name])

    def create(self, name, read_only=False):
        """Create snapshot ``name`` through the service and in the model."""
        self.infos[name] = self.svc.create_snapshot(name, read_only)
        self.model[name] = bytearray(self.model["origin"])
        return self.infos[name]

    def delete(self, name):
        """Delete snapshot ``name`` through the service and from the model."""
        self.svc.delete_snapshot(name)
        del self.infos[name]
        del self.model[name]

    def write(self, name, offset, data):
        """Write through the volume; update the model only if the write succeeded."""
        self.volume(name).write(offset, data)
        self.model[name][offset: offset + len(data)] = data

    def read(self, name, offset, length):
        """Read through the volume called ``name``."""
        return self.volume(name).read(offset, length)

    def used(self) -> int:
        """Chunks the store reports in use."""
        return self.store.space()["chunks_used"]

    def verify(self):
        """Every volume reads back exactly as the model says."""
        for name, want in self.model.items():
            got = self.read(name, 0, len(want))
            assert got == want, f"{name} differs from the model"
            buf = bytearray(len(want))
            if self.volume(name).read_into_nowait(0, memoryview(buf)):
                assert buf == want, f"{name}: the no-wait read differs from the model"

    def reopen(self):
        """Close and reopen a shared store (a no-op for a MemoryStore)."""
        if isinstance(self.store, MemoryStore):
            return
        self.svc.close()
        self.store = SharedStore.open(self.store.dev)
        self.svc = LocalService(self.store, self.origin_dev)


@pytest.fixture
def rig(make_store, kind):
    return Rig(make_store, kind)


def test_copy_out_once_for_many_snapshots(rig):
    cs = rig.store.chunk_size
    names = [f"s{i}" for i in range(6)]
    for n in names:
        rig.create(n)
    base = rig.used()
    rig.write("origin", 3 * cs + 100, b"N" * 50)
    assert rig.used() == base + 1, "N snapshots sharing a chunk need ONE copy-out"
    newest = rig.infos[names[-1]].id
    assert list(exc_dict(rig.store)) == [(0, 3, newest)]
    assert rig.store.snapshot_space()[newest] == (0, 1)
    # Writing the now-unique origin chunk again copies nothing.
    rig.write("origin", 3 * cs, b"M" * cs)
    assert rig.used() == base + 1
    # A write over chunks 3..5 copies out only 4 and 5.
    rig.write("origin", 3 * cs + 7, b"Q" * (2 * cs + 9))
    assert rig.used() == base + 3
    rig.verify()
    # A snapshot taken after the copy-out reads the new origin data and shares it.
    rig.create("late")
    assert rig.read("late", 3 * cs, 4) == b"MMMM"
    rig.write("origin", 3 * cs, b"Z")
    assert rig.used() == base + 4
    rig.verify()
    no_fatal(rig.store)


def test_snapshot_writes_unshare(rig):
    cs = rig.store.chunk_size
    s1, s2 = rig.create("s1"), rig.create("s2")
    rig.write("origin", 0, b"o" * 10)  # copy-out shared by s1 and s2
    base = rig.used()
    rig.write("s1", 5, b"one")
    assert rig.used() == base + 1
    assert rig.read("s2", 0, 10) == rig.model["s2"][:10] != rig.model["s1"][:10]
    assert rig.read("origin", 0, 10) == b"o" * 10
    assert rig.store.snapshot_exception(s1.id, 0)[1] is True
    assert rig.store.snapshot_exception(s2.id, 0)[1] is True
    rig.write("s1", 6, b"again")  # already unique: no new chunk
    assert rig.used() == base + 1
    # Diverging from the origin at chunk 7 leaves the origin and s2 alone.
    rig.write("s1", 7 * cs + 1, b"seven")
    assert rig.used() == base + 2
    assert rig.store.origin_sharers(7) == s2.id
    # ...so an origin write there copies out for s2 only.
    rig.write("origin", 7 * cs, b"X" * cs)
    excs = exc_dict(rig.store)
    assert excs[(s1.id, 7, INF)] == rig.store.snapshot_exception(s1.id, 7)[0]
    assert excs[(0, 7, s2.id)] == rig.store.snapshot_exception(s2.id, 7)[0]
    assert rig.store.snapshot_space() == {s1.id: (2, 0), s2.id: (2, 0)}
    assert rig.used() == base + 3
    rig.verify()
    rig.reopen()
    rig.verify()
    no_fatal(rig.store)


@pytest.mark.parametrize("chunk_size", [4096, 16384, 65536])
def test_partial_chunk_writes_and_reads_across_chunk_boundaries(make_store, kind, chunk_size):
    rig = Rig(make_store, kind, origin_size=512 << 10, store_size=16 << 20,
              chunk_size=chunk_size, seed=chunk_size)
    rng = random.Random(chunk_size)
    size = 512 << 10
    cs = chunk_size
    rig.create("a")
    rig.create("b")
    # Edge cases first: single bytes at both ends of a chunk, spans of a boundary.
    for name in ("origin", "a", "b"):
        rig.write(name, cs - 1, b"\x01")
        rig.write(name, cs, b"\x02")
        rig.write(name, 2 * cs - 3, b"\x03" * 6)
        rig.write(name, size - 1, b"\x04")
        rig.write(name, 0, b"\x05")
    for step in range(120):
        name = rng.choice(["origin", "a", "b", "c"] if "c" in rig.model else ["origin", "a", "b"])
        off = rng.randrange(size)
        n = rng.randrange(1, min(3 * cs, size - off) + 1)
        rig.write(name, off, rng.randbytes(n))
        if step == 40:
            rig.create("c")
        if step % 15 == 0:
            vol = rng.choice(list(rig.model))
            roff = rng.randrange(size)
            rlen = rng.randrange(0, min(4 * cs, size - roff) + 1)
            assert rig.read(vol, roff, rlen) == rig.model[vol][roff: roff + rlen]
    for vol in rig.model:  # reads straddling every chunk boundary
        for c in range(1, size // cs):
            assert rig.read(vol, c * cs - 5, 11) == rig.model[vol][c * cs - 5: c * cs + 6]
    rig.verify()
    rig.reopen()
    rig.verify()
    no_fatal(rig.store)


def test_volume_ranges_are_checked(rig):
    rig.create("a")
    for name in ("origin", "a"):
        vol = rig.volume(name)
        with pytest.raises(InvalidArgument):
            vol.read(vol.size - 1, 2)
        with pytest.raises(InvalidArgument):
            vol.write(vol.size, b"x")
        with pytest.raises(InvalidArgument):
            vol.read(-1, 1)
        assert vol.read(vol.size, 0) == b""
        vol.write(5, b"")
    rig.verify()


def test_read_only_snapshot_refuses_writes(rig):
    rig.create("ro", read_only=True)
    used = rig.used()
    with pytest.raises(ReadOnlyVolume):
        rig.volume("ro").write(0, b"x")
    with pytest.raises(ReadOnlyVolume):
        rig.svc.prepare_snapshot_write(rig.infos["ro"], 0, 0)
    assert rig.used() == used
    rig.verify()


def test_busy_snapshot_cannot_be_deleted(rig):
    rig.create("a")
    rig.svc.export_open("a")
    with pytest.raises(SnapshotBusy):
        rig.svc.delete_snapshot("a")
    rig.svc.export_close("a")
    rig.delete("a")
    with pytest.raises(SnapshotNotFound):
        rig.svc.delete_snapshot("a")


def test_full_store_fails_the_writer_and_changes_no_snapshot(make_store, kind):
    cs = 4096
    rig = Rig(make_store, kind, origin_size=1 << 20, chunk_size=cs,
              store_size=(900 << 10) if kind == "memory" else (2 << 20))
    rig.create("a")
    for c in range(230, 250):  # copy-outs only "a" uses
        rig.write("origin", c * cs, b"a only")
    rig.create("b")
    rng = random.Random(7)
    full = None
    for c in range(230):
        data = rng.randbytes(cs)
        try:
            rig.write("origin", c * cs, data)
        except StoreFull as e:
            full = c
            assert e.errno == errno.ENOSPC
            break
    assert full is not None, "the store never filled"
    rig.verify()  # the failed write left the origin as it was, snapshots untouched
    # A multi-chunk write into a full store: snapshots unchanged, origin outside untouched.
    old = bytes(rig.model["origin"])
    lo, hi = (full - 1) * cs, (full + 7) * cs
    with pytest.raises(StoreFull):
        Origin(rig.svc, rig.svc.data).write(lo + 10, b"W" * (hi - lo - 20))
    now = rig.read("origin", 0, len(old))
    assert now[:lo] == old[:lo] and now[hi:] == old[hi:]
    for x in range(lo + 10, hi - 10):
        assert now[x] in (old[x], ord("W"))
    rig.model["origin"][:] = now
    # Snapshot writes that need a chunk fail too; the snapshot keeps its content.
    with pytest.raises(StoreFull):
        rig.volume("a").write(200 * cs, b"A" * 10)
    rig.verify()
    # Writes that need no new chunk still work.
    rig.write("origin", 0, b"fine")
    no_fatal(rig.store)
    # Deleting a snapshot frees what only it used; the origin can be written again.
    rig.delete("a")
    rig.write("origin", full * cs, b"after delete")
    rig.write("b", 3, b"b too")
    rig.verify()
    rig.reopen()
    rig.verify()
    no_fatal(rig.store)


def test_delete_frees_only_the_chunks_that_snapshot_used(rig):
    cs = rig.store.chunk_size
    rig.create("s1")
    rig.create("s2")
    base = rig.used()
    rig.write("origin", 0, b"shared copy-out")  # 1 chunk shared by s1 and s2
    rig.write("s1", 2 * cs, b"s1 own")  # 1 chunk, s1 only
    rig.write("s2", 4 * cs, b"s2 own" * 2000)  # 3 chunks (4, 5, 6), s2 only
    rig.create("s3")
    rig.write("origin", 4 * cs, b"o" * cs)  # copy-out for s1 and s3 (s2 has its own)
    assert rig.used() == base + 6
    rig.delete("s1")
    assert rig.used() == base + 5  # s1's own chunk; the shared ones stay
    rig.verify()
    rig.delete("s3")
    assert rig.used() == base + 4  # the chunk-4 copy-out only s1 and s3 used
    rig.verify()
    rig.delete("s2")
    assert rig.used() == base
    assert exc_dict(rig.store) == {}
    rig.verify()
    assert rig.store.check() == []


@pytest.mark.parametrize("kind", SHARED_KINDS)
def test_delete_compacts_the_tree(make_store, kind):
    """Enough exceptions for a two-level tree; deleting shrinks the tree back and frees
    every block it used."""
    n = 30000
    store = make_store(kind, origin_size=n * 4096, store_size=(n + n // 8 + 3000) * 4096)
    base = store.space()["chunks_used"]
    assert store.state.levels == 1
    a = store.create_snapshot("a")
    for c in range(n):
        store.add_origin_exception(c, store.allocate_chunk(), a.id)
        if c % 5000 == 4999:
            store.commit()
    assert store.state.levels >= 2, "the tree did not grow a level"
    leaves_before = sum(1 for _ in store.leaves())
    assert leaves_before > NODE_MAX
    b = store.create_snapshot("b")
    b_chunks = 0
    for c in range(0, n, 8):
        store.add_origin_exception(c, store.allocate_chunk(), b.id)
        b_chunks += 1
    store.commit()
    assert store.check() == []
    store.begin_delete("a")
    sweep_all(store)
    assert store.state.levels == 1, "the tree kept its levels after the delete"
    leaves_after = sum(1 for _ in store.leaves())
    # b's copy-outs and their tag index records, in leaves at least a quarter full
    assert leaves_after <= 2 * b_chunks // (LEAF_MAX // 4) + 2
    assert leaves_after < leaves_before // 2
    assert store.check() == []
    assert store.space()["chunks_used"] == base + b_chunks + leaves_after + 1 - 2
    store = make_store.reopen(store)
    assert store.check() == []
    assert all(store.snapshot_exception(b.id, c)[0] is not None for c in range(0, n, 8))
    store.begin_delete("b")
    sweep_all(store)
    assert store.state.levels == 1 and sum(1 for _ in store.leaves()) == 1
    assert store.space()["chunks_used"] == base
    assert store.check() == []


@pytest.mark.parametrize("kind", SHARED_KINDS)
@pytest.mark.parametrize("spare", [0, 1, 2])
def test_split_without_room_changes_nothing(make_store, kind, spare):
    """An exception whose leaf must split, with the root index node full too, when fewer
    free blocks remain than the split needs (new leaf, new index node, new root): it is
    refused with StoreFull and the tree, the bitmap and the space are as they were."""
    store = make_store(kind, origin_size=1 << 30, store_size=140 << 20)
    a = store.create_snapshot("a")
    nxt = 0

    def add():
        nonlocal nxt
        store.add_origin_exception(nxt, store.allocate_chunk(), a.id)
        nxt += 1
        if nxt % 5000 == 0:
            store.commit()

    def would_split() -> bool:  # the leaf of the next entry, or of its tag index record
        return any(len(store.leaf_of(k)[1].keys) >= LEAF_MAX
                   for k in (pack_key(0, nxt, a.id), index_key(a.id, nxt)))

    while len(store.node(store.state.root).keys) < NODE_MAX:
        add()
    while not would_split():
        add()
    store.commit()
    assert store.state.levels == 1
    filler = []
    while store.space()["chunks_free"] > 1 + spare:  # 4 KiB chunks: a chunk is a block
        filler.append(store.allocate_chunk())
    before, space = exc_dict(store), store.space()
    sc = store.allocate_chunk()
    with pytest.raises(StoreFull):
        store.add_origin_exception(nxt, sc, a.id)
    store.release_chunk(sc)
    assert exc_dict(store) == before and store.space() == space
    assert store.state.levels == 1
    for f in filler:
        store.release_chunk(f)
    store.commit()
    assert store.check() == []
    store = make_store.reopen(store)
    assert exc_dict(store) == before and store.check() == []
    # With room, the same exception goes in and the tree grows a level.
    store.add_origin_exception(nxt, store.allocate_chunk(), a.id)
    store.commit()
    assert store.state.levels == 2 and store.check() == []


@pytest.mark.parametrize("extra", range(8))
def test_store_full_of_metadata_fails_cleanly(make_store, kind, extra):
    """Fill a store with copy-outs of 1024-bit exceptions (small leaves, frequent
    splits) until StoreFull, at store sizes a block apart so the last failure falls on a
    data chunk or on a leaf split: the service keeps working, nothing leaks and the
    snapshot keeps its content."""
    if kind == "memory" and extra:
        pytest.skip("a MemoryStore has no metadata blocks")
    cs = 4096
    rig = Rig(make_store, kind, origin_size=2 << 20, chunk_size=cs, max_snapshots=1024,
              store_size=(160 << 12) if kind == "memory" else ((300 + extra) << 12),
              journal_blocks=64)
    rig.create("a")
    with pytest.raises(StoreFull):
        for c in range(512):
            rig.write("origin", c * cs, b"x" * cs)
    rig.verify()
    rig.svc.commit()
    assert rig.store.check() == []
    rig.reopen()
    rig.verify()
    assert rig.store.check() == []
    rig.delete("a")
    rig.write("origin", 0, b"y" * (64 << 10))
    rig.verify()


@pytest.mark.parametrize("kind", SHARED_KINDS)
def test_space_freed_by_a_sweep_is_not_reused_before_its_checkpoint(make_store, kind):
    """Chunks and blocks a sweep frees stay quarantined until the sweep's commit has
    checkpointed the journal: until then recovery could replay a transaction that still
    uses them (the revoke problem), so handing them out would let new data be lost."""
    store = make_store(kind, origin_size=8 << 20, store_size=8 << 20)
    a = store.create_snapshot("a")
    mine = []
    for c in range(1200):  # several leaves of a's own exceptions, one shared exception
        mine.append(store.allocate_chunk())
        store.add_origin_exception(c, mine[-1], a.id)
    b = store.create_snapshot("b")
    store.add_origin_exception(1500, store.allocate_chunk(), b.id)
    store.commit()
    leaves = {blk for blk, _ in store.leaves()}
    assert len(leaves) > 3
    store.begin_delete("a")
    store.commit()
    assert store.sweep_step() is True
    freed_leaves = leaves - {blk for blk, _ in store.leaves()}
    assert freed_leaves, "the sweep merged no leaves"
    quarantined = set(mine) | freed_leaves  # 4 KiB chunks: a block is a chunk
    got = []
    while True:
        try:
            got.append(store.allocate_chunk())
        except StoreFull as e:
            assert "released" in str(e)
            break
    assert quarantined.isdisjoint(got)
    for c in got:
        store.release_chunk(c)
    store.commit()  # the sweep's commit checkpoints: the quarantine ends
    again = set()
    while True:
        try:
            again.add(store.allocate_chunk())
        except StoreFull:
            break
    assert quarantined <= again


def test_snapshot_info_survives_reopen_and_formats(make_store, kind):
    store = make_store(kind)
    created = 1_767_225_600_123_456_789  # 2026-01-01T00:00:00.123456789Z
    info = store.create_snapshot("nightly", read_only=True, created=created)
    assert info.created_iso == "2026-01-01T00:00:00.123457Z"
    assert info.to_dict() == {"name": "nightly", "id": info.id, "created": info.created_iso,
                              "read_only": True, "parent": "origin", "parent_id": 0,
                              "size": store.origin_size}
    store.commit()
    store = make_store.reopen(store)
    assert store.snapshot("nightly") == info


def test_write_zeroes_trim_and_block_status_keep_snapshots(rig):
    cs = rig.store.chunk_size
    rig.create("a")
    before = bytes(rig.model["origin"])
    Origin(rig.svc, rig.svc.data).write_zeroes(cs - 100, 3 * cs, fua=True)
    rig.model["origin"][cs - 100: 4 * cs - 100] = bytes(3 * cs)
    rig.verify()
    assert rig.read("a", 0, len(before)) == before
    Snapshot(rig.svc, rig.svc.data, rig.infos["a"]).write_zeroes(10, 20)
    rig.model["a"][10:30] = bytes(20)
    for name in ("origin", "a"):
        vol = rig.volume(name)
        vol.trim(0, 2 * cs)  # a hint: nothing changes
        assert vol.block_status(5, 100) == [(100, 0)]
        with pytest.raises(InvalidArgument):
            vol.trim(vol.size, 1)
    rig.verify()


def test_nowait_lookup_matches_and_never_reads_metadata_from_disk(make_store, kind):
    """snapshot_exception_nowait answers as snapshot_exception from what is in memory;
    with the tree's blocks evicted it raises NotCached instead of reading the disk."""
    from ddsnap.store.api import NotCached

    store = make_store(kind, origin_size=16 << 20, store_size=16 << 20)
    a = store.create_snapshot("a")
    b = store.create_snapshot("b")
    for c in range(0, 4000, 3):
        store.add_origin_exception(c, store.allocate_chunk(), b.id)
    store.add_snapshot_exception(a.id, 3, store.allocate_chunk())
    store.commit()
    for v in (a.id, b.id):
        for c in range(4000):
            assert (store.snapshot_exception_nowait(v, c)[0]
                    == store.snapshot_exception(v, c)[0])
    if isinstance(store, MemoryStore):
        return  # nothing ever leaves memory
    assert store.state.levels >= 1, "the test wants a tree with index nodes"
    store.evict_clean()
    with pytest.raises(NotCached):
        store.snapshot_exception_nowait(a.id, 3)
    assert store.snapshot_exception(a.id, 3)[1] is True  # loads the path
    assert store.snapshot_exception_nowait(a.id, 3)[0] == store.snapshot_exception(a.id, 3)[0]
