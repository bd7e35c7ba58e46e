"""``ddsnap send`` and ``ddsnap receive`` as a user runs them (issue 13): real stores and
origin files, writes made with qemu-io through a served origin, streams through a pipe
between two processes, snapshots read back with nbdcopy from a served receiving store.

Faults: a stream cut at seeded random points, then resumed with ``send --resume`` (and
with the whole stream again); a byte flipped in a stream; a receive killed with
``kill -9`` part way and resumed.  Bad input: a full stream into a store with snapshots,
an incremental one into a store without its base or whose origin moved on, a second
receive while one is in progress, a wrong token, not a stream, a served store, a base
newer than the snapshot.
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import signal
import struct
import subprocess
import termios
from pathlib import Path

import pytest

from ddsnap.stream import make_token, parse_token
from served import (
    DDSNAP,
    Served,
    ddsnap_env,
    fails,
    make_origin,
    ok,
    ok_json,
    read_export,
    tool,
    wait_until,
)

pytestmark = pytest.mark.clients

CS = 65536
MiB = 1 << 20


def write(srv: Served, export: str, pattern: int, offset: int, length: int) -> None:
    tool("qemu-io", "-f", "raw", "-c", f"write -P {pattern} {offset} {length}",
         srv.uri(export))


def new_store(tmp_path: Path, name: str, size: int, data: bool = True) -> Path:
    """A store over a new origin file of ``size`` bytes (random data, or a sparse empty
    file of one chunk that receive resizes)."""
    origin = tmp_path / f"{name}.origin"
    if data:
        make_origin(origin, size, seed=len(name))
    else:
        origin.write_bytes(b"")
        os.truncate(origin, CS)
    store = tmp_path / f"{name}.img"
    ok("init", store, "--origin", origin, "--size", "256M")
    return store


def pipe(send_args: list, receive_args: list, cut: int | None = None
         ) -> tuple[subprocess.CompletedProcess, subprocess.CompletedProcess]:
    """``ddsnap send ... | ddsnap receive ...``: two processes joined by a pipe (with
    ``head -c CUT`` between them when ``cut`` is given: a stream cut short)."""
    env = ddsnap_env()
    snd = subprocess.Popen([*DDSNAP, "send", *map(str, send_args)], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, env=env)
    assert snd.stdout is not None
    feed = snd.stdout
    mid = None
    if cut is not None:
        mid = subprocess.Popen(["head", "-c", str(cut)], stdin=feed, stdout=subprocess.PIPE)
        feed.close()
        assert mid.stdout is not None
        feed = mid.stdout
    rcv = subprocess.Popen([*DDSNAP, "receive", *map(str, receive_args)], stdin=feed,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    feed.close()  # (the processes hold their ends)
    r_out, r_err = rcv.communicate(timeout=300)
    _s_out, s_err = snd.communicate(timeout=300)
    if mid is not None:
        mid.wait(timeout=60)
    return (subprocess.CompletedProcess(snd.args, snd.returncode, b"", s_err.decode()),
            subprocess.CompletedProcess(rcv.args, rcv.returncode, r_out.decode(),
                                        r_err.decode()))


@pytest.fixture
def source(tmp_path):
    """A source store (4 MiB + 1000 bytes of origin) with s1; qemu-io writes to the
    origin; s2 (read-only); more writes; s3; and the bytes of each snapshot, read with
    nbdcopy."""
    size = 4 * MiB + 1000
    store = new_store(tmp_path, "a", size)
    snaps = {}
    with Served(store, workers=0) as srv:
        ok("snap", "create", store, "s1", "--read-only")
        write(srv, "origin", 7, 3 * CS + 100, CS)
        write(srv, "origin", 0, 8 * CS, 4 * CS)  # whole chunks of zeroes
        write(srv, "origin", 8, size - 500, 500)
        ok("snap", "create", store, "s2", "--read-only")
        write(srv, "origin", 9, 15 * CS, 4096)
        ok("snap", "create", store, "s3", "--read-only")
        for s in ("s1", "s2", "s3"):
            snaps[s] = read_export(srv, s, tmp_path / f"{s}.want")
    assert snaps["s1"] != snaps["s2"] != snaps["s3"]
    return store, snaps


def received(tmp_path: Path, store: Path, names) -> dict[str, bytes]:
    with Served(store, workers=0) as srv:
        return {n: read_export(srv, n, tmp_path / f"{n}.got") for n in [*names, "origin"]}


def test_full_then_incremental_sends_through_a_pipe_reproduce_every_snapshot(
        tmp_path, source):
    store, snaps = source
    dst = new_store(tmp_path, "b", CS, data=False)
    s, r = pipe([store, "s1", "--json"], [dst, "--json"])
    assert s.returncode == 0 and r.returncode == 0, (s.stderr, r.stderr)
    full = json.loads(s.stderr)
    assert full["base"] is None and full["data_bytes"] + full["zero_bytes"] == len(snaps["s1"])
    assert json.loads(r.stdout)["snapshot"] == "s1"
    s, r = pipe([store, "s2", "--from", "s1", "--json"], [dst, "--json"])
    assert s.returncode == 0 and r.returncode == 0, (s.stderr, r.stderr)
    inc = json.loads(s.stderr)
    # only the changed chunks: 3-4, 8-11 (as one ZERO record) and the last one
    assert inc["data_bytes"] == 2 * CS + (len(snaps["s2"]) - 64 * CS)
    assert inc["zero_bytes"] == 4 * CS and inc["records"] == 3
    ok("send", store, "s3", "--from", "s2", "-o", tmp_path / "s3.stream")
    summary = json.loads(ok("receive", dst, "-i", tmp_path / "s3.stream", "--json").stdout)
    assert summary["applied_bytes"] == CS
    got = received(tmp_path, dst, ["s1", "s2", "s3"])
    for n in ("s1", "s2", "s3"):
        assert got[n] == snaps[n], n
    assert got["origin"] == snaps["s3"]
    listed = {s["name"]: s["read_only"] for s in ok_json("snap", "list", dst)}
    assert listed == {"s1": True, "s2": True, "s3": True}
    st = ok_json("status", dst)
    assert st["receive"] is None and st["origin_size"] == len(snaps["s1"])
    assert ok_json("check", dst)["clean"]


def _token(store) -> str:
    st = ok_json("status", store)
    assert st["receive"] is not None, st
    return st["receive"]["token"]


def test_a_cut_stream_is_resumed_from_where_it_stopped(tmp_path, source):
    store, snaps = source
    dst = new_store(tmp_path, "b", CS, data=False)
    ok("send", store, "s1", "-o", tmp_path / "full.stream")
    whole = (tmp_path / "full.stream").read_bytes()
    rng = random.Random(13)
    # the first receive is cut inside the data; each resume is cut again further on
    cuts = sorted(rng.sample(range(100, len(whole) - 100), 3))
    s, r = pipe([store, "s1"], [dst], cut=cuts[0])
    assert r.returncode == 32 and "cut short" in r.stderr, r.stderr
    st = ok_json("status", dst)["receive"]
    assert st["snapshot"] == "s1" and st["size"] == len(snaps["s1"])
    for cut in cuts[1:]:
        token = _token(dst)
        (tmp_path / "cut.stream").write_bytes(whole[:cut])
        fails(32, "receive", dst, "-i", tmp_path / "cut.stream", "--resume", token,
              match="cut short")
    token = _token(dst)
    applied = ok_json("status", dst)["receive"]["applied"]
    assert applied > 0  # (the cuts are past the first records)
    s, r = pipe([store, "s1", "--resume", token], [dst, "--resume", token, "--json"])
    assert s.returncode == 0 and r.returncode == 0, (s.stderr, r.stderr)
    summary = json.loads(r.stdout)
    assert summary["resumed_at"] == applied
    assert summary["applied_bytes"] <= len(snaps["s1"]) - applied + CS
    assert received(tmp_path, dst, ["s1"])["s1"] == snaps["s1"]
    assert ok_json("status", dst)["receive"] is None


def test_a_flipped_byte_is_refused_at_its_record_and_the_receive_resumes(tmp_path, source):
    store, snaps = source
    dst = new_store(tmp_path, "b", CS, data=False)
    ok("send", store, "s1", "-o", tmp_path / "s1.stream")
    ok("receive", dst, "-i", tmp_path / "s1.stream")
    ok("send", store, "s2", "--from", "s1", "-o", tmp_path / "s2.stream")
    good = (tmp_path / "s2.stream").read_bytes()
    bad = bytearray(good)
    bad[len(good) // 2] ^= 0x01  # inside the DATA of chunks 3-4
    (tmp_path / "bad.stream").write_bytes(bad)
    line = fails(32, "receive", dst, "-i", tmp_path / "bad.stream",
                 match=r"record \d+ at stream byte \d+: crc32c mismatch")
    assert "DATA" in line
    token = _token(dst)
    # a new stream is refused while this receive is in progress, naming the token
    fails(33, "receive", dst, "-i", tmp_path / "s2.stream", match=f"--resume {token}")
    fails(2, "receive", dst, "-i", tmp_path / "s2.stream", "--resume",
          token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB"), match="mistyped")
    source, sid, bid, off = parse_token(token)
    fails(33, "receive", dst, "-i", tmp_path / "s2.stream", "--resume",
          make_token(source, sid + 1, bid, off), match="not the receive in progress")
    ok("receive", dst, "-i", tmp_path / "s2.stream", "--resume", token)
    got = received(tmp_path, dst, ["s1", "s2"])
    assert got["s1"] == snaps["s1"] and got["s2"] == snaps["s2"]


def test_a_damaged_header_changes_nothing(tmp_path, source):
    store, _snaps = source
    dst = new_store(tmp_path, "b", CS, data=False)
    before = (tmp_path / "b.origin").read_bytes()
    (tmp_path / "junk").write_bytes(b"this is not a stream at all" * 100)
    fails(32, "receive", dst, "-i", tmp_path / "junk", match="not a ddsnap stream")
    ok("send", store, "s1", "-o", tmp_path / "s1.stream")
    bad = bytearray((tmp_path / "s1.stream").read_bytes())
    bad[30] ^= 0xFF  # inside BEGIN's header
    (tmp_path / "bad.stream").write_bytes(bad)
    fails(32, "receive", dst, "-i", tmp_path / "bad.stream", match="record 0")
    assert ok_json("status", dst)["receive"] is None
    assert (tmp_path / "b.origin").read_bytes() == before


def _pipe_fill(fd: int) -> int:
    """Bytes waiting in the pipe whose end ``fd`` is (FIONREAD works on either end)."""
    buf = fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0")
    return struct.unpack("i", buf)[0]


def test_a_receive_killed_part_way_resumes(tmp_path):
    """Feed a receive 80 MiB of a 96 MiB stream, wait until it has read it all (so it
    has recorded its progress at 64 MiB), ``kill -9`` it, and resume."""
    size = 96 * MiB
    src = new_store(tmp_path, "a", size)
    ok("snap", "create", src, "s1", "--read-only")
    ok("send", src, "s1", "-o", tmp_path / "s1.stream")
    want = (tmp_path / "a.origin").read_bytes()
    dst = new_store(tmp_path, "b", CS, data=False)
    stream = (tmp_path / "s1.stream").read_bytes()
    rcv = subprocess.Popen([*DDSNAP, "receive", str(dst)], stdin=subprocess.PIPE,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           env=ddsnap_env())
    assert rcv.stdin is not None
    fd = rcv.stdin.fileno()
    os.write(fd, b"")  # (the pipe exists)
    view = memoryview(stream)[:80 * MiB]
    while view:
        n = os.write(fd, view[:1 << 20])
        view = view[n:]
    wait_until(lambda: _pipe_fill(fd) == 0, "the receive to read what it was given")
    rcv.send_signal(signal.SIGKILL)
    rcv.wait(timeout=60)
    rcv.stdin.close()
    assert rcv.returncode == -signal.SIGKILL
    st = ok_json("status", dst)["receive"]
    assert st["applied"] >= 64 * MiB, st
    token = st["token"]
    s, r = pipe([src, "s1", "--resume", token], [dst, "--resume", token, "--json"])
    assert s.returncode == 0 and r.returncode == 0, (s.stderr, r.stderr)
    summary = json.loads(r.stdout)
    assert summary["resumed_at"] == st["applied"]
    assert summary["applied_bytes"] <= size - st["applied"]
    assert (tmp_path / "b.origin").read_bytes() == want
    assert ok_json("check", dst)["clean"]


def test_streams_that_do_not_apply_are_refused_and_change_nothing(tmp_path, source):
    store, snaps = source
    dst = new_store(tmp_path, "b", CS, data=False)
    ok("send", store, "s1", "-o", tmp_path / "s1.stream")
    ok("send", store, "s2", "--from", "s1", "-o", tmp_path / "s2.stream")
    ok("send", store, "s3", "--from", "s2", "-o", tmp_path / "s3.stream")
    # an incremental stream into a store that never received its base
    fails(33, "receive", dst, "-i", tmp_path / "s2.stream", match="does not hold")
    ok("receive", dst, "-i", tmp_path / "s1.stream")
    # a full stream into a store with snapshots; the same snapshot again
    fails(33, "receive", dst, "-i", tmp_path / "s1.stream", match="already has")
    other = new_store(tmp_path, "c", 4 * MiB + 1000)
    ok("snap", "create", other, "x")
    ok("send", other, "x", "-o", tmp_path / "x.stream")
    fails(33, "receive", dst, "-i", tmp_path / "x.stream", match="no snapshots")
    # a stream whose base is not the last one received
    fails(33, "receive", dst, "-i", tmp_path / "s3.stream", match="does not hold")
    # the origin written since s1 was received
    with Served(dst, workers=0) as srv:
        write(srv, "origin", 3, 0, 4096)
    fails(33, "receive", dst, "-i", tmp_path / "s2.stream", match="written since")
    assert ok_json("status", dst)["receive"] is None
    # ... being rolled back; rolled back: it applies
    ok("merge", dst, "s1", "--keep")
    fails(33, "receive", dst, "-i", tmp_path / "s2.stream", match="merge .* in progress")
    ok("merge", dst, "s1", "--keep", "--wait")
    ok("receive", dst, "-i", tmp_path / "s2.stream")
    assert received(tmp_path, dst, ["s2"])["s2"] == snaps["s2"]


def test_abort_rolls_an_incremental_receive_back_to_its_base(tmp_path, source):
    store, snaps = source
    dst = new_store(tmp_path, "b", CS, data=False)
    ok("send", store, "s1", "-o", tmp_path / "s1.stream")
    ok("receive", dst, "-i", tmp_path / "s1.stream")
    ok("send", store, "s3", "--from", "s1", "-o", tmp_path / "s3.stream")
    whole = (tmp_path / "s3.stream").read_bytes()
    (tmp_path / "cut.stream").write_bytes(whole[:len(whole) - 200])
    fails(32, "receive", dst, "-i", tmp_path / "cut.stream")
    fails(2, "receive", dst, "--abort", "-i", tmp_path / "cut.stream")
    done = json.loads(ok("receive", dst, "--abort", "--json").stdout)
    assert done == {"aborted": "s3", "rolled_back_to": "s1"}
    assert ok_json("status", dst)["receive"] is None
    fails(33, "receive", dst, "--abort", match="no receive in progress")
    got = received(tmp_path, dst, ["s1"])
    assert got["origin"] == snaps["s1"]
    ok("receive", dst, "-i", tmp_path / "s3.stream")
    assert received(tmp_path, dst, ["s3"])["s3"] == snaps["s3"]


def test_bad_send_arguments(tmp_path, source):
    store, _ = source
    fails(8, "send", store, "nope", "-o", tmp_path / "x")
    fails(8, "send", store, "s2", "--from", "nope", "-o", tmp_path / "x")
    fails(2, "send", store, "s1", "--from", "s2", "-o", tmp_path / "x", match="before")
    fails(2, "send", store, "s1", "--resume", "garbage", "-o", tmp_path / "x",
          match="not a resume token")
    fails(3, "send", tmp_path / "missing.img", "s1", "-o", tmp_path / "x")
    with Served(store, workers=0):
        fails(9, "send", store, "s1", "-o", tmp_path / "x", match="stop its server")


def test_an_incremental_stream_grows_the_origin_with_the_volume(tmp_path):
    """The origin grew between s1 and s2: the incremental stream carries everything
    past s1's end, and receive grows its origin to s2's size first."""
    store = new_store(tmp_path, "a", 4 * MiB)
    ok("snap", "create", store, "s1", "--read-only")
    ok("resize", store, "--origin-size", "8M")
    with Served(store, workers=0) as srv:
        write(srv, "origin", 5, 6 * MiB, CS)
        write(srv, "origin", 6, CS, 4096)
        ok("snap", "create", store, "s2", "--read-only")
        want = {s: read_export(srv, s, tmp_path / f"{s}.want") for s in ("s1", "s2")}
    dst = new_store(tmp_path, "b", CS, data=False)
    ok("send", store, "s1", "-o", tmp_path / "s1.stream")
    ok("receive", dst, "-i", tmp_path / "s1.stream")
    s, r = pipe([store, "s2", "--from", "s1", "--json"], [dst])
    assert s.returncode == 0 and r.returncode == 0, (s.stderr, r.stderr)
    # chunk 1 changed, and the 4 MiB past s1's end (zeroes but for the write at 6 MiB)
    summary = json.loads(s.stderr)
    assert summary["data_bytes"] == 2 * CS and summary["zero_bytes"] == 4 * MiB - CS
    assert ok_json("status", dst)["origin_size"] == 8 * MiB
    got = received(tmp_path, dst, ["s1", "s2"])
    assert got["s1"] == want["s1"] and got["s2"] == want["s2"] == got["origin"]
