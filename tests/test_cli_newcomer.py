"""The command line as a newcomer meets it (issue 8, "Trust", item 7).

Real ``ddsnap`` processes and a real ``ddsnap serve``; a pseudo-terminal where the
behaviour depends on one (confirmation questions, progress bars).  Each point is checked
with its exit code and message:

1. snapshot names with control characters are refused, saying which character and where;
   names and paths are printed as they are, never as rich markup or emoji codes;
2. every command that talks to a server gives up after ``--timeout`` seconds (exit 15)
   instead of hanging on a stopped server;
3. ``init`` warns when the store is smaller than its origin, shows progress on a terminal,
   and names a missing directory;
4. a store that is too small is refused with the minimum size (the same rule as
   ``SharedStore.create``), and byte counts read as human sizes with the exact bytes;
5. ``merge --status`` counts the whole merge across ``--stop`` and resume, says what it
   counts after a restart, and shows a paused merge as paused (no rate, no ETA);
6. ``-h`` is ``--help`` everywhere; sizes and choices show as such in the help;
7. ``snap delete`` and ``init --force`` ask on a terminal (``-y`` skips it; scripts are
   never asked).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path

import pytest
from humanfriendly import format_size

import served
from ddsnap.errors import InvalidArgument
from ddsnap.store.blockdev import MemoryDevice
from ddsnap.store.shared import SharedStore
from ddsnap.store.superblock import min_store_size
from served import (
    DDSNAP,
    DEADLINE,
    KiB,
    MiB,
    Served,
    ddsnap_env,
    fails,
    make_origin,
    merge_status,
    ok,
    ok_json,
    tool,
    wait_merge_done,
    wait_until,
)

ORIGIN_SIZE = 16 * MiB


class Env:
    """An origin of random data and a store for it in ``tmp_path``."""

    def __init__(self, tmp_path: Path, *init_args: str, store_name: str = "store.img"):
        self.dir = tmp_path
        self.origin = tmp_path / "origin.img"
        self.store = tmp_path / store_name
        make_origin(self.origin, ORIGIN_SIZE)
        ok("init", self.store, "--origin", self.origin, "--size", "32M", *init_args)

    def names(self) -> list[str]:
        return [s["name"] for s in ok_json("snap", "list", self.store)]


@pytest.fixture
def env(tmp_path):
    return Env(tmp_path)


def on_a_terminal(*args, answer: str | None = None) -> tuple[int, str]:
    """``ddsnap ARGS`` wholly on a terminal (:func:`served.on_a_terminal`): (exit status,
    what the terminal showed)."""
    rc, _out, text = served.on_a_terminal(*args, answer=answer)
    return rc, text


# --- 1. snapshot names -----------------------------------------------------------------------


BAD_NAMES = [
    ("\x1b[31mred", "U+001B", 1),       # a terminal escape sequence
    ("two\nlines", "U+000A", 4),        # a newline
    ("tab\tbed", "U+0009", 4),
    ("bell\x07", "U+0007", 5),
    ("del\x7f", "U+007F", 4),
    ("nel\x85x", "U+0085", 4),          # C1: next line
    ("csi\x9b2J", "U+009B", 4),         # C1: the one-byte CSI
    ("line\u2028sep", "U+2028", 5),     # Unicode line separator
]


@pytest.mark.parametrize("served", [False, True], ids=["local", "served"])
def test_control_characters_in_names_are_refused(env, served):
    ok("snap", "create", env.store, "fine")
    srv = Served(env.store).start() if served else None
    try:
        for name, code, pos in BAD_NAMES:
            fails(2, "snap", "create", env.store, name,
                  match=rf"^ddsnap: snapshot name contains a control character {re.escape(code)} "
                        rf"at position {pos}$")
        # not UTF-8 at all (a byte that is no character): refused, no traceback
        p = subprocess.run([*map(os.fsencode, DDSNAP), b"snap", b"create",
                            os.fsencode(env.store), b"caf\xe9"],
                           capture_output=True, env=ddsnap_env(), timeout=DEADLINE)
        assert p.returncode == 2, p
        assert p.stderr.decode() == \
            "ddsnap: snapshot name is not valid UTF-8 (at position 4)\n", p.stderr
        assert env.names() == ["fine"]
    finally:
        if srv is not None:
            srv.stop()
    assert ok_json("check", env.store)["clean"]


MARKUP_NAMES = ["[red]x", "[bold]b[not]", ":smile:", "[link=x]y", "back\\slash["]


@pytest.mark.parametrize("served", [False, True], ids=["local", "served"])
def test_names_are_printed_as_they_are(tmp_path, served):
    """Never rich markup or emoji codes: in snap create, snap list, status, snap delete,
    and for paths (a store named with brackets)."""
    (tmp_path / "[red]dir").mkdir()
    origin = tmp_path / "origin.img"
    make_origin(origin, ORIGIN_SIZE)
    store = tmp_path / "[red]dir" / ":smile:[b]store.img"
    p = ok("init", store, "--origin", origin, "--size", "32M")
    assert p.stdout.startswith(f"created snapshot store {store} for origin {origin} "), p.stdout
    srv = Served(store, sock=tmp_path / "s.nbd", control=tmp_path / "s.ctl").start() \
        if served else None
    try:
        for i, name in enumerate(MARKUP_NAMES, 1):
            out = ok("snap", "create", store, name).stdout
            assert re.match(rf"created snapshot {re.escape(name)} \(id {i}\) at ", out), out
        assert [s["name"] for s in ok_json("snap", "list", store)] == MARKUP_NAMES
        table = ok("snap", "list", store).stdout.splitlines()
        assert table[0].split() == ["name", "id", "parent", "created", "read-only",
                                    "exclusive", "shared"]
        assert [line.split()[0] for line in table[1:]] == MARKUP_NAMES, table
        text = ok("status", store).stdout
        assert re.search(rf"^\s+store: {re.escape(str(store))} \(32 MiB\)$", text, re.M), text
        for i, name in enumerate(MARKUP_NAMES, 1):
            assert re.search(rf"^\s+{re.escape(name)} \(id {i}, ", text, re.M), text
        for name in MARKUP_NAMES:
            assert ok("snap", "delete", store, name).stdout == f"deleted snapshot {name}\n"
        fails(8, "snap", "delete", store, "[red]x", match=r"no such snapshot: \[red\]x$")
        assert ok_json("snap", "list", store) == []
    finally:
        if srv is not None:
            srv.stop()


# --- 2. a server that does not answer ----------------------------------------------------


def test_every_command_times_out_on_a_stopped_server(env):
    ok("snap", "create", env.store, "a")
    ok("snap", "create", env.store, "b")
    S = env.store
    commands = [["status", S], ["status", S, "--json"], ["check", S], ["snap", "list", S],
                ["snap", "create", S, "x"], ["snap", "delete", S, "b"],
                ["set", S, "full-policy=error"], ["merge", S, "--status"],
                ["merge", S, "--stop"], ["merge", S, "a"], ["merge", S, "a", "--wait"]]
    with Served(env.store) as srv:
        pids = srv.pids()  # (with workers: the metadata server answers the commands)
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        try:
            for cmd in commands:
                # the bounded wait: DEADLINE, against a 0.5 s timeout
                fails(15, "--timeout", "0.5", *cmd, timeout=DEADLINE,
                      match=rf"the ddsnap server at {re.escape(str(srv.ctl))} did not "
                            r"answer in 0\.5 s")
        finally:
            for pid in pids:
                os.kill(pid, signal.SIGCONT)
        # it answers again (and may carry out what it was asked meanwhile, as it says)
        assert ok_json("status", env.store)["served"] is True


def test_timeout_option(env):
    for bad in ("-1", "soon", "nan", "inf"):
        fails(2, "--timeout", bad, "status", env.store,
              match=rf"--timeout '{bad}' is not a number of seconds")
    assert ok("--timeout", "0", "status", env.store).stdout  # 0: no limit
    with Served(env.store):
        assert ok_json("--timeout", "5", "status", env.store)["served"] is True
    text = ok("--help").stdout
    assert re.search(r"--timeout SECONDS\s+How long a command waits for the server", text)
    assert "[default: 30]" in text


# --- 3. init ---------------------------------------------------------------------------------


def test_init_warns_when_the_store_is_smaller_than_the_origin(tmp_path):
    origin = tmp_path / "origin.img"
    make_origin(origin, ORIGIN_SIZE)
    p = ok("init", tmp_path / "small.img", "--origin", origin, "--size", "8M")
    assert p.stderr == ("ddsnap: warning: the store is smaller than its origin: 8 MiB "
                        "(8388608 bytes) against 16 MiB (16777216 bytes); it can fill up "
                        "before every origin chunk has been copied out once, and then writes "
                        "fail (or, with --full-policy delete-oldest, the oldest snapshots "
                        "are deleted)\n"), p.stderr
    assert p.stdout.startswith("created snapshot store ")
    assert ok_json("status", tmp_path / "small.img")["store_size"] == 8 * MiB
    # as big as the origin (the default) or bigger: no warning
    for name, size in (("same.img", []), ("big.img", ["--size", "32M"])):
        p = ok("init", tmp_path / name, "--origin", origin, *size)
        assert p.stderr == "", p.stderr


def test_init_names_the_missing_directory(tmp_path):
    origin = tmp_path / "origin.img"
    make_origin(origin, ORIGIN_SIZE)
    missing = tmp_path / "no" / "such"
    fails(3, "init", missing / "store.img", "--origin", origin,
          match=rf"^ddsnap: directory {re.escape(str(missing))} does not exist$")
    assert not (tmp_path / "no").exists()
    # relative paths too: the directory is named as an absolute path
    fails(3, "init", "nodir/store.img", "--origin", origin,
          match=rf"directory {re.escape(os.path.abspath('nodir'))} does not exist")
    # a file where the directory should be
    fails(2, "init", origin / "store.img", "--origin", origin,
          match=rf"{re.escape(str(origin))} is not a directory")


def test_init_shows_progress_only_on_a_terminal(tmp_path):
    """A 64 GiB store (sparse) has 512 bitmap blocks to write: a progress bar on a
    terminal, nothing on a pipe."""
    origin = tmp_path / "origin.img"
    make_origin(origin, ORIGIN_SIZE)
    rc, text = on_a_terminal("init", tmp_path / "tty.img", "--origin", origin,
                             "--size", "64G")
    assert rc == 0, text
    assert re.search(r"writing metadata .* (\d+)/\1 blocks", text), text
    assert "created snapshot store" in text and "Traceback" not in text
    p = ok("init", tmp_path / "pipe.img", "--origin", origin, "--size", "64G")
    assert p.stderr == "", "a progress bar on a pipe"
    assert ok_json("check", tmp_path / "tty.img")["clean"]


# --- 4. sizes in messages ----------------------------------------------------------------------


@pytest.mark.parametrize("chunk, snaps", [(4 * KiB, 0), (64 * KiB, 64), (64 * KiB, 1024),
                                          (1 * MiB, 0)])
def test_a_store_too_small_is_refused_with_the_minimum(tmp_path, chunk, snaps):
    origin = tmp_path / "origin.img"
    make_origin(origin, 1 * MiB)
    need = min_store_size(chunk, snaps)
    human = format_size(need, binary=True)
    chunk_text = format_size(chunk, binary=True)
    store = tmp_path / "store.img"
    args = ["--origin", origin, "--chunk-size", str(chunk), "--max-snapshots", str(snaps)]
    for size in (need - 1, need - chunk, 16 * KiB):
        fails(2, "init", store, *args, "--size", str(size),
              match=rf"^ddsnap: store too small: at least {re.escape(human)} \({need} bytes\) "
                    rf"for {re.escape(chunk_text)} chunks; "
                    rf"{re.escape(str(store))} has .* \({size} bytes\)$")
        assert not store.exists(), "a refused init left the store file behind"
    ok("init", store, *args, "--size", str(need))
    st = ok_json("status", store)
    assert st["store_size"] == need and st["chunks_total"] >= 1


def test_min_store_size_is_the_rule_of_create():
    """Every size around the minimum, for every kind of geometry: ``create`` accepts
    exactly the sizes from :func:`min_store_size` up."""
    for chunk in (4 * KiB, 16 * KiB, 64 * KiB, 256 * KiB, 1 * MiB):
        for snaps in (64, 128, 512, 1024):
            for journal in (None, 1, 64):
                need = min_store_size(chunk, snaps, journal)
                assert need % chunk == 0
                for size in (need - chunk, need - 1, need, need + 1, need + chunk,
                             need + 7 * chunk):
                    try:
                        SharedStore.create(MemoryDevice(size), 1 << 20, "", chunk, snaps,
                                           journal)
                        accepted = True
                    except InvalidArgument as e:
                        accepted = False
                        assert f"at least {format_size(need, binary=True)} ({need} bytes)" \
                            in str(e), str(e)
                    assert accepted == (size >= need), (chunk, snaps, journal, size, need)


def test_byte_counts_in_messages_are_human_with_the_bytes(tmp_path):
    origin = tmp_path / "origin.img"
    make_origin(origin, ORIGIN_SIZE)
    fails(2, "init", tmp_path / "s.img", "--origin", origin, "--chunk-size", "3K",
          match=r"--chunk-size 3 KiB \(3072 bytes\) is not a power of two from 4 KiB to "
                r"1 MiB$")
    fails(2, "init", tmp_path / "s.img", "--origin", origin, "--chunk-size", "2M",
          match=r"--chunk-size 2 MiB \(2097152 bytes\) is not a power of two")
    fails(2, "init", tmp_path / "s.img", "--origin", origin, "--chunk-size", "100",
          match=r"--chunk-size 100 bytes is not a power of two")


# --- 5. merge --status ------------------------------------------------------------------------


class MergeVol:
    """Snapshot ``a`` of a 16 MiB origin (4 KiB chunks), then the first 2 MiB of the
    origin rewritten through NBD: ``a`` holds 512 exceptions.  Merge steps of one chunk
    (``DDSNAP_MERGE_STEP``) make its merge long enough to stop and resume."""

    CHUNKS = 512

    def __init__(self, tmp_path: Path):
        self.store = tmp_path / "store.img"
        self.origin = tmp_path / "origin.img"
        make_origin(self.origin, ORIGIN_SIZE)
        ok("init", self.store, "--origin", self.origin, "--size", "64M", "--chunk-size", "4K")
        ok("snap", "create", self.store, "a")
        with Served(self.store) as srv:
            tool("qemu-io", "-f", "raw", "-c", f"write -P 0x5a 0 {2 * MiB}", srv.uri("origin"))
        ok("snap", "create", self.store, "b")


@pytest.fixture
def mvol(tmp_path, monkeypatch):
    monkeypatch.setenv("DDSNAP_MERGE_STEP", "4K")
    return MergeVol(tmp_path)


def stop_soon(srv: Served) -> dict:
    """Start merging ``a`` and stop it once it has made some progress (control socket by
    hand: the merge takes seconds, the stop milliseconds)."""
    srv.control("merge_start", name="a", keep=False)
    wait_until(lambda: srv.control("merge_status")["chunks_done"] > 0,
               "the merge to make progress", interval=0.005)
    st = srv.control("merge_stop")
    assert 0 < st["chunks_done"] < st["chunks_total"], f"the merge finished too soon: {st}"
    return st


@pytest.mark.clients
def test_a_paused_merge_shows_paused_and_the_count_covers_the_whole_merge(mvol):
    with Served(mvol.store) as srv:
        first = stop_soon(srv)
        assert first["chunks_total"] == MergeVol.CHUNKS and first["counted_from"] == "start"
        st = merge_status(mvol.store)
        assert st == {**first, "running": False, "chunks_per_second": None,
                      "eta_seconds": None}, st
        line = ok("merge", mvol.store, "--status").stdout
        assert line == (f"merging snapshot a into the origin: {first['chunks_done']} of "
                        f"{MergeVol.CHUNKS} chunks (paused: `ddsnap merge STORE NAME` "
                        "resumes it)\n"), line
        assert "chunks/s" not in line and "ETA" not in line
        assert re.search(r"^\s+merge: merging snapshot a into the origin: \d+ of 512 chunks "
                         r"\(paused", ok("status", mvol.store).stdout, re.M)
        # resumed: the count goes on from where it was, over the whole merge
        p = ok("merge", mvol.store, "a")
        assert p.stdout.startswith("merging snapshot a into the origin: ")
        again = wait_until(lambda: (s := merge_status(mvol.store)) and
                           s["chunks_done"] > first["chunks_done"] and s,
                           "the resumed merge to make progress", interval=0.01)
        assert again["chunks_total"] == MergeVol.CHUNKS and again["counted_from"] == "start"
        if again["running"]:  # (it may just have finished its last step)
            assert again["chunks_per_second"] > 0, again
        second = srv.control("merge_stop")
        assert first["chunks_done"] < second["chunks_done"] < MergeVol.CHUNKS, second
        assert second["chunks_per_second"] is None and second["eta_seconds"] is None
        ok("merge", mvol.store, "a", "--wait")
        assert merge_status(mvol.store) is None
    assert [s["name"] for s in ok_json("snap", "list", mvol.store)] == ["b"]


@pytest.mark.clients
def test_merge_status_after_a_restart_says_what_it_counts(mvol):
    with Served(mvol.store) as srv:
        stopped = stop_soon(srv)
    done = stopped["chunks_done"]
    # a new process: what was merged before is not recorded, what is left is exact
    st = merge_status(mvol.store)
    assert st["counted_from"] == "open" and st["running"] is False, st
    assert (st["chunks_done"], st["chunks_total"]) == (0, MergeVol.CHUNKS - done), st
    assert st["chunks_per_second"] is None and st["eta_seconds"] is None
    line = ok("merge", mvol.store, "--status").stdout
    assert line == (f"merging snapshot a into the origin: 0 of {MergeVol.CHUNKS - done} "
                    "chunks (counted since the store was last opened: chunks merged before "
                    "that are not recorded) (paused: it resumes when the store is served, "
                    "or with `ddsnap merge STORE NAME --wait`)\n"), line
    with Served(mvol.store):
        # the server resumes it by itself, counting from its own open
        st = merge_status(mvol.store)
        if st is not None:
            assert st["counted_from"] == "open"
            assert st["chunks_total"] == MergeVol.CHUNKS - done
        wait_merge_done(mvol.store)
    assert ok_json("check", mvol.store)["clean"]


# --- 6. help ---------------------------------------------------------------------------------


COMMANDS = [[], ["init"], ["snap"], ["snap", "create"], ["snap", "list"],
            ["snap", "delete"], ["serve"], ["merge"], ["set"], ["status"], ["check"]]


@pytest.mark.parametrize("cmd", COMMANDS, ids=lambda c: " ".join(c) or "ddsnap")
def test_dash_h_is_help_everywhere(cmd):
    short = ok(*cmd, "-h")
    long = ok(*cmd, "--help")
    assert short.stdout == long.stdout
    assert short.stdout.startswith(f"Usage: ddsnap {' '.join(cmd)}".rstrip() + " ")
    assert "-h, --help" in short.stdout


def test_help_shows_sizes_and_choices():
    text = ok("init", "-h").stdout
    assert re.search(r"--size SIZE\s", text), text
    assert re.search(r"--chunk-size SIZE\s", text), text
    assert "--full-policy [error|delete-oldest]" in text, text
    assert re.search(r"--max-snapshots N\s", text), text
    assert "full-policy=error|delete-oldest" in ok("set", "-h").stdout


def test_a_bad_choice_is_one_line_exit_2(tmp_path):
    origin = tmp_path / "origin.img"
    make_origin(origin, ORIGIN_SIZE)
    fails(2, "init", tmp_path / "s.img", "--origin", origin, "--full-policy", "sometimes",
          match=r"^ddsnap: --full-policy must be one of error, delete-oldest, not "
                r"'sometimes'$")
    assert not (tmp_path / "s.img").exists()


# --- 7. asking before destroying ---------------------------------------------------------------


@pytest.mark.parametrize("served", [False, True], ids=["local", "served"])
def test_snap_delete_asks_on_a_terminal(env, served):
    for name in ("a", "b", "c"):
        ok("snap", "create", env.store, name)
    srv = Served(env.store).start() if served else None
    try:
        rc, text = on_a_terminal("snap", "delete", env.store, "a", answer="n")
        assert re.search(r"delete snapshot a \(taken \S+; frees 0 bytes only it uses\)\? "
                         r"\[y/N\]", text), text
        assert rc == 19 and "ddsnap: snapshot a not deleted" in text, (rc, text)
        assert env.names() == ["a", "b", "c"]
        rc, text = on_a_terminal("snap", "delete", env.store, "a", answer="y")
        assert rc == 0 and "deleted snapshot a" in text, (rc, text)
        assert env.names() == ["b", "c"]
        # -y: no question
        rc, text = on_a_terminal("snap", "delete", env.store, "b", "-y")
        assert rc == 0 and "[y/N]" not in text and "deleted snapshot b" in text, text
        # a snapshot that does not exist: said at once, no question
        rc, text = on_a_terminal("snap", "delete", env.store, "nosuch")
        assert rc == 8 and "[y/N]" not in text and "no such snapshot: nosuch" in text, text
        # not on a terminal (a script): no question, as before
        assert ok("snap", "delete", env.store, "c").stdout == "deleted snapshot c\n"
        assert env.names() == []
    finally:
        if srv is not None:
            srv.stop()


def test_init_force_asks_on_a_terminal(env):
    ok("snap", "create", env.store, "keep")
    args = ["init", env.store, "--origin", env.origin, "--force"]
    rc, text = on_a_terminal(*args, answer="n")
    origin = re.escape(os.path.realpath(env.origin))
    assert re.search(rf"{re.escape(str(env.store))} holds a ddsnap snapshot store \(origin "
                     rf"{origin}\): overwrite it, losing every snapshot in it\? \[y/N\]",
                     text), text
    assert rc == 19 and f"ddsnap: {env.store} not overwritten" in text, (rc, text)
    assert env.names() == ["keep"]
    rc, text = on_a_terminal(*args, answer="y")
    assert rc == 0 and "created snapshot store" in text, (rc, text)
    assert env.names() == []
    ok("snap", "create", env.store, "again")
    rc, text = on_a_terminal(*args, "--yes")
    assert rc == 0 and "[y/N]" not in text, text
    assert env.names() == []
    # not on a terminal: no question (scripts keep working)
    ok("snap", "create", env.store, "again")
    ok(*args)
    assert env.names() == []
    # without --force there is nothing to ask: refused as before
    fails(16, "init", env.store, "--origin", env.origin, match="use --force")
