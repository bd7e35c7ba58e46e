"""``ddsnap serve --workers N``: one metadata server process and N worker processes.

Seed 000's split on one host.  ``serve`` becomes a small supervisor:

- it binds the NBD listeners once (``NbdServer.start(serve=False)``) and keeps them;
- it starts the **metadata server** (``python -m ddsnap.workers meta``): a
  :class:`~ddsnap.daemon.Daemon` that owns the store (its lock, journal, copy-outs,
  merges and control socket) and answers the csnap protocol on a unix socket in the
  store's runtime directory, and serves no NBD itself;
- it starts N **workers** (``python -m ddsnap.workers worker``), each inheriting the
  listening sockets, opening the origin and the store's device itself, and serving NBD
  with volumes on a :class:`~ddsnap.csnap.client.RemoteService`: every data read and
  write is the worker's, every mapping and lock the metadata server's;
- it restarts a worker that dies (the server has given back its locks), and a metadata
  server that dies (the new one recovers the journal and waits for the workers, which
  reconnect and upload their locks, before anything writes: see docs/protocol.md);
- SIGINT or SIGTERM stops the workers (connections drain), then the metadata server
  (the store is committed and marked clean).

A FLUSH on any worker's connection is an ``fsync`` of the origin or the store file,
which makes every write to that file acknowledged by any process durable, so FLUSH, FUA
and CAN_MULTI_CONN keep their meaning across workers.

A child reports that it is ready, or why it could not start (the error's class and
message), as one JSON line on a pipe the supervisor gave it, so ``serve`` fails with the
same message and exit code as a single process would.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from . import admin, control, election
from .csnap import tls
from .csnap.client import RemoteService, Stream, tcp_connector
from .daemon import (
    CLUSTER_GRACE,
    IO_THREADS,
    Daemon,
    Exports,
    fenced_exit,
    release_memory,
    remote_nodes,
    stop_on_signals,
    tune_malloc,
)
from .election import BorrowedTerm, SharedDeadline, Term
from .errors import (
    DdsnapError,
    InvalidArgument,
    OriginMismatch,
    ServiceFailed,
    WorkerFailed,
    from_dict,
)
from .nbd.server import DEFAULT_MAX_REPLY_MEMORY, NbdServer, parse_listen
from .service.api import DataDevices
from .store.blockdev import DirectFileDevice, FileDevice
from .store.superblock import read_superblock
from .units import human_bytes

log = logging.getLogger("ddsnap.workers")

#: seconds a worker keeps trying to reach a metadata server that went away
RECONNECT = 60.0
#: seconds a restarted metadata server waits for the workers to upload their locks
GRACE = 10.0
#: seconds a child has to say it is ready
START_TIMEOUT = 60.0
#: seconds a child has to stop after SIGTERM (connections drain within 10 s, the store
#: is committed) before it is killed
STOP_TIMEOUT = 60.0
#: seconds between restarts of a child that keeps dying at once
RESTART_DELAY = 0.5
#: seconds between a cluster metadata server child's looks at its term's deadline
TERM_POLL = 0.1


def meta_socket_path(store_path: str) -> str:
    """The metadata server's unix socket for ``store_path``, in the runtime directory."""
    return admin.registry_path(store_path)[: -len(".control")] + ".meta"


# --- the supervisor ---------------------------------------------------------------------


@dataclass(frozen=True)
class Attach:
    """What a node on another host needs to reach the metadata server
    (``ddsnap attach``).

    Attributes:
        server: ``tcp:HOST:PORT`` of the metadata server, or None with ``etcd``.
        origin: this host's path of the origin device.
        tls: ``(ca, cert, key)`` PEM files, or None for plain text (``--insecure``).
        name: this node's label (the server's node list; workers get ``NAME-workerN``).
        reconnect: seconds to keep trying to reach a server that went away.
        etcd: ``(URL, NAME)``: follow the elected server of that cluster.
    """

    server: str | None
    origin: str
    tls: tuple[str, str, str] | None
    name: str
    reconnect: float = 300.0
    etcd: tuple[str, str] | None = None


class _Child:
    """One child process and what it is."""

    def __init__(self, kind: str, name: str, proc: asyncio.subprocess.Process, info: dict):
        self.kind = kind
        self.name = name
        self.proc = proc
        self.info = info


class Supervisor:
    """``serve --workers N``: binds the listeners, runs and watches the children.

    Args:
        store_path: the snapshot store.
        listen: NBD listen URIs.
        workers: worker processes (≥ 1).
        control_path: the control socket (default :func:`admin.default_control_path`).
        max_reply_memory: per worker (see :class:`~ddsnap.daemon.Daemon`).
        degraded, accept_origin_change, verbose: as for ``serve``.
        meta_listen, tls: the metadata server also serves nodes on other hosts
            (``serve --metadata-listen``, see :class:`~ddsnap.daemon.Daemon`); the
            workers then open the devices with ``O_DIRECT`` too.
        attach: run no metadata server: the workers are nodes of the one
            :class:`Attach` names, on another host (``ddsnap attach``).
        term, expect: ``serve --etcd --workers N``: the term this process won (the
            metadata server child writes under it, reading its deadline from a
            :class:`~ddsnap.election.SharedDeadline`, and exits 30 once it passes),
            and the nodes the cluster's last server published, waited for at start.

    Attributes:
        addresses: the NBD addresses bound; ``meta_path``: the metadata socket;
        ``restarts``: children restarted, by name.
    """

    def __init__(self, store_path: str, listen: list[str], workers: int,
                 control_path: str | None = None,
                 max_reply_memory: int = DEFAULT_MAX_REPLY_MEMORY, degraded: bool = False,
                 accept_origin_change: bool = False, verbose: bool = False,
                 meta_listen: list[str] | None = None, tls: tuple[str, str, str] | None = None,
                 attach: Attach | None = None, term: Term | None = None,
                 expect: list[str] | None = None):
        self.store_path = os.path.abspath(store_path)
        self.term = term
        self.expect = expect or []
        self.meta_listen = meta_listen or []
        self.tls = tls
        self.attach = attach
        self.listen = listen
        self.workers = workers
        self.control_path = control_path or admin.default_control_path(store_path)
        self.max_reply_memory = max_reply_memory
        self.degraded = degraded
        self.accept_origin_change = accept_origin_change
        self.verbose = verbose
        self.meta_path = meta_socket_path(store_path)
        self.nbd: NbdServer | None = None
        self.addresses: list[str] = []
        self.meta: _Child | None = None
        self.children: dict[str, _Child] = {}
        self.generation = term.epoch if term is not None else 0
        self.restarts: dict[str, int] = {}
        self._stopping = False
        self._stop = asyncio.Event()
        self._watchers: set[asyncio.Task] = set()

    async def start(self) -> dict:
        """Bind, start the metadata server, then the workers; the metadata server's
        ready message (``snapshots``, ``damage``).

        Raises:
            what the metadata server raised (StoreBusy, NotAStore, ...), ListenError,
            WorkerFailed; on error nothing stays running.
        """
        try:
            if self.attach is None and self.term is None:
                # A served store is refused before the listeners are bound, as one
                # process does (StoreBusy, not "address in use"); the metadata server
                # locks it next.  (A cluster's server shares its lock: the election
                # is what keeps a second one out.)
                admin.check_not_busy(self.store_path)
            self.nbd = NbdServer(_NoExports(), None)
            await self.nbd.start(self.listen, serve=False)
            self.addresses = list(self.nbd.addresses)
            if self.attach is None:
                self.meta = await self._spawn_meta()
            info: dict = {}
            for i in range(self.workers):
                name = f"worker{i + 1}"
                if self.attach is not None:
                    name = f"{self.attach.name}-{name}"
                self.children[name] = await self._spawn_worker(name)
                info = info or self.children[name].info
        except BaseException:
            await self.stop()
            raise
        for child in [self.meta, *self.children.values()]:
            if child is not None:
                self._watch(child)
        return self.meta.info if self.meta is not None else info

    def _common_args(self) -> list[str]:
        out = ["--max-reply-memory", str(self.max_reply_memory)]
        if self.degraded:
            out.append("--force-degraded")
        if self.verbose:
            out.append("--verbose")
        return out

    async def _spawn_meta(self) -> _Child:
        args = ["meta", self.store_path, "--meta", self.meta_path, "--control",
                self.control_path, "--generation", str(self.generation),
                *self._common_args()]
        fds: list[int] = []
        if self.term is not None:
            shared = self.term.share()
            fds.append(shared.fd)
            args += ["--term-fd", str(shared.fd), "--cluster", self.term.cluster]
            for name in self.expect:
                args += ["--expect", name]
        for uri in self.meta_listen:
            args += ["--meta-listen", uri]
        args += _tls_args(self.tls)
        if self.accept_origin_change and self.generation == 0:
            args.append("--accept-origin-change")
        for a in self.addresses:
            args += ["--advertise", a]
        if self.restarts.get("meta"):  # (a restart: the workers re-upload)
            for name in self.children:
                args += ["--expect", name]
        return await self._spawn("meta", "meta", args, fds)

    async def _spawn_worker(self, name: str) -> _Child:
        assert self.nbd is not None
        fds = self.nbd.listening_fds()
        if self.attach is not None:
            at = self.attach
            args = ["worker", self.store_path, "--origin", at.origin, "--reconnect",
                    str(at.reconnect), "--direct", "--name", name, *self._common_args(),
                    *_tls_args(at.tls)]
            args += (["--etcd", at.etcd[0], "--cluster", at.etcd[1]] if at.etcd
                     else ["--server", str(at.server)])
        else:
            args = ["worker", self.store_path, "--meta", self.meta_path, "--name", name,
                    *self._common_args()]
            if self.meta_listen:
                args.append("--direct")
        for fd in fds:
            args += ["--fd", str(fd)]
        return await self._spawn("worker", name, args, fds)

    async def _spawn(self, kind: str, name: str, args: list[str], fds: list[int]) -> _Child:
        """Start ``python -m ddsnap.workers ARGS`` and wait for its ready line."""
        rfd, wfd = os.pipe()
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "ddsnap.workers", *args, "--ready-fd", str(wfd),
                pass_fds=[*fds, wfd], stdin=subprocess.DEVNULL)
        except BaseException:
            os.close(rfd)
            raise
        finally:
            os.close(wfd)
        loop = asyncio.get_running_loop()
        try:
            line = await asyncio.wait_for(loop.run_in_executor(None, _read_line, rfd),
                                          START_TIMEOUT)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise WorkerFailed(f"the {kind} process {name} did not start within "
                              f"{START_TIMEOUT:.0f} s") from None
        finally:
            os.close(rfd)
        try:
            msg = json.loads(line) if line else {}
        except ValueError:
            msg = {}
        if not msg.get("ok"):
            await proc.wait()
            if "error" in msg:
                raise from_dict(msg["error"])
            raise WorkerFailed(f"the {kind} process {name} exited with status "
                              f"{proc.returncode} before it was ready")
        return _Child(kind, name, proc, msg)

    def _watch(self, child: _Child) -> None:
        task = asyncio.get_running_loop().create_task(self._await_exit(child))
        self._watchers.add(task)
        task.add_done_callback(self._watchers.discard)

    async def _await_exit(self, child: _Child) -> None:
        code = await child.proc.wait()
        if self._stopping:
            return
        log.warning("%s process %s (pid %d) exited with status %s: restarting it",
                    child.kind, child.name, child.proc.pid, code)
        self.restarts[child.name] = self.restarts.get(child.name, 0) + 1
        while not self._stopping:
            await asyncio.sleep(RESTART_DELAY)
            try:
                if child.kind == "meta":
                    if self.term is None:  # (a cluster's server keeps its epoch)
                        self.generation += 1
                    new = self.meta = await self._spawn_meta()
                else:
                    new = self.children[child.name] = await self._spawn_worker(child.name)
            except (DdsnapError, OSError) as e:
                log.error("restarting %s %s failed: %s", child.kind, child.name, e)
                continue
            self._watch(new)
            return

    async def stop(self) -> None:
        """Stop the workers (their connections drain), then the metadata server; a child
        still running :data:`STOP_TIMEOUT` seconds after SIGTERM gets SIGKILL."""
        self._stopping = True
        for child in list(self.children.values()):
            _terminate(child.proc)
        for child in list(self.children.values()):
            await _reap(child)
        if self.meta is not None:
            _terminate(self.meta.proc)
            await _reap(self.meta)
        for task in list(self._watchers):
            task.cancel()
        if self.nbd is not None:
            await self.nbd.close()
            self.nbd = None

    async def published_nodes(self) -> list[dict] | None:
        """The metadata server child's nodes on other hosts and lapsed ones, as a
        cluster's server publishes them (asked on its control socket)."""
        loop = asyncio.get_running_loop()
        st = await loop.run_in_executor(
            None, lambda: control.call(self.control_path, "status", timeout=5))
        return remote_nodes(st.get("nodes", []), st.get("lapsed", {}))

    async def run(self, on_ready=None) -> None:
        """Serve until SIGINT or SIGTERM."""
        info = await self.start()
        try:
            with stop_on_signals(self._stop):
                if on_ready is not None:
                    on_ready(self, info)
                await self._stop.wait()
        finally:
            await self.stop()


async def _reap(child: _Child) -> None:
    """Wait for a child told to stop; SIGKILL it if it does not within STOP_TIMEOUT."""
    try:
        await asyncio.wait_for(child.proc.wait(), STOP_TIMEOUT)
    except TimeoutError:
        log.warning("%s process %s did not stop within %.0f s: killing it", child.kind,
                    child.name, STOP_TIMEOUT)
        with contextlib.suppress(ProcessLookupError):
            child.proc.kill()
        await child.proc.wait()


def _terminate(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)


def _tls_args(files: tuple[str, str, str] | None) -> list[str]:
    if files is None:
        return []
    ca, cert, key = files
    return ["--tls-ca", ca, "--tls-cert", cert, "--tls-key", key]


def _read_line(fd: int) -> bytes:
    """Read up to the first newline (or EOF) from ``fd``."""
    out = b""
    while not out.endswith(b"\n"):
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        out += chunk
    return out


class _NoExports:
    """The registry of the supervisor's listener, which never accepts."""

    default_name = "origin"
    read_only = True

    def names(self) -> list[str]:
        return []

    def get(self, name: str):
        return None


# --- the children -------------------------------------------------------------------------


_reported: list[bool] = []  # a child's ready line (or error) went to the supervisor


def _report(fd: int, msg: dict) -> bool:
    """Send the supervisor this child's ready line (or its error), once; True if this
    call sent it (an error after the ready line goes to stderr instead)."""
    if _reported:
        return False
    _reported.append(True)
    with contextlib.suppress(OSError):
        os.write(fd, (json.dumps(msg) + "\n").encode())
    with contextlib.suppress(OSError):
        os.close(fd)
    return True


def _die_with_parent() -> None:
    """Have the kernel send SIGTERM when the supervisor dies (``PR_SET_PDEATHSIG``),
    so no worker outlives a ``serve`` that was killed."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


async def _meta_main(a: argparse.Namespace) -> None:
    term = None
    if a.term_fd is not None:
        term = BorrowedTerm(a.cluster, a.generation, SharedDeadline(a.term_fd))
    d = Daemon(a.store, [], a.control, max_reply_memory=a.max_reply_memory,
               degraded=a.force_degraded, accept_origin_change=a.accept_origin_change,
               meta_path=a.meta, generation=a.generation, expect=a.expect,
               advertise=a.advertise, meta_listen=a.meta_listen, tls=_tls_files(a),
               term=term)
    watchdog = None
    if term is not None:
        d.grace = CLUSTER_GRACE
        watchdog = asyncio.ensure_future(_end_with_term(term))

    def ready(daemon: Daemon) -> None:
        opened = daemon.opened
        assert opened is not None
        scan = opened.store.journal_scan
        damage = "; ".join(str(e) for e in scan.damage) if scan and scan.damage else None
        _report(a.ready_fd, {"ok": True, "snapshots": len(opened.service.snapshots()),
                             "damage": damage, "control": daemon.control_path,
                             "metadata": daemon.meta_addresses})

    try:
        await d.run(ready)
    finally:
        if watchdog is not None:
            watchdog.cancel()


async def _end_with_term(term: BorrowedTerm) -> None:
    """The metadata server child of a cluster's server exits (status 30) as soon as
    the supervisor's term is over: the supervisor may be stopped or dead, and a
    server whose every write is refused serves nothing."""
    while term.valid():
        await asyncio.sleep(TERM_POLL)
    fenced_exit(term)


def _tls_files(a: argparse.Namespace) -> tuple[str, str, str] | None:
    if a.tls_ca is None:
        return None
    return a.tls_ca, a.tls_cert, a.tls_key


def _tcp_address(server: str) -> tuple[str, int]:
    kind, where = parse_listen(server)
    if kind != "tcp" or not where[0]:
        raise InvalidArgument(f"metadata server {server!r}: use tcp:HOST:PORT")
    return where[0], where[1]


def node_connector(server: str | None, meta: str | None,
                   tls_files: tuple[str, str, str] | None,
                   etcd: tuple[str, str] | None = None) -> Callable[[], Stream]:
    """How a node reaches its metadata server: the current server of cluster
    ``etcd`` = ``(URL, NAME)``, looked up in etcd at every connection (a node follows
    failovers), or ``server`` ``tcp:HOST:PORT``; over TLS with ``tls_files`` ``(ca,
    cert, key)``, or plain text with None; else the unix socket ``meta`` of a metadata
    server on this host.

    Raises:
        InvalidArgument: ``server`` is not ``tcp:HOST:PORT``.
        TlsRefused / DdsnapError: the TLS files cannot be used.
        (when called) ServiceFailed: no server elected in the cluster now, or etcd
            did not answer.
    """
    context = tls.client_context(*tls_files) if tls_files else None
    if etcd is not None:
        url, cluster = etcd

        def follow() -> Stream:
            # (EtcdUnavailable is a ServiceFailed: retried like a lost server)
            leader = asyncio.run(election.leader(url, cluster))
            if leader is None or "metadata" not in leader:
                raise ServiceFailed(f"no metadata server is elected in cluster {cluster} "
                                    "now")
            host, port = _tcp_address(leader["metadata"])
            return tcp_connector(host, port, context)()

        return follow
    if server is not None:
        host, port = _tcp_address(server)
        return tcp_connector(host, port, context)
    assert meta is not None

    def connect() -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(meta)
        except OSError:
            sock.close()
            raise
        return sock

    return connect


def store_uuid(store_path: str) -> bytes:
    """The UUID in the superblock of the store at ``store_path`` (read without its lock:
    the metadata server holds that), which a node's IDENTIFY checks against the
    server's.

    Raises:
        StoreNotFound, NotAStore, CorruptMetadata, FormatTooOld: as reading a store.
    """
    dev = FileDevice(store_path, writable=False)
    try:
        return read_superblock(dev).uuid
    finally:
        dev.close()


async def run_node(store: str, connect: Callable[[], Stream], *, name: str,
                   origin_path: str | None = None, uuid: bytes = bytes(16),
                   direct: bool = False, reconnect: float = RECONNECT,
                   adopt: list[socket.socket] | None = None, listen: list[str] | None = None,
                   max_reply_memory: int = DEFAULT_MAX_REPLY_MEMORY, degraded: bool = False,
                   follow: tuple[str, str] | None = None,
                   on_ready: Callable[[NbdServer, RemoteService], object] | None = None
                   ) -> None:
    """Serve NBD as a csnap node until SIGINT or SIGTERM: a worker of ``serve`` (on
    listeners it ``adopt``s) or ``ddsnap attach`` on another host (binding ``listen``
    itself with ``--workers 0``); with ``follow`` ``(URL, NAME)``, a node of that
    cluster that follows its elections (:func:`follow_leader`).

    The node opens the origin (``origin_path``, else the path the server reports) and
    the store at ``store`` itself, with ``O_DIRECT`` if ``direct``, and asks the
    metadata server only for mappings and locks.

    Raises:
        OriginMismatch: the server serves another store (``uuid``), or this origin is
            smaller than the server's.
        TlsRefused, ServiceFailed, OSError: the server cannot be reached or refused.
        StoreNotFound: a device does not exist here.
    """
    loop = asyncio.get_running_loop()
    svc = await loop.run_in_executor(
        None, lambda: RemoteService(connect, name=name, uuid=uuid, reconnect=reconnect,
                                    epochs=follow is not None))
    origin = cow = None
    try:
        st = await loop.run_in_executor(None, svc.status)
        writable = not degraded
        device = DirectFileDevice if direct else FileDevice
        origin = device(origin_path or st.origin, writable=writable, what="origin",
                        strict=True)
        if origin.size < st.origin_size:
            raise OriginMismatch(
                f"origin {origin.path} is {human_bytes(origin.size)} here but the "
                f"metadata server's is {human_bytes(st.origin_size)}: not the same device")
        cow = device(store, writable=writable)
        data = svc.data = DataDevices(origin, cow, svc.chunk_size)
        executor = ThreadPoolExecutor(IO_THREADS, thread_name_prefix="ddsnap-io")
        nbd = NbdServer(Exports(svc, data, degraded), executor,
                        max_reply_memory=max_reply_memory, on_idle=release_memory)
        try:
            if adopt:
                await nbd.adopt(adopt)
            if listen:
                await nbd.start(listen)
            stop = asyncio.Event()
            watch = (asyncio.ensure_future(follow_leader(svc, *follow))
                     if follow is not None else None)
            try:
                with stop_on_signals(stop):
                    if on_ready is not None:
                        on_ready(nbd, svc)
                    await stop.wait()
            finally:
                if watch is not None:
                    watch.cancel()
        finally:
            await nbd.close()
            executor.shutdown(wait=True)
    finally:
        await loop.run_in_executor(None, svc.close)
        for dev in (origin, cow):
            if dev is not None:
                dev.close()


#: seconds between a cluster node's looks at which server is elected
FOLLOW_INTERVAL = 1.0


async def follow_leader(svc: RemoteService, url: str, cluster: str) -> None:
    """A cluster node's watch on the election: once etcd names a server of another
    epoch than the one this node talks to, leave the old one (a stopped server never
    closes the connection by itself) and connect to the new one.  Runs until
    cancelled; etcd being unreachable only delays it."""
    while True:
        await asyncio.sleep(FOLLOW_INTERVAL)
        try:
            lead = await election.leader(url, cluster)
        except (DdsnapError, OSError) as e:
            log.debug("cannot see the cluster's leader now: %s", e)
            continue
        if lead is not None and lead.get("epoch", 0) > svc.generation:
            log.warning("cluster %s elected a new metadata server (epoch %d, was %d): "
                        "following it", cluster, lead["epoch"], svc.generation)
            svc.abandon_server()


async def _worker_main(a: argparse.Namespace) -> None:
    etcd = (a.etcd, a.cluster) if a.etcd else None
    connect = node_connector(a.server, a.meta, _tls_files(a), etcd)
    uuid = store_uuid(a.store) if a.server or etcd else bytes(16)
    await run_node(a.store, connect, name=a.name, origin_path=a.origin, uuid=uuid,
                   direct=a.direct, reconnect=a.reconnect,
                   adopt=[socket.socket(fileno=fd) for fd in a.fd],
                   max_reply_memory=a.max_reply_memory, degraded=a.force_degraded,
                   follow=etcd,
                   on_ready=lambda nbd, svc: _report(a.ready_fd, {"ok": True,
                                                                  "node": svc.node}))


def main(argv: list[str] | None = None) -> int:
    """The child processes' entry point: ``python -m ddsnap.workers {meta,worker} ...``."""
    p = argparse.ArgumentParser(prog="python -m ddsnap.workers")
    p.add_argument("kind", choices=["meta", "worker"])
    p.add_argument("store")
    p.add_argument("--meta")
    p.add_argument("--server")
    p.add_argument("--etcd")
    p.add_argument("--cluster")
    p.add_argument("--origin")
    p.add_argument("--direct", action="store_true")
    p.add_argument("--reconnect", type=float, default=RECONNECT)
    p.add_argument("--meta-listen", action="append", default=[])
    p.add_argument("--tls-ca")
    p.add_argument("--tls-cert")
    p.add_argument("--tls-key")
    p.add_argument("--ready-fd", type=int, required=True)
    p.add_argument("--control")
    p.add_argument("--name", default="meta")
    p.add_argument("--generation", type=int, default=0)
    p.add_argument("--term-fd", type=int)
    p.add_argument("--expect", action="append", default=[])
    p.add_argument("--advertise", action="append", default=[])
    p.add_argument("--fd", type=int, action="append", default=[])
    p.add_argument("--max-reply-memory", type=int, default=DEFAULT_MAX_REPLY_MEMORY)
    p.add_argument("--force-degraded", action="store_true")
    p.add_argument("--accept-origin-change", action="store_true")
    p.add_argument("--verbose", action="store_true")
    a = p.parse_args(argv)
    _die_with_parent()
    logging.basicConfig(level=logging.INFO if a.verbose else logging.WARNING,
                        format=f"ddsnap {a.name}: %(message)s")
    tune_malloc()
    try:
        asyncio.run(_meta_main(a) if a.kind == "meta" else _worker_main(a))
    except (DdsnapError, OSError) as e:
        err = e if isinstance(e, DdsnapError) else WorkerFailed(f"{a.name}: {e.strerror or e}")
        # before it was ready the supervisor reports the error as its own
        if not _report(a.ready_fd, {"ok": False, "error": err.to_dict()}):
            print(f"ddsnap {a.name}: {err}", file=sys.stderr)
        return err.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
