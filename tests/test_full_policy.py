"""What happens when the snapshot store fills up, under each ``full-policy``.

Real processes: ``ddsnap init --full-policy`` / ``ddsnap set``, a real ``ddsnap serve``,
and origin writes over NBD with ``qemu-io``.  Small stores (a few MiB, 4 KiB chunks) are
filled by origin writes while several snapshots hold the old data.  The test keeps a model
of the origin and saves a raw copy of each snapshot's content when it is taken; whatever
the policy, every snapshot that is still listed must equal its copy byte for byte, the
origin must equal the model (acknowledged writes there, refused writes not), and
``ddsnap check`` must find the store clean.

* ``error`` (the default): the write that needs a chunk gets ENOSPC, nothing else changes.
* ``delete-oldest`` (at ``init``, or switched on with ``ddsnap set``): writes keep
  succeeding; the oldest snapshots are deleted, oldest first, and each deletion shows in
  ``status`` (``auto_deleted``) and the server's log; the snapshot being merged is never
  the victim (format v3: merged with ``keep`` it is a snapshot like the others until the
  merge completes, origin writes copy out for it, and once it alone is left a write that
  needs room gets ENOSPC; without ``keep`` nothing is copied out for it alone).
* a merge in a full store: under ``delete-oldest`` it makes room like a write does; under
  ``error`` it stops with StoreFull (``merge --wait`` exits 6, ``merge --status`` says
  why) and resumes once the user frees room; and it reuses the chunks it frees itself.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest

from served import (
    KiB,
    MiB,
    Served,
    control_request,
    export_names,
    fails,
    make_origin,
    merge_status,
    ok,
    ok_json,
    same_image,
    tool,
    wait_merge_done,
)

pytestmark = pytest.mark.clients

ORIGIN_SIZE = 8 * MiB
CHUNK = 4 * KiB
ENOSPC = "No space left on device"
ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|\+00:00)$")


class Vol:
    """An origin, a small store, a model of the origin and saved snapshot copies."""

    def __init__(self, tmp_path: Path, store_size: str, *init_args: str):
        self.dir = tmp_path
        self.origin = tmp_path / "origin.img"
        self.store = tmp_path / "store.img"
        self.model = bytearray(make_origin(self.origin, ORIGIN_SIZE, seed=7))
        self.copies: dict[str, Path] = {}
        self.order: list[str] = []  # snapshot names, oldest first
        self.srv: Served | None = None
        ok("init", self.store, "--origin", self.origin, "--size", store_size,
           "--chunk-size", "4K", *init_args)

    def serve(self) -> Served:
        self.srv = Served(self.store).start()
        return self.srv

    @property
    def server(self) -> Served:
        """The server :meth:`serve` started (the test serves before it uses it)."""
        assert self.srv is not None, "not served"
        return self.srv

    def snap(self, name: str, *args: str) -> None:
        """Take snapshot ``name`` and save what it must hold (the model, checked against
        the export at once)."""
        ok("snap", "create", self.store, name, *args)
        path = self.dir / f"{name}.raw"
        path.write_bytes(self.model)
        same_image(path, self.server.uri(name), f"new snapshot {name}")
        self.copies[name] = path
        self.order.append(name)

    def write(self, pattern: int, offset: int, length: int, export: str = "origin") -> bool:
        """One write of ``length`` bytes of ``pattern`` at ``offset``; True if it was
        acknowledged (then the model or the snapshot copy takes it), False on ENOSPC."""
        p = tool("qemu-io", "-f", "raw", "-c", f"write -P {pattern} {offset} {length}",
                 self.server.uri(export), check=False)
        out = p.stdout + p.stderr
        if p.returncode != 0 or "failed" in out:
            assert ENOSPC in out, f"write {offset}+{length} to {export} failed: {out}"
            return False
        if export == "origin":
            self.model[offset:offset + length] = bytes([pattern]) * length
        else:
            data = bytearray(self.copies[export].read_bytes())
            data[offset:offset + length] = bytes([pattern]) * length
            self.copies[export].write_bytes(data)
        return True

    def names(self) -> list[str]:
        return [s["name"] for s in ok_json("snap", "list", self.store)]

    def verify(self) -> dict:
        """Every listed snapshot equals its copy (but the one being merged, which is not
        exported), the origin equals the model, check is clean; returns ``status``."""
        names = self.names()
        assert names == [n for n in self.order if n in names], names
        merging = (merge_status(self.store) or {}).get("snapshot")
        model = self.dir / "origin.model"
        model.write_bytes(self.model)
        if self.srv is not None and self.srv.returncode is None:
            same_image(model, self.srv.uri("origin"), "the origin")
            for name in names:
                if name != merging:
                    same_image(self.copies[name], self.srv.uri(name), f"snapshot {name}")
        else:
            same_image(model, self.origin, "the origin file")
        assert ok_json("check", self.store) == {"clean": True, "fatal": 0, "warnings": 0,
                                                "findings": []}
        return ok_json("status", self.store)


@pytest.fixture
def stop_server():
    vols: list[Vol] = []
    yield vols.append
    for v in vols:
        if v.srv is not None and v.srv.returncode is None:
            v.srv.stop()


def fill(v: Vol, first: int, last: int, pattern: int, step: int = 256 * KiB) -> list[bool]:
    """Write ``[first, last)`` of the origin in ``step`` pieces; the outcome of each."""
    return [v.write(pattern, off, step) for off in range(first, last, step)]


def deleted_names(status: dict) -> list[str]:
    events = status["auto_deleted"]
    for e in events:
        assert set(e) == {"name", "id", "deleted"}, e
        assert isinstance(e["id"], int) and ISO_UTC.match(e["deleted"]), e
    return [e["name"] for e in events]


# --- full-policy=error ---------------------------------------------------------------------


def test_error_policy_fails_the_write_and_keeps_every_snapshot(tmp_path, stop_server):
    v = Vol(tmp_path, "6M")  # ~1270 chunks of 4 KiB for an 8 MiB origin
    st = ok_json("status", v.store)
    assert st["full_policy"] == "error" and st["auto_deleted"] == []
    stop_server(v)
    v.serve()
    v.snap("s1", "--read-only")
    assert fill(v, 0, 2 * MiB, 0x11) == [True] * 8
    v.snap("s2")
    assert fill(v, 2 * MiB, 4 * MiB, 0x22) == [True] * 8
    v.snap("s3")

    results = fill(v, 4 * MiB, 8 * MiB, 0x33)
    assert results[0] and not results[-1], results
    first_failed = results.index(False)
    assert all(results[:first_failed]), results
    assert ok_json("status", v.store)["chunks_free"] < 256 * KiB // CHUNK
    # rewriting shared data needs room too, in the origin and in a writable snapshot
    assert not v.write(0x44, 0, 256 * KiB)
    assert not v.write(0x45, 6 * MiB, 256 * KiB, export="s2")
    # a write that needs no new chunk still goes through
    assert v.write(0x46, 4 * MiB + 4 * KiB, 8 * KiB)

    st = v.verify()
    assert st["full_policy"] == "error" and st["auto_deleted"] == []
    assert v.names() == ["s1", "s2", "s3"]
    assert "deleted" not in v.server.output()
    # deleting a snapshot is the user's way out: the refused write now fits
    ok("snap", "delete", v.store, "s1")
    v.order.remove("s1")
    assert v.write(0x47, 4 * MiB + first_failed * 256 * KiB, 256 * KiB)
    v.verify()
    v.server.stop()
    v.verify()


# --- full-policy=delete-oldest -------------------------------------------------------------


def five_snapshots(v: Vol) -> None:
    """s1..s5, each followed by a 1 MiB origin write it holds the old data of."""
    for i in range(5):
        v.snap(f"s{i + 1}")
        assert fill(v, i * MiB, (i + 1) * MiB, 0x10 + i) == [True] * 4


def check_oldest_deleted(v: Vol, st: dict, at_least: int) -> list[str]:
    """The deleted snapshots are the oldest ones, in order, and gone everywhere."""
    deleted = deleted_names(st)
    assert len(deleted) >= at_least, st["auto_deleted"]
    assert deleted == v.order[:len(deleted)], (deleted, v.order)
    left = v.order[len(deleted):]
    assert v.names() == left and [s["name"] for s in st["snapshots"]] == left
    assert export_names(v.server) == ["origin", *left]
    for name in deleted:
        fails(8, "snap", "delete", v.store, name, match=f"no such snapshot: {name}")
        assert re.search(rf"deleted the oldest snapshot {name}\b", v.server.output()), \
            v.server.output()
        assert re.search(rf"deleted: {name} at .* to make room \(full-policy=delete-oldest\)",
                         ok("status", v.store).stdout)
    return left


def test_delete_oldest_chosen_at_init(tmp_path, stop_server):
    v = Vol(tmp_path, "8M", "--full-policy", "delete-oldest")  # ~1780 chunks
    assert ok_json("status", v.store)["full_policy"] == "delete-oldest"
    assert re.search(r"when full: delete-oldest", ok("status", v.store).stdout)
    stop_server(v)
    v.serve()
    five_snapshots(v)
    # Rewrite the first 4 MiB again and again: every write must succeed.  The snapshots
    # hold 1280 chunks; s5 shares all 4 MiB with the origin, so it alone then needs 1024
    # more: 2304 chunks do not fit, 1280 do: the oldest must go, s5 must stay.
    for rnd in range(3):
        assert fill(v, 0, 4 * MiB, 0x60 + rnd) == [True] * 16, f"round {rnd}"
    st = v.verify()
    left = check_oldest_deleted(v, st, at_least=2)
    assert left and left[-1] == "s5", left
    assert st["full_policy"] == "delete-oldest"
    # the survivors are ordinary snapshots: still writable, still copied out for
    assert v.write(0x70, 7 * MiB, 64 * KiB, export="s5")
    assert v.write(0x71, 7 * MiB, 64 * KiB)
    v.verify()
    before = ok_json("status", v.store)["auto_deleted"]
    v.server.stop()
    st = ok_json("status", v.store)
    assert st["full_policy"] == "delete-oldest"
    # The record of what the policy deleted survives the restart (issue 8).
    assert st["auto_deleted"] == before and deleted_names(st) == left_deleted(before)
    v.verify()


def left_deleted(events: list[dict]) -> list[str]:
    return [e["name"] for e in events]


def test_delete_oldest_switched_on_with_set(tmp_path, stop_server):
    v = Vol(tmp_path, "8M")
    stop_server(v)
    v.serve()
    five_snapshots(v)
    results = fill(v, 0, 4 * MiB, 0x60)
    assert False in results, "the store never filled up"
    refused = [i for i, r in enumerate(results) if not r]
    st = v.verify()
    assert st["auto_deleted"] == [] and v.names() == v.order

    p = ok("set", v.store, "full-policy=delete-oldest")
    assert p.stdout.strip() == "full-policy = delete-oldest"
    assert ok_json("status", v.store)["full_policy"] == "delete-oldest"
    for i in refused:  # what was refused now succeeds, at the oldest snapshots' cost
        assert v.write(0x61, i * 256 * KiB, 256 * KiB), i
    st = v.verify()
    left = check_oldest_deleted(v, st, at_least=1)
    assert "s5" in left

    # the setting outlives the server; switching back restores ENOSPC
    v.server.stop()
    assert ok_json("status", v.store)["full_policy"] == "delete-oldest"
    ok("set", v.store, "full-policy=error")
    assert ok_json("status", v.store)["full_policy"] == "error"
    v.serve()
    assert ok_json("status", v.store)["full_policy"] == "error"
    v.snap("s6")  # shares the whole origin: rewriting it all cannot fit
    before = deleted_names(ok_json("status", v.store))
    results = fill(v, 0, 8 * MiB, 0x62)
    assert False in results, "the store never filled up again"
    assert v.names() == [*left, "s6"], "full-policy=error deleted a snapshot"
    assert deleted_names(ok_json("status", v.store)) == before
    v.verify()


def test_bad_settings(tmp_path, stop_server):
    v = Vol(tmp_path, "6M")
    for served in (False, True):
        fails(2, "set", v.store, "full-policy=sometimes", match="error, delete-oldest")
        fails(2, "set", v.store, "full-policy=", match="error, delete-oldest")
        fails(2, "set", v.store, "colour=blue", match="unknown setting 'colour'")
        fails(2, "set", v.store, "full-policy", match="KEY=VALUE")
        fails(3, "set", tmp_path / "nostore", "full-policy=error")
        assert ok_json("status", v.store)["full_policy"] == "error"
        if not served:
            stop_server(v)
            v.serve()
    fails(2, "init", tmp_path / "other.img", "--origin", v.origin, "--size", "6M",
          "--full-policy", "never", match="error, delete-oldest")
    assert not (tmp_path / "other.img").exists()


# --- the snapshot being merged is never the victim ----------------------------------------


def merging_oldest(tmp_path: Path, stop_server, policy: str, keep: bool = False) -> Vol:
    """s1 and s2 taken together, 1 MiB written, s3, 1 MiB written, s4, 1 MiB written; the
    merge of s1 (the oldest) started and stopped.

    s1's exceptions are all shared with s2, so merging them frees nothing, while s3 and
    s4 share the origin there: the merge needs 256 new chunks for their copy-outs.  All
    four read the origin in the last 5 MiB: writes there copy it out for them (for s1
    too when it is merged with ``keep``: it stays as it was).
    """
    v = Vol(tmp_path, "6M", "--full-policy", policy)
    stop_server(v)
    v.serve()
    v.snap("s1")
    v.snap("s2")
    # one chunk per write, in random order: s1's exceptions make no linear runs, so its
    # merge takes a step per chunk (long enough to stop it right after the start)
    chunks = list(range(MiB // CHUNK))
    random.Random(5).shuffle(chunks)
    tool("qemu-io", "-f", "raw", *(a for c in chunks
                                   for a in ("-c", f"write -q -P 17 {c * CHUNK} {CHUNK}")),
         v.server.uri("origin"))
    v.model[:MiB] = bytes([17]) * MiB
    v.snap("s3")
    assert fill(v, MiB, 2 * MiB, 0x22) == [True] * 4
    v.snap("s4")
    assert fill(v, 2 * MiB, 3 * MiB, 0x33) == [True] * 4
    v.server.control("merge_start", name="s1", keep=keep)
    reply = control_request(v.server.ctl, "merge_stop")
    assert reply["ok"], f"the merge of s1 finished before it could be stopped: {reply}"
    assert merge_status(v.store)["snapshot"] == "s1"
    # from now on the origin reads as s1
    v.model[:] = v.copies["s1"].read_bytes()
    return v


def test_delete_oldest_never_deletes_the_merging_snapshot(tmp_path, stop_server):
    """s1, merged with ``keep``, is the oldest snapshot: when the store fills up the
    policy deletes s2, s3 and s4, oldest first, and once only s1 is left a write that
    needs room gets ENOSPC: s1 is never deleted.  Its merge then completes and it is a
    snapshot again, as it was."""
    v = merging_oldest(tmp_path, stop_server, "delete-oldest", keep=True)
    # the last 4 MiB, where s1 reads the origin like the others, twice over
    results = fill(v, 4 * MiB, 8 * MiB, 0x50) + fill(v, 4 * MiB, 8 * MiB, 0x51)
    assert results[0] and False in results, results
    st = v.verify()
    assert deleted_names(st) == ["s2", "s3", "s4"]
    assert v.names() == ["s1"] and merge_status(v.store)["snapshot"] == "s1"
    assert re.search(r"deleted the oldest snapshot s4\b", v.server.output())
    assert "deleted the oldest snapshot s1" not in v.server.output()
    # the merge completes (nothing left reads the origin: no copy-outs needed)
    ok("merge", v.store, "s1", "--wait", "--no-progress")
    wait_merge_done(v.store)
    st = v.verify()
    assert v.names() == ["s1"] and st["merge"] is None
    assert deleted_names(st) == ["s2", "s3", "s4"]


def test_delete_oldest_never_deletes_the_merging_snapshot_nor_fills_up_for_it(tmp_path,
                                                                            stop_server):
    """Without ``keep`` s1 goes when its merge completes: no copy-out is made for it
    alone, so once the policy deleted the others, writing the origin needs no room (as
    in v2)."""
    v = merging_oldest(tmp_path, stop_server, "delete-oldest")
    # fill the half of the origin s1 has no exceptions in, twice over
    for rnd in range(2):
        assert fill(v, 4 * MiB, 8 * MiB, 0x50 + rnd) == [True] * 16, f"round {rnd}"
    st = v.verify()
    deleted = deleted_names(st)
    assert deleted, "the store never filled up"
    assert "s1" not in deleted
    assert deleted == v.order[1:1 + len(deleted)]
    assert merge_status(v.store)["snapshot"] == "s1"
    assert "s1" in [s["name"] for s in st["snapshots"]]
    # the merge completes; the origin is s1 plus everything written since
    ok("merge", v.store, "s1", "--wait", "--no-progress")
    wait_merge_done(v.store)
    st = v.verify()
    assert "s1" not in v.names() and "s1" not in deleted_names(st)


def test_error_policy_with_a_merge_in_progress(tmp_path, stop_server):
    v = merging_oldest(tmp_path, stop_server, "error")
    results = fill(v, 4 * MiB, 8 * MiB, 0x50)
    assert False in results, "the store never filled up"
    st = v.verify()
    assert st["auto_deleted"] == [] and v.names() == ["s1", "s2", "s3", "s4"]
    assert merge_status(v.store)["snapshot"] == "s1"


@pytest.mark.parametrize("by", ["merge worker", "origin write"])
def test_merge_in_a_full_store_makes_room_under_delete_oldest(tmp_path, stop_server, by):
    """The merge of s1 must copy the origin out for s3 and s4 before overwriting it; in a
    full store under ``delete-oldest`` that room comes from the oldest snapshots that are
    not being merged (s2 first), never from s1, and the merge (or the origin write that
    merges the chunk first) goes through."""
    v = merging_oldest(tmp_path, stop_server, "error")
    results = fill(v, 4 * MiB, 8 * MiB, 0x50)  # fill up under "error": nothing deleted
    assert False in results
    ok("set", v.store, "full-policy=delete-oldest")
    if by == "merge worker":
        ok("merge", v.store, "s1")
        wait_merge_done(v.store)
    else:
        assert v.write(0x5A, 0, 64 * KiB), "an origin write over unmerged chunks got ENOSPC"
        ok("merge", v.store, "s1", "--wait", "--no-progress")
    st = v.verify()
    assert "s1" not in v.names()
    deleted = deleted_names(st)
    assert deleted and "s1" not in deleted and deleted == v.order[1:1 + len(deleted)]


def test_merge_in_a_full_store_under_error_policy_stops_then_resumes(tmp_path, stop_server):
    """Under ``error`` nothing is deleted: the merge cannot copy the origin out for s3 and
    s4, so ``merge --wait`` fails with StoreFull and the merge stays recorded (the origin
    still reads as s1, everything intact); once the user frees room it completes."""
    v = merging_oldest(tmp_path, stop_server, "error")
    results = fill(v, 4 * MiB, 8 * MiB, 0x50)
    assert False in results
    # merging the 64 chunks under this write first needs 64 copy-outs: no room for them
    assert not v.write(0x5A, 0, 256 * KiB), "a write over unmerged chunks needs room too"
    v.verify()
    v.server.stop()
    fails(6, "merge", v.store, "s1", "--wait", "--no-progress", match="full")
    st = merge_status(v.store)
    assert st["snapshot"] == "s1" and st["running"] is False, st
    assert ok_json("check", v.store)["clean"]
    assert v.names() == ["s1", "s2", "s3", "s4"]
    for name in ("s3", "s4"):  # the user makes room: no copy-outs are needed any more
        ok("snap", "delete", v.store, name)
        v.order.remove(name)
    ok("merge", v.store, "s1", "--wait", "--no-progress")
    v.serve()
    st = v.verify()
    assert v.names() == ["s2"] and st["merge"] is None and st["auto_deleted"] == []


def test_served_merge_wait_in_a_full_store_reports_store_full(tmp_path, stop_server):
    v = merging_oldest(tmp_path, stop_server, "error")
    with v.server:  # on a clean exit: SIGTERM, and no traceback in the server's log
        assert False in fill(v, 4 * MiB, 8 * MiB, 0x50)
        fails(6, "merge", v.store, "s1", "--wait", "--no-progress", match="full")
        st = merge_status(v.store)
        assert st["snapshot"] == "s1" and st["running"] is False, st
        assert st.get("error", {}).get("type") == "StoreFull", st
        v.verify()
        # the user makes room; the same command resumes and completes the merge
        for name in ("s3", "s4"):
            ok("snap", "delete", v.store, name)
            v.order.remove(name)
        ok("merge", v.store, "s1", "--wait", "--no-progress")
        st = v.verify()
        assert v.names() == ["s2"] and st["merge"] is None


@pytest.mark.parametrize("room", [160, 64, 16])
def test_a_merge_reuses_the_chunks_it_frees(tmp_path, stop_server, room):
    """s1's exceptions are its own: each merged chunk frees one, as each needs one for the
    copy-out for s2.  With ``room`` free chunks (far fewer than the 256 copy-outs) the
    merge must go through by reusing what it frees."""
    v = Vol(tmp_path, "6M")
    stop_server(v)
    v.serve()
    v.snap("s1")
    assert fill(v, 0, MiB, 0x11) == [True] * 4  # linear: runs of 32 chunks
    v.snap("s2")
    v.snap("s3")
    assert v.write(0x33, 7 * MiB, room * CHUNK, export="s3")  # chunks only s3 uses
    assert False in fill(v, MiB, 8 * MiB, 0x22), "the store never filled up"
    ok("snap", "delete", v.store, "s3")
    v.order.remove("s3")
    free = ok_json("status", v.store)["chunks_free"]
    assert room <= free < room + 64 < 256, free
    v.server.stop()
    ok("merge", v.store, "s1", "--wait", "--no-progress")
    v.model[:] = v.copies["s1"].read_bytes()
    v.order.remove("s1")
    v.serve()
    st = v.verify()
    assert v.names() == ["s2"] and st["auto_deleted"] == []
