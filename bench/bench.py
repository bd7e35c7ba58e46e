"""ddsnap benchmark: the same fio jobs over NBD against ddsnap and its peers.

Peers:

* ``ddsnap``  -- ``ddsnap serve`` on a store (``--chunk-size``) whose origin is a raw file;
* ``qemu``    -- ``qemu-nbd`` on a qcow2 image (cluster size = ``--chunk-size``) holding the
                 same number of internal snapshots; the active layer for writes, the
                 snapshot (``-l``, read-only) for reads;
* ``nbdkit``  -- nbdkit's file plugin on a raw file holding the snapshot's bytes (the read
                 baseline).

Workloads, at each snapshot count N of ``--snapshots``:

1. 4 KiB random writes to the origin right after taking N snapshots (fresh setup);
2. 1 MiB sequential writes to the origin right after taking N snapshots (fresh setup);
3. 1 MiB sequential reads of a snapshot;
4. 4 KiB random reads of a snapshot;
5. ``merge``: ``ddsnap merge`` of a snapshot back into the origin (local ``--wait`` and
   served), in MiB/s of snapshot data, against ``dd`` and ``cp`` copying the same number
   of bytes; the origin must then equal the snapshot's bytes.

Run it through ``bench/run`` (which installs what it needs first); ``bench/run --help``
lists the parameters.  Results go to stdout and to a markdown file (``--out``).
Numbers only: nothing here passes or fails on a threshold.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
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

from nbdclient import NbdClient, NbdError

ROOT = Path(__file__).resolve().parent.parent
DDSNAP = ROOT / ".venv" / "bin" / "ddsnap"
MiB = 1 << 20
KiB = 1 << 10

PEER_NAMES = {
    "ddsnap": "ddsnap",
    "qemu": "qemu-nbd qcow2",
    "nbdkit": "nbdkit file",
}


class BenchError(Exception):
    """A step failed; the message says what was run and what it printed."""


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
    for unit, m in (("GiB", 1 << 30), ("MiB", MiB), ("KiB", KiB)):
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
        logf = open(log, "w")
        try:
            popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            logf.close()
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
    kind: str  # "write" (origin, fresh setup) or "read" (snapshot)
    metric: str  # "iops" or "bw"


def workloads(args) -> list[Workload]:
    all_ = [
        Workload("randwrite4k", "4 KiB random writes to the origin", "randwrite", "4k",
                 args.iodepth_rand, "write", "iops"),
        Workload("seqwrite1m", "1 MiB sequential writes to the origin", "write", "1m",
                 args.iodepth_seq, "write", "bw"),
        Workload("seqread1m", "1 MiB sequential reads of a snapshot", "read", "1m",
                 args.iodepth_seq, "read", "bw"),
        Workload("randread4k", "4 KiB random reads of a snapshot", "randread", "4k",
                 args.iodepth_rand, "read", "iops"),
    ]
    return [w for w in all_ if w.key in args.workloads]


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

    @property
    def mibs(self) -> float:
        return self.nbytes / MiB / self.merge_s

    @property
    def dd_mibs(self) -> float | None:
        return None if not self.dd_s else self.nbytes / MiB / self.dd_s

    @property
    def cp_mibs(self) -> float | None:
        return None if not self.cp_s else self.nbytes / MiB / self.cp_s


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
        """Full compare of the first and last snapshot, sampled compare of all of them."""
        issues = []
        for s in sorted({1, n}):
            issues += self.verify(self.uri(f"snap{s}"), f"ddsnap snap{s} {what}")
        issues += self.sample_check([f"snap{i}" for i in range(1, n + 1)], f"ddsnap {what}")
        for i in issues:
            self.problem(i)
        return issues

    # ---- ddsnap

    def ddsnap_up(self, n: int) -> tuple[Server, Path]:
        origin, store = self.tmp / "ddsnap-origin.raw", self.tmp / "ddsnap-store"
        drop_file(store)
        self.copy_pristine(origin)
        maxs = max(64, -(-n // 64) * 64)
        self.ddsnap("init", str(store), "--origin", str(origin),
                    "--size", str(2 * self.args.size + 64 * MiB),
                    "--chunk-size", str(self.args.chunk_size), "--max-snapshots", str(maxs),
                    what="ddsnap init")
        srv = self.procs.start("ddsnap serve",
                               [*self.ddsnap_cmd, "serve", str(store), "--listen",
                                f"unix:{self.sock}"],
                               self.sock, self.tmp / "ddsnap-serve.log",
                               ready_path=Path(f"{store}.ctl"))
        t0 = time.monotonic()
        try:
            for i in range(1, n + 1):
                self.ddsnap("snap", "create", str(store), f"snap{i}", what="ddsnap snap create")
        except BaseException:
            self.procs.stop(srv)
            raise
        say(f"ddsnap: {n} snapshot(s) taken through the control socket "
            f"in {time.monotonic() - t0:.1f} s")
        return srv, store

    def ddsnap_used(self, store: Path) -> int:
        st = json.loads(self.ddsnap("status", str(store), "--json", what="ddsnap status").stdout)
        return st["chunks_used"]

    def ddsnap_down(self, srv: Server, store: Path, label: str) -> None:
        self.ddsnap_stop(srv, label)
        try:
            self.ddsnap("check", str(store), what=f"{label}: ddsnap check after stop",
                        timeout=600)
        except BenchError as e:
            self.problem(str(e))
        drop_file(store)
        drop_file(self.tmp / "ddsnap-origin.raw")

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

    # ---- qemu-nbd / qcow2

    def qcow2_make(self, n: int) -> Path:
        img = self.tmp / "image.qcow2"
        drop_file(img)
        run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2",
             "-o", f"cluster_size={self.args.chunk_size}", str(self.pristine), str(img)],
            "qemu-img convert", timeout=600)
        t0 = time.monotonic()
        for i in range(1, n + 1):
            run(["qemu-img", "snapshot", "-c", f"snap{i}", str(img)], "qemu-img snapshot -c")
        say(f"qcow2: {n} internal snapshot(s) taken with qemu-img in "
            f"{time.monotonic() - t0:.1f} s")
        return img

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

    def record(self, wl: Workload, n: int, peer: str, fn, bad: list[str] = ()) -> None:
        key = (wl.key, n, peer)
        try:
            m = fn()
        except BenchError as e:
            self.errors[key] = str(e).splitlines()[0]
            self.problem(f"{wl.title}, N={n}, {PEER_NAMES[peer]}: {e}")
            return
        m.bad = m.bad or list(bad)
        self.results.setdefault(key, []).append(m)
        v = m.value(wl.metric)
        unit = "IOPS" if wl.metric == "iops" else "MiB/s"
        say(f"{wl.key} N={n} {PEER_NAMES[peer]}: {v:,.1f} {unit} "
            f"({m.io_bytes / MiB:,.0f} MiB in {m.runtime_ms / 1000:.1f} s)"
            + (f"; {m.extra}" if m.extra else "")
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
            m = self.write_fio(self.uri("origin"), wl, f"ddsnap-{wl.key}-N{n}")
            if srv.popen.poll() is not None:
                raise BenchError("ddsnap serve exited during the fio run")
            used = self.ddsnap_used(store)
            m.extra = f"{used} store chunks used after the run"
            m.bad = self.check_ddsnap(n, f"after {wl.key} (N={n})")
            return m
        finally:
            self.ddsnap_down(srv, store, label)

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

    def reads(self, n: int, rws: list[Workload]) -> None:
        reps = range(self.args.repeat)
        # ddsnap: N snapshots, then overwrite every other chunk of the origin through NBD,
        # so half of snap1 comes from exceptions and half from the origin.
        try:
            srv, store = self.ddsnap_up(n)
        except BenchError as e:
            for wl in rws:
                self.errors[(wl.key, n, "ddsnap")] = str(e).splitlines()[0]
            self.problem(f"read setup, N={n}, ddsnap: {e}")
        else:
            label = f"reads N={n} ddsnap"
            try:
                t0 = time.monotonic()
                ow = self.overwrite_half(self.uri("origin"), f"ddsnap-overwrite-N{n}")
                used = self.ddsnap_used(store)
                self.notes.append(
                    f"N={n}: overwriting every other {fmt_size(self.args.chunk_size)} chunk of "
                    f"the ddsnap origin ({fmt_size(self.args.size // 2)}) took "
                    f"{time.monotonic() - t0:.1f} s ({ow.mibs:.1f} MiB/s); the store then held "
                    f"{used} used chunks, so half of snap1 is read from exceptions and half "
                    f"from the origin")
                bad = self.check_ddsnap(n, f"before the reads (N={n})")
                os.sync()
                for _ in reps:
                    for wl in rws:
                        self.record(wl, n, "ddsnap", lambda wl=wl: self.read_fio(
                            self.uri("snap1"), wl, f"ddsnap-{wl.key}-N{n}"), bad)
            except BenchError as e:
                self.problem(f"reads N={n} ddsnap: {e}")
                for wl in rws:
                    self.errors.setdefault((wl.key, n, "ddsnap"), str(e).splitlines()[0])
            finally:
                self.ddsnap_down(srv, store, label)

        # qemu-nbd: the same on qcow2, then serve snap1 read-only.
        img = None
        try:
            img = self.qcow2_make(n)
            srv = self.qemu_up(img)
            try:
                self.overwrite_half(self.uri("origin"), f"qemu-overwrite-N{n}")
            finally:
                self.server_down(srv, f"reads N={n} qemu-nbd overwrite")
            srv = self.qemu_up(img, snapshot="snap1")
            try:
                bad = self.verify(self.uri("snap1"), f"qcow2 snap1 before the reads (N={n})")
                for i in bad:
                    self.problem(i)
                os.sync()
                for _ in reps:
                    for wl in rws:
                        self.record(wl, n, "qemu", lambda wl=wl: self.read_fio(
                            self.uri("snap1"), wl, f"qemu-{wl.key}-N{n}"), bad)
            finally:
                self.server_down(srv, f"reads N={n} qemu-nbd")
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
                for _ in reps:
                    for wl in rws:
                        self.record(wl, n, "nbdkit", lambda wl=wl: self.read_fio(
                            self.uri(""), wl, f"nbdkit-{wl.key}-N{n}"))
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
                m.merge_s = time.monotonic() - t0
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

    def main(self) -> int:
        a = self.args
        t_start = time.monotonic()
        self.started = dt.datetime.now(dt.timezone.utc)
        self.load_start = open("/proc/loadavg").read().split()[:3]
        say(f"temporary directory {self.tmp}; load average {' '.join(self.load_start)}")
        self.pick_access()
        if a.rev:
            self.use_rev(a.rev)
        self.make_pristine()
        wls = workloads(a)
        for n in a.snapshots:
            for wl in (w for w in wls if w.kind == "write"):
                for _ in range(a.repeat):
                    say(f"--- {wl.title}, N={n}")
                    self.record(wl, n, "ddsnap", lambda: self.write_ddsnap(wl, n))
                    self.record(wl, n, "qemu", lambda: self.write_qemu(wl, n))
            rws = [w for w in wls if w.kind == "read"]
            if rws:
                say(f"--- snapshot reads, N={n}")
                self.reads(n, rws)
        if "merge" in a.workloads:
            self.merges()
        self.elapsed = time.monotonic() - t_start
        self.load_end = open("/proc/loadavg").read().split()[:3]
        report = Report(self).markdown()
        print()
        print(report.split("<!-- table-end -->")[0].split("<!-- table-start -->")[-1].strip())
        out = Path(a.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(report)
        say(f"wrote {out} ({self.elapsed:.0f} s in all)")
        if self.problems:
            say(f"{len(self.problems)} problem(s) seen; they are listed in {out}")
        return 0

    def cleanup(self) -> None:
        self.procs.stop_all()
        if (self.tmp / "fuse").is_dir():
            subprocess.run(["fusermount3", "-u", str(self.tmp / "fuse")], capture_output=True)
        if self.args.keep:
            say(f"kept {self.tmp}")
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)


# --------------------------------------------------------------------------- report


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

    def cell(self, wl: Workload, n: int, peer: str) -> tuple[str, float | None]:
        ms = self.b.results.get((wl.key, n, peer))
        if not ms:
            err = self.b.errors.get((wl.key, n, peer))
            return ("FAILED (see problems)" if err else "–"), None
        vals = sorted(m.value(wl.metric) for m in ms)
        med = statistics.median(vals)

        def f(v: float) -> str:
            return f"{v:,.0f}" if wl.metric == "iops" else f"{v:,.1f}"

        unit = " IOPS" if wl.metric == "iops" else " MiB/s"
        text = f(med) + unit
        if len(vals) > 1:
            text += f" ({f(vals[0])}–{f(vals[-1])})"
        if any(m.bad for m in ms):
            text += " ⚠ wrong data"
        return text, med

    @staticmethod
    def ratio(x: float | None, y: float | None) -> str:
        if x is None or y is None or y == 0:
            return "–"
        return f"{x / y:.2f}"

    def table(self) -> str:
        if not workloads(self.a):
            return "(no fio workload in this run)"
        rows = ["| workload | N | ddsnap | peer | peer's figure | ddsnap / peer "
                "| qemu-nbd qcow2 snapshot (information) | ddsnap / qemu-nbd |",
                "|---|---:|---:|---|---:|---:|---:|---:|"]
        for wl in workloads(self.a):
            for n in self.a.snapshots:
                d, dv = self.cell(wl, n, "ddsnap")
                if wl.kind == "write":
                    p, pv = self.cell(wl, n, "qemu")
                    rows.append(f"| {wl.title} | {n} | {d} | qemu-nbd qcow2 active layer "
                                f"| {p} | {self.ratio(dv, pv)} | | |")
                else:
                    p, pv = self.cell(wl, n, "nbdkit")
                    q, qv = self.cell(wl, n, "qemu")
                    rows.append(f"| {wl.title} | {n} | {d} | nbdkit file (raw) | {p} "
                                f"| {self.ratio(dv, pv)} | {q} | {self.ratio(dv, qv)} |")
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
            d, dv = self.merge_cell([m.mibs for m in ms], [m.merge_s for m in ms])
            dds = [m.dd_mibs for m in ms if m.dd_mibs]
            cps = [m.cp_mibs for m in ms if m.cp_mibs]
            dd, ddv = self.merge_cell(dds, [m.dd_s for m in ms if m.dd_s]) if dds else ("–", None)
            cp, cpv = self.merge_cell(cps, [m.cp_s for m in ms if m.cp_s]) if cps else ("–", None)
            if any(m.bad for m in ms):
                after = "⚠ **WRONG DATA** (see problems)"
            else:
                after = "origin == snapshot's bytes (`cmp`)"
            after += ("; ⚠ **`ddsnap check` / status not clean** (see problems)"
                      if any(m.unclean for m in ms) else "; `ddsnap check` clean")
            if any(m.bad for m in ms):
                d += " ⚠ wrong data"
            rows.append(f"| {self.MERGE_MODES[mode]} | {fmt_size(ms[0].nbytes)} | {d} | {dd} "
                        f"| {self.ratio(dv, ddv)} | {cp} | {self.ratio(dv, cpv)} | {after} |")
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
f"{a.repeat} runs: median (min–max)"}.

{self.merge_table()}
"""

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
                            f"{' ⚠ wrong data (see problems)' if m.bad else ''} |")
        return "\n".join(rows)

    def markdown(self) -> str:
        a, b = self.a, self.b
        cmd = "bench/run" + ("" if not a.argv else " " + shlex.join(a.argv))
        reps = ("1 run per cell" if a.repeat == 1 else
                f"{a.repeat} runs per cell: median (min–max); ratios from the medians")
        mach = "\n".join(f"| {k} | {v} |" for k, v in machine(b))
        fs = subprocess.run(["findmnt", "-no", "SOURCE,FSTYPE", "-T", a.tmpdir],
                            capture_output=True, text=True).stdout.strip() or "?"
        problems = ("\n\n".join("```\n" + p + "\n```" for p in b.problems)
                    if b.problems else "None: every fio job finished without an error, every "
                    "server stopped cleanly on SIGTERM, every verified snapshot held the "
                    "expected bytes and `ddsnap check` was clean after every ddsnap run"
                    + (", and after every merge the origin held the snapshot's bytes."
                       if "merge" in a.workloads else "."))
        notes = "\n".join(f"- {x}" for x in b.notes + b.merge_notes) or "- (none)"
        ncpu = len(os.sched_getaffinity(0))
        busy = max(float(b.load_start[0]), float(b.load_end[0]))
        caveat = (f"\n**Caveat:** the 1-minute load average reached {busy:.1f} on {ncpu} CPUs "
                  f"around this run, so other processes competed for the CPUs; treat these "
                  f"figures as rough (rerun with `--repeat 3` on a quiet machine for "
                  f"min/median/max).\n" if busy > 0.5 * ncpu else "")
        merge_howto = "" if "merge" not in a.workloads else f"""5. **Merge of a snapshot into the origin** (`ddsnap merge`, an online rollback), not a
   fio job.  Setup, fresh for every run: copy the raw bytes to the origin, `ddsnap init`,
   serve, `ddsnap snap create STORE snap1`, then overwrite the first
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
against established NBD servers, and how fast `ddsnap merge` rolls the origin back to a
snapshot compared with plain `dd` / `cp` copies of the same number of bytes.  There are
no pass/fail thresholds: numbers only.

## Latest results

<!-- table-start -->
Run {b.started.strftime('%Y-%m-%d %H:%M UTC')} with `{cmd}`: volume {fmt_size(a.size)},
chunk / cluster {fmt_size(a.chunk_size)}, {a.duration:g} s per fio run, iodepth
{a.iodepth_rand} (4 KiB) / {a.iodepth_seq} (1 MiB), {reps}; N = snapshots taken.

{self.table()}
{self.merge_section()}<!-- table-end -->

The ratio is ddsnap's figure divided by the peer's (for the merge: by `dd`'s or `cp`'s),
above 1: ddsnap is faster.
The whole run took {b.elapsed / 60:.1f} minutes.
{caveat}
### Machine

| | |
|---|---|
{mach}
| data directory | `{a.tmpdir}` on {fs} (temporary directory, removed afterwards) |
| I/O path | {b.access_text} |
| load average (1, 5, 15 min) | {' '.join(b.load_start)} at the start, {' '.join(b.load_end)} at the end (other work on the machine shows here) |

## How to run it

```
bench/run                      # defaults: --snapshots 1,64 --size 1G --duration 10 --repeat 1
bench/run --quick              # tiny smoke test (64 MiB, 2 s runs), written to bench/out/quick.md
bench/run --snapshots 1,16,64 --size 4G --duration 30 --repeat 3 --out /tmp/b.md
bench/run --workloads merge --size 1G --merge-fraction 0.5 --out /tmp/m.md   # merge only
```

`bench/run` first runs `scripts/setup` (fio, qemu-utils, nbdkit, libnbd-bin, the venv),
then `bench/bench.py` with the project's venv.  Other parameters: `--chunk-size`
(ddsnap chunk and qcow2 cluster, default 64K), `--iodepth-rand`, `--iodepth-seq`,
`--workloads` (default all: `randwrite4k,seqwrite1m,seqread1m,randread4k,merge`),
`--merge-fraction` (share of the origin overwritten after the snapshot and so merged
back, default 1), `--merge-modes` (`local,served`), `--tmpdir`, `--access` (`nbd` engine
or `nbdfuse`), `--samples`, `--no-verify`, `--keep`, and `--rev REV` to benchmark ddsnap
as committed in REV (run from a `git archive` in the temporary directory) rather than the
working tree.
Every server is stopped and the temporary directory removed on exit, also on failure
or Ctrl-C.

## What is compared

- **ddsnap**: `ddsnap serve STORE --listen unix:SOCK` on a store made with
  `ddsnap init --chunk-size {fmt_size(a.chunk_size)}` for a raw origin file; snapshots are
  taken with `ddsnap snap create` while the store is served (through the control socket).
- **qemu-nbd qcow2**: a qcow2 image (`qemu-img convert -O qcow2 -o cluster_size=...` of
  the same raw bytes) with the same number of internal snapshots (`qemu-img snapshot -c`,
  taken offline since qemu-nbd locks the image), served with `qemu-nbd --cache=writeback
  --aio=threads` (qemu's defaults): the active layer for writes, `--read-only
  --load-snapshot=snapshot.name=snap1` for reads.  The peer for the write workloads.
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
   fresh setup for every run (copy the raw bytes, `ddsnap init` / `qemu-img convert`,
   take N snapshots), then at once one fio job.  The job stops after one pass over the
   volume or after {a.duration:g} s, whichever comes first (`runtime` without
   `time_based`), so no block is written twice in a sequential run and every write goes
   to a volume all of whose chunks were just snapshotted: the copy-on-write path (for
   4 KiB writes, a 64 KiB chunk is copied out on the first write to it and later writes to
   the same chunk do not copy).  After each ddsnap run the data is checked (see below).
3. **1 MiB sequential reads** (`rw=read bs=1m iodepth={a.iodepth_seq}`) and
4. **4 KiB random reads** (`rw=randread bs=4k iodepth={a.iodepth_rand}`) of snapshot
   `snap1`, each `time_based` for {a.duration:g} s.  Setup: take N snapshots, then
   overwrite **every other chunk** of the origin through NBD (fio `rw=write:CHUNK
   bs=CHUNK io_size=half`), so half of `snap1` is read from exceptions in the store and
   half from the unchanged origin (a 1 MiB read touches both).  The same is done on the
   qcow2 image before `qemu-nbd -l snap1` serves it; nbdkit serves the untouched raw
   file, which holds the snapshot's bytes.  Before the timed runs the qcow2 `snap1` is
   read back whole with `nbdcopy` and compared with the raw file, and the ddsnap
   snapshots are checked as below.

{merge_howto}**Data checks** (not timed): after every ddsnap write run and before the ddsnap reads,
the first and the last snapshot are read back whole with `nbdcopy` and compared with the
original bytes (`cmp`), and {a.samples} chunks at random offsets (the same for all) are read
from *every* snapshot with a small NBD client (`bench/nbdclient.py`) and compared too.
A figure measured on a server that then failed a check is marked "⚠ wrong data"; the
check's output is under *Problems seen*.  `ddsnap check` runs on every store after its
server stopped.

`randrepeat=1`, so every server sees the same random offsets.  One fio job, one NBD
connection.

## Setup notes from this run

{notes}

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
                    "bytes, and write a markdown table.")
    p.add_argument("--snapshots", help="comma-separated snapshot counts N [1,64]")
    p.add_argument("--chunk-size", type=parse_size,
                   help="ddsnap chunk size and qcow2 cluster size [64K]")
    p.add_argument("--duration", type=float, help="seconds per fio run [10]")
    p.add_argument("--size", type=parse_size, help="origin size, all of it random data [1G]")
    p.add_argument("--repeat", type=int, help="runs per cell; >1 shows median (min–max) [1]")
    p.add_argument("--out", help="markdown file to write [docs/benchmarks.md; "
                                 "bench/out/quick.md with --quick]")
    p.add_argument("--quick", action="store_true",
                   help="tiny smoke run: --size 64M --duration 2 --snapshots 1,4")
    p.add_argument("--iodepth-rand", type=int, default=32, help="iodepth of 4 KiB jobs [32]")
    p.add_argument("--iodepth-seq", type=int, default=16, help="iodepth of 1 MiB jobs [16]")
    p.add_argument("--workloads", default="randwrite4k,seqwrite1m,seqread1m,randread4k,merge",
                   help="comma-separated subset of randwrite4k,seqwrite1m,seqread1m,randread4k,"
                        "merge [all]")
    p.add_argument("--merge-fraction", type=float, default=1.0,
                   help="merge workload: fraction of the origin overwritten after the "
                        "snapshot, i.e. merged back [1.0]")
    p.add_argument("--merge-modes", default="local,served",
                   help="merge workload: local (`merge --wait`, store not served), served "
                        "(through the control socket), or both [local,served]")
    p.add_argument("--tmpdir", default="/var/tmp",
                   help="where the temporary directory is made [/var/tmp]")
    p.add_argument("--access", choices=("auto", "nbd", "nbdfuse"), default="auto",
                   help="fio's nbd engine, or nbdfuse + libaio on the FUSE file [auto]")
    p.add_argument("--samples", type=int, default=64,
                   help="chunks read from every snapshot by the sampled data check [64]")
    p.add_argument("--rev", help="benchmark ddsnap as committed in git revision REV (git "
                                 "archive into the temporary directory) instead of the "
                                 "working tree")
    p.add_argument("--no-verify", action="store_true",
                   help="skip reading snapshots back whole with nbdcopy to compare them")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    a = p.parse_args(argv)
    a.argv = argv
    q = a.quick
    a.snapshots = a.snapshots or ("1,4" if q else "1,64")
    try:
        a.snapshots = [int(x) for x in a.snapshots.split(",") if x.strip()]
    except ValueError:
        p.error("--snapshots takes comma-separated integers, e.g. 1,64")
    if not a.snapshots or min(a.snapshots) < 1:
        p.error("--snapshots: each N must be at least 1")
    a.chunk_size = a.chunk_size or 64 * KiB
    if a.chunk_size & (a.chunk_size - 1) or not 4 * KiB <= a.chunk_size <= MiB:
        p.error("--chunk-size must be a power of two from 4K to 1M")
    a.duration = a.duration or (2.0 if q else 10.0)
    a.size = a.size or (64 * MiB if q else 1 << 30)
    if a.size % (2 * a.chunk_size):
        p.error("--size must be a multiple of twice the chunk size")
    a.repeat = a.repeat or 1
    if a.repeat < 1:
        p.error("--repeat must be at least 1")
    a.out = a.out or str(ROOT / ("bench/out/quick.md" if q else "docs/benchmarks.md"))
    a.workloads = [w.strip() for w in a.workloads.split(",") if w.strip()]
    known = {"randwrite4k", "seqwrite1m", "seqread1m", "randread4k", "merge"}
    if not a.workloads or set(a.workloads) - known:
        p.error(f"--workloads: choose from {','.join(sorted(known))}")
    if not 0 < a.merge_fraction <= 1:
        p.error("--merge-fraction must be in (0, 1]")
    a.merge_modes = [m.strip() for m in a.merge_modes.split(",") if m.strip()]
    if not a.merge_modes or set(a.merge_modes) - {"local", "served"}:
        p.error("--merge-modes: local, served or local,served")
    return a


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    for tool in ("fio", "qemu-img", "qemu-nbd", "nbdkit", "nbdcopy", "cmp", "dd", "cp", "sync"):
        if shutil.which(tool) is None:
            print(f"bench: {tool} not found; run scripts/setup", file=sys.stderr)
            return 2
    if not DDSNAP.exists():
        print(f"bench: {DDSNAP} not found; run scripts/setup", file=sys.stderr)
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
