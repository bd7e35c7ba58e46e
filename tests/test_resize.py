"""``ddsnap resize``: the origin and the snapshot store grown and shrunk, as a user does it.

Real processes only: the ``ddsnap`` command, a real ``ddsnap serve``, real NBD clients
(nbdinfo, qemu-io, nbdcopy) and, for a connection held open across a resize, the raw
protocol client of ``nbd_helpers``; a loop device for a block device origin (root only).

Covered, on an unserved store and through a server's control socket:

* the origin grown: the file is extended with zeroes, ``status``/``snap list`` show the
  sizes, old snapshots keep theirs, new ones (and clones of new ones) get the new size, a
  clone of an old snapshot its parent's; the text and ``--json`` output;
* the origin shrunk: refused (exit 26) while a snapshot (or a deleted snapshot kept for
  its clone) is bigger, naming it, or while a connection has the origin export open, with
  nothing changed; allowed once they are gone, the file truncated;
* bad sizes and no option at all (exit 2, one clear line);
* the store grown (new chunks free at once: a full store takes writes again, served) and
  shrunk (refused naming the snapshot whose data lives past the new end, then allowed);
* NBD sizes: new connections see the new origin size, an existing one keeps the old one,
  snapshots their own; data written past the old end reads back, older snapshots keep
  their bytes;
* the sizes after a clean restart and after a crash of the server;
* a loop device origin grown with ``losetup -c``: served at the recorded size until
  ``resize`` records the new one; a size beyond the device is refused (exit 2);
* merges: a snapshot of another size than the origin is refused (exit 2), the origin
  cannot be resized while a merge is in progress (exit 17).

``check`` must find the store clean after every change.

Two tests record bugs found here and fixed: copy-outs made past the old end for a deleted
snapshot were kept for an older, smaller one; a store on a block device reported the
device's size instead of its own.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from ddsnap.nbd.wire import Command
from nbd_helpers import RawClient
from served import (
    KiB,
    MiB,
    Served,
    ddsnap,
    fails,
    is_root,
    loop_device,
    make_origin,
    merge_status,
    need,
    ok,
    ok_json,
    read_export,
    this_tree_first,
    tool,
    wait_until,
)

pytestmark = pytest.mark.clients

#: the origin as each test makes it, and the store's chunk size
SIZE = 4 * MiB
CHUNK = 64 * KiB
NBD_EINVAL = 22
NBD_ENOSPC = 28
CLEAN = {"clean": True, "fatal": 0, "warnings": 0, "findings": []}

@pytest.fixture(autouse=True, scope="module")
def this_tree():
    """Every ddsnap process of these tests runs this tree's sources."""
    with this_tree_first():
        yield


class Env:
    """An origin file of ``SIZE`` bytes of random data and a store for it (64 KiB chunks)."""

    def __init__(self, tmp_path: Path, store_size: str = "16M", seed: int = 1):
        self.dir = tmp_path
        self.origin = tmp_path / "origin.img"
        self.store = tmp_path / "store.img"
        self.data = make_origin(self.origin, SIZE, seed=seed)
        ok("init", self.store, "--origin", self.origin, "--size", store_size,
           "--chunk-size", "64K")

    def served(self, workers: int = 0) -> Served:
        return Served(self.store, workers=workers)

    def status(self) -> dict:
        return ok_json("status", self.store)

    def sizes(self) -> dict[str, int]:
        """Snapshot name -> size, from ``snap list --json``."""
        return {s["name"]: s["size"] for s in ok_json("snap", "list", self.store)}

    def assert_clean(self) -> None:
        assert ok_json("check", self.store) == CLEAN

    def read(self, srv: Served, export: str) -> bytes:
        return read_export(srv, export, self.dir / f"{export}.read")


def qemu_io(uri: str, *cmds: str, check: bool = True) -> subprocess.CompletedProcess:
    args = ["qemu-io", "-f", "raw"]
    for c in cmds:
        args += ["-c", c]
    return tool(*args, uri, check=check)


def nbd_size(uri: str) -> int:
    """The export size a new connection is told (``nbdinfo --size``)."""
    return int(tool("nbdinfo", "--size", uri).stdout)


def raw_read(client: RawClient, handle: int, offset: int, length: int) -> dict:
    """One NBD READ on a held connection (simple replies); its reply."""
    client.send(handle, Command.READ, offset, length)
    reply = client.read_reply({handle: length})
    assert reply["handle"] == handle, reply
    return reply


def first_difference(a: bytes, b: bytes) -> str:
    if len(a) != len(b):
        return f"sizes differ: {len(a)} != {len(b)}"
    i = next(i for i in range(len(a)) if a[i] != b[i])
    return f"first difference at byte {i}"


def assert_bytes(got: bytes, want: bytes, what: str) -> None:
    assert got == want, f"{what}: {first_difference(got, want)}"


# --- the origin on an unserved store ------------------------------------------------------


def test_origin_grows_on_an_unserved_store(tmp_path):
    e = Env(tmp_path)
    ok("snap", "create", e.store, "old")
    p = ok("resize", e.store, "--origin-size", "6M")
    assert p.stdout == "origin: 4 MiB -> 6 MiB\n" and p.stderr == ""
    assert e.origin.stat().st_size == 6 * MiB
    grown = e.origin.read_bytes()
    assert_bytes(grown[:SIZE], e.data, "the origin's old part")
    assert grown[SIZE:] == bytes(2 * MiB), "the origin's new part is not zeroes"
    assert e.status()["origin_size"] == 6 * MiB

    ok("snap", "create", e.store, "new")
    ok("snap", "create", e.store, "old-clone", "--from", "old")
    ok("snap", "create", e.store, "new-clone", "--from", "new")
    assert e.sizes() == {"old": SIZE, "new": 6 * MiB, "old-clone": SIZE,
                         "new-clone": 6 * MiB}
    # status shows a snapshot's size only where it is not the origin's
    text = ok("status", e.store).stdout
    assert re.search(r"^\s+origin: .*origin\.img \(6 MiB\)$", text, re.M), text
    assert re.search(r"^\s+old \(id 1, \S+, 4 MiB; ", text, re.M), text
    assert re.search(r"^\s+new \(id 2, \S+; ", text, re.M), text
    assert re.search(r"^\s+old-clone \(id 3, \S+, 4 MiB; ", text, re.M), text
    assert re.search(r"^\s+new-clone \(id 4, \S+; ", text, re.M), text

    # --json: what changed, in bytes; the same size again changes nothing
    assert ok_json("resize", e.store, "--origin-size", "8M") == {
        "origin": {"origin_size": 8 * MiB, "old_size": 6 * MiB}}
    assert ok_json("resize", e.store, "--origin-size", "8M") == {
        "origin": {"origin_size": 8 * MiB, "old_size": 8 * MiB}}
    assert e.origin.stat().st_size == 8 * MiB
    assert e.sizes() == {"old": SIZE, "new": 6 * MiB, "old-clone": SIZE,
                         "new-clone": 6 * MiB}
    e.assert_clean()


def test_origin_shrink_is_refused_while_a_snapshot_reads_past_the_new_end(tmp_path):
    e = Env(tmp_path)
    ok("snap", "create", e.store, "small")
    ok("resize", e.store, "--origin-size", "8M")
    ok("snap", "create", e.store, "big")
    ok("snap", "create", e.store, "small-clone", "--from", "small")

    def unchanged():
        assert e.origin.stat().st_size == 8 * MiB
        assert e.status()["origin_size"] == 8 * MiB

    line = fails(26, "resize", e.store, "--origin-size", "4M",
                 match=r"cannot shrink the origin to 4 MiB.*: snapshot\(s\) big \(8 MiB.*"
                       r"read past the new end; delete them first\. Nothing was changed$")
    assert "small" not in line, line
    unchanged()

    # a deleted snapshot kept for its clone still reads past the end, and so does the clone
    ok("snap", "create", e.store, "big-clone", "--from", "big")
    ok("snap", "delete", e.store, "big")
    assert e.sizes() == {"small": SIZE, "small-clone": SIZE, "big-clone": 8 * MiB}
    line = fails(26, "resize", e.store, "--origin-size", "4M", match=r"big-clone \(8 MiB")
    assert "small" not in line, line
    unchanged()
    e.assert_clean()

    ok("snap", "delete", e.store, "big-clone")
    p = ok("resize", e.store, "--origin-size", "4M")
    assert p.stdout == "origin: 8 MiB -> 4 MiB\n"
    assert e.origin.stat().st_size == SIZE
    assert_bytes(e.origin.read_bytes(), e.data, "the shrunk origin")
    assert e.status()["origin_size"] == SIZE
    assert e.sizes() == {"small": SIZE, "small-clone": SIZE}
    # below the remaining snapshots' size: refused, naming both
    line = fails(26, "resize", e.store, "--origin-size", "2M", match=r"small \(4 MiB")
    assert "small-clone (4 MiB" in line, line
    assert e.origin.stat().st_size == SIZE
    e.assert_clean()


def test_bad_sizes_are_refused_and_change_nothing(tmp_path):
    e = Env(tmp_path)
    for args, match in [
            (("--origin-size", "0"),
             r"^ddsnap: the origin size must be a positive multiple of 512 bytes, not 0$"),
            (("--origin-size", "1000"),
             r"^ddsnap: the origin size must be a positive multiple of 512 bytes, not 1000$"),
            (("--origin-size", "soon"),
             r"^ddsnap: --origin-size 'soon' is not a size \(try 64K, 1M, 10G\)$"),
            (("--store-size", "soon"),
             r"^ddsnap: --store-size 'soon' is not a size \(try 64K, 1M, 10G\)$"),
            (("--store-size", "128K"), r"^ddsnap: a store of 128 KiB .* is too small for its "
                                       r"metadata and one chunk of data$"),
            ((), r"^ddsnap: give --origin-size SIZE, --store-size SIZE, or both$"),
            # a good store size does not go through with a bad origin size
            (("--origin-size", "1000", "--store-size", "32M"), r"not 1000$")]:
        fails(2, "resize", e.store, *args, match=match)
    st = e.status()
    assert (st["origin_size"], st["store_size"]) == (SIZE, 16 * MiB)
    assert e.origin.stat().st_size == SIZE and e.store.stat().st_size == 16 * MiB
    e.assert_clean()


# --- the store on an unserved store -------------------------------------------------------


def test_store_grows_and_shrinks_only_when_nothing_lives_past_the_new_end(tmp_path):
    e = Env(tmp_path, store_size="4M")
    st0 = e.status()
    p = ok("resize", e.store, "--store-size", "8M")
    st = e.status()
    want = f"store: 4 MiB -> 8 MiB ({st['chunks_total']} chunks for data and metadata)\n"
    assert p.stdout == want
    assert st["store_size"] == 8 * MiB and e.store.stat().st_size == 8 * MiB
    added = st["chunks_total"] - st0["chunks_total"]
    assert added >= (4 * MiB // CHUNK) - 1, (st0, st)  # at most one chunk for a new bitmap
    assert st["chunks_free"] - st0["chunks_free"] == added, "the new chunks are not all free"
    e.assert_clean()

    # a snapshot keeps the old data of the whole origin: more than the old store held
    ok("snap", "create", e.store, "s1")
    with e.served() as srv:
        qemu_io(srv.uri("origin"), f"write -P 0x77 0 {SIZE}")
    st = e.status()
    assert st["chunks_used"] > st0["chunks_total"], st
    line = fails(26, "resize", e.store, "--store-size", "4M",
                 match=r"^ddsnap: cannot shrink the store to 4 MiB .*: \d+ chunks in use \("
                       r"old data kept for snapshot s1 \((\d+) chunks, e\.g\. store chunk "
                       r"(\d+)\)\) past the new end\. .*nothing was changed$")
    m = re.search(r"snapshot s1 \((\d+) chunks, e\.g\. store chunk (\d+)", line)
    assert m, line  # the message matched above says so
    n, first = map(int, m.groups())
    assert first >= 4 * MiB // CHUNK, line  # past the new end indeed
    assert n >= st["chunks_used"] - st0["chunks_total"], line
    assert e.status() == st, "a refused shrink changed the store"
    assert e.store.stat().st_size == 8 * MiB
    e.assert_clean()

    ok("snap", "delete", e.store, "s1")
    assert ok_json("resize", e.store, "--store-size", "4M") == {
        "store": {"store_size": 4 * MiB, "old_size": 8 * MiB,
                  "chunks_total": st0["chunks_total"]}}
    st = e.status()
    assert (st["store_size"], st["chunks_total"], st["chunks_free"]) == \
        (4 * MiB, st0["chunks_total"], st0["chunks_free"])
    assert e.store.stat().st_size == 4 * MiB
    assert e.origin.read_bytes() == b"\x77" * SIZE
    e.assert_clean()


# --- served: through the control socket, seen by NBD clients -----------------------------


@pytest.mark.parametrize("workers", [0, 2], ids=["one-process", "workers"])
def test_served_origin_grow_shows_on_new_connections_and_keeps_old_snapshots(tmp_path,
                                                                              workers):
    e = Env(tmp_path)
    ok("snap", "create", e.store, "before")
    with e.served(workers) as srv:
        held = RawClient(f"unix:{srv.sock}", "origin")
        try:
            assert held.size == SIZE
            fails(2, "resize", e.store, "--origin-size", "1000", match=r"not 1000$")
            assert ok_json("resize", e.store, "--origin-size", "8M") == {
                "origin": {"origin_size": 8 * MiB, "old_size": SIZE}}
            st = e.status()
            assert st["served"] is True and st["origin_size"] == 8 * MiB
            assert e.origin.stat().st_size == 8 * MiB
            assert nbd_size(srv.uri("origin")) == 8 * MiB
            assert nbd_size(srv.uri("before")) == SIZE
            ok("snap", "create", e.store, "after")
            assert nbd_size(srv.uri("after")) == 8 * MiB
            assert e.sizes() == {"before": SIZE, "after": 8 * MiB}

            # the connection opened before keeps the size it was told
            assert raw_read(held, 1, 0, 4096) == {
                "handle": 1, "error": 0, "data": e.data[:4096], "extents": None}
            assert raw_read(held, 2, SIZE, 4096)["error"] == NBD_EINVAL
        finally:
            held.close()

        # data past the old end (and across it) through NBD
        qemu_io(srv.uri("origin"), f"write -P 0x5e {6 * MiB} {MiB}",
                f"write -P 0x3c {SIZE - 64 * KiB} {128 * KiB}")
        want = bytearray(e.data + bytes(4 * MiB))
        want[6 * MiB:7 * MiB] = b"\x5e" * MiB
        want[SIZE - 64 * KiB:SIZE + 64 * KiB] = b"\x3c" * (128 * KiB)
        assert_bytes(e.read(srv, "origin"), bytes(want), "the origin through NBD")
        assert_bytes(e.origin.read_bytes(), bytes(want), "the origin file")
        assert_bytes(e.read(srv, "before"), e.data, "snapshot before")
        assert_bytes(e.read(srv, "after"), e.data + bytes(4 * MiB), "snapshot after")
        assert ok_json("check", e.store) == CLEAN


def test_served_full_store_takes_writes_again_after_it_grows(tmp_path):
    e = Env(tmp_path, store_size="4M")  # ~46 free chunks; the snapshot needs 64
    ok("snap", "create", e.store, "s1")
    step = 256 * KiB
    with e.served() as srv:
        failed = []
        for off in range(0, SIZE, step):
            p = qemu_io(srv.uri("origin"), f"write -P 0xa5 {off} {step}", check=False)
            if p.returncode != 0:
                assert "No space left on device" in p.stdout + p.stderr, p
                failed.append(off)
        assert failed, "the store never filled up"
        assert failed[0] > 0, "not even the first write fitted"
        assert e.status()["chunks_free"] == 0

        assert ok_json("resize", e.store, "--store-size", "8M")["store"]["store_size"] == 8 * MiB
        st = e.status()
        assert st["store_size"] == 8 * MiB and st["chunks_free"] > 0, st
        for off in failed:  # each refused write goes through now
            qemu_io(srv.uri("origin"), f"write -P 0xa5 {off} {step}")
        assert e.read(srv, "origin") == b"\xa5" * SIZE
        assert_bytes(e.read(srv, "s1"), e.data, "snapshot s1")
        assert ok_json("check", e.store) == CLEAN


@pytest.mark.parametrize("workers", [0, 2], ids=["one-process", "workers"])
def test_served_origin_shrink_waits_for_the_origin_connections_to_close(tmp_path, workers):
    e = Env(tmp_path)
    ok("snap", "create", e.store, "s")
    ok("resize", e.store, "--origin-size", "8M")
    with e.served(workers) as srv:
        origin = RawClient(f"unix:{srv.sock}", "origin")
        snapshot = RawClient(f"unix:{srv.sock}", "s")
        try:
            assert origin.size == 8 * MiB and snapshot.size == SIZE
            fails(26, "resize", e.store, "--origin-size", "4M",
                  match=r"cannot shrink the origin while 1 connection\(s\) have it open.*"
                        r"Nothing was changed$")
            assert e.status()["origin_size"] == 8 * MiB
            assert e.origin.stat().st_size == 8 * MiB
            assert nbd_size(srv.uri("origin")) == 8 * MiB
        finally:
            origin.close()

        # once the server has seen the client go, the shrink goes through; an open
        # snapshot that ends before the new end does not stop it
        def shrunk():
            p = ddsnap("resize", e.store, "--origin-size", "4M")
            if p.returncode == 26 and "connection(s) have it open" in p.stderr:
                return False
            assert p.returncode == 0, (p.returncode, p.stderr)
            return True
        try:
            wait_until(shrunk, "the origin shrink to go through after the client left")
            assert raw_read(snapshot, 1, SIZE - 4096, 4096)["data"] == e.data[-4096:]
        finally:
            snapshot.close()
        assert e.status()["origin_size"] == SIZE
        assert nbd_size(srv.uri("origin")) == SIZE
        assert_bytes(e.read(srv, "origin"), e.data, "the shrunk origin")
        assert e.origin.stat().st_size == SIZE
        assert ok_json("check", e.store) == CLEAN


@pytest.mark.parametrize("workers", [0, 2], ids=["one-process", "workers"])
@pytest.mark.parametrize("how", ["stop", "kill"])
def test_sizes_survive_a_restart(tmp_path, how, workers):
    e = Env(tmp_path, store_size="8M")
    ok("snap", "create", e.store, "before")
    srv = e.served(workers).start()
    try:
        ok("resize", e.store, "--origin-size", "8M", "--store-size", "16M")
        ok("snap", "create", e.store, "after")
        qemu_io(srv.uri("origin"), f"write -P 0x42 {5 * MiB} {MiB}")
    finally:
        srv.stop() if how == "stop" else srv.kill()
    want = bytearray(e.data + bytes(4 * MiB))
    want[5 * MiB:6 * MiB] = b"\x42" * MiB

    with e.served() as srv:
        st = e.status()
        assert (st["origin_size"], st["store_size"]) == (8 * MiB, 16 * MiB), st
        assert e.sizes() == {"before": SIZE, "after": 8 * MiB}
        assert [nbd_size(srv.uri(x)) for x in ("origin", "before", "after")] == \
            [8 * MiB, SIZE, 8 * MiB]
        assert_bytes(e.read(srv, "origin"), bytes(want), "the origin")
        assert_bytes(e.read(srv, "before"), e.data, "snapshot before")
        assert_bytes(e.read(srv, "after"), e.data + bytes(4 * MiB), "snapshot after")
        assert ok_json("check", e.store) == CLEAN
    e.assert_clean()


def test_deleting_the_snapshot_that_reads_past_the_old_end_frees_its_copy_outs(tmp_path):
    e = Env(tmp_path)
    ok("snap", "create", e.store, "small")
    ok("resize", e.store, "--origin-size", "8M")
    ok("snap", "create", e.store, "big")
    used = e.status()["chunks_used"]
    with e.served() as srv:  # two chunks past the old end: copied out for big alone
        qemu_io(srv.uri("origin"), f"write -P 0x44 {SIZE} {2 * CHUNK}")
    assert e.status()["chunks_used"] == used + 2
    ok("snap", "delete", e.store, "big")
    st = e.status()
    assert st["snapshots"][0]["exclusive"] == 0, st["snapshots"]
    assert st["chunks_used"] == used, "chunks only big read are still in use"
    ok("resize", e.store, "--origin-size", "4M")
    e.assert_clean()


# --- a block device origin -----------------------------------------------------------------


def _loop_devices_work() -> str | None:
    """Why loop devices cannot be used here, or None."""
    if not is_root():
        return "loop devices need root"
    if not os.path.exists("/dev/loop-control"):
        return "no /dev/loop-control in this container"
    p = subprocess.run(["losetup", "-f"], capture_output=True, text=True)
    if p.returncode != 0:
        return f"losetup -f failed: {p.stderr.strip()}"
    return None


def _need_loop_devices() -> None:
    """Skip (with the reason) unless losetup and loop devices work here."""
    need("losetup")
    why = _loop_devices_work()
    if why:
        pytest.skip(why)


def _device_size(dev: str) -> int:
    with open(dev, "rb") as f:
        return f.seek(0, os.SEEK_END)


@pytest.mark.root
@pytest.mark.parametrize("workers", [0, 2], ids=["one-process", "workers"])
def test_block_device_origin_grows_with_the_device(tmp_path, workers):
    _need_loop_devices()
    backing = tmp_path / "disk.img"
    data = make_origin(backing, SIZE, seed=9)
    store = tmp_path / "store.img"
    with loop_device(backing) as dev:
        ok("init", store, "--origin", dev, "--size", "16M", "--chunk-size", "64K")
        ok("snap", "create", store, "s4")

        # the device grows first (lvextend); until resize the store serves the old size
        os.truncate(backing, 8 * MiB)
        tool("losetup", "-c", dev)
        assert _device_size(dev) == 8 * MiB
        assert ok_json("status", store)["origin_size"] == SIZE
        p = ok("resize", store, "--origin-size", "8M")
        assert p.stdout == "origin: 4 MiB -> 8 MiB\n"
        assert ok_json("status", store)["origin_size"] == 8 * MiB
        fails(2, "resize", store, "--origin-size", "12M",
              match=r"is a block device of 8 MiB .*grow the device itself to at least 12 MiB")

        os.truncate(backing, 12 * MiB)
        tool("losetup", "-c", dev)
        with Served(store, workers=workers) as srv:
            assert nbd_size(srv.uri("origin")) == 8 * MiB  # the recorded size
            ok("resize", store, "--origin-size", "12M")
            assert nbd_size(srv.uri("origin")) == 12 * MiB
            assert nbd_size(srv.uri("s4")) == SIZE
            fails(2, "resize", store, "--origin-size", "16M",
                  match=r"block device of 12 MiB .*at least 16 MiB")
            qemu_io(srv.uri("origin"), f"write -P 0x61 {SIZE - 4 * KiB} {8 * KiB}",
                    f"write -P 0x62 {11 * MiB} {MiB}")
            assert_bytes(read_export(srv, "s4", tmp_path / "s4.read"), data, "snapshot s4")
        # the writes are on the device itself; ddsnap never changed its size
        assert backing.stat().st_size == 12 * MiB
        with open(dev, "rb") as f:
            on_device = f.read()
        want = bytearray(data + bytes(8 * MiB))
        want[SIZE - 4 * KiB:SIZE + 4 * KiB] = b"\x61" * (8 * KiB)
        want[11 * MiB:] = b"\x62" * MiB
        assert_bytes(on_device, bytes(want), "the loop device")
        st = ok_json("status", store)
        assert st["origin_size"] == 12 * MiB and st["snapshots"][0]["size"] == SIZE
        assert ok_json("check", store) == CLEAN


@pytest.mark.root
def test_block_device_store_grows_with_the_device(tmp_path):
    _need_loop_devices()
    origin = tmp_path / "origin.img"
    data = make_origin(origin, SIZE, seed=11)
    backing = tmp_path / "store-disk.img"
    backing.touch()
    os.truncate(backing, 4 * MiB)
    with loop_device(backing) as dev:
        ok("init", dev, "--origin", origin, "--chunk-size", "64K")
        ok("snap", "create", dev, "s1")
        total0 = ok_json("status", dev)["chunks_total"]
        with Served(dev, sock=tmp_path / "s.nbd", control=tmp_path / "s.ctl") as srv:
            # fill it: s1 keeps the old data of every chunk written
            p = qemu_io(srv.uri("origin"), f"write -P 0x33 0 {SIZE}", check=False)
            assert p.returncode != 0 and "No space left on device" in p.stdout + p.stderr, p
            assert ok_json("status", dev)["chunks_free"] == 0

            # the device grows first; the store keeps its geometry until resize
            os.truncate(backing, 8 * MiB)
            tool("losetup", "-c", dev)
            assert ok_json("status", dev)["chunks_total"] == total0
            fails(2, "resize", dev, "--store-size", "12M",
                  match=r"snapshot store .* is a block device of 8 MiB .*grow the device "
                        r"itself to at least 12 MiB")
            ok("resize", dev, "--store-size", "8M")
            st = ok_json("status", dev)
            assert st["chunks_total"] >= total0 + 4 * MiB // CHUNK - 1, (total0, st)
            assert st["chunks_free"] > 0, st
            qemu_io(srv.uri("origin"), f"write -P 0x33 0 {SIZE}")  # all of it fits now
            assert_bytes(read_export(srv, "s1", tmp_path / "s1.read"), data, "snapshot s1")
        assert origin.read_bytes() == b"\x33" * SIZE
        assert ok_json("check", dev) == CLEAN


@pytest.mark.root
def test_block_device_store_reports_its_own_size_not_the_device_s(tmp_path):
    _need_loop_devices()
    origin = tmp_path / "origin.img"
    make_origin(origin, SIZE, seed=12)
    backing = tmp_path / "store-disk.img"
    backing.touch()
    os.truncate(backing, 8 * MiB)
    with loop_device(backing) as dev:
        ok("init", dev, "--origin", origin, "--chunk-size", "64K")
        os.truncate(backing, 16 * MiB)
        tool("losetup", "-c", dev)
        assert ok_json("status", dev)["store_size"] == 8 * MiB
        assert ok_json("resize", dev, "--store-size", "12M")["store"]["old_size"] == 8 * MiB
        assert ok_json("status", dev)["store_size"] == 12 * MiB


# --- merges -------------------------------------------------------------------------------


def _write_origin(e: Env, *cmds: str) -> None:
    with e.served() as srv:
        qemu_io(srv.uri("origin"), *cmds)


def test_merge_of_a_snapshot_of_another_size_is_refused(tmp_path):
    e = Env(tmp_path)
    ok("snap", "create", e.store, "small")
    _write_origin(e, f"write -P 0x99 0 {MiB}")
    ok("resize", e.store, "--origin-size", "8M")
    refusal = (r"^ddsnap: snapshot small is 4 MiB .* but the origin is now 8 MiB .*: "
               r"resize the origin back to 4 MiB .* to merge it$")
    fails(2, "merge", e.store, "small", match=refusal)
    with e.served():
        fails(2, "merge", e.store, "small", "--wait", match=refusal)
    assert merge_status(e.store) is None
    assert e.sizes() == {"small": SIZE}

    # as the message says: shrink the origin back, and the merge goes through
    ok("resize", e.store, "--origin-size", "4M")
    ok("merge", e.store, "small", "--wait")
    assert_bytes(e.origin.read_bytes(), e.data, "the origin after the merge")
    assert e.sizes() == {}
    e.assert_clean()


def test_origin_resize_is_refused_while_a_merge_is_in_progress(tmp_path):
    e = Env(tmp_path)
    ok("snap", "create", e.store, "s")
    _write_origin(e, f"write -P 0x99 0 {MiB}")
    # recorded but paused: it runs only when the store is served (or with --wait)
    ok("merge", e.store, "s")
    assert merge_status(e.store)["snapshot"] == "s"
    for size in ("8M", "2M"):
        fails(17, "resize", e.store, "--origin-size", size,
              match=r"cannot resize the origin while a snapshot is being merged into it$")
    assert e.status()["origin_size"] == SIZE and e.origin.stat().st_size == SIZE

    ok("merge", e.store, "s", "--wait")
    assert merge_status(e.store) is None
    assert_bytes(e.origin.read_bytes(), e.data, "the origin after the merge")
    ok("resize", e.store, "--origin-size", "8M")
    assert e.status()["origin_size"] == 8 * MiB
    e.assert_clean()
