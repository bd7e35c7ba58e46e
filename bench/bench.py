"""ddsnap benchmark: the same fio jobs over NBD against ddsnap and its peers.

Peers:

* ``ddsnap``  -- ``ddsnap serve`` on a store (``--chunk-size``, format v3: no snapshot
                 limit) whose origin is a raw file;
* ``qemu``    -- ``qemu-nbd`` on a qcow2 image (cluster size = ``--chunk-size``) holding the
                 same number of internal snapshots (up to ``--qcow2-max-snapshots``:
                 ``qemu-img snapshot -c`` slows down as they accumulate); the active
                 layer for writes, the snapshot (``-l``, read-only) for reads;
* ``nbdkit``  -- nbdkit's file plugin on a raw file holding the snapshot's bytes (the read
                 baseline).

Workloads, at each snapshot count N of ``--snapshots``:

1. 4 KiB random writes to the origin right after taking N snapshots (fresh setup);
2. 1 MiB sequential writes to the origin right after taking N snapshots (fresh setup);
3. 1 MiB sequential reads of a snapshot;
4. 4 KiB random reads of a snapshot;
5. ``merge``: ``ddsnap merge`` of a snapshot back into the origin (local ``--wait`` and
   served), in MiB/s of snapshot data, against ``dd`` and ``cp`` copying the same number
   of bytes; the origin must then equal the snapshot's bytes;
6. ``snapcreate``: wall time of ``snap_create`` requests on the control socket of a served
   store whose origin is a sparse 64 GiB file (and, to show it does not grow, 1 GiB), and
   of the whole ``ddsnap snap create`` command for information;
7. ``rss``: peak RSS (``VmHWM``) of ``ddsnap serve`` on a sparse 1 TiB origin with one
   snapshot while the four fio jobs run against it.

Issue 9 (snapshot count scaling; ``--scaling`` selects them with N = 1, 1024, 10000 and
writes the report's "Snapshot count scaling (issue 9)" section, to
``docs/benchmarks-scaling.md`` by default):

8. ``overwrite4k``: 4 KiB random writes to the origin after one 1 MiB pass over all of
   it, so that no write copies out (fresh setup, ``time_based``);
9. ``randread4k-newest``: 4 KiB random reads of snapshot N (``randread4k`` reads snap1);
10. ``scaling``: on stores of ``--scaling-count`` snapshots (4 KiB chunks, sparse
   origin, ``--delete-fills`` extra origin history entries each), ``snap_create``
   round trips timed on the empty store and with all of them there, then deletes of a
   snapshot with no exclusive data and of snapshots with k exclusive copy-outs
   (``--delete-exclusive``), each ``snap_delete`` timed (its reply comes after the
   sweep).

With ``randwrite4k`` (copy-on-write) and ``randread4k`` (oldest snapshot) that is every
figure issue 9's criteria name, as ddsnap at N over ddsnap at 1; every ddsnap store is
also counted read-only after its server stopped (``bench/metaprobe.py``) for the
metadata bytes per exception.

With ``--profile``, py-spy samples the ddsnap server during each ddsnap fio job, the
served merge and, in the scaling workload, the creations timed at N and each delete; the
report then lists the hottest functions.

Run it through ``bench/run`` (which installs what it needs first); ``bench/run --help``
lists the parameters.  Results go to stdout and to a markdown file (``--out``), headed by
a table of issue 4's targets (measured, target, met or not).  Nothing fails the run on a
threshold.
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import json
import os
import pickle
import platform
import random
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

from nbdclient import NbdClient, NbdError

ROOT = Path(__file__).resolve().parent.parent
DDSNAP = ROOT / ".venv" / "bin" / "ddsnap"
MiB = 1 << 20
KiB = 1 << 10
GiB = 1 << 30
TiB = 1 << 40
PROFILE_DIR = ROOT / "bench" / "out" / "profiles"
STATE_FILE = ROOT / "bench" / "out" / "last-run.pickle"
STATE_FIELDS = (
    "args", "results", "errors", "problems", "notes", "access_text", "merge_runs",
    "merge_errors", "merge_notes", "cache_mode", "merge_bytes", "cp_version",
    "snapcreate_runs", "snapcreate_errors", "rss_runs", "rss_errors", "rss_notes",
    "profiles", "profile_runs", "pyspy_version", "started", "elapsed", "load_start",
    "load_end", "machine_rows", "create_rates", "meta", "scale_fills", "scale_errors",
    "qcow2_skipped")
DEFAULT_RUN_MINUTES = 30  # a default `bench/run`, for the text (2 busy CPUs, 2026-11)
FIO_WORKLOADS = ("randwrite4k", "seqwrite1m", "seqread1m", "randread4k")  # issue 4's
SCALING_FIO = ("overwrite4k", "randread4k-newest")  # issue 9's, with randwrite4k, randread4k
ALL_FIO = FIO_WORKLOADS + SCALING_FIO
DEFAULT_WORKLOADS = FIO_WORKLOADS + ("merge", "snapcreate", "rss")
ALL_WORKLOADS = ALL_FIO + ("merge", "snapcreate", "rss", "scaling")
# --scaling: what issue 9's criteria name (the fio jobs at each N, then `scaling`: snapshot
# creation at --scaling-count, deletes among them, metadata per exception)
SCALING_WORKLOADS = ("randwrite4k", "overwrite4k", "randread4k", "randread4k-newest",
                     "scaling")
SCALING_SNAPSHOTS = "1,1024,10000"
DEFAULT_QCOW2_MAX = 1024  # qemu-img snapshot -c grows linearly: 10,000 would take hours

PEER_NAMES = {
    "ddsnap": "ddsnap",
    "qemu": "qemu-nbd qcow2",
    "nbdkit": "nbdkit file",
}


class BenchError(Exception):
    """A step failed; the message says what was run and what it printed."""


class Skip(Exception):
    """A step left out on purpose (e.g. qcow2 beyond --qcow2-max-snapshots)."""


class Stop(BaseException):
    """SIGTERM / SIGHUP: stop like Ctrl-C, cleaning up."""


# --------------------------------------------------------------------------- helpers


def parse_size(text: str) -> int:
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    mult = 1
    for suffix, m in (("K", KiB), ("M", MiB), ("G", 1 << 30), ("T", 1 << 40)):
        if t.endswith(suffix):
            t, mult = t[:-1], m
            break
    try:
        value = int(float(t) * mult)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (try 64K, 256M, 1G)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    return value


def fmt_size(n: int) -> str:
    for unit, m in (("TiB", TiB), ("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= m and n % m == 0:
            return f"{n // m} {unit}"
    if n >= MiB:
        return f"{n / MiB:.1f} MiB"
    return f"{n} B"


def tail(text: str, lines: int = 25) -> str:
    t = text.strip().splitlines()
    if len(t) > lines:
        t = [f"... ({len(t) - lines} earlier lines left out)"] + t[-lines:]
    return "\n".join(t)


def spread(n: int, k: int) -> list[int]:
    """Up to ``k`` of 1..n, evenly spread, always with 1 and n (all of them if n <= k)."""
    if n <= k:
        return list(range(1, n + 1))
    if k < 2:
        return [1][:k]
    return sorted({1 + round(i * (n - 1) / (k - 1)) for i in range(k)})


def stats_text(vals: list[float], fmt) -> str:
    """``median (min–max)`` of ``vals`` (just the value when there is one)."""
    vals = sorted(vals)
    text = fmt(statistics.median(vals))
    if len(vals) > 1:
        text += f" ({fmt(vals[0])}–{fmt(vals[-1])})"
    return text


def proc_status(pid: int) -> dict[str, int]:
    """``VmHWM`` / ``VmRSS`` (bytes) of a live process, from ``/proc/PID/status``."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmHWM", "VmRSS"):
                    out[key] = int(rest.split()[0]) * KiB
    except OSError:
        pass
    return out


def proc_cpu(pid: int) -> float | None:
    """CPU seconds (user + system, all threads) a live process used so far."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def say(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run(argv: list[str], what: str, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    """Run a command; raise BenchError with its output if it fails or times out."""
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"") if isinstance(e.stdout, bytes) else (e.stdout or "")
        raise BenchError(f"{what}: `{shlex.join(argv)}` did not finish within {timeout:.0f} s "
                         f"(killed)\n{tail(str(out))}") from None
    if p.returncode != 0:
        raise BenchError(f"{what}: `{shlex.join(argv)}` exited {p.returncode}\n"
                         f"{tail(p.stdout + p.stderr)}")
    return p


def spawn(argv: list[str], log: Path) -> subprocess.Popen:
    """Start a long-running process in its own session, its output going to ``log``."""
    with open(log, "w") as logf:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf,
                                stderr=subprocess.STDOUT, start_new_session=True)


def drop_file(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


# --------------------------------------------------------------------------- servers


@dataclass
class Server:
    name: str
    argv: list[str]
    sock: Path
    log: Path
    popen: subprocess.Popen
    ready_path: Path | None = None
    mounts: list[Path] = field(default_factory=list)


class Processes:
    """Every long-running process the benchmark starts, so that all of them stop."""

    def __init__(self):
        self.live: list[Server] = []

    def start(self, name: str, argv: list[str], sock: Path, log: Path,
              ready_path: Path | None = None, timeout: float = 60,
              connect: bool = True) -> Server:
        drop_file(sock)
        popen = spawn(argv, log)
        srv = Server(name, argv, sock, log, popen, ready_path)
        self.live.append(srv)
        deadline = time.monotonic() + timeout
        while True:
            if popen.poll() is not None:
                self.live.remove(srv)
                raise BenchError(f"{name}: `{shlex.join(argv)}` exited {popen.returncode} "
                                 f"before it was ready\n{tail(log.read_text())}")
            if sock.exists() and (ready_path is None or ready_path.exists()):
                if not connect:
                    return srv
                try:
                    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                        s.settimeout(5)
                        s.connect(str(sock))
                    return srv
                except OSError:
                    pass
            if time.monotonic() > deadline:
                self.stop(srv)
                raise BenchError(f"{name}: `{shlex.join(argv)}` not ready after {timeout:.0f} s\n"
                                 f"{tail(log.read_text())}")
            time.sleep(0.05)

    def stop(self, srv: Server, grace: float = 30) -> tuple[int | None, str]:
        """SIGTERM, wait up to ``grace`` seconds, then SIGKILL.  Returns (exit code, note)."""
        note = ""
        if srv in self.live:
            self.live.remove(srv)
        if srv.popen.poll() is None:
            try:
                srv.popen.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                srv.popen.wait(grace)
            except subprocess.TimeoutExpired:
                note = f"{srv.name} did not exit within {grace:.0f} s of SIGTERM; killed it"
                srv.popen.kill()
                srv.popen.wait()
        return srv.popen.returncode, note

    def stop_all(self) -> None:
        for srv in list(self.live):
            try:
                self.stop(srv, grace=10)
            except BaseException:  # keep stopping the others
                pass


# --------------------------------------------------------------------------- workloads


@dataclass(frozen=True)
class Workload:
    key: str
    title: str
    rw: str
    bs: str
    iodepth: int
    kind: str  # "write" (origin, fresh setup: copy-on-write), "overwrite" (origin, fresh
    #            setup, every chunk written once first) or "read" (snapshot)
    metric: str  # "iops" or "bw"
    snap: str = "oldest"  # reads: of snap1 ("oldest") or of snapN ("newest")

    def export(self, n: int) -> str:
        """The snapshot a read workload reads at N snapshots."""
        return "snap1" if self.snap == "oldest" else f"snap{n}"


def workloads(args) -> list[Workload]:
    """The fio workloads selected with --workloads."""
    return [w for w in all_workloads(args) if w.key in args.workloads]


def all_workloads(args) -> list[Workload]:
    return [
        Workload("randwrite4k", "4 KiB random writes to the origin", "randwrite", "4k",
                 args.iodepth_rand, "write", "iops"),
        Workload("seqwrite1m", "1 MiB sequential writes to the origin", "write", "1m",
                 args.iodepth_seq, "write", "bw"),
        Workload("seqread1m", "1 MiB sequential reads of a snapshot", "read", "1m",
                 args.iodepth_seq, "read", "bw"),
        Workload("randread4k", "4 KiB random reads of a snapshot", "randread", "4k",
                 args.iodepth_rand, "read", "iops"),
        Workload("overwrite4k", "4 KiB random overwrites of the origin (every chunk "
                 "already copied out)", "randwrite", "4k", args.iodepth_rand, "overwrite",
                 "iops"),
        Workload("randread4k-newest", "4 KiB random reads of the newest snapshot",
                 "randread", "4k", args.iodepth_rand, "read", "iops", snap="newest"),
    ]


@dataclass
class Measure:
    iops: float
    mibs: float
    runtime_ms: int
    io_bytes: int
    lat_mean_us: float
    lat_p99_us: float
    extra: str = ""
    bad: list[str] = field(default_factory=list)  # data checks that failed around this run
    rep: int = 0  # repetition index (ratios pair rep i of ddsnap with rep i of the peer)
    profiled: bool = False  # py-spy was sampling the server during the run
    server_cpu_s: float | None = None  # CPU time (user + system) the ddsnap server used

    def cpu_us_per_io(self, bs: str) -> float | None:
        """The ddsnap server's CPU time per I/O of the job (µs); what else the machine
        runs moves it less than it moves IOPS."""
        ios = self.io_bytes / parse_size(bs)
        return None if self.server_cpu_s is None or not ios else self.server_cpu_s * 1e6 / ios

    def value(self, metric: str) -> float:
        return self.iops if metric == "iops" else self.mibs


@dataclass
class MergeRun:
    """One timed merge of a snapshot into the origin, with its copy baselines."""

    mode: str  # "local" (store not served, `merge --wait`) or "served" (control socket)
    nbytes: int  # bytes of the snapshot's exceptions merged
    chunks: int
    merge_s: float
    dd_s: float | None = None
    dd_alloc: float | None = None  # fraction of the dd source range that is allocated
    cp_s: float | None = None
    server_rate: float | None = None  # chunks/s last reported by `merge_status` (served)
    status_s: float | None = None  # one `ddsnap merge --status --json` call (served)
    overwrite_mibs: float = 0.0
    used_after_overwrite: int = 0
    bad: list[str] = field(default_factory=list)  # wrong data after the merge
    unclean: list[str] = field(default_factory=list)  # ddsnap check / status not as expected
    profiled: bool = False  # py-spy was sampling the server during the merge (served)

    @property
    def mibs(self) -> float:
        return self.nbytes / MiB / self.merge_s

    @property
    def dd_mibs(self) -> float | None:
        return None if not self.dd_s else self.nbytes / MiB / self.dd_s

    @property
    def cp_mibs(self) -> float | None:
        return None if not self.cp_s else self.nbytes / MiB / self.cp_s


@dataclass
class SnapCreateRun:
    """``snap_create`` timings on one served store with a sparse origin."""

    origin_size: int
    ctl_ms: list[float] = field(default_factory=list)  # control socket round trips
    cli_ms: list[float] = field(default_factory=list)  # whole `ddsnap snap create` commands
    version_ms: list[float] = field(default_factory=list)  # `ddsnap --version` (start-up)
    unclean: list[str] = field(default_factory=list)


@dataclass
class RssRun:
    """Peak RSS of `ddsnap serve` on a sparse origin through the four fio jobs."""

    rep: int
    hwm: int = 0  # VmHWM before the server was stopped (bytes)
    rss: int = 0  # VmRSS at the same moment
    start_rss: int = 0  # VmRSS once serving with the snapshot taken
    phases: list[tuple[str, float, str, int]] = field(default_factory=list)
    # (job, figure, unit, VmHWM after the job)
    bad: list[str] = field(default_factory=list)


@dataclass
class MetaSample:
    """A store's B-tree counted read-only after its server stopped (bench/metaprobe.py)."""

    case: str  # how the store was filled (a key of Report.META_CASES)
    n: int  # snapshots
    chunk_size: int
    levels: int  # index levels above the leaves
    leaves: int
    index_nodes: int
    records: int  # leaf records (exceptions, plus merge markers during a merge)
    exceptions: int  # store.exception_chunks()
    origin_entries: int  # records owned by the origin (its history entries)
    table_blocks: int  # the snapshot table's chain (not tree blocks; information)
    leaf_max: int  # records a full leaf holds

    @property
    def tree_blocks(self) -> int:
        return self.leaves + self.index_nodes

    @property
    def bytes_per_exception(self) -> float | None:
        return self.tree_blocks * 4096 / self.exceptions if self.exceptions else None


@dataclass
class DeleteRun:
    """One `snap_delete` among the snapshots of a ScaleFill."""

    name: str
    k: int  # exclusive copy-outs the fill gave it
    exclusive: int | None  # its `exclusive` figure before the delete (chunks; snap_list)
    ms: float  # control socket round trip (the reply comes after the sweep)
    freed: int  # chunks_used before minus after (exception chunks and tree blocks)


@dataclass
class ScaleFill:
    """A store with N snapshots of a sparse origin (chunk --delete-chunk-size), `extra`
    origin history entries spread over them and snapshots with k exclusive copy-outs;
    snapshot creation timed on it, then one snapshot of each kind deleted."""

    extra: int
    n: int
    chunk_size: int
    create_s: float = 0.0  # wall time of the pipelined snap_create requests (all N)
    write_s: float = 0.0  # wall time of the origin writes between them
    first_ms: list[float] = field(default_factory=list)  # the first creations, timed alone
    at_n_ms: list[float] = field(default_factory=list)  # creations timed when N existed
    list_s: float | None = None  # one `snap_list` round trip at N (figures computed)
    written_chunks: int = 0  # origin chunks written after a snapshot (copy-outs made)
    deletes: list[DeleteRun] = field(default_factory=list)
    meta: MetaSample | None = None  # after the deletes, server stopped
    bad: list[str] = field(default_factory=list)

    @property
    def exceptions_before(self) -> int | None:
        """Exceptions when the deletes started: those left plus those the deletes freed
        (each snapshot's exclusive figure)."""
        if self.meta is None or any(d.exclusive is None for d in self.deletes):
            return None
        return self.meta.exceptions + sum(d.exclusive for d in self.deletes)


def data_extents(path: Path) -> list[tuple[int, int]]:
    """``[(offset, length), ...]`` of the allocated (non-hole) ranges of a file."""
    out = []
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        off = 0
        while off < size:
            try:
                d = os.lseek(fd, off, os.SEEK_DATA)
            except OSError:  # ENXIO: no data after off
                break
            h = os.lseek(fd, d, os.SEEK_HOLE)
            out.append((d, h - d))
            off = h
    finally:
        os.close(fd)
    return out


def allocated_in(extents: list[tuple[int, int]], start: int, length: int) -> int:
    end = start + length
    return sum(max(0, min(end, d + n) - max(start, d)) for d, n in extents)


CTL_DEPTH = 32  # control requests in flight on one connection (snap_create_pipelined)


def ctl_pipeline(path: Path, requests, depth: int = CTL_DEPTH, timeout: float = 120) -> int:
    """Send ``(op, args)`` requests on one control connection, up to ``depth`` ahead of
    their replies (docs/protocol.md: a connection may carry several requests, answered
    in order); raise BenchError on the first failure.  Returns how many were answered."""
    sent = done = 0
    it = iter(requests)
    more = True
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(path))
            f = s.makefile("rb")
            ops = collections.deque()
            while more or done < sent:
                while more and sent - done < depth:
                    try:
                        op, args = next(it)
                    except StopIteration:
                        more = False
                        break
                    s.sendall(json.dumps({"op": op, "args": args}).encode() + b"\n")
                    ops.append((op, args))
                    sent += 1
                if done == sent:
                    break
                line = f.readline()
                op, args = ops.popleft()
                if not line:
                    raise BenchError(f"control socket {path}: connection closed without a "
                                     f"reply to {op} {args}")
                reply = json.loads(line)
                if not reply.get("ok"):
                    raise BenchError(f"control socket {path}: {op} {args} failed: "
                                     f"{reply.get('error')}")
                done += 1
    except (OSError, ValueError) as e:
        raise BenchError(f"control socket {path}: pipelined requests: {e} (after {done} "
                         f"replies)") from None
    return done


def ctl_call(path: Path, op: str, args: dict | None = None, timeout: float = 30):
    """One request on ddsnap's control socket (docs/protocol.md: one JSON line each way)."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(path))
            s.sendall(json.dumps({"op": op, "args": args or {}}).encode() + b"\n")
            line = s.makefile("rb").readline()
        if not line:
            raise BenchError(f"control socket {path}: connection closed without a reply "
                             f"to {op}")
        reply = json.loads(line)
    except (OSError, ValueError) as e:
        raise BenchError(f"control socket {path}: {op}: {e}") from None
    if not reply.get("ok"):
        raise BenchError(f"control socket {path}: {op} failed: {reply.get('error')}")
    return reply.get("result")


# --------------------------------------------------------------------------- the bench


class Bench:
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

    # ---- fio

    def fio(self, uri: str, name: str, rw: str, bs: str, iodepth: int, *,
            runtime: float | None, time_based: bool, extra: list[str] = (),
            readonly: bool = False) -> Measure:
        """Run one fio job against ``uri``; parse its JSON; raise BenchError on failure."""
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
            run(argv, f"fio job {name}", timeout=limit)
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

    def verify(self, uri: str, what: str) -> list[str]:
        """Read the whole export with nbdcopy and compare it with the pristine bytes."""
        if self.args.no_verify:
            return []
        t0 = time.monotonic()
        cp = subprocess.Popen(["nbdcopy", uri, "-"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
        try:
            cmp = subprocess.run(["cmp", "-", str(self.pristine)], stdin=cp.stdout,
                                 capture_output=True, text=True,
                                 timeout=120 + self.args.size / (5 * MiB))
        except subprocess.TimeoutExpired:
            cp.kill()
            cp.wait()
            return [f"verify {what}: `nbdcopy {uri} - | cmp - pristine` did not finish in "
                    f"time (hang?)"]
        finally:
            cp.stdout.close()
        cerr = cp.stderr.read().decode(errors="replace")
        cp.stderr.close()
        crc = cp.wait()
        if cmp.returncode != 0:
            return [f"verify {what}: WRONG DATA: `nbdcopy {uri} - | cmp - pristine.raw`: "
                    f"{(cmp.stdout + cmp.stderr).strip()}"]
        if crc != 0:
            return [f"verify {what}: nbdcopy exit {crc}: {tail(cerr)}"]
        say(f"verified {what}: same bytes as the original image "
            f"({time.monotonic() - t0:.1f} s)")
        return []

    def sample_check(self, exports: list[str], what: str) -> list[str]:
        """Read --samples random chunks of each export (same offsets for all) and compare
        them with the pristine bytes; for a wrong chunk, say whether it holds the origin's
        current data."""
        if self.args.no_verify or not self.args.samples:
            return []
        cs, n = self.args.chunk_size, self.args.size // self.args.chunk_size
        picks = sorted(random.Random(1).sample(range(n), min(self.args.samples, n)))
        issues = []
        t0 = time.monotonic()
        with open(self.pristine, "rb") as f:
            want = {i: os.pread(f.fileno(), cs, i * cs) for i in picks}
        for export in exports:
            try:
                with NbdClient(str(self.sock), export) as c:
                    wrong = [i for i in picks if c.pread(cs, i * cs) != want[i]]
                    first = c.pread(cs, wrong[0] * cs) if wrong else None
                if wrong:
                    with NbdClient(str(self.sock), "origin") as c:
                        same = c.pread(cs, wrong[0] * cs) == first
                    issues.append(
                        f"{what}: WRONG DATA in snapshot {export}: {len(wrong)} of "
                        f"{len(picks)} sampled {fmt_size(cs)} chunks differ from the bytes "
                        f"it was taken with (first at offset {wrong[0] * cs}); that chunk "
                        + ("holds the origin's current data" if same else
                           "does not match the origin either"))
            except (OSError, NbdError) as e:
                issues.append(f"{what}: reading snapshot {export} with the NBD client: {e}")
        if not issues:
            say(f"sample check {what}: {len(picks)} chunks of each of {len(exports)} "
                f"snapshot(s) hold the original bytes ({time.monotonic() - t0:.1f} s)")
        return issues

    def check_ddsnap(self, n: int, what: str) -> list[str]:
        """Full compare of the first and last snapshot, sampled compare of up to
        --sample-snapshots of them (all of them when there are no more)."""
        issues = []
        for s in sorted({1, n}):
            issues += self.verify(self.uri(f"snap{s}"), f"ddsnap snap{s} {what}")
        issues += self.sample_check([f"snap{i}" for i in spread(n, self.args.sample_snapshots)],
                                    f"ddsnap {what}")
        for i in issues:
            self.problem(i)
        return issues

    # ---- ddsnap

    def ddsnap_up(self, n: int, tag: str = "") -> tuple[Server, Path]:
        """A fresh store (files ``ddsnap-store<tag>``, ``ddsnap-origin<tag>.raw``) served
        on ``self.sock``, with N snapshots snap1..snapN."""
        origin, store = self.tmp / f"ddsnap-origin{tag}.raw", self.tmp / f"ddsnap-store{tag}"
        drop_file(store)
        self.copy_pristine(origin)
        # Format v3: no snapshot limit (`--max-snapshots` defaults to 0, none), so the
        # same store serves any N.
        self.ddsnap("init", str(store), "--origin", str(origin),
                    "--size", str(2 * self.args.size + 64 * MiB),
                    "--chunk-size", str(self.args.chunk_size), what="ddsnap init")
        srv = self.procs.start("ddsnap serve",
                               [*self.ddsnap_cmd, "serve", str(store), "--listen",
                                f"unix:{self.sock}"],
                               self.sock, self.tmp / f"ddsnap-serve{tag}.log",
                               ready_path=Path(f"{store}.ctl"))
        t0 = time.monotonic()
        try:
            self.snap_create_pipelined(store, n)
        except BaseException:
            self.procs.stop(srv)
            raise
        dt_ = time.monotonic() - t0
        self.create_rates.setdefault(n, []).append(dt_)
        say(f"ddsnap: {n} snapshot(s) taken through the control socket "
            f"in {dt_:.1f} s")
        return srv, store

    @staticmethod
    def ctl_path(store: Path) -> Path:
        return Path(f"{store}.ctl")

    def snap_create_ctl(self, store: Path, n: int, prefix: str = "snap",
                        first: int = 1) -> list[float]:
        """Take snapshots PREFIX<first>..PREFIX<first+n-1> with `snap_create` requests
        sent straight to the control socket (the operation behind `ddsnap snap create`,
        without a Python start-up per snapshot), one connection each, one at a time;
        returns each round trip's wall time in ms (connect to reply)."""
        ctl = self.ctl_path(store)
        times = []
        for i in range(first, first + n):
            t0 = time.perf_counter()
            ctl_call(ctl, "snap_create", {"name": f"{prefix}{i}", "read_only": False})
            times.append((time.perf_counter() - t0) * 1000)
        return times

    def snap_create_pipelined(self, store: Path, n: int, prefix: str = "snap",
                              first: int = 1) -> None:
        """The same snapshots, for a setup: every `snap_create` request on one control
        connection, up to CTL_DEPTH of them sent ahead of their replies (the server
        still runs them one after the other, each a real, committed `snap_create`)."""
        ctl_pipeline(self.ctl_path(store), (
            ("snap_create", {"name": f"{prefix}{i}", "read_only": False})
            for i in range(first, first + n)))

    def ddsnap_used(self, store: Path) -> int:
        st = json.loads(self.ddsnap("status", str(store), "--json", what="ddsnap status").stdout)
        return st["chunks_used"]

    def ddsnap_down(self, srv: Server, store: Path, label: str, n: int = 0,
                    case: str | None = None) -> None:
        """Stop the server, `ddsnap check` the store; with ``case``, count its B-tree
        (metadata bytes per exception) before the files are removed."""
        self.ddsnap_stop(srv, label)
        bad = self.check_stopped(store, label)
        for x in bad:
            self.problem(x)
        if case is not None and not bad:
            self.meta_probe(store, case, n, label)
        drop_file(store)
        drop_file(store.with_name(store.name.replace("ddsnap-store", "ddsnap-origin") + ".raw"))

    def meta_probe(self, store: Path, case: str, n: int, label: str) -> MetaSample | None:
        """Open the stopped store read-only (bench/metaprobe.py, with the Python ddsnap
        runs under) and record its tree blocks and exceptions."""
        try:
            p = run([str(ROOT / ".venv" / "bin" / "python"), str(ROOT / "bench" / "metaprobe.py"),
                     str(store)], f"{label}: metadata count", timeout=600)
            d = json.loads(p.stdout)
        except (BenchError, ValueError) as e:
            self.problem(f"{label}: counting the store's metadata: {e}")
            return None
        m = MetaSample(case, n, d["chunk_size"], d["levels"], d["leaves"], d["index_nodes"],
                       d["records"], d["exceptions"], d["origin_entries"], d["table_blocks"],
                       d["leaf_max"])
        self.meta.append(m)
        bpe = m.bytes_per_exception
        say(f"metadata ({case}, N={n}): {m.exceptions} exceptions in {m.leaves} leaves + "
            f"{m.index_nodes} index node(s)"
            + (f" = {bpe:.1f} bytes per exception" if bpe else ""))
        return m

    def check_stopped(self, store: Path, label: str, timeout: float = 600) -> list[str]:
        """``ddsnap check`` on a store no server holds; what went wrong, if anything."""
        try:
            self.ddsnap("check", str(store), what=f"{label}: ddsnap check after stop",
                        timeout=timeout)
        except BenchError as e:
            return [str(e)]
        return []

    def ddsnap_stop(self, srv: Server, label: str) -> None:
        """Stop ``ddsnap serve`` with SIGTERM; report a crash, an unclean exit or output."""
        alive = srv.popen.poll() is None
        code, note = self.procs.stop(srv)
        log = srv.log.read_text()
        if not alive:
            self.problem(f"{label}: `ddsnap serve` had already exited ({code}) before the "
                         f"benchmark stopped it\n{tail(log)}")
        elif note or code != 0:
            self.problem(f"{label}: stopping `ddsnap serve` with SIGTERM: "
                         f"{note or f'exit code {code}'}\n{tail(log)}")
        extra = [ln for ln in log.splitlines() if ln.strip() and not ln.startswith("serving ")]
        if extra:
            self.problem(f"{label}: `ddsnap serve` printed:\n{tail(chr(10).join(extra))}")

    # ---- py-spy

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
        argv = [self.pyspy, "record", "--pid", str(srv.popen.pid), "--format", "raw",
                "--rate", str(self.args.profile_rate), "--nonblocking", "--function",
                "-o", str(raw)]
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

    # ---- qemu-nbd / qcow2

    def qcow2_make(self, n: int) -> Path:
        """A qcow2 image of the raw bytes with N internal snapshots.  The first call for an
        N makes a template (`qemu-img convert`, then N times `qemu-img snapshot -c`, which
        takes minutes for N=1024); every call copies it, so each run still starts from a
        freshly made image."""
        img = self.tmp / "image.qcow2"
        drop_file(img)
        if n not in self.qcow2_templates:
            if not self.args.interleave:  # one N at a time: the last N's is done with
                self.drop_qcow2_templates()
            tpl = self.tmp / f"template-N{n}.qcow2"
            drop_file(tpl)
            t0 = time.monotonic()
            run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2",
                 "-o", f"cluster_size={self.args.chunk_size}", str(self.pristine), str(tpl)],
                "qemu-img convert", timeout=600)
            t1 = time.monotonic()
            for i in range(1, n + 1):
                run(["qemu-img", "snapshot", "-c", f"snap{i}", str(tpl)], "qemu-img snapshot -c")
            t2 = time.monotonic()
            self.qcow2_templates[n] = tpl
            self.notes.append(
                f"N={n}: the qcow2 image was made once (`qemu-img convert` {t1 - t0:.1f} s, "
                f"then {n} × `qemu-img snapshot -c` {t2 - t1:.1f} s) and copied for every "
                f"qemu-nbd run at this N")
            say(f"qcow2: {n} internal snapshot(s) taken with qemu-img in {t2 - t1:.1f} s "
                f"(template, copied for every run)")
        shutil.copyfile(self.qcow2_templates[n], img)
        return img

    def drop_qcow2_templates(self) -> None:
        for tpl in self.qcow2_templates.values():
            drop_file(tpl)
        self.qcow2_templates.clear()

    def qemu_up(self, img: Path, snapshot: str | None = None) -> Server:
        argv = ["qemu-nbd", f"--socket={self.sock}", "--format=qcow2", "--persistent",
                "--shared=8", "--cache=writeback", "--aio=threads"]
        if snapshot is None:
            argv += ["--export-name=origin"]
        else:
            argv += ["--read-only", f"--load-snapshot=snapshot.name={snapshot}",
                     f"--export-name={snapshot}"]
        return self.procs.start("qemu-nbd", argv + [str(img)], self.sock,
                                self.tmp / "qemu-nbd.log")

    def server_down(self, srv: Server, label: str) -> None:
        alive = srv.popen.poll() is None
        code, note = self.procs.stop(srv)
        if not alive or note:
            self.problem(f"{label}: {srv.name} {note or f'had exited ({code})'}\n"
                         f"{tail(srv.log.read_text())}")

    # ---- steps

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
                        time_based=False)

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
                        time_based=True)

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

    def qemu_ok(self, n: int) -> bool:
        """qcow2 is the peer at N only up to --qcow2-max-snapshots: `qemu-img snapshot -c`
        takes longer with every snapshot the image holds."""
        if n <= self.args.qcow2_max_snapshots:
            return True
        if n not in self.qcow2_skipped:
            self.qcow2_skipped.add(n)
            self.notes.append(
                f"N={n}: qemu-nbd qcow2 not run (N > --qcow2-max-snapshots "
                f"{self.args.qcow2_max_snapshots}): each `qemu-img snapshot -c` rewrites the "
                f"image's snapshot table, so it gets slower as snapshots accumulate (the "
                f"whole image takes time quadratic in N: hours at 10,000)")
        return False

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
                        time_based=True, readonly=True)

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
                    for n, (srv, store, sock, bad) in up.items():
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
                            self.record(wl, n, "qemu", lambda wl=wl: self.read_fio(
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
            srv = self.procs.start("nbdkit", ["nbdkit", "--foreground", "--readonly",
                                              "--unix", str(self.sock), "file",
                                              f"file={self.pristine}"],
                                   self.sock, self.tmp / "nbdkit.log")
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

    # ---- merge throughput

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

    # ---- snap create latency

    def serve_store(self, store: Path, label: str) -> Server:
        return self.procs.start(label, [*self.ddsnap_cmd, "serve", str(store), "--listen",
                                        f"unix:{self.sock}"],
                                self.sock, self.tmp / "ddsnap-serve.log",
                                ready_path=self.ctl_path(store))

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

    # ---- snapshot count scaling (issue 9): creation at N, deletes among N

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
                    self.profiled(srv, f"delete-k{k}-fill{extra}", lambda: ctl_call(
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

    # ---- peak RSS on a huge sparse origin

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
        except OSError as e:
            return f"could not inspect the server process {pid}: {e}"
        note = (f"peak RSS is read from `/proc/{pid}/status` of the process started as "
                f"`{shlex.join(cmd)}` (`/proc/{pid}/exe` -> `{exe}`; once serving: {threads} "
                f"thread(s), {len(children)} child process(es)): the Python server itself, "
                f"not a wrapper")
        if "python" not in os.path.basename(exe) or children:
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

    def main(self) -> int:
        a = self.args
        t_start = time.monotonic()
        self.started = dt.datetime.now(dt.UTC)
        self.load_start = open("/proc/loadavg").read().split()[:3]
        say(f"temporary directory {self.tmp}; load average {' '.join(self.load_start)}")
        self.pick_access()
        if a.rev:
            self.use_rev(a.rev)
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
        self.load_end = open("/proc/loadavg").read().split()[:3]
        self.machine_rows = machine(self)
        try:  # so that the report can be written again (--from-state) without rerunning
            STATE_FILE.parent.mkdir(parents=True, exist_ok=True)
            STATE_FILE.write_bytes(pickle.dumps({k: getattr(self, k) for k in STATE_FIELDS}))
        except (OSError, pickle.PicklingError, TypeError, AttributeError) as e:
            say(f"could not save the run's state to {STATE_FILE}: {e}")
        return write_report(self, Path(a.out))

    def cleanup(self) -> None:
        self.procs.stop_all()
        if (self.tmp / "fuse").is_dir():
            subprocess.run(["fusermount3", "-u", str(self.tmp / "fuse")], capture_output=True)
        if self.args.keep:
            say(f"kept {self.tmp}")
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)


# --------------------------------------------------------------------------- report


def write_report(b, out: Path) -> int:
    """Write the markdown report of run ``b`` (a Bench, or a saved state) to ``out`` and
    print its tables, the targets last."""
    rep = Report(b)
    report = rep.markdown()
    print()
    print(report.split("<!-- table-end -->")[0].split("<!-- table-start -->")[-1].strip())
    print("\nTargets (issue 4); ratios: median (min–max) of the per-run ratios, run i "
          "over run i:\n")
    print(rep.targets_table())
    print()
    if "<!-- scaling-start -->" in report:
        print("Snapshot count scaling (issue 9):\n")
        print(report.split("<!-- scaling-end -->")[0].split("<!-- scaling-start -->")[-1]
              .strip())
        print()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report)
    say(f"wrote {out} (the run took {b.elapsed:.0f} s)")
    if b.problems:
        say(f"{len(b.problems)} problem(s) seen; they are listed in {out}")
    return 0


def report_from_state(path: Path, out: str | None) -> int:
    """``--from-state``: write the report of a saved run again (e.g. after changing the
    report code) without running anything."""
    try:
        state = SimpleNamespace(**pickle.loads(path.read_bytes()))
    except (OSError, pickle.UnpicklingError, EOFError, AttributeError) as e:
        print(f"bench: cannot read the saved run {path}: {e}", file=sys.stderr)
        return 1
    # a run saved before the scaling workloads existed
    for name, default in (("create_rates", {}), ("meta", []), ("scale_fills", []),
                          ("scale_errors", []), ("qcow2_skipped", set())):
        if not hasattr(state, name):
            setattr(state, name, default)
    for name, default in (("scaling", False), ("interleave", False),
                          ("qcow2_max_snapshots", DEFAULT_QCOW2_MAX),
                          ("scaling_count", 10000), ("create_samples", 50),
                          ("delete_fills", [0, 100000]), ("delete_exclusive", [100, 1000]),
                          ("delete_chunk_size", 4 * KiB), ("delete_write_points", 100),
                          ("sample_snapshots", 64)):
        if not hasattr(state.args, name):
            setattr(state.args, name, default)
    return write_report(state, Path(out or state.args.out))


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
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "?"
    try:
        for line in open("/proc/meminfo"):
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
    ]


class Report:
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

    def table(self) -> str:
        if not workloads(self.a):
            return "(no fio workload in this run)"
        rows = ["| workload | N | ddsnap | peer | peer's figure | ddsnap / peer "
                "| qemu-nbd qcow2 snapshot (information) | ddsnap / qemu-nbd |",
                "|---|---:|---:|---|---:|---:|---:|---:|"]
        for wl in workloads(self.a):
            for n in self.a.snapshots:
                d, _ = self.cell(wl, n, "ddsnap")
                dm = self.runs(wl.key, n, "ddsnap")
                if wl.kind in ("write", "overwrite"):
                    p, _ = self.cell(wl, n, "qemu")
                    r = self.ratio_cell(dm, self.runs(wl.key, n, "qemu"), wl.metric)
                    rows.append(f"| {wl.title} | {n} | {d} | qemu-nbd qcow2 active layer "
                                f"| {p} | {r} | | |")
                else:
                    p, _ = self.cell(wl, n, "nbdkit")
                    q, _ = self.cell(wl, n, "qemu")
                    r = self.ratio_cell(dm, self.runs(wl.key, n, "nbdkit"), wl.metric)
                    rq = self.ratio_cell(dm, self.runs(wl.key, n, "qemu"), wl.metric)
                    rows.append(f"| {wl.title} | {n} | {d} | nbdkit file (raw) | {p} "
                                f"| {r} | {q} | {rq} |")
        return "\n".join(rows)

    def flatness_table(self) -> str:
        a = self.a
        wls = [w for w in workloads(a) if w.kind in ("write", "overwrite")]
        ns = [n for n in a.snapshots if n > 1]
        if not wls or 1 not in a.snapshots or not ns:
            return ""
        rows = ["| workload | N | ddsnap at N / at N=1 "
                "| qemu-nbd qcow2 at N / at N=1 (information) |",
                "|---|---:|---:|---:|"]
        for wl in wls:
            for n in ns:
                d = self.ratio_cell(self.runs(wl.key, n, "ddsnap"),
                                    self.runs(wl.key, 1, "ddsnap"), wl.metric)
                q = self.ratio_cell(self.runs(wl.key, n, "qemu"),
                                    self.runs(wl.key, 1, "qemu"), wl.metric)
                rows.append(f"| {wl.title} | {n} | {d} | {q} |")
        return ("\n**Flatness**: each write figure at N snapshots divided by the same at N=1 "
                "(run i over run i; every store is made with no snapshot limit, format "
                "v3).\n\n" + "\n".join(rows) + "\n")

    # ---- the targets of issue 4

    def targets(self) -> list[tuple[str, str, str, str, str]]:
        """``(what, measured, target, met, note)`` for each target of issue 4."""
        a, b = self.a, self.b
        W = {w.key: w for w in all_workloads(a)}
        cs = fmt_size(a.chunk_size)
        rows = []

        def r2(v: float) -> str:
            return f"{v:.2f}"

        def add(what, vals, fmt, target, ok, note="", bad=False, profiled=False, why="",
                unit=""):
            if not vals:
                rows.append((what, "–", target, "not measured", why or note))
                return
            med = statistics.median(vals)
            measured = (stats_text(vals, fmt) + unit
                        + (" (py-spy attached)" if profiled else ""))
            met = "no (wrong data)" if bad else ("yes" if ok(med) else "no")
            rows.append((what, measured, target, met, note))

        def fio_ratio(what, xs, ys, metric, target, limit, note="", why=""):
            add(what, self.paired(xs, ys, metric), r2, target, lambda v: v >= limit, note,
                bad=any(m.bad for m in xs + ys), profiled=any(m.profiled for m in xs + ys),
                why=why)

        def med(ms: list[Measure], metric: str) -> str:
            if not ms:
                return "–"
            v = statistics.median(m.value(metric) for m in ms)
            return f"{v:,.0f} IOPS" if metric == "iops" else f"{v:,.1f} MiB/s"

        # writes at one snapshot, against qcow2
        for key, what in (("randwrite4k", "4 KiB random write IOPS"),
                          ("seqwrite1m", "1 MiB sequential write MiB/s")):
            wl = W[key]
            xs, ys = self.runs(key, 1, "ddsnap"), self.runs(key, 1, "qemu")
            fio_ratio(f"{what}, 1 snapshot, ddsnap / qemu-nbd qcow2 ({cs} chunks vs {cs} "
                      f"clusters)", xs, ys, wl.metric, "≥ 1.0", 1.0,
                      f"medians: ddsnap {med(xs, wl.metric)}, qcow2 {med(ys, wl.metric)}",
                      why="needs N=1 and this workload in the run")
        # flatness
        flat_ns = [64, 1024]
        for n in flat_ns:
            for key, what in (("randwrite4k", "4 KiB random write IOPS"),
                              ("seqwrite1m", "1 MiB sequential write MiB/s")):
                wl = W[key]
                xs, ys = self.runs(key, n, "ddsnap"), self.runs(key, 1, "ddsnap")
                q = self.ratio_cell(self.runs(key, n, "qemu"), self.runs(key, 1, "qemu"),
                                    wl.metric)
                fio_ratio(f"{what} at N={n} snapshots / at N=1, ddsnap", xs, ys, wl.metric,
                          "≥ 0.9", 0.9,
                          f"qemu-nbd qcow2's own ratio: {q} (information)",
                          why=f"needs N=1 and N={n} in --snapshots")
        # snapshot reads against nbdkit
        n0 = 1 if 1 in a.snapshots else a.snapshots[0]
        for key, what in (("seqread1m", "1 MiB sequential read MiB/s"),
                          ("randread4k", "4 KiB random read IOPS")):
            wl = W[key]
            xs, ys = self.runs(key, n0, "ddsnap"), self.runs(key, n0, "nbdkit")
            fio_ratio(f"{what} of a snapshot (N={n0}) / nbdkit file plugin on the same raw "
                      f"bytes", xs, ys, wl.metric, "≥ 0.7", 0.7,
                      f"medians: ddsnap {med(xs, wl.metric)}, nbdkit {med(ys, wl.metric)}",
                      why="this workload was not in the run")
        # merge against cp
        for mode in a.merge_modes:
            ms = b.merge_runs.get(mode, [])
            vals = [m.mibs / m.cp_mibs for m in ms if m.cp_mibs]
            note = ""
            if ms:
                note = (f"medians: merge {statistics.median(m.mibs for m in ms):,.1f} MiB/s, "
                        f"cp {statistics.median(m.cp_mibs for m in ms if m.cp_mibs):,.1f} "
                        f"MiB/s; {fmt_size(ms[0].nbytes)}")
            add(f"merge MiB/s / `cp` of the same bytes ({mode})", vals, r2, "≥ 0.8",
                lambda v: v >= 0.8, note, bad=any(m.bad or m.unclean for m in ms),
                profiled=any(m.profiled for m in ms),
                why="the merge workload was not in the run")
        # snap create
        runs = {r.origin_size: r for r in b.snapcreate_runs}
        size = 64 * GiB if 64 * GiB in a.snapcreate_origins else max(a.snapcreate_origins)
        r = runs.get(size)
        note = ""
        if r is not None:
            note = (f"{len(r.ctl_ms)} `snap_create` round trips on the control socket; "
                    + (f"whole `ddsnap snap create` command "
                       f"{stats_text(r.cli_ms, lambda v: f'{v:.0f}')} ms (information, "
                       f"with the interpreter's start-up); " if r.cli_ms else "")
                    + "; ".join(f"{fmt_size(o.origin_size)} origin: "
                                f"{stats_text(o.ctl_ms, lambda v: f'{v:.2f}')} ms"
                                for o in b.snapcreate_runs if o.origin_size != size))
        add(f"`snap create` wall time on a {fmt_size(size)} sparse origin (control socket)",
            r.ctl_ms if r else [], lambda v: f"{v:.2f}", "< 10 ms", lambda v: v < 10,
            note.rstrip("; "), bad=bool(r and r.unclean),
            why="the snapcreate workload was not in the run", unit=" ms")
        # peak RSS
        add(f"peak RSS (VmHWM) of `ddsnap serve` on a {fmt_size(a.rss_origin_size)} sparse "
            f"origin through the fio jobs", [x.hwm / MiB for x in b.rss_runs],
            lambda v: f"{v:,.1f}", "< 256 MiB", lambda v: v < 256,
            f"{len(b.rss_runs)} run(s), a fresh server each" if b.rss_runs else "",
            bad=any(x.bad for x in b.rss_runs), why="the rss workload was not in the run",
            unit=" MiB")
        return rows

    def targets_table(self) -> str:
        rows = ["| target | measured: median (min–max) | target | met | notes |",
                "|---|---:|---:|---|---|"]
        rows += [f"| {w} | {m} | {t} | {ok} | {n} |" for w, m, t, ok, n in self.targets()]
        return "\n".join(rows)

    MERGE_MODES = {
        "local": "local: `ddsnap merge STORE snap1 --wait --no-progress`, store not served",
        "served": "served: `ddsnap merge STORE snap1` via the control socket, then "
                  "`merge_status` polled until null",
    }

    def merge_cell(self, vals: list[float], secs: list[float] | None = None) -> tuple[str, float]:
        vals = sorted(vals)
        med = statistics.median(vals)
        text = f"{med:,.1f} MiB/s"
        if len(vals) > 1:
            text += f" ({vals[0]:,.1f}–{vals[-1]:,.1f})"
        if secs:
            text += f" in {statistics.median(secs):.2f} s"
        return text, med

    def merge_table(self) -> str:
        b = self.b
        rows = ["| merge | snapshot data merged | ddsnap merge | `dd` store → origin (same "
                "files, in place) | ddsnap / dd | `cp --sparse=never` (same-size file → new "
                "file) | ddsnap / cp | after the merge |",
                "|---|---:|---:|---:|---:|---:|---:|---|"]
        for mode in self.a.merge_modes:
            ms = b.merge_runs.get(mode, [])
            if not ms:
                err = b.merge_errors.get(mode)
                rows.append(f"| {self.MERGE_MODES[mode]} | – | "
                            f"{'FAILED (see problems)' if err else '–'} | – | – | – | – | – |")
                continue
            d, _ = self.merge_cell([m.mibs for m in ms], [m.merge_s for m in ms])
            if any(m.profiled for m in ms):
                d += " (py-spy attached)"
            dds = [m.dd_mibs for m in ms if m.dd_mibs]
            cps = [m.cp_mibs for m in ms if m.cp_mibs]
            dd, _ = self.merge_cell(dds, [m.dd_s for m in ms if m.dd_s]) if dds else ("–", None)
            cp, _ = self.merge_cell(cps, [m.cp_s for m in ms if m.cp_s]) if cps else ("–", None)

            def per_run(vals: list[float]) -> str:  # run i over run i
                return stats_text(vals, lambda v: f"{v:.2f}") if vals else "–"

            rdd = per_run([m.mibs / m.dd_mibs for m in ms if m.dd_mibs])
            rcp = per_run([m.mibs / m.cp_mibs for m in ms if m.cp_mibs])
            if any(m.bad for m in ms):
                after = "⚠ **WRONG DATA** (see problems)"
            else:
                after = "origin == snapshot's bytes (`cmp`)"
            after += ("; ⚠ **`ddsnap check` / status not clean** (see problems)"
                      if any(m.unclean for m in ms) else "; `ddsnap check` clean")
            if any(m.bad for m in ms):
                d += " ⚠ wrong data"
            rows.append(f"| {self.MERGE_MODES[mode]} | {fmt_size(ms[0].nbytes)} | {d} | {dd} "
                        f"| {rdd} | {cp} | {rcp} | {after} |")
        return "\n".join(rows)

    def merge_details(self) -> str:
        rows = ["| merge | run | merged | chunks | ddsnap merge | server's chunks/s "
                "| `dd` | dd source allocated | `cp` | overwrite before (NBD) "
                "| store chunks used before the merge | note |",
                "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for mode in self.a.merge_modes:
            for i, m in enumerate(self.b.merge_runs.get(mode, []), 1):
                srate = f"{m.server_rate:,.0f}" if m.server_rate else "–"
                dd = f"{m.dd_s:.2f} s = {m.dd_mibs:,.1f} MiB/s" if m.dd_s else "–"
                alloc = f"{m.dd_alloc:.0%}" if m.dd_alloc is not None else "–"
                cp = f"{m.cp_s:.2f} s = {m.cp_mibs:,.1f} MiB/s" if m.cp_s else "–"
                note = []
                if m.status_s is not None:
                    note.append(f"one `ddsnap merge --status --json` call took {m.status_s:.2f} s")
                if m.bad:
                    note.append("⚠ WRONG DATA (see problems)")
                if m.unclean:
                    note.append("⚠ check/status not clean (see problems)")
                rows.append(f"| {mode} | {i} | {fmt_size(m.nbytes)} | {m.chunks} "
                            f"| {m.merge_s:.2f} s = {m.mibs:,.1f} MiB/s | {srate} | {dd} "
                            f"| {alloc} | {cp} | {m.overwrite_mibs:,.1f} MiB/s "
                            f"| {m.used_after_overwrite} | {'; '.join(note)} |")
        return "\n".join(rows)

    def merge_section(self) -> str:
        b, a = self.b, self.a
        if "merge" not in a.workloads:
            return ""
        cache = {"cold": "page cache dropped (`sync; echo 3 > /proc/sys/vm/drop_caches`) "
                         "before each of the three timed copies: all cold",
                 "warm": "page cache NOT dropped (not allowed): all warm",
                 None: "page cache: –"}[b.cache_mode]
        nbytes = b.merge_bytes
        share = "all" if nbytes == a.size else f"{nbytes / a.size:.0%}"
        what = (f"{fmt_size(nbytes)} of snapshot data ({share} of the {fmt_size(a.size)} "
                f"origin overwritten after the snapshot)" if nbytes else "–")
        return f"""
**Merge of a snapshot back into the origin** (online rollback): {what}, chunk
{fmt_size(a.chunk_size)}, 1 snapshot, {cache}; MiB/s = bytes of the snapshot's exceptions
merged / wall time of the whole command; {"1 run" if a.repeat == 1 else
f"{a.repeat} runs: median (min–max); each ratio is merge / copy of the same run"}.

{self.merge_table()}
"""

    def snapcreate_section(self) -> str:
        b, a = self.b, self.a
        if "snapcreate" not in a.workloads:
            return ""
        rows = ["| origin (sparse) | `snap_create` on the control socket | first one "
                "| whole `ddsnap snap create` command (information) "
                "| `ddsnap --version` (interpreter start-up and imports) | after |",
                "|---|---:|---:|---:|---:|---|"]
        for size in a.snapcreate_origins:
            r = next((x for x in b.snapcreate_runs if x.origin_size == size), None)
            if r is None:
                err = "FAILED (see problems)" if size in b.snapcreate_errors else "–"
                rows.append(f"| {fmt_size(size)} | {err} | – | – | – | – |")
                continue

            def ms(v: float) -> str:
                return f"{v:.2f}"

            after = ("⚠ `ddsnap check` / snapshot list not as expected (see problems)"
                     if r.unclean else "every snapshot listed; `ddsnap check` clean")
            cli = stats_text(r.cli_ms, lambda v: f"{v:.0f}") + " ms" if r.cli_ms else "–"
            ver = (stats_text(r.version_ms, lambda v: f"{v:.0f}") + " ms"
                   if r.version_ms else "–")
            rows.append(f"| {fmt_size(size)} | {stats_text(r.ctl_ms, ms)} ms over "
                        f"{len(r.ctl_ms)} | {r.ctl_ms[0]:.2f} ms | {cli} | {ver} | {after} |")
        return ("\n**Snapshot creation** on a served store whose origin is a sparse file "
                "(wall time of each request; median (min–max)):\n\n" + "\n".join(rows)
                + "\n")

    def rss_section(self) -> str:
        b, a = self.b, self.a
        if "rss" not in a.workloads:
            return ""
        head = ("| run | peak RSS (VmHWM) | VmRSS at the end | VmRSS before the fio jobs "
                "| VmHWM after each job (job's figure) | data |")
        rows = [head, "|---:|---:|---:|---:|---|---|"]
        for r in b.rss_runs:
            phases = "; ".join(f"{k} ({v:,.1f} {u}): {h / MiB:,.1f} MiB"
                               for k, v, u, h in r.phases)
            data = "⚠ see problems" if r.bad else "snap1 sampled = zeros; `ddsnap check` clean"
            rows.append(f"| {r.rep + 1} | {r.hwm / MiB:,.1f} MiB | {r.rss / MiB:,.1f} MiB "
                        f"| {r.start_rss / MiB:,.1f} MiB | {phases} | {data} |")
        for e in b.rss_errors:
            rows.append(f"| – | FAILED: {e} | | | | |")
        return (f"\n**Peak RSS** of `ddsnap serve` on a {fmt_size(a.rss_origin_size)} sparse "
                f"origin ({fmt_size(a.rss_store_size)} sparse store, 1 snapshot) through the "
                f"four fio jobs:\n\n" + "\n".join(rows) + "\n")

    # ---- issue 9: snapshot count scaling

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

    def profile_section(self) -> str:
        b, a = self.b, self.a
        if not a.profile:
            return ("(not profiled in this run; `bench/run --profile` samples the ddsnap "
                    "server with py-spy)")
        if not b.profiles:
            return "(--profile was given, but no profile was recorded; see problems)"
        out = [f"{b.pyspy_version} sampled the ddsnap server "
               f"(`py-spy record --pid PID --format raw --rate {a.profile_rate} --nonblocking "
               f"--function`, stopped with SIGINT after the job) during each ddsnap fio job, "
               f"the served merge and, in the scaling workload, the `snap_create` requests "
               f"timed at N and each `snap_delete`; the figures measured meanwhile are marked "
               f"\"py-spy attached\" and are lower than unprofiled ones.  Idle threads "
               f"(waiting for a request, a lock or I/O) are not sampled, so the percentages "
               f"are of the samples in which a thread was running Python code or a system "
               f"call (py-spy's idle test is a heuristic: threads woken up and waiting for "
               f"the GIL, e.g. in the thread pool's `_worker`, count as busy); each sample "
               f"has one stack per busy thread; samples of all repetitions are added up.  "
               f"`--function` gives each frame the line where its function starts.  *Self*: "
               f"samples with that function at the top of the stack; *inclusive*: samples "
               f"with it anywhere in the stack, listed for ddsnap's own functions only (the "
               f"threading, asyncio and click frames around them are in nearly every "
               f"sample).  Raw collapsed stacks: `bench/out/profiles/<job>.txt` "
               f"(flamegraph.pl / speedscope input)."]
        for label, stacks in b.profiles.items():
            total = sum(stacks.values())
            if not total:
                out.append(f"\n### {label}\n\n(no samples)")
                continue
            own: collections.Counter = collections.Counter()
            incl: collections.Counter = collections.Counter()
            for stack, c in stacks.items():
                frames = stack.split(";")
                own[frames[-1]] += c
                for f in set(frames):
                    if "(ddsnap/" in f:  # ddsnap's own code (see the text)
                        incl[f] += c
            runs = b.profile_runs.get(label, 0)
            out.append(f"\n### {label}\n\n{total:,} samples from {runs} run(s).\n")
            for title, cnt in (("self", own), ("inclusive, ddsnap's code", incl)):
                out.append(f"| top {title} | function (file:line) | % of samples |")
                out.append("|---:|---|---:|")
                for i, (f, c) in enumerate(cnt.most_common(15), 1):
                    out.append(f"| {i} | `{f.replace('|', '¦')}` | {100 * c / total:.1f} % |")
                out.append("")
        return "\n".join(out).rstrip() + "\n"

    def details(self) -> str:
        if not workloads(self.a):
            return "(no fio workload in this run)"
        rows = ["| workload | N | server | run | IOPS | MiB/s | moved | runtime "
                "| mean latency | p99 latency | note |",
                "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|"]
        for wl in workloads(self.a):
            for n in self.a.snapshots:
                for peer in ("ddsnap", "qemu", "nbdkit"):
                    for i, m in enumerate(self.b.results.get((wl.key, n, peer), []), 1):
                        rows.append(
                            f"| {wl.key} | {n} | {PEER_NAMES[peer]} | {i} | {m.iops:,.0f} "
                            f"| {m.mibs:,.1f} | {m.io_bytes / MiB:,.0f} MiB "
                            f"| {m.runtime_ms / 1000:.1f} s | {m.lat_mean_us:,.0f} µs "
                            f"| {m.lat_p99_us:,.0f} µs | {m.extra}"
                            + (f"; server CPU {m.cpu_us_per_io(wl.bs):,.1f} µs per I/O"
                               if m.cpu_us_per_io(wl.bs) is not None else "")
                            + f"{' (py-spy attached)' if m.profiled else ''}"
                            f"{' ⚠ wrong data (see problems)' if m.bad else ''} |")
        return "\n".join(rows)

    def markdown(self) -> str:
        a, b = self.a, self.b
        cmd = "bench/run" + ("" if not a.argv else " " + shlex.join(a.argv))
        reps = ("1 run per cell" if a.repeat == 1 else
                f"{a.repeat} runs per cell: median (min–max); a ratio pairs run i with "
                f"run i and shows the median (min–max) of those per-run ratios")
        mach = "\n".join(f"| {k} | {v} |" for k, v in b.machine_rows)
        fs = subprocess.run(["findmnt", "-no", "SOURCE,FSTYPE", "-T", a.tmpdir],
                            capture_output=True, text=True).stdout.strip() or "?"
        problems = ("\n\n".join("```\n" + p + "\n```" for p in b.problems)
                    if b.problems else "None: every fio job finished without an error, every "
                    "server stopped cleanly on SIGTERM, every verified snapshot held the "
                    "expected bytes and `ddsnap check` was clean after every ddsnap run"
                    + (", and after every merge the origin held the snapshot's bytes."
                       if "merge" in a.workloads else "."))
        notes = "\n".join(f"- {x}" for x in b.notes + b.merge_notes + b.rss_notes) \
            or "- (none)"
        ncpu = len(os.sched_getaffinity(0))
        busy = max(float(b.load_start[0]), float(b.load_end[0]))
        caveat = (f"\n**Caveat:** the 1-minute load average reached {busy:.1f} on {ncpu} CPUs "
                  f"around this run, so other processes competed for the CPUs; treat these "
                  f"figures as rough (rerun on a quiet machine).\n"
                  if busy > 0.5 * ncpu else "")
        if a.profile:
            caveat += ("\n**Profiled run** (`--profile`): py-spy sampled the ddsnap server "
                       "during its fio jobs and the served merge, so those figures (marked "
                       "\"py-spy attached\") and the ratios and targets built on them are lower "
                       "than without it: not comparable with unprofiled runs.\n")
        sizes = ", ".join(fmt_size(x) for x in a.snapcreate_origins)
        snapcreate_howto = "" if "snapcreate" not in a.workloads else f"""\
6. **Snapshot creation** (`snapcreate`), not a fio job: for each origin size of
   `--snapcreate-origins` ({sizes}), an origin file made with `truncate` (sparse: no
   data), `ddsnap init --size 1G` (a sparse store file), `ddsnap serve`, `sync`; then
   {a.snap_creates} `snap_create` requests
   (`lat1`, `lat2`, ...), each timed from connecting to the control socket to reading
   its reply (the wall time of the operation behind `ddsnap snap create`, including
   the flush of the origin it does); then, for information, {a.cli_creates} whole
   `ddsnap snap create STORE NAME` commands and {a.cli_creates} `ddsnap --version`
   commands, timed as processes.  The command adds a Python interpreter start-up and
   ddsnap's imports (what `ddsnap --version` costs) to the same request; the target
   (< 10 ms on a 64 GiB origin) is for the operation.  The table gives the first request
   on its own (a cold start).  Checks: the control socket's `snap_list` must list every
   snapshot in order, and `ddsnap check` must be clean after the server stopped.

"""
        scaling_howto = "" if not set(SCALING_FIO) & set(a.workloads) else f"""\
   Issue 9's workloads (with `--scaling`; see its section for the criteria):
   - **4 KiB random overwrites** (`overwrite4k`: `rw=randwrite bs=4k
     iodepth={a.iodepth_rand}`, `time_based` for {a.duration:g} s): fresh setup as for the
     writes, then one sequential pass of 1 MiB writes over the whole volume (not timed:
     every chunk copied out once), `sync`, then the timed job, in which every write
     lands on a chunk that is already the origin's own (no copy-out; the store must not
     grow, else a problem is reported).  The qcow2 image gets the same.
   - **4 KiB random reads of the newest snapshot** (`randread4k-newest`: as 4., of
     `snapN` instead of `snap1`, in the same setup): the copy-outs the setup made are
     read by every snapshot, so the oldest and the newest read the same exceptions.

"""
        rss_howto = "" if "rss" not in a.workloads else f"""\
7. **Peak RSS** (`rss`), on a {fmt_size(a.rss_origin_size)} origin made with `truncate`
   (sparse; `--rss-origin-size`) and a {fmt_size(a.rss_store_size)} store file
   (`ddsnap init --size`, sparse too; `--rss-store-size`), chunk
   {fmt_size(a.chunk_size)}: `ddsnap serve`, one snapshot `snap1` (control socket),
   `sync`, then one after the other, each for {a.duration:g} s: 4 KiB random writes over
   the **whole** origin (`rw=randwrite bs=4k iodepth={a.iodepth_rand}`, nearly every
   write a copy-out of a chunk not yet written), 1 MiB sequential writes over its first {fmt_size(a.rss_seq_size)}
   (`--rss-seq-size`; `rw=write bs=1m iodepth={a.iodepth_seq} size=...`, one pass or
   {a.duration:g} s), then reads of `snap1`: 1 MiB sequential over the same first
   {fmt_size(a.rss_seq_size)} and 4 KiB random over the whole volume (both
   `time_based`).  After the jobs, `VmHWM` (the kernel's peak resident set size of the
   process) and `VmRSS` are read from `/proc/PID/status` of the server, whose PID is the
   `ddsnap serve` Python process itself (checked once through `/proc/PID/exe` and its
   children; see the setup notes); `VmHWM` is also read after each job.  Then (not
   counted) about 64 sampled chunks of `snap1`, half of them in the sequentially rewritten
   range, must read as zeros (it was taken of an all-zero origin), the origin's first
   chunk must not, and `ddsnap check` must be clean after the server stopped.
   {a.repeat} run(s), each with a fresh store and server.  Target: < 256 MiB.

"""
        merge_howto = "" if "merge" not in a.workloads else f"""5. **Merge of a snapshot into the origin** (`ddsnap merge`, an online rollback), not a
   fio job.  Setup, fresh for every run: copy the raw bytes to the origin, `ddsnap init`,
   serve, take `snap1` (control socket), then overwrite the first
   {fmt_size(b.merge_bytes)} of the origin **through ddsnap** (fio
   `rw=write bs=1m iodepth={a.iodepth_seq}` on the NBD origin export), so that every
   overwritten chunk is copied out into snap1's exceptions first; the snapshot's
   exceptions are then exactly those bytes.  Then `sync` and drop the page cache (see
   the table), and time the merge of snap1 (without `--keep`, so snap1 is deleted at the
   end) until it is complete:
   - **local**: stop the server (SIGTERM), then time the whole command
     `ddsnap merge STORE snap1 --wait --no-progress` (Python start, open, merge, close);
   - **served**: the server keeps running; time from starting
     `ddsnap merge STORE snap1 --no-progress` (which starts the merge through the
     control socket and returns) until the control socket's `merge_status` (the operation
     behind `ddsnap merge STORE --status --json`, asked directly on the socket every
     0.1 s so that polling costs no Python start-ups) returns null; then
     `ddsnap merge STORE --status --json` is run once and must print `null`.

   MiB/s = bytes of the snapshot's exceptions / that wall time.  Each merge step copies
   a linear run of up to 32 chunks in one read from the store and one write to the
   origin, then `fdatasync`s the origin and commits the store's journal.  Checks (not
   timed): the origin **file** is compared with the snapshot's saved raw copy (`cmp` with
   the original bytes; for the served merge also the origin export read back with
   `nbdcopy` while still served), `ddsnap check` must print clean and `ddsnap status`
   must show no merge and no snapshot left; otherwise the row says ⚠ WRONG DATA / not
   clean and *Problems seen* has the details.  Then, in the same run, two copies of the
   same number of bytes, each after `sync` + dropping the page cache again:
   - **`dd` between the same files**: `dd if=STORE of=ORIGIN bs=1M count=N/1MiB
     skip=S iflag=skip_bytes conv=notrunc,fsync`, i.e. read the store from where the
     exceptions were written (S = the offset where the stretch of the store file holding
     the most allocated data starts, found with `SEEK_DATA`/`SEEK_HOLE`; the details
     table gives the share of that range that is allocated, not holes) and overwrite the
     origin in place from offset 0, as the merge did, with one `fsync` at the end (the
     merge syncs every step instead);
   - **`cp`**: `cp --sparse=never SRC NEW && sync NEW` where SRC is a file of exactly
     that many bytes (the original raw file itself when the whole origin is merged) and
     NEW a new file in the same directory (`{b.cp_version}`, which copies with
     `copy_file_range` inside the kernel).

   Both copies end with their data synced, like the merge.  `cp` is the plain-copy
   reference; `dd` is the closest plain copy between the same two files.

"""
        return f"""# ddsnap benchmarks

This file is written by `bench/run` (source: `bench/bench.py`); rerun it rather than
editing the numbers by hand.  It measures the same fio jobs over NBD against ddsnap and
against established NBD servers, how the write figures hold up with many snapshots, how
fast `ddsnap merge` rolls the origin back to a snapshot compared with plain `dd` / `cp`
copies of the same number of bytes, how long taking a snapshot takes, and how much
memory the server uses for a 1 TiB origin.  The first table compares the results with
the targets of issue 4; with `--scaling`, the section "Snapshot count scaling (issue 9)"
judges issue 9's criteria instead.  Nothing fails the run on a threshold.

## Latest results

<!-- table-start -->
Run {b.started.strftime('%Y-%m-%d %H:%M UTC')} with `{cmd}`: volume {fmt_size(a.size)},
chunk / cluster {fmt_size(a.chunk_size)}, {a.duration:g} s per fio run, iodepth
{a.iodepth_rand} (4 KiB) / {a.iodepth_seq} (1 MiB), {reps}; N = snapshots taken.
{caveat}
**Targets** (issue 4).  A ratio is computed per repetition (run i of ddsnap over run i of
the peer, or over run i at N=1) and shown as the median (min–max) of those per-run
ratios; the snapshot creation time is over its {a.snap_creates} requests and the peak RSS
over {a.repeat} fresh server(s).  "Met" is judged on the median; "not measured" means the
run did not include what the row needs.

{self.targets_table()}

**Every fio figure**:

{self.table()}
{self.flatness_table()}{self.merge_section()}{self.snapcreate_section()}{self.rss_section()}<!-- table-end -->

The ratio is ddsnap's figure divided by the peer's (for the merge: by `dd`'s or `cp`'s),
above 1: ddsnap is faster.
The whole run took {b.elapsed / 60:.1f} minutes.

### Machine

| | |
|---|---|
{mach}
| data directory | `{a.tmpdir}` on {fs} (temporary directory, removed afterwards) |
| I/O path | {b.access_text} |
| load average (1, 5, 15 min) | {' '.join(b.load_start)} at the start, {' '.join(b.load_end)} at the end (other work on the machine shows here) |
{self.scaling_section()}
## How to run it

```
bench/run                      # defaults: --snapshots 1,64,1024 --size 1G --duration 10 --repeat 3
bench/run --quick              # smoke run of every workload (64 MiB, 2 s runs, N = 1,64, 1 run), to bench/out/quick.md
bench/run --snapshots 1,64 --size 4G --duration 30 --out /tmp/b.md
bench/run --workloads merge --size 1G --merge-fraction 0.5 --out /tmp/m.md   # merge only
bench/run --workloads snapcreate,rss --out /tmp/s.md       # snapshot creation and peak RSS only
bench/run --profile --repeat 1 --out /tmp/p.md            # py-spy profiles of the ddsnap server
bench/run --scaling            # issue 9: N = 1,1024,10000, to docs/benchmarks-scaling.md
bench/run --scaling --duration 2 --repeat 1 --size 64M --out /tmp/s.md    # its smoke run
```

`bench/run` first runs `scripts/setup` (fio, qemu-utils, nbdkit, libnbd-bin, the venv) and
installs the `bench` extra of `pyproject.toml` (py-spy) into the venv, then runs
`bench/bench.py` with the project's venv.  A default run takes about {DEFAULT_RUN_MINUTES}
minutes on a 2-CPU machine.  Other parameters: `--chunk-size` (ddsnap chunk and qcow2
cluster, default 64K), `--iodepth-rand`, `--iodepth-seq`, `--workloads` (default
`{",".join(DEFAULT_WORKLOADS[:4])},`
`{",".join(DEFAULT_WORKLOADS[4:])}`; also `{",".join(SCALING_FIO)},scaling`, the
default with `--scaling`: `{",".join(SCALING_WORKLOADS)}`), `--qcow2-max-snapshots`
(largest N the qcow2 peer runs at, default {DEFAULT_QCOW2_MAX}), `--merge-fraction` (share of the
origin overwritten after the snapshot and so merged back, default 1), `--merge-modes` (`local,served`),
`--snap-creates` (K, default 20), `--cli-creates` (default 3), `--snapcreate-origins`
(default `64G,1G`), `--rss-origin-size` (default 1T), `--rss-store-size` (default 64G),
`--rss-seq-size` (default 4G), `--profile` and `--profile-rate` (default 250 samples/s),
`--scaling-count` (default 10000), `--create-samples` (default 50), `--delete-fills`
(default `0,100000`), `--delete-exclusive` (default `100,1000`), `--delete-chunk-size`
(default 4K), `--delete-write-points` (default 100),
`--tmpdir`, `--access` (`nbd` engine or `nbdfuse`), `--samples`, `--sample-snapshots`
(default 64), `--no-verify`, `--keep`,
and `--rev REV` to benchmark ddsnap as committed in REV (run from a `git archive` in the
temporary directory) rather than the working tree.
Every server is stopped and the temporary directory removed on exit, also on failure
or Ctrl-C.  Every run also saves its results to `bench/out/last-run.pickle`;
`bench/run --from-state bench/out/last-run.pickle [--out FILE]` writes the report again
from them without running anything.

## What is compared

- **ddsnap**: `ddsnap serve STORE --listen unix:SOCK` on a store made with
  `ddsnap init --chunk-size {fmt_size(a.chunk_size)}` for a raw origin file (format v3:
  no snapshot limit, the same kind of store for every N).  Snapshots are taken while the
  store is served, with `snap_create` requests sent straight to its control socket (the
  operation `ddsnap snap create` sends), so that 10,000 snapshots do not cost 10,000
  Python start-ups; a setup sends them on one connection, up to {CTL_DEPTH} ahead of
  their replies (the server still runs each, committed, one after the other).
- **qemu-nbd qcow2**: a qcow2 image (`qemu-img convert -O qcow2 -o cluster_size=...` of
  the same raw bytes) with the same number of internal snapshots (`qemu-img snapshot -c`,
  taken offline since qemu-nbd locks the image; for each N the image is made once and
  copied for every run, since each `qemu-img snapshot -c` gets slower as snapshots
  accumulate and 1024 of them take minutes; beyond N = {a.qcow2_max_snapshots}
  (`--qcow2-max-snapshots`) qcow2 is not run), served with `qemu-nbd --cache=writeback
  --aio=threads` (qemu's defaults): the active layer for writes, `--read-only
  --load-snapshot=snapshot.name=SNAP` for reads.  The peer for the write workloads.
- **nbdkit file**: `nbdkit --readonly file file=RAW` on a raw file holding exactly the bytes
  of the snapshot being read.  The peer for the read workloads (the cost of serving the
  same bytes with no snapshot machinery at all); the qcow2 snapshot read is shown
  alongside for information.

All files live in the same directory, on the same filesystem, and use the page cache
(none of the servers uses O_DIRECT); the machine has far more memory than the data, so
reads are mostly served from the page cache and the figures measure the servers' own
cost more than the disk.  `sync` runs before every measured fio job so that writeback
of the setup does not overlap it.  One difference is inherent, not a setting: ddsnap makes
every copy-out durable before the origin write that needs it (its invariant 3), which
takes `fsync`s in the write path, while qemu-nbd in writeback mode only flushes when the
client asks; fio sends no flush here.

## How each workload is run

The origin is {fmt_size(a.size)} of random bytes (`os.urandom`), so reads are real.

1. **4 KiB random writes** (`rw=randwrite bs=4k iodepth={a.iodepth_rand}`) and
2. **1 MiB sequential writes** (`rw=write bs=1m iodepth={a.iodepth_seq}`) to the origin:
   fresh setup for every run (copy the raw bytes, `ddsnap init` / copy of the qcow2
   image, take N snapshots), then at once one fio job.  The job stops after one pass over
   the volume or after {a.duration:g} s, whichever comes first (`runtime` without
   `time_based`), so no block is written twice in a sequential run and every write goes
   to a volume all of whose chunks were just snapshotted: the copy-on-write path (for
   4 KiB writes, a {fmt_size(a.chunk_size)} chunk is copied out on the first write to it
   and later writes to the same chunk do not copy).  After each ddsnap run the data is
   checked (see below).  **Flatness** divides each figure at N by the same at N=1, run i
   by run i; issue 4's targets use N = 64 and 1024.
3. **1 MiB sequential reads** (`rw=read bs=1m iodepth={a.iodepth_seq}`) and
4. **4 KiB random reads** (`rw=randread bs=4k iodepth={a.iodepth_rand}`) of snapshot
   `snap1`, each `time_based` for {a.duration:g} s.  Setup: take N snapshots, then
   overwrite **every other chunk** of the origin through NBD (fio `rw=write:CHUNK
   bs=CHUNK io_size=half`), so half of `snap1` is read from exceptions in the store and
   half from the unchanged origin (a 1 MiB read touches both).  The same is done on the
   qcow2 image before `qemu-nbd -l snap1` serves it; nbdkit serves the untouched raw
   file, which holds the snapshot's bytes.  Before the timed runs the qcow2 `snap1` is
   read back whole with `nbdcopy` and compared with the raw file, and the ddsnap
   snapshots are checked as below.  The read targets use N=1.

{scaling_howto}{merge_howto}{snapcreate_howto}{rss_howto}**Data checks** (not timed): after every ddsnap write run and before the ddsnap reads,
the first and the last snapshot are read back whole with `nbdcopy` and compared with the
original bytes (`cmp`), and {a.samples} chunks at random offsets (the same for all) are read
from every snapshot (from {a.sample_snapshots} of them, evenly spread from the first to the
last, when there are more: `--sample-snapshots`) with a small NBD client
(`bench/nbdclient.py`) and compared too.
A figure measured on a server that then failed a check is marked "⚠ wrong data" (and its
target row says "no (wrong data)"); the check's output is under *Problems seen*.
`ddsnap check` runs on every store after its server stopped.

`randrepeat=1`, so every server sees the same random offsets.  One fio job, one NBD
connection.

## Setup notes from this run

{notes}

## Profiles of the ddsnap server

{self.profile_section()}
## Every fio run

{self.details()}

## Every merge run

{self.merge_details() if "merge" in a.workloads else "(the merge workload was not run)"}

## Problems seen

{problems}
"""


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str]):
    p = argparse.ArgumentParser(
        prog="bench/run",
        description="Run the same fio jobs over NBD against ddsnap, qemu-nbd (qcow2) and "
                    "nbdkit (file), time `ddsnap merge` against dd/cp copies of the same "
                    "bytes, time snapshot creation, measure the server's peak RSS on a "
                    "sparse 1 TiB origin, and write a markdown report headed by issue 4's "
                    "targets; with --scaling, issue 9's snapshot count scaling instead "
                    "(N = 1, 1024, 10000: copy-on-write, overwrite and snapshot read "
                    "figures at N over N=1, creation at 10,000, deletes, metadata per "
                    "exception).",
        epilog="`bench/run --from-state bench/out/last-run.pickle [--out FILE]` writes the "
               "report of the last run again (every run saves its results there) without "
               "running anything.")
    p.add_argument("--snapshots", help="comma-separated snapshot counts N (any N: format v3 "
                                       "stores have no snapshot limit) [1,64,1024; 1,64 "
                                       f"with --quick; {SCALING_SNAPSHOTS} with --scaling]")
    p.add_argument("--scaling", action="store_true",
                   help="issue 9's snapshot count scaling: the defaults become --snapshots "
                        f"{SCALING_SNAPSHOTS} --workloads {','.join(SCALING_WORKLOADS)} "
                        "--out docs/benchmarks-scaling.md (each can still be given)")
    p.add_argument("--chunk-size", type=parse_size,
                   help="ddsnap chunk size and qcow2 cluster size [64K]")
    p.add_argument("--duration", type=float, help="seconds per fio run [10; 2 with --quick]")
    p.add_argument("--size", type=parse_size,
                   help="origin size, all of it random data [1G; 64M with --quick]")
    p.add_argument("--repeat", type=int,
                   help="runs per cell (fio, merge, peak RSS): median (min–max) "
                        "[3; 1 with --quick]")
    p.add_argument("--out", help="markdown file to write [docs/benchmarks.md; "
                                 "bench/out/quick.md with --quick]")
    p.add_argument("--quick", action="store_true",
                   help="small smoke run of every workload: --size 64M --duration 2 "
                        "--snapshots 1,64 --repeat 1 --snap-creates 5 --rss-seq-size 256M")
    p.add_argument("--iodepth-rand", type=int, default=32, help="iodepth of 4 KiB jobs [32]")
    p.add_argument("--iodepth-seq", type=int, default=16, help="iodepth of 1 MiB jobs [16]")
    p.add_argument("--workloads",
                   help=f"comma-separated subset of {','.join(ALL_WORKLOADS)} "
                        f"[{','.join(DEFAULT_WORKLOADS)}; with --scaling "
                        f"{','.join(SCALING_WORKLOADS)}]")
    p.add_argument("--interleave", action=argparse.BooleanOptionalAction,
                   help="run repetition i of a workload at every N back to back (ddsnap's "
                        "reads with one server per N up at once), so that the ratios at N "
                        "over N=1 pair runs made close together in time [on with "
                        "--scaling, else off]")
    p.add_argument("--qcow2-max-snapshots", type=int, default=DEFAULT_QCOW2_MAX,
                   help="largest N at which the qemu-nbd qcow2 peer runs (its image is made "
                        "with one `qemu-img snapshot -c` per snapshot, each slower than the "
                        f"last); 0 never [{DEFAULT_QCOW2_MAX}]")
    p.add_argument("--scaling-count", type=int, default=10000,
                   help="scaling workload: snapshots in the stores where creation and "
                        "deletes are timed [10000]")
    p.add_argument("--create-samples", type=int, default=50,
                   help="scaling workload: `snap_create` requests timed one by one on the "
                        "empty store and again once --scaling-count snapshots exist [50]")
    p.add_argument("--delete-fills", default="0,100000",
                   help="scaling workload: one store per value, with that many extra origin "
                        "history entries (copy-outs) spread over its snapshots [0,100000]")
    p.add_argument("--delete-exclusive", default="100,1000",
                   help="scaling workload: k of the snapshots made with k exclusive "
                        "copy-outs and deleted (after one with none) [100,1000]")
    p.add_argument("--delete-chunk-size", type=parse_size, default=4 * KiB,
                   help="scaling workload: chunk size of those stores (small, so that 10^5 "
                        "copy-outs are 400 MiB, not 6 GiB) [4K]")
    p.add_argument("--delete-write-points", type=int, default=100,
                   help="scaling workload: the extra entries are written in this many "
                        "bursts, spread over the snapshots [100]")
    p.add_argument("--merge-fraction", type=float, default=1.0,
                   help="merge workload: fraction of the origin overwritten after the "
                        "snapshot, i.e. merged back [1.0]")
    p.add_argument("--merge-modes", default="local,served",
                   help="merge workload: local (`merge --wait`, store not served), served "
                        "(through the control socket), or both [local,served]")
    p.add_argument("--snap-creates", type=int,
                   help="snapcreate workload: snapshots K timed through the control socket "
                        "per origin [20; 5 with --quick]")
    p.add_argument("--cli-creates", type=int, default=3,
                   help="snapcreate workload: whole `ddsnap snap create` commands timed "
                        "per origin, for information [3]")
    p.add_argument("--snapcreate-origins", default="64G,1G",
                   help="snapcreate workload: sizes of the sparse origins [64G,1G]")
    p.add_argument("--rss-origin-size", type=parse_size, default=TiB,
                   help="rss workload: size of the sparse origin [1T]")
    p.add_argument("--rss-store-size", type=parse_size, default=64 * GiB,
                   help="rss workload: size of the (sparse) store file [64G]")
    p.add_argument("--rss-seq-size", type=parse_size,
                   help="rss workload: range of the origin / snapshot covered by the 1 MiB "
                        "sequential jobs, from offset 0 [4G; 256M with --quick]")
    p.add_argument("--profile", action="store_true",
                   help="sample the ddsnap server with py-spy during each ddsnap fio job, "
                        "the served merge and the scaling workload's timed creations and "
                        "deletes; raw stacks go to bench/out/profiles/ and the "
                        "report lists the hottest functions (profiled figures are lower)")
    p.add_argument("--profile-rate", type=int, default=250,
                   help="py-spy samples per second [250]")
    p.add_argument("--tmpdir", default="/var/tmp",
                   help="where the temporary directory is made [/var/tmp]")
    p.add_argument("--access", choices=("auto", "nbd", "nbdfuse"), default="auto",
                   help="fio's nbd engine, or nbdfuse + libaio on the FUSE file [auto]")
    p.add_argument("--samples", type=int, default=64,
                   help="chunks read from each checked snapshot by the sampled data check "
                        "[64]")
    p.add_argument("--sample-snapshots", type=int, default=64,
                   help="snapshots the sampled data check reads, evenly spread from the "
                        "first to the last (all of them when N is not larger) [64]")
    p.add_argument("--rev", help="benchmark ddsnap as committed in git revision REV (git "
                                 "archive into the temporary directory) instead of the "
                                 "working tree")
    p.add_argument("--no-verify", action="store_true",
                   help="skip reading snapshots back whole with nbdcopy to compare them")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    a = p.parse_args(argv)
    a.argv = argv
    q = a.quick
    a.snapshots = a.snapshots or (SCALING_SNAPSHOTS if a.scaling else
                                  "1,64" if q else "1,64,1024")
    try:
        a.snapshots = [int(x) for x in a.snapshots.split(",") if x.strip()]
    except ValueError:
        p.error("--snapshots takes comma-separated integers, e.g. 1,64")
    if not a.snapshots or min(a.snapshots) < 1:
        p.error("--snapshots: each N must be at least 1")
    a.snapshots = sorted(set(a.snapshots))
    a.chunk_size = a.chunk_size or 64 * KiB
    if a.chunk_size & (a.chunk_size - 1) or not 4 * KiB <= a.chunk_size <= MiB:
        p.error("--chunk-size must be a power of two from 4K to 1M")
    a.duration = a.duration or (2.0 if q else 10.0)
    a.size = a.size or (64 * MiB if q else GiB)
    if a.size % (2 * a.chunk_size):
        p.error("--size must be a multiple of twice the chunk size")
    a.repeat = a.repeat or (1 if q else 3)
    if a.repeat < 1:
        p.error("--repeat must be at least 1")
    a.out = a.out or str(ROOT / ("docs/benchmarks-scaling.md" if a.scaling else
                                 "bench/out/quick.md" if q else "docs/benchmarks.md"))
    if a.interleave is None:
        a.interleave = a.scaling
    a.workloads = a.workloads or ",".join(SCALING_WORKLOADS if a.scaling
                                          else DEFAULT_WORKLOADS)
    a.workloads = [w.strip() for w in a.workloads.split(",") if w.strip()]
    if not a.workloads or set(a.workloads) - set(ALL_WORKLOADS):
        p.error(f"--workloads: choose from {','.join(ALL_WORKLOADS)}")
    if not 0 < a.merge_fraction <= 1:
        p.error("--merge-fraction must be in (0, 1]")
    a.merge_modes = [m.strip() for m in a.merge_modes.split(",") if m.strip()]
    if not a.merge_modes or set(a.merge_modes) - {"local", "served"}:
        p.error("--merge-modes: local, served or local,served")
    a.snap_creates = a.snap_creates or (5 if q else 20)
    if a.snap_creates < 1 or a.cli_creates < 0:
        p.error("--snap-creates must be at least 1, --cli-creates at least 0")
    try:
        a.delete_fills = [int(x) for x in a.delete_fills.split(",") if x.strip()]
        a.delete_exclusive = [int(x) for x in a.delete_exclusive.split(",") if x.strip()]
    except ValueError:
        p.error("--delete-fills and --delete-exclusive take comma-separated integers")
    if not a.delete_fills or min(a.delete_fills) < 0:
        p.error("--delete-fills: give at least one count, each at least 0")
    if min(a.delete_exclusive, default=1) < 1:
        p.error("--delete-exclusive: each k must be at least 1")
    dcs = a.delete_chunk_size
    if dcs & (dcs - 1) or not 4 * KiB <= dcs <= MiB or a.size % dcs:
        p.error("--delete-chunk-size must be a power of two from 4K to 1M dividing --size")
    if sum(a.delete_exclusive) > a.size // dcs // 4:
        p.error("--delete-exclusive: the k ranges must fit in the first quarter of the "
                "origin (--size / --delete-chunk-size / 4 chunks)")
    if a.scaling_count < 10 * (len(a.delete_exclusive) + 2):
        p.error("--scaling-count is too small for the snapshots to delete")
    if a.create_samples < 1 or a.delete_write_points < 1 or a.sample_snapshots < 2:
        p.error("--create-samples and --delete-write-points must be at least 1, "
                "--sample-snapshots at least 2")
    try:
        a.snapcreate_origins = [parse_size(x) for x in a.snapcreate_origins.split(",")
                                if x.strip()]
    except argparse.ArgumentTypeError as e:
        p.error(f"--snapcreate-origins: {e}")
    if not a.snapcreate_origins:
        p.error("--snapcreate-origins: give at least one size")
    a.rss_seq_size = a.rss_seq_size or (256 * MiB if q else 4 * GiB)
    for name in ("rss_origin_size", "rss_store_size", "rss_seq_size"):
        if getattr(a, name) % a.chunk_size:
            p.error(f"--{name.replace('_', '-')} must be a multiple of the chunk size")
    if a.profile_rate < 1:
        p.error("--profile-rate must be at least 1")
    return a


def main(argv: list[str]) -> int:
    if argv[:1] == ["--from-state"]:
        if len(argv) not in (2, 4) or (len(argv) == 4 and argv[2] != "--out"):
            print("usage: bench/run --from-state STATE [--out FILE]", file=sys.stderr)
            return 2
        return report_from_state(Path(argv[1]), argv[3] if len(argv) == 4 else None)
    args = parse_args(argv)
    for tool in ("fio", "qemu-img", "qemu-nbd", "nbdkit", "nbdcopy", "cmp", "dd", "cp", "sync"):
        if shutil.which(tool) is None:
            print(f"bench: {tool} not found; run scripts/setup", file=sys.stderr)
            return 2
    if not DDSNAP.exists():
        print(f"bench: {DDSNAP} not found; run scripts/setup", file=sys.stderr)
        return 2
    if args.profile and not (shutil.which("py-spy", path=str(ROOT / ".venv" / "bin"))
                             or shutil.which("py-spy")):
        print("bench: --profile needs py-spy; `bench/run` installs it "
              "(.venv/bin/pip install -e '.[test,bench]')", file=sys.stderr)
        return 2

    def stop(signum, frame):
        raise Stop(signal.Signals(signum).name)

    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started in background
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGHUP, stop)
    bench = Bench(args)
    try:
        return bench.main()
    except BenchError as e:
        print(f"bench: {e}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, Stop) as e:
        print(f"\nbench: interrupted ({str(e) or 'SIGINT'}); cleaning up", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # finish cleaning up undisturbed
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        bench.cleanup()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
