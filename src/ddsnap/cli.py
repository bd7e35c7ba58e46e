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
from .errors import DdsnapError, InvalidArgument, StoreBusy, StoreExists, StoreNotFound
from .store.blockdev import FileDevice
from .store.memory import check_geometry
from .store.shared import SharedStore, read_superblock

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def _size(text: str, what: str) -> int:
    try:
        return parse_size(text, binary=True)
    except InvalidSize:
        raise InvalidArgument(f"{what} {text!r} is not a size (try 64K, 1M, 10G)") from None


def _call(store: str, op: str, **args):
    """Run ``op`` on a local store, or through the control socket of its server."""
    if not os.path.exists(store):
        raise StoreNotFound(store)
    try:
        opened = admin.open_store(store)
    except StoreBusy:
        from .daemon import find_server

        path = find_server(store)
        if path is None:
            raise
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
@click.option("--force", is_flag=True, help="Overwrite an existing ddsnap store.")
def init(store, origin, size, chunk_size, max_snapshots, force):
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
    table = Table("name", "id", "created", "read-only", box=None)
    for s in snaps:
        table.add_row(s["name"], str(s["id"]), s["created"], "yes" if s["read_only"] else "no")
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
@click.option("-v", "--verbose", is_flag=True, help="Log connections and errors.")
def serve(store, listen, control_path, verbose):
    """Serve the origin and every snapshot of STORE over NBD."""
    from .daemon import Daemon

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="ddsnap: %(message)s")
    if not os.path.exists(store):
        raise StoreNotFound(store)
    d = Daemon(store, list(listen) or ["tcp:127.0.0.1:10809"], control_path)

    def ready(daemon):
        n = len(daemon.opened.service.snapshots())
        err.print(f"serving {store}: origin and {n} snapshot(s) on "
                  f"{', '.join(daemon.nbd.addresses)}; control socket {daemon.control_path}",
                  markup=False)

    try:
        asyncio.run(d.run(ready))
    except OSError as e:
        raise DdsnapError(f"cannot listen on {', '.join(d.listen)}: "
                          f"{os.strerror(e.errno) if e.errno else e}") from None


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
        ("snapshots", f"{len(st['snapshots'])} of {st['max_snapshots']}"),
    ]
    for k, v in rows:
        out.print(f"{k:>10}: {v}", markup=False)
    for s in st["snapshots"]:
        out.print(f"{'':>10}  {s['name']} (id {s['id']}, {s['created']}"
                  f"{', read-only' if s['read_only'] else ''})", markup=False)


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
