"""Crash tests of receive (issue 13): a power cut at every write and flush of the
receiving store and its origin while an incremental stream is applied.

The receiving store and its origin are RecordingDevices sharing one CrashClock.  They
hold s1 (received whole and flushed); then the incremental stream s1 -> s2 is received,
in records of one chunk, its progress recorded every two chunks.  For every crash point
of that receive (evenly spread, all modes: writes since the last flush dropped, a subset
of them landed, one of those torn) the images are opened (``SharedStore.open`` +
``LocalService``) and must show:

* ``check()`` with nothing fatal, and s1 reading exactly as sent;
* either no receive recorded, with the origin still reading as s1 (nothing is written
  before the record), or a receive in progress, which then resumes (from the whole
  stream, with the token ``status`` would print) and ends with s2 and the origin reading
  exactly as sent, or the receive completed, with the same result;
* in every case, a receive of the same stream afterwards (resumed or new) completes it.
"""

from __future__ import annotations

import io
import random

import pytest

from ddsnap import sendrecv
from ddsnap.errors import ReceiveRefused
from ddsnap.service.local import LocalService
from ddsnap.store.blockdev import MemoryDevice
from ddsnap.store.shared import SharedStore
from ddsnap.stream import make_token
from ddsnap.testing.crash import CrashClock, RecordingDevice
from ddsnap.volume import Origin, Snapshot
from test_store_crash import MODES, crash_points

CS = 4096
SIZE = 24 * CS
STORE = 2 << 20


@pytest.fixture(autouse=True)
def small_steps(monkeypatch):
    """Records of one chunk and the progress recorded every two (1 MiB and 64 MiB by
    default), so that a small volume crosses many records and saves."""
    monkeypatch.setattr(sendrecv, "RECORD_MAX", CS)
    monkeypatch.setattr(sendrecv, "SAVE_EVERY", 2 * CS)


def read_all(svc: LocalService, name: str | None) -> bytes:
    if name is None:
        return Origin(svc, svc.data).read(0, svc.origin_size)
    info = svc.snapshot(name)
    return Snapshot(svc, svc.data, info).read(0, info.size)


def source() -> tuple[bytes, bytes, bytes, bytes]:
    """Streams of s1 (whole) and s1 -> s2, and the bytes of s1 and s2: s2 has rewritten
    chunks, zeroed chunks and a partly written one."""
    rng = random.Random(5)
    origin = MemoryDevice(SIZE, rng.randbytes(SIZE))
    svc = LocalService(SharedStore.create(MemoryDevice(STORE), origin_size=SIZE,
                                          origin_path="o", chunk_size=CS), origin)
    svc.create_snapshot("s1", read_only=True)
    vol = Origin(svc, svc.data)
    for c in (1, 2, 3, 9, 15, 16, 22):
        vol.write(c * CS, rng.randbytes(CS))
    vol.write(5 * CS, bytes(3 * CS))
    vol.write(12 * CS + 100, b"\xaa" * 300)
    svc.create_snapshot("s2", read_only=True)
    streams = []
    for name, base in (("s1", None), ("s2", "s1")):
        out = io.BytesIO()
        sendrecv.send(svc, name, out, base)
        streams.append(out.getvalue())
    return streams[0], streams[1], read_all(svc, "s1"), read_all(svc, "s2")


def test_a_crash_anywhere_in_a_receive_is_resumable_or_not_begun():
    full, inc, want1, want2 = source()
    clock = CrashClock()
    store_dev = RecordingDevice(STORE, path="store", clock=clock)
    origin_dev = RecordingDevice(SIZE, path="origin", clock=clock)
    svc = LocalService(SharedStore.create(store_dev, origin_size=SIZE, origin_path="o",
                                          chunk_size=CS), origin_dev)
    sendrecv.receive(svc, "dst", io.BytesIO(full))
    svc.commit()
    store_dev.flush()
    origin_dev.flush()
    start = clock.ops
    seen = {"not begun": 0, "in progress": 0, "done": 0}
    checked: list[tuple[int, str, bytearray, bytearray]] = []

    def observe(n: int, what: str, path: str) -> None:
        if n > start:
            for mode in MODES:
                rng = random.Random(n)
                checked.append((n, mode, store_dev.crash_image(rng, mode),
                                origin_dev.crash_image(rng, mode)))

    clock.observer = observe
    sendrecv.receive(svc, "dst", io.BytesIO(inc))
    clock.observer = None
    assert read_all(svc, "s2") == want2
    points = set(crash_points(clock.ops - start, 40))
    for n, mode, store_img, origin_img in checked:
        if n - start not in points:
            continue
        what = f"crash at operation {n - start} ({mode})"
        dev = MemoryDevice(STORE, store_img)
        after = LocalService(SharedStore.open(dev), MemoryDevice(SIZE, origin_img))
        assert not [f for f in after.store.check() if f.severity == "fatal"], what
        assert read_all(after, "s1") == want1, what
        receiving, received = after.store.receive_state()
        names = {s.name for s in after.snapshots()}
        if receiving is None and "s2" not in names:
            seen["not begun"] += 1
            assert read_all(after, None) == want1, what
            sendrecv.receive(after, "dst", io.BytesIO(inc))
        elif receiving is not None:
            seen["in progress"] += 1
            token = make_token(receiving.source, receiving.snapshot, receiving.base,
                               receiving.offset)
            with pytest.raises(ReceiveRefused, match="--resume"):
                sendrecv.receive(after, "dst", io.BytesIO(inc))
            sendrecv.receive(after, "dst", io.BytesIO(inc), token)
        else:
            seen["done"] += 1
            assert received is not None and received.snapshot == 2, what
        assert read_all(after, "s2") == want2, what
        assert read_all(after, None) == want2, what
        assert after.store.receive_state()[0] is None, what
    assert all(seen.values()), seen
