"""``ddsnap cluster status``: a cluster's metadata servers and nodes, as etcd knows them."""

from __future__ import annotations

import asyncio
import datetime
import json

import click

from ..errors import InvalidArgument
from .common import out
from .serve import etcd_options


@click.group()
def cluster():
    """A cluster of metadata servers that fail over through etcd."""


@cluster.command("status")
@etcd_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def status(etcd, cluster, as_json):
    """Show the cluster's current metadata server (its epoch, since when), the
    standbys, and the nodes attached to the server with their locks and grants."""
    from .. import election

    if not etcd or not cluster:
        raise InvalidArgument("cluster status needs --etcd URL and --cluster NAME")

    async def ask() -> dict:
        st = await election.status(etcd, cluster)
        st["nodes"] = await election.nodes(etcd, cluster)
        return st

    st = asyncio.run(ask())
    if as_json:
        click.echo(json.dumps(st, indent=2))
        return
    leader = st.get("leader")
    if leader:
        since = datetime.datetime.fromtimestamp(leader["since"] / 1e9, datetime.UTC)
        out.print(f"   server: {leader.get('host')} (pid {leader.get('pid')}), metadata "
                  f"{leader.get('metadata')}, epoch {leader.get('epoch')} since "
                  f"{since.isoformat().replace('+00:00', 'Z')}", markup=False)
    else:
        out.print("   server: none elected", markup=False)
    for sb in st.get("standbys", []):
        out.print(f"  standby: {sb.get('host')} (pid {sb.get('pid')}), metadata "
                  f"{sb.get('metadata')}", markup=False)
    for n in st.get("nodes", []):
        if n.get("lapsed"):
            out.print(f"     node: {n['name']}: connection lost, what it held is kept for "
                      "its return", markup=False)
            continue
        out.print(f"     node: {n['name']} from {n.get('peer')}: {n.get('read_locks', 0)} "
                  f"read lock(s), {n.get('origin_writes', 0)} origin write(s)"
                  f"{', grants' if n.get('granted') else ''}", markup=False)
