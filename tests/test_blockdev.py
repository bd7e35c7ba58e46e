"""Block devices: the common contract of FileDevice, DirectFileDevice, MemoryDevice and
RecordingDevice, the file-specific behaviour (of FileDevice and DirectFileDevice alike),
DirectFileDevice's own (alignment, read-modify-write, no page cache, an odd-sized last
block), and RecordingDevice's crash model (crash points, a clock shared by devices that
lose power together, and the images a crash can leave)."""

from __future__ import annotations

import array
import ctypes
import errno
import mmap
import os
import random
import tempfile
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import examples
from ddsnap.errors import InvalidArgument, StoreNotFound
from ddsnap.store.blockdev import (
    ALIGN,
    DIRECT_PIECE,
    DirectFileDevice,
    FileDevice,
    MemoryDevice,
    copy_range,
)
from ddsnap.testing.crash import CrashClock, CrashNow, RecordingDevice
from served import loop_device, need, tool

SIZE = 64 << 10


@pytest.fixture(params=["memory", "file", "direct", "recording"])
def device(request, tmp_path):
    """A fresh, zero-filled SIZE-byte device of each kind."""
    if request.param == "memory":
        yield MemoryDevice(SIZE)
    elif request.param == "recording":
        yield RecordingDevice(SIZE)
    else:
        cls = DirectFileDevice if request.param == "direct" else FileDevice
        dev = cls(str(tmp_path / "dev.img"), create_size=SIZE)
        yield dev
        dev.close()


def test_contract_read_write_round_trip(device):
    assert device.size == SIZE
    assert device.pread(100, 0) == bytes(100)
    device.pwrite(b"hello", 4093)  # across a 4 KiB boundary
    device.pwrite(memoryview(b"xyz"), SIZE - 3)  # up to the very end
    device.flush()
    assert device.pread(9, 4091) == b"\0\0hello\0\0"
    assert device.pread(3, SIZE - 3) == b"xyz"
    buf = bytearray(7)
    device.preadinto(buf, 4093)
    assert bytes(buf) == b"hello\0\0"
    view = memoryview(bytearray(4))
    device.preadinto(view, SIZE - 3)
    assert bytes(view) == b"xyz\0"  # past the end reads as zeroes


def test_contract_reads_past_end_are_zero_padded(device):
    device.pwrite(b"ab", SIZE - 2)
    assert device.pread(10, SIZE - 2) == b"ab" + bytes(8)
    assert device.pread(5, SIZE + 100) == bytes(5)


@pytest.mark.parametrize("offset,length", [(SIZE - 1, 2), (SIZE, 1), (-1, 1), (0, SIZE + 1)])
def test_contract_writes_past_end_are_refused(device, offset, length):
    with pytest.raises(InvalidArgument):
        device.pwrite(b"x" * length, offset)
    assert device.pread(16, SIZE - 16) == bytes(16)


def test_contract_discard_keeps_size_and_other_data(device):
    device.pwrite(b"k" * 8192, 0)
    device.pwrite(b"z" * 100, 20000)
    device.discard(0, 8192)
    device.discard(0, 0)
    assert device.size == SIZE
    assert device.pread(100, 20000) == b"z" * 100


# ---------------------------------------------------------------------------------------
# FileDevice specifics, DirectFileDevice's too

FILE_CLASSES = pytest.mark.parametrize("cls", [FileDevice, DirectFileDevice])

@FILE_CLASSES
def test_file_device_creates_a_sparse_file_and_reopens(cls, tmp_path):
    path = tmp_path / "store.img"
    dev = cls(str(path), create_size=1 << 30)
    try:
        assert dev.size == 1 << 30 and not dev.is_block
        assert os.stat(path).st_blocks * 512 < 1 << 20  # sparse, not written out
        dev.pwrite(b"data", (1 << 30) - 4)
        dev.flush()
    finally:
        dev.close()
    # create_size is ignored for an existing file; content persists.
    dev = cls(str(path), create_size=4096)
    try:
        assert dev.size == 1 << 30
        assert dev.pread(4, (1 << 30) - 4) == b"data"
    finally:
        dev.close()


@FILE_CLASSES
def test_file_device_allocation_is_the_files_holes(cls, tmp_path):
    """``allocation`` reports the file's holes (SEEK_DATA/SEEK_HOLE) in order, at most
    ``max_runs`` runs (a prefix of the range), bytes past the end of a file that shrank
    as data (never zeroes), and ``discard`` punches a hole it then reports (issue 13)."""
    path = tmp_path / "origin.img"
    dev = cls(str(path), create_size=16 * ALIGN)
    try:
        assert dev.sparse
        dev.pwrite(b"\x01" * 2 * ALIGN, 4 * ALIGN)  # blocks 4-5
        dev.pwrite(b"\x02" * ALIGN, 10 * ALIGN)  # block 10
        dev.flush()
        assert dev.allocation(0, 16 * ALIGN) == [
            (4 * ALIGN, True), (2 * ALIGN, False), (4 * ALIGN, True), (ALIGN, False),
            (5 * ALIGN, True)]
        assert dev.allocation(ALIGN + 100, 4 * ALIGN, max_runs=1) == [
            (3 * ALIGN - 100, True)]
        dev.discard(4 * ALIGN, ALIGN)
        assert dev.allocation(4 * ALIGN, 2 * ALIGN) == [(ALIGN, True), (ALIGN, False)]
        os.truncate(path, 8 * ALIGN)  # shrunk behind the device's back
        assert dev.allocation(6 * ALIGN, 10 * ALIGN) == [(2 * ALIGN, True),
                                                          (8 * ALIGN, False)]
    finally:
        dev.close()
    mem = MemoryDevice(SIZE)
    assert not mem.sparse and mem.allocation(5, 100) == [(100, False)]


@FILE_CLASSES
def test_file_device_short_file_reads_as_zeroes(cls, tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"abc")
    dev = cls(str(path))
    try:
        assert dev.size == 3
        assert dev.pread(6, 1) == b"bc\0\0\0\0"
        buf = bytearray(b"\xff" * 5)
        dev.preadinto(buf, 0)
        assert bytes(buf) == b"abc\0\0"
    finally:
        dev.close()


@FILE_CLASSES
def test_file_device_missing_path(cls, tmp_path):
    with pytest.raises(StoreNotFound) as e:
        cls(str(tmp_path / "nope"))
    assert str(tmp_path / "nope") in str(e.value)


@FILE_CLASSES
def test_file_device_refuses_directories_and_fifos(cls, tmp_path):
    with pytest.raises(InvalidArgument):
        cls(str(tmp_path))
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # so opening for writing does not block
    try:
        with pytest.raises(InvalidArgument):
            cls(str(fifo))
    finally:
        os.close(fd)


@FILE_CLASSES
def test_file_device_read_only(cls, tmp_path):
    path = tmp_path / "ro"
    path.write_bytes(b"q" * 4096)
    dev = cls(str(path), writable=False)
    try:
        assert dev.pread(4, 0) == b"qqqq"
        with pytest.raises(OSError):
            dev.pwrite(b"x", 0)
    finally:
        dev.close()
    assert path.read_bytes() == b"q" * 4096


@FILE_CLASSES
def test_file_device_exclusive_lock(cls, tmp_path):
    path = str(tmp_path / "locked")
    a = cls(path, create_size=8192)
    b = cls(path)
    try:
        assert a.lock_exclusive()
        assert not b.lock_exclusive()
        a.close()
        assert b.lock_exclusive()
    finally:
        a.close()
        b.close()


@FILE_CLASSES
def test_file_device_discard_of_a_written_range(cls, tmp_path):
    dev = cls(str(tmp_path / "d"), create_size=1 << 20)
    try:
        dev.pwrite(b"\x55" * (256 << 10), 0)
        dev.flush()
        dev.discard(64 << 10, 128 << 10)
        assert dev.pread(4096, 0) == b"\x55" * 4096
        assert dev.pread(4096, 200 << 10) == b"\x55" * 4096
        assert dev.size == 1 << 20
    finally:
        dev.close()


# ---------------------------------------------------------------------------------------
# MemoryDevice / RecordingDevice construction

@pytest.mark.parametrize("cls", [MemoryDevice, RecordingDevice])
def test_initial_data_must_match_size(cls):
    dev = cls(8, b"12345678")
    assert dev.pread(8, 0) == b"12345678"
    with pytest.raises(InvalidArgument):
        cls(8, b"123")


# ---------------------------------------------------------------------------------------
# RecordingDevice: crash points

def test_crash_after_stops_at_that_operation():
    dev = RecordingDevice(4096)
    dev.crash_after = 3
    dev.pwrite(b"a", 0)  # op 1
    dev.flush()  # op 2
    with pytest.raises(CrashNow):
        dev.pwrite(b"b", 1)  # op 3: does not happen
    assert dev.pread(2, 0) == b"a\0"
    assert dev.ops == 3 and dev.crash_after is None
    # A device's own clock fires once; the device then carries on (old behaviour).
    dev.pwrite(b"c", 2)
    assert dev.pread(3, 0) == b"a\0c"


def test_crash_on_a_flush_leaves_pending_writes_pending():
    dev = RecordingDevice(4096)
    dev.pwrite(b"a", 0)
    dev.crash_after = 2
    with pytest.raises(CrashNow):
        dev.flush()
    assert dev.crash_image(mode="drop") == bytes(4096)
    assert dev.crash_image(mode="all")[:1] == b"a"


def test_shared_clock_crashes_devices_together():
    clock = CrashClock(crash_after=4)
    origin = RecordingDevice(4096, path="origin", clock=clock)
    store = RecordingDevice(4096, path="store", clock=clock)
    store.pwrite(b"s", 0)  # 1
    store.flush()  # 2
    origin.pwrite(b"o", 0)  # 3
    with pytest.raises(CrashNow) as e:
        store.pwrite(b"t", 1)  # 4
    assert "store" in str(e.value)
    assert clock.crashed and clock.ops == 4 and origin.ops == store.ops == 4
    # The power stays off: every later write or flush on either device fails too.
    for op in (lambda: origin.flush(), lambda: origin.pwrite(b"x", 5),
               lambda: store.flush()):
        with pytest.raises(CrashNow):
            op()
    assert origin.pread(1, 0) == b"o"  # reads still work
    assert origin.crash_image(mode="drop") == bytes(4096)
    assert store.crash_image(mode="drop")[:2] == b"s\0"
    assert clock.ops == 4


def test_clock_counts_every_write_and_flush_in_issue_order():
    clock = CrashClock()
    a = RecordingDevice(4096, clock=clock)
    b = RecordingDevice(4096, clock=clock)
    for i in range(10):
        (a if i % 3 else b).pwrite(b"x", i)
        if i % 4 == 0:
            a.flush()
    assert clock.ops == 10 + 3 and not clock.crashed


# ---------------------------------------------------------------------------------------
# RecordingDevice: crash images

ops_st = st.lists(
    st.one_of(
        st.tuples(st.just("write"), st.integers(0, 8192 - 1), st.integers(1, 3000),
                  st.integers(1, 255)),
        st.just(("flush",)),
    ),
    max_size=25,
)


@settings(max_examples=examples(80))
@given(ops_st, st.integers(0, 2**32))
def test_crash_images_hold_only_durable_or_pending_data(ops, seed):
    """``drop`` is the last flushed image, ``all`` the current one; ``subset`` and
    ``torn`` hold, at every byte, either the flushed data or data of a write issued since
    the flush, and ``subset`` applies the writes it keeps in issue order."""
    size = 8192
    dev = RecordingDevice(size)
    model_durable = bytearray(size)
    model_current = bytearray(size)
    since_flush: list[tuple[int, bytes]] = []
    for op in ops:
        if op[0] == "flush":
            dev.flush()
            model_durable[:] = model_current
            since_flush.clear()
        else:
            _, off, n, fill = op
            n = min(n, size - off)
            data = bytes([fill]) * n
            dev.pwrite(data, off)
            model_current[off: off + n] = data
            since_flush.append((off, data))
    assert dev.crash_image(mode="drop") == model_durable
    assert dev.crash_image(mode="all") == model_current
    for mode in ("subset", "torn"):
        img = dev.crash_image(random.Random(seed), mode)
        assert len(img) == size
        for x in range(size):
            if img[x] == model_durable[x]:
                continue
            allowed = {d[x - o] for o, d in since_flush if o <= x < o + len(d)}
            assert img[x] in allowed, (mode, x)
    # Same seed, same image: crash tests are reproducible.
    torn = dev.crash_image(random.Random(seed), "torn")
    assert torn == dev.crash_image(random.Random(seed), "torn")


def test_subset_keeps_order_of_overlapping_writes():
    dev = RecordingDevice(4096)
    dev.pwrite(b"1" * 100, 0)
    dev.pwrite(b"2" * 100, 0)
    seen = set()
    for seed in range(64):
        seen.add(bytes(dev.crash_image(random.Random(seed), "subset")[:100]))
    # Kept writes land in issue order: "2" over "1", never "1" over "2" as the end state
    # when both are kept; all four outcomes of keeping/dropping each write appear.
    assert seen == {bytes(100), b"1" * 100, b"2" * 100}


def test_torn_write_keeps_a_sector_prefix():
    dev = RecordingDevice(8192)
    dev.pwrite(b"\xaa" * 4096, 1024)
    outcomes = set()
    for seed in range(200):
        img = dev.crash_image(random.Random(seed), "torn")
        landed = len(bytes(img[1024:5120]).rstrip(b"\0"))
        assert bytes(img[1024:1024 + landed]) == b"\xaa" * landed
        assert landed % 512 == 0
        outcomes.add(landed)
    assert 0 in outcomes  # the write dropped
    assert len(outcomes - {0, 4096}) >= 3  # several tear points


def test_torn_unaligned_write_tears_at_device_sector_boundaries():
    dev = RecordingDevice(8192)
    dev.pwrite(b"\xbb" * 513, 700)  # spans the device sector boundaries at 1024
    dev.pwrite(b"\xcc" * 100, 3100)  # inside one sector: never torn
    outcomes = set()
    for seed in range(200):
        img = dev.crash_image(random.Random(seed), "torn")
        landed = bytes(img[700:1213]).rstrip(b"\0")
        assert landed == b"\xbb" * len(landed)
        assert len(landed) in (0, 1024 - 700, 513)
        outcomes.add(len(landed))
        assert bytes(img[3100:3200]) in (bytes(100), b"\xcc" * 100)
    assert outcomes == {0, 1024 - 700, 513}


def test_crash_images_of_a_grow_and_a_write_in_the_grown_part():
    """A resize is one pending operation like a write.  A crash image that keeps a write
    past the old end but not the grow before it is what a file shows when its extension
    was lost but the write (which extends it again) landed: the write at its own offset,
    zeroes before it.  The write never lands anywhere else."""
    dev = RecordingDevice(4096, b"\x11" * 4096)
    dev.resize(8192)
    dev.pwrite(b"\xaa" * 512, 6144)
    assert dev.size == 8192
    assert dev.crash_image(mode="drop") == b"\x11" * 4096
    assert dev.crash_image(mode="all") == b"\x11" * 4096 + bytes(2048) + b"\xaa" * 512 + bytes(1536)
    seen = set()
    for seed in range(64):
        for mode in ("subset", "torn"):
            img = bytes(dev.crash_image(random.Random(seed), mode))
            assert img[:4096] == b"\x11" * 4096, (seed, mode)
            assert img[4096:6144] == bytes(len(img[4096:6144])), (seed, mode)
            assert len(img) in (4096, 6656, 8192), (seed, mode, len(img))
            if len(img) == 6656:  # the write kept, the grow lost
                assert img[6144:] == b"\xaa" * 512, (seed, mode)
            seen.add(len(img))
    assert seen == {4096, 6656, 8192}
    dev.flush()
    dev.resize(1024)  # a shrink: pending until the next flush
    want = b"\x11" * 4096 + bytes(2048) + b"\xaa" * 512 + bytes(1536)
    assert dev.crash_image(mode="drop") == want
    assert dev.crash_image(mode="all") == b"\x11" * 1024
    dev.flush()
    assert dev.crash_image(mode="drop") == b"\x11" * 1024 and dev.size == 1024


def test_clock_observer_sees_each_operation_before_it_happens():
    seen = []
    clock = CrashClock()
    a = RecordingDevice(4096, path="a", clock=clock)
    b = RecordingDevice(4096, path="b", clock=clock)

    def observe(n, what, path):
        # The operation has not happened yet: its data is in no crash image.
        seen.append((n, what, path, bytes(a.crash_image(mode="all")[:2]),
                     bytes(b.crash_image(mode="all")[:1])))

    clock.observer = observe
    a.pwrite(b"x", 0)
    b.flush()
    a.pwrite(b"y", 1)
    clock.crash_after = 4
    with pytest.raises(CrashNow):
        b.pwrite(b"z", 0)
    assert seen == [(1, "write", "a", b"\0\0", b"\0"), (2, "flush", "b", b"x\0", b"\0"),
                    (3, "write", "a", b"x\0", b"\0"), (4, "write", "b", b"xy", b"\0")]
    with pytest.raises(CrashNow):
        a.flush()  # the power stays off; the observer is not called for it
    assert len(seen) == 4


def test_contract_preadinto_nowait_reads_what_is_in_memory(device):
    """What was just written is in memory (the page cache for a file): the no-wait read
    returns it.  A DirectFileDevice keeps nothing in memory: it answers False, never
    wrong bytes, and the caller reads from a thread."""
    data = os.urandom(3 * 4096)
    device.pwrite(data, 4096)
    buf = bytearray(len(data))
    in_memory = not isinstance(device, DirectFileDevice)
    assert device.preadinto_nowait(memoryview(buf), 4096) is in_memory
    if in_memory:
        assert bytes(buf) == data
    device.preadinto(memoryview(buf), 4096)
    assert bytes(buf) == data


def test_contract_pwrite_cached_writes_only_into_memory(device):
    """pwrite_cached writes (True) where the write goes to memory, else writes nothing
    (False): a DirectFileDevice has no page cache to write into."""
    written = device.pwrite_cached(b"cached", 5000)
    assert device.pread(6, 5000) == (b"cached" if written else bytes(6))
    if isinstance(device, DirectFileDevice | MemoryDevice):
        assert written is not isinstance(device, DirectFileDevice)


def test_file_preadinto_nowait_refuses_data_not_cached(tmp_path):
    """After the page cache is dropped for the file, RWF_NOWAIT reads answer False (the
    event loop never waits for the disk); a normal read brings the data in again."""
    fstype = max((m for m in Path("/proc/mounts").read_text().split("\n") if m.count(" ") >= 3
                  and str(tmp_path).startswith(m.split()[1])), key=lambda m: len(m.split()[1]))
    if fstype.split()[2] in ("tmpfs", "ramfs"):
        pytest.skip("a memory filesystem has no page cache to drop")
    path = tmp_path / "cold.img"
    data = os.urandom(1 << 20)
    path.write_bytes(data)
    dev = FileDevice(str(path), writable=False)
    try:
        os.fsync(dev.fd)
        os.posix_fadvise(dev.fd, 0, 0, os.POSIX_FADV_DONTNEED)
        buf = bytearray(64 << 10)
        assert dev.preadinto_nowait(memoryview(buf), 512 << 10) is False
        dev.preadinto(memoryview(buf), 512 << 10)
        assert bytes(buf) == data[512 << 10: 576 << 10]
        buf2 = bytearray(64 << 10)
        assert dev.preadinto_nowait(memoryview(buf2), 512 << 10) is True
        assert buf2 == buf
    finally:
        dev.close()


@pytest.mark.parametrize("kinds", [("file", "file"), ("file", "memory"), ("memory", "file"),
                                   ("recording", "recording"), ("direct", "direct"),
                                   ("direct", "file"), ("file", "direct"), ("memory", "direct")])
def test_copy_range_between_devices(tmp_path, kinds):
    """copy_range copies a range between two devices of any kinds (in the kernel between
    two files); a source range past its end reads as zeroes; the destination is checked."""
    def make(kind, name, data):
        if kind in ("file", "direct"):
            path = tmp_path / name
            path.write_bytes(data)
            return (DirectFileDevice if kind == "direct" else FileDevice)(str(path))
        if kind == "recording":
            return RecordingDevice(len(data), data)
        return MemoryDevice(len(data), data)

    src_data = os.urandom(200 << 10)
    src = make(kinds[0], "src", src_data)
    dst = make(kinds[1], "dst", bytes(300 << 10))
    copy_range(src, 4096, dst, 65536, 100 << 10)
    copy_range(src, (200 << 10) - 1000, dst, 0, 5000)  # runs past the end of src
    got = dst.pread(300 << 10, 0)
    assert got[65536: 65536 + (100 << 10)] == src_data[4096: 4096 + (100 << 10)]
    assert got[:5000] == src_data[-1000:] + bytes(4000)
    assert got[5000:65536] == bytes(65536 - 5000)
    assert got[65536 + (100 << 10):] == bytes((300 << 10) - 65536 - (100 << 10))
    with pytest.raises(InvalidArgument):
        copy_range(src, 0, dst, (300 << 10) - 10, 100)
    src.close()
    dst.close()


# ---------------------------------------------------------------------------------------
# DirectFileDevice: alignment, read-modify-write, no page cache, the odd-sized last block

def drop_cache(path) -> None:
    """Write out and drop this host's cached pages of ``path``."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def cached_pages(path, offset: int, length: int) -> int:
    """How many pages of ``[offset, offset+length)`` of ``path`` are in this host's page
    cache: mincore(2) of a shared mapping, which looks without reading anything in (a
    RWF_NOWAIT read would start readahead)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    page = mmap.PAGESIZE
    start = offset - offset % page
    pages = -(-(offset + length - start) // page)
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, pages * page, mmap.PROT_READ, mmap.MAP_SHARED, fd, start)
        if addr is None or addr == ctypes.c_void_p(-1).value:
            raise OSError(ctypes.get_errno(), "mmap")
        try:
            vec = (ctypes.c_ubyte * pages)()
            if libc.mincore(addr, pages * page, vec) != 0:
                raise OSError(ctypes.get_errno(), "mincore")
            return sum(v & 1 for v in vec)
        finally:
            libc.munmap(addr, pages * page)
    finally:
        os.close(fd)


def direct_read(path, offset: int, length: int) -> bytes:
    """Read with a descriptor of our own opened O_DIRECT (another host's view of the
    device); ``offset`` and ``length`` aligned; short at the end of file."""
    buf = mmap.mmap(-1, length)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        n = os.preadv(fd, [buf], offset)
        return buf[:n]
    finally:
        os.close(fd)
        buf.close()


def direct_write(path, data: bytes, offset: int) -> None:
    """Write with a descriptor of our own opened O_DIRECT (another host writing the
    device); ``offset`` and ``len(data)`` aligned."""
    buf = mmap.mmap(-1, len(data))
    buf[:] = data
    fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
    try:
        assert os.pwrite(fd, buf, offset) == len(data)
    finally:
        os.close(fd)
        buf.close()


BOUNDARY_OFFSETS = [0, 1, 511, 512, ALIGN - 1, ALIGN, ALIGN + 1, 2 * ALIGN - 3, 3 * ALIGN + 100]
BOUNDARY_LENGTHS = [0, 1, 100, ALIGN - 1, ALIGN, ALIGN + 1, 2 * ALIGN, 3 * ALIGN + 7]


def test_direct_unaligned_writes_and_reads_at_block_boundaries(tmp_path):
    """Every offset near a block boundary with every length near a block size: each write
    lands exactly (neighbours untouched, read-modify-write keeps the rest of the block)
    and each read returns exactly the asked bytes."""
    size = 8 * ALIGN
    dev = DirectFileDevice(str(tmp_path / "dev.img"), create_size=size)
    model = bytearray(size)
    rng = random.Random(1)
    try:
        for off in BOUNDARY_OFFSETS:
            for n in BOUNDARY_LENGTHS:
                data = rng.randbytes(n)
                dev.pwrite(data, off)
                model[off: off + n] = data
                for roff in BOUNDARY_OFFSETS:
                    for rn in (1, ALIGN - 1, ALIGN + 1, 2 * ALIGN + 5):
                        assert dev.pread(rn, roff) == model[roff: roff + rn], (off, n, roff, rn)
        assert (tmp_path / "dev.img").read_bytes() == model
    finally:
        dev.close()


direct_offsets = st.one_of(st.integers(min_value=0),
                           st.integers(0, 800).map(lambda k: k * ALIGN),
                           st.integers(1, 800).map(lambda k: k * ALIGN - 1))
direct_ops = st.lists(
    st.tuples(st.sampled_from(["write", "pread", "preadinto"]), direct_offsets,
              st.one_of(st.integers(0, 3 * ALIGN), st.integers(0, DIRECT_PIECE + 3 * ALIGN)),
              st.integers(0, 2**32)),
    max_size=12,
)


@settings(max_examples=examples(40))
@given(st.sampled_from([2 * DIRECT_PIECE + 3 * ALIGN, 2 * DIRECT_PIECE + 5000, 5000]),
       direct_ops)
def test_direct_io_matches_a_bytes_model(size, ops):
    """Random writes and reads across block boundaries and 1 MiB pieces, on a file of a
    whole number of blocks and on files of odd size, against a bytearray; reads go past
    the end too; finally the file itself holds the model, at its own size."""
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR", "/tmp")) as d:
        path = Path(d) / "dev.img"
        dev = DirectFileDevice(str(path), create_size=size)
        model = bytearray(size)
        try:
            for kind, where, n, seed in ops:
                off = where % (size + 2 * ALIGN)
                if kind == "write":
                    off %= size
                    n = min(n, size - off)
                    data = random.Random(seed).randbytes(n)
                    dev.pwrite(data, off)
                    model[off: off + n] = data
                    continue
                want = bytes(model[off: off + n]).ljust(n, b"\0")
                if kind == "pread":
                    assert dev.pread(n, off) == want
                else:
                    buf = bytearray(b"\xee" * n)
                    dev.preadinto(memoryview(buf), off)
                    assert buf == want
        finally:
            dev.close()
        assert path.read_bytes() == model


def test_direct_large_io_from_several_threads(tmp_path):
    """Requests of several 1 MiB pieces from several threads at once, at unaligned
    offsets: each thread's bounce buffer is its own (a shared one mixes their data)."""
    span = 3 * DIRECT_PIECE + 4321
    threads = 4
    dev = DirectFileDevice(str(tmp_path / "big.img"), create_size=threads * (span + ALIGN))
    datas = [os.urandom(span) for _ in range(threads)]
    errors: list[BaseException] = []
    start = threading.Barrier(threads)

    def run(t: int) -> None:
        try:
            start.wait()
            off = t * (span + ALIGN) + 777
            for _ in range(5):
                dev.pwrite(datas[t], off)
                assert dev.pread(span, off) == datas[t]
                buf = bytearray(span)
                dev.preadinto(buf, off)
                assert buf == datas[t]
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    workers = [threading.Thread(target=run, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    try:
        assert not errors, errors
        for t in range(threads):
            assert dev.pread(span, t * (span + ALIGN) + 777) == datas[t]
    finally:
        dev.close()


@pytest.mark.parametrize("odd,one_device_each", [(False, False), (False, True), (True, False)])
def test_direct_concurrent_writes_inside_the_same_blocks_all_land(tmp_path, odd,
                                                                  one_device_each):
    """Threads write disjoint, interleaved byte ranges inside the same 4 KiB blocks,
    round after round: every range ends with its thread's last round (an unserialized
    read-modify-write puts back a neighbour's old bytes).  Also with a DirectFileDevice
    of its own per thread on the same file (one process: still serialized), and inside the
    partial last block of an odd-sized file."""
    size = 3 * ALIGN + (3000 if odd else ALIGN)
    lo, hi = (ALIGN - 1500, 3 * ALIGN + 1500) if not odd else (2 * ALIGN - 700, size)
    threads, rounds, width = 6, 12 if odd else 40, 37
    path = str(tmp_path / "dev.img")
    devs = [DirectFileDevice(path, create_size=size)]
    devs += [DirectFileDevice(path) for _ in range(threads - 1)] if one_device_each else []
    ranges = [lo + i * width for i in range((hi - lo) // width)]

    def fill(t: int, r: int) -> int:
        return 1 + (t * rounds + r) % 255

    errors: list[BaseException] = []
    start = threading.Barrier(threads)

    def run(t: int) -> None:
        dev = devs[t % len(devs)]
        try:
            start.wait()
            for r in range(rounds):
                for off in ranges[t::threads]:
                    dev.pwrite(bytes([fill(t, r)]) * width, off)
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    workers = [threading.Thread(target=run, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    try:
        assert not errors, errors
        got = devs[0].pread(size, 0)
        assert got == Path(path).read_bytes()
        lost = [off for i, off in enumerate(ranges)
                if got[off: off + width] != bytes([fill(i % threads, rounds - 1)]) * width]
        assert not lost, f"{len(lost)} of {len(ranges)} writes lost, first at byte {lost[0]}"
        assert got[:lo] == bytes(lo) and got[ranges[-1] + width:] == bytes(size - ranges[-1]
                                                                            - width)
    finally:
        for dev in devs:
            dev.close()


@pytest.mark.parametrize("cls", [FileDevice, DirectFileDevice])
def test_direct_io_leaves_nothing_in_the_page_cache(cls, tmp_path):
    """A DirectFileDevice's reads and writes (unaligned ones included) leave no page of
    the file in this host's page cache, and a write is on the device at once: another
    O_DIRECT descriptor (another host) reads it.  FileDevice shows the probe works: its
    pages are cached."""
    path = tmp_path / "dev.img"
    old = os.urandom(256 << 10)
    path.write_bytes(old)
    drop_cache(path)
    assert cached_pages(path, 0, 256 << 10) == 0
    dev = cls(str(path))
    try:
        data = os.urandom(10000)
        dev.pwrite(data, 3000)  # four blocks, the first and last read-modify-written
        assert dev.pread(20000, 100 << 10) == old[100 << 10: (100 << 10) + 20000]
        cached = cached_pages(path, 0, 256 << 10)
        if cls is FileDevice:
            assert cached > 0
        else:
            assert cached == 0
        assert direct_read(path, 0, 4 * ALIGN)[3000:13000] == data
    finally:
        dev.close()


def test_direct_read_sees_another_descriptors_write_not_a_cached_copy(tmp_path):
    """The page cache holds the old data (read through an ordinary descriptor) and the
    device has read it too; another O_DIRECT descriptor then writes: the device's next read
    returns the new data.  The other way, its write is read at once by another O_DIRECT
    descriptor."""
    path = tmp_path / "dev.img"
    path.write_bytes(b"A" * (64 << 10))
    dev = DirectFileDevice(str(path))
    try:
        with open(path, "rb") as f:
            assert f.read(ALIGN * 4)[5000:5004] == b"AAAA"  # now in the page cache
        assert dev.pread(100, 5000) == b"A" * 100
        direct_write(path, b"B" * ALIGN, ALIGN)
        assert dev.pread(100, 5000) == b"B" * 100
        assert dev.pread(10, ALIGN - 5) == b"AAAAABBBBB"
        dev.pwrite(b"C" * 10, 2 * ALIGN - 5)
        assert direct_read(path, ALIGN, 2 * ALIGN)[ALIGN - 10: ALIGN + 10] == (
            b"BBBBBCCCCCCCCCCAAAAA")
    finally:
        dev.close()


@FILE_CLASSES
def test_reads_past_the_end_of_an_odd_sized_file(cls, tmp_path):
    """A read reaching past the end of file returns the file's bytes then zeroes, at
    every alignment (O_DIRECT reads of whole blocks past the end come back short)."""
    path = tmp_path / "f"
    data = os.urandom(2 * ALIGN + 1000)
    path.write_bytes(data)
    dev = cls(str(path))
    try:
        end = len(data)
        assert dev.size == end
        assert dev.pread(100, end - 50) == data[-50:] + bytes(50)
        assert dev.pread(ALIGN, 2 * ALIGN) == data[2 * ALIGN:] + bytes(ALIGN - 1000)
        assert dev.pread(3 * ALIGN, 0) == data + bytes(3 * ALIGN - end)
        assert dev.pread(10, end) == bytes(10)
        assert dev.pread(ALIGN, 5 * ALIGN + 3) == bytes(ALIGN)
        buf = bytearray(b"\xff" * 3000)
        dev.preadinto(memoryview(buf), end - 1)
        assert buf == data[-1:] + bytes(2999)
        assert dev.pread(0, end + 5) == b""
    finally:
        dev.close()


@FILE_CLASSES
def test_strict_read_of_a_shrunk_file_is_eio(cls, tmp_path):
    """A strict device whose file shrank behind its back: a read reaching past the new end
    (but inside its size) is EIO, not zeroes; a lax one reads zeroes; reads before the new
    end and past the old size are unaffected."""
    path = tmp_path / "f"
    data = os.urandom(16 * ALIGN)
    path.write_bytes(data)
    strict = cls(str(path), strict=True)
    lax = cls(str(path))
    try:
        os.truncate(path, 2 * ALIGN + 100)
        assert strict.pread(100, 5000) == data[5000:5100]
        for read in (lambda: strict.pread(200, 2 * ALIGN),
                     lambda: strict.preadinto(bytearray(10), 5 * ALIGN + 1)):
            with pytest.raises(OSError) as e:
                read()
            assert e.value.errno == errno.EIO
        assert strict.pread(10, 16 * ALIGN) == bytes(10)  # past the recorded size
        assert lax.pread(200, 2 * ALIGN) == data[2 * ALIGN: 2 * ALIGN + 100] + bytes(100)
    finally:
        strict.close()
        lax.close()


@FILE_CLASSES
def test_write_into_a_file_shrunk_behind_our_back(cls, tmp_path):
    """The file shrank behind the device's back (its size is still the old one): a write
    past the new end extends the file again with zeroes before it, as any write past the
    end of a file does (a read-modify-write of a block past the end starts from zeroes,
    not from what the bounce buffer held)."""
    path = tmp_path / "f"
    data = os.urandom(8 * ALIGN)
    path.write_bytes(data)
    dev = cls(str(path))
    try:
        assert dev.pread(8 * ALIGN, 0) == data
        os.truncate(path, ALIGN + 100)
        dev.pwrite(b"new", 5 * ALIGN + 10)
        got = path.read_bytes()
        end = 5 * ALIGN + 13
        assert got[:end] == data[:ALIGN + 100] + bytes(4 * ALIGN - 90) + b"new"
        assert got[end:] == bytes(len(got) - end)  # DirectFileDevice: to the block's end
        assert dev.size == 8 * ALIGN
    finally:
        dev.close()


def test_direct_odd_sized_file_last_partial_block(tmp_path):
    """The partial last block of a file of odd size: writes into it (alone, or as the end
    of a longer write) land, the file is never extended to a whole block, no page is left
    cached, and the data is on the device; past the end is refused, and a read-only
    device refuses to write there too."""
    path = tmp_path / "odd.img"
    size = 3 * ALIGN + 1000
    model = bytearray(os.urandom(size))
    path.write_bytes(model)
    drop_cache(path)
    dev = DirectFileDevice(str(path))
    try:
        for off, n in [(3 * ALIGN, 1000), (3 * ALIGN - 10, 20), (size - 1, 1),
                       (2 * ALIGN + 5, ALIGN + 900), (3 * ALIGN + 7, 3), (0, size)]:
            data = os.urandom(n)
            dev.pwrite(data, off)
            model[off: off + n] = data
            assert dev.pread(size, 0) == model, (off, n)
        assert os.stat(path).st_size == size
        assert cached_pages(path, 0, size) == 0
        assert direct_read(path, 0, 4 * ALIGN) == model
        with pytest.raises(InvalidArgument):
            dev.pwrite(b"xx", size - 1)
    finally:
        dev.close()
    ro = DirectFileDevice(str(path), writable=False)
    try:
        with pytest.raises(OSError):
            ro.pwrite(b"x", size - 1)
        with pytest.raises(OSError):
            ro.pwrite(b"x", 5)
    finally:
        ro.close()
    assert path.read_bytes() == model


def test_direct_resize_grow_and_shrink_to_odd_sizes(tmp_path):
    """resize works on the O_DIRECT descriptor: grow to an odd size and write across into
    the new partial block, shrink (the cut part reads as zeroes after growing again)."""
    path = tmp_path / "dev.img"
    dev = DirectFileDevice(str(path), create_size=2 * ALIGN)
    try:
        dev.pwrite(b"a" * 10, ALIGN - 5)
        dev.resize(5 * ALIGN + 123)
        assert dev.size == os.stat(path).st_size == 5 * ALIGN + 123
        dev.pwrite(b"b" * 200, 5 * ALIGN - 77)
        assert dev.pread(300, 5 * ALIGN - 100) == bytes(23) + b"b" * 200 + bytes(77)
        dev.flush()
        dev.resize(ALIGN + 2)
        assert dev.pread(20, ALIGN - 5) == b"a" * 7 + bytes(13)
        dev.resize(2 * ALIGN)
        assert dev.pread(ALIGN, ALIGN) == b"aa" + bytes(ALIGN - 2)
        dev.pwrite(b"c" * 3, 2 * ALIGN - 3)
        assert os.stat(path).st_size == 2 * ALIGN
        assert path.read_bytes()[ALIGN - 5:] == b"a" * 7 + bytes(ALIGN - 5) + b"ccc"
    finally:
        dev.close()


def test_direct_discard_punches_whole_blocks_only(tmp_path):
    """discard frees the whole 4 KiB blocks of its range and leaves the partial ones
    alone (zeroing part of a block goes through the page cache)."""
    path = tmp_path / "dev.img"
    dev = DirectFileDevice(str(path), create_size=16 * ALIGN)
    try:
        dev.pwrite(b"\x55" * (16 * ALIGN), 0)
        dev.flush()
        blocks = os.stat(path).st_blocks
        dev.discard(ALIGN + 100, 4 * ALIGN)  # blocks 2, 3, 4 whole; parts of 1 and 5
        dev.discard(7 * ALIGN + 1, ALIGN)  # no whole block
        assert os.stat(path).st_blocks == blocks - 3 * ALIGN // 512
        assert dev.pread(ALIGN, ALIGN) == b"\x55" * ALIGN
        assert dev.pread(ALIGN, 5 * ALIGN) == b"\x55" * ALIGN
        assert dev.pread(3 * ALIGN, 2 * ALIGN) == bytes(3 * ALIGN)
        assert dev.pread(9 * ALIGN, 6 * ALIGN) == b"\x55" * (9 * ALIGN)
        assert cached_pages(path, 0, 16 * ALIGN) == 0
    finally:
        dev.close()


def test_copy_range_between_direct_devices_uses_no_page_cache(tmp_path):
    """copy_range between DirectFileDevices copies with their own aligned reads and
    writes (not copy_file_range, whose copy may go through the page cache): aligned and
    unaligned ranges arrive, and neither file has a page cached."""
    src_path, dst_path = tmp_path / "src", tmp_path / "dst"
    src_data = os.urandom(3 << 20)
    src_path.write_bytes(src_data)
    dst_path.write_bytes(bytes(4 << 20))
    drop_cache(src_path)
    drop_cache(dst_path)
    src, dst = DirectFileDevice(str(src_path)), DirectFileDevice(str(dst_path))
    try:
        copy_range(src, ALIGN, dst, 2 * ALIGN, 2 << 20)
        copy_range(src, 1001, dst, (3 << 20) + 77, 200000)
        copy_range(src, (3 << 20) - 10, dst, (4 << 20) - 20, 20)  # past the end of src
        got = dst.pread(4 << 20, 0)
        assert got[2 * ALIGN: 2 * ALIGN + (2 << 20)] == src_data[ALIGN: ALIGN + (2 << 20)]
        assert got[(3 << 20) + 77: (3 << 20) + 200077] == src_data[1001: 201001]
        assert got[-20:] == src_data[-10:] + bytes(10)
        assert cached_pages(src_path, 0, 3 << 20) == 0
        assert cached_pages(dst_path, 0, 4 << 20) == 0
    finally:
        src.close()
        dst.close()


def test_copy_range_into_a_direct_device_is_serialized_with_its_writes(tmp_path):
    """While copy_range copies 2 MiB into a DirectFileDevice, another thread keeps writing
    8 bytes inside some of those blocks (read-modify-writes).  Either order is fine, but
    every byte of those blocks outside the 8 must end as the copy's: a read-modify-write
    that read a block before the copy landed and wrote it back after would put zeroes
    there (as a copy_file_range, which knows nothing of the device's serialization, does
    in about one round of three to ten)."""
    blocks = 512
    hot = [1, 100, 200, 300, 400, blocks - 1]
    src_data = os.urandom(blocks * ALIGN)
    (tmp_path / "src").write_bytes(src_data)
    src = DirectFileDevice(str(tmp_path / "src"))
    dst = DirectFileDevice(str(tmp_path / "dst"), create_size=blocks * ALIGN)
    errors: list[BaseException] = []

    def copy(start: threading.Barrier, copied: threading.Event) -> None:
        try:
            start.wait()
            copy_range(src, 0, dst, 0, blocks * ALIGN)
        except BaseException as e:  # reported by the main thread
            errors.append(e)
        finally:
            copied.set()

    def poke(start: threading.Barrier, copied: threading.Event) -> None:
        try:
            start.wait()
            while not copied.is_set():
                for k in hot:
                    dst.pwrite(b"\x01" * 8, k * ALIGN + 100)
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    try:
        for _ in range(50):
            dst.pwrite(bytes(blocks * ALIGN), 0)
            run = (threading.Barrier(2), threading.Event())
            workers = [threading.Thread(target=f, args=run) for f in (copy, poke)]
            for w in workers:
                w.start()
            for w in workers:
                w.join()
            assert not errors, errors
            got = dst.pread(blocks * ALIGN, 0)
            for k in hot:
                at = k * ALIGN
                assert got[at: at + 100] == src_data[at: at + 100], k
                assert got[at + 100: at + 108] in (b"\x01" * 8, src_data[at + 100: at + 108])
                assert got[at + 108: at + ALIGN] == src_data[at + 108: at + ALIGN], k
    finally:
        src.close()
        dst.close()


def test_direct_preadinto_takes_any_buffer_shape(tmp_path):
    """preadinto fills a memoryview of another item size (as FileDevice's preadv does)."""
    dev = DirectFileDevice(str(tmp_path / "dev.img"), create_size=4 * ALIGN)
    try:
        dev.pwrite(array.array("I", [1, 2, 3]), 10)
        out = array.array("I", [0] * 4)
        dev.preadinto(memoryview(out), 10)
        assert list(out) == [1, 2, 3, 0]
    finally:
        dev.close()


# --- as root: a filesystem refusing O_DIRECT, and one disk seen through two page caches


def _need_root_with(*tools: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    for t in tools:
        need(t)


@pytest.mark.root
def test_direct_device_on_a_filesystem_without_o_direct(tmp_path):
    """ramfs refuses O_DIRECT: a clear InvalidArgument naming the path and why, and a file
    the call created is not left behind (an existing one is kept)."""
    _need_root_with("mount", "umount")
    mnt = tmp_path / "ram"
    mnt.mkdir()
    tool("mount", "-t", "ramfs", "ramfs", mnt)
    try:
        with pytest.raises(InvalidArgument) as e:
            DirectFileDevice(str(mnt / "new.img"), create_size=8192, what="origin")
        assert str(mnt / "new.img") in str(e.value) and "O_DIRECT" in str(e.value)
        assert "shared between hosts" in str(e.value)
        assert not (mnt / "new.img").exists()
        (mnt / "old.img").write_bytes(b"x" * 8192)
        with pytest.raises(InvalidArgument):
            DirectFileDevice(str(mnt / "old.img"))
        assert (mnt / "old.img").read_bytes() == b"x" * 8192
        FileDevice(str(mnt / "old.img")).close()  # buffered I/O works there
    finally:
        tool("umount", "--lazy", mnt)  # even if a failed check left a file open there


@pytest.mark.root
def test_direct_device_is_coherent_across_two_page_caches(tmp_path):
    """A loop device over a file is one disk behind two page caches (the loop device's and
    the file's), as a LUN is seen by two hosts.  The file, written and read with O_DIRECT,
    is the other host.  A buffered FileDevice on the loop device reads its stale cached
    page and keeps its write to itself; a DirectFileDevice reads the other host's write
    and its own write is read by the other host at once.  The device is 1 MiB + 512
    bytes: in its partial last block a write keeps the other host's newer bytes though
    this host had the block cached."""
    _need_root_with("losetup")
    if not os.path.exists("/dev/loop-control"):
        pytest.skip("no /dev/loop-control here")
    backing = tmp_path / "lun.img"
    backing.write_bytes(b"A" * (1 << 20) + b"T" * 512)
    with loop_device(backing) as lun:
        buffered, direct = FileDevice(lun), DirectFileDevice(lun)
        try:
            assert direct.is_block and direct.size == (1 << 20) + 512
            assert buffered.pread(4, 8192) == b"AAAA"  # now in this host's cache
            direct_write(backing, b"B" * ALIGN, 8192)  # the other host writes
            assert buffered.pread(4, 8192) == b"AAAA"  # stale: the setup is incoherent
            assert direct.pread(6, 8190) == b"AABBBB"

            direct.pwrite(b"c" * 100, 20000)
            assert direct_read(backing, 16384, ALIGN)[3616:3716] == b"c" * 100
            buffered.pwrite(b"d" * 100, 40000)
            assert direct_read(backing, 36864, ALIGN)[3136:3236] == b"A" * 100

            tail = 1 << 20
            assert buffered.pread(512, tail) == b"T" * 512  # cached here
            direct_write(backing, b"O" * 256 + b"T" * 256, tail)
            direct.pwrite(b"x" * 10, tail + 400)
            want = b"O" * 256 + b"T" * 144 + b"x" * 10 + b"T" * 102
            assert direct.pread(600, tail - 88) == b"A" * 88 + want
            assert direct_read(backing, tail, ALIGN) == want
        finally:
            buffered.close()
            direct.close()
