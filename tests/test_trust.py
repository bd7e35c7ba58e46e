"""Issue 8, as a user meets it: the real ``ddsnap`` command and server on damaged stores.

* the newcomer's finding: serve, snapshot, write the origin with flushes, ``kill -9``,
  flip one byte in a journal block of the replay window, serve again: ``serve`` refuses
  (exit 5 naming the block), ``check`` reports it, and ``serve --force-degraded`` serves
  read-only where the snapshot reads its old data or EIO, never the new origin data;
* ``check`` never writes (the store file's bytes and times are unchanged);
* superblock slots: one overwritten is a warning naming it, ``check --repair`` rewrites
  it; ``check --repair`` frees leaked blocks and refuses damage it cannot fix;
* format v3's snapshot table chain: a damaged block past the first one (a store with
  more than 14 snapshots) is refused by ``serve`` and named by ``check``;
* a damaged leaf never makes ``serve`` answer other bytes than a snapshot's own.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from ddsnap.store.blockdev import FileDevice
from ddsnap.store.format import BLOCK_SIZE, T_JOURNAL, T_LEAF, peek_header
from ddsnap.store.shared import SharedStore
from served import MiB, Served, ddsnap, fails, make_origin, ok, ok_json, tool

ORIGIN = 8 * MiB


def _qemu_io(uri: str, *cmds: str):
    args = ["qemu-io", "-f", "raw"]
    for c in cmds:
        args += ["-c", c]
    return tool(*args, uri)


def _flip(path: Path, block: int, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(block * BLOCK_SIZE + offset)
        b = f.read(1)
        f.seek(block * BLOCK_SIZE + offset)
        f.write(bytes([b[0] ^ 0x20]))


def _journal_window(path: Path) -> list[tuple[int, int]]:
    """``(block, type)`` of each journal block recovery would read, in order."""
    dev = FileDevice(str(path), writable=False)
    try:
        store = SharedStore.open(dev, mode="inspect")
        j = store.journal
        out = []
        for pos in range(j.tail, j.head):
            b = j.start + pos % j.size
            h = peek_header(dev.pread(BLOCK_SIZE, b * BLOCK_SIZE))
            out.append((b, h[0] if h else 7))
        return out
    finally:
        dev.close()


def _digest(path: Path) -> tuple[str, int, int]:
    st = os.stat(path)
    return hashlib.sha256(path.read_bytes()).hexdigest(), st.st_mtime_ns, st.st_ctime_ns


def new_store(tmp_path: Path, seed: int) -> tuple[Path, Path, bytes]:
    """An origin of seeded random bytes and a 32 MiB store with snapshot ``s1`` of it,
    cleanly shut down: ``(store, origin, origin data)``."""
    origin = tmp_path / "origin.img"
    store = tmp_path / "store.img"
    data = make_origin(origin, ORIGIN, seed=seed)
    ok("init", store, "--origin", origin, "--size", "32M")
    ok("snap", "create", store, "s1")
    return store, origin, data


@pytest.fixture
def killed(tmp_path):
    """A store served, snapshot ``s1`` taken, the origin rewritten with flushes (every
    write a copy-out), then the server SIGKILLed: recovery pending."""
    store, origin, data = new_store(tmp_path, 5)
    srv = Served(store).start()
    _qemu_io(srv.uri("origin"), "write -P 0x5a 0 2M", "flush", "write -P 0x5b 3M 1M", "flush")
    srv.kill()
    return tmp_path, store, origin, data


def test_check_never_writes(killed):
    _dir, store, _origin, _data = killed
    before = _digest(store)
    report = ok_json("check", store)
    assert report["clean"], report
    assert _digest(store) == before, "check wrote to the store"


def _flip_in_window(store: Path, what: str) -> int:
    """Flip a byte of the first journal descriptor (``"descriptor"``) or leaf image
    (``"image"``: what maps the copy-outs) of the replay window; return its block."""
    window = _journal_window(store)
    if what == "descriptor":
        block = next(b for b, t in window if t == T_JOURNAL)
    else:
        block = next(b for b, t in window if t == T_LEAF)
    _flip(store, block, 1000)
    return block


@pytest.mark.parametrize("what", ["descriptor", "image"])
def test_flipped_journal_byte_is_refused_not_served(killed, what):
    """The issue's campaign finding: recovery used to stop at the damaged transaction
    as if torn and the snapshot then read the new origin data."""
    tmp, store, _origin, data = killed
    block = _flip_in_window(store, what)
    line = fails(5, "serve", store, "--listen", f"unix:{tmp}/x.sock")
    assert f"block {block}" in line and "committed" in line, line
    # Degraded, read-only: the snapshot reads its own data or fails; never new data.
    with Served(store, extra=("--force-degraded",)) as srv:
        st = srv.control("status")
        assert st["degraded"] is True and st["damage"][0]["block"] == block
        out = tmp / "s1.raw"
        p = tool("nbdcopy", srv.uri("s1"), out, check=False)
        if p.returncode == 0:
            assert out.read_bytes() == data, "the degraded server served wrong bytes"
        else:
            assert "Input/output error" in p.stderr, p.stderr
        w = tool("qemu-io", "-f", "raw", "-c", "write -P 1 0 4K", srv.uri("origin"),
                 check=False)
        assert w.returncode != 0 or "failed" in w.stdout + w.stderr, w
        fails(13, "snap", "create", store, "s2")
    fails(5, "serve", store, "--listen", f"unix:{tmp}/x.sock")  # still refused




@pytest.mark.parametrize("what", [
    "descriptor",
    "image"])
def test_flipped_journal_byte_is_reported_by_check(killed, what):
    _tmp, store, _origin, _data = killed
    block = _flip_in_window(store, what)
    p = ddsnap("check", store, "--json")
    assert p.returncode == 5, p
    assert p.stdout, f"no report: {p.stderr}"
    assert any(f["block"] == block and f["severity"] == "fatal"
               for f in json.loads(p.stdout)["findings"]), p.stdout


@pytest.mark.parametrize("slot", [0, 1])
def test_damaged_superblock_slot_is_a_warning_and_repair_rewrites_it(tmp_path, slot):
    store, _origin, _data = new_store(tmp_path, 6)
    _flip(store, slot, 200)
    p = ddsnap("check", store)
    assert p.returncode == 0, p
    assert f"warning (block {slot}): superblock slot {slot} is damaged" in p.stdout, p.stdout
    p = ok("check", store, "--repair")
    assert f"repair: rewrite: superblock slot {slot} is damaged" in p.stderr, p.stderr
    assert ok_json("check", store) == {"clean": True, "fatal": 0, "warnings": 0,
                                       "findings": []}
    assert [s["name"] for s in ok_json("snap", "list", store)] == ["s1"]


def test_repair_frees_leaks_and_refuses_real_damage(tmp_path):
    store, _origin, _data = new_store(tmp_path, 7)
    # Leak: mark a free block in use in the bitmap, through the store's own API.
    dev = FileDevice(str(store))
    try:
        st = SharedStore.open(dev)
        st.bitmap.alloc_block()
        st.commit()
        st.close()
    finally:
        dev.close()
    report = ok_json("check", store)
    assert report["warnings"] == 1 and "leaked" in report["findings"][0]["message"]
    p = ok("check", store, "--repair")
    assert "free 1 leaked blocks" in p.stderr, p.stderr
    assert ok_json("check", store)["findings"] == []
    # A damaged snapshot table is not something repair can fix: refused, unchanged.
    _flip(store, 2, 300)
    before = _digest(store)
    fails(5, "check", store, "--repair", match=r"block 2: .*fixes only")
    assert _digest(store) == before


# --- format v3: the snapshot table's chain, leaves -----------------------------------------


def _inspect(path: Path, fn):
    """``fn(store)`` on the store at ``path`` opened for inspection (nothing written)."""
    dev = FileDevice(str(path), writable=False)
    try:
        return fn(SharedStore.open(dev, mode="inspect"))
    finally:
        dev.close()


def test_damaged_chained_table_block_is_refused_and_named(tmp_path):
    """More than 14 snapshots: the table grew a second block in the data area.  Damage
    to it is refused by serve and named by check, like damage to the first."""
    store, _origin, _data = new_store(tmp_path, 8)
    dev = FileDevice(str(store))
    try:
        st = SharedStore.open(dev)
        for i in range(2, 17):
            st.create_snapshot(f"s{i}")
        st.close()
    finally:
        dev.close()
    assert [s["name"] for s in ok_json("snap", "list", store)] == [f"s{i}" for i in range(1, 17)]
    assert ok_json("check", store)["clean"]
    blocks = _inspect(store, lambda st: list(st.table_blocks))
    assert len(blocks) == 2 and blocks[0] == 2
    victim = blocks[1]
    _flip(store, victim, 300)
    fails(5, "serve", store, "--listen", f"unix:{tmp_path}/x.sock", match=f"block {victim}")
    p = ddsnap("check", store, "--json")
    assert p.returncode == 5, p
    assert any(f["block"] == victim and f["severity"] == "fatal"
               for f in json.loads(p.stdout)["findings"]), p.stdout
    before = _digest(store)
    fails(5, "check", store, "--repair", match=rf"block {victim}: .*fixes only")
    assert _digest(store) == before




def test_damaged_table_of_snapshots_that_wrote_is_named_by_check(tmp_path):
    store, _origin, _data = new_store(tmp_path, 10)
    ok("snap", "create", store, "s2")
    with Served(store) as srv:
        # A copy-out both snapshots read, then s2's own data at that chunk.
        _qemu_io(srv.uri("origin"), "write -P 0x11 0 64K", "flush")
        _qemu_io(srv.uri("s2"), "write -P 0x22 0 4K", "flush")
    assert ok_json("check", store)["clean"]
    _flip(store, 2, 300)
    p = ddsnap("check", store, "--json")
    assert "Traceback" not in p.stderr, p.stderr[-2000:]
    assert p.returncode == 5, p
    assert any(f["block"] == 2 and f["severity"] == "fatal"
               for f in json.loads(p.stdout)["findings"]), p.stdout




def test_damaged_leaf_never_serves_other_bytes_than_a_snapshots_own(tmp_path):
    origin = tmp_path / "origin.img"
    store = tmp_path / "store.img"
    make_origin(origin, ORIGIN, seed=11)
    ok("init", store, "--origin", origin, "--size", "32M", "--chunk-size", "4K")
    ok("snap", "create", store, "s1")
    with Served(store) as srv:
        # 256 copy-outs (two leaves of the origin's exceptions), then s1's own data,
        # whose exception sorts after them (in the last leaf).
        _qemu_io(srv.uri("origin"), "write -P 0x5a 0 1M", "flush")
        _qemu_io(srv.uri("s1"), "write -P 0x33 4M 4K", "flush")
    leaves = _inspect(store, lambda st: st.node(st.state.root).children)
    assert len(leaves) >= 2
    _flip(store, leaves[0], 3000)  # the copy-outs of the first chunks
    with Served(store) as srv:
        r = tool("qemu-io", "-f", "raw", "-r", "-c", "read -P 0x33 4M 4K", srv.uri("s1"),
                 check=False)
    out = r.stdout + r.stderr
    assert "Pattern verification failed" not in out, f"served other bytes: {out}"
    assert r.returncode == 0 or "Input/output error" in out, out


# --- the origin changed behind ddsnap's back (issue 8, item 4) ---------------------------


@pytest.fixture
def shut(tmp_path):
    """A store with snapshot ``s1`` of an origin, cleanly shut down."""
    return (tmp_path, *new_store(tmp_path, 9))


def test_origin_written_while_unserved_is_refused_until_accepted(shut):
    tmp, store, origin, data = shut
    with open(origin, "r+b") as f:  # same size, new content: mtime changes
        f.seek(MiB)
        f.write(b"x" * 4096)
    line = fails(10, "serve", store, "--listen", f"unix:{tmp}/x.sock")
    assert "changed while" in line and "modified since (mtime)" in line, line
    assert "--accept-origin-change" in line and "ddsnap set" in line, line
    fails(10, "snap", "list", store, match="changed while")
    # The refusal changed nothing: still refused.
    fails(10, "status", store, match="changed while")
    with Served(store, extra=("--accept-origin-change",)) as srv:
        out = tmp / "s1.raw"
        tool("nbdcopy", srv.uri("s1"), out)
        # What the user accepted: the snapshot reads the new origin data there.
        assert out.read_bytes()[MiB:MiB + 4096] == b"x" * 4096
    assert ok_json("check", store)["clean"]
    ok("status", store)  # the clean shutdown recorded the origin as it is now


def test_moved_origin_is_repointed_with_set(shut):
    tmp, store, origin, data = shut
    moved = tmp / "moved.img"
    origin.rename(moved)
    fails(10, "serve", store, "--listen", f"unix:{tmp}/x.sock", match="does not exist")
    fails(3, "set", store, f"origin={tmp / 'nowhere.img'}", match="not found")
    p = ok("set", store, f"origin={moved}")
    assert str(moved) in p.stdout
    assert ok_json("status", store)["origin"] == str(moved)
    with Served(store) as srv:
        tool("nbdcopy", srv.uri("s1"), tmp / "s1.raw")
    assert (tmp / "s1.raw").read_bytes() == data


def test_origin_shrunk_while_served_fails_reads_and_writes_never_zeroes(shut):
    tmp, store, origin, data = shut
    with Served(store) as srv:
        os.truncate(origin, ORIGIN // 2)
        # The snapshot still reads the origin for the whole second half: EIO, not zeroes.
        r = tool("qemu-io", "-f", "raw", "-r", "-c", f"read -v {ORIGIN - 4096} 4096",
                 srv.uri("s1"), check=False)
        assert "Input/output error" in r.stdout + r.stderr, r
        w = tool("qemu-io", "-f", "raw", "-c", f"write -P 7 {ORIGIN - 8192} 4096",
                 srv.uri("origin"), check=False)
        assert "Input/output error" in w.stdout + w.stderr, w
        assert os.path.getsize(origin) == ORIGIN // 2  # the write did not regrow it
        assert "shrank" in srv.output()
