"""Crash-test devices: a memory device that records every write, flush and resize, and
the clock that makes several of them crash together.

:class:`RecordingDevice` remembers the writes since its last flush and can produce the
device images a crash could leave behind; it carries the crash tests (DESIGN.md
invariants 2 and 3).  It is for tests and the benchmark, not for serving; it lives
outside ``ddsnap.store`` so production code cannot come to depend on it.
"""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass

from ..errors import InvalidArgument
from ..store.blockdev import BlockDevice


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

    def __init__(self, size: int, data: bytes | bytearray | memoryview | None = None,
                 path: str = "<recording>",
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
        self.check_write(len(data), offset)
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
        keep = ops if mode == "all" else [op for op in ops if rng.random() < 0.5]
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
