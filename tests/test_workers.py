"""``ddsnap serve --workers N`` as real processes: a supervisor, a metadata server process
and worker processes doing the NBD and data I/O (the csnap protocol between them).

Real clients (qemu-io, the ddsnap CLI) write, flush and take snapshots while a worker,
then the metadata server, is killed with SIGKILL: the supervisor starts them again, the
workers reconnect and upload their locks, and no acknowledged flushed write is lost, no
snapshot byte changes, and ``check`` finds the store clean.  A second server on the same
store is refused with the single-process error and exit code.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from ddsnap.errors import StoreBusy
from served import (
    MiB,
    Served,
    fails,
    make_origin,
    ok,
    ok_json,
    read_export,
    tool,
    wait_until,
)

SIZE = 16 * MiB
pytestmark = pytest.mark.clients


def children(pid: int) -> dict[str, int]:
    """The supervisor's children by role: ``meta``, ``worker1``, ``worker2``, ..."""
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True,
                         text=True, check=False).stdout.split()
    found: dict[str, int] = {}
    for p in map(int, out):
        try:
            args = Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")
        except FileNotFoundError:
            continue
        if b"ddsnap.workers" not in args:
            continue
        kind = args[args.index(b"ddsnap.workers") + 1].decode()
        name = args[args.index(b"--name") + 1].decode() if b"--name" in args else kind
        found[name] = p
    return found


def kill9(srv: Served, role: str) -> None:
    """SIGKILL one child and wait until the supervisor has a new one in its place."""
    old = children(srv.pid)[role]
    os.kill(old, signal.SIGKILL)
    wait_until(lambda: children(srv.pid).get(role, old) != old, f"a new {role}")


def write(srv: Served, pattern: int, offset: int, length: int) -> None:
    """A qemu-io write and flush (acknowledged and flushed when it returns)."""
    out = tool("qemu-io", "-f", "raw", "-c", f"write -P {pattern} {offset} {length}",
               "-c", "flush", srv.uri("origin")).stdout
    assert "wrote" in out, out


def test_kill_a_worker_then_the_metadata_server_loses_nothing(tmp_path):
    origin, store = tmp_path / "origin.img", tmp_path / "store.img"
    data = bytearray(make_origin(origin, SIZE, seed=3))
    ok("init", store, "--origin", origin, "--size", "64M")
    with Served(store, workers=2) as srv:
        assert set(children(srv.pid)) == {"meta", "worker1", "worker2"}
        write(srv, 0xA1, 0, 4 * MiB)
        data[0:4 * MiB] = bytes([0xA1]) * (4 * MiB)
        ok("snap", "create", store, "s1")
        s1 = bytes(data)
        kill9(srv, "worker1")
        write(srv, 0xB2, 4 * MiB, 4 * MiB)
        data[4 * MiB:8 * MiB] = bytes([0xB2]) * (4 * MiB)
        kill9(srv, "meta")
        # the new server waits for the workers' uploads; the write waits for it
        write(srv, 0xC3, 1 * MiB, 1 * MiB)
        data[1 * MiB:2 * MiB] = bytes([0xC3]) * MiB
        ok("snap", "create", store, "s2")
        s2 = bytes(data)
        kill9(srv, "worker2")
        write(srv, 0xD4, 12 * MiB, 2 * MiB)
        data[12 * MiB:14 * MiB] = bytes([0xD4]) * (2 * MiB)
        assert read_export(srv, "origin", tmp_path / "o.raw") == data
        assert read_export(srv, "s1", tmp_path / "s1.raw") == s1
        assert read_export(srv, "s2", tmp_path / "s2.raw") == s2
        assert ok_json("check", store)["clean"]
        out = srv.output()
        for role in ("worker1", "meta", "worker2"):
            assert f"process {role} (pid" in out and "restarting it" in out, out
    assert ok_json("check", store) == {"clean": True, "fatal": 0, "warnings": 0,
                                       "findings": []}


def test_a_second_server_on_the_same_store_is_refused_with_workers(tmp_path):
    origin, store = tmp_path / "origin.img", tmp_path / "store.img"
    make_origin(origin, SIZE, seed=4)
    ok("init", store, "--origin", origin, "--size", "64M")
    with Served(store, workers=1):
        fails(StoreBusy.exit_code, "serve", store, "--workers", "2", "--listen",
              f"unix:{tmp_path}/other.sock", "--control", f"{tmp_path}/other.ctl",
              match="in use")
        assert not (tmp_path / "other.sock").exists()
