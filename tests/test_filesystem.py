"""A real ext4 filesystem on the origin, changed through ddsnap while snapshots exist.

Root only: the origin and snapshots are mounted through nbdfuse (NBD export -> file), a
loop device (file -> block device) and mount.  The filesystem is built with
``mkfs.ext4 -d`` from a directory of real files; snapshot ``before`` is taken, the origin
is mounted read-write and changed, snapshot ``after`` is taken, the origin is changed
again; then each snapshot must hold exactly the files of its moment (``diff -r``), every
filesystem must pass ``e2fsck -fn``, and ``ddsnap check`` must find the store clean.
Mounts, loop devices and FUSE mounts are torn down even when a step fails.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
from pathlib import Path

import pytest

from served import MiB, Served, is_root, loop_device, mounted, nbdfuse, need, ok, ok_json, tool

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(not is_root(), reason="loop devices and mounts need root"),
    pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="no /dev/fuse"),
]

SRC = Path(__file__).resolve().parents[1] / "src" / "ddsnap"


@contextlib.contextmanager
def attach(srv: Served, export: str, workdir: Path, writable: bool):
    """NBD export -> nbdfuse file -> loop device; yields the loop device."""
    with nbdfuse(srv.uri(export), workdir / f"fuse-{export}", readonly=not writable) as f, \
            loop_device(f, readonly=not writable) as dev:
        yield dev


@contextlib.contextmanager
def mount_export(srv: Served, export: str, workdir: Path, writable: bool):
    """Mount the ext4 filesystem of ``export``; yields ``(mountpoint, loop device)``.

    A read-only mount uses ``noload`` so ext4 does not even replay its journal.  After
    the unmount, ``e2fsck -fn`` must find the filesystem clean."""
    with attach(srv, export, workdir, writable) as dev:
        opts = "rw" if writable else "ro,noload"
        with mounted(dev, workdir / f"mnt-{export}", opts) as mnt:
            yield mnt, dev
            if writable:
                tool("sync", "-f", mnt)
        e2fsck(dev)


def e2fsck(dev: str) -> None:
    p = tool("e2fsck", "-fn", dev, check=False)
    assert p.returncode == 0, f"e2fsck -fn {dev} exited {p.returncode}:\n{p.stdout}\n{p.stderr}"


def same_tree(expected: Path, actual: Path) -> None:
    p = tool("diff", "-r", "-x", "lost+found", expected, actual, check=False)
    assert p.returncode == 0, f"{actual} differs from {expected}:\n{p.stdout[:4000]}{p.stderr}"


def build_files(root: Path, rng: random.Random) -> None:
    """A tree of real files: source code, system text files, binary data, nesting,
    a symlink, an empty file."""
    shutil.copytree(SRC, root / "ddsnap-source",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    licenses = Path("/usr/share/common-licenses")
    if licenses.is_dir():
        shutil.copytree(licenses, root / "licenses", symlinks=True)
    else:  # keep the shape of the test on a machine without it
        (root / "licenses").mkdir()
        for i in range(20):
            (root / "licenses" / f"L{i}").write_text(f"license {i}\n" * 500)
    services = Path("/etc/services")
    (root / "services").write_bytes(services.read_bytes() if services.exists()
                                    else b"ssh 22/tcp\n" * 1000)
    (root / "random.bin").write_bytes(rng.randbytes(3 * MiB))
    deep = root / "a" / "b" / "c"
    deep.mkdir(parents=True)
    for i in range(200):
        (deep / f"small-{i:03}.txt").write_text(f"file {i}\n" * (i + 1))
    (root / "a" / "middle.bin").write_bytes(rng.randbytes(700 * 1024 + 123))
    (root / "empty").touch()
    os.symlink("a/middle.bin", root / "link-to-middle")


def change_one(root: Path, rng: random.Random, new_random: bytes) -> None:
    """The first round of changes (applied identically to the mount and to the model)."""
    (root / "services").write_text("the origin was changed after the snapshot\n")
    shutil.rmtree(root / "licenses")
    (root / "new.txt").write_text("a new file\n")
    (root / "random.bin").write_bytes(new_random)
    with open(root / "a" / "b" / "c" / "small-007.txt", "a") as f:
        f.write("appended\n" * 100)
    os.rename(root / "a" / "b" / "c" / "small-100.txt", root / "a" / "renamed.txt")
    for i in range(150, 200):
        (root / "a" / "b" / "c" / f"small-{i:03}.txt").unlink()


def change_two(root: Path, big: bytes, middle: bytes) -> None:
    """The second round of changes."""
    (root / "new.txt").unlink()
    (root / "final.txt").write_text("written after snapshot 'after'\n")
    (root / "big.bin").write_bytes(big)
    with open(root / "a" / "middle.bin", "r+b") as f:
        f.seek(4096 * 17 + 5)
        f.write(middle)
    shutil.rmtree(root / "ddsnap-source")


@pytest.mark.parametrize("volumes", ["files", "block-devices"])
def test_ext4_snapshots_before_and_after(tmp_path, volumes):
    """``files``: origin and store are image files.  ``block-devices``: both are loop
    devices, as on a real server (the control socket then lives in the run directory,
    found through the registry)."""
    with contextlib.ExitStack() as stack:
        run_scenario(tmp_path, volumes, stack)


def run_scenario(tmp_path: Path, volumes: str, stack: contextlib.ExitStack) -> None:
    for binary in ("mkfs.ext4", "e2fsck", "losetup", "mount", "umount", "nbdfuse",
                   "fusermount3", "diff"):
        need(binary)
    rng = random.Random(2024)
    files = tmp_path / "files"
    files.mkdir()
    build_files(files, rng)
    model_before = tmp_path / "model-before"
    shutil.copytree(files, model_before, symlinks=True)

    origin = tmp_path / "origin.img"
    with open(origin, "wb") as f:
        f.truncate(64 * MiB)
    tool("mkfs.ext4", "-q", "-F", "-d", files, origin)
    store = tmp_path / "store.img"
    # the sockets: next to the store (None), or in tmp_path when the store is a loop device
    sock: Path | None = None
    control: Path | None = None
    if volumes == "files":
        ok("init", store, "--origin", origin, "--size", "128M")
    else:
        with open(store, "wb") as f:
            f.truncate(128 * MiB)
        origin = Path(stack.enter_context(loop_device(origin)))
        store = Path(stack.enter_context(loop_device(store)))
        ok("init", store, "--origin", origin)
        sock, control = tmp_path / "nbd.sock", tmp_path / "ctl.sock"
        assert ok_json("status", store)["origin"] == str(origin)
    ok("snap", "create", store, "before")

    new_random = rng.randbytes(3 * MiB)
    big = rng.randbytes(5 * MiB + 777)
    middle = rng.randbytes(50000)
    model_after = tmp_path / "model-after"
    shutil.copytree(model_before, model_after, symlinks=True)
    change_one(model_after, random.Random(1), new_random)
    model_final = tmp_path / "model-final"
    shutil.copytree(model_after, model_final, symlinks=True)
    change_two(model_final, big, middle)

    with Served(store, sock=sock, control=control) as srv:
        # 1. change the origin through a read-write mount
        with mount_export(srv, "origin", tmp_path, writable=True) as (mnt, _):
            same_tree(model_before, mnt)
            change_one(mnt, random.Random(1), new_random)
            same_tree(model_after, mnt)
        ok("snap", "create", store, "after")

        # 2. change it again
        with mount_export(srv, "origin", tmp_path, writable=True) as (mnt, _):
            same_tree(model_after, mnt)
            change_two(mnt, big, middle)
            same_tree(model_final, mnt)

        # 3. every moment is still there, byte for byte
        for export, model in (("before", model_before), ("after", model_after),
                              ("origin", model_final)):
            with mount_export(srv, export, tmp_path, writable=False) as (mnt, _):
                same_tree(model, mnt)
                assert (mnt / "services").read_bytes() == (model / "services").read_bytes()
        assert ok_json("check", store)["clean"]

        # 4. a writable snapshot mounted read-write changes only itself
        with mount_export(srv, "after", tmp_path, writable=True) as (mnt, _):
            (mnt / "only-in-after.txt").write_text("snapshot write\n")
            os.unlink(mnt / "services")
        for export, model in (("before", model_before), ("origin", model_final)):
            with mount_export(srv, export, tmp_path, writable=False) as (mnt, _):
                same_tree(model, mnt)
        with mount_export(srv, "after", tmp_path, writable=False) as (mnt, _):
            assert (mnt / "only-in-after.txt").read_text() == "snapshot write\n"
            assert not (mnt / "services").exists()
            assert (mnt / "new.txt").read_text() == "a new file\n"

        report = ok_json("check", store)
        assert report["clean"] and report["fatal"] == 0
        st = ok_json("status", store)
        assert [s["name"] for s in st["snapshots"]] == ["before", "after"]
    assert ok_json("check", store) == {"clean": True, "fatal": 0, "warnings": 0,
                                       "findings": []}
    # the origin volume itself, unserved, is a clean filesystem too
    e2fsck(str(origin))
