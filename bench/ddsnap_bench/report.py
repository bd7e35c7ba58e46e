"""The markdown report (``docs/benchmarks.md`` by default, or ``--out``): written from
a finished run or, with ``--from-state``, from a saved one.  :class:`Report` assembles
it: issue 4's targets (:mod:`.report_targets`), every fio figure and the flatness ratios
(here), the merge, snapshot creation, peak RSS and profile sections
(:mod:`.report_sections`), issue 9's scaling section (:mod:`.report_scaling`), the
machine, how each workload is run, every run's details and the problems seen.  The
sections "Cluster (issue 12)" and "Send and receive (issue 13)" are written by
``--cluster`` and ``--send`` runs alone (:mod:`.report_cluster`, :mod:`.report_send`); a
full report keeps the ones its file holds."""

from __future__ import annotations

import os
import pickle
import shlex
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

from . import results
from .common import (
    CTL_DEPTH,
    DEFAULT_QCOW2_MAX,
    DEFAULT_RUN_MINUTES,
    DEFAULT_WORKLOADS,
    PEER_NAMES,
    SCALING_FIO,
    SCALING_WORKLOADS,
    SEND_CHANGE,
    KiB,
    MiB,
    fmt_size,
    say,
)
from .report_cluster import cluster_howto, kept_cluster_section, write_cluster_report
from .report_scaling import ScalingReport
from .report_sections import WorkloadSections
from .report_send import kept_send_section, send_howto, write_send_report
from .report_targets import TargetsReport
from .results import workloads


def write_report(b, out: Path) -> int:
    """Write the markdown report of run ``b`` (a Bench, or a saved state) to ``out`` and
    print its tables, the targets last.  A ``--cluster`` or ``--send`` run writes its own
    section only."""
    if getattr(b.args, "cluster", False):
        return write_cluster_report(b, out)
    if getattr(b.args, "send", False):
        return write_send_report(b, out)
    rep = Report(b)
    rep.kept_cluster = kept_cluster_section(out)
    rep.kept_send = kept_send_section(out)
    report = rep.markdown()
    print()
    print(report.split("<!-- table-end -->")[0].split("<!-- table-start -->")[-1].strip())
    print("\nTargets (issue 4); ratios: median (min–max) of the per-run ratios, run i "
          "over run i:\n")
    print(rep.targets_table())
    print("\nTargets (issue 11):\n")
    print(rep.issue11_table())
    print()
    if "<!-- scaling-start -->" in report:
        print("Snapshot count scaling (issue 9):\n")
        print(report.split("<!-- scaling-end -->")[0].split("<!-- scaling-start -->")[-1]
              .strip())
        print()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report)
    say(f"wrote {out} (the run took {b.elapsed:.0f} s)")
    if b.problems:
        say(f"{len(b.problems)} problem(s) seen; they are listed in {out}")
    return 0


def report_from_state(path: Path, out: str | None) -> int:
    """``--from-state``: write the report of a saved run again (e.g. after changing the
    report code) without running anything."""
    try:
        with path.open("rb") as f:
            state = SimpleNamespace(**_StateUnpickler(f).load())
    except (OSError, pickle.UnpicklingError, EOFError, AttributeError) as e:
        print(f"bench: cannot read the saved run {path}: {e}", file=sys.stderr)
        return 1
    # a run saved before the scaling workloads existed
    for name, default in (("create_rates", {}), ("meta", []), ("scale_fills", []),
                          ("scale_errors", []), ("qcow2_skipped", set()),
                          ("failover_kills", []), ("failover_errors", []),
                          ("cluster_errors", []), ("cluster_notes", []),
                          ("direct_flags", {}), ("load_samples", []),
                          ("send_runs", []), ("pipe_runs", []), ("send_errors", []),
                          ("send_notes", []), ("send_setup", {})):
        if not hasattr(state, name):
            setattr(state, name, default)
    for name, default in (("scaling", False), ("interleave", False),
                          ("qcow2_max_snapshots", DEFAULT_QCOW2_MAX),
                          ("scaling_count", 10000), ("create_samples", 50),
                          ("delete_fills", [0, 100000]), ("delete_exclusive", [100, 1000]),
                          ("delete_chunk_size", 4 * KiB), ("delete_write_points", 100),
                          ("sample_snapshots", 64), ("cluster", False), ("send", False),
                          ("send_change", SEND_CHANGE)):
        if not hasattr(state.args, name):
            setattr(state.args, name, default)
    return write_report(state, Path(out or state.args.out))


class _StateUnpickler(pickle.Unpickler):
    """Reads the results of runs saved when the benchmark was one script, bench/bench.py,
    run as ``__main__``: its classes are now in :mod:`ddsnap_bench.results`."""

    def find_class(self, module: str, name: str):
        if module == "__main__" and hasattr(results, name):
            return getattr(results, name)
        return super().find_class(module, name)


class Report(TargetsReport, WorkloadSections, ScalingReport):
    """The whole markdown document of a run (see the module's docstring)."""

    #: the "Cluster (issue 12)" section found in the file the report replaces, kept
    kept_cluster = ""
    #: the "Send and receive (issue 13)" section found there, kept after it
    kept_send = ""

    def table(self) -> str:
        if not workloads(self.a):
            return "(no fio workload in this run)"
        rows = ["| workload | N | ddsnap | peer | peer's figure | ddsnap / peer "
                "| qemu-nbd qcow2 snapshot (information) | ddsnap / qemu-nbd |",
                "|---|---:|---:|---|---:|---:|---:|---:|"]
        for wl in workloads(self.a):
            for n in self.a.snapshots:
                d, _ = self.cell(wl, n, "ddsnap")
                dm = self.runs(wl.key, n, "ddsnap")
                if wl.kind in ("write", "overwrite"):
                    p, _ = self.cell(wl, n, "qemu")
                    r = self.ratio_cell(dm, self.runs(wl.key, n, "qemu"), wl.metric)
                    rows.append(f"| {wl.title} | {n} | {d} | qemu-nbd qcow2 active layer "
                                f"| {p} | {r} | | |")
                else:
                    p, _ = self.cell(wl, n, "nbdkit")
                    q, _ = self.cell(wl, n, "qemu")
                    r = self.ratio_cell(dm, self.runs(wl.key, n, "nbdkit"), wl.metric)
                    rq = self.ratio_cell(dm, self.runs(wl.key, n, "qemu"), wl.metric)
                    rows.append(f"| {wl.title} | {n} | {d} | nbdkit file (raw) | {p} "
                                f"| {r} | {q} | {rq} |")
        return "\n".join(rows)

    def flatness_table(self) -> str:
        a = self.a
        wls = [w for w in workloads(a) if w.kind in ("write", "overwrite")]
        ns = [n for n in a.snapshots if n > 1]
        if not wls or 1 not in a.snapshots or not ns:
            return ""
        rows = ["| workload | N | ddsnap at N / at N=1 "
                "| qemu-nbd qcow2 at N / at N=1 (information) |",
                "|---|---:|---:|---:|"]
        for wl in wls:
            for n in ns:
                d = self.ratio_cell(self.runs(wl.key, n, "ddsnap"),
                                    self.runs(wl.key, 1, "ddsnap"), wl.metric)
                q = self.ratio_cell(self.runs(wl.key, n, "qemu"),
                                    self.runs(wl.key, 1, "qemu"), wl.metric)
                rows.append(f"| {wl.title} | {n} | {d} | {q} |")
        return ("\n**Flatness**: each write figure at N snapshots divided by the same at N=1 "
                "(run i over run i; every store is made with no snapshot limit, format "
                "v3).\n\n" + "\n".join(rows) + "\n")

    def details(self) -> str:
        if not workloads(self.a):
            return "(no fio workload in this run)"
        rows = ["| workload | N | server | run | IOPS | MiB/s | moved | runtime "
                "| mean latency | p99 latency | note |",
                "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|"]
        for wl in workloads(self.a):
            for n in self.a.snapshots:
                for peer in ("ddsnap", "qemu", "nbdkit"):
                    for i, m in enumerate(self.b.results.get((wl.key, n, peer), []), 1):
                        rows.append(
                            f"| {wl.key} | {n} | {PEER_NAMES[peer]} | {i} | {m.iops:,.0f} "
                            f"| {m.mibs:,.1f} | {m.io_bytes / MiB:,.0f} MiB "
                            f"| {m.runtime_ms / 1000:.1f} s | {m.lat_mean_us:,.0f} µs "
                            f"| {m.lat_p99_us:,.0f} µs | {m.extra}"
                            + (f"; server CPU {m.cpu_us_per_io(wl.bs):,.1f} µs per I/O"
                               if m.cpu_us_per_io(wl.bs) is not None else "")
                            + f"{' (py-spy attached)' if m.profiled else ''}"
                            f"{' ⚠ wrong data (see problems)' if m.bad else ''} |")
        return "\n".join(rows)

    def markdown(self) -> str:
        a, b = self.a, self.b
        cmd = "bench/run" + ("" if not a.argv else " " + shlex.join(a.argv))
        reps = ("1 run per cell" if a.repeat == 1 else
                f"{a.repeat} runs per cell: median (min–max); a ratio pairs run i with "
                f"run i and shows the median (min–max) of those per-run ratios")
        mach = "\n".join(f"| {k} | {v} |" for k, v in b.machine_rows)
        fs = subprocess.run(["findmnt", "-no", "SOURCE,FSTYPE", "-T", a.tmpdir],
                            capture_output=True, text=True).stdout.strip() or "?"
        problems = ("\n\n".join("```\n" + p + "\n```" for p in b.problems)
                    if b.problems else "None: every fio job finished without an error, every "
                    "server stopped cleanly on SIGTERM, every verified snapshot held the "
                    "expected bytes and `ddsnap check` was clean after every ddsnap run"
                    + (", and after every merge the origin held the snapshot's bytes."
                       if "merge" in a.workloads else "."))
        notes = "\n".join(f"- {x}" for x in b.notes + b.merge_notes + b.rss_notes) \
            or "- (none)"
        ncpu = len(os.sched_getaffinity(0))
        busy = max(float(b.load_start[0]), float(b.load_end[0]))
        caveat = (f"\n**Caveat:** the 1-minute load average reached {busy:.1f} on {ncpu} CPUs "
                  f"around this run, so other processes competed for the CPUs; treat these "
                  f"figures as rough (rerun on a quiet machine).\n"
                  if busy > 0.5 * ncpu else "")
        if a.profile:
            caveat += ("\n**Profiled run** (`--profile`): py-spy sampled the ddsnap server "
                       "during its fio jobs and the served merge, so those figures (marked "
                       "\"py-spy attached\") and the ratios and targets built on them are lower "
                       "than without it: not comparable with unprofiled runs.\n")
        kept_cluster = "\n" + self.kept_cluster if self.kept_cluster else ""
        kept_cluster += "\n" + self.kept_send if self.kept_send else ""
        sizes = ", ".join(fmt_size(x) for x in a.snapcreate_origins)
        snapcreate_howto = "" if "snapcreate" not in a.workloads else f"""\
6. **Snapshot creation** (`snapcreate`), not a fio job: for each origin size of
   `--snapcreate-origins` ({sizes}), an origin file made with `truncate` (sparse: no
   data), `ddsnap init --size 1G` (a sparse store file), `ddsnap serve`, `sync`; then
   {a.snap_creates} `snap_create` requests
   (`lat1`, `lat2`, ...), each timed from connecting to the control socket to reading
   its reply (the wall time of the operation behind `ddsnap snap create`, including
   the flush of the origin it does); then, for information, {a.cli_creates} whole
   `ddsnap snap create STORE NAME` commands and {a.cli_creates} `ddsnap --version`
   commands, timed as processes.  The command adds a Python interpreter start-up and
   ddsnap's imports (what `ddsnap --version` costs) to the same request; the target
   (< 10 ms on a 64 GiB origin) is for the operation.  The table gives the first request
   on its own (a cold start).  Checks: the control socket's `snap_list` must list every
   snapshot in order, and `ddsnap check` must be clean after the server stopped.

"""
        scaling_howto = "" if not set(SCALING_FIO) & set(a.workloads) else f"""\
   Issue 9's workloads (with `--scaling`; see its section for the criteria):
   - **4 KiB random overwrites** (`overwrite4k`: `rw=randwrite bs=4k
     iodepth={a.iodepth_rand}`, `time_based` for {a.duration:g} s): fresh setup as for the
     writes, then one sequential pass of 1 MiB writes over the whole volume (not timed:
     every chunk copied out once), `sync`, then the timed job, in which every write
     lands on a chunk that is already the origin's own (no copy-out; the store must not
     grow, else a problem is reported).  The qcow2 image gets the same.
   - **4 KiB random reads of the newest snapshot** (`randread4k-newest`: as 4., of
     `snapN` instead of `snap1`, in the same setup): the copy-outs the setup made are
     read by every snapshot, so the oldest and the newest read the same exceptions.

"""
        rss_howto = "" if "rss" not in a.workloads else f"""\
7. **Peak RSS** (`rss`), on a {fmt_size(a.rss_origin_size)} origin made with `truncate`
   (sparse; `--rss-origin-size`) and a {fmt_size(a.rss_store_size)} store file
   (`ddsnap init --size`, sparse too; `--rss-store-size`), chunk
   {fmt_size(a.chunk_size)}: `ddsnap serve`, one snapshot `snap1` (control socket),
   `sync`, then one after the other, each for {a.duration:g} s: 4 KiB random writes over
   the **whole** origin (`rw=randwrite bs=4k iodepth={a.iodepth_rand}`, nearly every
   write a copy-out of a chunk not yet written), 1 MiB sequential writes over its first \
{fmt_size(a.rss_seq_size)}
   (`--rss-seq-size`; `rw=write bs=1m iodepth={a.iodepth_seq} size=...`, one pass or
   {a.duration:g} s), then reads of `snap1`: 1 MiB sequential over the same first
   {fmt_size(a.rss_seq_size)} and 4 KiB random over the whole volume (both
   `time_based`).  After the jobs, `VmHWM` (the kernel's peak resident set size of the
   process) and `VmRSS` are read from `/proc/PID/status` of the server, whose PID is the
   `ddsnap serve` Python process itself (checked once through `/proc/PID/exe` and its
   children; see the setup notes), added up over its child processes when it has them
   (`serve --workers`: an upper bound, each process peaking when it does); `VmHWM` is
   also read after each job.  Then (not
   counted) about 64 sampled chunks of `snap1`, half of them in the sequentially rewritten
   range, must read as zeros (it was taken of an all-zero origin), the origin's first
   chunk must not, and `ddsnap check` must be clean after the server stopped.
   {a.repeat} run(s), each with a fresh store and server.  Target: < 256 MiB.

"""
        merge_howto = "" if "merge" not in a.workloads else f"""\
5. **Merge of a snapshot into the origin** (`ddsnap merge`, an online rollback), not a
   fio job.  Setup, fresh for every run: copy the raw bytes to the origin, `ddsnap init`,
   serve, take `snap1` (control socket), then overwrite the first
   {fmt_size(b.merge_bytes)} of the origin **through ddsnap** (fio
   `rw=write bs=1m iodepth={a.iodepth_seq}` on the NBD origin export), so that every
   overwritten chunk is copied out into snap1's exceptions first; the snapshot's
   exceptions are then exactly those bytes.  Then `sync` and drop the page cache (see
   the table), and time the merge of snap1 (without `--keep`, so snap1 is deleted at the
   end) until it is complete:
   - **local**: stop the server (SIGTERM), then time the whole command
     `ddsnap merge STORE snap1 --wait --no-progress` (Python start, open, merge, close);
   - **served**: the server keeps running; time from starting
     `ddsnap merge STORE snap1 --no-progress` (which starts the merge through the
     control socket and returns) until the control socket's `merge_status` (the operation
     behind `ddsnap merge STORE --status --json`, asked directly on the socket every
     0.1 s so that polling costs no Python start-ups) returns null; then
     `ddsnap merge STORE --status --json` is run once and must print `null`.

   MiB/s = bytes of the snapshot's exceptions / that wall time.  Each merge step copies
   a linear run of up to 32 chunks in one read from the store and one write to the
   origin, then `fdatasync`s the origin and commits the store's journal.  Checks (not
   timed): the origin **file** is compared with the snapshot's saved raw copy (`cmp` with
   the original bytes; for the served merge also the origin export read back with
   `nbdcopy` while still served), `ddsnap check` must print clean and `ddsnap status`
   must show no merge and no snapshot left; otherwise the row says ⚠ WRONG DATA / not
   clean and *Problems seen* has the details.  Then, in the same run, two copies of the
   same number of bytes, each after `sync` + dropping the page cache again:
   - **`dd` between the same files**: `dd if=STORE of=ORIGIN bs=1M count=N/1MiB
     skip=S iflag=skip_bytes conv=notrunc,fsync`, i.e. read the store from where the
     exceptions were written (S = the offset where the stretch of the store file holding
     the most allocated data starts, found with `SEEK_DATA`/`SEEK_HOLE`; the details
     table gives the share of that range that is allocated, not holes) and overwrite the
     origin in place from offset 0, as the merge did, with one `fsync` at the end (the
     merge syncs every step instead);
   - **`cp`**: `cp --sparse=never SRC NEW && sync NEW` where SRC is a file of exactly
     that many bytes (the original raw file itself when the whole origin is merged) and
     NEW a new file in the same directory (`{b.cp_version}`, which copies with
     `copy_file_range` inside the kernel).

   Both copies end with their data synced, like the merge.  `cp` is the plain-copy
   reference; `dd` is the closest plain copy between the same two files.

"""
        return f"""# ddsnap benchmarks

This file is written by `bench/run` (source: `bench/ddsnap_bench/`); rerun it rather than
editing the numbers by hand.  It measures the same fio jobs over NBD against ddsnap and
against established NBD servers, how the write figures hold up with many snapshots, how
fast `ddsnap merge` rolls the origin back to a snapshot compared with plain `dd` / `cp`
copies of the same number of bytes, how long taking a snapshot takes, and how much
memory the server uses for a 1 TiB origin.  The first table compares the results with
the targets of issue 4; with `--scaling`, the section "Snapshot count scaling (issue 9)"
judges issue 9's criteria instead.  Nothing fails the run on a threshold.

## Latest results

<!-- table-start -->
Run {b.started.strftime('%Y-%m-%d %H:%M UTC')} with `{cmd}`: volume {fmt_size(a.size)},
chunk / cluster {fmt_size(a.chunk_size)}, {a.duration:g} s per fio run, iodepth
{a.iodepth_rand} (4 KiB) / {a.iodepth_seq} (1 MiB), {reps}; N = snapshots taken.
{caveat}
**Targets** (issue 4).  A ratio is computed per repetition (run i of ddsnap over run i of
the peer, or over run i at N=1) and shown as the median (min–max) of those per-run
ratios; the snapshot creation time is over its {a.snap_creates} requests and the peak RSS
over {a.repeat} fresh server(s).  "Met" is judged on the median; "not measured" means the
run did not include what the row needs.

{self.targets_table()}

**Targets** (issue 11: the csnap metadata server and workers), ddsnap served with
{self.workers_text()}; ratios per repetition as above, at N=1; "no worse than" is met
within 10% of the figure before issue 11 (the run-to-run spread seen on this machine).

{self.issue11_table()}

**Every fio figure**:

{self.table()}
{self.flatness_table()}{self.merge_section()}\
{self.snapcreate_section()}{self.rss_section()}<!-- table-end -->

The ratio is ddsnap's figure divided by the peer's (for the merge: by `dd`'s or `cp`'s),
above 1: ddsnap is faster.
The whole run took {b.elapsed / 60:.1f} minutes.

### Machine

| | |
|---|---|
{mach}
| data directory | `{a.tmpdir}` on {fs} (temporary directory, removed afterwards) |
| I/O path | {b.access_text} |
| load average (1, 5, 15 min) | {' '.join(b.load_start)} at the start, \
{' '.join(b.load_end)} at the end (other work on the machine shows here) |
{self.scaling_section()}{kept_cluster}
## How to run it

```
bench/run                      # defaults: --snapshots 1,64,1024 --size 1G --duration 10 --repeat 3
bench/run --quick              # smoke run of every workload (64 MiB, 2 s runs, N = 1,64, 1 run), \
to bench/out/quick.md
bench/run --snapshots 1,64 --size 4G --duration 30 --out /tmp/b.md
bench/run --workloads merge --size 1G --merge-fraction 0.5 --out /tmp/m.md   # merge only
bench/run --workloads snapcreate,rss --out /tmp/s.md       # snapshot creation and peak RSS only
bench/run --profile --repeat 1 --out /tmp/p.md            # py-spy profiles of the ddsnap server
bench/run --scaling            # issue 9: N = 1,1024,10000, to docs/benchmarks-scaling.md
bench/run --scaling --duration 2 --repeat 1 --size 64M --out /tmp/s.md    # its smoke run
bench/run --cluster            # issue 12: failover time, a node's IOPS on another host
bench/run --cluster --quick    # its smoke run, to bench/out/quick.md
bench/run --send               # issue 13: incremental against full send, send | receive
bench/run --send --quick       # its smoke run (256 MiB, 1 run), to bench/out/quick.md
```

`bench/run` first runs `scripts/setup` (fio, qemu-utils, nbdkit, libnbd-bin, the venv) and
installs the `bench` extra of `pyproject.toml` (py-spy) into the venv, then runs
`bench/bench.py` with the project's venv.  A default run takes about {DEFAULT_RUN_MINUTES}
minutes on a 2-CPU machine.  Other parameters: `--chunk-size` (ddsnap chunk and qcow2
cluster, default 64K), `--iodepth-rand`, `--iodepth-seq`, `--workloads` (default
`{",".join(DEFAULT_WORKLOADS[:4])},`
`{",".join(DEFAULT_WORKLOADS[4:])}`; also `{",".join(SCALING_FIO)},scaling`, the
default with `--scaling`: `{",".join(SCALING_WORKLOADS)}`), `--qcow2-max-snapshots`
(largest N the qcow2 peer runs at, default {DEFAULT_QCOW2_MAX}), `--merge-fraction` (share of the
origin overwritten after the snapshot and so merged back, default 1), \
`--merge-modes` (`local,served`),
`--snap-creates` (K, default 20), `--cli-creates` (default 3), `--snapcreate-origins`
(default `64G,1G`), `--rss-origin-size` (default 1T), `--rss-store-size` (default 64G),
`--rss-seq-size` (default 4G), `--profile` and `--profile-rate` (default 250 samples/s),
`--scaling-count` (default 10000), `--create-samples` (default 50), `--delete-fills`
(default `0,100000`), `--delete-exclusive` (default `100,1000`), `--delete-chunk-size`
(default 4K), `--delete-write-points` (default 100),
`--tmpdir`, `--access` (`nbd` engine or `nbdfuse`), `--samples`, `--sample-snapshots`
(default 64), `--no-verify`, `--keep`,
and `--rev REV` to benchmark ddsnap as committed in REV (run from a `git archive` in the
temporary directory) rather than the working tree.
Every server is stopped and the temporary directory removed on exit, also on failure
or Ctrl-C.  Every run also saves its results to `bench/out/last-run.pickle`;
`bench/run --from-state bench/out/last-run.pickle [--out FILE]` writes the report again
from them without running anything.

{cluster_howto()}
{send_howto()}
## What is compared

- **ddsnap**: `ddsnap serve STORE --listen unix:SOCK` on a store made with
  `ddsnap init --chunk-size {fmt_size(a.chunk_size)}` for a raw origin file (format v3:
  no snapshot limit, the same kind of store for every N).  Snapshots are taken while the
  store is served, with `snap_create` requests sent straight to its control socket (the
  operation `ddsnap snap create` sends), so that 10,000 snapshots do not cost 10,000
  Python start-ups; a setup sends them on one connection, up to {CTL_DEPTH} ahead of
  their replies (the server still runs each, committed, one after the other).
- **qemu-nbd qcow2**: a qcow2 image (`qemu-img convert -O qcow2 -o cluster_size=...` of
  the same raw bytes) with the same number of internal snapshots (`qemu-img snapshot -c`,
  taken offline since qemu-nbd locks the image; for each N the image is made once and
  copied for every run, since each `qemu-img snapshot -c` gets slower as snapshots
  accumulate and 1024 of them take minutes; beyond N = {a.qcow2_max_snapshots}
  (`--qcow2-max-snapshots`) qcow2 is not run), served with `qemu-nbd --cache=writeback
  --aio=threads` (qemu's defaults): the active layer for writes, `--read-only
  --load-snapshot=snapshot.name=SNAP` for reads.  The peer for the write workloads.
- **nbdkit file**: `nbdkit --readonly file file=RAW` on a raw file holding exactly the bytes
  of the snapshot being read.  The peer for the read workloads (the cost of serving the
  same bytes with no snapshot machinery at all); the qcow2 snapshot read is shown
  alongside for information.

All files live in the same directory, on the same filesystem, and use the page cache
(none of the servers uses O_DIRECT); the machine has far more memory than the data, so
reads are mostly served from the page cache and the figures measure the servers' own
cost more than the disk.  `sync` runs before every measured fio job so that writeback
of the setup does not overlap it.  One difference is inherent, not a setting: ddsnap makes
every copy-out durable before the origin write that needs it (its invariant 3), which
takes `fsync`s in the write path, while qemu-nbd in writeback mode only flushes when the
client asks; fio sends no flush here.

## How each workload is run

The origin is {fmt_size(a.size)} of random bytes (`os.urandom`), so reads are real.

1. **4 KiB random writes** (`rw=randwrite bs=4k iodepth={a.iodepth_rand}`) and
2. **1 MiB sequential writes** (`rw=write bs=1m iodepth={a.iodepth_seq}`) to the origin:
   fresh setup for every run (copy the raw bytes, `ddsnap init` / copy of the qcow2
   image, take N snapshots), then at once one fio job.  The job stops after one pass over
   the volume or after {a.duration:g} s, whichever comes first (`runtime` without
   `time_based`), so no block is written twice in a sequential run and every write goes
   to a volume all of whose chunks were just snapshotted: the copy-on-write path (for
   4 KiB writes, a {fmt_size(a.chunk_size)} chunk is copied out on the first write to it
   and later writes to the same chunk do not copy).  After each ddsnap run the data is
   checked (see below).  **Flatness** divides each figure at N by the same at N=1, run i
   by run i; issue 4's targets use N = 64 and 1024.
3. **1 MiB sequential reads** (`rw=read bs=1m iodepth={a.iodepth_seq}`) and
4. **4 KiB random reads** (`rw=randread bs=4k iodepth={a.iodepth_rand}`) of snapshot
   `snap1`, each `time_based` for {a.duration:g} s.  Setup: take N snapshots, then
   overwrite **every other chunk** of the origin through NBD (fio `rw=write:CHUNK
   bs=CHUNK io_size=half`), so half of `snap1` is read from exceptions in the store and
   half from the unchanged origin (a 1 MiB read touches both).  The same is done on the
   qcow2 image before `qemu-nbd -l snap1` serves it; nbdkit serves the untouched raw
   file, which holds the snapshot's bytes.  Before the timed runs the qcow2 `snap1` is
   read back whole with `nbdcopy` and compared with the raw file, and the ddsnap
   snapshots are checked as below.  The read targets use N=1.

{scaling_howto}{merge_howto}{snapcreate_howto}{rss_howto}\
**Data checks** (not timed): after every ddsnap write run and before the ddsnap reads,
the first and the last snapshot are read back whole with `nbdcopy` and compared with the
original bytes (`cmp`), and {a.samples} chunks at random offsets (the same for all) are read
from every snapshot (from {a.sample_snapshots} of them, evenly spread from the first to the
last, when there are more: `--sample-snapshots`) with a small NBD client
(`bench/ddsnap_bench/nbdclient.py`) and compared too.
A figure measured on a server that then failed a check is marked "⚠ wrong data" (and its
target row says "no (wrong data)"); the check's output is under *Problems seen*.
`ddsnap check` runs on every store after its server stopped.

`randrepeat=1`, so every server sees the same random offsets.  One fio job, one NBD
connection.

## Setup notes from this run

{notes}

## Profiles of the ddsnap server

{self.profile_section()}
## Every fio run

{self.details()}

## Every merge run

{self.merge_details() if "merge" in a.workloads else "(the merge workload was not run)"}

## Problems seen

{problems}
"""
