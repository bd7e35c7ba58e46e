"""The servers benchmarked, each started and stopped the same way every time:

* ddsnap: a fresh store (``ddsnap init``) served by ``ddsnap serve`` on a unix socket,
  snapshots taken with ``snap_create`` requests on its control socket, stopped with
  SIGTERM and then ``ddsnap check``-ed (and its metadata counted by
  ``bench/metaprobe.py``); ``--rev`` runs another revision's code;
* qemu-nbd on a qcow2 image with N internal snapshots (``qemu-img snapshot -c``, made
  once per N as a template and copied for every run);
* nbdkit's file plugin on the raw bytes (the read baseline).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from ddsnap import control
from ddsnap.errors import DdsnapError

from .common import CTL_DEPTH, ROOT, BenchError, MiB, drop_file, run, say, tail
from .processes import Server
from .results import MetaSample


def ctl_call(path: Path, op: str, args: dict | None = None, timeout: float = 30):
    """One request on ddsnap's control socket (:func:`ddsnap.control.call`; ``timeout``
    seconds for the whole exchange); its failure raised as a BenchError."""
    try:
        return control.call(str(path), op, args, timeout)
    except DdsnapError as e:
        raise BenchError(f"control socket {path}: {op} failed: {type(e).__name__}: "
                         f"{e}") from None


def ctl_pipeline(path: Path, requests, depth: int = CTL_DEPTH, timeout: float = 120) -> int:
    """Send ``(op, args)`` requests on one control connection, up to ``depth`` ahead of
    their replies (:func:`ddsnap.control.call_many`; ``timeout`` seconds at most without
    progress); raise BenchError on the first failure.  Returns how many were answered."""
    done = 0
    try:
        for _result in control.call_many(str(path), requests, depth, timeout):
            done += 1
    except DdsnapError as e:
        raise BenchError(f"control socket {path}: pipelined requests: {type(e).__name__}: "
                         f"{e} (after {done} replies)") from None
    return done


class Peers:
    """Starts and stops the peers for :class:`~ddsnap_bench.runner.Bench` (a mixin: uses
    its ``args``, ``tmp``, ``sock``, ``procs``, ``ddsnap_cmd``, ``ddsnap()``,
    ``copy_pristine()`` and ``problem()``)."""

    # ---- ddsnap

    def serve_args(self) -> list[str]:
        """``--workers N`` when ``--serve-workers`` was given; else serve's default."""
        w = self.args.serve_workers
        return [] if w is None else ["--workers", str(w)]

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
                                f"unix:{self.sock}", *self.serve_args()],
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

    def serve_store(self, store: Path, label: str) -> Server:
        return self.procs.start(label, [*self.ddsnap_cmd, "serve", str(store), "--listen",
                                        f"unix:{self.sock}", *self.serve_args()],
                                self.sock, self.tmp / "ddsnap-serve.log",
                                ready_path=self.ctl_path(store))

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

    # ---- nbdkit

    def nbdkit_up(self) -> Server:
        """nbdkit's file plugin, read-only, on the pristine raw file (the snapshot's
        bytes)."""
        return self.procs.start("nbdkit", ["nbdkit", "--foreground", "--readonly",
                                           "--unix", str(self.sock), "file",
                                           f"file={self.pristine}"],
                                self.sock, self.tmp / "nbdkit.log")
