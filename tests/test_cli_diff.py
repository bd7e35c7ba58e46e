"""``ddsnap diff STORE FROM TO [--json]`` as a user runs it (issue 13): on a served store
(through its control socket) and on a store nobody serves, after real NBD writes with
qemu-io; the ranges listed are exactly the chunks written between the two snapshots
(and the snapshot's own writes), whole chunks, in bytes; bad input is refused."""

from __future__ import annotations

import json

import pytest

from served import Served, ddsnap, fails, make_origin, ok, tool

pytestmark = pytest.mark.clients

CS = 65536
SIZE = 4 * 1024 * 1024 + 1000  # the last chunk is partial


def write(srv: Served, export: str, pattern: int, offset: int, length: int) -> None:
    tool("qemu-io", "-f", "raw", "-c", f"write -P {pattern} {offset} {length}",
         srv.uri(export))


def ranges(store, a: str, b: str) -> list[tuple[int, int]]:
    p = ok("diff", store, a, b)
    out = []
    for line in p.stdout.splitlines():
        offset, length = line.split("\t")
        out.append((int(offset), int(length)))
    return out


@pytest.fixture
def history(tmp_path):
    """s1; origin writes to chunks 3-4 and the partial last chunk; s2; an origin write to
    chunk 15 and a write to s2's chunk 0; s3 (a copy of the origin as it is)."""
    origin = tmp_path / "origin.img"
    make_origin(origin, SIZE, seed=13)
    store = tmp_path / "store.img"
    ok("init", store, "--origin", origin, "--size", "64M")
    with Served(store, workers=0) as srv:
        ok("snap", "create", store, "s1")
        write(srv, "origin", 7, 3 * CS + 100, CS)  # chunks 3 and 4
        write(srv, "origin", 8, SIZE - 500, 500)  # the partial last chunk (64)
        ok("snap", "create", store, "s2")
        write(srv, "origin", 9, 15 * CS, 4096)
        write(srv, "s2", 10, 0, 4096)
        ok("snap", "create", store, "s3")
        served = {(a, b): ranges(store, a, b) for a, b in
                  [("s1", "s2"), ("s1", "origin"), ("s2", "origin"), ("s2", "s1"),
                   ("s3", "origin"), ("s1", "s1")]}
        served_json = json.loads(ok("diff", store, "s1", "origin", "--json").stdout)
    return store, served, served_json


def test_diff_lists_the_chunks_written_between_two_snapshots(history):
    store, served, _ = history
    last = SIZE // CS  # chunk 64, 1000 bytes
    # s2's own write to chunk 0, and the origin writes between s1 and s2
    assert served[("s1", "s2")] == [(0, CS), (3 * CS, 2 * CS), (last * CS, 1000)]
    assert served[("s2", "s1")] == served[("s1", "s2")]
    assert served[("s2", "origin")] == [(0, CS), (15 * CS, CS)]
    assert served[("s1", "origin")] == [(3 * CS, 2 * CS), (15 * CS, CS), (last * CS, 1000)]
    assert served[("s3", "origin")] == []  # nothing written since
    assert served[("s1", "s1")] == []


def test_diff_of_a_store_nobody_serves_says_the_same(history):
    store, served, served_json = history
    for (a, b), want in served.items():
        assert ranges(store, a, b) == want, (a, b)
    local = json.loads(ok("diff", store, "s1", "origin", "--json").stdout)
    assert local == served_json
    assert local["from"] == "s1" and local["to"] == "origin" and local["chunk_size"] == CS
    assert [(r["offset"], r["length"]) for r in local["ranges"]] == served[("s1", "origin")]
    assert local["changed_bytes"] == sum(n for _, n in served[("s1", "origin")])


def test_diff_summary_goes_to_stderr(history):
    store, _served, _ = history
    p = ok("diff", store, "s2", "origin")
    assert "131072 bytes in 2 range(s) may differ between s2 and origin" in p.stderr


def test_diff_refuses_what_is_not_there(history, tmp_path):
    store, _served, _ = history
    fails(8, "diff", store, "s1", "nope", match="nope")
    fails(3, "diff", tmp_path / "missing.img", "s1", "s2", match="missing.img")
    p = ddsnap("diff", store, "s1")
    assert p.returncode == 2 and "TO" in p.stderr


def test_diff_during_a_merge_sees_the_origin_as_it_reads():
    """While s1 is merged into the origin, the origin reads s1's data not merged yet:
    a chunk only s1 wrote differs between the origin and s2 (taken before the merge)."""
    from ddsnap import admin
    from ddsnap.service.local import LocalService
    from ddsnap.store.blockdev import MemoryDevice
    from ddsnap.store.memory import MemoryStore
    from ddsnap.volume import Snapshot

    cs = 4096
    svc = LocalService(MemoryStore(16 * cs, 16 * cs, cs, 0), MemoryDevice(16 * cs))
    try:
        s1 = svc.create_snapshot("s1")
        svc.create_snapshot("s2")
        Snapshot(svc, svc.data, s1).write(5 * cs, b"x" * cs)  # s1's own data at chunk 5
        assert admin.diff(svc, "s2", "origin")["runs"] == []
        svc.start_merge("s1")  # (not run: every chunk still to merge)
        assert admin.diff(svc, "s2", "origin")["runs"] == [[5, 5]]
        assert admin.diff(svc, "s1", "origin")["runs"] == []
    finally:
        svc.close()
