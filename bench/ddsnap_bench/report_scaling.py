"""The report's "Snapshot count scaling (issue 9)" section: issue 9's criteria judged
(ddsnap at N over ddsnap at 1 for copy-on-write writes, overwrites and snapshot reads;
creation at N; deletes in time proportional to their own exceptions; metadata bytes
per exception, measured against format v2's computed figure) and the tables behind
them."""

from __future__ import annotations

import os
import shlex
import statistics

from .common import CTL_DEPTH, SCALING_FIO, fmt_size, stats_text
from .report_base import ReportBase
from .results import MetaSample, all_workloads


class ScalingReport(ReportBase):
    """The snapshot count scaling section."""

    SCALING_FIO_ROWS = (
        ("randwrite4k", "4 KiB random copy-on-write writes to the origin (right after the "
                        "N-th snapshot)"),
        ("overwrite4k", "4 KiB random overwrites of the origin (every chunk already copied "
                        "out)"),
        ("randread4k", "4 KiB random reads of the oldest snapshot (snap1)"),
        ("randread4k-newest", "4 KiB random reads of the newest snapshot (snapN)"),
    )
    META_CASES = {
        "seqwrite1m": "1 MiB sequential writes right after the N-th snapshot (sequential "
                      "copy-outs, key order)",
        "overwrite4k": "a 1 MiB sequential pass over the whole volume, then 4 KiB random "
                       "overwrites (sequential copy-outs)",
        "halfread": "every other chunk written once, in order (the read setup; sequential)",
        "randwrite4k": "4 KiB random writes right after the N-th snapshot (random copy-outs)",
    }
    CRITERION = 0.9

    def scaling_wanted(self) -> bool:
        a = self.a
        return bool(getattr(a, "scaling", False) or "scaling" in a.workloads
                    or set(SCALING_FIO) & set(a.workloads))

    def scaling_ratio(self, key: str, n: int) -> tuple[list[float], bool]:
        """ddsnap at N over ddsnap at 1, run i over run i; and whether a data check
        failed around any of those runs."""
        W = {w.key: w for w in all_workloads(self.a)}
        xs, ys = self.runs(key, n, "ddsnap"), self.runs(key, 1, "ddsnap")
        return self.paired(xs, ys, W[key].metric), any(m.bad for m in xs + ys)

    @staticmethod
    def pct(vals: list[float], q: float) -> float:
        v = sorted(vals)
        return v[min(len(v) - 1, max(0, round(q * (len(v) - 1))))]

    def delete_verdict(self) -> tuple[str, str, str]:
        """``(measured, met, note)`` for "delete one snapshot among N in time
        proportional to its own exceptions": the largest-k delete timed on the least and
        the most filled store (same k, same N); proportional to its own exceptions means
        about the same time on both."""
        fills = sorted((f for f in self.b.scale_fills if f.deletes), key=lambda f: f.extra)
        if not fills:
            return "–", "not measured", "the scaling workload was not in the run"
        kmax = max(d.k for d in fills[0].deletes)

        def t(f, k):
            return next((d.ms for d in f.deletes if d.k == k), None)

        lo, hi = fills[0], fills[-1]
        parts = [f"{f.extra:,} extra entries: " + ", ".join(
            f"k={d.k}: {d.ms:,.0f} ms" for d in f.deletes) for f in fills]
        measured = "; ".join(parts)
        if len(fills) < 2 or t(lo, kmax) is None or t(hi, kmax) is None:
            return measured, "not judged", "needs two store fills (--delete-fills)"
        growth = t(hi, kmax) / max(t(lo, kmax), 1e-3)
        eb_lo, eb_hi = lo.exceptions_before, hi.exceptions_before
        store_growth = (f"{eb_hi / eb_lo:,.0f}×" if eb_lo and eb_hi else "?")
        ok = growth <= 2
        note = (f"the k={kmax} delete took {growth:,.1f}× as long on the fuller store, "
                f"whose exceptions were {store_growth} as many; met = at most 2× (time "
                f"follows k, not the store)")
        t0_lo, t0_hi = t(lo, 0), t(hi, 0)
        if t0_lo is not None and t0_hi is not None:
            note += (f"; the delete of a snapshot with no exclusive data: {t0_lo:,.1f} ms "
                     f"and {t0_hi:,.1f} ms")
        if any(f.bad for f in fills):
            return measured, "no (see problems)", note
        return measured, "yes" if ok else "no", note

    def scaling_criteria(self) -> str:
        a, b = self.a, self.b
        rows = ["| criterion (issue 9) | measured: median (min–max) | target | met | notes |",
                "|---|---:|---:|---|---|"]
        ns = [n for n in a.snapshots if n > 1]
        W = {w.key: w for w in all_workloads(a)}
        for key, title in self.SCALING_FIO_ROWS:
            if key not in a.workloads:
                continue
            wl = W[key]
            for n in ns:
                vals, bad = self.scaling_ratio(key, n)
                med1 = [m.value(wl.metric) for m in self.runs(key, 1, "ddsnap")]
                medn = [m.value(wl.metric) for m in self.runs(key, n, "ddsnap")]
                note = (f"medians: N=1 {statistics.median(med1):,.0f} IOPS, N={n} "
                        f"{statistics.median(medn):,.0f} IOPS" if med1 and medn else "")
                c1 = [c for c in (m.cpu_us_per_io(wl.bs) for m in self.runs(key, 1, "ddsnap"))
                      if c is not None]
                cn = [c for c in (m.cpu_us_per_io(wl.bs) for m in self.runs(key, n, "ddsnap"))
                      if c is not None]
                if c1 and cn:
                    note += (f"; server CPU per I/O {statistics.median(c1):,.0f} µs at N=1, "
                             f"{statistics.median(cn):,.0f} µs at N={n}")
                q = self.ratio_cell(self.runs(key, n, "qemu"), self.runs(key, 1, "qemu"),
                                    wl.metric)
                if q != "–":
                    note += f"; qemu-nbd qcow2's own ratio {q} (information)"
                if not vals:
                    why = ("needs N=1 in --snapshots" if 1 not in a.snapshots
                           else "FAILED (see problems)")
                    rows.append(f"| {title}, ddsnap at N={n} / at N=1 | – | ≥ 0.9 "
                                f"| not measured | {why} |")
                    continue
                med = statistics.median(vals)
                met = ("no (wrong data)" if bad else
                       "yes" if med >= self.CRITERION else "no")
                rows.append(f"| {title}, ddsnap at N={n} / at N=1 "
                            f"| {stats_text(vals, lambda v: f'{v:.2f}')} | ≥ 0.9 | {met} "
                            f"| {note} |")
        for f in b.scale_fills:
            if not f.at_n_ms:
                continue
            med = statistics.median(f.at_n_ms)
            p99 = self.pct(f.at_n_ms, 0.99)
            first = (f"; the first {len(f.first_ms)} on the empty store: "
                     f"{statistics.median(f.first_ms):.2f} ms median" if f.first_ms else "")
            met = ("no (see problems)" if f.bad else "yes" if med < 10 else "no")
            rows.append(
                f"| `snap_create` with {f.n:,} snapshots in the store ({f.extra:,} extra "
                f"origin history entries) | {med:.2f} ms, p99 {p99:.2f} ms "
                f"({min(f.at_n_ms):.2f}–{max(f.at_n_ms):.2f}) | < 10 ms "
                f"| {met}{'' if p99 < 10 else ' (p99 is not)'} "
                f"| {len(f.at_n_ms)} requests, each on its own control connection{first} |")
        if not any(f.at_n_ms for f in b.scale_fills):
            rows.append(f"| `snap_create` with {a.scaling_count:,} snapshots in the store | – "
                        f"| < 10 ms | not measured | the scaling workload was not in the run |")
        m, met, note = self.delete_verdict()
        rows.append(f"| deleting one snapshot among {a.scaling_count:,} in time proportional "
                    f"to its own exceptions | {m} | ∝ k | {met} | {note} |")
        bpe = [x.bytes_per_exception for x in b.meta
               if x.bytes_per_exception and not x.case.startswith("fill")]
        rows.append(f"| metadata bytes per exception (tree blocks × 4096 / exceptions) "
                    f"| {min(bpe):.1f}–{max(bpe):.1f} bytes | (table) | information "
                    f"| see the table below |" if bpe else
                    "| metadata bytes per exception | – | (table) | not measured | |")
        return "\n".join(rows)

    def scaling_fio_table(self) -> str:
        a = self.a
        W = {w.key: w for w in all_workloads(a)}
        rows = ["| workload | N | ddsnap: median (min–max) | ddsnap at N / at N=1 "
                "| ≥ 0.9 | ddsnap server CPU per I/O | qemu-nbd qcow2 "
                "| qcow2 at N / at N=1 (information) |",
                "|---|---:|---:|---:|---|---:|---:|---:|"]
        for key, title in self.SCALING_FIO_ROWS:
            if key not in a.workloads:
                continue
            wl = W[key]
            for n in a.snapshots:
                d, _ = self.cell(wl, n, "ddsnap")
                q, _ = self.cell(wl, n, "qemu")
                if n in self.b.qcow2_skipped:
                    q = "not run (N > --qcow2-max-snapshots)"
                cpu = [m.cpu_us_per_io(wl.bs) for m in self.runs(key, n, "ddsnap")]
                cpu = [c for c in cpu if c is not None]
                cpu_t = stats_text(cpu, lambda v: f"{v:,.0f}") + " µs" if cpu else "–"
                if n == 1:
                    rows.append(f"| {title} | 1 | {d} | 1 (reference) | | {cpu_t} | {q} | |")
                    continue
                vals, bad = self.scaling_ratio(key, n)
                r = stats_text(vals, lambda v: f"{v:.2f}") if vals else "–"
                met = ("" if not vals else "⚠ wrong data" if bad else
                       "met" if statistics.median(vals) >= self.CRITERION else "NOT met")
                rq = self.ratio_cell(self.runs(key, n, "qemu"), self.runs(key, 1, "qemu"),
                                     wl.metric)
                rows.append(f"| {title} | {n:,} | {d} | {r} | {met} | {cpu_t} | {q} | {rq} |")
        return "\n".join(rows)

    def scaling_create_table(self) -> str:
        b = self.b
        rows = ["| store | snapshots already there | requests | median | p99 | min–max |",
                "|---|---:|---:|---:|---:|---:|"]
        for f in b.scale_fills:
            what = (f"{f.extra:,} extra origin history entries, chunk "
                    f"{fmt_size(f.chunk_size)}")
            for label, vals in ((f"0–{len(f.first_ms) - 1}", f.first_ms),
                                (f"{f.n:,}", f.at_n_ms)):
                if vals:
                    rows.append(f"| {what} | {label} "
                                f"| {len(vals)} | {statistics.median(vals):.2f} ms "
                                f"| {self.pct(vals, 0.99):.2f} ms "
                                f"| {min(vals):.2f}–{max(vals):.2f} ms |")
        out = "\n".join(rows)
        setup = []
        for f in b.scale_fills:
            if f.create_s:
                setup.append(f"the {f.extra:,}-entry store's {f.n:,} snapshots took "
                             f"{f.create_s:.1f} s of `snap_create` requests "
                             f"({f.n / f.create_s:,.0f}/s; origin writes between them "
                             f"{f.write_s:.1f} s more), `snap_list` at {f.n:,} "
                             f"{f.list_s:.2f} s" if f.list_s is not None else "")
        for n, secs in sorted(b.create_rates.items()):
            if n >= 1000:
                med = statistics.median(secs)
                setup.append(f"the fio setups took N={n:,} snapshots in "
                             f"{stats_text(secs, lambda v: f'{v:.1f}')} s ({n / med:,.0f}/s, "
                             f"{len(secs)} setup(s))")
        if setup:
            out += ("\n\nTaking snapshots for a setup (every request a real `snap_create`, "
                    f"up to {CTL_DEPTH} in flight on one control connection, run one after "
                    "the other by the server): " + "; ".join(x for x in setup if x) + ".")
        return out

    def scaling_delete_table(self) -> str:
        b = self.b
        rows = ["| store | exceptions before the deletes (origin history entries) "
                "| snapshot deleted | k: exclusive copy-outs made | its `exclusive` "
                "| `snap_delete` round trip | chunks freed | per exclusive chunk "
                "| per store exception |",
                "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
        for f in b.scale_fills:
            eb = f.exceptions_before
            ob = (f.meta.origin_entries + sum(d.exclusive or 0 for d in f.deletes)
                  if f.meta else None)
            store = (f"{f.n:,} snapshots, {f.extra:,} extra entries, chunk "
                     f"{fmt_size(f.chunk_size)}")
            ex = f"{eb:,} ({ob:,})" if eb is not None and ob is not None else "?"
            for d in f.deletes:
                e = "?" if d.exclusive is None else f"{d.exclusive:,}"
                per_k = f"{d.ms / d.k:.3f} ms" if d.k else "–"
                per_e = f"{d.ms * 1000 / eb:.2f} µs" if eb else "–"
                rows.append(f"| {store} | {ex} | {d.name} | {d.k:,} | {e} "
                            f"| {d.ms:,.1f} ms | {d.freed:,} | {per_k} | {per_e} |")
        for e in b.scale_errors:
            rows.append(f"| FAILED: {e} | | | | | | | | |")
        return "\n".join(rows)

    @staticmethod
    def v2_bytes(n: int) -> str:
        """Format v2's metadata per exception, computed from its layout (docs/format.md
        at ddsnap 0.2): a leaf record of W/8 + 8 bytes (sharemap, store chunk) and an
        8-byte map entry per logical chunk, 4024 bytes of records and map per 4096-byte
        leaf; W = N rounded up to 64 (64..1024), one exception per logical chunk."""
        if n > 1024:
            return "impossible: v2 held at most 1,024 snapshots"
        w = max(64, -(-n // 64) * 64)
        per = w // 8 + 8 + 8
        full = 4096 / (4024 // per)
        return f"W={w}: {per} B raw; {full:.1f} B in a full leaf, {2 * full:.1f} half-full"

    def scaling_meta_table(self) -> str:
        b = self.b
        rows = ["| store filled by | N | chunk | exceptions | leaves | index nodes "
                "(levels) | leaf fill | tree bytes per exception (measured) "
                "| v2 (computed, not measured) |",
                "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
        groups: dict[tuple[str, int], list[MetaSample]] = {}
        for m in b.meta:
            groups.setdefault((m.case, m.n), []).append(m)
        order = list(self.META_CASES)

        def sort_key(item):
            (case, n), _ = item
            return (order.index(case) if case in order else len(order), case, n)

        for (case, n), ms in sorted(groups.items(), key=sort_key):
            if case.startswith("fill"):
                what = (f"the scaling workload's store with {int(case[4:]):,} extra origin "
                        f"history entries, after its deletes")
            else:
                what = self.META_CASES.get(case, case)
            ms = [m for m in ms if m.exceptions]
            if not ms:
                continue
            ex = stats_text([m.exceptions for m in ms], lambda v: f"{v:,.0f}")
            lv = stats_text([m.leaves for m in ms], lambda v: f"{v:,.0f}")
            nodes = stats_text([m.index_nodes for m in ms], lambda v: f"{v:,.0f}")
            fill = stats_text([m.records / (m.leaves * m.leaf_max) for m in ms],
                              lambda v: f"{v:.0%}")
            bpe = stats_text([m.bytes_per_exception for m in ms], lambda v: f"{v:.1f}")
            rows.append(f"| {what} | {n:,} | {fmt_size(ms[0].chunk_size)} | {ex} | {lv} "
                        f"| {nodes} ({ms[0].levels}) | {fill} | {bpe} B "
                        f"| {self.v2_bytes(n)} |")
        return "\n".join(rows)

    def scaling_section(self) -> str:
        if not self.scaling_wanted():
            return ""
        a, b = self.a, self.b
        cmd = "bench/run" + ("" if not a.argv else " " + shlex.join(a.argv))
        busy = max(float(b.load_start[0]), float(b.load_end[0]))
        ncpu = len(os.sched_getaffinity(0))
        caveat = (f"  **Caveat:** the 1-minute load average reached {busy:.1f} on {ncpu} "
                  f"CPUs around this run: other work competed for the CPUs, so the figures "
                  f"and the ratios are rough."
                  if busy > 0.5 * ncpu else "")
        ks = ", ".join(str(k) for k in a.delete_exclusive)
        order = ("Runs interleaved (`--interleave`): for each write workload, run i at "
                 "every N back to back, each on a fresh store; for the reads one ddsnap "
                 "server per N, all up at once, and run i of each read workload at every N "
                 "back to back, so each ratio pairs runs made close together in time."
                 if a.interleave else
                 "Runs in the order N by N (`--no-interleave`): the runs at N and at N=1 "
                 "that a ratio pairs may be far apart in time.")
        qskip = (f"  qemu-nbd qcow2 ran up to N = {a.qcow2_max_snapshots:,} only "
                 f"(`--qcow2-max-snapshots`): its image is made with one `qemu-img snapshot "
                 f"-c` per snapshot, each slower than the last as the image's snapshot "
                 f"table grows (see the setup notes for the time at the largest N it ran), "
                 f"so 10,000 would take hours; the criterion is ddsnap at N over ddsnap at "
                 f"1 anyway." if b.qcow2_skipped else "")
        return f"""
## Snapshot count scaling (issue 9)

<!-- scaling-start -->
Run {b.started.strftime('%Y-%m-%d %H:%M UTC')} with `{cmd}`: volume {fmt_size(a.size)},
chunk {fmt_size(a.chunk_size)}, N = {", ".join(f"{n:,}" for n in a.snapshots)},
{a.duration:g} s per fio run, {a.repeat} run(s) per cell; ratios pair run i at N with
run i at N=1 and give the median (min–max) of those per-run ratios; "met" is judged on
the median.  {order}{caveat}{qskip}

{self.scaling_criteria()}

**The fio workloads at each N** (every store made by `ddsnap init` with no snapshot
limit; N snapshots taken through the control socket, then the job):

{self.scaling_fio_table() if set(k for k, _ in self.SCALING_FIO_ROWS) & set(a.workloads)
 else "(none of these workloads was in the run)"}

*Server CPU per I/O*: CPU time (user + system, all threads, from `/proc/PID/stat`) the
`ddsnap serve` process used during the job, divided by the job's I/Os.  Other load on
the machine moves it less than it moves IOPS (not to zero: a busy host's shared caches
still make every instruction dearer), so a cost that grows with N shows there too.

**Snapshot creation** (`scaling` workload; each timed request is a `snap_create` on its
own control connection, connect to reply, like the operation behind `ddsnap snap
create`, including its origin flush and commit):

{self.scaling_create_table() if b.scale_fills else "(the scaling workload was not in the run)"}

**Deleting one snapshot among {a.scaling_count:,}** (`scaling` workload; the
`snap_delete` reply comes after the sweep).  Each store: a sparse {fmt_size(a.size)}
origin, chunk {fmt_size(a.delete_chunk_size)}, {a.scaling_count:,} snapshots of the
origin; at a quarter of them, one with no exclusive data; further on, for each k of
{ks}, a snapshot P whose k chunks were written just before it was taken and again just
after (so their second copy-outs are read by P alone: its `exclusive` figure is k);
and, in the fuller stores, the extra origin history entries written in
{a.delete_write_points} bursts spread over the snapshots (each read by many snapshots).
Then {a.create_samples} timed creations, then the deletes in that order:

{self.scaling_delete_table() if b.scale_fills or b.scale_errors
 else "(the scaling workload was not in the run)"}

What the sweep walks (docs/format.md, "Tag index" and "Why versioned pointers, and what
they cost"): a delete that frees nothing walks no entry; deleting a snapshot of the
origin that had exclusive copy-outs walks the tag index ranges of the groups nobody reads
any more (its k copy-outs), not all of the origin's history entries; every delete also
looks at every group once to find those; "per store exception" divides the round trip by
the exceptions the store held.

**Metadata bytes per exception**: each store opened read-only after its server stopped
(`bench/metaprobe.py`: `SharedStore.open(..., mode="inspect")`, leaves from
`store._leaves()` plus the index nodes above them, exceptions from
`store.exception_chunks()`); bytes = (leaves + index nodes) × 4096 / exceptions, the
leaves holding each copy-out of the origin twice (its entry and its tag index record).  The
snapshot table's blocks are not tree blocks and are left out (one per 14 snapshots: 715
at 10,000).  v2's figure is computed from its layout, not measured: a leaf record of
W/8 + 8 bytes (W-bit sharemap, store chunk) plus an 8-byte map entry per logical chunk,
4,024 usable bytes per leaf, W = N rounded up to 64, one exception per logical chunk.

{self.scaling_meta_table() if b.meta else "(no store was counted)"}
<!-- scaling-end -->
"""
