"""The NBD server: asyncio transport around :class:`ddsnap.nbd.protocol.ServerConnection`.

:class:`NbdServer` listens on unix and TCP sockets and runs one connection handler per
client.  The protocol object does all parsing, validation and reply framing; this module
moves bytes, runs backend calls in a thread pool (the event loop never blocks on disk) and
enforces the ordering rules of the spec's "Ordering of messages and writes":

* many requests are in flight per connection and replies go out as they complete, in any
  order;
* in-flight requests are bounded (count and bytes): when the bound is reached the handler
  stops reading the socket, so a fast client is slowed down, not buffered without limit;
* the memory held for replies clients have not read yet is bounded server-wide
  (``max_reply_memory``, see :attr:`NbdServer.reply_bytes_held`): past it, connections
  that hold some stop being read from until their own replies drain;
* a FLUSH first waits for every WRITE, TRIM and WRITE_ZEROES received before it on the
  same connection, then calls ``backend.flush()``; so every write acknowledged before the
  FLUSH is durable when the FLUSH is acknowledged;
* ``backend.open()`` runs when the client selects the export, ``backend.close()`` exactly
  once when the connection ends (DISC, EOF, error, server shutdown), after every backend
  call of that connection has returned.

Backend errors are mapped to NBD errors: ``DdsnapError.errno`` or ``OSError.errno``
through :func:`ddsnap.nbd.wire.errno_to_nbd`; any other exception is logged and
reported as EIO.  Nothing one connection does stops the server.

Logging (logger ``ddsnap.nbd``, level INFO): every connection when it ends (peer, export,
why it ended, duration, bytes read and written), every error answered to a request (the
export and the request), ENOSPC once per episode of a full store (the first failure; the
rest are counted until a write succeeds again).

Inspection: :meth:`NbdServer.statistics` (a snapshot of the server's counters and each
connection's, as frozen dataclasses).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import functools
import itertools
import logging
import os
import socket
import stat
import struct
import time
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ddsnap.errors import DdsnapError, InvalidArgument, ListenError
from ddsnap.nbd.events import Abort, ExportSelected, ProtocolViolation, Request
from ddsnap.nbd.protocol import ServerConnection
from ddsnap.nbd.wire import Command

if TYPE_CHECKING:  # pragma: no cover - typing only
    from asyncio.trsock import TransportSocket

    from ddsnap.nbd.backend import ExportBackend, ExportRegistry

log = logging.getLogger("ddsnap.nbd")

#: bytes asked from the socket per read
READ_CHUNK = 256 * 1024
#: StreamReader buffer limit (it pauses the socket at twice this)
_STREAM_LIMIT = 1024 * 1024
#: buffers smaller than this many bytes are joined into one write, and a READ reply
#: this large is sent at once rather than batched with the next replies
SEND_BATCH = 64 * 1024
#: at most this many queued replies wait for more to be sent with them
SEND_BATCH_REPLIES = 64
#: requests parsed from the input buffer at a time
PARSE_BATCH = 32
#: socket send buffer asked for (bytes; see _grow_send_buffer)
SEND_BUFFER = 4 * 1024 * 1024
#: default bound on READ/WRITE bytes in flight per connection (256 MiB)
DEFAULT_MAX_INFLIGHT_BYTES = 256 * 1024 * 1024
#: default server-wide bound on reply memory held (bytes; see NbdServer.reply_bytes_held)
DEFAULT_MAX_REPLY_MEMORY = 256 * 1024 * 1024
#: connections the kernel queues for accept() per listener (capped by
#: ``net.core.somaxconn``): asyncio's default of 100 refuses part of a burst of a few
#: hundred clients connecting at once
LISTEN_BACKLOG = 1024
#: commands that change the export and so must precede a later FLUSH
_WRITES = (Command.WRITE, Command.TRIM, Command.WRITE_ZEROES)


def error_for_exception(exc: BaseException) -> tuple[int, str]:
    """The POSIX errno and message to report to the client for a backend exception.

    ``DdsnapError`` -> its ``errno``; ``OSError`` -> its ``errno``; anything else is a bug
    in the backend: it is logged with its traceback and reported as EIO.
    """
    if isinstance(exc, DdsnapError):
        return exc.errno or errno.EIO, str(exc)
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno, exc.strerror or str(exc)
    log.error("backend failed", exc_info=exc)
    return errno.EIO, "internal error"


def parse_listen(uri: str) -> tuple[str, Any]:
    """Parse a listen address: ``unix:PATH`` or ``tcp:HOST:PORT`` (``[v6]`` allowed).

    Returns ``("unix", path)`` or ``("tcp", (host, port))``; raises InvalidArgument.
    """
    kind, sep, rest = uri.partition(":")
    if sep and kind == "unix" and rest:
        return "unix", rest
    if sep and kind == "tcp":
        host, sep2, port = rest.rpartition(":")
        if sep2 and port.isdigit() and int(port) < 65536:
            if host.startswith("[") and host.endswith("]"):
                host = host[1:-1]
            return "tcp", (host or None, int(port))
    raise InvalidArgument(f"bad listen address {uri!r}: use unix:PATH or tcp:HOST:PORT")


@dataclass(frozen=True, slots=True)
class ConnectionStatistics:
    """One open connection, as :meth:`NbdServer.statistics` found it.

    Attributes:
        id: the connection's number on this server (from 1, in the order connections
            were accepted; the log calls it ``#id``).
        peer: who is connected: ``HOST:PORT`` (``[HOST]:PORT`` for IPv6), or on a unix
            socket ``pid P (uid U) on unix:PATH``.
        export: the export's name once the client selected one in the handshake, else
            None.
        requests_in_flight: requests taking a slot of ``max_inflight_per_conn``
            (requests): a WRITE until its reply is queued; a READ served in a worker
            thread, FLUSH, TRIM, WRITE_ZEROES and BLOCK_STATUS until their reply has gone
            to the transport and the transport is not paused (``drain()``).  Requests
            answered at once on the event loop (CACHE, READs the backend serves without
            waiting, errors found in the request) never count.
        bytes_in_flight: the payloads those requests hold, bytes: READ reply buffers
            until handed to the transport, WRITE data until written.
        write_buffer_size: bytes in the transport's write buffer: replies handed over
            that the socket has not taken yet (the kernel's buffer is full: the client
            reads slower than it asks).
        reply_bytes_held: this connection's share of :attr:`NbdServer.reply_bytes_held`,
            bytes: ``bytes_in_flight + write_buffer_size``.
        bytes_received: bytes read from the socket since the connection was accepted
            (handshake included).
        bytes_sent: bytes handed to the transport since then (handshake included, and
            those still in ``write_buffer_size``).
    """

    id: int
    peer: str
    export: str | None
    requests_in_flight: int
    bytes_in_flight: int
    write_buffer_size: int
    reply_bytes_held: int
    bytes_received: int
    bytes_sent: int


@dataclass(frozen=True, slots=True)
class ServerStatistics:
    """An :class:`NbdServer` as :meth:`NbdServer.statistics` found it.

    Attributes:
        connections: every open connection, by :attr:`ConnectionStatistics.id` (so
            ``len(connections)`` connections are open).
        reply_bytes_held: :attr:`NbdServer.reply_bytes_held`, bytes: the sum of the
            connections' ``reply_bytes_held``.
        reply_bytes_peak: :attr:`NbdServer.reply_bytes_peak`, bytes.
        max_reply_memory: the bound on ``reply_bytes_held``, bytes.
        reply_memory_bound_reached: True from the first time a connection waited
            because ``reply_bytes_held`` reached ``max_reply_memory`` (logged then) until
            it fell below half of it (:attr:`ReplyMemory.bound_reached`).
        enospc_episode: True from a request answered ENOSPC (the store is full) until a
            write succeeds again (:attr:`EnospcLog.active`).
        enospc_unlogged: ENOSPC errors answered in the current episode after its first,
            which the log shows at DEBUG only (requests; 0 outside an episode).
    """

    connections: tuple[ConnectionStatistics, ...]
    reply_bytes_held: int
    reply_bytes_peak: int
    max_reply_memory: int
    reply_memory_bound_reached: bool
    enospc_episode: bool
    enospc_unlogged: int


class ReplyMemory:
    """The bytes a server holds for replies its clients have not read yet, and its bound.

    One per server (:attr:`NbdServer.reply_memory`); every connection adds the changes of
    what it holds (what counts: :attr:`NbdServer.reply_bytes_held`).  Use it on the
    server's event loop thread only.

    Attributes (read them; they change only through the methods):
        bound: ``max_reply_memory``, bytes: at or above it, connections that hold some
            are not read from until their own replies drain.
        held: bytes held now, as last counted.
        peak: the highest ``held`` since the server was created, bytes.
    """

    __slots__ = ("bound", "held", "peak", "_high", "_bound_logged")

    def __init__(self, bound: int):
        self.bound = bound
        self.held = 0
        self.peak = 0
        self._high = 0  # the highest ``held`` since the last take_high()
        self._bound_logged = False

    def add(self, change: int) -> None:
        """Count ``change`` bytes more held (negative: released)."""
        held = self.held + change
        self.held = held
        if held > self._high:
            self._high = held
            if held > self.peak:
                self.peak = held

    @property
    def bound_reached(self) -> bool:
        """True from the first time a connection waited at the bound until ``held`` fell
        below half of it (as :meth:`note_released` last saw it)."""
        return self._bound_logged

    def note_bound_reached(self) -> None:
        """A connection waits because ``held`` reached the bound: logged (INFO) the first
        time, then not again until ``held`` fell below half the bound."""
        if not self._bound_logged:
            self._bound_logged = True
            log.info("NBD: %d bytes held for replies clients have not read (bound %d): "
                     "connections holding some are not read from until their replies "
                     "drain", self.held, self.bound)

    def note_released(self) -> None:
        """Memory may have been released: below half the bound, the next time the bound
        is reached is logged again."""
        if self.held < self.bound // 2:
            self._bound_logged = False

    def take_high(self) -> int:
        """The highest ``held`` since the last call (bytes); counting starts again."""
        high, self._high = self._high, 0
        return high


class EnospcLog:
    """ENOSPC in the log once per episode of a full store.

    An episode begins with the first request answered ENOSPC by the backend (logged at
    INFO) and ends when a write succeeds again (logged with the number of ENOSPC errors
    answered meanwhile, which were logged at DEBUG only).  One per server, shared by its
    connections: they write to the same store.  Use it on the event loop thread only.

    Attributes (read them; they change only through the methods):
        active: True during an episode.
        unlogged: ENOSPC errors answered in this episode after its first (requests).
    """

    __slots__ = ("active", "unlogged")

    def __init__(self) -> None:
        self.active = False
        self.unlogged = 0

    def failed(self, peer: str, export: str, req: Request, message: str) -> None:
        """``req`` of connection ``peer`` on ``export`` (as the log names them) is answered
        ENOSPC with ``message``: begins an episode, or is counted in the current one."""
        if self.active:
            self.unlogged += 1
            log.debug("NBD connection %s, %s: %s failed: ENOSPC (%s)",
                      peer, export, _describe(req), message)
        else:
            self.active = True
            self.unlogged = 0
            log.info("NBD connection %s, %s: %s failed: ENOSPC (%s); further "
                     "ENOSPC errors are not logged until a write succeeds",
                     peer, export, _describe(req), message)

    def write_succeeded(self, export: str) -> None:
        """A write to ``export`` succeeded: ends the episode, if one is under way.

        Callers on a hot path test :attr:`active` first and skip the call.
        """
        if not self.active:
            return
        self.active = False
        log.info("NBD: writes succeed again (%s); %d more ENOSPC error(s) were answered "
                 "meanwhile", export, self.unlogged)
        self.unlogged = 0


class NbdServer:
    """Serves the exports of an :class:`~ddsnap.nbd.backend.ExportRegistry` over NBD.

    Args:
        registry: where exports are looked up (on every option that names one).
        executor: runs the blocking backend calls; by default a thread pool owned (and
            shut down) by this server.
        max_inflight_per_conn: requests of one connection being served at once; at the
            bound the connection's socket is not read until one completes.
        max_inflight_bytes_per_conn: bytes one connection may hold before reading stops:
            READ/WRITE payloads in flight plus replies waiting to be sent (a request is
            always admitted when none is in flight).
        max_reply_memory: server-wide bound, in bytes, on :attr:`reply_bytes_held`.  Once
            it is reached, a connection that holds any (a request in flight, or replies
            its client has not read beyond the transport's 64 KiB high-water mark) is not
            read from until its own replies drain; connections that hold none go on, so
            clients that read their replies are still served.
        on_idle: called on the event loop with the highest :attr:`reply_bytes_held` (bytes)
            since its last call, whenever a connection ends and the server holds no
            reply memory: the moment to give freed memory back to the system.

    Raises InvalidArgument for a bound below 1.  Use ``await start([...])`` then
    ``await close()`` (or ``async with``).
    """

    def __init__(self, registry: ExportRegistry, executor: Executor | None = None,
                 max_inflight_per_conn: int = 64, *,
                 max_inflight_bytes_per_conn: int = DEFAULT_MAX_INFLIGHT_BYTES,
                 max_reply_memory: int = DEFAULT_MAX_REPLY_MEMORY,
                 on_idle: Callable[[int], None] | None = None):
        if max_inflight_per_conn < 1:
            raise InvalidArgument("max_inflight_per_conn must be at least 1")
        if max_reply_memory < 1:
            raise InvalidArgument("max_reply_memory must be at least 1 byte")
        self.registry = registry
        self._executor = executor
        self._own_executor = False
        self.max_inflight_per_conn = max_inflight_per_conn
        self.max_inflight_bytes_per_conn = max_inflight_bytes_per_conn
        self.on_idle = on_idle
        self._listeners: list[asyncio.AbstractServer] = []
        self._unix_paths: list[tuple[str, int]] = []  # (path, inode) to remove on close
        self._connections: set[_Connection] = set()
        self._closing = False
        #: the bound addresses, ``unix:PATH`` or ``tcp:HOST:PORT`` with the real port
        self.addresses: list[str] = []
        #: reply memory held over all connections (each adds its changes), and its bound
        self.reply_memory = ReplyMemory(max_reply_memory)
        #: a full store's ENOSPC errors, logged once per episode
        self.enospc = EnospcLog()
        self._conn_ids = itertools.count(1)

    @property
    def executor(self) -> Executor | None:
        """The executor running backend calls (None before :meth:`start`)."""
        return self._executor

    @property
    def max_reply_memory(self) -> int:
        """The server-wide bound on :attr:`reply_bytes_held`, bytes."""
        return self.reply_memory.bound

    @property
    def connection_count(self) -> int:
        """Connections currently open."""
        return len(self._connections)

    @property
    def reply_bytes_held(self) -> int:
        """Bytes this server holds for replies its clients have not read yet, in total.

        That is, over every open connection: the transport's write buffer (replies
        handed to the socket that the kernel has not taken: the client does not read),
        plus the READ reply buffers and WRITE payloads of requests in flight.  Not
        counted: bytes the kernel's socket buffers hold, and each connection's input
        buffers (at most one request being received, bounded per connection).  This is
        what ``max_reply_memory`` bounds; it is 0 when no connection holds anything.

        Read it on the server's event loop thread (it looks at every connection).
        """
        for conn in list(self._connections):
            conn.account_buffer()
        return self.reply_memory.held

    @property
    def reply_bytes_peak(self) -> int:
        """The highest :attr:`reply_bytes_held` seen since the server was created, bytes.

        Updated whenever the total grows, so it catches peaks between two reads of
        :attr:`reply_bytes_held`.  The total may pass ``max_reply_memory`` by what
        connections had under way when it was reached: per connection at most one
        request (READ or WRITE payload up to 32 MiB), the transport's high-water mark
        (64 KiB) and one batch of small replies queued for one write (under 4 MiB).
        """
        return self.reply_memory.peak

    def statistics(self) -> ServerStatistics:
        """A snapshot of the server's counters and of each open connection's.

        As trio's ``statistics()``: figures the server keeps anyway, copied into frozen
        dataclasses (they do not change afterwards).  It never blocks and does no I/O; its
        cost grows with the number of connections, not with the traffic.  Looking at a
        connection's transport buffer brings the reply-memory count up to date, as
        reading :attr:`reply_bytes_held` does.

        Call it on the server's event loop thread, where the counters change (there is
        no lock); from another thread, have the loop run it (for example with
        ``asyncio.run_coroutine_threadsafe``).
        """
        conns = tuple(c.statistics() for c in sorted(self._connections, key=_conn_id))
        memory = self.reply_memory
        enospc = self.enospc
        return ServerStatistics(
            connections=conns, reply_bytes_held=memory.held, reply_bytes_peak=memory.peak,
            max_reply_memory=memory.bound, reply_memory_bound_reached=memory.bound_reached,
            enospc_episode=enospc.active, enospc_unlogged=enospc.unlogged)

    def connection_socket(self, connection_id: int) -> TransportSocket:
        """The socket of the open connection ``connection_id``
        (:attr:`ConnectionStatistics.id`), to look at its options and addresses:
        asyncio's wrapper, which has no send or recv.

        Raises KeyError if no connection with that id is open.  Event loop thread only.
        """
        for conn in self._connections:
            if conn.id == connection_id:
                return conn.writer.get_extra_info("socket")
        raise KeyError(f"no open NBD connection #{connection_id}")

    async def start(self, listen: list[str]) -> None:
        """Bind and listen on each address (``unix:PATH``, ``tcp:HOST:PORT``, port 0 ok).

        Each listener queues up to :data:`LISTEN_BACKLOG` connections not yet accepted.
        A unix socket path left over by a dead server is replaced; one still answered by
        a live server is refused (EADDRINUSE).  On error nothing stays bound.

        Raises:
            InvalidArgument: an address is malformed.
            ListenError: an address cannot be listened on (in use, no such directory,
                exists and is not a socket, permission denied, ...), naming it; its
                ``errno`` is the OS error's.
        """
        if self._executor is None:
            self._executor = ThreadPoolExecutor(thread_name_prefix="ddsnap-nbd")
            self._own_executor = True
        try:
            for uri in listen:
                kind, where = parse_listen(uri)
                try:
                    if kind == "unix":
                        await self._listen_unix(where)
                    else:
                        await self._listen_tcp(*where)
                except OSError as e:
                    # os.strerror: asyncio's own text repeats the address
                    raise ListenError(uri, os.strerror(e.errno) if e.errno else str(e),
                                      e.errno) from None
        except BaseException:
            await self.close()
            raise

    async def _listen_unix(self, path: str) -> None:
        if os.path.lexists(path):
            if not stat.S_ISSOCK(os.lstat(path).st_mode):
                raise ListenError(f"unix:{path}", "exists and is not a socket",
                                  errno.EEXIST)
            if await _unix_socket_alive(path):
                raise ListenError(f"unix:{path}", "in use by a running server",
                                  errno.EADDRINUSE)
        listener = await asyncio.start_unix_server(self._accept, path=path,
                                                   limit=_STREAM_LIMIT,
                                                   backlog=LISTEN_BACKLOG)
        self._listeners.append(listener)
        self._unix_paths.append((path, os.stat(path).st_ino))
        self.addresses.append(f"unix:{path}")

    async def _listen_tcp(self, host: str | None, port: int) -> None:
        listener = await asyncio.start_server(self._accept, host=host, port=port,
                                              limit=_STREAM_LIMIT, backlog=LISTEN_BACKLOG)
        self._listeners.append(listener)
        for sock in listener.sockets:
            addr = sock.getsockname()
            shown = f"[{addr[0]}]" if sock.family == socket.AF_INET6 else addr[0]
            self.addresses.append(f"tcp:{shown}:{addr[1]}")

    async def close(self, grace: float = 10.0) -> None:
        """Stop accepting, end every connection, release the listeners and executor.

        Each connection stops reading, lets its in-flight requests finish and reply, and
        closes its backend.  Connections still stuck after ``grace`` seconds (a client
        that never reads its replies) are aborted.
        """
        self._closing = True
        for listener in self._listeners:
            listener.close()
        conns = list(self._connections)
        for conn in conns:
            conn.stop()
        tasks = [c.task for c in conns if c.task is not None]
        if tasks:
            _done, pending = await asyncio.wait(tasks, timeout=grace)
            if pending:
                for conn in conns:
                    conn.abort()
                await asyncio.wait(pending)
        for listener in self._listeners:
            await listener.wait_closed()
        self._listeners.clear()
        for path, ino in self._unix_paths:
            try:
                if os.stat(path).st_ino == ino:  # still ours
                    os.unlink(path)
            except OSError:
                pass
        self._unix_paths.clear()
        if self._own_executor and self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
            self._own_executor = False

    async def __aenter__(self) -> NbdServer:
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.close()

    async def _accept(self, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # small replies must not wait for Nagle (spec: "Protocol phases")
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if sock is not None:
            _grow_send_buffer(sock)
        executor = self._executor
        if self._closing or executor is None:  # (no executor: not started, or closed)
            writer.close()
            return
        conn = _Connection(self, next(self._conn_ids), executor, reader, writer,
                           _peer_name(writer, sock))
        self._connections.add(conn)
        conn.task = asyncio.current_task()
        try:
            await conn.run()
        finally:
            self._connections.discard(conn)
            self._connection_ended()

    def _connection_ended(self) -> None:
        """A connection ended, and gave back what it held: when no reply memory is held
        any more, :attr:`on_idle` is told the highest total since its last call."""
        memory = self.reply_memory
        if memory.held == 0 and self.on_idle is not None:
            try:
                self.on_idle(memory.take_high())
            except Exception:
                log.exception("the NBD server's on_idle callback failed")


def _conn_id(conn: _Connection) -> int:
    return conn.id


def _peer_name(writer: asyncio.StreamWriter, sock) -> str:
    """Who is connected, for the log: ``HOST:PORT``, or on a unix socket the client's
    pid and uid (SO_PEERCRED) and the socket."""
    if sock is not None and sock.family == socket.AF_UNIX:
        where = f"unix:{writer.get_extra_info('sockname')}"
        try:
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                    struct.calcsize("3i"))
            pid, uid, _gid = struct.unpack("3i", creds)
            return f"pid {pid} (uid {uid}) on {where}"
        except (OSError, AttributeError):  # not Linux
            return f"a client on {where}"
    peer = writer.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        v6 = sock is not None and sock.family == socket.AF_INET6
        return f"[{peer[0]}]:{peer[1]}" if v6 else f"{peer[0]}:{peer[1]}"
    return str(peer or "an unknown peer")


def _errname(err: int) -> str:
    """``ENOSPC`` for 28: errno values are what NBD errors are made of."""
    if err == errno.ENOTSUP:
        return "ENOTSUP"  # errorcode says EOPNOTSUPP, the same number
    return errno.errorcode.get(err, str(err))


def _describe(req: Request) -> str:
    """A request, for the log: ``WRITE of 65536 bytes at offset 0 (handle 0x7)``."""
    if req.command is Command.FLUSH:
        return f"FLUSH (handle {req.handle:#x})"
    return (f"{req.command.name} of {req.length} bytes at offset {req.offset} "
            f"(handle {req.handle:#x})")


class _Protocol(ServerConnection):
    """The protocol object of one connection, which also reports the requests it refuses
    by itself (validation: EPERM on a read-only export, EINVAL, ENOSPC past the end)
    to ``refused(handle, nbd_error, message)``, for the log.

    Errors the server answers through :meth:`send_error` are logged by the server, with
    the whole request, so they are not reported again.
    """

    def __init__(self, registry: ExportRegistry, refused: Callable[[int, int, str], None]):
        super().__init__(registry)
        self._refused = refused
        self._answering = False

    def send_error(self, request: Request, err: int, message: str = "") -> None:
        self._answering = True
        try:
            super().send_error(request, err, message)
        finally:
            self._answering = False

    def _reply_error(self, handle: int, nbd_err: int, message: str) -> None:
        # only ever called for an error reply, so the replies that succeed pay nothing
        super()._reply_error(handle, nbd_err, message)
        if not self._answering:
            self._refused(handle, nbd_err, message)


def _grow_send_buffer(sock) -> None:
    """Ask for a socket send buffer of :data:`SEND_BUFFER` bytes (the kernel caps it at
    ``net.core.wmem_max``).

    A READ reply the socket cannot take at once is copied into the transport's buffer and
    moved down it as the socket drains: for 1 MiB replies that copying cost more than
    reading the data.  A send buffer that holds several replies lets them go out
    directly.
    """
    try:
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) < SEND_BUFFER:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
    except OSError:
        pass  # a hint only


def _write_each(backend, writes: list[tuple[int, bytes, bool]]) -> list[BaseException | None]:
    """``write_many`` for a backend without one: ``backend.write`` per ``(offset, data,
    fua)``; per write None or the exception it raised."""
    out: list[BaseException | None] = []
    for offset, data, fua in writes:
        try:
            backend.write(offset, data, fua=fua)
            out.append(None)
        except Exception as exc:  # reported to that request's client
            out.append(exc)
    return out


async def _unix_socket_alive(path: str) -> bool:
    """True if something accepts connections on the unix socket ``path``."""
    try:
        _reader, writer = await asyncio.open_unix_connection(path)
    except OSError:
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


class _Stopped(Exception):
    """Raised inside a connection's main loop when the server stops it."""


class _Connection:
    """One client connection: the read loop, the in-flight requests, the backend.

    Memory it holds (counted in ``server.reply_memory``, see
    :attr:`NbdServer.reply_bytes_held`):
    ``inflight_bytes``, the payloads of READs being read and WRITEs being written (a
    READ's bytes move to the transport when its reply is handed over), plus
    ``buffered``, the transport's write buffer as last looked at.  It is looked at after
    every hand-over (:meth:`_send`) and every wait for the socket to drain, so between
    two looks it can only have shrunk.
    """

    def __init__(self, server: NbdServer, conn_id: int, executor: Executor,
                 reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 peer: str = "a client"):
        self.server = server
        self.executor = executor  # the server's, for the backend calls
        self.reader = reader
        self.writer = writer
        self.transport = writer.transport
        self.proto = _Protocol(server.registry, self._refused)
        self.id = conn_id
        self.peer = f"#{self.id} from {peer}"  # for the log
        self.peer_name = peer
        # the server's, shared with its other connections
        self._memory = server.reply_memory
        self._enospc = server.enospc
        self.task: asyncio.Task | None = None
        self.backend: ExportBackend | None = None
        # requests in flight, with the payload bytes each one holds: the task serving it,
        # or for a WRITE the future its reply sets (_dispatch_write; a Task is a Future)
        self.inflight: dict[asyncio.Future, int] = {}
        self.inflight_bytes = 0
        # the transport's write buffer at the last look, and its high-water mark (above
        # it the transport pauses and drain() waits)
        self.buffered = 0
        self._high_water = self.transport.get_write_buffer_limits()[1]
        # for the log line when the connection ends
        self.started = time.monotonic()
        self.bytes_in = 0
        self.bytes_out = 0
        self.ended = "ended"
        # one future per WRITE/TRIM/WRITE_ZEROES whose backend call has not returned,
        # for a later FLUSH to wait on
        self.pending_writes: set[asyncio.Future] = set()
        # executor futures not yet finished: backend.close() waits for all of them
        self.backend_calls: set[asyncio.Future] = set()
        self.slot_freed = asyncio.Event()
        #: the backend's read_into_nowait, if it has one (see _read_inline)
        self._nowait: Callable | None = None
        #: WRITEs finished by workers, ``(request, written, exception or None)``, and
        #: whether the loop has already been asked to reply to them
        self._completed: collections.deque = collections.deque()
        self._wake_pending = False
        #: WRITEs gathered for one ``write_many`` call, ``(request, written)``
        self._write_batch: list = []
        self.stopping = False
        self._interruptible = False

    # -- lifecycle ---------------------------------------------------------------------

    def stop(self) -> None:
        """Stop reading requests; in-flight ones finish, then the connection closes."""
        self.stopping = True
        if self._interruptible and self.task is not None:
            self.task.cancel()

    def abort(self) -> None:
        """Drop the connection now (pending writes to the socket fail)."""
        self.writer.transport.abort()

    async def run(self) -> None:
        """Serve the connection until DISC, EOF, a fatal error or :meth:`stop`."""
        cancelled = False
        try:
            self._send()
            await self._interruptibly(self.writer.drain())
            await self._serve()
        except _Stopped:
            self.ended = "closed by the server (shutting down)"
        except ConnectionError as e:
            self.ended = f"connection lost ({e.strerror or type(e).__name__})"
        except asyncio.CancelledError:
            # our own stop() cancels only interruptible waits; anything else is the
            # loop shutting down, which must still see the cancellation
            cancelled = not self.stopping
            self.ended = "closed by the server (shutting down)"
        except Exception as e:
            log.exception("NBD connection %s failed", self.peer)
            self.ended = f"failed ({e})"
        finally:
            try:
                await self._finish()
            finally:
                log.info("NBD connection %s, %s: %s after %.3f s, %d bytes read, "
                         "%d bytes written", self.peer, self._export, self.ended,
                         time.monotonic() - self.started, self.bytes_in, self.bytes_out)
        if cancelled:
            raise asyncio.CancelledError

    async def _interruptibly(self, aw):
        """Await ``aw``; :meth:`stop` may cancel the task while it waits here."""
        if self.stopping:
            if asyncio.iscoroutine(aw):
                aw.close()
            raise _Stopped
        self._interruptible = True
        try:
            return await aw
        finally:
            self._interruptible = False

    async def _serve(self) -> None:
        proto = self.proto
        server = self.server
        transport = self.transport
        limit = server.max_inflight_per_conn
        byte_limit = server.max_inflight_bytes_per_conn
        memory = self._memory
        max_held = memory.bound
        parsed: collections.deque = collections.deque()
        while True:
            # back-pressure: do not start a request while the connection is at its bound
            while len(self.inflight) >= limit or (
                    self.inflight and self.inflight_bytes + self.buffered >= byte_limit):
                self._send()  # nothing waits in the protocol object meanwhile
                self.slot_freed.clear()
                await self._interruptibly(self.slot_freed.wait())
                self.account_buffer()
            # ...nor while the server holds its bound of reply memory and this
            # connection holds some: it waits for its own replies to drain, so clients
            # that read theirs go on
            if memory.held >= max_held and self._holds_replies():
                await self._wait_for_own_replies()
                continue
            if self.stopping:
                self.ended = "closed by the server (shutting down)"
                return
            if not parsed:
                # Parsed a few at a time: the requests buffered so far, not more.
                parsed.extend(proto.receive_data(b"", max_events=PARSE_BATCH))
            if not parsed:
                # Replies answered at once wait here, so that one write sends all the
                # replies to the requests that arrived together.
                self._send()
                await self._interruptibly(self.writer.drain())
                self.account_buffer()
                data = await self._interruptibly(self.reader.read(READ_CHUNK))
                if not data:
                    self.ended = "closed by the client"
                    log.debug("NBD connection %s closed by the client", self.peer)
                    return
                self.bytes_in += len(data)
                parsed.extend(proto.receive_data(data, max_events=PARSE_BATCH))
                continue
            event = parsed.popleft()
            if type(event) is Request and event.command is not Command.DISC:
                self._dispatch(event)  # the common case, without a coroutine
            elif await self._handle([event]):
                return
            if proto.pending_output() >= SEND_BATCH_REPLIES:
                self._send()
            buffered = transport.get_write_buffer_size()
            if buffered > SEND_BUFFER:
                # Replies answered on the loop hold no in-flight slot: this bounds their
                # memory when the client does not read them as fast as it asks.
                self.account_buffer()
                await self._interruptibly(self.writer.drain())
                self.account_buffer()
            elif buffered != self.buffered:
                self.account_buffer()

    @property
    def _export(self) -> str:
        """``export 'NAME'`` or ``no export``, for the log."""
        name = self.proto.export_name
        return "no export" if name is None else f"export {name!r}"

    def _holds_replies(self) -> bool:
        """True if this connection holds reply memory the server-wide bound counts:
        requests in flight, or replies its client has not read beyond the transport's
        high-water mark.  What the protocol object has queued is handed over first."""
        self._send()
        return bool(self.inflight) or self.account_buffer() > self._high_water

    async def _wait_for_own_replies(self) -> None:
        """Wait, the server being at its reply-memory bound, until this connection holds
        less: one of its requests completes, or its client reads its replies."""
        self._memory.note_bound_reached()
        if self.inflight:
            self.slot_freed.clear()
            await self._interruptibly(self.slot_freed.wait())
        else:
            # above the high-water mark the transport is paused: drain() returns once
            # the client has read all but the low-water mark
            await self._interruptibly(self.writer.drain())
        self.account_buffer()
        self._memory.note_released()  # the next time is logged again

    def statistics(self) -> ConnectionStatistics:
        """This connection's counters now (see :meth:`NbdServer.statistics`)."""
        buffered = self.account_buffer()
        return ConnectionStatistics(
            id=self.id, peer=self.peer_name, export=self.proto.export_name,
            requests_in_flight=len(self.inflight), bytes_in_flight=self.inflight_bytes,
            write_buffer_size=buffered, reply_bytes_held=self.inflight_bytes + buffered,
            bytes_received=self.bytes_in, bytes_sent=self.bytes_out)

    def account_buffer(self) -> int:
        """Look at the transport's write buffer; add its change to the server's count of
        reply memory.  Returns its size in bytes.  Event loop thread only."""
        size = self.transport.get_write_buffer_size()
        change = size - self.buffered
        if change:
            self.buffered = size
            self._memory.add(change)
        return size

    async def _handle(self, events) -> bool:
        """Act on events in order; True when the connection must end."""
        for event in events:
            if isinstance(event, Request):
                if event.command is Command.DISC:
                    self.ended = "disconnected (NBD_CMD_DISC)"
                    log.debug("NBD connection %s disconnected", self.peer)
                    return True
                self._dispatch(event)
            elif isinstance(event, ExportSelected):
                try:
                    await self._call(event.export.open)
                except Exception as exc:
                    log.warning("cannot open export %r for NBD connection %s: %s",
                                event.name, self.peer, exc)
                    self.proto.data_to_send()  # do not confirm the handshake
                    self.ended = f"refused: export {event.name!r} cannot be opened"
                    return True
                self.backend = event.export
                self._nowait = getattr(event.export, "read_into_nowait", None)
                log.debug("NBD connection %s uses export %r", self.peer, event.name)
            elif isinstance(event, Abort):
                self.ended = "ended the handshake (NBD_OPT_ABORT)"
                return True
            elif isinstance(event, ProtocolViolation):
                log.warning("NBD connection %s: %s", self.peer, event.error)
                self.ended = f"dropped: {event.error}"
                return True
        return False

    async def _finish(self) -> None:
        """Let in-flight requests end, close the backend once, close the socket."""
        try:
            if self.inflight:
                await asyncio.wait(list(self.inflight))
            if self.backend_calls:
                await asyncio.wait(list(self.backend_calls))
            if self.backend is not None:
                backend, self.backend = self.backend, None
                try:
                    await self._call(backend.close)
                except Exception:
                    log.exception("closing export for NBD connection %s failed", self.peer)
            self._send()
            if not self.writer.is_closing():
                with contextlib.suppress(ConnectionError, OSError):
                    await self.writer.drain()
        finally:
            self.writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await self.writer.wait_closed()
            # the transport's buffer is gone with it (sent, or dropped by an abort)
            self.buffered, change = 0, -self.buffered
            self._memory.add(change)
            self._memory.note_released()

    # -- output ------------------------------------------------------------------------

    def _send(self) -> None:
        """Hand everything the protocol object queued to the transport.

        Small buffers are joined so that a burst of replies costs one system call;
        large ones (READ payloads) are written as they are, not copied.
        """
        buffers = self.proto.data_to_send()
        if not buffers or self.writer.is_closing():
            return
        small: list = []
        sent = 0
        for buf in buffers:
            n = len(buf)
            sent += n
            if n < SEND_BATCH:
                small.append(buf)
                continue
            if small:
                self.writer.write(b"".join(small))
                small = []
            self.writer.write(buf)
        if small:
            self.writer.write(small[0] if len(small) == 1 else b"".join(small))
        self.bytes_out += sent
        # what the socket did not take now stays in the transport: count it
        if self.transport.get_write_buffer_size() != self.buffered:
            self.account_buffer()

    # -- requests ----------------------------------------------------------------------

    async def _call(self, fn: Callable, *args, **kwargs):
        """Run a backend call in the executor; the loop never blocks on disk."""
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(self.executor,
                                   functools.partial(fn, *args, **kwargs))
        self.backend_calls.add(fut)
        fut.add_done_callback(self._call_done)
        # shielded: even if a waiter is cancelled the call is tracked until it returns,
        # so backend.close() never overlaps it
        return await asyncio.shield(fut)

    def _call_done(self, fut: asyncio.Future) -> None:
        self.backend_calls.discard(fut)
        if not fut.cancelled():
            fut.exception()  # consumed here; the awaiting task handles it

    def _dispatch(self, req: Request) -> None:
        if req.command is Command.CACHE:
            # a hint only: ddsnap has no read-ahead to start, so it succeeds at once
            self.proto.send_ok(req)
            return
        if req.command is Command.WRITE_ZEROES and req.fast_zero:
            # the backend cannot promise zeroing faster than writing (spec: ENOTSUP)
            self._send_error(req, errno.ENOTSUP, "fast zero not supported")
            return
        if req.command is Command.READ and self._read_inline(req):
            return
        if req.command is Command.WRITE:
            self._dispatch_write(req)
            return
        deps: list[asyncio.Future] = []
        written: asyncio.Future | None = None
        if req.command is Command.FLUSH:
            deps = list(self.pending_writes)
        elif req.command in _WRITES:
            written = asyncio.get_running_loop().create_future()
            self.pending_writes.add(written)
            written.add_done_callback(self.pending_writes.discard)
        task = asyncio.create_task(self._serve_request(req, deps, written))
        cost = req.length if req.command is Command.READ else 0
        self.inflight[task] = cost
        if cost:
            self.inflight_bytes += cost
            self._memory.add(cost)
        task.add_done_callback(self._request_done)

    def _read_inline(self, req: Request) -> bool:
        """Answer a READ on the event loop if the backend can without waiting.

        A READ whose data is in the page cache takes microseconds, far less than handing
        it to a worker thread (and back through the GIL), so the backend is asked first
        (``read_into_nowait``, which never waits for the disk or a lock) and the reply goes
        out at once; False means "serve it from a worker thread as usual".
        """
        nowait = self._nowait
        if nowait is None:
            return False
        reply, payload = self.proto.read_reply_buffer(req)
        try:
            if not nowait(req.offset, payload):
                return False
        except Exception:
            return False  # the worker-thread path reports the error properly
        self.proto.send_read_reply(reply)
        if len(reply) >= SEND_BATCH:
            self._send()
        return True

    def _dispatch_write(self, req: Request) -> None:
        """Run a WRITE in the thread pool without a task per request.

        The write path's cost was mostly the event loop's (a task, an executor future
        chained to an asyncio one, a shield, a wake-up per completion).  Here the WRITEs
        dispatched in one turn of the loop go to one worker together (for ddsnap's
        volumes, ``write_many``: one lock hold and one commit wait for all their
        copy-outs), which queues their outcomes and wakes the loop once.  The
        ``written`` future is both the request's in-flight slot and what a later FLUSH
        waits on.
        """
        loop = asyncio.get_running_loop()
        written = loop.create_future()
        self.pending_writes.add(written)
        written.add_done_callback(self.pending_writes.discard)
        self.inflight[written] = req.length
        self.inflight_bytes += req.length
        self._memory.add(req.length)
        self._write_batch.append((req, written))
        if len(self._write_batch) == 1:
            loop.call_soon(self._submit_write_batch)

    def _submit_write_batch(self) -> None:
        """Hand the gathered WRITEs to one worker: ``backend.write_many`` if the backend
        has it, else ``backend.write`` for each in turn."""
        batch, self._write_batch = self._write_batch, []
        if not batch:
            return
        loop = asyncio.get_running_loop()
        backend = self.backend
        write_many = getattr(backend, "write_many", None) or functools.partial(
            _write_each, backend)

        def run() -> None:
            try:
                outcomes = write_many([(r.offset, r.data, r.fua) for r, _w in batch])
            except BaseException as exc:  # reported to every request of the batch
                outcomes = [exc] * len(batch)
            for (req, written), outcome in zip(batch, outcomes, strict=True):
                self._completed.append((req, written, outcome))
            if not self._wake_pending:
                self._wake_pending = True
                # (RuntimeError: the loop is gone, the server was torn down)
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(self._write_completions)

        try:
            self.executor.submit(run)
        except RuntimeError as exc:  # executor shut down
            for req, written in batch:
                self._completed.append((req, written, exc))
            self._write_completions()

    def _write_completions(self) -> None:
        """Reply to every WRITE the workers finished (on the loop), then send."""
        self._wake_pending = False
        freed = 0
        succeeded = False
        while self._completed:
            req, written, exc = self._completed.popleft()
            if exc is None:
                self.proto.send_ok(req)
                succeeded = True
            else:
                self._send_error(req, *error_for_exception(exc))
            written.set_result(None)
            freed += self.inflight.pop(written, 0)
        self.inflight_bytes -= freed
        self._memory.add(-freed)
        if succeeded and self._enospc.active:
            self._enospc.write_succeeded(self._export)
        self.slot_freed.set()
        self._send()

    def _request_done(self, task: asyncio.Task) -> None:
        cost = self.inflight.pop(task, 0)  # 0 once the reply was handed over
        if cost:
            self.inflight_bytes -= cost
            self._memory.add(-cost)
        self.slot_freed.set()
        if not task.cancelled() and task.exception() is not None:
            log.error("NBD request handler failed", exc_info=task.exception())

    # -- errors answered, for the log --------------------------------------------------

    def _send_error(self, req: Request, err: int, message: str) -> None:
        """Answer ``req`` with the POSIX error ``err``, and log it (ENOSPC once for each
        time the store fills up: the first one, until a write succeeds again)."""
        if err == errno.ENOSPC:
            self._enospc.failed(self.peer, self._export, req, message)
        else:
            log.info("NBD connection %s, %s: %s failed: %s (%s)", self.peer,
                     self._export, _describe(req), _errname(err), message)
        self.proto.send_error(req, err, message)

    def _refused(self, handle: int, nbd_err: int, message: str) -> None:
        """The protocol object refused a request by itself (see :class:`_Protocol`)."""
        log.info("NBD connection %s, %s: request (handle %#x) refused: %s (%s)",
                 self.peer, self._export, handle, _errname(nbd_err), message)

    async def _serve_request(self, req: Request, deps: list[asyncio.Future],
                             written: asyncio.Future | None) -> None:
        backend = self.backend
        assert backend is not None  # requests are dispatched only once it is open
        proto = self.proto
        try:
            await self._run_backend(req, backend, proto, deps)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._send_error(req, *error_for_exception(exc))
        finally:
            if written is not None and not written.done():
                written.set_result(None)
        # The READ buffer's bytes are now the reply's: whatever the socket does not take
        # stays in the transport and is counted there (by _send).
        task = asyncio.current_task()
        assert task is not None  # this coroutine runs as a task (_dispatch)
        cost = self.inflight.get(task)
        if cost:
            self.inflight[task] = 0
            self.inflight_bytes -= cost
            self._memory.add(-cost)
        self._send()
        if not self.writer.is_closing():
            # holding the slot until the reply has left bounds memory per connection
            with contextlib.suppress(ConnectionError, OSError):
                await self.writer.drain()
            self.account_buffer()

    async def _room_for_reply(self) -> bool:
        """Wait until the transport holds at most :data:`SEND_BUFFER` bytes; False if the
        connection was lost meanwhile.

        A READ reply handed to a transport that cannot send is copied into its buffer,
        one bytearray grown by ``realloc``: for a client that does not read, many
        replies handed over at once made that buffer, and the copies left behind as it
        grew, twice the size of the replies (measured: 570 MiB of RSS for 256 MiB held).
        Waiting keeps each reply in its own buffer (still counted in flight) until the
        client has read what came before, as the loop does for replies it answers.
        """
        transport = self.transport
        while transport.get_write_buffer_size() > SEND_BUFFER:
            if transport.is_closing():
                return False
            try:
                # above the high-water mark the transport is paused: drain() waits
                await self.writer.drain()
            except (ConnectionError, OSError):
                return False
            self.account_buffer()
        return True

    async def _run_backend(self, req: Request, backend: ExportBackend,
                           proto: ServerConnection, deps: list[asyncio.Future]) -> None:
        """Make the backend call for ``req`` and queue its successful reply."""
        cmd = req.command
        if cmd is Command.READ:
            if hasattr(backend, "read_into"):
                reply, payload = proto.read_reply_buffer(req)
                await self._call(backend.read_into, req.offset, payload)
                if await self._room_for_reply():
                    proto.send_read_reply(reply)
                return
            data = await self._call(backend.read, req.offset, req.length)
            if not isinstance(data, (bytes, bytearray, memoryview)) \
                    or len(data) != req.length:
                raise RuntimeError(f"backend read of {req.length} bytes returned "
                                   f"{type(data).__name__} of wrong length")
            if await self._room_for_reply():
                proto.send_read_data(req, data)
        elif cmd is Command.WRITE:
            await self._call(backend.write, req.offset, req.data, fua=req.fua)
            proto.send_ok(req)
            if self._enospc.active:
                self._enospc.write_succeeded(self._export)
        elif cmd is Command.FLUSH:
            if deps:
                # FLUSH covers every write received before it on this connection
                await asyncio.wait(deps)
            await self._call(backend.flush)
            proto.send_ok(req)
        elif cmd is Command.TRIM:
            await self._call(backend.trim, req.offset, req.length, fua=req.fua)
            proto.send_ok(req)
        elif cmd is Command.WRITE_ZEROES:
            await self._call(backend.write_zeroes, req.offset, req.length,
                             fua=req.fua, no_hole=req.no_hole)
            proto.send_ok(req)
            if self._enospc.active:
                self._enospc.write_succeeded(self._export)
        elif cmd is Command.BLOCK_STATUS:
            extents = await self._call(backend.block_status, req.offset, req.length)
            proto.send_block_status(req, extents)
        else:  # pragma: no cover - the protocol object only passes the above
            proto.send_error(req, errno.EINVAL, f"unexpected {cmd.name}")
