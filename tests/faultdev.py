"""A fault-injecting block device for the host-fault tests (issue 8).

:class:`FaultDevice` wraps a real device (a :class:`~ddsnap.store.blockdev.MemoryDevice`
or :class:`~ddsnap.store.blockdev.FileDevice`) and passes every read, write and flush
through to it, except the ones it is told to fail: those raise ``OSError(errno)`` the way
the host does (ENOSPC from a full file system, EIO from a failing disk) and do not reach
the device.  It counts the operations of each kind, so a test can first run an operation
cleanly to learn how many reads, writes and flushes it does, then run it again failing
each one in turn.

It is test code only: production code never sees it except through the BlockDevice
interface.
"""

from __future__ import annotations

import errno as _errno
import os
import threading
from collections import Counter

from ddsnap.store.blockdev import BlockDevice

KINDS = ("read", "write", "flush")


class FaultDevice(BlockDevice):
    """``inner`` with injected host errors.

    Two ways to fail operations of a ``kind`` ("read", "write" or "flush"):

    * :meth:`fail_nth`: only the ``n``-th operation of that kind from now (counting from
      1) fails, once;
    * :meth:`fail_while`: every operation of that kind fails until :meth:`clear`.

    Attributes:
        counts: operations of each kind seen so far (failed ones included).
        injected: how many operations were failed.
    """

    def __init__(self, inner: BlockDevice, path: str | None = None):
        self.inner = inner
        self.size = inner.size
        self.path = path or inner.path
        self.counts: Counter[str] = Counter()
        self.injected = 0
        self._nth: dict[str, tuple[int, int]] = {}  # kind -> (op number, errno)
        self._always: dict[str, int] = {}  # kind -> errno
        self._gate: threading.Event | None = None
        #: set when an operation armed with a gate has been reached
        self.reached = threading.Event()
        self._lock = threading.Lock()

    # -- arming ---------------------------------------------------------------------------

    def fail_nth(self, kind: str, n: int, err: int = _errno.EIO,
                 gate: threading.Event | None = None) -> None:
        """Fail the ``n``-th ``kind`` operation from now (n >= 1) with ``err``, once.

        With ``gate``, that operation first sets :attr:`reached` and waits for ``gate``
        to be set (a slow failing disk: other threads go on meanwhile)."""
        assert kind in KINDS and n >= 1
        with self._lock:
            self._nth[kind] = (self.counts[kind] + n, err)
            self._gate = gate

    def fail_while(self, kind: str, err: int = _errno.ENOSPC) -> None:
        """Fail every ``kind`` operation with ``err`` until :meth:`clear`."""
        assert kind in KINDS
        with self._lock:
            self._always[kind] = err

    def clear(self) -> None:
        """No more injected errors."""
        with self._lock:
            self._nth.clear()
            self._always.clear()

    @property
    def armed(self) -> bool:
        """True while an armed :meth:`fail_nth` has not fired yet."""
        return bool(self._nth)

    def _op(self, kind: str) -> None:
        with self._lock:
            self.counts[kind] += 1
            err = self._always.get(kind)
            nth = self._nth.get(kind)
            gate = None
            if err is None and nth is not None and nth[0] == self.counts[kind]:
                err = nth[1]
                del self._nth[kind]
                gate, self._gate = self._gate, None
            if err is None:
                return
            self.injected += 1
        if gate is not None:
            self.reached.set()
            gate.wait()
        raise OSError(err, os.strerror(err))

    # -- the device -----------------------------------------------------------------------

    def pread(self, length: int, offset: int) -> bytes:
        self._op("read")
        return self.inner.pread(length, offset)

    def preadinto(self, buf, offset: int) -> None:
        self._op("read")
        self.inner.preadinto(buf, offset)

    def pwrite(self, data, offset: int) -> None:
        self.check_write(len(data), offset)
        self._op("write")
        self.inner.pwrite(data, offset)

    def flush(self) -> None:
        self._op("flush")
        self.inner.flush()

    def discard(self, offset: int, length: int) -> None:
        self.inner.discard(offset, length)

    def close(self) -> None:
        self.inner.close()
