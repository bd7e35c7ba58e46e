"""Test helpers for the NBD layer: in-memory exports, a server thread, a raw client.

Nothing here mocks ddsnap code: the exports are small but real implementations of the
ExportBackend interface, and the client speaks the wire protocol from the spec.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
from typing import Any

from ddsnap.nbd import wire as P
from ddsnap.nbd.accounting import ServerStatistics
from ddsnap.nbd.server import NbdServer

KiB = 1024
MiB = 1024 * KiB
_ZERO_BLOCK = bytes(4096)


class MemoryExport:
    """A bytearray-backed export that records what was asked of it.

    ``gate``: if set, the calls named in ``gated`` wait on it (a threading.Event) before
    running, so a test can hold requests in flight without sleeping.  ``fail_next``: an
    exception the next call raises.
    """

    def __init__(self, name: str, size: int, read_only: bool = False, fill: int = 0):
        self.name = name
        self.size = size
        self.read_only = read_only
        self.data = bytearray([fill]) * size
        self.lock = threading.Condition()
        self.log: list[tuple] = []
        self.opens = 0
        self.closes = 0
        self.flushes = 0
        self.active = 0
        self.max_active = 0
        self.gate: threading.Event | None = None
        self.gated: tuple[str, ...] = ("read", "write")
        self.fail_next: BaseException | None = None

    def _enter(self, *entry) -> None:
        with self.lock:
            self.log.append(entry)
            self.active += 1
            self.max_active = max(self.max_active, self.active)
            self.lock.notify_all()
            exc, self.fail_next = self.fail_next, None
        gate = self.gate
        if gate is not None and entry[0] in self.gated:
            assert gate.wait(30), "test gate never opened"
        if exc is not None:
            self._leave(entry[0] + "-failed")
            raise exc

    def _leave(self, what: str) -> None:
        with self.lock:
            self.active -= 1
            self.log.append((what + "-done",))
            self.lock.notify_all()

    def wait_for(self, predicate, timeout: float = 30) -> None:
        """Block until ``predicate(self)`` holds (a deadline, not a timing assertion)."""
        with self.lock:
            assert self.lock.wait_for(lambda: predicate(self), timeout), "condition not met"

    def read(self, offset: int, length: int) -> bytes:
        self._enter("read", offset, length)
        try:
            with self.lock:
                return bytes(self.data[offset:offset + length])
        finally:
            self._leave("read")

    def write(self, offset: int, data: bytes, fua: bool = False) -> None:
        self._enter("write", offset, len(data), fua)
        try:
            with self.lock:
                self.data[offset:offset + len(data)] = data
        finally:
            self._leave("write")

    def flush(self) -> None:
        self._enter("flush")
        try:
            with self.lock:
                self.flushes += 1
        finally:
            self._leave("flush")

    def trim(self, offset: int, length: int, fua: bool = False) -> None:
        self._enter("trim", offset, length, fua)
        try:
            with self.lock:
                self.data[offset:offset + length] = bytes(length)
        finally:
            self._leave("trim")

    def write_zeroes(self, offset: int, length: int, fua: bool = False,
                     no_hole: bool = False) -> None:
        self._enter("write_zeroes", offset, length, fua, no_hole)
        try:
            with self.lock:
                self.data[offset:offset + length] = bytes(length)
        finally:
            self._leave("write_zeroes")

    def block_status(self, offset: int, length: int) -> list[tuple[int, int]]:
        """Zero 4 KiB blocks are reported HOLE|ZERO, others allocated (0)."""
        self._enter("block_status", offset, length)
        try:
            extents: list[tuple[int, int]] = []
            pos, end = offset, offset + length
            with self.lock:
                while pos < end:
                    nxt = min(end, (pos // 4096 + 1) * 4096)
                    zero = self.data[pos:nxt] == _ZERO_BLOCK[:nxt - pos]
                    flags = P.STATE_HOLE | P.STATE_ZERO if zero else 0
                    if extents and extents[-1][1] == flags:
                        extents[-1] = (extents[-1][0] + nxt - pos, flags)
                    else:
                        extents.append((nxt - pos, flags))
                    pos = nxt
            return extents
        finally:
            self._leave("block_status")

    def open(self) -> None:
        with self.lock:
            self.opens += 1
            self.lock.notify_all()

    def close(self) -> None:
        with self.lock:
            self.closes += 1
            self.lock.notify_all()


class Registry:
    """A dict-backed ExportRegistry; the first export added is the default."""

    def __init__(self, *exports):
        self.exports = {e.name: e for e in exports}
        self._default = exports[0].name if exports else ""

    def names(self) -> list[str]:
        return list(self.exports)

    def get(self, name: str):
        return self.exports.get(name)

    @property
    def default_name(self) -> str:
        return self._default


class ServerThread:
    """Runs an :class:`NbdServer` on its own event loop in a background thread."""

    def __init__(self, registry, listen: list[str], **kwargs):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = NbdServer(registry, **kwargs)
        self.run(self.server.start(listen))

    def run(self, coro, timeout: float = 30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn, *args):
        """``fn(*args)`` run on the server's event loop thread; its result."""
        async def on_loop():
            return fn(*args)
        return self.run(on_loop())

    def statistics(self) -> ServerStatistics:
        """``NbdServer.statistics()``, taken on the server's event loop thread."""
        return self.call(self.server.statistics)

    @property
    def addresses(self) -> list[str]:
        return self.server.addresses

    def close(self) -> None:
        try:
            self.run(self.server.close())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(30)
            self.loop.close()


# --- a raw client ----------------------------------------------------------------------


def recv_exact(sock: socket.socket, n: int) -> bytes:
    """Read exactly ``n`` bytes or raise EOFError."""
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError(f"EOF after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def connect(address: str) -> socket.socket:
    """Connect to a server address as listed in ``NbdServer.addresses``."""
    kind, _, rest = address.partition(":")
    if kind == "unix":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(rest)
    else:
        host, _, port = rest.rpartition(":")
        sock = socket.create_connection((host.strip("[]"), int(port)))
    sock.settimeout(30)
    return sock


def request(handle: int, command: int, offset: int = 0, length: int = 0,
            flags: int = 0, data: bytes = b"") -> bytes:
    """Encode one transmission-phase request ("Request message")."""
    return struct.pack(">IHHQQI", P.REQUEST_MAGIC, flags, command, handle, offset,
                       length) + data


def option(opt: int, data: bytes = b"") -> bytes:
    """Encode one option request."""
    return struct.pack(">QII", P.IHAVEOPT, opt, len(data)) + data


def go_data(name: str, infos: tuple[int, ...] = ()) -> bytes:
    raw = name.encode()
    return struct.pack(">I", len(raw)) + raw + struct.pack(f">H{len(infos)}H", len(infos),
                                                             *infos)


def meta_data(name: str, queries: list[str]) -> bytes:
    raw = name.encode()
    out = struct.pack(">I", len(raw)) + raw + struct.pack(">I", len(queries))
    for q in queries:
        out += struct.pack(">I", len(q.encode())) + q.encode()
    return out


class RawClient:
    """A minimal NBD client over a blocking socket, for protocol-level server tests.

    ``meta``: True selects ``base:allocation``; a list of names selects those contexts
    (``contexts`` maps each name the server selected to its id).
    """

    def __init__(self, address: str, export: str = "", structured: bool = False,
                 meta: bool | list[str] = False):
        self.sock = connect(address)
        self.contexts: dict[str, int] = {}
        try:
            self._handshake(export, structured, meta)
        except BaseException:
            self.sock.close()
            raise

    def _handshake(self, export: str, structured: bool, meta: bool | list[str]) -> None:
        greeting = recv_exact(self.sock, 18)
        assert greeting[:16] == struct.pack(">QQ", P.NBDMAGIC, P.IHAVEOPT)
        self.sock.sendall(struct.pack(">I", P.FLAG_C_FIXED_NEWSTYLE | P.FLAG_C_NO_ZEROES))
        self.structured = structured
        if structured:
            self.sock.sendall(option(P.OPT_STRUCTURED_REPLY))
            assert self.read_option_reply()[1] == P.REP_ACK
        if meta:
            queries = [P.BASE_ALLOCATION] if meta is True else list(meta)
            self.sock.sendall(option(P.OPT_SET_META_CONTEXT, meta_data(export, queries)))
            replies = [self.read_option_reply()]
            while replies[-1][1] != P.REP_ACK and not replies[-1][1] & (1 << 31):
                replies.append(self.read_option_reply())  # (an error ends it too)
            self.meta_replies = replies
            for _opt, rtype, data in replies:
                if rtype == P.REP_META_CONTEXT:
                    self.contexts[data[4:].decode()] = struct.unpack(">I", data[:4])[0]
        self.sock.sendall(option(P.OPT_GO, go_data(export)))
        self.size = self.flags = None
        while True:
            _opt, rtype, data = self.read_option_reply()
            if rtype == P.REP_INFO and struct.unpack(">H", data[:2])[0] == P.INFO_EXPORT:
                _t, self.size, self.flags = struct.unpack(">HQH", data)
            elif rtype == P.REP_ACK:
                break
            elif rtype & (1 << 31):
                raise OSError(f"GO failed: reply type 0x{rtype:x}: {data!r}")

    def read_option_reply(self) -> tuple[int, int, bytes]:
        magic, opt, rtype, length = struct.unpack(">QIII", recv_exact(self.sock, 20))
        assert magic == P.OPTION_REPLY_MAGIC
        return opt, rtype, recv_exact(self.sock, length)

    def send(self, *args, **kwargs) -> None:
        self.sock.sendall(request(*args, **kwargs))

    def read_reply(self, read_lengths: dict[int, int] | None = None) -> dict:
        """Read one reply (all chunks of a structured one).

        Returns ``{"handle", "error", "data", "extents"}``, and for BLOCK_STATUS
        ``"statuses"``: ``{context id: extents}`` of every status chunk (``"context"``
        and ``"extents"`` are the last one's).  For simple replies to READs,
        ``read_lengths`` maps handles to their lengths (simple replies are not
        self-describing).
        """
        magic = struct.unpack(">I", recv_exact(self.sock, 4))[0]
        if magic == P.SIMPLE_REPLY_MAGIC:
            error, handle = struct.unpack(">IQ", recv_exact(self.sock, 12))
            data = b""
            if not error and read_lengths and handle in read_lengths:
                data = recv_exact(self.sock, read_lengths[handle])
            return {"handle": handle, "error": error, "data": data, "extents": None}
        assert magic == P.STRUCTURED_REPLY_MAGIC, hex(magic)
        result: dict[str, Any] = {"error": 0, "data": b"", "extents": None, "chunks": [],
                                  "statuses": {}}
        while True:
            flags, rtype, handle, length = struct.unpack(">HHQI", recv_exact(self.sock, 16))
            payload = recv_exact(self.sock, length)
            result["handle"] = handle
            result["chunks"].append((rtype, flags))
            if rtype == P.REPLY_TYPE_OFFSET_DATA:
                result["data"] += payload[8:]
                result["offset"] = struct.unpack(">Q", payload[:8])[0]
            elif rtype == P.REPLY_TYPE_BLOCK_STATUS:
                ctx = struct.unpack(">I", payload[:4])[0]
                pairs = struct.unpack(f">{(length - 4) // 4}I", payload[4:])
                result["context"] = ctx
                result["extents"] = list(zip(pairs[::2], pairs[1::2], strict=True))
                assert ctx not in result["statuses"], f"two chunks for context {ctx}"
                result["statuses"][ctx] = result["extents"]
            elif rtype & (1 << 15):
                error, mlen = struct.unpack(">IH", payload[:6])
                result["error"] = error
                result["message"] = payload[6:6 + mlen].decode()
            if flags & P.REPLY_FLAG_DONE:
                return result
            magic = struct.unpack(">I", recv_exact(self.sock, 4))[0]
            assert magic == P.STRUCTURED_REPLY_MAGIC

    def close(self) -> None:
        self.sock.close()


class NowaitMemoryExport(MemoryExport):
    """A :class:`MemoryExport` that also answers READs on the event loop
    (``read_into_nowait``, as ddsnap's volumes do), unless ``refuse`` is set; counts
    ``inline`` reads so a test can tell which path served them."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.refuse = False
        self.inline = 0

    def read_into_nowait(self, offset: int, view) -> bool:
        if self.refuse:
            return False
        with self.lock:
            view[:] = self.data[offset:offset + len(view)]
            self.inline += 1
        return True
