"""Nodes on other hosts: ``ddsnap serve --metadata-listen tcp:...`` in one network
namespace, ``ddsnap attach`` nodes in others (tests/hosts.py), the origin and the store
files shared by all of them as shared storage is; real NBD clients (fio, nbdcopy,
qemu-io) run in the client hosts against their own node.

* fio writes and verifies through two nodes at once while snapshots are taken; every
  snapshot and the origin read the same bytes through both nodes and the server, and
  writes from one host leave the snapshots another host reads unchanged.
* A node killed (SIGKILL) while it keeps read locks: another host's write to those chunks
  waits out the server's grace period and completes; the snapshot keeps its old bytes.
* A node cut off from the server (packets dropped) while it keeps read locks: the server
  gives them back after the grace period, another host overwrites the chunks; once the
  link is back the node reconnects by itself, reads the snapshot's old bytes and the
  origin's new ones, and writes again; nothing written before the cut is lost.

Nothing here asserts a duration: waits are deadlines.
"""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest

from certs import Pki
from hosts import Host, Network
from served import Attached, MiB, Served, make_origin, need, ok, ok_json, wait_until

pytestmark = [pytest.mark.root, pytest.mark.clients]

SIZE = 64 * MiB
HALF = SIZE // 2
PORT = 7700
#: generous deadline for a write that waits out a lost node's grace period (10 s)
GRACE_DEADLINE = 60.0


# -- helpers ------------------------------------------------------------------------------


def in_host(host: Host, *argv: object, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run a client program in ``host`` (skip if it is not installed); assert exit 0."""
    need(str(argv[0]))
    p = host.run(*argv, timeout=timeout)
    assert p.returncode == 0, (f"{' '.join(map(str, argv))} in {host.name} exited "
                               f"{p.returncode}\nstdout: {p.stdout}\nstderr: {p.stderr}")
    return p


def read_all(host: Host, uri: str, dest: Path) -> bytes:
    """Every byte of the export ``uri``, read with nbdcopy in ``host``."""
    in_host(host, "nbdcopy", uri, dest)
    data = dest.read_bytes()
    dest.unlink()
    return data


def digest(host: Host, uri: str, dest: Path) -> str:
    return hashlib.sha256(read_all(host, uri, dest)).hexdigest()


def write(host: Host, uri: str, pattern: int, offset: int, length: int,
          timeout: float = 120) -> None:
    """A qemu-io write of ``pattern`` and a flush in ``host``: acknowledged and durable
    when it returns."""
    out = in_host(host, "qemu-io", "-f", "raw", "-c",
                  f"write -P {pattern} {offset} {length}", "-c", "flush", uri,
                  timeout=timeout).stdout
    assert "wrote" in out, out


def status(store: Path) -> dict:
    return ok_json("status", store)


def node_names(store: Path) -> list[str]:
    return [n["name"] for n in status(store)["nodes"]]


def node(store: Path, name: str) -> dict | None:
    found = [n for n in status(store)["nodes"] if n["name"] == name]
    assert len(found) <= 1, found
    return found[0] if found else None


class Cluster:
    """A server host and client hosts on one network, an origin and a store in
    ``tmp_path`` (the shared storage)."""

    def __init__(self, network: Network, pki: Pki, tmp_path: Path, sockdir: str,
                 clients: int = 2, seed: int = 1):
        self.pki = pki
        self.tmp = tmp_path
        self.sockdir = Path(sockdir)
        self.server = network.add_host("server")
        self.clients = [network.add_host(f"client{i + 1}") for i in range(clients)]
        self.origin = tmp_path / "origin.img"
        self.data = make_origin(self.origin, SIZE, seed=seed)
        self.store = tmp_path / "store.img"
        ok("init", self.store, "--origin", self.origin, "--size", "256M")

    def serve(self, workers: int = 1) -> Served:
        return Served(self.store, metadata=f"tcp:{self.server.addr}:{PORT}",
                      tls=self.pki.server.files, workers=workers, host=self.server)

    def attach(self, srv: Served, index: int, workers: int = 0) -> Attached:
        assert srv.metadata == f"tcp:{self.server.addr}:{PORT}", srv.metadata
        name = f"c{index + 1}"
        return Attached(srv.metadata, self.origin, self.store, self.sockdir / f"{name}.sock",
                        tls=self.pki.client.files, workers=workers, name=name,
                        host=self.clients[index])


@pytest.fixture
def cluster(network, pki, tmp_path, sockdir) -> Cluster:
    return Cluster(network, pki, tmp_path, sockdir)


def has_fio_nbd() -> None:
    need("fio")
    if subprocess.run(["fio", "--enghelp=nbd"], capture_output=True).returncode != 0:
        pytest.skip("this fio has no nbd engine")


def fio_job(uri: str, name: str, offset: int, *extra: str) -> list[str]:
    """Two connections to ``uri``, each writing and verifying its own 4 MiB range (at
    ``offset`` and ``offset`` + 16 MiB, both in one half of the origin): crc32c in every
    block, a FLUSH at the end of each pass."""
    return ["fio", f"--name={name}", "--ioengine=nbd", f"--uri={uri}", "--numjobs=2",
            f"--offset={offset}", "--size=4M", "--offset_increment=16M", "--rw=randwrite",
            "--bsrange=4k-64k", "--iodepth=8", "--verify=crc32c", "--verify_fatal=1",
            "--randseed=77", "--end_fsync=1", "--group_reporting", "--verify_state_save=0",
            "--output-format=normal", *extra]


def fio_done(proc: subprocess.Popen, what: str) -> str:
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0 and "err= 0" in out, f"fio ({what}) failed:\n{out}\n{err}"
    return out


def verify_crosswise(cwd: Path, first: tuple[Host, str, str], second: tuple[Host, str, str],
                     half: int) -> None:
    """fio's verify, with no writes, of what each of two hosts' fio jobs wrote (``(host,
    node uri, job name)``; the first at 0, the second at ``half``) through the *other*
    host's node."""
    for (_, _, job), (host, uri, _), offset in ((first, second, 0), (second, first, half)):
        fio_done(host.popen(*fio_job(uri, job, offset, "--verify_only=1"), cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
                 f"{job}'s data verified on {host.name}")


# -- the tests ----------------------------------------------------------------------------


def test_fio_verify_on_two_hosts_while_snapshots_are_taken(cluster: Cluster):
    """fio writes and verifies on client1 (first half of the origin) and client2 (second
    half) at once, each through its own node, while three snapshots are taken; then every
    snapshot and the origin read the same through both nodes and the server; each host's
    writes verify through the other host's node; a further round of writes from client2
    changes no snapshot byte client1 reads; the store checks clean."""
    has_fio_nbd()
    c = cluster
    h1, h2 = c.clients
    st = c.store
    with c.serve(workers=1) as srv, c.attach(srv, 0) as n1, c.attach(srv, 1) as n2:
        assert sorted(n for n in node_names(st) if n.startswith("c")) == ["c1", "c2"]
        peers = {n["name"]: n["peer"] for n in status(st)["nodes"]}
        assert peers["c1"].startswith(f"{h1.addr}:"), peers
        assert peers["c2"].startswith(f"{h2.addr}:"), peers
        ok("snap", "create", st, "s0")  # before any write: the origin as it was
        jobs = {
            "c1": h1.popen(*fio_job(n1.uri(), "one", 0, "--do_verify=1", "--loops=40"),
                           cwd=c.tmp, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True),
            "c2": h2.popen(*fio_job(n2.uri(), "two", HALF, "--do_verify=1", "--loops=40"),
                           cwd=c.tmp, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True),
        }

        def copied_out_since(base: int):
            """Origin writes after the last snapshot have copied chunks out for it (the
            pacing between snapshots: progress of the writers, not a fixed sleep)."""
            for who, proc in jobs.items():
                if proc.poll() is not None:
                    out, err = proc.communicate()
                    raise AssertionError(f"fio on {who} ended before the snapshots were "
                                         f"taken (make it longer):\n{out}\n{err}")
            return srv.control("status")["chunks_used"] >= base + 8

        # each snapshot after writes copied chunks out for the one before; writes after s3
        for name in ("s1", "s2", "s3", None):
            base = srv.control("status")["chunks_used"]
            wait_until(lambda base=base: copied_out_since(base),
                       f"writes from both hosts to copy chunks out (then {name})",
                       interval=0.05)
            if name:
                ok("snap", "create", st, name)
        fio_done(jobs["c1"], "client1")
        fio_done(jobs["c2"], "client2")

        # each host's flushed writes verify through the other host's node
        verify_crosswise(c.tmp, (h1, n1.uri(), "one"), (h2, n2.uri(), "two"), HALF)

        # every snapshot and the origin read the same through both nodes and the server
        readers = {"client1": (h1, n1.uri), "client2": (h2, n2.uri),
                   "server": (c.server, srv.uri)}
        snaps = ("s0", "s1", "s2", "s3")
        seen: dict[str, dict[str, str]] = {}
        for export in (*snaps, "origin"):
            seen[export] = {who: digest(host, uri(export), c.tmp / f"{who}-{export}.raw")
                            for who, (host, uri) in readers.items()}
        for export, by in seen.items():
            assert len(set(by.values())) == 1, f"{export} reads differently: {by}"
        want_s0 = hashlib.sha256(c.data).hexdigest()
        assert seen["s0"]["server"] == want_s0, "s0 is not the origin as it was"
        hashes = [seen[s]["server"] for s in (*snaps, "origin")]
        assert len(set(hashes)) == len(hashes), f"writes fell between no two snapshots: {seen}"
        origin_before = read_all(c.server, srv.uri("origin"), c.tmp / "origin-before.raw")

        # a further round of writes from client2 (copying out for every snapshot still
        # sharing its chunks with the origin) while client1 keeps read mappings of them
        write(h2, n2.uri(), 0x5A, HALF, HALF)
        for s in snaps:
            assert digest(h1, n1.uri(s), c.tmp / f"again-{s}.raw") == seen[s]["client1"], \
                f"{s} changed under client2's writes"
        want = origin_before[:HALF] + bytes([0x5A]) * HALF
        assert read_all(h1, n1.uri(), c.tmp / "origin-after.raw") == want
        assert read_all(c.server, srv.uri(), c.tmp / "origin-srv.raw") == want
        assert ok_json("check", st)["clean"]
    assert ok_json("check", st) == {"clean": True, "fatal": 0, "warnings": 0,
                                    "findings": []}


def test_a_node_killed_while_it_keeps_read_locks_lets_another_hosts_write_through(
        cluster: Cluster):
    """client1 reads s1 (its node keeps the mappings with their read locks) and is
    killed with SIGKILL; the server keeps its locks for the grace period, then gives them
    back: client2's write to those chunks completes, and s1 still reads the old bytes."""
    c = cluster
    h1, h2 = c.clients
    st = c.store
    with c.serve(workers=1) as srv, c.attach(srv, 1) as n2:
        n1 = c.attach(srv, 0).start()
        try:
            ok("snap", "create", st, "s1")
            assert read_all(h1, n1.uri("s1"), c.tmp / "s1-c1.raw") == c.data
            held = node(st, "c1")
            assert held is not None and held["read_locks"] > 0, status(st)["nodes"]
        except BaseException:
            n1.kill()
            raise
        n1.kill()
        # its connection ended with its process: it is no node any more, and what it
        # held is kept for the grace period
        wait_until(lambda: "c1" not in node_names(st) and "c1" in status(st)["lapsed"],
                   "c1 to leave the node list, its holdings kept", interval=0.1)
        # client2 overwrites the chunks c1 held read locks on: the write waits for them
        # to be given back at the end of the grace period, then completes
        write(h2, n2.uri(), 0xC2, 0, 2 * MiB, timeout=GRACE_DEADLINE)
        after = status(st)
        assert after["lapsed"] == {}, f"the write overtook c1's kept locks: {after['lapsed']}"
        assert "c1" not in [n["name"] for n in after["nodes"]]
        want = bytes([0xC2]) * (2 * MiB) + c.data[2 * MiB:]
        assert read_all(h2, n2.uri("s1"), c.tmp / "s1-c2.raw") == c.data
        assert read_all(c.server, srv.uri("s1"), c.tmp / "s1-srv.raw") == c.data
        assert read_all(h2, n2.uri(), c.tmp / "o-c2.raw") == want
        assert read_all(c.server, srv.uri(), c.tmp / "o-srv.raw") == want
    assert ok_json("check", st)["clean"]


def test_a_node_cut_off_from_the_server_reconnects_and_loses_nothing(
        cluster: Cluster):
    """client1 keeps read mappings of s1 (origin chunks, with read locks) and its link to
    the server is cut: both ends notice, the server gives its locks back after the grace
    period (not before) and client2 overwrites those chunks.  Once the link is back
    client1's node reconnects by itself and serves again: s1 reads its old bytes through
    it, the origin the new ones and what client1 wrote before the cut, and its own
    writes land."""
    c = cluster
    h1, h2 = c.clients
    st = c.store
    with c.serve(workers=1) as srv, c.attach(srv, 0) as n1, c.attach(srv, 1) as n2:
        ok("snap", "create", st, "s1")
        write(h1, n1.uri(), 0x11, 8 * MiB, MiB)  # before the cut: must not be lost
        data = bytearray(c.data)
        s1 = bytes(data)
        data[8 * MiB:9 * MiB] = bytes([0x11]) * MiB
        assert read_all(h1, n1.uri("s1"), c.tmp / "s1-a.raw") == s1
        held = node(st, "c1")
        assert held is not None and held["read_locks"] > 0, status(st)["nodes"]

        h1.cut_from(c.server)
        try:
            wait_until(lambda: "c1" not in node_names(st) and "c1" in status(st)["lapsed"],
                       "the server to notice c1's connection is gone", interval=0.1)
            # client2 overwrites chunks c1 held read locks on: waits out the grace period
            write(h2, n2.uri(), 0x22, 0, 2 * MiB, timeout=GRACE_DEADLINE)
            data[0:2 * MiB] = bytes([0x22]) * (2 * MiB)
            after = status(st)
            assert after["lapsed"] == {}, f"the write overtook c1's kept locks: {after['lapsed']}"
        finally:
            h1.restore_to(c.server)
        wait_until(lambda: "c1" in node_names(st), "c1 to reconnect", interval=0.1)

        assert read_all(h1, n1.uri("s1"), c.tmp / "s1-b.raw") == s1, \
            "client1 reads s1 changed after the link came back"
        assert read_all(h1, n1.uri(), c.tmp / "o-c1.raw") == data
        write(h1, n1.uri(), 0x33, 4 * MiB, MiB)
        data[4 * MiB:5 * MiB] = bytes([0x33]) * MiB
        assert read_all(h2, n2.uri(), c.tmp / "o-c2.raw") == data
        assert read_all(c.server, srv.uri(), c.tmp / "o-srv.raw") == data
        assert read_all(h2, n2.uri("s1"), c.tmp / "s1-c2.raw") == s1
    assert ok_json("check", st)["clean"]
