"""``ddsnap merge``: online rollback of the origin to a snapshot, run as a user runs it.

Real processes only: the ``ddsnap`` command, a real ``ddsnap serve``, and NBD clients
(qemu-io, qemu-img, nbdinfo, nbdcopy, fio).  Every test starts from the same volume,
built once per module:

* origin ``O0`` (16 MiB of random data, 4 KiB chunks), snapshot ``a``;
* fio rewrites 2 MiB of the origin in random 4 KiB writes (``O1``), so ``a`` holds 512
  exceptions in no linear order: its merge takes hundreds of steps (each with a copy-out
  for the other snapshots and a commit), long enough to stop it, kill the server in the
  middle of it, or write the origin while it runs;
* snapshot ``b``; a few writes (``O2``); read-only snapshot ``c``; a few more writes.

Raw copies of ``a``, ``b``, ``c`` and the final origin are saved; after a merge of NAME the
origin must equal NAME's copy (``qemu-img compare``) and every other snapshot its own copy;
NAME is gone or, merged with ``--keep``, still equals its copy (what it read when the merge
started, whatever was written to the origin since: format v3).

Covered: ``merge --wait`` locally and served, ``merge`` without ``--wait`` (recorded on
an unserved store and run when it is served; polled with ``--status --json`` on a served
one), ``--keep`` (also with origin writes during the merge), the merge of a snapshot of a
snapshot (``snap create --from``) whose parent was deleted, ``--status``/``--stop`` and
resuming (the same command again, a clean
server restart, a SIGKILL), origin writes while a merge runs, ``status --json`` during and
after, the merging snapshot missing from ``nbdinfo --list``, the exit codes of every
refusal, and the progress bar (only on a terminal).

Stopping a merge right after starting it goes through the control socket by hand (a few
milliseconds, against the seconds the merge of ``a`` takes); everything else is the CLI.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from served import (
    DDSNAP,
    DEADLINE,
    KiB,
    MiB,
    Served,
    control_request,
    ddsnap,
    ddsnap_env,
    export_names,
    fails,
    make_origin,
    merge_status,
    ok,
    ok_json,
    on_a_terminal,
    same_image,
    tool,
    wait_merge_done,
    wait_until,
)

pytestmark = pytest.mark.clients

ORIGIN_SIZE = 16 * MiB
CHUNK = 4 * KiB
N_CHUNKS = ORIGIN_SIZE // CHUNK
SNAPS = ("a", "b", "c")
#: the region fio rewrites in random order after snapshot ``a``
FIO_OFFSET, FIO_SIZE = 4 * MiB, 2 * MiB
#: (pattern, offset, length) written after ``b`` and before ``c`` ...
X_WRITES = [(0x5A, 1 * MiB, 256 * KiB), (0x5B, 9 * MiB + 12 * KiB + 100, 100 * KiB)]
#: ... and after ``c``
Y_WRITES = [(0x6C, 2 * MiB, 64 * KiB), (0x6D, 15 * MiB, 1 * MiB)]
#: chunks written after ``a``: its exceptions, what its merge copies
A_CHUNKS = len({c for _p, off, n in [(0, FIO_OFFSET, FIO_SIZE), *X_WRITES, *Y_WRITES]
                for c in range(off // CHUNK, (off + n - 1) // CHUNK + 1)})
MERGE_FIELDS = {"snapshot", "keep", "chunks_done", "chunks_total", "counted_from", "cursor",
                "running", "chunks_per_second", "eta_seconds"}



@pytest.fixture(autouse=True)
def one_chunk_merge_steps(monkeypatch):
    """Merge steps of one chunk in every ddsnap process these tests start (the default
    32 MiB step would merge these small volumes at once), so a merge runs long enough to
    be watched, stopped and interrupted."""
    monkeypatch.setenv("DDSNAP_MERGE_STEP", "4K")


def qemu_io(uri: str, *cmds: str, read_only: bool = False, check: bool = True):
    args = ["qemu-io", "-f", "raw"] + (["-r"] if read_only else [])
    for c in cmds:
        args += ["-c", c]
    return tool(*args, uri, check=check)


def write_all(uri: str, writes) -> None:
    qemu_io(uri, *(f"write -P {p} {off} {n}" for p, off, n in writes))


def apply(data: bytearray, writes) -> None:
    for p, off, n in writes:
        data[off:off + n] = bytes([p]) * n


class Vol:
    """The module's volume, restored for one test: ``store``, ``origin`` and the saved raw
    copies ``raw["a" | "b" | "c" | "origin"]``."""

    def __init__(self, d: Path):
        self.dir = d
        self.store = d / "store.img"
        self.origin = d / "origin.img"
        self.raw = {n: d / f"{n}.raw" for n in (*SNAPS, "origin")}

    def served(self) -> Served:
        return Served(self.store)

    def names(self) -> list[str]:
        return [s["name"] for s in ok_json("snap", "list", self.store)]


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Vol:
    """Build the volume once; tests get a fresh copy at the same paths (the store records
    the origin's absolute path)."""
    v = Vol(tmp_path_factory.mktemp("merge"))
    o0 = make_origin(v.origin, ORIGIN_SIZE, seed=3)
    ok("init", v.store, "--origin", v.origin, "--size", "96M", "--chunk-size", "4K")
    ok("snap", "create", v.store, "a")
    with v.served() as srv:
        tool("fio", "--name=rewrite", "--ioengine=nbd", f"--uri={srv.uri('origin')}",
             "--rw=randwrite", "--bs=4k", f"--offset={FIO_OFFSET}", f"--size={FIO_SIZE}",
             "--iodepth=16", "--randseed=2024", "--output=/dev/null")
        ok("snap", "create", v.store, "b")
        write_all(srv.uri("origin"), X_WRITES)
        ok("snap", "create", v.store, "c", "--read-only")
        write_all(srv.uri("origin"), Y_WRITES)
        for name in (*SNAPS, "origin"):
            tool("nbdcopy", srv.uri(name), v.raw[name])
    raws = {n: v.raw[n].read_bytes() for n in v.raw}
    assert raws["a"] == o0, "snapshot a is not the origin it was taken of"
    assert len(set(raws.values())) == 4, "the four moments must differ"
    shutil.copyfile(v.origin, v.dir / "origin.tmpl")
    tool("cp", "--sparse=always", v.store, v.dir / "store.tmpl")
    return v


@pytest.fixture
def vol(template: Vol) -> Vol:
    d = template.dir
    for leftover in ("store.img.nbd", "store.img.ctl"):
        (d / leftover).unlink(missing_ok=True)
    shutil.copyfile(d / "origin.tmpl", template.origin)
    tool("cp", "--sparse=always", d / "store.tmpl", template.store)
    # Restoring the origin file changed its times: say it is the store's origin still
    # (what a user does after restoring both from a backup).
    ok("set", template.store, f"origin={template.origin}")
    return template


# --- checks --------------------------------------------------------------------------------


def merge_of(store, name: str) -> dict:
    """The merge recorded in ``store`` (``merge --status --json``), checked for shape."""
    st = merge_status(store)
    assert st is not None, "no merge in progress"
    assert set(st) == MERGE_FIELDS, st
    assert st["snapshot"] == name, st
    assert 0 <= st["chunks_done"] <= st["chunks_total"] <= A_CHUNKS, st
    assert 0 <= st["cursor"] <= N_CHUNKS, st
    if st["running"]:
        assert st["chunks_per_second"] >= 0, st
        assert st["eta_seconds"] is None or st["eta_seconds"] >= 0, st
    else:  # paused: no decaying rate
        assert st["chunks_per_second"] is None and st["eta_seconds"] is None, st
    assert ok_json("status", store)["merge"] is not None
    return st


def verify_merged(v: Vol, srv: Served, merged: str, keep: bool = False,
                  origin: Path | None = None) -> None:
    """After the merge of ``merged``: the origin equals its copy (or ``origin``), every
    other snapshot its own, ``merged`` is gone (or kept, as it was when the merge
    started: its own copy, whatever the origin), the exports and ``status`` say so, and
    ``check`` is clean."""
    same_image(origin or v.raw[merged], srv.uri("origin"), "the origin")
    left = [n for n in SNAPS if n != merged or keep]
    for name in left:
        same_image(v.raw[name], srv.uri(name), f"snapshot {name}")
    assert v.names() == left
    assert export_names(srv) == ["origin", *left]
    st = ok_json("status", v.store)
    assert st["merge"] is None and merge_status(v.store) is None
    assert [s["name"] for s in st["snapshots"]] == left
    assert st["auto_deleted"] == [] and st["full_policy"] == "error"
    assert ok_json("check", v.store) == {"clean": True, "fatal": 0, "warnings": 0,
                                         "findings": []}


def start_stopped(srv: Served, name: str, keep: bool = False) -> dict:
    """Start merging ``name`` and stop it at once (control socket by hand: milliseconds
    apart, against the seconds the merge of ``a`` takes)."""
    srv.control("merge_start", name=name, keep=keep)
    reply = control_request(srv.ctl, "merge_stop")
    assert reply.get("ok"), f"the merge of {name} finished before it could be stopped: {reply}"
    st = reply["result"]
    assert st["snapshot"] == name and st["running"] is False, st
    assert st["chunks_done"] < st["chunks_total"], st
    return st


def progress(srv: Served) -> int:
    """Chunks the running merge has done (it must not have finished yet)."""
    st = srv.control("merge_status")
    assert st is not None, "the merge finished before the test could interrupt it"
    return st["chunks_done"]


# --- no merge ------------------------------------------------------------------------------


@pytest.mark.parametrize("served", [False, True], ids=["local", "served"])
def test_no_merge_in_progress(vol, served):
    srv = vol.served().start() if served else None
    try:
        assert ok("merge", vol.store, "--status").stdout.strip() == "no merge in progress"
        assert ok("merge", vol.store, "--status", "--json").stdout.strip() == "null"
        fails(18, "merge", vol.store, "--stop", match="no merge")
        fails(2, "merge", vol.store, match="NAME")
        fails(8, "merge", vol.store, "nosuch", match="no such snapshot: nosuch")
        st = ok_json("status", vol.store)
        assert st["merge"] is None and st["full_policy"] == "error"
        assert st["auto_deleted"] == [] and st["served"] is served
        assert "merge" not in ok("status", vol.store).stdout.split("when full")[1]
    finally:
        if srv is not None:
            srv.stop()
    assert vol.names() == list(SNAPS)


# --- merge --wait, locally and served --------------------------------------------------------


def test_merge_wait_locally(vol):
    p = ok("merge", vol.store, "a", "--wait")
    assert p.stdout.strip() == "merged snapshot a into the origin"
    assert p.stderr == "", "no progress bar when stderr is not a terminal"
    same_image(vol.raw["a"], vol.origin, "the origin file")
    assert vol.names() == ["b", "c"]
    assert merge_status(vol.store) is None
    assert ok_json("check", vol.store)["clean"]
    with vol.served() as srv:
        verify_merged(vol, srv, "a")


def test_merge_wait_served(vol):
    with vol.served() as srv:
        p = ok("merge", vol.store, "a", "--wait")
        assert p.stdout.strip().endswith("merged snapshot a into the origin"), p.stdout
        assert p.stderr == ""
        verify_merged(vol, srv, "a")
        # the origin keeps working as a volume: a write, then a snapshot of it
        qemu_io(srv.uri("origin"), "write -P 0x42 0 64K")
        ok("snap", "create", vol.store, "after")
        qemu_io(srv.uri("after"), "read -P 0x42 0 64K", read_only=True)
    assert ok_json("check", vol.store)["clean"]


def test_merge_without_wait_served_then_poll(vol):
    """Merge the middle snapshot ``b`` in the background; poll ``--status --json``."""
    with vol.served() as srv:
        p = ok("merge", vol.store, "b")
        assert re.match(r"merging snapshot b into the origin: \d+ of \d+ chunks", p.stdout), \
            p.stdout
        wait_merge_done(vol.store)
        verify_merged(vol, srv, "b")


def test_merge_recorded_on_an_unserved_store_runs_when_served(vol):
    p = ok("merge", vol.store, "a")
    assert "merge of a started; it runs when" in p.stdout and "--wait" in p.stdout
    st = merge_of(vol.store, "a")
    assert st == {**st, "keep": False, "chunks_done": 0, "chunks_total": A_CHUNKS,
                  "cursor": 0, "running": False}
    assert f"merging snapshot a into the origin: 0 of {A_CHUNKS} chunks" in \
        ok("merge", vol.store, "--status").stdout
    assert "(paused: it resumes when the store is served" in ok("status", vol.store).stdout
    # still recorded after another open and close
    assert merge_of(vol.store, "a")["chunks_total"] == A_CHUNKS
    with vol.served() as srv:
        wait_merge_done(vol.store)
        verify_merged(vol, srv, "a")


def test_merge_keep(vol):
    with vol.served() as srv:
        st = start_stopped(srv, "a", keep=True)
        assert st["keep"] is True and merge_of(vol.store, "a")["keep"] is True
        assert "a" not in export_names(srv)
        # resuming with the same command (the recorded --keep stands)
        ok("merge", vol.store, "a", "--keep", "--wait")
        verify_merged(vol, srv, "a", keep=True)
        # ``a`` is an ordinary snapshot again: origin writes copy out for it
        qemu_io(srv.uri("origin"), "write -P 0x99 0 1M", "write -P 0x98 8M 4K")
        same_image(vol.raw["a"], srv.uri("a"), "kept snapshot a")
        assert ok_json("check", vol.store)["clean"]


def test_merge_keep_with_origin_writes_during_the_merge(vol):
    """The origin is written while ``a`` is merged with ``--keep`` (over chunks merged,
    not merged yet and ones ``a`` has no exception in): the origin ends as ``a`` plus the
    writes, and ``a`` as it was when the merge started (v2 left it equal to the origin)."""
    writes = [(0x81, FIO_OFFSET + 100 * KiB, 300 * KiB), (0x82, 7 * MiB, 64 * KiB),
              (0x83, 0, 8 * KiB)]
    expected = bytearray(vol.raw["a"].read_bytes())
    apply(expected, writes)
    want = vol.dir / "expected.raw"
    want.write_bytes(expected)
    with vol.served() as srv:
        start_stopped(srv, "a", keep=True)
        write_all(srv.uri("origin"), writes[:2])
        srv.control("merge_start", name="a", keep=True)  # resumed, running
        write_all(srv.uri("origin"), writes[2:])
        wait_merge_done(vol.store)
        verify_merged(vol, srv, "a", keep=True, origin=want)
        # a copy-out for a as for any snapshot: the next origin write does not reach it
        qemu_io(srv.uri("origin"), f"write -P 0x84 {FIO_OFFSET} 64K")
        same_image(vol.raw["a"], srv.uri("a"), "kept snapshot a")
    assert ok_json("check", vol.store)["clean"]


def test_merge_of_a_clone_whose_parent_was_deleted(vol):
    """``a2``, a snapshot of ``a`` (``snap create --from``), written over NBD; ``a`` is
    deleted (it lives on for ``a2``); merging ``a2`` makes the origin ``a2``'s content
    (``a``'s data as of ``a2``'s creation and ``a2``'s own writes), changes no other
    snapshot, and deletes ``a2`` and what was left of ``a``."""
    with vol.served() as srv:
        p = ok("snap", "create", vol.store, "a2", "--from", "a")
        assert "a2" in p.stdout and "of a" in p.stdout, p.stdout
        a2_writes = [(0x91, FIO_OFFSET + 12 * KiB, 20 * KiB), (0x92, 11 * MiB, 128 * KiB)]
        write_all(srv.uri("a2"), a2_writes)
        expected = bytearray(vol.raw["a"].read_bytes())
        apply(expected, a2_writes)
        want = vol.dir / "a2.raw"
        want.write_bytes(expected)
        same_image(want, srv.uri("a2"), "snapshot a2")
        ok("snap", "delete", vol.store, "a")
        listed = ok_json("snap", "list", vol.store)
        assert [s["name"] for s in listed] == ["b", "c", "a2"]
        assert listed[-1]["parent"] is None, listed[-1]  # its parent is deleted
        same_image(want, srv.uri("a2"), "snapshot a2 after its parent was deleted")
        p = ok("merge", vol.store, "a2", "--wait", "--no-progress")
        assert p.stdout.strip().endswith("merged snapshot a2 into the origin"), p.stdout
        same_image(want, srv.uri("origin"), "the origin")
        for name in ("b", "c"):
            same_image(vol.raw[name], srv.uri(name), f"snapshot {name}")
        assert vol.names() == ["b", "c"] and export_names(srv) == ["origin", "b", "c"]
        assert merge_status(vol.store) is None
        assert ok_json("check", vol.store) == {"clean": True, "fatal": 0, "warnings": 0,
                                               "findings": []}
    same_image(want, vol.origin, "the origin file")


# --- during a merge -----------------------------------------------------------------------


@pytest.mark.parametrize("served", [False, True], ids=["local", "served"])
def test_refusals_while_a_merge_is_in_progress(vol, served):
    srv = vol.served().start() if served else None
    try:
        if served:
            assert srv is not None
            start_stopped(srv, "a")
        else:
            ok("merge", vol.store, "a")
        fails(17, "merge", vol.store, "b", match="a is already being merged")
        fails(17, "snap", "create", vol.store, "new", match="merged")
        fails(17, "snap", "delete", vol.store, "a", match="a is being merged")
        fails(8, "merge", vol.store, "nosuch", match="no such snapshot: nosuch")
        fails(8, "snap", "delete", vol.store, "nosuch")
        assert vol.names() == list(SNAPS)
        assert merge_of(vol.store, "a")["running"] is False
        st = ok_json("status", vol.store)
        assert [s["name"] for s in st["snapshots"]] == list(SNAPS)
        # --stop of a stopped merge is not an error: it reports where it is
        stopped = ok_json("merge", vol.store, "--stop")
        assert stopped["snapshot"] == "a" and stopped["running"] is False
    finally:
        if srv is not None:
            srv.stop()
    assert ok_json("check", vol.store)["clean"]


def test_a_stopped_merge_already_shows_the_snapshot_and_resumes(vol):
    with vol.served() as srv:
        st = start_stopped(srv, "a")
        done = st["chunks_done"]
        # the origin reads as ``a`` from the start; ``a`` is not exported meanwhile
        same_image(vol.raw["a"], srv.uri("origin"), "the origin while a is merged")
        assert export_names(srv) == ["origin", "b", "c"]
        p = qemu_io(srv.uri("a"), "read 0 4K", read_only=True, check=False)
        assert p.returncode != 0, p
        for name in ("b", "c"):
            same_image(vol.raw[name], srv.uri(name), f"snapshot {name}")
        # the other snapshots are still volumes: a write to b during the merge is b's own
        qemu_io(srv.uri("b"), "write -P 0x21 4M 8K")
        b_now = bytearray(vol.raw["b"].read_bytes())
        apply(b_now, [(0x21, 4 * MiB, 8 * KiB)])
        (vol.dir / "b-now.raw").write_bytes(b_now)
        same_image(vol.raw["a"], srv.uri("origin"), "the origin after a write to b")

        st = merge_of(vol.store, "a")
        assert st["running"] is False and st["chunks_done"] == done
        text = ok("merge", vol.store, "--status").stdout
        assert re.match(rf"merging snapshot a into the origin: {done} of {A_CHUNKS} chunks "
                        r"\(paused: `ddsnap merge STORE NAME` resumes it\)$", text.strip()), text
        line = ok("status", vol.store).stdout
        assert re.search(r"merge: merging snapshot a into the origin: .*\(paused", line), line

        # the same command again resumes it
        p = ok("merge", vol.store, "a")
        assert re.match(r"merging snapshot a into the origin: \d+ of \d+ chunks", p.stdout)
        wait_merge_done(vol.store)
        vol.raw["b"] = vol.dir / "b-now.raw"
        try:
            verify_merged(vol, srv, "a")
        finally:
            vol.raw["b"] = vol.dir / "b.raw"


def test_status_while_the_merge_runs(vol):
    with vol.served() as srv:
        started = srv.control("merge_start", name="a", keep=False)
        assert started["running"] is True and started["chunks_total"] == A_CHUNKS
        st = wait_until(lambda: (s := merge_status(vol.store)) and s["chunks_done"] and s,
                        "the merge to make progress")
        assert st["running"] is True and st["snapshot"] == "a" and st["keep"] is False
        if st["chunks_done"] < st["chunks_total"]:
            assert st["chunks_per_second"] > 0 and st["eta_seconds"] is not None
        full = ok_json("status", vol.store)
        if full["merge"] is not None:
            assert set(full["merge"]) == MERGE_FIELDS and full["merge"]["snapshot"] == "a"
            assert "a" not in export_names(srv)
        wait_merge_done(vol.store)
        verify_merged(vol, srv, "a")


def test_wait_reports_a_merge_stopped_by_someone_else(vol):
    with vol.served() as srv:
        waiter = subprocess.Popen([*DDSNAP, "merge", str(vol.store), "a", "--wait"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env=ddsnap_env())
        try:
            # the waiter started the merge; stop it at once (by hand, the waiter is slow
            # to notice), then look at it with the CLI
            wait_until(lambda: (s := srv.control("merge_status")) and s["running"],
                       "the waiter to start the merge", interval=0.005)
            stopped = control_request(srv.ctl, "merge_stop")
            assert stopped["ok"], f"the merge finished before it could be stopped: {stopped}"
            assert "(paused" in ok("merge", vol.store, "--status").stdout
            out, err = waiter.communicate(timeout=DEADLINE)
        finally:
            if waiter.poll() is None:
                waiter.kill()
                waiter.wait()
        assert waiter.returncode == 17, (out, err)
        assert err.splitlines() == ["ddsnap: the merge was stopped before it completed; "
                                    "`ddsnap merge STORE NAME` resumes it"], err
        assert merge_of(vol.store, "a")["running"] is False
        ok("merge", vol.store, "a", "--wait", "--no-progress")
        verify_merged(vol, srv, "a")


def test_origin_writes_and_reads_while_the_merge_runs(vol):
    """Writes land on the merged content; reads see ``a`` plus the writes at any time."""
    writes = [(0x71, 12 * MiB + 5000, 70000), (0x72, 14 * MiB, 256 * KiB),
              (0x73, 0, 4 * KiB), (0x74, 8 * MiB - 100, 200)]
    expected = bytearray(vol.raw["a"].read_bytes())
    apply(expected, writes)
    want = vol.dir / "expected.raw"
    want.write_bytes(expected)
    with vol.served() as srv:
        srv.control("merge_start", name="a", keep=False)
        assert merge_status(vol.store) is not None
        write_all(srv.uri("origin"), writes)
        qemu_io(srv.uri("origin"), *(f"read -P {p} {off} {n}" for p, off, n in writes),
                read_only=True)
        same_image(want, srv.uri("origin"), "the origin during the merge")
        for name in ("b", "c"):
            same_image(vol.raw[name], srv.uri(name), f"snapshot {name} during the merge")
        wait_merge_done(vol.store)
        verify_merged(vol, srv, "a", origin=want)
    same_image(want, vol.origin, "the origin file")


# --- stop, restart, crash -----------------------------------------------------------------


@pytest.mark.parametrize("how", ["stopped", "running"])
def test_server_restart_resumes_the_merge(vol, how):
    srv = vol.served().start()
    with srv:
        if how == "stopped":
            start_stopped(srv, "a")
        else:
            srv.control("merge_start", name="a", keep=False)
            wait_until(lambda: progress(srv) > 0, "the merge to make progress")
    # SIGTERM while it runs: the server stops the merge after a step and exits cleanly
    st = merge_of(vol.store, "a")
    assert st["running"] is False and st["chunks_total"] <= A_CHUNKS
    fails(17, "snap", "create", vol.store, "x")
    with vol.served() as srv:
        # nobody asked: the server resumes the recorded merge by itself
        wait_merge_done(vol.store)
        verify_merged(vol, srv, "a")


def test_sigkill_during_the_merge_then_restart(vol):
    srv = vol.served().start()
    try:
        srv.control("merge_start", name="a", keep=False)
        wait_until(lambda: progress(srv) >= 100, "the merge to make progress")
        # origin writes in flight too
        write_all(srv.uri("origin"), [(0x44, 13 * MiB, 128 * KiB)])
    finally:
        srv.kill()
    expected = bytearray(vol.raw["a"].read_bytes())
    apply(expected, [(0x44, 13 * MiB, 128 * KiB)])
    want = vol.dir / "expected.raw"
    want.write_bytes(expected)
    # recovered by a local open: still merging a, consistent
    assert merge_of(vol.store, "a")["running"] is False
    assert ok_json("check", vol.store)["clean"]
    with vol.served() as srv:
        same_image(want, srv.uri("origin"), "the origin after the crash")
        wait_merge_done(vol.store)
        verify_merged(vol, srv, "a", origin=want)


# --- a snapshot in use --------------------------------------------------------------------


def test_merge_of_a_snapshot_with_a_client_is_refused(vol):
    data = vol.raw["b"].read_bytes()
    with vol.served() as srv:
        reader = subprocess.Popen(["nbdcopy", srv.uri("b"), "-"], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE)
        assert reader.stdout is not None  # a pipe
        try:
            head = reader.stdout.read(4096)  # connected, and blocked on our pipe
            assert head == data[:4096]
            fails(12, "merge", vol.store, "b", match=r"b is in use")
            assert merge_status(vol.store) is None
            assert export_names(srv) == ["origin", *SNAPS]
            rest, err = reader.communicate(timeout=DEADLINE)
            assert reader.returncode == 0, err
            assert head + rest == data
        finally:
            if reader.poll() is None:
                reader.kill()
                reader.wait()

        def started():  # the server notices the disconnect on its own schedule
            p = ddsnap("merge", vol.store, "b", "--wait")
            assert p.returncode in (0, 12), p
            return p.returncode == 0
        wait_until(started, "the merge to be accepted after the client left")
        verify_merged(vol, srv, "b")


# --- the progress bar ---------------------------------------------------------------------


def run_on_a_terminal(*args) -> tuple[int, str, str]:
    """Run ``ddsnap ARGS`` with stderr on a pseudo-terminal; (status, stdout, stderr)."""
    return on_a_terminal(*args, whole=False, columns=120)


@pytest.mark.parametrize("served", [False, True], ids=["local", "served"])
def test_progress_bar_only_on_a_terminal(vol, served):
    srv = vol.served().start() if served else None
    try:
        rc, out, err = run_on_a_terminal("merge", vol.store, "a", "--wait")
        assert rc == 0, (out, err)
        assert "merged snapshot a into the origin" in out
        assert "merging" in err and f"{A_CHUNKS}/{A_CHUNKS}" in err, err[-2000:]
        assert "Traceback" not in err
        # --no-progress: nothing on the terminal
        rc, out, err = run_on_a_terminal("merge", vol.store, "b", "--wait", "--no-progress")
        assert rc == 0 and "merged snapshot b into the origin" in out, (out, err)
        assert err.strip() == "", err
    finally:
        if srv is not None:
            srv.stop()
    assert vol.names() == ["c"]
    same_image(vol.raw["b"], vol.origin, "the origin file")
    assert ok_json("check", vol.store)["clean"]
