"""``ddsnap merge``: merge a snapshot into the origin (an online rollback), here or by
the server; its status and stop, and the progress bar while waiting for it.
"""

from __future__ import annotations

import json

import click

from .. import admin, control
from ..errors import InvalidArgument, MergeInProgress
from ..errors import from_dict as error_from_dict
from .common import call_where, command_timeout, err, merge_line, open_or_server, out, shown


@click.command()
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
        st, served = call_where(store, "merge_stop" if stop else "merge_status")
        if as_json:
            click.echo(json.dumps(st, indent=2))
        elif st is None:
            out.print("no merge in progress")
        else:
            out.print(merge_line(st, served))
        return
    if not name:
        raise InvalidArgument("merge needs the snapshot NAME (or --status / --stop)")
    opened, path = open_or_server(store)
    if opened is not None:
        try:
            st = admin.merge_start(opened.service, None, name, keep)
            if wait:
                _run_merge_here(opened, st, no_progress)
                out.print(f"merged snapshot {shown(name)} into the origin")
            else:
                out.print(f"merge of {shown(name)} started; it runs when {shown(store)} "
                          "is served (or use --wait)")
        finally:
            opened.close()
        return
    st = control.call(path, "merge_start", {"name": name, "keep": keep}, timeout=command_timeout())
    if not wait:
        out.print(merge_line(st, True))
        return
    _wait_remote(path, st, no_progress)
    out.print(f"merged snapshot {shown(name)} into the origin")


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
            s = control.call(path, "merge_status", timeout=command_timeout())
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
