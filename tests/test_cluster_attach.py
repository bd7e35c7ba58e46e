"""``ddsnap attach``: a client node serving a store's exports from "another host" (here
the same host over TCP on 127.0.0.1; tests/test_cluster_hosts.py runs them on hosts in
network namespaces), with real ``serve`` and ``attach`` processes and real NBD clients;
and the refusals a user meets on the command line: wrong certificate, wrong store,
missing TLS options, a plain-text node."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from certs import Pki
from served import (
    Attached,
    MiB,
    Served,
    fails,
    make_origin,
    ok,
    ok_json,
    tool,
    wait_until,
)

pytestmark = pytest.mark.clients

SIZE = 8 * MiB


@pytest.fixture
def store(tmp_path: Path) -> tuple[Path, Path, bytes]:
    origin = tmp_path / "origin.img"
    data = make_origin(origin, SIZE, seed=3)
    store = tmp_path / "store.img"
    ok("init", store, "--origin", origin, "--size", "32M")
    return origin, store, data


def served(store: Path, pki: Pki, **kw) -> Served:
    return Served(store, metadata="tcp:127.0.0.1:0", tls=pki.server.files, **kw)


def nbd_read(uri: str, dest: Path) -> bytes:
    tool("nbdcopy", uri, str(dest))
    return dest.read_bytes()


def nbd_write(uri: str, data: bytes, offset: int, tmp: Path) -> None:
    src = tmp / "chunk.bin"
    src.write_bytes(data)
    tool("qemu-io", "-f", "raw", "-c", f"write -s {src} {offset} {len(data)}", uri)


@pytest.mark.parametrize("node_workers", [0, 2])
def test_an_attached_node_serves_the_origin_and_snapshots(store, pki, sockdir, tmp_path,
                                                          node_workers):
    origin, st, data = store
    with served(st, pki, workers=1) as srv:
        assert srv.metadata, srv.output()
        with Attached(srv.metadata, origin, st, Path(sockdir) / "n.sock",
                      tls=pki.client.files, workers=node_workers, name="far") as node:
            assert nbd_read(node.uri(), tmp_path / "a.img") == data
            ok("snap", "create", st, "s1")
            new = os.urandom(MiB)
            nbd_write(node.uri(), new, 2 * MiB, tmp_path)  # copies out for s1
            want = data[:2 * MiB] + new + data[3 * MiB:]
            assert nbd_read(srv.uri(), tmp_path / "b.img") == want
            assert nbd_read(node.uri(), tmp_path / "c.img") == want
            # s1 is the old bytes, through the node and through the server
            assert nbd_read(node.uri("s1"), tmp_path / "d.img") == data
            assert nbd_read(srv.uri("s1"), tmp_path / "e.img") == data
            status = ok_json("status", st, "--json")
            far = [n for n in status["nodes"] if n["name"].startswith("far")]
            assert far and all(n["peer"].startswith("127.0.0.1:") for n in far), status["nodes"]
            assert status["metadata"] == [srv.metadata]
    assert ok_json("check", st, "--json")["clean"]


def test_a_node_with_a_certificate_another_ca_signed_is_refused_on_both_sides(
        store, pki, sockdir, tmp_path):
    origin, st, _ = store
    with served(st, pki, workers=0) as srv:
        assert srv.metadata
        out = fails(28, "attach", srv.metadata, "--origin", origin, "--store", st,
                    "--listen", f"unix:{Path(sockdir) / 'n.sock'}", "--workers", "0",
                    "--tls-ca", pki.impostor.ca, "--tls-cert", pki.impostor.cert,
                    "--tls-key", pki.impostor.key,
                    match="refused our certificate: it is not signed by the peer's CA")
        assert "Traceback" not in out
        wait_until(lambda: "refused a node connecting from 127.0.0.1:" in srv.output(),
                   "the server to say it refused the node")
        # the server serves on, and a node with the cluster's certificate is welcome
        with Attached(srv.metadata, origin, st, Path(sockdir) / "n.sock",
                      tls=pki.client.files) as node:
            assert node.node is not None


def test_a_node_for_another_store_is_refused(store, pki, sockdir, tmp_path):
    origin, st, _ = store
    other = tmp_path / "other.img"
    ok("init", other, "--origin", origin, "--size", "32M")
    with served(st, pki, workers=0) as srv:
        assert srv.metadata
        fails(10, "attach", srv.metadata, "--origin", origin, "--store", other,
              "--listen", f"unix:{Path(sockdir) / 'n.sock'}", "--workers", "0",
              "--tls-ca", pki.client.ca, "--tls-cert", pki.client.cert,
              "--tls-key", pki.client.key, match="serves store [0-9a-f]{32}, not")


def test_a_node_with_a_smaller_origin_is_refused(store, pki, sockdir, tmp_path):
    origin, st, _ = store
    small = tmp_path / "small.img"
    make_origin(small, SIZE // 2, seed=4)
    with served(st, pki, workers=0) as srv:
        assert srv.metadata
        fails(10, "attach", srv.metadata, "--origin", small, "--store", st,
              "--listen", f"unix:{Path(sockdir) / 'n.sock'}", "--workers", "0",
              "--tls-ca", pki.client.ca, "--tls-cert", pki.client.cert,
              "--tls-key", pki.client.key, match="not the same device")


def test_a_plain_text_node_is_refused_by_a_tls_server(store, pki, sockdir):
    origin, st, _ = store
    with served(st, pki, workers=0) as srv:
        assert srv.metadata
        fails(23, "attach", srv.metadata, "--origin", origin, "--store", st,
              "--listen", f"unix:{Path(sockdir) / 'n.sock'}", "--workers", "0",
              "--insecure", "--reconnect", "0", match="without answering IDENTIFY")
        wait_until(lambda: "does not speak TLS" in srv.output(),
                   "the server to say why it refused the node")


def test_the_metadata_port_on_tcp_needs_tls_or_insecure(store, pki, sockdir):
    origin, st, _ = store
    fails(2, "serve", st, "--listen", f"unix:{Path(sockdir) / 's.sock'}",
          "--metadata-listen", "tcp:127.0.0.1:0", match="needs TLS with client certificates")
    fails(2, "serve", st, "--listen", f"unix:{Path(sockdir) / 's.sock'}",
          "--metadata-listen", "tcp:127.0.0.1:0", "--tls-ca", pki.server.ca,
          match="all of --tls-ca, --tls-cert and --tls-key")
    fails(2, "attach", "tcp:127.0.0.1:1", "--origin", origin, "--store", st,
          match="needs TLS with client certificates")
    missing = str(Path(pki.server.ca).with_name("nope.pem"))
    fails(29, "serve", st, "--listen", f"unix:{Path(sockdir) / 's.sock'}", "--workers", "0",
          "--metadata-listen", "tcp:127.0.0.1:0", "--tls-ca", missing,
          "--tls-cert", pki.server.cert, "--tls-key", pki.server.key, match="nope.pem")
    # nothing was served or changed
    assert ok_json("status", st, "--json")["served"] is False
