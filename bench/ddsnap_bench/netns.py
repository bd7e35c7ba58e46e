"""Hosts for ``--cluster`` as Linux network namespaces: a private switch (a bridge in a
namespace of its own) and one namespace per host, each with ``lo`` and an ``eth0`` on a
veth pair plugged into the switch, addressed from a private /24 (``10.214.X.0/24``, X
random).  Nothing is added to the root namespace.  Files are shared (one file system),
so every host sees the same origin and store files, as hosts on shared storage would;
what goes between hosts is TCP over the veths.

The same idea as the test suite's ``tests/hosts.py`` (which also makes faults in the
switch), kept to what the benchmark needs and without pytest: the tests' rigs are being
worked on alongside, and a benchmark should not depend on them.

:meth:`Network.close` kills whatever still runs in the namespaces and deletes them; a
network deletes, when it starts, the namespaces of earlier runs whose process is dead
(``ddsnapb-PID-...``).  Needs root and ``ip netns``.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import signal
import subprocess
import time

from .common import BenchError

#: every namespace made here starts with this (the tests' are ``ddsnapt-``)
PREFIX = "ddsnapb-"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=60,
                       stdin=subprocess.DEVNULL)
    if check and p.returncode != 0:
        raise BenchError(f"`ip {' '.join(args)}` exited {p.returncode}: {p.stderr.strip()}")
    return p


def _pids_in(ns: str) -> list[int]:
    p = _ip("netns", "pids", ns, check=False)
    return [int(x) for x in p.stdout.split()] if p.returncode == 0 else []


def _delete_namespace(ns: str) -> None:
    """Kill what runs in ``ns`` and delete it; never raises (cleanup)."""
    end = time.monotonic() + 10
    while (pids := _pids_in(ns)) and time.monotonic() < end:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.02)
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        _ip("netns", "delete", ns, check=False)


def clean_stale() -> None:
    """Delete the namespaces of earlier benchmark runs whose process is dead."""
    pattern = re.compile(rf"^{re.escape(PREFIX)}(\d+)-")
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        ns = line.split()[0] if line.strip() else ""
        m = pattern.match(ns)
        if not m or int(m.group(1)) == os.getpid():
            continue
        try:
            os.kill(int(m.group(1)), 0)
        except ProcessLookupError:
            _delete_namespace(ns)
        except PermissionError:
            pass


class Host:
    """One host: namespace ``ns`` with the address ``addr`` on its ``eth0``."""

    def __init__(self, name: str, ns: str, addr: str):
        self.name, self.ns, self.addr = name, ns, addr

    def argv(self, *argv: object) -> list[str]:
        """``argv`` run in this host (``ip netns exec`` execs it: same pid)."""
        return ["ip", "netns", "exec", self.ns, *map(str, argv)]

    def __repr__(self) -> str:
        return f"Host({self.name!r}, {self.addr})"


class Network:
    """A switch and the hosts plugged into it; :meth:`close` removes everything."""

    def __init__(self):
        self.id = f"{PREFIX}{os.getpid()}"
        self.octet = random.randrange(1, 255)
        self.switch = f"{self.id}-sw"
        self.namespaces: list[str] = []
        self.hosts: dict[str, Host] = {}
        self._next = 2

    def open(self) -> Network:
        if os.geteuid() != 0:
            raise BenchError("--cluster needs root (network namespaces)")
        clean_stale()
        self._add_namespace(self.switch)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        return self

    def add_host(self, name: str) -> Host:
        index = self._next
        self._next += 1
        ns, port = f"{self.id}-{name}", f"p{index}"
        addr = f"10.214.{self.octet}.{index}"
        self._add_namespace(ns)
        _ip("-n", self.switch, "link", "add", port, "type", "veth", "peer", "name", "eth0",
            "netns", ns)
        _ip("-n", self.switch, "link", "set", port, "master", "br0", "up")
        _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
        _ip("-n", ns, "link", "set", "eth0", "up")
        host = Host(name, ns, addr)
        self.hosts[name] = host
        return host

    def _add_namespace(self, ns: str) -> None:
        _ip("netns", "add", ns)
        self.namespaces.append(ns)
        _ip("-n", ns, "link", "set", "lo", "up")

    def close(self) -> None:
        """Kill what still runs in the namespaces (SIGKILL) and delete them."""
        for ns in reversed(self.namespaces):
            _delete_namespace(ns)
        self.namespaces.clear()
