"""The commands on a store as a whole: ``init``, ``status``, ``set``, ``resize``,
``check`` and ``upgrade``.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys

import click
from humanfriendly import format_size

from .. import admin, control
from ..errors import (
    DdsnapError,
    DirectoryNotFound,
    InvalidArgument,
    StoreBusy,
    StoreExists,
    StoreNotFound,
)
from ..store.blockdev import FileDevice
from ..store.model import FULL_POLICIES, check_geometry
from ..store.shared import SharedStore
from ..store.superblock import read_superblock
from ..units import human_bytes, parse_size
from .common import (
    Choice,
    ask,
    call,
    call_where,
    can_ask,
    command_timeout,
    err,
    merge_line,
    out,
    shown,
    shown_size,
)


@click.command()
@click.argument("store")
@click.option("--origin", required=True, metavar="ORIGIN",
              help="The volume to snapshot (file or block device).")
@click.option("--size", metavar="SIZE",
              help="Size of a new STORE file, e.g. 10G (default: the origin's size).")
@click.option("--chunk-size", default="64K", show_default=True, metavar="SIZE",
              help="Copy-on-write unit, a power of two from 4K to 1M.")
@click.option("--max-snapshots", default="0", show_default=True, metavar="N",
              help="Most snapshots the store may hold; 0 for no limit.")
@click.option("--full-policy", type=Choice(FULL_POLICIES), default="error",
              show_default=True, help="When the store is full: fail the write (ENOSPC) or "
                                      "delete the oldest snapshot.")
@click.option("--force", is_flag=True, help="Overwrite an existing ddsnap store.")
@click.option("-y", "--yes", is_flag=True,
              help="With --force: do not ask before overwriting a store.")
def init(store, origin, size, chunk_size, max_snapshots, full_policy, force, yes):
    """Create snapshot store STORE for ORIGIN."""
    if not os.path.exists(origin):
        raise StoreNotFound(origin, "origin")
    if os.path.exists(store) and os.path.samefile(store, origin):
        raise InvalidArgument(f"the store {store} and the origin {origin} are the same file")
    try:
        max_snaps = int(max_snapshots)
    except ValueError:
        raise InvalidArgument(f"--max-snapshots {max_snapshots!r} is not a number") from None
    chunk = parse_size(chunk_size, "--chunk-size")
    if chunk < 4096 or chunk > 1 << 20 or chunk & (chunk - 1):
        raise InvalidArgument(f"--chunk-size {human_bytes(chunk)} is not a power of two "
                              "from 4 KiB to 1 MiB")
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
        parent = os.path.dirname(os.path.abspath(store))
        if not os.path.isdir(parent):
            if os.path.exists(parent):
                raise InvalidArgument(f"{parent} is not a directory")
            raise DirectoryNotFound(parent)
        ssize = parse_size(size, "--size") if size is not None else osize
        try:
            dev = FileDevice(store, create_size=ssize)
        except OSError as e:  # e.g. EFBIG: bigger than the filesystem allows
            if os.path.exists(store):
                os.unlink(store)
            raise InvalidArgument(f"cannot create {store} of {human_bytes(ssize)}: "
                                  f"{e.strerror or e}") from None
    try:
        if not dev.lock_exclusive():
            raise StoreBusy(f"snapshot store {store} is in use by another ddsnap process")
        try:
            old = read_superblock(dev)
        except DdsnapError:
            old = None
        if old is not None:
            if not force:
                raise StoreExists(store)
            if can_ask(yes):
                ask(f"{shown(store)} holds a ddsnap snapshot store (origin "
                     f"{shown(old.origin_path)}): overwrite it, losing every snapshot in "
                     "it?", f"{store} not overwritten")
        with _init_progress() as progress:
            s = SharedStore.create(dev, osize, os.path.realpath(origin), chunk, max_snaps,
                                   progress=progress)
        s.set_full_policy(full_policy)
        odev = FileDevice(origin, writable=False, what="origin")
        try:
            s.sb.identity = admin.origin_identity(odev)
        finally:
            odev.close()
        space = s.space()
        s.close()
        store_size = dev.size
    except BaseException:
        if created:  # a refused init leaves nothing behind
            os.unlink(store)
        raise
    finally:
        dev.close()
    out.print(f"created snapshot store {shown(store)} for origin {shown(origin)} "
              f"({format_size(osize, binary=True)}): {space['chunks_free']} free chunks of "
              f"{format_size(chunk, binary=True)}"
              + (f", up to {max_snaps} snapshots" if max_snaps else ", no snapshot limit"))
    if store_size < osize:
        err.print(f"ddsnap: warning: the store is smaller than its origin: "
                  f"{human_bytes(store_size)} against {human_bytes(osize)}; it can fill up before "
                  "every origin chunk has been copied out once, and then writes fail (or, "
                  "with --full-policy delete-oldest, the oldest snapshots are deleted)")


@contextlib.contextmanager
def _init_progress():
    """A progress bar on stderr while ``SharedStore.create`` writes the metadata, on a
    terminal only (a big store has a big allocation bitmap: 8192 blocks per TiB).
    Yields the ``progress(done, total)`` callback."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    task = None
    with Progress(TextColumn("writing metadata"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("blocks"), console=err, transient=True,
                  disable=not err.is_terminal) as bar:
        def update(done: int, total: int) -> None:
            nonlocal task
            if task is None:
                task = bar.add_task("init", total=total)
            bar.update(task, completed=done)

        yield update


@click.command()
@click.argument("store")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def status(store, as_json):
    """Show STORE's geometry, space and snapshots."""
    st, served = call_where(store, "status")
    if as_json:
        click.echo(json.dumps(st, indent=2))
        return
    cs = st["chunk_size"]
    rows = [
        ("store", f"{shown(st['store'])} ({format_size(st['store_size'], binary=True)})"),
        ("origin", f"{shown(st['origin'])} ({format_size(st['origin_size'], binary=True)})"),
        ("served", "yes" if st["served"] else "no"),
        ("chunk size", format_size(cs, binary=True)),
        ("chunks", f"{st['chunks_used']} used, {st['chunks_free']} free of {st['chunks_total']}"),
        ("space", f"{shown_size(st['used'])} used, {shown_size(st['free'])} free"),
        ("snapshots", f"{len(st['snapshots'])}" + (f" of {st['max_snapshots']}"
                                                   if st["max_snapshots"] else "")),
        ("when full", st["full_policy"]),
    ]
    for k, v in rows:
        out.print(f"{k:>10}: {v}")
    for s in st["snapshots"]:
        size = s.get("size")
        resized = f", {shown_size(size)}" if size and size != st["origin_size"] else ""
        out.print(f"{'':>10}  {shown(s['name'])} (id {s['id']}, {s['created']}{resized}"
                  f"{', read-only' if s['read_only'] else ''}; {shown_size(s.get('exclusive'))} "
                  f"exclusive, {shown_size(s.get('shared'))} shared)")
    if st.get("merge"):
        out.print(f"{'merge':>10}: {merge_line(st['merge'], served)}")
    for d in st.get("auto_deleted", []):
        out.print(f"{'deleted':>10}: {shown(d['name'])} at {d['deleted']} to make room "
                  "(full-policy=delete-oldest)")
    r = st.get("receive")
    if r:
        out.print(f"{'receive':>10}: {shown(r['snapshot'])} stopped at "
                  f"{shown_size(r['applied'])} of {shown_size(r['size'])}; go on with "
                  f"ddsnap receive {store} --resume {r['token']} (or --abort)")
    if st.get("metadata"):
        out.print(f"{'metadata':>10}: {', '.join(st['metadata'])}")
    for n in st.get("nodes", []):
        out.print(f"{'node':>10}: {n['node']} {shown(n['name'])} from {n['peer']}: "
                  f"{n['read_locks']} read lock(s), {n['origin_writes']} origin write(s)"
                  f"{', grants' if n['granted'] else ''}")
    for name, count in (st.get("lapsed") or {}).items():
        out.print(f"{'lost':>10}: {shown(name)}: what it held is kept for its return "
                  f"({count} connection(s))")


@click.command("set")
@click.argument("store")
@click.argument("setting", metavar="full-policy=error|delete-oldest")
def set_(store, setting):
    """Change a setting of STORE: full-policy=error|delete-oldest."""
    key, eq, value = setting.partition("=")
    if not eq:
        raise InvalidArgument(f"expected KEY=VALUE, not {setting!r}")
    if key.strip() == "origin":
        if not os.path.exists(store):
            raise StoreNotFound(store)
        res = admin.set_origin(store, value.strip())
        out.print(f"origin = {res['origin']}", markup=False)
        return
    call(store, "set", key=key.strip(), value=value.strip())
    out.print(f"{shown(key.strip())} = {shown(value.strip())}")


@click.command()
@click.argument("store")
@click.option("--origin-size", help="New size of the origin (e.g. 20G); a file grows or "
                                    "shrinks, a block device must have grown already.")
@click.option("--store-size", help="New size of the snapshot store (whole chunks).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def resize(store, origin_size, store_size, as_json):
    """Grow (or shrink) the origin and/or the snapshot store of STORE, served or not.

    Snapshots keep their size; new snapshots and NBD connections opened afterwards see
    the new origin size.  A shrink is refused while something lives past the new end."""
    args = {}
    if origin_size is not None:
        args["origin_size"] = parse_size(origin_size, "--origin-size")
    if store_size is not None:
        args["store_size"] = parse_size(store_size, "--store-size")
    res = call(store, "resize", **args)
    if as_json:
        click.echo(json.dumps(res, indent=2))
        return
    if "origin" in res:
        o = res["origin"]
        out.print(f"origin: {shown_size(o['old_size'])} -> {shown_size(o['origin_size'])}",
                  markup=False)
    if "store" in res:
        st = res["store"]
        out.print(f"store: {shown_size(st['old_size'])} -> {shown_size(st['store_size'])} "
                  f"({st['chunks_total']} chunks for data and metadata)", markup=False)


@click.command()
@click.argument("store")
@click.option("--json", "as_json", is_flag=True, help="Print findings as JSON.")
@click.option("--repair", is_flag=True,
              help="Fix leaks, damaged or stale superblock slots and space accounting "
                   "(nothing else), saying what first; the store must not be served.")
def check(store, as_json, repair):
    """Check STORE's metadata, read-only; exit 0 only if nothing fatal is found.

    A store nobody serves is checked without writing anything (its journal is replayed
    in memory); a served one through its server.
    """
    from ..errors import CorruptMetadata

    if not os.path.exists(store):
        raise StoreNotFound(store)
    if repair:
        report = admin.repair_store(store, lambda text: err.print(f"repair: {text}",
                                                                   markup=False))
    else:
        try:
            report = admin.inspect_store(store)
        except StoreBusy:
            from ..daemon import find_server

            path = find_server(store)
            if path is None:
                raise
            try:
                report = control.call(path, "check", timeout=command_timeout())
            except CorruptMetadata as e:
                from ..store.model import Finding

                report = admin.findings_report([Finding("fatal", getattr(e, "block", None),
                                                        getattr(e, "why", str(e)))])
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        for f in report["findings"]:
            where = f" (block {f['block']})" if f["block"] is not None else ""
            out.print(f"{f['severity']}{where}: {shown(f['message'])}")
        out.print("store is clean" if report["clean"] else
                  f"{report['fatal']} fatal finding(s)")
    if not report["clean"]:
        sys.exit(CorruptMetadata.exit_code)


@click.command()
@click.argument("store")
@click.option("--origin", metavar="ORIGIN",
              help="The origin, if it is not where STORE records it.  Read only when the "
                   "conversion must copy some of its chunks (after a merge made by "
                   "ddsnap 0.2); never written.")
def upgrade(store, origin):
    """Convert STORE from format v1 (ddsnap 0.1) or v2 (ddsnap 0.2) to the current
    format, in place.

    STORE must not be served.  A store that was not shut down cleanly is recovered from
    its journal first.  If the upgrade is interrupted (a crash, a power cut), run it
    again: the store is either converted already or converted from the start.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from ..store.format import VERSION
    from ..store.upgrade import upgrade_store

    if not os.path.exists(store):
        raise StoreNotFound(store)
    if origin is not None and not os.path.exists(origin):
        raise StoreNotFound(origin, "origin")
    dev = FileDevice(store)
    try:
        if not dev.lock_exclusive():
            raise StoreBusy(f"snapshot store {store} is in use by another ddsnap process")
        # A bar on stderr on a terminal only: reading the old tree, then writing the new
        # one (the total grows once the conversion knows what it writes).
        with Progress(TextColumn("upgrading"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("blocks"), console=err, transient=True,
                      disable=not err.is_terminal) as bar:
            task = bar.add_task("upgrade", total=None)

            def progress(done: int, total: int) -> None:
                bar.update(task, completed=done, total=total)

            r = upgrade_store(dev, origin=os.path.realpath(origin) if origin else None,
                              progress=progress)
    finally:
        dev.close()
    extra = ""
    if r.dropped_snapshots:
        extra = (f"; {r.dropped_snapshots} snapshot(s) being deleted were dropped, with "
                 f"{r.dropped_exceptions} exception(s) only they used")
    out.print(f"upgraded {shown(store)} from format v{r.from_version} to v{VERSION}: "
              f"{r.snapshots} snapshot(s), {r.exceptions} exception(s), {r.copies} "
              f"chunk(s) copied{extra}")
