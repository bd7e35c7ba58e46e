"""Rolling a real ext4 origin back to a snapshot with ``ddsnap merge``, online.

Root only: volumes are mounted through nbdfuse (NBD export -> file), a loop device and
mount, as in ``test_filesystem``.  The origin is an ext4 filesystem built with
``mkfs.ext4 -d`` from a directory of real files; snapshot ``before`` is taken; the files
are changed through a read-write mount of the origin export; snapshot ``between`` is
taken; the files are changed again.  Then ``ddsnap merge STORE before --wait`` runs while
a reader keeps copying the whole origin export (``nbdcopy``: several connections, many
requests in flight) and a Python NBD client keeps reading it 4 KiB at a time, front to
back (one short request after another, so each pass spans the whole merge).  Every block
read is checked: it is the origin's old content or ``before``'s, never anything else; the
sequential reader never sees old content again once it has seen ``before``'s anywhere
(the origin switches to ``before`` at once when the merge starts); whatever is read after
the merge ended is exactly ``before``.  Afterwards the origin must hold exactly the
``before`` files (``diff -r``) and pass ``e2fsck -fn``, ``between`` must be unchanged, the
origin must work as a filesystem again (changed read-write while ``between`` stays), and
``ddsnap check`` must find the store clean.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

import test_filesystem as fs
from ddsnap.nbd.wire import Command
from nbd_helpers import RawClient
from served import (
    DEADLINE,
    KiB,
    MiB,
    Served,
    export_names,
    is_root,
    merge_status,
    need,
    ok,
    ok_json,
    same_image,
    tool,
)

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(not is_root(), reason="loop devices and mounts need root"),
    pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="no /dev/fuse"),
]

ORIGIN_SIZE = 64 * MiB
BLOCK = 4 * KiB


def kind(got, old, new) -> str:
    """``=`` (old and new agree and ``got`` is it), ``o`` (old), ``n`` (new) or ``x``."""
    if old == new:
        return "=" if got == old else "x"
    return "o" if got == old else "n" if got == new else "x"


class BlockReader(threading.Thread):
    """A Python NBD client on the origin export, reading it 4 KiB at a time, front to
    back, again and again until stopped; ``kinds`` has one letter (see :func:`kind`) per
    read in the order they were made, ``passes`` counts whole passes."""

    def __init__(self, address: str, old: bytes, new: bytes):
        super().__init__(name="block-reader", daemon=True)
        self.address, self.old, self.new = address, memoryview(old), memoryview(new)
        self.kinds: list[str] = []
        self.passes = 0
        self.errors: list[str] = []
        self.halt = threading.Event()

    def run(self) -> None:
        try:
            client = RawClient(self.address, "origin")
        except Exception as e:  # noqa: BLE001 - reported by the test
            self.errors.append(f"connect: {e!r}")
            return
        try:
            handle = 0
            while not self.halt.is_set():
                for off in range(0, len(self.old), BLOCK):
                    handle += 1
                    client.send(handle, Command.READ, off, BLOCK)
                    r = client.read_reply({handle: BLOCK})
                    if r["error"] or r["handle"] != handle:
                        self.errors.append(f"READ at {off}: {r}")
                        return
                    self.kinds.append(kind(r["data"], self.old[off:off + BLOCK],
                                           self.new[off:off + BLOCK]))
                self.passes += 1
            client.send(handle + 1, Command.DISC)
        except Exception as e:  # noqa: BLE001 - reported by the test
            self.errors.append(f"after {len(self.kinds)} reads: {e!r}")
        finally:
            client.close()

    def stop(self) -> None:
        self.halt.set()
        self.join(2 * DEADLINE)
        assert not self.is_alive(), "the block reader did not stop"


class Reader(threading.Thread):
    """Copies the whole origin export again and again with ``nbdcopy`` until stopped.

    Each copy is checked block by block against the two contents the origin may show
    while the merge runs (``old``: before the merge, ``new``: the snapshot merged);
    ``copies`` holds ``(start, end, kinds)`` with ``kinds`` a string of ``o``/``n``/``=``
    (block is old / new / the same in both) per block, and ``errors`` whatever went wrong.
    """

    def __init__(self, uri: str, old: bytes, new: bytes):
        super().__init__(name="origin-reader", daemon=True)
        self.uri, self.old, self.new = uri, memoryview(old), memoryview(new)
        self.copies: list[tuple[float, float, str]] = []
        self.errors: list[str] = []
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            start = time.monotonic()
            try:
                p = subprocess.run(["nbdcopy", self.uri, "-"], capture_output=True,
                                   timeout=DEADLINE)
            except subprocess.TimeoutExpired:
                self.errors.append("nbdcopy hung")
                return
            end = time.monotonic()
            if p.returncode != 0:
                self.errors.append(f"nbdcopy exited {p.returncode}: {p.stderr.decode()}")
                return
            if len(p.stdout) != len(self.old):
                self.errors.append(f"nbdcopy read {len(p.stdout)} bytes")
                return
            self.copies.append((start, end, self.classify(memoryview(p.stdout))))

    def classify(self, got: memoryview) -> str:
        return "".join(kind(got[off:off + BLOCK], self.old[off:off + BLOCK],
                            self.new[off:off + BLOCK]) for off in range(0, len(got), BLOCK))

    def stop(self) -> None:
        self.halt.set()
        self.join(2 * DEADLINE)
        assert not self.is_alive(), "the reader did not stop"


def test_merge_an_ext4_origin_back_while_it_is_read(tmp_path):
    with contextlib.ExitStack() as stack:
        run_scenario(tmp_path, stack)


def run_scenario(tmp_path: Path, stack: contextlib.ExitStack) -> None:
    for binary in ("mkfs.ext4", "e2fsck", "losetup", "mount", "umount", "nbdfuse",
                   "fusermount3", "diff", "nbdcopy", "qemu-img"):
        need(binary)
    rng = random.Random(2025)
    files = tmp_path / "files"
    files.mkdir()
    fs.build_files(files, rng)
    model_before = tmp_path / "model-before"
    shutil.copytree(files, model_before, symlinks=True)
    new_random = rng.randbytes(3 * MiB)
    big, middle = rng.randbytes(5 * MiB + 777), rng.randbytes(50000)
    model_between = tmp_path / "model-between"
    shutil.copytree(model_before, model_between, symlinks=True)
    fs.change_one(model_between, random.Random(1), new_random)
    model_final = tmp_path / "model-final"
    shutil.copytree(model_between, model_final, symlinks=True)
    fs.change_two(model_final, big, middle)

    origin = tmp_path / "origin.img"
    with open(origin, "wb") as f:
        f.truncate(ORIGIN_SIZE)
    tool("mkfs.ext4", "-q", "-F", "-d", files, origin)
    store = tmp_path / "store.img"
    ok("init", store, "--origin", origin, "--size", "160M", "--chunk-size", "4K")
    ok("snap", "create", store, "before")

    srv = stack.enter_context(Served(store))
    # 1. change the files through a read-write mount, snapshot, change them again
    with fs.mount_export(srv, "origin", tmp_path, writable=True) as (mnt, _):
        fs.same_tree(model_before, mnt)
        fs.change_one(mnt, random.Random(1), new_random)
        fs.same_tree(model_between, mnt)
    ok("snap", "create", store, "between")
    with fs.mount_export(srv, "origin", tmp_path, writable=True) as (mnt, _):
        fs.change_two(mnt, big, middle)
        fs.same_tree(model_final, mnt)
    raw = {name: tmp_path / f"{name}.raw" for name in ("before", "between", "origin")}
    for name, path in raw.items():
        tool("nbdcopy", srv.uri(name), path)
    old, new = raw["origin"].read_bytes(), raw["before"].read_bytes()
    assert old != new

    # 2. merge ``before`` while two readers keep reading the origin
    reader = Reader(srv.uri("origin"), old, new)
    blocks = BlockReader(f"unix:{srv.sock}", old, new)
    reader.start()
    blocks.start()
    try:
        assert_reader_started(reader)
        wait_for(lambda: blocks.kinds or blocks.errors, "the block reader to read")
        merge_start = time.monotonic()
        p = ok("merge", store, "before", "--wait")
        merge_end = time.monotonic()
        assert p.stdout.strip() == "merged snapshot before into the origin", p.stdout
        copies_at_end, reads_at_end, passes_at_end = (len(reader.copies), len(blocks.kinds),
                                                      blocks.passes)
        # keep reading until each reader has read everything again after the merge
        wait_for(lambda: (len(reader.copies) >= copies_at_end + 2
                          and blocks.passes >= passes_at_end + 2)
                 or reader.errors or blocks.errors or not reader.is_alive()
                 or not blocks.is_alive(), "the readers to read the merged origin")
    finally:
        reader.stop()
        blocks.stop()
    assert not reader.errors, reader.errors
    assert not blocks.errors, blocks.errors
    seq = "".join(blocks.kinds).replace("=", "")
    assert "x" not in seq, "the block reader read a block that is neither old nor 'before'"
    switch = seq.find("n")
    assert seq.startswith("o") and switch > 0, "the block reader never saw the switch"
    assert "o" not in seq[switch:], ("the block reader saw the old origin again after it "
                                     "had seen 'before'")
    assert "o" not in "".join(blocks.kinds[reads_at_end + 1:])
    for start, _end, kinds in reader.copies:
        assert "x" not in kinds, (f"a copy of the origin made from {start - merge_start:+.2f}"
                                  f" s held a block that is neither the old origin nor "
                                  f"'before' (block {kinds.index('x')})")
        if start > merge_end:
            assert "o" not in kinds, (f"a copy started after the merge still shows the old "
                                      f"origin at block {kinds.index('o')}")
    assert any(start < merge_end and end > merge_start for start, end, _ in reader.copies), \
        "no copy of the origin overlapped the merge"

    # 3. the origin is ``before`` again, block for block and file for file
    assert merge_status(store) is None
    assert [s["name"] for s in ok_json("snap", "list", store)] == ["between"]
    assert export_names(srv) == ["origin", "between"]
    same_image(raw["before"], srv.uri("origin"), "the merged origin")
    same_image(raw["between"], srv.uri("between"), "snapshot between")
    with fs.mount_export(srv, "origin", tmp_path, writable=False) as (mnt, _):
        fs.same_tree(model_before, mnt)
        assert (mnt / "services").read_bytes() == (model_before / "services").read_bytes()
    with fs.mount_export(srv, "between", tmp_path, writable=False) as (mnt, _):
        fs.same_tree(model_between, mnt)
    assert ok_json("check", store)["clean"]

    # 4. the origin is a working filesystem again; ``between`` keeps its files
    model_again = tmp_path / "model-again"
    shutil.copytree(model_before, model_again, symlinks=True)
    after = rng.randbytes(2 * MiB + 3)

    def change_again(root: Path) -> None:
        fs.change_one(root, random.Random(1), new_random)
        (root / "after-merge.bin").write_bytes(after)
        shutil.rmtree(root / "a" / "b")

    change_again(model_again)
    with fs.mount_export(srv, "origin", tmp_path, writable=True) as (mnt, _):
        change_again(mnt)
        fs.same_tree(model_again, mnt)
    with fs.mount_export(srv, "between", tmp_path, writable=False) as (mnt, _):
        fs.same_tree(model_between, mnt)
    same_image(raw["between"], srv.uri("between"), "snapshot between")
    assert ok_json("check", store) == {"clean": True, "fatal": 0, "warnings": 0,
                                       "findings": []}
    srv.stop()
    fs.e2fsck(str(origin))
    assert ok_json("check", store)["clean"]


def wait_for(predicate, what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not predicate():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.05)


def assert_reader_started(reader: Reader) -> None:
    """Wait until the reader has made one whole copy of the unmerged origin."""
    deadline = time.monotonic() + DEADLINE
    while not reader.copies:
        assert not reader.errors, reader.errors
        assert reader.is_alive() and time.monotonic() < deadline, "the reader never copied"
        time.sleep(0.05)
    assert set(reader.copies[0][2]) <= {"o", "="}, "the origin changed before the merge"
