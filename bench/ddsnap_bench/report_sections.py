"""The report's sections of the workloads that are not fio jobs (merge, snapshot
creation, peak RSS), and the hottest functions of the py-spy profiles."""

from __future__ import annotations

import collections
import statistics

from .common import MiB, fmt_size, stats_text
from .report_base import ReportBase


class WorkloadSections(ReportBase):
    """The merge, snapcreate, rss and profile sections."""

    MERGE_MODES = {
        "local": "local: `ddsnap merge STORE snap1 --wait --no-progress`, store not served",
        "served": "served: `ddsnap merge STORE snap1` via the control socket, then "
                  "`merge_status` polled until null",
    }

    def merge_cell(self, vals: list[float], secs: list[float] | None = None) -> tuple[str, float]:
        vals = sorted(vals)
        med = statistics.median(vals)
        text = f"{med:,.1f} MiB/s"
        if len(vals) > 1:
            text += f" ({vals[0]:,.1f}–{vals[-1]:,.1f})"
        if secs:
            text += f" in {statistics.median(secs):.2f} s"
        return text, med

    def merge_table(self) -> str:
        b = self.b
        rows = ["| merge | snapshot data merged | ddsnap merge | `dd` store → origin (same "
                "files, in place) | ddsnap / dd | `cp --sparse=never` (same-size file → new "
                "file) | ddsnap / cp | after the merge |",
                "|---|---:|---:|---:|---:|---:|---:|---|"]
        for mode in self.a.merge_modes:
            ms = b.merge_runs.get(mode, [])
            if not ms:
                err = b.merge_errors.get(mode)
                rows.append(f"| {self.MERGE_MODES[mode]} | – | "
                            f"{'FAILED (see problems)' if err else '–'} | – | – | – | – | – |")
                continue
            d, _ = self.merge_cell([m.mibs for m in ms], [m.merge_s for m in ms])
            if any(m.profiled for m in ms):
                d += " (py-spy attached)"
            dds = [m.dd_mibs for m in ms if m.dd_mibs]
            cps = [m.cp_mibs for m in ms if m.cp_mibs]
            dd, _ = self.merge_cell(dds, [m.dd_s for m in ms if m.dd_s]) if dds else ("–", None)
            cp, _ = self.merge_cell(cps, [m.cp_s for m in ms if m.cp_s]) if cps else ("–", None)

            def per_run(vals: list[float]) -> str:  # run i over run i
                return stats_text(vals, lambda v: f"{v:.2f}") if vals else "–"

            rdd = per_run([m.mibs / m.dd_mibs for m in ms if m.dd_mibs])
            rcp = per_run([m.mibs / m.cp_mibs for m in ms if m.cp_mibs])
            if any(m.bad for m in ms):
                after = "⚠ **WRONG DATA** (see problems)"
            else:
                after = "origin == snapshot's bytes (`cmp`)"
            after += ("; ⚠ **`ddsnap check` / status not clean** (see problems)"
                      if any(m.unclean for m in ms) else "; `ddsnap check` clean")
            if any(m.bad for m in ms):
                d += " ⚠ wrong data"
            rows.append(f"| {self.MERGE_MODES[mode]} | {fmt_size(ms[0].nbytes)} | {d} | {dd} "
                        f"| {rdd} | {cp} | {rcp} | {after} |")
        return "\n".join(rows)

    def merge_details(self) -> str:
        rows = ["| merge | run | merged | chunks | ddsnap merge | server's chunks/s "
                "| `dd` | dd source allocated | `cp` | overwrite before (NBD) "
                "| store chunks used before the merge | note |",
                "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for mode in self.a.merge_modes:
            for i, m in enumerate(self.b.merge_runs.get(mode, []), 1):
                srate = f"{m.server_rate:,.0f}" if m.server_rate else "–"
                dd = f"{m.dd_s:.2f} s = {m.dd_mibs:,.1f} MiB/s" if m.dd_s else "–"
                alloc = f"{m.dd_alloc:.0%}" if m.dd_alloc is not None else "–"
                cp = f"{m.cp_s:.2f} s = {m.cp_mibs:,.1f} MiB/s" if m.cp_s else "–"
                note = []
                if m.status_s is not None:
                    note.append(f"one `ddsnap merge --status --json` call took {m.status_s:.2f} s")
                if m.bad:
                    note.append("⚠ WRONG DATA (see problems)")
                if m.unclean:
                    note.append("⚠ check/status not clean (see problems)")
                rows.append(f"| {mode} | {i} | {fmt_size(m.nbytes)} | {m.chunks} "
                            f"| {m.merge_s:.2f} s = {m.mibs:,.1f} MiB/s | {srate} | {dd} "
                            f"| {alloc} | {cp} | {m.overwrite_mibs:,.1f} MiB/s "
                            f"| {m.used_after_overwrite} | {'; '.join(note)} |")
        return "\n".join(rows)

    def merge_section(self) -> str:
        b, a = self.b, self.a
        if "merge" not in a.workloads:
            return ""
        cache = {"cold": "page cache dropped (`sync; echo 3 > /proc/sys/vm/drop_caches`) "
                         "before each of the three timed copies: all cold",
                 "warm": "page cache NOT dropped (not allowed): all warm",
                 None: "page cache: –"}[b.cache_mode]
        nbytes = b.merge_bytes
        share = "all" if nbytes == a.size else f"{nbytes / a.size:.0%}"
        what = (f"{fmt_size(nbytes)} of snapshot data ({share} of the {fmt_size(a.size)} "
                f"origin overwritten after the snapshot)" if nbytes else "–")
        return f"""
**Merge of a snapshot back into the origin** (online rollback): {what}, chunk
{fmt_size(a.chunk_size)}, 1 snapshot, {cache}; MiB/s = bytes of the snapshot's exceptions
merged / wall time of the whole command; {"1 run" if a.repeat == 1 else
f"{a.repeat} runs: median (min–max); each ratio is merge / copy of the same run"}.

{self.merge_table()}
"""

    def snapcreate_section(self) -> str:
        b, a = self.b, self.a
        if "snapcreate" not in a.workloads:
            return ""
        rows = ["| origin (sparse) | `snap_create` on the control socket | first one "
                "| whole `ddsnap snap create` command (information) "
                "| `ddsnap --version` (interpreter start-up and imports) | after |",
                "|---|---:|---:|---:|---:|---|"]
        for size in a.snapcreate_origins:
            r = next((x for x in b.snapcreate_runs if x.origin_size == size), None)
            if r is None:
                err = "FAILED (see problems)" if size in b.snapcreate_errors else "–"
                rows.append(f"| {fmt_size(size)} | {err} | – | – | – | – |")
                continue

            def ms(v: float) -> str:
                return f"{v:.2f}"

            after = ("⚠ `ddsnap check` / snapshot list not as expected (see problems)"
                     if r.unclean else "every snapshot listed; `ddsnap check` clean")
            cli = stats_text(r.cli_ms, lambda v: f"{v:.0f}") + " ms" if r.cli_ms else "–"
            ver = (stats_text(r.version_ms, lambda v: f"{v:.0f}") + " ms"
                   if r.version_ms else "–")
            rows.append(f"| {fmt_size(size)} | {stats_text(r.ctl_ms, ms)} ms over "
                        f"{len(r.ctl_ms)} | {r.ctl_ms[0]:.2f} ms | {cli} | {ver} | {after} |")
        return ("\n**Snapshot creation** on a served store whose origin is a sparse file "
                "(wall time of each request; median (min–max)):\n\n" + "\n".join(rows)
                + "\n")

    def rss_section(self) -> str:
        b, a = self.b, self.a
        if "rss" not in a.workloads:
            return ""
        head = ("| run | peak RSS (VmHWM) | VmRSS at the end | VmRSS before the fio jobs "
                "| VmHWM after each job (job's figure) | data |")
        rows = [head, "|---:|---:|---:|---:|---|---|"]
        for r in b.rss_runs:
            phases = "; ".join(f"{k} ({v:,.1f} {u}): {h / MiB:,.1f} MiB"
                               for k, v, u, h in r.phases)
            data = "⚠ see problems" if r.bad else "snap1 sampled = zeros; `ddsnap check` clean"
            rows.append(f"| {r.rep + 1} | {r.hwm / MiB:,.1f} MiB | {r.rss / MiB:,.1f} MiB "
                        f"| {r.start_rss / MiB:,.1f} MiB | {phases} | {data} |")
        for e in b.rss_errors:
            rows.append(f"| – | FAILED: {e} | | | | |")
        return (f"\n**Peak RSS** of `ddsnap serve` on a {fmt_size(a.rss_origin_size)} sparse "
                f"origin ({fmt_size(a.rss_store_size)} sparse store, 1 snapshot) through the "
                f"four fio jobs:\n\n" + "\n".join(rows) + "\n")

    def profile_section(self) -> str:
        b, a = self.b, self.a
        if not a.profile:
            return ("(not profiled in this run; `bench/run --profile` samples the ddsnap "
                    "server with py-spy)")
        if not b.profiles:
            return "(--profile was given, but no profile was recorded; see problems)"
        out = [f"{b.pyspy_version} sampled the ddsnap server "
               f"(`py-spy record --pid PID --format raw --rate {a.profile_rate} --nonblocking "
               f"--function`, stopped with SIGINT after the job) during each ddsnap fio job, "
               f"the served merge and, in the scaling workload, the `snap_create` requests "
               f"timed at N and each `snap_delete`; the figures measured meanwhile are marked "
               f"\"py-spy attached\" and are lower than unprofiled ones.  Idle threads "
               f"(waiting for a request, a lock or I/O) are not sampled, so the percentages "
               f"are of the samples in which a thread was running Python code or a system "
               f"call (py-spy's idle test is a heuristic: threads woken up and waiting for "
               f"the GIL, e.g. in the thread pool's `_worker`, count as busy); each sample "
               f"has one stack per busy thread; samples of all repetitions are added up.  "
               f"`--function` gives each frame the line where its function starts.  *Self*: "
               f"samples with that function at the top of the stack; *inclusive*: samples "
               f"with it anywhere in the stack, listed for ddsnap's own functions only (the "
               f"threading, asyncio and click frames around them are in nearly every "
               f"sample).  Raw collapsed stacks: `bench/out/profiles/<job>.txt` "
               f"(flamegraph.pl / speedscope input)."]
        out.append(profile_tables(b.profiles, b.profile_runs))
        return "\n".join(out).rstrip() + "\n"


def profile_tables(profiles: dict[str, collections.Counter], runs: dict[str, int],
                   heading: str = "###") -> str:
    """Per profiled label (a subsection each, under ``heading``): the 15 functions with
    the most samples at the top of the stack (*self*) and, of ddsnap's own code,
    anywhere in it (*inclusive*), as a share of the label's samples."""
    out: list[str] = []
    for label, stacks in profiles.items():
        total = sum(stacks.values())
        if not total:
            out.append(f"\n{heading} {label}\n\n(no samples)")
            continue
        own: collections.Counter = collections.Counter()
        incl: collections.Counter = collections.Counter()
        for stack, c in stacks.items():
            frames = stack.split(";")
            own[frames[-1]] += c
            for f in set(frames):
                if "(ddsnap/" in f:  # ddsnap's own code (see the text)
                    incl[f] += c
        nruns = runs.get(label, 0)
        out.append(f"\n{heading} {label}\n\n{total:,} samples from {nruns} run(s).\n")
        for title, cnt in (("self", own), ("inclusive, ddsnap's code", incl)):
            out.append(f"| top {title} | function (file:line) | % of samples |")
            out.append("|---:|---|---:|")
            for i, (f, c) in enumerate(cnt.most_common(15), 1):
                out.append(f"| {i} | `{f.replace('|', '¦')}` | {100 * c / total:.1f} % |")
            out.append("")
    return "\n".join(out)
