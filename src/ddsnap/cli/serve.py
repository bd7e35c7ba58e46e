"""``ddsnap serve``: serve the origin and every snapshot of a store over NBD."""

from __future__ import annotations

import asyncio
import logging
import os

import click

from ..errors import DdsnapError, InvalidArgument, StoreNotFound
from ..units import parse_size
from .common import err


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
def serve(store, listen, control_path, max_reply_memory, verbose, force_degraded,
          accept_origin_change, workers):
    """Serve the origin and every snapshot of STORE over NBD."""
    from ..daemon import Daemon, tune_malloc

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="ddsnap: %(message)s")
    reply_memory = parse_size(max_reply_memory, "--max-reply-memory")
    if reply_memory < 1:
        raise InvalidArgument("--max-reply-memory must be more than 0")
    if not os.path.exists(store):
        raise StoreNotFound(store)
    if workers is None:
        workers = len(os.sched_getaffinity(0))
    if workers:
        _serve_workers(store, list(listen) or ["tcp:127.0.0.1:10809"], control_path,
                       reply_memory, verbose, force_degraded, accept_origin_change, workers)
        return
    d = Daemon(store, list(listen) or ["tcp:127.0.0.1:10809"], control_path,
               max_reply_memory=reply_memory, degraded=force_degraded,
               accept_origin_change=accept_origin_change)
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
                  f"{', '.join(daemon.nbd.addresses)}; control socket {daemon.control_path}",
                  markup=False)

    try:
        asyncio.run(d.run(ready))
    except OSError as e:
        # listen and control socket failures are ListenError / ControlPathError; this
        # is anything else the system refused (the run directory, ...)
        where = f" ({e.filename})" if e.filename else ""
        raise DdsnapError(f"cannot serve {store}: {e.strerror or e}{where}") from None


def _serve_workers(store, listen, control_path, reply_memory, verbose, force_degraded,
                   accept_origin_change, workers) -> None:
    """``serve --workers N``: the supervisor of a metadata server and N workers."""
    from ..workers import Supervisor

    sup = Supervisor(store, listen, workers, control_path, reply_memory, force_degraded,
                     accept_origin_change, verbose)

    def ready(sup: Supervisor, info: dict) -> None:
        if force_degraded:
            err.print(f"serving {store} DEGRADED and read-only (--force-degraded): damage: "
                      f"{info.get('damage') or 'none found in the journal'}", markup=False)
        err.print(f"serving {store} with {workers} worker process(es): origin and "
                  f"{info.get('snapshots', 0)} snapshot(s) on {', '.join(sup.addresses)}; "
                  f"control socket {info.get('control')}", markup=False)

    try:
        asyncio.run(sup.run(ready))
    except OSError as e:
        where = f" ({e.filename})" if e.filename else ""
        raise DdsnapError(f"cannot serve {store}: {e.strerror or e}{where}") from None
