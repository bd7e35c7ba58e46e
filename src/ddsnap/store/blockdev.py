"""Block devices: the only place ddsnap touches ``os`` I/O.

A :class:`BlockDevice` is a byte-addressed device of fixed size with positional reads and
writes and a durability barrier (:meth:`BlockDevice.flush`).  Three implementations:

* :class:`FileDevice` over a regular file or a block device (``os.pread``/``os.pwrite``,
  ``os.fdatasync``);
* :class:`MemoryDevice`, a bytearray, the in-memory twin for tests and the transient store;
* :class:`RecordingDevice`, which wraps a memory device, remembers every write and flush,
  and can produce the device images a crash could leave behind.  It carries the crash
  tests (DESIGN.md invariants 2 and 3).

Offsets and lengths are in bytes; ranges are ``[offset, offset + length)``.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import random
import stat
import struct
import threading
from dataclasses import dataclass

from ..errors import DdsnapError, InvalidArgument, StoreNotFound
from ..units import human_bytes

log = logging.getLogger("ddsnap.blockdev")

BLKGETSIZE64 = 0x80081272
#: preadv2 flag: fail with EAGAIN rather than wait for the disk (0: not available)
_RWF_NOWAIT = getattr(os, "RWF_NOWAIT", 0)


class BlockDevice:
    """Abstract byte-addressed device.

    Subclasses implement :meth:`pread`, :meth:`pwrite`, :meth:`flush` and ``size``.
    ``pread`` past the end returns zero bytes for the missing part; ``pwrite`` past the end
    raises :class:`InvalidArgument` (devices never grow).
    """

    size: int = 0
    path: str = "<memory>"

    def check_size(self) -> None:
        """Raise ``OSError(EIO)`` if the device is now shorter than :attr:`size` (a file
        truncated behind our back); a no-op where the size cannot change."""

    def pread(self, length: int, offset: int) -> bytes:
        """Return ``length`` bytes at byte ``offset``."""
        raise NotImplementedError

    def preadinto(self, buf, offset: int) -> None:
        """Fill the writable buffer ``buf`` (bytearray/memoryview) from byte ``offset``."""
        data = self.pread(len(buf), offset)
        buf[: len(data)] = data

    def preadinto_nowait(self, buf, offset: int) -> bool:
        """Fill ``buf`` from byte ``offset`` only if that needs no waiting for the disk.

        Returns True when ``buf`` holds the data, False when the read would block (the
        data is not in memory): the caller then uses :meth:`preadinto` from a thread that
        may block.  ``buf`` may have been partly written either way.  The default never
        tries; devices held in memory always succeed.
        """
        return False

    def pwrite(self, data, offset: int) -> None:
        """Write the bytes-like ``data`` at byte ``offset``."""
        raise NotImplementedError

    def flush(self) -> None:
        """Make every earlier completed :meth:`pwrite` durable."""
        raise NotImplementedError

    def discard(self, offset: int, length: int) -> None:
        """Hint that ``[offset, offset+length)`` is unused; content afterwards is undefined.

        The default does nothing, which is always correct.
        """

    def resize(self, size: int) -> None:
        """Make the device ``size`` bytes long (``ddsnap resize``): a file is truncated
        or extended (the new part reads as zeroes); durable at the next :meth:`flush`.

        Raises:
            InvalidArgument: this device cannot change its size.
        """
        raise InvalidArgument(f"{self.path} cannot be resized")

    def close(self) -> None:
        """Release the device; further I/O is an error."""

    def _check_write(self, length: int, offset: int) -> None:
        if offset < 0 or offset + length > self.size:
            raise InvalidArgument(
                f"write of {human_bytes(length)} at byte {offset} is past the end of "
                f"{self.path} ({human_bytes(self.size)})"
            )


def copy_range(src: BlockDevice, src_offset: int, dst: BlockDevice, dst_offset: int,
               length: int) -> None:
    """Copy ``length`` bytes from ``src`` at ``src_offset`` to ``dst`` at ``dst_offset``.

    Between two :class:`FileDevice` objects the kernel copies (``copy_file_range``, as
    ``cp`` does): no data passes through Python.  Otherwise, or where the kernel cannot
    (another filesystem, an old kernel), it is a read and a write (``dst.pwrite``, so a
    :class:`RecordingDevice` records it).  Not durable until ``dst.flush()``.

    Raises:
        InvalidArgument: the range is past the end of ``dst``.
    """
    if length <= 0:
        return
    if type(src) is FileDevice and type(dst) is FileDevice and _copy_file_range:
        dst._check_write(length, dst_offset)
        try:
            while length > 0:
                n = _copy_file_range(src.fd, dst.fd, length, src_offset, dst_offset)
                if n <= 0:
                    break  # past the end of src: the rest is zeroes, done below
                src_offset += n
                dst_offset += n
                length -= n
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
        if length <= 0:
            return
    dst.pwrite(src.pread(length, src_offset), dst_offset)


_copy_file_range = getattr(os, "copy_file_range", None)


def device_size(fd: int) -> int:
    """Size in bytes of the open regular file or block device ``fd``."""
    st = os.fstat(fd)
    if stat.S_ISBLK(st.st_mode):
        buf = fcntl.ioctl(fd, BLKGETSIZE64, b"\0" * 8)
        return struct.unpack("<Q", buf)[0]
    return st.st_size


class FileDevice(BlockDevice):
    """A regular file or a block device opened for positional I/O.

    Args:
        path: the file or device path.
        writable: open read-write (default) or read-only.
        create_size: if given and ``path`` does not exist, create a sparse file of this
            many bytes.

    Raises:
        StoreNotFound: ``path`` does not exist (and ``create_size`` was not given).
        InvalidArgument: ``path`` is neither a regular file nor a block device.
    """

    def __init__(self, path: str, writable: bool = True, create_size: int | None = None,
                 what: str = "snapshot store", strict: bool = False):
        self.path = path
        self.what = what
        #: a read short of :attr:`size` (the file shrank) is EIO, not zeroes
        self.strict = strict
        flags = (os.O_RDWR if writable else os.O_RDONLY) | getattr(os, "O_CLOEXEC", 0)
        try:
            if create_size is not None and not os.path.exists(path):
                self.fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o644)
                os.ftruncate(self.fd, create_size)
            else:
                self.fd = os.open(path, flags)
        except FileNotFoundError:
            raise StoreNotFound(path, what) from None
        except IsADirectoryError:
            raise InvalidArgument(f"{what} {path} is a directory, not a file or block device") from None
        except PermissionError as e:
            raise DdsnapError(f"cannot open {what} {path}: {e.strerror}") from None
        st = os.fstat(self.fd)
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            os.close(self.fd)
            raise InvalidArgument(f"{what} {path} is neither a regular file nor a block device")
        self.is_block = stat.S_ISBLK(st.st_mode)
        self.size = device_size(self.fd)

    def pread(self, length: int, offset: int) -> bytes:
        data = os.pread(self.fd, length, offset)
        if len(data) < length:
            self._short(offset + len(data))
            # Short read at end of file: the rest reads as zeroes, like a sparse tail.
            data += bytes(length - len(data))
        return data

    def preadinto(self, buf, offset: int) -> None:
        n = os.preadv(self.fd, [buf], offset)
        if n < len(buf):
            self._short(offset + n)
            memoryview(buf)[n:] = bytes(len(buf) - n)

    def _short(self, end: int) -> None:
        """A read stopped at byte ``end``: for a strict device inside :attr:`size`, the
        file shrank and the rest must not read as zeroes (EIO, logged once)."""
        if self.strict and end < self.size:
            self.check_size()

    def check_size(self) -> None:
        if not self.is_block:
            now = os.fstat(self.fd).st_size
            if now < self.size:
                if not getattr(self, "_shrink_logged", False):
                    self._shrink_logged = True
                    log.error("%s %s shrank from %d to %d bytes while in use: its reads "
                              "and writes now fail with EIO", self.what, self.path,
                              self.size, now)
                raise OSError(errno.EIO, f"{self.what} {self.path} shrank from "
                                         f"{human_bytes(self.size)} to {human_bytes(now)} "
                                         "while in use")

    def preadinto_nowait(self, buf, offset: int) -> bool:
        # preadv2(RWF_NOWAIT): the kernel copies from the page cache or answers EAGAIN
        # instead of starting disk I/O (Linux >= 4.14 for buffered reads).
        if not _RWF_NOWAIT:
            return False
        try:
            n = os.preadv(self.fd, [buf], offset, _RWF_NOWAIT)
            if n == len(buf):
                return True  # the usual case: all of it at once
            if n <= 0:
                return False
            view = memoryview(buf)[n:]
            offset += n
            while view:
                n = os.preadv(self.fd, [view], offset, _RWF_NOWAIT)
                if n <= 0:
                    return False  # end of file (or nothing cached): the slow path decides
                view = view[n:]
                offset += n
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as e:
            if e.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                return False  # no RWF_NOWAIT here (old kernel, some filesystems)
            raise
        return True

    def pwrite(self, data, offset: int) -> None:
        self._check_write(len(data), offset)
        view = memoryview(data)
        while view:
            n = os.pwrite(self.fd, view, offset)
            view = view[n:]
            offset += n

    def flush(self) -> None:
        os.fdatasync(self.fd)

    def resize(self, size: int) -> None:
        """A file: ``ftruncate`` to ``size`` bytes (the size is durable at the next
        :meth:`flush`, an ``fdatasync``, which writes the metadata a later read needs).
        A block device cannot be resized from here: it must already hold ``size``
        bytes (grown with ``lvextend`` and the like), which this records.

        Raises:
            InvalidArgument: a block device smaller than ``size``.
            OSError: the host refused the truncate.
        """
        if self.is_block:
            now = device_size(self.fd)
            if now < size:
                raise InvalidArgument(
                    f"{self.what} {self.path} is a block device of {human_bytes(now)}: "
                    f"grow the device itself to at least {human_bytes(size)} first")
            self.size = now
            return
        os.ftruncate(self.fd, size)
        self.size = size
        self._shrink_logged = False

    def discard(self, offset: int, length: int) -> None:
        if self.is_block or length <= 0:
            return
        try:
            # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE = 0x02 | 0x01
            _fallocate(self.fd, 0x03, offset, length)
        except OSError as e:  # not every filesystem can punch holes; discard is a hint
            if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                raise

    def lock_exclusive(self) -> bool:
        """Take a non-blocking exclusive ``flock``; return False if another holds it."""
        return self._lock(fcntl.LOCK_EX)

    def lock_shared(self) -> bool:
        """Take a non-blocking shared ``flock`` (readers such as ``check``); return False
        if another process holds it exclusively (a server)."""
        return self._lock(fcntl.LOCK_SH)

    def _lock(self, how: int) -> bool:
        try:
            fcntl.flock(self.fd, how | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    import ctypes
    import ctypes.util

    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    if libc.fallocate(fd, mode, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


class MemoryDevice(BlockDevice):
    """A device held in a bytearray: the in-memory twin of :class:`FileDevice`."""

    def __init__(self, size: int, data: bytes | None = None, path: str = "<memory>"):
        self.size = size
        self.path = path
        self.data = bytearray(data) if data is not None else bytearray(size)
        if len(self.data) != size:
            raise InvalidArgument("memory device data does not match its size")
        self.flushes = 0

    def pread(self, length: int, offset: int) -> bytes:
        out = bytes(self.data[offset: offset + length])
        if len(out) < length:
            out += bytes(length - len(out))
        return out

    def preadinto_nowait(self, buf, offset: int) -> bool:
        self.preadinto(buf, offset)
        return True

    def pwrite(self, data, offset: int) -> None:
        self._check_write(len(data), offset)
        self.data[offset: offset + len(data)] = data

    def flush(self) -> None:
        self.flushes += 1

    def resize(self, size: int) -> None:
        if size < self.size:
            del self.data[size:]
        else:
            self.data.extend(bytes(size - self.size))
        self.size = size


@dataclass
class _Op:
    kind: str  # "write", "flush" or "resize" (offset: the new size)
    offset: int = 0
    data: bytes = b""


class CrashNow(Exception):
    """Raised by a :class:`RecordingDevice` when its crash point is reached."""


class CrashClock:
    """The operation counter of one or more :class:`RecordingDevice` s.

    A power cut hits every device at once.  Give the devices of one system (say the
    origin and the snapshot store) the same clock: ``ops`` then counts the writes and
    flushes of all of them in the order they were issued, and with ``crash_after = n``
    operation number ``n`` (counting from 1, across the devices) does not happen and
    raises :class:`CrashNow` instead.

    With ``stay_down`` (the default for a clock made explicitly) every later write or
    flush on any device of the clock raises :class:`CrashNow` too, as the power stays
    off; reads still work.  Without it the crash fires once and the devices carry on.

    ``observer``, if given, is called as ``observer(n, what, path)`` just before
    operation number ``n`` is performed, while (in a single-threaded caller) the devices
    hold exactly what a crash at that operation would leave: a test can inspect every
    crash point in one run instead of re-running its workload once per point.  It is
    called without the clock's lock held, so it may also hold the calling thread there
    while other threads do I/O (to force an interleaving).

    Attributes:
        ops: operations issued so far (the crashing one included).
        crash_after: the operation that crashes, or None.
        crashed: True once the crash point was reached.
    """

    def __init__(self, crash_after: int | None = None, stay_down: bool = True,
                 observer=None):
        self.ops = 0
        self.crash_after = crash_after
        self.stay_down = stay_down
        self.observer = observer
        self.crashed = False
        self.lock = threading.Lock()

    def before(self, what: str, path: str) -> None:
        """Call the observer for the operation about to be counted (without the lock)."""
        observer = self.observer
        if observer is not None and not (self.crashed and self.stay_down):
            observer(self.ops + 1, what, path)

    def tick(self, what: str, path: str) -> None:
        """Count one operation (call with :attr:`lock` held); raise CrashNow at the crash."""
        if self.crashed and self.stay_down:
            raise CrashNow(f"{what} on {path} after the crash")
        self.ops += 1
        if self.crash_after is not None and self.ops >= self.crash_after:
            self.crash_after = None
            self.crashed = True
            raise CrashNow(f"crash before {what} {self.ops} on {path}")


class RecordingDevice(BlockDevice):
    """A memory device that records every write and flush for crash testing.

    The device keeps the image as of its last flush (``durable``) and the writes since
    (``pending``).  :meth:`crash_image` builds what a power cut could leave: the durable
    image plus any subset of the pending writes, optionally with one write torn at a
    512-byte boundary.  With ``crash_after = n`` set, the ``n``-th operation (writes plus
    flushes, counting from 1) does not happen and raises :class:`CrashNow` instead, so a
    workload can be stopped at every point in turn.  Devices that must crash together
    share one :class:`CrashClock` (``clock=``); by default each has its own, which fires
    once and then lets the device carry on.
    """

    SECTOR = 512

    def __init__(self, size: int, data: bytes | None = None, path: str = "<recording>",
                 clock: CrashClock | None = None):
        self.size = size
        self.path = path
        self.durable = bytearray(data) if data is not None else bytearray(size)
        if len(self.durable) != size:
            raise InvalidArgument("recording device data does not match its size")
        self.current = bytearray(self.durable)
        self.pending: list[_Op] = []
        self.clock = clock if clock is not None else CrashClock(stay_down=False)
        self._lock = self.clock.lock

    @property
    def ops(self) -> int:
        """Operations counted by this device's clock."""
        return self.clock.ops

    @ops.setter
    def ops(self, value: int) -> None:
        self.clock.ops = value

    @property
    def crash_after(self) -> int | None:
        """The operation (of this device's clock) that crashes, or None."""
        return self.clock.crash_after

    @crash_after.setter
    def crash_after(self, value: int | None) -> None:
        self.clock.crash_after = value

    def pread(self, length: int, offset: int) -> bytes:
        with self._lock:
            out = bytes(self.current[offset: offset + length])
        return out + bytes(length - len(out))

    def preadinto_nowait(self, buf, offset: int) -> bool:
        self.preadinto(buf, offset)
        return True

    def pwrite(self, data, offset: int) -> None:
        self._check_write(len(data), offset)
        self.clock.before("write", self.path)
        with self._lock:
            self.clock.tick("write", self.path)
            data = bytes(data)
            self.current[offset: offset + len(data)] = data
            self.pending.append(_Op("write", offset, data))

    def flush(self) -> None:
        self.clock.before("flush", self.path)
        with self._lock:
            self.clock.tick("flush", self.path)
            if self.pending:
                for op in self.pending:
                    _apply(self.durable, op)
                self.pending.clear()

    def resize(self, size: int) -> None:
        """Truncate or extend, as a file does: one operation of the clock (a crash point),
        durable at the next :meth:`flush`."""
        self.clock.before("resize", self.path)
        with self._lock:
            self.clock.tick("resize", self.path)
            op = _Op("resize", size)
            _apply(self.current, op)
            self.pending.append(op)
            self.size = size

    def crash_image(self, rng: random.Random | None = None, mode: str = "drop") -> bytearray:
        """Return a device image a crash now could leave.

        Args:
            rng: randomness for the ``"subset"`` and ``"torn"`` modes.
            mode: ``"drop"`` keeps only flushed writes; ``"all"`` keeps every write;
                ``"subset"`` keeps a random subset of unflushed writes (in order);
                ``"torn"`` keeps a random subset and tears one kept write at a
                512-byte boundary of the device (only a prefix of its sectors lands).
        """
        img = bytearray(self.durable)
        if mode == "drop" or not self.pending:
            return img
        rng = rng or random.Random(0)
        ops = list(self.pending)
        if mode == "all":
            keep = ops
        else:
            keep = [op for op in ops if rng.random() < 0.5]
        writes = [i for i, op in enumerate(keep) if op.kind == "write"]
        torn = rng.choice(writes) if (mode == "torn" and writes) else -1
        for i, op in enumerate(keep):
            if op.kind == "resize":
                _apply(img, op)
                continue
            data = op.data
            if i == torn:
                # Sectors are device-aligned: tear at a 512-byte boundary of the device
                # inside the write (a write within one sector lands whole).
                first = op.offset // self.SECTOR + 1
                last = (op.offset + len(data) - 1) // self.SECTOR
                if first <= last:
                    cut = rng.randrange(first, last + 1) * self.SECTOR
                    data = data[: cut - op.offset]
            _apply(img, _Op("write", op.offset, data))
        return img


def _apply(img: bytearray, op: _Op) -> None:
    """Apply a recorded write or resize to the image ``img``."""
    if op.kind == "resize":
        if op.offset < len(img):
            del img[op.offset:]
        else:
            img.extend(bytes(op.offset - len(img)))
    else:
        # A write past the end (its resize not kept in a crash image) extends the image
        # as it extends a file: zeroes up to its offset, not the data at the old end.
        if op.offset > len(img):
            img.extend(bytes(op.offset - len(img)))
        img[op.offset: op.offset + len(op.data)] = op.data
