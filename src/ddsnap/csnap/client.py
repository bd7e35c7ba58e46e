"""A node's side of the csnap protocol: :class:`RemoteService`, the metadata seam over a
socket.

A worker process (later a client host) opens the origin and the store's device itself
and builds its volumes on a :class:`RemoteService`: the same
:class:`~ddsnap.service.api.MetadataService` the volumes use in one process, answered by
a :class:`~ddsnap.csnap.server.MetadataServer` over a unix socket.  Every question the
volumes ask becomes a query message; many threads may ask at once (requests are
pipelined on the one connection, replies matched by id by a reader thread).  What a
node must know without asking (the snapshot list, whether a merge runs) it caches from
the server's NOTICE messages, acknowledging those the server waits for.  What it holds
(read locks per chunk, origin writes in flight) it counts, to upload them to a restarted
server (seed 000 ``UPLOAD_LOCK``).  Origin chunks the server granted (made unique, and
unique until the next snapshot of the origin) it writes again without asking, until the
server revokes the grants; it then acknowledges once its granted writes in flight are
done.  Snapshot read mappings the server marks keepable it keeps after the read (origin
ones with their read locks), and reads those chunks again with no query until the
server recalls or revokes them (docs/protocol.md "Read mappings a node keeps").

Source of the idea: seed 000 (csnap's client side in ``ddsnap-agent`` and the device
mapper target: ``QUERY_WRITE``, ``QUERY_SNAPSHOT_READ``, ``FINISH_SNAPSHOT_READ``).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import socket
import ssl
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import tenacity

from ddsnap.errors import (
    DdsnapError,
    InvalidArgument,
    ProtocolError,
    ServiceFailed,
    TlsRefused,
)
from ddsnap.service.api import (
    DataDevices,
    Finding,
    ReadMap,
    ServiceStatistics,
    SnapshotInfo,
    StoreStatus,
    find_snapshot,
)
from ddsnap.service.chunkset import ChunkSet

from . import tls
from .net import tune_tcp
from .protocol import Connection, Role
from .tls import TlsSocket
from .wire import (
    Call,
    CallOk,
    ErrorReply,
    FinishOriginWrite,
    FinishSnapshotRead,
    FinishUploadLock,
    Identify,
    IdentifyOk,
    Message,
    Notice,
    NoticeAck,
    OriginReadMapReply,
    OriginWriteOk,
    QueryOriginRead,
    QueryOriginWrite,
    QuerySnapshotRead,
    QuerySnapshotWrite,
    ReadMapReply,
    ReturnGrants,
    SnapshotWriteOk,
    UploadLock,
    UploadOk,
    coalesce,
    rebuild_error,
)

log = logging.getLogger("ddsnap.csnap")
M = TypeVar("M", bound=Message)

RECV_BYTES = 1 << 16
#: most snapshot chunk mappings a node keeps; reaching it drops them all.  A kept origin
#: mapping costs about 600 bytes over the node and the metadata server (the mapping, and
#: its read lock counted by the node, its session and the service): about 20 MiB at the
#: limit, per node
KEPT_CHUNKS = 1 << 15
#: longest the event loop waits for the kept mappings' lock before a READ asks (s)
NOWAIT_LOCK_WAIT = 0.001
#: after keeping a snapshot read's mapping, a node asks in the background for the rest
#: of its aligned group of this many chunks, to keep it too: a random reader then asks
#: about once per group, not once per chunk
KEEP_GROUP = 64
#: every this many mappings kept after a query, a node judges whether asking for whole
#: groups pays: only if the reads served from kept mappings meanwhile were at least as
#: many (a random reader of a volume far bigger than what is kept would only double
#: the server's work)
PREFETCH_WINDOW = 1024


#: calls a node sends again on a new connection instead of failing them: they change
#: nothing, or (``export_open``) only what the connection they went on counts, which a
#: new connection does not have (the upload declares the exports open before it)
RESENT_CALLS = frozenset({"export_open", "snapshots", "snapshot_space", "changed_chunks",
                          "merge_status", "merge_cursor", "status", "check", "statistics",
                          "nodes"})
#: what a node talks to the server over: a socket, or TLS over a TCP socket
Stream = socket.socket | TlsSocket
#: seconds a TCP connection to the metadata server may take to connect and handshake
CONNECT_TIMEOUT = 10.0


def tcp_connector(host: str, port: int, context: ssl.SSLContext | None,
                  timeout: float = CONNECT_TIMEOUT) -> Callable[[], Stream]:
    """A ``connect`` for :class:`RemoteService` on another host: TCP to
    ``host``:``port``, then a TLS handshake with ``context`` (a client context,
    :func:`ddsnap.csnap.tls.client_context`), or plain text with None
    (``--insecure``).

    The connection gets :func:`~ddsnap.csnap.net.tune_tcp` (no Nagle delay; a dead
    server noticed within seconds), and is blocking once made.

    Raises (when called):
        OSError: no connection within ``timeout`` seconds (refused, unreachable).
        TlsRefused: the TLS handshake failed (a certificate not signed by the cluster
            CA, a server not speaking TLS).
    """

    def connect() -> Stream:
        sock = socket.create_connection((host, port), timeout=timeout)
        try:
            tune_tcp(sock)
            if context is None:
                sock.settimeout(None)
                return sock
            return tls.wrap(sock, context, server_side=False, timeout=timeout)
        except BaseException:
            sock.close()
            raise

    return connect


@dataclass
class _NodeReadMap(ReadMap):
    """A :class:`ReadMap` from the server, with what keeping it needs: the snapshot
    (id and size in bytes) and the node's recall count when it was asked for."""

    snap: int = 0
    seq: int = 0
    size: int = 0


@dataclass
class _KeptReadMap(ReadMap):
    """A :class:`ReadMap` served from mappings this node keeps (no query was sent) for
    snapshot id ``snap``.  ``locked``: its origin chunks, whose kept read locks are not
    given back before its release (a recall or drop meanwhile defers them); ``seq``:
    the drop count when it began, if it reads store chunks (notices acknowledged after
    it wait for its release), else None."""

    snap: int = 0
    seq: int | None = None


class _Pending:
    """A request waiting for its reply (kept to re-send it after a reconnect), and what
    the reader thread does with the reply when nobody waits for it (``then``)."""

    __slots__ = ("event", "msg", "reply", "then")

    def __init__(self, msg: Message, then: Callable[[Message], None] | None = None) -> None:
        self.msg = msg
        self.event = threading.Event()
        self.reply: Message | BaseException | None = None
        self.then = then


class RemoteService:
    """The :class:`~ddsnap.service.api.MetadataService` of a node: every question sent
    to the metadata server over a socket.

    Args:
        connect: ``() -> socket``: a new connection to the
            :class:`~ddsnap.csnap.server.MetadataServer` (called again to reconnect).
        data: the devices this node does its I/O on (opened by the node itself), or None
            for a node that only administers.
        name: a label for the server's node list (a restarted server waits for the
            nodes it expects by these names).
        uuid: the store UUID this node expects (16 bytes; zeros: any).
        reconnect: seconds to keep trying to reach the server again after the
            connection is lost (0: fail every request at once).  Meanwhile requests
            wait; on reconnecting the node uploads what it holds (seed 000
            ``UPLOAD_LOCK``), then re-sends its queries in flight (safe: see
            docs/protocol.md); a CALL in flight fails with ServiceFailed instead, as it
            may or may not have been done.
        keep_group: after keeping a snapshot read's mappings, ask in the background
            for the rest of its aligned group of this many chunks (1: never).
        epochs: the servers are a cluster's, their generation an election epoch: a
            server of an older epoch than one seen is refused (a stale server).

    Raises:
        ProtocolError: the server refused the node or broke the protocol.
        OriginMismatch: the server serves another store.
        ServiceFailed, OSError: no connection, or it ended before the server answered.

    Attributes:
        node: the id the server gave this node; ``generation``: the server's restarts;
        ``reconnects``: how many times the connection was made again.
        held / origin_writes / opens: read locks per chunk, origin writes prepared by a
            query and not finished, and exports open by name (what an upload
            declares).
        granted_writes: origin writes in flight on granted chunks (no query asked).
    """

    def __init__(self, connect: Callable[[], Stream], data: DataDevices | None = None,
                 name: str = "", uuid: bytes = bytes(16), reconnect: float = 0.0,
                 keep_group: int = KEEP_GROUP, epochs: bool = False):
        self._connect = connect
        self.data = data
        self.name = name
        self._uuid = uuid
        self.reconnect = reconnect
        self.reconnects = 0
        #: the server's generation is a cluster's election epoch: never go back to an
        #: older one (``attach --etcd``)
        self.epochs = epochs
        self._newest_generation = 0
        self._lock = threading.Lock()  # the connection, pending requests, holdings
        self._pending: dict[int, _Pending] = {}
        self._ids = itertools.count(1)
        self._lost: BaseException | None = None
        self._ready = threading.Event()  # new requests may be sent
        self._live = False  # the connection has this node's holdings: FINISH goes on it
        self._closing = False
        #: read locks this node holds, per chunk; origin writes prepared, not finished
        self.held: Counter[int] = Counter()
        self.origin_writes = 0
        self.opens: Counter[str] = Counter()
        self.granted_writes = 0
        #: origin chunks the server granted (None: no grant held)
        self._granted: ChunkSet | None = None
        #: the id of a grants-revoked notice to acknowledge when granted_writes is 0
        self._revoke_ack: int | None = None
        #: snapshot read mappings this node keeps: snapshot id -> {chunk: store chunk,
        #: or None for the origin, whose read lock the node keeps with it}
        self._kept: dict[int, dict[int, int | None]] = {}
        self._kept_count = 0
        #: counts recalls and drops of kept mappings: a map asked for before one is
        #: not kept (it may be what was recalled)
        self._kept_seq = 0
        self._kept_lock = threading.Lock()  # taken before _lock, never after
        #: origin chunks that reads in threads are reading through kept mappings now
        #: (map_snapshot_read with no query), and the read locks whose giving back
        #: waits for those reads: a recall, drop or lost connection defers the locks
        #: of chunks in use (still held, and uploaded) until their reads end
        self._kept_readers: Counter[tuple[int, int]] = Counter()  # (snapshot, chunk)
        self._deferred: Counter[tuple[int, int]] = Counter()
        #: such reads that read store chunks, by the drop count when they began; and
        #: the acknowledgements of notices (a delete, a revocation) that wait for those
        #: begun before them: the server may free or reuse the chunks once acknowledged
        self._store_reads: Counter[int] = Counter()
        self._acks_waiting: list[tuple[int, int]] = []  # (notice id, drop count)
        #: (snapshot id, first chunk) of the groups asked for in the background
        self._prefetching: set[tuple[int, int]] = set()
        self.keep_group = keep_group
        #: reads served from kept mappings and mappings kept after a query, in this
        #: PREFETCH_WINDOW; whether groups are asked for in the background now
        self._window_hits = 0
        self._window_keeps = 0
        self.prefetching = True
        self.prefetch_window = PREFETCH_WINDOW
        self._snaps: tuple[SnapshotInfo, ...] = ()
        self._merging: int | None = None
        self._origin_size = 0
        self.sock, self.conn = self._first_connection()
        self._live = True
        self._ready.set()
        self._reader = threading.Thread(target=self._run, name="ddsnap-csnap-reader",
                                        daemon=True)
        self._reader.start()

    # -- the connection ------------------------------------------------------------------

    def _retrying(self, again: bool = False) -> tenacity.Retrying:
        """Attempts at a connection for ``reconnect`` seconds, backing off.  A TLS
        handshake that fails is given up at once on the first connection (a wrong
        certificate is the usual cause, and the user should hear of it), but tried
        again on reconnecting (a server dying mid-handshake, a failover)."""
        retried: tuple[type[BaseException], ...] = (OSError, ServiceFailed)
        if again:
            retried += (TlsRefused,)

        told: set[str] = set()

        def tell(state: tenacity.RetryCallState) -> None:
            # each new kind of failure is worth a line (the user waits meanwhile)
            e = state.outcome.exception() if state.outcome is not None else None
            if e is not None and type(e).__name__ not in told:
                told.add(type(e).__name__)
                log.warning("csnap node %s: the metadata server cannot be reached yet "
                            "(trying again for up to %gs): %s", self.name or "-",
                            self.reconnect, e)

        return tenacity.Retrying(
            stop=tenacity.stop_after_delay(self.reconnect),
            wait=tenacity.wait_exponential(multiplier=0.01, max=1.0),
            retry=tenacity.retry_if_exception_type(retried),
            before_sleep=tell, reraise=True)

    def _first_connection(self) -> tuple[Stream, Connection]:
        """The first connection; a server that is (re)starting is waited for up to
        ``reconnect`` seconds."""
        if self.reconnect <= 0:
            return self._establish(upload=False)
        for attempt in self._retrying():
            with attempt:
                return self._establish(upload=False)
        raise AssertionError("unreachable: tenacity reraises the last error")

    def _establish(self, upload: bool) -> tuple[Stream, Connection]:
        """Connect, IDENTIFY, upload what this node holds (``upload``), learn the
        snapshots: the whole handshake, reading the socket directly (no reader thread
        runs meanwhile).  Returns the socket and its protocol state."""
        sock = self._connect()
        conn = Connection(Role.NODE)
        try:
            self._hello(sock, conn, Identify(0, name=self.name, uuid=self._uuid),
                        IdentifyOk)
            if upload:
                with self._lock:
                    # From here FINISH messages go on this connection, after the upload
                    # (both under this lock), so the server's counts stay exact.
                    self.sock, self.conn = sock, conn
                    locks = coalesce(sorted(self.held.elements()))
                    sock.sendall(conn.send(UploadLock(0, locks, self.origin_writes)))
                    self._live = True
                    opens = list(self.opens.elements())
                # (no request is sent meanwhile: new ones wait for the reconnection)
                for name in opens:
                    self._hello(sock, conn, Call(0, "export_open", {"name": name}), CallOk)
                self._hello(sock, conn, FinishUploadLock(0), UploadOk)
            r = self._hello(sock, conn, Call(0, "snapshots", {}), CallOk).result
        except BaseException:
            with self._lock:
                self._live = False
            with contextlib.suppress(OSError):
                sock.close()
            raise
        self._take_snapshot_list(r)
        return sock, conn

    def _take_snapshot_list(self, r: object) -> None:
        """Cache the answer of ``CALL snapshots``: the list, the merge, the origin size."""
        if not isinstance(r, dict):
            raise ProtocolError("csnap server answered the snapshot list with no object")
        self._snaps = tuple(SnapshotInfo.from_wire(d) for d in r["snapshots"])
        self._merging = r["merging"]
        self._origin_size = r["origin_size"]

    def _hello(self, sock: Stream, conn: Connection, msg: Message,
               want: type[M]) -> M:
        """Send ``msg`` and read until its reply (handshake only: notices that come
        meanwhile are applied and acknowledged here)."""
        msg.id = next(self._ids)
        with self._lock:  # FINISH messages of other threads may go on it meanwhile
            sock.sendall(conn.send(msg))
        while True:
            with self._lock:
                reply = conn.next_message()
            if reply is None:
                data = sock.recv(RECV_BYTES)
                if not data:
                    if isinstance(msg, Identify):
                        raise ServiceFailed(
                            "the metadata server closed the connection without answering "
                            "IDENTIFY (a server that requires TLS does so to a node "
                            "connecting in plain text; its log says why)")
                    raise ServiceFailed("the metadata server closed the connection")
                with self._lock:
                    conn.receive_data(data)
                continue
            if isinstance(reply, Notice):
                self._apply(reply.event)
                if reply.id:
                    with self._lock:
                        sock.sendall(conn.send(NoticeAck(reply.id)))
                continue
            if isinstance(reply, ErrorReply) and reply.id == msg.id:
                raise reply.exception()
            if reply.id != msg.id or not isinstance(reply, want):
                raise ProtocolError(f"csnap server answered {type(msg).__name__} with "
                                    f"{type(reply).__name__}")
            if isinstance(reply, IdentifyOk):
                if self.epochs and reply.generation < self._newest_generation:
                    # A cluster's server of an older election epoch (a stale one, woken
                    # after a failover) is not asked anything: issue 12's fencing.
                    raise ServiceFailed(
                        f"the metadata server is of generation (epoch) {reply.generation}, "
                        f"older than {self._newest_generation} this node has seen: a "
                        "stale server, not used")
                self._newest_generation = reply.generation
                self.node = reply.node
                self.generation = reply.generation
                self.uuid = reply.uuid
                self.chunk_size = reply.chunk_size
            return reply

    def _run(self) -> None:
        """The reader: replies to waiters, notices applied; a lost connection made again
        (within ``reconnect`` seconds) or every waiter failed."""
        while True:
            why = self._read(self.sock, self.conn)
            if self._closing:
                self._lose(why)
                return
            log.warning("csnap node %s lost the metadata server: %s", self.name, why)
            with self._lock:
                self._live = False
                # Grants are void with the connection (the server gives up on a node
                # that is gone); granted writes in flight become origin writes that the
                # upload declares and FINISH_ORIGIN_WRITE ends.
                self._granted = None
                self._revoke_ack = None
                self.origin_writes += self.granted_writes
                self.granted_writes = 0
            # Kept mappings go with the server that kept their locks: a new one may
            # let the origin be written under them (the upload declares none of them,
            # except those reads in threads still use: they are given back after).
            self._release_locks(self._drop_kept(), send=False)
            with self._kept_lock:
                self._acks_waiting.clear()  # (the old connection's notices)
            if not self._reestablish():
                self._lose(why)
                return

    def _read(self, sock: Stream, conn: Connection) -> BaseException:
        """Read ``sock`` until it fails; what ended it."""
        try:
            while True:
                data = sock.recv(RECV_BYTES)
                with self._lock:
                    conn.receive_data(data)
                    msgs = []
                    while (m := conn.next_message()) is not None:
                        msgs.append(m)
                for m in msgs:
                    self._deliver(m)
                if not data:
                    return ServiceFailed("the metadata server closed the connection")
        except (OSError, DdsnapError) as e:
            return e

    def _reestablish(self) -> bool:
        """Connect again, upload, re-send the queries in flight; False if that did not
        work within ``reconnect`` seconds (or the node is closing)."""
        self._ready.clear()
        with contextlib.suppress(OSError):
            self.sock.close()
        if self.reconnect <= 0:
            return False
        try:
            for attempt in self._retrying(again=True):
                with attempt:
                    if self._closing:
                        return False
                    self._establish(upload=True)
        except (OSError, DdsnapError) as e:
            log.warning("csnap node %s could not reach the metadata server again: %s",
                        self.name, e)
            return False
        self.reconnects += 1
        with self._lock:
            again = list(self._pending.values())
        for w in again:
            if isinstance(w.msg, Call) and w.msg.op not in RESENT_CALLS:
                with self._lock:
                    self._pending.pop(w.msg.id, None)
                w.reply = ServiceFailed("the connection to the metadata server was lost "
                                        f"during {w.msg.op}; it may or may not have been "
                                        "done")
                w.event.set()
            else:
                with contextlib.suppress(ServiceFailed):
                    self._send(w.msg)
        self._ready.set()
        return True

    def _send(self, msg: Message) -> None:
        with self._lock:
            if self._lost is not None:
                raise self._failed()
            data = self.conn.send(msg)
            try:
                self.sock.sendall(data)
            except OSError as e:
                raise ServiceFailed(f"lost the metadata server: {e}") from e

    def _finish(self, update: Callable[[], Message | None]) -> None:
        """Change what this node holds (``update``, which returns the message that tells
        the server, if any) and send that message, both under the lock: a connection
        being made again uploads the holdings as they are, and a FINISH goes only where
        its lock was uploaded."""
        with self._lock:
            msg = update()
            if msg is not None and self._live:
                with contextlib.suppress(OSError):
                    self.sock.sendall(self.conn.send(msg))

    def _submit(self, msg: Message, then: Callable[[Message], None]) -> None:
        """Send a request whose reply the reader thread hands to ``then`` (not called
        if the connection is lost for good; re-sent after a reconnect).  Never waits
        for a reconnection: ServiceFailed while there is no connection."""
        if not self._ready.is_set():
            raise ServiceFailed("no connection to the metadata server now")
        self._send_pending(_Pending(msg, then))

    def _send_pending(self, waiter: _Pending) -> None:
        """Give ``waiter``'s request an id, record it as waiting and send it; a send
        that fails while the connection is being made again is left to the reader
        (which re-sends it), else ServiceFailed."""
        msg = waiter.msg
        with self._lock:
            msg.id = next(self._ids)
            self._pending[msg.id] = waiter
        try:
            self._send(msg)
        except ServiceFailed:
            if self.reconnect <= 0 or self._lost is not None:
                with self._lock:
                    self._pending.pop(msg.id, None)
                raise

    def _request(self, msg: Message, want: type[M]) -> M:
        """Send a request and wait for its reply (raising the error it carries); while
        the connection is being made again, wait for it."""
        while not self._ready.wait(1.0):
            if self._lost is not None:
                raise self._failed()
        waiter = _Pending(msg)
        self._send_pending(waiter)
        waiter.event.wait()
        reply = waiter.reply
        if isinstance(reply, BaseException):
            raise reply
        if isinstance(reply, ErrorReply):
            raise reply.exception()
        if not isinstance(reply, want):
            raise ProtocolError(f"csnap server answered {type(msg).__name__} with "
                                f"{type(reply).__name__}")
        return reply

    def _deliver(self, msg: Message) -> None:
        if isinstance(msg, Notice):
            self._apply(msg.event)
            if msg.event["event"] == "grants-revoked":
                self._finish(lambda: self._revoked(msg.id))
            elif msg.id and not self._ack_after_reads(msg.id):
                self._finish(lambda: NoticeAck(msg.id))
            return
        with self._lock:
            waiter = self._pending.pop(msg.id, None)
            if waiter is not None:
                self._count(waiter.msg, msg)
        if waiter is not None:
            waiter.reply = msg
            waiter.event.set()
            if waiter.then is not None:
                waiter.then(msg)

    def _revoked(self, nid: int) -> Message | None:
        """The server revoked the grants (lock held, already cleared by _apply): the
        acknowledgement now, or when the last granted write in flight is done."""
        if self.granted_writes:
            self._revoke_ack = nid
            return None
        return NoticeAck(nid)

    def _count(self, request: Message, reply: Message) -> None:
        """What a reply gives this node to hold, counted as it arrives (lock held), so
        an upload after a reconnect has it even if the requester has not woken yet."""
        if isinstance(reply, OriginWriteOk):
            self.origin_writes += sum(r is None for r in reply.results)
            if reply.granted and isinstance(request, QueryOriginWrite):
                self._grant([r for r, res in zip(request.ranges, reply.results,
                                                 strict=False) if res is None])
        elif (isinstance(reply, CallOk) and isinstance(request, Call)
              and request.op == "export_open"):
            self.opens[request.args["name"]] += 1
        elif isinstance(reply, ReadMapReply) and reply.sources is not None:
            # a snapshot holds the origin chunks it reads; the merging origin, the
            # snapshot's chunks it reads
            origin = isinstance(reply, OriginReadMapReply)
            self.held.update(reply.first + i for i, src in enumerate(reply.sources)
                             if (src is not None) == origin)

    def _grant(self, ranges: list[tuple[int, int]]) -> None:
        """Mark origin chunk ranges granted (lock held)."""
        g = self._granted
        if g is None:
            g = self._granted = ChunkSet()
        for a, b in ranges:
            g.add(a, b)

    def _lose(self, e: BaseException) -> None:
        """The connection is gone for good: every waiting request fails."""
        self._release_locks(self._drop_kept(), send=False)
        with self._lock:
            if self._lost is None:
                self._lost = e
            waiters = list(self._pending.values())
            self._pending.clear()
        self._ready.set()  # waiters wake and see _lost
        err = self._failed()
        for w in waiters:
            w.reply = err
            w.event.set()

    def _failed(self) -> ServiceFailed:
        return ServiceFailed(f"lost the metadata server ({self._lost})")

    @property
    def grants_held(self) -> int:
        """Origin chunks this node may write without asking now (never waits)."""
        with self._lock:
            g = self._granted
            return 0 if g is None else len(g)

    # -- what the node caches ------------------------------------------------------------

    def _refresh(self) -> None:
        """The snapshot list, merge state and origin size asked again."""
        self._take_snapshot_list(self._call("snapshots"))

    def _apply(self, event: dict) -> None:
        """Apply a NOTICE to what this node caches."""
        kind = event["event"]
        if kind == "snapshot-created":
            info = SnapshotInfo.from_wire(event["snapshot"])
            self._snaps = tuple(s for s in self._snaps if s.id != info.id) + (info,)
        elif kind == "snapshot-deleted":
            self._snaps = tuple(s for s in self._snaps if s.id != event["snapshot"])
            self._release_locks(self._drop_kept(event["snapshot"]))
        elif kind == "merge-started":
            self._merging = event["snapshot"]
            self._release_locks(self._drop_kept())
        elif kind == "read-locks-recalled":
            self._release_locks(self._recalled(event["first"], event["last"]))
        elif kind == "read-cache-revoked":
            self._release_locks(self._drop_kept())
        elif kind == "origin-resized":
            self._origin_size = event["size"]
            if self.data is not None:  # (resized by the metadata server already)
                self.data.origin.note_resized(event["size"])
        elif kind == "grants-revoked":
            with self._lock:
                self._granted = None
        elif kind == "merge-ended":
            self._merging = None
            if event.get("deleted"):
                self._snaps = tuple(s for s in self._snaps if s.id != event["snapshot"])
        else:
            log.debug("ignoring csnap notice %s", kind)

    def _call(self, op: str, **args):
        return self._request(Call(0, op, args), CallOk).result

    # -- MetadataService -----------------------------------------------------------------

    @property
    def origin_size(self) -> int:
        """The origin's size in bytes as last heard from the server."""
        return self._origin_size

    def prepare_origin_writes(self, ranges: list[tuple[int, int]]
                              ) -> list[BaseException | None]:
        """Make each range of origin chunks unique (QUERY_ORIGIN_WRITE); per range None
        (prepared: write, then :meth:`finish_origin_write`) or its error; ranges past
        the list were not started.  Ranges all granted need no query."""
        if self._take_granted(ranges):
            return [None] * len(ranges)
        reply = self._request(QueryOriginWrite(0, list(ranges)), OriginWriteOk)
        # (the prepared ones were counted in flight as the reply arrived)
        return [None if r is None else rebuild_error(*r) for r in reply.results]

    def prepare_origin_write(self, first: int, last: int) -> None:
        """Make origin chunks ``first..last`` unique (copy-outs durable, no reader on
        them); then write the origin and call :meth:`finish_origin_write`."""
        (result,) = self.prepare_origin_writes([(first, last)])
        if result is not None:
            raise result

    def prepare_origin_write_nowait(self, first: int, last: int) -> bool:
        """True (a granted write in flight: write, then :meth:`finish_origin_write`) if
        every chunk of ``first..last`` is granted; else False, nothing asked."""
        return self._take_granted([(first, last)])

    def _take_granted(self, ranges: list[tuple[int, int]]) -> bool:
        """If every range is granted, count them as granted writes in flight: True."""
        with self._lock:
            g = self._granted
            if g is None or not all(g.has(a, b) for a, b in ranges):
                return False
            self.granted_writes += len(ranges)
            return True

    def finish_origin_write(self) -> None:
        """An origin write prepared above is done: a granted one counted down (the
        last one acknowledges a revocation waiting for it), else FINISH_ORIGIN_WRITE.

        Which kind ends is not tracked per write: counting granted writes down first
        lets a revocation be acknowledged as soon as as many writes as were granted
        have ended, and the server still counts every write left (as a queried one)."""
        def done() -> Message | None:
            if self.granted_writes:
                self.granted_writes -= 1
                if not self.granted_writes and self._revoke_ack is not None:
                    nid, self._revoke_ack = self._revoke_ack, None
                    return NoticeAck(nid)
                return None
            self.origin_writes -= 1
            return FinishOriginWrite(0, 1)

        self._finish(done)

    def map_snapshot_read(self, snap: SnapshotInfo, first: int, last: int) -> ReadMap:
        """``snap``'s sources for chunks ``first..last``: from the mappings this node
        keeps if it keeps all of them (no round trip; a recall or revocation waits for
        the read), else QUERY_SNAPSHOT_READ (its origin chunks read-locked, and kept
        after the read if the server says it may be, see :meth:`release_read`)."""
        kept = self._use_kept(snap.id, first, last)
        if kept is not None:
            return kept
        seq = self._kept_seq  # (before asking: a recall from now on voids keeping it)
        reply = self._request(QuerySnapshotRead(0, snap.id, first, last), ReadMapReply)
        sources = self._check_map(reply, first, last)
        # (held since the reply arrived: see _count)
        return _NodeReadMap(first, sources,
                            [first + i for i, s in enumerate(sources) if s is None],
                            reply.cacheable, snap.id, seq, snap.size)

    def map_origin_read(self, first: int, last: int) -> ReadMap | None:
        """QUERY_ORIGIN_READ while a merge runs (None: read the origin itself)."""
        if self._merging is None:
            return None
        reply = self._request(QueryOriginRead(0, first, last), ReadMapReply)
        if reply.sources is None:
            self._merging = None  # the merge ended; its notice may still be on its way
            return None
        sources = self._check_map(reply, first, last)
        return ReadMap(first, sources,
                       [first + i for i, s in enumerate(sources) if s is not None])

    @staticmethod
    def _check_map(reply: ReadMapReply, first: int, last: int) -> list[int | None]:
        sources = reply.sources
        if sources is None or reply.first != first or len(sources) != last - first + 1:
            raise ProtocolError(f"csnap server mapped chunks {first}..{last} with a map "
                                "of another range")
        return sources

    def release_read(self, rmap: ReadMap) -> None:
        """The read of ``rmap`` is done: a cacheable snapshot map is kept (with the read
        locks of its origin chunks) if nothing was recalled since it was asked for;
        else FINISH_SNAPSHOT_READ for its read locks.  A map served from kept mappings
        ends its use of them."""
        if isinstance(rmap, _KeptReadMap):
            back: list[int] = []
            acks: list[int] = []
            with self._kept_lock:
                for c in rmap.locked:
                    key = (rmap.snap, c)
                    self._kept_readers[key] -= 1
                    if self._kept_readers[key] <= 0:
                        del self._kept_readers[key]
                        back += [c] * self._deferred.pop(key, 0)
                if rmap.seq is not None:
                    self._store_reads[rmap.seq] -= 1
                    if self._store_reads[rmap.seq] <= 0:
                        del self._store_reads[rmap.seq]
                    acks = self._acks_due_locked()
            self._release_locks(back)
            for nid in acks:
                self._finish(functools.partial(NoticeAck, nid))
            return
        if isinstance(rmap, _NodeReadMap) and rmap.cacheable:
            back, kept = self._keep(rmap)
            self._release_locks(back)
            if kept:
                with self._kept_lock:
                    self._judge_prefetching_locked()
                self._prefetch(rmap)
        else:
            self._release_locks(rmap.locked)

    def _release_locks(self, chunks: list[int], send: bool = True) -> None:
        """Give back one read lock per chunk of ``chunks`` (FINISH_SNAPSHOT_READ;
        ``send`` False: the server they were taken from is gone)."""
        if not chunks:
            return

        def done() -> Message | None:
            self.held.subtract(chunks)
            for c in chunks:
                if self.held[c] <= 0:
                    del self.held[c]
            return FinishSnapshotRead(0, coalesce(sorted(chunks))) if send else None

        self._finish(done)

    # -- snapshot read mappings kept (docs/protocol.md "Read mappings a node keeps") ------

    def _use_kept(self, snap: int, first: int, last: int) -> _KeptReadMap | None:
        """The kept mappings of ``snap``'s chunks ``first..last`` if all of them are kept,
        as a map that holds what it reads until :meth:`release_read`: its origin chunks'
        read locks are not given back meanwhile, and a notice that lets the server free
        or reuse store chunks (a delete, a revocation) is acknowledged only after it;
        else None (ask the server)."""
        with self._kept_lock:
            d = self._kept.get(snap)
            if d is None:
                return None
            try:
                sources = [d[c] for c in range(first, last + 1)]
            except KeyError:
                return None
            origin = [first + i for i, src in enumerate(sources) if src is None]
            self._kept_readers.update((snap, c) for c in origin)
            seq = None
            if len(origin) < len(sources):
                seq = self._kept_seq
                self._store_reads[seq] += 1
            self._window_hits += 1
            return _KeptReadMap(first, sources, origin, snap=snap, seq=seq)

    def _acks_due_locked(self) -> list[int]:
        """The waiting acknowledgements no store-chunk read begun before them holds."""
        oldest = min(self._store_reads, default=None)
        due = [nid for nid, seq in self._acks_waiting if oldest is None or oldest >= seq]
        self._acks_waiting = [(nid, seq) for nid, seq in self._acks_waiting
                              if not (oldest is None or oldest >= seq)]
        return due

    def _ack_after_reads(self, nid: int) -> bool:
        """Hold back the acknowledgement of notice ``nid`` (True) while store-chunk reads
        begun before it (before the drop it made) are under way."""
        with self._kept_lock:
            if min(self._store_reads, default=self._kept_seq) >= self._kept_seq:
                return False
            self._acks_waiting.append((nid, self._kept_seq))
            return True

    def _give_back_locked(self, snap: int, c: int, back: list[int]) -> None:
        """Give back the kept read lock of origin chunk ``c`` now (into ``back``), or
        once the reads in threads using it end."""
        if self._kept_readers[snap, c] > 0:
            self._deferred[snap, c] += 1
        else:
            back.append(c)

    def _keep(self, rmap: _NodeReadMap) -> tuple[list[int], bool]:
        """Keep ``rmap``'s mapping if no recall or drop came since it was asked for and
        no merge runs.  Returns the read locks to give back (all of them if not kept;
        else those of chunks already kept) and whether it was kept."""
        with self._kept_lock:
            if rmap.seq != self._kept_seq or self._merging is not None:
                return rmap.locked, False
            back: list[int] = []
            if self._kept_count + len(rmap.sources) > KEPT_CHUNKS:
                back = self._drop_kept_locked()
            d = self._kept.setdefault(rmap.snap, {})
            for c, src in enumerate(rmap.sources, rmap.first):
                if c in d:
                    if src is None:
                        back.append(c)  # (kept already, with a lock of its own)
                else:
                    d[c] = src
                    self._kept_count += 1
            return back, True

    def _judge_prefetching_locked(self) -> None:
        """Count a mapping kept after a query; at the end of a window of
        :attr:`prefetch_window`, ask for whole groups in the next one only if kept
        mappings served at least as many reads meanwhile."""
        self._window_keeps += 1
        if self._window_keeps >= self.prefetch_window:
            self.prefetching = self._window_hits >= self._window_keeps
            self._window_hits = self._window_keeps = 0

    def _prefetch(self, rmap: _NodeReadMap) -> None:
        """Ask in the background for the mappings of the rest of ``rmap``'s aligned
        group of :attr:`keep_group` chunks, to keep them (at most one such query per
        group in flight; none if the group is kept whole already)."""
        g = self.keep_group
        if g <= 1 or len(rmap.sources) >= g or not self.prefetching:
            return
        first = rmap.first - rmap.first % g
        last = min(-(-rmap.size // self.chunk_size), first + g) - 1
        key = (rmap.snap, first)
        with self._kept_lock:
            d = self._kept.get(rmap.snap)
            if (key in self._prefetching or d is None
                    or all(c in d for c in range(first, last + 1))):
                return
            self._prefetching.add(key)
            seq = self._kept_seq
        kept = _NodeReadMap(first, [], [], True, rmap.snap, seq, rmap.size)

        def then(reply: Message) -> None:
            with self._kept_lock:
                self._prefetching.discard(key)
            if isinstance(reply, ReadMapReply) and reply.sources is not None:
                if (reply.first != first or len(reply.sources) != last - first + 1):
                    # (a server breaking the protocol; the locks counted go back)
                    self._release_locks([reply.first + i for i, s
                                         in enumerate(reply.sources) if s is None])
                    return
                kept.sources = reply.sources
                kept.locked = [first + i for i, s in enumerate(reply.sources) if s is None]
                if reply.cacheable:
                    self._release_locks(self._keep(kept)[0])
                else:
                    self._release_locks(kept.locked)

        try:
            self._submit(QuerySnapshotRead(0, rmap.snap, first, last), then)
        except ServiceFailed:
            with self._kept_lock:
                self._prefetching.discard(key)

    def _drop_kept(self, snap: int | None = None) -> list[int]:
        """Forget the kept mappings (of snapshot id ``snap``, or all); the origin chunks
        whose read locks they held, to give back now (those reads in threads use are
        given back when the reads end)."""
        with self._kept_lock:
            return self._drop_kept_locked(snap)

    def _drop_kept_locked(self, snap: int | None = None) -> list[int]:
        self._kept_seq += 1
        if snap is None:
            maps = list(self._kept.items())
            self._kept.clear()
        else:
            d = self._kept.pop(snap, None)
            maps = [] if d is None else [(snap, d)]
        back: list[int] = []
        for v, d in maps:
            self._kept_count -= len(d)
            for c, src in d.items():
                if src is None:
                    self._give_back_locked(v, c, back)
        return back

    def _recalled(self, first: int, last: int) -> list[int]:
        """The server recalls the read locks on origin chunks ``first..last`` (an origin
        write waits for them): forget those origin mappings; their locks to give back.
        Kept store-chunk mappings stay (a copy-out does not change them)."""
        with self._kept_lock:
            self._kept_seq += 1
            back: list[int] = []
            dropped = 0
            for v, d in self._kept.items():
                for c in range(first, last + 1):
                    if c in d and d[c] is None:
                        del d[c]
                        dropped += 1
                        self._give_back_locked(v, c, back)
            self._kept_count -= dropped
            return back

    @property
    def kept_chunks(self) -> int:
        """Snapshot chunk mappings this node keeps now (never waits)."""
        return self._kept_count

    @property
    def kept_drops(self) -> int:
        """Recalls and drops of kept mappings so far (never waits)."""
        return self._kept_seq

    def origin_reads_itself(self) -> bool:
        """True while the server says no merge runs (never waits)."""
        return self._merging is None

    def map_snapshot_read_nowait(self, snap: SnapshotInfo, first: int, last: int
                                 ) -> list[int | None] | None:
        """The sources of ``snap``'s chunks ``first..last`` if this node keeps all of
        them (else None: ask with :meth:`map_snapshot_read`).  A mapping returned holds
        the kept mappings' lock until :meth:`finish_snapshot_read_nowait` (a recall
        waits for the reads using it; they are page-cache copies, microseconds)."""
        if snap.id not in self._kept or not self._kept_lock.acquire(
                timeout=NOWAIT_LOCK_WAIT):
            return None
        try:
            d = self._kept[snap.id]
            sources = ([d[first]] if first == last  # (the common small read)
                       else [d[c] for c in range(first, last + 1)])
            self._window_hits += 1  # (under the lock, like the count of keeps)
            return sources
        except KeyError:
            self._kept_lock.release()
            return None
        except BaseException:
            self._kept_lock.release()
            raise

    def finish_snapshot_read_nowait(self) -> None:
        """The reads of a mapping from :meth:`map_snapshot_read_nowait` are done."""
        self._kept_lock.release()

    def prepare_snapshot_write(self, snap: SnapshotInfo, first: int, last: int) -> list[int]:
        """QUERY_SNAPSHOT_WRITE: ``snap``'s chunks made unique; their store chunks."""
        reply = self._request(QuerySnapshotWrite(0, snap.id, first, last), SnapshotWriteOk)
        if len(reply.chunks) != last - first + 1:
            raise ProtocolError(f"csnap server gave {len(reply.chunks)} store chunks for "
                                f"{last - first + 1} snapshot chunks")
        return reply.chunks

    def snapshots(self) -> list[SnapshotInfo]:
        """Live snapshots as the server last said (never waits)."""
        return list(self._snaps)

    def snapshot(self, name: str) -> SnapshotInfo:
        """The live snapshot ``name`` as the server last said (SnapshotNotFound)."""
        return find_snapshot(self._snaps, name)

    def is_merging(self, snap: SnapshotInfo) -> bool:
        return self._merging == snap.id

    def create_snapshot(self, name: str, read_only: bool = False,
                        parent: str | None = None) -> SnapshotInfo:
        info = SnapshotInfo.from_wire(self._call("create_snapshot", name=name,
                                                 read_only=read_only, parent=parent))
        self._apply({"event": "snapshot-created", "snapshot": info.to_wire()})
        return info

    def delete_snapshot(self, name: str) -> SnapshotInfo:
        info = SnapshotInfo.from_wire(self._call("delete_snapshot", name=name))
        self._apply({"event": "snapshot-deleted", "snapshot": info.id})
        return info

    def snapshot_space(self) -> dict[int, tuple[int, int]]:
        return {k: (a, b) for k, a, b in self._call("snapshot_space")}

    def changed_chunks(self, a: int, b: int, start: int = 0, limit: int = 4096
                       ) -> tuple[list[int], int | None]:
        r = self._call("changed_chunks", a=a, b=b, start=start, limit=limit)
        return list(r["chunks"]), r["next"]

    def start_merge(self, name: str, keep: bool = False) -> dict:
        return self._call("start_merge", name=name, keep=keep)

    def merge_cursor(self) -> int | None:
        return self._call("merge_cursor")

    def merge_status(self, running: bool = False) -> dict | None:
        return self._call("merge_status", running=running)

    def run_merge(self, stop: threading.Event | None = None,
                  on_step: Callable[[dict | None], None] | None = None) -> bool:
        """Merges run in the metadata server, not on nodes (InvalidArgument)."""
        raise InvalidArgument("a merge runs in the metadata server; start it with "
                              "start_merge")

    def set_full_policy(self, policy: str) -> None:
        self._call("set_full_policy", policy=policy)

    def resize_origin(self, size: int) -> dict:
        r = self._call("resize_origin", size=size)
        self._refresh()
        return r

    def resize_store(self, size: int) -> dict:
        return self._call("resize_store", size=size)

    def status(self) -> StoreStatus:
        d = self._call("status")
        if d.get("journal_damage") is not None:
            d["journal_damage"] = [tuple(x) for x in d["journal_damage"]]
        return StoreStatus(**d)

    def check(self) -> list[Finding]:
        return [Finding(**d) for d in self._call("check")]

    def free_leaked(self, blocks: list[int]) -> None:
        self._call("free_leaked", blocks=list(blocks))

    def statistics(self) -> ServiceStatistics:
        return ServiceStatistics(**self._call("statistics"))

    def recover(self) -> None:
        self._call("recover")

    def commit(self) -> None:
        self._call("commit")

    def export_open(self, name: str) -> None:
        """Count export ``name`` open on this node (a merge or delete of it is refused
        meanwhile); the count is declared again to a restarted server."""
        self._call("export_open", name=name)  # (counted as the reply arrived)

    def export_close(self, name: str) -> None:
        """The export ``name`` opened above is closed."""
        with self._lock:
            self.opens[name] -= 1
            if self.opens[name] <= 0:
                del self.opens[name]
        with contextlib.suppress(ServiceFailed):  # a server that is gone closed it
            self._call("export_close", name=name)

    def abandon_server(self) -> None:
        """Break the connection to the current server; the reader connects again (to
        whatever ``connect`` finds now) and uploads what this node holds.  For a
        cluster's node whose server is no longer the elected one: a stopped server's
        host still answers TCP, so the connection would never end by itself."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        """Close the connection (the server gives back whatever this node held); the
        read locks of kept mappings and the grants are returned first (the grants if no
        granted write is in flight; else the server, seeing a node with grants go, makes
        sure it is dead), so that a server keeping a lost remote node's holdings for its
        grace period has nothing to keep after an orderly close."""
        def give_back() -> Message | None:
            self._granted = None
            return None if self.granted_writes else ReturnGrants()

        self._release_locks(self._drop_kept())
        self._finish(give_back)
        self._closing = True
        while self._reader.is_alive():
            # (again if the reader was just making a new connection)
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)
            self._reader.join(0.1)
        self.sock.close()
