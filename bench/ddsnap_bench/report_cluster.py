"""The report's "Cluster (issue 12)" section (``bench/run --cluster``): the failover time
(SIGKILL of the metadata server to the first write acknowledged on each node) and a
node's 4 KiB overwrite and snapshot-read IOPS on another host against the server's own
worker (target: at least 0.8), with how they were measured.  A cluster run writes only
this section, between ``<!-- cluster-start -->`` and ``<!-- cluster-end -->`` in the
output file, keeping the rest of the file; a full run keeps the section it finds there
(:func:`kept_cluster_section`)."""

from __future__ import annotations

import os
import re
import shlex
import statistics
from pathlib import Path

from .common import (
    CLUSTER_KILLS,
    CLUSTER_NAME,
    CLUSTER_PORT,
    CLUSTER_REPEAT,
    CLUSTER_TTL,
    DEFAULT_CLUSTER_MINUTES,
    PEER_NAMES,
    fmt_size,
    say,
    stats_text,
)
from .report_base import ReportBase
from .results import all_workloads

HEADING = "## Cluster (issue 12)"
START, END = "<!-- cluster-start -->", "<!-- cluster-end -->"
_SECTION = re.compile(re.escape(HEADING) + r"\n\n" + re.escape(START) + r".*?"
                      + re.escape(END) + r"\n", re.S)
TARGET = 0.8


def kept_cluster_section(out: Path) -> str:
    """The cluster section of the file ``out`` (heading to end marker and newline), or
    ''."""
    try:
        m = _SECTION.search(out.read_text())
    except OSError:
        return ""
    return m.group(0) if m else ""


def splice(existing: str | None, section: str) -> str:
    """``existing`` with its cluster section replaced by ``section`` (or ``section``
    put before "## How to run it", or at the end)."""
    if existing is None:
        return "# ddsnap benchmarks\n\n" + section
    if _SECTION.search(existing):
        return _SECTION.sub(lambda _m: section, existing, count=1)
    at = existing.find("\n## How to run it")
    if at >= 0:
        return existing[:at + 1] + section + "\n" + existing[at + 1:]
    return existing.rstrip("\n") + "\n\n" + section


def write_cluster_report(b, out: Path) -> int:
    """Write the cluster section of run ``b`` into ``out`` (the rest kept) and print
    it."""
    section = ClusterReport(b).cluster_section()
    print()
    print(section)
    try:
        existing: str | None = out.read_text()
    except FileNotFoundError:
        existing = None
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(splice(existing, section))
    say(f"wrote the section \"{HEADING[3:]}\" of {out} (the run took {b.elapsed:.0f} s)")
    if b.problems:
        say(f"{len(b.problems)} problem(s) seen; they are listed in that section")
    return 0


class ClusterReport(ReportBase):
    """The cluster section (see the module's docstring)."""

    def _wls(self):
        w = {x.key: x for x in all_workloads(self.a)}
        return w["overwrite4k"], w["randread4k"]

    def _ratio(self, key: str, metric: str, x: str, y: str) -> tuple[str, float | None]:
        r = self.paired(self.runs(key, 1, x), self.runs(key, 1, y), metric)
        if not r:
            return "–", None
        return stats_text(r, lambda v: f"{v:.2f}"), statistics.median(r)

    def cluster_targets(self) -> str:
        rows = ["| target (issue 12) | measured: median (min–max) | target | met | notes |",
                "|---|---:|---:|---|---|"]
        for wl, what in zip(self._wls(), (
                "4 KiB random overwrites of already-unique origin chunks",
                "4 KiB random reads of a snapshot"), strict=True):
            text, med = self._ratio(wl.key, wl.metric, "node", "local")
            node, _ = self.cell(wl, 1, "node")
            local, _ = self.cell(wl, 1, "local")
            bad = any(m.bad for p in ("node", "local") for m in self.runs(wl.key, 1, p))
            met = ("not measured" if med is None else "no (wrong data)" if bad else
                   "yes" if med >= TARGET else "no")
            rows.append(f"| {what}, one connection: a node on another host / the server's "
                        f"local worker | {text} | ≥ {TARGET} | {met} | medians: node "
                        f"{node}, local worker {local} |")
        return "\n".join(rows)

    def failover_summary(self) -> str:
        kills = self.b.failover_kills
        if not kills:
            return "(no kill was timed" + (
                ": " + "; ".join(self.b.failover_errors) if self.b.failover_errors else "") + ")"

        def row(what: str, vals: list[float]) -> str:
            if not vals:
                return f"| {what} | – | – | – | 0 |"
            return (f"| {what} | {min(vals):.2f} s | {statistics.median(vals):.2f} s "
                    f"| {max(vals):.2f} s | {len(vals)} |")

        names = sorted({n for k in kills for n in list(k.node_s) + list(k.node_errors)})
        rows = ["| from the SIGKILL of the elected server to | min | median | max | kills |",
                "|---|---:|---:|---:|---:|",
                row("the standby's `elected for cluster ...` log line",
                    [k.elected_s for k in kills if k.elected_s is not None]),
                row("the standby's `serving ... for cluster ...` line",
                    [k.serving_s for k in kills if k.serving_s is not None])]
        for n in names:
            rows.append(row(f"**{n}: its 4 KiB write + flush acknowledged** (failover "
                            f"time)", [k.node_s[n] for k in kills if n in k.node_s]))
        rows.append(row("the later of the two nodes' acknowledgements",
                        [max(k.node_s.values()) for k in kills
                         if k.node_s and len(k.node_s) == len(names)]))
        return "\n".join(rows)

    def failover_kills_table(self) -> str:
        kills = self.b.failover_kills
        if not kills:
            return ""
        names = sorted({n for k in kills for n in list(k.node_s) + list(k.node_errors)})

        def s(v: float | None) -> str:
            return "–" if v is None else f"{v:.2f} s"

        rows = ["| kill | killed | took over | epoch | elected | serving | "
                + " | ".join(f"{n} write acknowledged" for n in names)
                + " | killed one standing by again |",
                "|---:|---|---|---|---:|---:|" + "---:|" * len(names) + "---:|"]
        for k in kills:
            nodes = " | ".join(s(k.node_s.get(n)) if n in k.node_s
                               else f"FAILED: {k.node_errors.get(n, '?')}" for n in names)
            rows.append(f"| {k.index} | srv-{k.killed} | srv-{k.took_over} | "
                        f"{k.epoch_before} → {k.epoch_after} | {s(k.elected_s)} | "
                        f"{s(k.serving_s)} | {nodes} | {s(k.standby_s)} |")
        return "\n".join(rows)

    def _cpu(self, wl, peer: str, role: str | None = None) -> str:
        """Median (min–max) CPU µs per I/O of the job's ddsnap processes (or of one
        role)."""
        vals = []
        for m in self.runs(wl.key, 1, peer):
            ios = m.io_bytes / 4096 if wl.bs == "4k" else None
            if not ios:
                continue
            if role is None:
                if m.server_cpu_s is not None:
                    vals.append(m.server_cpu_s * 1e6 / ios)
            elif m.role_cpu_s is not None:
                vals.append(m.role_cpu_s.get(role, 0.0) * 1e6 / ios)
        return stats_text(vals, lambda v: f"{v:,.0f}") + " µs" if vals else "–"

    def iops_table(self) -> str:
        rows = ["| workload | fio through | devices opened with | IOPS: median (min–max) "
                "| / local worker | / local worker without --metadata-listen (information) "
                "| mean latency | ddsnap CPU per I/O: all its processes | of which the "
                "metadata server |",
                "|---|---|---|---:|---:|---:|---:|---:|---:|"]
        flags = self.b.direct_flags
        for wl in self._wls():
            for peer in ("local", "node", "plain"):
                ms = self.runs(wl.key, 1, peer)
                if not ms and not self.b.errors.get((wl.key, 1, peer)):
                    continue
                cell, _ = self.cell(wl, 1, peer)
                r_local = ("1 (reference)" if peer == "local" else
                           self._ratio(wl.key, wl.metric, peer, "local")[0])
                r_plain = ("1 (reference)" if peer == "plain" else
                           self._ratio(wl.key, wl.metric, peer, "plain")[0])
                lat = (stats_text([m.lat_mean_us for m in ms], lambda v: f"{v:,.0f}") + " µs"
                       if ms else "–")
                rows.append(f"| {wl.title} | {PEER_NAMES[peer]} | {flags.get(peer, '?')} "
                            f"| {cell} | {r_local} | {r_plain} | {lat} | {self._cpu(wl, peer)} "
                            f"| {self._cpu(wl, peer, 'metadata server')} |")
        return "\n".join(rows)

    def findings(self) -> str:
        """What the IOPS figures show about O_DIRECT, with this run's numbers."""
        ow, rd = self._wls()
        r_ow = self._ratio(ow.key, ow.metric, "local", "plain")[0]
        r_rd = self._ratio(rd.key, rd.metric, "local", "plain")[0]
        if r_ow == "–" and r_rd == "–":
            return ""
        return f"""\
**What the figures show.**  The node and the local worker both open the devices with
`O_DIRECT`, and that, not the network, is what costs here: the local worker reaches
{r_ow} of the page-cache worker's overwrite IOPS and {r_rd} of its snapshot-read IOPS
(run i over run i).  With `O_DIRECT` no request can be served from the page cache on
the NBD event loop (`DirectFileDevice.preadinto_nowait` and `pwrite_cached` answer
False, `src/ddsnap/store/blockdev.py`), so both serve every request from a thread, each
reaching the device.  Whether those reads still ask the metadata server shows in its
CPU per read ({self._cpu(rd, 'local', 'metadata server')} through the local worker,
{self._cpu(rd, 'node', 'metadata server')} through the node,
{self._cpu(rd, 'plain', 'metadata server')} without `--metadata-listen`): since commit
7c45799 a thread's snapshot read uses the mappings its node keeps (before, every such
read was a round trip, over TLS for the node, and the node reached 0.73 of the local
worker).  Overwrites of granted chunks ask nothing either
({self._cpu(ow, 'node', 'metadata server')} of metadata server CPU per overwrite
through the node).

"""

    def cluster_details(self) -> str:
        rows = ["| workload | fio through | run | IOPS | MiB/s | mean latency | p99 latency "
                "| note |", "|---|---|---:|---:|---:|---:|---:|---|"]
        for wl in self._wls():
            for peer in ("local", "node", "plain"):
                for i, m in enumerate(self.runs(wl.key, 1, peer), 1):
                    rows.append(f"| {wl.key} | {PEER_NAMES[peer]} | {i} | {m.iops:,.0f} | "
                                f"{m.mibs:,.1f} | {m.lat_mean_us:,.0f} µs | "
                                f"{m.lat_p99_us:,.0f} µs | {m.extra} |")
        return "\n".join(rows)

    def cluster_section(self) -> str:
        a, b = self.a, self.b
        cmd = "bench/run" + ("" if not a.argv else " " + shlex.join(a.argv))
        ncpu = len(os.sched_getaffinity(0))
        busy = max([float(b.load_start[0]), float(b.load_end[0]),
                    *getattr(b, "load_samples", [])])
        caveat = (f"\n\n**Caveat:** the 1-minute load average reached {busy:.1f} on {ncpu} "
                  f"CPUs around this run, so other processes competed for the CPUs; treat "
                  f"these figures as rough (rerun on a quiet machine)."
                  if busy > 0.5 * ncpu else "")
        reps = ("1 run per endpoint" if a.repeat == 1 else
                f"{a.repeat} runs per endpoint: median (min–max); a ratio pairs run i with "
                f"run i and shows the median (min–max) of those per-run ratios")
        notes = "\n".join(f"- {x}" for x in b.cluster_notes) or "- (none)"
        problems = ("\n\n".join("```\n" + p + "\n```" for p in b.problems) if b.problems
                    else "None: every kill's writes were acknowledged and read back, every "
                         "fio job finished, every snapshot read back whole held its bytes, "
                         "every process stopped cleanly on SIGTERM and `ddsnap check` was "
                         "clean on every store.")
        ow, rd = self._wls()
        workers = (f"`--workers {a.serve_workers}`" if a.serve_workers is not None else
                   f"serve's default workers ({ncpu} on this machine: a supervisor, a "
                   f"metadata server child and {ncpu} workers)")
        mach = "; ".join(f"{k}: {v}" for k, v in b.machine_rows if k in (
            "CPU", "kernel", "ddsnap", "fio", "etcd"))
        return f"""{HEADING}

{START}
Run {b.started.strftime('%Y-%m-%d %H:%M UTC')} with `{cmd}` (the whole run took \
{b.elapsed / 60:.1f} minutes).
Volume {fmt_size(a.size)}, chunk {fmt_size(a.chunk_size)}, lease TTL {a.lease_ttl:g} s,
{a.kills} kill(s); {a.duration:g} s per fio run, iodepth {a.iodepth_rand}, one connection;
{reps}.
Every host is a network namespace on one switch (a bridge; hosts `etcd`, `srv-a`,
`srv-b`, `node-1`, `node-2`), all on this one machine ({ncpu} CPUs) and one file system,
so the hosts share the origin and store files as hosts on shared storage would, and the
metadata traffic is TCP + TLS 1.3 across veths.{caveat}

{self.cluster_targets()}

**Failover time** over {len(b.failover_kills)} SIGKILLs of the elected metadata server
(`serve --etcd URL --cluster {CLUSTER_NAME} --lease-ttl {a.lease_ttl:g} --metadata-listen
tcp:HOST:{CLUSTER_PORT} --tls-* -v` with {workers}, on hosts `srv-a` and `srv-b`: the
`serve` process, which holds the term, killed with SIGKILL, its metadata server and
worker children then getting SIGTERM from the kernel; the two killed in turn), each of
two nodes (`attach --etcd URL --cluster {CLUSTER_NAME} --workers 0 --tls-*`, on hosts
`node-1` and `node-2`, an NBD connection to each one's origin export kept open by the
benchmark) writing 4 KiB + flush right after the kill; times from `time.monotonic()` on
this one machine, the standby's lines seen by polling its log every 5 ms (`-v` makes it
log the election):

{self.failover_summary()}

{self.failover_kills_table()}

What the failover time is made of: the standby can only win once etcd has expired the
killed server's lease (up to the TTL after its last renewal); it then opens the store
(journal recovery), listens for nodes and waits for the nodes the killed server
published to upload their locks (at most 5 s); only then does it answer writes.  Each
node, whose connection ended with the kill, keeps looking the server up in etcd
(backing off up to 1 s), reconnects to the new one, uploads what it holds, and sends its
write again.  The standby prints its `serving` line after the rest of its start-up
(control socket, NBD listener), so a node's write can be acknowledged before it.  Each
measured write goes to a chunk not written since `snap1` (a copy-out).

**A node's IOPS on another host against a local worker** (one server `serve --workers 1
--metadata-listen tcp:SRV-A:{CLUSTER_PORT} --tls-*` on host `srv-a`; a node `attach
tcp:SRV-A:{CLUSTER_PORT} --workers 1 --tls-*` on host `node-1`; fio runs in the host of
the socket it uses):

{self.iops_table()}

{self.findings()}\
*Devices opened with*: how the processes behind that socket opened the origin and store
files (`/proc/PID/fdinfo` flags).  Every process of a server that listens on TCP (its
worker too) opens them with `O_DIRECT`, as every node does (docs/protocol.md, "Nodes on
other hosts"), so the node and the local worker both read and write with `O_DIRECT`:
the ratio compares the network path (TCP + TLS to the metadata server instead of a unix
socket), not the page cache.  The third row, for information, is `serve --workers 1`
without `--metadata-listen` on a fresh store set up the same way, whose worker uses the
page cache.  *ddsnap CPU per I/O*: CPU time of every ddsnap process (the server with its
metadata server and worker, and the node) during the job, over the job's I/Os.

How each is run:

- **{ow.title}** (`{ow.key}`): `rw={ow.rw} bs={ow.bs} iodepth={ow.iodepth}`, `time_based`
  for {a.duration:g} s, after a 1 MiB sequential pass over the whole volume through the
  same socket right before it (not timed: every chunk copied out once for `snap1` and
  now written by that socket's process, as `overwrite4k` prepares it); the store must
  not grow during the job.
- **{rd.title}** (`{rd.key}`): `rw={rd.rw} bs={rd.bs} iodepth={rd.iodepth}`, `time_based`
  for {a.duration:g} s, of `snap1`, after every other chunk of the origin was overwritten
  (half of `snap1` read from the store, half from the origin, as `randread4k` prepares
  it); `snap1` read back whole through each socket with `nbdcopy` and compared first.
- Reads first (run i through each socket, the order alternating from run to run), then
  the overwrites likewise.  `sync` before the timed jobs.

**Every fio run**:

{self.cluster_details()}

**Setup notes**:

{notes}

**Problems seen**:

{problems}

Machine: {mach}; load average (1, 5, 15 min) {' '.join(b.load_start)} at the start,
{' '.join(b.load_end)} at the end.
{END}
"""


def cluster_howto() -> str:
    """The lines of "How to run it" about --cluster (also in the full report)."""
    return f"""\
`bench/run --cluster` (root: it makes network namespaces) measures issue 12's figures
alone and writes only the section "Cluster (issue 12)" of `--out` (default
`docs/benchmarks.md`; with `--quick`, `bench/out/quick.md`), keeping the rest of the
file: etcd, two metadata servers and two nodes, each on a host of its own (a network
namespace), for the failover time over `--kills` SIGKILLs (default {CLUSTER_KILLS};
`--lease-ttl`, default {CLUSTER_TTL:g}), then a node's 4 KiB overwrite and snapshot-read
IOPS against the server's local worker (`--repeat`: default {CLUSTER_REPEAT} runs per
endpoint; `--duration`, `--size`, `--chunk-size`, `--iodepth-rand`, `--serve-workers` and
`--rev REV` as above).  It takes about {DEFAULT_CLUSTER_MINUTES} minutes; `bench/run
--cluster --quick` (64 MiB, 2 s runs, 1 run, 2 kills) about one.  Every process and
namespace is stopped and removed on exit, also on failure or Ctrl-C.  Its results are
saved to `bench/out/last-cluster-run.pickle` (`--from-state` takes that file too).
"""
