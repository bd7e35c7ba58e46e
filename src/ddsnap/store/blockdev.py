"""Block devices: the only place ddsnap touches ``os`` I/O.

A :class:`BlockDevice` is a byte-addressed device with positional reads and writes and a
durability barrier (:meth:`BlockDevice.flush`).  Three implementations here:

* :class:`FileDevice` over a regular file or a block device (``os.pread``/``os.pwrite``,
  ``os.fdatasync``);
* :class:`DirectFileDevice`, a FileDevice opened with ``O_DIRECT`` (no page cache), for a
  device shared between hosts;
* :class:`MemoryDevice`, a bytearray, the in-memory twin for tests and the transient store.

The crash-test device (``RecordingDevice``) lives in :mod:`ddsnap.testing.crash`.

Offsets and lengths are in bytes; ranges are ``[offset, offset + length)``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import mmap
import os
import stat
import struct
import threading
import weakref
from collections.abc import Callable, Iterator

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

    @property
    def sparse(self) -> bool:
        """True if the device is a regular file: :meth:`allocation` reports its holes
        and :meth:`discard` punches them.  False (the default, and block devices): no
        holes are known and :meth:`discard` does nothing."""
        return False

    def allocation(self, offset: int, length: int,
                   max_runs: int = 1024) -> list[tuple[int, bool]]:
        """Which bytes of ``[offset, offset + length)`` are holes: ``(length_bytes,
        is_hole)`` runs, in order, covering a prefix of the range (at most ``max_runs``
        runs, so the work per call is bounded; at least one run).

        A hole reads as zeroes and holds no storage (``SEEK_DATA``/``SEEK_HOLE`` of a
        regular file, lseek(2)).  The default, for devices that are not :attr:`sparse`,
        is one run of data over the whole range, which is always true enough.
        """
        return [(length, False)]

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
    ``cp`` does): no data passes through Python.  Not for a :class:`DirectFileDevice` (a
    subclass, so not ``type(...) is FileDevice``): the kernel's copy may go through the
    page cache, and would bypass the device's read-modify-write serialization; its copies
    are its own aligned ``pread`` and ``pwrite``.  Otherwise, or where the kernel cannot
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
        """A regular file: punch ``[offset, offset + length)`` (``fallocate``
        ``PUNCH_HOLE | KEEP_SIZE``), which reads as zeroes afterwards and frees the
        file system blocks it covers whole (a partial block at either end is zeroed in
        place).  A block device, or a file system that cannot punch: nothing (a hint).

        Raises:
            OSError: the host failed the ``fallocate`` otherwise.
        """
        if self.is_block or length <= 0:
            return
        try:
            # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE = 0x02 | 0x01
            _fallocate(self.fd, 0x03, offset, length)
        except OSError as e:  # not every filesystem can punch holes; discard is a hint
            if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                raise

    @property
    def sparse(self) -> bool:
        return not self.is_block

    def allocation(self, offset: int, length: int,
                   max_runs: int = 1024) -> list[tuple[int, bool]]:
        """The file's holes in ``[offset, offset + length)`` from ``SEEK_DATA`` and
        ``SEEK_HOLE`` (see :meth:`BlockDevice.allocation`; at most two ``lseek`` per
        run).  Past the file's end (a file that shrank behind our back, whose reads
        fail with EIO) the bytes are reported as data, never as zeroes.  A block device,
        or a file system without ``SEEK_DATA`` (EINVAL): one run of data.

        Raises:
            OSError: the host failed the ``lseek`` otherwise.
        """
        if self.is_block or length <= 0:
            return [(length, False)]
        end = offset + length
        runs: list[tuple[int, bool]] = []
        pos = offset
        while pos < end and len(runs) < max_runs:
            try:
                data = os.lseek(self.fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.EINVAL and not runs:
                    return [(length, False)]  # no SEEK_DATA here: all data is true
                if e.errno != errno.ENXIO:
                    raise
                # ENXIO: no data from pos to the end of the file
                eof = min(end, os.fstat(self.fd).st_size)
                if pos < eof:
                    runs.append((eof - pos, True))
                    pos = eof
                    continue
                runs.append((end - pos, False))  # past the end: not zeroes
                break
            if data > pos:
                stop = min(data, end)
                runs.append((stop - pos, True))
                pos = stop
                continue
            stop = min(os.lseek(self.fd, pos, os.SEEK_HOLE), end)
            runs.append((stop - pos, False))
            pos = stop
        return runs

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


#: O_DIRECT alignment, in bytes, of file offsets, lengths and memory: a multiple of every
#: logical block size up to 4 KiB (the largest in use) and of the page size of x86 hosts
ALIGN = 4096
#: the largest piece, in bytes, of one O_DIRECT read or write (a multiple of ALIGN); the
#: size of each thread's bounce buffer
DIRECT_PIECE = 1 << 20
_O_DIRECT = getattr(os, "O_DIRECT", 0)

# Each thread's page-aligned bounce buffer (a memoryview of an anonymous mmap): Python's
# own buffers (bytes, bytearray) have no alignment, and O_DIRECT wants aligned memory.
_bounce = threading.local()


def _bounce_buffer() -> memoryview:
    """This thread's DIRECT_PIECE-byte page-aligned buffer (made on first use)."""
    view = getattr(_bounce, "view", None)
    if view is None:
        view = memoryview(mmap.mmap(-1, DIRECT_PIECE))
        _bounce.view = view
    return view


class _WriteRanges:
    """The byte ranges of one device being written by threads of this process.

    A write holds the aligned range it writes (:meth:`hold`) until the write is done; a
    write of an overlapping range waits.  So a read-modify-write of a block never
    interleaves with another write of the same block, and neither write is lost.  Writes
    of disjoint ranges proceed in parallel; reads take nothing.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._held: list[tuple[int, int]] = []

    @contextlib.contextmanager
    def hold(self, start: int, end: int) -> Iterator[None]:
        """Hold ``[start, end)`` for the ``with`` body, once no other thread holds any
        byte of it."""
        entry = (start, end)
        with self._cond:
            while any(s < end and start < e for s, e in self._held):
                self._cond.wait()
            self._held.append(entry)
        try:
            yield
        finally:
            with self._cond:
                self._held.remove(entry)
                self._cond.notify_all()


# One _WriteRanges per open file or block device of this process, shared by every
# DirectFileDevice on it (a server may open the same origin twice).
_write_ranges: weakref.WeakValueDictionary[tuple[int, ...], _WriteRanges] = (
    weakref.WeakValueDictionary())
_write_ranges_lock = threading.Lock()


def _write_ranges_of(st: os.stat_result) -> _WriteRanges:
    key = (1, st.st_rdev) if stat.S_ISBLK(st.st_mode) else (0, st.st_dev, st.st_ino)
    with _write_ranges_lock:
        ranges = _write_ranges.get(key)
        if ranges is None:
            ranges = _WriteRanges()
            _write_ranges[key] = ranges
        return ranges


class DirectFileDevice(FileDevice):
    """A :class:`FileDevice` opened with ``O_DIRECT``: every read and write goes to the
    device itself, none through this host's page cache.

    Why: a device shared between hosts (a SAN LUN, an NBD-attached disk; files in tests),
    which the metadata server and the client nodes open at once.  The page caches of two
    hosts are not coherent: a node's write must reach the shared device before the
    server's copy-out reads it, and the server's copy-out must not read a page this host
    cached before that write.  With O_DIRECT neither host keeps a copy.  Sources: open(2),
    the notes on O_DIRECT; the csnap seed: the data path of every host doing I/O on
    shared storage.

    Units are bytes; the API is :class:`FileDevice`'s and takes any offset and length.

    Alignment: O_DIRECT wants file offsets, lengths and memory aligned to the logical block
    size of the device.  All I/O here is in whole :data:`ALIGN` (4096)-byte blocks from a
    page-aligned bounce buffer (one per thread, :data:`DIRECT_PIECE` bytes, so a large
    request goes in pieces of at most 1 MiB and allocates nothing).  A read reads the
    covering blocks and copies the asked part out.  A write whose first or last block it
    covers only partly reads that block, changes it and writes it back (read-modify-write).

    Serialized: each write holds the aligned range of blocks it writes (per piece) against
    other writes of those blocks by this process (every DirectFileDevice on the same file or
    device shares one table), so two threads' read-modify-writes of one block, or a
    read-modify-write and an aligned write of it, never lose either write.  Reads are not
    serialized.  Nothing is serialized between processes or hosts: two hosts writing
    different parts of one 4 KiB block at once can lose one write (each host's
    read-modify-write puts back the other's old bytes), which the protocol above must
    rule out; copy-out chunks (4 KiB to 1 MiB) are whole blocks.

    Size not a multiple of 4096 (an odd-sized origin; store files always are): the last,
    partial block cannot be written with O_DIRECT without extending a file past its end.
    Writes to that block go through a short-lived ordinary (buffered) descriptor of the
    same file: the block's cached pages are dropped first (so the kernel's own
    read-modify-write starts from the device, not a stale page), written, ``fdatasync``-ed
    (so the data is on the device before :meth:`pwrite` returns, as a direct write is) and
    dropped again.  Reads of that block are direct as any other.

    Differences from :class:`FileDevice`: :meth:`preadinto_nowait` and
    :meth:`pwrite_cached` answer False (there is no page cache to hit: callers use the
    blocking calls from a thread); :meth:`discard` punches only the whole 4 KiB blocks of
    its range (zeroing part of a block would leave a dirty cached page that, written back
    later, could overwrite another host's data); :func:`copy_range` never uses
    ``copy_file_range`` with it.  Reads past the end, ``strict``, :meth:`flush`
    (``fdatasync``: the device's write cache and the file's metadata still need it),
    :meth:`resize`, locks and :meth:`close` are :class:`FileDevice`'s.

    Args:
        path, writable, create_size, what, strict: as :class:`FileDevice`.

    Raises:
        StoreNotFound: ``path`` does not exist (and ``create_size`` was not given).
        InvalidArgument: ``path`` is neither a regular file nor a block device; its
            filesystem refuses O_DIRECT (EINVAL, some tmpfs or FUSE mounts); a file this
            call created is removed again.
        DdsnapError: permission denied.
    """

    def __init__(self, path: str, writable: bool = True, create_size: int | None = None,
                 what: str = "snapshot store", strict: bool = False):
        existed = os.path.exists(path)
        super().__init__(path, writable, create_size, what, strict)
        self.writable = writable
        # FileDevice opened and checked it; reopen the same file (not whatever the path
        # names now) with O_DIRECT.
        flags = (os.O_RDWR if writable else os.O_RDONLY) | getattr(os, "O_CLOEXEC", 0)
        try:
            if not _O_DIRECT:
                raise OSError(errno.EINVAL, "no O_DIRECT on this platform")
            fd = os.open(f"/proc/self/fd/{self.fd}", flags | _O_DIRECT)
        except OSError as e:
            st = os.fstat(self.fd)
            self.close()
            if e.errno != errno.EINVAL:
                raise
            if not existed:
                with contextlib.suppress(OSError):
                    now = os.stat(path)
                    if (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):
                        os.unlink(path)
            raise InvalidArgument(
                f"{what} {path} cannot be opened with O_DIRECT (its filesystem refuses "
                "direct I/O): a device shared between hosts needs O_DIRECT, since another "
                "host's page cache is not coherent with this one's; put it on a block "
                "device or a filesystem that does direct I/O") from None
        os.close(self.fd)
        self.fd = fd
        self._ranges = _write_ranges_of(os.fstat(fd))

    # -- reads ---------------------------------------------------------------------------

    def _read_blocks(self, buf: memoryview, offset: int) -> int:
        """Read whole blocks at the aligned ``offset`` into the aligned ``buf`` (of a
        multiple of ALIGN bytes); return the bytes read, fewer only at the end of file."""
        done = 0
        while done < len(buf):
            n = os.preadv(self.fd, [buf[done:]], offset + done)
            done += n
            if n <= 0 or n % ALIGN:
                break  # end of file (mid-block: the next read would be unaligned)
        return done

    def _read(self, out: memoryview, offset: int) -> int:
        """Copy the bytes at ``offset`` into ``out``; return how many there were before
        the end of file (the rest of ``out`` is left as it was)."""
        buf = _bounce_buffer()
        end = offset + len(out)
        pos = offset
        while pos < end:
            start = pos - pos % ALIGN
            stop = min(end, start + DIRECT_PIECE)
            n = self._read_blocks(buf[: _align_up(stop) - start], start)
            got = max(0, min(start + n, stop) - pos)
            out[pos - offset: pos - offset + got] = buf[pos - start: pos - start + got]
            pos += got
            if pos < stop:
                break  # end of file
        return pos - offset

    def pread(self, length: int, offset: int) -> bytes:
        out = bytearray(length)
        n = self._read(memoryview(out), offset)
        if n < length:
            self._short(offset + n)  # the rest is zeroes already
        return bytes(out)

    def preadinto(self, buf, offset: int) -> None:
        view = _bytes_view(buf)
        n = self._read(view, offset)
        if n < len(view):
            self._short(offset + n)
            view[n:] = bytes(len(view) - n)

    def preadinto_nowait(self, buf, offset: int) -> bool:
        return False  # nothing is in memory: every read waits for the device

    # -- writes --------------------------------------------------------------------------

    def pwrite(self, data, offset: int) -> None:
        view = _bytes_view(data)
        self.check_write(len(view), offset)
        end = offset + len(view)
        tail = self.size - self.size % ALIGN  # start of a partial last block, if any
        buf = _bounce_buffer()
        pos = offset
        while pos < min(end, tail):
            start = pos - pos % ALIGN
            stop = min(end, tail, start + DIRECT_PIECE)
            stop_block = _align_up(stop)
            with self._ranges.hold(start, stop_block):
                if pos > start:  # partial first block: read-modify-write
                    self._read_block(buf[:ALIGN], start)
                if stop < stop_block and (stop_block - ALIGN > start or pos == start):
                    self._read_block(buf[stop_block - ALIGN - start: stop_block - start],
                                     stop_block - ALIGN)  # partial last block
                buf[pos - start: stop - start] = view[pos - offset: stop - offset]
                self._write_blocks(buf[: stop_block - start], start)
            pos = stop
        if end > tail and pos < end:
            self._write_tail(view[pos - offset:], pos, tail)

    def _read_block(self, block: memoryview, offset: int) -> None:
        n = self._read_blocks(block, offset)
        if n < ALIGN:
            block[n:] = bytes(ALIGN - n)  # past the end of file: zeroes, as FileDevice

    def _write_blocks(self, buf: memoryview, offset: int) -> None:
        done = 0
        while done < len(buf):
            n = os.pwrite(self.fd, buf[done:], offset + done)
            if n <= 0:
                raise OSError(errno.EIO, f"{self.what} {self.path}: write of "
                                         f"{human_bytes(len(buf))} at byte {offset} stopped")
            done += n

    def _write_tail(self, data: memoryview, offset: int, tail: int) -> None:
        """Write ``data`` at ``offset`` inside the partial last block starting at byte
        ``tail``, through a buffered descriptor (see the class docstring)."""
        if not self.writable:
            # The reopen below checks the file's permissions, not this descriptor's mode.
            raise OSError(errno.EBADF, f"{self.what} {self.path} is open read-only")
        with self._ranges.hold(tail, tail + ALIGN):
            fd = os.open(f"/proc/self/fd/{self.fd}", os.O_WRONLY | getattr(os, "O_CLOEXEC", 0))
            try:
                os.posix_fadvise(fd, tail, ALIGN, os.POSIX_FADV_DONTNEED)
                while data:
                    n = os.pwrite(fd, data, offset)
                    data = data[n:]
                    offset += n
                os.fdatasync(fd)
                os.posix_fadvise(fd, tail, ALIGN, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)

    def pwrite_cached(self, data, offset: int) -> bool:
        return False  # every write goes to the device: the caller writes from a thread

    # -- the rest ------------------------------------------------------------------------

    def discard(self, offset: int, length: int) -> None:
        start = _align_up(max(offset, 0))
        stop = offset + length
        stop -= stop % ALIGN
        if stop > start:
            super().discard(start, stop - start)


def _align_up(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _bytes_view(buf) -> memoryview:
    """``buf`` as a flat memoryview of bytes."""
    view = memoryview(buf)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view


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


class FencedDevice(BlockDevice):
    """A device whose every write first asks ``fence`` whether writing is still allowed:
    the devices of a cluster's metadata server (issue 12), whose right to write ends
    with its etcd lease.  Reads pass straight through.

    Args:
        inner: the device written to.
        fence: ``() -> None``, raising (``Fenced``) once this process may not write; it
            is called before every ``pwrite``, ``pwrite_cached``, ``flush``,
            ``discard`` and ``resize``, so it must be cheap and thread-safe (a
            comparison with a deadline).

    A process paused between the check and the system call can still write after its
    lease ran out: the bounded-pause assumption of every lease (docs/protocol.md
    "Failover"); the epoch recorded in each journal transaction is what exposes it.
    """

    def __init__(self, inner: BlockDevice, fence: Callable[[], None]):
        self.inner = inner
        self.fence = fence
        self.path = inner.path

    @property
    def size(self) -> int:
        return self.inner.size

    @size.setter
    def size(self, value: int) -> None:
        self.inner.size = value

    def __getattr__(self, name: str):
        # what FileDevice offers beyond BlockDevice (fd, is_block, lock_*, what, ...)
        return getattr(self.inner, name)

    def check_size(self) -> None:
        self.inner.check_size()

    def pread(self, length: int, offset: int) -> bytes:
        return self.inner.pread(length, offset)

    def preadinto(self, buf, offset: int) -> None:
        self.inner.preadinto(buf, offset)

    def preadinto_nowait(self, buf, offset: int) -> bool:
        return self.inner.preadinto_nowait(buf, offset)

    def pwrite(self, data, offset: int) -> None:
        self.fence()
        self.inner.pwrite(data, offset)

    def pwrite_cached(self, data, offset: int) -> bool:
        self.fence()
        return self.inner.pwrite_cached(data, offset)

    def note_resized(self, size: int) -> None:
        self.inner.note_resized(size)

    def flush(self) -> None:
        self.fence()
        self.inner.flush()

    def discard(self, offset: int, length: int) -> None:
        self.fence()
        self.inner.discard(offset, length)

    @property
    def sparse(self) -> bool:
        return self.inner.sparse

    def allocation(self, offset: int, length: int,
                   max_runs: int = 1024) -> list[tuple[int, bool]]:
        return self.inner.allocation(offset, length, max_runs)

    def resize(self, size: int) -> None:
        self.fence()
        self.inner.resize(size)

    def close(self) -> None:
        self.inner.close()
