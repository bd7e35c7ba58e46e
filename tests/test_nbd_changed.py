"""What BLOCK_STATUS tells and what TRIM does (issue 13, part 2), as clients see it.

Real processes: ``ddsnap serve`` (one process, and ``--workers 2`` where the data path
matters), origin and snapshot writes with qemu-io, maps with ``nbdinfo --map``, copies
with nbdcopy and qemu-img, and the raw protocol client of ``nbd_helpers`` where a test
needs what no tool shows (two contexts in one reply, a connection held across a delete).

* ``ddsnap:changed:FROM``: every export lists one per live snapshot; ``nbdinfo --map``
  of it is exactly the chunks written between the two versions (what ``ddsnap diff``
  says too), whole chunks, the last one clipped; a backup loop (a full nbdcopy of s1,
  then only the extents the map of s2 calls changed, copied with qemu-img) ends byte for
  byte equal to s2, twice over;
* with ``base:allocation`` in one BLOCK_STATUS: a chunk per context; REQ_ONE: one extent
  each; FROM deleted while selected: everything changed, also once another snapshot
  takes its name; an unknown FROM selects nothing, and BLOCK_STATUS is then EINVAL;
* ``base:allocation`` is the origin file's holes where a volume reads the origin, data
  where it reads the store (a copy-out of a hole is data);
* TRIM on the origin punches the file (zeroes, a hole, no store chunk used where no
  snapshot reads the chunk; copy-outs first where one does), leaves partial blocks as
  they are and changes no snapshot; TRIM on a snapshot changes nothing;
* in-process, with small pages: each answer covers a prefix, and the prefixes add up to
  the whole map.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from ddsnap import volume
from ddsnap.errors import SnapshotNotFound
from ddsnap.nbd import wire as P
from ddsnap.nbd.wire import Command
from ddsnap.service.local import LocalService
from ddsnap.store.blockdev import FileDevice
from ddsnap.volume import Origin, Snapshot
from nbd_helpers import RawClient
from served import (
    MiB,
    Served,
    is_root,
    loop_device,
    make_origin,
    need,
    ok,
    ok_json,
    read_export,
    same_image,
    this_tree_first,
    tool,
)

pytestmark = pytest.mark.clients

@pytest.fixture(autouse=True, scope="module")
def this_tree():
    """Every ddsnap process of these tests runs this tree's sources."""
    with this_tree_first():
        yield

CS = 65536
SIZE = 4 * MiB + 1000  # the last chunk (64) is partial
LAST = SIZE // CS
HOLE = P.STATE_HOLE | P.STATE_ZERO


def write(srv: Served, export: str, pattern: int, offset: int, length: int) -> None:
    tool("qemu-io", "-f", "raw", "-c", f"write -P {pattern} {offset} {length}",
         srv.uri(export))


def nbd_map(srv: Served, export: str, context: str | None = None
            ) -> list[tuple[int, int, int]]:
    """``nbdinfo --map[=CONTEXT] --json`` of ``export``: ``(offset, length, flags)``,
    neighbours with the same flags merged; asserted to cover the export from 0, gapless."""
    arg = f"--map={context}" if context else "--map"
    extents = json.loads(tool("nbdinfo", "--json", arg, srv.uri(export)).stdout)
    out: list[tuple[int, int, int]] = []
    for e in extents:
        offset, length, flags = e["offset"], e["length"], e["type"]
        assert offset == (out[-1][0] + out[-1][1] if out else 0), extents
        if out and out[-1][2] == flags:
            out[-1] = (out[-1][0], out[-1][1] + length, flags)
        else:
            out.append((offset, length, flags))
    return out


def changed(srv: Served, export: str, base: str) -> list[tuple[int, int]]:
    """The byte ranges ``ddsnap:changed:BASE`` of ``export`` calls changed."""
    m = nbd_map(srv, export, P.CHANGED_PREFIX + base)
    assert sum(n for _, n, _ in m) == exports_size(srv, export)
    assert {f for _, _, f in m} <= {0, P.STATE_CHANGED}
    return [(o, n) for o, n, f in m if f & P.STATE_CHANGED]


def exports_size(srv: Served, export: str) -> int:
    return int(tool("nbdinfo", "--size", srv.uri(export)).stdout)


def contexts(srv: Served, export: str) -> list[str]:
    info = json.loads(tool("nbdinfo", "--json", srv.uri(export)).stdout)
    (exp,) = info["exports"]
    return exp["contexts"]


def diff_ranges(store: Path, a: str, b: str) -> list[tuple[int, int]]:
    out = []
    for line in ok("diff", store, a, b).stdout.splitlines():
        offset, length = line.split("\t")
        out.append((int(offset), int(length)))
    return out


def used_chunks(store: Path) -> int:
    return ok_json("status", store)["chunks_used"]


def file_map(path: Path, size: int) -> list[tuple[int, int, int]]:
    """The file's holes and data as ``(offset, length, flags)`` (HOLE for a hole), from
    the file system itself (``SEEK_DATA``/``SEEK_HOLE``): what base:allocation of a
    volume reading the origin everywhere must say."""
    out: list[tuple[int, int, int]] = []
    fd = os.open(path, os.O_RDONLY)
    try:
        pos = 0
        while pos < size:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                data = size
            if data > pos:
                out.append((pos, min(data, size) - pos, HOLE))
                pos = min(data, size)
                continue
            hole = min(os.lseek(fd, pos, os.SEEK_HOLE), size)
            out.append((pos, hole - pos, 0))
            pos = hole
    finally:
        os.close(fd)
    return out


def overlay(m: list[tuple[int, int, int]], offset: int, length: int, flags: int
            ) -> list[tuple[int, int, int]]:
    """The map ``m`` with ``[offset, offset + length)`` set to ``flags``, merged."""
    per: list[tuple[int, int, int]] = []
    for o, n, f in m:
        for lo, hi in ((o, min(o + n, offset)), (max(o, offset + length), o + n)):
            if lo < hi:
                per.append((lo, hi - lo, f))
    per.append((offset, length, flags))
    per.sort()
    out: list[tuple[int, int, int]] = []
    for o, n, f in per:
        if out and out[-1][2] == f and out[-1][0] + out[-1][1] == o:
            out[-1] = (out[-1][0], out[-1][1] + n, f)
        else:
            out.append((o, n, f))
    return out


@pytest.fixture
def store_of(tmp_path):
    """``store_of(origin_bytes or None)``: an origin file (random 4 MiB + 1000 bytes by
    default) and a 64 MiB store of 64 KiB chunks for it; returns the store's path."""
    def make(size: int = SIZE, seed: int = 13) -> Path:
        origin = tmp_path / "origin.img"
        if not origin.exists():
            make_origin(origin, size, seed=seed)
        store = tmp_path / "store.img"
        ok("init", store, "--origin", origin, "--size", "64M")
        return store
    return make


# --- ddsnap:changed:FROM -------------------------------------------------------------


@pytest.mark.parametrize("workers", [0, 2], ids=["one-process", "workers"])
def test_changed_map_is_the_chunks_written_between_two_versions(store_of, workers):
    store = store_of()
    with Served(store, workers=workers) as srv:
        ok("snap", "create", store, "s1")
        write(srv, "origin", 7, 3 * CS + 100, CS)  # chunks 3 and 4
        write(srv, "origin", 8, SIZE - 500, 500)  # the partial last chunk
        ok("snap", "create", store, "s2")
        write(srv, "origin", 9, 15 * CS, 4096)
        write(srv, "s2", 10, 0, 4096)  # s2's own write
        tail = (LAST * CS, SIZE - LAST * CS)
        assert changed(srv, "s2", "s1") == [(0, CS), (3 * CS, 2 * CS), tail]
        assert changed(srv, "s1", "s2") == changed(srv, "s2", "s1")
        assert changed(srv, "origin", "s1") == [(3 * CS, 2 * CS), (15 * CS, CS), tail]
        assert changed(srv, "origin", "s2") == [(0, CS), (15 * CS, CS)]
        assert changed(srv, "s1", "s1") == []
        # the same source of truth as ddsnap diff
        for export, base in (("s2", "s1"), ("origin", "s1"), ("origin", "s2")):
            assert changed(srv, export, base) == diff_ranges(store, base, export)


def test_every_export_lists_a_changed_context_per_live_snapshot(store_of):
    store = store_of()
    with Served(store, workers=0) as srv:
        assert contexts(srv, "origin") == [P.BASE_ALLOCATION]
        ok("snap", "create", store, "s1")
        ok("snap", "create", store, "s2")
        want = [P.BASE_ALLOCATION, "ddsnap:changed:s1", "ddsnap:changed:s2"]
        for export in ("origin", "s1", "s2"):
            assert contexts(srv, export) == want
        # nbdinfo --list shows them for every export
        listing = json.loads(tool("nbdinfo", "--list", "--json", srv.uri("")).stdout)
        assert {e["export-name"]: e["contexts"] for e in listing["exports"]} == {
            "origin": want, "s1": want, "s2": want}
        ok("snap", "delete", store, "s1")
        assert contexts(srv, "s2") == [P.BASE_ALLOCATION, "ddsnap:changed:s2"]
        # nothing to map against a snapshot that does not exist
        p = tool("nbdinfo", "--map=ddsnap:changed:s1", srv.uri("s2"), check=False)
        assert p.returncode != 0 and "Traceback" not in p.stderr


def _copy_range(srv: Served, export: str, offset: int, length: int, dest: Path) -> None:
    """Copy bytes ``[offset, offset + length)`` of ``export`` into the same place of the
    file ``dest`` with qemu-img (a raw window on each side)."""
    tool("qemu-img", "convert", "-n",
         "--image-opts", f"driver=raw,offset={offset},size={length},file.driver=nbd,"
                         f"file.server.type=unix,file.server.path={srv.sock},"
                         f"file.export={export}",
         "--target-image-opts", f"driver=raw,offset={offset},size={length},"
                                f"file.driver=file,file.filename={dest}")


def _incremental(srv: Served, base: str, export: str, backup: Path) -> int:
    """Bring ``backup`` (a copy of ``base``) to ``export`` by copying only what
    ``ddsnap:changed:BASE`` of ``export`` calls changed; the bytes copied."""
    copied = 0
    for offset, length in changed(srv, export, base):
        _copy_range(srv, export, offset, length, backup)
        copied += length
    return copied


@pytest.mark.parametrize("workers", [0, 2], ids=["one-process", "workers"])
def test_backup_loop_copies_only_what_changed_and_ends_equal(store_of, tmp_path, workers):
    store = store_of(size=8 * MiB, seed=21)
    with Served(store, workers=workers) as srv:
        ok("snap", "create", store, "s1")
        backup = tmp_path / "backup.raw"
        tool("nbdcopy", srv.uri("s1"), backup)  # the full copy
        # writes across chunk boundaries, unaligned, and the last bytes: chunks 2-3,
        # 40, 77 and 127
        write(srv, "origin", 0x31, 3 * CS - 10, 20)
        write(srv, "origin", 0x32, 40 * CS + 512, 4096)
        write(srv, "origin", 0x33, 77 * CS, CS)
        write(srv, "origin", 0x34, 8 * MiB - 512, 512)
        ok("snap", "create", store, "s2")
        write(srv, "origin", 0x35, 90 * CS, 100)  # after s2: not in it
        copied = _incremental(srv, "s1", "s2", backup)
        assert copied == 5 * CS
        s2 = read_export(srv, "s2", tmp_path / "s2.raw")
        assert backup.read_bytes() == s2
        same_image(backup, srv.uri("s2"), "the backup brought to s2")
        # and the next increment, on top of that one
        write(srv, "origin", 0x36, 5 * CS, 3 * CS)
        ok("snap", "create", store, "s3")
        assert _incremental(srv, "s2", "s3", backup) == 4 * CS  # 5-7, and 90
        assert backup.read_bytes() == read_export(srv, "s3", tmp_path / "s3.raw")
    ok("check", store)


def test_block_status_answers_each_context_and_a_deleted_from_is_all_changed(store_of):
    store = store_of()
    length = 8 * CS
    with Served(store, workers=0) as srv:
        address = f"unix:{srv.sock}"
        ok("snap", "create", store, "s1")
        write(srv, "origin", 3, 3 * CS, CS)
        ok("snap", "create", store, "s2")
        c = RawClient(address, "s2", structured=True,
                      meta=[P.BASE_ALLOCATION, "ddsnap:changed:s1", "ddsnap:changed:nope"])
        try:
            # the unknown snapshot selects nothing; the others get their ids
            assert c.contexts == {P.BASE_ALLOCATION: P.BASE_ALLOCATION_ID,
                                  "ddsnap:changed:s1": P.CHANGED_FIRST_ID}
            base, ch = P.BASE_ALLOCATION_ID, P.CHANGED_FIRST_ID
            c.send(1, Command.BLOCK_STATUS, 0, length)
            r = c.read_reply()
            assert r["error"] == 0
            # one chunk per context, DONE on the last only
            assert [f for _t, f in r["chunks"]] == [0, P.REPLY_FLAG_DONE]
            assert r["statuses"] == {base: [(length, 0)],
                                     ch: [(3 * CS, 0), (CS, 1), (4 * CS, 0)]}
            c.send(2, Command.BLOCK_STATUS, 0, length, flags=P.CMD_FLAG_REQ_ONE)
            assert c.read_reply()["statuses"] == {base: [(length, 0)], ch: [(3 * CS, 0)]}
            # FROM deleted while selected: everything may differ
            ok("snap", "delete", store, "s1")
            c.send(3, Command.BLOCK_STATUS, CS, length)
            assert c.read_reply()["statuses"] == {base: [(length, 0)], ch: [(length, 1)]}
            # ... also once another snapshot has its name: the context stays bound
            write(srv, "origin", 5, 5 * CS, 10)
            ok("snap", "create", store, "s1")
            c.send(4, Command.BLOCK_STATUS, 0, length)
            assert c.read_reply()["statuses"][ch] == [(length, 1)]
        finally:
            c.close()
        # a new connection selects the new s1: it differs from s2 in chunk 5 only
        c = RawClient(address, "s2", structured=True, meta=["ddsnap:changed:s1"])
        try:
            c.send(1, Command.BLOCK_STATUS, 0, length)
            assert c.read_reply()["statuses"] == {
                P.CHANGED_FIRST_ID: [(5 * CS, 0), (CS, 1), (2 * CS, 0)]}
        finally:
            c.close()


def test_bad_context_requests_are_refused_cleanly(store_of):
    store = store_of()
    with Served(store, workers=0) as srv:
        address = f"unix:{srv.sock}"
        ok("snap", "create", store, "s1")
        # no context, or only unknown ones selected: BLOCK_STATUS is EINVAL
        for meta in ([], ["ddsnap:changed:nope", "ddsnap:", "ddsnap:changed:"]):
            c = RawClient(address, "origin", structured=True, meta=meta)
            try:
                assert c.contexts == {}
                c.send(1, Command.BLOCK_STATUS, 0, 4096)
                assert c.read_reply()["error"] == P.NBD_EINVAL
                c.send(2, Command.READ, 0, 4)  # and the connection goes on
                assert c.read_reply()["error"] == 0
            finally:
                c.close()
        # a query without a namespace is invalid; the next option is served
        c = RawClient(address, "origin", structured=True, meta=[":changed:s1"])
        try:
            assert [r[1] for r in c.meta_replies] == [P.REP_ERR_INVALID]
            c.send(1, Command.BLOCK_STATUS, 0, 4096)
            assert c.read_reply()["error"] == P.NBD_EINVAL
        finally:
            c.close()


# --- base:allocation -------------------------------------------------------------------


@pytest.mark.parametrize("workers", [0, 2], ids=["one-process", "workers"])
def test_base_allocation_is_the_origin_files_holes_where_a_volume_reads_it(tmp_path,
                                                                           workers):
    origin = tmp_path / "origin.img"
    size = 4 * MiB
    with open(origin, "wb") as f:
        f.truncate(size)
        f.seek(CS)
        f.write(b"\x11" * CS)  # chunk 1
        f.seek(10 * CS + 4096)
        f.write(b"\x22" * 4096)  # a block inside chunk 10
    sparse = file_map(origin, size)
    assert (CS, CS, 0) in sparse and sparse[0] == (0, CS, HOLE), sparse
    store = tmp_path / "store.img"
    ok("init", store, "--origin", origin, "--size", "64M")
    with Served(store, workers=workers) as srv:
        ok("snap", "create", store, "s1")
        assert nbd_map(srv, "origin") == sparse
        assert nbd_map(srv, "s1") == sparse
        # an origin write into a hole: the origin has data there now; s1 reads the
        # copy-out of the hole, which is data in the store (and zeroes)
        write(srv, "origin", 0x33, 20 * CS, 4096)
        now = file_map(origin, size)
        assert now == overlay(sparse, 20 * CS, 4096, 0)
        assert nbd_map(srv, "origin") == now
        assert nbd_map(srv, "s1") == overlay(sparse, 20 * CS, CS, 0)
        tool("qemu-io", "-f", "raw", "-r", "-c", f"read -P 0 {20 * CS} {CS}",
             srv.uri("s1"))
        ok("snap", "create", store, "s2")  # reads the origin everywhere
        assert nbd_map(srv, "s2") == now


# --- TRIM --------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [0, 2], ids=["one-process", "workers"])
def test_trim_punches_the_origin_and_no_snapshot_changes(store_of, tmp_path, workers):
    store = store_of()
    origin = tmp_path / "origin.img"
    data = origin.read_bytes()
    with Served(store, workers=workers) as srv:
        ok("snap", "create", store, "s1")
        # chunk 40 written after s1: copied out then, read by no snapshot now
        write(srv, "origin", 5, 40 * CS, CS)
        used = used_chunks(store)
        blocks = os.stat(origin).st_blocks
        tool("qemu-io", "-f", "raw", "-c", f"discard {40 * CS} {CS}", srv.uri("origin"))
        assert used_chunks(store) == used, "a chunk no snapshot reads is punched, not copied"
        # chunks 1-6 touched, s1 reads them all; whole blocks [2 CS, 6 CS) are punched,
        # so chunks 2-5 are copied out first and the partial blocks are left as they are
        tool("qemu-io", "-f", "raw", "-c", f"discard {2 * CS - 1000} {4 * CS + 3000}",
             srv.uri("origin"))
        assert used_chunks(store) == used + 4
        want = bytearray(data)
        want[40 * CS:41 * CS] = bytes(CS)
        want[2 * CS:6 * CS] = bytes(4 * CS)
        assert read_export(srv, "origin", tmp_path / "origin-now.raw") == want
        # holes in the origin file
        fd = os.open(origin, os.O_RDONLY)
        try:
            assert os.lseek(fd, 2 * CS, os.SEEK_HOLE) == 2 * CS
            assert os.lseek(fd, 2 * CS, os.SEEK_DATA) == 6 * CS
            assert os.lseek(fd, 40 * CS, os.SEEK_HOLE) == 40 * CS
            assert os.lseek(fd, 40 * CS, os.SEEK_DATA) == 41 * CS
        finally:
            os.close(fd)
        assert os.stat(origin).st_blocks < blocks
        # s1 reads exactly what it read before, from its copy-outs (data)
        assert read_export(srv, "s1", tmp_path / "s1.raw") == data
        assert nbd_map(srv, "s1") == [(0, SIZE, 0)]
        assert nbd_map(srv, "origin") == [(0, 2 * CS, 0), (2 * CS, 4 * CS, HOLE),
                                          (6 * CS, 34 * CS, 0), (40 * CS, CS, HOLE),
                                          (41 * CS, SIZE - 41 * CS, 0)]
        # TRIM on a snapshot is a hint it ignores
        tool("qemu-io", "-f", "raw", "-c", f"discard 0 {4 * CS}", srv.uri("s1"))
        assert read_export(srv, "s1", tmp_path / "s1-again.raw") == data
    ok("check", store)


@pytest.mark.root
def test_block_device_origin_is_all_data_and_ignores_trim(tmp_path):
    """An origin on a block device (a loop device over a sparse file): no holes are
    known (all data), and TRIM passes nothing to the device."""
    need("losetup")
    if not is_root() or not os.path.exists("/dev/loop-control"):
        pytest.skip("loop devices need root and /dev/loop-control")
    backing = tmp_path / "backing.img"
    with open(backing, "wb") as f:
        f.truncate(SIZE - SIZE % 512)
        f.seek(CS)
        f.write(b"\x44" * CS)
    data = backing.read_bytes()
    size = len(data)
    with loop_device(backing) as dev:
        store = tmp_path / "store.img"
        ok("init", store, "--origin", dev, "--size", "64M")
        with Served(store, workers=0) as srv:
            ok("snap", "create", store, "s1")
            assert nbd_map(srv, "origin") == [(0, size, 0)]
            assert nbd_map(srv, "s1") == [(0, size, 0)]
            used = used_chunks(store)
            tool("qemu-io", "-f", "raw", "-c", f"discard 0 {4 * CS}", srv.uri("origin"))
            assert used_chunks(store) == used
            assert read_export(srv, "origin", tmp_path / "origin.raw") == data
            assert read_export(srv, "s1", tmp_path / "s1.raw") == data


# --- bounded answers, in process --------------------------------------------------------


@contextlib.contextmanager
def sparse_service(make_store, tmp_path, size: int, cs: int) -> Iterator[LocalService]:
    """A LocalService over a MemoryStore of ``cs``-byte chunks and a sparse origin file
    of ``size`` bytes holding data in chunks 9-11 only; closed after."""
    path = tmp_path / "origin.img"
    with open(path, "wb") as f:
        f.truncate(size)
        f.seek(9 * cs)
        f.write(b"\x01" * 3 * cs)  # chunks 9-11
    dev = FileDevice(str(path), what="origin")
    store = make_store("memory", origin_size=size, store_size=1 << 20, chunk_size=cs)
    svc = LocalService(store, dev)
    try:
        yield svc
    finally:
        svc.close()
        dev.close()


def test_answers_are_prefixes_that_add_up_to_the_whole_map(make_store, tmp_path,
                                                          monkeypatch):
    """With pages of 2 tree entries and spans of 4 chunks, each BLOCK_STATUS answer
    covers a prefix of the range asked, and asking again from its end gives the whole
    map: the changed chunks exactly, and the origin file's holes."""
    cs = 4096
    size = 64 * cs
    with sparse_service(make_store, tmp_path, size, cs) as svc:
        origin = Origin(svc, svc.data)
        s1 = svc.create_snapshot("s1")
        for c in (1, 2, 9, 30, 31, 50, 63):
            origin.write(c * cs + 7, b"x")
        monkeypatch.setattr(volume, "CHANGED_PAGE", 2)
        monkeypatch.setattr(volume, "STATUS_SPAN", 4 * cs)

        def walk(answer) -> tuple[list[tuple[int, int, int]], int]:
            out: list[tuple[int, int, int]] = []
            pos, answers = 0, 0
            while pos < size:
                extents = answer(pos, size - pos)
                answers += 1
                assert extents and sum(n for n, _ in extents) <= size - pos
                for n, f in extents:
                    if out and out[-1][2] == f:
                        out[-1] = (out[-1][0], out[-1][1] + n, f)
                    else:
                        out.append((pos, n, f))
                    pos += n
            return out, answers

        changed_map, answers = walk(lambda o, n: origin.changed_status(s1, o, n))
        assert answers > 1
        flagged = [c for o, n, f in changed_map if f for c in range(o // cs, (o + n) // cs)]
        assert flagged == [1, 2, 9, 30, 31, 50, 63]
        snap = Snapshot(svc, svc.data, s1)
        alloc, answers = walk(snap.block_status)
        assert answers >= size // (4 * cs)
        # s1 reads the origin's holes but chunks 1, 2, 9, 30, 31, 50 and 63 from the
        # store (its copy-outs: data); the origin file had data in chunks 9-11 only
        store_chunks = {1, 2, 9, 30, 31, 50, 63}
        want = [(c * cs, cs, 0 if c in store_chunks or 9 <= c <= 11 else HOLE)
                for c in range(64)]
        assert alloc == overlay_all(want)
        # a FROM deleted: the service has no answer for it (checked under its lock),
        # and the volume says everything changed, also when its list of snapshots is
        # behind (a worker's, until the server's notice arrives)
        gone = svc.create_snapshot("gone")
        svc.delete_snapshot("gone")
        with pytest.raises(SnapshotNotFound):
            svc.changed_chunks(gone.id, 0)
        assert origin.changed_status(gone, 0, size) == [(size, P.STATE_CHANGED)]
        monkeypatch.setattr(svc, "snapshots", lambda: [s1, gone])
        assert origin.changed_status(gone, 0, size) == [(size, P.STATE_CHANGED)]


def overlay_all(per: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """Neighbours of ``per`` with the same flags merged."""
    out: list[tuple[int, int, int]] = []
    for o, n, f in per:
        if out and out[-1][2] == f:
            out[-1] = (out[-1][0], out[-1][1] + n, f)
        else:
            out.append((o, n, f))
    return out


def test_during_a_merge_allocation_and_trim_follow_what_the_origin_reads(make_store,
                                                                       tmp_path):
    """While snapshot s1 is merged into the origin, chunks not merged yet read s1's data
    from the store: data, though the origin file has a hole there.  A TRIM then merges
    the chunk first (as a write does), punches it, and the merge leaves it zero; s2
    reads what it read before throughout."""
    cs = 4096
    size = 64 * cs
    with sparse_service(make_store, tmp_path, size, cs) as svc:
        origin = Origin(svc, svc.data)
        s1 = svc.create_snapshot("s1")
        Snapshot(svc, svc.data, s1).write(20 * cs, b"S" * cs)  # s1's own, in a hole
        origin.write(40 * cs, b"O" * cs)  # copied out for s1 (a hole: zeroes)
        s2 = svc.create_snapshot("s2")
        s1_bytes = Snapshot(svc, svc.data, s1).read(0, size)
        s2_bytes = Snapshot(svc, svc.data, s2).read(0, size)
        svc.start_merge("s1")
        assert not svc.origin_reads_itself()
        flags = {c: 0 if c in (9, 10, 11, 20, 40) else HOLE for c in range(64)}
        extents = origin.block_status(0, size)
        assert sum(n for n, _ in extents) == size
        assert overlay_all([(sum(n for n, _ in extents[:i]), n, f)
                            for i, (n, f) in enumerate(extents)]) == overlay_all(
            [(c * cs, cs, f) for c, f in flags.items()])
        origin.trim(10 * cs, cs)
        origin.trim(20 * cs, cs)
        assert origin.read(10 * cs, cs) == bytes(cs) == origin.read(20 * cs, cs)
        assert Snapshot(svc, svc.data, s2).read(0, size) == s2_bytes
        assert svc.run_merge()
        want = bytearray(s1_bytes)
        want[10 * cs:11 * cs] = bytes(cs)
        want[20 * cs:21 * cs] = bytes(cs)
        assert origin.read(0, size) == want
        assert Snapshot(svc, svc.data, s2).read(0, size) == s2_bytes
        assert svc.check() == []
