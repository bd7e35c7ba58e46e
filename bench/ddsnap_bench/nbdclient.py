"""A minimal NBD client (standard library only) for the benchmark's data checks.

Fixed newstyle handshake, ``NBD_OPT_GO`` for one export, simple replies: enough to read
sampled ranges of a snapshot and compare them with the bytes it must hold, and to write
the origin while a store is being filled for the snapshot-count scaling runs
(:meth:`NbdClient.pwrite_many` keeps several writes in flight).  Not used for any
measured figure.
"""

from __future__ import annotations

import contextlib
import socket
import struct

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
FLAG_FIXED_NEWSTYLE = 1
FLAG_NO_ZEROES = 2
OPT_GO = 7
REP_ACK = 1
REP_INFO = 3
INFO_EXPORT = 0
CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3


class NbdError(Exception):
    pass


class NbdClient:
    def __init__(self, unix_path: str, export: str, timeout: float = 60):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(unix_path)
        self.handle = 0
        self.size = None
        try:
            self._handshake(export)
        except BaseException:
            self.sock.close()
            raise

    def _recv(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            part = self.sock.recv(n - len(buf))
            if not part:
                raise NbdError("server closed the connection")
            buf += part
        return bytes(buf)

    def _handshake(self, export: str) -> None:
        magic, opt, _flags = struct.unpack(">QQH", self._recv(18))
        if magic != NBDMAGIC or opt != IHAVEOPT:
            raise NbdError("not a fixed newstyle NBD server")
        self.sock.sendall(struct.pack(">I", FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))
        name = export.encode()
        data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
        self.sock.sendall(struct.pack(">QII", IHAVEOPT, OPT_GO, len(data)) + data)
        while True:
            magic, _opt, rtype, length = struct.unpack(">QIII", self._recv(20))
            payload = self._recv(length)
            if magic != REPLY_MAGIC:
                raise NbdError("bad option reply magic")
            if rtype & 0x80000000:
                raise NbdError(f"export {export!r} refused: reply type {rtype:#x} "
                               f"{payload.decode(errors='replace')}")
            if rtype == REP_INFO and struct.unpack(">H", payload[:2])[0] == INFO_EXPORT:
                self.size, _tflags = struct.unpack(">QH", payload[2:12])
            if rtype == REP_ACK:
                break
        if self.size is None:
            raise NbdError("server sent no export size")

    def pread(self, length: int, offset: int) -> bytes:
        self.handle += 1
        self.sock.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_READ, self.handle,
                                      offset, length))
        magic, error, handle = struct.unpack(">IIQ", self._recv(16))
        if magic != SIMPLE_REPLY_MAGIC or handle != self.handle:
            raise NbdError("bad reply (magic or handle)")
        if error:
            raise NbdError(f"read of {length} bytes at {offset} failed: error {error}")
        return self._recv(length)

    def _reply(self, want: dict) -> None:
        magic, error, handle = struct.unpack(">IIQ", self._recv(16))
        if magic != SIMPLE_REPLY_MAGIC or handle not in want:
            raise NbdError("bad reply (magic or handle)")
        what = want.pop(handle)
        if error:
            raise NbdError(f"{what} failed: error {error}")

    def pwrite_many(self, writes, depth: int = 16) -> int:
        """Write ``(offset, data)`` pairs, up to ``depth`` requests in flight, then flush.
        Returns the number of bytes written."""
        want: dict[int, str] = {}
        total = 0
        for offset, data in writes:
            while len(want) >= depth:
                self._reply(want)
            self.handle += 1
            want[self.handle] = f"write of {len(data)} bytes at {offset}"
            self.sock.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_WRITE, self.handle,
                                          offset, len(data)) + data)
            total += len(data)
        while want:
            self._reply(want)
        self.handle += 1
        want[self.handle] = "flush"
        self.sock.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_FLUSH, self.handle,
                                      0, 0))
        self._reply(want)
        return total

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_DISC, 0, 0, 0))
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
