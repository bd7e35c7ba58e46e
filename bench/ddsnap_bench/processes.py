"""The long-running processes a run starts (servers, nbdfuse, py-spy, and with
``--cluster`` etcd, cluster servers and nodes): each started in its own session with its
output to a log, waited for until its socket answers (or until it prints a given line),
and all of them stopped at the end, also on failure or Ctrl-C."""

from __future__ import annotations

import contextlib
import shlex
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from .common import BenchError, drop_file, spawn, tail


@dataclass
class Server:
    name: str
    argv: list[str]
    sock: Path | None
    log: Path
    popen: subprocess.Popen
    ready_path: Path | None = None
    mounts: list[Path] = field(default_factory=list)


class Processes:
    """Every long-running process the benchmark starts, so that all of them stop."""

    def __init__(self):
        self.live: list[Server] = []

    def start(self, name: str, argv: list[str], sock: Path | None, log: Path,
              ready_path: Path | None = None, timeout: float = 60,
              connect: bool = True, ready_text: str | None = None) -> Server:
        """Start ``argv`` and wait until it is ready: its unix socket ``sock`` accepts a
        connection (``connect``) or exists, and ``ready_path`` exists; or, with
        ``ready_text``, until its log holds that text (a cluster's standby server has
        no socket yet)."""
        if sock is not None:
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
            if ready_text is not None:
                if ready_text in log.read_text(errors="replace"):
                    return srv
            elif sock is not None and sock.exists() and (ready_path is None
                                                        or ready_path.exists()):
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
            with contextlib.suppress(ProcessLookupError):
                srv.popen.send_signal(signal.SIGTERM)
            try:
                srv.popen.wait(grace)
            except subprocess.TimeoutExpired:
                note = f"{srv.name} did not exit within {grace:.0f} s of SIGTERM; killed it"
                srv.popen.kill()
                srv.popen.wait()
        return srv.popen.returncode, note

    def kill(self, srv: Server) -> int | None:
        """SIGKILL (a crash), and reap it.  Returns its exit status."""
        if srv in self.live:
            self.live.remove(srv)
        with contextlib.suppress(ProcessLookupError):
            srv.popen.send_signal(signal.SIGKILL)
        return srv.popen.wait()

    def stop_all(self) -> None:
        """Stop every process, the last started first (a cluster's nodes before its
        servers, its servers before etcd)."""
        for srv in list(reversed(self.live)):
            with contextlib.suppress(BaseException):  # keep stopping the others
                self.stop(srv, grace=10)
