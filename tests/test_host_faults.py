"""Host I/O errors are survivable (issue 8 item 5).

ENOSPC or EIO from the host on the snapshot store or the origin fails the request it
hits, gives back every chunk that request allocated, and leaves the service serving:
once the fault is gone the same operation succeeds, with no restart.  A failed commit
leaves the store untrusted in memory: the service says so (``failure``) and reopens it
from its journal by itself.

The service-level tests drive the real :class:`LocalService` over a real
:class:`SharedStore`; the only extra part is :class:`faultdev.FaultDevice`, which wraps
the memory devices holding the store and the origin and fails one chosen read, write or
flush the way the host does.  Each operation is first run cleanly to count its reads,
writes and flushes on each device, then once per such I/O with that one failing.

The last tests run ``ddsnap serve`` on a store file in a tiny tmpfs that fills up, with
real NBD clients and the real CLI.
"""

from __future__ import annotations

import errno
import os
import random
import subprocess
import threading
import time
from pathlib import Path

import pytest

from ddsnap import admin
from ddsnap import errors as E
from ddsnap.errors import DdsnapError, HostFull, HostIOError, ServiceFailed
from ddsnap.nbd import wire as P
from ddsnap.service.local import LocalService
from ddsnap.store.blockdev import MemoryDevice
from ddsnap.store.shared import SharedStore
from ddsnap.volume import Origin, Snapshot
from faultdev import KINDS, FaultDevice
from nbd_helpers import RawClient
from served import Served, fails, make_origin, ok, ok_json, tool, wait_until

CS = 4096
OSZ = 64 * CS
SSZ = 4 << 20
ERRNOS = (errno.ENOSPC, errno.EIO)


def _data(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


class World:
    """An origin and a shared store on fault devices, a service over them, and what
    every volume must read (the model the faults are checked against).

    Built the same way every time: snapshot ``s0``; origin chunks 0..7 written;
    snapshot ``s1``; chunks 4..11 written; a write to ``s1`` at chunk 20.  So ``s0``
    has exceptions of its own (0..7) and shared with ``s1`` (8..11), ``s1`` has some of
    its own (4..7, 20), and origin chunks 0..3 are still shared with ``s1``.
    """

    def __init__(self, cold_cache: bool = True):
        self.origin_mem = MemoryDevice(OSZ, _data(1, OSZ), path="origin.img")
        self.store_mem = MemoryDevice(SSZ, path="store.img")
        self.origin = FaultDevice(self.origin_mem)
        self.dev = FaultDevice(self.store_mem)
        store = SharedStore.create(self.dev, OSZ, "origin.img", CS, 64)
        self.svc = LocalService(store, self.origin,
                                   reopen=lambda: SharedStore.open(self.dev))
        self.model = bytearray(self.origin_mem.data)
        self.snaps: dict[str, bytearray] = {}
        self.snap("s0")
        self.write(0, _data(2, 8 * CS))
        self.snap("s1")
        self.write(4 * CS, _data(3, 8 * CS))
        self.snap_write("s1", 20 * CS + 100, _data(4, 300))
        self.svc.commit()
        if cold_cache:
            # Tree blocks come from the device again, so reads of metadata can fail too.
            serving = self.svc.store
            assert isinstance(serving, SharedStore)  # World's stores are shared ones
            serving.evict_clean()

    # -- changing it, keeping the model -----------------------------------------------

    def snap(self, name: str) -> None:
        self.svc.create_snapshot(name)
        self.snaps[name] = bytearray(self.model)

    def write(self, offset: int, data: bytes) -> None:
        Origin(self.svc, self.svc.data).write(offset, data)
        self.model[offset: offset + len(data)] = data

    def snap_write(self, name: str, offset: int, data: bytes) -> None:
        Snapshot(self.svc, self.svc.data, self.svc.snapshot(name)).write(offset, data)
        self.snaps[name][offset: offset + len(data)] = data

    # -- checking it ------------------------------------------------------------------

    def verify(self) -> None:
        """Every snapshot and the origin read what they must; the store checks clean,
        leaks nothing, and its space figures in memory are the ones on disk."""
        svc = self.svc
        for name, want in self.snaps.items():
            got = Snapshot(svc, svc.data, svc.snapshot(name)).read(0, OSZ)
            assert got == bytes(want), f"snapshot {name} changed"
        assert sorted(s.name for s in svc.snapshots() if not svc.is_merging(s)) == \
            sorted(self.snaps)
        assert Origin(svc, svc.data).read(0, OSZ) == bytes(self.model)
        svc.commit()
        findings = svc.store.check()
        assert findings == [], [f.to_dict() for f in findings]
        on_disk = SharedStore.open(MemoryDevice(SSZ, bytes(self.store_mem.data)))
        assert on_disk.space() == svc.store.space()
        assert on_disk.snapshot_space() == svc.store.snapshot_space()

    def failure(self) -> dict:
        """The service's record of its last failed commit (there must be one)."""
        assert self.svc.failure is not None, "no failed commit recorded"
        return self.svc.failure

    def space(self) -> tuple:
        return (self.svc.store.space()["chunks_used"], self.svc.store.exception_chunks())


# -- the operations, each with what it may leave behind when it fails ----------------------

WRITE_AT, WRITE_LEN = 2 * CS + 100, 13 * CS


def op_origin_write(w: World) -> None:
    """An origin write over chunks 2..15: copy-outs for s1 (2, 3) and for both (12..15)."""
    w.write(WRITE_AT, _data(5, WRITE_LEN))


def after_origin_write(w: World) -> None:
    # Every failure comes before the origin write or is that write, which the fault
    # device refuses whole: the origin was not written.
    assert bytes(w.origin_mem.data) == bytes(w.model)


def op_snap_create(w: World) -> None:
    w.snap("new")


def after_snap_create(w: World) -> None:
    # The snapshot exists if its commit reached the journal before the failure.
    if any(s.name == "new" for s in w.svc.snapshots()):
        w.snaps["new"] = bytearray(w.model)


def op_snap_delete(w: World) -> None:
    w.svc.delete_snapshot("s0")
    del w.snaps["s0"]


def after_snap_delete(w: World) -> None:
    if not any(s.name == "s0" for s in w.svc.snapshots()):
        del w.snaps["s0"]  # the delete reached the journal; its sweep was resumed


SNAP_AT, SNAP_LEN = 10 * CS + 10, 4 * CS - 20


def op_snap_write(w: World) -> None:
    """A write to s1 over chunks 10..13: copies of the exception s1 shares with s0
    (10, 11) and of origin chunks s1 shares (12, 13) made unique to s1 first."""
    w.snap_write("s1", SNAP_AT, _data(6, SNAP_LEN))


def after_snap_write(w: World) -> None:
    # The data goes to the chunks made unique one chunk at a time, after they all are:
    # a failure leaves some first chunks written, the rest as they were.
    now = Snapshot(w.svc, w.svc.data, w.svc.snapshot("s1")).read(0, OSZ)
    old, new = w.snaps["s1"], bytearray(w.snaps["s1"])
    new[SNAP_AT: SNAP_AT + SNAP_LEN] = _data(6, SNAP_LEN)
    written = [now[c * CS:(c + 1) * CS] == new[c * CS:(c + 1) * CS] for c in range(10, 14)]
    assert written == sorted(written, reverse=True), written
    for c, yes in zip(range(10, 14), written, strict=True):
        if not yes:
            assert now[c * CS:(c + 1) * CS] == old[c * CS:(c + 1) * CS], c
    w.snaps["s1"][:] = now


def setup_merge(w: World) -> None:
    w.svc.merge_step_chunks = 4
    w.svc.start_merge("s0")
    w.model[:] = w.snaps.pop("s0")  # the origin reads as s0 from now on


def op_merge_step(w: World) -> None:
    w.svc.merge_step()


OPS = {
    "origin-write": (None, op_origin_write, after_origin_write),
    "snap-create": (None, op_snap_create, after_snap_create),
    "snap-delete": (None, op_snap_delete, after_snap_delete),
    "snap-write": (None, op_snap_write, after_snap_write),
    "merge-step": (setup_merge, op_merge_step, None),
}


def world_for(op: str) -> World:
    w = World()
    setup = OPS[op][0]
    if setup is not None:
        setup(w)
    return w


def finish(w: World) -> None:
    """Complete a merge in progress, so runs that took different steps compare."""
    while not w.svc.merge_step():
        pass


def counts(op: str) -> dict[tuple[str, str], int]:
    """The reads, writes and flushes ``op`` does on each device, run cleanly."""
    w = world_for(op)
    before = {d: dict(getattr(w, d).counts) for d in ("origin", "dev")}
    OPS[op][1](w)
    return {(d, k): getattr(w, d).counts[k] - before[d].get(k, 0)
            for d in ("origin", "dev") for k in KINDS}


def reference(op: str):
    w = world_for(op)
    OPS[op][1](w)
    finish(w)
    return w.space()


@pytest.mark.parametrize("err", ERRNOS, ids=["ENOSPC", "EIO"])
@pytest.mark.parametrize("device", ["dev", "origin"], ids=["store", "origin"])
@pytest.mark.parametrize("op", list(OPS))
def test_every_io_of_an_operation_can_fail(op, device, err):
    """Fail each read, write and flush ``op`` does on ``device`` in turn: the call
    raises the host's errno, nothing leaks, every volume reads what it must, and then
    the same operation succeeds on the same service (it reopened the store itself when
    a commit was what failed)."""
    _setup, run, after = OPS[op]
    n_ops = counts(op)
    want_space = reference(op)
    tried = 0
    for kind in KINDS:
        for n in range(1, n_ops[(device, kind)] + 1):
            w = world_for(op)
            fdev = getattr(w, device)
            fdev.fail_nth(kind, n, err)
            with pytest.raises((DdsnapError, OSError)) as info:
                run(w)
            where = f"{op}: {kind} {n} of {n_ops[(device, kind)]} on {device}"
            assert fdev.injected == 1, where
            assert isinstance(info.value, (DdsnapError, OSError))  # as raises() says
            assert info.value.errno == err, f"{where}: {info.value!r}"
            if isinstance(info.value, DdsnapError) and err == errno.ENOSPC:
                assert isinstance(info.value, (HostFull, ServiceFailed)), where
            fdev.clear()
            # The next request (a read of s1, there in every case) reopens the store
            # if a commit failed; then what survived the failure can be looked at.
            Snapshot(w.svc, w.svc.data, w.svc.snapshot("s1")).read(0, CS)
            if after is not None:
                after(w)
            w.verify()
            # The same operation again (what it already did durably is not redone).
            if (op in ("origin-write", "snap-write", "merge-step")
                    or (op == "snap-create" and "new" not in w.snaps)
                    or (op == "snap-delete" and "s0" in w.snaps)):
                run(w)
            w.verify()
            finish(w)
            assert w.space() == want_space, where
            tried += 1
    assert tried == sum(n_ops[(device, k)] for k in KINDS)
    if device == "dev":
        assert n_ops[("dev", "write")] and n_ops[("dev", "flush")], n_ops


def test_a_failed_commit_is_reported_once_and_the_store_reopened(caplog):
    """The commit of a snapshot creation fails: the service records the failure
    (``failure``) and logs it once; requests while the store cannot be reopened get
    ServiceFailed with the host's errno (the reopen's own failure logged once too); once
    the host takes writes again the next request reopens the store from its journal and
    serving goes on."""
    w = World()
    w.dev.fail_while("write", errno.ENOSPC)
    with pytest.raises(HostFull) as info:
        w.svc.create_snapshot("new")
    assert "store.img" in str(info.value) and "committing metadata" in str(info.value)
    assert w.failure()["type"] == "HostFull" and w.failure()["errno"] == errno.ENOSPC
    assert not w.failure()["reopened"]
    # Reopening writes the superblock, which this host refuses too.
    for _ in range(3):
        with pytest.raises(ServiceFailed) as refused:
            w.svc.create_snapshot("new")
        assert refused.value.errno == errno.ENOSPC and "cannot be reopened" in str(
            refused.value)
    assert w.failure()["reopen_error"] and w.svc.reopens == 0
    w.dev.clear()
    w.verify()  # its first read reopens the store
    assert w.svc.failures == 1 and w.svc.reopens == 1
    assert w.failure()["reopened"] and w.failure()["reopen_error"] is None
    w.snap("new")
    w.write(0, _data(9, 3 * CS))
    w.verify()
    said = [r.getMessage() for r in caplog.records if r.name == "ddsnap.service"]
    assert sum("a commit to the snapshot store failed" in m for m in said) == 1, said
    assert sum("reopening the snapshot store failed" in m for m in said) == 1, said
    assert sum(m.startswith("snapshot store reopened") for m in said) == 1, said


def test_failed_copy_outs_give_back_every_chunk():
    """Issue 8's leak: origin writes whose copy-outs fail with ENOSPC from the host
    gave their chunks to the next commit.  Now 45 of them leave the store as it was, and
    once the host has room the same writes succeed."""
    w = World(cold_cache=False)
    w.svc.create_snapshot("all")
    w.snaps["all"] = bytearray(w.model)
    w.svc.commit()
    before = w.svc.store.space()
    w.dev.fail_while("write", errno.ENOSPC)
    big = _data(7, OSZ)
    for _ in range(45):
        with pytest.raises(HostFull):
            Origin(w.svc, w.svc.data).write(0, big)
    w.dev.clear()
    assert w.svc.failures == 0  # nothing reached a commit: no reopen needed
    w.svc.commit()
    assert w.svc.store.space() == before
    w.verify()
    w.write(0, big)
    w.verify()


def test_concurrent_writers_survive_a_failed_commit():
    """Writers on several threads while a commit fails slowly: the one committing gets
    the host's error, the ones whose copy-outs went into a batch behind it get
    ServiceFailed with the same errno, the store is reopened once they have all left,
    and every write after that succeeds."""
    w = World(cold_cache=False)
    w.svc.create_snapshot("all")
    w.snaps["all"] = bytearray(w.model)
    gate = threading.Event()
    w.dev.fail_nth("flush", 1, errno.EIO, gate=gate)
    errors: list[DdsnapError | OSError] = []
    lock = threading.Lock()

    def writer(t: int) -> None:
        for i in range(4):
            off = (t * 4 + i) * CS  # every chunk still shared with "all": a copy-out
            try:
                Origin(w.svc, w.svc.data).write(off, _data(100 + t * 4 + i, CS))
            except (DdsnapError, OSError) as e:
                with lock:
                    errors.append(e)

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(6)]
    writes = w.dev.counts["write"]
    for t in threads:
        t.start()
    # The first commit's flush is held, failing.  No write waits for the disk before its
    # copy-out is durable, so each writer copies its first chunk out (one store write)
    # and then waits behind that commit, whose journal records (one more write) are
    # written before that flush.
    wait_until(lambda: w.dev.reached.is_set() and w.dev.counts["write"] == writes + 7,
               "every writer's first copy-out")
    gate.set()
    for t in threads:
        t.join(120)
        assert not t.is_alive(), "a writer hung after the failed commit"
    assert all(e.errno == errno.EIO for e in errors), errors
    kinds = {type(e) for e in errors}
    assert HostIOError in kinds and ServiceFailed in kinds, errors
    assert w.svc.failures == 1
    # Chunks the threads wrote hold the data written there, or the old data where a
    # write failed before reaching the origin; the rest is as it was.
    now = Origin(w.svc, w.svc.data).read(0, OSZ)
    assert now[24 * CS:] == bytes(w.model[24 * CS:])
    w.model[:] = now
    w.verify()
    assert w.svc.reopens == 1
    for off in range(0, OSZ, CS):
        w.write(off, _data(999 + off, CS))
    w.verify()


def test_the_merge_worker_goes_on_after_a_failed_commit():
    """A commit under the server's merge worker fails: the store is reopened and the
    merge goes on from its durable cursor to completion, by itself."""
    w = World()
    setup_merge(w)
    w.dev.fail_nth("flush", 2, errno.EIO)  # a flush of the store: always in a commit
    runner = admin.MergeRunner(w.svc)
    runner.ensure()
    wait_until(lambda: not runner.running, "the merge worker to finish")
    assert runner.error is None, runner.error
    assert w.dev.injected == 1 and w.svc.failures == 1 and w.svc.reopens == 1
    assert w.svc.merge_status() is None  # complete: s0 merged and deleted
    w.verify()


def test_the_merge_worker_stops_while_the_host_keeps_failing():
    """While every store write fails the merge worker stops with the error (the merge
    stays recorded); once the host is back, starting it again completes the merge."""
    w = World()
    setup_merge(w)
    w.dev.fail_while("write", errno.ENOSPC)
    runner = admin.MergeRunner(w.svc)
    runner.ensure()
    wait_until(lambda: not runner.running, "the merge worker to stop")
    assert runner.error is not None and runner.error.errno == errno.ENOSPC, runner.error
    w.dev.clear()
    assert w.svc.merge_status() is not None
    runner.ensure()
    wait_until(lambda: not runner.running, "the merge worker to finish")
    assert runner.error is None, runner.error
    assert w.svc.merge_status() is None
    w.verify()


def test_error_classes_cross_the_control_socket_with_their_exit_codes():
    """ServiceFailed, HostIOError and HostFull are registered, each with its own exit
    code, and come back as themselves from the control socket's error dict."""
    # Every class that sets an exit code has its own (JournalError, DirectoryNotFound
    # inherit their parents' on purpose).
    own = [cls.exit_code for cls in E.BY_NAME.values() if "exit_code" in vars(cls)]
    assert len(own) == len(set(own)), sorted(own)
    for cls, code, eno in ((ServiceFailed, 23, errno.EIO), (HostIOError, 24, errno.EIO),
                           (HostFull, 25, errno.ENOSPC)):
        assert E.BY_NAME[cls.__name__] is cls and cls.exit_code == code
        back = E.from_dict({"type": cls.__name__, "message": "m"})
        assert type(back) is cls and back.exit_code == code and back.errno == eno
    full = E.host_error(OSError(errno.ENOSPC, "No space left on device"), "origin", "/o")
    assert isinstance(full, HostFull) and "/o" in str(full)
    eio = E.host_error(OSError(errno.EIO, "Input/output error"), "origin", "/o")
    assert type(eio) is HostIOError and eio.errno == errno.EIO


# -- the server on a host file system that fills up -----------------------------------------



@pytest.fixture
def tiny_fs(tmp_path):
    """A 6 MiB tmpfs (root only; skipped where mounting is not permitted)."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6M", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if p.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {p.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(path: Path) -> int:
    """Write ``path`` until the file system is full; return the bytes written."""
    n = 0
    block = b"\xa5" * 65536
    with open(path, "wb", buffering=0) as f:
        while True:
            try:
                n += f.write(block)
            except OSError as e:
                assert e.errno == errno.ENOSPC, e
                break
    return n


def nbd_write(sock: Path, offset: int, data: bytes, export: str = "origin") -> int:
    """One NBD WRITE (then a FLUSH if it succeeded); returns the NBD error (0 = ok)."""
    c = RawClient(f"unix:{sock}", export)
    try:
        c.send(1, P.Command.WRITE, offset, len(data), data=data)
        r = c.read_reply()
        if r["error"] == 0:
            c.send(2, P.Command.FLUSH)
            assert c.read_reply()["error"] == 0
        return r["error"]
    finally:
        c.close()


def nbd_read(sock: Path, offset: int, length: int, export: str = "origin") -> bytes:
    c = RawClient(f"unix:{sock}", export)
    try:
        c.send(1, P.Command.READ, offset, length)
        r = c.read_reply({1: length})
        assert r["error"] == 0, r
        return r["data"]
    finally:
        c.close()


def test_server_answers_enospc_while_the_host_is_full_and_recovers(tmp_path, tiny_fs):
    """A sparse 64 MiB store file on a 6 MiB tmpfs, served.  Fill the tmpfs: NBD
    writes that need copy-outs fail with ENOSPC, ``snap create`` fails with the host's
    error (exit 25) and the server keeps serving and says why in ``status``.  Delete
    the filler: the same writes and snapshot succeed, with no restart, every snapshot
    intact, and ``ddsnap check`` clean."""
    origin = tmp_path / "origin.img"
    base = make_origin(origin, 8 << 20, seed=11)
    store = tiny_fs / "store.img"
    ok("init", store, "--origin", origin, "--size", "64M", "--chunk-size", "64K")
    with Served(store, sock=tmp_path / "s.nbd", control=tmp_path / "s.ctl") as srv:
        ok("snap", "create", store, "before")
        used = ok_json("status", store)["chunks_used"]
        filler = tiny_fs / "filler"
        assert fill(filler) > 0
        new = _data(12, 1 << 20)
        # Each write copies 16 chunks out into the full file system: ENOSPC, and the
        # chunks it took are given back.
        for i in range(4):
            assert nbd_write(srv.sock, i << 20, new) == P.NBD_ENOSPC
        p = tool("qemu-io", "-f", "raw", "-c", "write -P 0x5a 4M 1M", srv.uri(), check=False)
        assert p.returncode != 0 and "No space left on device" in p.stdout + p.stderr, p
        st = ok_json("status", store)
        assert st["chunks_used"] == used and st["failure"] is None, st
        line = fails(25, "snap", "create", store, "after", match="no space left on the host")
        assert str(store) in line
        st = ok_json("status", store)
        assert st["failure"]["type"] == "HostFull" and st["failure"]["reopened"], st
        assert st["chunks_used"] == used
        assert [s["name"] for s in st["snapshots"]] == ["before"]
        assert nbd_read(srv.sock, 0, 1 << 20, "before") == base[:1 << 20]
        filler.unlink()
        # Room again: the same writes and the snapshot, no restart.
        for i in range(4):
            assert nbd_write(srv.sock, i << 20, new) == 0
        tool("qemu-io", "-f", "raw", "-c", "write -P 0x5a 4M 1M", srv.uri())
        ok("snap", "create", store, "after")
        assert nbd_read(srv.sock, 0, 1 << 20, "before") == base[:1 << 20]
        assert nbd_read(srv.sock, 3 << 20, 1 << 20, "after") == new
        assert nbd_read(srv.sock, 4 << 20, 1 << 20) == b"\x5a" * (1 << 20)
        assert nbd_read(srv.sock, 5 << 20, 1 << 20) == base[5 << 20: 6 << 20]
        assert nbd_read(srv.sock, 4 << 20, 1 << 20, "after") == b"\x5a" * (1 << 20)
        out = srv.output()
        assert out.count("a commit to the snapshot store failed") == 1, out
    report = ok_json("check", store)
    assert report["clean"] and report["findings"] == [], report


def test_a_merge_stop_while_the_worker_starts(monkeypatch):
    """Control requests run on executor threads, so `merge --stop` can arrive while
    `merge NAME` is starting the worker (CI saw this after a SIGCONT released both):
    the stop waits for the start and stops the worker (a small merge may have finished by
    then); starting again completes the merge."""
    w = World()
    setup_merge(w)
    runner = admin.MergeRunner(w.svc)
    starting = threading.Event()
    real_start = threading.Thread.start

    def slow_start(thread):  # widen the window between creating and starting the worker
        if thread.name == "ddsnap-merge":
            starting.set()
            time.sleep(0.2)
        real_start(thread)

    monkeypatch.setattr(threading.Thread, "start", slow_start)
    errors = []

    def start():
        try:
            runner.ensure()
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    t = threading.Thread(target=start)
    t.start()
    assert starting.wait(10)
    runner.stop()  # raised "cannot join thread before it is started" before the fix
    t.join(10)
    assert errors == [] and not runner.running
    runner.ensure()  # resumes the merge if the stop came before its end
    wait_until(lambda: not runner.running, "the merge worker to finish")
    assert runner.error is None, runner.error
    assert w.svc.merge_status() is None
    w.verify()
