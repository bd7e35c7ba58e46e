"""The metadata server's election through etcd (ddsnap.election), against a real etcd.

Time is never asserted on speed: waits have generous deadlines, and what is compared are
monotonic instants of this one process (and of etcd on this host, CLOCK_MONOTONIC too) in
causal order: a standby can win only after etcd expired the old lease, so its win comes
after the old server's deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import mmap
import os
import struct
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import aetcd
import pytest

from ddsnap.election import (
    BorrowedTerm,
    Election,
    EtcdUnavailable,
    Fenced,
    Renewal,
    SharedDeadline,
    Term,
    check_cluster,
    follow,
    leader,
    parse_etcd_url,
    status,
)
from ddsnap.errors import InvalidArgument
from etcd_server import EtcdServer, free_port

#: seconds: how long a test waits for something that must happen (not a speed claim)
WAIT = 30.0
T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, 120))


def record(name: str) -> dict:
    return {"metadata": f"tcp:127.0.0.1:{7000 + ord(name[0])}", "host": "test", "pid": 1,
            "name": name}


async def within(aw: Awaitable[T], what: str, seconds: float = WAIT) -> T:
    try:
        return await asyncio.wait_for(aw, seconds)
    except TimeoutError:
        raise AssertionError(f"{what}: not within {seconds} s") from None


async def until(cond: Callable[[], bool], what: str, seconds: float = WAIT) -> None:
    end = time.monotonic() + seconds
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"{what}: not within {seconds} s")
        await asyncio.sleep(0.01)


async def until_async(cond: Callable[[], Awaitable[bool]], what: str,
                      seconds: float = WAIT) -> None:
    end = time.monotonic() + seconds
    while not await cond():
        if time.monotonic() > end:
            raise AssertionError(f"{what}: not within {seconds} s")
        await asyncio.sleep(0.02)


def ok_renewals(term: Term) -> list[Renewal]:
    return [r for r in term.renewals if r.ok]


@contextlib.asynccontextmanager
async def elections(*made: Election) -> AsyncIterator[None]:
    try:
        yield
    finally:
        for e in made:
            await e.close()


async def standbys(url: str, cluster: str) -> list[str]:
    return [r["id"] for r in (await status(url, cluster))["standbys"]]

@contextlib.asynccontextmanager
async def a_serving_b_standing(etcd: EtcdServer, kind: type[Election] = Election
                               ) -> AsyncIterator[tuple[Election, Election, Term,
                                                        asyncio.Future]]:
    """Elections ``a`` (elected: its term ``ta``) and ``b`` (a ``kind``, standing by: its
    campaign ``cb``) of cluster ``c`` with a 2 s TTL, both closed on exit."""
    a = Election(etcd.url, "c", record("a"), ttl=2, ident="a")
    b = kind(etcd.url, "c", record("b"), ttl=2, ident="b")
    async with elections(a, b):
        ta = await within(a.campaign(), "a's election")
        cb = asyncio.ensure_future(b.campaign())
        if isinstance(b, StuckRenewals):
            b.campaigner = cb  # (set before the campaign first runs)
        await until_async(lambda: _standbys_are(etcd.url, ["b"]), "b standing by")
        yield a, b, ta, cb



# -- names -----------------------------------------------------------------------------


def test_urls_cluster_names_and_arguments():
    assert parse_etcd_url("http://127.0.0.1:2379") == ("127.0.0.1", 2379)
    assert parse_etcd_url("etcd.example:12379") == ("etcd.example", 12379)
    assert parse_etcd_url("http://etcd/") == ("etcd", 2379)
    assert parse_etcd_url("http://[::1]:2379") == ("[::1]", 2379)
    with pytest.raises(InvalidArgument, match="TLS to etcd is not supported yet"):
        parse_etcd_url("https://127.0.0.1:2379")
    for bad in ["", "ftp://h:1", "http://", "http://h:99999", "http://h:x", "h:0",
                "http://h:1/v3", "h1:1,h2:2", "http://u@h:1"]:
        with pytest.raises(InvalidArgument):
            parse_etcd_url(bad)
    for name in ["a", "prod-1", "A.b_c", "x" * 64]:
        assert check_cluster(name) == name
    for name in ["", "a/b", "x" * 65, "a b", "é"]:
        with pytest.raises(InvalidArgument, match="cluster name"):
            check_cluster(name)
    url = "http://127.0.0.1:2379"
    with pytest.raises(InvalidArgument, match="cluster name"):
        Election(url, "a/b", {})
    with pytest.raises(InvalidArgument, match="TTL"):
        Election(url, "c", {}, ttl=0.5)
    with pytest.raises(InvalidArgument, match="not JSON"):
        Election(url, "c", {"x": object()})
    with pytest.raises(InvalidArgument, match="election id"):
        Election(url, "c", {}, ident="a/b")
    with pytest.raises(InvalidArgument, match="TLS"):
        run(leader("https://127.0.0.1:2379", "c"))
    with pytest.raises(InvalidArgument, match="cluster name"):
        run(status(url, "no/such"))
    assert Fenced.exit_code == 30


def test_etcd_unreachable_is_reported():
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(EtcdUnavailable, match="did not answer"):
        run(leader(url, "c", timeout=1))
    with pytest.raises(EtcdUnavailable):
        run(status(url, "c", timeout=1))


# -- winning and handing over ----------------------------------------------------------


def test_one_wins_the_other_takes_over_when_it_resigns(etcd: EtcdServer):
    async def main() -> None:
        a = Election(etcd.url, "c", record("a"), ttl=2, ident="a")
        b = Election(etcd.url, "c", record("b"), ttl=2, ident="b")
        async with elections(a, b):
            tasks = {asyncio.ensure_future(a.campaign()): a,
                     asyncio.ensure_future(b.campaign()): b}
            done, pending = await within(
                asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED), "an election")
            assert len(done) == 1 and len(pending) == 1
            first, rest = done.pop(), pending.pop()
            winner, loser = tasks[first], tasks[rest]
            term = first.result()
            assert term.valid() and winner.term is term
            term.check()
            with pytest.raises(InvalidArgument, match="already elected"):
                await winner.campaign()
            # the other stands by, listed, while the winner keeps its term
            await until_async(lambda: _standbys_are(etcd.url, [loser.ident]), "standby")
            st = await status(etcd.url, "c")
            assert st["leader"]["id"] == winner.ident and st["leader"]["epoch"] == term.epoch
            assert not rest.done() and term.valid()
            assert (await leader(etcd.url, "c") or {})["name"] == winner.ident

            assert await winner.resign(term)
            # the lease is revoked: its key is gone by the time resign returns
            now = await leader(etcd.url, "c")
            assert now is None or now["epoch"] > term.epoch
            assert await within(winner.lost(term), "lost after resign") == "resigned"
            assert not term.valid()
            with pytest.raises(Fenced, match=f"epoch {term.epoch}"):
                term.check()
            second = await within(rest, "the standby's election")
            assert second.epoch > term.epoch
            assert second.record["name"] == loser.ident
            assert (await leader(etcd.url, "c") or {})["epoch"] == second.epoch
            assert not term.valid()  # for good

    run(main())


async def _standbys_are(url: str, ids: list[str]) -> bool:
    return await standbys(url, "c") == ids


def test_abandoned_term_is_taken_over_only_after_its_lease_expired(etcd: EtcdServer):
    """A server that stops renewing (crashed, here: closed without resigning) keeps the
    leader key until etcd expires its lease: the next one's term starts after the old
    lease's TTL from its last keepalive, and after the old server's own deadline."""
    async def main() -> None:
        a = Election(etcd.url, "c", record("a"), ttl=2, ident="a")
        b = Election(etcd.url, "c", record("b"), ttl=2, ident="b")
        async with elections(a, b):
            ta = await within(a.campaign(), "a's election")
            cb = asyncio.ensure_future(b.campaign())
            await until(lambda: len(ok_renewals(ta)) >= 3, "a's renewals")
            last = ok_renewals(ta)[-1]
            deadline = ta.deadline
            await a.close()  # no await between: no keepalive can land in between
            assert not ta.valid() and ta.renewed_until == deadline
            tb = await within(cb, "b's election")
            won = time.monotonic()
            assert tb.epoch > ta.epoch
            # etcd received a's last keepalive after it was sent: its lease lived TTL after
            assert won > last.sent + last.ttl
            assert won > deadline

    run(main())


class LateAnswers(Election):
    """A server whose lease is answered late, then not renewed: with ``late`` "grant"
    the lease grant's answer arrives ``delay`` seconds late and no keepalive is ever
    answered; with "keepalive" the first keepalive once elected is answered ``delay``
    seconds late and no later one is (the server stops renewing, as if it hung)."""

    def __init__(self, *args: Any, delay: float, late: str, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.delay = delay
        self.late = late

    async def keepalive(self, lease_id: int) -> int:
        if self.late == "keepalive":
            if self.term is None:
                return await super().keepalive(lease_id)
            self.late = "none"
            ttl = await super().keepalive(lease_id)
            await asyncio.sleep(self.delay)
            return ttl
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


@pytest.mark.parametrize("late", ["grant", "keepalive"])
def test_deadline_counts_from_when_the_lease_was_asked_for(etcd: EtcdServer, late: str,
                                                           monkeypatch: pytest.MonkeyPatch):
    """A lease grant or keepalive answered late renews the lease from when etcd got it,
    near when it was sent: a deadline counted from the answer would outlast the lease,
    and the next server would be elected while this one still believed it may write."""
    async def main() -> None:
        delay = 1.6
        a = LateAnswers(etcd.url, "c", record("a"), ttl=4, ident="a", delay=delay,
                        late=late)
        b = Election(etcd.url, "c", record("b"), ttl=4, ident="b")
        if late == "grant":
            real_lease = a.client.lease

            async def late_lease(*args: Any, **kwargs: Any) -> Any:
                lease = await real_lease(*args, **kwargs)
                await asyncio.sleep(delay)
                return lease

            monkeypatch.setattr(a.client, "lease", late_lease)
        async with elections(a, b):
            ta = await within(a.campaign(), "a's election")
            cb = asyncio.ensure_future(b.campaign())
            tb = await within(cb, "b's election")
            won = time.monotonic()
            await within(a.lost(ta), "a's term ends")
            answered = [r for r in ok_renewals(ta) if r.received - r.sent >= delay]
            assert answered, f"no late answer was accepted: {list(ta.renewals)}"
            last = answered[-1]
            assert ok_renewals(ta)[-1] == last
            assert tb.epoch > ta.epoch
            # causal: b won after etcd expired a's lease; a's fence was down by then
            assert won >= ta.renewed_until, (won, ta.renewed_until, last)
            assert ta.renewed_until == last.sent + last.ttl - ta.safety

    run(main())


# -- losing the term -------------------------------------------------------------------


@dataclass
class Sample:
    start: float
    end: float
    ok: bool


def sample_checks(term: Term, stop: threading.Event, out: list[Sample]) -> None:
    """What an I/O thread sees: term.check() before every write."""
    while not stop.is_set():
        start = time.monotonic()
        try:
            term.check()
            ok = True
        except Fenced:
            ok = False
        out.append(Sample(start, time.monotonic(), ok))
        time.sleep(0.001)


def test_paused_etcd_fences_the_server_then_a_new_term_begins(etcd: EtcdServer):
    async def main() -> None:
        async with a_serving_b_standing(etcd) as (a, b, ta, cb):
            await until(lambda: len(ok_renewals(ta)) >= 3, "a's renewals")
            samples: list[Sample] = []
            stop = threading.Event()
            sampler = threading.Thread(target=sample_checks, args=(ta, stop, samples))
            sampler.start()
            try:
                await until(lambda: len(samples) > 10, "checks before the pause")
                paused = time.monotonic()
                etcd.pause()
                try:
                    reason = await within(a.lost(ta), "a's term lost")
                    await until(lambda: bool(samples) and not samples[-1].ok, "a fenced check")
                finally:
                    stop.set()
                    etcd.resume()
            finally:
                stop.set()
                sampler.join()
            assert "deadline" in reason
            assert not ta.valid()
            with pytest.raises(Fenced):
                ta.check()
            oks = ok_renewals(ta)
            assert len(oks) >= 3
            last = oks[-1]
            # etcd was stopped: no keepalive sent since could have been answered
            assert all(r.sent < paused for r in oks)
            # the fence fell at the deadline of the last successful keepalive, counted
            # from when it was sent, and no keepalive succeeded after that one
            assert ta.renewed_until == last.sent + last.ttl - ta.safety
            assert ta.ended_at is not None and ta.ended_at >= ta.renewed_until
            assert not any(r.ok for r in ta.renewals if r.received > ta.ended_at)
            # every check from the deadline on was refused, and none allowed after one
            # was refused
            allowed = [s for s in samples if s.ok]
            refused = [s for s in samples if not s.ok]
            assert allowed and refused
            assert all(s.start < ta.renewed_until for s in allowed)
            assert max(samples.index(s) for s in allowed) < samples.index(refused[0])

            # etcd is back: a new term, of a higher epoch, for whoever wins
            ca = asyncio.ensure_future(a.campaign())
            tasks = {ca: a, cb: b}
            done, _ = await within(
                asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED), "a new term")
            first = done.pop()
            t1 = first.result()
            assert t1.epoch > ta.epoch and t1.valid()
            other = ca if first is cb else cb
            assert await tasks[first].resign(t1)
            t2 = await within(other, "the other's term")
            assert t2.epoch > t1.epoch
            assert not ta.valid()

    run(main())


def test_term_is_lost_when_someone_deletes_the_leader_key(etcd: EtcdServer):
    async def main() -> None:
        async with a_serving_b_standing(etcd) as (a, b, ta, cb):
            async with aetcd.Client(etcd.addr, etcd.port, timeout=5) as c:
                await c.delete(a.keys.leader)
            reason = await within(a.lost(ta), "a's term lost")
            assert "deleted" in reason and not ta.valid()
            tb = await within(cb, "b's election")
            assert tb.epoch > ta.epoch

    run(main())


class StuckProxy:
    """A TCP proxy to etcd that can get stuck: :meth:`freeze` stops forwarding, both
    ways, on the connections open now, and keeps them open (a half-open connection
    after a NAT or firewall change); new connections go through."""

    def __init__(self, etcd: EtcdServer):
        self.etcd = etcd
        self.frozen: list[list[bool]] = []
        self.tasks: set[asyncio.Task] = set()
        self.server: asyncio.Server | None = None
        self.url = ""

    async def start(self) -> StuckProxy:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(self.etcd.addr, self.etcd.port)
        frozen = [False]
        self.frozen.append(frozen)

        async def pump(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await r.read(65536):
                    if not frozen[0]:
                        w.write(data)
                        await w.drain()
            w.close()

        for task in (asyncio.ensure_future(pump(reader, up_writer)),
                     asyncio.ensure_future(pump(up_reader, writer))):
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    def freeze(self) -> None:
        for f in self.frozen:
            f[0] = True

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


def test_keepalive_stuck_on_a_dead_connection_times_out_and_goes_on_a_new_one(
        etcd: EtcdServer):
    async def main() -> None:
        proxy = await StuckProxy(etcd).start()
        a = Election(proxy.url, "c", record("a"), ttl=5, ident="a")
        try:
            async with elections(a):
                ta = await within(a.campaign(), "a's election")
                await until(lambda: len(ok_renewals(ta)) >= 2, "a's renewals")
                frozen = time.monotonic()
                proxy.freeze()
                await until(lambda: ta.ended.is_set() or ok_renewals(ta)[-1].sent > frozen,
                            "a keepalive after the freeze")
                assert ta.reason is None and ta.valid(), ta.reason
                stuck = [r for r in ta.renewals if not r.ok and r.received > frozen]
                assert stuck, "no keepalive was stuck"
        finally:
            await proxy.close()

    run(main())


def test_keepalives_in_flight_survive_their_channel_being_replaced(etcd: EtcdServer):
    """The keepalive task replaces its channel after a failed keepalive; a keepalive
    still in flight on the old one (a campaign's) ends by its own timeout, not by a
    CancelledError from gRPC (which would end the campaign as if it were cancelled)."""
    async def main() -> None:
        a = Election(etcd.url, "c", record("a"), ttl=3, ident="a")
        async with elections(a):
            ta = await within(a.campaign(), "a's election")
            await until(lambda: len(ok_renewals(ta)) >= 2, "a's renewals")
            calls: list[asyncio.Future] = []
            etcd.pause()
            try:
                end = time.monotonic() + 2.5
                while time.monotonic() < end:
                    calls.append(asyncio.ensure_future(a.keepalive(ta.lease_id)))
                    await asyncio.sleep(0.1)
                results = await asyncio.gather(*calls, return_exceptions=True)
            finally:
                etcd.resume()
            assert any(not r.ok for r in ta.renewals), "the keepalive task never failed"
            assert all(isinstance(r, aetcd.ClientError) for r in results), results

    run(main())


# -- watching from the revision read ---------------------------------------------------


def test_campaign_sees_a_deletion_made_before_its_watch_began(etcd: EtcdServer,
                                                             monkeypatch: pytest.MonkeyPatch):
    async def main() -> None:
        a = Election(etcd.url, "c", record("a"), ttl=2, ident="a")
        b = Election(etcd.url, "c", record("b"), ttl=2, ident="b")
        async with elections(a, b):
            ta = await within(a.campaign(), "a's election")
            real_watch = b.client.watch

            async def late_watch(key: bytes, **kwargs: Any) -> Any:
                # b read the key held; a resigns before b's watch exists
                monkeypatch.undo()
                assert await a.resign(ta)
                return await real_watch(key, **kwargs)

            monkeypatch.setattr(b.client, "watch", late_watch)
            tb = await within(b.campaign(), "b's election", 10)
            assert tb.epoch > ta.epoch

    run(main())


def test_follow_yields_every_new_leader(etcd: EtcdServer, monkeypatch: pytest.MonkeyPatch):
    async def main() -> None:
        a = Election(etcd.url, "c", record("a"), ttl=2, ident="a")
        b = Election(etcd.url, "c", record("b"), ttl=2, ident="b")
        async with elections(a, b), contextlib.aclosing(follow(etcd.url, "c")) as seen:
            assert await within(anext(seen), "no leader yet") is None
            ta = await within(a.campaign(), "a's election")
            now = await within(anext(seen), "a elected")
            assert now is not None and now["name"] == "a" and now["epoch"] == ta.epoch
            cb = asyncio.ensure_future(b.campaign())
            await until_async(lambda: _standbys_are(etcd.url, ["b"]), "b standing by")

            # A new follower reads a's record; a hands over to b (a delete and a put)
            # before the follower's watch begins.  (The first aetcd watch made from now
            # on is the new follower's: the others exist already.)
            real_watch = aetcd.Client.watch
            handed: list[Term] = []

            async def late_watch(client: aetcd.Client, key: bytes, **kwargs: Any) -> Any:
                monkeypatch.undo()
                assert await a.resign(ta)
                handed.append(await within(cb, "b's election"))
                return await real_watch(client, key, **kwargs)

            monkeypatch.setattr(aetcd.Client, "watch", late_watch)
            async with contextlib.aclosing(follow(etcd.url, "c")) as fresh:
                rec = await within(anext(fresh), "the current leader")
                assert rec is not None and rec["epoch"] == ta.epoch
                while rec is None or rec["name"] != "b":
                    rec = await within(anext(fresh), "b's record", 10)
            assert handed and rec["epoch"] == handed[0].epoch > ta.epoch

            # the first follower, watching all along, saw the handover too
            rest = [await within(anext(seen), "the handover")]
            while rest[-1] is None:
                rest.append(await within(anext(seen), "b's record"))
            assert rest == [None, rec]

    run(main())


# -- status ----------------------------------------------------------------------------


def test_status_lists_the_server_and_the_standbys(etcd: EtcdServer):
    async def main() -> None:
        assert await status(etcd.url, "c") == {"cluster": "c", "leader": None,
                                               "standbys": []}
        assert await leader(etcd.url, "c") is None
        a = Election(etcd.url, "c", record("a"), ttl=2, ident="a")
        b = Election(etcd.url, "c", record("b"), ttl=2, ident="b")
        c = Election(etcd.url, "c", record("c"), ttl=2, ident="c")
        other = Election(etcd.url, "other", record("o"), ttl=2, ident="o")
        async with elections(a, b, c, other):
            before = time.time_ns()
            ta = await within(a.campaign(), "a's election")
            to = await within(other.campaign(), "the other cluster's election")
            cb = asyncio.ensure_future(b.campaign())
            cc = asyncio.ensure_future(c.campaign())
            await until_async(lambda: _standbys_are(etcd.url, ["b", "c"]), "b, c standing by")
            st = await status(etcd.url, "c")
            lead = st["leader"]
            assert st["cluster"] == "c"
            assert lead["id"] == "a" and lead["epoch"] == ta.epoch and lead["name"] == "a"
            assert lead["metadata"] == record("a")["metadata"]
            assert before <= lead["since"] == ta.since <= time.time_ns()
            assert 0 <= lead["lease_ttl_left"] <= ta.ttl
            assert [(s["id"], s["name"]) for s in st["standbys"]] == [("b", "b"), ("c", "c")]
            assert all(before <= s["since"] <= time.time_ns() for s in st["standbys"])
            assert (await leader(etcd.url, "other") or {})["epoch"] == to.epoch != ta.epoch
            assert await standbys(etcd.url, "other") == []

            # a standby that stops withdraws at once (its campaign is cancelled)
            await c.close()
            with pytest.raises(asyncio.CancelledError):
                await cc
            assert await standbys(etcd.url, "c") == ["b"]
            await a.resign(ta)
            tb = await within(cb, "b's election")
            st = await status(etcd.url, "c")
            assert st["leader"]["id"] == "b" and st["leader"]["epoch"] == tb.epoch
            assert st["standbys"] == []
            async with aetcd.Client(etcd.addr, etcd.port, timeout=5) as client:
                assert await client.get(b.keys.standby("b")) is None  # removed on winning

    run(main())


def test_standby_whose_lease_is_gone_registers_again(etcd: EtcdServer):
    async def main() -> None:
        async with (a_serving_b_standing(etcd) as (a, b, ta, cb),
                    aetcd.Client(etcd.addr, etcd.port, timeout=5) as client):
            kv = await client.get(b.keys.standby("b"))
            assert kv is not None and kv.lease
            await client.revoke_lease(kv.lease)
            assert await standbys(etcd.url, "c") == []

            async def back() -> bool:
                again = await client.get(b.keys.standby("b"))
                return again is not None and again.lease != kv.lease

            await until_async(back, "b registered again on a new lease")
            assert await a.resign(ta)
            tb = await within(cb, "b's election")
            assert tb.epoch > ta.epoch and tb.lease_id != kv.lease

    run(main())


class StuckRenewals(Election):
    """Its keepalive task is stuck (its keepalives hang); keepalives the campaign makes
    itself, in task ``campaigner``, go through."""

    campaigner: asyncio.Future | None = None

    async def keepalive(self, lease_id: int) -> int:
        if asyncio.current_task() is not self.campaigner:
            await asyncio.Event().wait()
        return await super().keepalive(lease_id)


def test_standby_whose_keepalives_failed_renews_before_its_term_begins(etcd: EtcdServer):
    """A standby's lease outlived its keepalives (etcd restarted, say, and reset the
    TTLs): when it wins, its term must not start from its last successful keepalive,
    whose deadline has passed, but from a keepalive made then."""
    async def main() -> None:
        async with (a_serving_b_standing(etcd, StuckRenewals) as (a, b, ta, cb),
                    aetcd.Client(etcd.addr, etcd.port, timeout=5) as client):
            registered = time.monotonic()
            kv = await client.get(b.keys.standby("b"))
            assert kv is not None

            async def keep() -> None:
                while True:
                    await client.refresh_lease(kv.lease)
                    await asyncio.sleep(0.2)

            keeper = asyncio.ensure_future(keep())
            try:
                # b's lease was granted before it registered: a term counted from the grant
                # would be over by now
                await asyncio.sleep(max(0.0, registered + 2 - time.monotonic()))
                resigned = time.monotonic()
                assert await a.resign(ta)
                tb = await within(cb, "b's election")
                assert tb.valid(), tb
                assert tb.renewals[0].sent > resigned
            finally:
                keeper.cancel()

    run(main())


def test_campaign_whose_winning_answer_was_lost_holds_the_term(
        etcd: EtcdServer, monkeypatch: pytest.MonkeyPatch):
    """The transaction that elected this process committed, but its answer never came
    (a timeout): the next attempt finds the key on its own lease, and the term is its."""
    async def main() -> None:
        a = Election(etcd.url, "c", record("a"), ttl=2, ident="a")
        real_transaction = a.client.transaction

        async def unanswered(*args: Any, **kwargs: Any) -> Any:
            monkeypatch.undo()
            await real_transaction(*args, **kwargs)
            raise aetcd.ConnectionTimeoutError("the answer was lost")

        monkeypatch.setattr(a.client, "transaction", unanswered)
        async with elections(a):
            ta = await within(a.campaign(), "a's election", 10)
            lead = await leader(etcd.url, "c")
            assert lead is not None and lead["epoch"] == ta.epoch and ta.valid()
            assert ta.since == lead["since"]

    run(main())


def test_standby_survives_an_etcd_restart(etcd: EtcdServer):
    async def main() -> None:
        async with a_serving_b_standing(etcd) as (a, b, ta, cb):
            etcd.kill()
            await within(a.lost(ta), "a's term lost")
            await asyncio.to_thread(etcd.start)
            tb = await within(cb, "b's election")
            assert tb.epoch > ta.epoch and tb.valid() and not ta.valid()

    run(main())


# -- the deadline shared with child processes (serve --etcd --workers N) ----------------


def test_shared_deadline_reads_what_was_published_in_another_process():
    shared = SharedDeadline()
    try:
        assert shared.read() == -math.inf  # nothing published: no term
        shared.publish(1234.5)
        assert shared.read() == 1234.5
        # a child process maps the same memfd by its descriptor
        code = ("import sys; from ddsnap.election import SharedDeadline; "
                f"print(SharedDeadline({shared.fd}).read())")
        p = subprocess.run([sys.executable, "-c", code], pass_fds=[shared.fd],
                           capture_output=True, text=True, timeout=60, check=True)
        assert float(p.stdout) == 1234.5
        shared.publish(-math.inf)
        p = subprocess.run([sys.executable, "-c", code], pass_fds=[shared.fd],
                           capture_output=True, text=True, timeout=60, check=True)
        assert float(p.stdout) == -math.inf
    finally:
        shared.close()


def test_shared_deadline_is_not_read_while_a_write_is_under_way():
    """A reader that finds the sequence odd (the writer between its two halves) waits
    for the write to end instead of returning a half-written deadline."""
    shared = SharedDeadline()
    try:
        shared.publish(10.0)
        raw = mmap.mmap(shared.fd, 16)  # the memfd as another process maps it
        seq = struct.unpack_from("<Q", raw, 0)[0]
        struct.pack_into("<Q", raw, 0, seq + 1)  # a write begins...
        got: list[float] = []
        reader = threading.Thread(target=lambda: got.append(shared.read()), daemon=True)
        reader.start()
        reader.join(0.3)
        assert got == [], "read a deadline while it was being written"
        struct.pack_into("<d", raw, 8, 20.0)  # ...and ends
        struct.pack_into("<Q", raw, 0, seq + 2)
        reader.join(10)
        assert got == [20.0]
        raw.close()
    finally:
        shared.close()


def test_a_borrowed_term_fences_with_the_holders_deadline():
    """The term's holder renews and ends it; a child's BorrowedTerm on the shared
    deadline lets writes through only while the holder's term would."""
    now = time.monotonic()
    term = Term("c", 7, 0, {}, 1, Renewal(now, now, 3))
    shared = term.share()
    borrowed = BorrowedTerm("c", term.epoch, SharedDeadline(os.dup(shared.fd)))
    try:
        borrowed.check()
        assert shared.read() == term.deadline
        later = time.monotonic()
        term.renewed(Renewal(later, later, 3))
        assert shared.read() == term.deadline == later + 3 - term.safety
        term.end("resigned")
        assert shared.read() == -math.inf
        assert not borrowed.valid()
        with pytest.raises(Fenced, match="epoch 7 is over"):
            borrowed.check()
    finally:
        borrowed.shared.close()
        shared.close()


def test_a_borrowed_term_ends_at_the_deadline_with_no_renewal():
    now = time.monotonic()
    term = Term("c", 8, 0, {}, 1, Renewal(now - 3, now - 3, 3))  # renewed 3 s ago
    borrowed = BorrowedTerm("c", term.epoch, term.share())
    assert not borrowed.valid()
    fresh = Term("c", 9, 0, {}, 1, Renewal(now, now, 3))
    assert BorrowedTerm("c", 9, fresh.share()).valid()
