"""Helpers for tests that drive ddsnap as a user does: the real ``ddsnap`` command in
subprocesses, a real ``ddsnap serve`` on a unix socket, real NBD clients.

* :func:`ddsnap` runs one CLI command; :func:`ok` and :func:`fails` check its outcome
  (``fails`` also checks the error contract: one ``ddsnap: ...`` line on stderr, the
  error's exit code, no traceback).
* :class:`Served` runs ``ddsnap serve STORE --listen unix:SOCK`` as a subprocess, waits
  until it says it is serving and its control socket answers a request, and on exit sends
  SIGTERM and asserts a clean exit (status 0, no traceback, sockets removed).
* :func:`tool` runs an external client (qemu-io, nbdinfo, ...) and skips the test when
  the binary is not installed.

Nothing here sleeps for a fixed time to let something happen: waits poll a condition up to
a generous deadline and fail with what was seen.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import os
import pty
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import termios
import time
from pathlib import Path
from typing import Any

import pytest

#: the ddsnap command: the venv's console script (what users run), else ``python -m``
_SCRIPT = Path(sys.executable).with_name("ddsnap")
DDSNAP = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "ddsnap.cli"]

#: generous deadline for anything we wait for (not a timing assertion)
DEADLINE = 60.0
#: unix socket paths are limited to 108 bytes including the NUL
_SUN_PATH_MAX = 107

KiB = 1024
MiB = 1024 * KiB

#: where serving ddsnaps record their control sockets (``$DDSNAP_RUNDIR``): a directory
#: of this test session, so the tests never touch /run/ddsnap
_RUNDIR = tempfile.mkdtemp(prefix="ddsnap-run-")
atexit.register(shutil.rmtree, _RUNDIR, True)


def ddsnap_env() -> dict:
    """The environment every ddsnap process of the tests runs with."""
    return {**os.environ, "DDSNAP_RUNDIR": _RUNDIR}


@contextlib.contextmanager
def this_tree_first():
    """Put this tree's ``src`` first on ``PYTHONPATH`` for the ddsnap processes started
    meanwhile (the venv's console script may come from an editable install of another
    checkout), and make sure they import it from there."""
    src = Path(__file__).resolve().parents[1] / "src"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTHONPATH", os.pathsep.join(
            [str(src), *filter(None, [os.environ.get("PYTHONPATH")])]))
        where = subprocess.run([sys.executable, "-c", "import ddsnap; print(ddsnap.__file__)"],
                               capture_output=True, text=True, env=ddsnap_env(), check=True)
        assert Path(where.stdout.strip()).resolve().is_relative_to(src), where.stdout
        yield


def ddsnap(*args, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``ddsnap ARGS`` and return the completed process (text output)."""
    return subprocess.run([*DDSNAP, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=ddsnap_env())


def ok(*args, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``ddsnap ARGS``, assert it succeeded, return it."""
    p = ddsnap(*args, timeout=timeout)
    assert p.returncode == 0, (f"ddsnap {' '.join(map(str, args))} exited {p.returncode}\n"
                               f"stdout: {p.stdout}\nstderr: {p.stderr}")
    assert "Traceback" not in p.stderr, p.stderr
    return p


def ok_json(*args):
    """Run ``ddsnap ARGS --json``, assert success, return the parsed JSON."""
    return json.loads(ok(*args, "--json").stdout)


def fails(code: int, *args, match: str | None = None, timeout: float = 120) -> str:
    """Run ``ddsnap ARGS``; assert the error contract and return the error line.

    The contract: exit status ``code``, exactly one line on stderr starting ``ddsnap: ``,
    no traceback.  ``match`` is a regular expression searched in that line.
    """
    p = ddsnap(*args, timeout=timeout)
    cmd = f"ddsnap {' '.join(map(str, args))}"
    assert p.returncode == code, (f"{cmd}: expected exit {code}, got {p.returncode}\n"
                                  f"stdout: {p.stdout}\nstderr: {p.stderr}")
    assert "Traceback" not in p.stderr + p.stdout, f"{cmd} printed a traceback:\n{p.stderr}"
    lines = p.stderr.splitlines()
    assert len(lines) == 1, f"{cmd}: expected one line on stderr, got {lines!r}"
    line = lines[0]
    assert line.startswith("ddsnap: "), f"{cmd}: {line!r}"
    if match is not None:
        assert re.search(match, line), f"{cmd}: {line!r} does not match {match!r}"
    return line


def tool(*args, check: bool = True, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    """Run an external program; skip the test if it is not installed.

    With ``check`` a non-zero exit fails the test with the program's output.
    """
    need(str(args[0]))
    p = subprocess.run([str(a) for a in args], capture_output=True, text=True,
                       timeout=timeout, **kwargs)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} exited {p.returncode}\n"
                             f"stdout: {p.stdout}\nstderr: {p.stderr}")
    return p


def need(binary: str) -> str:
    """The path of ``binary``; skip the test if it is not installed."""
    path = shutil.which(binary)
    if path is None:
        pytest.skip(f"{binary} is not installed (scripts/setup installs it)")
    return path


def wait_until(predicate, what: str, deadline: float = DEADLINE, interval: float = 0.02):
    """Poll ``predicate()`` until it returns a true value (returned), or fail after
    ``deadline`` seconds saying ``what`` never happened."""
    end = time.monotonic() + deadline
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(interval)


def control_request(path: str | os.PathLike, op: str, args: dict | None = None,
                    timeout: float = DEADLINE) -> dict:
    """Send one request to a control socket by hand (one JSON line each way, as
    docs/protocol.md describes) and return the decoded reply."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        s.sendall(json.dumps({"op": op, "args": args or {}}).encode() + b"\n")
        with s.makefile("rb") as f:
            line = f.readline()
    return json.loads(line)


def children(pid: int) -> dict[str, int]:
    """A ``serve --workers`` supervisor's children by role: ``meta``, ``worker1``,
    ``worker2``, ..."""
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True,
                         text=True, check=False).stdout.split()
    found: dict[str, int] = {}
    for p in map(int, out):
        try:
            args = Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")
        except (FileNotFoundError, ProcessLookupError):  # (it exited meanwhile)
            continue
        if b"ddsnap.workers" not in args:
            continue
        kind = args[args.index(b"ddsnap.workers") + 1].decode()
        name = args[args.index(b"--name") + 1].decode() if b"--name" in args else kind
        found[name] = p
    return found


class Spawned:
    """A ddsnap command run as a subprocess whose output goes to the file ``self.log``
    (set by the subclass with ``self.args``): :meth:`start` runs it and waits until
    :meth:`_ready`; as a context manager it is started on entry and, on exit, stopped
    with :meth:`stop` (or just sent SIGTERM if the test already failed)."""

    args: list[str]
    log: Path
    proc: subprocess.Popen | None = None
    returncode: int | None = None
    #: what it is, for messages
    what = "ddsnap"

    def _spawn(self) -> None:
        self._logf = open(self.log, "w+")  # noqa: SIM115 - open while it runs
        self.proc = subprocess.Popen(self.args, stdout=self._logf, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=ddsnap_env())

    def start(self) -> Any:
        self._spawn()
        try:
            wait_until(self._ready, f"{self.what} to be ready")
        except BaseException:
            self.reap(signal.SIGKILL)
            raise
        return self

    def _ready(self) -> bool:
        raise NotImplementedError

    def _started(self) -> subprocess.Popen:
        assert self.proc is not None, f"{self.what} was never started"
        return self.proc

    def exited_early(self) -> None:
        """AssertionError with its output if it exited."""
        proc = self._started()
        if proc.poll() is not None:
            raise AssertionError(f"{self.what} exited {proc.returncode}:\n{self.output()}")

    def output(self) -> str:
        """Everything it printed so far."""
        with open(self.log) as f:
            return f.read()

    @property
    def pid(self) -> int:
        return self._started().pid

    def reap(self, sig: int) -> int:
        """Send ``sig`` if it still runs, wait (SIGKILL after DEADLINE), return its status."""
        proc = self._started()
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(DEADLINE)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.returncode = proc.returncode
        self._logf.close()
        return proc.returncode

    def stop(self) -> Any:
        """SIGTERM; assert it exits 0 without a traceback; return its output."""
        rc = self.reap(signal.SIGTERM)
        out = self.output()
        assert rc == 0, f"{self.what} exited {rc} on SIGTERM:\n{out}"
        assert "Traceback" not in out, out
        return out

    def __enter__(self) -> Any:
        return self if self.proc is not None else self.start()

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.proc is None or self.returncode is not None:
            return
        if exc_type is not None:
            # The test already failed: stop it, don't mask the real error.
            self.reap(signal.SIGTERM)
            return
        self.stop()


class Served(Spawned):
    """``ddsnap serve STORE`` as a real subprocess, on a unix socket next to the store.

    Use as a context manager::

        with Served(store) as srv:
            tool("nbdinfo", srv.uri("origin"))

    ``srv.sock`` is the NBD socket, ``srv.ctl`` the control socket (default
    ``STORE.ctl``), ``srv.tcp`` the ``host:port`` of a TCP listener when ``tcp=True``.
    ``workers=N`` serves with ``--workers N`` (a metadata server process and N worker
    processes doing the NBD and data I/O; 0: one process); None, serve's default (as
    many workers as CPUs).
    On a normal exit the server gets SIGTERM and must exit 0 without a traceback and
    remove its sockets; :meth:`kill` instead SIGKILLs it (a crash).
    """

    what = "ddsnap serve"

    def __init__(self, store: str | os.PathLike, *, sock: str | os.PathLike | None = None,
                 control: str | os.PathLike | None = None, tcp: bool = False,
                 extra: tuple[str, ...] = (), workers: int | None = None,
                 metadata: str | None = None, tls: tuple[str, str, str] | None = None,
                 host: Any = None):
        self.store = Path(store)
        self.sock = Path(sock) if sock else self.store.with_name(self.store.name + ".nbd")
        self.ctl = Path(control) if control else self.store.with_name(self.store.name + ".ctl")
        self.log = self.sock.with_name(self.sock.name + ".serve.log")
        for p in (self.sock, self.ctl):
            assert len(str(p)) <= _SUN_PATH_MAX, f"socket path too long for AF_UNIX: {p}"
        self.args = [*DDSNAP, "serve", str(self.store), "--listen", f"unix:{self.sock}"]
        if tcp:
            self.args += ["--listen", "tcp:127.0.0.1:0"]
        if control:
            self.args += ["--control", str(self.ctl)]
        if workers is not None:
            self.args += ["--workers", str(workers)]
        if metadata:
            self.args += ["--metadata-listen", metadata, *tls_args(tls)]
        self.args += list(extra)
        if host is not None:  # a tests.hosts.Host: run inside its network namespace
            self.args = host.argv(*self.args)
        self.metadata: str | None = None
        self.workers = workers
        self.want_tcp = tcp
        self.tcp: str | None = None
        self.proc = None
        self.returncode = None

    # -- life cycle -------------------------------------------------------------------

    def _ready(self) -> bool:
        self.exited_early()
        m = re.search(r"^serving .* on (.*); control socket ([^;\s]+)(; metadata port "
                      r"(tcp:\S+))?", self.output(), re.M)
        if not m:
            return False
        self.metadata = m.group(4)
        if self.want_tcp:
            t = re.search(r"tcp:(127\.0\.0\.1:\d+)", m.group(1))
            assert t, f"no TCP address in {m.group(0)!r}"
            self.tcp = t.group(1)
        try:
            reply = control_request(self.ctl, "status", timeout=10)
        except OSError:
            return False
        assert reply.get("ok") and reply["result"]["served"] is True, reply
        return True

    def stop(self) -> None:
        """SIGTERM; assert the server drains and exits cleanly and removes its sockets."""
        super().stop()
        assert not self.ctl.exists(), f"control socket {self.ctl} left behind"
        assert not self.sock.exists(), f"NBD socket {self.sock} left behind"

    def kill(self) -> None:
        """SIGKILL the server (a crash): nothing is cleaned up, the journal must recover.
        With workers, every process at once: the supervisor is frozen first (no restart),
        then its children are killed (none gets the SIGTERM a dying parent sends), then
        it."""
        kids = list(children(self.pid).values())
        if kids:
            os.kill(self.pid, signal.SIGSTOP)
            for p in kids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p, signal.SIGKILL)
        rc = self.reap(signal.SIGKILL)
        assert rc == -signal.SIGKILL, rc

    def pids(self) -> list[int]:
        """The server's processes: ``serve`` and, with workers, its children (to stop
        the whole server with SIGSTOP, say)."""
        return [self.pid, *children(self.pid).values()]

    # -- addresses --------------------------------------------------------------------

    def uri(self, export: str = "origin") -> str:
        """The NBD URI of ``export`` on the unix socket."""
        return f"nbd+unix:///{export}?socket={self.sock}"

    def tcp_uri(self, export: str = "origin") -> str:
        assert self.tcp, "start with tcp=True"
        return f"nbd://{self.tcp}/{export}"

    def control(self, op: str, **args):
        """Run a control operation by hand; return its result or raise AssertionError."""
        reply = control_request(self.ctl, op, args)
        assert reply.get("ok"), reply
        return reply["result"]


class ClusterServer(Served):
    """``ddsnap serve STORE --etcd URL --cluster CLUSTER --metadata-listen METADATA``:
    a metadata server of a cluster, which serves only once elected (so :meth:`start`
    does not wait: :meth:`wait` for ``"serving"`` or ``"standing by"``), with
    ``--workers workers`` (None: serve's default), in ``host`` if given.  ``tag`` names
    its sockets and log in ``sockdir``.

    On exit it is woken (SIGCONT) and sent SIGTERM; :meth:`stop` returns its status
    (30 for a server that lost its term) rather than asserting a clean exit.
    """

    def __init__(self, store: str | os.PathLike, etcd_url: str, metadata: str, tag: str,
                 sockdir: str | os.PathLike, *, tls: tuple[str, str, str] | None,
                 cluster: str = "c1", ttl: float = 5, workers: int | None = 0,
                 host: Any = None):
        self.cluster = cluster
        self.tag = tag
        self.host = host
        super().__init__(store, sock=Path(sockdir) / f"{tag}.sock",
                         control=Path(sockdir) / f"{tag}.ctl", metadata=metadata, tls=tls,
                         extra=("--etcd", etcd_url, "--cluster", cluster, "--lease-ttl",
                                f"{ttl:g}"), workers=workers, host=host)

    def start(self) -> ClusterServer:
        self._spawn()
        return self

    def epoch(self) -> int | None:
        """The epoch of the term it was elected for, once it said so."""
        m = re.search(rf"for cluster {re.escape(self.cluster)} \(epoch (\d+)\)",
                      self.output())
        return int(m.group(1)) if m else None

    def said(self, what: str) -> bool:
        """Whether it printed ``what`` (AssertionError if it exited)."""
        self.exited_early()
        return what in self.output()

    def wait(self, what: str, deadline: float = DEADLINE) -> None:
        """Until it prints ``what``; AssertionError if it exits first."""
        wait_until(lambda: self.said(what), f"serve to say {what!r}", deadline)

    def exit_status(self, timeout: float = DEADLINE) -> int:
        """Wait until it exits by itself (as a fenced server does); its status."""
        return self._started().wait(timeout)

    def stop(self) -> int:  # type: ignore[override]
        proc = self._started()
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
        return self.reap(signal.SIGTERM)

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.proc is not None and self.returncode is None:
            self.stop()  # (its status is the test's to check)


def tls_args(files: tuple[str, str, str] | None) -> list[str]:
    """The ``--tls-*`` options for ``(ca, cert, key)``, or ``--insecure`` for None."""
    if files is None:
        return ["--insecure"]
    ca, cert, key = files
    return ["--tls-ca", ca, "--tls-cert", cert, "--tls-key", key]


class Attached(Spawned):
    """``ddsnap attach SERVER --origin ORIGIN --store STORE`` (no SERVER: give
    ``--etcd``/``--cluster`` in ``extra``) as a real subprocess,
    serving NBD on a unix socket ``sock``; in ``host`` (a tests.hosts.Host) if given.

    Use as a context manager, like :class:`Served`; on a normal exit it gets SIGTERM and
    must exit 0 without a traceback.  ``node`` is the node id the server gave it.
    """

    def __init__(self, server: str | None, origin: str | os.PathLike,
                 store: str | os.PathLike,
                 sock: str | os.PathLike, *, tls: tuple[str, str, str] | None = None,
                 workers: int | None = 0, name: str | None = None,
                 extra: tuple[str, ...] = (), host: Any = None):
        self.what = "ddsnap attach"
        self.sock = Path(sock)
        assert len(str(self.sock)) <= _SUN_PATH_MAX, f"socket path too long: {sock}"
        self.log = self.sock.with_name(self.sock.name + ".attach.log")
        args = [*DDSNAP, "attach", *([server] if server else []), "--origin", str(origin),
                "--store", str(store), "--listen", f"unix:{self.sock}", *tls_args(tls)]
        if workers is not None:
            args += ["--workers", str(workers)]
        if name:
            args += ["--name", name]
        args += list(extra)
        self.args = host.argv(*args) if host is not None else args
        self.proc = None
        self.node: int | None = None
        self.returncode = None

    def _ready(self) -> bool:
        self.exited_early()
        m = re.search(r"^attached to .+? as node (\d+)", self.output(), re.M)
        if m:
            self.node = int(m.group(1))
        return m is not None

    def uri(self, export: str = "origin") -> str:
        return f"nbd+unix:///{export}?socket={self.sock}"

    def kill(self) -> None:
        """SIGKILL the node and (with workers) its children at once."""
        for p in [*children(self.pid).values(), self.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
        self.reap(signal.SIGKILL)


def make_origin(path: Path, size: int, seed: int | None = None) -> bytes:
    """Write an origin file of ``size`` bytes of random data; return the data."""
    data = os.urandom(size) if seed is None else _seeded(size, seed)
    path.write_bytes(data)
    return data


def _seeded(size: int, seed: int) -> bytes:
    import random
    return random.Random(seed).randbytes(size)


def read_export(srv: Served, export: str, dest: Path, *extra: str) -> bytes:
    """Copy ``export`` to the file ``dest`` with nbdcopy and return its bytes."""
    tool("nbdcopy", *extra, srv.uri(export), dest)
    return dest.read_bytes()


# --- FUSE, loop devices and mounts (root-only tests) --------------------------------------


def is_root() -> bool:
    return os.geteuid() == 0


@contextlib.contextmanager
def nbdfuse(uri: str, mountpoint: Path, readonly: bool = False):
    """Expose the NBD export ``uri`` as the file ``MOUNTPOINT/nbd`` with nbdfuse; yields
    that file.  On exit the FUSE mount is unmounted and nbdfuse must exit 0."""
    need("nbdfuse")
    need("fusermount3")
    mountpoint.mkdir(parents=True, exist_ok=True)
    log = mountpoint.with_name(mountpoint.name + ".nbdfuse.log")
    with open(log, "w") as logf:
        proc = subprocess.Popen(["nbdfuse", *(["--readonly"] if readonly else []),
                                 str(mountpoint), uri],
                                stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    target = mountpoint / "nbd"

    def mounted():
        if proc.poll() is not None:
            raise AssertionError(f"nbdfuse exited {proc.returncode}: {log.read_text()}")
        return os.path.ismount(mountpoint) and target.exists()

    try:
        wait_until(mounted, f"nbdfuse to mount {uri} on {mountpoint}")
        yield target
    finally:
        why = ""
        if os.path.ismount(mountpoint):
            r = subprocess.run(["fusermount3", "-u", str(mountpoint)], capture_output=True,
                               text=True)
            if r.returncode != 0:  # still busy: don't leave it behind
                why = r.stderr
                subprocess.run(["fusermount3", "-uz", str(mountpoint)], capture_output=True)
        try:
            rc = proc.wait(DEADLINE)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
    assert not why, f"could not unmount {mountpoint}: {why}"
    assert rc == 0, f"nbdfuse exited {rc}: {log.read_text()}"


@contextlib.contextmanager
def loop_device(path: Path, readonly: bool = False):
    """Attach ``path`` to a free loop device; yields ``/dev/loopN``; detaches on exit."""
    need("losetup")
    dev = tool("losetup", "-f", "--show", *(["-r"] if readonly else []), path).stdout.strip()
    assert dev.startswith("/dev/loop"), dev
    try:
        yield dev
    finally:
        r = subprocess.run(["losetup", "-d", dev], capture_output=True, text=True)
    assert r.returncode == 0, f"losetup -d {dev}: {r.stderr}"


@contextlib.contextmanager
def mounted(dev: str, mountpoint: Path, options: str = ""):
    """``mount [-o OPTIONS] DEV MOUNTPOINT`` for the block; unmounted on exit."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    tool("mount", *(["-o", options] if options else []), dev, mountpoint)
    try:
        yield mountpoint
    finally:
        r = subprocess.run(["umount", str(mountpoint)], capture_output=True, text=True)
        if r.returncode != 0:
            subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True)
    assert r.returncode == 0, f"umount {mountpoint}: {r.stderr}"


# --- comparing volumes and following a merge (merge and full-store tests) -----------------


def same_image(expected: Path, target: str | os.PathLike, what: str | None = None) -> None:
    """Assert that ``target`` (an NBD URI or a file) holds exactly the bytes of the raw
    file ``expected``, with ``qemu-img compare``."""
    p = tool("qemu-img", "compare", "-f", "raw", "-F", "raw", expected, target, check=False)
    assert p.returncode == 0, (f"{what or target} differs from {expected} "
                               f"(qemu-img compare exited {p.returncode}): "
                               f"{p.stdout.strip()} {p.stderr.strip()}")


def export_names(srv: Served) -> list[str]:
    """The export names the server lists (``nbdinfo --list``), in its order."""
    out = tool("nbdinfo", "--list", "--json", srv.uri("")).stdout
    return [e["export-name"] for e in json.loads(out)["exports"]]


def merge_status(store: str | os.PathLike):
    """``ddsnap merge STORE --status --json``: a dict, or None when no merge is recorded."""
    return ok_json("merge", store, "--status")


def wait_merge_done(store: str | os.PathLike, deadline: float = 3 * DEADLINE) -> None:
    """Poll ``merge --status --json`` of a served store until no merge is in progress;
    fail at once if the merge is recorded but no longer running (stopped, or died)."""
    def done():
        st = merge_status(store)
        assert st is None or st["running"], f"the merge stopped before it completed: {st}"
        return st is None
    wait_until(done, f"the merge in {store} to complete", deadline=deadline, interval=0.25)


# --- a user at a terminal ----------------------------------------------------------------


def on_a_terminal(*args, answer: str | None = None, whole: bool = True,
                  columns: int = 160) -> tuple[int, str, str]:
    """Run ``ddsnap ARGS`` on a pseudo-terminal ``columns`` wide, as a user at a shell
    does: with ``whole``, stdin, stdout and stderr are the terminal; without it only
    stderr is (stdout is a pipe, stdin empty).  The first ``[y/N]`` question is answered
    ``answer`` (or "n" when none was expected: the question then shows in the output
    instead of hanging the test).  Returns (exit status, stdout when it is a pipe else
    "", everything the terminal showed without escape sequences or carriage returns)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
    env = {**ddsnap_env(), "TERM": "xterm-256color"}
    env.pop("NO_COLOR", None)
    streams: dict[str, Any] = (
        dict(stdin=slave, stdout=slave, start_new_session=True) if whole else
        dict(stdin=subprocess.DEVNULL, stdout=subprocess.PIPE))
    proc = subprocess.Popen([*DDSNAP, *map(str, args)], stderr=slave, env=env, **streams)
    os.close(slave)
    got = b""
    answered = False
    end = time.monotonic() + DEADLINE
    try:
        while time.monotonic() < end:
            ready, _, _ = select.select([master], [], [], 0.5)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            got += data
            if not answered and b"[y/N]" in got:
                os.write(master, (answer or "n").encode() + b"\r")
                answered = True
        if whole:
            out = ""
        else:
            assert proc.stdout is not None  # a pipe without ``whole``
            out = proc.stdout.read().decode()
        proc.wait(DEADLINE)
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", got.decode(errors="replace"))
    return proc.returncode, out, text.replace("\r", "")
