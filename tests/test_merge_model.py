"""Model-based test of the merge (seed 003): a hypothesis state machine against a plain
bytes model of every volume.

Besides origin and snapshot writes, reads, creates and deletes, the machine starts merges
(keep or not), runs merge steps, stops a running merge (``run_merge`` with a stop event)
and resumes it (``start_merge`` again), runs merge steps in a thread while the main thread
writes and reads the origin and reads the snapshots, closes and reopens the store, reopens
it uncleanly (the device bytes as they are, not closed) and crashes in the middle of a
merge step or of an origin write that merges its chunks (both devices' bytes taken at the
k-th write of that operation).  The model of a merge is the seed's: the origin reads as
the target from the moment the merge starts; no step changes what any volume reads.

After every step every volume reads exactly as the model (the target excepted while it
merges: it is not exported), the merge status matches, refused operations are refused
(MergeInProgress for a second merge, a snapshot create, a write to or delete of the
target), and ``check()`` finds nothing fatal; at teardown it finds nothing at all after a
clean reopen.  StoreFull may happen (the stores are small): a refused write leaves its
own range old or new byte by byte and changes nothing else; a refused merge step changes
nothing.
"""

from __future__ import annotations

import random
import threading

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, initialize, invariant, precondition,
                                 rule)

from conftest import examples
from ddsnap.errors import MergeInProgress, ReadOnlyVolume, StoreFull
from ddsnap.store.blockdev import MemoryDevice
from ddsnap.store.memory import MemoryStore
from ddsnap.store.service import MetadataService
from ddsnap.store.shared import SharedStore
from ddsnap.volume import Origin, Snapshot


@pytest.fixture(autouse=True)
def small_merge_steps(monkeypatch):
    """Merge steps of a few chunks (the default is 32 MiB), so that these small volumes
    take several steps, each of several runs, and the tests see half-merged states."""
    monkeypatch.setenv("DDSNAP_MERGE_STEP", str(4 * 4096))


class Crash(Exception):
    pass


class Tap:
    """Counts the writes of a group of devices; at write number ``at`` it captures every
    device's bytes (before that write lands): what a power cut there leaves."""

    def __init__(self):
        self.devices: list[TapDevice] = []
        self.count = 0
        self.at: int | None = None
        self.images: list[bytes] | None = None

    def arm(self, at: int) -> None:
        self.count, self.at, self.images = 0, at, None

    def before_write(self) -> None:
        if self.at is None:
            return
        self.count += 1
        if self.count == self.at:
            self.images = [bytes(d.data) for d in self.devices]
            self.at = None


class TapDevice(MemoryDevice):
    def __init__(self, size: int, data: bytes | None, tap: Tap):
        super().__init__(size, data)
        self.tap = tap
        tap.devices.append(self)

    def pwrite(self, data, offset: int) -> None:
        self.tap.before_write()
        super().pwrite(data, offset)


class MergeMachine(RuleBasedStateMachine):
    SHARED = True
    CHUNK = 4096
    ORIGIN = 18 * 4096 + 700  # the last chunk is partial
    STORE = 70 * 4096  # shared: device bytes (~40 data chunks); memory: data bytes
    JOURNAL = 24
    MAX_WRITE = 3 * 4096 + 17

    def __init__(self):
        super().__init__()
        seed = random.Random(self.ORIGIN).randbytes(self.ORIGIN)
        self.tap = Tap()
        self.origin_dev = TapDevice(self.ORIGIN, seed, self.tap)
        if self.SHARED:
            self.store_dev = TapDevice(self.STORE, None, self.tap)
            store = SharedStore.create(self.store_dev, origin_size=self.ORIGIN,
                                       origin_path="origin", chunk_size=self.CHUNK,
                                       max_snapshots=64, journal_blocks=self.JOURNAL)
        else:
            store = MemoryStore(self.ORIGIN, self.STORE, self.CHUNK, 64)
        self.svc = MetadataService(store, self.origin_dev)
        self.model: dict[str, bytearray] = {"origin": bytearray(seed)}
        self.infos = {}
        self.target: str | None = None  # the snapshot being merged (not in the model)
        self.keep = False
        self.counter = 0
        self.stats = {"merges": 0, "finished": 0, "crashes": 0, "full": 0}

    # -- helpers ---------------------------------------------------------------------------

    def volume(self, name):
        if name == "origin":
            return Origin(self.svc)
        return Snapshot(self.svc, self.infos[name])

    def _range(self, data):
        off = data.draw(st.integers(0, self.ORIGIN - 1), label="offset")
        n = data.draw(st.integers(1, min(self.MAX_WRITE, self.ORIGIN - off)), label="length")
        return off, n

    def _payload(self, n, seed):
        self.counter += 1
        return random.Random(seed * 7919 + self.counter).randbytes(n)

    def _accept_partial(self, name, off, payload):
        """A write that failed may have left each byte of its range old or new."""
        got = self.volume(name).read(off, len(payload))
        old = self.model[name][off: off + len(payload)]
        for i, b in enumerate(got):
            assert b in (old[i], payload[i]), f"{name} byte {off + i} is neither old nor new"
        self.model[name][off: off + len(payload)] = got

    def _write(self, name, off, payload, fua=False):
        try:
            self.volume(name).write(off, payload, fua=fua)
        except StoreFull:
            self.stats["full"] += 1
            self._accept_partial(name, off, payload)
            return
        self.model[name][off: off + len(payload)] = payload

    def _state(self) -> dict:
        return {"target": self.target, "keep": self.keep, "names": set(self.infos),
                "model": {k: bytearray(v) for k, v in self.model.items()}}

    def _finished(self, candidates=None):
        """The merge completed: the target goes, or stays equal to the new origin (with
        ``candidates``, to one of those origin contents: writes ran concurrently)."""
        assert self.svc.merge_status() is None
        name = self.target
        self.stats["finished"] += 1
        if self.keep:
            self.infos[name] = self.svc.snapshot(name)
            if candidates is None:
                self.model[name] = bytearray(self.model["origin"])
            else:
                got = Snapshot(self.svc, self.infos[name]).read(0, self.ORIGIN)
                assert got in candidates, "the kept snapshot is no origin seen meanwhile"
                self.model[name] = bytearray(got)
        else:
            assert name not in {s.name for s in self.svc.snapshots()}
            del self.infos[name]
        self.target = None

    def _step(self) -> bool:
        try:
            done = self.svc.merge_step()
        except StoreFull:
            self.stats["full"] += 1
            return False
        if done:
            self._finished()
        return done

    def _writable(self):
        return sorted(n for n in self.infos if n != self.target)

    def _reopen_from(self, store_img: bytes | None, origin_img: bytes | None):
        """A new service over a store opened from ``store_img`` (None: the device as is)
        and an origin holding ``origin_img`` (None: as is)."""
        self.tap = Tap()
        if origin_img is None:
            origin_img = bytes(self.origin_dev.data)
        self.origin_dev = TapDevice(self.ORIGIN, origin_img, self.tap)
        if store_img is None:
            store_img = bytes(self.store_dev.data)
        self.store_dev = TapDevice(self.STORE, store_img, self.tap)
        self.svc = MetadataService(SharedStore.open(self.store_dev), self.origin_dev)
        live = {s.name: s for s in self.svc.snapshots()}
        assert set(live) == set(self.infos), "snapshots changed across a reopen"
        self.infos = live
        st_ = self.svc.merge_status()
        if self.target is None:
            assert st_ is None, f"a merge appeared across a reopen: {st_}"
        else:
            assert st_ is not None, "the merge was forgotten across a reopen"
            assert (st_["snapshot"], st_["keep"]) == (self.target, self.keep)

    # -- rules: volumes ----------------------------------------------------------------------

    @initialize(seed=st.integers(0, 1 << 16), snaps=st.integers(1, 3))
    def history(self, seed, snaps):
        """Snapshots with copy-outs, shared exceptions and writes of their own, so that
        the first merge has something to do."""
        rng = random.Random(seed)
        for _ in range(snaps):
            self.create(read_only=False)
            for _ in range(rng.randrange(1, 4)):
                off = rng.randrange(self.ORIGIN)
                n = rng.randrange(1, min(self.MAX_WRITE, self.ORIGIN - off) + 1)
                self._write("origin", off, rng.randbytes(n))
            name = rng.choice(sorted(self.infos))
            off = rng.randrange(self.ORIGIN)
            self._write(name, off, rng.randbytes(min(3 * self.CHUNK, self.ORIGIN - off)))

    @rule(data=st.data(), seed=st.integers(0, 1 << 16), fua=st.booleans(),
          count=st.integers(1, 3))
    def write_origin(self, data, seed, fua, count):
        for _ in range(count):
            off, n = self._range(data)
            self._write("origin", off, self._payload(n, seed), fua)

    @precondition(lambda self: self.infos)
    @rule(data=st.data(), seed=st.integers(0, 1 << 16))
    def write_snapshot(self, data, seed):
        name = data.draw(st.sampled_from(sorted(self.infos)), label="snapshot")
        off, n = self._range(data)
        payload = self._payload(n, seed)
        if name == self.target:
            try:
                Snapshot(self.svc, self.infos[name]).write(off, payload)
            except (MergeInProgress, ReadOnlyVolume):
                return
            raise AssertionError("the merging snapshot accepted a write")
        if self.infos[name].read_only:
            try:
                self.volume(name).write(off, payload)
            except ReadOnlyVolume:
                return
            raise AssertionError("a read-only snapshot accepted a write")
        self._write(name, off, payload)

    @rule(data=st.data())
    def read(self, data):
        name = data.draw(st.sampled_from(["origin"] + self._writable()), label="volume")
        off = data.draw(st.integers(0, self.ORIGIN), label="offset")
        n = data.draw(st.integers(0, min(4 * self.CHUNK, self.ORIGIN - off)), label="length")
        assert self.volume(name).read(off, n) == self.model[name][off: off + n], name

    @precondition(lambda self: len(self.infos) < 6)
    @rule(read_only=st.sampled_from([False, False, True]))
    def create(self, read_only):
        self.counter += 1
        name = f"s{self.counter}"
        if self.target is not None:
            try:
                self.svc.create_snapshot(name)
            except MergeInProgress:
                return
            raise AssertionError("a snapshot was created during a merge")
        self.infos[name] = self.svc.create_snapshot(name, read_only=read_only)
        self.model[name] = bytearray(self.model["origin"])

    @precondition(lambda self: self.infos)
    @rule(data=st.data())
    def delete(self, data):
        name = data.draw(st.sampled_from(sorted(self.infos)), label="snapshot")
        if name == self.target:
            try:
                self.svc.delete_snapshot(name)
            except MergeInProgress:
                return
            raise AssertionError("the merging snapshot was deleted")
        self.svc.delete_snapshot(name)
        del self.infos[name]
        del self.model[name]

    # -- rules: the merge --------------------------------------------------------------------

    @precondition(lambda self: self.infos)
    @rule(data=st.data(), keep=st.booleans())
    def start_merge(self, data, keep):
        name = data.draw(st.sampled_from(sorted(self.infos)), label="snapshot")
        if self.target is not None:
            if name == self.target:  # a resume: nothing changes
                st_ = self.svc.start_merge(name, keep=keep)
                assert (st_["snapshot"], st_["keep"]) == (self.target, self.keep)
                return
            try:
                self.svc.start_merge(name, keep=keep)
            except MergeInProgress:
                return
            raise AssertionError("a second merge started")
        st_ = self.svc.start_merge(name, keep=keep)
        self.stats["merges"] += 1
        bit = self.infos[name].bit
        assert st_["chunks_total"] == len(self.svc.store.snapshot_exceptions_from(bit, 0, 1 << 20))
        self.target, self.keep = name, keep
        self.model["origin"] = self.model.pop(name)

    @precondition(lambda self: self.target is not None)
    @rule(n=st.integers(1, 4))
    def merge_steps(self, n):
        for _ in range(n):
            if self._step():
                return

    @precondition(lambda self: self.target is not None)
    @rule(k=st.integers(1, 3), resume=st.booleans())
    def run_and_stop(self, k, resume):
        stop = threading.Event()
        seen = []

        def on_step(st_):
            seen.append(st_)
            if len(seen) >= k:
                stop.set()
        try:
            done = self.svc.run_merge(stop, on_step)
        except StoreFull:
            self.stats["full"] += 1
            return
        if done:
            self._finished()
            return
        # The step in flight when ``stop`` is set still completes (steps are pipelined).
        assert k <= len(seen) <= k + 1
        assert self.svc.merge_status()["snapshot"] == self.target
        if resume:
            self.svc.start_merge(self.target, keep=self.keep)

    @precondition(lambda self: self.target is not None)
    @rule(data=st.data(), steps=st.integers(1, 6), seed=st.integers(0, 1 << 16))
    def merge_with_concurrent_io(self, data, steps, seed):
        """Merge steps in a thread while this thread writes and reads the origin and reads
        the snapshots: the views do not depend on how they interleave."""
        result = {}

        def merger():
            try:
                for _ in range(steps):
                    if self.svc.merge_step():
                        result["done"] = True
                        return
            except StoreFull:
                result["full"] = True
            except BaseException as e:  # reported below
                result["error"] = e

        # The origin between the writes: a kept target equals the one at its completion.
        origins = [bytes(self.model["origin"])]
        thread = threading.Thread(target=merger)
        thread.start()
        try:
            for _ in range(data.draw(st.integers(1, 4), label="ops")):
                off, n = self._range(data)
                self._write("origin", off, self._payload(n, seed))
                origins.append(bytes(self.model["origin"]))
                got = Origin(self.svc).read(0, self.ORIGIN)
                assert got == self.model["origin"], "origin during a concurrent merge"
                for name in self._writable():
                    got = self.volume(name).read(0, self.ORIGIN)
                    assert got == self.model[name], f"{name} during a concurrent merge"
        finally:
            thread.join()
        assert "error" not in result, result["error"]
        if result.get("done"):
            self._finished(origins)

    # -- rules: restarts and crashes ---------------------------------------------------------

    def reopen(self):
        self.svc.close()
        self._reopen_from(None, None)

    @precondition(lambda self: self.SHARED)
    @rule(clean=st.booleans())
    def restart(self, clean):
        """Close and open the store again, or (unclean) open the device bytes as they
        are, without closing or committing."""
        if clean:
            self.svc.close()
        self._reopen_from(None, None)

    @precondition(lambda self: self.SHARED and self.target is not None)
    @rule(at=st.integers(1, 12), what=st.sampled_from(["step", "origin-write"]),
          data=st.data(), seed=st.integers(0, 1 << 16))
    def crash_mid_merge(self, at, what, data, seed):
        """Power fails at the ``at``-th device write of a merge step (or of an origin
        write merging its chunks); the store is reopened from both devices' bytes then,
        and must be in the state before or after the operation (for the write: each byte
        of its range old or new)."""
        pre = self._state()
        self.tap.arm(at)
        write = None
        if what == "step":
            self._step()
        else:
            off, n = self._range(data)
            write = (off, self._payload(n, seed))
            self._write("origin", *write)
        images = self.tap.images
        self.tap.at = None
        if images is None:
            return  # the operation finished before its at-th write
        self.stats["crashes"] += 1
        post = self._state()
        origin_img, store_img = images
        self.tap = Tap()
        self.origin_dev = TapDevice(self.ORIGIN, origin_img, self.tap)
        self.store_dev = TapDevice(self.STORE, store_img, self.tap)
        self.svc = MetadataService(SharedStore.open(self.store_dev), self.origin_dev)
        # Still merging: the state before the operation (or, for a write, with the write
        # in flight); merge over: the state after it (a step that completed the merge).
        state = pre if self.svc.merge_status() is not None else post
        assert state["target"] is None or self.svc.merge_status() is not None
        self.target, self.keep = state["target"], state["keep"]
        self.model = state["model"]
        live = {s.name: s for s in self.svc.snapshots()}
        assert set(live) == state["names"], "snapshots differ from before and after the crash"
        self.infos = live
        if write is not None:
            self._accept_partial("origin", *write)

    # -- invariants --------------------------------------------------------------------------

    @invariant()
    def every_volume_matches_the_model(self):
        for name, want in self.model.items():
            got = self.volume(name).read(0, self.ORIGIN)
            assert got == want, f"{name} differs from the model"

    @invariant()
    def merge_status_and_store_are_consistent(self):
        st_ = self.svc.merge_status()
        if self.target is None:
            assert st_ is None
        else:
            bit = self.infos[self.target].bit
            left = self.svc.store.snapshot_exceptions_from(bit, 0, 1 << 20)
            assert st_["snapshot"] == self.target and st_["keep"] == self.keep
            assert all(c >= st_["cursor"] for c, _ in left), "a chunk below the cursor"
            assert st_["chunks_done"] <= st_["chunks_total"]
        fatal = [f for f in self.svc.store.check() if f.severity == "fatal"]
        assert not fatal, fatal

    def teardown(self):
        while self.target is not None:
            try:
                assert self.svc.run_merge() is True
            except StoreFull:
                # No room for the copy-outs the other snapshots need: delete the oldest
                # (and checkpoint, so that its space is reusable) until there is.
                victim = min(self._writable(), key=lambda n: self.infos[n].id)
                self.svc.delete_snapshot(victim)
                del self.infos[victim], self.model[victim]
                if self.SHARED:
                    self.reopen()
                continue
            self._finished()
            self.every_volume_matches_the_model()
        self.svc.commit()
        fatal = [f for f in self.svc.store.check() if f.severity == "fatal"]
        assert not fatal, fatal
        if self.SHARED:
            self.reopen()
            assert self.svc.store.check() == []
            self.every_volume_matches_the_model()


STATEFUL = settings(max_examples=examples(60), stateful_step_count=80, deadline=None)


class SharedMergeMachine(MergeMachine):
    SHARED = True


class MemoryMergeMachine(MergeMachine):
    SHARED = False
    STORE = 30 * 4096


TestSharedMergeModel = SharedMergeMachine.TestCase
TestSharedMergeModel.settings = STATEFUL
TestMemoryMergeModel = MemoryMergeMachine.TestCase
TestMemoryMergeModel.settings = STATEFUL
