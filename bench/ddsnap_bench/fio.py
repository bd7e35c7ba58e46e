"""The fio runner: one fio job against an NBD export (fio's ``nbd`` engine, or nbdfuse
and ``libaio`` on the FUSE file with ``--access nbdfuse``), its JSON output parsed into
a :class:`~ddsnap_bench.results.Measure` (IOPS, MiB/s, bytes moved, runtime, mean and
p99 completion latency).  Every figure of the fio workloads comes from here."""

from __future__ import annotations

import json
import shlex
import subprocess
from pathlib import Path

from .common import BenchError, MiB, run, say
from .processes import Server
from .results import Measure


class FioRunner:
    """Runs fio jobs for :class:`~ddsnap_bench.runner.Bench` (a mixin: uses its
    ``args``, ``tmp``, ``procs``)."""

    def fio(self, uri: str, name: str, rw: str, bs: str, iodepth: int, *,
            runtime: float | None, time_based: bool, extra: list[str] = (),
            readonly: bool = False, prefix: list[str] = ()) -> Measure:
        """Run one fio job against ``uri``; parse its JSON; raise BenchError on failure.
        ``prefix`` runs fio under another command (``ip netns exec NS``: in a host of
        ``--cluster``'s network)."""
        self.fio_n += 1
        out = self.tmp / f"fio-{self.fio_n}.json"
        argv = ["fio", f"--name={name}", f"--rw={rw}", f"--bs={bs}", f"--iodepth={iodepth}",
                "--numjobs=1", "--randrepeat=1", "--output-format=json", f"--output={out}"]
        if runtime is not None:
            argv.append(f"--runtime={runtime:g}")
        if time_based:
            argv.append("--time_based")
        argv += list(extra)
        mount = None
        if self.access == "nbd":
            argv += ["--ioengine=nbd", f"--uri={uri}"]
        else:
            mount, target = self.fuse_mount(uri, readonly)
            argv += ["--ioengine=libaio", "--direct=1", f"--filename={target}"]
        limit = (runtime or 0) * 3 + 120 + self.args.size / (20 * MiB)
        try:
            run([*prefix, *argv], f"fio job {name}", timeout=limit)
        finally:
            if mount is not None:
                self.fuse_unmount(mount)
        try:
            text = out.read_text()
            data = json.loads(text[text.index("{"):])
            job = data["jobs"][0]
        except (OSError, ValueError, KeyError, IndexError) as e:
            raise BenchError(f"fio job {name}: cannot parse its JSON output {out}: {e}") from None
        if job.get("error"):
            raise BenchError(f"fio job {name}: fio reports error {job['error']} "
                             f"(`{shlex.join(argv)}`)")
        d = job["read"] if rw in ("read", "randread") else job["write"]
        clat = d.get("clat_ns", {})
        pct = clat.get("percentile", {})
        return Measure(iops=d["iops"], mibs=d["bw_bytes"] / MiB, runtime_ms=d["runtime"],
                       io_bytes=d["io_bytes"], lat_mean_us=clat.get("mean", 0) / 1000,
                       lat_p99_us=pct.get("99.000000", 0) / 1000)

    def fuse_mount(self, uri: str, readonly: bool) -> tuple[Server, Path]:
        d = self.tmp / "fuse"
        d.mkdir(exist_ok=True)
        argv = ["nbdfuse"] + (["-r"] if readonly else []) + [str(d), uri]
        srv = self.procs.start("nbdfuse", argv, sock=d / "nbd", log=self.tmp / "nbdfuse.log",
                               connect=False)
        return srv, d / "nbd"

    def fuse_unmount(self, srv: Server) -> None:
        subprocess.run(["fusermount3", "-u", str(self.tmp / "fuse")], capture_output=True)
        self.procs.stop(srv)

    def pick_access(self) -> None:
        want = self.args.access
        has_nbd = subprocess.run(["fio", "--enghelp=nbd"], capture_output=True).returncode == 0
        if want == "nbd" and not has_nbd:
            raise BenchError("fio has no nbd engine (`fio --enghelp=nbd` fails); "
                             "try --access nbdfuse")
        if want == "auto":
            want = "nbd" if has_nbd else "nbdfuse"
        self.access = want
        if want == "nbd":
            self.access_text = ("fio's `nbd` engine (libnbd), one connection per job, "
                                "`uri=nbd+unix:///EXPORT?socket=...`")
        else:
            self.access_text = ("nbdfuse + fio `ioengine=libaio direct=1` on the FUSE file"
                                + ("" if has_nbd else " (fio's nbd engine is missing)"))
        say(f"I/O path: {self.access_text}")
