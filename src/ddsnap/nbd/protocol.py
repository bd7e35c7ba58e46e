"""The NBD protocol, sans-IO: bytes in, events out; replies out as bytes.

:class:`ServerConnection` is the server side of one NBD connection, in the style of h11:
it never touches a socket.  The transport feeds it what the client sent with
:meth:`~ServerConnection.receive_data`, gets back :mod:`ddsnap.nbd.events` objects, asks
it to build replies (:meth:`~ServerConnection.send_read_data`,
:meth:`~ServerConnection.send_ok`, :meth:`~ServerConnection.send_error`,
:meth:`~ServerConnection.send_block_status`) and writes whatever
:meth:`~ServerConnection.data_to_send` returns.

The whole fixed-newstyle handshake is answered here against an
:class:`~ddsnap.nbd.backend.ExportRegistry`; the transport only hears about it through an
:class:`~ddsnap.nbd.events.ExportSelected` event.  In the transmission phase every
request is validated here (command, flags, range, read-only, block size limits); a
request that fails validation is answered with an error reply by this object and never
reaches the transport.

This module holds the state machine only: what to do with each message, in which state.
The numbers, layouts and byte-level encoding and decoding of the messages are in
:mod:`ddsnap.nbd.wire`; the events it returns are in :mod:`ddsnap.nbd.events`.  It is
longer than 600 lines on purpose: :class:`ServerConnection` is one state machine whose
handshake and transmission phases share one parser and its private state (splitting it
over modules would have them reach into each other), and an eighth of the file is the
list of wire names it imports, one per line (they are imported by name, not read as
``wire.X``, so that the per-request path looks up globals only, as before the split).

Spec followed: the NBD protocol document, ``doc/proto.md`` of the NetworkBlockDevice/nbd
repository ("Fixed newstyle negotiation", "Option types", "Transmission", "Request types",
"Structured reply chunk message", "Block size constraints", "Metadata querying", "Error
values").  What ddsnap serves is summarised in ``docs/protocol.md``.  All sizes, offsets
and lengths are in bytes; every integer on the wire is big-endian.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING

from ddsnap.errors import ProtocolError
from ddsnap.nbd.events import (
    Abort,
    Event,
    ExportSelected,
    MetaContext,
    ProtocolViolation,
    Request,
)
from ddsnap.nbd.wire import (
    ALLOWED_FLAGS,
    BASE_ALLOCATION,
    BASE_ALLOCATION_ID,
    CHANGED_FIRST_ID,
    CHANGED_PREFIX,
    CMD_FLAG_DF,
    CMD_FLAG_FAST_ZERO,
    CMD_FLAG_FUA,
    DDSNAP_NAMESPACE,
    FLAG_C_FIXED_NEWSTYLE,
    FLAG_C_NO_ZEROES,
    FLAG_CAN_MULTI_CONN,
    FLAG_HAS_FLAGS,
    FLAG_READ_ONLY,
    FLAG_SEND_CACHE,
    FLAG_SEND_DF,
    FLAG_SEND_FAST_ZERO,
    FLAG_SEND_FLUSH,
    FLAG_SEND_FUA,
    FLAG_SEND_TRIM,
    FLAG_SEND_WRITE_ZEROES,
    GREETING,
    IHAVEOPT,
    INFO_BLOCK_SIZE,
    INFO_EXPORT,
    INFO_NAME,
    MAX_BLOCK_SIZE,
    MAX_DISCARD_PAYLOAD,
    MAX_META_CONTEXTS,
    MAX_OPTION_LENGTH,
    MIN_BLOCK_SIZE,
    NBD_EINVAL,
    NBD_ENOSPC,
    NBD_EPERM,
    OFFSET_DATA_HEADER,
    OPT_ABORT,
    OPT_EXPORT_NAME,
    OPT_GO,
    OPT_INFO,
    OPT_LIST,
    OPT_LIST_META_CONTEXT,
    OPT_SET_META_CONTEXT,
    OPT_STRUCTURED_REPLY,
    OPTION_HEADER,
    PREFERRED_BLOCK_SIZE,
    REP_ACK,
    REP_ERR_INVALID,
    REP_ERR_TOO_BIG,
    REP_ERR_UNKNOWN,
    REP_ERR_UNSUP,
    REP_INFO,
    REP_META_CONTEXT,
    REP_SERVER,
    REPLY_FLAG_DONE,
    REPLY_TYPE_OFFSET_DATA,
    REQUEST_HEADER,
    REQUEST_MAGIC,
    SIMPLE_REPLY_HEADER,
    SIMPLE_REPLY_MAGIC,
    SIZE_LIMITED,
    STRUCTURED_REPLY_MAGIC,
    U16,
    U32,
    U64,
    WRITING,
    ZEROES_124,
    Buffer,
    Command,
    OptionError,
    block_status_chunk,
    decode_info_request,
    decode_meta_context_request,
    decode_string,
    errno_to_nbd,
    error_chunk,
    none_chunk,
    offset_data_chunk_header,
    option_reply,
    simple_reply,
)

if TYPE_CHECKING:  # pragma: no cover - typing only
    from ddsnap.nbd.backend import ExportBackend, ExportRegistry


class State(enum.Enum):
    """Where the client side of the stream is."""

    HANDSHAKE = "handshake"
    TRANSMISSION = "transmission"
    #: no more input is parsed (after DISC, ABORT or a fatal error); replies to
    #: requests already handed out can still be built.
    CLOSED = "closed"


# --- the connection -------------------------------------------------------------------


def _no_continuation(_events: list[Event]) -> None:
    """What follows a skip when none is pending (a skip always sets its own)."""


class ServerConnection:
    """Server side of one NBD connection, without I/O (fixed newstyle; "Handshake").

    Construction queues the greeting (NBDMAGIC, IHAVEOPT, handshake flags
    FIXED_NEWSTYLE | NO_ZEROES; 18 bytes).  Then:

    * :meth:`receive_data` takes client bytes and returns events: :class:`ExportSelected`
      once, :class:`Request` per valid request, and :class:`Abort` or
      :class:`ProtocolViolation` at the end.  Options are answered internally.
    * The ``send_*`` methods queue the reply to a :class:`Request`, simple or structured
      depending on whether NBD_OPT_STRUCTURED_REPLY was negotiated.
    * :meth:`data_to_send` returns the queued output.

    Not thread-safe: use it from one thread (the event loop).

    Args:
        registry: the exports, consulted on every option naming one.
    """

    def __init__(self, registry: ExportRegistry):
        self._registry = registry
        self._state = State.HANDSHAKE
        self._out: list[Buffer] = [GREETING]
        self._buf = bytearray()
        # what the parser waits for: ``_need`` bytes, then ``_handler(bytes, events)``
        self._need = 4
        self._handler: Callable[[bytes, list[Event]], None] = self._on_client_flags
        # bytes still to skip, then ``_after_discard(events)``
        self._discard = 0
        self._after_discard: Callable[[list[Event]], None] = _no_continuation
        self._fixed = False
        self._no_zeroes = False
        self._structured = False
        # canonical export name for which the contexts were selected, or None, and
        # the contexts selected (NBD_OPT_SET_META_CONTEXT)
        self._meta_export: str | None = None
        self._meta_selected: tuple[MetaContext, ...] = ()
        # the contexts BLOCK_STATUS answers in the transmission phase (none: EINVAL)
        self._contexts: tuple[MetaContext, ...] = ()
        self._option = 0
        self._export: ExportBackend | None = None
        self._export_name: str | None = None
        self._size = 0
        self._tflags = 0
        self._read_only = False

    # -- public state ------------------------------------------------------------------

    @property
    def state(self) -> State:
        """Current :class:`State` of the input side."""
        return self._state

    @property
    def structured_replies(self) -> bool:
        """True once NBD_OPT_STRUCTURED_REPLY was acknowledged."""
        return self._structured

    @property
    def meta_context_enabled(self) -> bool:
        """True if BLOCK_STATUS is usable in this transmission phase (a context was
        selected for this export)."""
        return bool(self._contexts)

    @property
    def meta_contexts(self) -> tuple[MetaContext, ...]:
        """The metadata contexts BLOCK_STATUS answers, one reply chunk each, in the
        order they were selected (empty during the handshake or if none was)."""
        return self._contexts

    @property
    def export(self) -> ExportBackend | None:
        """The selected export's backend, None during the handshake."""
        return self._export

    @property
    def export_name(self) -> str | None:
        """The selected export's canonical name, None during the handshake."""
        return self._export_name

    @property
    def transmission_flags(self) -> int:
        """The transmission flags sent when the export was selected (0 before)."""
        return self._tflags

    # -- I/O-facing API ----------------------------------------------------------------

    def data_to_send(self) -> list[Buffer]:
        """Return and forget the queued output, as a list of buffers to write in order.

        Large READ payloads are returned as their own buffer rather than copied.
        """
        out, self._out = self._out, []
        return out

    def pending_output(self) -> int:
        """Number of buffers queued for :meth:`data_to_send`."""
        return len(self._out)

    def receive_data(self, data: bytes = b"", max_events: int | None = None) -> list[Event]:
        """Feed bytes received from the client; return the events they complete.

        At most ``max_events`` events are returned; the rest of the input stays buffered
        and is parsed by the next call (``receive_data(b"")`` parses without new input).
        This is how the transport bounds the requests it has in flight.  Input after the
        state became CLOSED is ignored.
        """
        if self._state is State.CLOSED:
            return []
        if data:
            self._buf += data
        events: list[Event] = []
        pos = 0
        buf = self._buf
        limit = max_events if max_events is not None else 1 << 62
        while self._state is not State.CLOSED:
            if len(events) >= limit:
                break
            avail = len(buf) - pos
            if self._handler == self._on_request_header and not self._discard:
                # Plain READs in a row, the hot path of a busy export: unpacked in place,
                # without the per-request handler dispatch (same checks as there).
                size = self._size
                while avail >= 28 and len(events) < limit:
                    magic, flags, ctype, handle, offset, length = REQUEST_HEADER.unpack_from(
                        buf, pos)
                    if (ctype or flags or magic != REQUEST_MAGIC or not 0 < length <= MAX_BLOCK_SIZE
                            or not 0 <= offset <= size - length):
                        break
                    events.append(Request(handle, Command.READ, 0, offset, length))
                    pos += 28
                    avail -= 28
                if len(events) >= limit:
                    break
            if self._discard:
                n = min(self._discard, avail)
                pos += n
                self._discard -= n
                if self._discard:
                    break
                after, self._after_discard = self._after_discard, _no_continuation
                after(events)
                continue
            need = self._need
            if avail < need:
                break
            if need > 64:
                with memoryview(buf) as view:
                    chunk = bytes(view[pos:pos + need])  # one copy of a payload
            else:
                chunk = bytes(buf[pos:pos + need])  # headers: cheaper than a view
            pos += need
            self._handler(chunk, events)
        if self._state is State.CLOSED:
            self._buf = bytearray()
        else:
            del buf[:pos]
        return events

    # -- replies to requests ("Transmission") ------------------------------------------

    def send_read_data(self, request: Request, data: Buffer) -> None:
        """Queue the successful reply to a READ: ``data`` must be ``request.length`` bytes.

        Structured: one NBD_REPLY_TYPE_OFFSET_DATA chunk flagged DONE (all data is in hand,
        so no error can follow, and one chunk satisfies NBD_CMD_FLAG_DF).  Simple: the
        16-byte header followed by the data.
        """
        if request.command is not Command.READ:
            raise ValueError("send_read_data answers READ requests only")
        if len(data) != request.length:
            raise ValueError(f"READ of {request.length} bytes answered with {len(data)}")
        if self._structured:
            self._out.append(offset_data_chunk_header(request.handle, request.offset,
                                                      request.length))
        else:
            self._out.append(simple_reply(request.handle))
        self._out.append(data)

    def read_reply_buffer(self, request: Request) -> tuple[bytearray, memoryview]:
        """A whole successful READ reply with room for its data, to fill in place.

        Returns ``(reply, payload)``: ``reply`` is the reply header (as
        :meth:`send_read_data` would frame it) followed by ``request.length`` bytes, and
        ``payload`` a view of those bytes.  Fill ``payload``, then queue ``reply`` with
        :meth:`send_read_reply`.  This saves copying the data into a separate reply.
        """
        if request.command is not Command.READ:
            raise ValueError("read_reply_buffer is for READ requests only")
        if self._structured:
            reply = bytearray(28 + request.length)  # chunk header + offset, then data
            OFFSET_DATA_HEADER.pack_into(reply, 0, STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE,
                                          REPLY_TYPE_OFFSET_DATA, request.handle,
                                          8 + request.length, request.offset)
            return reply, memoryview(reply)[28:]
        reply = bytearray(16 + request.length)
        SIMPLE_REPLY_HEADER.pack_into(reply, 0, SIMPLE_REPLY_MAGIC, 0, request.handle)
        return reply, memoryview(reply)[16:]

    def send_read_reply(self, reply: bytearray) -> None:
        """Queue a reply made by :meth:`read_reply_buffer` (its payload filled in)."""
        self._out.append(reply)

    def send_ok(self, request: Request) -> None:
        """Queue a success reply without payload (WRITE, FLUSH, TRIM, CACHE, ...).

        Structured replies negotiated: NBD_REPLY_TYPE_NONE with DONE, so the stream stays
        context-free; otherwise a simple reply with error 0.
        """
        if request.command in (Command.READ, Command.BLOCK_STATUS):
            raise ValueError(f"{request.command.name} success needs a payload")
        self._out.append(none_chunk(request.handle) if self._structured
                         else simple_reply(request.handle))

    def send_error(self, request: Request, err: int, message: str = "") -> None:
        """Queue an error reply; ``err`` is a POSIX errno, mapped by :func:`errno_to_nbd`.

        Structured: an NBD_REPLY_TYPE_ERROR chunk with DONE and ``message``; simple: the
        error value only (a READ error carries no data).
        """
        self._reply_error(request.handle, errno_to_nbd(err), message)

    def send_block_status(self, request: Request, extents: list[tuple[int, int]],
                          context_id: int = BASE_ALLOCATION_ID, done: bool = True) -> None:
        """Queue one NBD_REPLY_TYPE_BLOCK_STATUS chunk of the reply to BLOCK_STATUS:
        the extents of context ``context_id``.  The spec wants exactly one chunk per
        selected context (:attr:`meta_contexts`): call this once for each, with
        ``done`` (NBD_REPLY_FLAG_DONE) on the last only.

        ``extents`` are ``(length_bytes, flags)`` from the backend, covering a prefix
        of the range (the spec allows fewer extents than the length asked).  They are
        trimmed to the request (zero lengths dropped, the total capped at
        ``request.length``, one extent if NBD_CMD_FLAG_REQ_ONE), neighbours with equal
        flags merged; if nothing is left the whole range is reported with status 0,
        which the spec says is always safe (for ``ddsnap:changed``, 0 means "the
        same": backends never answer nothing).
        """
        if request.command is not Command.BLOCK_STATUS:
            raise ValueError("send_block_status answers BLOCK_STATUS requests only")
        out: list[list[int]] = []
        total = 0
        for length, flags in extents:
            length = int(length)
            flags = int(flags) & 0xFFFFFFFF
            if length <= 0:
                continue
            length = min(length, request.length - total)
            if out and out[-1][1] == flags:
                out[-1][0] += length
            else:
                out.append([length, flags])
            total += length
            if total >= request.length or (request.req_one and out):
                break
        if not out:
            out = [[request.length, 0]]
        if request.req_one:
            out = out[:1]
        self._out.append(block_status_chunk(request.handle, context_id,
                                            [(n, f) for n, f in out], done))

    def _reply_error(self, handle: int, nbd_err: int, message: str) -> None:
        if self._structured:
            self._out.append(error_chunk(handle, nbd_err, message))
        else:
            self._out.append(simple_reply(handle, nbd_err))

    # -- parser internals --------------------------------------------------------------

    def _expect(self, need: int, handler: Callable[[bytes, list[Event]], None]) -> None:
        self._need = need
        self._handler = handler

    def _skip(self, count: int, after: Callable[[list[Event]], None]) -> None:
        self._discard = count
        self._after_discard = after
        if not count:
            # nothing to skip: run the continuation at the next loop turn
            self._discard = 0
            self._need = 0
            self._handler = lambda _chunk, events: after(events)

    def _fatal(self, events: list[Event], message: str) -> None:
        events.append(ProtocolViolation(ProtocolError(message)))
        self._state = State.CLOSED

    # -- handshake ---------------------------------------------------------------------

    def _on_client_flags(self, chunk: bytes, events: list[Event]) -> None:
        (flags,) = U32.unpack(chunk)
        if flags & ~(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES):
            # the spec makes the server drop the connection on unknown client flags
            self._fatal(events, f"unknown client flags 0x{flags:08x}")
            return
        self._fixed = bool(flags & FLAG_C_FIXED_NEWSTYLE)
        self._no_zeroes = bool(flags & FLAG_C_NO_ZEROES)
        self._expect(OPTION_HEADER.size, self._on_option_header)

    def _on_option_header(self, chunk: bytes, events: list[Event]) -> None:
        magic, option, length = OPTION_HEADER.unpack(chunk)
        if magic != IHAVEOPT:
            self._fatal(events, f"bad option magic 0x{magic:016x}")
            return
        self._option = option
        if not self._fixed and option != OPT_EXPORT_NAME:
            # a non-fixed newstyle client cannot parse option replies
            self._fatal(events, f"option {option} from a client without fixed newstyle")
            return
        known = option in self._OPTIONS
        if known and length <= MAX_OPTION_LENGTH:
            self._expect(length, self._on_option_payload)
            return
        if option == OPT_EXPORT_NAME:
            self._fatal(events, f"NBD_OPT_EXPORT_NAME of {length} bytes")
            return
        # skip the payload without buffering it, so the stream stays in step
        reply = REP_ERR_TOO_BIG if known else REP_ERR_UNSUP
        text = (f"option {option} payload of {length} bytes is too long" if known
                else f"option {option} is not supported")

        def answer(_events: list[Event]) -> None:
            self._out.append(option_reply(option, reply, text.encode()))
            self._expect(OPTION_HEADER.size, self._on_option_header)

        self._skip(length, answer)

    def _on_option_payload(self, payload: bytes, events: list[Event]) -> None:
        option = self._option
        self._expect(OPTION_HEADER.size, self._on_option_header)
        try:
            self._OPTIONS[option](self, payload, events)
        except OptionError as exc:
            self._out.append(option_reply(option, exc.reply_type, exc.message.encode()))

    def _lookup(self, name: str) -> tuple[str, ExportBackend]:
        canonical = self._registry.default_name if name == "" else name
        backend = self._registry.get(canonical)
        if backend is None:
            raise OptionError(REP_ERR_UNKNOWN, f"unknown export: {name!r}")
        return canonical, backend

    def _flags_for(self, backend: ExportBackend) -> int:
        flags = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_CAN_MULTI_CONN | FLAG_SEND_CACHE
        if backend.read_only:
            # write-side features are not offered on a read-only export
            flags |= FLAG_READ_ONLY
        else:
            flags |= (FLAG_SEND_FUA | FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES
                      | FLAG_SEND_FAST_ZERO)
        if self._structured:
            # DF only makes sense with structured replies; ddsnap always sends one chunk
            flags |= FLAG_SEND_DF
        return flags

    def _opt_export_name(self, payload: bytes, events: list[Event]) -> None:
        try:
            name = decode_string(payload, "export name")
            canonical, backend = self._lookup(name)
        except OptionError as exc:
            # NBD_OPT_EXPORT_NAME cannot be answered with an error: hang up
            self._fatal(events, exc.message)
            return
        tflags = self._flags_for(backend)
        reply = U64.pack(backend.size) + U16.pack(tflags)
        if not self._no_zeroes:
            reply += ZEROES_124
        self._out.append(reply)
        self._enter_transmission(canonical, backend, tflags, events)

    def _opt_abort(self, payload: bytes, events: list[Event]) -> None:
        # the spec asks servers to ignore any payload sent with ABORT
        self._out.append(option_reply(OPT_ABORT, REP_ACK))
        events.append(Abort())
        self._state = State.CLOSED

    def _opt_list(self, payload: bytes, events: list[Event]) -> None:
        if payload:
            raise OptionError(REP_ERR_INVALID, "NBD_OPT_LIST takes no data")
        for name in self._registry.names():
            raw = name.encode("utf-8")
            self._out.append(option_reply(OPT_LIST, REP_SERVER, U32.pack(len(raw)) + raw))
        self._out.append(option_reply(OPT_LIST, REP_ACK))

    def _opt_info_or_go(self, payload: bytes, events: list[Event]) -> None:
        option = self._option
        name, wanted = decode_info_request(payload)
        canonical, backend = self._lookup(name)
        tflags = self._flags_for(backend)
        self._out.append(option_reply(option, REP_INFO, struct.pack(
            ">HQH", INFO_EXPORT, backend.size, tflags)))
        if INFO_NAME in wanted:
            self._out.append(option_reply(option, REP_INFO, U16.pack(INFO_NAME)
                                          + canonical.encode("utf-8")))
        # sent even unrequested: the maximum is stricter than the default, and clients
        # ignore information they did not ask for
        self._out.append(option_reply(option, REP_INFO, struct.pack(
            ">HIII", INFO_BLOCK_SIZE, MIN_BLOCK_SIZE, PREFERRED_BLOCK_SIZE, MAX_BLOCK_SIZE)))
        self._out.append(option_reply(option, REP_ACK))
        if option == OPT_GO:
            self._enter_transmission(canonical, backend, tflags, events)

    def _opt_structured_reply(self, payload: bytes, events: list[Event]) -> None:
        if payload:
            raise OptionError(REP_ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data")
        self._structured = True
        self._out.append(option_reply(OPT_STRUCTURED_REPLY, REP_ACK))

    def _changed_names(self, backend: ExportBackend) -> list[str]:
        """``ddsnap:changed:FROM`` for every snapshot FROM the registry names, if the
        export answers that context (``changed_base``, ``changed_status``) and the
        registry lists snapshots (``snapshot_names``); else none."""
        names = getattr(self._registry, "snapshot_names", None)
        if names is None or not hasattr(backend, "changed_base"):
            return []
        return [CHANGED_PREFIX + n for n in names()]

    def _opt_list_meta_context(self, payload: bytes, events: list[Event]) -> None:
        if not self._structured:
            raise OptionError(REP_ERR_INVALID, "negotiate structured replies first")
        name, queries = decode_meta_context_request(payload)
        _canonical, backend = self._lookup(name)
        changed = self._changed_names(backend)
        known = set(changed)
        # (a dict: each context once, in the order first listed; thousands of snapshots)
        listed: dict[str, None] = {}
        if not queries:
            listed = dict.fromkeys([BASE_ALLOCATION, *changed])  # no query: everything
        for q in queries:
            if q in ("base:", BASE_ALLOCATION):  # "base:" is the namespace wildcard
                listed.update(dict.fromkeys([BASE_ALLOCATION]))
            elif q in (DDSNAP_NAMESPACE, CHANGED_PREFIX):  # and these are ddsnap's
                listed.update(dict.fromkeys(changed))
            elif q in known:
                listed[q] = None
        for context in listed:
            # the context id in LIST replies is reserved: send 0
            self._out.append(option_reply(OPT_LIST_META_CONTEXT, REP_META_CONTEXT,
                                          U32.pack(0) + context.encode()))
        self._out.append(option_reply(OPT_LIST_META_CONTEXT, REP_ACK))

    def _opt_set_meta_context(self, payload: bytes, events: list[Event]) -> None:
        # the previous selection is dropped even when this request fails
        self._meta_export = None
        self._meta_selected = ()
        if not self._structured:
            raise OptionError(REP_ERR_INVALID, "negotiate structured replies first")
        name, queries = decode_meta_context_request(payload)
        canonical, backend = self._lookup(name)
        # Only exact names select; "base:", "ddsnap:", "ddsnap:changed:", unknown leaves
        # and snapshots that do not exist select nothing (the spec: ignore them).
        selected: list[MetaContext] = []
        next_id = CHANGED_FIRST_ID
        changed_base = getattr(backend, "changed_base", None)
        for q in dict.fromkeys(queries):  # a context named twice is selected once
            if q == BASE_ALLOCATION:
                selected.append(MetaContext(BASE_ALLOCATION_ID, q))
            elif q.startswith(CHANGED_PREFIX) and len(q) > len(CHANGED_PREFIX) \
                    and changed_base is not None:
                # resolved now: the context stays bound to this snapshot, not to
                # whichever has its name when BLOCK_STATUS comes
                base = changed_base(q[len(CHANGED_PREFIX):])
                if base is not None:
                    selected.append(MetaContext(next_id, q, base))
                    next_id += 1
            if len(selected) > MAX_META_CONTEXTS:
                raise OptionError(REP_ERR_TOO_BIG, f"more than {MAX_META_CONTEXTS} "
                                                   "metadata contexts selected")
        for ctx in selected:
            self._out.append(option_reply(OPT_SET_META_CONTEXT, REP_META_CONTEXT,
                                          U32.pack(ctx.id) + ctx.name.encode()))
        if selected:
            self._meta_export = canonical
            self._meta_selected = tuple(selected)
        self._out.append(option_reply(OPT_SET_META_CONTEXT, REP_ACK))

    _OPTIONS = {
        OPT_EXPORT_NAME: _opt_export_name,
        OPT_ABORT: _opt_abort,
        OPT_LIST: _opt_list,
        OPT_INFO: _opt_info_or_go,
        OPT_GO: _opt_info_or_go,
        OPT_STRUCTURED_REPLY: _opt_structured_reply,
        OPT_LIST_META_CONTEXT: _opt_list_meta_context,
        OPT_SET_META_CONTEXT: _opt_set_meta_context,
    }

    def _enter_transmission(self, name: str, backend: ExportBackend, tflags: int,
                            events: list[Event]) -> None:
        self._state = State.TRANSMISSION
        self._export = backend
        self._export_name = name
        self._size = backend.size
        self._tflags = tflags
        self._read_only = bool(backend.read_only)
        # BLOCK_STATUS needs the contexts selected for this same export
        self._contexts = (self._meta_selected
                          if self._structured and self._meta_export == name else ())
        self._expect(REQUEST_HEADER.size, self._on_request_header)
        events.append(ExportSelected(name, backend, self._size, tflags))

    # -- transmission ------------------------------------------------------------------

    def _on_request_header(self, chunk: bytes, events: list[Event]) -> None:
        magic, flags, ctype, handle, offset, length = REQUEST_HEADER.unpack(chunk)
        if magic != REQUEST_MAGIC:
            # no way to find the next request boundary: the connection is lost
            self._fatal(events, f"bad request magic 0x{magic:08x}")
            return
        problem = self._validate(ctype, flags, offset, length)
        if ctype == Command.WRITE:
            if length > MAX_DISCARD_PAYLOAD:
                self._fatal(events, f"WRITE payload of {length} bytes")
                return
            if problem is None:
                self._expect(length, lambda data, evs: self._on_write_payload(
                    handle, flags, offset, length, data, evs))
                return
            err, text = problem

            def answer(_events: list[Event]) -> None:
                self._reply_error(handle, err, text)
                self._expect(REQUEST_HEADER.size, self._on_request_header)

            self._skip(length, answer)
            return
        if problem is not None:
            self._reply_error(handle, *problem)
            return
        command = Command(ctype)
        events.append(Request(handle, command, flags, offset, length))
        if command is Command.DISC:
            # the client must not send anything after DISC
            self._state = State.CLOSED

    def _on_write_payload(self, handle: int, flags: int, offset: int, length: int,
                          data: bytes, events: list[Event]) -> None:
        self._expect(REQUEST_HEADER.size, self._on_request_header)
        events.append(Request(handle, Command.WRITE, flags, offset, length, data))

    def _validate(self, ctype: int, flags: int, offset: int,
                  length: int) -> tuple[int, str] | None:
        """Return (NBD error, message) if the request must be refused, else None."""
        try:
            command = Command(ctype)
        except ValueError:
            return NBD_EINVAL, f"unknown command {ctype}"
        if command is Command.DISC:
            return None
        bad = flags & ~(CMD_FLAG_FUA | ALLOWED_FLAGS[command])
        if bad:
            return NBD_EINVAL, f"flags 0x{bad:x} invalid for {command.name}"
        if flags & CMD_FLAG_DF and not self._structured:
            return NBD_EINVAL, "DF without structured replies"
        if command is Command.FLUSH:
            if offset or length:
                return NBD_EINVAL, "FLUSH offset and length must be 0"
            return None
        if command in WRITING and self._read_only:
            return NBD_EPERM, "export is read-only"
        if command is Command.WRITE_ZEROES and flags & CMD_FLAG_FAST_ZERO \
                and not self._tflags & FLAG_SEND_FAST_ZERO:
            return NBD_EINVAL, "FAST_ZERO not negotiated"
        if command is Command.BLOCK_STATUS and not self._contexts:
            return NBD_EINVAL, "no metadata context negotiated"
        if length == 0:
            return NBD_EINVAL, f"{command.name} of length 0"
        if offset + length > self._size:
            # the spec asks for ENOSPC when writing past the end, EINVAL otherwise
            err = NBD_ENOSPC if command in (Command.WRITE, Command.WRITE_ZEROES) else NBD_EINVAL
            return err, f"{command.name} [{offset}, +{length}) beyond export size {self._size}"
        if command in SIZE_LIMITED and length > MAX_BLOCK_SIZE:
            return NBD_EINVAL, f"{command.name} of {length} bytes exceeds {MAX_BLOCK_SIZE}"
        return None
