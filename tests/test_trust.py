"""Issue 8, as a user meets it: the real ``ddsnap`` command and server on damaged stores.

* the newcomer's finding: serve, snapshot, write the origin with flushes, ``kill -9``,
  flip one byte in a journal block of the replay window, serve again: ``serve`` refuses
  (exit 5 naming the block), ``check`` reports it, and ``serve --force-degraded`` serves
  read-only where the snapshot reads its old data or EIO, never the new origin data;
* ``check`` never writes (the store file's bytes and times are unchanged);
* superblock slots: one overwritten is a warning naming it, ``check --repair`` rewrites
  it; ``check --repair`` frees leaked blocks and refuses damage it cannot fix.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from ddsnap.store.blockdev import FileDevice
from ddsnap.store.format import BLOCK_SIZE, T_JOURNAL, peek_header
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


@pytest.mark.parametrize("what", [T_JOURNAL, "image"])
def test_flipped_journal_byte_is_refused_not_served(killed, what):
    """The issue's campaign finding: recovery used to stop at the damaged transaction
    as if torn and the snapshot then read the new origin data."""
    tmp, store, _origin, data = killed
    window = _journal_window(store)
    if what == T_JOURNAL:
        block = next(b for b, t in window if t == T_JOURNAL)
    else:  # the image of a leaf: what maps the copy-outs
        block = next(b for b, t in window if t == 4)
    _flip(store, block, 1000)
    line = fails(5, "serve", store, "--listen", f"unix:{tmp}/x.sock")
    assert f"block {block}" in line and "committed" in line, line
    p = ddsnap("check", store, "--json")
    assert p.returncode == 5, p
    assert any(f["block"] == block and f["severity"] == "fatal"
               for f in json.loads(p.stdout)["findings"]), p.stdout
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
