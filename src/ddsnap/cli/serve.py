"""``ddsnap serve``: serve the origin and every snapshot of a store over NBD;
``ddsnap attach``: serve them from another host, as a node of that server."""

from __future__ import annotations

import asyncio
import logging
import os

import click

from ..errors import DdsnapError, InvalidArgument, StoreNotFound
from ..units import parse_size
from .common import err


def etcd_options(fn):
    """``--etcd URL --cluster NAME`` (``serve``, ``attach``, ``cluster status``)."""
    fn = click.option("--cluster", metavar="NAME",
                      help="The cluster's name in etcd (with --etcd).")(fn)
    return click.option("--etcd", metavar="URL",
                        help="etcd endpoint (http://HOST:PORT) where the cluster's "
                             "metadata servers hold their election.")(fn)


def tls_options(fn):
    """The TLS options of the metadata port (``serve`` and ``attach``)."""
    for opt in reversed([
        click.option("--tls-ca", type=click.Path(dir_okay=False),
                     help="PEM file of the cluster's CA: the peer's certificate must be "
                          "signed by it."),
        click.option("--tls-cert", type=click.Path(dir_okay=False),
                     help="PEM file of this host's certificate (signed by the CA)."),
        click.option("--tls-key", type=click.Path(dir_okay=False),
                     help="PEM file of this host's private key."),
        click.option("--insecure", is_flag=True,
                     help="Metadata protocol over TCP in plain text, with no "
                          "authentication: only on a network nobody else reaches."),
    ]):
        fn = opt(fn)
    return fn


def _tls_files(ca, cert, key, insecure: bool, tcp: bool, what: str):
    """``(ca, cert, key)``, or None for ``--insecure``; InvalidArgument for a set that
    does not make sense (TCP with neither, some of the three, both)."""
    given = [x for x in (ca, cert, key) if x]
    if given and insecure:
        raise InvalidArgument("--insecure and --tls-* exclude each other")
    if given and len(given) < 3:
        raise InvalidArgument("TLS needs all of --tls-ca, --tls-cert and --tls-key")
    if given and not tcp:
        raise InvalidArgument(f"--tls-* are for {what}")
    if tcp and not given and not insecure:
        raise InvalidArgument(
            f"{what} over TCP needs TLS with client certificates (--tls-ca, --tls-cert, "
            "--tls-key), or --insecure on a network nobody else reaches")
    return (ca, cert, key) if given else None


@click.command()
@click.argument("store")
@click.option("--listen", multiple=True,
              help="unix:PATH or tcp:HOST:PORT; may repeat [default: tcp:127.0.0.1:10809]")
@click.option("--control", "control_path", help="Control socket path [default: STORE.ctl].")
@click.option("--max-reply-memory", default="256M", show_default=True,
              help="Memory held for replies clients have not read, over all connections; "
                   "past it, connections whose replies wait are not read from.")
@click.option("-v", "--verbose", is_flag=True,
              help="Log each connection as it ends and each error answered to a client.")
@click.option("--force-degraded", is_flag=True,
              help="Serve a store whose metadata is damaged, read-only: what only damaged "
                   "metadata maps reads as EIO.")
@click.option("--accept-origin-change", is_flag=True,
              help="Serve even though the origin changed while nobody served the store "
                   "(snapshots may then read the new data).")
@click.option("--workers", type=click.IntRange(0, 256), default=None,
              show_default="as many as CPUs this process may run on",
              help="Worker processes serving NBD, each doing its own data I/O and asking "
                   "a metadata server process for mappings and locks (the csnap "
                   "protocol); 0: one process does everything.")
@click.option("--metadata-listen", "meta_listen", multiple=True, metavar="tcp:HOST:PORT",
              help="Also serve the metadata protocol to nodes on other hosts (ddsnap "
                   "attach) on this address; needs --tls-ca/--tls-cert/--tls-key or "
                   "--insecure. The origin and store are then opened with O_DIRECT.")
@tls_options
@etcd_options
@click.option("--lease-ttl", default=5.0, show_default=True, metavar="SECONDS",
              type=click.FloatRange(1.0, 600.0),
              help="With --etcd: the election lease; a server that cannot renew it "
                   "within this time stops writing, and a standby takes over.")
def serve(store, listen, control_path, max_reply_memory, verbose, force_degraded,
          accept_origin_change, workers, meta_listen, tls_ca, tls_cert, tls_key, insecure,
          etcd, cluster, lease_ttl):
    """Serve the origin and every snapshot of STORE over NBD.

    With --etcd and --cluster, this host is one of the cluster's metadata servers: it
    stands by until it wins the election, then serves; another takes over when it dies.
    """
    from ..daemon import Daemon, tune_malloc

    tls = _tls_files(tls_ca, tls_cert, tls_key, insecure, bool(meta_listen),
                     "--metadata-listen")

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="ddsnap: %(message)s")
    reply_memory = parse_size(max_reply_memory, "--max-reply-memory")
    if reply_memory < 1:
        raise InvalidArgument("--max-reply-memory must be more than 0")
    if not os.path.exists(store):
        raise StoreNotFound(store)
    if bool(etcd) != bool(cluster):
        raise InvalidArgument("--etcd and --cluster go together")
    if workers is None:
        workers = len(os.sched_getaffinity(0))
    if etcd:
        if not meta_listen:
            raise InvalidArgument("--etcd needs --metadata-listen tcp:HOST:PORT (where "
                                  "nodes reach this server when it is elected)")
        tune_malloc()
        _serve_cluster(store, listen, control_path, reply_memory, verbose, force_degraded,
                       accept_origin_change, workers, list(meta_listen), tls, etcd,
                       cluster, lease_ttl)
        return
    if workers:
        _serve_workers(store, list(listen) or ["tcp:127.0.0.1:10809"], control_path,
                       reply_memory, verbose, force_degraded, accept_origin_change, workers,
                       list(meta_listen), tls)
        return
    d = Daemon(store, list(listen) or ["tcp:127.0.0.1:10809"], control_path,
               max_reply_memory=reply_memory, degraded=force_degraded,
               accept_origin_change=accept_origin_change, meta_listen=list(meta_listen),
               tls=tls)
    tune_malloc()

    def ready(daemon):
        n = len(daemon.opened.service.snapshots())
        scan = daemon.opened.store.journal_scan
        if daemon.opened.degraded:
            damage = "; ".join(str(e) for e in scan.damage) if scan and scan.damage else \
                "none found in the journal"
            err.print(f"serving {store} DEGRADED and read-only (--force-degraded): damage: "
                      f"{damage}", markup=False)
        err.print(f"serving {store}: origin and {n} snapshot(s) on "
                  f"{', '.join(daemon.nbd.addresses)}; control socket {daemon.control_path}"
                  f"{_metadata_note(daemon.meta_addresses, tls)}", markup=False)

    try:
        asyncio.run(d.run(ready))
    except OSError as e:
        # listen and control socket failures are ListenError / ControlPathError; this
        # is anything else the system refused (the run directory, ...)
        where = f" ({e.filename})" if e.filename else ""
        raise DdsnapError(f"cannot serve {store}: {e.strerror or e}{where}") from None


def _serve_cluster(store, listen, control_path, reply_memory, verbose, force_degraded,
                   accept_origin_change, workers, meta_listen, tls, etcd, cluster,
                   ttl) -> None:
    """``serve --etcd URL --cluster NAME``: a metadata server of a cluster; once
    elected, one process serving (``--workers 0``) or a metadata server child and
    ``workers`` workers under the term this process holds."""
    from ..daemon import CLUSTER_GRACE, Daemon, run_cluster
    from ..workers import Supervisor

    listen = list(listen) or ["tcp:127.0.0.1:10809"]

    def make(term, expect):
        if workers:
            return Supervisor(store, listen, workers, control_path, reply_memory,
                              force_degraded, accept_origin_change, verbose,
                              meta_listen=meta_listen, tls=tls, term=term, expect=expect)
        d = Daemon(store, listen, control_path, max_reply_memory=reply_memory,
                   degraded=force_degraded, accept_origin_change=accept_origin_change,
                   meta_listen=meta_listen, tls=tls, term=term, expect=expect)
        d.grace = CLUSTER_GRACE
        return d

    def standby(leader: dict | None) -> None:
        now = (f"current server {leader.get('host')} (epoch {leader.get('epoch')})"
               if leader else "no server elected yet")
        err.print(f"standing by for cluster {cluster} ({now})", markup=False)

    def ready(member, term, info) -> None:
        if workers:
            n, addresses = info.get("snapshots", 0), member.addresses
            control, metadata = info.get("control"), info.get("metadata") or []
            how = f" with {workers} worker process(es)"
        else:
            n = len(member.opened.service.snapshots())
            addresses, control = member.nbd.addresses, member.control_path
            metadata, how = member.meta_addresses, ""
        err.print(f"serving {store} for cluster {cluster} (epoch {term.epoch}){how}: origin "
                  f"and {n} snapshot(s) on {', '.join(addresses)}; control socket "
                  f"{control}{_metadata_note(metadata, tls)}", markup=False)

    try:
        asyncio.run(run_cluster(make, meta_listen, store, etcd, cluster, ttl, standby,
                                ready))
    except OSError as e:
        where = f" ({e.filename})" if e.filename else ""
        raise DdsnapError(f"cannot serve {store}: {e.strerror or e}{where}") from None


def _metadata_note(addresses: list[str], tls) -> str:
    if not addresses:
        return ""
    how = "TLS" if tls else "plain text, --insecure"
    return f"; metadata port {', '.join(addresses)} ({how})"


def _serve_workers(store, listen, control_path, reply_memory, verbose, force_degraded,
                   accept_origin_change, workers, meta_listen, tls) -> None:
    """``serve --workers N``: the supervisor of a metadata server and N workers."""
    from ..workers import Supervisor

    sup = Supervisor(store, listen, workers, control_path, reply_memory, force_degraded,
                     accept_origin_change, verbose, meta_listen=meta_listen, tls=tls)

    def ready(sup: Supervisor, info: dict) -> None:
        if force_degraded:
            err.print(f"serving {store} DEGRADED and read-only (--force-degraded): damage: "
                      f"{info.get('damage') or 'none found in the journal'}", markup=False)
        err.print(f"serving {store} with {workers} worker process(es): origin and "
                  f"{info.get('snapshots', 0)} snapshot(s) on {', '.join(sup.addresses)}; "
                  f"control socket {info.get('control')}"
                  f"{_metadata_note(info.get('metadata') or [], tls)}", markup=False)

    try:
        asyncio.run(sup.run(ready))
    except OSError as e:
        where = f" ({e.filename})" if e.filename else ""
        raise DdsnapError(f"cannot serve {store}: {e.strerror or e}{where}") from None


@click.command()
@click.argument("server", metavar="[SERVER]", required=False)
@click.option("--origin", required=True,
              help="This host's path of the origin device the server serves.")
@click.option("--store", required=True,
              help="This host's path of the snapshot store device the server serves.")
@click.option("--listen", multiple=True,
              help="unix:PATH or tcp:HOST:PORT; may repeat [default: tcp:127.0.0.1:10809]")
@click.option("--name", default=None, help="This node's name in the server's node list "
                                           "[default: the host name].")
@click.option("--max-reply-memory", default="256M", show_default=True,
              help="Memory held for replies clients have not read, per worker.")
@click.option("--reconnect", default=300.0, show_default=True, metavar="SECONDS",
              help="How long to keep trying to reach a metadata server that went away "
                   "(requests wait meanwhile), before failing them.")
@click.option("-v", "--verbose", is_flag=True, help="Log connections and errors.")
@click.option("--workers", type=click.IntRange(0, 256), default=None,
              show_default="as many as CPUs this process may run on",
              help="Worker processes serving NBD; 0: this process serves.")
@tls_options
@etcd_options
def attach(server, origin, store, listen, name, max_reply_memory, reconnect, verbose,
           workers, tls_ca, tls_cert, tls_key, insecure, etcd, cluster):
    """Serve the exports of the metadata server SERVER (tcp:HOST:PORT), or of the
    elected server of a cluster (--etcd URL --cluster NAME, followed across failovers),
    from this host.

    A client node: it opens the same origin and store devices (shared storage) with
    O_DIRECT, does every data read and write itself, and asks the server only for
    mappings and locks.
    """
    import socket

    from ..daemon import tune_malloc
    from ..workers import Attach, Supervisor, node_connector, run_node, store_uuid

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="ddsnap attach: %(message)s")
    if bool(etcd) != bool(cluster):
        raise InvalidArgument("--etcd and --cluster go together")
    if bool(server) == bool(etcd):
        raise InvalidArgument("give the metadata server (tcp:HOST:PORT) or --etcd URL "
                              "--cluster NAME, not both or neither")
    follow = (etcd, cluster) if etcd else None
    where = server or f"cluster {cluster}"
    tls = _tls_files(tls_ca, tls_cert, tls_key, insecure, True, "attach")
    reply_memory = parse_size(max_reply_memory, "--max-reply-memory")
    if reply_memory < 1:
        raise InvalidArgument("--max-reply-memory must be more than 0")
    for path, what in ((origin, "origin"), (store, "snapshot store")):
        if not os.path.exists(path):
            raise StoreNotFound(path, what)
    name = name or socket.gethostname()
    listen = list(listen) or ["tcp:127.0.0.1:10809"]
    if workers is None:
        workers = len(os.sched_getaffinity(0))

    def said(addresses: list[str], node: int | str) -> None:
        err.print(f"attached to {where} as node {node} ({name}): serving its origin and "
                  f"snapshots on {', '.join(addresses)}"
                  f"{' with ' + str(workers) + ' worker process(es)' if workers else ''}",
                  markup=False)

    try:
        if workers:
            sup = Supervisor(store, listen, workers, max_reply_memory=reply_memory,
                             verbose=verbose,
                             attach=Attach(server, origin, tls, name, reconnect, follow))
            asyncio.run(sup.run(lambda s, info: said(s.addresses, info.get("node", "?"))))
            return
        connect = node_connector(server, None, tls, follow)
        uuid = store_uuid(store)
        tune_malloc()
        asyncio.run(run_node(store, connect, name=name, origin_path=origin, uuid=uuid,
                             direct=True, reconnect=reconnect, listen=listen,
                             follow=follow,
                             max_reply_memory=reply_memory,
                             on_ready=lambda nbd, svc: said(nbd.addresses, svc.node)))
    except OSError as e:
        file = f" ({e.filename})" if e.filename else ""
        raise DdsnapError(f"cannot attach to {where}: {e.strerror or e}{file}") from None
