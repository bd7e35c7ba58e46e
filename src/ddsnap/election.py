"""The election of a cluster's metadata server through etcd, and its fence.

Several ``ddsnap serve STORE --etcd URL --cluster NAME`` processes on different hosts
share one store; one of them at a time, elected here, serves its metadata.  Each process
holds one etcd lease (its *session*, ``ttl`` seconds, kept alive by a task of its own),
registers itself as a standby on it, and tries to create the leader key on it if the key
is absent (one transaction).  The process that created it is elected; the others watch
the key from the revision they read, so no deletion is missed, and try again when it is
deleted: when the server resigns (its lease is revoked) or etcd expires its lease (the
server died, is paused, or is cut off from etcd).

Keys, under ``/ddsnap/clusters/NAME/`` (NAME: ``[A-Za-z0-9._-]{1,64}``):

``leader``
    the elected server's record (a JSON object: what the caller gave, such as
    ``{"metadata": "tcp:HOST:PORT", "host": ..., "pid": ...}``, plus ``"id"``, the
    process's election id, and ``"since"``, wall-clock ns when it was elected), on the
    server's lease.  The key's ``create_revision`` is the term's **epoch**: etcd's
    revision, so every new term has a greater one.  Readers add ``"epoch"``.
``standby/ID``
    each waiting process's record (the same fields, ``"since"`` being when it started
    standing by), on its own lease; removed when it is elected.
``nodes``
    the nodes attached to the elected server (a JSON list of what its ``nodes`` call
    says of each), with no lease: written by the server only while its term holds the
    leader key (:func:`publish_nodes`), read by the next one to know whose lock uploads
    to wait for (:func:`nodes`) and by ``ddsnap cluster status``.

**Fencing, because leases are not locks.**  A paused or cut-off server learns too late
that its lease is gone, so it may write only until its *deadline*, a
``time.monotonic()`` value: the time it *sent* its last successful keepalive (or the
lease grant), plus the TTL etcd granted, minus a safety margin ``max(SAFETY_MIN, TTL *
CLOCK_DRIFT_FRACTION)``; a term starts with the deadline of its lease's last grant or
keepalive (renewed just before the election transaction if that would leave less than
TTL/3, as after keepalives failed).  etcd expires a lease no sooner than TTL after it *received*
the last keepalive, which is after the keepalive was sent, so on clocks whose rates
differ by less than the margin the deadline comes first.  :meth:`Term.check` compares
the deadline with the clock (cheap, any thread, before every write); a term past its
deadline, or whose renewal found the lease gone, or whose leader key someone else
deleted or overwrote, is over for good (:meth:`Election.lost`).  Keepalives go every
TTL/3, each bounded by a TTL/3 timeout on a channel of their own, which is replaced after
a failed keepalive, so one stuck connection or a hung etcd cannot hold renewals past the
deadline.

Sources: etcd's ``clientv3/concurrency`` session and election recipe (one lease per
process, create-if-absent, watch for the deletion from the revision read); Burrows,
"The Chubby lock service" (sequencers, lease timing on the holder's side); Kleppmann,
"How to do distributed locking" (leases are not locks: fence on the holder's clock, and
epochs that the store checks; docs/format.md "Cluster epoch").

Every etcd call has a timeout (a gRPC deadline): without one a call over a cut network or
to a paused etcd waits forever.  TLS to etcd is not supported yet.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import mmap
import os
import re
import secrets
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aetcd
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    wait_exponential,
    wait_random,
)

from .errors import EtcdUnavailable, Fenced, InvalidArgument

__all__ = [
    "CLOCK_DRIFT_FRACTION", "ETCD_TIMEOUT", "SAFETY_MIN", "BorrowedTerm", "Election",
    "EtcdUnavailable", "Fenced", "Renewal", "SharedDeadline", "Term", "check_cluster",
    "follow", "leader", "nodes", "parse_etcd_url", "publish_nodes", "safety_margin",
    "status",
]

log = logging.getLogger(__name__)

#: seconds: the least safety margin taken off a deadline (clock-rate drift, scheduling)
SAFETY_MIN = 0.5
#: the margin as a fraction of the TTL: hosts' clocks may run this much apart over a TTL
CLOCK_DRIFT_FRACTION = 0.1
#: seconds: the timeout of every etcd call but keepalives (those get TTL/3)
ETCD_TIMEOUT = 2.0
#: seconds between a failed keepalive and the next attempt (on a fresh channel)
RENEW_RETRY_GAP = 0.1
#: keepalives a term remembers (:attr:`Term.renewals`)
RENEWAL_HISTORY = 1000
#: gRPC keepalive pings on watching channels (ms).  etcd (``--grpc-keepalive-min-time``,
#: default 5 s) answers pings that come more often with GOAWAY "too_many_pings", which
#: breaks every watch on the connection: 5 s is the shortest a default etcd accepts.
KEEPALIVE_TIME_MS = 5000
KEEPALIVE_TIMEOUT_MS = 2000

PREFIX = "/ddsnap/clusters/"
_CLUSTER = re.compile(r"[A-Za-z0-9._-]{1,64}")

# gRPC channel options for every client: a channel of its own (C-core otherwise shares
# one TCP connection among channels with equal options, so a "fresh" channel would reuse
# a stuck connection), and reconnection attempts at least every second.
_CHANNEL = {
    "grpc.use_local_subchannel_pool": 1,
    "grpc.initial_reconnect_backoff_ms": 200,
    "grpc.min_reconnect_backoff_ms": 1000,
    "grpc.max_reconnect_backoff_ms": 1000,
}
# ... and for channels that watch: pings notice a dead connection under an idle watch.
# Not without calls: etcd counts those pings as abuse too.
_KEEPALIVE = {
    "grpc.keepalive_time_ms": KEEPALIVE_TIME_MS,
    "grpc.keepalive_timeout_ms": KEEPALIVE_TIMEOUT_MS,
    "grpc.keepalive_permit_without_calls": 0,
    "grpc.http2.max_pings_without_data": 0,
}

_NOTHING = object()

#: what a failed etcd call raises (aetcd's errors; a gRPC deadline is ConnectionTimeoutError)
_ETCD_ERRORS = (aetcd.ClientError, TimeoutError)


# -- names ---------------------------------------------------------------------------------


def parse_etcd_url(url: str) -> tuple[str, int]:
    """``(host, port)`` of an etcd endpoint ``http://HOST:PORT`` or ``HOST:PORT`` (port
    2379 if left out; an IPv6 host stays in brackets, as gRPC wants it).

    Raises:
        InvalidArgument: not such a URL; ``https://`` (TLS to etcd is not supported yet);
            several endpoints.
    """
    text = str(url).strip()
    rest = text
    if "://" in text:
        scheme, _, rest = text.partition("://")
        if scheme.lower() == "https":
            raise InvalidArgument(f"etcd URL {url!r}: TLS to etcd is not supported yet; "
                                  "use http://HOST:PORT")
        if scheme.lower() != "http":
            raise InvalidArgument(f"etcd URL {url!r}: expected http://HOST:PORT")
    rest = rest.rstrip("/")
    if not rest or any(c in rest for c in "/?#@, \t"):
        raise InvalidArgument(f"etcd URL {url!r}: expected http://HOST:PORT (one endpoint, "
                              "no path)")
    try:
        parts = urlsplit("//" + rest)
        host, port = parts.hostname, parts.port
    except ValueError as e:
        raise InvalidArgument(f"etcd URL {url!r}: {e}") from None
    if not host or port == 0:
        raise InvalidArgument(f"etcd URL {url!r}: expected http://HOST:PORT")
    if ":" in host:
        host = f"[{host}]"
    return host, port if port is not None else 2379


def check_cluster(name: str) -> str:
    """``name`` if it is a cluster name (``[A-Za-z0-9._-]{1,64}``).

    Raises:
        InvalidArgument: it is not.
    """
    if not isinstance(name, str) or not _CLUSTER.fullmatch(name):
        raise InvalidArgument(f"cluster name {name!r}: use 1 to 64 of A-Z a-z 0-9 . _ -")
    return name


def safety_margin(ttl: float) -> float:
    """Seconds taken off a lease's TTL for a deadline: ``max(SAFETY_MIN, ttl *
    CLOCK_DRIFT_FRACTION)`` (bounded clock-rate drift between hosts, scheduling)."""
    return max(SAFETY_MIN, ttl * CLOCK_DRIFT_FRACTION)


@dataclass(frozen=True)
class _Keys:
    cluster: str

    @property
    def prefix(self) -> bytes:
        return f"{PREFIX}{self.cluster}/".encode()

    @property
    def leader(self) -> bytes:
        return self.prefix + b"leader"

    @property
    def standbys(self) -> bytes:
        return self.prefix + b"standby/"

    def standby(self, ident: str) -> bytes:
        return self.standbys + ident.encode()


def _client(host: str, port: int, timeout: float, watching: bool = True) -> aetcd.Client:
    """An aetcd client (connects lazily; belongs to the event loop it first runs on) whose
    every call has ``timeout`` seconds."""
    options = dict(_CHANNEL, **(_KEEPALIVE if watching else {}))
    return aetcd.Client(host, port, timeout=timeout, options=options)


def _decode(value: bytes) -> dict:
    """A record's JSON object; an unreadable value is shown, not raised."""
    try:
        rec = json.loads(value)
    except ValueError:
        rec = None
    if not isinstance(rec, dict):
        return {"unreadable": value.decode(errors="replace")[:200]}
    return rec


def _leader_record(kv: Any) -> dict:
    """The leader key's record, with its term's ``epoch`` (the key's create_revision)."""
    return {**_decode(kv.value), "epoch": kv.create_revision}


def _range_end(key: bytes) -> bytes:
    """The end of the range holding exactly ``key`` (a read that keeps its revision even
    when the key is absent)."""
    return key + b"\0"


def _prefix_end(prefix: bytes) -> bytes:
    """The end of the range of keys under ``prefix`` (which ends in ``/``)."""
    return prefix[:-1] + bytes([prefix[-1] + 1])


# -- the term ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Renewal:
    """One keepalive of a term's lease (or the grant or keepalive its term started
    from).  Times are ``time.monotonic()`` seconds.

    Attributes:
        sent: when the request was sent (what a deadline counts from).
        received: when the answer, or the error, came.
        ttl: seconds etcd granted; 0: the lease is gone; -1: no answer (``error``).
        error: why it failed, or None.
    """

    sent: float
    received: float
    ttl: int
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.ttl > 0 and self.error is None


class SharedDeadline:
    """A term's deadline shared with the processes that write for it (``serve --etcd
    --workers N``: the supervisor holds the term, its metadata server child writes the
    store): 16 bytes in a memfd, a sequence number (u64, odd while a write is under way)
    and the deadline (a float ``time.monotonic()`` value: CLOCK_MONOTONIC, one clock
    for every process of a host).  One process writes it (:meth:`publish`); readers
    retry a read that overlapped a write (a sequence lock), so no reader ever sees a
    torn value.  Passed to a child by its file descriptor.

    Raises:
        OSError: the memfd cannot be made or mapped.
    """

    _FORMAT = struct.Struct("<Qd")

    def __init__(self, fd: int | None = None):
        self.fd = os.memfd_create("ddsnap-term", 0) if fd is None else fd
        if fd is None:
            os.ftruncate(self.fd, self._FORMAT.size)
        self._map = mmap.mmap(self.fd, self._FORMAT.size)
        self._seq = self._FORMAT.unpack_from(self._map)[0]

    def publish(self, deadline: float) -> None:
        """Make ``deadline`` the shared one (one writer only)."""
        self._seq += 1
        struct.pack_into("<Q", self._map, 0, self._seq)  # odd: being written
        struct.pack_into("<d", self._map, 8, deadline)
        self._seq += 1
        struct.pack_into("<Q", self._map, 0, self._seq)

    def read(self) -> float:
        """The shared deadline (``-inf`` before the first publish)."""
        while True:
            seq, deadline = self._FORMAT.unpack_from(self._map)
            if seq == 0:
                return -math.inf
            if not seq & 1 and struct.unpack_from("<Q", self._map, 0)[0] == seq:
                return deadline

    def close(self) -> None:
        self._map.close()
        with contextlib.suppress(OSError):
            os.close(self.fd)


class _Fence:
    """What both kinds of term share: :meth:`valid` from their ``check``."""

    def check(self) -> None:
        raise NotImplementedError

    def valid(self) -> bool:
        """Whether this process may write now (False for good once False)."""
        try:
            self.check()
        except Fenced:
            return False
        return True


class BorrowedTerm(_Fence):
    """The term of another process (the supervisor that won the election), as the
    metadata server child of ``serve --etcd --workers N`` sees it: its epoch, and a
    fence that reads the deadline the supervisor keeps in a :class:`SharedDeadline`.
    A stale read only makes the deadline earlier (the supervisor only raises it while
    the term lasts, and drops it to ``-inf`` when it ends), so it errs on the safe
    side.  Same interface as :class:`Term` for :class:`~ddsnap.daemon.Daemon`."""

    def __init__(self, cluster: str, epoch: int, shared: SharedDeadline):
        self.cluster = cluster
        self.epoch = epoch
        self.shared = shared

    def check(self) -> None:
        """Return if the term lets this process write now.

        Raises:
            Fenced: the shared deadline has passed.
        """
        if time.monotonic() < self.shared.read():
            return
        raise Fenced(f"cluster {self.cluster}: the metadata server's term of epoch "
                     f"{self.epoch} is over (its lease was not renewed in time); it may "
                     "not write the store")


class Term(_Fence):
    """A won election: this process serves the cluster until its deadline.

    Attributes:
        cluster: the cluster's name.
        epoch: the leader key's create_revision (greater for every later term).
        since: wall-clock ns since the Unix epoch when it was elected (for display).
        record: what the leader key holds (JSON object).
        ttl: seconds of the lease etcd granted.
        safety: seconds taken off for the deadline (:func:`safety_margin`).
        lease_id: the etcd lease.
        deadline: ``time.monotonic()`` value until which this process may write;
            ``-inf`` once the term is over.  Written by the event loop, read anywhere.
        renewed_until: the deadline the last successful keepalive gave (kept after the
            term is over: what it was when it ended).
        renewals: the last keepalives (:class:`Renewal`), the first being the grant or
            keepalive the term started from.
        reason: why the term ended (None while it lasts).
        ended_at: ``time.monotonic()`` when the event loop ended it (None while it lasts).
        ended: set when the term is over (an asyncio.Event of the election's loop).
        mirror: a :class:`SharedDeadline` kept equal to ``deadline`` (None: none), for
            child processes that write for this term.
    """

    mirror: SharedDeadline | None = None

    @property
    def deadline(self) -> float:
        return self._deadline

    @deadline.setter
    def deadline(self, value: float) -> None:
        self._deadline = value
        if self.mirror is not None:
            self.mirror.publish(value)

    def share(self) -> SharedDeadline:
        """The deadline shared with child processes from now on (made once)."""
        with self._lock:
            if self.mirror is None:
                self.mirror = SharedDeadline()
                self.mirror.publish(self._deadline)
            return self.mirror

    def __init__(self, cluster: str, epoch: int, since: int, record: dict, lease_id: int,
                 basis: Renewal):
        self.cluster = cluster
        self.epoch = epoch
        self.since = since
        self.record = record
        self.lease_id = lease_id
        self.ttl = basis.ttl
        self.safety = safety_margin(basis.ttl)
        self.renewed_until = basis.sent + basis.ttl - self.safety
        self.deadline = self.renewed_until
        self.renewals: deque[Renewal] = deque([basis], maxlen=RENEWAL_HISTORY)
        self.reason: str | None = None
        self.ended_at: float | None = None
        self.ended = asyncio.Event()
        # Guards the one transition of the fence from up to down: a check in any thread
        # that finds the deadline passed drops it for good, and a renewal may raise the
        # deadline only while it has not passed, so no write is refused and a later one
        # allowed.
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        state = f"over: {self.reason}" if self.reason else f"deadline {self.deadline:.3f}"
        return f"Term(cluster={self.cluster!r}, epoch={self.epoch}, {state})"

    def check(self) -> None:
        """Return if this process may write now; cheap, for any thread.

        Raises:
            Fenced: the deadline has passed or the term is over (and stays so).
        """
        if time.monotonic() < self.deadline:  # one float read: no lock on the way
            return
        with self._lock:
            if time.monotonic() < self.deadline:  # renewed meanwhile
                return
            self.deadline = -math.inf
        why = self.reason or "its lease was not renewed in time"
        raise Fenced(f"cluster {self.cluster}: the metadata server's term of epoch "
                     f"{self.epoch} is over ({why}); it may not write the store")


    def remaining(self) -> float:
        """Seconds until the deadline (negative once past; -inf once over)."""
        return self.deadline - time.monotonic()

    def renewed(self, r: Renewal) -> None:
        """Record keepalive ``r``; a successful one moves the deadline to ``r.sent + r.ttl
        - safety``.  One that comes after the deadline passed ends the term instead
        (threads may have been refused already).  Event loop only."""
        self.renewals.append(r)
        if not r.ok or self.ended.is_set():
            return
        with self._lock:
            alive = time.monotonic() < self.deadline
            if alive:
                # from when it was SENT: etcd received it later, so expires it later
                self.renewed_until = r.sent + r.ttl - self.safety
                self.deadline = self.renewed_until
        if not alive:
            self.end("the deadline passed before a keepalive was answered")

    def end(self, reason: str) -> bool:
        """End the term: :meth:`check` raises from now on.  Idempotent; returns whether
        this call ended it.  Event loop only."""
        with self._lock:
            first = not self.ended.is_set()
            if first:
                self.reason = reason  # before the fence drops: a refused write says why
            self.deadline = -math.inf
        if first:
            self.ended_at = time.monotonic()
            self.ended.set()
        return first


# -- the election --------------------------------------------------------------------------


class _SessionGone(Exception):
    """The lease a campaign stands on is gone: register again on a new one."""


@dataclass(eq=False)
class _Session:
    """This process's lease, kept alive by ``task``."""

    lease_id: int
    ttl: int
    basis: Renewal  # the last successful grant or keepalive
    gone: asyncio.Event
    registered: bool = False  # its standby record is written
    term: Term | None = None
    task: asyncio.Task | None = None


class Election:
    """This process's candidacy for cluster ``cluster`` at etcd ``url``.

    Args:
        url: ``http://HOST:PORT`` of etcd (:func:`parse_etcd_url`).
        cluster: the cluster's name.
        record: a JSON object published as this process's standby and leader record
            (``id`` and ``since`` are added).
        ttl: seconds of the lease (etcd grants whole seconds, this rounded up, and may
            raise it to its minimum); the term's deadline comes before it runs out.
        ident: this process's id among the standbys (default: host, pid and a random
            part).

    Raises:
        InvalidArgument: a bad URL, cluster name, ident, TTL or record.
    """

    def __init__(self, url: str, cluster: str, record: dict, ttl: float = 5.0,
                 ident: str | None = None):
        self.url = url
        self.host, self.port = parse_etcd_url(url)
        self.cluster = check_cluster(cluster)
        if not (isinstance(ttl, int | float) and math.isfinite(ttl) and ttl >= 1):
            raise InvalidArgument(f"lease TTL {ttl!r}: at least 1 second")
        self.lease_ttl = math.ceil(ttl)
        if ident is None:
            ident = re.sub(r"[^A-Za-z0-9._-]", "_",
                           f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}")[-64:]
        if not _CLUSTER.fullmatch(ident):
            raise InvalidArgument(f"election id {ident!r}: use 1 to 64 of A-Z a-z 0-9 . _ -")
        self.ident = ident
        if not isinstance(record, dict):
            raise InvalidArgument("an election record is a dict (a JSON object)")
        try:
            json.dumps(record)
        except (TypeError, ValueError) as e:
            raise InvalidArgument(f"election record is not JSON: {e}") from None
        self.record = dict(record)
        self.keys = _Keys(self.cluster)
        #: the client for everything but keepalives (reads, transactions, watches)
        self.client = _client(self.host, self.port, ETCD_TIMEOUT)
        self._renewer: aetcd.Client | None = None
        self._renew_timeout = self.lease_ttl / 3
        self._session: _Session | None = None
        self._term: Term | None = None
        self._term_tasks: list[asyncio.Task] = []
        self._background: set[asyncio.Task] = set()
        self._retiring: dict[aetcd.Client, asyncio.Task] = {}
        self._campaigning: asyncio.Task | None = None
        self._closed = False

    @property
    def term(self) -> Term | None:
        """The term this process holds (perhaps over already), or None."""
        return self._term

    # -- campaigning -------------------------------------------------------------------

    async def campaign(self) -> Term:
        """Stand by until this process is elected; return its term, whose keepalives
        (a task) have started.  Survives etcd being unreachable meanwhile (retries with
        backoff, logging); :meth:`close` or cancelling it stops it.

        Raises:
            InvalidArgument: this process holds a term already, campaigns already, or
                the election is closed.
        """
        if self._closed:
            raise InvalidArgument("the election is closed")
        if self._term is not None and not self._term.ended.is_set():
            raise InvalidArgument(f"already elected (epoch {self._term.epoch})")
        if self._campaigning is not None:
            raise InvalidArgument("already campaigning")
        self._campaigning = asyncio.current_task()
        try:
            retrying = AsyncRetrying(
                retry=retry_if_exception_type((*_ETCD_ERRORS, _SessionGone)),
                wait=wait_exponential(multiplier=0.1, min=0.1, max=2.0) + wait_random(0, 0.1),
                before_sleep=self._retrying, reraise=True)
            async for attempt in retrying:
                with attempt:
                    while True:
                        session = await self._standing_session()
                        await self._fresh(session)
                        won = await self._try(session)
                        if isinstance(won, Term):
                            return won
                        if won is not None:
                            await self._wait_vacant(session, won)
        finally:
            self._campaigning = None
        raise AssertionError("unreachable: tenacity never stops")

    def _retrying(self, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        why = "its lease is gone" if isinstance(exc, _SessionGone) else \
            str(exc) or type(exc).__name__
        # the first failure, and then seldom: an outage can last long
        level = logging.WARNING if state.attempt_number in (1, 10) or \
            state.attempt_number % 100 == 0 else logging.DEBUG
        log.log(level, "cluster %s: standing by, etcd at %s: %s (attempt %d, trying again)",
                self.cluster, self.url, why, state.attempt_number)

    async def _standing_session(self) -> _Session:
        """This process's live lease with its standby record on it (a new one if the
        old one is gone)."""
        s = self._session
        if s is None or s.gone.is_set():
            if s is not None:
                self._drop_session(s, revoke=False)
            sent = time.monotonic()
            lease = await self.client.lease(self.lease_ttl)
            basis = Renewal(sent, time.monotonic(), int(lease.ttl))
            s = self._session = _Session(lease.id, int(lease.ttl), basis, asyncio.Event())
            s.task = asyncio.ensure_future(self._keep_alive(s))
            log.info("cluster %s: lease %x of %d s granted", self.cluster, s.lease_id, s.ttl)
        if not s.registered:
            value = self._value(time.time_ns())
            try:
                await self.client.put(self.keys.standby(self.ident), value, lease=s.lease_id)
            except aetcd.ClientError as e:
                self._lease_error(s, e)
                raise
            s.registered = True
        return s

    async def _fresh(self, s: _Session) -> None:
        """Renew ``s``'s lease now if its last keepalive would leave a term less than a
        renewal interval (keepalives failed, as in an etcd outage): a term is born with
        the deadline of the lease's last keepalive, and one born past it is lost at once.

        Raises:
            aetcd.ClientError: the keepalive failed.
            _SessionGone: the lease is gone.
        """
        if s.basis.sent + s.ttl - safety_margin(s.ttl) - time.monotonic() >= s.ttl / 3:
            return
        sent = time.monotonic()
        ttl = await self.keepalive(s.lease_id)
        if ttl <= 0:
            s.gone.set()
            raise _SessionGone()
        if sent > s.basis.sent:  # (the keepalive task may have renewed it meanwhile)
            s.basis = Renewal(sent, time.monotonic(), ttl)

    def _value(self, since: int) -> bytes:
        return json.dumps({**self.record, "id": self.ident, "since": since}).encode()

    def _lease_error(self, s: _Session, e: Exception) -> None:
        if "lease not found" in str(e):  # expired or revoked while we could not tell
            s.gone.set()

    async def _try(self, s: _Session) -> Term | int | None:
        """One transaction: create the leader key on our lease if it is absent.  Returns
        the won term, the revision at which the key was read (held by another), or None
        (try again at once)."""
        since = time.time_ns()
        t = self.client.transactions
        key = self.keys.leader
        try:
            ok, responses = await self.client.transaction(
                compare=[t.create(key) == 0],
                success=[t.put(key, self._value(since), lease=s.lease_id)],
                failure=[t.get(key)])
        except aetcd.ClientError as e:
            self._lease_error(s, e)
            raise
        if ok:
            # the put's revision is the key's create_revision: the epoch
            return await self._won(s, responses[0].response_put.header.revision, since)
        if not responses[0]:  # cannot be (the compare saw the key, atomically): try again
            return None
        value, kv = responses[0][0]
        if kv.lease == s.lease_id:
            # An earlier attempt of ours created it but its answer was lost (a timeout):
            # the key is on our live lease, so the term is ours.
            return await self._won(s, kv.create_revision, _decode(value).get("since", since))
        log.info("cluster %s: standing by; server %s elected (epoch %d)", self.cluster,
                 _decode(value).get("id"), kv.create_revision)
        return int(kv.header.revision)

    async def _wait_vacant(self, s: _Session, revision: int) -> None:
        """Return when the leader key is deleted after ``revision`` (watched from the
        next revision, so a deletion before the watch started is not missed).

        Raises:
            _SessionGone: our own lease is gone meanwhile.
            aetcd.ClientError: the watch failed (retried by the caller).
        """
        watch = await self.client.watch(self.keys.leader, start_revision=revision + 1,
                                        kind=aetcd.EventKind.DELETE)

        async def deleted() -> bool:
            async for ev in watch:
                if ev.kind == aetcd.EventKind.DELETE:
                    return True
            return False  # the stream ended (the client closed): read again

        waiting = asyncio.ensure_future(deleted())
        gone = asyncio.ensure_future(s.gone.wait())
        try:
            await asyncio.wait([waiting, gone], return_when=asyncio.FIRST_COMPLETED)
            if waiting.done():
                waiting.result()  # its error, if the watch broke
                return
            raise _SessionGone()
        finally:
            for task in (waiting, gone):
                task.cancel()
            with contextlib.suppress(*_ETCD_ERRORS, asyncio.CancelledError):
                await asyncio.wait_for(watch.cancel(), ETCD_TIMEOUT)

    async def _won(self, s: _Session, epoch: int, since: int) -> Term:
        term = Term(self.cluster, epoch, since, _decode(self._value(since)), s.lease_id,
                    s.basis)
        s.term = self._term = term
        self._term_tasks = [asyncio.ensure_future(self._watchdog(term)),
                            asyncio.ensure_future(self._guard(term))]
        log.info("cluster %s: elected, epoch %d, lease %x; deadline in %.2f s",
                 self.cluster, epoch, s.lease_id, term.remaining())
        try:
            await self.client.delete(self.keys.standby(self.ident))
        except aetcd.ClientError as e:  # it goes with the lease anyway
            log.warning("cluster %s: could not remove this standby's key: %s", self.cluster, e)
        return term

    # -- keeping the lease -------------------------------------------------------------

    async def keepalive(self, lease_id: int) -> int:
        """One keepalive round trip for ``lease_id`` on the keepalive channel, within
        TTL/3 seconds.  Returns the TTL (s) etcd granted anew, 0 if the lease is gone.
        (A method so that a test can slow it down or stall it.)

        Raises:
            aetcd.ClientError: no answer (ConnectionTimeoutError after the timeout).
        """
        if self._renewer is None:
            # no gRPC keepalive pings here: a stuck keepalive times out and the next one
            # goes over a new channel (a new connection), by the timeout alone
            self._renewer = _client(self.host, self.port, self._renew_timeout,
                                    watching=False)
        reply = await self._renewer.refresh_lease(lease_id)
        if reply is None:
            raise aetcd.ConnectionFailedError("the keepalive stream ended without an answer")
        return int(reply.TTL)

    async def _keep_alive(self, s: _Session) -> None:
        """Renew ``s``'s lease every TTL/3 (at once again, on a new channel, after a
        failure) and move its term's deadline; end the term if etcd says the lease is
        gone."""
        interval = s.ttl / 3
        next_at = s.basis.sent + interval
        failures = 0
        while True:
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            sent = time.monotonic()
            try:
                ttl = await self.keepalive(s.lease_id)
            except _ETCD_ERRORS as e:
                failures += 1
                r = Renewal(sent, time.monotonic(), -1, str(e) or type(e).__name__)
                if s.term is not None:
                    s.term.renewed(r)
                log.log(logging.WARNING if failures == 1 else logging.DEBUG,
                        "cluster %s: lease %x not renewed: %s", self.cluster, s.lease_id,
                        r.error)
                self._retire_renewer()
                next_at = time.monotonic() + RENEW_RETRY_GAP
                continue
            r = Renewal(sent, time.monotonic(), ttl)
            if failures:
                log.info("cluster %s: lease %x renewed again", self.cluster, s.lease_id)
                failures = 0
            if s.term is not None:
                s.term.renewed(r)
            if ttl <= 0:
                s.gone.set()
                log.warning("cluster %s: lease %x is gone (expired or revoked)",
                            self.cluster, s.lease_id)
                if s.term is not None:
                    self._end(s.term, "etcd says its lease is gone", revoke=False)
                return
            if sent > s.basis.sent:
                s.basis = r
            next_at = sent + interval

    def _retire_renewer(self) -> None:
        """The next keepalive goes over a new channel; the old one is closed once the
        calls still on it (a campaign's keepalive) ended by their own timeout: gRPC
        raises CancelledError in a call whose channel is closed under it."""
        client, self._renewer = self._renewer, None
        if client is not None:
            self._retiring[client] = asyncio.ensure_future(self._close_later(client))

    async def _close_later(self, client: aetcd.Client) -> None:
        await asyncio.sleep(self._renew_timeout)
        self._retiring.pop(client, None)
        await _quietly(client.close())

    # -- the term's end ----------------------------------------------------------------

    async def _watchdog(self, term: Term) -> None:
        """End ``term`` when its deadline passes (the keepalives may be stuck)."""
        while not term.ended.is_set():
            left = term.deadline - time.monotonic()
            if left <= 0:
                self._end(term, "its lease was not renewed before the deadline")
                return
            await asyncio.sleep(left)

    async def _guard(self, term: Term) -> None:
        """End ``term`` if anyone else deletes or overwrites the leader key."""
        backoff = 0.1
        while not term.ended.is_set():
            try:
                watch = await self.client.watch(self.keys.leader,
                                                start_revision=term.epoch + 1)
                try:
                    async for ev in watch:
                        what = "deleted" if ev.kind == aetcd.EventKind.DELETE else "overwritten"
                        self._end(term, f"its leader key was {what} at revision "
                                        f"{ev.kv.mod_revision}")
                        return
                finally:
                    with contextlib.suppress(*_ETCD_ERRORS):
                        await asyncio.wait_for(watch.cancel(), ETCD_TIMEOUT)
            except aetcd.RevisionCompactedError:
                # the history since our creation is gone: compare the key itself
                with contextlib.suppress(*_ETCD_ERRORS):
                    kv = await self.client.get(self.keys.leader)
                    if kv is None or kv.create_revision != term.epoch:
                        self._end(term, "its leader key was replaced")
                        return
            except _ETCD_ERRORS as e:
                log.debug("cluster %s: watching the leader key: %s", self.cluster, e)
            await asyncio.sleep(backoff)
            backoff = min(2.0, backoff * 2)

    def _end(self, term: Term, reason: str, revoke: bool = True) -> None:
        """End ``term`` (the fence drops first), stop its tasks and keepalives, and
        (``revoke``) give its lease back in the background."""
        if term.end(reason):
            log.warning("cluster %s: the term of epoch %d is over: %s", self.cluster,
                        term.epoch, reason)
        me = asyncio.current_task()
        if term is self._term:
            for task in self._term_tasks:
                if task is not me:
                    task.cancel()
        s = self._session
        if s is not None and s.term is term:
            self._drop_session(s, revoke=revoke)

    def _drop_session(self, s: _Session, revoke: bool) -> None:
        if s.task is not None and s.task is not asyncio.current_task():
            s.task.cancel()
        if self._session is s:
            self._session = None
        if revoke:
            task = asyncio.ensure_future(self._revoke(s.lease_id))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _revoke(self, lease_id: int) -> bool:
        try:
            await self.client.revoke_lease(lease_id)
            return True
        except aetcd.ClientError as e:
            if "lease not found" in str(e):
                return True
            log.warning("cluster %s: could not revoke lease %x (it expires by itself): %s",
                        self.cluster, lease_id, e)
            return False

    async def lost(self, term: Term) -> str:
        """Wait until ``term`` is over: a keepalive found the lease gone, its deadline
        passed without a successful keepalive, or someone else deleted or overwrote the
        leader key (or it was resigned or abandoned).  Returns why.  From then on
        ``term.valid()`` is False."""
        await term.ended.wait()
        return term.reason or "over"

    async def resign(self, term: Term) -> bool:
        """End ``term`` and revoke its lease: the leader key goes at once and a standby
        takes over.  Returns whether etcd confirmed (else the lease expires within its
        TTL); raises nothing."""
        was = term.lease_id
        self._end(term, "resigned", revoke=False)
        revoked = await self._revoke(was)
        if revoked:
            log.info("cluster %s: resigned the term of epoch %d", self.cluster, term.epoch)
        return revoked

    async def close(self) -> None:
        """Stop: cancel a campaign in progress (it raises CancelledError), withdraw a
        standby's registration (revoke its lease), stop the keepalives and close the
        clients.  A term still held is *abandoned*, not resigned: it ends here (its fence
        drops) but etcd expires its lease only after the TTL; :meth:`resign` first for
        a quick handover."""
        self._closed = True
        if self._campaigning is not None and self._campaigning is not asyncio.current_task():
            self._campaigning.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait([self._campaigning])
        term = self._term
        if term is not None and not term.ended.is_set():
            self._end(term, "abandoned (the election was closed)", revoke=False)
        s = self._session
        if s is not None:
            self._drop_session(s, revoke=s.term is None)
        stopping = [t for t in [*self._term_tasks, *([s.task] if s and s.task else [])]
                    if not t.done()]
        for task in stopping:
            task.cancel()
        # (their clean-up uses the client: let it finish before the client closes)
        if stopping or self._background:
            await asyncio.wait([*stopping, *self._background], timeout=ETCD_TIMEOUT)
        await _quietly(self.client.close())
        retired, self._retiring = self._retiring, {}
        for task in retired.values():
            task.cancel()
        for client in [*retired, *([self._renewer] if self._renewer else [])]:
            await _quietly(client.close())
        self._renewer = None


async def _quietly(aw: Awaitable[Any]) -> None:
    with contextlib.suppress(*_ETCD_ERRORS, asyncio.TimeoutError):
        await asyncio.wait_for(aw, ETCD_TIMEOUT)


# -- readers -------------------------------------------------------------------------------


async def _query(url: str, cluster: str, timeout: float,
                 ask: Callable[[aetcd.Client, _Keys], Awaitable[Any]]) -> Any:
    host, port = parse_etcd_url(url)
    keys = _Keys(check_cluster(cluster))
    client = _client(host, port, timeout, watching=False)
    try:
        return await ask(client, keys)
    except _ETCD_ERRORS as e:
        raise EtcdUnavailable(url, str(e) or type(e).__name__) from None
    finally:
        await _quietly(client.close())


async def _ttl_left(client: aetcd.Client, lease_id: int) -> int:
    """Seconds etcd gives the lease still (-1: gone; 0 for a key without a lease)."""
    if not lease_id:
        return 0
    return int((await client.get_lease_info(lease_id, keys=False)).TTL)


async def leader(url: str, cluster: str, timeout: float = ETCD_TIMEOUT) -> dict | None:
    """The elected server's record, with ``epoch`` and ``lease_ttl_left`` (whole seconds
    etcd gives its lease still), or None if no server is elected.  Two reads, each
    within ``timeout`` seconds.

    Raises:
        InvalidArgument: a bad URL or cluster name.
        EtcdUnavailable: etcd did not answer in time.
    """
    async def ask(client: aetcd.Client, keys: _Keys) -> dict | None:
        kv = await client.get(keys.leader)
        if kv is None:
            return None
        return {**_leader_record(kv), "lease_ttl_left": await _ttl_left(client, kv.lease)}

    return await _query(url, cluster, timeout, ask)


async def status(url: str, cluster: str, timeout: float = ETCD_TIMEOUT) -> dict:
    """``{"cluster": NAME, "leader": record | None, "standbys": [record, ...]}``, read
    at one revision: the leader's record with ``epoch``, ``since`` (wall-clock ns) and
    ``lease_ttl_left`` (s); the standbys' records (with ``id`` and ``since``) by id.

    Raises:
        InvalidArgument: a bad URL or cluster name.
        EtcdUnavailable: etcd did not answer in time.
    """
    async def ask(client: aetcd.Client, keys: _Keys) -> dict:
        t = client.transactions
        _, (lead, standbys) = await client.transaction(
            compare=[], success=[t.get(keys.leader),
                                 t.get(keys.standbys, _prefix_end(keys.standbys))],
            failure=[])
        rec = None
        if lead:
            kv = lead[0][1]
            rec = {**_leader_record(kv), "lease_ttl_left": await _ttl_left(client, kv.lease)}
            rec.setdefault("since", None)
        waiting = []
        for value, kv in standbys:
            ident = kv.key[len(keys.standbys):].decode(errors="replace")
            if rec is not None and rec.get("id") == ident:
                continue  # just elected, its standby key not removed yet
            waiting.append({**_decode(value), "id": ident})
        return {"cluster": keys.cluster, "leader": rec,
                "standbys": sorted(waiting, key=lambda r: r["id"])}

    return await _query(url, cluster, timeout, ask)


async def follow(url: str, cluster: str,
                 timeout: float = ETCD_TIMEOUT) -> AsyncGenerator[dict | None, None]:
    """Yield the elected server's record (as :func:`leader` without ``lease_ttl_left``)
    or None now, and again at every change: a new term (even a delete and a put in quick
    succession: it watches from the revision it read), a resignation, an expiry.  While
    etcd cannot be reached it retries with backoff (logging) and yields nothing; it never
    ends by itself.  Close it (``contextlib.aclosing``) to release its client.

    Raises:
        InvalidArgument: a bad URL or cluster name (at the first iteration).
    """
    host, port = parse_etcd_url(url)
    keys = _Keys(check_cluster(cluster))
    client = _client(host, port, timeout)
    last: object = _NOTHING
    backoff = 0.1
    try:
        while True:
            try:
                got = await client.get_range(keys.leader, _range_end(keys.leader))
                rec = _leader_record(got[0]) if got.kvs else None
                if rec != last:
                    last = rec
                    yield rec
                watch = await client.watch(keys.leader,
                                           start_revision=got.header.revision + 1)
                try:
                    async for ev in watch:
                        backoff = 0.1
                        rec = None if ev.kind == aetcd.EventKind.DELETE else \
                            _leader_record(ev.kv)
                        if rec != last:
                            last = rec
                            yield rec
                finally:
                    with contextlib.suppress(*_ETCD_ERRORS):
                        await asyncio.wait_for(watch.cancel(), ETCD_TIMEOUT)
            except _ETCD_ERRORS as e:
                log.log(logging.WARNING if backoff >= 2.0 else logging.DEBUG,
                        "cluster %s: following the leader at %s: %s", cluster, url, e)
            await asyncio.sleep(backoff)
            backoff = min(2.0, backoff * 2)
    finally:
        await _quietly(client.close())


# -- the node list the elected server publishes ---------------------------------------------


async def publish_nodes(url: str, cluster: str, term: Term, nodes: list[dict],
                        timeout: float = ETCD_TIMEOUT) -> bool:
    """Record ``nodes`` (what the server's ``nodes`` says of each attached node: JSON
    objects with at least ``name``) as the cluster's node list, only while ``term`` holds
    the leader key (one transaction comparing its ``create_revision`` with the epoch):
    a stale server cannot overwrite its successor's list.  The key has no lease: the
    next server reads it to know whose lock uploads to wait for.  Returns whether it
    was written.

    Raises:
        EtcdUnavailable: etcd did not answer in time.
    """
    value = json.dumps(nodes, sort_keys=True).encode()

    async def ask(client: aetcd.Client, keys: _Keys) -> bool:
        t = client.transactions
        ok, _ = await client.transaction(
            compare=[t.create(keys.leader) == term.epoch],
            success=[t.put(keys.prefix + b"nodes", value)], failure=[])
        return bool(ok)

    return await _query(url, cluster, timeout, ask)


async def nodes(url: str, cluster: str, timeout: float = ETCD_TIMEOUT) -> list[dict]:
    """The node list the last elected server published (:func:`publish_nodes`), or [].

    Raises:
        InvalidArgument: a bad URL or cluster name.
        EtcdUnavailable: etcd did not answer in time.
    """
    async def ask(client: aetcd.Client, keys: _Keys) -> list[dict]:
        kv = await client.get(keys.prefix + b"nodes")
        if kv is None:
            return []
        try:
            got = json.loads(kv.value)
        except ValueError:
            return []
        return [n for n in got if isinstance(n, dict) and isinstance(n.get("name"), str)] \
            if isinstance(got, list) else []

    return await _query(url, cluster, timeout, ask)
