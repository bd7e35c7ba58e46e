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
* no other snapshot exists; nothing reads as garbage;
* sizes (issue 9 item 4): every snapshot has the size it was taken with (a clone its
  parent's); the origin's recorded size is the one acknowledged last, or, with a resize
  in flight, the new one, and its content is the model's cut or extended with zeroes to
  that size; the origin device may be bigger than recorded (a shrink recorded, the
  truncate lost), never smaller; the store is its acknowledged size or, with a store
  resize in flight, the new one.

Afterwards the recovered store must keep working: new writes read back and a clean close
and reopen checks clean.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

import pytest

from ddsnap.errors import ShrinkRefused, StoreFull
from ddsnap.service.local import LocalService
from ddsnap.store.blockdev import MemoryDevice
from ddsnap.store.model import SnapshotInfo
from ddsnap.store.shared import SharedStore
from ddsnap.testing.crash import CrashClock, CrashNow, RecordingDevice
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
    pending: list[tuple[int, bytes]] = field(default_factory=list)

    @classmethod
    def exact(cls, content: bytes | bytearray) -> Vol:
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

    @property
    def size(self) -> int:
        return len(self.current)

    def resized(self, size: int) -> Vol:
        """The volume after a resize to ``size`` bytes: cut off, or extended with zeroes;
        writes issued before it may still land or not below the new end."""
        def fit(b: bytearray) -> bytearray:
            return bytearray(b[:size]) + bytearray(max(0, size - len(b)))
        return Vol(fit(self.durable), fit(self.current),
                   [(o, d[: size - o]) for o, d in self.pending if o < size])

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
            for a, b in pairwise(cuts):
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
    snaps: dict[str, Vol] = field(default_factory=dict)  # acknowledged creations
    creating: tuple[str, Vol] | None = None  # (name, Vol) of a creation in flight
    deleting: str | None = None  # name of a delete in flight
    step: int = -1  # index of the workload op in flight at the crash (-1: none)
    #: the origin as it is after an origin resize in flight (may or may not have happened)
    resizing: Vol | None = None
    store_size: int | None = None  # bytes of the store as acknowledged (None: unchecked)
    store_next: int | None = None  # the new size of a store resize in flight


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


def make_workload(seed: int, n: int, g: Geometry, resizes: bool = False) -> list[tuple]:
    """A deterministic list of ``n`` operations: origin and snapshot writes (some FUA),
    flushes, snapshot creates (of the origin and of snapshots) and deletes (parents
    too), and a clean close-and-reopen.

    With ``resizes``, also origin resizes (``("oresize", bytes)``: grows, shrinks no
    snapshot is bigger than, and shrinks that must be refused) and store resizes
    (``("sresize", chunks)``, a change relative to the store's size then: grows, and
    shrinks that the store refuses or not); every range then lies within its volume's
    size at that point (the workload knows every size: they do not depend on the
    store).  Without, the workloads are those of before resizes existed."""
    rng = random.Random(seed)
    ops: list[tuple] = []
    live: list[str] = []
    made = 0
    cs = g.chunk_size
    sizes = {"origin": g.origin_size}
    least = 4 * cs  # the origin never shrinks below (room for the exercise's writes)

    def rand_range(name="origin"):
        size = sizes[name]
        off = rng.randrange(size)
        return off, rng.randrange(1, min(int(2.5 * cs), size - off) + 1)

    for _ in range(n):
        if resizes and rng.random() < 0.08:
            osize = sizes["origin"]
            biggest = max((sizes[x] for x in live), default=0)
            r = rng.random()
            if r < 0.3:
                # -1000: down to the smallest store, refused unless it is nearly empty
                ops.append(("sresize", rng.choice([-1000, -40, -12, -3, -1, 2, 5, 12])))
            elif r < 0.6 or osize // 512 <= max(biggest, least) // 512 + 1:
                new = (osize // 512 + rng.randrange(1, 3 * cs // 512)) * 512
                ops.append(("oresize", new))
                sizes["origin"] = new
            elif r < 0.8 or biggest // 512 <= least // 512:
                new = 512 * rng.randrange(-(-max(biggest, least) // 512), osize // 512)
                ops.append(("oresize", new))
                sizes["origin"] = new
            else:  # refused: a snapshot is bigger
                ops.append(("oresize", 512 * rng.randrange(least // 512, biggest // 512)))
            continue
        r = rng.random()
        if not live or (r < 0.12 and len(live) < 5):
            made += 1
            live.append(f"s{made}")
            ops.append(("create", live[-1]))
            sizes[live[-1]] = sizes["origin"]
        elif r < 0.18 and len(live) < 6:
            made += 1
            parent = rng.choice(live)
            live.append(f"c{made}")
            ops.append(("clone", live[-1], parent))
            sizes[live[-1]] = sizes[parent]
        elif r < 0.45:
            off, ln = rand_range()
            ops.append(("owrite", off, rng.randbytes(ln), rng.random() < 0.2))
        elif r < 0.68:
            if resizes:
                name = rng.choice(live)
                off, ln = rand_range(name)
            else:  # the draws in the order of the workloads before resizes
                off, ln = rand_range()
                name = rng.choice(live)
            ops.append(("swrite", name, off, rng.randbytes(ln), rng.random() < 0.2))
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
        self.svc = LocalService(store, self.origin)
        self.base = self.clock.ops
        self.t = Tracker(Vol.exact(initial), store_size=store.sb.blocks * 4096)
        self.infos: dict[str, SnapshotInfo] = {}
        self.full = 0
        self.resizes = {"origin": 0, "origin refused": 0, "store": 0, "store refused": 0}
        if crash_at is not None:
            self.clock.crash_after = self.base + crash_at
        self.next_op = ("", "")  # (kind, device) of the operation a crash now stops
        if observer is not None:
            def observe(n, what, path):
                self.next_op = (what, path)
                observer(self, n - self.base)
            self.clock.observer = observe
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
            self._write(t.origin, Origin(self.svc, self.svc.data), off, data, fua)
        elif kind == "swrite":
            _, name, off, data, fua = op
            vol = Snapshot(self.svc, self.svc.data, self.infos[name])
            self._write(t.snaps[name], vol, off, data, fua)
        elif kind == "oflush":
            Origin(self.svc, self.svc.data).flush()
            t.origin.flushed()
        elif kind == "sflush":
            Snapshot(self.svc, self.svc.data, self.infos[op[1]]).flush()
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
            self.svc = LocalService(SharedStore.open(self.store_dev), self.origin)
            self.infos = {s.name: s for s in self.svc.snapshots()}
        elif kind == "oresize":
            new = op[1]
            old = t.origin.size
            # Refused exactly when a snapshot is bigger (a deleted parent kept for its
            # clones has their size).
            refused = new < old and any(v.size > new for v in t.snaps.values())
            t.resizing = t.origin.resized(new)
            try:
                self.svc.resize_origin(new)
            except ShrinkRefused:
                assert refused, f"origin shrink {old} -> {new} refused"
                self.resizes["origin refused"] += 1
            else:
                assert not refused, f"origin shrink {old} -> {new} past a snapshot accepted"
                t.origin = t.resizing
                self.resizes["origin"] += 1
            t.resizing = None
            assert self.svc.store.origin_size == t.origin.size
        elif kind == "sresize":
            store = self.svc.store
            assert isinstance(store, SharedStore)  # every Run is on a SharedStore
            bpc = store.bpc
            now = store.sb.blocks // bpc
            least = -(-(store.data_start + 2 + bpc) // bpc)
            new = max(least, now + op[1]) * self.g.chunk_size
            t.store_next = new
            try:
                self.svc.resize_store(new)
            except (ShrinkRefused, StoreFull):
                # Nothing past the new end may be cut / no free run for the new bitmap.
                self.resizes["store refused"] += 1
            else:
                t.store_size = new
                self.resizes["store"] += 1
            t.store_next = None
            assert store.sb.blocks * 4096 == t.store_size
        else:
            raise ValueError(kind)

    def images(self, mode: str, seed: int) -> tuple[bytes, bytes]:
        """(store image, origin image) a crash now could leave, for ``mode`` and ``seed``."""
        rng = random.Random(seed)
        return (bytes(self.store_dev.crash_image(rng, mode)),
                bytes(self.origin.crash_image(rng, mode)))


# ---------------------------------------------------------------------------------------
# Recovery and verification

def _image_device(img: bytes | bytearray) -> MemoryDevice:
    """A MemoryDevice holding a copy of ``img`` (a crash image: bytes, or the bytearray
    ``crash_image`` gives, used as it is to spare a copy of a big image)."""
    return MemoryDevice(len(img), img)


def recover_and_verify(t: Tracker, g: Geometry, store_img: bytes | bytearray,
                       origin_img: bytes | bytearray, what: str,
                       exercise: bool = False) -> SharedStore:
    """Open crashed images, check them, and compare every volume with the tracker;
    return the recovered store."""
    store = SharedStore.open(_image_device(store_img))
    origin = _image_device(origin_img)
    svc = LocalService(store, origin)  # resumes an interrupted delete
    findings = store.check()
    assert not findings, f"{what}: {findings}"
    present = {s.name: s for s in svc.snapshots()}
    must = set(t.snaps) - {t.deleting}
    may = set(t.snaps) | ({t.creating[0]} if t.creating else set())
    assert must <= set(present), f"{what}: lost snapshots {must - set(present)}"
    assert set(present) <= may, f"{what}: unexpected snapshots {set(present) - may}"
    if t.store_size is not None:
        stores = {t.store_size} | ({t.store_next} if t.store_next else set())
        assert store.sb.blocks * 4096 in stores, \
            f"{what}: the store is {store.sb.blocks} blocks, not one of {sorted(stores)} bytes"
    size = store.origin_size
    assert len(origin_img) >= size, \
        f"{what}: the origin device ({len(origin_img)} bytes) is smaller than recorded ({size})"
    vol = next((v for v in (t.origin, t.resizing) if v is not None and v.size == size), None)
    assert vol is not None, (f"{what}: the origin is recorded as {size} bytes, not "
                             f"{t.origin.size}" + (f" or {t.resizing.size}" if t.resizing else ""))
    vol.assert_allowed(Origin(svc, svc.data).read(0, size), f"{what}: origin")
    for name, info in present.items():
        if name in t.snaps:
            vol = t.snaps[name]
        else:  # present <= may: the one snapshot not in t.snaps is the creation in flight
            assert t.creating is not None
            vol = t.creating[1]
        assert info.size == vol.size, f"{what}: snapshot {name} is {info.size} bytes, " \
                                      f"not {vol.size}"
        got = Snapshot(svc, svc.data, info).read(0, vol.size)
        vol.assert_allowed(got, f"{what}: snapshot {name}")
    if exercise:
        exercise_after_recovery(svc, store, origin, present, g, what)
    return store


def exercise_after_recovery(svc, store, origin, present, g, what):
    """The recovered store takes new writes, snapshots and deletes, and closes cleanly;
    the origin grows and its grown part reads as zeroes, even where a crash in a shrink
    left old data past the recorded end."""
    rng = random.Random(1)
    model = {"origin": bytearray(Origin(svc, svc.data).read(0, store.origin_size))}
    for name, info in present.items():
        model[name] = bytearray(Snapshot(svc, svc.data, info).read(0, info.size))
    info = svc.create_snapshot("after-crash")
    present = dict(present, **{"after-crash": info})
    model["after-crash"] = bytearray(model["origin"])
    grow = (store.origin_size // 512 + 5) * 512
    svc.resize_origin(grow)
    model["origin"].extend(bytes(grow - len(model["origin"])))
    assert Origin(svc, svc.data).read(0, grow) == model["origin"], f"{what}: the grown origin"
    for name in list(model):
        vol = Origin(svc, svc.data) if name == "origin" else Snapshot(svc, svc.data, present[name])
        n = min(5000, len(model[name]))
        off = rng.randrange(len(model[name]) - n + 1)
        data = rng.randbytes(n)
        try:
            vol.write(off, data)
        except StoreFull:
            continue
        model[name][off: off + n] = data
    if len(present) > 1:
        victim = sorted(present)[0]
        svc.delete_snapshot(victim)
        del model[victim], present[victim]
    svc.close()
    store2 = SharedStore.open(store.dev)
    svc2 = LocalService(store2, origin)
    assert store2.check() == [], what
    for name, want in model.items():
        vol = (Origin(svc2, svc2.data) if name == "origin"
               else Snapshot(svc2, svc2.data, present[name]))
        assert vol.read(0, len(want)) == want, f"{what}: {name} after recovery and new writes"


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
    stats: dict[str, Any] = {"points": 0, "total": total, "in_flight": set(), "images": 0}

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
    assert Origin(run.svc, run.svc.data).read(0, size) == t.origin.current
    assert set(t.snaps) == {s.name for s in run.svc.snapshots()}
    for name, vol in t.snaps.items():
        assert Snapshot(run.svc, run.svc.data, run.infos[name]).read(0, size) == vol.current
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
        for mode, (store_img, origin_img) in zip(MODES, images, strict=True):
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


def test_workload_with_resizes_without_crash_matches_the_model():
    """The harness with resizes: an uncrashed run reads back exactly as tracked, with
    every size as tracked; the workload grows and shrinks both, and has shrinks refused."""
    g = Geometry()
    ops = make_workload(18, 90, g, resizes=True)
    run = Run(g, ops)
    assert not run.crashed
    t = run.t
    assert run.svc.store.origin_size == t.origin.size != g.origin_size
    assert Origin(run.svc, run.svc.data).read(0, t.origin.size) == t.origin.current
    assert set(t.snaps) == {s.name for s in run.svc.snapshots()}
    for name, vol in t.snaps.items():
        assert run.infos[name].size == vol.size
        assert Snapshot(run.svc, run.svc.data, run.infos[name]).read(0, vol.size) == vol.current
    assert {"oresize", "sresize"} <= {op[0] for op in ops}
    assert all(run.resizes.values()), run.resizes
    assert len({v.size for v in t.snaps.values()} | {t.origin.size}) > 1, "one size only"
    recover_and_verify(t, g, *run.images("all", 0), "no crash", exercise=True)


@pytest.mark.parametrize("seed", [15, 18, 19])
def test_crash_at_every_point_with_resizes(seed):
    """Workloads with origin and store resizes among the rest: a crash at any write,
    flush or resize recovers to the sizes and contents the model allows."""
    g = Geometry()
    ops = make_workload(seed, 90, g, resizes=True)
    stats = crash_everywhere(g, ops, exercise_every=10)
    assert stats["points"] == stats["total"], "every crash point must be tried"
    assert {"oresize", "sresize"} <= stats["in_flight"]


def _resize_points(g: Geometry, ops: list[tuple], kinds: tuple, modes=MODES,
                   then=None, select=None) -> tuple[list[tuple], Run]:
    """Crash at every device operation of the workload steps of ``kinds`` (those
    ``select(run)`` is true for, if given) and at the one after each, recover from each
    mode's images and verify (``recover_and_verify``); ``then(run, store_img,
    origin_img, what)`` may look further.  Returns, per point and mode,
    ``(point, mode, step, recovered store blocks, recovered origin size)``, and the run."""
    out: list[tuple[int, str, int, int, int]] = []

    def observe(run: Run, n: int) -> None:
        step = run.t.step
        outside = step < 0 or ops[step][0] not in kinds or (select and not select(run))
        if outside and not (out and out[-1][0] == n - 1):
            return
        for mi, mode in enumerate(modes):
            rng = random.Random(n * 31 + mi)  # as run.images, without copying to bytes
            store_img = run.store_dev.crash_image(rng, mode)
            origin_img = run.origin.crash_image(rng, mode)
            what = (f"crash at op {n} ({run.next_op[0]} of {run.next_op[1]}, step {step}: "
                    f"{ops[step][0] if step >= 0 else '-'}), {mode}")
            store = recover_and_verify(run.t, g, store_img, origin_img, what)
            out.append((n, mode, step, store.sb.blocks, store.origin_size))
            if then is not None:
                then(run, store_img, origin_img, what)

    run = Run(g, ops, observer=observe)
    assert not run.crashed
    return out, run


def _store_resize_workload(g: Geometry, grow: int, shrink: int) -> list[tuple]:
    rng = random.Random(3)
    cs = g.chunk_size
    ops: list[tuple] = [("create", "s1")]
    for c in range(0, 12, 3):
        ops.append(("owrite", c * cs + 100, rng.randbytes(2 * cs), False))
    ops += [("clone", "c1", "s1"), ("swrite", "c1", 5 * cs, rng.randbytes(cs + 9), False),
            ("owrite", 20 * cs, rng.randbytes(cs), False),  # not flushed: pending writes
            ("sresize", grow),
            ("owrite", 30 * cs, rng.randbytes(3 * cs), True),
            ("sresize", shrink),
            ("swrite", "s1", 33 * cs, rng.randbytes(cs), True),
            ("sresize", -1000)]  # refused: data lives near the end... or not; either way
    return ops


def _monotone(points, kind_ops, ops) -> None:
    """In "drop" images (only what was flushed), the recovered store size of consecutive
    crash points within one resize goes from the old size to the new one once, never
    back: the switch is one durable step."""
    by_step: dict[int, list[int]] = {}
    for _n, mode, step, blocks, _origin in points:
        if mode == "drop" and step >= 0 and ops[step][0] in kind_ops:
            by_step.setdefault(step, []).append(blocks)
    for step, sizes in by_step.items():
        changes = sum(1 for a, b in pairwise(sizes) if a != b)
        assert changes <= 1, f"step {step} {ops[step]}: store sizes {sizes}"


def test_crash_in_a_store_grow_and_shrink():
    """A store grow (the file extended, the new bitmap written to a free run, flushed,
    both superblock slots switched) and a shrink back (the switch, then the truncate),
    with a crash at every operation of each, in every mode: the store recovers with no
    finding at all, every volume as the model allows, and the store size the old or the
    new one; in the images of flushed data only the size switches once per resize."""
    g = Geometry()
    ops = _store_resize_workload(g, grow=40, shrink=-40)
    full = Run(g, ops)
    assert full.resizes == {"origin": 0, "origin refused": 0, "store": 2, "store refused": 1}
    points, _run = _resize_points(g, ops, ("sresize",))
    grow_step, shrink_step = [i for i, op in enumerate(ops) if op[0] == "sresize"][:2]
    for step, old, new in ((grow_step, 170, 210), (shrink_step, 210, 170)):
        seen = {blocks for _n, _m, st_, blocks, _o in points if st_ == step}
        assert seen == {old, new}, f"{ops[step]}: recovered sizes {seen}"
    _monotone(points, ("sresize",), ops)


def test_crash_in_a_store_grow_that_needs_a_second_bitmap_block():
    """A store just below what one bitmap block covers grows past it: the new bitmap is
    two blocks in a free run of the data area, so a crash can fall between them.  Every
    crash point of the grow recovers to the old or the new size, checks clean, and every
    volume reads as the model allows."""
    from ddsnap.store.format import BITS_PER_BITMAP

    old = BITS_PER_BITMAP - 4
    g = Geometry(store_blocks=old)
    ops = _store_resize_workload(g, grow=12, shrink=-12)[:-3]  # the grow, then a write
    kinds = []

    def from_the_grow(run):
        # Points from the device's grow on (the commit and checkpoint before it are
        # ordinary ones, covered by the other crash tests): 130 MiB images are slow.
        if run.store_dev.size != old * 4096 or run.next_op == ("resize", "store"):
            kinds.append(run.next_op)
            return True
        return False

    points, run = _resize_points(g, ops, ("sresize",), modes=("drop", "torn"),
                                 select=from_the_grow)
    assert kinds.count(("write", "store")) >= 4, kinds  # two bitmap blocks, two slots
    step = next(i for i, op in enumerate(ops) if op[0] == "sresize")
    seen = {blocks for _n, _m, st_, blocks, _o in points if st_ == step}
    assert seen == {old, old + 12}, seen
    store = run.svc.store
    assert isinstance(store, SharedStore)  # every Run is on a SharedStore
    sb = store.sb
    assert sb.bitmap_blocks == 2 and sb.bitmap_start >= store.data_start
    _monotone(points, ("sresize",), ops)


def test_origin_grow_after_a_crash_in_a_shrink_reads_zeroes():
    """A crash in an origin shrink after the new size is recorded, before the truncate is
    durable, leaves the origin device bigger than recorded, with the old data past the
    recorded end: it is served at the recorded size.  A later grow must read zeroes in
    the grown part (as every grow does), not that old data coming back."""
    g = Geometry()
    cs = g.chunk_size
    ops = [("owrite", 30 * cs, b"old data" * 1000, True), ("oresize", 20 * cs)]
    stale = []

    def grow_again(run, store_img, origin_img, what):
        store = SharedStore.open(MemoryDevice(len(store_img), store_img))
        svc = LocalService(store, MemoryDevice(len(origin_img), origin_img))
        size = store.origin_size
        if len(origin_img) > size and size == 20 * cs:
            stale.append(what)
        big = (g.origin_size // 512 + 1) * 512 + 4 * cs
        svc.resize_origin(big)
        got = Origin(svc, svc.data).read(size, big - size)
        assert got == bytes(big - size), f"{what}: the grown part holds old data " \
            f"(recorded {size}, device was {len(origin_img)} bytes)"

    _resize_points(g, ops, ("oresize",), then=grow_again)
    assert stale, "no crash point left the origin bigger than recorded"


def _delete_workload():
    cs = 4096
    rng = random.Random(5)
    ops: list[tuple] = [("create", "s1")]
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
        LocalService(SharedStore.open(dev), MemoryDevice(len(origin_img), origin_img))
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
    svc = LocalService(store, origin)
    snap = svc.create_snapshot("s")
    if setup is not None:
        setup(svc, snap)
    if reopen_with is not None:
        svc.close()
        store = SharedStore.open(store_dev)
        reopen_with(store)
        svc = LocalService(store, origin)
    state: dict[str, Any] = {"armed": False}
    errors: list[BaseException] = []

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
        lambda svc, snap: Snapshot(svc, svc.data, snap).write(10, b"A" * 10),
        lambda svc, snap: Origin(svc, svc.data).write(100, b"B" * 100),
        trigger_path="store")
    t = Tracker(Vol.exact(initial))
    t.origin.issue(100, b"B" * 100)
    t.snaps["s"] = Vol.exact(initial)
    t.snaps["s"].issue(10, b"A" * 10)
    for mode, (store_img, origin_img) in zip(MODES, images, strict=True):
        recover_and_verify(t, g, store_img, origin_img, f"origin write racing unshare ({mode})")
    assert Snapshot(svc, svc.data, snap).read(0, 30) == initial[:10] + b"A" * 10 + initial[20:30]
    assert Origin(svc, svc.data).read(100, 100) == b"B" * 100


def test_snapshot_write_waits_until_its_copy_out_is_durable():
    """An origin write copies chunk 0 out for the snapshot; meanwhile a FUA write to the
    snapshot finds that (not yet committed) exception unique to it.  The FUA write must
    not be acknowledged before the exception is durable, or a crash loses it."""
    g, initial, svc, snap, images, acked = _race(
        lambda svc, snap: Origin(svc, svc.data).write(100, b"O" * 100),
        lambda svc, snap: Snapshot(svc, svc.data, snap).write(10, b"S" * 10, fua=True),
        trigger_path="store")
    t = Tracker(Vol.exact(initial))
    t.origin.issue(100, b"O" * 100)
    t.snaps["s"] = Vol.exact(initial)
    t.snaps["s"].issue(10, b"S" * 10)
    if acked:  # acknowledged at the crash: it must have survived
        t.snaps["s"].acked(10, b"S" * 10)
        t.snaps["s"].flushed()
    for mode, (store_img, origin_img) in zip(MODES, images, strict=True):
        recover_and_verify(t, g, store_img, origin_img, f"FUA write racing copy-out ({mode})")
    assert Snapshot(svc, svc.data, snap).read(0, 30) == initial[:10] + b"S" * 10 + initial[20:30]


def test_a_commit_in_flight_is_not_undone_by_a_cache_reload():
    """While a commit is being written (its blocks no longer dirty, their home copies not
    yet written), another request that misses the tree cache must not reload an old home
    block and build on it: that would write the old leaf back and lose the commit."""
    cs = 4096
    g = Geometry(origin_size=160 * cs, store_blocks=520, max_snapshots=1024,
                 journal_blocks=64)

    def setup(svc, snap):
        for c in range(0, 100, 4):  # copy-outs for s: several leaves
            Origin(svc, svc.data).write(c * cs, b"o" * 4 * cs)

    def tune(store):
        store.cache_blocks = 2  # tree blocks are evicted as soon as others are read

    def second(svc, snap):
        Snapshot(svc, svc.data, snap).read(0, g.origin_size)  # walks (and evicts) every leaf
        Origin(svc, svc.data).write(121 * cs, b"B" * 10)  # same leaf as chunk 120

    g, initial, svc, snap, images, _ = _race(
        lambda svc, snap: Snapshot(svc, svc.data, snap).write(120 * cs, b"A" * 10),
        second, trigger_path="store", g=g, setup=setup, reopen_with=tune)
    svc.commit()
    want = b"A" * 10 + initial[120 * cs + 10: 120 * cs + 12]
    assert Snapshot(svc, svc.data, snap).read(120 * cs, 12) == want
    assert Snapshot(svc, svc.data, snap).read(121 * cs, 10) == initial[121 * cs: 121 * cs + 10]
    assert svc.store.check() == []
    svc.close()
    store = SharedStore.open(svc.store.dev)
    svc2 = LocalService(store, svc.origin)
    assert Snapshot(svc2, svc2.data, snap).read(120 * cs, 10) == b"A" * 10
    assert store.check() == []
