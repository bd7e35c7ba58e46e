"""Block devices: the only place ddsnap touches ``os`` I/O.

A :class:`BlockDevice` is a byte-addressed device with positional reads and writes and a
durability barrier (:meth:`BlockDevice.flush`).  Two implementations here:

* :class:`FileDevice` over a regular file or a block device (``os.pread``/``os.pwrite``,
  ``os.fdatasync``);
* :class:`MemoryDevice`, a bytearray, the in-memory twin for tests and the transient store.

The crash-test device (``RecordingDevice``) lives in :mod:`ddsnap.testing.crash`.

Offsets and lengths are in bytes; ranges are ``[offset, offset + length)``.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
import struct

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

    def note_resized(self, size: int) -> None:
        """Another process resized the device to ``size`` bytes: record it (nothing is
        done to the device itself; a worker hears of an origin resize this way)."""
        self.size = size

    def pwrite_cached(self, data, offset: int) -> bool:
        """:meth:`pwrite` if the write goes to memory (the page cache) rather than
        straight to the device; False (nothing written) otherwise: the caller then
        uses :meth:`pwrite` from a thread that may block.  A write into the page cache
        starts no device I/O, though the kernel may still make it wait (dirty-page
        throttling, a page under writeback).  The default never tries."""
        return False

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

    def check_write(self, length: int, offset: int) -> None:
        """Refuse a write of ``length`` bytes at byte ``offset`` that would not lie in
        ``[0, size)``.

        Raises:
            InvalidArgument: naming the device, the offset and its size.
        """
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
        dst.check_write(length, dst_offset)
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
            raise InvalidArgument(
                f"{what} {path} is a directory, not a file or block device") from None
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
        self.check_write(len(data), offset)
        view = memoryview(data)
        while view:
            n = os.pwrite(self.fd, view, offset)
            view = view[n:]
            offset += n

    def pwrite_cached(self, data, offset: int) -> bool:
        # Opened without O_DIRECT: every write goes through the page cache.
        self.pwrite(data, offset)
        return True

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

    def note_resized(self, size: int) -> None:
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

    def __init__(self, size: int, data: bytes | bytearray | memoryview | None = None,
                 path: str = "<memory>"):
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
        self.check_write(len(data), offset)
        self.data[offset: offset + len(data)] = data

    def pwrite_cached(self, data, offset: int) -> bool:
        self.pwrite(data, offset)
        return True

    def flush(self) -> None:
        self.flushes += 1

    def resize(self, size: int) -> None:
        if size < self.size:
            del self.data[size:]
        else:
            self.data.extend(bytes(size - self.size))
        self.size = size
