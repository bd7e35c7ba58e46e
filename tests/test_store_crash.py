"""Crash tests: a power cut at every write and flush of a workload, on the origin and the
snapshot store at once (RecordingDevices sharing one CrashClock).

For every crash point (every one, or a deterministic subsample for the longer
workloads) the devices give the images a crash could leave ("drop": only flushed writes;
"subset": some unflushed writes; "torn": some, one of them torn at a sector boundary;
fixed seeds), the store is reopened from them (journal replay, interrupted deletes
resumed) and must check clean and hold:

* the origin: every byte as of its last acknowledged flush (origin flush or FUA write),
  or the data of a write issued since (DESIGN.md invariant 2);
* every snapshot whose creation was acknowledged and whose delete was not: its content
  exactly as the origin (or, for a snapshot of a snapshot, its parent) was when it was
  taken, plus its own writes under the same rule (invariant 1: origin writes, writes to
  its parent, deletes of other snapshots, its parent's included, and crashes never
  change it);
* the snapshot being created at the crash may exist or not, and if it exists it holds
  the origin as of its creation; the snapshot being deleted may still exist, intact;
* no other snapshot exists; nothing reads as garbage.

Afterwards the recovered store must keep working: new writes read back and a clean close
and reopen checks clean.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest

from ddsnap.errors import StoreFull
from ddsnap.store.blockdev import CrashClock, CrashNow, MemoryDevice, RecordingDevice
from ddsnap.store.service import MetadataService
from ddsnap.store.shared import SharedStore
from ddsnap.volume import Origin, Snapshot

MODES = ("drop", "subset", "torn")


# ---------------------------------------------------------------------------------------
# What the volumes may hold after a crash

@dataclass
class Vol:
    """What one volume may read after a crash.

    ``durable`` is its content as of its last acknowledged flush; ``pending`` the writes
    issued since (acknowledged or in flight), each of which may or may not have landed,
    byte by byte; ``current`` the content as acknowledged so far.
    """

    durable: bytearray
    current: bytearray
    pending: list = field(default_factory=list)

    @classmethod
    def exact(cls, content: bytes) -> "Vol":
        """A volume that must read exactly ``content`` (a fresh snapshot)."""
        return cls(bytearray(content), bytearray(content))

    def issue(self, off: int, data: bytes) -> None:
        """A write is about to be issued: from now on it may have landed."""
        self.pending.append((off, data))

    def acked(self, off: int, data: bytes) -> None:
        """The write completed (was acknowledged)."""
        self.current[off: off + len(data)] = data

    def flushed(self) -> None:
        """A flush (or FUA write) of this volume was acknowledged."""
        self.durable = bytearray(self.current)
        self.pending = []

    def assert_allowed(self, got: bytes, what: str) -> None:
        """Every byte of ``got`` is the durable byte or one a pending write put there."""
        assert len(got) == len(self.durable)
        if got == self.durable:
            return
        # Within a piece bounded by pending writes' ends and 512-byte sectors, the same
        # writes cover every byte, so a correct piece is usually one candidate whole;
        # fall back to byte by byte otherwise.
        edges = {o for o, _ in self.pending} | {o + len(d) for o, d in self.pending}
        step = 4096
        for lo in range(0, len(got), step):
            hi = min(lo + step, len(got))
            if got[lo:hi] == self.durable[lo:hi]:
                continue
            cuts = sorted({x for x in edges if lo < x < hi} | set(range(lo, hi, 512)) | {hi})
            for a, b in zip(cuts, cuts[1:]):
                piece = got[a:b]
                if piece == self.durable[a:b] or any(
                        o <= a and b <= o + len(d) and d[a - o: b - o] == piece
                        for o, d in self.pending):
                    continue
                for x in range(a, b):
                    if got[x] == self.durable[x]:
                        continue
                    if not any(o <= x < o + len(d) and d[x - o] == got[x]
                               for o, d in self.pending):
                        lost = [(o, len(d)) for o, d in self.pending]
                        raise AssertionError(
                            f"{what}: byte {x} is {got[x]:#04x}, expected "
                            f"{self.durable[x]:#04x} (durable) or a byte of the writes "
                            f"since the last flush {lost}")


@dataclass
class Tracker:
    """The expectations of a workload run, as of the crash."""

    origin: Vol
    snaps: dict = field(default_factory=dict)  # name -> Vol, acknowledged creations
    creating: tuple | None = None  # (name, Vol) of a creation in flight
    deleting: str | None = None  # name of a delete in flight
    step: int = -1  # index of the workload op in flight at the crash (-1: none)


# ---------------------------------------------------------------------------------------
# Workloads

@dataclass(frozen=True)
class Geometry:
    """Sizes of one crash scenario."""

    origin_size: int = 40 * 4096 + 1000
    store_blocks: int = 170
    chunk_size: int = 4096
    max_snapshots: int = 0
    journal_blocks: int = 24


def make_workload(seed: int, n: int, g: Geometry) -> list[tuple]:
    """A deterministic list of ``n`` operations: origin and snapshot writes (some FUA),
    flushes, snapshot creates (of the origin and of snapshots) and deletes (parents
    too), and a clean close-and-reopen."""
    rng = random.Random(seed)
    ops: list[tuple] = []
    live: list[str] = []
    made = 0
    cs = g.chunk_size

    def rand_range():
        off = rng.randrange(g.origin_size)
        return off, rng.randrange(1, min(int(2.5 * cs), g.origin_size - off) + 1)

    for _ in range(n):
        r = rng.random()
        if not live or (r < 0.12 and len(live) < 5):
            made += 1
            live.append(f"s{made}")
            ops.append(("create", live[-1]))
        elif r < 0.18 and len(live) < 6:
            made += 1
            parent = rng.choice(live)
            live.append(f"c{made}")
            ops.append(("clone", live[-1], parent))
        elif r < 0.45:
            off, ln = rand_range()
            ops.append(("owrite", off, rng.randbytes(ln), rng.random() < 0.2))
        elif r < 0.68:
            off, ln = rand_range()
            ops.append(("swrite", rng.choice(live), off, rng.randbytes(ln), rng.random() < 0.2))
        elif r < 0.76:
            ops.append(("oflush",))
        elif r < 0.84:
            ops.append(("sflush", rng.choice(live)))
        elif r < 0.94 and len(live) > 1:
            name = live.pop(rng.randrange(len(live)))
            ops.append(("delete", name))
        elif r < 0.97:
            ops.append(("reopen",))
        else:
            off, ln = rand_range()
            ops.append(("owrite", off, rng.randbytes(ln), False))
    return ops


class Run:
    """One execution of a workload on a fresh origin and store.

    With ``crash_at`` (an operation number counted from the start of the workload) the
    devices lose power there: that operation raises CrashNow and so does every later one.
    With ``observer``, ``observer(run, n)`` is called just before each operation ``n`` of
    the workload, when the devices hold what a crash there would leave.
    """

    def __init__(self, g: Geometry, ops: list[tuple], crash_at: int | None = None,
                 observer=None):
        self.g = g
        self.clock = CrashClock()
        initial = random.Random(g.origin_size).randbytes(g.origin_size)
        self.origin = RecordingDevice(g.origin_size, initial, "origin", self.clock)
        self.store_dev = RecordingDevice(g.store_blocks * 4096, None, "store", self.clock)
        store = SharedStore.create(self.store_dev, origin_size=g.origin_size,
                                   origin_path="origin", chunk_size=g.chunk_size,
                                   max_snapshots=g.max_snapshots,
                                   journal_blocks=g.journal_blocks)
        self.svc = MetadataService(store, self.origin)
        self.base = self.clock.ops
        self.t = Tracker(Vol.exact(initial))
        self.infos = {}
        self.full = 0
        if crash_at is not None:
            self.clock.crash_after = self.base + crash_at
        if observer is not None:
            self.clock.observer = lambda n, what, path: observer(self, n - self.base)
        self.crashed = False
        try:
            for i, op in enumerate(ops):
                self.t.step = i
                self._do(op)
            self.t.step = -1
        except CrashNow:
            self.crashed = True
        self.clock.observer = None

    @property
    def ops_done(self) -> int:
        """Device operations the workload issued (the crash points there are)."""
        return self.clock.ops - self.base

    def _write(self, vol: Vol, volume, off: int, data: bytes, fua: bool) -> None:
        vol.issue(off, data)
        try:
            volume.write(off, data, fua=fua)
        except StoreFull:
            # Nothing was written; the copy-outs it made are harmless.  Keep the write
            # as "may have landed" all the same: NBD does not promise atomic failure.
            self.full += 1
            return
        vol.acked(off, data)
        if fua:
            vol.flushed()

    def _do(self, op: tuple) -> None:
        t = self.t
        kind = op[0]
        if kind == "owrite":
            _, off, data, fua = op
            self._write(t.origin, Origin(self.svc), off, data, fua)
        elif kind == "swrite":
            _, name, off, data, fua = op
            self._write(t.snaps[name], Snapshot(self.svc, self.infos[name]), off, data, fua)
        elif kind == "oflush":
            Origin(self.svc).flush()
            t.origin.flushed()
        elif kind == "sflush":
            Snapshot(self.svc, self.infos[op[1]]).flush()
            t.snaps[op[1]].flushed()
        elif kind == "create":
            name = op[1]
            t.creating = (name, Vol.exact(t.origin.current))
            self.infos[name] = self.svc.create_snapshot(name)
            t.snaps[name] = t.creating[1]
            t.creating = None
        elif kind == "clone":
            _, name, parent = op
            t.creating = (name, Vol.exact(t.snaps[parent].current))
            self.infos[name] = self.svc.create_snapshot(name, parent=parent)
            t.snaps[name] = t.creating[1]
            t.creating = None
        elif kind == "delete":
            name = op[1]
            t.deleting = name
            self.svc.delete_snapshot(name)
            del t.snaps[name]
            del self.infos[name]
            t.deleting = None
        elif kind == "reopen":
            self.svc.close()
            self.svc = MetadataService(SharedStore.open(self.store_dev), self.origin)
            self.infos = {s.name: s for s in self.svc.snapshots()}
        else:
            raise ValueError(kind)

    def images(self, mode: str, seed: int) -> tuple[bytes, bytes]:
        """(store image, origin image) a crash now could leave, for ``mode`` and ``seed``."""
        rng = random.Random(seed)
        return (bytes(self.store_dev.crash_image(rng, mode)),
                bytes(self.origin.crash_image(rng, mode)))


# ---------------------------------------------------------------------------------------
# Recovery and verification

def recover_and_verify(t: Tracker, g: Geometry, store_img: bytes, origin_img: bytes,
                       what: str, exercise: bool = False) -> None:
    """Open crashed images, check them, and compare every volume with the tracker."""
    store = SharedStore.open(MemoryDevice(len(store_img), store_img))
    origin = MemoryDevice(len(origin_img), origin_img)
    svc = MetadataService(store, origin)  # resumes an interrupted delete
    findings = store.check()
    assert not findings, f"{what}: {findings}"
    present = {s.name: s for s in svc.snapshots()}
    must = set(t.snaps) - {t.deleting}
    may = set(t.snaps) | ({t.creating[0]} if t.creating else set())
    assert must <= set(present), f"{what}: lost snapshots {must - set(present)}"
    assert set(present) <= may, f"{what}: unexpected snapshots {set(present) - may}"
    size = g.origin_size
    t.origin.assert_allowed(Origin(svc).read(0, size), f"{what}: origin")
    for name, info in present.items():
        vol = t.snaps[name] if name in t.snaps else t.creating[1]
        vol.assert_allowed(Snapshot(svc, info).read(0, size), f"{what}: snapshot {name}")
    if exercise:
        exercise_after_recovery(svc, store, origin, present, g, what)


def exercise_after_recovery(svc, store, origin, present, g, what):
    """The recovered store takes new writes, snapshots and deletes, and closes cleanly."""
    size = g.origin_size
    rng = random.Random(1)
    model = {"origin": bytearray(Origin(svc).read(0, size))}
    for name, info in present.items():
        model[name] = bytearray(Snapshot(svc, info).read(0, size))
    info = svc.create_snapshot("after-crash")
    present = dict(present, **{"after-crash": info})
    model["after-crash"] = bytearray(model["origin"])
    for name in list(model):
        vol = Origin(svc) if name == "origin" else Snapshot(svc, present[name])
        off = rng.randrange(size - 5000)
        data = rng.randbytes(5000)
        try:
            vol.write(off, data)
        except StoreFull:
            continue
        model[name][off: off + 5000] = data
    if len(present) > 1:
        victim = sorted(present)[0]
        svc.delete_snapshot(victim)
        del model[victim], present[victim]
    svc.close()
    store2 = SharedStore.open(store.dev)
    svc2 = MetadataService(store2, origin)
    assert store2.check() == [], what
    for name, want in model.items():
        vol = Origin(svc2) if name == "origin" else Snapshot(svc2, present[name])
        assert vol.read(0, size) == want, f"{what}: {name} after recovery and new writes"


def crash_points(total: int, budget: int) -> list[int]:
    """Up to ``budget`` crash points out of ``1..total``, evenly spread, deterministic."""
    if total <= budget:
        return list(range(1, total + 1))
    return sorted({1 + (i * (total - 1)) // (budget - 1) for i in range(budget)})


def crash_everywhere(g: Geometry, ops: list[tuple], budget: int | None = None,
                     modes=MODES, exercise_every: int = 25) -> dict:
    """Verify the recovery from a crash at each chosen operation of ``ops``, in each mode.

    The workload runs once; an observer on the devices' clock verifies each crash point
    as the run passes it (``budget`` points evenly spread, or all of them).
    """
    total = Run(g, ops).ops_done
    points = set(crash_points(total, budget or total))
    stats = {"points": 0, "total": total, "in_flight": set(), "images": 0}

    def observe(run: Run, n: int) -> None:
        if n not in points:
            return
        stats["points"] += 1
        step = run.t.step
        stats["in_flight"].add(ops[step][0] if step >= 0 else None)
        seen = set()
        for mi, mode in enumerate(modes):
            store_img, origin_img = run.images(mode, seed=n * 31 + mi)
            key = (hash(store_img), hash(origin_img))
            if key in seen:
                continue  # nothing unflushed: every mode leaves the same image
            seen.add(key)
            stats["images"] += 1
            recover_and_verify(run.t, g, store_img, origin_img,
                               f"crash at op {n} (workload step {step}: "
                               f"{ops[step][0] if step >= 0 else '-'}), mode {mode}",
                               exercise=(stats["points"] % exercise_every == 0))

    run = Run(g, ops, observer=observe)
    assert not run.crashed
    stats["full"] = run.full
    return stats


# ---------------------------------------------------------------------------------------
# The tests

def test_workload_without_crash_matches_the_model():
    """The harness itself: an uncrashed run reads back exactly as tracked."""
    g = Geometry()
    ops = make_workload(1, 80, g)
    run = Run(g, ops)
    assert not run.crashed
    t = run.t
    size = g.origin_size
    assert Origin(run.svc).read(0, size) == t.origin.current
    assert set(t.snaps) == {s.name for s in run.svc.snapshots()}
    for name, vol in t.snaps.items():
        assert Snapshot(run.svc, run.infos[name]).read(0, size) == vol.current
    kinds = {op[0] for op in ops}
    assert kinds == {"create", "clone", "owrite", "swrite", "oflush", "sflush", "delete",
                     "reopen"}
    # "all" images are the devices as they are: recovery must give the same content.
    recover_and_verify(t, g, *run.images("all", 0), "no crash", exercise=True)


def test_the_checker_rejects_wrong_content():
    """The harness itself: a lost flushed write, a stale snapshot and garbage fail."""
    g = Geometry()
    ops = [("create", "s1"), ("owrite", 10, b"A" * 100, True),
           ("swrite", "s1", 5000, b"B" * 10, True), ("owrite", 9000, b"C" * 10, False)]
    run = Run(g, ops)
    store_img, origin_img = run.images("all", 0)
    recover_and_verify(run.t, g, store_img, origin_img, "intact")
    bad_origin = bytearray(origin_img)
    bad_origin[50] ^= 1  # a byte of the FUA write lost
    with pytest.raises(AssertionError, match="origin: byte 50"):
        recover_and_verify(run.t, g, store_img, bytes(bad_origin), "lost FUA write")
    bad_origin = bytearray(origin_img)
    bad_origin[9005] = 0x77  # neither old nor new: garbage
    with pytest.raises(AssertionError, match="origin: byte 9005"):
        recover_and_verify(run.t, g, store_img, bytes(bad_origin), "garbage")
    # The snapshot must not follow the origin: pretend it was taken after the write.
    run.t.snaps["s1"] = Vol.exact(run.t.origin.current)
    with pytest.raises(AssertionError, match="snapshot s1"):
        recover_and_verify(run.t, g, store_img, origin_img, "stale snapshot")


def test_observer_sees_what_a_real_crash_leaves(monkeypatch):
    """Verifying crash points from an observer in one run is sound: at each point the
    devices hold exactly what a real power cut there (CrashNow, devices stay down) leaves,
    and the real crash's images recover correctly too."""
    import ddsnap.store.shared as shared_mod

    # Every run makes its store with the same UUID and timestamps so that images
    # compare byte for byte.
    monkeypatch.setattr(shared_mod.os, "urandom", lambda n: bytes(range(n)))
    monkeypatch.setattr(shared_mod.time, "time_ns", lambda: 1_800_000_000_000_000_000)
    g = Geometry()
    ops = make_workload(7, 40, g)
    total = Run(g, ops).ops_done
    points = crash_points(total, 12)
    observed = {}

    def observe(run, n):
        if n in points:
            observed[n] = ([run.images(mode, n) for mode in MODES], run.t.step)

    Run(g, ops, observer=observe)
    assert sorted(observed) == points
    for k in points:
        real = Run(g, ops, crash_at=k)
        assert real.crashed and real.ops_done == k
        images = [real.images(mode, k) for mode in MODES]
        assert (images, real.t.step) == observed[k]
        for mode, (store_img, origin_img) in zip(MODES, images):
            recover_and_verify(real.t, g, store_img, origin_img, f"real crash at {k} {mode}")


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5, 6])
def test_crash_at_every_point(seed):
    g = Geometry()
    ops = make_workload(seed, 90, g)
    stats = crash_everywhere(g, ops)
    assert stats["points"] == stats["total"], "every crash point must be tried"
    assert {"owrite", "swrite", "create", "delete", "oflush", "sflush"} <= stats["in_flight"]


def test_crash_at_every_point_with_a_tiny_journal():
    """A journal of 8 blocks: checkpoints before nearly every commit, transactions wrap."""
    g = Geometry(journal_blocks=8, store_blocks=160)
    stats = crash_everywhere(g, make_workload(8, 70, g))
    assert stats["points"] == stats["total"]


def test_crash_with_big_chunks():
    """64 KiB chunks: copy-outs of 16 blocks, metadata packed into chunks."""
    g = Geometry(origin_size=10 * 65536 + 3000, store_blocks=24 * 16 + 64, chunk_size=65536,
                 journal_blocks=40)
    stats = crash_everywhere(g, make_workload(3, 70, g))
    assert stats["points"] == stats["total"]


def test_crash_in_a_full_store():
    """A store so small that writes meet StoreFull: a failed write changes nothing."""
    g = Geometry(store_blocks=24 + 8 + 20)
    stats = crash_everywhere(g, make_workload(4, 90, g))
    assert stats["full"] > 5, "the store never filled"


def test_crash_with_wide_sharemaps():
    """1024-bit sharemaps: leaves of ~27 chunks split and merge as the workload runs."""
    g = Geometry(origin_size=160 * 4096, store_blocks=520, max_snapshots=1024,
                 journal_blocks=64)
    stats = crash_everywhere(g, make_workload(9, 70, g), budget=3000)
    assert stats["points"] >= min(3000, stats["total"])


def _delete_workload():
    cs = 4096
    rng = random.Random(5)
    ops = [("create", "s1")]
    # s1 alone gets copy-outs of 1000 chunks, 8 per write (6 leaves); then a few
    # copy-outs shared with s2, writes of s2's own and of a clone of s2.
    for c in range(0, 1000, 8):
        ops.append(("owrite", c * cs, rng.randbytes(8 * cs), False))
    ops.append(("create", "s2"))
    ops.append(("clone", "k2", "s2"))
    ops.append(("swrite", "k2", 9 * cs, b"k2 data" * 100, True))
    for c in range(3, 1000, 97):
        ops.append(("owrite", c * cs, rng.randbytes(cs + 7), False))
    ops.append(("swrite", "s2", 5 * cs, b"s2 data" * 100, True))
    ops.append(("delete", "s1"))
    ops.append(("owrite", 3 * cs, b"after", True))
    return ops


def test_crash_during_a_multi_step_delete(monkeypatch):
    """A delete that frees more exceptions than one sweep step may look at: it takes
    several committed sweep steps, and a crash between them leaves the delete to be
    finished when the store is next opened."""
    from ddsnap.store import versioned

    monkeypatch.setattr(versioned, "SWEEP_BUDGET", 128)
    g = Geometry(origin_size=1000 * 4096, store_blocks=1600, journal_blocks=300)
    ops = _delete_workload()
    before = Run(g, ops[:-2])
    assert before.svc.store.exception_chunks() > 3 * versioned.SWEEP_BUDGET
    start = before.ops_done
    total = Run(g, ops).ops_done
    checked = []

    def observe(run, n):
        if n < start - 3:
            return
        for mi, mode in enumerate(MODES):
            store_img, origin_img = run.images(mode, seed=n * 7 + mi)
            recover_and_verify(run.t, g, store_img, origin_img,
                               f"crash at op {n} ({ops[run.t.step][0]}), mode {mode}",
                               exercise=(n % 10 == 0 and mode == "torn"))
        checked.append(n)

    run = Run(g, ops, observer=observe)
    assert checked == list(range(start - 3, total + 1))
    assert run.svc.store.exception_chunks() < 3 * versioned.SWEEP_BUDGET


def test_crash_during_recovery():
    """Power fails again while the store recovers from a crash (journal replay, the
    superblock rewrite, a resumed delete): recovering from that second crash must still
    give a store that meets the first crash's expectations."""
    g = Geometry()
    ops = make_workload(6, 60, g)
    total = Run(g, ops).ops_done
    firsts = set(crash_points(total, 40))
    stats = {"first": 0, "second": 0}

    def first_crash(run, n):
        if n not in firsts:
            return
        stats["first"] += 1
        store_img, origin_img = run.images("subset", seed=n)

        def second_crash(k, what, path):
            for mode in ("drop", "torn"):
                img2 = bytes(dev.crash_image(random.Random(k), mode))
                recover_and_verify(run.t, g, img2, origin_img,
                                   f"crash at op {n}, then at recovery op {k} ({mode})")
            stats["second"] += 1

        dev = RecordingDevice(len(store_img), store_img, "store",
                              CrashClock(observer=second_crash))
        MetadataService(SharedStore.open(dev), MemoryDevice(len(origin_img), origin_img))
        dev.clock.observer = None

    Run(g, ops, observer=first_crash)
    assert stats["first"] == len(firsts) and stats["second"] > 3 * len(firsts)


# ---------------------------------------------------------------------------------------
# Concurrent requests: a write must not rely on a mapping that is not durable yet

def _wait_done_or_blocked(thread, svc, timeout: float = 20.0) -> None:
    """Return once ``thread`` has finished or waits on the service's condition (for a
    commit to become durable); give up after ``timeout`` seconds."""
    import time

    deadline = time.monotonic() + timeout
    while thread.is_alive() and time.monotonic() < deadline:
        if getattr(svc.cond, "_waiters", None):
            return
        time.sleep(0.001)


def _race(first, second, trigger_path: str, g: Geometry | None = None, setup=None,
          reopen_with=None):
    """Run ``first(svc)`` and, when it issues its next flush on ``trigger_path`` (the
    commit of its metadata change begins, nothing of it durable yet), run
    ``second(svc)`` in another thread until that finishes or waits for the commit; then
    crash.  Returns the run's pieces, the crash images taken at that moment, and whether
    ``second`` had completed (been acknowledged) by then.  ``setup(svc, snap)`` runs
    before the race; then, with ``reopen_with``, the store is closed, reopened and
    passed to ``reopen_with(store)`` (a cold cache, tuned)."""
    import threading

    g = g or Geometry()
    clock = CrashClock()
    initial = random.Random(g.origin_size).randbytes(g.origin_size)
    origin = RecordingDevice(g.origin_size, initial, "origin", clock)
    store_dev = RecordingDevice(g.store_blocks * 4096, None, "store", clock)
    store = SharedStore.create(store_dev, origin_size=g.origin_size, chunk_size=g.chunk_size,
                               max_snapshots=g.max_snapshots, journal_blocks=g.journal_blocks)
    svc = MetadataService(store, origin)
    snap = svc.create_snapshot("s")
    if setup is not None:
        setup(svc, snap)
    if reopen_with is not None:
        svc.close()
        store = SharedStore.open(store_dev)
        reopen_with(store)
        svc = MetadataService(store, origin)
    state = {"armed": False}
    errors = []

    def run_second():
        try:
            second(svc, snap)
        except BaseException as e:  # reported by the test
            errors.append(e)

    def observe(n, what, path):
        if not state["armed"] or what != "flush" or path != trigger_path:
            return
        state["armed"] = False
        thread = threading.Thread(target=run_second)
        thread.start()
        _wait_done_or_blocked(thread, svc)
        state["thread"] = thread
        state["second_done"] = not thread.is_alive() and not errors
        state["images"] = [(bytes(store_dev.crash_image(random.Random(i), mode)),
                            bytes(origin.crash_image(random.Random(i), mode)))
                           for i, mode in enumerate(MODES)]

    clock.observer = observe
    state["armed"] = True
    first(svc, snap)
    clock.observer = None
    state["thread"].join()
    assert not errors, errors
    return g, initial, svc, snap, state["images"], state["second_done"]


def test_origin_write_waits_until_a_snapshot_unshare_is_durable():
    """A snapshot write unshares origin chunk 0 (copy + commit); meanwhile an origin
    write to chunk 0 finds no sharer.  It must still wait for that commit: if the origin
    changed first, a crash would leave the snapshot reading the new origin data."""
    g, initial, svc, snap, images, _ = _race(
        lambda svc, snap: Snapshot(svc, snap).write(10, b"A" * 10),
        lambda svc, snap: Origin(svc).write(100, b"B" * 100),
        trigger_path="store")
    t = Tracker(Vol.exact(initial))
    t.origin.issue(100, b"B" * 100)
    t.snaps["s"] = Vol.exact(initial)
    t.snaps["s"].issue(10, b"A" * 10)
    for mode, (store_img, origin_img) in zip(MODES, images):
        recover_and_verify(t, g, store_img, origin_img, f"origin write racing unshare ({mode})")
    assert Snapshot(svc, snap).read(0, 30) == initial[:10] + b"A" * 10 + initial[20:30]
    assert Origin(svc).read(100, 100) == b"B" * 100


def test_snapshot_write_waits_until_its_copy_out_is_durable():
    """An origin write copies chunk 0 out for the snapshot; meanwhile a FUA write to the
    snapshot finds that (not yet committed) exception unique to it.  The FUA write must
    not be acknowledged before the exception is durable, or a crash loses it."""
    g, initial, svc, snap, images, acked = _race(
        lambda svc, snap: Origin(svc).write(100, b"O" * 100),
        lambda svc, snap: Snapshot(svc, snap).write(10, b"S" * 10, fua=True),
        trigger_path="store")
    t = Tracker(Vol.exact(initial))
    t.origin.issue(100, b"O" * 100)
    t.snaps["s"] = Vol.exact(initial)
    t.snaps["s"].issue(10, b"S" * 10)
    if acked:  # acknowledged at the crash: it must have survived
        t.snaps["s"].acked(10, b"S" * 10)
        t.snaps["s"].flushed()
    for mode, (store_img, origin_img) in zip(MODES, images):
        recover_and_verify(t, g, store_img, origin_img, f"FUA write racing copy-out ({mode})")
    assert Snapshot(svc, snap).read(0, 30) == initial[:10] + b"S" * 10 + initial[20:30]


def test_a_commit_in_flight_is_not_undone_by_a_cache_reload():
    """While a commit is being written (its blocks no longer dirty, their home copies not
    yet written), another request that misses the tree cache must not reload an old home
    block and build on it: that would write the old leaf back and lose the commit."""
    cs = 4096
    g = Geometry(origin_size=160 * cs, store_blocks=520, max_snapshots=1024,
                 journal_blocks=64)

    def setup(svc, snap):
        for c in range(0, 100, 4):  # copy-outs for s: several leaves
            Origin(svc).write(c * cs, b"o" * 4 * cs)

    def tune(store):
        store.cache_blocks = 2  # tree blocks are evicted as soon as others are read

    def second(svc, snap):
        Snapshot(svc, snap).read(0, g.origin_size)  # walks (and evicts) every leaf
        Origin(svc).write(121 * cs, b"B" * 10)  # same leaf as chunk 120

    g, initial, svc, snap, images, _ = _race(
        lambda svc, snap: Snapshot(svc, snap).write(120 * cs, b"A" * 10),
        second, trigger_path="store", g=g, setup=setup, reopen_with=tune)
    svc.commit()
    assert Snapshot(svc, snap).read(120 * cs, 12) == b"A" * 10 + initial[120 * cs + 10: 120 * cs + 12]
    assert Snapshot(svc, snap).read(121 * cs, 10) == initial[121 * cs: 121 * cs + 10]
    assert svc.store.check() == []
    svc.close()
    store = SharedStore.open(svc.store.dev)
    svc2 = MetadataService(store, svc.origin)
    assert Snapshot(svc2, snap).read(120 * cs, 10) == b"A" * 10
    assert store.check() == []
