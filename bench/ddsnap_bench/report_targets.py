"""The report's first table: each target of issue 4 (writes against qcow2 at one
snapshot, their flatness at N = 64 and 1024, snapshot reads against nbdkit, merge
against ``cp``, snapshot creation time, peak RSS), measured, the target, met or not."""

from __future__ import annotations

import os
import statistics

from .common import GiB, MiB, fmt_size, stats_text
from .report_base import ReportBase
from .results import Measure, all_workloads

PEER_NAMES = {"qemu": "qcow2", "nbdkit": "nbdkit file"}
#: the ratios issue 11's "no worse than today" compares with: docs/benchmarks.md of the
#: run of 2026-11-21 (one process, before the csnap workers), medians
BEFORE_ISSUE_11 = {"seqwrite1m": 1.04, "seqread1m": 1.11, "merge-local": 0.87,
                   "merge-served": 0.88}


class TargetsReport(ReportBase):
    """Issue 4's targets table."""

    def targets(self) -> list[tuple[str, str, str, str, str]]:
        """``(what, measured, target, met, note)`` for each target of issue 4."""
        a, b = self.a, self.b
        W = {w.key: w for w in all_workloads(a)}
        cs = fmt_size(a.chunk_size)
        rows = []

        def r2(v: float) -> str:
            return f"{v:.2f}"

        def add(what, vals, fmt, target, ok, note="", bad=False, profiled=False, why="",
                unit=""):
            if not vals:
                rows.append((what, "–", target, "not measured", why or note))
                return
            med = statistics.median(vals)
            measured = (stats_text(vals, fmt) + unit
                        + (" (py-spy attached)" if profiled else ""))
            met = "no (wrong data)" if bad else ("yes" if ok(med) else "no")
            rows.append((what, measured, target, met, note))

        def fio_ratio(what, xs, ys, metric, target, limit, note="", why=""):
            add(what, self.paired(xs, ys, metric), r2, target, lambda v: v >= limit, note,
                bad=any(m.bad for m in xs + ys), profiled=any(m.profiled for m in xs + ys),
                why=why)

        def med(ms: list[Measure], metric: str) -> str:
            if not ms:
                return "–"
            v = statistics.median(m.value(metric) for m in ms)
            return f"{v:,.0f} IOPS" if metric == "iops" else f"{v:,.1f} MiB/s"

        # writes at one snapshot, against qcow2
        for key, what in (("randwrite4k", "4 KiB random write IOPS"),
                          ("seqwrite1m", "1 MiB sequential write MiB/s")):
            wl = W[key]
            xs, ys = self.runs(key, 1, "ddsnap"), self.runs(key, 1, "qemu")
            fio_ratio(f"{what}, 1 snapshot, ddsnap / qemu-nbd qcow2 ({cs} chunks vs {cs} "
                      f"clusters)", xs, ys, wl.metric, "≥ 1.0", 1.0,
                      f"medians: ddsnap {med(xs, wl.metric)}, qcow2 {med(ys, wl.metric)}",
                      why="needs N=1 and this workload in the run")
        # flatness
        flat_ns = [64, 1024]
        for n in flat_ns:
            for key, what in (("randwrite4k", "4 KiB random write IOPS"),
                              ("seqwrite1m", "1 MiB sequential write MiB/s")):
                wl = W[key]
                xs, ys = self.runs(key, n, "ddsnap"), self.runs(key, 1, "ddsnap")
                q = self.ratio_cell(self.runs(key, n, "qemu"), self.runs(key, 1, "qemu"),
                                    wl.metric)
                fio_ratio(f"{what} at N={n} snapshots / at N=1, ddsnap", xs, ys, wl.metric,
                          "≥ 0.9", 0.9,
                          f"qemu-nbd qcow2's own ratio: {q} (information)",
                          why=f"needs N=1 and N={n} in --snapshots")
        # snapshot reads against nbdkit
        n0 = 1 if 1 in a.snapshots else a.snapshots[0]
        for key, what in (("seqread1m", "1 MiB sequential read MiB/s"),
                          ("randread4k", "4 KiB random read IOPS")):
            wl = W[key]
            xs, ys = self.runs(key, n0, "ddsnap"), self.runs(key, n0, "nbdkit")
            fio_ratio(f"{what} of a snapshot (N={n0}) / nbdkit file plugin on the same raw "
                      f"bytes", xs, ys, wl.metric, "≥ 0.7", 0.7,
                      f"medians: ddsnap {med(xs, wl.metric)}, nbdkit {med(ys, wl.metric)}",
                      why="this workload was not in the run")
        # merge against cp
        for mode in a.merge_modes:
            ms = b.merge_runs.get(mode, [])
            vals = [m.mibs / m.cp_mibs for m in ms if m.cp_mibs]
            note = ""
            if ms:
                note = (f"medians: merge {statistics.median(m.mibs for m in ms):,.1f} MiB/s, "
                        f"cp {statistics.median(m.cp_mibs for m in ms if m.cp_mibs):,.1f} "
                        f"MiB/s; {fmt_size(ms[0].nbytes)}")
            add(f"merge MiB/s / `cp` of the same bytes ({mode})", vals, r2, "≥ 0.8",
                lambda v: v >= 0.8, note, bad=any(m.bad or m.unclean for m in ms),
                profiled=any(m.profiled for m in ms),
                why="the merge workload was not in the run")
        # snap create
        runs = {r.origin_size: r for r in b.snapcreate_runs}
        size = 64 * GiB if 64 * GiB in a.snapcreate_origins else max(a.snapcreate_origins)
        r = runs.get(size)
        note = ""
        if r is not None:
            note = (f"{len(r.ctl_ms)} `snap_create` round trips on the control socket; "
                    + (f"whole `ddsnap snap create` command "
                       f"{stats_text(r.cli_ms, lambda v: f'{v:.0f}')} ms (information, "
                       f"with the interpreter's start-up); " if r.cli_ms else "")
                    + "; ".join(f"{fmt_size(o.origin_size)} origin: "
                                f"{stats_text(o.ctl_ms, lambda v: f'{v:.2f}')} ms"
                                for o in b.snapcreate_runs if o.origin_size != size))
        add(f"`snap create` wall time on a {fmt_size(size)} sparse origin (control socket)",
            r.ctl_ms if r else [], lambda v: f"{v:.2f}", "< 10 ms", lambda v: v < 10,
            note.rstrip("; "), bad=bool(r and r.unclean),
            why="the snapcreate workload was not in the run", unit=" ms")
        # peak RSS
        add(f"peak RSS (VmHWM) of `ddsnap serve` on a {fmt_size(a.rss_origin_size)} sparse "
            f"origin through the fio jobs", [x.hwm / MiB for x in b.rss_runs],
            lambda v: f"{v:,.1f}", "< 256 MiB", lambda v: v < 256,
            f"{len(b.rss_runs)} run(s), a fresh server each" if b.rss_runs else "",
            bad=any(x.bad for x in b.rss_runs), why="the rss workload was not in the run",
            unit=" MiB")
        return rows

    def issue11_targets(self) -> list[tuple[str, str, str, str, str]]:
        """``(what, measured, target, met, note)`` for each target of issue 11 (serve at
        its default: a metadata server and a worker per CPU).  "No worse than today"
        compares with :data:`BEFORE_ISSUE_11` and is met within the run-to-run spread
        this machine shows (10%)."""
        a, b = self.a, self.b
        W = {w.key: w for w in all_workloads(a)}
        rows = []

        def r2(v: float) -> str:
            return f"{v:.2f}"

        def fio(what, key, peer, limit, target, note=""):
            wl = W[key]
            xs, ys = self.runs(key, 1, "ddsnap"), self.runs(key, 1, peer)
            vals = self.paired(xs, ys, wl.metric)
            if not vals:
                rows.append((what, "–", target, "not measured",
                             "needs N=1 and this workload in the run"))
                return
            med = statistics.median(vals)
            bad = any(m.bad for m in xs + ys)
            prof = any(m.profiled for m in xs + ys)
            unit = "IOPS" if wl.metric == "iops" else "MiB/s"
            figs = (f"medians: ddsnap {statistics.median(m.value(wl.metric) for m in xs):,.0f}"
                    f" {unit}, {PEER_NAMES[peer]} "
                    f"{statistics.median(m.value(wl.metric) for m in ys):,.0f} {unit}")
            rows.append((what, stats_text(vals, r2) + (" (py-spy attached)" if prof else ""),
                         target, "no (wrong data)" if bad else ("yes" if med >= limit else "no"),
                         figs + (f"; {note}" if note else "")))

        def info(key, peer) -> str:
            wl = W[key]
            vals = self.paired(self.runs(key, 1, "ddsnap"), self.runs(key, 1, peer), wl.metric)
            return (f"{PEER_NAMES[peer]}: {stats_text(vals, r2)} (information)"
                    if vals else "")

        fio("4 KiB random overwrites of already-unique origin chunks, one connection, "
            "ddsnap / qemu-nbd qcow2", "overwrite4k", "qemu", 1.0, "≥ 1.0",
            info("overwrite4k", "nbdkit"))
        fio("the same, two connections, ddsnap / qemu-nbd qcow2", "overwrite4k-2c", "qemu",
            1.0, "≥ 1.0", info("overwrite4k-2c", "nbdkit"))
        fio("4 KiB random reads of a snapshot, one connection, ddsnap / nbdkit file",
            "randread4k", "nbdkit", 0.9, "≥ 0.9")
        fio("4 KiB random reads of a snapshot, two connections, ddsnap / nbdkit file",
            "randread4k-2c", "nbdkit", 0.9, "≥ 0.9")
        fio("4 KiB random writes right after a snapshot (copy-on-write), ddsnap / qemu-nbd "
            "qcow2", "randwrite4k", "qemu", 1.5, "≥ 1.5")
        for key, what, peer in (("seqwrite1m", "1 MiB sequential writes, ddsnap / qemu-nbd "
                                 "qcow2", "qemu"),
                                ("seqread1m", "1 MiB sequential reads of a snapshot, ddsnap "
                                 "/ nbdkit file", "nbdkit")):
            before = BEFORE_ISSUE_11[key]
            fio(what, key, peer, 0.9 * before, f"no worse than {before:.2f}",
                f"before issue 11: {before:.2f}")
        for mode in a.merge_modes:
            ms = b.merge_runs.get(mode, [])
            vals = [m.mibs / m.cp_mibs for m in ms if m.cp_mibs]
            before = BEFORE_ISSUE_11[f"merge-{mode}"]
            what = f"merge MiB/s / `cp` of the same bytes ({mode})"
            if not vals:
                rows.append((what, "–", f"no worse than {before:.2f}", "not measured",
                             "the merge workload was not in the run"))
                continue
            bad = any(m.bad or m.unclean for m in ms)
            rows.append((what, stats_text(vals, r2), f"no worse than {before:.2f}",
                         "no (wrong data)" if bad else
                         ("yes" if statistics.median(vals) >= 0.9 * before else "no"),
                         f"before issue 11: {before:.2f}"))
        runs = {r.origin_size: r for r in b.snapcreate_runs}
        size = 64 * GiB if 64 * GiB in a.snapcreate_origins else max(a.snapcreate_origins)
        r = runs.get(size)
        what = (f"`snap create` on a {fmt_size(size)} sparse origin, served with "
                f"{self.workers_text()} (control socket)")
        if r is None:
            rows.append((what, "–", "< 20 ms", "not measured",
                         "the snapcreate workload was not in the run"))
        else:
            rows.append((what, stats_text(r.ctl_ms, lambda v: f"{v:.2f}") + " ms", "< 20 ms",
                         "no (unclean)" if r.unclean else
                         ("yes" if statistics.median(r.ctl_ms) < 20 else "no"),
                         f"{len(r.ctl_ms)} requests on an idle server"))
        return rows

    def workers_text(self) -> str:
        """How the ddsnap servers of the run were started, in words."""
        w = self.a.serve_workers
        if w is None:
            return (f"serve's default workers ({len(os.sched_getaffinity(0))} on this "
                    "machine)")
        return "one process (--workers 0)" if w == 0 else f"--workers {w}"

    def issue11_table(self) -> str:
        rows = ["| target | measured: median (min–max) | target | met | notes |",
                "|---|---:|---:|---|---|"]
        rows += [f"| {w} | {m} | {t} | {ok} | {n} |" for w, m, t, ok, n in
                 self.issue11_targets()]
        return "\n".join(rows)

    def targets_table(self) -> str:
        rows = ["| target | measured: median (min–max) | target | met | notes |",
                "|---|---:|---:|---|---|"]
        rows += [f"| {w} | {m} | {t} | {ok} | {n} |" for w, m, t, ok, n in self.targets()]
        return "\n".join(rows)
