"""The ``ddsnap`` command line (click + rich).

Administrative commands work the same on a store nobody serves (they open it themselves)
and on a served one (they go through the server's control socket).  Every
:class:`~ddsnap.errors.DdsnapError` becomes one line on stderr and the error's own exit
code; no traceback.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys

import click
from humanfriendly import InvalidSize, format_size, parse_size
from rich.console import Console
from rich.table import Table

from . import admin, control
from .errors import from_dict as error_from_dict
from .errors import (DdsnapError, InvalidArgument, MergeInProgress, StoreBusy, StoreExists,
                     StoreNotFound)
from .store.blockdev import FileDevice
from .store.format import FULL_POLICIES
from .store.memory import check_geometry
from .store.shared import SharedStore, read_superblock

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def _size(text: str, what: str) -> int:
    try:
        return parse_size(text, binary=True)
    except InvalidSize:
        raise InvalidArgument(f"{what} {text!r} is not a size (try 64K, 1M, 10G)") from None


def _open_or_server(store: str):
    """Open ``store`` here, or find the server holding it.

    Returns ``(opened, None)`` or ``(None, control_socket_path)``.
    """
    if not os.path.exists(store):
        raise StoreNotFound(store)
    try:
        return admin.open_store(store), None
    except StoreBusy:
        from .daemon import find_server

        path = find_server(store)
        if path is None:
            raise
        return None, path


def _call(store: str, op: str, **args):
    """Run ``op`` on a local store, or through the control socket of its server."""
    opened, path = _open_or_server(store)
    if opened is None:
        return control.call(path, op, args)
    try:
        return admin.run_op(opened.service, op, args, opened.path, served=False)
    finally:
        opened.close()


def _fail(e: DdsnapError):
    err.print(f"ddsnap: {e}", markup=False)
    sys.exit(e.exit_code)


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except DdsnapError as e:
            _fail(e)


@click.group(cls=_Group)
@click.version_option(package_name="ddsnap")
def main():
    """ddsnap: many snapshots of a block volume in one shared copy-on-write store,
    served over NBD."""


@main.command()
@click.argument("store")
@click.option("--origin", required=True, help="The volume to snapshot (file or block device).")
@click.option("--size", help="Size of a new STORE file (default: the origin's size).")
@click.option("--chunk-size", default="64K", show_default=True,
              help="Copy-on-write unit, a power of two from 4K to 1M.")
@click.option("--max-snapshots", default="64", show_default=True,
              help="Sharemap width: a multiple of 64 up to 1024.")
@click.option("--full-policy", default="error", show_default=True,
              help="When the store is full: error (ENOSPC) or delete-oldest.")
@click.option("--force", is_flag=True, help="Overwrite an existing ddsnap store.")
def init(store, origin, size, chunk_size, max_snapshots, full_policy, force):
    """Create snapshot store STORE for ORIGIN."""
    if not os.path.exists(origin):
        raise StoreNotFound(origin, "origin")
    if os.path.exists(store) and os.path.samefile(store, origin):
        raise InvalidArgument(f"the store {store} and the origin {origin} are the same file")
    try:
        max_snaps = int(max_snapshots)
    except ValueError:
        raise InvalidArgument(f"--max-snapshots {max_snapshots!r} is not a number") from None
    chunk = _size(chunk_size, "--chunk-size")
    check_geometry(chunk, max_snaps)
    if full_policy not in FULL_POLICIES:
        raise InvalidArgument(f"--full-policy must be one of {', '.join(FULL_POLICIES)}")
    odev = FileDevice(origin, writable=False, what="origin")
    try:
        osize = odev.size
    finally:
        odev.close()
    if osize <= 0:
        raise InvalidArgument(f"the origin {origin} is empty")
    created = not os.path.exists(store)
    if not created:
        if size is not None:
            raise InvalidArgument(f"{store} exists; --size applies only to a new store file")
        dev = FileDevice(store)
    else:
        ssize = _size(size, "--size") if size is not None else osize
        dev = FileDevice(store, create_size=ssize)
    try:
        if not dev.lock_exclusive():
            raise StoreBusy(f"snapshot store {store} is in use by another ddsnap process")
        if not force:
            try:
                read_superblock(dev)
                raise StoreExists(store)
            except StoreExists:
                raise
            except DdsnapError:
                pass
        s = SharedStore.create(dev, osize, os.path.realpath(origin), chunk, max_snaps)
        s.set_full_policy(full_policy)
        space = s.space()
        s.close()
    except BaseException:
        if created:  # a refused init leaves nothing behind
            os.unlink(store)
        raise
    finally:
        dev.close()
    out.print(f"created snapshot store {store} for origin {origin} "
              f"({format_size(osize, binary=True)}): {space['chunks_free']} free chunks of "
              f"{format_size(chunk, binary=True)}, up to {max_snaps} snapshots")


@main.group(cls=_Group)
def snap():
    """Create, list and delete snapshots."""


@snap.command("create")
@click.argument("store")
@click.argument("name")
@click.option("--read-only", is_flag=True, help="Refuse writes to the snapshot.")
def snap_create(store, name, read_only):
    """Snapshot the origin of STORE as NAME (constant time)."""
    info = _call(store, "snap_create", name=name, read_only=read_only)
    out.print(f"created snapshot {info['name']} (id {info['id']}) at {info['created']}",
              markup=False)


@snap.command("list")
@click.argument("store")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
def snap_list(store, as_json):
    """List the snapshots in STORE, oldest first."""
    snaps = _call(store, "snap_list")
    if as_json:
        click.echo(json.dumps(snaps, indent=2))
        return
    table = Table("name", "id", "created", "read-only", "exclusive", "shared", box=None)
    for s in snaps:
        table.add_row(s["name"], str(s["id"]), s["created"], "yes" if s["read_only"] else "no",
                      _bytes(s.get("exclusive")), _bytes(s.get("shared")))
    out.print(table)


@snap.command("delete")
@click.argument("store")
@click.argument("name")
def snap_delete(store, name):
    """Delete snapshot NAME and free the space only it used."""
    _call(store, "snap_delete", name=name)
    out.print(f"deleted snapshot {name}", markup=False)


@main.command()
@click.argument("store")
@click.option("--listen", multiple=True,
              help="unix:PATH or tcp:HOST:PORT; may repeat [default: tcp:127.0.0.1:10809]")
@click.option("--control", "control_path", help="Control socket path [default: STORE.ctl].")
@click.option("--max-reply-memory", default="256M", show_default=True,
              help="Memory held for replies clients have not read, over all connections; "
                   "past it, connections whose replies wait are not read from.")
@click.option("-v", "--verbose", is_flag=True,
              help="Log each connection as it ends and each error answered to a client.")
def serve(store, listen, control_path, max_reply_memory, verbose):
    """Serve the origin and every snapshot of STORE over NBD."""
    from .daemon import Daemon, tune_malloc

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="ddsnap: %(message)s")
    reply_memory = _size(max_reply_memory, "--max-reply-memory")
    if reply_memory < 1:
        raise InvalidArgument("--max-reply-memory must be more than 0")
    if not os.path.exists(store):
        raise StoreNotFound(store)
    d = Daemon(store, list(listen) or ["tcp:127.0.0.1:10809"], control_path,
               max_reply_memory=reply_memory)
    tune_malloc()

    def ready(daemon):
        n = len(daemon.opened.service.snapshots())
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


@main.command()
@click.argument("store")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def status(store, as_json):
    """Show STORE's geometry, space and snapshots."""
    st = _call(store, "status")
    if as_json:
        click.echo(json.dumps(st, indent=2))
        return
    cs = st["chunk_size"]
    rows = [
        ("store", f"{st['store']} ({format_size(st['store_size'], binary=True)})"),
        ("origin", f"{st['origin']} ({format_size(st['origin_size'], binary=True)})"),
        ("served", "yes" if st["served"] else "no"),
        ("chunk size", format_size(cs, binary=True)),
        ("chunks", f"{st['chunks_used']} used, {st['chunks_free']} free of {st['chunks_total']}"),
        ("space", f"{_bytes(st['used'])} used, {_bytes(st['free'])} free"),
        ("snapshots", f"{len(st['snapshots'])} of {st['max_snapshots']}"),
        ("when full", st["full_policy"]),
    ]
    for k, v in rows:
        out.print(f"{k:>10}: {v}", markup=False)
    for s in st["snapshots"]:
        out.print(f"{'':>10}  {s['name']} (id {s['id']}, {s['created']}"
                  f"{', read-only' if s['read_only'] else ''}; {_bytes(s.get('exclusive'))} "
                  f"exclusive, {_bytes(s.get('shared'))} shared)", markup=False)
    if st.get("merge"):
        out.print(f"{'merge':>10}: {_merge_line(st['merge'])}", markup=False)
    for d in st.get("auto_deleted", []):
        out.print(f"{'deleted':>10}: {d['name']} at {d['deleted']} to make room "
                  "(full-policy=delete-oldest)", markup=False)


@main.command("set")
@click.argument("store")
@click.argument("setting")
def set_(store, setting):
    """Change a setting of STORE: full-policy=error|delete-oldest."""
    key, eq, value = setting.partition("=")
    if not eq:
        raise InvalidArgument(f"expected KEY=VALUE, not {setting!r}")
    _call(store, "set", key=key.strip(), value=value.strip())
    out.print(f"{key.strip()} = {value.strip()}", markup=False)


def _bytes(n) -> str:
    return "?" if n is None else format_size(n, binary=True)


def _merge_line(st: dict) -> str:
    eta = f", ETA {st['eta_seconds']:.0f} s" if st.get("eta_seconds") is not None else ""
    state = "running" if st.get("running") else "not running"
    return (f"merging snapshot {st['snapshot']} into the origin: {st['chunks_done']} of "
            f"{st['chunks_total']} chunks, {st['chunks_per_second']:.1f} chunks/s{eta} "
            f"({state})")


@main.command()
@click.argument("store")
@click.argument("name", required=False)
@click.option("--wait", is_flag=True, help="Wait until the merge completes.")
@click.option("--no-progress", is_flag=True, help="No progress bar while waiting.")
@click.option("--keep", is_flag=True, help="Keep NAME as a snapshot after the merge.")
@click.option("--status", "show_status", is_flag=True, help="Show the merge in progress.")
@click.option("--json", "as_json", is_flag=True, help="With --status: print JSON.")
@click.option("--stop", is_flag=True, help="Stop the merge (it resumes later).")
def merge(store, name, wait, no_progress, keep, show_status, as_json, stop):
    """Merge snapshot NAME into the origin of STORE: an online rollback.

    The origin reads as NAME at once and stays writable; NAME's chunks are copied in
    by the server in the background, or here with --wait if nobody serves STORE.
    """
    if show_status or stop:
        st = _call(store, "merge_stop" if stop else "merge_status")
        if as_json:
            click.echo(json.dumps(st, indent=2))
        elif st is None:
            out.print("no merge in progress")
        else:
            out.print(_merge_line(st), markup=False)
        return
    if not name:
        raise InvalidArgument("merge needs the snapshot NAME (or --status / --stop)")
    opened, path = _open_or_server(store)
    if opened is not None:
        try:
            st = admin.merge_start(opened.service, None, name, keep)
            if wait:
                _run_merge_here(opened, st, no_progress)
                out.print(f"merged snapshot {name} into the origin", markup=False)
            else:
                out.print(f"merge of {name} started; it runs when {store} is served "
                          "(or use --wait)", markup=False)
        finally:
            opened.close()
        return
    st = control.call(path, "merge_start", {"name": name, "keep": keep})
    if not wait:
        out.print(_merge_line(st), markup=False)
        return
    _wait_remote(path, st, no_progress)
    out.print(f"merged snapshot {name} into the origin", markup=False)


def _progress(no_progress: bool, total: int):
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeRemainingColumn)

    return Progress(TextColumn("merging"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("chunks"), TimeRemainingColumn(), console=err,
                    disable=no_progress or not err.is_terminal)


def _run_merge_here(opened, st: dict, no_progress: bool) -> None:
    with _progress(no_progress, st["chunks_total"]) as bar:
        task = bar.add_task("merge", total=st["chunks_total"])

        def step(s):
            if s is not None:
                bar.update(task, completed=s["chunks_done"])

        opened.service.run_merge(on_step=step)
        bar.update(task, completed=st["chunks_total"])


def _wait_remote(path: str, st: dict, no_progress: bool) -> None:
    import time

    with _progress(no_progress, st["chunks_total"]) as bar:
        task = bar.add_task("merge", total=st["chunks_total"])
        while True:
            s = control.call(path, "merge_status")
            if s is None:
                bar.update(task, completed=st["chunks_total"])
                return
            if not s["running"]:
                if s.get("error"):  # what stopped it, with its own exit code
                    raise error_from_dict(s["error"])
                raise MergeInProgress("the merge was stopped before it completed; "
                                      "`ddsnap merge STORE NAME` resumes it")
            bar.update(task, completed=s["chunks_done"], total=s["chunks_total"])
            time.sleep(0.2)


@main.command()
@click.argument("store")
@click.option("--json", "as_json", is_flag=True, help="Print findings as JSON.")
def check(store, as_json):
    """Check STORE's metadata; exit 0 only if nothing fatal is found."""
    from .errors import CorruptMetadata

    try:
        report = _call(store, "check")
    except CorruptMetadata as e:
        from .admin import findings_report
        from .store.api import Finding

        report = findings_report([Finding("fatal", getattr(e, "block", None),
                                          getattr(e, "why", str(e)))])
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        for f in report["findings"]:
            where = f" (block {f['block']})" if f["block"] is not None else ""
            out.print(f"{f['severity']}{where}: {f['message']}", markup=False)
        out.print("store is clean" if report["clean"] else
                  f"{report['fatal']} fatal finding(s)", markup=False)
    if not report["clean"]:
        sys.exit(CorruptMetadata.exit_code)


if __name__ == "__main__":
    main()
