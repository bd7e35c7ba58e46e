"""``ddsnap send`` and ``ddsnap receive``: a snapshot as a stream, whole or incremental,
into another store (issue 13; :mod:`ddsnap.sendrecv`, docs/stream.md)."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import stat
import sys
from contextlib import contextmanager

import click

from .. import admin, sendrecv
from ..errors import HostIOError, InvalidArgument, StoreBusy, StoreNotFound
from .common import err, out


def _open(path: str, doing: str):
    """Open ``path`` for send or receive (they need the store to themselves)."""
    if not os.path.exists(path):
        raise StoreNotFound(path)
    try:
        return admin.open_store(path)
    except StoreBusy as e:
        raise StoreBusy(f"{e}; {doing} opens the store itself: stop its server first",
                        ) from None


#: the pipe buffer send and receive ask for (Linux's default is 64 KiB: a 1 MiB record
#: would then pass in 16 turns of the two processes, and they would barely overlap)
PIPE_BYTES = 4 << 20


def _widen_pipe(f) -> None:
    """Ask for a bigger pipe buffer if ``f`` is a pipe (what the host allows: up to
    ``/proc/sys/fs/pipe-max-size`` without privileges)."""
    try:
        if not stat.S_ISFIFO(os.fstat(f.fileno()).st_mode):
            return
        for size in (PIPE_BYTES, 1 << 20):
            try:
                fcntl.fcntl(f.fileno(), fcntl.F_SETPIPE_SZ, size)
                return
            except OSError:
                continue
    except (OSError, ValueError, AttributeError):
        return  # not a real file (a test harness), or no F_SETPIPE_SZ: the default


@contextmanager
def _bar(what: str, total: int, no_progress: bool):
    """A bytes-and-rate progress bar on stderr when it is a terminal."""
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    with Progress(TextColumn(what), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  TimeRemainingColumn(), console=err,
                  disable=no_progress or not err.is_terminal) as bar:
        task = bar.add_task(what, total=total)
        yield lambda n: bar.advance(task, n)


@click.command()
@click.argument("store")
@click.argument("snapshot")
@click.option("--from", "base", metavar="BASE",
              help="Send only what changed since snapshot BASE (the receiving store must "
                   "hold BASE, received from this store).")
@click.option("-o", "--output", metavar="FILE",
              help="Write the stream to FILE instead of standard output.")
@click.option("--resume", "token", metavar="TOKEN",
              help="Send from where the receive with this token stopped (ddsnap status "
                   "of the receiving store prints it).")
@click.option("--json", "as_json", is_flag=True,
              help="Print a JSON summary at the end (on stderr when the stream goes to "
                   "standard output).")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def send(store, snapshot, base, output, token, as_json, no_progress):
    """Write SNAPSHOT of STORE as a stream (docs/stream.md) for ddsnap receive: all of
    it, or with --from BASE only the chunks that changed since BASE.

    \b
    ddsnap send a.img s2 --from s1 | ssh host ddsnap receive b.img
    """
    if output is None and sys.stdout.isatty():
        raise InvalidArgument("the stream is binary: give -o FILE or pipe it (to ddsnap "
                              "receive, say), not to a terminal")
    opened = _open(store, "send")
    try:
        size = opened.service.snapshot(snapshot).size
        sink = open(output, "wb") if output else sys.stdout.buffer  # noqa: SIM115
        _widen_pipe(sink)
        try:
            with _bar("sending", size, no_progress) as step:
                try:
                    summary = sendrecv.send(opened.service, snapshot, sink, base, token,
                                            step)
                except BrokenPipeError as e:
                    raise HostIOError("the reader of the stream went away before its end "
                                      "(broken pipe)", output or "<stdout>",
                                      errno.EPIPE) from e
            if output:
                sink.flush()
                os.fsync(sink.fileno())
        finally:
            if output:
                sink.close()
    finally:
        opened.close()
    _report(summary, as_json, to_stderr=output is None,
            text=f"sent {summary['snapshot']}"
                 + (f" since {summary['base']}" if summary["base"] else "")
                 + f": {summary['bytes']} bytes of stream, {summary['records']} records")


@click.command()
@click.argument("store")
@click.option("-i", "--input", "input_", metavar="FILE",
              help="Read the stream from FILE instead of standard input.")
@click.option("--resume", "token", metavar="TOKEN",
              help="Go on with the receive in progress that stopped (ddsnap status STORE "
                   "prints its token).")
@click.option("--abort", is_flag=True,
              help="Give up the receive in progress instead (an incremental one rolls the "
                   "origin back to its base).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary at the end.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def receive(store, input_, token, abort, as_json, no_progress):
    """Apply a stream from ddsnap send to STORE: its origin becomes the sent snapshot,
    and a snapshot of that name is taken of it.

    A full stream needs a store with no snapshots; an incremental one (send --from BASE)
    a store whose last receive was BASE, its origin unwritten since.  A receive that
    stops (cut stream, damaged record, killed) resumes with --resume TOKEN.
    """
    if abort and (token or input_):
        raise InvalidArgument("--abort takes no stream and no token")
    opened = _open(store, "receive")
    if abort:
        try:
            done = sendrecv.abort(opened.service, opened.path)
        finally:
            opened.close()
        _report(done, as_json, to_stderr=False,
                text=f"gave up receiving {done['aborted']}"
                     + (f"; the origin reads as {done['rolled_back_to']} again"
                        if done["rolled_back_to"] else ""))
        return
    try:
        src = open(input_, "rb") if input_ else sys.stdin.buffer  # noqa: SIM115
        _widen_pipe(src)
        try:
            with _bar("receiving", opened.service.origin_size, no_progress) as step:
                summary = sendrecv.receive(opened.service, opened.path, src, token, step)
        finally:
            if input_:
                src.close()
    finally:
        opened.close()
    _report(summary, as_json, to_stderr=False,
            text=f"received {summary['snapshot']}: {summary['applied_bytes']} bytes "
                 f"applied from {summary['bytes']} bytes of stream")


def _report(summary: dict, as_json: bool, to_stderr: bool, text: str) -> None:
    if as_json:
        line = json.dumps(summary)
        if to_stderr:
            click.echo(line, err=True)
        else:
            click.echo(line)
        return
    (err if to_stderr else out).print(text, markup=False)
