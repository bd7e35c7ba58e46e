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
    children,
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
    with Served(store, workers=1) as srv:
        fails(StoreBusy.exit_code, "serve", store, "--workers", "2", "--listen",
              f"unix:{tmp_path}/other.sock", "--control", f"{tmp_path}/other.ctl",
              match="in use")
        assert not (tmp_path / "other.sock").exists()
        # on the same listener too: the store is what is refused (as in one process),
        # before the address
        fails(StoreBusy.exit_code, "serve", store, "--workers", "2", "--listen",
              f"unix:{srv.sock}", match="in use by another ddsnap process")


def fio_job(srv: Served, name: str, offset: int, *extra: str) -> list[str]:
    """A fio job of four connections to the origin, each writing and verifying its own
    2 MiB range from ``offset`` (crc32c in every block; a FLUSH at the end)."""
    return ["fio", f"--name={name}", "--ioengine=nbd", f"--uri={srv.uri('origin')}",
            "--numjobs=4", f"--offset={offset}", "--size=2M", "--offset_increment=2M",
            "--rw=randwrite", "--bsrange=4k-64k", "--iodepth=8", "--verify=crc32c",
            "--verify_fatal=1", "--randseed=77", "--end_fsync=1", "--group_reporting",
            "--verify_state_save=0", "--output-format=normal", *extra]


def fio_ok(args: list[str], cwd: Path) -> None:
    p = tool(*args, cwd=cwd, check=False, timeout=240)
    assert p.returncode == 0 and "err= 0" in p.stdout, f"fio failed:\n{p.stdout}\n{p.stderr}"


def test_fio_verify_over_several_connections_while_a_worker_then_the_server_dies(tmp_path):
    """fio writes and verifies over four connections while snapshots are taken and read;
    a worker is killed in the middle of other writes (its connections end, the ones
    acknowledged and flushed before stay), then the metadata server in the middle of a
    verifying fio run, which goes on without an error (the workers hold its requests,
    reconnect, upload, re-send)."""
    if subprocess.run(["fio", "--enghelp=nbd"], capture_output=True).returncode != 0:
        pytest.skip("this fio has no nbd engine")
    origin, store = tmp_path / "origin.img", tmp_path / "store.img"
    make_origin(origin, SIZE, seed=5)
    ok("init", store, "--origin", origin, "--size", "64M")
    with Served(store, workers=2) as srv:
        # 1. a verified run on 0..8M, with a snapshot taken and read in the middle
        first = subprocess.Popen(fio_job(srv, "first", 0, "--do_verify=1", "--loops=20"),
                                 cwd=tmp_path, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
        ok("snap", "create", store, "s1")
        s1 = read_export(srv, "s1", tmp_path / "s1-a.raw")
        assert first.poll() is None, "fio ended before the snapshot: make it longer"
        out, err = first.communicate(timeout=240)
        assert first.returncode == 0 and "err= 0" in out, f"fio failed:\n{out}\n{err}"
        # 2. writes to 8M..16M, and worker1 killed in their middle: its connections end
        second = subprocess.Popen(fio_job(srv, "second", 8 * MiB, "--time_based",
                                          "--runtime=30", "--do_verify=0"), cwd=tmp_path,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        ok("snap", "create", store, "s2")
        assert second.poll() is None  # writing when worker1 dies (fio may end with it)
        kill9(srv, "worker1")
        second.terminate()
        second.communicate(timeout=60)
        # the first run's writes, acknowledged and flushed before, are all there
        fio_ok(fio_job(srv, "first", 0, "--verify_only=1"), tmp_path)
        s2 = read_export(srv, "s2", tmp_path / "s2-a.raw")
        # 3. a verifying run over the first range while the metadata server dies
        third = subprocess.Popen(fio_job(srv, "third", 0, "--do_verify=1", "--loops=40"),
                                 cwd=tmp_path, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
        ok("snap", "create", store, "s3")
        kill9(srv, "meta")
        assert third.poll() is None, "fio ended before the kill: make it longer"
        write(srv, 0xEE, 14 * MiB, 64 * 1024)  # waits for the new server to recover
        ok("snap", "create", store, "s4")
        out, err = third.communicate(timeout=240)
        assert third.returncode == 0 and "err= 0" in out, f"fio failed:\n{out}\n{err}"
        # no snapshot byte changed through all of it
        assert read_export(srv, "s1", tmp_path / "s1-b.raw") == s1
        assert read_export(srv, "s2", tmp_path / "s2-b.raw") == s2
        assert ok_json("check", store)["clean"]
    assert ok_json("check", store)["clean"]
