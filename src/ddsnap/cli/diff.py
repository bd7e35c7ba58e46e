"""``ddsnap diff``: what may have changed between two snapshots (or a snapshot and the
origin), from the store's metadata, streamed page by page (issue 13)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import click

from .. import admin, control
from .common import command_timeout, err, open_or_server, shown


def diff_pages(store: str, from_name: str, to_name: str) -> Iterator[dict]:
    """The pages of ``admin.diff`` for ``from_name`` → ``to_name`` of ``store``, from its
    server if it is served, else from the store opened here (once, for every page)."""
    opened, path = open_or_server(store)
    try:
        start: int | None = 0
        while start is not None:
            args = {"from_name": from_name, "to_name": to_name, "start": start}
            if opened is None:
                page = control.call(path, "diff", args, timeout=command_timeout())
            else:
                page = admin.run_op(opened.service, "diff", args, opened.path,
                                    served=False)
            yield page
            start = page["next"]
    finally:
        if opened is not None:
            opened.close()


def changed_ranges(pages: Iterator[dict]) -> Iterator[tuple[int, int, int]]:
    """``(offset, length, chunk_size)`` in bytes of each changed range, adjacent runs of
    consecutive pages joined; the last range ends at the volume's size."""
    pending: list[int] | None = None
    cs = size = 0
    for page in pages:
        cs, size = page["chunk_size"], page["size"]
        for first, last in page["runs"]:
            if pending is not None and pending[1] + 1 == first:
                pending[1] = last
                continue
            if pending is not None:
                yield _bytes(pending, cs, size)
            pending = [first, last]
    if pending is not None:
        yield _bytes(pending, cs, size)


def _bytes(run: list[int], cs: int, size: int) -> tuple[int, int, int]:
    offset = run[0] * cs
    return offset, min((run[1] + 1) * cs, size) - offset, cs


@click.command()
@click.argument("store")
@click.argument("from_name", metavar="FROM")
@click.argument("to_name", metavar="TO")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object (streamed: ranges as they are found).")
def diff(store, from_name, to_name, as_json):
    """Print the byte ranges whose content may differ between snapshot FROM and
    snapshot TO (either may be ``origin``) of STORE: ``offset length`` per line, in
    bytes, ascending, whole chunks.

    Found from the store's metadata in time proportional to what was copied out or
    written, not to the volume's size.  A range is listed when the two read different
    data there; one rewritten with the bytes it had is listed too.
    """
    ranges = changed_ranges(diff_pages(store, from_name, to_name))
    total = count = 0
    if as_json:
        # streamed by hand: a list of a whole volume's ranges is never held
        click.echo(f'{{"from": {json.dumps(from_name)}, "to": {json.dumps(to_name)}, '
                   '"ranges": [', nl=False)
        cs = 0
        for offset, length, chunk_size in ranges:
            cs = chunk_size
            click.echo(("" if not count else ", ") +
                       json.dumps({"offset": offset, "length": length}), nl=False)
            total += length
            count += 1
        click.echo(f'], "chunk_size": {cs or "null"}, "changed_bytes": {total}}}')
        return
    for offset, length, _cs in ranges:
        click.echo(f"{offset}\t{length}")
        total += length
        count += 1
    err.print(f"{total} bytes in {count} range(s) may differ between {shown(from_name)} "
              f"and {shown(to_name)}", markup=False)
