"""``ddsnap.control.call_many``: several control requests on one connection, up to
``depth`` of them ahead of their replies (docs/protocol.md: "A connection may carry
several requests, answered in order").

Against a real ``ddsnap serve`` (snapshots taken in a pipeline, in order, committed; an
operation's error raised with the class :func:`ddsnap.control.call` raises) and against
the real :class:`ddsnap.control.ControlServer` on a unix socket with a handler of the
test's own (requests and replies far larger than the socket buffers, a server that stops
answering, a request the server refuses and then hangs up on, a loop left early).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Generator

import pytest

from ddsnap.control import ControlServer, call, call_many
from ddsnap.errors import ControlError, ProtocolError, SnapshotExists, SnapshotNotFound
from served import MiB, Served, make_origin, ok, ok_json


@pytest.fixture
def store(tmp_path):
    make_origin(tmp_path / "origin", 4 * MiB)
    ok("init", tmp_path / "store", "--origin", tmp_path / "origin", "--size", "16M")
    return tmp_path / "store"


def creates(names):
    return (("snap_create", {"name": name, "read_only": False}) for name in names)


def test_pipelined_snapshots_are_taken_and_answered_in_order(store):
    names = [f"s{i}" for i in range(100)]
    with Served(store) as srv:
        results = list(call_many(str(srv.ctl), creates(names), depth=32, timeout=60))
        assert [r["name"] for r in results] == names
        assert [r["id"] for r in results] == sorted(r["id"] for r in results)
        listed = call(str(srv.ctl), "snap_list", timeout=60)
        assert [x["name"] for x in listed] == names
        # requests without arguments, and depth 1 (no pipelining at all)
        st, snaps = call_many(str(srv.ctl), [("status", None), ("snap_list", {})], depth=1)
        assert st["served"] is True and len(st["snapshots"]) == 100
        assert snaps == listed
        assert list(call_many(str(srv.ctl), [])) == []
    assert [x["name"] for x in ok_json("snap", "list", store)] == names


def test_an_operations_error_is_raised_as_call_raises_it(store):
    with Served(store) as srv:
        ctl = str(srv.ctl)
        call(ctl, "snap_create", {"name": "taken", "read_only": False})
        with pytest.raises(SnapshotExists) as by_call:
            call(ctl, "snap_create", {"name": "taken", "read_only": False})
        got = []
        with pytest.raises(SnapshotExists) as by_pipeline:
            for result in call_many(ctl, creates(["before", "taken", "after"]), depth=32):
                got.append(result["name"])
        assert got == ["before"]
        assert str(by_pipeline.value) == str(by_call.value)
        assert by_pipeline.value.exit_code == by_call.value.exit_code
        with pytest.raises(SnapshotNotFound):
            list(call_many(ctl, [("snap_delete", {"name": "nosuch"})]))
        # the request sent behind the failed one was still carried out (the docstring
        # says it may be); the server goes on answering
        names = [x["name"] for x in call(ctl, "snap_list")]
        assert names[:2] == ["taken", "before"]
        assert set(names) <= {"taken", "before", "after"}


def test_unreachable_socket_is_the_control_error_call_raises(tmp_path):
    path = str(tmp_path / "nosuch.ctl")
    with pytest.raises(ControlError) as by_call:
        call(path, "status")
    with pytest.raises(ControlError) as by_pipeline:
        list(call_many(path, [("status", None)]))
    assert str(by_pipeline.value) == str(by_call.value)


def test_depth_must_be_at_least_one(tmp_path):
    with pytest.raises(ValueError, match="depth"):
        call_many(str(tmp_path / "x.ctl"), [("status", None)], depth=0)


# --- the real ControlServer with a handler of the test's own --------------------------


@contextlib.contextmanager
def control_server(path, handler):
    """A ControlServer on ``path`` running ``handler``, its event loop in a thread."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server = ControlServer(str(path), handler)
    try:
        asyncio.run_coroutine_threadsafe(server.start(), loop).result(10)
        yield str(path)
    finally:
        asyncio.run_coroutine_threadsafe(stop(server), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


async def stop(server):
    """Close the server, let its connections' tasks end, shut the handler threads down."""
    await server.close()
    tasks = asyncio.all_tasks() - {asyncio.current_task()}
    if tasks:
        await asyncio.wait(tasks, timeout=20)
    await asyncio.get_running_loop().shutdown_default_executor()


def echo(op, args):
    """Replies ``{"op", "n", "pad"}``; ``grow`` makes the reply that many bytes longer."""
    return {"op": op, "n": args.get("n"), "pad": "r" * args.get("grow", 0)}


def test_large_requests_and_replies_do_not_deadlock(tmp_path):
    # 32 requests of 60 KB ahead of their replies (about 2 MB, more than a unix socket
    # buffers) and 256 KB replies: a client that wrote them all before reading any
    # would wait on a server waiting on it.
    reqs = [("echo", {"n": i, "pad": "q" * 60_000, "grow": 256 * 1024}) for i in range(64)]
    with control_server(tmp_path / "c", echo) as path:
        results = list(call_many(path, reqs, depth=32, timeout=30))
    assert [r["n"] for r in results] == list(range(64))
    assert all(len(r["pad"]) == 256 * 1024 for r in results)


def test_requests_are_pulled_lazily_and_leaving_early_closes(tmp_path):
    pulled = []

    def requests():
        for i in range(1000):
            pulled.append(i)
            yield ("echo", {"n": i})

    with control_server(tmp_path / "c", echo) as path:
        it = call_many(path, requests(), depth=4)
        assert pulled == []  # nothing happens before the first result is asked for
        first = [next(it)["n"] for _ in range(3)]
        assert isinstance(it, Generator)  # documented: a generator, closing it hangs up
        it.close()
        assert first == [0, 1, 2]
        assert len(pulled) <= 3 + 4  # never more than depth ahead
        assert call(path, "echo", {"n": "still there"})["n"] == "still there"


def test_a_server_that_stops_answering_times_out(tmp_path):
    release = threading.Event()

    def stuck(op, args):
        if op == "hang":
            release.wait(30)
        return echo(op, args)

    with control_server(tmp_path / "c", stuck) as path:
        results = []
        try:
            with pytest.raises(ControlError, match="did not answer in 0.5 s"):
                for r in call_many(path, [("echo", {"n": 1}), ("hang", {}), ("echo", {})],
                                   timeout=0.5):
                    results.append(r["n"])
        finally:
            release.set()
        assert results == [1]


def test_a_refused_request_and_the_hang_up_after_it(tmp_path):
    # A line longer than the server takes gets a ProtocolError reply, then the server
    # closes the connection: the error is raised as call raises it, after the results
    # of the requests before it.
    too_long = {"pad": "x" * (128 * 1024)}
    with control_server(tmp_path / "c", echo) as path:
        with pytest.raises(ProtocolError) as by_call:
            call(path, "echo", too_long)
        results = []
        with pytest.raises(ProtocolError) as by_pipeline:
            for r in call_many(path, [("echo", {"n": 1}), ("echo", too_long),
                                      ("echo", {"n": 3})]):
                results.append(r["n"])
        assert results == [1]
        assert str(by_pipeline.value) == str(by_call.value)
