"""The metadata service: ordering (invariant 3), group commit, read locks, barriers.

These drive the real service over real stores; the only extra part is :class:`LogDevice`,
a memory device that logs every write and flush in one shared list so the order of I/O
across the origin and the store can be asserted, and can hold a flush until released.
"""

from __future__ import annotations

import contextlib
import threading
import time

import pytest

from ddsnap.errors import ReadOnlyVolume, SnapshotBusy, StoreFull
from ddsnap.service.local import LocalService
from ddsnap.store.blockdev import MemoryDevice
from ddsnap.store.memory import MemoryStore
from ddsnap.store.shared import SharedStore
from ddsnap.volume import Origin, Snapshot

CS = 4096
OSZ = 1 << 20


class LogDevice(MemoryDevice):
    """A memory device appending ``(name, "write"|"flush", offset)`` to a shared log.

    ``gate``, if set, is an Event every flush waits for (to pile up committers).
    """

    def __init__(self, size: int, name: str, log: list, gate: threading.Event | None = None):
        super().__init__(size, path=name)
        self.name = name
        self.log = log
        self.gate = gate
        self.flush_waiting = threading.Semaphore(0)

    def pwrite(self, data, offset: int) -> None:
        super().pwrite(data, offset)
        self.log.append((self.name, "write", offset))

    def flush(self) -> None:
        if self.gate is not None and not self.gate.is_set():
            self.flush_waiting.release()
            self.gate.wait()
        super().flush()
        self.log.append((self.name, "flush", 0))


@contextlib.contextmanager
def lock_held_elsewhere(svc: LocalService):
    """Another thread holds the service's metadata lock for the duration."""
    held, release = threading.Event(), threading.Event()

    def hold():
        with svc.lock:
            held.set()
            release.wait()

    t = threading.Thread(target=hold)
    t.start()
    held.wait()
    try:
        yield
    finally:
        release.set()
        t.join()


def make(kind: str, log: list, gate=None):
    origin = LogDevice(OSZ, "origin", log)
    store: SharedStore | MemoryStore
    if kind == "shared":
        store = SharedStore.create(LogDevice(8 << 20, "store", log, gate), OSZ, "o", CS, 64)
    else:
        store = MemoryStore(OSZ, 8 << 20, CS, 64)
        store.cow = LogDevice(store.cow.size, "store", log, gate)
    return LocalService(store, origin), origin


def test_copyout_durable_before_commit_before_origin_write():
    """Invariant 3 on the shared store: data write, then (journal body, flush, commit
    block) before the commit point's flush, then the origin write."""
    log: list = []
    svc, origin = make("shared", log)
    Origin(svc, svc.data).write(0, b"a" * CS)
    svc.create_snapshot("s")
    del log[:]
    Origin(svc, svc.data).write(0, b"b" * CS)
    sb = svc.store.sb
    jlo, jhi = sb.journal_start * 4096, (sb.journal_start + sb.journal_blocks) * 4096
    origin_write = log.index(("origin", "write", 0))
    copy_out = log.index(("store", "write", log[0][2]))
    assert log[0][:2] == ("store", "write") and not jlo <= log[0][2] < jhi, log
    journal = [i for i, e in enumerate(log) if e[:2] == ("store", "write") and jlo <= e[2] < jhi]
    flushes = [i for i, e in enumerate(log) if e[:2] == ("store", "flush")]
    assert journal and journal[-1] < origin_write, log
    # copy-out data flushed before the commit block (the last journal write) ...
    assert any(copy_out < f < journal[-1] for f in flushes), log
    # ... and the journal flushed before the origin is overwritten
    assert any(journal[-1] < f < origin_write for f in flushes), log
    assert Snapshot(svc, svc.data, svc.snapshot("s")).read(0, CS) == b"a" * CS


def test_concurrent_copyouts_share_one_commit():
    """Group commit: writers piling up behind a commit in progress share the next one."""
    log: list = []
    gate = threading.Event()
    gate.set()
    svc, _ = make("shared", log, gate)
    svc.create_snapshot("s")
    gate.clear()
    vol = Origin(svc, svc.data)
    n = 12
    errors = []

    def writer(i):
        try:
            vol.write(i * CS, bytes([i + 1]) * CS)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(n)]
    threads[0].start()
    # Writer 0 is now inside a commit, held at the store's first flush.
    svc.store.cow.flush_waiting.acquire()
    for t in threads[1:]:
        t.start()
    # Let every other writer make its change and queue behind the commit in progress.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        # each writer's copy-out is a mapping waiting for a durable commit
        if svc.statistics().pending >= n:
            break
        time.sleep(0.01)
    flushes_before = sum(1 for e in log if e[1] == "flush" and e[0] == "store")
    gate.set()
    for t in threads:
        t.join()
    assert not errors
    flushes = sum(1 for e in log if e[1] == "flush" and e[0] == "store") - flushes_before
    # One commit for writer 0 and one for all the others: far fewer than n commits
    # (a commit costs at most two store flushes: data, then journal).
    assert flushes <= 4, log
    snap = Snapshot(svc, svc.data, svc.snapshot("s"))
    assert snap.read(0, n * CS) == bytes(n * CS)
    assert vol.read(0, n * CS) == b"".join(bytes([i + 1]) * CS for i in range(n))


@pytest.mark.parametrize("kind", ["shared", "memory"])
def test_snapshot_read_holds_back_origin_write(kind):
    """An origin write waits while a snapshot read of that origin chunk is in flight."""
    log: list = []
    svc, origin = make(kind, log)
    Origin(svc, svc.data).write(0, b"x" * CS)
    info = svc.create_snapshot("s")
    rmap = svc.map_snapshot_read(info, 0, 0)
    assert rmap.sources == [None]  # reads the origin, read-locked
    done = threading.Event()

    def write() -> None:
        Origin(svc, svc.data).write(0, b"y" * CS)
        done.set()

    t = threading.Thread(target=write)
    t.start()
    # The writer copies out, commits, then must wait for our read lock.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and svc.store.snapshot_exception(info.id, 0)[0] is None:
        time.sleep(0.01)
    assert svc.store.snapshot_exception(info.id, 0)[0] is not None
    # Our in-flight read still sees the old origin data: the write has not been issued.
    assert origin.pread(CS, 0) == b"x" * CS
    assert not done.is_set()
    svc.release_snapshot_read(rmap)
    t.join()
    assert origin.pread(CS, 0) == b"y" * CS
    assert Snapshot(svc, svc.data, info).read(0, CS) == b"x" * CS


@pytest.mark.parametrize("kind", ["shared", "memory"])
def test_nowait_read_declines_whenever_it_would_wait(kind):
    """The event-loop read answers only without waiting: not while another thread holds
    the metadata lock (an origin write could be mid copy-out), not during a merge, not
    for a deleted snapshot; otherwise it returns the same bytes as the locked read."""
    svc, _origin = make(kind, [])
    Origin(svc, svc.data).write(0, b"x" * (4 * CS))
    info = svc.create_snapshot("s")
    Origin(svc, svc.data).write(CS, b"y" * (2 * CS))
    snap = Snapshot(svc, svc.data, info)
    buf = bytearray(4 * CS)
    assert snap.read_into_nowait(0, memoryview(buf)) is True
    assert bytes(buf) == snap.read(0, 4 * CS) == b"x" * (4 * CS)
    with lock_held_elsewhere(svc):
        assert snap.read_into_nowait(0, memoryview(buf)) is False
    svc.create_snapshot("t")
    svc.start_merge("t")
    assert snap.read_into_nowait(0, memoryview(buf)) is False
    assert Origin(svc, svc.data).read_into_nowait(0, memoryview(buf)) is False
    svc.run_merge()
    assert Origin(svc, svc.data).read_into_nowait(0, memoryview(buf)) is True
    assert bytes(buf) == b"x" * CS + b"y" * (2 * CS) + b"x" * CS
    svc.delete_snapshot("s")
    assert snap.read_into_nowait(0, memoryview(buf)) is False


@pytest.mark.parametrize("kind", ["shared", "memory"])
def test_nowait_write_takes_only_chunks_made_unique_since_the_last_snapshot(kind):
    """The event-loop write (the in-process grant): only chunks an earlier write made
    unique, not across a snapshot, a merge or a held lock; and it writes what it takes."""
    svc, origin = make(kind, [])
    vol = Origin(svc, svc.data)
    assert vol.write_nowait(CS, b"a" * CS) is False  # never written: ask first
    vol.write(CS, b"a" * (2 * CS))
    assert vol.write_nowait(CS + 10, b"b" * 100) is True
    assert vol.read(CS, 2 * CS) == b"a" * 10 + b"b" * 100 + b"a" * (2 * CS - 110)
    assert vol.write_nowait(2 * CS, b"c" * (2 * CS)) is False  # chunk 3 is not unique yet
    assert svc.statistics().origin_writes == 0
    info = svc.create_snapshot("s")
    assert vol.write_nowait(CS, b"d" * CS) is False  # shared with s again
    vol.write(CS, b"d" * CS)  # copies out first
    assert Snapshot(svc, svc.data, info).read(CS, CS) == b"a" * 10 + b"b" * 100 + b"a" * (CS - 110)
    assert vol.write_nowait(CS, b"e" * CS) is True
    with lock_held_elsewhere(svc):
        assert vol.write_nowait(CS, b"f" * CS) is False  # never waits for the lock
    svc.start_merge("s")
    assert vol.write_nowait(CS, b"g" * CS) is False  # a merge start is a barrier too
    svc.run_merge()
    assert vol.read(CS, CS) == b"a" * 10 + b"b" * 100 + b"a" * (CS - 110)


@pytest.mark.parametrize("kind", ["shared", "memory"])
def test_full_store_enospc_keeps_snapshots(kind):
    svc, _ = make(kind, [])
    vol = Origin(svc, svc.data)
    vol.write(0, b"\1" * OSZ)
    svc.create_snapshot("a")
    # The store holds fewer chunks than the origin has only for the shared store's
    # metadata; fill it with snapshot writes until it is full.
    snap_b = svc.create_snapshot("b")
    written = 0
    with pytest.raises(StoreFull):
        for _round in range(100):
            for off in range(0, OSZ, CS):
                Snapshot(svc, svc.data, snap_b).write(off, b"\2" * CS)
                written += 1
            svc.create_snapshot(f"c{_round}")
            snap_b = svc.snapshot("b")
            vol.write(0, bytes([_round + 3]) * OSZ)
    assert Snapshot(svc, svc.data, svc.snapshot("a")).read(0, OSZ) == b"\1" * OSZ
    assert not [f for f in svc.store.check() if f.severity == "fatal"]


def test_read_only_snapshot_and_busy_delete():
    svc, _ = make("memory", [])
    info = svc.create_snapshot("ro", read_only=True)
    with pytest.raises(ReadOnlyVolume):
        Snapshot(svc, svc.data, info).write(0, b"z")
    vol = Snapshot(svc, svc.data, info)
    vol.open()
    with pytest.raises(SnapshotBusy):
        svc.delete_snapshot("ro")
    vol.close()
    svc.delete_snapshot("ro")
    assert svc.snapshots() == []


def test_huge_write_is_committed_in_transactions_that_fit_the_journal():
    """One write whose copy-outs change more metadata blocks than the journal holds."""
    origin = MemoryDevice(8 << 20)
    dev = MemoryDevice(24 << 20)
    # 4 KiB chunks, 1024-bit sharemaps (29 exceptions a leaf), a 64-block journal:
    # copying out 2048 chunks touches ~140 leaves, more than twice the journal.
    store = SharedStore.create(dev, 8 << 20, "o", 4096, 1024, journal_blocks=64)
    svc = LocalService(store, origin)
    vol = Origin(svc, svc.data)
    vol.write(0, b"\1" * (8 << 20))
    svc.create_snapshot("s")
    vol.write(0, b"\2" * (8 << 20))
    assert Snapshot(svc, svc.data, svc.snapshot("s")).read(0, 8 << 20) == b"\1" * (8 << 20)
    svc.close()
    reopened = SharedStore.open(MemoryDevice(dev.size, bytes(dev.data)))
    svc2 = LocalService(reopened, origin)
    assert Snapshot(svc2, svc2.data, svc2.snapshot("s")).read(0, 8 << 20) == b"\1" * (8 << 20)
    assert not reopened.check()


@pytest.mark.parametrize("kind", ["shared", "memory"])
def test_batched_origin_writes_with_snapshots_taken_meanwhile(kind):
    """Origin.write_many batches (as the NBD server sends them) while another thread
    keeps taking snapshots: no deadlock between a batch's writes in flight and a
    snapshot waiting for them; every snapshot reads as the origin did after some prefix
    of the writes (a snapshot may fall inside a batch: writes are not atomic together);
    the origin ends as the writes applied in order."""
    svc, origin = make(kind, [])
    vol = Origin(svc, svc.data)
    model = bytearray(OSZ)
    states = {bytes(model)}  # the origin after each write
    stop = threading.Event()
    taken = []
    errors = []

    def snapshots():
        try:
            i = 0
            while not stop.is_set() and i < 12:
                taken.append(svc.create_snapshot(f"s{i}"))
                i += 1
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=snapshots)
    t.start()
    rng = __import__("random").Random(3)
    try:
        for b in range(40):
            writes = []
            for _ in range(rng.randint(1, 6)):
                off = rng.randrange(OSZ - 3 * CS)
                writes.append((off, bytes([b + 1]) * rng.randint(1, 3 * CS), False))
            assert vol.write_many(writes) == [None] * len(writes)
            for off, data, _f in writes:
                model[off: off + len(data)] = data
                states.add(bytes(model))
    finally:
        stop.set()
        t.join(60)
    assert not t.is_alive() and not errors, errors
    assert vol.read(0, OSZ) == bytes(model)
    for info in taken:
        assert Snapshot(svc, svc.data, info).read(0, OSZ) in states, info.name


@pytest.mark.parametrize("kind", ["shared", "memory"])
def test_a_grown_origin_starts_with_zeroes_past_the_recorded_end(kind):
    """A shrink records the size before it truncates the origin file: a crash between
    leaves the old bytes past the recorded end.  A later grow must not show them."""
    cs = 65536
    origin = MemoryDevice(16 * cs, bytes([7]) * 16 * cs)
    store = (SharedStore.create(MemoryDevice(64 * cs), origin.size, chunk_size=cs)
             if kind == "shared" else MemoryStore(origin.size, 32 * cs, cs))
    svc = LocalService(store, origin)
    svc.resize_origin(8 * cs)
    assert origin.size == 8 * cs
    origin.resize(16 * cs)  # what the crash left: the tail not truncated yet ...
    origin.pwrite(bytes([9]) * 8 * cs, 8 * cs)  # ... holding the old bytes
    svc.resize_origin(12 * cs)
    vol = Origin(svc, svc.data)
    assert vol.size == 12 * cs
    assert vol.read(0, 8 * cs) == bytes([7]) * 8 * cs
    assert vol.read(8 * cs, 4 * cs) == bytes(4 * cs)
