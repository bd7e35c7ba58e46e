"""What every ``ddsnap`` command shares: the consoles, safe printing of the user's text,
sizes as shown, running an operation here or through a server's control socket, the
confirmation question, the ``--timeout`` in force, and the click classes that turn a
:class:`~ddsnap.errors.DdsnapError` into one line on stderr and its exit code.
"""

from __future__ import annotations

import os
import re
import sys

import click
from humanfriendly import format_size
from rich.console import Console

from .. import admin, control
from ..errors import Cancelled, DdsnapError, InvalidArgument, StoreBusy, StoreNotFound

# Names and paths are the user's text: never rich markup ("[red]x") or emoji codes
# (":smile:"), so both are off for every print.
out = Console(highlight=False, soft_wrap=True, markup=False, emoji=False)
err = Console(stderr=True, highlight=False, soft_wrap=True, markup=False, emoji=False)

#: seconds a command waits for a server to answer, unless ``--timeout`` says otherwise
DEFAULT_TIMEOUT = 30.0

_CONTROL_CHARS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def shown(text) -> str:
    """``text`` safe to print on a terminal: control characters as escapes (``\\x1b``),
    so a name from an older store, a path or an error message cannot move the cursor,
    change colours or split a line."""
    return _CONTROL_CHARS.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"),
                              str(text))


class Choice(click.Choice):
    """click.Choice (help shows ``[error|delete-oldest]``) with ddsnap's one-line error,
    exit 2: ``--full-policy must be one of error, delete-oldest``."""

    def convert(self, value, param, ctx):
        if value in self.choices:
            return value
        name = param.opts[0] if param is not None and param.opts else "value"
        raise InvalidArgument(f"{name} must be one of {', '.join(self.choices)}, "
                              f"not {value!r}")


def command_timeout() -> float | None:
    """The ``--timeout`` in force (seconds; None: no limit)."""
    ctx = click.get_current_context(silent=True)
    t = (ctx.find_root().obj or {}).get("timeout", DEFAULT_TIMEOUT) if ctx else DEFAULT_TIMEOUT
    return t or None


def open_or_server(store: str):
    """Open ``store`` here, or find the server holding it.

    Returns ``(opened, None)`` or ``(None, control_socket_path)``.
    """
    if not os.path.exists(store):
        raise StoreNotFound(store)
    try:
        return admin.open_store(store), None
    except StoreBusy:
        from ..daemon import find_server

        path = find_server(store)
        if path is None:
            raise
        return None, path


def call_where(store: str, op: str, **args):
    """Run ``op`` on a local store, or through the control socket of its server (waiting
    at most ``--timeout`` for it).  Returns ``(result, served)``."""
    opened, path = open_or_server(store)
    if opened is None:
        return control.call(path, op, args, timeout=command_timeout()), True
    try:
        return admin.run_op(opened.service, op, args, opened.path, served=False), False
    finally:
        opened.close()


def call(store: str, op: str, **args):
    """Run ``op`` on a local store, or through the control socket of its server."""
    return call_where(store, op, **args)[0]


def can_ask(yes: bool) -> bool:
    """True if a confirmation question should be asked: no ``--yes``, and someone can see
    and answer it (stdin and stderr on a terminal).  Scripts and pipes are never asked."""
    return not yes and sys.stdin.isatty() and sys.stderr.isatty()


def ask(question: str, refusal: str) -> None:
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
    """Print ``e`` as one line on stderr and exit with its exit code."""
    err.print(f"ddsnap: {shown(e)}")
    sys.exit(e.exit_code)


class Group(click.Group):
    """click.Group whose commands fail the ddsnap way: a :class:`~ddsnap.errors.DdsnapError`
    becomes one line on stderr (``ddsnap: ...``) and the error's own exit code, with no
    traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except DdsnapError as e:
            _fail(e)


def shown_size(n) -> str:
    """``n`` bytes in binary units (``1.5 GiB``), or ``?`` if ``n`` is None (not known)."""
    return "?" if n is None else format_size(n, binary=True)


def merge_line(st: dict, served: bool) -> str:
    """One line for a merge status (see ``MergeProgress``): counts, rate and ETA while it
    runs; "paused" (no rate) when it does not; why it stopped after an error."""
    counted = ("" if st.get("counted_from", "start") == "start" else
               " (counted since the store was last opened: chunks merged before that are "
               "not recorded)")
    line = (f"merging snapshot {shown(st['snapshot'])} into the origin: {st['chunks_done']} "
            f"of {st['chunks_total']} chunks{counted}")
    if st.get("running"):
        rate = st.get("chunks_per_second")
        if rate:
            line += f", {rate:.1f} chunks/s"
        if st.get("eta_seconds") is not None:
            line += f", ETA {st['eta_seconds']:.0f} s"
        return line + " (running)"
    if st.get("error"):
        return line + f" (stopped: {shown(st['error'].get('message', 'error'))}; " \
                      "`ddsnap merge STORE NAME` resumes it)"
    if not served:
        return line + " (paused: it resumes when the store is served, or with " \
                      "`ddsnap merge STORE NAME --wait`)"
    return line + " (paused: `ddsnap merge STORE NAME` resumes it)"
