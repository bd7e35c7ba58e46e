"""The ``ddsnap`` command line (click + rich).

Administrative commands work the same on a store nobody serves (they open it themselves)
and on a served one (they go through the server's control socket).  Every
:class:`~ddsnap.errors.DdsnapError` becomes one line on stderr and the error's own exit
code; no traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import sys

import click
from humanfriendly import format_size
from rich.console import Console
from rich.table import Table
from rich.text import Text

from . import admin, control
from .errors import (
    Cancelled,
    DdsnapError,
    DirectoryNotFound,
    InvalidArgument,
    MergeInProgress,
    SnapshotNotFound,
    StoreBusy,
    StoreExists,
    StoreNotFound,
)
from .errors import from_dict as error_from_dict
from .store.blockdev import FileDevice
from .store.model import FULL_POLICIES, check_geometry
from .store.shared import SharedStore
from .store.superblock import read_superblock
from .units import human_bytes, parse_size

# Names and paths are the user's text: never rich markup ("[red]x") or emoji codes
# (":smile:"), so both are off for every print.
out = Console(highlight=False, soft_wrap=True, markup=False, emoji=False)
err = Console(stderr=True, highlight=False, soft_wrap=True, markup=False, emoji=False)

#: seconds a command waits for a server to answer, unless ``--timeout`` says otherwise
DEFAULT_TIMEOUT = 30.0

#: ``-h`` as well as ``--help``, on every command (inherited by subcommands)
CONTEXT = {"help_option_names": ["-h", "--help"]}

_CONTROL_CHARS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _shown(text) -> str:
    """``text`` safe to print on a terminal: control characters as escapes (``\\x1b``),
    so a name from an older store, a path or an error message cannot move the cursor,
    change colours or split a line."""
    return _CONTROL_CHARS.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"),
                              str(text))


def _size(text: str, what: str) -> int:
    return parse_size(text, what)


class _Choice(click.Choice):
    """click.Choice (help shows ``[error|delete-oldest]``) with ddsnap's one-line error,
    exit 2: ``--full-policy must be one of error, delete-oldest``."""

    def convert(self, value, param, ctx):
        if value in self.choices:
            return value
        name = param.opts[0] if param is not None and param.opts else "value"
        raise InvalidArgument(f"{name} must be one of {', '.join(self.choices)}, "
                              f"not {value!r}")


def _timeout() -> float | None:
    """The ``--timeout`` in force (seconds; None: no limit)."""
    ctx = click.get_current_context(silent=True)
    t = (ctx.find_root().obj or {}).get("timeout", DEFAULT_TIMEOUT) if ctx else DEFAULT_TIMEOUT
    return t or None


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


def _call_where(store: str, op: str, **args):
    """Run ``op`` on a local store, or through the control socket of its server (waiting
    at most ``--timeout`` for it).  Returns ``(result, served)``."""
    opened, path = _open_or_server(store)
    if opened is None:
        return control.call(path, op, args, timeout=_timeout()), True
    try:
        return admin.run_op(opened.service, op, args, opened.path, served=False), False
    finally:
        opened.close()


def _call(store: str, op: str, **args):
    """Run ``op`` on a local store, or through the control socket of its server."""
    return _call_where(store, op, **args)[0]


def _can_ask(yes: bool) -> bool:
    """True if a confirmation question should be asked: no ``--yes``, and someone can see
    and answer it (stdin and stderr on a terminal).  Scripts and pipes are never asked."""
    return not yes and sys.stdin.isatty() and sys.stderr.isatty()


def _ask(question: str, refusal: str) -> None:
    """Ask ``question`` on the terminal (default: no).

    Raises:
        Cancelled: the answer was no (or end of input, or Ctrl-C); ``refusal`` says what
            was not done.
    """
    try:
        answer = click.confirm(question, default=False, err=True)
    except click.Abort:
        answer = False
        click.echo("", err=True)  # end the prompt's line
    if not answer:
        raise Cancelled(refusal)


def _fail(e: DdsnapError):
    err.print(f"ddsnap: {_shown(e)}")
    sys.exit(e.exit_code)


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except DdsnapError as e:
            _fail(e)


@click.group(cls=_Group, context_settings=CONTEXT)
@click.version_option(package_name="ddsnap")
@click.option("--timeout", default=str(int(DEFAULT_TIMEOUT)), show_default=True,
              metavar="SECONDS",
              help="How long a command waits for the server of a served store to answer "
                   "(0: no limit); then it fails with exit code 15.")
@click.pass_context
def main(ctx, timeout):
    """ddsnap: many snapshots of a block volume in one shared copy-on-write store,
    served over NBD."""
    try:
        seconds = float(timeout)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0 or seconds == float("inf"):
        raise InvalidArgument(f"--timeout {timeout!r} is not a number of seconds (try 30, "
                              "0.5, or 0 for no limit)")
    ctx.ensure_object(dict)["timeout"] = seconds


@main.command()
@click.argument("store")
@click.option("--origin", required=True, metavar="ORIGIN",
              help="The volume to snapshot (file or block device).")
@click.option("--size", metavar="SIZE",
              help="Size of a new STORE file, e.g. 10G (default: the origin's size).")
@click.option("--chunk-size", default="64K", show_default=True, metavar="SIZE",
              help="Copy-on-write unit, a power of two from 4K to 1M.")
@click.option("--max-snapshots", default="0", show_default=True, metavar="N",
              help="Most snapshots the store may hold; 0 for no limit.")
@click.option("--full-policy", type=_Choice(FULL_POLICIES), default="error",
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
    chunk = _size(chunk_size, "--chunk-size")
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
        ssize = _size(size, "--size") if size is not None else osize
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
            if _can_ask(yes):
                _ask(f"{_shown(store)} holds a ddsnap snapshot store (origin "
                     f"{_shown(old.origin_path)}): overwrite it, losing every snapshot in "
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
    out.print(f"created snapshot store {_shown(store)} for origin {_shown(origin)} "
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


@main.group(cls=_Group)
def snap():
    """Create, list and delete snapshots."""


@snap.command("create")
@click.argument("store")
@click.argument("name")
@click.option("--read-only", is_flag=True, help="Refuse writes to the snapshot.")
@click.option("--from", "parent", metavar="SNAP",
              help="Snapshot the snapshot SNAP instead of the origin (a clone).")
def snap_create(store, name, read_only, parent):
    """Snapshot the origin of STORE (or the snapshot given by --from) as NAME, in
    constant time."""
    info = _call(store, "snap_create", name=name, read_only=read_only, parent=parent)
    of = "" if parent is None else f" of {_shown(parent)}"
    out.print(f"created snapshot {_shown(info['name'])}{of} (id {info['id']}) at "
              f"{info['created']}")


@snap.command("list")
@click.argument("store")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
def snap_list(store, as_json):
    """List the snapshots in STORE, oldest first."""
    snaps = _call(store, "snap_list")
    if as_json:
        click.echo(json.dumps(snaps, indent=2))
        return
    table = Table("name", "id", "parent", "created", "read-only", "exclusive", "shared",
                  box=None)
    for s in snaps:
        parent = s.get("parent")
        shown_parent = (_shown(parent) if parent is not None
                        else f"#{s.get('parent_id')} (deleted)")
        table.add_row(Text(_shown(s["name"])), str(s["id"]), Text(shown_parent), s["created"],
                      "yes" if s["read_only"] else "no",
                      _bytes(s.get("exclusive")), _bytes(s.get("shared")))
    out.print(table)


@snap.command("delete")
@click.argument("store")
@click.argument("name")
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
def snap_delete(store, name, yes):
    """Delete snapshot NAME and free the space only it used.

    On a terminal it asks first (unless --yes); scripts are not asked.
    """
    if _can_ask(yes):
        snap = next((s for s in _call(store, "snap_list") if s["name"] == name), None)
        if snap is None:
            raise SnapshotNotFound(name)
        _ask(f"delete snapshot {_shown(name)} (taken {snap['created']}; frees "
             f"{_bytes(snap.get('exclusive'))} only it uses)?", f"snapshot {name} not deleted")
    _call(store, "snap_delete", name=name)
    out.print(f"deleted snapshot {_shown(name)}")


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
@click.option("--force-degraded", is_flag=True,
              help="Serve a store whose metadata is damaged, read-only: what only damaged "
                   "metadata maps reads as EIO.")
@click.option("--accept-origin-change", is_flag=True,
              help="Serve even though the origin changed while nobody served the store "
                   "(snapshots may then read the new data).")
def serve(store, listen, control_path, max_reply_memory, verbose, force_degraded,
          accept_origin_change):
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


@main.command()
@click.argument("store")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def status(store, as_json):
    """Show STORE's geometry, space and snapshots."""
    st, served = _call_where(store, "status")
    if as_json:
        click.echo(json.dumps(st, indent=2))
        return
    cs = st["chunk_size"]
    rows = [
        ("store", f"{_shown(st['store'])} ({format_size(st['store_size'], binary=True)})"),
        ("origin", f"{_shown(st['origin'])} ({format_size(st['origin_size'], binary=True)})"),
        ("served", "yes" if st["served"] else "no"),
        ("chunk size", format_size(cs, binary=True)),
        ("chunks", f"{st['chunks_used']} used, {st['chunks_free']} free of {st['chunks_total']}"),
        ("space", f"{_bytes(st['used'])} used, {_bytes(st['free'])} free"),
        ("snapshots", f"{len(st['snapshots'])}" + (f" of {st['max_snapshots']}"
                                                   if st["max_snapshots"] else "")),
        ("when full", st["full_policy"]),
    ]
    for k, v in rows:
        out.print(f"{k:>10}: {v}")
    for s in st["snapshots"]:
        size = s.get("size")
        resized = f", {_bytes(size)}" if size and size != st["origin_size"] else ""
        out.print(f"{'':>10}  {_shown(s['name'])} (id {s['id']}, {s['created']}{resized}"
                  f"{', read-only' if s['read_only'] else ''}; {_bytes(s.get('exclusive'))} "
                  f"exclusive, {_bytes(s.get('shared'))} shared)")
    if st.get("merge"):
        out.print(f"{'merge':>10}: {_merge_line(st['merge'], served)}")
    for d in st.get("auto_deleted", []):
        out.print(f"{'deleted':>10}: {_shown(d['name'])} at {d['deleted']} to make room "
                  "(full-policy=delete-oldest)")


@main.command("set")
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
    _call(store, "set", key=key.strip(), value=value.strip())
    out.print(f"{_shown(key.strip())} = {_shown(value.strip())}")


@main.command()
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
        args["origin_size"] = _size(origin_size, "--origin-size")
    if store_size is not None:
        args["store_size"] = _size(store_size, "--store-size")
    res = _call(store, "resize", **args)
    if as_json:
        click.echo(json.dumps(res, indent=2))
        return
    if "origin" in res:
        o = res["origin"]
        out.print(f"origin: {_bytes(o['old_size'])} -> {_bytes(o['origin_size'])}",
                  markup=False)
    if "store" in res:
        st = res["store"]
        out.print(f"store: {_bytes(st['old_size'])} -> {_bytes(st['store_size'])} "
                  f"({st['chunks_total']} chunks for data and metadata)", markup=False)


def _bytes(n) -> str:
    return "?" if n is None else format_size(n, binary=True)


def _merge_line(st: dict, served: bool) -> str:
    """One line for a merge status (see ``MergeProgress``): counts, rate and ETA while it
    runs; "paused" (no rate) when it does not; why it stopped after an error."""
    counted = ("" if st.get("counted_from", "start") == "start" else
               " (counted since the store was last opened: chunks merged before that are "
               "not recorded)")
    line = (f"merging snapshot {_shown(st['snapshot'])} into the origin: {st['chunks_done']} "
            f"of {st['chunks_total']} chunks{counted}")
    if st.get("running"):
        rate = st.get("chunks_per_second")
        if rate:
            line += f", {rate:.1f} chunks/s"
        if st.get("eta_seconds") is not None:
            line += f", ETA {st['eta_seconds']:.0f} s"
        return line + " (running)"
    if st.get("error"):
        return line + f" (stopped: {_shown(st['error'].get('message', 'error'))}; " \
                      "`ddsnap merge STORE NAME` resumes it)"
    if not served:
        return line + " (paused: it resumes when the store is served, or with " \
                      "`ddsnap merge STORE NAME --wait`)"
    return line + " (paused: `ddsnap merge STORE NAME` resumes it)"


@main.command()
@click.argument("store")
@click.argument("name", required=False)
@click.option("--wait", is_flag=True, help="Wait until the merge completes.")
@click.option("--no-progress", is_flag=True, help="No progress bar while waiting.")
@click.option("--keep", is_flag=True, help="Keep NAME as a snapshot after the merge.")
@click.option("--status", "show_status", is_flag=True, help="Show the merge in progress.")
@click.option("--json", "as_json", is_flag=True, help="With --status: print JSON.")
@click.option("--stop", is_flag=True, help="Stop (pause) the merge; it resumes later.")
def merge(store, name, wait, no_progress, keep, show_status, as_json, stop):
    """Merge snapshot NAME into the origin of STORE: an online rollback.

    The origin reads as NAME at once and stays writable; NAME's chunks are copied in
    by the server in the background, or here with --wait if nobody serves STORE.
    """
    if show_status or stop:
        st, served = _call_where(store, "merge_stop" if stop else "merge_status")
        if as_json:
            click.echo(json.dumps(st, indent=2))
        elif st is None:
            out.print("no merge in progress")
        else:
            out.print(_merge_line(st, served))
        return
    if not name:
        raise InvalidArgument("merge needs the snapshot NAME (or --status / --stop)")
    opened, path = _open_or_server(store)
    if opened is not None:
        try:
            st = admin.merge_start(opened.service, None, name, keep)
            if wait:
                _run_merge_here(opened, st, no_progress)
                out.print(f"merged snapshot {_shown(name)} into the origin")
            else:
                out.print(f"merge of {_shown(name)} started; it runs when {_shown(store)} "
                          "is served (or use --wait)")
        finally:
            opened.close()
        return
    st = control.call(path, "merge_start", {"name": name, "keep": keep}, timeout=_timeout())
    if not wait:
        out.print(_merge_line(st, True))
        return
    _wait_remote(path, st, no_progress)
    out.print(f"merged snapshot {_shown(name)} into the origin")


def _progress(no_progress: bool, total: int):
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

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
            s = control.call(path, "merge_status", timeout=_timeout())
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
@click.option("--repair", is_flag=True,
              help="Fix leaks, damaged or stale superblock slots and space accounting "
                   "(nothing else), saying what first; the store must not be served.")
def check(store, as_json, repair):
    """Check STORE's metadata, read-only; exit 0 only if nothing fatal is found.

    A store nobody serves is checked without writing anything (its journal is replayed
    in memory); a served one through its server.
    """
    from .errors import CorruptMetadata

    if not os.path.exists(store):
        raise StoreNotFound(store)
    if repair:
        report = admin.repair_store(store, lambda text: err.print(f"repair: {text}",
                                                                   markup=False))
    else:
        try:
            report = admin.inspect_store(store)
        except StoreBusy:
            from .daemon import find_server

            path = find_server(store)
            if path is None:
                raise
            try:
                report = control.call(path, "check", timeout=_timeout())
            except CorruptMetadata as e:
                from .store.model import Finding

                report = admin.findings_report([Finding("fatal", getattr(e, "block", None),
                                                        getattr(e, "why", str(e)))])
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        for f in report["findings"]:
            where = f" (block {f['block']})" if f["block"] is not None else ""
            out.print(f"{f['severity']}{where}: {_shown(f['message'])}")
        out.print("store is clean" if report["clean"] else
                  f"{report['fatal']} fatal finding(s)")
    if not report["clean"]:
        sys.exit(CorruptMetadata.exit_code)


@main.command()
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

    from .store.format import VERSION
    from .store.upgrade import upgrade_store

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
    out.print(f"upgraded {_shown(store)} from format v{r.from_version} to v{VERSION}: "
              f"{r.snapshots} snapshot(s), {r.exceptions} exception(s), {r.copies} "
              f"chunk(s) copied{extra}")


if __name__ == "__main__":
    main()
