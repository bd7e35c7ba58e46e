"""The multi-host test infrastructure itself: hosts as network namespaces (tests/hosts.py)
and a real etcd (tests/etcd_server.py).

Nothing here sends a packet outside the networks it makes: reachability from the root
namespace is checked on its routing table and addresses (``ip route get`` sends nothing),
never by connecting, since the root namespace's default route leads off the machine.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from pathlib import Path

import aetcd
import pytest

from etcd_server import EtcdServer
from hosts import PREFIX, Host, Network, list_namespaces, netns_available
from served import DEADLINE, is_root, wait_until


def needs_root(test):
    """Network namespaces need root (the ``network`` fixture skips without it, too)."""
    skip = pytest.mark.skipif(not is_root(), reason="network namespaces need root")
    return pytest.mark.root(skip(test))


PORT = 7000
#: how long a client in a host tries to connect before it reports a failure: a deadline
#: for a connection that hangs (dropped packets), not a timing assertion
CONNECT_TIMEOUT = 2.0

#: A TCP server: accepts connections on ADDR PORT until killed and answers each with the
#: address the connection came from.
SERVER = r"""
import socket, sys
srv = socket.create_server((sys.argv[1], int(sys.argv[2])))
print("listening", flush=True)
while True:
    conn, peer = srv.accept()
    with conn:
        conn.sendall(peer[0].encode() + b"\n")
"""

#: Connects to ADDR PORT within TIMEOUT seconds; prints what the server answered, or the
#: error.  Exit 0 when connected.
CLIENT = r"""
import socket, sys
try:
    with socket.create_connection((sys.argv[1], int(sys.argv[2])),
                                  timeout=float(sys.argv[3])) as s:
        print("answer", s.makefile().readline().strip())
except OSError as e:
    print("failed", type(e).__name__, e)
    sys.exit(1)
"""


def serve(host: Host, port: int = PORT) -> subprocess.Popen:
    """Start :data:`SERVER` in ``host`` and wait until it listens."""
    proc = host.popen(sys.executable, "-c", SERVER, host.addr, port,
                      stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.strip() == "listening", f"server in {host} did not start: {line!r}"
    return proc


def connect(src: Host, dst: Host, port: int = PORT) -> str | None:
    """From ``src``, connect to ``dst``'s server: the address the server saw, or None
    when the connection failed."""
    p = src.run(sys.executable, "-c", CLIENT, dst.addr, port, CONNECT_TIMEOUT)
    m = re.fullmatch(r"answer (\S+)\n", p.stdout)
    if p.returncode == 0 and m:
        return m.group(1)
    assert p.stdout.startswith("failed"), f"client in {src}: {p.stdout}{p.stderr}"
    return None


def root_view() -> tuple[str, str, str]:
    """The root namespace's links, addresses and routes."""
    def ip(*args: str) -> str:
        return subprocess.run(["ip", *args], capture_output=True, text=True,
                              check=True).stdout
    links = re.sub(r"\s+link/.*", "", ip("-o", "link", "show"))  # drop the counters
    return links, ip("-o", "addr", "show"), ip("route", "show", "table", "all")


# --- hosts ----------------------------------------------------------------------------


@needs_root
def test_two_hosts_reach_each_other(network: Network):
    a, b = network.add_host("a"), network.add_host("b")
    assert a.addr != b.addr
    assert a.addr.startswith("10.213.") and b.addr.startswith("10.213.")
    serve(b)
    assert connect(a, b) == a.addr
    serve(a)
    assert connect(b, a) == b.addr


@needs_root
def test_addresses_exist_only_inside_the_hosts(network: Network):
    before = root_view()
    a = network.add_host("a")
    b = network.add_host("b")
    assert root_view() == before, "the network changed the root namespace"
    addrs = before[1]
    for h in (a, b):
        assert f"inet {h.addr}/" not in addrs
        # asks the root's routing table, sends nothing: not an address of this namespace
        got = subprocess.run(["ip", "route", "get", h.addr], capture_output=True,
                             text=True).stdout
        assert not got.startswith("local"), got
    inside = a.run("ip", "-o", "addr", "show").stdout
    assert f"inet {a.addr}/24" in inside
    # a host has no route off its /24: nothing it sends can leave the network
    assert a.run("ip", "route", "show").stdout.split("\n")[0].startswith(network.subnet)
    assert "default" not in a.run("ip", "route", "show", "table", "all").stdout
    off = a.run("ip", "route", "get", "192.0.2.1")
    assert off.returncode != 0 and "unreachable" in off.stderr, off


@needs_root
def test_cut_from_blocks_one_peer_only_and_restore_to_heals(network: Network):
    a, b, c = (network.add_host(n) for n in "abc")
    for h in (a, b, c):
        serve(h)
    assert connect(a, b) == a.addr

    a.cut_from(b)
    assert connect(a, b) is None
    assert connect(b, a) is None
    assert connect(c, b) == c.addr
    assert connect(c, a) == c.addr
    assert connect(a, c) == a.addr

    a.restore_to(b)
    assert connect(a, b) == a.addr
    assert connect(b, a) == b.addr


@needs_root
def test_cut_drops_packets_rather_than_refusing_them(network: Network):
    """A cut behaves like a partition: the connection attempt gets no answer at all (it
    times out), where a closed port would be refused at once."""
    a, b = network.add_host("a"), network.add_host("b")
    refused = a.run(sys.executable, "-c", CLIENT, b.addr, PORT, CONNECT_TIMEOUT)
    assert "ConnectionRefusedError" in refused.stdout, refused.stdout
    a.cut_from(b.addr)
    dropped = a.run(sys.executable, "-c", CLIENT, b.addr, PORT, CONNECT_TIMEOUT)
    assert "TimeoutError" in dropped.stdout, dropped.stdout


@needs_root
def test_link_down_cuts_a_host_from_everyone(network: Network):
    a, b, c = (network.add_host(n) for n in "abc")
    for h in (a, b, c):
        serve(h)
    b.link_down()
    assert connect(a, b) is None
    assert connect(c, b) is None
    assert connect(b, a) is None
    assert connect(a, c) == a.addr
    b.link_up()
    assert connect(a, b) == a.addr
    assert connect(b, c) == b.addr


@needs_root
def test_exit_kills_processes_and_deletes_namespaces():
    netns_available()
    with pytest.raises(RuntimeError, match="the test failed"), Network() as net:
        a, b = net.add_host("a"), net.add_host("b")
        tracked = serve(a)
        # a daemon the network knows nothing of: started in the background by a shell
        p = b.run("sh", "-c", "sleep 1000 >/dev/null 2>&1 & echo $!")
        untracked = int(p.stdout)
        names = set(net.namespaces)
        assert names <= set(list_namespaces())
        assert untracked in pids_in(b.ns)
        raise RuntimeError("the test failed")
    assert not names & set(list_namespaces())
    assert tracked.poll() is not None
    assert not Path(f"/proc/{untracked}").exists() or zombie(untracked)


@needs_root
def test_leftovers_of_a_dead_run_are_removed():
    netns_available()
    dead = subprocess.Popen(["true"])
    dead.wait()
    ns = f"{PREFIX}{dead.pid}-1-leftover"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    sleeper = None
    try:
        sleeper = subprocess.Popen(["ip", "netns", "exec", ns, "sleep", "1000"],
                                   stdin=subprocess.DEVNULL)
        wait_until(lambda: sleeper.pid in pids_in(ns), f"sleep to run in {ns}")
        with Network():
            assert ns not in list_namespaces()
        assert sleeper.wait(DEADLINE) == -9
    finally:
        if sleeper is not None and sleeper.poll() is None:
            sleeper.kill()
            sleeper.wait()
        subprocess.run(["ip", "netns", "delete", ns], capture_output=True)


def pids_in(ns: str) -> list[int]:
    out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except FileNotFoundError:
        return True


# --- etcd -----------------------------------------------------------------------------


def test_local_etcd_serves_and_stops(etcd: EtcdServer):
    assert etcd.url == f"http://127.0.0.1:{etcd.port}"

    async def roundtrip() -> tuple[bytes, int]:
        async with aetcd.Client(etcd.addr, etcd.port, timeout=10) as client:
            await client.put(b"/t/k", b"v1")
            got = await client.get(b"/t/k")
            assert got is not None
            return got.value, got.create_revision

    value, revision = asyncio.run(roundtrip())
    assert value == b"v1" and revision > 0
    assert "v1" in etcd.etcdctl("get", "/t/k").stdout
    pid = etcd.pid
    etcd.stop()
    assert not etcd.running()
    assert not Path(f"/proc/{pid}").exists() or zombie(pid)


#: Run in a host: put KEY VALUE then get it through aetcd at ADDR PORT, with TIMEOUT per
#: call; prints the value, or the error's class.
ETCD_CLIENT = r"""
import asyncio, sys
import aetcd
async def main(addr, port, key, value, timeout):
    try:
        async with aetcd.Client(addr, port, timeout=timeout) as client:
            await client.put(key.encode(), value.encode())
            got = await client.get(key.encode())
            print("value", got.value.decode())
    except aetcd.ClientError as e:
        print("error", type(e).__name__)
        sys.exit(1)
asyncio.run(main(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], float(sys.argv[5])))
"""


@needs_root
def test_etcd_in_a_host_serves_other_hosts(network: Network, tmp_path: Path):
    eh, c1, c2 = network.add_host("etcd"), network.add_host("c1"), network.add_host("c2")

    def put_get(host: Host, value: str) -> str:
        p = host.run(sys.executable, "-c", ETCD_CLIENT, etcd.addr, etcd.port, "/t/k", value,
                     CONNECT_TIMEOUT)
        assert "Traceback" not in p.stderr, p.stderr
        return p.stdout.strip()

    with EtcdServer(tmp_path / "etcd", host=eh) as etcd:
        assert etcd.url == f"http://{eh.addr}:2379"
        assert put_get(c1, "one") == "value one"
        assert put_get(c2, "two") == "value two"
        assert "two" in etcd.etcdctl("get", "/t/k", via=c1).stdout

        c1.cut_from(eh)
        assert put_get(c1, "three") == "error ConnectionTimeoutError"
        assert put_get(c2, "four") == "value four"
        c1.restore_to(eh)
        assert put_get(c1, "five") == "value five"
        pid = etcd.pid
    assert not Path(f"/proc/{pid}").exists() or zombie(pid)
    assert os.path.isdir(tmp_path / "etcd" / "data")
