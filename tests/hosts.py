"""Test "hosts" as Linux network namespaces, for multi-host (cluster) tests on one machine.

A :class:`Network` is a private Ethernet switch: a bridge inside a namespace of its own.
:meth:`Network.add_host` makes a host: a namespace with ``lo`` up and an ``eth0`` whose
address comes from a private /24 the network picked (``10.213.X.0/24``, X random), plugged
into the switch by a veth pair created directly inside the two namespaces (IPv4 only: IPv6
is disabled on ``eth0`` and in the switch; ``lo`` keeps ``::1``).  Nothing is added
to the root namespace: no link, no address, no route, no firewall rule.  A host's namespace
has no route but its /24, so nothing a host sends can leave the network, and the root
namespace has no route to it either (never probe that by connecting from the root namespace:
its default route would carry the packet off the machine).

Faults are made in the switch, with an nftables ``bridge`` table in the switch's namespace,
so the hosts' own network stacks are untouched and notice nothing:

* :meth:`Host.cut_from` drops, silently and in both directions, the IP packets between one
  host and one peer (a partition between the two); :meth:`Host.restore_to` undoes it.
* :meth:`Host.link_down` drops every frame to or from a host's switch port, ARP included (the
  host is cut from everyone while its link still looks up); :meth:`Host.link_up` undoes it.

Packets are dropped, never refused: a connection across a cut hangs (SYN retransmits, then
an ETIMEDOUT after minutes; an established one stalls) as in a real partition, instead of the
immediate EACCES / EHOSTUNREACH / EINVAL that ``prohibit``, ``unreachable`` or ``blackhole``
routes would give the sender.  Code under test must therefore bound its waits.

On exit the network kills every process still running in its namespaces (those started with
:meth:`Host.popen` first, SIGTERM then SIGKILL) and deletes the namespaces, even when the test
failed.  Namespaces are named ``ddsnapt-PID-N-NAME`` (N counts networks in this process); at
start, a network deletes the leftovers of earlier runs whose PID is dead.

Root and ``ip netns`` are needed: :func:`netns_available` skips the test otherwise.  Use the
``network`` fixture, or ``with Network() as net:``::

    a, b = network.add_host("a"), network.add_host("b")
    srv = b.popen(sys.executable, "-m", "http.server", "--bind", b.addr, "8000")
    a.run("curl", f"http://{b.addr}:8000/")
    a.cut_from(b)
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import random
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator

import pytest

from served import DEADLINE

#: every namespace this module makes starts with this
PREFIX = "ddsnapt-"
#: the first two octets of every network's /24
SUBNET_BASE = "10.213"
#: how long a process gets to exit on SIGTERM before it is killed
STOP_GRACE = 10.0

_networks = itertools.count(1)
_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,30}$")
#: the nftables table (bridge family) in the switch's namespace that makes the faults
_TABLE = "ddsnap_faults"


class NetnsError(RuntimeError):
    """An ``ip``/``nft`` command setting up or tearing down the network failed."""


def _cmd(*argv: str, check: bool = True, input: str | None = None,
         timeout: float = DEADLINE) -> subprocess.CompletedProcess:
    p = subprocess.run(list(argv), capture_output=True, text=True, input=input,
                       timeout=timeout, stdin=None if input is not None else subprocess.DEVNULL)
    if check and p.returncode != 0:
        raise NetnsError(f"{' '.join(argv)} exited {p.returncode}: {p.stderr.strip()}")
    return p


def _sysctl(ns: str, setting: str) -> None:
    _cmd("ip", "netns", "exec", ns, "sysctl", "-q", "-w", setting)


def list_namespaces() -> list[str]:
    """The names of all network namespaces (``ip netns list``)."""
    out = _cmd("ip", "netns", "list").stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _pids_in(ns: str) -> list[int]:
    p = _cmd("ip", "netns", "pids", ns, check=False)
    return [int(x) for x in p.stdout.split()] if p.returncode == 0 else []


def _signal(pids: list[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    """Signal ``proc``'s process group if it leads one (popen's default), else ``proc``."""
    with contextlib.suppress(ProcessLookupError):
        if os.getpgid(proc.pid) == proc.pid:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _delete_namespace(ns: str) -> None:
    """Kill whatever still runs in ``ns`` (SIGKILL) and delete it.  Never raises: this is
    cleanup, and the other namespaces must go too."""
    end = time.monotonic() + STOP_GRACE
    while (pids := _pids_in(ns)) and time.monotonic() < end:
        _signal(pids, signal.SIGKILL)
        time.sleep(0.02)
    _cmd("ip", "netns", "delete", ns, check=False)


def clean_stale(prefix: str = PREFIX) -> list[str]:
    """Delete the namespaces ``PREFIX<pid>-...`` whose pid is dead (left by a crashed run,
    along with whatever still runs in them); returns their names."""
    pattern = re.compile(rf"^{re.escape(prefix)}(\d+)-")
    stale = []
    for ns in list_namespaces():
        m = pattern.match(ns)
        if m and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
            _delete_namespace(ns)
            stale.append(ns)
    return stale


@functools.cache
def _netns_problem() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "ip is not installed (scripts/setup installs iproute2)"
    ns = f"{PREFIX}{os.getpid()}-probe"
    try:
        _cmd("ip", "netns", "add", ns)
        try:
            _cmd("ip", "-n", ns, "link", "add", "br0", "type", "bridge")
            _cmd("ip", "-n", ns, "link", "add", "v0", "type", "veth", "peer", "name", "v1")
        finally:
            _delete_namespace(ns)
    except (NetnsError, OSError, subprocess.SubprocessError) as e:
        return f"ip netns does not work here: {e}"
    return None


def netns_available() -> None:
    """Skip the calling test unless we are root and ``ip netns`` (with bridges and veth
    pairs) works; probed once per session."""
    problem = _netns_problem()
    if problem is not None:
        pytest.skip(problem)


class Host:
    """A host of a :class:`Network`: a network namespace with one address.

    ``name`` is the name given to :meth:`Network.add_host`, ``ns`` the namespace's name,
    ``addr`` the IPv4 address of its ``eth0`` (a string), ``port`` the name of its
    switch-side interface (in the switch's namespace).
    """

    def __init__(self, network: Network, name: str, ns: str, addr: str, port: str):
        self.network = network
        self.name = name
        self.ns = ns
        self.addr = addr
        self.port = port

    def __repr__(self) -> str:
        return f"Host({self.name!r}, {self.addr})"

    def argv(self, *argv: object) -> list[str]:
        """``argv`` prefixed to run inside this host (``ip netns exec NS ...``)."""
        return ["ip", "netns", "exec", self.ns, *map(str, argv)]

    def run(self, *argv: object, **kw) -> subprocess.CompletedProcess:
        """Run ``argv`` in this host and wait for it (``subprocess.run``).  Defaults: output
        captured as text, no stdin, a timeout of DEADLINE; not checked."""
        if not {"stdout", "stderr", "capture_output"} & kw.keys():
            kw["capture_output"] = True
        if not {"stdin", "input"} & kw.keys():
            kw["stdin"] = subprocess.DEVNULL
        kw.setdefault("text", True)
        kw.setdefault("timeout", DEADLINE)
        return subprocess.run(self.argv(*argv), **kw)

    def popen(self, *argv: object, **kw) -> subprocess.Popen:
        """Start ``argv`` in this host (``subprocess.Popen``; stdin defaults to
        /dev/null, and it gets a session of its own).  The network stops it at exit if it
        still runs."""
        kw.setdefault("stdin", subprocess.DEVNULL)
        kw.setdefault("start_new_session", True)
        proc = subprocess.Popen(self.argv(*argv), **kw)
        self.network.track(proc)
        return proc

    def cut_from(self, peer: Host | str) -> None:
        """Silently drop all IP traffic between this host and ``peer`` (a host or an
        address), both ways; traffic with every other host is untouched."""
        self.network.cut(self.addr, _addr(peer))

    def restore_to(self, peer: Host | str) -> None:
        """Undo :meth:`cut_from`."""
        self.network.restore(self.addr, _addr(peer))

    def link_down(self) -> None:
        """Cut this host from everyone: its switch port drops every frame, both ways."""
        self.network.port_down(self.port)

    def link_up(self) -> None:
        """Undo :meth:`link_down`."""
        self.network.port_up(self.port)


def _addr(peer: Host | str) -> str:
    return peer.addr if isinstance(peer, Host) else str(peer)


class Network:
    """A private switch and the hosts plugged into it (see the module's docstring).

    ``subnet`` is its ``10.213.X.0/24``, ``switch`` the switch's namespace, ``hosts`` the
    hosts by name.  A context manager: the namespaces exist between enter and exit.
    """

    def __init__(self, prefix: str = PREFIX):
        self.prefix = prefix
        self.id = f"{prefix}{os.getpid()}-{next(_networks)}"
        self.octet = random.randrange(1, 255)
        self.subnet = f"{SUBNET_BASE}.{self.octet}.0/24"
        self.switch = f"{self.id}-sw"
        self.hosts: dict[str, Host] = {}
        self.namespaces: list[str] = []
        self.procs: list[subprocess.Popen] = []
        self.cuts: set[tuple[str, str]] = set()
        self.down: set[str] = set()
        self._next_index = 2
        self._open = False

    # -- life cycle ----------------------------------------------------------------------

    def __enter__(self) -> Network:
        clean_stale(self.prefix)
        self._open = True
        try:
            self._add_namespace(self.switch)
            for conf in ("all", "default"):
                _sysctl(self.switch, f"net.ipv6.conf.{conf}.disable_ipv6=1")
            self._ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
            self._ip("-n", self.switch, "link", "set", "br0", "up")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop the processes started in the hosts, delete every namespace."""
        if not self._open:
            return
        self._open = False
        self._stop_tracked()
        for ns in reversed(self.namespaces):
            _delete_namespace(ns)
        self.namespaces.clear()

    def _stop_tracked(self) -> None:
        live = [p for p in self.procs if p.poll() is None]
        for p in live:
            _signal_group(p, signal.SIGTERM)
        end = time.monotonic() + STOP_GRACE
        for p in live:
            try:
                p.wait(max(0.0, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(p, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(STOP_GRACE)
        self.procs.clear()

    def track(self, proc: subprocess.Popen) -> None:
        """Stop ``proc`` (SIGTERM to its process group, then SIGKILL) at exit."""
        self.procs.append(proc)

    # -- hosts ---------------------------------------------------------------------------

    def add_host(self, name: str) -> Host:
        """A new host ``name`` (lowercase letters, digits, '-') with the next address."""
        assert self._open, "add hosts inside `with Network() as net:`"
        assert _NAME.match(name), f"bad host name {name!r}"
        assert name not in self.hosts, f"host {name!r} exists"
        index = self._next_index
        assert index < 255, "a network holds at most 253 hosts"
        self._next_index += 1
        ns = f"{self.id}-{name}"
        port = f"p{index}"
        addr = f"{SUBNET_BASE}.{self.octet}.{index}"
        self._add_namespace(ns)
        self._ip("-n", self.switch, "link", "add", port, "type", "veth",
                 "peer", "name", "eth0", "netns", ns)
        self._ip("-n", self.switch, "link", "set", port, "master", "br0", "up")
        # IPv4 only: no link-local IPv6 traffic that would slip past a cut
        _sysctl(ns, "net.ipv6.conf.eth0.disable_ipv6=1")
        self._ip("-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
        self._ip("-n", ns, "link", "set", "eth0", "up")
        host = Host(self, name, ns, addr, port)
        self.hosts[name] = host
        return host

    def _add_namespace(self, ns: str) -> None:
        self._ip("netns", "add", ns)
        self.namespaces.append(ns)
        self._ip("-n", ns, "link", "set", "lo", "up")

    @staticmethod
    def _ip(*args: str) -> None:
        _cmd("ip", *args)

    # -- faults --------------------------------------------------------------------------

    def cut(self, a: str, b: str) -> None:
        """Drop IP packets between addresses ``a`` and ``b``, both ways."""
        self.cuts.add((min(a, b), max(a, b)))
        self._apply_faults()

    def restore(self, a: str, b: str) -> None:
        self.cuts.discard((min(a, b), max(a, b)))
        self._apply_faults()

    def port_down(self, port: str) -> None:
        """Drop every frame in or out of the switch port ``port``."""
        self.down.add(port)
        self._apply_faults()

    def port_up(self, port: str) -> None:
        self.down.discard(port)
        self._apply_faults()

    def fault_rules(self) -> list[str]:
        """The nftables rules in force in the switch (for failure messages)."""
        rules = [f'iifname "{p}" drop' for p in sorted(self.down)]
        rules += [f'oifname "{p}" drop' for p in sorted(self.down)]
        for a, b in sorted(self.cuts):
            rules += [f"ip saddr {a} ip daddr {b} drop", f"ip saddr {b} ip daddr {a} drop"]
        return rules

    def _apply_faults(self) -> None:
        assert self._open, "the network is closed"
        if shutil.which("nft") is None:
            pytest.skip("nft is not installed (scripts/setup installs nftables)")
        body = "".join(f"    {r}\n" for r in self.fault_rules())
        # one transaction: (re)create the table with exactly the rules in force
        script = (f"table bridge {_TABLE} {{}}\n"
                  f"delete table bridge {_TABLE}\n"
                  f"table bridge {_TABLE} {{\n"
                  f"  chain forward {{\n"
                  f"    type filter hook forward priority 0; policy accept;\n"
                  f"{body}"
                  f"  }}\n"
                  f"}}\n")
        _cmd("ip", "netns", "exec", self.switch, "nft", "-f", "-", input=script)


@pytest.fixture
def network() -> Iterator[Network]:
    """A :class:`Network` for one test (skips when namespaces are not available)."""
    netns_available()
    with Network() as net:
        yield net
