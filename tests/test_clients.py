"""A served store driven by real NBD clients: nbdinfo, qemu-io, qemu-img, nbdcopy, fio.

Each test gets its own store: a 32 MiB origin of random data with two snapshots taken
before anything was served, ``before`` (writable) and ``frozen`` (``--read-only``), served
by a real ``ddsnap serve`` on a unix socket and on TCP, in one process and with
``--workers 2`` (a metadata server process and two workers doing the NBD and data I/O,
speaking the csnap protocol).  Whatever the clients do to the
origin, those snapshots must keep reading the original data, byte for byte.
"""

from __future__ import annotations

import contextlib
import errno
import json
import re
import subprocess
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import pytest

from served import (
    DEADLINE,
    KiB,
    MiB,
    Served,
    is_root,
    make_origin,
    nbdfuse,
    need,
    ok,
    ok_json,
    read_export,
    tool,
)

SIZE = 32 * MiB
pytestmark = pytest.mark.clients


@dataclass
class Setup:
    dir: Path
    origin: Path
    store: Path
    data: bytes  # the origin as both snapshots hold it
    srv: Served

    def uri(self, export: str = "origin") -> str:
        return self.srv.uri(export)

    def read(self, export: str, name: str | None = None, *extra: str) -> bytes:
        return read_export(self.srv, export, self.dir / (name or f"{export}.read"), *extra)

    def assert_snapshots_unchanged(self, *names: str) -> None:
        for name in names or ("before", "frozen"):
            got = self.read(name)
            assert len(got) == SIZE
            if got != self.data:
                first = next(i for i in range(SIZE) if got[i] != self.data[i])
                raise AssertionError(f"snapshot {name} changed, first at byte {first}")


@pytest.fixture(params=[0, 2], ids=["one-process", "workers"])
def setup(tmp_path, request):
    origin = tmp_path / "origin.img"
    store = tmp_path / "store.img"
    data = make_origin(origin, SIZE, seed=7)
    # Room for what the most demanding test keeps at once (deleting snapshots while fio
    # writes: three 24 MiB generations of copy-outs, 24 MiB more for the last one, and
    # the metadata), so that it never depends on a sweep finishing in time.
    ok("init", store, "--origin", origin, "--size", "160M")
    ok("snap", "create", store, "before")
    ok("snap", "create", store, "frozen", "--read-only")
    with Served(store, tcp=True, workers=request.param) as srv:
        yield Setup(tmp_path, origin, store, data, srv)
        assert ok_json("check", store)["clean"]
    assert ok_json("check", store) == {"clean": True, "fatal": 0, "warnings": 0,
                                       "findings": []}


def qemu_io(uri: str, *cmds: str, read_only: bool = False, check: bool = True):
    args = ["qemu-io", "-f", "raw"] + (["-r"] if read_only else [])
    for c in cmds:
        args += ["-c", c]
    p = tool(*args, uri, check=check)
    if check:  # qemu-io exits 0 even when a -c command fails in some versions
        assert "failed" not in p.stdout + p.stderr, p.stdout + p.stderr
        assert "Pattern verification failed" not in p.stdout, p.stdout
    return p


# --- nbdinfo ------------------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_nbdinfo_lists_origin_and_snapshots(setup, transport):
    base = (f"nbd+unix:///?socket={setup.srv.sock}" if transport == "unix"
            else f"nbd://{setup.srv.tcp}/")
    info = json.loads(tool("nbdinfo", "--list", "--json", base).stdout)
    exports = {e["export-name"]: e for e in info["exports"]}
    assert set(exports) == {"origin", "before", "frozen"}
    for e in exports.values():
        assert e["export-size"] == SIZE
    assert exports["frozen"]["is_read_only"] is True
    assert exports["before"]["is_read_only"] is False
    assert exports["origin"]["is_read_only"] is False

    # snapshots come and go while served
    ok("snap", "create", setup.store, "later")
    listed = json.loads(tool("nbdinfo", "--list", "--json", base).stdout)["exports"]
    assert "later" in {e["export-name"] for e in listed}
    ok("snap", "delete", setup.store, "later")
    listed = json.loads(tool("nbdinfo", "--list", "--json", base).stdout)["exports"]
    assert {e["export-name"] for e in listed} == {"origin", "before", "frozen"}
    p = tool("nbdinfo", setup.uri("later"), check=False)
    assert p.returncode != 0


@pytest.mark.parametrize("feature", ["flush", "fua", "trim", "zero", "multi-conn"])
def test_nbdinfo_origin_can(setup, feature):
    assert tool("nbdinfo", "--can", feature, setup.uri("origin"), check=False).returncode == 0
    assert tool("nbdinfo", "--can", feature, setup.srv.tcp_uri("origin"),
                check=False).returncode == 0


def test_nbdinfo_read_only_snapshot(setup):
    def is_ro(export):
        rc = tool("nbdinfo", "--is", "read-only", setup.uri(export), check=False).returncode
        assert rc in (0, 2), rc  # 0 true, 2 false; anything else is an error
        return rc == 0

    assert is_ro("frozen")
    assert not is_ro("before")
    assert not is_ro("origin")
    for feature in ("fua", "trim", "zero"):
        rc = tool("nbdinfo", "--can", feature, setup.uri("frozen"), check=False).returncode
        assert rc == 2, f"a read-only export offers {feature}"
    for feature in ("flush", "multi-conn"):
        assert tool("nbdinfo", "--can", feature, setup.uri("frozen"), check=False).returncode == 0


def test_read_only_snapshot_refuses_writes_on_the_wire(setup):
    """A client that ignores the read-only flag and sends a WRITE gets EPERM, and the
    snapshot is unchanged."""
    from ddsnap.nbd.wire import Command
    from nbd_helpers import RawClient

    c = RawClient(f"unix:{setup.srv.sock}", "frozen")
    try:
        c.send(1, Command.WRITE, 0, 4096, data=b"\xee" * 4096)
        assert c.read_reply()["error"] == errno.EPERM
        c.send(2, Command.READ, 0, 4096)
        r = c.read_reply({2: 4096})
        assert r["error"] == 0 and r["data"] == setup.data[:4096]
    finally:
        c.close()
    setup.assert_snapshots_unchanged("frozen")


# --- qemu-io --------------------------------------------------------------------------------


def test_qemu_io_patterns_origin_and_snapshots(setup):
    origin, snap = setup.uri("origin"), setup.uri("mid")
    # a known pattern on the origin, then a snapshot of it taken while served
    qemu_io(origin, "write -P 0x11 0 4M")
    ok("snap", "create", setup.store, "mid")

    writes = [  # (pattern, offset, length): aligned, unaligned, across chunk boundaries
        (0x5A, 0, 32 * KiB),
        (0x5B, 65000, 1000),          # across the 64 KiB chunk boundary
        (0x5C, MiB + 1, 3),           # three bytes in the middle of a chunk
        (0x5D, 2000000, 300000),      # unaligned, several chunks
        (0x5E, 4 * MiB - 512, 1024),  # across the end of the 0x11 area
    ]
    qemu_io(origin, *(f"write -P {p:#x} {o} {n}" for p, o, n in writes))
    qemu_io(origin, *(f"read -P {p:#x} {o} {n}" for p, o, n in writes))
    qemu_io(origin, "read -P 0x11 32768 32232", "read -P 0x11 66000 982577",
            "read -P 0x11 1048580 951420", "read -P 0x11 2300000 1893792")

    # the snapshot keeps its old pattern everywhere
    qemu_io(snap, "read -P 0x11 0 4M", read_only=True)
    mid = bytearray(setup.data)
    mid[:4 * MiB] = b"\x11" * (4 * MiB)
    assert setup.read("mid") == bytes(mid)

    # a writable snapshot takes its own writes; nobody else sees them
    swrites = [(0x77, 131072 + 17, 5000), (0x78, 4000000, 100), (0x79, 10 * MiB, 64 * KiB)]
    qemu_io(snap, *(f"write -P {p:#x} {o} {n}" for p, o, n in swrites))
    qemu_io(snap, *(f"read -P {p:#x} {o} {n}" for p, o, n in swrites))
    qemu_io(snap, "read -P 0x11 0 131089", "read -P 0x11 136089 3863911",
            "read -P 0x11 4000100 194204", read_only=True)
    for p, o, n in swrites:
        mid[o:o + n] = bytes([p]) * n
    assert setup.read("mid") == bytes(mid)
    qemu_io(origin, *(f"read -P {p:#x} {o} {n}" for p, o, n in writes))
    got = setup.read("origin")
    assert got[10 * MiB:11 * MiB] == setup.data[10 * MiB:11 * MiB]

    # write zeroes and discard on the origin go through copy-on-write too
    qemu_io(origin, "write -z 3M 256K", "discard 5M 1M", "flush")
    qemu_io(origin, "read -P 0 3M 256K")
    qemu_io(snap, "read -P 0x11 3M 256K", read_only=True)
    setup.assert_snapshots_unchanged()


def test_qemu_io_fua_and_flush(setup):
    qemu_io(setup.uri("origin"), "write -f -P 0x21 8M 64K", "write -P 0x22 9M 4K", "flush",
            "read -P 0x21 8M 64K", "read -P 0x22 9M 4K")
    qemu_io(setup.uri("before"), "write -f -P 0x23 8M 4K", "flush", "read -P 0x23 8M 4K")
    assert setup.origin.read_bytes()[8 * MiB:8 * MiB + 64 * KiB] == b"\x21" * (64 * KiB)
    setup.assert_snapshots_unchanged("frozen")


# --- qemu-img and nbdcopy -------------------------------------------------------------------


def test_qemu_img_compare_and_convert(setup):
    tool("nbdcopy", setup.uri("origin"), setup.dir / "copy.raw")  # taken before the writes
    ok("snap", "create", setup.store, "c")
    qemu_io(setup.uri("origin"), "write -P 0x99 7M 123457", "write -P 0x98 28M 4M")

    same = tool("qemu-img", "compare", "-f", "raw", "-F", "raw", setup.uri("c"),
                setup.dir / "copy.raw", check=False)
    assert same.returncode == 0 and "identical" in same.stdout, same
    differs = tool("qemu-img", "compare", "-f", "raw", "-F", "raw", setup.uri("origin"),
                   setup.dir / "copy.raw", check=False)
    assert differs.returncode == 1 and "mismatch" in differs.stdout, differs
    assert re.search(r"offset 7340032\b", differs.stdout), differs.stdout

    tool("qemu-img", "convert", "-f", "raw", "-O", "raw", setup.uri("c"),
         setup.dir / "converted.raw")
    assert (setup.dir / "converted.raw").read_bytes() == (setup.dir / "copy.raw").read_bytes()
    info = json.loads(tool("qemu-img", "info", "--output=json", "-f", "raw",
                           setup.uri("c")).stdout)
    assert info["virtual-size"] == SIZE
    setup.assert_snapshots_unchanged()


def test_nbdcopy_snapshot_to_file_and_file_to_origin(setup):
    tool("nbdcopy", setup.uri("before"), setup.dir / "before.raw")
    assert (setup.dir / "before.raw").read_bytes() == setup.data

    new = make_origin(setup.dir / "new.raw", SIZE, seed=8)
    tool("nbdcopy", "--flush", setup.dir / "new.raw", setup.uri("origin"))
    assert setup.read("origin") == new
    assert setup.origin.read_bytes() == new  # the origin volume itself
    setup.assert_snapshots_unchanged()
    # and into a writable snapshot, over TCP this time
    tool("nbdcopy", "--flush", setup.dir / "new.raw", setup.srv.tcp_uri("before"))
    assert setup.read("before") == new
    setup.assert_snapshots_unchanged("frozen")
    assert setup.read("origin") == new


# --- fio -------------------------------------------------------------------------------------


def _fio_nbd_engine() -> bool:
    need("fio")
    p = subprocess.run(["fio", "--enghelp=nbd"], capture_output=True, text=True)
    return p.returncode == 0 and "uri" in p.stdout


class FioTarget:
    """fio options reaching an export: ioengine=nbd, or nbdfuse + libaio on the file."""

    def __init__(self, setup: Setup, how: str):
        self.setup, self.how = setup, how

    def args(self, export: str, stack) -> list[str]:
        if self.how == "nbd":
            return ["--ioengine=nbd", f"--uri={self.setup.uri(export)}"]
        f = stack.enter_context(nbdfuse(self.setup.uri(export),
                                        self.setup.dir / f"fuse-{export}"))
        return ["--ioengine=libaio", "--direct=1", f"--filename={f}"]


@pytest.fixture(params=["nbd", "nbdfuse"])
def fio_target(request, setup):
    if request.param == "nbd" and not _fio_nbd_engine():
        pytest.skip("this fio has no nbd engine")
    if request.param == "nbdfuse" and not is_root():
        pytest.skip("nbdfuse mounts need root here")
    return FioTarget(setup, request.param)


def fio(*args, cwd: Path) -> subprocess.CompletedProcess:
    p = tool("fio", "--output-format=normal", "--verify_state_save=0", *args, cwd=cwd,
             check=False, timeout=240)
    assert p.returncode == 0, f"fio failed ({p.returncode}):\n{p.stdout}\n{p.stderr}"
    assert re.search(r"err= ?0", p.stdout), p.stdout
    return p


def test_fio_verify_on_origin_while_snapshots_exist(setup, fio_target):
    job = ["--name=verify", "--rw=randwrite", "--bsrange=4k-128k", "--offset=4M",
           "--size=16M", "--iodepth=16", "--verify=crc32c", "--randseed=4321",
           "--verify_fatal=1"]
    with contextlib.ExitStack() as stack:
        fio(*job, "--do_verify=1", *fio_target.args("origin", stack), cwd=setup.dir)
    setup.assert_snapshots_unchanged()

    # a snapshot taken now holds what fio wrote: fio verifies it there too (writable,
    # since fio opens its file read-write even to verify)
    ok("snap", "create", setup.store, "after-fio")
    with contextlib.ExitStack() as stack:
        fio(*job, "--verify_only=1", *fio_target.args("after-fio", stack), cwd=setup.dir)
    # and the old snapshot does not: the verification is real
    with contextlib.ExitStack() as stack:
        p = tool("fio", "--verify_state_save=0", *job, "--verify_only=1",
                 *fio_target.args("before", stack), cwd=setup.dir, check=False, timeout=240)
    assert p.returncode != 0 and "verify" in p.stdout + p.stderr


def test_fio_several_connections_disjoint_ranges(setup):
    if not _fio_nbd_engine():
        pytest.skip("this fio has no nbd engine")
    # four jobs, each its own NBD connection, each verifying its own 4 MiB range
    fio("--name=multi", "--ioengine=nbd", f"--uri={setup.uri('origin')}", "--numjobs=4",
        "--offset=8M", "--size=4M", "--offset_increment=4M", "--rw=randwrite",
        "--bs=16k", "--iodepth=8", "--verify=crc32c", "--do_verify=1", "--verify_fatal=1",
        "--group_reporting", cwd=setup.dir)
    setup.assert_snapshots_unchanged()


# --- several connections at once ----------------------------------------------------------------


def test_concurrent_connections_write_disjoint_ranges(setup):
    """Six qemu-io writers on their own connections, each its own 4 MiB range of the
    origin in unaligned pieces, six more on a writable snapshot over the same ranges, while
    nbdcopy reads the old snapshots over several connections each."""
    need("qemu-io")
    need("nbdcopy")
    ok("snap", "create", setup.store, "scratch")
    writers = []
    cuts = [0, 1000003, 2000001, 3100000, 4 * MiB]  # unaligned pieces of each range
    for i in range(6):
        base = i * 4 * MiB
        cmds = []
        for lo, hi in pairwise(cuts):
            cmds += ["-c", f"write -P {0x60 + i:#x} {base + lo} {hi - lo}"]
        writers.append(subprocess.Popen(["qemu-io", "-f", "raw", *cmds, setup.uri("origin")],
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True))
    # the writable snapshot gets the same ranges with other patterns, at the same time
    for i in range(6):
        writers.append(subprocess.Popen(
            ["qemu-io", "-f", "raw", "-c", f"write -P {0x90 + i:#x} {i * 4 * MiB + 12345} 3M",
             setup.uri("scratch")],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    readers = [subprocess.Popen(["nbdcopy", "--connections=4", setup.uri(name),
                                 setup.dir / f"concurrent-{name}.raw"],
                                stderr=subprocess.PIPE, text=True)
               for name in ("before", "frozen")]
    for p in writers + readers:
        out, err = p.communicate(timeout=DEADLINE)
        assert p.returncode == 0, f"{p.args!r} failed:\n{out}\n{err}"
        assert "failed" not in (out or "") + (err or ""), out
    for name in ("before", "frozen"):
        assert (setup.dir / f"concurrent-{name}.raw").read_bytes() == setup.data, name

    # every range holds exactly its writer's pattern, nothing bled across
    qemu_io(setup.uri("origin"), *(f"read -P {0x60 + i:#x} {i * 4 * MiB} 4M" for i in range(6)))
    got = setup.read("origin")
    assert got[24 * MiB:] == setup.data[24 * MiB:]
    scratch = bytearray(setup.data)
    for i in range(6):
        scratch[i * 4 * MiB + 12345: i * 4 * MiB + 12345 + 3 * MiB] = bytes([0x90 + i]) * (3 * MiB)
    assert setup.read("scratch") == scratch
    setup.assert_snapshots_unchanged()


@pytest.mark.parametrize("chunk", ["4K", "1M"])
def test_smallest_and_largest_chunk_sizes(tmp_path, chunk):
    """Unaligned writes across chunk boundaries at both ends of the chunk-size range."""
    origin, store = tmp_path / "origin.img", tmp_path / "store.img"
    data = make_origin(origin, 8 * MiB, seed=9)
    ok("init", store, "--origin", origin, "--size", "32M", "--chunk-size", chunk)
    ok("snap", "create", store, "s")
    with Served(store) as srv:
        writes = [(0xA1, 4095, 2), (0xA2, MiB - 100, 200), (0xA3, 3 * MiB + 7, 2 * MiB + 9)]
        qemu_io(srv.uri("origin"), *(f"write -P {p:#x} {o} {n}" for p, o, n in writes))
        qemu_io(srv.uri("s"), "write -P 0xb1 5000 5000")
        expect_origin = bytearray(data)
        for p, o, n in writes:
            expect_origin[o:o + n] = bytes([p]) * n
        expect_snap = bytearray(data)
        expect_snap[5000:10000] = b"\xb1" * 5000
        assert read_export(srv, "origin", tmp_path / "o.read") == expect_origin
        assert read_export(srv, "s", tmp_path / "s.read") == expect_snap
        st = ok_json("status", store)
        assert st["chunk_size"] == {"4K": 4096, "1M": MiB}[chunk]
        assert ok_json("check", store)["clean"]
    assert ok_json("check", store)["clean"]


def test_snapshots_taken_during_writes_are_crash_consistent_points(tmp_path):
    """One writer stamps every 96 KiB region (unaligned to the 64 KiB chunks) in order,
    generation after generation, one request at a time, while snapshots are taken.  A
    snapshot holds the origin "as of every write completed so far": each region is one
    whole generation (no torn request across chunks), and the regions written so far form
    a prefix: generations read ``[g+1]*k + [g]*(n-k)``."""
    origin, store = tmp_path / "origin.img", tmp_path / "store.img"
    origin.write_bytes(bytes(8 * MiB))
    ok("init", store, "--origin", origin, "--size", "128M")
    region, base, n, gens = 96 * KiB, 4096 * 3, 80, 6
    cmds = []
    for g in range(1, gens + 1):
        for i in range(n):
            cmds += ["-c", f"write -P {g} {base + i * region} {region}"]
    with Served(store) as srv:
        need("qemu-io")
        writer = subprocess.Popen(["qemu-io", "-f", "raw", *cmds, srv.uri("origin")],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        names: list[str] = []
        try:
            while writer.poll() is None and len(names) < 40:
                names.append(f"t{len(names)}")
                srv.control("snap_create", name=names[-1], read_only=True)
        finally:
            _, err = writer.communicate(timeout=DEADLINE)
        assert writer.returncode == 0, err
        names.append("final")
        srv.control("snap_create", name="final", read_only=True)
        seen = set()
        for name in names:
            data = read_export(srv, name, tmp_path / "snap.read")
            stamps = []
            for i in range(n):
                chunk = data[base + i * region: base + (i + 1) * region]
                assert chunk == bytes([chunk[0]]) * region, \
                    f"snapshot {name}: region {i} is torn: {sorted(set(chunk))}"
                stamps.append(chunk[0])
            assert data[:base] == bytes(base) and not any(data[base + n * region:])
            g = stamps[-1]
            k = sum(1 for s in stamps if s == g + 1)
            assert stamps == [g + 1] * k + [g] * (n - k), f"snapshot {name}: {stamps}"
            seen.add((g, k))
        assert (gens, 0) in seen  # "final" saw every write
        assert ok_json("check", store)["clean"]


def test_deleting_snapshots_while_the_origin_is_written(setup):
    """Snapshots with many exceptions are deleted (a tree sweep) while fio writes and
    verifies the origin: the writes verify, the other snapshots keep their data, the
    metadata stays consistent."""
    if not _fio_nbd_engine():
        pytest.skip("this fio has no nbd engine")
    for i in range(3):
        qemu_io(setup.uri("origin"), f"write -P {0x40 + i:#x} 0 24M")
        ok("snap", "create", setup.store, f"doomed{i}")
    writer = subprocess.Popen(
        ["fio", "--name=during-delete", "--ioengine=nbd", f"--uri={setup.uri('origin')}",
         "--rw=randwrite", "--bsrange=4k-64k", "--size=24M", "--iodepth=16",
         "--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--verify_state_save=0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=setup.dir)
    try:
        for i in range(3):
            ok("snap", "delete", setup.store, f"doomed{i}")
    finally:
        out, _ = writer.communicate(timeout=240)
    assert writer.returncode == 0, out
    names = [s["name"] for s in ok_json("snap", "list", setup.store)]
    assert names == ["before", "frozen"]
    setup.assert_snapshots_unchanged()
    assert ok_json("check", setup.store)["clean"]
