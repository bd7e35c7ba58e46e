"""The ``ddsnap`` command line, run as a user runs it: real processes, real files.

Covers ``init``, ``snap create/list/delete``, ``status`` and ``check`` on a store nobody
serves and on a served one (through its control socket, with the same results); every
bad input with its exit code and one-line message; damaged metadata (leaf, root, snapshot
table, bitmap, superblocks); a missing or resized origin; a second ``serve`` and other
socket conflicts; deleting a snapshot a client has open; a full store and the per-chunk
limit of wide sharemaps; shutdown with clients connected; garbage on the control socket;
and a server killed with SIGKILL (idle or under write traffic) coming back through
journal replay.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import struct
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import crc32c
import pytest

from served import (
    DEADLINE,
    KiB,
    MiB,
    Served,
    control_request,
    ddsnap,
    fails,
    make_origin,
    ok,
    ok_json,
    read_export,
    tool,
    wait_until,
)

ORIGIN_SIZE = 16 * MiB
CHUNK = 64 * KiB
ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|\+00:00)$")


class Env:
    """An origin file of random data and a snapshot store for it, in ``tmp_path``."""

    def __init__(self, tmp_path: Path, store_size: str = "32M", init: bool = True,
                 *init_args: str):
        self.dir = tmp_path
        self.origin = tmp_path / "origin.img"
        self.store = tmp_path / "store.img"
        self.data = make_origin(self.origin, ORIGIN_SIZE)
        if init:
            ok("init", self.store, "--origin", self.origin, "--size", store_size, *init_args)

    def served(self, **kw) -> Served:
        return Served(self.store, **kw)


@pytest.fixture
def env(tmp_path):
    return Env(tmp_path)


@contextlib.contextmanager
def maybe_served(env: Env, served: bool):
    """Serve ``env.store`` for the block if ``served``; yields the Served or None."""
    if served:
        with env.served() as srv:
            yield srv
    else:
        yield None


def parse_utc(text: str) -> datetime:
    assert ISO_UTC.match(text), f"{text!r} is not ISO 8601 UTC"
    t = datetime.fromisoformat(text.replace("Z", "+00:00"))
    assert t.utcoffset() == timedelta(0)
    return t


def qemu_io(uri: str, *cmds: str, read_only: bool = False, check: bool = True):
    args = ["qemu-io", "-f", "raw"] + (["-r"] if read_only else [])
    for c in cmds:
        args += ["-c", c]
    return tool(*args, uri, check=check)


# --- metadata blocks, found by their self-identifying headers (docs: format v1) ----------

_HEADER = struct.Struct("<4sHHII QQ16s")
T_SUPER, T_SNAPTABLE, T_BITMAP, T_LEAF, T_NODE = 1, 2, 3, 4, 5
BLOCK = 4096


def home_blocks(path: Path, btype: int) -> list[int]:
    """Blocks of ``btype`` with a valid header that sit at their own block number (so
    not the copies inside the journal)."""
    data = path.read_bytes()
    out = []
    for b in range(len(data) // BLOCK):
        blk = data[b * BLOCK:(b + 1) * BLOCK]
        if blk[:4] != b"DDSN":
            continue
        _m, t, _v, crc, _r, bno, _seq, _u = _HEADER.unpack_from(blk)
        body = bytearray(blk)
        body[8:12] = bytes(4)
        if t == btype and bno == b and crc32c.crc32c(bytes(body)) == crc:
            out.append(b)
    return out


def damage(path: Path, block: int, offset: int = 2000, n: int = 8) -> None:
    """Invert ``n`` bytes at ``offset`` inside ``block`` (bit rot)."""
    with open(path, "r+b") as f:
        f.seek(block * BLOCK + offset)
        old = f.read(n)
        f.seek(block * BLOCK + offset)
        f.write(bytes(x ^ 0xFF for x in old))


# --- the normal life cycle, locally and through the control socket ------------------------


def test_init_reports_the_geometry(tmp_path):
    e = Env(tmp_path, init=False)
    p = ok("init", e.store, "--origin", e.origin, "--size", "8M", "--chunk-size", "16K",
           "--max-snapshots", "128")
    assert "created snapshot store" in p.stdout
    assert e.store.stat().st_size == 8 * MiB
    st = ok_json("status", e.store)
    assert st["chunk_size"] == 16 * KiB
    assert st["max_snapshots"] == 128
    assert st["origin"] == str(e.origin.resolve())
    assert st["origin_size"] == ORIGIN_SIZE
    assert st["store_size"] == 8 * MiB
    assert 0 < st["chunks_free"] <= st["chunks_total"] < 8 * MiB // (16 * KiB)
    assert st["chunks_used"] == st["chunks_total"] - st["chunks_free"]
    assert st["snapshots"] == [] and st["served"] is False
    assert ok_json("check", e.store) == {"clean": True, "fatal": 0, "warnings": 0,
                                         "findings": []}


def test_init_defaults_store_size_to_the_origin_size(tmp_path):
    e = Env(tmp_path, init=False)
    ok("init", e.store, "--origin", e.origin)
    assert e.store.stat().st_size == ORIGIN_SIZE
    st = ok_json("status", e.store)
    assert st["chunk_size"] == 64 * KiB and st["max_snapshots"] == 0  # no limit


def test_init_refuses_to_overwrite_a_store_unless_forced(env):
    ok("snap", "create", env.store, "keep")
    fails(16, "init", env.store, "--origin", env.origin, match="already holds a ddsnap")
    assert [s["name"] for s in ok_json("snap", "list", env.store)] == ["keep"]
    ok("init", env.store, "--origin", env.origin, "--force")
    assert ok_json("snap", "list", env.store) == []
    assert ok_json("check", env.store)["clean"]


@pytest.mark.parametrize("served", [False, True], ids=["local", "served"])
def test_snapshot_life_cycle(env, served):
    with maybe_served(env, served):
        t0 = datetime.now(UTC)
        p = ok("snap", "create", env.store, "monday")
        assert re.search(r"created snapshot monday \(id \d+\) at \S+", p.stdout), p.stdout
        ok("snap", "create", env.store, "tuesday", "--read-only")
        t1 = datetime.now(UTC)

        snaps = ok_json("snap", "list", env.store)
        assert [s["name"] for s in snaps] == ["monday", "tuesday"]
        assert [s["read_only"] for s in snaps] == [False, True]
        for s in snaps:
            assert {"name", "id", "created", "read_only"} <= set(s)
            assert isinstance(s["id"], int)
            created = parse_utc(s["created"])
            # the clock this process and ddsnap share; a loose sanity bound, not timing
            assert t0 - timedelta(minutes=5) <= created <= t1 + timedelta(minutes=5)
        assert snaps[0]["id"] < snaps[1]["id"]
        assert parse_utc(snaps[0]["created"]) <= parse_utc(snaps[1]["created"])

        text = ok("snap", "list", env.store).stdout
        assert "monday" in text and "tuesday" in text

        st = ok_json("status", env.store)
        assert st["served"] is served
        assert st["snapshots"] == snaps
        assert st["origin"] == str(env.origin.resolve())
        assert st["origin_size"] == ORIGIN_SIZE
        assert st["chunk_size"] == CHUNK
        assert ok_json("check", env.store)["clean"]
        assert "store is clean" in ok("check", env.store).stdout

        p = ok("snap", "delete", env.store, "monday")
        assert "deleted snapshot monday" in p.stdout
        assert [s["name"] for s in ok_json("snap", "list", env.store)] == ["tuesday"]
        # ids are never reused, even once a snapshot is gone
        ok("snap", "create", env.store, "monday")
        again = ok_json("snap", "list", env.store)
        assert [s["name"] for s in again] == ["tuesday", "monday"]
        assert again[1]["id"] > snaps[1]["id"]
        assert ok_json("check", env.store)["clean"]
    # whatever was done through the server is there once it stopped
    assert ok_json("snap", "list", env.store) == again


def test_served_and_local_answers_are_the_same(env):
    """status, snap list and check give the same answers through the control socket as
    when the CLI opens the store itself (only ``served`` differs, and what only a server
    knows: its metadata server's addresses and nodes)."""
    ok("snap", "create", env.store, "a")
    ok("snap", "create", env.store, "b", "--read-only")
    only_served = ("metadata", "nodes", "lapsed")

    def answers():
        st = ok_json("status", env.store)
        served = st.pop("served")
        st.pop("recovered_transactions", None)
        extra = {k: st.pop(k) for k in only_served if k in st}
        return (served, extra), st, ok_json("snap", "list", env.store), \
            ok_json("check", env.store)

    ok_json("status", env.store)  # any recovery done, so both runs start equal
    (served_l, extra_l), *local = answers()
    with env.served() as srv:
        (served_s, extra_s), *remote = answers()
        assert srv.control("snap_list") == local[1]
    assert (served_l, served_s) == (False, True)
    assert extra_l == {}
    if extra_s:  # served with workers: their metadata server and its worker nodes
        assert extra_s["metadata"] == [] and extra_s["lapsed"] == {}
        assert {n["peer"] for n in extra_s["nodes"]} == {"unix"}
    assert remote == local
    assert local[2]["clean"]


def test_status_counts_copied_out_chunks_and_delete_frees_them(env):
    with env.served() as srv:
        free0 = ok_json("status", env.store)["chunks_free"]
        ok("snap", "create", env.store, "s1")
        qemu_io(srv.uri("origin"), "write -P 0x22 0 1M")  # 16 chunks copied out for s1
        free1 = ok_json("status", env.store)["chunks_free"]
        assert free1 <= free0 - 16
        ok("snap", "create", env.store, "s2")
        qemu_io(srv.uri("origin"), "write -P 0x23 0 2M")  # 16 for s2 only, 16 for both
        free2 = ok_json("status", env.store)["chunks_free"]
        assert free2 <= free1 - 32
        st = ok_json("status", env.store)
        assert st["chunks_used"] == st["chunks_total"] - st["chunks_free"]
        ok("snap", "delete", env.store, "s1")
        free3 = ok_json("status", env.store)["chunks_free"]
        assert free3 >= free2 + 16, "deleting s1 did not free the chunks only s1 used"
        ok("snap", "delete", env.store, "s2")
        assert ok_json("status", env.store)["chunks_free"] == free0
        assert ok_json("check", env.store) == {"clean": True, "fatal": 0, "warnings": 0,
                                               "findings": []}
    assert ok_json("check", env.store)["clean"]


def test_served_store_found_through_a_custom_control_path(env, tmp_path):
    with env.served(control=tmp_path / "admin.sock") as srv:
        ok("snap", "create", env.store, "x")
        assert ok_json("status", env.store)["served"] is True
        assert [s["name"] for s in srv.control("snap_list")] == ["x"]


# --- bad input: exit code, one line, no traceback -------------------------------------------


def test_wrong_paths_and_things_that_are_not_stores(env, tmp_path):
    missing = tmp_path / "missing.img"
    for cmd in (["status"], ["check"], ["snap", "list"], ["snap", "create"],
                ["snap", "delete"], ["serve"]):
        extra = ["x"] if cmd[0] == "snap" and cmd[1] != "list" else []
        if cmd == ["serve"]:
            extra = ["--listen", f"unix:{tmp_path}/nope.sock"]
        fails(3, *cmd, missing, *extra, match="not found: .*missing.img")
    junk = tmp_path / "junk.img"
    junk.write_bytes(os.urandom(1 * MiB))
    empty = tmp_path / "empty.img"
    empty.touch()
    for path in (junk, empty, env.origin):
        for cmd in (["status"], ["check"], ["snap", "list"]):
            fails(4, *cmd, path, match="is not a ddsnap snapshot store")
    fails(4, "serve", junk, "--listen", f"unix:{tmp_path}/j.sock",
          match="not a ddsnap snapshot store")
    assert junk.read_bytes()[:4] != b"DDSN"
    fails(2, "status", tmp_path, match="directory")
    # init's own path checks
    fails(3, "init", tmp_path / "new.img", "--origin", tmp_path / "no-origin.img",
          match="origin not found")
    fails(2, "init", tmp_path / "new2.img", "--origin", empty, match="empty")


@pytest.mark.parametrize("same", ["same path", "symlink"])
def test_init_refuses_the_origin_as_its_own_store(tmp_path, same):
    e = Env(tmp_path, init=False)
    store = e.origin
    if same == "symlink":
        store = tmp_path / "link.img"
        store.symlink_to(e.origin.name)
    p = ddsnap("init", store, "--origin", e.origin)
    try:
        assert e.origin.read_bytes() == e.data, "init overwrote the origin's data"
        assert p.returncode == 2, p
        assert p.stderr.startswith("ddsnap: ") and len(p.stderr.splitlines()) == 1, p.stderr
    finally:
        e.origin.write_bytes(e.data)


def test_init_force_on_a_served_store_is_refused(env):
    ok("snap", "create", env.store, "keep")
    with env.served() as srv:
        fails(9, "init", env.store, "--origin", env.origin, "--force", match="in use")
        assert [s["name"] for s in ok_json("snap", "list", env.store)] == ["keep"]
        tool("nbdinfo", srv.uri("keep"))
    assert ok_json("check", env.store)["clean"]


@pytest.mark.parametrize("args, match", [
    (["--chunk-size", "3K"], "power of two"),
    (["--chunk-size", "2K"], "power of two"),
    (["--chunk-size", "2M"], "power of two"),
    (["--chunk-size", "lots"], "not a size"),
    (["--max-snapshots", "-1"], "no limit"),
    (["--max-snapshots", "many"], "not a number"),
    (["--max-snapshots", str(1 << 32)], "no limit"),
    (["--size", "-5M"], "not a size"),
    (["--size", "16K"], "too small"),
])
def test_init_bad_geometry(tmp_path, args, match):
    e = Env(tmp_path, init=False)
    fails(2, "init", e.store, "--origin", e.origin, *args, match=match)


def test_init_bad_geometry_leaves_no_store_file_behind(tmp_path):
    """A refused init must not leave a half-made store file: the obvious retry (the same
    command with a corrected option) would then be refused for --size."""
    e = Env(tmp_path, init=False)
    fails(2, "init", e.store, "--origin", e.origin, "--size", "8M", "--chunk-size", "3K")
    assert not e.store.exists(), "a refused init left the store file behind"
    ok("init", e.store, "--origin", e.origin, "--size", "8M", "--chunk-size", "4K")


def test_non_numeric_max_snapshots_is_a_usage_error(tmp_path):
    e = Env(tmp_path, init=False)
    p = ddsnap("init", e.store, "--origin", e.origin, "--max-snapshots", "many")
    assert p.returncode == 2, p
    assert "Traceback" not in p.stderr and "--max-snapshots" in p.stderr
    assert not e.store.exists()


def test_non_numeric_max_snapshots_is_one_line(tmp_path):
    e = Env(tmp_path, init=False)
    fails(2, "init", e.store, "--origin", e.origin, "--max-snapshots", "many",
          match="max-snapshots")


def test_snapshot_name_errors_locally_and_served(env):
    def bad_names():
        return [
            fails(7, "snap", "create", env.store, "one", match="already exists: one"),
            fails(8, "snap", "delete", env.store, "two", match="no such snapshot: two"),
            fails(2, "snap", "create", env.store, "", match="1 to 255 bytes"),
            fails(2, "snap", "create", env.store, "a/b", match="'/'"),
            fails(2, "snap", "create", env.store, "x" * 256, match="1 to 255 bytes"),
            # "origin" names the origin export, so no snapshot may take it
            fails(2, "snap", "create", env.store, "origin", match="origin"),
        ]

    ok("snap", "create", env.store, "one")
    local = bad_names()
    with env.served():
        served = bad_names()
        assert [s["name"] for s in ok_json("snap", "list", env.store)] == ["one"]
        assert ok_json("check", env.store)["clean"]
    # a served store gives exactly the messages and exit codes a local one does
    assert served == local


def test_too_many_snapshots(tmp_path):
    e = Env(tmp_path, "32M", True, "--max-snapshots", "64")
    with e.served() as srv:
        for i in range(64):
            srv.control("snap_create", name=f"s{i}")
        served_line = fails(11, "snap", "create", e.store, "s64")
        ok("snap", "delete", e.store, "s10")
        ok("snap", "create", e.store, "s64")  # the freed slot is used again
        assert len(ok_json("snap", "list", e.store)) == 64
    local_line = fails(11, "snap", "create", e.store, "s65")
    assert local_line == served_line.replace("s64", "s65")
    assert ok_json("check", e.store)["clean"]


# --- the origin -------------------------------------------------------------------------------


def test_origin_missing(env):
    ok("snap", "create", env.store, "s")
    moved = env.origin.with_name("moved.img")
    env.origin.rename(moved)
    for cmd in (["status"], ["snap", "list"], ["snap", "create"]):
        extra = ["t"] if cmd == ["snap", "create"] else []
        fails(10, *cmd, env.store, *extra, match=r"origin.*does not exist")
    fails(10, "serve", env.store, "--listen", f"unix:{env.dir}/o.sock",
          match="does not exist")
    # check reads only the store's metadata (clean), and says what is wrong with the origin
    report = ok_json("check", env.store)
    assert report["clean"] and "does not exist" in report["findings"][0]["message"]
    moved.rename(env.origin)
    # A rename changes the file's ctime: that is a change to acknowledge.
    fails(10, "status", env.store, match=r"changed since \(ctime\)")
    ok("set", env.store, f"origin={env.origin}")
    assert [s["name"] for s in ok_json("snap", "list", env.store)] == ["s"]
    assert ok_json("check", env.store)["clean"]


def test_origin_grown_while_unserved(env):
    """An origin file grown behind the store's back is a change to acknowledge (as any
    other); once acknowledged it is served at the recorded size until `resize`."""
    ok("snap", "create", env.store, "s")
    os.truncate(env.origin, ORIGIN_SIZE + MiB)
    for cmd in (["status"], ["snap", "list"]):
        fails(10, *cmd, env.store, match=rf"size 16 MiB \({ORIGIN_SIZE} bytes\) -> 17 MiB "
                                         rf"\({ORIGIN_SIZE + MiB} bytes\)")
    fails(10, "serve", env.store, "--listen", f"unix:{env.dir}/o.sock")
    ok("set", env.store, f"origin={env.origin}")
    assert ok_json("status", env.store)["origin_size"] == ORIGIN_SIZE
    assert ok_json("check", env.store)["clean"]
    ok("resize", env.store, "--origin-size", str(ORIGIN_SIZE + MiB))
    assert ok_json("status", env.store)["origin_size"] == ORIGIN_SIZE + MiB
    assert [s["size"] for s in ok_json("snap", "list", env.store)] == [ORIGIN_SIZE]


@pytest.mark.parametrize("new_size", [ORIGIN_SIZE - 64 * KiB])
def test_origin_resized(env, new_size):
    ok("snap", "create", env.store, "s")
    os.truncate(env.origin, new_size)
    for cmd in (["status"], ["snap", "list"]):
        fails(10, *cmd, env.store, match=rf"\({new_size} bytes\) but the store was made "
                                         rf"for 16 MiB \({ORIGIN_SIZE} bytes\)")
    assert "but the store was made for" in ok_json("check", env.store)["findings"][0]["message"]
    fails(10, "serve", env.store, "--listen", f"unix:{env.dir}/o.sock")
    fails(10, "set", env.store, f"origin={env.origin}", match="but the store was made for")
    os.truncate(env.origin, ORIGIN_SIZE)
    # Same size again, but changed behind the store's back: refused until acknowledged.
    fails(10, "status", env.store, match=r"modified since \(mtime\)")
    ok("set", env.store, f"origin={env.origin}")
    assert ok_json("check", env.store)["clean"]


# --- damaged metadata ---------------------------------------------------------------------------


@pytest.fixture
def used_store(env):
    """A store with two snapshots and copied-out data, cleanly shut down; returns
    ``(env, expected snapshot contents)``."""
    ok("snap", "create", env.store, "s1")
    with env.served() as srv:
        qemu_io(srv.uri("origin"), "write -P 0x41 0 1M", "write -P 0x42 5M 200K")
        ok("snap", "create", env.store, "s2")
        qemu_io(srv.uri("origin"), "write -P 0x43 512K 1M")
        s2 = read_export(srv, "s2", env.dir / "s2.expected")
    assert ok_json("check", env.store)["clean"]
    return env, {"s1": env.data, "s2": s2}


def _single(blocks: list[int], what: str) -> int:
    assert len(blocks) == 1, f"expected one {what} in the test store, found {blocks}"
    return blocks[0]


@pytest.mark.parametrize("served", [False, True], ids=["local", "served"])
def test_check_names_a_damaged_leaf(used_store, served):
    env, _ = used_store
    leaf = _single(home_blocks(env.store, T_LEAF), "leaf")
    damage(env.store, leaf)
    # the root is intact, so the store opens (and can be served); check finds the leaf
    with maybe_served(env, served):
        p = ddsnap("check", env.store, "--json")
        assert p.returncode == 5, p
        report = json.loads(p.stdout)
        assert report["clean"] is False and report["fatal"] >= 1
        fatal = [f for f in report["findings"] if f["severity"] == "fatal"]
        assert any(f["block"] == leaf and "leaf" in f["message"] for f in fatal), report
        p = ddsnap("check", env.store)
        assert p.returncode == 5 and "Traceback" not in p.stderr
        assert f"fatal (block {leaf})" in p.stdout, p.stdout


def test_damaged_leaf_is_never_read_as_data(used_store):
    """A snapshot read that needs a damaged leaf fails with EIO; it does not return
    whatever the origin holds now, and an origin write that needs it is refused."""
    env, expected = used_store
    damage(env.store, _single(home_blocks(env.store, T_LEAF), "leaf"))
    before = env.origin.read_bytes()
    with env.served() as srv:
        p = qemu_io(srv.uri("s1"), "read 0 64K", read_only=True, check=False)
        assert p.returncode != 0 and "Input/output error" in p.stdout + p.stderr, p
        p = qemu_io(srv.uri("origin"), "write -P 0x77 0 4K", check=False)
        assert p.returncode != 0 and "Input/output error" in p.stdout + p.stderr, p
    assert env.origin.read_bytes() == before, "an origin write went ahead without its copy-out"


@pytest.mark.parametrize("what, btype", [
    ("root index node", T_NODE),
    ("snapshot table", T_SNAPTABLE),
    ("bitmap", T_BITMAP),
])
def test_damaged_metadata_the_open_needs(used_store, what, btype):
    env, _ = used_store
    blocks = home_blocks(env.store, btype)
    if btype == T_NODE:
        _single(blocks, what)  # a one-level tree: the only index node is the root
    block = blocks[0]  # the first snapshot-table block holds s1 and s2
    damage(env.store, block)
    msg = rf"corrupt metadata in block {block}\b"
    for cmd in (["status"], ["snap", "list"]):
        fails(5, *cmd, env.store, match=msg)
    fails(5, "serve", env.store, "--listen", f"unix:{env.dir}/d.sock", match=msg)
    p = ddsnap("check", env.store, "--json")
    assert p.returncode == 5 and "Traceback" not in p.stderr, p
    report = json.loads(p.stdout)
    assert not report["clean"]
    assert any(f["severity"] == "fatal" and f["block"] == block for f in report["findings"])
    # nothing was "repaired" behind the user's back
    assert block not in home_blocks(env.store, btype), f"the damaged {what} was rewritten"


def test_both_superblocks_damaged(used_store):
    env, _ = used_store
    damage(env.store, 0, 100)
    damage(env.store, 1, 100)
    for cmd in (["status"], ["snap", "list"]):
        fails(5, *cmd, env.store, match=r"corrupt metadata in block [01]\b")
    p = ddsnap("check", env.store)
    assert p.returncode == 5 and "Traceback" not in p.stderr, p
    assert re.search(r"^fatal \(block [01]\): .*superblock", p.stdout, re.M), p.stdout
    p = ddsnap("check", env.store, "--json")
    assert p.returncode == 5
    assert json.loads(p.stdout)["findings"][0]["block"] in (0, 1)
    fails(5, "serve", env.store, "--listen", f"unix:{env.dir}/d.sock")
    # with the magic itself gone, the snapshot table still says "store": damage, not
    # "not a store" (issue 8)
    damage(env.store, 0, 0, 4)
    damage(env.store, 1, 0, 4)
    fails(5, "status", env.store, match=r"block 0: both superblock slots are damaged")
    p = ddsnap("check", env.store)
    assert p.returncode == 5 and "both superblock slots" in p.stdout, p


@pytest.mark.parametrize("slot", [0, 1])
def test_one_damaged_superblock_falls_back_to_the_other(used_store, slot):
    env, expected = used_store
    damage(env.store, slot, 100)
    assert [s["name"] for s in ok_json("snap", "list", env.store)] == ["s1", "s2"]
    with env.served() as srv:
        for name, data in expected.items():
            assert read_export(srv, name, env.dir / f"{name}.read") == data, name
    assert ok_json("check", env.store)["clean"]


# --- serving ---------------------------------------------------------------------------------


def test_second_serve_is_refused_while_the_first_keeps_serving(env, tmp_path):
    with env.served() as srv:
        for listen in (f"unix:{tmp_path}/other.sock", f"unix:{srv.sock}"):
            fails(9, "serve", env.store, "--listen", listen,
                  match=r"in use by another ddsnap process")
        assert not (tmp_path / "other.sock").exists()
        # the first server still answers on both of its sockets
        assert srv.sock.exists() and srv.ctl.exists()
        qemu_io(srv.uri("origin"), "write -P 0x5a 0 64K")
        ok("snap", "create", env.store, "after")
        qemu_io(srv.uri("after"), "read -P 0x5a 0 64K", read_only=True)
        assert ok_json("status", env.store)["served"] is True
        # a local open is refused too, so admin commands go through the socket
        assert srv.proc.poll() is None


def test_serve_bad_listen_addresses(env):
    import socket as _socket

    for bad in ("bogus", "tcp:127.0.0.1", "unix:", "tcp:127.0.0.1:99999"):
        fails(2, "serve", env.store, "--listen", bad, match="listen address")
    with _socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        fails(22, "serve", env.store, "--listen", f"tcp:127.0.0.1:{port}",
              match="cannot listen.*in use")
    # nothing was left behind, and the store opens normally
    assert not env.store.with_name("store.img.ctl").exists()
    assert ok_json("status", env.store)["served"] is False


def test_serve_refuses_another_servers_nbd_socket(env, tmp_path):
    (tmp_path / "b").mkdir()
    other = Env(tmp_path / "b")
    with env.served() as srv:
        fails(22, "serve", other.store, "--listen", f"unix:{srv.sock}", match="in use")
        assert srv.sock.exists()
        tool("nbdinfo", srv.uri("origin"))
        ok_json("status", env.store)
    # and the refused store is left unserved and usable
    assert ok_json("status", other.store)["served"] is False


def test_serve_refuses_another_servers_control_socket(env, tmp_path):
    (tmp_path / "b").mkdir()
    other = Env(tmp_path / "b")
    with env.served() as srv:
        fails(20, "serve", other.store, "--listen", f"unix:{tmp_path}/b/n.sock",
              "--control", srv.ctl, match="in use by another server")
        assert srv.ctl.exists(), "the refused serve removed the first server's control socket"
        assert ok_json("status", env.store)["served"] is True


def test_snapshot_in_use_cannot_be_deleted(env):
    ok("snap", "create", env.store, "busy")
    with env.served() as srv:
        # nbdcopy reads the snapshot into a pipe we stop reading: it stays connected
        reader = subprocess.Popen(["nbdcopy", srv.uri("busy"), "-"], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE)
        assert reader.stdout is not None  # a pipe
        try:
            head = reader.stdout.read(4096)  # it is connected and reading
            assert head == env.data[:4096]
            fails(12, "snap", "delete", env.store, "busy", match=r"busy is in use")
            assert [s["name"] for s in ok_json("snap", "list", env.store)] == ["busy"]
            rest, err = reader.communicate(timeout=DEADLINE)
            assert reader.returncode == 0, err
            assert head + rest == env.data
        finally:
            if reader.poll() is None:
                reader.kill()
                reader.wait()
        # the server notices the disconnect on its own schedule: retry until it has
        def deleted():
            p = ddsnap("snap", "delete", env.store, "busy")
            assert p.returncode in (0, 12), p
            return p.returncode == 0
        wait_until(deleted, "the snapshot to become deletable after the client left")
        assert ok_json("snap", "list", env.store) == []
        # the origin is not a snapshot: an open origin export does not block anything
        assert ok_json("check", env.store)["clean"]


# --- a full store --------------------------------------------------------------------------


def test_full_store_fails_origin_writes_with_enospc_and_keeps_snapshots(tmp_path):
    env = Env(tmp_path, "4M")  # ~46 chunks of 64 KiB for a 16 MiB origin
    ok("snap", "create", env.store, "s1", "--read-only")
    with env.served() as srv:
        qemu_io(srv.uri("origin"), "write -P 0x11 0 512K")
        ok("snap", "create", env.store, "s2")
        s2 = bytearray(env.data)
        s2[:512 * KiB] = b"\x11" * (512 * KiB)
        expected = {"s1": env.data, "s2": bytes(s2)}
        origin = bytearray(s2)

        results = []
        for i in range(ORIGIN_SIZE // MiB):
            p = qemu_io(srv.uri("origin"), f"write -P 0xaa {i * MiB} 1M", check=False)
            results.append(p.returncode)
            if p.returncode == 0:
                origin[i * MiB:(i + 1) * MiB] = b"\xaa" * MiB
            else:
                assert "No space left on device" in p.stdout + p.stderr, p
        assert 0 in results, "not even the first write fitted"
        assert results[-1] != 0, "the store never filled up"
        # a writable snapshot runs out of room the same way
        p = qemu_io(srv.uri("s2"), f"write -P 0xbb {ORIGIN_SIZE - MiB} 1M", check=False)
        assert p.returncode != 0 and "No space left on device" in p.stdout + p.stderr, p

        assert ok_json("status", env.store)["chunks_free"] == 0
        for name, data in expected.items():
            assert read_export(srv, name, tmp_path / f"{name}.read") == data, \
                f"snapshot {name} changed when the store filled up"
        # every acknowledged origin write is there
        got = read_export(srv, "origin", tmp_path / "origin.read")
        for i, rc in enumerate(results):
            if rc == 0:
                assert got[i * MiB:(i + 1) * MiB] == origin[i * MiB:(i + 1) * MiB], i
        assert ok_json("check", env.store)["clean"]

        # deleting a snapshot gives room back: a failed write now succeeds
        ok("snap", "delete", env.store, "s2")
        assert ok_json("status", env.store)["chunks_free"] > 0
        first_failed = results.index(next(r for r in results if r != 0))
        qemu_io(srv.uri("origin"), f"write -P 0xcc {first_failed * MiB} 64K")
        assert read_export(srv, "s1", tmp_path / "s1.again") == expected["s1"]
    assert ok_json("check", env.store)["clean"]


# --- crash: SIGKILL and journal replay -----------------------------------------------------------


@pytest.mark.parametrize("recover_by", ["restart", "local"])
def test_sigkill_then_journal_replay(env, recover_by):
    ok("snap", "create", env.store, "s1")
    origin = bytearray(env.data)
    srv = env.served().start()
    try:
        qemu_io(srv.uri("origin"), "write -P 0x31 0 1M", "write -P 0x32 3145828 5000")
        origin[:MiB] = b"\x31" * MiB
        origin[3145828:3145828 + 5000] = b"\x32" * 5000
        ok("snap", "create", env.store, "s2")
        s2 = bytearray(origin)
        qemu_io(srv.uri("origin"), "write -P 0x33 524288 1M")
        origin[524288:524288 + MiB] = b"\x33" * MiB
        qemu_io(srv.uri("s2"), "write -P 0x34 8388608 65536", "write -P 0x35 100 10")
        s2[8388608:8388608 + 65536] = b"\x34" * 65536
        s2[100:110] = b"\x35" * 10
    except BaseException:
        srv.kill()
        raise
    srv.kill()
    assert srv.ctl.exists(), "SIGKILL cannot clean up: the stale control socket is expected"

    expected = {"s1": env.data, "s2": bytes(s2), "origin": bytes(origin)}
    if recover_by == "restart":
        # a new server replaces the stale sockets and replays the journal
        with env.served() as srv:
            st = srv.control("status")
            check_recovered(env, st, expected, srv)
    else:
        st = ok_json("status", env.store)  # opening it locally replays the journal
        assert st["served"] is False
        with env.served() as srv:
            check_recovered(env, st, expected, srv)
    assert ok_json("check", env.store) == {"clean": True, "fatal": 0, "warnings": 0,
                                           "findings": []}


def check_recovered(env: Env, st: dict, expected: dict, srv: Served) -> None:
    assert st["recovered_transactions"] > 0, st
    assert [s["name"] for s in st["snapshots"]] == ["s1", "s2"]
    assert env.origin.read_bytes() == expected["origin"]
    assert ok_json("check", env.store)["clean"]
    for name, data in expected.items():
        assert read_export(srv, name, env.dir / f"{name}.read") == data, name


def test_sigkill_while_an_origin_writer_is_busy(env):
    """Kill the server in the middle of copy-on-write traffic: after recovery every
    snapshot still reads exactly what it held, and the metadata is consistent."""
    if subprocess.run(["fio", "--enghelp=nbd"], capture_output=True).returncode != 0:
        pytest.skip("fio with the nbd engine is needed to keep writes in flight")
    ok("snap", "create", env.store, "s1")
    ok("snap", "create", env.store, "s2", "--read-only")
    srv = env.served().start()
    writer = None
    try:
        free0 = srv.control("status")["chunks_free"]
        writer = subprocess.Popen(
            ["fio", "--name=busy", "--ioengine=nbd", f"--uri={srv.uri('origin')}",
             "--rw=randwrite", "--bsrange=4k-64k", "--iodepth=16", "--time_based",
             "--runtime=300", "--size=16M", "--verify_state_save=0"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=env.dir)
        # crash once copy-outs are under way (a condition, not a delay)
        wait_until(lambda: srv.control("status")["chunks_free"] <= free0 - 40,
                   "copy-outs to happen")
    finally:
        srv.kill()
        if writer is not None:
            try:
                writer.wait(DEADLINE)
            except subprocess.TimeoutExpired:
                writer.kill()
                writer.wait()
    with env.served() as srv:
        assert ok_json("check", env.store)["clean"]
        for name in ("s1", "s2"):
            assert read_export(srv, name, env.dir / f"{name}.read") == env.data, name
        qemu_io(srv.uri("origin"), "write -P 0x66 0 1M", "read -P 0x66 0 1M")
        assert read_export(srv, "s1", env.dir / "s1.again") == env.data
    assert ok_json("check", env.store)["clean"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_shutdown_with_a_client_connected(env, sig):
    """SIGTERM/SIGINT with a client still connected: the server exits 0 and removes its
    sockets, the client sees its connection end, the store is left clean."""
    ok("snap", "create", env.store, "a")
    srv = env.served().start()
    reader = subprocess.Popen(["nbdcopy", srv.uri("a"), "-"], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL)
    assert reader.stdout is not None  # a pipe
    try:
        assert reader.stdout.read(4096) == env.data[:4096]  # connected and reading
        rc = srv.reap(sig)
        assert rc == 0, srv.output()
        assert "Traceback" not in srv.output()
        assert not srv.ctl.exists() and not srv.sock.exists()
    finally:
        reader.stdout.close()
        try:
            reader.wait(DEADLINE)
        except subprocess.TimeoutExpired:
            reader.kill()
            reader.wait()
        if srv.returncode is None:
            srv.kill()
    st = ok_json("status", env.store)
    assert st["served"] is False
    assert ok_json("check", env.store)["clean"]


def test_control_socket_survives_bad_requests(env):
    """Garbage on the control socket is answered with a ProtocolError and does not
    disturb the server (docs/protocol.md, control socket)."""
    import socket as _socket

    with env.served() as srv:
        for raw in (b"not json\n", b"[1, 2]\n", b'{"op": 5}\n', b'{"op": "status", "args": 3}\n'):
            with _socket.socket(_socket.AF_UNIX) as s:
                s.settimeout(DEADLINE)
                s.connect(str(srv.ctl))
                s.sendall(raw)
                reply = json.loads(s.makefile("rb").readline())
            assert reply["ok"] is False and reply["error"]["type"] == "ProtocolError", reply
        reply = control_request(srv.ctl, "no_such_op")
        assert reply["ok"] is False and reply["error"]["type"] == "ProtocolError", reply
        reply = control_request(srv.ctl, "snap_create", {"name": "x", "colour": "red"})
        assert reply["ok"] is False and reply["error"]["type"] == "ProtocolError", reply
        reply = control_request(srv.ctl, "snap_delete", {"name": "nope"})
        assert reply["error"]["type"] == "SnapshotNotFound", reply
        # still serving, both sockets
        ok("snap", "create", env.store, "x")
        tool("nbdinfo", srv.uri("x"))


def test_one_chunk_written_between_many_snapshots_over_nbd(tmp_path):
    """The issue-9 newcomer: a store made with --max-snapshots 1024, a snapshot taken
    after each write of the same 4 KiB of the origin.  v2 failed the 31st write with
    ENOSPC (29 exceptions per chunk); now every write succeeds and every snapshot holds
    its version."""
    env = Env(tmp_path, "32M", True, "--max-snapshots", "1024")
    n = 80
    with env.served() as srv:
        for i in range(1, n + 1):
            srv.control("snap_create", name=f"v{i}")
            qemu_io(srv.uri("origin"), f"write -P {i} 0 4K")
        for i in (1, 2, 31, 32, n // 2, n):
            first = env.data[:4096] if i == 1 else bytes([i - 1]) * 4096
            got = qemu_io(srv.uri(f"v{i}"), "read -v 0 16", read_only=True).stdout
            want = " ".join(f"{b:02x}" for b in first[:16])
            assert want in got, (i, got)
        qemu_io(srv.uri("origin"), f"read -P {n} 0 4K")
        assert len(ok_json("snap", "list", env.store)) == n
        assert ok_json("check", env.store)["clean"]


def test_snapshots_of_snapshots_from_the_cli(tmp_path):
    """snap create --from: a writable clone and a read-only one, exported like any
    snapshot; snap list shows the parent; deleting the parent keeps the clones."""
    env = Env(tmp_path, "32M", True)
    ok("snap", "create", env.store, "base")
    with env.served() as srv:
        qemu_io(srv.uri("base"), "write -P 0x11 0 64K")
        out = ok("snap", "create", env.store, "vm1", "--from", "base").stdout
        assert "vm1" in out and "of base" in out
        ok("snap", "create", env.store, "frozen", "--from", "vm1", "--read-only")
        qemu_io(srv.uri("vm1"), "write -P 0x22 0 4K")
        qemu_io(srv.uri("base"), "write -P 0x33 4K 4K")
        qemu_io(srv.uri("vm1"), "read -P 0x22 0 4K")
        qemu_io(srv.uri("vm1"), "read -P 0x11 4K 60K")
        qemu_io(srv.uri("frozen"), "read -P 0x11 0 64K", read_only=True)
        qemu_io(srv.uri("base"), "read -P 0x33 4K 4K")
        p = qemu_io(srv.uri("frozen"), "write -P 0x44 0 4K", check=False)
        assert p.returncode != 0
        snaps = {s["name"]: s for s in ok_json("snap", "list", env.store)}
        assert (snaps["base"]["parent"], snaps["vm1"]["parent"],
                snaps["frozen"]["parent"]) == ("origin", "base", "vm1")
        assert snaps["vm1"]["parent_id"] == snaps["base"]["id"]
        fails(8, "snap", "create", env.store, "x", "--from", "nonesuch", match="nonesuch")
        ok("snap", "delete", env.store, "base")
        snaps = {s["name"]: s for s in ok_json("snap", "list", env.store)}
        assert set(snaps) == {"vm1", "frozen"} and snaps["vm1"]["parent"] is None
        qemu_io(srv.uri("vm1"), "read -P 0x11 4K 60K")
        qemu_io(srv.uri("frozen"), "read -P 0x11 0 64K", read_only=True)
        assert ok_json("check", env.store)["clean"]
    assert "(deleted)" in ok("snap", "list", env.store).stdout
