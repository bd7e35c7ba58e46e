"""Crash tests of the merge (seed 003): a power cut at every write and flush while a
snapshot is merged into the origin with other snapshots present.

The origin and the snapshot store are RecordingDevices sharing one CrashClock.  A
workload builds snapshots around a target ``t`` (shared exceptions, copy-outs, the
snapshots' own writes, a read-only one), flushes everything, then starts the merge and
interleaves merge steps with origin writes (FUA or not, merged and unmerged chunks,
partial chunks), origin flushes, snapshot writes and flushes, a delete, a resume, a clean
restart, and finally runs the merge to its end and writes on.  For every crash point of
that merge phase (all of them, or a deterministic, evenly spread subsample) the images
a crash could leave ("drop", "subset", "torn"; fixed seeds) are recovered
(``SharedStore.open`` + ``LocalService``) and must show:

* ``check()`` clean;
* the merge recorded or not as before or after the operation in flight (for the start:
  not merging and the origin exactly as before, or merging and the origin reading as the
  target); the target's not-yet-merged chunks between those before and after the
  operation (no chunk lost or merged twice, i.e. the pre-step or post-step state);
* the origin reading as the target's content in every chunk, merged or not, plus the
  origin writes made during the merge: every byte as of the last acknowledged flush or
  FUA write, or from a write issued since (acknowledged and flushed writes survive);
* every other snapshot byte-identical to its model (its own writes under the same rule);
  the snapshot being deleted may survive intact; a target merged with ``keep`` reads,
  during the merge and after it, exactly what it read when the merge started (the state
  the origin was rolled back to); without ``keep`` it is gone after the merge;
* resuming (``run_merge``) completes the merge without changing what any volume reads,
  leaves the target deleted (or kept, as it was), checks clean, and a clean reopen reads
  the same.

Variants: a target that is a snapshot of a snapshot (a clone of ``old``, whose parent is
deleted during the merge), and a tree of several leaves that split and merge as the
merge adds copy-outs and frees the target's own exceptions (format v3 leaves hold 168
records).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import pytest

from ddsnap.errors import StoreFull
from ddsnap.service.local import LocalService
from ddsnap.store.blockdev import MemoryDevice
from ddsnap.store.format import LEAF_MAX, MERGED, pack_key
from ddsnap.store.model import SnapshotInfo
from ddsnap.store.shared import SharedStore
from ddsnap.testing.crash import CrashClock, RecordingDevice
from ddsnap.volume import Origin, Snapshot
from test_store_crash import MODES, Vol, crash_points

CS = 4096


@pytest.fixture(autouse=True)
def small_merge_steps(monkeypatch):
    """Merge steps of a few chunks (the default is 32 MiB), so that these small volumes
    take several steps, each of several runs, and the tests see half-merged states."""
    monkeypatch.setenv("DDSNAP_MERGE_STEP", str(4 * 4096))


@dataclass(frozen=True)
class Geometry:
    chunks: int = 40
    tail: int = 1000  # the last chunk is partial
    store_blocks: int = 220
    journal_blocks: int = 24
    max_snapshots: int = 64

    @property
    def size(self) -> int:
        return self.chunks * CS + self.tail


# ---------------------------------------------------------------------------------------
# Workloads

def make_workload(seed: int, g: Geometry, keep: bool = False, n: int = 40,
                  clone: bool = False, bulk: int = 0, parent_writes: int = 0) -> tuple:
    """``(setup, merge)`` operation lists.  The setup makes ``old``, the target ``t``,
    ``young`` and ``ro`` with shared exceptions and their own writes and flushes
    everything; the merge phase starts the merge of ``t`` and mixes ``n`` operations
    with its steps, then finishes it and writes on.

    ``clone``: ``t`` is taken of ``old`` (not of the origin), ``old`` writes after that
    (history kept for ``t``), and the merge phase deletes ``old`` (``t``'s parent lives
    on as a ghost) rather than ``ro``; with ``parent_writes`` that many writes by
    ``old`` follow the merge's first step (where ``t`` reads old's data, and through old
    the origin's).  ``bulk``: that many chunks from chunk 0 are
    written in the origin after ``t`` (copy-outs ``old`` and ``t`` share), and ``old``
    overwrites the first half of them (so ``t`` alone reads those): a tree of several
    leaves, whose records the merge adds (copy-outs for ``young`` and ``ro``) and
    removes (``t``'s own, merged without ``keep``)."""
    rng = random.Random(seed)
    size = g.size

    def rand_range(max_len=int(2.5 * CS)):
        off = rng.randrange(size)
        return off, rng.randrange(1, min(max_len, size - off) + 1)

    def owrites(k, max_len=4 * CS) -> list[tuple]:
        out: list[tuple] = []
        for _ in range(k):
            off, ln = rand_range(max_len)
            out.append(("owrite", off, rng.randbytes(ln), False))
        return out

    setup = [("create", "old")] + owrites(5)
    if clone:
        setup.append(("create", "t", "old"))
        for _ in range(3):  # old's writes: its data before them is kept for t
            off, ln = rand_range(2 * CS)
            setup.append(("swrite", "old", off, rng.randbytes(ln), False))
    else:
        setup.append(("create", "t"))
    if bulk:
        for off in range(0, bulk * CS, 16 * CS):
            ln = min(16 * CS, bulk * CS - off)
            setup.append(("owrite", off, rng.randbytes(ln), False))
        for off in range(0, bulk // 2 * CS, 16 * CS):
            ln = min(16 * CS, bulk // 2 * CS - off)
            setup.append(("swrite", "old", off, rng.randbytes(ln), False))
    # Small copy-outs in random order: the target's store chunks mostly do not follow its
    # logical chunks, so the merge takes many steps; a few longer ones make runs.
    setup += owrites(14, CS + 200) + owrites(2)
    for _ in range(4):  # the target's own writes: some whole runs, some partial chunks
        c = rng.randrange(g.chunks - 3)
        setup.append(("swrite", "t", c * CS, rng.randbytes(3 * CS), False))
        off, ln = rand_range(500)
        setup.append(("swrite", "t", off, rng.randbytes(ln), False))
    off, ln = rand_range()
    setup.append(("swrite", "old", off, rng.randbytes(ln), False))
    setup += [("create", "young"), ("create", "ro")] + owrites(3)
    off, ln = rand_range()
    setup.append(("swrite", "young", off, rng.randbytes(ln), False))
    setup += [("oflush",), ("sflush", "old"), ("sflush", "t"), ("sflush", "young")]

    merge: list[tuple] = [("start", keep)]
    if parent_writes:
        merge.append(("step",))
        for _ in range(parent_writes):
            off, ln = rand_range()
            merge.append(("swrite", "old", off, rng.randbytes(ln), False))
    deleted = False
    writers = ["old", "young"]
    for _ in range(n):
        r = rng.random()
        if r < 0.35:
            merge.append(("step",))
        elif r < 0.65:
            off, ln = rand_range()
            merge.append(("owrite", off, rng.randbytes(ln), rng.random() < 0.25))
        elif r < 0.72:
            merge.append(("oflush",))
        elif r < 0.82:
            off, ln = rand_range()
            merge.append(("swrite", rng.choice(writers), off, rng.randbytes(ln),
                          rng.random() < 0.3))
        elif r < 0.87:
            merge.append(("sflush", rng.choice(writers)))
        elif r < 0.91 and not deleted:
            if clone:  # the target's parent: a ghost from now on
                merge.append(("delete", "old"))
                writers.remove("old")
            else:
                merge.append(("delete", "ro"))
            deleted = True
        elif r < 0.95:
            merge.append(("resume",))
        else:
            merge.append(("reopen",))
    merge.append(("finish",))
    merge += owrites(2) + [("oflush",)]
    return setup, merge


@dataclass
class Expect:
    """What recovery may show, as of the crash."""

    origin: Vol
    snaps: dict[str, Vol] = field(default_factory=dict)  # the target while not merging
    deleting: str | None = None
    merging: bool = False
    target: bytes | None = None  # during the start: the target's content
    keep: bool = False
    kept: bytes | None = None  # with keep: the target's content when the merge started
    pre_origin: bytes | None = None  # during the start: the origin before it
    op: tuple = ("-",)
    step: int = -1  # index into the merge phase of the op in flight (-1: setup)


class Run:
    """One execution of a workload; ``observer(run, n)`` before every device operation
    ``n`` of the merge phase (counted from its start), when the devices hold what a crash
    there would leave."""

    def __init__(self, g: Geometry, setup: list, merge: list, observer=None):
        self.g = g
        self.clock = CrashClock()
        initial = random.Random(g.size).randbytes(g.size)
        self.origin = RecordingDevice(g.size, initial, "origin", self.clock)
        self.store_dev = RecordingDevice(g.store_blocks * 4096, None, "store", self.clock)
        store = SharedStore.create(self.store_dev, origin_size=g.size, origin_path="origin",
                                   chunk_size=CS, max_snapshots=g.max_snapshots,
                                   journal_blocks=g.journal_blocks)
        self.svc = LocalService(store, self.origin)
        self.e = Expect(Vol.exact(initial))
        self.infos: dict[str, SnapshotInfo] = {}
        self.left_after: list[frozenset] = []  # the target's unmerged chunks after each op
        self.merging_after: list[bool] = []  # a merge recorded after each op
        self.full = 0
        for op in setup:
            self._do(op)
        self.base = self.clock.ops
        if observer is not None:
            self.clock.observer = lambda n, what, path: observer(self, n - self.base)
        for i, op in enumerate(merge):
            self.e.step, self.e.op = i, op
            self._do(op)
            self.left_after.append(self.left())
            self.merging_after.append(self.e.merging)
        self.e.step, self.e.op = -1, ("-",)
        self.clock.observer = None

    @property
    def ops_done(self) -> int:
        return self.clock.ops - self.base

    def left(self) -> frozenset:
        if not self.e.merging:
            return frozenset()
        return frozenset(c for c, _ in self.svc.store.merge_todo(0, 1 << 30))

    def _write(self, vol: Vol, volume, off: int, data: bytes, fua: bool) -> None:
        vol.issue(off, data)
        try:
            volume.write(off, data, fua=fua)
        except StoreFull:
            self.full += 1
            return
        vol.acked(off, data)
        if fua:
            vol.flushed()

    def _do(self, op: tuple) -> None:
        e = self.e
        kind = op[0]
        if kind == "owrite":
            _, off, data, fua = op
            self._write(e.origin, Origin(self.svc, self.svc.data), off, data, fua)
        elif kind == "swrite":
            _, name, off, data, fua = op
            vol = Snapshot(self.svc, self.svc.data, self.infos[name])
            self._write(e.snaps[name], vol, off, data, fua)
        elif kind == "oflush":
            Origin(self.svc, self.svc.data).flush()
            e.origin.flushed()
        elif kind == "sflush":
            Snapshot(self.svc, self.svc.data, self.infos[op[1]]).flush()
            e.snaps[op[1]].flushed()
        elif kind == "create":
            name = op[1]
            parent = op[2] if len(op) > 2 else None
            self.infos[name] = self.svc.create_snapshot(name, read_only=name == "ro",
                                                        parent=parent)
            e.snaps[name] = Vol.exact(e.origin.current if parent is None
                                      else e.snaps[parent].current)
        elif kind == "delete":
            name = op[1]
            e.deleting = name
            self.svc.delete_snapshot(name)
            del e.snaps[name], self.infos[name]
            e.deleting = None
        elif kind == "start":
            t = e.snaps["t"]
            assert t.pending == [] and t.durable == t.current, "the target was not flushed"
            assert e.origin.pending == [], "the origin was not flushed"
            e.pre_origin, e.target = bytes(e.origin.current), bytes(t.current)
            self.svc.start_merge("t", keep=op[1])
            e.merging, e.keep = True, op[1]
            e.kept = bytes(t.current) if e.keep else None
            e.origin = Vol.exact(t.current)  # the origin reads as the target from now on
            del e.snaps["t"]
            e.pre_origin = e.target = None
        elif kind == "step":
            if e.merging and self.svc.merge_step():
                self._finished()
        elif kind == "resume":
            if e.merging:
                self.svc.start_merge("t", keep=e.keep)
        elif kind == "reopen":
            self.svc.close()
            self.svc = LocalService(SharedStore.open(self.store_dev), self.origin)
            self.infos = {s.name: s for s in self.svc.snapshots()}
        elif kind == "finish":
            if e.merging:
                assert self.svc.run_merge() is True
                self._finished()
        else:
            raise ValueError(kind)

    def _finished(self) -> None:
        e = self.e
        e.merging = False
        if e.keep:  # as it was when the merge started
            self.infos["t"] = self.svc.snapshot("t")
            assert e.kept is not None  # recorded when the merge started with keep
            e.snaps["t"] = Vol.exact(e.kept)
        else:
            del self.infos["t"]

    def images(self, mode: str, seed: int) -> tuple[bytes, bytes]:
        rng = random.Random(seed)
        return (bytes(self.store_dev.crash_image(rng, mode)),
                bytes(self.origin.crash_image(rng, mode)))


# ---------------------------------------------------------------------------------------
# Recovery and verification

def recover_and_verify(run: Run, pre_left: frozenset, post_left: frozenset, pre_merging: bool,
                       post_merging: bool, store_img: bytes, origin_img: bytes, what: str,
                       resume: bool) -> None:
    """Open crashed images, check them and compare every volume with the expectations;
    ``pre_*``/``post_*``: the target's unmerged chunks and whether a merge is recorded,
    before and after the operation in flight."""
    e, g = run.e, run.g
    size = g.size
    store = SharedStore.open(MemoryDevice(len(store_img), store_img))
    origin = MemoryDevice(len(origin_img), origin_img)
    svc = LocalService(store, origin)  # resumes an interrupted delete
    findings = store.check()
    assert not findings, f"{what}: {findings}"
    st = svc.merge_status()
    present = {s.name: s for s in svc.snapshots()}
    kind = e.op[0]

    # The merge: recorded as before or after the operation in flight.
    origin_vol = e.origin
    kept = e.kept
    if kind == "start":
        if st is None:  # not started: the origin exactly as before
            got = Origin(svc, svc.data).read(0, size)
            assert got == e.pre_origin, f"{what}: origin before start"
            assert "t" in present
            return
        assert e.target is not None  # recorded while the start is in flight
        origin_vol = Vol.exact(e.target)  # started: the origin reads as the target
        assert st["keep"] == e.op[1], what
        kept = e.target if st["keep"] else None
    elif (st is not None) != pre_merging:
        # Only the operation in flight may have completed the merge.
        assert pre_merging and not post_merging, f"{what}: merge status {st}"
    if st is not None:
        assert st["snapshot"] == "t" and (kind == "start" or st["keep"] == e.keep), what
        # (A write by t's parent can add a chunk to merge: where t read the origin, the
        # parent's old data is kept for it.  So the operation may add chunks, too.)
        left = frozenset(c for c, _ in store.merge_todo(0, 1 << 30))
        came_back = left - pre_left - post_left
        assert not came_back, f"{what}: chunks merged before came back {came_back}"
        ahead = (pre_left & post_left) - left
        assert not ahead, f"{what}: chunks merged ahead {ahead}"

    # The snapshots.
    must = set(e.snaps) - {e.deleting}
    if st is not None:
        must.add("t")
    may = must | ({e.deleting} if e.deleting else set())
    if st is None and e.keep:
        must.add("t")
        may.add("t")
    assert must <= set(present) <= may, f"{what}: snapshots {set(present)}, must {must}"

    # Every volume.
    origin_vol.assert_allowed(Origin(svc, svc.data).read(0, size), f"{what}: origin")
    content = {"origin": Origin(svc, svc.data).read(0, size)}
    for name, info in present.items():
        got = Snapshot(svc, svc.data, info).read(0, size)
        content[name] = got
        if name == "t" and (st is not None or "t" not in e.snaps):
            # Merging (not exported), or the merge completed at this crash: with keep it
            # reads what it did when the merge started; without, it is going away.
            if st is None or st["keep"]:
                assert got == kept, f"{what}: the kept target changed"
            continue
        e.snaps[name].assert_allowed(got, f"{what}: snapshot {name}")
    if resume:
        resume_and_verify(svc, store, origin, present, content, st, e, size, what)


def resume_and_verify(svc, store, origin, present, content, st, e, size, what):
    """Run the recovered merge to its end: no volume's content changes."""
    assert svc.run_merge() is True
    assert svc.merge_status() is None
    if st is not None and not st["keep"]:
        assert "t" not in {s.name for s in svc.snapshots()}, f"{what}: t not deleted"
        del content["t"]
    # (kept: t still reads what it read during the merge, checked above)
    assert store.check() == [], what
    svc.close()
    svc2 = LocalService(SharedStore.open(store.dev), origin)
    assert svc2.store.check() == [], what
    infos = {s.name: s for s in svc2.snapshots()}
    assert set(infos) | {"origin"} == set(content), what
    assert origin.pread(size, 0) == content["origin"], f"{what}: origin device after resume"
    for name, want in content.items():
        vol = (Origin(svc2, svc2.data) if name == "origin"
               else Snapshot(svc2, svc2.data, infos[name]))
        assert vol.read(0, size) == want, f"{what}: {name} after resuming the merge"


def crash_everywhere(g: Geometry, setup: list, merge: list, budget: int | None = None,
                     resume_every: int = 1) -> dict:
    """Verify recovery from a crash at each chosen device operation of the merge phase,
    in every mode (identical images once)."""
    ref = Run(g, setup, merge)
    total = ref.ops_done
    points = set(crash_points(total, budget or total))
    stats: dict[str, Any] = {"points": 0, "total": total, "images": 0, "in_flight": set(),
                             "full": ref.full, "completion": 0}

    def observe(run: Run, n: int) -> None:
        if n not in points:
            return
        stats["points"] += 1
        i = run.e.step
        stats["in_flight"].add(run.e.op[0])
        # Before the start: every chunk of the target is still to merge.
        pre_left = ref.left_after[i - 1] if i > 0 else ref.left_after[0]
        post_left = ref.left_after[i]
        pre_merging = ref.merging_after[i - 1] if i > 0 else False
        post_merging = ref.merging_after[i]
        if pre_merging and not post_merging:
            stats["completion"] += 1  # a crash while the merge completes
        seen = set()
        for mi, mode in enumerate(MODES):
            store_img, origin_img = run.images(mode, seed=n * 31 + mi)
            key = (hash(store_img), hash(origin_img))
            if key in seen:
                continue
            seen.add(key)
            stats["images"] += 1
            recover_and_verify(run, pre_left, post_left, pre_merging, post_merging,
                               store_img, origin_img,
                               f"crash at op {n} (merge phase step {i}: {run.e.op[0]}), "
                               f"mode {mode}", resume=stats["images"] % resume_every == 0)

    run = Run(g, setup, merge, observer=observe)
    assert run.left_after == ref.left_after, "the workload is not deterministic"
    return stats


def nearly(points: int) -> int:
    """The crash points a run must pass of the ``points`` chosen from the reference run:
    all but a few (``run_merge`` ends a step in a second thread while the next one
    copies: two operations issued at once by both threads can be observed as the same
    operation number, and the one after it is then not observed)."""
    return points - 5


# ---------------------------------------------------------------------------------------
# The tests

def test_workload_without_crash_matches_the_model():
    """The harness itself: an uncrashed run reads back as tracked, and its workload does
    what it claims (shared exceptions, origin readers of the target's chunks, steps)."""
    g = Geometry()
    setup, merge = make_workload(1, g)
    kinds = {op[0] for op in merge}
    assert {"start", "step", "owrite", "oflush", "swrite", "sflush", "delete", "resume",
            "reopen", "finish"} <= kinds
    run = Run(g, setup, [])
    store = run.svc.store
    ids = {name: info.id for name, info in run.infos.items()}
    t_reads = {c: store.snapshot_exception(ids["t"], c)[0] for c in range(g.chunks + 1)}
    t_chunks = {c for c, sc in t_reads.items() if sc is not None}
    # t shares an exception with old, and young reads the origin where t reads the store
    assert any(store.snapshot_exception(ids["old"], c)[0] == t_reads[c] for c in t_chunks)
    assert any(store.snapshot_exception(ids["young"], c)[0] is None for c in t_chunks)
    # t has its own (current) exceptions and reads copy-outs of the origin
    owners = {o for o, _c, _t, sc in store.exceptions() if sc in t_reads.values()}
    assert {0, ids["t"]} <= owners
    run = Run(g, setup, merge)
    assert Origin(run.svc, run.svc.data).read(0, g.size) == run.e.origin.current
    for name, vol in run.e.snaps.items():
        assert Snapshot(run.svc, run.svc.data, run.infos[name]).read(0, g.size) == vol.current, name
    assert "t" not in {s.name for s in run.svc.snapshots()}
    assert len(run.left_after[0]) > 10
    assert run.svc.store.check() == []


def test_the_checker_rejects_a_wrong_origin():
    """The harness itself: recovery that showed the origin's own old data where the
    target has an exception, or lost a flushed write, fails."""
    g = Geometry()
    setup, _ = make_workload(1, g)
    merge = [("start", False), ("owrite", 100, b"W" * 100, True)]
    run = Run(g, setup, merge)
    store_img, origin_img = run.images("all", 0)
    args = (run, run.left_after[0], run.left_after[1], True, True)
    recover_and_verify(*args, store_img, origin_img, "intact", resume=True)
    bad = bytearray(origin_img)
    bad[150] ^= 0xFF  # a byte of the FUA write lost
    with pytest.raises(AssertionError, match="origin"):
        recover_and_verify(*args, store_img, bytes(bad), "lost FUA write", resume=False)
    # The target's data where it was never merged: pretend the origin device is read.
    c = sorted(run.left_after[1])[-1]
    store = SharedStore.open(MemoryDevice(len(store_img), store_img))
    assert store.merge_source(c) is not None
    assert store.snapshot_exception(run.infos["t"].id, c)[0] == store.merge_source(c)
    wrong = Vol.exact(origin_img)
    run.e.origin, saved = wrong, run.e.origin
    with pytest.raises(AssertionError, match="origin"):
        recover_and_verify(*args, store_img, origin_img, "origin device", resume=False)
    run.e.origin = saved


def test_the_checker_rejects_a_changed_kept_target():
    """The harness itself: a target merged with ``keep`` that reads anything but its
    content at the start of the merge (say, the origin as of now, v2's semantics) fails,
    during the merge and after it."""
    g = Geometry()
    setup, _ = make_workload(1, g)
    write = ("owrite", 100, b"W" * 100, True)
    for merge in ([("start", True), write, ("step",)], [("start", True), write, ("finish",)]):
        run = Run(g, setup, merge)
        assert run.e.kept != bytes(run.e.origin.current)
        store_img, origin_img = run.images("all", 0)
        args = (run, run.left_after[0], run.left_after[-1], True, run.merging_after[-1],
                store_img, origin_img)
        recover_and_verify(*args, "intact", resume=True)
        run.e.kept = bytes(run.e.origin.current)
        if not run.merging_after[-1]:
            run.e.snaps["t"] = Vol.exact(run.e.kept)
        with pytest.raises(AssertionError, match="snapshot t|kept target"):
            recover_and_verify(*args, "the origin as kept target", resume=False)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_crash_at_every_point_of_a_merge(seed):
    g = Geometry()
    setup, merge = make_workload(seed, g)
    stats = crash_everywhere(g, setup, merge)
    assert stats["points"] == stats["total"], "every crash point must be tried"
    assert {"start", "step", "owrite", "swrite", "oflush", "reopen"} <= stats["in_flight"]
    assert stats["completion"] > 3


def test_crash_at_every_point_of_a_kept_merge():
    """``keep``: after the completion the target is a snapshot equal to the origin as of
    then, whatever the crash."""
    g = Geometry()
    setup, merge = make_workload(4, g, keep=True)
    stats = crash_everywhere(g, setup, merge)
    assert stats["points"] == stats["total"] and stats["completion"] > 3


def test_crash_during_a_merge_with_a_tiny_journal():
    """An 8-block journal: checkpoints before nearly every commit, transactions wrap."""
    g = Geometry(journal_blocks=8, store_blocks=200)
    setup, merge = make_workload(5, g)
    stats = crash_everywhere(g, setup, merge, budget=1500)
    assert stats["points"] >= nearly(min(1500, stats["total"]))


def test_crash_during_a_merge_over_many_leaves(monkeypatch):
    """(v2 tested 1024-bit sharemaps, leaves of ~27 chunks, here.)  A tree of several
    168-record leaves: they split as the merge adds copy-outs for young and ro and merge
    as it frees the exceptions only t reads."""
    monkeypatch.setenv("DDSNAP_MERGE_STEP", str(16 * CS))
    g = Geometry(chunks=420, store_blocks=1300, max_snapshots=0, journal_blocks=64)
    setup, merge = make_workload(6, g, n=30, bulk=400)
    records = sum(1 for _ in Run(g, setup, []).svc.store.exceptions())
    assert records > 3 * 168, f"{records} records fit in fewer than 4 leaves"
    stats = crash_everywhere(g, setup, merge, budget=1200, resume_every=3)
    assert stats["points"] >= nearly(min(1200, stats["total"]))


def test_crash_during_the_merge_of_a_clone_whose_parent_is_deleted():
    """The target is a snapshot of ``old``: it reads old's history (kept for it when old
    wrote) and, through old, the origin's copy-outs; old writes during the merge (where t
    reads old's data, and through old the origin's: t's data is kept for it, which may
    add a chunk to merge), then is deleted and lives on as a ghost while t is merged,
    then goes with t."""
    g = Geometry()
    setup, merge = make_workload(7, g, clone=True, parent_writes=4)
    assert ("delete", "old") in merge
    stats = crash_everywhere(g, setup, merge)
    assert stats["points"] == stats["total"] and stats["completion"] > 3
    assert "delete" in stats["in_flight"]


def test_crash_during_the_kept_merge_of_a_clone():
    """As above with ``keep``."""
    g = Geometry()
    setup, merge = make_workload(8, g, clone=True, keep=True, parent_writes=4)
    stats = crash_everywhere(g, setup, merge, budget=1500)
    assert stats["points"] >= nearly(min(1500, stats["total"])) and stats["completion"] > 0


def test_a_kept_target_survives_a_crash_as_it_was_when_the_merge_started():
    """With ``keep`` the completed merge leaves the target as it was when the merge
    started (the state the origin was rolled back to): origin writes during the merge,
    also one after the last step that is not flushed, copy out for it like for any
    snapshot, and a crash afterwards must not change what it reads (DESIGN.md
    invariant 1), whatever it does to the origin's unflushed writes."""
    g = Geometry()
    setup, _ = make_workload(1, g)
    run = Run(g, setup, [("start", True)])
    svc = run.svc
    kept = run.e.kept
    assert kept is not None and kept != bytes(run.e.snaps["old"].current)
    t = svc.snapshot("t")
    Origin(svc, svc.data).write(11 * CS + 5, b"during the merge" * 300)  # over unmerged chunks too
    while svc.store.merge_todo(0, 1):
        assert svc.merge_step() is False
    # Every chunk merged, the completion not yet done: an origin write, not flushed.
    Origin(svc, svc.data).write(5 * CS + 7, b"after the last step" * 50)
    assert Snapshot(svc, svc.data, t).read(0, g.size) == kept
    assert svc.merge_step() is True
    assert Snapshot(svc, svc.data, svc.snapshot("t")).read(0, g.size) == kept
    assert Origin(svc, svc.data).read(5 * CS + 7, 19) == b"after the last step"
    for mode in MODES:
        store_img, origin_img = run.images(mode, seed=3)
        store = SharedStore.open(MemoryDevice(len(store_img), store_img))
        svc2 = LocalService(store, MemoryDevice(len(origin_img), origin_img))
        assert store.check() == []
        assert svc2.merge_status() is None
        got = Snapshot(svc2, svc2.data, svc2.snapshot("t")).read(0, g.size)
        assert got == kept, f"{mode}: the kept target changed in a crash"


def _tight_store():
    """A 64-chunk zero origin and a 70-chunk store (24-block journal) on recording
    devices sharing one crash clock: ``(clock, origin, store device, service)``."""
    clock = CrashClock()
    size = 64 * CS
    origin = RecordingDevice(size, bytes(size), "origin", clock)
    dev = RecordingDevice(70 * CS, None, "store", clock)
    svc = LocalService(SharedStore.create(dev, size, "o", CS, 64, journal_blocks=24),
                          origin)
    return clock, origin, dev, svc


def _after_crash(dev, origin, n: int, what: str, path: str) -> LocalService:
    """The service over the images a crash at op ``n`` leaves (lost unflushed writes),
    after asserting the store checks clean (no leaked chunk)."""
    store_img = bytes(dev.crash_image(random.Random(n), "drop"))
    origin_img = bytes(origin.crash_image(random.Random(n), "drop"))
    svc2 = LocalService(SharedStore.open(MemoryDevice(len(store_img), store_img)),
                           MemoryDevice(origin.size, origin_img))
    assert svc2.store.check() == [], f"crash at op {n} ({what} {path})"
    return svc2


def _crash_checker(dev, origin, want: dict) -> tuple:
    """A crash-clock observer that recovers the images a crash at each operation leaves
    (:func:`_after_crash`) and reads every volume of ``want`` (``"origin"`` or a snapshot
    name -> its expected bytes from offset 0); returns ``(observer, points checked)``."""
    checked: list[int] = []

    def observe(n, what, path):
        svc2 = _after_crash(dev, origin, n, what, path)
        for name, data in want.items():
            vol = (Origin(svc2, svc2.data) if name == "origin"
                   else Snapshot(svc2, svc2.data, svc2.snapshot(name)))
            assert vol.read(0, len(data)) == data, f"{name} after a crash at op {n}"
        checked.append(n)

    return observe, checked


def test_crash_while_a_step_reclaims_the_space_a_merge_freed(monkeypatch):
    """A nearly full store: the first step's copy-outs use most of the free chunks and its
    drops free the target's (reusable only after a checkpoint); the second step's copy-outs
    need more than is free: it merges the part it has room for, and a later step, holding
    no unrecorded chunk, checkpoints to reuse the freed ones.  A crash at any point of
    those steps recovers clean (no leaked chunks) with every volume intact."""
    monkeypatch.setenv("DDSNAP_MERGE_STEP", str(5 * CS))  # one run of t per step
    clock, origin, dev, svc = _tight_store()
    size = origin.size
    t = svc.create_snapshot("t")
    Snapshot(svc, svc.data, t).write(5 * CS, b"t" * 5 * CS)  # t's chunks 5..9, then 0..4: two runs
    Snapshot(svc, svc.data, t).write(0, b"T" * 5 * CS)
    target = Snapshot(svc, svc.data, t).read(0, size)
    svc.create_snapshot("young")  # reads the origin at 0..9: needs copy-outs
    filler = svc.create_snapshot("filler")
    free = svc.store.space()["chunks_free"]
    Snapshot(svc, svc.data, filler).write(20 * CS, b"f" * (free - 7) * CS)  # 7 chunks left
    filled = Snapshot(svc, svc.data, filler).read(0, size)
    svc.data.cow.flush()
    svc.start_merge("t")
    assert svc.merge_step() is False  # run 0..4: 5 copy-outs, t's 5 chunks freed
    observe, checked = _crash_checker(dev, origin, {"origin": target, "young": bytes(size),
                                                    "filler": filled})
    clock.observer = observe
    # run 5..9: room for 2 copy-outs, so 2 chunks merge; the next step holds nothing
    # when it checkpoints to reuse t's freed chunks, and merges the rest.
    steps = 1
    while not svc.merge_step():
        steps += 1
    clock.observer = None
    assert steps >= 3 and len(checked) > 5
    assert svc.store.check() == []
    assert Origin(svc, svc.data).read(0, size) == target


def test_crash_while_an_origin_write_reclaims_the_space_a_merge_freed(monkeypatch):
    """An origin write needing two copy-outs when only one chunk is free and the rest is
    what a merge freed (reusable after a checkpoint): it gives back the chunk it holds,
    checkpoints holding nothing, and starts again.  A crash at any point of the write
    recovers clean (no leaked chunk) with every snapshot intact."""
    monkeypatch.setenv("DDSNAP_MERGE_STEP", str(5 * CS))
    clock, origin, dev, svc = _tight_store()
    size = origin.size
    t = svc.create_snapshot("t")
    Snapshot(svc, svc.data, t).write(0, b"T" * 5 * CS)
    filler = svc.create_snapshot("filler")
    free = svc.store.space()["chunks_free"]
    Snapshot(svc, svc.data, filler).write(20 * CS, b"f" * (free - 2) * CS)
    filled = Snapshot(svc, svc.data, filler).read(0, size)
    svc.data.cow.flush()
    # Without keep, the exceptions only t reads are freed as they are merged (not yet
    # reusable); with keep, t would keep them.
    svc.start_merge("t")
    while not svc.merge_step():
        pass
    assert svc.store.reclaimable()
    young = svc.create_snapshot("young")  # shares origin chunks 40, 41: two copy-outs
    before = Origin(svc, svc.data).read(0, size)
    checked = []

    def observe(n, what, path):
        svc2 = _after_crash(dev, origin, n, what, path)
        assert Snapshot(svc2, svc2.data, young).read(0, size) == before
        assert Snapshot(svc2, svc2.data, filler).read(0, size) == filled
        assert [s.name for s in svc2.snapshots()] == ["filler", "young"]
        checked.append(n)

    clock.observer = observe
    Origin(svc, svc.data).write(40 * CS, b"o" * 2 * CS)
    clock.observer = None
    assert len(checked) > 5
    assert svc.store.check() == []
    assert Snapshot(svc, svc.data, young).read(0, size) == before
    assert Origin(svc, svc.data).read(40 * CS, 2 * CS) == b"o" * 2 * CS


def test_a_step_whose_copy_outs_take_the_room_their_metadata_needs(monkeypatch):
    """One big merge step (4 KiB chunks: data and tree blocks come from the same free
    blocks) whose copy-outs for s2 take every free block while the leaf their records go
    to is full: the step merges the part whose metadata fits (the rest of its chunks go
    back first) and the next steps go on, rather than failing with no room for metadata
    every time.  A crash at any point recovers clean with every volume intact."""
    monkeypatch.setenv("DDSNAP_MERGE_STEP", str(1 << 20))
    clock = CrashClock()
    size = 256 * CS
    origin = RecordingDevice(size, random.Random(9).randbytes(size), "origin", clock)
    dev = RecordingDevice(450 * CS, None, "store", clock)
    svc = LocalService(SharedStore.create(dev, size, "o", CS, 0, journal_blocks=24),
                          origin)
    s1 = svc.create_snapshot("s1")
    Origin(svc, svc.data).write(0, random.Random(1).randbytes(200 * CS))  # 200 copy-outs for s1
    target = Snapshot(svc, svc.data, s1).read(0, size)
    s2 = svc.create_snapshot("s2")  # reads the origin there: the merge copies out
    before = Origin(svc, svc.data).read(0, size)
    filler = svc.create_snapshot("filler")
    free = svc.store.space()["chunks_free"]
    assert 20 < free - 20 <= 256
    Snapshot(svc, svc.data, filler).write(0, b"F" * (free - 20) * CS)  # about 20 blocks left
    filled = Snapshot(svc, svc.data, filler).read(0, size)
    svc.data.cow.flush()
    svc.start_merge("s1")
    status = svc.merge_status()
    assert status is not None  # the merge just started
    total = status["chunks_total"]
    assert total == 200
    observe, checked = _crash_checker(dev, origin, {"origin": target, "s2": before,
                                                    "filler": filled})
    clock.observer = observe
    steps = 1
    while not svc.merge_step():
        steps += 1
    clock.observer = None
    assert steps > 2 and len(checked) > 50, (steps, len(checked))
    assert svc.store.check() == []
    assert Origin(svc, svc.data).read(0, size) == target
    assert Snapshot(svc, svc.data, s2).read(0, size) == before
    assert [s.name for s in svc.snapshots()] == ["s2", "filler"]


def test_a_merge_in_a_store_with_no_free_block_moves_its_cursor(monkeypatch):
    """A kept merge that needs no copy-out (nothing else reads the origin where the target
    has data) in a store without a single free block, whose full last leaves hold the
    merge markers of origin writes ahead of the cursor: merging in order from the cursor
    needs no metadata (the cursor moves; no marker is added), so the merge completes
    rather than failing with no room for metadata every time (the target cannot be
    deleted during its merge: nothing would ever make room).  A crash at any point
    recovers clean."""
    monkeypatch.setenv("DDSNAP_MERGE_STEP", str(8 * CS))
    clock = CrashClock()
    size = 400 * CS
    origin = RecordingDevice(size, random.Random(9).randbytes(size), "origin", clock)
    dev = RecordingDevice(440 * CS, None, "store", clock)
    store = SharedStore.create(dev, size, "o", CS, 0, journal_blocks=24)
    svc = LocalService(store, origin)
    s1 = svc.create_snapshot("s1")
    for c in random.Random(5).sample(range(100), 100):  # no linear runs
        Origin(svc, svc.data).write(c * CS, bytes([c]) * CS)
    filler = svc.create_snapshot("filler")
    Snapshot(svc, svc.data, filler).write(0, b"f" * 100 * CS)  # reads no origin chunk s1 has
    kept = Snapshot(svc, svc.data, s1).read(0, size)
    svc.start_merge("s1", keep=True)
    c = 150
    while True:  # copy-outs for both and a marker each, until not a block is left
        try:
            Origin(svc, svc.data).write(c * CS, b"o" * CS)
        except StoreFull:
            break
        c += 1
    assert store.space()["chunks_free"] == 0 and c > 150 + LEAF_MAX
    _block, leaf = store.leaf_of(pack_key(MERGED, 0, 0))
    assert len(leaf.keys) == LEAF_MAX, "a marker below the cursor's would fit"
    Origin(svc, svc.data).flush()
    origin_now = Origin(svc, svc.data).read(0, size)
    filled = Snapshot(svc, svc.data, filler).read(0, size)
    observe, checked = _crash_checker(dev, origin, {"origin": origin_now, "s1": kept,
                                                    "filler": filled})
    clock.observer = observe
    assert svc.run_merge() is True
    clock.observer = None
    assert len(checked) > 20
    assert svc.store.check() == []
    assert Origin(svc, svc.data).read(0, size) == origin_now
    assert Snapshot(svc, svc.data, svc.snapshot("s1")).read(0, size) == kept
