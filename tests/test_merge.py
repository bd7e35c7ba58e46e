"""Merge (seed 003): rolling the origin back to a snapshot, online.

Behaviour tests of :meth:`LocalService.start_merge`, ``merge_step``, ``run_merge`` and
``merge_status`` through the real volumes, on both exception stores (SharedStore on a
memory device and on a file, MemoryStore), each volume compared with a plain bytes model:

* the origin reads as the merging snapshot (the *target*) from the moment the merge
  starts, before any chunk is copied, and after every step;
* every other snapshot keeps its exact content through the merge: ones that share
  exceptions with the target, ones that read the origin where the target has
  exceptions, read-only ones, ones written during the merge;
* origin writes during the merge (merged and not-yet-merged chunks, partial chunks, the
  partial last chunk, ranges across both) land on the merged content;
* at completion the target is deleted and its space freed, or with ``keep`` it stays,
  equal to the new origin, and is a normal snapshot again;
* one merge at a time, no snapshot creation during a merge, the target can be neither
  written nor deleted, nor started while open;
* concurrent origin writers and readers (and a snapshot reader) in threads while the merge
  runs; a merge step cut short by an origin write that merged part of its run;
* stop (``run_merge`` with a stop event) and resume (``start_merge`` again, a clean
  reopen, an unclean reopen), all to the same final state; ``merge_status`` fields;
* linear runs copied into the origin in one I/O (counted with a logging device);
* a full store: the merge step that needs copy-outs fails with StoreFull and loses
  nothing, and resumes once there is room.
"""

from __future__ import annotations

import random
import threading
import time

import pytest

from ddsnap.errors import (
    InvalidArgument,
    MergeInProgress,
    ReadOnlyVolume,
    SnapshotBusy,
    SnapshotNotFound,
    StoreFull,
)
from ddsnap.service.local import COPY_CHUNKS, LocalService
from ddsnap.store.blockdev import MemoryDevice
from ddsnap.store.model import SnapshotInfo
from ddsnap.store.shared import SharedStore
from ddsnap.volume import Origin, Snapshot

CS = 4096
KINDS = ["shared-memory", "shared-file", "memory"]


@pytest.fixture(autouse=True)
def small_merge_steps(monkeypatch):
    """Merge steps of a few chunks (the default is 32 MiB), so that these small volumes
    take several steps, each of several runs, and the tests see half-merged states."""
    monkeypatch.setenv("DDSNAP_MERGE_STEP", str(4 * 4096))


class LogDevice(MemoryDevice):
    """A memory device that logs its writes as ``(offset, length)``."""

    def __init__(self, size: int, data: bytes | None = None):
        super().__init__(size, data)
        self.writes: list[tuple[int, int]] = []

    def pwrite(self, data, offset: int) -> None:
        super().pwrite(data, offset)
        self.writes.append((offset, len(data)))


class Rig:
    """A service over a store of ``kind`` with a bytes model of every volume.

    ``model["origin"]`` is what the origin must read; during a merge that is the target's
    content plus the origin writes since (the target's own entry is then dropped: it is
    not exported while it merges).
    """

    def __init__(self, make_store, kind: str, chunks: int = 40, tail: int = 1000,
                 store_chunks: int = 200, origin_dev=None, seed: int = 0):
        self.kind = kind
        self.size = chunks * CS + tail
        self.rng = random.Random(seed)
        initial = self.rng.randbytes(self.size)
        if origin_dev is None:
            origin_dev = MemoryDevice(self.size, initial)
        else:
            origin_dev.pwrite(initial, 0)
        self.origin_dev = origin_dev
        if kind == "memory":
            store = make_store(kind, origin_size=self.size, store_size=store_chunks * CS)
        else:
            store = make_store(kind, origin_size=self.size,
                               store_size=(store_chunks + 40) * CS, journal_blocks=32)
        self.svc = LocalService(store, origin_dev)
        self.model: dict[str, bytearray] = {"origin": bytearray(initial)}
        self.infos: dict[str, SnapshotInfo] = {}
        self.target: str | None = None
        self.keep = False

    @property
    def store(self):
        return self.svc.store

    def vol(self, name: str):
        if name == "origin":
            return Origin(self.svc, self.svc.data)
        return Snapshot(self.svc, self.svc.data, self.infos[name])

    def create(self, name: str, read_only: bool = False) -> None:
        self.infos[name] = self.svc.create_snapshot(name, read_only=read_only)
        self.model[name] = bytearray(self.model["origin"])

    def delete(self, name: str) -> None:
        self.svc.delete_snapshot(name)
        del self.model[name], self.infos[name]

    def write(self, name: str, off: int, data: bytes | None = None, n: int | None = None,
              fua: bool = False) -> bytes:
        if data is None:
            assert n is not None, "write data or n random bytes"
            data = self.rng.randbytes(n)
        self.vol(name).write(off, data, fua=fua)
        self.model[name][off: off + len(data)] = data
        return data

    def verify(self, what: str = "") -> None:
        for name, want in self.model.items():
            got = self.vol(name).read(0, self.size)
            if got != want:
                bad = next(i for i in range(self.size) if got[i] != want[i])
                raise AssertionError(f"{what}: {name} differs first at byte {bad} "
                                     f"(chunk {bad // CS})")

    def start(self, name: str, keep: bool = False) -> dict:
        st = self.svc.start_merge(name, keep=keep)
        self.target, self.keep = name, keep
        self.kept = bytes(self.model[name])
        self.model["origin"] = self.model.pop(name)
        return st

    def finished(self) -> None:
        """The merge completed: update the model (the target goes, or stays as it was:
        the state the origin was rolled back to)."""
        name = self.target
        assert name is not None, "no merge was started"
        if self.keep:
            self.model[name] = bytearray(self.kept)
            self.infos[name] = self.svc.snapshot(name)
        else:
            del self.infos[name]
        self.target = None

    def left(self, name: str | None = None) -> list[tuple[int, int]]:
        """``(chunk, store_chunk)`` where ``name`` reads the store: during its merge,
        the chunks not merged yet (default: the target's)."""
        if name is None or name == self.target:
            return self.store.merge_todo(0, 1 << 30)
        v = self.infos[name].id
        out = []
        for c in range(self.store.origin_chunks):
            sc = self.store.snapshot_exception(v, c)[0]
            if sc is not None:
                out.append((c, sc))
        return out

    def reopen(self, clean: bool = True) -> None:
        """SharedStore: close (or not) and open again with a new service."""
        if clean:
            self.svc.close()
            dev = self.store.dev
        else:
            dev = self.store.dev
            if isinstance(dev, MemoryDevice):
                dev = MemoryDevice(dev.size, bytes(dev.data))  # what is on the device now
        self.svc = LocalService(SharedStore.open(dev), self.origin_dev)
        live = {s.name: s for s in self.svc.snapshots()}
        assert set(live) == set(self.infos), "snapshots changed across a reopen"
        self.infos = live

    def check(self) -> None:
        self.svc.commit()
        assert self.store.check() == []

    def status(self, running: bool = False) -> dict:
        """The status of the merge in progress (there must be one)."""
        st = self.svc.merge_status(running=running)
        assert st is not None, "no merge in progress"
        return st


def populate(r: Rig) -> None:
    """Snapshots around a written target ``t``:

    * ``old`` (before ``t``): has its own copy-outs, shares others with ``t``, and wrote
      into one of those (so ``t`` alone keeps it);
    * ``t``: copy-outs at chunks 3..9 and 20..21, its own writes at 10..12 (one linear
      run), a partial write in chunk 14 and in the partial last chunk;
    * ``young`` (after ``t``) and ``ro`` (read-only, after ``young``): read the origin
      where ``t`` has exceptions, and share ``t``'s copy-outs of chunks 9, 20, 21.
    """
    n_chunks = r.size // CS
    r.create("old")
    r.write("origin", 0, n=6 * CS)  # copy-outs for old at 0..5
    r.create("t")
    r.write("origin", 3 * CS, n=6 * CS)  # 3..5 for t alone, 6..8 shared old|t
    r.write("old", 7 * CS + 100, n=50)  # old unshares chunk 7: t keeps that exception
    r.write("t", 10 * CS, n=3 * CS)  # t's own linear run
    r.write("t", 14 * CS + 300, n=700)
    r.write("t", n_chunks * CS + 10, n=r.size - n_chunks * CS - 10)  # the partial tail
    r.create("young")
    r.create("ro", read_only=True)
    r.write("origin", 9 * CS + 5, n=CS - 10)  # shared old|t|young|ro
    r.write("origin", 20 * CS, n=2 * CS)
    r.write("young", 22 * CS, n=CS)


# ---------------------------------------------------------------------------------------
# Content through the merge

@pytest.mark.parametrize("kind", KINDS)
def test_origin_reads_the_target_from_the_start(make_store, kind):
    r = Rig(make_store, kind)
    populate(r)
    r.verify("before the merge")
    target = bytes(r.model["t"])
    st = r.start("t")
    assert st["chunks_done"] == 0 and st["chunks_total"] == len(r.left()) > 10
    # Nothing is copied yet: the origin device still holds the old data ...
    assert r.origin_dev.pread(r.size, 0) != target
    # ... but the origin already reads as the target, in one read and chunk by chunk.
    assert Origin(r.svc, r.svc.data).read(0, r.size) == target
    for c in range(0, r.size, CS):
        assert Origin(r.svc, r.svc.data).read(c, min(CS, r.size - c)) == target[c: c + CS]
    got = Origin(r.svc, r.svc.data).read(14 * CS + 250, 800)
    assert got == target[14 * CS + 250: 14 * CS + 1050]
    r.verify("merge started")
    steps = 0
    while not r.svc.merge_step():
        steps += 1
        r.verify(f"after step {steps}")
    r.finished()
    assert steps >= 4  # several runs: the test saw the half-merged states
    r.verify("merged")
    assert r.origin_dev.pread(r.size, 0) == target  # now really copied
    assert r.svc.merge_status() is None
    r.check()


@pytest.mark.parametrize("kind", KINDS)
def test_merge_start_replies_when_the_merge_ends_before_its_reply(make_store, kind,
                                                                  monkeypatch):
    """A merge worker (of an earlier request for the same snapshot) can merge a small
    snapshot to the end while ``start_merge`` commits: the reply then says the merge is
    complete, instead of failing on a status that is gone (found by mypy: the status of
    a started merge may be None)."""
    r = Rig(make_store, kind)
    populate(r)
    target = bytes(r.model["t"])
    real_commit = r.svc.commit
    ran = []

    def commit_then_merge_to_the_end():
        real_commit()
        # The interleaving, once: another thread runs the whole merge here.
        monkeypatch.setattr(r.svc, "commit", real_commit)
        ran.append(r.svc.run_merge())

    monkeypatch.setattr(r.svc, "commit", commit_then_merge_to_the_end)
    st = r.svc.start_merge("t")
    assert ran == [True]
    assert st["complete"] is True and st["snapshot"] == "t" and st["running"] is False
    assert st["chunks_done"] == st["chunks_total"] > 10
    assert r.svc.merge_status() is None
    assert Origin(r.svc, r.svc.data).read(0, r.size) == target
    assert "t" not in [s.name for s in r.svc.snapshots()]  # merged and deleted


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("keep", [False, True])
def test_other_snapshots_keep_their_content(make_store, kind, keep):
    """Sharers of the target's exceptions, readers of the origin where the target has
    exceptions, a read-only snapshot: unchanged by every step and after a reopen."""
    r = Rig(make_store, kind)
    populate(r)
    # The scenario has what it claims: shared exceptions and origin readers at t's chunks.
    t_chunks = dict(r.left("t"))
    others = [dict(r.left(n)) for n in ("old", "young", "ro")]
    assert any(o.get(c) == sc for o in others for c, sc in t_chunks.items()), \
        "t shares no exception"
    assert any(c not in others[1] for c in t_chunks), "young reads no origin chunk t has"
    r.start("t", keep=keep)
    r.svc.run_merge(on_step=lambda st: r.verify(f"step, status {st}"))
    r.finished()
    r.verify("merged")
    r.check()
    if kind != "memory":
        r.reopen()
        r.verify("reopened")
        r.check()


@pytest.mark.parametrize("kind", KINDS)
def test_origin_writes_during_the_merge_land_on_the_merged_content(make_store, kind):
    r = Rig(make_store, kind)
    populate(r)
    n_chunks = r.size // CS
    r.start("t")
    left = {c for c, _ in r.left()}
    assert {12, 14, n_chunks} <= left
    r.write("origin", 12 * CS + 17, n=10)  # partial, not merged yet
    r.verify("partial write of a not-yet-merged chunk")
    assert r.status()["chunks_done"] >= 1  # the write merged its chunk first
    r.write("origin", n_chunks * CS + 3, n=5)  # inside the partial last chunk
    r.write("origin", 15 * CS + 9, n=CS)  # chunks 15/16: t has no exception there
    r.verify("written")
    r.svc.merge_step()
    r.svc.merge_step()
    left = {c for c, _ in r.left()}
    merged = sorted(set(range(n_chunks + 1)) - left)
    unmerged = sorted(left)
    # A write across a merged and a not-yet-merged chunk, and whole chunks of each.
    edge = next(c for c in merged if c + 1 in left)
    r.write("origin", edge * CS + CS // 2, n=CS)
    r.write("origin", merged[0] * CS, n=CS)
    r.write("origin", unmerged[-1] * CS, n=min(CS, r.size - unmerged[-1] * CS))
    r.write("origin", 13 * CS - 1, n=2 * CS + 2, fua=True)  # 12..15, across 14
    r.verify("written across merged and unmerged chunks")
    r.svc.run_merge()
    r.finished()
    r.verify("merged")
    r.check()
    if kind != "memory":
        r.reopen()
        r.verify("reopened")


@pytest.mark.parametrize("kind", KINDS)
def test_snapshot_writes_and_deletes_during_the_merge(make_store, kind):
    """A sharer of the target's exceptions writes into them (unsharing), a snapshot that
    reads the origin at an unmerged chunk writes there, another is deleted: the target's
    content, the writers' content and the rest stay right."""
    r = Rig(make_store, kind)
    populate(r)
    r.create("extra")  # taken before the merge; only ever deleted
    r.write("origin", 30 * CS, n=CS)
    r.start("t")
    assert {6, 8, 10} <= {c for c, _ in r.left()}
    r.write("old", 6 * CS + 1, n=CS - 2)  # old shares t's exception at 6 until now
    r.write("old", 8 * CS, n=CS)
    r.write("young", 10 * CS + 9, n=9)  # young reads the origin at 10: t's run
    r.verify("snapshot writes")
    r.svc.merge_step()
    assert 3 not in {c for c, _ in r.left()}
    r.write("young", 3 * CS, n=CS + 1)  # into the copy-out the step made for young
    r.write("old", 3 * CS + 7, n=7)
    r.verify("snapshot writes after a step")
    r.delete("extra")
    r.verify("delete")
    r.svc.run_merge()
    r.finished()
    r.verify("merged")
    r.check()


@pytest.mark.parametrize("kind", KINDS)
def test_merge_of_a_written_snapshot_with_reads_of_the_origin(make_store, kind):
    """A target made of its own writes only (no copy-outs), merged with nothing else
    present: the origin becomes exactly what was written to the snapshot."""
    r = Rig(make_store, kind, chunks=20, tail=0)
    r.create("t")
    r.write("t", 0, n=r.size)  # every chunk rewritten
    r.write("t", 5 * CS + 7, n=3)  # again, in place
    r.start("t")
    assert len(r.left()) == 20
    r.svc.run_merge()
    r.finished()
    assert r.origin_dev.pread(r.size, 0) == r.model["origin"]
    r.verify("merged")
    assert r.svc.snapshots() == []
    r.check()


@pytest.mark.parametrize("kind", KINDS)
def test_merge_of_a_snapshot_equal_to_the_origin(make_store, kind):
    r = Rig(make_store, kind)
    r.create("t")
    st = r.start("t", keep=True)
    assert st["chunks_total"] == 0
    before = r.origin_dev.pread(r.size, 0)
    assert r.svc.merge_step() is True
    r.finished()
    assert r.origin_dev.pread(r.size, 0) == before
    r.verify("merged nothing")
    r.check()


# ---------------------------------------------------------------------------------------
# Completion: keep or delete

@pytest.mark.parametrize("kind", KINDS)
def test_completion_deletes_the_target_and_frees_its_space(make_store, kind):
    r = Rig(make_store, kind)
    base_used = r.store.space()["chunks_used"]
    r.create("other")
    r.write("origin", 0, n=4 * CS)  # other's copy-outs
    r.create("t")
    r.write("origin", 2 * CS, n=4 * CS)  # 2,3 for t alone; 4,5 shared other|t
    r.write("t", 10 * CS, n=5 * CS)  # t's own
    t_id, o_id = r.infos["t"].id, r.infos["other"].id
    assert r.store.snapshot_space()[t_id] == (7, 2)
    r.start("t")
    assert r.svc.run_merge() is True
    r.finished()
    assert [s.name for s in r.svc.snapshots()] == ["other"]
    with pytest.raises(SnapshotNotFound):
        r.svc.snapshot("t")
    # other keeps its copy-outs of 0..3, 4 and 5 are its alone now, and it got copies of
    # 10..14 (t's writes, where it read the origin): t's 7 chunks are free.
    assert {o for o, _c, _t, _sc in r.store.exceptions()} == {0}
    assert r.store.exception_chunks() == 11
    assert r.store.snapshot_space() == {o_id: (11, 0)}
    r.svc.commit()
    if kind == "memory":
        assert r.store.space()["chunks_used"] == 11
    else:
        assert r.store.check() == []  # no leaks: every allocated chunk is referenced
    r.delete("other")
    r.svc.commit()
    if kind != "memory":
        r.reopen()  # a checkpoint: every freed chunk reusable
    assert r.store.space()["chunks_used"] == base_used
    # The name is free and snapshots can be taken again.
    r.create("t")
    r.write("origin", 0, n=CS)
    r.verify("after")
    r.check()


@pytest.mark.parametrize("kind", KINDS)
def test_keep_leaves_the_target_as_it_was(make_store, kind):
    """A kept target still reads exactly what it did: the state the origin was rolled
    back to, whatever the origin was written since (so it can be merged again)."""
    r = Rig(make_store, kind)
    populate(r)
    r.start("t", keep=True)
    assert r.status()["keep"] is True
    r.write("origin", 3 * CS, n=2 * CS)  # during the merge
    r.svc.run_merge()
    r.finished()
    r.verify("kept")
    # A normal snapshot again: origin writes copy out for it, it can be written, a new
    # snapshot can be taken, and it can be merged again.
    r.write("origin", 0, n=3 * CS)
    r.write("t", 2 * CS, n=100)
    r.create("later")
    r.write("origin", 2 * CS, n=CS)
    r.verify("used after the merge")
    r.start("t")
    r.svc.run_merge()
    r.finished()
    r.verify("merged again")
    r.check()


# ---------------------------------------------------------------------------------------
# What a merge refuses

@pytest.mark.parametrize("kind", KINDS)
def test_what_is_refused_during_a_merge(make_store, kind):
    r = Rig(make_store, kind)
    populate(r)
    r.vol("young").open()
    with pytest.raises(SnapshotBusy):
        r.svc.start_merge("young")  # open: clients must disconnect first
    r.vol("young").close()
    with pytest.raises(SnapshotNotFound):
        r.svc.start_merge("nonesuch")
    assert r.svc.merge_status() is None
    t_info = r.infos["t"]
    st = r.start("t")
    with pytest.raises(MergeInProgress):
        r.svc.start_merge("young")  # one merge per origin
    with pytest.raises(MergeInProgress):
        r.svc.start_merge("old", keep=True)
    again = r.svc.start_merge("t")  # the same merge again: a resume, nothing changes
    assert (again["snapshot"], again["chunks_total"], again["cursor"]) == \
        (st["snapshot"], st["chunks_total"], st["cursor"])
    with pytest.raises(MergeInProgress):
        r.svc.create_snapshot("new")
    with pytest.raises(MergeInProgress):
        Snapshot(r.svc, r.svc.data, t_info).write(10 * CS, b"x")
    with pytest.raises(MergeInProgress):
        r.svc.delete_snapshot("t")
    assert r.svc.is_merging(t_info) and not r.svc.is_merging(r.infos["old"])
    with pytest.raises(ReadOnlyVolume):
        r.vol("ro").write(0, b"x")
    assert {s.name for s in r.svc.snapshots()} == {"old", "t", "young", "ro"}
    r.verify("nothing refused changed anything")
    r.svc.merge_step()
    with pytest.raises(MergeInProgress):
        r.svc.create_snapshot("new")
    r.svc.run_merge()
    r.finished()
    assert r.svc.merge_status() is None
    r.create("new")  # allowed again
    r.verify("merged")
    r.check()


# ---------------------------------------------------------------------------------------
# Concurrency

def _wait_waiters(svc, n: int, thread=None, timeout: float = 30.0) -> None:
    """Return once ``n`` threads wait on the service's condition (or ``thread`` ended)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(getattr(svc.cond, "_waiters", ())) >= n:
            return
        if thread is not None and not thread.is_alive():
            return
        time.sleep(0.001)
    raise AssertionError(f"{n} waiters never appeared")


@pytest.mark.parametrize("kind", KINDS)
def test_a_step_cut_short_by_an_origin_write_skips_no_chunk(make_store, kind):
    """The merge step takes the linear run 0..2; an origin write to chunk 1 is merging
    that chunk (held by an origin reader), so the step waits, then merges only chunk 0
    (1 is done, 2 is no longer linear with 0).  Chunk 2 must still be merged: the merge
    cursor must not jump past it."""
    r = Rig(make_store, kind, chunks=8, tail=0)
    r.create("t")
    r.write("t", 0, n=3 * CS)
    r.start("t", keep=True)
    left = r.left()
    assert [c for c, _ in left] == [0, 1, 2]
    assert [sc - left[0][1] for _, sc in left] == [0, 1, 2]  # one linear run
    errors = []

    def run(fn):
        def go():
            try:
                fn()
            except BaseException as e:  # reported below
                errors.append(e)
        t = threading.Thread(target=go)
        t.start()
        return t

    rmap = r.svc.map_origin_read(1, 1)  # an origin read of chunk 1 in flight
    assert rmap is not None  # a merge runs
    assert rmap.sources[0] is not None
    data = r.rng.randbytes(10)
    writer = run(lambda: Origin(r.svc, r.svc.data).write(CS + 10, data))
    _wait_waiters(r.svc, 1, writer)  # merging chunk 1, waiting for the reader
    stepper = run(r.svc.merge_step)
    _wait_waiters(r.svc, 2, stepper)  # waiting for chunk 1 to be free
    r.svc.release_read(rmap)
    writer.join()
    stepper.join()
    assert not errors, errors
    r.model["origin"][CS + 10: CS + 20] = data
    r.verify("after the cut-short step")
    r.svc.run_merge()
    r.finished()
    r.verify("merged")
    assert r.origin_dev.pread(r.size, 0) == r.model["origin"]
    r.check()


@pytest.mark.parametrize("kind", ["shared-memory", "memory"])
def test_concurrent_writers_and_readers_during_the_merge(make_store, kind):
    """Three writers write their own third of random chunks (so several writers hit one
    unmerged chunk), a fourth writes runs of two whole chunks elsewhere; readers read the
    origin and a snapshot all along; the merge runs in its own thread.  Every origin read shows the
    target's bytes or bytes written there; afterwards the origin is exactly the target
    plus the writes, and the snapshots are unchanged."""
    chunks = 64
    r = Rig(make_store, kind, chunks=chunks, tail=0, store_chunks=400)
    r.create("other")
    r.write("origin", 0, n=20 * CS)
    r.create("t")
    r.write("origin", 10 * CS, n=20 * CS)
    for c in range(32, 60, 3):
        r.write("t", c * CS, n=2 * CS)  # runs of two
    r.write("t", 61 * CS + 5, n=100)
    r.create("after")
    r.write("origin", 29 * CS, n=2 * CS)
    r.start("t")
    target = bytes(r.model["origin"])
    quiet = set(range(0, chunks, 5))  # nobody writes these
    slice_len = CS // 3
    history: dict[int, list[bytes]] = {}  # origin offset -> payloads written there
    errors: list[BaseException] = []
    done = threading.Event()

    def guarded(fn):
        def go():
            try:
                fn()
            except BaseException as e:  # reported below
                errors.append(e)
                done.set()
        return threading.Thread(target=go)

    # Chunks by their number mod 5: 0 quiet, 1 and 2 the slice writers', 3 and 4 (a
    # two-chunk run) the run writer's.
    def slice_writer(i):
        rng = random.Random(100 + i)
        for _ in range(40):
            c = rng.choice([c for c in range(chunks) if c % 5 in (1, 2)])
            off = c * CS + i * slice_len
            data = rng.randbytes(slice_len)
            history.setdefault(off, []).append(data)
            pace_writer()
            Origin(r.svc, r.svc.data).write(off, data)
            writes[0] += 1

    def run_writer():
        rng = random.Random(7)
        for _ in range(15):
            c = rng.choice([c for c in range(chunks - 1) if c % 5 == 3])
            data = rng.randbytes(2 * CS)
            for k in range(2):
                for i in range(4):
                    a = k * CS + i * slice_len
                    b = min(a + slice_len, (k + 1) * CS)
                    history.setdefault(c * CS + a, []).append(data[a:b])
            pace_writer()
            Origin(r.svc, r.svc.data).write(c * CS, data)
            writes[0] += 1

    def origin_reader():
        while not done.is_set():
            got = Origin(r.svc, r.svc.data).read(0, r.size)
            for c in range(chunks):
                lo = c * CS
                if c in quiet:
                    assert got[lo: lo + CS] == target[lo: lo + CS], f"quiet chunk {c}"
                    continue
                for a in range(lo, lo + CS, slice_len):
                    b = min(a + slice_len, lo + CS)
                    piece = got[a:b]
                    allowed = [target[a:b]] + list(history.get(a, ()))
                    assert piece in allowed, f"origin bytes {a}..{b} are neither old nor written"

    def snapshot_reader():
        want = {n: bytes(r.model[n]) for n in ("other", "after")}
        while not done.is_set():
            for n, w in want.items():
                assert r.vol(n).read(0, r.size) == w, n

    # Steps and writes interleave however fast either side is: after step k the merge
    # waits for 8k writes, and write w waits for step w // 16 (or the other side's end).
    writes = [0]  # origin writes completed so far (approximately: no lock)
    writers_done = threading.Event()
    merge_over = threading.Event()
    overlap: list[int] = []  # writes completed at each step

    def pace_writer():
        while len(overlap) < writes[0] // 16 and not merge_over.is_set():
            time.sleep(0.0005)

    def merger():
        def on_step(st):
            overlap.append(writes[0])
            while writes[0] < 8 * len(overlap) and not writers_done.is_set():
                time.sleep(0.0005)
        try:
            r.svc.run_merge(on_step=on_step)
        finally:
            merge_over.set()

    writers = [guarded(lambda i=i: slice_writer(i)) for i in range(3)] + [guarded(run_writer)]
    readers = [guarded(origin_reader), guarded(origin_reader), guarded(snapshot_reader)]
    merge_thread = guarded(merger)
    for t in readers + writers:
        t.start()
    merge_thread.start()
    for t in writers:
        t.join()
    writers_done.set()
    merge_thread.join()
    done.set()
    for t in readers:
        t.join()
    assert not errors, errors
    assert len(overlap) >= 3 and overlap[0] < 135 and overlap[1] > 0, overlap
    r.finished()
    # The writes to one slice were issued one after another: the last one wins.
    for off, payloads in history.items():
        r.model["origin"][off: off + len(payloads[-1])] = payloads[-1]
    r.verify("after the concurrent merge")
    assert r.origin_dev.pread(r.size, 0) == r.model["origin"]
    r.check()


# ---------------------------------------------------------------------------------------
# Stop and resume

def _stop_after(n: int):
    stop = threading.Event()
    seen = []

    def on_step(st):
        seen.append(st)
        if len(seen) >= n:
            stop.set()
    return stop, on_step, seen


@pytest.mark.parametrize("kind", KINDS)
def test_stop_and_resume_with_start_merge(make_store, kind):
    r = Rig(make_store, kind)
    populate(r)
    r.start("t", keep=True)
    total = len(r.left())
    stop, on_step, seen = _stop_after(2)
    assert r.svc.run_merge(stop, on_step) is False
    st = r.status()
    assert st["snapshot"] == "t" and 0 < st["chunks_done"] < total
    assert [s["chunks_done"] for s in seen] == sorted(s["chunks_done"] for s in seen)
    assert all(s["running"] for s in seen)
    r.verify("stopped")
    r.write("origin", 0, n=CS + 5)  # the origin stays usable while stopped
    st2 = r.svc.start_merge("t", keep=True)  # resume
    assert st2["cursor"] == st["cursor"] and st2["snapshot"] == "t"
    stop, on_step, seen = _stop_after(1)
    assert r.svc.run_merge(stop, on_step) is False
    assert r.svc.run_merge() is True
    r.finished()
    r.verify("resumed and finished")
    r.check()


@pytest.mark.parametrize("kind, clean", [("shared-memory", True), ("shared-file", True),
                                         ("shared-memory", False)])
def test_resume_after_reopen(make_store, kind, clean, monkeypatch):
    """A merge stopped by a server restart (or a crash between steps: the device bytes
    as they are, not closed) is recorded in the store: a new service resumes it to the
    same final state."""
    monkeypatch.setenv("DDSNAP_MERGE_STEP", str(CS))  # steps of one chunk
    r = Rig(make_store, kind)
    populate(r)
    r.start("t", keep=False)
    total = len(r.left())
    stop, on_step, _ = _stop_after(3)
    r.svc.run_merge(stop, on_step)
    r.write("origin", 25 * CS, n=3 * CS)
    cursor = r.store.state.merge_cursor
    r.reopen(clean=clean)
    st = r.svc.merge_status()
    assert st is not None, "the merge was forgotten across a reopen"
    assert (st["snapshot"], st["keep"], st["cursor"]) == ("t", False, cursor)
    assert 0 < st["chunks_total"] == len(r.left()) < total
    assert st["chunks_done"] == 0 and st["running"] is False
    with pytest.raises(MergeInProgress):
        r.svc.create_snapshot("x")
    r.verify("reopened mid-merge")
    r.write("origin", 12 * CS + 1, n=CS)
    assert r.svc.run_merge() is True
    r.finished()
    r.verify("resumed")
    r.check()
    r.reopen()
    assert r.svc.merge_status() is None
    r.verify("reopened after the merge")


def test_resumed_merge_ends_like_an_uninterrupted_one(make_store, monkeypatch):
    """Same snapshots, same writes: stopping and resuming (three ways) changes nothing in
    the final origin or the snapshots."""
    monkeypatch.setenv("DDSNAP_MERGE_STEP", str(CS))  # steps of one chunk
    results = []
    for how in ("straight", "stop", "reopen", "unclean"):
        r = Rig(make_store, "shared-memory", seed=5)
        populate(r)
        r.start("t")
        for _ in range(3):
            stop, on_step, _ = _stop_after(2)
            if how == "straight":
                r.svc.merge_step()
                r.svc.merge_step()
            else:
                r.svc.run_merge(stop, on_step)
            if how == "stop":
                r.svc.start_merge("t")
            elif how in ("reopen", "unclean"):
                r.reopen(clean=how == "reopen")
            r.write("origin", r.rng.randrange(r.size - 5000), n=5000)
        r.svc.run_merge()
        r.finished()
        r.verify(how)
        r.check()
        results.append({n: bytes(r.vol(n).read(0, r.size)) for n in r.model})
    assert all(res == results[0] for res in results[1:])


@pytest.mark.parametrize("kind", KINDS)
def test_merge_status(make_store, kind):
    r = Rig(make_store, kind)
    assert r.svc.merge_status() is None
    populate(r)
    assert r.svc.merge_status() is None
    r.start("t", keep=True)
    total = len(r.left())
    st = r.status()
    assert set(st) >= {"snapshot", "keep", "chunks_done", "chunks_total", "cursor",
                       "running", "chunks_per_second", "eta_seconds"}
    assert (st["snapshot"], st["keep"], st["chunks_done"], st["chunks_total"], st["cursor"],
            st["running"]) == ("t", True, 0, total, 0, False)
    assert r.status(running=True)["running"] is True
    done_before = 0
    while True:
        finished = r.svc.merge_step()
        if finished:
            break
        st = r.status(running=True)  # this loop is the merge's worker
        left = r.left()
        assert st["chunks_done"] == total - len(left) > done_before
        assert st["chunks_total"] == total
        # chunks below the cursor are all merged
        assert all(c >= st["cursor"] for c, _ in left)
        assert st["chunks_per_second"] > 0
        assert st["eta_seconds"] is not None and st["eta_seconds"] >= 0
        done_before = st["chunks_done"]
    assert done_before == total
    assert r.svc.merge_status() is None
    r.finished()
    r.verify("done")


# ---------------------------------------------------------------------------------------
# Linear runs in one I/O

@pytest.mark.parametrize("kind", KINDS)
def test_linear_runs_are_copied_in_one_io(make_store, kind):
    n = COPY_CHUNKS + 8
    dev = LogDevice(60 * CS)
    r = Rig(make_store, kind, chunks=60, tail=0, origin_dev=dev)
    r.create("t")
    r.write("t", 2 * CS, n=n * CS)  # one write: consecutive store chunks
    left = r.left("t")
    assert [c for c, _ in left] == list(range(2, 2 + n))
    assert [sc - left[0][1] for _, sc in left] == list(range(n)), "not linear in the store"
    r.start("t")
    dev.writes.clear()
    r.svc.merge_step_chunks = 1000
    r.svc.run_merge()
    r.finished()
    # A run of n chunks: one I/O of COPY_CHUNKS chunks, one of the rest.
    assert dev.writes == [(2 * CS, COPY_CHUNKS * CS), ((2 + COPY_CHUNKS) * CS, 8 * CS)]
    r.verify("merged")


@pytest.mark.parametrize("kind", KINDS)
def test_runs_break_where_chunks_or_store_chunks_do_not_follow(make_store, kind):
    dev = LogDevice(40 * CS)
    r = Rig(make_store, kind, chunks=40, tail=0, origin_dev=dev)
    r.create("t")
    for c in (0, 2, 4):  # gaps in the logical chunks
        r.write("t", c * CS, n=100)
    r.write("t", 11 * CS, n=10)  # 10, 11 consecutive logically, not in the store
    r.write("t", 10 * CS, n=10)
    r.write("t", 20 * CS, n=3 * CS)  # linear
    left = dict(r.left("t"))
    assert left[11] + 1 != left[10] + 1 and left[21] == left[20] + 1
    r.start("t")
    dev.writes.clear()
    r.svc.run_merge()
    r.finished()
    assert dev.writes == [(0, CS), (2 * CS, CS), (4 * CS, CS), (10 * CS, CS), (11 * CS, CS),
                          (20 * CS, 3 * CS)]
    r.verify("merged")


@pytest.mark.parametrize("kind", KINDS)
def test_the_partial_last_chunk_is_merged_within_the_origin(make_store, kind):
    dev = LogDevice(10 * CS + 123)
    r = Rig(make_store, kind, chunks=10, tail=123, origin_dev=dev)
    r.create("t")
    r.write("t", 8 * CS, n=2 * CS + 123)  # 8, 9 and the 123-byte tail chunk
    r.start("t")
    dev.writes.clear()
    r.svc.run_merge()
    r.finished()
    assert dev.writes == [(8 * CS, 2 * CS + 123)]
    r.verify("merged")


# ---------------------------------------------------------------------------------------
# A full store

@pytest.mark.parametrize("kind", ["shared-memory", "memory"])
def test_a_full_store_stops_the_merge_without_losing_anything(make_store, kind):
    """The step must give ``young`` copies of the origin before overwriting it; with no
    room it fails with StoreFull, every volume intact; after a delete it completes."""
    r = Rig(make_store, kind, chunks=30, tail=0, store_chunks=24)
    r.create("t")
    r.write("t", 0, n=10 * CS)
    r.create("young")  # reads the origin at 0..9
    r.create("filler")
    free = r.store.space()["chunks_free"]
    r.write("filler", 12 * CS, n=free * CS)  # leaves no chunk free
    r.start("t")
    with pytest.raises(StoreFull):
        r.svc.run_merge()
    r.verify("full")
    assert r.status()["snapshot"] == "t"
    with pytest.raises(StoreFull):
        # must merge chunks 0..9 first: ten copy-outs for young, no room either
        Origin(r.svc, r.svc.data).write(0, bytes(10 * CS))
    r.verify("refused write")
    r.delete("filler")
    if kind != "memory":
        r.reopen()  # a checkpoint makes the freed chunks reusable
    r.write("origin", 5 * CS, n=10)
    assert r.svc.run_merge() is True
    r.finished()
    r.verify("merged after the delete")
    r.check()


@pytest.mark.parametrize("kind", ["shared-memory", "memory"])
@pytest.mark.parametrize("by", ["step", "origin-write"])
def test_delete_oldest_makes_room_for_the_merge(make_store, kind, by):
    """With ``full-policy=delete-oldest`` a merge step (or an origin write merging its
    chunks) that finds no room for the copy-outs deletes the oldest snapshot that is not
    being merged, says so, and goes on; the other snapshots stay intact."""
    r = Rig(make_store, kind, chunks=40, tail=0, store_chunks=24)
    r.create("oldest")
    r.create("t")
    r.write("t", 0, n=4 * CS)
    r.create("young")  # reads the origin at 0..3: the merge must copy them out
    free = r.store.space()["chunks_free"]
    r.write("oldest", 10 * CS, n=free * CS)  # no chunk left
    r.svc.set_full_policy("delete-oldest")
    r.start("t")
    if by == "origin-write":
        r.write("origin", 0, n=4 * CS - 1)
    assert r.svc.run_merge() is True
    r.finished()
    assert [e["name"] for e in r.svc.auto_deleted] == ["oldest"]
    del r.model["oldest"], r.infos["oldest"]
    assert [s.name for s in r.svc.snapshots()] == ["young"]
    r.verify("merged after the policy made room")
    r.check()


@pytest.mark.parametrize("kind", ["shared-memory", "memory"])
def test_an_origin_write_merges_all_its_chunks_in_a_nearly_full_store(make_store, kind):
    """The write's chunks form one run of the target, and there is room for only part of
    the copy-outs the run needs: the rest must still be merged before the write lands
    (else the write goes under the target's exception and the merge later overwrites it)."""
    r = Rig(make_store, kind, chunks=40, tail=0, store_chunks=24)
    r.create("t")
    r.write("t", 0, n=4 * CS)  # one linear run 0..3
    r.create("young")  # reads the origin at 0..3: the merge copies them out
    r.create("filler")
    free = r.store.space()["chunks_free"]
    r.write("filler", 12 * CS, n=(free - 2) * CS)  # room for two copy-outs
    r.start("t")
    r.write("origin", 100, n=4 * CS - 200)
    r.verify("written")
    assert r.svc.run_merge() is True
    r.finished()
    r.verify("merged")
    r.check()


def test_merge_step_size_comes_from_the_environment(make_store, monkeypatch):
    """DDSNAP_MERGE_STEP sets the most data a step merges; a bad value is refused when
    the service starts, before anything is merged."""
    r = Rig(make_store, "memory")
    populate(r)
    r.start("t")
    left = len(r.left())
    monkeypatch.setenv("DDSNAP_MERGE_STEP", "8K")
    svc = LocalService(r.store, r.origin_dev)
    assert svc.merge_step_chunks == 2
    assert svc.merge_step() is False
    assert len(r.left()) == left - 2
    monkeypatch.setenv("DDSNAP_MERGE_STEP", "lots")
    with pytest.raises(InvalidArgument, match="DDSNAP_MERGE_STEP"):
        LocalService(r.store, r.origin_dev)
    monkeypatch.delenv("DDSNAP_MERGE_STEP")
    assert LocalService(r.store, r.origin_dev).merge_step_chunks == (32 << 20) // CS
