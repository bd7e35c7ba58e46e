"""A real etcd (Debian's ``etcd-server``, /usr/bin/etcd) for the cluster tests.

:class:`EtcdServer` starts a one-member etcd, with a fresh data directory, either in a test
host (a :class:`hosts.Host`: it listens on the host's address, ports 2379 and 2380 unless
told otherwise) or, with no host, on 127.0.0.1 with free ports.  It waits until etcd answers
a linearizable read through aetcd (so it has elected itself leader), and on exit sends
SIGTERM, then SIGKILL.  ``url`` is ``http://ADDR:PORT``; ``addr`` and ``port`` are what
``aetcd.Client(addr, port)`` takes.

The test process runs in the root namespace: it can reach the local ``etcd`` fixture
directly, but an etcd inside a :class:`hosts.Network` only from a process run in one of its
hosts (``host.run(sys.executable, "-c", ...)`` or :meth:`EtcdServer.etcdctl` with ``via``).

Use the ``etcd`` fixture for single-host tests, or ``with EtcdServer(tmp_path / "etcd",
host=h) as e:`` in a network.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hosts import STOP_GRACE, Host
from served import DEADLINE, need

#: Waits until etcd serves a linearizable read (it has a leader), polling with aetcd;
#: argv: ADDR PORT DEADLINE.  Run in the host's namespace, so it is a separate process.
_HEALTH = r"""
import asyncio, sys, time
import aetcd

async def main(addr, port, deadline):
    end = time.monotonic() + deadline
    last = None
    while time.monotonic() < end:
        try:
            async with aetcd.Client(addr, port, timeout=2) as client:
                await client.get(b"/ddsnap-test/health")
            return 0
        except aetcd.ClientError as e:
            last = e
        await asyncio.sleep(0.05)
    print(f"etcd at {addr}:{port} not healthy after {deadline}s: {last!r}", file=sys.stderr)
    return 1

sys.exit(asyncio.run(main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]))))
"""

_tokens = itertools.count(1)


def free_port(addr: str = "127.0.0.1") -> int:
    """A TCP port free on ``addr`` right now (in the root namespace)."""
    with socket.socket() as s:
        s.bind((addr, 0))
        return s.getsockname()[1]


class EtcdServer:
    """One etcd member as a subprocess (see the module's docstring).

    ``workdir`` holds its data directory (``data``, must not exist yet) and its log
    (``etcd.log``).  ``heartbeat_ms`` and ``election_ms`` are etcd's
    ``--heartbeat-interval`` and ``--election-timeout``.
    """

    def __init__(self, workdir: str | os.PathLike, host: Host | None = None, *,
                 name: str = "etcd0", client_port: int | None = None,
                 peer_port: int | None = None, heartbeat_ms: int = 25,
                 election_ms: int = 250):
        self.workdir = Path(workdir)
        self.host = host
        self.name = name
        self.addr = host.addr if host is not None else "127.0.0.1"
        self.port = client_port or (2379 if host is not None else free_port())
        self.peer_port = peer_port or (2380 if host is not None else free_port())
        #: local ports picked here, so they may be picked again if another process took them
        self._pick_ports = host is None and client_port is None and peer_port is None
        self.heartbeat_ms = heartbeat_ms
        self.election_ms = election_ms
        self.data_dir = self.workdir / "data"
        self.log = self.workdir / "etcd.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        """The client URL, ``http://ADDR:PORT``."""
        return f"http://{self.addr}:{self.port}"

    @property
    def endpoint(self) -> str:
        """``ADDR:PORT``."""
        return f"{self.addr}:{self.port}"

    @property
    def peer_url(self) -> str:
        return f"http://{self.addr}:{self.peer_port}"

    def argv(self) -> list[str]:
        return [
            need("etcd"),
            "--name", self.name,
            "--data-dir", str(self.data_dir),
            "--listen-client-urls", self.url,
            "--advertise-client-urls", self.url,
            "--listen-peer-urls", self.peer_url,
            "--initial-advertise-peer-urls", self.peer_url,
            "--initial-cluster", f"{self.name}={self.peer_url}",
            "--initial-cluster-state", "new",
            "--initial-cluster-token", f"ddsnap-test-{os.getpid()}-{next(_tokens)}",
            "--heartbeat-interval", str(self.heartbeat_ms),
            "--election-timeout", str(self.election_ms),
            "--logger", "zap", "--log-outputs", "stderr",
        ]

    # -- life cycle ----------------------------------------------------------------------

    def start(self) -> EtcdServer:
        need("etcd")
        assert not self.running(), "etcd is running"
        self.workdir.mkdir(parents=True, exist_ok=True)
        fresh = self.proc is None
        if fresh:
            assert not self.data_dir.exists(), f"{self.data_dir} exists: etcd needs a fresh one"
        for attempt in range(3):
            logged = self.log.stat().st_size if self.log.exists() else 0
            self._spawn()
            try:
                self._wait_healthy()
                return self
            except AssertionError:
                self.stop()
                # free_port() races with every other process picking a port: pick again
                if (fresh and self._pick_ports and attempt < 2
                        and "address already in use" in self.output()[logged:]):
                    shutil.rmtree(self.data_dir, ignore_errors=True)
                    self.port, self.peer_port = free_port(), free_port()
                    continue
                raise
            except BaseException:
                self.stop()
                raise
        raise AssertionError("unreachable")

    def _spawn(self) -> None:
        # etcd also reads its flags from ETCD_* variables: none may leak in
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD")}
        with open(self.log, "a") as logf:
            if self.host is not None:
                self.proc = self.host.popen(*self.argv(), stdout=logf,
                                            stderr=subprocess.STDOUT, env=env)
            else:
                self.proc = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL,
                                             stdout=logf, stderr=subprocess.STDOUT, env=env,
                                             start_new_session=True)

    def _wait_healthy(self) -> None:
        proc = self._started()
        argv = [sys.executable, "-c", _HEALTH, self.addr, str(self.port), str(DEADLINE)]
        if self.host is not None:
            argv = self.host.argv(*argv)
        with subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) as waiter:
            try:
                while waiter.poll() is None:
                    if proc.poll() is not None:
                        raise AssertionError(f"etcd exited {proc.returncode} before it was "
                                             f"healthy:\n{self.output()}")
                    time.sleep(0.02)
            finally:
                if waiter.poll() is None:
                    waiter.kill()
                out = waiter.communicate()[0]
        if waiter.returncode != 0:
            raise AssertionError(f"{out}\netcd's log:\n{self.output()}")

    def _started(self) -> subprocess.Popen:
        assert self.proc is not None, "etcd was never started"
        return self.proc

    def output(self) -> str:
        """What etcd logged so far."""
        return self.log.read_text() if self.log.exists() else ""

    @property
    def pid(self) -> int:
        return self._started().pid

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL after a grace period; returns the exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(STOP_GRACE)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def restart(self) -> EtcdServer:
        """Stop etcd (if it runs) and start it again on its data directory and ports."""
        self.stop()
        return self.start()

    def kill(self) -> None:
        """SIGKILL etcd (a crash); its data directory stays as it was."""
        proc = self._started()
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait()

    def pause(self) -> None:
        """SIGSTOP etcd: it hangs, holding its connections open (a frozen server)."""
        os.kill(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.pid, signal.SIGCONT)

    def __enter__(self) -> EtcdServer:
        return self if self.proc is not None else self.start()

    def __exit__(self, *exc) -> None:
        if self.running():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGCONT)
        self.stop()

    # -- debugging -----------------------------------------------------------------------

    def etcdctl(self, *args: object, via: Host | None = None,
                check: bool = True) -> subprocess.CompletedProcess:
        """Run ``etcdctl --endpoints URL ARGS`` (v3 API) in host ``via`` (default: the
        server's own host, or here); with ``check`` a failure fails the test."""
        argv = [need("etcdctl"), "--endpoints", self.url, "--command-timeout", "10s",
                *map(str, args)]
        env = {**os.environ, "ETCDCTL_API": "3"}
        runner = via or self.host
        if runner is not None:
            p = runner.run(*argv, env=env)
        else:
            p = subprocess.run(argv, capture_output=True, text=True, env=env,
                               stdin=subprocess.DEVNULL, timeout=DEADLINE)
        if check and p.returncode != 0:
            raise AssertionError(f"etcdctl {' '.join(map(str, args))} exited {p.returncode}:"
                                 f"\n{p.stdout}{p.stderr}")
        return p


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[EtcdServer]:
    """A fresh one-member etcd on 127.0.0.1 (free ports) for one test."""
    need("etcd")
    with EtcdServer(tmp_path / "etcd") as server:
        yield server
