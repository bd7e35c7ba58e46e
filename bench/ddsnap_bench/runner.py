"""One benchmark run: :class:`Bench` holds its state (the temporary directory, the
processes, every result and problem) and runs the selected workloads in order (the fio
workloads at each N, then merge, snapcreate, rss and scaling), saves the results for
``--from-state`` and writes the report.  Its methods come from one mixin per part:

* :mod:`.fio` (the fio runner), :mod:`.checks` (data checks), :mod:`.peers` (the
  servers), :mod:`.profiling` (py-spy);
* one per workload family: :mod:`.fio_workloads`, :mod:`.merge`, :mod:`.snapcreate`,
  :mod:`.rss`, :mod:`.scaling`; and :mod:`.cluster` (``--cluster``) and
  :mod:`.sendbench` (``--send``), each run on its own.

Also what the run ran on (:func:`machine`, :func:`worktree_source`), for the report.
"""

from __future__ import annotations

import collections
import datetime as dt
import os
import pickle
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from .checks import DataChecks
from .cluster import ClusterWorkload
from .common import (
    ALL_FIO,
    CLUSTER_STATE_FILE,
    DDSNAP,
    ROOT,
    SEND_STATE_FILE,
    STATE_FILE,
    BenchError,
    MiB,
    drop_file,
    fmt_size,
    run,
    say,
)
from .fio import FioRunner
from .fio_workloads import FioWorkloads
from .merge import MergeWorkload
from .netns import Network
from .peers import Peers
from .processes import Processes
from .profiling import Profiling
from .report import write_report
from .report_cluster import write_cluster_report
from .report_send import write_send_report
from .results import (
    Measure,
    MergeRun,
    MetaSample,
    RssRun,
    ScaleFill,
    SnapCreateRun,
    Workload,
    workloads,
)
from .rss import RssWorkload
from .scaling import ScalingWorkload
from .sendbench import SendWorkload
from .snapcreate import SnapCreateWorkload

#: what a run saves for ``--from-state`` (bench/out/last-run.pickle)
STATE_FIELDS = (
    "args", "results", "errors", "problems", "notes", "access_text", "merge_runs",
    "merge_errors", "merge_notes", "cache_mode", "merge_bytes", "cp_version",
    "snapcreate_runs", "snapcreate_errors", "rss_runs", "rss_errors", "rss_notes",
    "profiles", "profile_runs", "pyspy_version", "started", "elapsed", "load_start",
    "load_end", "machine_rows", "create_rates", "meta", "scale_fills", "scale_errors",
    "qcow2_skipped", "failover_kills", "failover_errors", "cluster_errors", "cluster_notes",
    "direct_flags", "load_samples", "send_runs", "pipe_runs", "send_errors", "send_notes",
    "send_setup")


class Bench(FioRunner, DataChecks, Peers, Profiling, FioWorkloads, MergeWorkload,
            SnapCreateWorkload, RssWorkload, ScalingWorkload, ClusterWorkload,
            SendWorkload):
    """One run of the benchmark with the parsed command line ``args``."""

    def __init__(self, args):
        self.args = args
        self.procs = Processes()
        self.tmp = Path(tempfile.mkdtemp(prefix="ddsnap-bench.", dir=args.tmpdir))
        self.sock = self.tmp / "nbd.sock"
        self.pristine = self.tmp / "pristine.raw"
        self.results: dict[tuple[str, int, str], list[Measure]] = {}
        self.errors: dict[tuple[str, int, str], str] = {}
        self.problems: list[str] = []
        self.notes: list[str] = []
        self.access = "nbd"
        self.fio_n = 0
        self.ddsnap_cmd = [str(DDSNAP)]
        self.source = worktree_source()
        self.merge_runs: dict[str, list[MergeRun]] = {}
        self.merge_errors: dict[str, str] = {}
        self.merge_notes: list[str] = []
        self.cache_mode: str | None = None  # "cold" once drop_caches worked, else "warm"
        self.merge_bytes = 0
        self.cp_version = subprocess.run(["cp", "--version"], capture_output=True,
                                         text=True).stdout.split("\n")[0].strip() or "cp"
        self.snapcreate_runs: list[SnapCreateRun] = []
        self.create_rates: dict[int, list[float]] = {}  # N -> seconds to take N (setups)
        self.meta: list[MetaSample] = []
        self.scale_fills: list[ScaleFill] = []
        self.scale_errors: list[str] = []
        self.qcow2_skipped: set[int] = set()
        self.snapcreate_errors: dict[int, str] = {}
        self.rss_runs: list[RssRun] = []
        self.rss_errors: list[str] = []
        self.rss_notes: list[str] = []
        self.qcow2_templates: dict[int, Path] = {}  # N -> image with N snapshots
        self.failover_kills: list = []  # --cluster: FailoverKill per SIGKILL
        self.failover_errors: list[str] = []
        self.cluster_errors: list[str] = []
        self.cluster_notes: list[str] = []
        self.direct_flags: dict[str, str] = {}  # peer -> how its processes open the files
        self.load_samples: list[float] = []  # 1-minute load averages seen during the run
        self.network: Network | None = None  # --cluster: the network namespaces
        self.send_runs: list = []  # --send: SendRun per repetition
        self.pipe_runs: list = []  # --send: PipeRun per repetition
        self.send_errors: list[str] = []
        self.send_notes: list[str] = []
        self.send_setup: dict = {}  # --send: the source store's setup figures
        self.send_chunks: list[int] = []  # --send: the chunks written between s1 and s2
        self.profiles: dict[str, collections.Counter] = {}  # label -> stack -> samples
        self.profile_runs: dict[str, int] = {}  # label -> number of profiled runs
        self.pyspy = shutil.which("py-spy", path=str(ROOT / ".venv" / "bin")) or \
            shutil.which("py-spy")
        self.pyspy_version = "py-spy"
        if args.profile and self.pyspy:
            self.pyspy_version = subprocess.run(
                [self.pyspy, "--version"], capture_output=True, text=True).stdout.strip() \
                or "py-spy"

    def use_rev(self, rev: str) -> None:
        """Run ddsnap from ``git archive REV`` instead of the working tree."""
        dest = self.tmp / "ddsnap-src"
        dest.mkdir()
        commit = run(["git", "-C", str(ROOT), "rev-parse", "--verify", f"{rev}^{{commit}}"],
                     f"git rev-parse {rev}").stdout.strip()
        arch = subprocess.run(["git", "-C", str(ROOT), "archive", commit, "src/ddsnap"],
                              capture_output=True)
        if arch.returncode != 0:
            raise BenchError(f"git archive {rev}: {arch.stderr.decode(errors='replace')}")
        tar = subprocess.run(["tar", "-x", "-C", str(dest)], input=arch.stdout,
                             capture_output=True)
        if tar.returncode != 0:
            raise BenchError(f"tar -x of git archive {rev}: {tar.stderr.decode(errors='replace')}")
        os.environ["PYTHONPATH"] = str(dest / "src")
        self.ddsnap_cmd = [str(ROOT / ".venv" / "bin" / "python"), "-m", "ddsnap.cli"]
        where = run(self.ddsnap_cmd[:1] + ["-c", "import ddsnap; print(ddsnap.__file__)"],
                    "import ddsnap").stdout.strip()
        if not where.startswith(str(dest)):
            raise BenchError(f"--rev {rev}: ddsnap still imports from {where}")
        self.source = f"`git archive {rev}` of commit {commit[:12]} (not the working tree)"
        say(f"ddsnap from `git archive {rev}` = commit {commit[:12]} ({where})")

    # ---- small pieces

    def problem(self, text: str) -> None:
        self.problems.append(text)
        print("\n[bench] PROBLEM: " + text.replace("\n", "\n    ") + "\n", flush=True)

    def ddsnap(self, *a: str, what: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return run([*self.ddsnap_cmd, *a], what, timeout)

    def make_pristine(self) -> None:
        say(f"writing {fmt_size(self.args.size)} of random data to {self.pristine}")
        block = 4 * MiB
        with open(self.pristine, "wb") as f:
            left = self.args.size
            while left:
                n = min(block, left)
                f.write(os.urandom(n))
                left -= n

    def copy_pristine(self, dst: Path) -> None:
        drop_file(dst)
        shutil.copyfile(self.pristine, dst)

    def uri(self, export: str) -> str:
        return f"nbd+unix:///{export}?socket={self.sock}"

    def main(self) -> int:
        a = self.args
        t_start = time.monotonic()
        self.started = dt.datetime.now(dt.UTC)
        self.load_start = Path("/proc/loadavg").read_text().split()[:3]
        say(f"temporary directory {self.tmp}; load average {' '.join(self.load_start)}")
        if not a.send:  # --send runs no fio job
            self.pick_access()
        if a.rev:
            self.use_rev(a.rev)
        if a.send:
            return self.main_send(t_start)
        if a.cluster:
            return self.main_cluster(t_start)
        if set(a.workloads) & (set(ALL_FIO) | {"merge"}):
            self.make_pristine()  # snapcreate and rss use sparse origins instead
        wls = workloads(a)
        writes = [w for w in wls if w.kind in ("write", "overwrite")]
        rws = [w for w in wls if w.kind == "read"]

        def write_runs(wl: Workload, n: int, rep: int) -> None:
            dd, qq = ((self.write_ddsnap, self.write_qemu) if wl.kind == "write"
                      else (self.overwrite_ddsnap, self.overwrite_qemu))
            say(f"--- {wl.title}, N={n} (run {rep + 1} of {a.repeat})")
            self.record(wl, n, "ddsnap", lambda: dd(wl, n), (), rep)
            if self.qemu_ok(n):
                self.record(wl, n, "qemu", lambda: qq(wl, n), (), rep)

        if a.interleave:
            # Run i of every N back to back, so that the ratios at N over N=1 pair runs
            # made minutes apart, not tens of minutes (a busy machine drifts).
            for wl in writes:
                for rep in range(a.repeat):
                    for n in a.snapshots:
                        write_runs(wl, n, rep)
            if rws:
                self.reads_interleaved(rws)
                for n in a.snapshots:
                    say(f"--- snapshot reads, N={n}: the peers")
                    self.reads(n, rws, ddsnap=False)
            self.drop_qcow2_templates()
        else:
            for n in a.snapshots:
                for wl in writes:
                    for rep in range(a.repeat):
                        write_runs(wl, n, rep)
                if rws:
                    say(f"--- snapshot reads, N={n}")
                    self.reads(n, rws)
                self.drop_qcow2_templates()
        if "merge" in a.workloads:
            self.merges()
        if "snapcreate" in a.workloads:
            self.snapcreates()
        if "rss" in a.workloads:
            self.rss()
        if "scaling" in a.workloads:
            self.scaling()
        self.write_profiles()
        self.elapsed = time.monotonic() - t_start
        self.load_end = Path("/proc/loadavg").read_text().split()[:3]
        self.machine_rows = machine(self)
        self.save_state()
        return write_report(self, Path(a.out))

    def main_cluster(self, t_start: float) -> int:
        """``--cluster``: issue 12's figures only, into their own section of ``--out``."""
        if self.access != "nbd":
            raise BenchError("--cluster needs fio's nbd engine (`fio --enghelp=nbd`)")
        self.make_pristine()
        self.cluster()
        self.elapsed = time.monotonic() - t_start
        self.load_end = Path("/proc/loadavg").read_text().split()[:3]
        self.machine_rows = machine(self)
        self.save_state()
        return write_cluster_report(self, Path(self.args.out))

    def main_send(self, t_start: float) -> int:
        """``--send``: issue 13's figures only, into their own section of ``--out``."""
        self.access_text = "(not used: --send runs no fio job)"
        self.send_bench()
        self.write_profiles()
        self.elapsed = time.monotonic() - t_start
        self.load_end = Path("/proc/loadavg").read_text().split()[:3]
        self.machine_rows = machine(self)
        self.save_state()
        return write_send_report(self, Path(self.args.out))

    def save_state(self) -> None:
        """Save the results for ``--from-state`` (a ``--cluster`` or ``--send`` run in a
        file of its own, so that it does not replace a full run's)."""
        path = (CLUSTER_STATE_FILE if self.args.cluster else
                SEND_STATE_FILE if self.args.send else STATE_FILE)
        try:  # so that the report can be written again (--from-state) without rerunning
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(pickle.dumps({k: getattr(self, k) for k in STATE_FIELDS}))
        except (OSError, pickle.PicklingError, TypeError, AttributeError) as e:
            say(f"could not save the run's state to {path}: {e}")

    def cleanup(self) -> None:
        self.procs.stop_all()
        if self.network is not None:
            self.network.close()
        if (self.tmp / "fuse").is_dir():
            subprocess.run(["fusermount3", "-u", str(self.tmp / "fuse")], capture_output=True)
        if self.args.keep:
            say(f"kept {self.tmp}")
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)


def worktree_source() -> str:
    """Which ddsnap code the working tree holds now (taken when the run starts)."""
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short=12", "HEAD"],
                            capture_output=True, text=True).stdout.strip() or "?"
    dirty = subprocess.run(["git", "-C", str(ROOT), "diff", "--quiet", "HEAD", "--", "src"],
                           capture_output=True).returncode != 0
    return (f"working tree at commit {commit}"
            + (" WITH UNCOMMITTED CHANGES in src/ (not recorded here)" if dirty else ""))


def machine(bench: Bench) -> list[tuple[str, str]]:
    def first(cmd: list[str]) -> str:
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
            return (p.stdout or p.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.SubprocessError):
            return "?"

    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = "?"
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem = f"{int(line.split()[1]) / (1 << 20):.1f} GiB"
                    break
    except OSError:
        pass
    source = bench.source
    return [
        ("CPU", f"{cpu} (`nproc` = {len(os.sched_getaffinity(0))})"),
        ("memory", mem),
        ("kernel", f"{platform.system()} {platform.release()} {platform.machine()}"),
        ("OS", first(["sh", "-c", ". /etc/os-release && echo \"$PRETTY_NAME\""])),
        ("ddsnap", f"{first([*bench.ddsnap_cmd, '--version']).split(', ')[-1]}, {source}, "
                   f"Python {platform.python_version()}"),
        ("peers", f"{first(['qemu-nbd', '--version'])}; {first(['nbdkit', '--version'])}"),
        ("fio", first(["fio", "--version"])),
    ] + ([("etcd", first(["etcd", "--version"]))] if getattr(bench.args, "cluster", False)
         else []) + ([("nbdcopy", first(["nbdcopy", "--version"]))]
                     if getattr(bench.args, "send", False) else [])
