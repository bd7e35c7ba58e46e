"""A minimal NBD client (standard library only) for the benchmark's data checks.

Fixed newstyle handshake, ``NBD_OPT_GO`` for one export, simple replies, one request at
a time: enough to read sampled ranges of a snapshot and compare them with the bytes it
must hold.  Not used for any measurement.
"""

from __future__ import annotations

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
CMD_DISC = 2


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

    def close(self) -> None:
        try:
            self.sock.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_DISC, 0, 0, 0))
        except OSError:
            pass
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
