"""The ``rss`` workload: peak RSS (``VmHWM``) of ``ddsnap serve`` on a sparse 1 TiB
origin with one snapshot while the four fio jobs of issue 4 run against it, read from
``/proc/PID/status`` after each job; afterwards sampled chunks of the snapshot must
still read as zeros."""

from __future__ import annotations

import os
import random
import shlex

from .common import BenchError, MiB, drop_file, fmt_size, proc_status, say
from .nbdclient import NbdClient, NbdError
from .processes import Server
from .results import RssRun


class RssWorkload:
    """The rss workload, for :class:`~ddsnap_bench.runner.Bench` (a mixin)."""

    def server_process_note(self, srv: Server) -> str:
        """Say what the PID whose VmHWM is read runs: it must be the Python server itself,
        not a wrapper with the server as a child."""
        pid = srv.popen.pid
        try:
            exe = os.readlink(f"/proc/{pid}/exe")
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = [x.decode(errors="replace") for x in f.read().split(b"\0") if x]
            children = []
            for t in os.listdir(f"/proc/{pid}/task"):
                try:
                    with open(f"/proc/{pid}/task/{t}/children") as f:
                        children += f.read().split()
                except OSError:
                    pass
            threads = len(os.listdir(f"/proc/{pid}/task"))
            # `serve --workers`: the children are its metadata server and workers
            # (python -m ddsnap.workers ROLE), whose figures are added up
            ours = True
            for c in children:
                with open(f"/proc/{c}/cmdline", "rb") as f:
                    ours = ours and b"ddsnap.workers" in f.read()
        except OSError as e:
            return f"could not inspect the server process {pid}: {e}"
        note = (f"peak RSS is read from `/proc/{pid}/status` of the process started as "
                f"`{shlex.join(cmd)}` (`/proc/{pid}/exe` -> `{exe}`; once serving: {threads} "
                f"thread(s), {len(children)} child process(es)"
                + (", serve's metadata server and workers, their VmHWM added up"
                   if children else "") + "): the Python server itself, not a wrapper")
        if "python" not in os.path.basename(exe) or not ours:
            self.problem(f"peak RSS: the server process may be a wrapper: {note}")
            note = note.split(": the Python")[0] + " (NOT clearly the server itself)"
        return note

    def rss_check(self, seq: int) -> list[str]:
        """The snapshot was taken of an all-zero (sparse) origin: sampled chunks of snap1,
        half of them in the sequentially overwritten range, must read as zeros, and the
        origin's first chunk (overwritten by fio) must not."""
        if self.args.no_verify:
            return []
        cs = self.args.chunk_size
        rnd = random.Random(2)
        picks = sorted({rnd.randrange(seq // cs) for _ in range(32)}
                       | {rnd.randrange(self.args.rss_origin_size // cs) for _ in range(32)})
        zero = bytes(cs)
        issues = []
        try:
            with NbdClient(str(self.sock), "snap1") as c:
                wrong = [i for i in picks if c.pread(cs, i * cs) != zero]
            with NbdClient(str(self.sock), "origin") as c:
                first = c.pread(cs, 0)
        except (OSError, NbdError) as e:
            return [f"peak RSS: reading snap1 / origin with the NBD client: {e}"]
        if wrong:
            issues.append(f"peak RSS: WRONG DATA in snap1: {len(wrong)} of {len(picks)} sampled "
                          f"chunks are not zero (first at offset {wrong[0] * cs}), but the "
                          f"snapshot was taken of a sparse, all-zero origin")
        if first == zero:
            issues.append("peak RSS: the origin's first chunk reads zeros after fio's "
                          "sequential writes to it")
        if not issues:
            say(f"peak RSS: {len(picks)} sampled chunks of snap1 read zeros; origin changed")
        return issues

    def rss(self) -> None:
        a = self.args
        for rep in range(a.repeat):
            say(f"--- peak RSS: sparse {fmt_size(a.rss_origin_size)} origin, 1 snapshot, "
                f"fio jobs (run {rep + 1} of {a.repeat})")
            try:
                self.rss_runs.append(self.rss_one(rep))
            except BenchError as e:
                self.rss_errors.append(str(e).splitlines()[0])
                self.problem(f"peak RSS, run {rep + 1}: {e}")

    def rss_one(self, rep: int) -> RssRun:
        a = self.args
        origin, store = self.tmp / "rss-origin.raw", self.tmp / "rss-store"
        label = f"peak RSS run {rep + 1}"
        seq = min(a.rss_seq_size, a.rss_origin_size)
        drop_file(store)
        drop_file(origin)
        with open(origin, "wb") as f:
            f.truncate(a.rss_origin_size)
        r = RssRun(rep)
        try:
            self.ddsnap("init", str(store), "--origin", str(origin),
                        "--size", str(a.rss_store_size), "--chunk-size", str(a.chunk_size),
                        what=f"{label}: ddsnap init")
            srv = self.serve_store(store, "ddsnap serve")
            pid = srv.popen.pid
            try:
                if rep == 0:
                    self.rss_notes.append(self.server_process_note(srv))
                self.snap_create_ctl(store, 1)
                r.start_rss = proc_status(pid).get("VmRSS", 0)
                os.sync()
                o, sn = self.uri("origin"), self.uri("snap1")
                jobs = [
                    # key, uri, rw, bs, iodepth, time_based (reads), extra, metric
                    ("randwrite4k", o, "randwrite", "4k", a.iodepth_rand, False, [], "iops"),
                    ("seqwrite1m", o, "write", "1m", a.iodepth_seq, False, [f"--size={seq}"],
                     "bw"),
                    ("seqread1m", sn, "read", "1m", a.iodepth_seq, True, [f"--size={seq}"],
                     "bw"),
                    ("randread4k", sn, "randread", "4k", a.iodepth_rand, True, [], "iops"),
                ]
                for key, uri, rw, bs, depth, tb, extra, metric in jobs:
                    m = self.fio(uri, f"rss-{key}", rw, bs, depth, runtime=a.duration,
                                 time_based=tb, extra=extra, readonly=tb)
                    if srv.popen.poll() is not None:
                        raise BenchError(f"ddsnap serve exited during the fio job {key}")
                    hwm = proc_status(pid).get("VmHWM", 0)
                    r.phases.append((key, m.value(metric), "IOPS" if metric == "iops"
                                     else "MiB/s", hwm))
                    say(f"peak RSS: after {key} ({m.value(metric):,.1f} "
                        f"{'IOPS' if metric == 'iops' else 'MiB/s'}) VmHWM {hwm / MiB:.1f} MiB")
                st = proc_status(pid)  # after the fio jobs, before the check and the stop
                r.hwm, r.rss = st.get("VmHWM", 0), st.get("VmRSS", 0)
                r.bad = self.rss_check(seq)
            finally:
                self.ddsnap_stop(srv, label)
            r.bad += self.check_stopped(store, label, timeout=1200)
        finally:
            drop_file(store)
            drop_file(origin)
        for x in r.bad:
            self.problem(x)
        say(f"peak RSS run {rep + 1}: VmHWM {r.hwm / MiB:.1f} MiB (VmRSS {r.rss / MiB:.1f} MiB "
            f"at the end, {r.start_rss / MiB:.1f} MiB before the fio jobs)")
        return r
