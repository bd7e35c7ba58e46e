"""Block devices: the common contract of FileDevice, MemoryDevice and RecordingDevice, the
file-specific behaviour, and RecordingDevice's crash model (crash points, a clock shared
by devices that lose power together, and the images a crash can leave)."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import examples
from ddsnap.errors import InvalidArgument, StoreNotFound
from ddsnap.store.blockdev import FileDevice, MemoryDevice, copy_range
from ddsnap.testing.crash import CrashClock, CrashNow, RecordingDevice

SIZE = 64 << 10


@pytest.fixture(params=["memory", "file", "recording"])
def device(request, tmp_path):
    """A fresh, zero-filled SIZE-byte device of each kind."""
    if request.param == "memory":
        yield MemoryDevice(SIZE)
    elif request.param == "recording":
        yield RecordingDevice(SIZE)
    else:
        dev = FileDevice(str(tmp_path / "dev.img"), create_size=SIZE)
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
# FileDevice specifics

def test_file_device_creates_a_sparse_file_and_reopens(tmp_path):
    path = tmp_path / "store.img"
    dev = FileDevice(str(path), create_size=1 << 30)
    try:
        assert dev.size == 1 << 30 and not dev.is_block
        assert os.stat(path).st_blocks * 512 < 1 << 20  # sparse, not written out
        dev.pwrite(b"data", (1 << 30) - 4)
        dev.flush()
    finally:
        dev.close()
    # create_size is ignored for an existing file; content persists.
    dev = FileDevice(str(path), create_size=4096)
    try:
        assert dev.size == 1 << 30
        assert dev.pread(4, (1 << 30) - 4) == b"data"
    finally:
        dev.close()


def test_file_device_short_file_reads_as_zeroes(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"abc")
    dev = FileDevice(str(path))
    try:
        assert dev.size == 3
        assert dev.pread(6, 1) == b"bc\0\0\0\0"
        buf = bytearray(b"\xff" * 5)
        dev.preadinto(buf, 0)
        assert bytes(buf) == b"abc\0\0"
    finally:
        dev.close()


def test_file_device_missing_path(tmp_path):
    with pytest.raises(StoreNotFound) as e:
        FileDevice(str(tmp_path / "nope"))
    assert str(tmp_path / "nope") in str(e.value)


def test_file_device_refuses_directories_and_fifos(tmp_path):
    with pytest.raises(InvalidArgument):
        FileDevice(str(tmp_path))
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # so opening for writing does not block
    try:
        with pytest.raises(InvalidArgument):
            FileDevice(str(fifo))
    finally:
        os.close(fd)


def test_file_device_read_only(tmp_path):
    path = tmp_path / "ro"
    path.write_bytes(b"q" * 4096)
    dev = FileDevice(str(path), writable=False)
    try:
        assert dev.pread(4, 0) == b"qqqq"
        with pytest.raises(OSError):
            dev.pwrite(b"x", 0)
    finally:
        dev.close()
    assert path.read_bytes() == b"q" * 4096


def test_file_device_exclusive_lock(tmp_path):
    path = str(tmp_path / "locked")
    a = FileDevice(path, create_size=8192)
    b = FileDevice(path)
    try:
        assert a.lock_exclusive()
        assert not b.lock_exclusive()
        a.close()
        assert b.lock_exclusive()
    finally:
        a.close()
        b.close()


def test_file_device_discard_of_a_written_range(tmp_path):
    dev = FileDevice(str(tmp_path / "d"), create_size=1 << 20)
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
    returns it; a device that cannot tell would answer False, never wrong bytes."""
    data = os.urandom(3 * 4096)
    device.pwrite(data, 4096)
    buf = bytearray(len(data))
    assert device.preadinto_nowait(memoryview(buf), 4096) is True
    assert bytes(buf) == data


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
                                   ("recording", "recording")])
def test_copy_range_between_devices(tmp_path, kinds):
    """copy_range copies a range between two devices of any kinds (in the kernel between
    two files); a source range past its end reads as zeroes; the destination is checked."""
    def make(kind, name, data):
        if kind == "file":
            path = tmp_path / name
            path.write_bytes(data)
            return FileDevice(str(path))
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
