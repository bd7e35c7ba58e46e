"""``ddsnap serve``: wires a store, its volumes, the NBD listener and the control socket.

The daemon holds the store's exclusive lock for its whole life, so a second ``serve`` (or a
local ``snap create``) cannot open it behind its back; administrative commands reach it
through the control socket instead.  It exports ``origin`` and every live snapshot by name
(new snapshots appear at once, deleted ones vanish), and shuts down cleanly on SIGINT or
SIGTERM: connections drain, the store is committed and marked clean.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

from . import admin, election
from .control import ControlServer
from .csnap import tls
from .csnap.server import GRACE, MetadataServer
from .election import BorrowedTerm, Term
from .errors import DdsnapError, Fenced, InvalidArgument, ListenError, ServiceFailed
from .nbd.server import DEFAULT_MAX_REPLY_MEMORY, NbdServer, parse_listen
from .service.api import DataDevices, MetadataService
from .volume import Origin, Snapshot

log = logging.getLogger("ddsnap.daemon")

#: worker threads doing volume I/O (each NBD request runs in one)
IO_THREADS = 32
#: glibc malloc settings for the server process (see :func:`tune_malloc`), bytes
MALLOC_MMAP_THRESHOLD = 32 << 20
MALLOC_TRIM_THRESHOLD = 64 << 20


def tune_malloc() -> bool:
    """Keep READ reply buffers (up to 32 MiB) in the malloc heap; True if applied.

    By default glibc gives each allocation above its mmap threshold fresh pages and
    hands them back on free, so every 1 MiB READ reply costs 256 page faults (measured:
    60% of the server's time on 1 MiB sequential reads).  Raising the mmap and trim
    thresholds (``mallopt`` M_MMAP_THRESHOLD / M_TRIM_THRESHOLD) lets freed buffers be
    reused; the heap keeps at most :data:`MALLOC_TRIM_THRESHOLD` unused bytes.  Does
    nothing off glibc.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, MALLOC_MMAP_THRESHOLD)
                and mallopt(m_trim_threshold, MALLOC_TRIM_THRESHOLD))


def trim_malloc() -> bool:
    """Give the malloc heap's free pages back to the system (``malloc_trim(0)``); True if
    done.  Does nothing off glibc.

    :func:`tune_malloc` keeps freed READ buffers in the heap for reuse, and glibc trims
    only the top of the heap: after clients that held hundreds of MiB of replies (see
    ``--max-reply-memory``) have gone, that memory would stay with the process.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        malloc_trim = libc.malloc_trim
    except (OSError, AttributeError):
        return False
    malloc_trim.argtypes = [ctypes.c_size_t]
    malloc_trim(0)
    return True


def release_memory(high: int) -> None:
    """``NbdServer.on_idle``: the server holds no reply memory any more; if it held more
    than malloc keeps by itself, give the heap's free pages back."""
    if high >= MALLOC_TRIM_THRESHOLD:
        trim_malloc()


class Exports:
    """The export registry: ``origin`` plus each live snapshot, looked up by name.

    Args:
        service: the metadata service (in-process, or a worker's :class:`RemoteService`).
        data: the devices its volumes do their I/O on.
        read_only: every export read-only (a store served degraded).
    """

    default_name = "origin"

    def __init__(self, service: MetadataService, data: DataDevices, read_only: bool = False):
        self.service = service
        self.data = data
        self.read_only = read_only

    def names(self) -> list[str]:
        svc = self.service
        return ["origin"] + [s.name for s in svc.snapshots() if not svc.is_merging(s)]

    def snapshot_names(self) -> list[str]:
        """Every live snapshot's name, oldest first (a merging one too): the FROM of
        the ``ddsnap:changed:FROM`` contexts every export offers (issue 13).  Never
        waits (the service's snapshot list)."""
        return [s.name for s in self.service.snapshots()]

    def get(self, name: str):
        svc = self.service
        vol: Origin | Snapshot | None
        if name in ("origin", ""):
            vol = Origin(svc, self.data)
        else:
            vol = next((Snapshot(svc, self.data, s) for s in svc.snapshots()
                        if s.name == name and not svc.is_merging(s)), None)
        if vol is not None and self.read_only:
            vol.read_only = True
        return vol


class Daemon:
    """One served store.

    Args:
        store_path: the snapshot store.
        listen: NBD listen URIs (``unix:PATH``, ``tcp:HOST:PORT``).
        control_path: the control socket (default :func:`admin.default_control_path`).
        max_reply_memory: bytes the NBD server may hold for replies its clients have
            not read, over all connections (see ``NbdServer.reply_bytes_held``).
        meta_path: also serve the csnap metadata protocol on this unix socket (the
            metadata server process of ``serve --workers``; ``listen`` is then empty:
            the workers serve NBD).
        generation, expect: the metadata server's restarts so far, and the worker
            names whose lock uploads it waits for before anything writes (a restart).
        advertise: NBD addresses to record in the registry (the workers' listeners).
        meta_listen: serve the csnap metadata protocol to nodes on other hosts on these
            ``tcp:HOST:PORT`` addresses (``serve --metadata-listen``): the store and
            origin are then opened with ``O_DIRECT``.
        tls: ``(ca, cert, key)`` PEM files: nodes on TCP complete a TLS handshake with a
            client certificate the CA signed; None: plain text (``--insecure``).
        term: the won election of a cluster's server (``serve --etcd``): its epoch is
            claimed in the store and is the csnap generation nodes see, and every write
            asks its fence (``term.check``) first.

    Attributes:
        meta_addresses: the ``tcp:HOST:PORT`` metadata addresses bound (real ports).
    """

    def __init__(self, store_path: str, listen: list[str], control_path: str | None = None,
                 max_reply_memory: int = DEFAULT_MAX_REPLY_MEMORY, degraded: bool = False,
                 accept_origin_change: bool = False, meta_path: str | None = None,
                 generation: int = 0, expect: list[str] | None = None,
                 advertise: list[str] | None = None, meta_listen: list[str] | None = None,
                 tls: tuple[str, str, str] | None = None,
                 term: Term | BorrowedTerm | None = None):
        self.store_path = os.path.abspath(store_path)
        self.meta_path = meta_path
        self.meta_listen = meta_listen or []
        self.meta_addresses: list[str] = []
        self.tls = tls
        self.term = term
        #: seconds a restarted metadata server waits for the uploads it expects
        self.grace = GRACE
        self.generation = term.epoch if term is not None else generation
        self.expect = expect or []
        self.advertise = advertise or []
        self.meta: MetadataServer | None = None
        self.degraded = degraded
        self.accept_origin_change = accept_origin_change
        self.listen = listen
        self.control_path = control_path or admin.default_control_path(store_path)
        self.max_reply_memory = max_reply_memory
        self.opened: admin.OpenStore | None = None
        self.merger: admin.MergeRunner | None = None
        self.nbd: NbdServer | None = None
        self.control: ControlServer | None = None
        self._stop = asyncio.Event()
        self._registry_file = admin.registry_path(store_path)

    def _handle(self, op: str, args: dict):
        opened = self.opened
        if opened is None:  # the control socket starts after the open, stops before close
            raise ServiceFailed("the store is not open")
        result = admin.run_op(opened.service, op, args, self.store_path, served=True,
                              runner=self.merger, degraded=opened.degraded)
        if op == "status" and self.meta is not None:
            # the csnap nodes: workers on this host, nodes attached from others
            result["metadata"] = self.meta_addresses
            result["nodes"] = self.meta.nodes()
            result["lapsed"] = self.meta.lapsed()
        return result

    async def start(self) -> None:
        """Open the store and start serving.

        Raises StoreBusy, NotAStore, ... (opening the store), ControlPathError (the
        control socket), ListenError (an NBD address); on error nothing stays open.
        """
        loop = asyncio.get_running_loop()
        # (the TLS files are checked before the store is opened: a typo costs no recovery)
        context = tls.server_context(*self.tls) if self.tls else None
        term = self.term
        self.opened = await loop.run_in_executor(
            None, lambda: admin.open_store(
                self.store_path, self.degraded, self.accept_origin_change,
                direct=bool(self.meta_listen), fence=term.check if term else None,
                epoch=term.epoch if term else 0, shared_lock=term is not None))
        self.merger = admin.MergeRunner(self.opened.service)
        try:
            if self.meta_path is not None or self.meta_listen:
                svc = self.opened.service
                uuid = bytes.fromhex(svc.status().uuid or "") or bytes(16)
                self.meta = MetadataServer(svc, uuid, self.generation, expect=self.expect,
                                           grace=self.grace)
                if self.meta_path is not None:
                    self.meta.listen(self.meta_path)
                for uri in self.meta_listen:
                    kind, where = parse_listen(uri)
                    if kind != "tcp":
                        raise InvalidArgument(f"--metadata-listen {uri}: use tcp:HOST:PORT "
                                              "(workers on this host use a unix socket "
                                              "of their own)")
                    try:
                        self.meta_addresses.append(
                            self.meta.listen_tcp(where[0] or "", where[1], context))
                    except OSError as e:
                        raise ListenError(uri, e.strerror or str(e), e.errno) from None
                # Nothing writes (the control socket's commands, the merge) before the
                # workers of the server that died uploaded the locks they hold.
                await loop.run_in_executor(None, self.meta.wait_recovered)
            control = ControlServer(self.control_path, self._handle)
            await control.start()
            self.control = control  # only now is the socket ours to remove
            addresses = list(self.advertise)
            if self.listen:
                executor = ThreadPoolExecutor(IO_THREADS, thread_name_prefix="ddsnap-io")
                svc = self.opened.service
                self.nbd = NbdServer(Exports(svc, svc.data, self.opened.degraded), executor,
                                     max_reply_memory=self.max_reply_memory,
                                     on_idle=release_memory)
                await self.nbd.start(self.listen)
                addresses += self.nbd.addresses
            with open(self._registry_file + ".tmp", "w") as f:
                json.dump({"pid": os.getpid(), "store": self.store_path,
                           "control": os.path.abspath(self.control_path),
                           "listen": addresses, "metadata": self.meta_addresses}, f)
            os.replace(self._registry_file + ".tmp", self._registry_file)
            if not self.opened.degraded:
                self.merger.ensure()  # a merge cut short by --stop, a restart or a crash resumes
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        """Stop listening, drain connections, commit and close the store."""
        if self.nbd is not None:
            await self.nbd.close()
            if self.nbd.executor is not None:
                self.nbd.executor.shutdown(wait=True)
            self.nbd = None
        if self.control is not None:
            await self.control.close()
            self.control = None
        if self.meta is not None:
            meta, self.meta = self.meta, None
            await asyncio.get_running_loop().run_in_executor(None, meta.close)
        self._unregister()
        if self.merger is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.merger.stop)
        if self.opened is not None:
            opened, self.opened = self.opened, None
            await asyncio.get_running_loop().run_in_executor(None, opened.close)

    def _unregister(self) -> None:
        """Remove the registry entry if it is still this process's (a cluster's next
        server, on the same machine in tests, may have replaced it)."""
        try:
            with open(self._registry_file) as f:
                mine = json.load(f).get("pid") == os.getpid()
        except (OSError, ValueError):
            return
        if mine:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._registry_file)

    async def published_nodes(self) -> list[dict] | None:
        """The nodes on other hosts, and the lost ones whose holdings are kept, as a
        cluster's server publishes them (None before the metadata server runs)."""
        meta = self.meta
        return None if meta is None else remote_nodes(meta.nodes(), meta.lapsed())

    async def run(self, on_ready=None) -> None:
        """Serve until SIGINT or SIGTERM."""
        await self.start()
        try:
            with stop_on_signals(self._stop):
                if on_ready is not None:
                    on_ready(self)
                await self._stop.wait()
        finally:
            await self.stop()


@contextlib.contextmanager
def stop_on_signals(stop: asyncio.Event):
    """While inside, SIGINT and SIGTERM set ``stop`` (on the running event loop)."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        yield
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def remote_nodes(nodes: list[dict], lapsed: Iterable[str]) -> list[dict]:
    """What a cluster's server publishes of its nodes: those on TCP (``nodes`` as the
    metadata server lists them: this host's workers are on unix sockets), then the
    ``lapsed`` names as ``{"name": NAME, "lapsed": True}``."""
    out = [n for n in nodes if n.get("peer") != "unix"]
    return out + [{"name": name, "lapsed": True} for name in sorted(lapsed)]


def find_server(store_path: str) -> str | None:
    """The control socket of the process serving ``store_path``, if one is recorded."""
    try:
        with open(admin.registry_path(store_path)) as f:
            info = json.load(f)
        return info.get("control")
    except (OSError, ValueError):
        default = admin.default_control_path(store_path)
        return default if os.path.exists(default) else None


#: seconds a cluster's new server waits for the nodes of the last one to upload their
#: locks (every node it was told of, or this long): part of the failover time
CLUSTER_GRACE = 5.0
#: seconds between updates of the node list a cluster's server publishes in etcd
NODE_LIST_INTERVAL = 1.0


class ClusterMember(Protocol):
    """What :func:`run_cluster` serves once elected: a :class:`Daemon` (``serve --etcd
    --workers 0``) or a supervisor of a metadata server child and workers."""

    async def start(self) -> Any: ...

    async def stop(self) -> None: ...

    async def published_nodes(self) -> list[dict] | None: ...


async def run_cluster(make: Callable[[Term, list[str]], ClusterMember],
                      meta_listen: list[str], store_path: str, etcd: str, cluster: str,
                      ttl: float, on_standby=None, on_ready=None) -> None:
    """``serve STORE --etcd URL --cluster NAME``: stand by until this process wins the
    cluster's election, then serve (``make(term, expect)``: the won
    :class:`~ddsnap.election.Term`, and the names of the nodes the last server
    published, to wait for) until SIGINT or SIGTERM, or until the term is lost (not
    renewed in time, by this process's own clock).

    A lost term ends the process at once with ``Fenced``'s exit code (30), writing
    nothing more (every write already asks the term's fence; child processes that
    write read the same deadline, :class:`~ddsnap.election.SharedDeadline`): the next
    server recovers the journal, as after a crash.  Source: issue 12; etcd's election
    recipe.

    Raises:
        what the served member raises at start; InvalidArgument for a bad etcd URL or
        cluster name, or a metadata address nodes could not reach.
    """
    if not meta_listen or parse_listen(meta_listen[0])[1][1] == 0 or \
            not parse_listen(meta_listen[0])[1][0]:
        raise InvalidArgument("--etcd needs --metadata-listen tcp:HOST:PORT with the host's "
                              "own address and a fixed port: nodes find the server there")
    record = {"metadata": meta_listen[0], "host": socket.gethostname(), "pid": os.getpid(),
              "store": os.path.abspath(store_path)}
    elect = election.Election(etcd, cluster, record, ttl=ttl)
    stop = asyncio.Event()
    try:
        with stop_on_signals(stop):
            if on_standby is not None:
                on_standby(await election.leader(etcd, cluster))
            campaign = asyncio.ensure_future(elect.campaign())
            stopping = asyncio.ensure_future(stop.wait())
            await asyncio.wait([campaign, stopping], return_when=asyncio.FIRST_COMPLETED)
            if not campaign.done():
                campaign.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await campaign
                return
            stopping.cancel()
            term = campaign.result()
            lost = asyncio.ensure_future(elect.lost(term))
            expect = sorted({n["name"] for n in await election.nodes(etcd, cluster)})
            log.info("elected for cluster %s, epoch %d: waiting for %s", cluster,
                     term.epoch, ", ".join(expect) or "no node")
            member = make(term, expect)
            start = asyncio.ensure_future(member.start())
            await asyncio.wait([start, lost], return_when=asyncio.FIRST_COMPLETED)
            if lost.done():
                fenced_exit(term)
            info = await start  # (its error, if it failed)
            if on_ready is not None:
                on_ready(member, term, info)
            publisher = asyncio.ensure_future(_publish_nodes(etcd, cluster, term, member))
            stopping = asyncio.ensure_future(stop.wait())
            await asyncio.wait([stopping, lost], return_when=asyncio.FIRST_COMPLETED)
            if lost.done():
                fenced_exit(term)
            publisher.cancel()
            lost.cancel()
            await member.stop()
            with contextlib.suppress(DdsnapError, OSError):
                await elect.resign(term)
    finally:
        await elect.close()


def fenced_exit(term: Term | BorrowedTerm) -> None:
    """The term is lost: end the process now, writing nothing more (exit status 30)."""
    log.error("lost the cluster lease of epoch %d (not renewed in time, or another "
              "server was elected): stopping at once, writing nothing more", term.epoch)
    logging.shutdown()
    os._exit(Fenced.exit_code)


async def _publish_nodes(etcd: str, cluster: str, term: Term,
                         member: ClusterMember) -> None:
    """Keep the nodes attached to this server (what ``nodes`` says of each) and the
    lost ones whose holdings it keeps in etcd: for ``cluster status``, and for the next
    server to wait for their uploads."""
    published: list[dict] | None = None
    while True:
        try:
            nodes = await member.published_nodes()
        except (DdsnapError, OSError) as e:
            log.warning("could not list the nodes: %s", e)
            nodes = None
        if nodes is not None and nodes != published:
            try:
                await election.publish_nodes(etcd, cluster, term, nodes)
                published = nodes
            except (DdsnapError, OSError) as e:
                log.warning("could not publish the node list in etcd: %s", e)
        await asyncio.sleep(NODE_LIST_INTERVAL)
