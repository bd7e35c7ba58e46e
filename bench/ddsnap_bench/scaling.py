"""The ``scaling`` workload (issue 9, snapshot count scaling): stores of
``--scaling-count`` snapshots of a sparse origin with extra origin history entries
spread over them; ``snap_create`` timed on the empty store and again with all of them
there, then deletes of snapshots with 0 and k exclusive copy-outs, each ``snap_delete``
timed, and the store's metadata counted per exception afterwards."""

from __future__ import annotations

import os
import time

from .common import BenchError, MiB, drop_file, say, stats_text
from .nbdclient import NbdClient
from .peers import ctl_call
from .results import DeleteRun, ScaleFill


class ScalingWorkload:
    """The scaling workload, for :class:`~ddsnap_bench.runner.Bench` (a mixin)."""

    def scaling(self) -> None:
        a = self.args
        for extra in a.delete_fills:
            say(f"--- scaling: {a.scaling_count} snapshots, {extra} extra origin history "
                f"entries; snapshot creation and deletes")
            try:
                self.scale_fills.append(self.scale_one(extra))
            except BenchError as e:
                self.scale_errors.append(f"fill with {extra} extra entries: "
                                         f"{str(e).splitlines()[0]}")
                self.problem(f"scaling, fill with {extra} extra origin history entries: {e}")

    def scale_plan(self, extra: int) -> tuple[list[tuple[int, int]], list[tuple[int, int, int]]]:
        """Where the fill writes.  Returns the snapshots to delete, ``[(position, k)]``
        (first one with no exclusive data, then one per --delete-exclusive k), and the
        origin writes ``[(after snapshot, first chunk, chunks)]``, in order:

        * snapshot with k exclusive copy-outs at position P: chunks ``[c, c + k)`` (each k
          its own range, from chunk 0) are written before P is taken (copy-outs tagged
          P-1, read by snapshots 1..P-1) and again after (tagged P, read by P alone);
        * ``extra`` further chunks, written in --delete-write-points equal parts spread
          over the N snapshots, consecutive ranges cycling through the upper three
          quarters of the origin: each written chunk is one more origin history entry,
          read by every snapshot taken since that chunk's previous write (so by many).
        """
        a = self.args
        n, cs = a.scaling_count, a.delete_chunk_size
        nchunks = a.size // cs
        ks = a.delete_exclusive
        targets = [(round(n * (j + 1) / (len(ks) + 2)), k) for j, k in enumerate([0] + ks)]
        writes: list[tuple[int, int, int]] = []
        c = 0
        for pos, k in targets[1:]:
            writes.append((pos - 1, c, k))
            writes.append((pos, c, k))
            c += k
        if extra:
            points = min(a.delete_write_points, n)
            lo = nchunks // 4
            pos = lo
            for i in range(points):
                part = extra // points + (1 if i < extra % points else 0)
                after = max(1, round((i + 0.5) * n / points))
                while part:
                    m = min(part, nchunks - pos)
                    writes.append((after, pos, m))
                    part -= m
                    pos += m
                    if pos >= nchunks:
                        pos = lo
        writes.sort(key=lambda w: w[0])
        return targets, writes

    def scale_one(self, extra: int) -> ScaleFill:
        a = self.args
        n, cs = a.scaling_count, a.delete_chunk_size
        targets, writes = self.scale_plan(extra)
        r = ScaleFill(extra, n, cs)
        origin, store = self.tmp / "scale-origin.raw", self.tmp / "scale-store"
        label = f"scaling fill ({extra} extra entries)"
        drop_file(store)
        drop_file(origin)
        os.sync()  # earlier work's writeback must not slow this store's fsyncs
        with open(origin, "wb") as f:
            f.truncate(a.size)  # sparse; copy-outs read it all the same
        data_bytes = sum(m for _a, _c, m in writes) * cs
        store_size = -(-(data_bytes * 5 // 4 + 256 * MiB) // MiB) * MiB
        blob = os.urandom(MiB)
        names = {pos: f"snap{pos}" for pos, _k in targets}
        try:
            self.ddsnap("init", str(store), "--origin", str(origin), "--size", str(store_size),
                        "--chunk-size", str(cs), what=f"{label}: ddsnap init")
            srv = self.serve_store(store, "ddsnap serve")
            ctl = self.ctl_path(store)
            try:
                taken = 0

                def take(upto: int) -> None:
                    nonlocal taken
                    if upto <= taken:
                        return
                    t0 = time.perf_counter()
                    timed = min(upto, a.create_samples) - taken
                    if timed > 0:  # the first ones one at a time, timed (empty store)
                        r.first_ms += self.snap_create_ctl(store, timed, first=taken + 1)
                        taken += timed
                    if upto > taken:
                        self.snap_create_pipelined(store, upto - taken, first=taken + 1)
                        taken = upto
                    r.create_s += time.perf_counter() - t0

                with NbdClient(str(self.sock), "origin") as c:
                    for after, first, m in writes:
                        take(after)
                        t0 = time.perf_counter()
                        lo, hi = first * cs, (first + m) * cs
                        c.pwrite_many(((o, blob[:min(MiB, hi - o)])
                                       for o in range(lo, hi, MiB)), depth=8)
                        r.written_chunks += m
                        r.write_s += time.perf_counter() - t0
                    take(n)
                say(f"{label}: {n} snapshots in {r.create_s:.1f} s "
                    f"({n / r.create_s:,.0f}/s), {r.written_chunks} chunks written "
                    f"between them in {r.write_s:.1f} s")
                os.sync()
                r.at_n_ms = self.profiled(
                    srv, f"snapcreate-at-{n}-fill{extra}",
                    lambda: self.snap_create_ctl(store, a.create_samples, prefix="lat"))
                say(f"{label}: snap_create with {n} snapshots: "
                    f"{stats_text(r.at_n_ms, lambda v: f'{v:.2f}')} ms")
                t0 = time.perf_counter()
                listed = ctl_call(ctl, "snap_list", timeout=600)
                r.list_s = time.perf_counter() - t0
                excl = {x["name"]: x.get("exclusive") for x in listed}
                for pos, k in targets:
                    name = names[pos]
                    e = excl.get(name)
                    e = None if e is None else e // cs
                    if e != k:
                        r.bad.append(f"{label}: {name} should have {k} exclusive chunks; "
                                     f"`snap_list` says {e}")
                    before = ctl_call(ctl, "status", timeout=600)["chunks_used"]
                    t0 = time.perf_counter()
                    self.profiled(srv, f"delete-k{k}-fill{extra}", lambda name=name: ctl_call(
                        ctl, "snap_delete", {"name": name}, timeout=3600))
                    ms = (time.perf_counter() - t0) * 1000
                    after = ctl_call(ctl, "status", timeout=600)["chunks_used"]
                    r.deletes.append(DeleteRun(name, k, e, ms, before - after))
                    say(f"{label}: snap_delete {name} ({k} exclusive copy-outs, `exclusive` "
                        f"{e}): {ms:,.1f} ms, {before - after} chunks freed")
            finally:
                self.ddsnap_stop(srv, label)
            bad = self.check_stopped(store, label, timeout=1200)
            r.bad += bad
            if not bad:
                r.meta = self.meta_probe(store, f"fill{extra}", n + a.create_samples - len(targets),
                                         label)
        finally:
            drop_file(store)
            drop_file(origin)
        for x in r.bad:
            self.problem(x)
        return r
