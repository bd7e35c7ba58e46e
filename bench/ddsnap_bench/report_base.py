"""What every part of the report builds on: a run's fio figures by (workload, N, peer),
a table cell of them (median (min–max), marked when py-spy was attached or a data check
failed), and ratios paired run i over run i."""

from __future__ import annotations

import statistics
from typing import TYPE_CHECKING

from .common import stats_text
from .results import Measure, Workload

if TYPE_CHECKING:
    from .runner import Bench


class ReportBase:
    """The report of run ``bench`` (a Bench, or a saved state read back by
    ``--from-state``); the sections are the mixins of :class:`~ddsnap_bench.report.Report`."""

    def __init__(self, bench: Bench):
        self.b = bench
        self.a = bench.args

    def runs(self, key: str, n: int, peer: str) -> list[Measure]:
        return self.b.results.get((key, n, peer), [])

    def cell(self, wl: Workload, n: int, peer: str) -> tuple[str, float | None]:
        ms = self.runs(wl.key, n, peer)
        if not ms:
            err = self.b.errors.get((wl.key, n, peer))
            return ("FAILED (see problems)" if err else "–"), None
        vals = [m.value(wl.metric) for m in ms]

        def f(v: float) -> str:
            return f"{v:,.0f}" if wl.metric == "iops" else f"{v:,.1f}"

        text = stats_text(vals, f) + (" IOPS" if wl.metric == "iops" else " MiB/s")
        if any(m.profiled for m in ms):
            text += " (py-spy attached)"
        if any(m.bad for m in ms):
            text += " ⚠ wrong data"
        return text, statistics.median(vals)

    @staticmethod
    def paired(xs: list[Measure], ys: list[Measure], metric: str) -> list[float]:
        """Per-repetition ratios: run i of ``xs`` over run i of ``ys``."""
        by_rep = {m.rep: m for m in ys}
        return [m.value(metric) / by_rep[m.rep].value(metric) for m in xs
                if m.rep in by_rep and by_rep[m.rep].value(metric)]

    def ratio_cell(self, xs: list[Measure], ys: list[Measure], metric: str) -> str:
        r = self.paired(xs, ys, metric)
        return stats_text(r, lambda v: f"{v:.2f}") if r else "–"
