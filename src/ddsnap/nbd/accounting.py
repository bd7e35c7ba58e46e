"""What the NBD server counts and reports: reply memory, statistics, errors in the log.

Kept apart from the transport so that what is counted, and what a client and the log
are told when something fails, can be read in one place:

* :class:`ReplyMemory`: the bytes held for replies clients have not read yet, server-wide,
  and the bound on them (``max_reply_memory``);
* :class:`EnospcLog`: ENOSPC logged once per episode of a full store;
* :class:`ConnectionStatistics` and :class:`ServerStatistics`: the frozen snapshots
  :meth:`ddsnap.nbd.server.NbdServer.statistics` returns;
* :func:`error_for_exception`: the errno and message a backend exception is answered
  with; :func:`errname` and :func:`describe_request`: how the log names them;
* :class:`ReportingServerConnection`: the protocol object that also reports the requests
  it refuses by itself, for the log.

Everything here is used on the server's event loop thread only (there is no lock).
``NbdServer`` below is :class:`ddsnap.nbd.server.NbdServer`.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ddsnap.errors import DdsnapError
from ddsnap.nbd.protocol import ServerConnection
from ddsnap.nbd.wire import Command

if TYPE_CHECKING:  # pragma: no cover - typing only
    from ddsnap.nbd.backend import ExportRegistry
    from ddsnap.nbd.events import Request

log = logging.getLogger("ddsnap.nbd")


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


def errname(err: int) -> str:
    """``ENOSPC`` for 28: errno values are what NBD errors are made of."""
    if err == errno.ENOTSUP:
        return "ENOTSUP"  # errorcode says EOPNOTSUPP, the same number
    return errno.errorcode.get(err, str(err))


def describe_request(req: Request) -> str:
    """A request, for the log: ``WRITE of 65536 bytes at offset 0 (handle 0x7)``."""
    if req.command is Command.FLUSH:
        return f"FLUSH (handle {req.handle:#x})"
    return (f"{req.command.name} of {req.length} bytes at offset {req.offset} "
            f"(handle {req.handle:#x})")


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
                      peer, export, describe_request(req), message)
        else:
            self.active = True
            self.unlogged = 0
            log.info("NBD connection %s, %s: %s failed: ENOSPC (%s); further "
                     "ENOSPC errors are not logged until a write succeeds",
                     peer, export, describe_request(req), message)

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


class ReportingServerConnection(ServerConnection):
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

