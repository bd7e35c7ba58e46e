"""``--cluster`` (issue 12): a store shared by hosts, as a user runs it (README "Cluster"),
with every host a network namespace on one switch (:mod:`.netns`) and the files on the
one file system all of them see:

* **failover time**: etcd on its own host, two metadata servers ``serve --etcd --cluster``
  (hosts ``srv-a`` and ``srv-b``, one elected, the other standing by; serve's default
  workers unless ``--serve-workers``), two nodes
  ``attach --etcd --cluster`` (hosts ``node-1`` and ``node-2``), each with an NBD
  connection to its origin export open.  The elected ``serve`` process is killed
  (SIGKILL; the kernel sends its metadata server and worker children SIGTERM) and, at
  once, a 4 KiB write + flush is sent through each node; the time from the kill to its
  acknowledgement is the node's failover time, and the standby's "elected" and
  "serving" lines are timed too (its log polled).  The killed server is then started
  again as the new standby, and the next kill hits the other one.
* **a node's IOPS against a local worker's**: one server ``serve --workers 1
  --metadata-listen tcp:... (TLS)`` in ``srv-a`` and a node ``attach tcp:... --workers 1``
  in ``node-1``; the same fio jobs (issue 9's ``overwrite4k`` and issue 4's
  ``randread4k``) through the node's socket, run in ``node-1``, and through the
  server's own worker, run in ``srv-a``, alternating, run i paired with run i.  For
  information, the same against ``serve --workers 1`` without ``--metadata-listen``
  (whose worker uses the page cache: every process of a server listening on TCP opens
  the devices with ``O_DIRECT``, as the node does).

Each measured fio run is recorded under (workload, 1, peer) with peers ``node``,
``local`` and ``plain`` (:data:`~.common.PEER_NAMES`), like the other fio workloads.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

from .common import (
    CLUSTER_NAME,
    CLUSTER_PORT,
    PEER_NAMES,
    BenchError,
    KiB,
    MiB,
    drop_file,
    fmt_size,
    process_tree,
    run,
    say,
    tail,
)
from .nbdclient import NbdClient, NbdError
from .netns import Host, Network
from .peers import ctl_call
from .processes import Server
from .results import FailoverKill, Measure, Workload, all_workloads

O_DIRECT = 0o40000  # x86-64, in /proc/PID/fdinfo's octal flags
SERVING = re.compile(r"^serving .* for cluster \S+ \(epoch (\d+)\)", re.M)
ELECTED = re.compile(r"elected for cluster \S+, epoch (\d+)")
WRITE = 4 * KiB


class ClusterWorkload:
    """The ``--cluster`` mode of :class:`~ddsnap_bench.runner.Bench` (a mixin: uses its
    ``args``, ``tmp``, ``procs``, ``ddsnap_cmd``, ``pristine``, the fio runner, the data
    checks, ``record()`` and ``problem()``)."""

    # ---- the rig: hosts, certificates, etcd

    def cluster(self) -> None:
        """Run both parts (each reports its own failure as a problem)."""
        os.environ["DDSNAP_RUNDIR"] = str(self.tmp / "run")  # registry and meta sockets
        self.network = Network().open()
        say(f"network namespaces {self.network.id}-*, switch 10.214.{self.network.octet}.0/24")
        for name in ("etcd", "srv-a", "srv-b", "node-1", "node-2"):
            self.network.add_host(name)
        self.make_certs()
        done = threading.Event()

        def sample_load() -> None:  # for the report's caveat: the load during the run
            while not done.wait(5):
                self.load_samples.append(float(Path("/proc/loadavg").read_text().split()[0]))

        threading.Thread(target=sample_load, daemon=True).start()
        try:
            try:
                with self.scoped():
                    self.failover()
            except BenchError as e:
                self.failover_errors.append(str(e).splitlines()[0])
                self.problem(f"failover: {e}")
            for kind in ("cluster", "plain"):
                try:
                    with self.scoped():
                        self.node_iops(kind)
                except BenchError as e:
                    self.cluster_errors.append(f"{kind}: {str(e).splitlines()[0]}")
                    self.problem(f"IOPS ({kind}): {e}")
        finally:
            done.set()

    @contextlib.contextmanager
    def scoped(self):
        """Every process started inside is stopped on the way out, also on failure (the
        next part reuses the hosts and their ports)."""
        before = {id(s) for s in self.procs.live}
        try:
            yield
        finally:
            for srv in [s for s in reversed(self.procs.live) if id(s) not in before]:
                t0 = time.monotonic()
                with contextlib.suppress(Exception):
                    self.procs.stop(srv, grace=10)
                if time.monotonic() - t0 > 1:
                    say(f"stopping {srv.name} took {time.monotonic() - t0:.1f} s")

    def host(self, name: str) -> Host:
        return self.network.hosts[name]

    def make_certs(self) -> None:
        """A CA and one certificate per host, made as README "Cluster" step 1 says."""
        d = self.tmp / "pki"
        d.mkdir()
        new_key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
        run(["openssl", "req", "-x509", "-new", *new_key, "-keyout", str(d / "ca.key"),
             "-out", str(d / "ca.pem"), "-days", "2", "-subj", "/CN=ddsnap-bench-ca"],
            "openssl: the CA")
        for h in self.network.hosts:
            run(["openssl", "req", "-new", *new_key, "-keyout", str(d / f"{h}.key"),
                 "-out", str(d / f"{h}.csr"), "-subj", f"/CN={h}"], f"openssl: {h}'s key")
            run(["openssl", "x509", "-req", "-in", str(d / f"{h}.csr"), "-CA",
                 str(d / "ca.pem"), "-CAkey", str(d / "ca.key"), "-CAcreateserial",
                 "-days", "2", "-out", str(d / f"{h}.pem")], f"openssl: {h}'s certificate")

    def tls(self, host: str) -> list[str]:
        d = self.tmp / "pki"
        return ["--tls-ca", str(d / "ca.pem"), "--tls-cert", str(d / f"{host}.pem"),
                "--tls-key", str(d / f"{host}.key")]

    def etcd_up(self) -> str:
        """A one-member etcd (Debian's /usr/bin/etcd, its default timings) on host
        ``etcd``; returns its client URL once it answers."""
        h = self.host("etcd")
        url, peer = f"http://{h.addr}:2379", f"http://{h.addr}:2380"
        argv = h.argv("etcd", "--name", "bench", "--data-dir", self.tmp / "etcd",
                      "--listen-client-urls", url, "--advertise-client-urls", url,
                      "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                      "--initial-cluster", f"bench={peer}", "--initial-cluster-state",
                      "new", "--logger", "zap", "--log-outputs", "stderr")
        self.procs.start("etcd", argv, None, self.tmp / "etcd.log",
                         ready_text="serving client traffic")
        end = time.monotonic() + 30
        while True:
            p = subprocess.run(h.argv("etcdctl", "--endpoints", url, "endpoint", "health"),
                               capture_output=True, text=True, timeout=30,
                               env={**os.environ, "ETCDCTL_API": "3"})
            if p.returncode == 0:
                return url
            if time.monotonic() > end:
                raise BenchError(f"etcd at {url} not healthy: {tail(p.stdout + p.stderr)}")
            time.sleep(0.1)

    def fresh_store(self, tag: str) -> tuple[Path, Path]:
        """A copy of the random origin and a new store for it (``ddsnap init``)."""
        origin, store = self.tmp / f"{tag}-origin.raw", self.tmp / f"{tag}-store"
        self.copy_pristine(origin)
        drop_file(store)
        self.ddsnap("init", str(store), "--origin", str(origin), "--size",
                    str(2 * self.args.size + 64 * MiB), "--chunk-size",
                    str(self.args.chunk_size), what="ddsnap init")
        return origin, store

    def attach_argv(self, host: str, server: list[str], origin: Path, store: Path,
                    sock: Path, workers: int, name: str) -> list[str]:
        return self.host(host).argv(
            *self.ddsnap_cmd, "attach", *server, "--origin", origin, "--store", store,
            "--listen", f"unix:{sock}", "--workers", str(workers), "--name", name,
            *self.tls(host))

    # ---- failover

    def failover(self) -> None:
        a = self.args
        url = self.etcd_up()
        origin, store = self.fresh_store("fo")
        cs = a.chunk_size
        gen = {"a": 0, "b": 0}

        def serve(tag: str, ready: str) -> Server:
            h = self.host(f"srv-{tag}")
            gen[tag] += 1
            sock, ctl = self.tmp / f"fo-{tag}.sock", self.tmp / f"fo-{tag}.ctl"
            drop_file(sock)
            drop_file(ctl)
            # -v: the "elected" line, timed too; it also logs each connection's end
            argv = h.argv(*self.ddsnap_cmd, "serve", store, "--etcd", url, "--cluster",
                          CLUSTER_NAME, "--lease-ttl", f"{a.lease_ttl:g}",
                          "--metadata-listen", f"tcp:{h.addr}:{CLUSTER_PORT}",
                          *self.tls(f"srv-{tag}"), "--listen", f"unix:{sock}",
                          "--control", ctl, *self.serve_args(), "-v")
            return self.procs.start(f"serve {tag}", argv, None,
                                    self.tmp / f"fo-serve-{tag}-{gen[tag]}.log",
                                    ready_text=ready)

        servers = {"a": serve("a", "serving "), "b": serve("b", "standing by")}
        cur, stb = "a", "b"
        epoch = _epoch(servers[cur])
        nodes: dict[str, Server] = {}
        for i in (1, 2):
            name = f"node{i}"
            nodes[name] = self.procs.start(
                f"attach {name}", self.attach_argv(
                    f"node-{i}", ["--etcd", url, "--cluster", CLUSTER_NAME], origin, store,
                    self.tmp / f"fo-{name}.sock", 0, name),
                None, self.tmp / f"fo-{name}.log", ready_text="attached to")
        ctl_call(self.tmp / "fo-a.ctl", "snap_create", {"name": "snap1", "read_only": False})
        clients = {n: NbdClient(str(self.tmp / f"fo-{n}.sock"), "origin", timeout=300)
                   for n in nodes}
        written: list[tuple[int, bytes]] = []
        try:
            for i, c in enumerate(clients.values()):  # each export open, each node known
                data = os.urandom(WRITE)
                c.pwrite_many([(i * cs, data)], depth=1)
                written.append((i * cs, data))
            self.cluster_settled(url, epoch, cur, stb, list(nodes))
            for k in range(a.kills):
                rec = FailoverKill(k + 1, cur, stb, epoch)
                self.one_kill(rec, servers, clients, written, cs)
                self.failover_kills.append(rec)
                say(f"kill {k + 1}/{a.kills} of server {cur}: {stb} elected "
                    f"{_s(rec.elected_s)}, serving {_s(rec.serving_s)}; writes acknowledged: "
                    + ", ".join(f"{n} {_s(t)}" for n, t in rec.node_s.items())
                    + "".join(f"; {n} FAILED: {e}" for n, e in rec.node_errors.items()))
                if rec.epoch_after is None:
                    raise BenchError(f"kill {k + 1}: server {stb} never said it was serving"
                                     f"\n{tail(servers[stb].log.read_text())}")
                t0 = time.monotonic()
                servers[cur] = serve(cur, "standing by")
                rec.standby_s = time.monotonic() - t0
                cur, stb, epoch = stb, cur, rec.epoch_after
                self.cluster_settled(url, epoch, cur, stb, list(nodes))
            # every acknowledged write is there, read through the other node
            bad = [off for off, data in written
                   if clients["node2"].pread(len(data), off) != data]
            if bad:
                self.problem(f"failover: WRONG DATA: {len(bad)} of the {len(written)} "
                             f"acknowledged 4 KiB writes read back different through node2 "
                             f"(offsets {bad[:5]})")
            else:
                self.cluster_notes.append(
                    f"failover: every one of the {len(written)} acknowledged 4 KiB writes "
                    f"(the kills' and the warm-up ones) read back through node2 after the "
                    f"last kill")
        finally:
            for c in clients.values():
                c.close()
        for n, srv in nodes.items():
            self.stop_checked(srv, f"failover: {n}")
        for tag in (stb, cur):  # the standby first: it must not take over
            self.stop_checked(servers[tag], f"failover: server {tag}")
        bad = self.check_stopped(store, "failover")
        for x in bad:
            self.problem(x)
        if not bad:
            self.cluster_notes.append(f"failover: `ddsnap check` clean after {a.kills} "
                                      "kills (no stale-epoch transaction)")
        for p in (store, origin):
            drop_file(p)

    def one_kill(self, rec: FailoverKill, servers: dict[str, Server],
                 clients: dict[str, NbdClient], written: list, cs: int) -> None:
        """SIGKILL ``servers[rec.killed]``; time the standby's lines and each node's
        write + flush sent right after the kill."""
        a = self.args
        standby = servers[rec.took_over]
        done = threading.Event()
        seen: dict[str, float] = {}

        def watch() -> None:  # the standby's log, every 5 ms
            while not done.is_set():
                text = standby.log.read_text(errors="replace")
                now = time.monotonic()
                if "elected" not in seen and ELECTED.search(text):
                    seen["elected"] = now
                m = SERVING.search(text)
                if m:
                    seen["serving"] = now
                    rec.epoch_after = int(m.group(1))
                    return
                if standby.popen.poll() is not None:
                    return
                time.sleep(0.005)

        def write(name: str, c: NbdClient, off: int, data: bytes) -> None:
            try:
                c.pwrite_many([(off, data)], depth=1)
                rec.node_s[name] = time.monotonic() - t0
                written.append((off, data))
            except (OSError, NbdError) as e:
                rec.node_errors[name] = f"{type(e).__name__}: {e}"

        # fresh chunks (not written since snap1): each write is a copy-out
        jobs = [(n, c, (16 + 2 * (rec.index - 1) + j) * cs, os.urandom(WRITE))
                for j, (n, c) in enumerate(clients.items())]
        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        t0 = time.monotonic()
        self.procs.kill(servers[rec.killed])
        threads = [threading.Thread(target=write, args=job, daemon=True) for job in jobs]
        for t in threads:
            t.start()
        limit = 3 * a.lease_ttl + 60
        for t in threads:
            t.join(max(0.0, t0 + limit - time.monotonic()))
        watcher.join(max(0.0, t0 + limit - time.monotonic()))
        done.set()
        for n, *_ in jobs:
            if n not in rec.node_s and n not in rec.node_errors:
                rec.node_errors[n] = f"not acknowledged {limit:.0f} s after the kill"
        rec.elected_s = seen["elected"] - t0 if "elected" in seen else None
        rec.serving_s = seen["serving"] - t0 if "serving" in seen else None
        if rec.node_errors:
            raise BenchError(f"kill {rec.index}: " + "; ".join(
                f"{n}: {e}" for n, e in rec.node_errors.items()))

    def cluster_settled(self, url: str, epoch: int | None, cur: str, stb: str,
                        names: list[str]) -> None:
        """Until etcd shows server ``cur`` elected at ``epoch``, ``stb`` standing by and
        both nodes in the node list ``cur`` published (which the next server waits
        for), then one more publication interval."""
        h = self.host("node-1")
        want_meta = f"tcp:{self.host(f'srv-{cur}').addr}:{CLUSTER_PORT}"
        stb_meta = f"tcp:{self.host(f'srv-{stb}').addr}:{CLUSTER_PORT}"
        end = time.monotonic() + 60
        st: dict = {}
        while time.monotonic() < end:
            p = subprocess.run(h.argv(*self.ddsnap_cmd, "cluster", "status", "--etcd", url,
                                      "--cluster", CLUSTER_NAME, "--json"),
                               capture_output=True, text=True, timeout=60)
            try:
                st = json.loads(p.stdout) if p.returncode == 0 else {}
            except ValueError:
                st = {}
            lead = st.get("leader") or {}
            have = sorted(n.get("name") for n in st.get("nodes", []) if not n.get("lapsed"))
            if (lead.get("metadata") == want_meta and lead.get("epoch") == epoch
                    and stb_meta in [s.get("metadata") for s in st.get("standbys", [])]
                    and have == sorted(names)):
                time.sleep(1.2)
                return
            time.sleep(0.3)
        raise BenchError(f"the cluster did not settle (server {cur} at epoch {epoch}, "
                         f"{stb} standing by, nodes {names} published): last status "
                         f"{json.dumps(st)}")

    def stop_checked(self, srv: Server, label: str) -> None:
        code, note = self.procs.stop(srv)
        if note or code not in (0, None):
            self.problem(f"{label}: stopping it with SIGTERM: {note or f'exit code {code}'}"
                         f"\n{tail(srv.log.read_text())}")

    # ---- IOPS: a node on another host against a local worker

    def cluster_workloads(self) -> tuple[Workload, Workload]:
        w = {x.key: x for x in all_workloads(self.args)}
        return w["overwrite4k"], w["randread4k"]

    def node_iops(self, kind: str) -> None:
        """``kind`` "cluster": a server listening on TCP with one worker, and a node on
        host node-1 (ratio node / local); "plain": ``serve --workers 1`` alone (its
        worker uses the page cache; information)."""
        ow, rd = self.cluster_workloads()
        origin, store = self.fresh_store(kind)
        a_host = self.host("srv-a")
        wsock, ctl = self.tmp / f"{kind}-w.sock", self.tmp / f"{kind}.ctl"
        meta = (["--metadata-listen", f"tcp:{a_host.addr}:{CLUSTER_PORT}", *self.tls("srv-a")]
                if kind == "cluster" else [])
        srv = self.procs.start(
            f"serve ({kind})", a_host.argv(*self.ddsnap_cmd, "serve", store, "--workers", "1",
                                           *meta, "--listen", f"unix:{wsock}", "--control",
                                           ctl),
            wsock, self.tmp / f"{kind}-serve.log", ready_path=ctl)
        node = None
        endpoints = [("local" if kind == "cluster" else "plain", a_host, wsock)]
        try:
            if kind == "cluster":
                nsock = self.tmp / "node.sock"
                node = self.procs.start(
                    "attach", self.attach_argv("node-1", [f"tcp:{a_host.addr}:{CLUSTER_PORT}"],
                                               origin, store, nsock, 1, "node1"),
                    nsock, self.tmp / "node.log", ready_text="attached to")
                endpoints.append(("node", self.host("node-1"), nsock))
            ctl_call(ctl, "snap_create", {"name": "snap1", "read_only": False})
            # the read setup of randread4k: every other chunk overwritten after snap1
            t0 = time.monotonic()
            self.overwrite_half(f"nbd+unix:///origin?socket={wsock}", f"{kind}-half")
            self.cluster_notes.append(
                f"{kind}: every other {fmt_size(self.args.chunk_size)} chunk of the origin "
                f"overwritten after snap1 through the local worker in "
                f"{time.monotonic() - t0:.1f} s (half of snap1 then read from the store)")
            for peer, _h, sock in endpoints:
                for bad in self.verify(f"nbd+unix:///snap1?socket={sock}",
                                       f"snap1 through the {_peer(peer)}"):
                    self.problem(bad)
            for peer, _h, _sock in endpoints:
                self.direct_flags[peer] = self.open_flags(
                    (node if peer == "node" else srv).popen.pid, (origin, store))
            procs = [srv] + ([node] if node else [])
            os.sync()
            for rep in range(self.args.repeat):
                order = endpoints if rep % 2 == 0 else endpoints[::-1]
                for peer, h, sock in order:
                    say(f"--- {rd.title}, {_peer(peer)} (run {rep + 1} of {self.args.repeat})")
                    self.record(rd, 1, peer, lambda h=h, sock=sock, peer=peer: self.cpu_of(
                        procs, lambda: self.fio(
                            f"nbd+unix:///snap1?socket={sock}", f"{peer}-{rd.key}", rd.rw,
                            rd.bs, rd.iodepth, runtime=self.args.duration, time_based=True,
                            readonly=True, prefix=h.argv())), (), rep)
            for rep in range(self.args.repeat):
                order = endpoints if rep % 2 == 0 else endpoints[::-1]
                for peer, h, sock in order:
                    say(f"--- {ow.title}, {_peer(peer)} (run {rep + 1} of {self.args.repeat})")
                    self.record(ow, 1, peer, lambda h=h, sock=sock, peer=peer: self.overwrite(
                        ow, peer, h, sock, ctl, procs), (), rep)
            if node is not None:
                self.stop_checked(node, f"IOPS ({kind}): the node")
                node = None
            self.stop_checked(srv, f"IOPS ({kind}): the server")
        finally:
            if node is not None:
                self.procs.stop(node)
            self.procs.stop(srv)
        bad = self.check_stopped(store, f"IOPS ({kind})")
        for x in bad:
            self.problem(x)
        for p in (store, origin):
            drop_file(p)

    def overwrite(self, wl: Workload, peer: str, h: Host, sock: Path, ctl: Path,
                  procs: list[Server]) -> Measure:
        """overwrite4k through one endpoint, prepared as :meth:`overwrite_ddsnap` does: a
        1 MiB sequential pass over the volume through the same endpoint first (every
        chunk copied out already, and now this endpoint's to write), then the job."""
        uri = f"nbd+unix:///origin?socket={sock}"
        t0 = time.monotonic()
        pre = self.fio(uri, f"{peer}-{wl.key}-pass", "write", "1m", self.args.iodepth_seq,
                       runtime=None, time_based=False, prefix=h.argv())
        pre_s = time.monotonic() - t0
        before = ctl_call(ctl, "status")["chunks_used"]
        os.sync()
        m = self.cpu_of(procs, lambda: self.fio(
            uri, f"{peer}-{wl.key}", wl.rw, wl.bs, wl.iodepth, runtime=self.args.duration,
            time_based=True, prefix=h.argv()))
        after = ctl_call(ctl, "status")["chunks_used"]
        m.extra = (f"first a 1 MiB sequential pass over the volume through the same socket "
                   f"({pre_s:.1f} s, {pre.mibs:,.1f} MiB/s); {after - before} store chunks "
                   f"allocated during the timed job (expected 0); {m.extra}")
        if after != before:
            self.problem(f"{wl.key} {_peer(peer)}: the store grew from {before} to {after} "
                         f"used chunks during the overwrites")
        return m

    @staticmethod
    def cpu_of(procs: list[Server], fn) -> Measure:
        """Run ``fn()`` (an fio job); the Measure gets the CPU time every ddsnap process
        under ``procs`` used meanwhile (``server_cpu_s``), and in its ``extra`` that time
        by role: the metadata server, the local worker, the node's worker, the
        supervisors (from each process's command line)."""
        def cpu() -> dict[int, tuple[str, float]]:
            out = {}
            for s in procs:
                for pid in process_tree(s.popen.pid):
                    try:
                        with open(f"/proc/{pid}/cmdline", "rb") as f:
                            cmd = f.read().split(b"\0")
                    except OSError:
                        continue
                    c = proc_cpu_own(pid)
                    if c is not None:
                        out[pid] = (_role(cmd), c)
            return out

        c0 = cpu()
        m = fn()
        c1 = cpu()
        used: dict[str, float] = {}
        for pid, (role, c) in c1.items():
            used[role] = used.get(role, 0.0) + c - (c0[pid][1] if pid in c0 else 0.0)
        m.server_cpu_s = sum(used.values())
        m.role_cpu_s = used
        m.extra = "ddsnap CPU: " + ", ".join(f"{r} {u:.2f} s" for r, u in sorted(used.items()))
        return m

    @staticmethod
    def open_flags(pid: int, paths: tuple[Path, ...]) -> str:
        """How the processes under ``pid`` opened ``paths``: "O_DIRECT", "page cache" or
        a mix (from ``/proc/PID/fdinfo``)."""
        want = {str(p.resolve()) for p in paths}
        seen = set()
        for p in process_tree(pid):
            try:
                fds = os.listdir(f"/proc/{p}/fd")
            except OSError:
                continue
            for fd in fds:
                try:
                    if os.readlink(f"/proc/{p}/fd/{fd}") not in want:
                        continue
                    with open(f"/proc/{p}/fdinfo/{fd}") as f:
                        flags = next(int(line.split()[1], 8) for line in f
                                     if line.startswith("flags:"))
                except (OSError, StopIteration, ValueError):
                    continue
                seen.add("O_DIRECT" if flags & O_DIRECT else "page cache")
        return " and ".join(sorted(seen)) or "?"


def proc_cpu_own(pid: int) -> float | None:
    """CPU seconds (user + system, all threads) of process ``pid`` alone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _role(cmd: list[bytes]) -> str:
    """What a ddsnap process of the IOPS part is, from its command line."""
    if b"ddsnap.workers" in cmd and b"meta" in cmd:
        return "metadata server"
    if b"ddsnap.workers" in cmd and b"worker" in cmd:
        return "node worker" if b"--origin" in cmd else "local worker"
    return "supervisors"


def _peer(peer: str) -> str:
    return PEER_NAMES[peer]


def _epoch(srv: Server) -> int | None:
    m = SERVING.search(srv.log.read_text(errors="replace"))
    return int(m.group(1)) if m else None


def _s(v: float | None) -> str:
    return "–" if v is None else f"{v:.2f} s"


def have_tools() -> list[str]:
    """What ``--cluster`` needs and is missing."""
    return [t for t in ("fio", "etcd", "etcdctl", "ip", "openssl", "nbdcopy", "cmp")
            if shutil.which(t) is None]
