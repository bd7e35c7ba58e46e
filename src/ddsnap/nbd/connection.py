"""One NBD client connection: the request loop, dispatch, reply order and back-pressure.

:class:`Connection` serves one client of a :class:`~ddsnap.nbd.server.NbdServer`.  The
protocol object (:class:`~ddsnap.nbd.protocol.ServerConnection`) does all parsing,
validation and reply framing; a connection moves bytes, runs backend calls in the
server's thread pool (the event loop never blocks on disk) and enforces the ordering
rules of the spec's "Ordering of messages and writes":

* many requests are in flight per connection and replies go out as they complete, in any
  order;
* in-flight requests are bounded (count and bytes): when the bound is reached the handler
  stops reading the socket, so a fast client is slowed down, not buffered without limit;
* the memory held for replies clients have not read yet is bounded server-wide
  (``max_reply_memory``, see :attr:`~ddsnap.nbd.server.NbdServer.reply_bytes_held`):
  past it, connections that hold some stop being read from until their own replies
  drain;
* a FLUSH first waits for every WRITE, TRIM and WRITE_ZEROES received before it on the
  same connection, then calls ``backend.flush()``; so every write acknowledged before the
  FLUSH is durable when the FLUSH is acknowledged;
* ``backend.open()`` runs when the client selects the export, ``backend.close()`` exactly
  once when the connection ends (DISC, EOF, error, server shutdown), after every backend
  call of that connection has returned.

WRITEs are batched: those dispatched in one turn of the loop go to one worker thread
together (``backend.write_many`` when the backend has it).  READs and WRITEs (without
FUA) the backend can do without waiting (``read_into_nowait``, ``write_nowait``: page
cache I/O on chunks it needs to ask nobody about) are answered on the event loop.

This module is longer than 600 lines on purpose: :class:`Connection` is one object on the
per-request path, whose read loop, dispatch, write batching and reply accounting share
the in-flight counts and run for every request; splitting it into several objects would
add a lookup or a call to every READ and WRITE, the path this code is measured on.  What
is not per-request work (the counters' bookkeeping, the error log) lives in
:mod:`ddsnap.nbd.accounting`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import functools
import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor
from typing import TYPE_CHECKING

from ddsnap.nbd.accounting import (
    ConnectionStatistics,
    ReportingServerConnection,
    describe_request,
    errname,
    error_for_exception,
)
from ddsnap.nbd.events import Abort, ExportSelected, MetaContext, ProtocolViolation, Request
from ddsnap.nbd.wire import Command

if TYPE_CHECKING:  # pragma: no cover - typing only
    from ddsnap.nbd.backend import ExportBackend
    from ddsnap.nbd.protocol import ServerConnection
    from ddsnap.nbd.server import NbdServer

log = logging.getLogger("ddsnap.nbd")

#: bytes asked from the socket per read
READ_CHUNK = 256 * 1024
#: buffers smaller than this many bytes are joined into one write, and a READ reply
#: this large is sent at once rather than batched with the next replies
SEND_BATCH = 64 * 1024
#: at most this many queued replies wait for more to be sent with them
SEND_BATCH_REPLIES = 64
#: requests parsed from the input buffer at a time
PARSE_BATCH = 32
#: socket send buffer asked for (bytes; see ``ddsnap.nbd.server._grow_send_buffer``)
SEND_BUFFER = 4 * 1024 * 1024
#: commands that change the export and so must precede a later FLUSH
_WRITES = (Command.WRITE, Command.TRIM, Command.WRITE_ZEROES)


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


def _block_statuses(backend, contexts: tuple[MetaContext, ...], offset: int,
                    length: int) -> list[list[tuple[int, int]]]:
    """The extents of each selected metadata context for ``[offset, offset + length)``
    (one backend call each, in one worker thread): ``backend.block_status`` for
    ``base:allocation``, ``backend.changed_status(base, ...)`` for
    ``ddsnap:changed:FROM``."""
    return [backend.block_status(offset, length) if ctx.base is None
            else backend.changed_status(ctx.base, offset, length) for ctx in contexts]


class _Stopped(Exception):
    """Raised inside a connection's main loop when the server stops it."""


class Connection:
    """One client connection: the read loop, the in-flight requests, the backend.

    Memory it holds (counted in ``server.reply_memory``, see
    :attr:`~ddsnap.nbd.server.NbdServer.reply_bytes_held`):
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
        self.proto = ReportingServerConnection(server.registry, self._refused)
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
        #: the backend's read_into_nowait and write_nowait, if it has them (see
        #: _read_inline and _dispatch_write)
        self._nowait: Callable | None = None
        self._write_nowait: Callable | None = None
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
                self._write_nowait = getattr(event.export, "write_nowait", None)
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

        First the backend may take the WRITE at once (``write_nowait``: an overwrite of
        chunks it may write without asking, into the page cache), which costs a system
        call instead of two thread hand-offs; it then needs no slot and no FLUSH
        waits for it.
        """
        nowait = self._write_nowait
        if nowait is not None and not req.fua:
            try:
                done = nowait(req.offset, req.data)
            except Exception:
                done = False  # the worker-thread path reports the error properly
            if done:
                self.proto.send_ok(req)
                if self._enospc.active:
                    self._enospc.write_succeeded(self._export)
                return
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
                     self._export, describe_request(req), errname(err), message)
        self.proto.send_error(req, err, message)

    def _refused(self, handle: int, nbd_err: int, message: str) -> None:
        """The protocol object refused a request by itself (see
        :class:`~ddsnap.nbd.accounting.ReportingServerConnection`)."""
        log.info("NBD connection %s, %s: request (handle %#x) refused: %s (%s)",
                 self.peer, self._export, handle, errname(nbd_err), message)

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
            contexts = proto.meta_contexts
            answers = await self._call(_block_statuses, backend, contexts, req.offset,
                                       req.length)
            # one chunk per selected context, the last one DONE (spec: "exactly one
            # status chunk per negotiated metadata context ID"); an error in any
            # context was raised above and is the whole reply
            for i, (ctx, extents) in enumerate(zip(contexts, answers, strict=True)):
                proto.send_block_status(req, extents, ctx.id, done=i == len(answers) - 1)
        else:  # pragma: no cover - the protocol object only passes the above
            proto.send_error(req, errno.EINVAL, f"unexpected {cmd.name}")
