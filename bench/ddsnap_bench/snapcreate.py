"""The ``snapcreate`` workload: the wall time of ``snap_create`` requests on the control
socket of a served store whose origin is a sparse file (64 GiB and 1 GiB by default),
and of whole ``ddsnap snap create`` and ``ddsnap --version`` commands for
information."""

from __future__ import annotations

import os
import time

from .common import BenchError, GiB, drop_file, fmt_size, say, stats_text
from .peers import ctl_call
from .results import SnapCreateRun


class SnapCreateWorkload:
    """The snapcreate workload, for :class:`~ddsnap_bench.runner.Bench` (a
    mixin)."""

    def snapcreates(self) -> None:
        for size in self.args.snapcreate_origins:
            say(f"--- snap create latency: sparse {fmt_size(size)} origin, "
                f"{self.args.snap_creates} snapshots through the control socket")
            try:
                self.snapcreate_runs.append(self.snapcreate_one(size))
            except BenchError as e:
                self.snapcreate_errors[size] = str(e).splitlines()[0]
                self.problem(f"snap create latency ({fmt_size(size)} origin): {e}")

    def snapcreate_one(self, size: int) -> SnapCreateRun:
        a = self.args
        origin, store = self.tmp / "sc-origin.raw", self.tmp / "sc-store"
        label = f"snap create latency ({fmt_size(size)} origin)"
        drop_file(store)
        drop_file(origin)
        with open(origin, "wb") as f:
            f.truncate(size)  # sparse: no data at all
        r = SnapCreateRun(size)
        try:
            self.ddsnap("init", str(store), "--origin", str(origin), "--size", str(GiB),
                        "--chunk-size", str(a.chunk_size), what=f"{label}: ddsnap init")
            srv = self.serve_store(store, "ddsnap serve")
            try:
                os.sync()
                r.ctl_ms = self.snap_create_ctl(store, a.snap_creates, prefix="lat")
                for i in range(1, a.cli_creates + 1):
                    t0 = time.perf_counter()
                    self.ddsnap("snap", "create", str(store), f"cli{i}",
                                what=f"{label}: ddsnap snap create")
                    r.cli_ms.append((time.perf_counter() - t0) * 1000)
                    t0 = time.perf_counter()
                    self.ddsnap("--version", what="ddsnap --version")
                    r.version_ms.append((time.perf_counter() - t0) * 1000)
                names = [x.get("name") for x in ctl_call(self.ctl_path(store), "snap_list")]
                want = ([f"lat{i}" for i in range(1, a.snap_creates + 1)]
                        + [f"cli{i}" for i in range(1, a.cli_creates + 1)])
                if names != want:
                    r.unclean.append(f"{label}: `snap_list` lists {names}, expected {want}")
            finally:
                self.ddsnap_stop(srv, label)
            r.unclean += self.check_stopped(store, label)
        finally:
            drop_file(store)
            drop_file(origin)
        for x in r.unclean:
            self.problem(x)
        say(f"snap create, {fmt_size(size)} origin: control socket "
            f"{stats_text(r.ctl_ms, lambda v: f'{v:.2f}')} ms; whole CLI command "
            f"{stats_text(r.cli_ms, lambda v: f'{v:.0f}')} ms")
        return r
