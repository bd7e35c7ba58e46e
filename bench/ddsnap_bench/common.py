"""What every part of the benchmark shares: paths, units, the workload names, the
errors, and small helpers (running a command, sizes for people and for argparse,
``/proc`` figures of a process, the allocated ranges of a sparse file).  Nothing here
measures anything."""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import subprocess
import time
from pathlib import Path

from ddsnap.errors import InvalidArgument
from ddsnap.units import parse_size

#: the repository (bench/ddsnap_bench/common.py -> .)
ROOT = Path(__file__).resolve().parents[2]
DDSNAP = ROOT / ".venv" / "bin" / "ddsnap"
MiB = 1 << 20
KiB = 1 << 10
GiB = 1 << 30
TiB = 1 << 40
PROFILE_DIR = ROOT / "bench" / "out" / "profiles"
STATE_FILE = ROOT / "bench" / "out" / "last-run.pickle"
CLUSTER_STATE_FILE = ROOT / "bench" / "out" / "last-cluster-run.pickle"  # --cluster's
SEND_STATE_FILE = ROOT / "bench" / "out" / "last-send-run.pickle"  # --send's
DEFAULT_RUN_MINUTES = 30  # a default `bench/run`, for the text (2 busy CPUs, 2026-11)
FIO_WORKLOADS = ("randwrite4k", "seqwrite1m", "seqread1m", "randread4k")  # issue 4's
SCALING_FIO = ("overwrite4k", "randread4k-newest")  # issue 9's, with randwrite4k, randread4k
# issue 11's: two connections each (fio numjobs=2), for every peer alike
TWO_CONNECTION_FIO = ("overwrite4k-2c", "randread4k-2c")
ALL_FIO = FIO_WORKLOADS + SCALING_FIO + TWO_CONNECTION_FIO
DEFAULT_WORKLOADS = FIO_WORKLOADS + ("overwrite4k",) + TWO_CONNECTION_FIO + (
    "merge", "snapcreate", "rss")
ALL_WORKLOADS = ALL_FIO + ("merge", "snapcreate", "rss", "scaling")
# --scaling: what issue 9's criteria name (the fio jobs at each N, then `scaling`: snapshot
# creation at --scaling-count, deletes among them, metadata per exception)
SCALING_WORKLOADS = ("randwrite4k", "overwrite4k", "randread4k", "randread4k-newest",
                     "scaling")
SCALING_SNAPSHOTS = "1,1024,10000"
DEFAULT_QCOW2_MAX = 1024  # qemu-img snapshot -c grows linearly: 10,000 would take hours

CTL_DEPTH = 32  # control requests in flight on one connection (snap_create_pipelined)

PEER_NAMES = {
    "ddsnap": "ddsnap",
    "qemu": "qemu-nbd qcow2",
    "nbdkit": "nbdkit file",
    # --cluster (issue 12): where fio reaches the same store
    "node": "node on another host",
    "local": "local worker",
    "plain": "local worker without --metadata-listen",
}

# --cluster (issue 12): SIGKILLs of the metadata server timed, the lease TTL, the
# metadata port every cluster server listens on (in its own network namespace)
CLUSTER_KILLS = 10
CLUSTER_REPEAT = 5  # fio runs per endpoint: the node / local ratios pair run i with run i
CLUSTER_TTL = 5.0
CLUSTER_PORT = 7700
CLUSTER_NAME = "bench"
DEFAULT_CLUSTER_MINUTES = 8  # a default `bench/run --cluster` (2 CPUs, 2026-11), for the text

# --send (issue 13): the volume (bytes, random data), the share of its chunks written
# between s1 and s2, the seed of that data and of the chunks picked, the targets
SEND_SIZE = 4 * GiB
SEND_QUICK_SIZE = 256 * MiB
SEND_CHANGE = 0.01
SEND_SEED = 13
SEND_TARGET_RATIO = 20.0  # full send time / incremental send time, at least
SEND_TARGET_THROUGHPUT = 0.8  # send | receive MB/s over nbdcopy's, at least


class BenchError(Exception):
    """A step failed; the message says what was run and what it printed."""


class Skip(Exception):
    """A step left out on purpose (e.g. qcow2 beyond --qcow2-max-snapshots)."""


class Stop(BaseException):
    """SIGTERM / SIGHUP: stop like Ctrl-C, cleaning up."""


# --------------------------------------------------------------------------- helpers


def size_arg(text: str) -> int:
    """An argparse ``type``: the bytes in ``text`` (``64K``, ``256M``, ``1G``, ...; binary
    units, more than 0), as :func:`ddsnap.units.parse_size` reads them."""
    try:
        return parse_size(text, "size", positive=True)
    except InvalidArgument as e:
        raise argparse.ArgumentTypeError(str(e)) from None


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


def process_tree(pid: int) -> list[int]:
    """``pid`` and its live descendants (``serve --workers``: the supervisor, its metadata
    server and workers), from ``/proc/PID/task/*/children``."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except OSError:
            pass
    return out


def proc_status(pid: int) -> dict[str, int]:
    """``VmHWM`` / ``VmRSS`` (bytes) of a live process and its descendants, added up
    (for ``serve --workers`` an upper bound of the peak: each process's own peak may
    come at another time), from ``/proc/PID/status``."""
    out: dict[str, int] = {}
    for p in process_tree(pid):
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    key, _, rest = line.partition(":")
                    if key in ("VmHWM", "VmRSS"):
                        out[key] = out.get(key, 0) + int(rest.split()[0]) * KiB
        except OSError:
            pass
    return out


def proc_cpu(pid: int) -> float | None:
    """CPU seconds (user + system, all threads) a live process and its live descendants
    used so far."""
    total = None
    for p in process_tree(pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total = (total or 0.0) + (int(fields[11]) + int(fields[12])) / os.sysconf(
                "SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            continue
    return total


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
    path.unlink(missing_ok=True)


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
