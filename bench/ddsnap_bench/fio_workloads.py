"""The fio workloads, ddsnap against its peers at each snapshot count N: writes to the
origin right after N snapshots (copy-on-write: ``randwrite4k``, ``seqwrite1m``),
overwrites of an origin whose chunks were all copied out already (``overwrite4k``),
and reads of a snapshot half in exceptions, half in the origin (``seqread1m``,
``randread4k``, ``randread4k-newest``), each run recorded as a
:class:`~ddsnap_bench.results.Measure` per (workload, N, peer)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from .common import PEER_NAMES, BenchError, MiB, Skip, drop_file, fmt_size, say
from .processes import Server
from .results import Measure, Workload


class FioWorkloads:
    """The fio workloads' setups and runs, for
    :class:`~ddsnap_bench.runner.Bench` (a mixin: the peers, the fio runner, the data
    checks and the profiler are its other parts)."""

    def record(self, wl: Workload, n: int, peer: str, fn, bad: list[str] = (),
               rep: int = 0) -> None:
        key = (wl.key, n, peer)
        try:
            m = fn()
        except BenchError as e:
            self.errors[key] = str(e).splitlines()[0]
            self.problem(f"{wl.title}, N={n}, {PEER_NAMES[peer]}: {e}")
            return
        m.bad = m.bad or list(bad)
        m.rep = rep
        self.results.setdefault(key, []).append(m)
        v = m.value(wl.metric)
        unit = "IOPS" if wl.metric == "iops" else "MiB/s"
        say(f"{wl.key} N={n} {PEER_NAMES[peer]}: {v:,.1f} {unit} "
            f"({m.io_bytes / MiB:,.0f} MiB in {m.runtime_ms / 1000:.1f} s)"
            + (f"; {m.extra}" if m.extra else "")
            + (" (py-spy attached)" if m.profiled else "")
            + (" -- WRONG DATA seen, see problems" if m.bad else ""))

    def write_fio(self, uri: str, wl: Workload, name: str) -> Measure:
        # One pass over the volume or --duration, whichever ends first: every write lands
        # on a volume whose blocks all were just snapshotted (the copy-on-write path).
        return self.fio(uri, name, wl.rw, wl.bs, wl.iodepth, runtime=self.args.duration,
                        time_based=False, extra=wl.fio_extra())

    def write_ddsnap(self, wl: Workload, n: int) -> Measure:
        srv, store = self.ddsnap_up(n)
        label = f"{wl.key} N={n} ddsnap"
        try:
            os.sync()
            m = self.profiled(srv, f"{wl.key}-N{n}", lambda: self.write_fio(
                self.uri("origin"), wl, f"ddsnap-{wl.key}-N{n}"))
            if srv.popen.poll() is not None:
                raise BenchError("ddsnap serve exited during the fio run")
            used = self.ddsnap_used(store)
            m.extra = f"{used} store chunks used after the run"
            m.bad = self.check_ddsnap(n, f"after {wl.key} (N={n})")
            return m
        finally:
            self.ddsnap_down(srv, store, label, n, case=wl.key)

    def overwrite_pass(self, uri: str, name: str) -> Measure:
        """One sequential pass of 1 MiB writes over the whole volume (not timed as a
        workload): afterwards every chunk is the origin's own, nothing left to copy out."""
        return self.fio(uri, name, "write", "1m", self.args.iodepth_seq, runtime=None,
                        time_based=False)

    def overwrite_fio(self, uri: str, wl: Workload, name: str) -> Measure:
        # time_based: the chunks stay unique however often they are written again.
        return self.fio(uri, name, wl.rw, wl.bs, wl.iodepth, runtime=self.args.duration,
                        time_based=True, extra=wl.fio_extra())

    def overwrite_ddsnap(self, wl: Workload, n: int) -> Measure:
        srv, store = self.ddsnap_up(n)
        label = f"{wl.key} N={n} ddsnap"
        try:
            t0 = time.monotonic()
            pre = self.overwrite_pass(self.uri("origin"), f"ddsnap-{wl.key}-pass-N{n}")
            pre_s = time.monotonic() - t0
            before = self.ddsnap_used(store)
            os.sync()
            m = self.profiled(srv, f"{wl.key}-N{n}", lambda: self.overwrite_fio(
                self.uri("origin"), wl, f"ddsnap-{wl.key}-N{n}"))
            if srv.popen.poll() is not None:
                raise BenchError("ddsnap serve exited during the fio run")
            after = self.ddsnap_used(store)
            m.extra = (f"first a 1 MiB sequential pass over the volume ({pre_s:.1f} s, "
                       f"{pre.mibs:,.1f} MiB/s, every chunk copied out); {after - before} "
                       f"store chunks allocated during the timed job (expected 0)")
            if after != before:
                self.problem(f"{label}: the store grew from {before} to {after} used chunks "
                             f"during the overwrites, though every chunk had been copied out")
            m.bad = self.check_ddsnap(n, f"after {wl.key} (N={n})")
            return m
        finally:
            self.ddsnap_down(srv, store, label, n, case=wl.key)

    def overwrite_qemu(self, wl: Workload, n: int) -> Measure:
        img = self.qcow2_make(n)
        srv = self.qemu_up(img)
        try:
            t0 = time.monotonic()
            pre = self.overwrite_pass(self.uri("origin"), f"qemu-{wl.key}-pass-N{n}")
            os.sync()
            m = self.overwrite_fio(self.uri("origin"), wl, f"qemu-{wl.key}-N{n}")
            m.extra = (f"first a 1 MiB sequential pass over the volume "
                       f"({time.monotonic() - t0:.1f} s, {pre.mibs:,.1f} MiB/s)")
            return m
        finally:
            self.server_down(srv, f"{wl.key} N={n} qemu-nbd")
            drop_file(img)

    def write_qemu(self, wl: Workload, n: int) -> Measure:
        img = self.qcow2_make(n)
        srv = self.qemu_up(img)
        try:
            os.sync()
            return self.write_fio(self.uri("origin"), wl, f"qemu-{wl.key}-N{n}")
        finally:
            self.server_down(srv, f"{wl.key} N={n} qemu-nbd")
            drop_file(img)

    def overwrite_half(self, uri: str, name: str) -> Measure:
        cs = self.args.chunk_size
        return self.fio(uri, name, f"write:{cs}", str(cs), self.args.iodepth_seq, runtime=None,
                        time_based=False, extra=[f"--io_size={self.args.size // 2}"])

    def read_fio(self, uri: str, wl: Workload, name: str) -> Measure:
        return self.fio(uri, name, wl.rw, wl.bs, wl.iodepth, runtime=self.args.duration,
                        time_based=True, readonly=True, extra=wl.fio_extra())

    def read_setup(self, n: int, srv: Server, store: Path) -> list[str]:
        """After taking N snapshots: overwrite every other chunk of the origin through
        NBD, so half of each snapshot comes from exceptions and half from the origin;
        then check the snapshots.  Returns the checks' complaints."""
        t0 = time.monotonic()
        ow = self.overwrite_half(self.uri("origin"), f"ddsnap-overwrite-N{n}")
        used = self.ddsnap_used(store)
        self.notes.append(
            f"N={n}: overwriting every other {fmt_size(self.args.chunk_size)} chunk of "
            f"the ddsnap origin ({fmt_size(self.args.size // 2)}) took "
            f"{time.monotonic() - t0:.1f} s ({ow.mibs:.1f} MiB/s); the store then held "
            f"{used} used chunks, so half of each snapshot is read from exceptions and "
            f"half from the origin")
        return self.check_ddsnap(n, f"before the reads (N={n})")

    def reads_interleaved(self, rws: list[Workload]) -> None:
        """ddsnap's reads at every N with one server per N up at once (each on its own
        socket and files), so that run i of a workload is measured at every N back to
        back."""
        a = self.args
        main_sock = self.sock
        up: dict[int, tuple[Server, Path, Path, list[str]]] = {}
        try:
            for n in a.snapshots:
                say(f"--- snapshot reads, N={n}: ddsnap setup")
                self.sock = self.tmp / f"nbd-{n}.sock"
                try:
                    srv, store = self.ddsnap_up(n, tag=f"-{n}")
                except BenchError as e:
                    for wl in rws:
                        self.errors[(wl.key, n, "ddsnap")] = str(e).splitlines()[0]
                    self.problem(f"read setup, N={n}, ddsnap: {e}")
                    continue
                up[n] = (srv, store, self.sock, [])
                try:
                    up[n][3].extend(self.read_setup(n, srv, store))
                except BenchError as e:
                    self.problem(f"reads N={n} ddsnap: {e}")
                    for wl in rws:
                        self.errors.setdefault((wl.key, n, "ddsnap"), str(e).splitlines()[0])
                    self.sock = main_sock
                    self.ddsnap_down(srv, store, f"reads N={n} ddsnap")
                    del up[n]
            os.sync()
            for rep in range(a.repeat):
                for wl in rws:
                    for n, (srv, _store, sock, bad) in up.items():
                        self.sock = sock
                        say(f"--- {wl.title}, N={n} (run {rep + 1} of {a.repeat})")
                        self.record(wl, n, "ddsnap", lambda wl=wl, n=n, srv=srv: self.profiled(
                            srv, f"{wl.key}-N{n}", lambda: self.read_fio(
                                self.uri(wl.export(n)), wl, f"ddsnap-{wl.key}-N{n}")), bad,
                            rep)
        finally:
            for n, (srv, store, sock, _bad) in up.items():
                self.sock = sock
                self.ddsnap_down(srv, store, f"reads N={n} ddsnap", n, case="halfread")
            self.sock = main_sock

    def reads(self, n: int, rws: list[Workload], ddsnap: bool = True) -> None:
        reps = range(self.args.repeat)
        # ddsnap: N snapshots, then overwrite every other chunk of the origin through NBD,
        # so half of snap1 comes from exceptions and half from the origin.
        try:
            if not ddsnap:
                raise Skip
            srv, store = self.ddsnap_up(n)
        except Skip:
            pass
        except BenchError as e:
            for wl in rws:
                self.errors[(wl.key, n, "ddsnap")] = str(e).splitlines()[0]
            self.problem(f"read setup, N={n}, ddsnap: {e}")
        else:
            label = f"reads N={n} ddsnap"
            try:
                bad = self.read_setup(n, srv, store)
                os.sync()
                for rep in reps:
                    for wl in rws:
                        self.record(wl, n, "ddsnap", lambda wl=wl: self.profiled(
                            srv, f"{wl.key}-N{n}", lambda: self.read_fio(
                                self.uri(wl.export(n)), wl, f"ddsnap-{wl.key}-N{n}")), bad,
                            rep)
            except BenchError as e:
                self.problem(f"reads N={n} ddsnap: {e}")
                for wl in rws:
                    self.errors.setdefault((wl.key, n, "ddsnap"), str(e).splitlines()[0])
            finally:
                self.ddsnap_down(srv, store, label, n, case="halfread")

        # qemu-nbd: the same on qcow2, then serve each snapshot read (snap1, snapN)
        # read-only in turn.
        img = None
        try:
            if not self.qemu_ok(n):
                raise Skip
            img = self.qcow2_make(n)
            srv = self.qemu_up(img)
            try:
                self.overwrite_half(self.uri("origin"), f"qemu-overwrite-N{n}")
            finally:
                self.server_down(srv, f"reads N={n} qemu-nbd overwrite")
            for export in sorted({wl.export(n) for wl in rws}, key=lambda e: int(e[4:])):
                wls = [wl for wl in rws if wl.export(n) == export]
                srv = self.qemu_up(img, snapshot=export)
                try:
                    bad = self.verify(self.uri(export),
                                      f"qcow2 {export} before the reads (N={n})")
                    for i in bad:
                        self.problem(i)
                    os.sync()
                    for rep in reps:
                        for wl in wls:
                            self.record(wl, n, "qemu", lambda wl=wl, export=export: self.read_fio(
                                self.uri(export), wl, f"qemu-{wl.key}-N{n}"), bad, rep)
                finally:
                    self.server_down(srv, f"reads N={n} qemu-nbd {export}")
        except Skip:
            pass
        except BenchError as e:
            self.problem(f"reads N={n} qemu-nbd: {e}")
            for wl in rws:
                self.errors.setdefault((wl.key, n, "qemu"), str(e).splitlines()[0])
        finally:
            if img is not None:
                drop_file(img)

        # nbdkit file plugin on the pristine raw file (the snapshot's bytes).
        try:
            srv = self.nbdkit_up()
            try:
                os.sync()
                for rep in reps:
                    for wl in rws:
                        self.record(wl, n, "nbdkit", lambda wl=wl: self.read_fio(
                            self.uri(""), wl, f"nbdkit-{wl.key}-N{n}"), (), rep)
            finally:
                self.server_down(srv, f"reads N={n} nbdkit")
        except BenchError as e:
            self.problem(f"reads N={n} nbdkit: {e}")
