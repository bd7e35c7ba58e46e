"""The ``merge`` workload: ``ddsnap merge`` of a snapshot back into the origin (an
online rollback), local (``--wait``, store not served) and served (through the control
socket), in MiB/s of snapshot data, against ``dd`` and ``cp`` copies of the same
number of bytes from a dropped page cache; afterwards the origin must equal the
snapshot's bytes and ``ddsnap check`` be clean."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

from .common import BenchError, MiB, allocated_in, data_extents, drop_file, fmt_size, run, say, tail
from .peers import ctl_call
from .processes import Server
from .results import MergeRun


class MergeWorkload:
    """The merge workload, for :class:`~ddsnap_bench.runner.Bench` (a mixin)."""

    def drop_caches(self) -> None:
        """sync, then drop the page cache if allowed (root); else leave it (both warm)."""
        os.sync()
        try:
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("3\n")
        except OSError as e:
            if self.cache_mode is None:
                self.merge_notes.append(
                    f"`echo 3 > /proc/sys/vm/drop_caches` failed ({e.strerror}): the page "
                    f"cache was NOT dropped, so the merge and the copies all ran warm, on "
                    f"whatever the setup left cached")
            self.cache_mode = "warm"
            return
        self.cache_mode = self.cache_mode or "cold"

    def merge_setup(self, nbytes: int, label: str) -> tuple[Server, Path, Path, MergeRun]:
        """Fresh store with snapshot snap1, then the first ``nbytes`` of the origin
        overwritten through NBD (1 MiB sequential writes), so snap1 holds that many bytes
        of exceptions."""
        srv, store = self.ddsnap_up(1)
        origin = self.tmp / "ddsnap-origin.raw"
        try:
            used0 = self.ddsnap_used(store)
            ow = self.fio(self.uri("origin"), f"ddsnap-merge-overwrite-{label}", "write", "1m",
                          self.args.iodepth_seq, runtime=None, time_based=False,
                          extra=[f"--io_size={nbytes}"])
            if ow.io_bytes != nbytes:
                raise BenchError(f"overwrite wrote {ow.io_bytes} bytes, not {nbytes}")
            used = self.ddsnap_used(store)
        except BaseException:
            self.ddsnap_down(srv, store, f"merge {label} setup")
            raise
        cs = self.args.chunk_size
        chunks = nbytes // cs
        if used - used0 < chunks:
            self.problem(f"merge {label}: after overwriting {chunks} chunks the store holds "
                         f"only {used - used0} more used chunks ({used0} -> {used}); snap1 "
                         f"should have {chunks} exceptions")
        say(f"merge {label}: overwrote {fmt_size(nbytes)} of the origin through NBD at "
            f"{ow.mibs:.1f} MiB/s; store chunks used {used0} -> {used}")
        return srv, store, origin, MergeRun(label, nbytes, chunks, 0.0,
                                            overwrite_mibs=ow.mibs, used_after_overwrite=used)

    def merge_verify(self, m: MergeRun, store: Path, origin: Path) -> None:
        """The origin file must now equal the snapshot's bytes (pristine.raw), the
        snapshot must be gone (merged without --keep) and `ddsnap check` clean."""
        p = subprocess.run(["cmp", str(origin), str(self.pristine)], capture_output=True,
                           text=True, timeout=120 + self.args.size / (5 * MiB))
        if p.returncode != 0:
            m.bad.append(f"merge {m.mode}: WRONG DATA: after the merge the origin differs "
                         f"from the snapshot's bytes: `cmp origin pristine.raw`: "
                         f"{(p.stdout + p.stderr).strip()}")
        else:
            say(f"merge {m.mode}: origin file == snapshot's raw copy (cmp)")
        try:
            out = self.ddsnap("check", str(store), what=f"merge {m.mode}: ddsnap check",
                              timeout=600).stdout
            if "clean" not in out:
                m.unclean.append(f"merge {m.mode}: `ddsnap check` exit 0 but not clean:\n"
                                 f"{tail(out)}")
        except BenchError as e:
            m.unclean.append(str(e))
        try:
            st = json.loads(self.ddsnap("status", str(store), "--json",
                                        what="ddsnap status").stdout)
            if st.get("merge") is not None or st.get("snapshots"):
                m.unclean.append(f"merge {m.mode}: after the merge `ddsnap status` shows merge "
                                 f"{st.get('merge')} and snapshots "
                                 f"{[x.get('name') for x in st.get('snapshots', [])]} "
                                 f"(expected no merge and no snapshot)")
        except (BenchError, ValueError) as e:
            m.unclean.append(f"merge {m.mode}: ddsnap status after the merge: {e}")
        for x in m.bad + m.unclean:
            self.problem(x)

    def merge_baselines(self, m: MergeRun, store: Path, origin: Path, cp_src: Path) -> None:
        """Copy the same number of bytes with dd (store -> origin, in place) and with cp
        (a same-size file -> a new file), both from a dropped page cache, both synced."""
        n, cs = m.nbytes, self.args.chunk_size
        ext = data_extents(store)
        # The dd source: the stretch of the store holding the most written data (where
        # the exceptions were), read from there on; the origin is overwritten in place
        # from offset 0, as the merge did.
        start = max((d for d, _ in ext), key=lambda d: allocated_in(ext, d, n), default=0)
        start -= start % cs
        start = min(start, max(0, store.stat().st_size - n))
        m.dd_alloc = allocated_in(ext, start, n) / n
        self.drop_caches()
        t0 = time.monotonic()
        run(["dd", f"if={store}", f"of={origin}", "bs=1M", f"count={n // MiB}",
             f"skip={start}", "iflag=skip_bytes", "conv=notrunc,fsync", "status=none"],
            "dd baseline", timeout=600)
        m.dd_s = time.monotonic() - t0
        dst = self.tmp / "cp-dst.raw"
        drop_file(dst)
        self.drop_caches()
        t0 = time.monotonic()
        run(["cp", "--sparse=never", str(cp_src), str(dst)], "cp baseline", timeout=600)
        run(["sync", str(dst)], "sync after cp", timeout=600)
        m.cp_s = time.monotonic() - t0
        drop_file(dst)
        say(f"merge {m.mode}: dd store -> origin {m.dd_mibs:.1f} MiB/s "
            f"({m.dd_alloc:.0%} of the source range allocated), cp {m.cp_mibs:.1f} MiB/s")

    def merge_local(self, nbytes: int, cp_src: Path) -> MergeRun:
        srv, store, origin, m = self.merge_setup(nbytes, "local")
        try:
            self.ddsnap_stop(srv, "merge local: serve during setup")
            self.drop_caches()
            t0 = time.monotonic()
            self.ddsnap("merge", str(store), "snap1", "--wait", "--no-progress",
                        what="ddsnap merge --wait (local)",
                        timeout=600 + nbytes / MiB)
            m.merge_s = time.monotonic() - t0
            say(f"merge local: {fmt_size(nbytes)} merged in {m.merge_s:.2f} s "
                f"= {m.mibs:.1f} MiB/s")
            self.merge_verify(m, store, origin)
            self.merge_baselines(m, store, origin, cp_src)
            return m
        finally:
            drop_file(store)
            drop_file(origin)

    def merge_served(self, nbytes: int, cp_src: Path) -> MergeRun:
        srv, store, origin, m = self.merge_setup(nbytes, "served")
        ctl = Path(f"{store}.ctl")
        try:
            try:
                self.drop_caches()

                def timed_merge():
                    t0 = time.monotonic()
                    self.ddsnap("merge", str(store), "snap1", "--no-progress",
                                what="ddsnap merge (served: start through the control socket)")
                    last = None
                    deadline = t0 + 600 + nbytes / MiB
                    while True:
                        st = ctl_call(ctl, "merge_status")
                        if st is None:
                            break
                        if not st.get("running"):
                            raise BenchError(f"the served merge is not running: {st}")
                        if srv.popen.poll() is not None:
                            raise BenchError("ddsnap serve exited during the merge")
                        if time.monotonic() > deadline:
                            raise BenchError(f"the served merge did not finish in time: {st}")
                        last = st
                        time.sleep(0.1)
                    return time.monotonic() - t0, last

                m.merge_s, last = self.profiled(srv, "merge-served", timed_merge)
                m.profiled = bool(self.args.profile)
                if last is not None:
                    m.server_rate = last.get("chunks_per_second")
                    if last.get("chunks_total") != m.chunks:
                        self.problem(f"merge served: merge_status said chunks_total "
                                     f"{last.get('chunks_total')}, but {m.chunks} chunks of "
                                     f"the origin were overwritten after the snapshot")
                t1 = time.monotonic()
                out = self.ddsnap("merge", str(store), "--status", "--json",
                                  what="ddsnap merge --status --json").stdout.strip()
                m.status_s = time.monotonic() - t1
                if out != "null":
                    self.problem(f"merge served: `ddsnap merge --status --json` printed "
                                 f"{out!r} after merge_status returned null")
                say(f"merge served: {fmt_size(nbytes)} merged in {m.merge_s:.2f} s "
                    f"= {m.mibs:.1f} MiB/s (server: {m.server_rate} chunks/s)")
                for x in self.verify(self.uri("origin"), "ddsnap origin after the served merge"):
                    m.bad.append(x)
                    self.problem(x)
            finally:
                self.ddsnap_stop(srv, "merge served")
            self.merge_verify(m, store, origin)
            self.merge_baselines(m, store, origin, cp_src)
            return m
        finally:
            drop_file(store)
            drop_file(origin)

    def merges(self) -> None:
        a = self.args
        nbytes = int(a.size * a.merge_fraction) // MiB * MiB
        if nbytes < MiB:
            raise BenchError(f"--merge-fraction {a.merge_fraction} of {fmt_size(a.size)} is "
                             f"less than 1 MiB")
        self.merge_bytes = nbytes
        if nbytes == a.size:
            cp_src = self.pristine
        else:
            cp_src = self.tmp / "cp-src.raw"
            with open(self.pristine, "rb") as f, open(cp_src, "wb") as g:
                left = nbytes
                while left:
                    buf = f.read(min(left, 4 * MiB))
                    g.write(buf)
                    left -= len(buf)
        try:
            for _ in range(a.repeat):
                for mode in a.merge_modes:
                    say(f"--- merge of a snapshot into the origin ({mode}), "
                        f"{fmt_size(nbytes)} of exceptions")
                    try:
                        m = (self.merge_local if mode == "local" else self.merge_served)(
                            nbytes, cp_src)
                    except BenchError as e:
                        self.merge_errors[mode] = str(e).splitlines()[0]
                        self.problem(f"merge ({mode}): {e}")
                        continue
                    self.merge_runs.setdefault(mode, []).append(m)
        finally:
            if cp_src != self.pristine:
                drop_file(cp_src)
