"""Profiling with py-spy (``--profile``): the ddsnap server sampled while a measured
job runs (raw collapsed stacks added up per job label, written to
``bench/out/profiles/``), and the server's CPU time during each fio job (from
``/proc/PID/stat``, with or without py-spy) for the "CPU per I/O" figures."""

from __future__ import annotations

import collections
import shlex
import signal
import subprocess
import time

from .common import PROFILE_DIR, proc_cpu, say, spawn, tail
from .processes import Server
from .results import Measure


class Profiling:
    """py-spy around a measured step, for :class:`~ddsnap_bench.runner.Bench`
    (a mixin: uses its ``args``, ``tmp``, ``procs``, ``pyspy``, ``profiles`` and
    ``problem()``)."""

    def profiled(self, srv: Server, label: str, fn):
        """Run ``fn()``; with --profile, py-spy samples the ddsnap server meanwhile and its
        raw (collapsed) stacks are added to ``self.profiles[label]``.  A Measure returned
        gets the CPU time the server used meanwhile."""
        inner = fn

        def fn():
            c0 = proc_cpu(srv.popen.pid)
            result = inner()
            c1 = proc_cpu(srv.popen.pid)
            if isinstance(result, Measure) and c0 is not None and c1 is not None:
                result.server_cpu_s = c1 - c0
            return result

        if not self.args.profile:
            return fn()
        self.fio_n += 1
        raw = self.tmp / f"py-spy-{self.fio_n}.txt"
        log = self.tmp / f"py-spy-{self.fio_n}.log"
        # --subprocesses: serve --workers is a supervisor whose children do the work
        argv = [self.pyspy, "record", "--pid", str(srv.popen.pid), "--format", "raw",
                "--rate", str(self.args.profile_rate), "--nonblocking", "--function",
                "--subprocesses", "-o", str(raw)]
        spy = spawn(argv, log)
        handle = Server("py-spy", argv, raw, log, spy)
        self.procs.live.append(handle)
        deadline = time.monotonic() + 15
        while (spy.poll() is None and "Sampling process" not in log.read_text()
               and time.monotonic() < deadline):
            time.sleep(0.02)
        if spy.poll() is not None or "Sampling process" not in log.read_text():
            self.procs.stop(handle, grace=5)
            self.problem(f"{label}: py-spy did not start sampling the server "
                         f"(`{shlex.join(argv)}`); this run is not profiled\n"
                         f"{tail(log.read_text())}")
            return fn()
        try:
            result = fn()
        finally:
            if handle in self.procs.live:
                self.procs.live.remove(handle)
            if spy.poll() is None:
                spy.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
            try:
                spy.wait(60)
            except subprocess.TimeoutExpired:
                spy.kill()
                spy.wait()
        stacks = self.profiles.setdefault(label, collections.Counter())
        n = 0
        try:
            for line in raw.read_text().splitlines():
                stack, _, count = line.rpartition(" ")
                if stack and count.isdigit():
                    stacks[stack] += int(count)
                    n += int(count)
        except OSError as e:
            self.problem(f"{label}: py-spy wrote no profile ({e})\n{tail(log.read_text())}")
        else:
            self.profile_runs[label] = self.profile_runs.get(label, 0) + 1
            say(f"py-spy: {n} samples of the ddsnap server during {label}")
        if isinstance(result, Measure):
            result.profiled = True
        return result

    def write_profiles(self) -> None:
        if not self.profiles:
            return
        PROFILE_DIR.mkdir(parents=True, exist_ok=True)
        for old in PROFILE_DIR.glob("*.txt"):  # an earlier run's: would mislead
            old.unlink()
        for label, stacks in self.profiles.items():
            path = PROFILE_DIR / f"{label}.txt"
            path.write_text("".join(f"{st} {c}\n" for st, c in sorted(stacks.items())))
        say(f"py-spy raw stacks written to {PROFILE_DIR}/ ({len(self.profiles)} file(s))")
