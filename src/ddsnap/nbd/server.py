"""The NBD server: listeners, accepted connections, and what the server holds over them.

:class:`NbdServer` listens on unix and TCP sockets, accepts clients and runs one
:class:`~ddsnap.nbd.connection.Connection` per client until it ends; it keeps the set
of open connections, the server-wide counters (reply memory, ENOSPC episodes) and
:meth:`~NbdServer.statistics`, and on :meth:`~NbdServer.close` ends every connection and
releases the listeners and the thread pool.  How a connection serves its requests
(ordering, FLUSH, back-pressure, WRITE batching) is told in
:mod:`ddsnap.nbd.connection`.

The NBD modules, bottom up: :mod:`~ddsnap.nbd.wire` (the wire format),
:mod:`~ddsnap.nbd.events` and :mod:`~ddsnap.nbd.protocol` (the sans-IO protocol state
machine, in the style of h11), :mod:`~ddsnap.nbd.backend` (what is served),
:mod:`~ddsnap.nbd.accounting` (what is counted and reported),
:mod:`~ddsnap.nbd.connection` (one client over asyncio) and this module.

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
import contextlib
import errno
import itertools
import logging
import os
import socket
import stat
import struct
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from ddsnap.errors import InvalidArgument, ListenError
from ddsnap.nbd.accounting import EnospcLog, ReplyMemory, ServerStatistics
from ddsnap.nbd.connection import SEND_BUFFER, Connection

if TYPE_CHECKING:  # pragma: no cover - typing only
    from asyncio.trsock import TransportSocket

    from ddsnap.nbd.backend import ExportRegistry

log = logging.getLogger("ddsnap.nbd")

#: StreamReader buffer limit (it pauses the socket at twice this)
_STREAM_LIMIT = 1024 * 1024
#: default bound on READ/WRITE bytes in flight per connection (256 MiB)
DEFAULT_MAX_INFLIGHT_BYTES = 256 * 1024 * 1024
#: default server-wide bound on reply memory held (bytes; see NbdServer.reply_bytes_held)
DEFAULT_MAX_REPLY_MEMORY = 256 * 1024 * 1024
#: connections the kernel queues for accept() per listener (capped by
#: ``net.core.somaxconn``): asyncio's default of 100 refuses part of a burst of a few
#: hundred clients connecting at once
LISTEN_BACKLOG = 1024


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
        self._listeners: list[asyncio.Server] = []
        self._unix_paths: list[tuple[str, int]] = []  # (path, inode) to remove on close
        self._connections: set[Connection] = set()
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

    async def start(self, listen: list[str], serve: bool = True) -> None:
        """Bind and listen on each address (``unix:PATH``, ``tcp:HOST:PORT``, port 0 ok).

        With ``serve`` False the sockets are bound and listening but nothing accepts on
        them here: ``ddsnap serve --workers`` binds them once and hands
        :meth:`listening_sockets` to worker processes, which :meth:`adopt` them.

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
                        await self._listen_unix(where, serve)
                    else:
                        host, port = where
                        await self._listen_tcp(host, port, serve)
                except OSError as e:
                    # os.strerror: asyncio's own text repeats the address
                    raise ListenError(uri, os.strerror(e.errno) if e.errno else str(e),
                                      e.errno) from None
        except BaseException:
            await self.close()
            raise

    async def _listen_unix(self, path: str, serve: bool) -> None:
        if os.path.lexists(path):
            if not stat.S_ISSOCK(os.lstat(path).st_mode):
                raise ListenError(f"unix:{path}", "exists and is not a socket",
                                  errno.EEXIST)
            if await _unix_socket_alive(path):
                raise ListenError(f"unix:{path}", "in use by a running server",
                                  errno.EADDRINUSE)
        listener = await asyncio.start_unix_server(self._accept, path=path,
                                                   limit=_STREAM_LIMIT,
                                                   backlog=LISTEN_BACKLOG,
                                                   start_serving=serve)
        self._listening(listener, serve)
        self._listeners.append(listener)
        self._unix_paths.append((path, os.stat(path).st_ino))
        self.addresses.append(f"unix:{path}")

    async def _listen_tcp(self, host: str | None, port: int, serve: bool = True) -> None:
        listener = await asyncio.start_server(self._accept, host=host, port=port,
                                              limit=_STREAM_LIMIT, backlog=LISTEN_BACKLOG,
                                              start_serving=serve)
        self._listening(listener, serve)
        self._listeners.append(listener)
        for sock in listener.sockets:
            self.addresses.append(_address(sock))

    @staticmethod
    def _listening(listener: asyncio.Server, serve: bool) -> None:
        """Make a listener asyncio does not serve listen anyway: asyncio calls
        ``listen()`` only when it starts serving, and a bound socket that does not
        listen refuses connections (``serve --workers`` is ready, its control socket
        up, before its workers accept: connections must queue meanwhile)."""
        if serve:
            return
        for s in listener.sockets:
            raw = socket.socket(fileno=s.fileno())  # (the same descriptor, not a copy)
            try:
                raw.listen(LISTEN_BACKLOG)
            finally:
                raw.detach()

    def listening_fds(self) -> list[int]:
        """The file descriptors of the listening sockets, for worker processes to
        inherit (see :meth:`adopt`); they stay this server's."""
        return [sock.fileno() for listener in self._listeners for sock in listener.sockets]

    async def adopt(self, socks: list[socket.socket]) -> None:
        """Accept on listening sockets bound by another process (``serve --workers``:
        every worker accepts on the same sockets, the kernel gives each connection to
        one of them).  Closing this server closes its copies only; a unix socket's
        path stays (its binder removes it)."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(thread_name_prefix="ddsnap-nbd")
            self._own_executor = True
        for sock in socks:
            # (asyncio calls listen() again: the same backlog, not its default of 100)
            if sock.family == socket.AF_UNIX:
                listener = await asyncio.start_unix_server(self._accept, sock=sock,
                                                           limit=_STREAM_LIMIT,
                                                           backlog=LISTEN_BACKLOG)
            else:
                listener = await asyncio.start_server(self._accept, sock=sock,
                                                      limit=_STREAM_LIMIT,
                                                      backlog=LISTEN_BACKLOG)
            self._listeners.append(listener)
            self.addresses.append(_address(sock))

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
        conn = Connection(self, next(self._conn_ids), executor, reader, writer,
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


def _conn_id(conn: Connection) -> int:
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


def _address(sock) -> str:
    """``unix:PATH`` or ``tcp:HOST:PORT`` of a listening socket."""
    addr = sock.getsockname()
    if sock.family == socket.AF_UNIX:
        return f"unix:{addr if isinstance(addr, str) else addr.decode()}"
    shown = f"[{addr[0]}]" if sock.family == socket.AF_INET6 else addr[0]
    return f"tcp:{shown}:{addr[1]}"


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
