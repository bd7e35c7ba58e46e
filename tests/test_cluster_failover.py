"""Failover of a cluster's metadata server through a real etcd (docs/protocol.md
"Failover through etcd, and fencing"), with real ``serve --etcd`` and ``attach --etcd``
processes on this host: the server killed with SIGKILL, or stopped with SIGSTOP for
longer than its lease; the standby takes over, the node follows it and its writes go
on; the stopped server, woken, exits without writing; snapshots unchanged and ``check``
clean.  (The same across hosts in network namespaces, and the full campaign of issue 12,
are for the multi-host suite.)"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from served import (
    Attached,
    ClusterServer,
    MiB,
    children,
    fails,
    make_origin,
    ok,
    ok_json,
    tls_args,
    tool,
    wait_until,
)

pytestmark = pytest.mark.clients

TTL = 2
SIZE = 16 * MiB


@pytest.fixture
def cluster(tmp_path, etcd, pki, sockdir):
    origin = tmp_path / "origin.img"
    data = make_origin(origin, SIZE, seed=5)
    store = tmp_path / "store.img"
    ok("init", store, "--origin", origin, "--size", "64M")
    servers: list[ClusterServer] = []

    def start(tag: str, port: int, workers: int = 0) -> ClusterServer:
        s = ClusterServer(store, etcd.url, f"tcp:127.0.0.1:{port}", tag, sockdir,
                          tls=pki.server.files, ttl=TTL, workers=workers).start()
        servers.append(s)
        return s

    yield origin, store, data, start
    for s in servers:
        s.stop()


def ports() -> tuple[int, int]:
    from etcd_server import free_port

    return free_port(), free_port()


def status(etcd_url: str) -> dict:
    return ok_json("cluster", "status", "--etcd", etcd_url, "--cluster", "c1", "--json")


def nbd_write(uri: str, data: bytes, offset: int, tmp: Path) -> None:
    src = tmp / "w.bin"
    src.write_bytes(data)
    tool("qemu-io", "-f", "raw", "-c", f"write -s {src} {offset} {len(data)}", uri)


def nbd_read(uri: str, dest: Path) -> bytes:
    tool("nbdcopy", uri, str(dest))
    return dest.read_bytes()


@pytest.mark.parametrize(("how", "workers"), [("kill", 0), ("stop", 0), ("kill", 2),
                                              ("stop", 2)])
def test_the_standby_takes_over_and_the_node_follows(cluster, etcd, pki, sockdir,
                                                     tmp_path, how, workers):
    """The server (with ``--workers``: only its supervisor, which holds the term; its
    metadata server child writes under the deadline the supervisor shares, and must
    stop by itself) is killed or stopped; the standby serves the node's next write."""
    origin, store, data, start = cluster
    pa, pb = ports()
    a = start("a", pa, workers)
    a.wait("serving")
    b = start("b", pb, workers)
    b.wait("standing by")
    st = status(etcd.url)
    assert st["leader"]["metadata"] == f"tcp:127.0.0.1:{pa}" and st["leader"]["epoch"] == \
        a.epoch()
    assert [s["metadata"] for s in st["standbys"]] == [f"tcp:127.0.0.1:{pb}"]
    with Attached(None, origin, store, Path(sockdir) / "n.sock", tls=pki.client.files,
                  name="n1", extra=("--etcd", etcd.url, "--cluster", "c1")) as node:
        first = os.urandom(MiB)
        nbd_write(node.uri(), first, 0, tmp_path)
        ok("snap", "create", store, "s1")  # (through the registry a wrote)
        wait_until(lambda: [n["name"] for n in status(etcd.url)["nodes"]] == ["n1"],
                   "the node list published")
        if how == "kill":
            a.proc.kill()
        else:
            a.proc.send_signal(signal.SIGSTOP)
        # the node's next write goes through once b is elected and has recovered
        second = os.urandom(MiB)
        nbd_write(node.uri(), second, MiB, tmp_path)
        b.wait("serving")
        assert b.epoch() is not None and b.epoch() > (a.epoch() or 0)
        assert status(etcd.url)["leader"]["metadata"] == f"tcp:127.0.0.1:{pb}"
        if how == "stop":
            if workers:
                # its metadata server child, not stopped, saw the shared deadline pass
                # and stopped by itself (before the standby could be elected)
                wait_until(lambda: "meta" not in children(a.pid),
                           "a's metadata server child to stop at the deadline")
                assert "ddsnap meta: lost the cluster lease" in a.output(), a.output()
            a.proc.send_signal(signal.SIGCONT)  # woken: it must stop, writing nothing
            assert a.proc.wait(60) == 30, a.output()
            assert "writing nothing more" in a.output()
        want = first + second + data[2 * MiB:]
        assert nbd_read(node.uri(), tmp_path / "o.img") == want
        assert nbd_read(node.uri("s1"), tmp_path / "s1.img") == first + data[MiB:]
    assert b.stop() == 0
    report = ok_json("check", store, "--json")
    assert report["clean"], report


def test_serve_with_etcd_refuses_what_cannot_work(cluster, etcd, pki, sockdir):
    _origin, store, _data, _start = cluster
    tls = tls_args(pki.server.files)
    fails(2, "serve", store, "--etcd", etcd.url, "--cluster", "c1",
          match="--etcd needs --metadata-listen")
    fails(2, "serve", store, "--etcd", etcd.url, *tls, "--metadata-listen",
          "tcp:127.0.0.1:7", match="go together")
    fails(2, "serve", store, "--etcd", etcd.url, "--cluster", "bad/name", *tls,
          "--metadata-listen", "tcp:127.0.0.1:7", match="cluster")


def test_a_node_rides_out_an_etcd_outage_that_ends_the_servers_term(
        cluster, etcd, pki, sockdir, tmp_path):
    """etcd stops answering (paused) for longer than the TTL: the server cannot renew its
    lease, so its term ends and it exits 30; the node, looking for the next server,
    finds etcd silent and keeps trying (the failure is reported, not fatal); once etcd
    answers again the standby is elected and the node's write, waiting meanwhile,
    completes through it."""
    origin, store, data, start = cluster
    pa, pb = ports()
    a = start("a", pa)
    a.wait("serving")
    b = start("b", pb)
    b.wait("standing by")
    with Attached(None, origin, store, Path(sockdir) / "n.sock", tls=pki.client.files,
                  name="n1", extra=("--etcd", etcd.url, "--cluster", "c1")) as node:
        first = os.urandom(MiB)
        nbd_write(node.uri(), first, 0, tmp_path)
        etcd.pause()
        try:
            assert a.proc.wait(60) == 30, a.output()
            wait_until(lambda: "did not answer" in node.output(),
                       "the node to find etcd silent while it looks for a server")
        finally:
            etcd.resume()
        second = os.urandom(MiB)
        nbd_write(node.uri(), second, MiB, tmp_path)
        b.wait("serving")
        assert node.proc is not None and node.proc.poll() is None, node.output()
        assert nbd_read(node.uri(), tmp_path / "o.img") == first + second + data[2 * MiB:]
    assert b.stop() == 0
    assert ok_json("check", store, "--json")["clean"]
