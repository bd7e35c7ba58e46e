"""The ``ddsnap`` command line (click + rich).

Administrative commands work the same on a store nobody serves (they open it themselves)
and on a served one (they go through the server's control socket).  Every
:class:`~ddsnap.errors.DdsnapError` becomes one line on stderr and the error's own exit
code; no traceback.

:func:`main` is the ``ddsnap`` group (the console script ``ddsnap.cli:main``) and its
global options; the commands live by family: :mod:`.store` (``init``, ``status``,
``set``, ``resize``, ``check``, ``upgrade``), :mod:`.snap` (``snap create|list|delete``),
:mod:`.serve` and :mod:`.merge`; what they share is in :mod:`.common`.
"""

from __future__ import annotations

import click

from ..errors import InvalidArgument
from . import cluster, diff, merge, send, serve, snap, store
from .common import DEFAULT_TIMEOUT, Group

#: ``-h`` as well as ``--help``, on every command (inherited by subcommands)
CONTEXT = {"help_option_names": ["-h", "--help"]}


@click.group(cls=Group, context_settings=CONTEXT)
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


# In the order they were always registered (``--help`` lists them sorted).
main.add_command(store.init)
main.add_command(snap.snap)
main.add_command(serve.serve)
main.add_command(store.status)
main.add_command(store.set_)
main.add_command(store.resize)
main.add_command(merge.merge)
main.add_command(store.check)
main.add_command(diff.diff)
main.add_command(send.send)
main.add_command(send.receive)
main.add_command(store.upgrade)
main.add_command(serve.attach)
main.add_command(cluster.cluster)

__all__ = ["main"]
