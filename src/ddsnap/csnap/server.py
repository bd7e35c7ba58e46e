"""The csnap metadata server: one process owns the store and answers nodes' queries.

Seed 000's server side: nodes (worker processes, later client hosts) connect to a unix
socket, IDENTIFY, and ask for origin writes to be made unique, for snapshot read
mappings (origin chunks read-locked until FINISH_SNAPSHOT_READ) and for snapshot write
targets; the server does the copy-outs and commits in its
:class:`~ddsnap.service.local.LocalService` and never touches a node's data.

Each node connection is a :class:`NodeSession`: a thread reads its messages (through the
sans-IO :class:`~ddsnap.csnap.protocol.Connection`); queries that may block (copy-outs,
commits, read locks, calls) run on the server's thread pool, so one node has many
requests in flight and replies go out as they complete, matched by id.  A session
remembers what its node holds (read locks per chunk, origin writes in flight, open
exports), and a node that disconnects, dies or breaks the protocol has all of it given
back at once (csnap ``free_client_locks``): origin writes waiting on its read locks go on.

Changes nodes cache (snapshots created or deleted, merge state) reach them as NOTICE
messages through the service's observers; a notice the service waits for (a snapshot
creation, a merge start) is acknowledged by every node, and a node that does not answer
within :attr:`MetadataServer.ack_timeout` seconds is cut off.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import queue
import signal
import socket
import ssl
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor

from ddsnap.errors import DdsnapError, InvalidArgument, ProtocolError, TlsRefused
from ddsnap.service.api import ReadMap
from ddsnap.service.local import LocalService

from . import tls
from .net import tune_tcp
from .protocol import Connection, Role
from .tls import TlsSocket
from .wire import (
    VERSION,
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
    describe_error,
)

log = logging.getLogger("ddsnap.csnap")

#: threads running blocking queries for all nodes together
QUERY_THREADS = 32
#: seconds a node has to acknowledge a notice the service waits for
ACK_TIMEOUT = 10.0
#: seconds a fence waits for a killed node process to stop running
FENCE_WAIT = 10.0
#: seconds a restarted server waits for the nodes it expects to upload their locks
GRACE = 10.0
#: calls that change nothing, answered during recovery too
READ_ONLY_CALLS = frozenset({"snapshots", "snapshot_space", "changed_chunks",
                             "merge_status", "merge_cursor", "status", "check",
                             "statistics", "nodes", "export_open", "export_close"})
RECV_BYTES = 1 << 16
#: seconds what a node on another host held is kept after its connection ended
NODE_GRACE = 10.0
#: seconds a TCP node has to complete its TLS handshake
HANDSHAKE_TIMEOUT = 10.0


def _peer(sock: socket.socket) -> str:
    """``unix`` or ``HOST:PORT`` of the peer of the connected ``sock``."""
    if sock.family == socket.AF_UNIX:
        return "unix"
    try:
        host, port = sock.getpeername()[:2]
    except OSError:
        return "?"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _running(pid: int) -> bool:
    """True while process ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


class NodeSession:
    """One node's connection to the metadata server and what the node holds.

    Attributes:
        node: the id the server gave the node (IDENTIFY_OK).
        name: the node's label from IDENTIFY.
        read_locks: read locks the node holds, per logical chunk.
        origin_writes: origin writes prepared for the node and not finished.
        opens: exports the node has open, by name.
        granted: the node holds origin-write grants (one origin write of the service,
            see :meth:`~ddsnap.service.local.LocalService.take_origin_grant`).
    """

    def __init__(self, server: MetadataServer, sock: socket.socket, node: int,
                 tls: ssl.SSLContext | None = None):
        self.server = server
        self.sock: socket.socket | TlsSocket = sock
        self.node = node
        #: the TLS context a TCP node must complete a handshake with first (None: none)
        self._tls = tls
        #: where the node connects from: "unix" or "HOST:PORT"
        self.peer = _peer(sock)
        self.name = ""
        self.conn = Connection(Role.SERVER)
        self._lock = threading.Lock()  # conn state, the socket's send side, holdings
        self.read_locks: Counter[int] = Counter()
        self.origin_writes = 0
        self.opens: Counter[str] = Counter()
        self.granted = False
        #: the highest ``grants-revoked`` serial seen: a grant taken before it is void
        self._revoked_serial = 0
        #: the notice id of the revocation the node has not acknowledged yet
        self._revoking: int | None = None
        self._revoke_timer: threading.Timer | None = None
        self.closed = False
        #: notice id -> event set when the node acknowledges it
        self._acks: dict[int, threading.Event] = {}
        self._next_notice = 1
        self.thread = threading.Thread(target=self._run, name=f"ddsnap-meta-node{node}",
                                       daemon=True)

    # -- the reader ----------------------------------------------------------------------

    def _run(self) -> None:
        why = "disconnected"
        fence = False
        try:
            if self._tls is not None and isinstance(self.sock, socket.socket):
                # (in this thread, not the accept loop: a slow or silent peer holds up
                # only itself)
                self.sock = tls.wrap(self.sock, self._tls, server_side=True,
                                     timeout=HANDSHAKE_TIMEOUT)
            while True:
                data = self.sock.recv(RECV_BYTES)
                with self._lock:
                    self.conn.receive_data(data)
                    msgs = []
                    while (msg := self.conn.next_message()) is not None:
                        msgs.append(msg)
                for msg in msgs:
                    self._dispatch(msg)
                if not data:
                    break
        except ProtocolError as e:
            why = f"protocol error: {e}"
            fence = True
            log.warning("node %d (%s) dropped: %s", self.node, self.name, e)
        except TlsRefused as e:
            why = f"refused: {e}"
            log.warning("refused a node connecting from %s: %s", self.peer, e)
        except OSError as e:
            why = f"connection error: {e}"
        finally:
            self.drop(why, fence)

    def _dispatch(self, msg: Message) -> None:
        """Run ``msg``: the quick ones here, the ones that may block on the pool."""
        if isinstance(msg, FinishOriginWrite):
            self._finish_origin_writes(msg.count)
        elif isinstance(msg, FinishSnapshotRead):
            self._finish_read(msg)
        elif isinstance(msg, NoticeAck):
            with self._lock:
                ev = self._acks.pop(msg.id, None)
                back = msg.id == self._revoking
            if ev is not None:
                ev.set()
            if back:
                self._grants_back()
        elif isinstance(msg, ReturnGrants):
            self._grants_back()
        elif isinstance(msg, Identify):
            self._identify(msg)
        elif isinstance(msg, UploadLock):
            self._upload(msg)
        elif isinstance(msg, FinishUploadLock):
            # what this node held before it was lost goes first: once the node hears
            # UPLOAD_OK, only what it uploaded is counted as its own
            self.server.uploaded(self.name)
            self.send(UploadOk(msg.id))
        else:
            self.server.executor.submit(self._answer, msg)

    def _identify(self, msg: Identify) -> None:
        srv = self.server
        if not (msg.low <= VERSION <= msg.high):
            self.send(ErrorReply(msg.id, "ProtocolError", 22,
                                 f"this server speaks csnap protocol version {VERSION}; "
                                 f"the node speaks {msg.low}..{msg.high}"))
            raise ProtocolError(f"node speaks csnap versions {msg.low}..{msg.high} only")
        if any(msg.uuid) and msg.uuid != srv.uuid:
            self.send(ErrorReply(msg.id, "OriginMismatch", 22,
                                 f"this server serves store {srv.uuid.hex()}, not "
                                 f"{msg.uuid.hex()}"))
            raise ProtocolError(f"node expects store {msg.uuid.hex()}")
        self.name = msg.name
        svc = srv.service
        self.send(IdentifyOk(msg.id, VERSION, self.node, srv.uuid, svc.chunk_size,
                             svc.origin_size, srv.generation))

    # -- queries -------------------------------------------------------------------------

    def _answer(self, msg: Message) -> None:
        """Run a query that may block (on a pool thread) and send its reply."""
        try:
            if not isinstance(msg, QuerySnapshotRead | QueryOriginRead) and not (
                    isinstance(msg, Call) and msg.op in READ_ONLY_CALLS):
                # what writes waits for the nodes of the last server to upload their
                # locks: it must not overwrite what one of them is still reading
                self.server.wait_recovered()
            reply = self._query(msg)
        except Exception as e:
            if not isinstance(e, DdsnapError | OSError):
                log.exception("csnap query %s from node %d failed", type(msg).__name__,
                              self.node)
            reply = ErrorReply.of(msg.id, e)
        if reply is not None:
            self.send(reply)

    def _query(self, msg: Message) -> Message | None:
        """The reply to ``msg``, or None if it was sent already."""
        svc = self.server.service
        if isinstance(msg, QueryOriginWrite):
            self._origin_write(msg)
            return None
        if isinstance(msg, QuerySnapshotRead):
            recalls = self.server.recalls
            rmap = svc.map_snapshot_read(svc.snapshot_by_id(msg.snap), msg.first,
                                         msg.last)
            # A recall since the mapping may have missed this node (its locks were not
            # recorded yet): then the node must not keep them.
            keep = self._hold(rmap, recalls) and rmap.cacheable and self.server.read_cache
            return ReadMapReply(msg.id, rmap.first, rmap.sources, keep)
        if isinstance(msg, QueryOriginRead):
            omap = svc.map_origin_read(msg.first, msg.last)
            if omap is None:
                return OriginReadMapReply(msg.id, msg.first, None)
            self._hold(omap)
            return OriginReadMapReply(msg.id, omap.first, omap.sources)
        if isinstance(msg, QuerySnapshotWrite):
            chunks = svc.prepare_snapshot_write(svc.snapshot_by_id(msg.snap),
                                                msg.first, msg.last)
            return SnapshotWriteOk(msg.id, chunks)
        if isinstance(msg, Call):
            return CallOk(msg.id, self.server.call(self, msg.op, msg.args))
        raise ProtocolError(f"csnap server cannot answer {type(msg).__name__}")

    def _origin_write(self, msg: QueryOriginWrite) -> None:
        """Prepare the ranges, count them in flight for the node, grant them if the
        service lets it, and send the reply."""
        svc = self.server.service
        results = svc.prepare_origin_writes(msg.ranges)
        prepared = sum(r is None for r in results)
        serial = None
        if prepared and self.server.grants:
            with self._lock:
                want = not (self.granted or self.closed) and self._revoking is None
            if want:
                serial = svc.take_origin_grant()
        give_back = 0
        with self._lock:
            if self.closed:  # dropped while it waited: nobody will finish these
                give_back = prepared + (serial is not None)
            else:
                self.origin_writes += prepared
                if serial is not None:
                    if self.granted or serial < self._revoked_serial:
                        give_back = 1  # (a revocation came between take and here)
                    else:
                        self.granted = True
                granted = bool(prepared) and self.granted and self._revoking is None
                # Sent under the lock, so that a grants-revoked notice goes after the
                # grant it revokes, or this reply grants nothing.
                self._send_locked(OriginWriteOk(
                    msg.id, [None if r is None else describe_error(r) for r in results],
                    granted))
        for _ in range(give_back):
            svc.finish_origin_write()

    def revoke(self, serial: int) -> None:
        """The service raised its origin-write barrier (``grants-revoked`` number
        ``serial``): a node holding grants is asked to give them back (a NOTICE it
        acknowledges once its granted writes in flight are done), and is cut off if it
        has not within the server's ``ack_timeout`` seconds."""
        with self._lock:
            self._revoked_serial = max(self._revoked_serial, serial)
            if self.closed or not self.granted or self._revoking is not None:
                return
            nid = self._revoking = self._next_notice
            self._next_notice += 1
            self._send_locked(Notice(nid, {"event": "grants-revoked"}))
            timer = self._revoke_timer = threading.Timer(
                self.server.ack_timeout, self._revoke_late, (nid,))
        timer.daemon = True
        timer.start()

    def _revoke_late(self, nid: int) -> None:
        with self._lock:
            late = self._revoking == nid and not self.closed
        if late:
            log.warning("node %d (%s) did not give its grants back within %.0f s: cut off",
                        self.node, self.name, self.server.ack_timeout)
            self.drop("did not give its grants back")

    def _grants_back(self) -> None:
        """The node acknowledged the revocation, or returned its grants itself."""
        with self._lock:
            had = self.granted
            self.granted = False
            self._revoking = None
            if self._revoke_timer is not None:
                self._revoke_timer.cancel()
                self._revoke_timer = None
        if had:
            self.server.service.finish_origin_write()

    def _hold(self, rmap: ReadMap, recalls: int | None = None) -> bool:
        """Record ``rmap``'s read locks as the node's (given back at once if the node
        is gone).  True if no read-lock recall was asked for since the server's
        ``recalls`` count was ``recalls``: a recall from then on sees these locks."""
        with self._lock:
            gone = self.closed
            if not gone:
                self.read_locks.update(rmap.locked)
                # (compared under the session lock, which a recall takes to look)
                quiet = recalls == self.server.recalls
        if gone:
            self.server.service.release_read(rmap)
            return False
        return quiet

    def holds_any(self, first: int, last: int) -> bool:
        """True if the node holds a read lock on any chunk of ``first..last``."""
        with self._lock:
            held = self.read_locks
            return bool(held) and any(c in held for c in range(first, last + 1))

    def _finish_read(self, msg: FinishSnapshotRead) -> None:
        chunks = [c for a, b in msg.ranges for c in range(a, b + 1)]
        with self._lock:
            held = self.read_locks
            need = Counter(chunks)
            for c, n in need.items():
                if held[c] < n:
                    raise ProtocolError(f"node finished a read of chunk {c} it does "
                                        "not hold")
            held.subtract(need)
            for c in need:
                if not held[c]:
                    del held[c]
        self.server.service.release_read(ReadMap(0, [], chunks))

    def _finish_origin_writes(self, count: int) -> None:
        with self._lock:
            if count > self.origin_writes:
                raise ProtocolError(f"node finished {count} origin writes; it has "
                                    f"{self.origin_writes} in flight")
            self.origin_writes -= count
        for _ in range(count):
            self.server.service.finish_origin_write()

    def _upload(self, msg: UploadLock) -> None:
        chunks = [c for a, b in msg.ranges for c in range(a, b + 1)]
        with self._lock:
            self.read_locks.update(chunks)
            self.origin_writes += msg.origin_writes
        self.server.service.adopt_locks(chunks, msg.origin_writes)

    # -- sending and notices ---------------------------------------------------------------

    def send(self, msg: Message) -> None:
        """Send ``msg`` to the node; a node that is gone is not an error (its holdings
        are given back by :meth:`drop`)."""
        with self._lock:
            self._send_locked(msg)

    def _send_locked(self, msg: Message) -> None:
        if self.closed:
            return
        data = self.conn.send(msg)
        # A failed send needs nothing here: the reader sees the connection end and
        # drops the session.
        with contextlib.suppress(OSError):
            self.sock.sendall(data)

    def notify(self, event: dict, wait: bool) -> threading.Event | None:
        """Send a NOTICE; with ``wait``, the event set when the node acknowledges it."""
        ev = None
        with self._lock:
            if self.closed or not self.conn.identified:
                return None
            nid = 0
            if wait:
                nid = self._next_notice
                self._next_notice += 1
                ev = self._acks[nid] = threading.Event()
        self.send(Notice(nid, event))
        return ev

    def peer_pid(self) -> int | None:
        """The pid of the node's process if it is on this host (SO_PEERCRED of a unix
        socket), else None."""
        if not isinstance(self.sock, socket.socket) or self.sock.family != socket.AF_UNIX:
            return None
        try:
            cred = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                        struct.calcsize("3i"))
        except OSError:
            return None
        pid = struct.unpack("3i", cred)[0]
        return pid or None

    def fence(self) -> None:
        """Make sure a node the server gives up on writes nothing any more: a process
        on this host is killed (SIGKILL) before what it held is given back.  A node
        that stopped answering may be stopped, not dead (SIGSTOP, a pause), and would
        otherwise write the origin under an origin write the server no longer counts
        (after a snapshot that should have seen the chunk unchanged).  A node in this
        very process (tests) or on another host is not killed."""
        pid = self.peer_pid()
        if pid is None or pid == os.getpid():
            return
        log.warning("node %d (%s): killing its process %d (fence)", self.node, self.name, pid)
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            return
        # kill() only sends the signal: wait until the process runs no more (gone, or a
        # zombie its parent has not reaped), so no write of it can land after this
        deadline = time.monotonic() + FENCE_WAIT
        while time.monotonic() < deadline and _running(pid):
            time.sleep(0.005)

    def drop(self, why: str, fence: bool = False) -> None:
        """Close the connection and give back everything the node held; first make
        sure the node cannot write any more (:meth:`fence`) if it held grants (it
        writes granted chunks without telling), or with ``fence`` if it had origin
        writes in flight.  A server that is closing fences nobody."""
        # First of all: a sender blocked on a node that reads nothing (stopped, or its
        # window closed) holds the session's lock; this makes its send fail.
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        with self._lock:
            if self.closed:
                return
            self.closed = True
            writes_held = self.origin_writes
            granted = self.granted
            if self._revoke_timer is not None:
                self._revoke_timer.cancel()
        if ((fence and writes_held) or granted) and not self.server.closing:
            self.fence()
        with self._lock:
            locks = list(self.read_locks.elements())
            writes = self.origin_writes + self.granted  # (a grant is one origin write)
            self.granted = False
            opens = list(self.opens.elements())
            self.read_locks.clear()
            self.origin_writes = 0
            self.opens.clear()
            acks = list(self._acks.values())
            self._acks.clear()
        self.sock.close()
        for ev in acks:  # nobody waits for a node that is gone
            ev.set()
        self.server.forget(self)

        def release() -> None:
            svc = self.server.service
            if locks:
                svc.release_read(ReadMap(0, [], locks))
            for _ in range(writes):
                svc.finish_origin_write()
            for name in opens:
                svc.export_close(name)
            if locks or writes:
                log.info("node %d (%s) %s: released %d read lock(s) and %d origin "
                         "write(s)", self.node, self.name, why, len(locks), writes)

        if (self.peer != "unix" and not fence and (locks or writes or opens)
                and not self.server.closing):
            # A node on another host may be alive behind a broken connection, its
            # reads in flight under these locks: they are kept until it uploads
            # them again or NODE_GRACE seconds pass (docs/protocol.md).  One that
            # broke the protocol gets no such trust.
            self.server.lapse(self.name, release)
        else:
            release()

    def export_opened(self, name: str) -> None:
        """The node opened export ``name`` (closed for it if it goes away)."""
        with self._lock:
            self.opens[name] += 1

    def export_closing(self, name: str) -> None:
        """The node closes export ``name`` (InvalidArgument if it has it not open)."""
        with self._lock:
            if self.opens[name] <= 0:
                raise InvalidArgument(f"node closed export {name!r}, which it has not open")
            self.opens[name] -= 1
            if not self.opens[name]:
                del self.opens[name]

    def describe(self) -> dict:
        """The node and its holdings (for ``status``)."""
        with self._lock:
            return {"node": self.node, "name": self.name, "peer": self.peer,
                    "read_locks": sum(self.read_locks.values()),
                    "origin_writes": self.origin_writes, "granted": self.granted,
                    "exports_open": dict(self.opens)}


class MetadataServer:
    """Serves ``service`` to nodes over the csnap protocol.

    Args:
        service: the in-process service that owns the store.
        uuid: the store's UUID (16 bytes; nodes that expect another are refused).
        generation: how many times a metadata server of this store was restarted (a node
            seeing it change re-uploads its locks).
        threads: pool threads for blocking queries.
        ack_timeout: seconds a node has to acknowledge a notice the service waits for,
            or to give its grants back when they are revoked; a node that does not is
            cut off.
        expect: labels of the nodes a restarted server waits for (their uploads)
            before anything writes, at most ``grace`` seconds.
        grants: give nodes origin-write grants (False: every origin write asks).
        read_cache: let nodes keep snapshot read mappings (False: every snapshot read
            asks).
        node_grace: seconds what a node on another host (TCP) held is kept after its
            connection ends, unless it uploads it again sooner.
    """

    def __init__(self, service: LocalService, uuid: bytes = bytes(16), generation: int = 0,
                 threads: int = QUERY_THREADS, ack_timeout: float = ACK_TIMEOUT,
                 expect: Iterable[str] = (), grace: float = GRACE, grants: bool = True,
                 read_cache: bool = True, node_grace: float = NODE_GRACE):
        self.service = service
        self.grants = grants
        self.read_cache = read_cache
        #: read-lock recalls asked for so far (counted under the service's lock)
        self.recalls = 0
        #: notices the service asks for with its lock held go out from this thread
        #: (not the pool, whose threads may all wait for what the notice releases)
        self._outbox: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._courier = threading.Thread(target=self._deliver_outbox,
                                         name="ddsnap-meta-notices", daemon=True)
        self._courier.start()
        self.uuid = uuid
        self.generation = generation
        self.ack_timeout = ack_timeout
        self.executor = ThreadPoolExecutor(threads, thread_name_prefix="ddsnap-meta")
        self._lock = threading.Lock()
        self._sessions: dict[int, NodeSession] = {}
        self._next_node = 1
        self._listeners: list[socket.socket] = []
        self._accepters: list[threading.Thread] = []
        #: the unix socket path, and the TCP addresses bound (``tcp:HOST:PORT``)
        self.path: str | None = None
        self.tcp_addresses: list[str] = []
        self.closing = False
        #: nodes (by label) whose uploads a restarted server waits for
        self.expecting = set(expect)
        self.node_grace = node_grace
        #: holdings of nodes on other hosts whose connection ended, by node name
        self._lapsed: dict[str, list[tuple[threading.Timer, Callable[[], None]]]] = {}
        self._recovered = threading.Event()
        self._grace: threading.Timer | None = None
        if self.expecting:
            self._grace = threading.Timer(grace, self._end_recovery, ("grace period over",))
            self._grace.daemon = True
            self._grace.start()
        else:
            self._recovered.set()
        service.observers.append(self._observe)

    def uploaded(self, name: str) -> None:
        """Node ``name`` finished uploading its locks (FINISH_UPLOAD_LOCK): what it held
        on a connection that ended is given back now (the upload took it anew)."""
        with self._lock:
            self.expecting.discard(name)
            done = not self.expecting
            lapsed = self._lapsed.pop(name, [])
        for timer, release in lapsed:
            timer.cancel()
            release()
        if done:
            self._end_recovery("every node uploaded its locks")

    def lapse(self, name: str, release: Callable[[], None]) -> None:
        """Hold what node ``name`` held on a connection that ended (``release`` gives it
        back) until the node uploads again or :attr:`node_grace` seconds pass."""
        timer = threading.Timer(self.node_grace, self._lapse_over, (name, release))
        timer.daemon = True
        with self._lock:
            self._lapsed.setdefault(name, []).append((timer, release))
        log.info("node %s lost its connection: what it held is kept for %.0f s", name,
                 self.node_grace)
        timer.start()

    def _lapse_over(self, name: str, release: Callable[[], None]) -> None:
        with self._lock:
            held = self._lapsed.get(name, [])
            entry = next((e for e in held if e[1] is release), None)
            if entry is None:
                return  # given back by an upload meanwhile
            held.remove(entry)
            if not held:
                del self._lapsed[name]
        log.warning("node %s did not come back within %.0f s: what it held is given back",
                    name, self.node_grace)
        release()

    def lapsed(self) -> dict[str, int]:
        """Nodes whose connection ended with holdings kept for them: name -> how many
        connections' holdings."""
        with self._lock:
            return {name: len(held) for name, held in self._lapsed.items()}

    def _end_recovery(self, why: str) -> None:
        if not self._recovered.is_set():
            with self._lock:
                missing = sorted(self.expecting)
            if missing:  # their locks are lost: what they were reading may change
                log.warning("csnap server recovered (%s); never heard from %s", why,
                            ", ".join(missing))
            else:
                log.info("csnap server recovered (%s)", why)
            self._recovered.set()

    def wait_recovered(self) -> None:
        """Return once the nodes of the last server uploaded their locks (or the grace
        period ended): before, nothing may write the origin or the store."""
        self._recovered.wait()

    def listen(self, path: str) -> None:
        """Accept nodes on the unix socket ``path`` (replaced if a stale one is there).

        Raises:
            OSError: the socket cannot be made there.
        """
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
            os.chmod(path, 0o600)
            sock.listen(64)
        except OSError:
            sock.close()
            raise
        self.path = path
        self._serve_listener(sock, None)

    def listen_tcp(self, host: str, port: int, context: ssl.SSLContext | None) -> str:
        """Accept nodes on other hosts on TCP ``host``:``port`` (0: any free port),
        each completing a TLS handshake with ``context`` first (a server context that
        requires client certificates, :func:`ddsnap.csnap.tls.server_context`), or in
        plain text with None (``serve --insecure``).  Returns ``tcp:HOST:PORT`` bound.

        Raises:
            OSError: the address cannot be bound.
        """
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
        family, _, _, _, addr = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(addr)
            sock.listen(64)
        except OSError:
            sock.close()
            raise
        bound = sock.getsockname()
        shown = f"[{bound[0]}]" if family == socket.AF_INET6 else bound[0]
        self.tcp_addresses.append(f"tcp:{shown}:{bound[1]}")
        self._serve_listener(sock, context)
        return self.tcp_addresses[-1]

    def _serve_listener(self, sock: socket.socket, context: ssl.SSLContext | None) -> None:
        self._listeners.append(sock)
        t = threading.Thread(target=self._accept_loop, args=(sock, context),
                             name="ddsnap-meta-accept", daemon=True)
        self._accepters.append(t)
        t.start()

    def _accept_loop(self, sock: socket.socket, context: ssl.SSLContext | None) -> None:
        while not self.closing:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            if conn.family != socket.AF_UNIX:
                tune_tcp(conn)
            self.accept(conn, context)

    def accept(self, sock: socket.socket, context: ssl.SSLContext | None = None
               ) -> NodeSession:
        """Serve a node on the connected socket ``sock`` (socketpair ends in tests),
        after a TLS handshake with ``context`` if given."""
        with self._lock:
            node = self._next_node
            self._next_node += 1
            session = self._sessions[node] = NodeSession(self, sock, node, context)
        session.thread.start()
        return session

    def forget(self, session: NodeSession) -> None:
        with self._lock:
            self._sessions.pop(session.node, None)

    def sessions(self) -> list[NodeSession]:
        with self._lock:
            return list(self._sessions.values())

    def nodes(self) -> list[dict]:
        """The connected nodes and what each holds."""
        return [s.describe() for s in self.sessions()]

    def _observe(self, event: dict, wait: bool) -> None:
        """A service observer: the event to every node; with ``wait``, until each has
        acknowledged it or is cut off."""
        kind = event["event"]
        if kind == "grants-revoked":
            # (called with the service's lock held: sent from the courier thread)
            self._outbox.put(lambda: self._revoke_all(event["serial"]))
            return
        if kind == "read-locks-recalled":
            # (lock held too) only to the nodes holding read locks there; the origin
            # write waits for the locks themselves.  Counted first: a mapping made
            # before and recorded after the courier looked is not kept (see _query).
            self.recalls += 1
            self._outbox.put(lambda: self._recall(event))
            return
        pending = [(s, s.notify(event, wait)) for s in self.sessions()]
        if not wait:
            return
        for session, ev in pending:
            if ev is not None and not ev.wait(self.ack_timeout):
                log.warning("node %d (%s) did not acknowledge %s within %.0f s: cut off",
                            session.node, session.name, event.get("event"),
                            self.ack_timeout)
                session.fence()  # (it may hold origin writes or, later, grants)
                session.drop("cut off")

    def _revoke_all(self, serial: int) -> None:
        for s in self.sessions():
            s.revoke(serial)

    def _recall(self, event: dict) -> None:
        for s in self.sessions():
            if s.holds_any(event["first"], event["last"]):
                s.notify(event, wait=False)

    def _deliver_outbox(self) -> None:
        while (job := self._outbox.get()) is not None:
            try:
                job()
            except Exception:  # pragma: no cover - a bug; the next notice still goes
                log.exception("sending a csnap notice failed")

    def call(self, session: NodeSession, op: str, args: dict):
        """A CALL: the service method ``op`` with ``args``, its result as JSON types.

        Raises:
            InvalidArgument: an unknown op or arguments that do not fit it.
        """
        fn = _CALLS.get(op)
        if fn is None:
            raise InvalidArgument(f"unknown csnap call {op!r}")
        try:
            return fn(self, session, **args)
        except TypeError as e:
            raise InvalidArgument(f"bad arguments for csnap call {op!r}: {e}") from None

    def close(self, wait: bool = True) -> None:
        """Stop accepting, drop every node (their holdings given back), stop the pool
        (``wait``: after the queries still running end; else leaving them)."""
        self.closing = True
        if self._grace is not None:
            self._grace.cancel()
        self._recovered.set()  # queries held back go on, to find the server closing
        for sock in self._listeners:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        if self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        for t in self._accepters:
            t.join()
        for s in self.sessions():
            s.drop("server closing")
            s.thread.join()
        with self._lock:
            lapsed = [e for held in self._lapsed.values() for e in held]
            self._lapsed.clear()
        for timer, release in lapsed:
            timer.cancel()
            release()
        self.executor.shutdown(wait=wait, cancel_futures=not wait)
        with contextlib.suppress(ValueError):
            self.service.observers.remove(self._observe)
        self._outbox.put(None)
        self._courier.join()


# --- CALL ops: cold-path requests with JSON arguments and results ---------------------------


def _snapshots(srv: MetadataServer, s: NodeSession) -> dict:
    svc = srv.service
    return {"snapshots": [i.to_wire() for i in svc.snapshots()],
            "merging": next((i.id for i in svc.snapshots() if svc.is_merging(i)), None),
            "origin_size": svc.origin_size}


def _create(srv: MetadataServer, s: NodeSession, name: str, read_only: bool = False,
            parent: str | None = None) -> dict:
    return srv.service.create_snapshot(name, read_only, parent).to_wire()


def _delete(srv: MetadataServer, s: NodeSession, name: str) -> dict:
    return srv.service.delete_snapshot(name).to_wire()


def _export_open(srv: MetadataServer, s: NodeSession, name: str) -> None:
    srv.service.export_open(name)
    s.export_opened(name)


def _export_close(srv: MetadataServer, s: NodeSession, name: str) -> None:
    s.export_closing(name)
    srv.service.export_close(name)


def _changed_chunks(srv: MetadataServer, s: NodeSession, a: int, b: int, start: int,
                    limit: int) -> dict:
    chunks, nxt = srv.service.changed_chunks(a, b, start, limit)
    return {"chunks": chunks, "next": nxt}


_CALLS: dict[str, Callable[..., object]] = {
    "snapshots": _snapshots,
    "create_snapshot": _create,
    "delete_snapshot": _delete,
    "changed_chunks": _changed_chunks,
    "snapshot_space": lambda srv, s: [[k, a, b] for k, (a, b) in
                                      srv.service.snapshot_space().items()],
    "start_merge": lambda srv, s, name, keep=False: srv.service.start_merge(name, keep),
    "merge_status": lambda srv, s, running=False: srv.service.merge_status(running),
    "merge_cursor": lambda srv, s: srv.service.merge_cursor(),
    "set_full_policy": lambda srv, s, policy: srv.service.set_full_policy(policy),
    "resize_origin": lambda srv, s, size: srv.service.resize_origin(size),
    "resize_store": lambda srv, s, size: srv.service.resize_store(size),
    "status": lambda srv, s: dataclasses.asdict(srv.service.status()),
    "check": lambda srv, s: [dataclasses.asdict(f) for f in srv.service.check()],
    "free_leaked": lambda srv, s, blocks: srv.service.free_leaked(list(blocks)),
    "statistics": lambda srv, s: dataclasses.asdict(srv.service.statistics()),
    "commit": lambda srv, s: srv.service.commit(),
    "recover": lambda srv, s: srv.service.recover(),
    "export_open": _export_open,
    "export_close": _export_close,
    "nodes": lambda srv, s: srv.nodes(),
}
