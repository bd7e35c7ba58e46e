"""``ddsnap snap``: create, list and delete snapshots."""

from __future__ import annotations

import json

import click
from rich.table import Table
from rich.text import Text

from ..errors import SnapshotNotFound
from .common import Group, ask, call, can_ask, out, shown, shown_size


@click.group(cls=Group)
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
    info = call(store, "snap_create", name=name, read_only=read_only, parent=parent)
    of = "" if parent is None else f" of {shown(parent)}"
    out.print(f"created snapshot {shown(info['name'])}{of} (id {info['id']}) at "
              f"{info['created']}")


@snap.command("list")
@click.argument("store")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
def snap_list(store, as_json):
    """List the snapshots in STORE, oldest first."""
    snaps = call(store, "snap_list")
    if as_json:
        click.echo(json.dumps(snaps, indent=2))
        return
    table = Table("name", "id", "parent", "created", "read-only", "exclusive", "shared",
                  box=None)
    for s in snaps:
        parent = s.get("parent")
        shown_parent = (shown(parent) if parent is not None
                        else f"#{s.get('parent_id')} (deleted)")
        table.add_row(Text(shown(s["name"])), str(s["id"]), Text(shown_parent), s["created"],
                      "yes" if s["read_only"] else "no",
                      shown_size(s.get("exclusive")), shown_size(s.get("shared")))
    out.print(table)


@snap.command("delete")
@click.argument("store")
@click.argument("name")
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
def snap_delete(store, name, yes):
    """Delete snapshot NAME and free the space only it used.

    On a terminal it asks first (unless --yes); scripts are not asked.
    """
    if can_ask(yes):
        snap = next((s for s in call(store, "snap_list") if s["name"] == name), None)
        if snap is None:
            raise SnapshotNotFound(name)
        ask(f"delete snapshot {shown(name)} (taken {snap['created']}; frees "
             f"{shown_size(snap.get('exclusive'))} only it uses)?", f"snapshot {name} not deleted")
    call(store, "snap_delete", name=name)
    out.print(f"deleted snapshot {shown(name)}")
