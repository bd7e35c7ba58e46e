"""``--send`` (issue 13): ``ddsnap send`` and ``ddsnap receive`` as a user runs them.

* **incremental against full send**: a source store A over an origin of random data
  (``--size``, default 4 GiB; an AES-128-CTR keystream from ``openssl enc``, seeded),
  read-only snapshot ``s1``; then ``--send-change`` (1%) of the chunks, picked
  uniformly at random, each written whole with new random data through
  ``ddsnap serve A --workers 0`` (the bench's own NBD client on the origin export);
  the server stopped, read-only snapshot ``s2``.  Each repetition times ``ddsnap send A
  s2 -o FILE`` (full) and ``ddsnap send A s2 --from s1 -o FILE`` (incremental), the
  page cache dropped before each.
* **send | receive against nbdcopy**: ``ddsnap send A s2 | ddsnap receive B`` into a
  fresh store B (a new sparse origin file of the volume's size), against ``nbdcopy
  --flush`` of s2 from ``ddsnap serve A`` into a new file (and, for information,
  ``nbdcopy`` then ``sync`` of its output), each from a dropped page cache; B's origin
  must then be byte for byte the nbdcopy output.

The source store is made once and read by every repetition (send and serve do not
change it).  Results: :class:`~.results.SendRun` and :class:`~.results.PipeRun`, and
the setup's figures in ``send_setup``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import subprocess
import threading
import time
from pathlib import Path

from ddsnap.errors import StreamDamaged
from ddsnap.stream import DATA, StreamReader

from .common import SEND_SEED, BenchError, MiB, drop_file, fmt_size, proc_cpu, run, say, tail
from .nbdclient import NbdClient, NbdError
from .processes import Server
from .results import PipeRun, SendRun

#: bytes read from openssl and written to the origin at a time
GEN_BLOCK = 4 * MiB


class SendWorkload:
    """The ``--send`` mode of :class:`~ddsnap_bench.runner.Bench` (a mixin: uses its
    ``args``, ``tmp``, ``procs``, ``ddsnap_cmd``, ``ddsnap()``, ``profiled()`` and
    ``problem()``)."""

    # ---- small pieces

    def drop_page_cache(self) -> bool:
        """``sync``, then drop the page cache (root).  True if it was dropped; the first
        failure is noted."""
        os.sync()
        try:
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("3\n")
            return True
        except OSError as e:
            note = (f"`echo 3 > /proc/sys/vm/drop_caches` failed ({e.strerror}): the page "
                    f"cache was NOT dropped before the timed runs")
            if note not in self.send_notes:
                self.send_notes.append(note)
            return False

    def send_paths(self) -> dict[str, Path]:
        """The files of the run, in the temporary directory."""
        t = self.tmp
        return {"a_origin": t / "a-origin.raw", "a_store": t / "a.store",
                "b_origin": t / "b-origin.raw", "b_store": t / "b.store",
                "full": t / "full.stream", "incr": t / "incr.stream",
                "copy": t / "nbdcopy.raw", "copy_sync": t / "nbdcopy-sync.raw",
                "sock": t / "send.sock"}

    def store_size(self) -> int:
        """Bytes of each store file: room for every copy-out the run makes (2x the
        chunks changed) and the metadata, at least 64 MiB, a multiple of the chunk."""
        a = self.args
        want = max(64 * MiB, a.size // 16, int(4 * a.size * a.send_change))
        return -(-want // a.chunk_size) * a.chunk_size

    @staticmethod
    def wait_cpu(popen: subprocess.Popen, deadline: float, what: str) -> float:
        """Wait for ``popen`` to exit (reaping it with ``wait4``) and return the CPU
        seconds (user + system) it used; kill it past ``deadline`` (``time.monotonic()``)
        and raise BenchError."""
        while True:
            pid, status, usage = os.wait4(popen.pid, os.WNOHANG)
            if pid:
                popen.returncode = os.waitstatus_to_exitcode(status)
                return usage.ru_utime + usage.ru_stime
            if time.monotonic() > deadline:
                popen.kill()
                popen.wait()
                raise BenchError(f"{what} did not finish in time (killed)")
            time.sleep(0.002)

    def timed_cmd(self, argv: list[str], what: str, timeout: float,
                  label: str | None = None) -> tuple[float, float, str]:
        """Run ``argv`` (its output to files), timed.  Returns (wall seconds, CPU
        seconds, stdout).  With --profile and ``label``, py-spy samples it."""
        out, err = self.tmp / "cmd.out", self.tmp / "cmd.err"
        with open(out, "w") as fo, open(err, "w") as fe:
            t0 = time.monotonic()
            p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=fo, stderr=fe)
        cpu: list[float] = []

        def wait() -> None:
            cpu.append(self.wait_cpu(p, t0 + timeout, what))

        if label and self.args.profile:
            self.profiled(Server(what, argv, None, err, p), label, wait)
        else:
            wait()
        secs = time.monotonic() - t0
        if p.returncode != 0:
            raise BenchError(f"{what}: `{' '.join(argv)}` exited {p.returncode}\n"
                             f"{tail(out.read_text() + err.read_text())}")
        return secs, cpu[0], out.read_text()

    # ---- the run

    def send_bench(self) -> None:
        """Set the source store up once, then run every repetition (each part reports
        its own failure as a problem)."""
        done = threading.Event()

        def sample_load() -> None:  # for the report's caveat: the load during the run
            while not done.wait(5):
                self.load_samples.append(float(Path("/proc/loadavg").read_text().split()[0]))

        threading.Thread(target=sample_load, daemon=True).start()
        try:
            try:
                self.send_setup_source()
            except BenchError as e:
                self.send_errors.append(f"setup: {str(e).splitlines()[0]}")
                self.problem(f"send setup: {e}")
                return
            for rep in range(self.args.repeat):
                for part, fn in (("full and incremental send", self.send_times),
                                 ("send | receive and nbdcopy", self.send_pipe)):
                    say(f"--- {part} (run {rep + 1} of {self.args.repeat})")
                    try:
                        fn(rep)
                    except BenchError as e:
                        self.send_errors.append(f"{part}, run {rep + 1}: "
                                                f"{str(e).splitlines()[0]}")
                        self.problem(f"{part}, run {rep + 1}: {e}")
        finally:
            done.set()

    def make_random_origin(self, path: Path, size: int) -> float:
        """Write ``size`` bytes of an AES-128-CTR keystream (``openssl enc`` of
        /dev/zero, key from the seed) to ``path`` in 4 MiB blocks; return the seconds
        it took."""
        key = hashlib.sha256(f"ddsnap-bench-{SEND_SEED}".encode()).hexdigest()[:32]
        argv = ["openssl", "enc", "-aes-128-ctr", "-K", key, "-iv", "0" * 32,
                "-in", "/dev/zero"]
        t0 = time.monotonic()
        p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        assert p.stdout is not None
        buf = bytearray(GEN_BLOCK)
        try:
            with open(path, "wb") as f:
                left = size
                while left:
                    view = memoryview(buf)[:min(left, GEN_BLOCK)]
                    got = 0
                    while got < len(view):
                        n = p.stdout.readinto(view[got:])
                        if not n:
                            raise BenchError(f"`{' '.join(argv)}` ended after "
                                             f"{size - left + got} bytes")
                        got += n
                    f.write(view)
                    left -= len(view)
        finally:
            p.kill()
            p.wait()
            p.stdout.close()
        return time.monotonic() - t0

    def send_setup_source(self) -> None:
        """Store A: random origin, read-only s1, ``--send-change`` of the chunks written
        through ``ddsnap serve``, read-only s2; ``ddsnap diff s1 s2`` must list exactly
        those chunks."""
        a, f = self.args, self.send_paths()
        cs, size = a.chunk_size, a.size
        say(f"writing {fmt_size(size)} of random data (openssl enc -aes-128-ctr) to "
            f"{f['a_origin']}")
        gen_s = self.make_random_origin(f["a_origin"], size)
        say(f"... in {gen_s:.1f} s")
        self.ddsnap("init", str(f["a_store"]), "--origin", str(f["a_origin"]), "--size",
                    str(self.store_size()), "--chunk-size", str(cs), what="init of store A")
        self.ddsnap("snap", "create", str(f["a_store"]), "s1", "--read-only",
                    what="snap create s1")
        nchunks = size // cs
        k = max(1, round(nchunks * a.send_change))
        rng = random.Random(SEND_SEED)
        chunks = sorted(rng.sample(range(nchunks), k))
        srv = self.procs.start(
            "ddsnap serve A", [*self.ddsnap_cmd, "serve", str(f["a_store"]), "--listen",
                               f"unix:{f['sock']}", "--workers", "0"],
            f["sock"], self.tmp / "serve-a.log")
        try:
            t0 = time.monotonic()
            with NbdClient(str(f["sock"]), "origin") as c:
                wrote = c.pwrite_many(((ch * cs, rng.randbytes(cs)) for ch in chunks),
                                      depth=16)
            write_s = time.monotonic() - t0
        except (OSError, NbdError) as e:
            raise BenchError(f"writing the changed chunks through NBD: {e}") from None
        finally:
            rc, note = self.procs.stop(srv)
        if rc != 0 or note:
            self.problem(f"ddsnap serve A (changing the chunks) exited {rc} on SIGTERM "
                         f"{note}\n{tail(srv.log.read_text())}")
        say(f"wrote {k} chunks ({fmt_size(wrote)}) of {nchunks} through NBD in "
            f"{write_s:.1f} s")
        self.ddsnap("snap", "create", str(f["a_store"]), "s2", "--read-only",
                    what="snap create s2")
        listed = self.diff_chunks(f["a_store"])
        if listed != set(chunks):
            self.problem(f"`ddsnap diff A s1 s2` lists {len(listed)} chunks; {k} were "
                         f"written ({len(listed - set(chunks))} listed but not written, "
                         f"{len(set(chunks) - listed)} written but not listed)")
        else:
            self.send_notes.append(f"`ddsnap diff A s1 s2` lists exactly the {k} chunks "
                                   f"written")
        self.send_chunks = chunks
        # Read the source files once, untimed: the first read of a file just written
        # takes longer than later reads on some machines (this VM, dd of 4 GiB from a
        # dropped page cache: 3.4-5.7 s, then 1.7-2.8 s), which would fall on run 1's
        # full send alone.
        self.drop_page_cache()
        t0 = time.monotonic()
        for path in (f["a_origin"], f["a_store"]):
            read_whole(path)
        first_read_s = time.monotonic() - t0
        self.send_setup = {"gen_s": gen_s, "write_s": write_s, "chunks": k,
                           "first_read_s": first_read_s,
                           "nchunks": nchunks, "store_size": self.store_size(),
                           "openssl": run(["openssl", "version"], "openssl version")
                           .stdout.strip()}

    def diff_chunks(self, store: Path) -> set[int]:
        """The chunks ``ddsnap diff STORE s1 s2 --json`` lists."""
        cs = self.args.chunk_size
        d = json.loads(self.ddsnap("diff", str(store), "s1", "s2", "--json",
                                   what="ddsnap diff s1 s2").stdout)
        out: set[int] = set()
        for r in d["ranges"]:
            off, n = (r["offset"], r["length"]) if isinstance(r, dict) else r
            out.update(range(off // cs, -(-(off + n) // cs)))
        return out

    def send_times(self, rep: int) -> None:
        """One full and one incremental ``ddsnap send -o FILE`` of s2, timed from a
        dropped page cache (and, for information, a ``ddsnap --version`` likewise: the
        start-up every command pays); the first repetition checks the incremental
        stream."""
        a, f = self.args, self.send_paths()
        m = SendRun(rep, profiled=bool(a.profile))
        base = [*self.ddsnap_cmd, "send", str(f["a_store"]), "s2", "--no-progress",
                "--json"]
        try:
            cold = self.drop_page_cache()
            m.startup_s = self.timed_cmd([*self.ddsnap_cmd, "--version"], "ddsnap --version",
                                         60)[0]
            cold = self.drop_page_cache() and cold
            m.full_s, m.full_cpu_s, out = self.timed_cmd(
                [*base, "-o", str(f["full"])], "full send", 600 + a.size / (5 * MiB),
                label="send-full")
            m.full_bytes = f["full"].stat().st_size
            self.check_summary(json.loads(out), m.full_bytes, "full send")
            drop_file(f["full"])
            cold = self.drop_page_cache() and cold
            m.incr_s, m.incr_cpu_s, out = self.timed_cmd(
                [*base, "--from", "s1", "-o", str(f["incr"])], "incremental send",
                600, label="send-incremental")
            m.incr_bytes = f["incr"].stat().st_size
            summ = json.loads(out)
            self.check_summary(summ, m.incr_bytes, "incremental send")
            m.incr_data_bytes = summ.get("data_bytes", 0)
            m.cold = cold
            if rep == 0:
                self.check_incremental(f["incr"], f["a_origin"])
        finally:
            drop_file(f["full"])
            drop_file(f["incr"])
        self.send_runs.append(m)
        say(f"full send {m.full_s:.2f} s ({fmt_size(m.full_bytes)}), incremental "
            f"{m.incr_s:.2f} s ({fmt_size(m.incr_bytes)}): {m.ratio:.1f}x; a cold "
            f"`ddsnap --version` {m.startup_s:.2f} s")

    def check_summary(self, summ: dict, size: int, what: str) -> None:
        """``send --json``'s byte count must be the file's size."""
        if summ.get("bytes") != size:
            self.problem(f"{what}: --json says {summ.get('bytes')} bytes of stream, the "
                         f"file holds {size}")

    def check_incremental(self, stream: Path, origin: Path) -> None:
        """Read the incremental stream back (``ddsnap.stream.StreamReader``: crc32c of
        every record, the digest): its DATA records must cover exactly the chunks
        written and hold the origin file's bytes (A's origin reads as s2)."""
        cs = self.args.chunk_size
        covered: set[int] = set()
        wrong = 0
        try:
            with open(stream, "rb") as s, open(origin, "rb") as o:
                r = StreamReader(s)
                r.begin()
                for rec in r:
                    if rec.kind != DATA:
                        wrong += 1
                        continue
                    if os.pread(o.fileno(), len(rec.payload), rec.offset) != rec.payload:
                        wrong += 1
                    covered.update(range(rec.offset // cs,
                                         -(-(rec.offset + len(rec.payload)) // cs)))
        except StreamDamaged as e:
            self.problem(f"the incremental stream does not read back: {e}")
            return
        written = set(self.send_chunks)
        if wrong or covered != written:
            self.problem(f"the incremental stream: {wrong} record(s) not DATA or not "
                         f"holding s2's bytes; it covers {len(covered)} chunks, "
                         f"{len(covered - written)} not written, "
                         f"{len(written - covered)} written ones missing")
        else:
            self.send_notes.append(
                f"the incremental stream (run 1) read back with `ddsnap.stream."
                f"StreamReader` (every crc32c and the SHA-256 digest checked): its DATA "
                f"records cover exactly the {len(written)} chunks written and hold s2's "
                f"bytes (compared with A's origin file)")

    def send_pipe(self, rep: int) -> None:
        """``send | receive`` into a fresh store B, then ``nbdcopy`` of s2 from
        ``serve A``, both timed from a dropped page cache; B's origin must be the
        nbdcopy output byte for byte."""
        a, f = self.args, self.send_paths()
        size = a.size
        m = PipeRun(rep, size, profiled=bool(a.profile))
        try:
            with open(f["b_origin"], "wb") as o:
                o.truncate(size)
            self.ddsnap("init", str(f["b_store"]), "--origin", str(f["b_origin"]),
                        "--size", str(self.store_size()), "--chunk-size",
                        str(a.chunk_size), what="init of store B")
            cold = self.drop_page_cache()
            self.timed_pipe(m, f)
            say(f"send | receive: {size / 1e6:,.0f} MB in {m.pipe_s:.2f} s = "
                f"{m.pipe_mbs:,.0f} MB/s (CPU: send {m.send_cpu_s:.1f} s, receive "
                f"{m.recv_cpu_s:.1f} s)")
            srv = self.procs.start(
                "ddsnap serve A (nbdcopy)",
                [*self.ddsnap_cmd, "serve", str(f["a_store"]), "--listen",
                 f"unix:{f['sock']}", "--workers", "0"], f["sock"], self.tmp / "serve-a.log")
            uri = f"nbd+unix:///s2?socket={f['sock']}"
            try:
                cold = self.drop_page_cache() and cold
                t0 = time.monotonic()
                run(["nbdcopy", uri, str(f["copy_sync"])], "nbdcopy", 600 + size / MiB)
                run(["sync", str(f["copy_sync"])], "sync of nbdcopy's output", 600)
                m.nbdcopy_sync_s = time.monotonic() - t0
                drop_file(f["copy_sync"])
                cold = self.drop_page_cache() and cold
                c0 = proc_cpu(srv.popen.pid)
                m.nbdcopy_flush_s, m.nbdcopy_cpu_s, _ = self.timed_cmd(
                    ["nbdcopy", "--flush", uri, str(f["copy"])], "nbdcopy --flush",
                    600 + size / MiB)
                c1 = proc_cpu(srv.popen.pid)
                if c0 is not None and c1 is not None:
                    m.server_cpu_s = c1 - c0
            finally:
                rc, note = self.procs.stop(srv)
                if rc != 0 or note:
                    self.problem(f"ddsnap serve A (nbdcopy) exited {rc} on SIGTERM {note}"
                                 f"\n{tail(srv.log.read_text())}")
            m.cold = cold
            say(f"nbdcopy --flush {m.nbdcopy_flush_s:.2f} s = {m.flush_mbs:,.0f} MB/s; "
                f"nbdcopy + sync {m.nbdcopy_sync_s:.2f} s = {m.sync_mbs:,.0f} MB/s")
            self.check_pipe(m, f, first=rep == 0)
        finally:
            for k in ("b_origin", "b_store", "copy", "copy_sync"):
                drop_file(f[k])
            drop_file(Path(f"{f['b_store']}.ctl"))
        self.pipe_runs.append(m)

    def timed_pipe(self, m: PipeRun, f: dict[str, Path]) -> None:
        """Time ``ddsnap send A s2 --no-progress | ddsnap receive B --no-progress
        --json``: from starting both processes to both having exited."""
        a = self.args
        send_argv = [*self.ddsnap_cmd, "send", str(f["a_store"]), "s2", "--no-progress"]
        recv_argv = [*self.ddsnap_cmd, "receive", str(f["b_store"]), "--no-progress",
                     "--json"]
        logs = [self.tmp / n for n in ("send.err", "receive.out", "receive.err")]
        deadline = time.monotonic() + 900 + a.size / (2 * MiB)
        with open(logs[0], "w") as se, open(logs[1], "w") as ro, open(logs[2], "w") as re_:
            t0 = time.monotonic()
            send = subprocess.Popen(send_argv, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=se)
            assert send.stdout is not None
            try:
                recv = subprocess.Popen(recv_argv, stdin=send.stdout, stdout=ro, stderr=re_)
            except OSError:
                send.kill()
                send.wait()
                raise
            finally:
                send.stdout.close()  # the receiver holds the read end now
        cpu: dict[str, float] = {}

        def wait_both() -> None:
            try:
                cpu["receive"] = self.wait_cpu(recv, deadline, "ddsnap receive")
                cpu["send"] = self.wait_cpu(send, deadline, "ddsnap send")
            finally:
                for p in (send, recv):
                    if p.returncode is None:
                        p.kill()
                        with contextlib.suppress(ChildProcessError):
                            p.wait()

        if a.profile:
            self.profiled(Server("ddsnap send", send_argv, None, logs[0], send),
                          "send-pipe",
                          lambda: self.profiled(Server("ddsnap receive", recv_argv, None,
                                                       logs[2], recv),
                                                "receive-pipe", wait_both))
        else:
            wait_both()
        m.pipe_s = time.monotonic() - t0
        m.send_cpu_s, m.recv_cpu_s = cpu.get("send"), cpu.get("receive")
        if send.returncode or recv.returncode:
            raise BenchError(f"send | receive: send exited {send.returncode}, receive "
                             f"{recv.returncode}\nsend: {tail(logs[0].read_text())}\n"
                             f"receive: {tail(logs[1].read_text() + logs[2].read_text())}")
        try:
            summ = json.loads(logs[1].read_text())
        except ValueError:
            raise BenchError(f"receive --json printed no summary: "
                             f"{tail(logs[1].read_text())}") from None
        m.stream_bytes = summ.get("bytes", 0)
        if summ.get("applied_bytes") != a.size or summ.get("snapshot") != "s2":
            m.bad.append(f"receive --json says {summ.get('applied_bytes')} bytes applied "
                         f"(volume {a.size}) for snapshot {summ.get('snapshot')!r}")

    def check_pipe(self, m: PipeRun, f: dict[str, Path], first: bool) -> None:
        """B's origin == nbdcopy's output (``cmp``); the first repetition also compares
        that output with A's origin file (A's origin reads as s2), runs ``ddsnap check``
        of B and looks for B's read-only snapshot s2."""
        size = self.args.size
        cmp_timeout = 300 + size / (20 * MiB)
        p = subprocess.run(["cmp", str(f["b_origin"]), str(f["copy"])],
                           capture_output=True, text=True, timeout=cmp_timeout)
        m.identical = p.returncode == 0
        if not m.identical:
            m.bad.append(f"WRONG DATA: B's origin after receive differs from nbdcopy's copy "
                         f"of s2: `cmp`: {(p.stdout + p.stderr).strip()}")
        if first:
            p = subprocess.run(["cmp", str(f["copy"]), str(f["a_origin"])],
                               capture_output=True, text=True, timeout=cmp_timeout)
            if p.returncode != 0:
                m.bad.append(f"WRONG DATA: nbdcopy's copy of s2 differs from A's origin "
                             f"file: `cmp`: {(p.stdout + p.stderr).strip()}")
            else:
                self.send_notes.append("run 1: nbdcopy's copy of s2 == A's origin file "
                                       "(`cmp`): both copies are of the right bytes")
            try:
                out = self.ddsnap("check", str(f["b_store"]), what="ddsnap check of B",
                                  timeout=600).stdout
                if "clean" not in out:
                    m.bad.append(f"`ddsnap check` of B not clean:\n{tail(out)}")
                snaps = json.loads(self.ddsnap("snap", "list", str(f["b_store"]), "--json",
                                               what="snap list of B").stdout)
                if [(s["name"], s["read_only"], s["size"]) for s in snaps] != [
                        ("s2", True, size)]:
                    m.bad.append(f"B's snapshots after receive: {snaps} (expected s2, "
                                 f"read-only, {size} bytes)")
                else:
                    self.send_notes.append("run 1: after receive, `ddsnap check` of B is "
                                           "clean and B holds one snapshot, s2, read-only, "
                                           "of the volume's size")
            except (BenchError, ValueError, KeyError) as e:
                m.bad.append(f"checking B: {e}")
        for x in m.bad:
            self.problem(x)
        if m.identical:
            say("B's origin == nbdcopy's copy of s2 (cmp)")


def read_whole(path: Path) -> None:
    """Read the file ``path`` from start to end in 4 MiB blocks (into the page cache)."""
    buf = bytearray(GEN_BLOCK)
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass
