"""``ddsnap upgrade``: real format-v1 stores, made by ddsnap 0.1 (commit 6d51d5d) and kept
in ``tests/data``, converted to format v2 and read back.

Both stores were made by the 0.1 code with a 64-chunk origin of 4 KiB chunks (seeded
random bytes) and the same workload: write chunks 0-2 ("A"), snapshot ``s1``, write
chunks 1-5 ("B"), snapshot ``s2``, write chunks 2-21 ("C"), write chunks 30-31 of ``s2``
("D"), commit; ``v1-clean`` was then closed cleanly, ``v1-unclean`` was not (its last
transactions are only in the v1 journal).
"""

from __future__ import annotations

import gzip
import random
from pathlib import Path

import pytest

from ddsnap.errors import DdsnapError, FormatTooOld
from ddsnap.store.blockdev import CrashClock, CrashNow, FileDevice, MemoryDevice, RecordingDevice
from ddsnap.store.format import VERSION, header_version
from ddsnap.store.service import MetadataService
from ddsnap.store.shared import SharedStore
from ddsnap.store.upgrade import upgrade_store
from ddsnap.volume import Origin, Snapshot
from served import fails, ok

DATA = Path(__file__).parent / "data"
CS = 4096


def expected() -> dict[str, bytes]:
    """What the workload left: the origin and each snapshot."""
    base = bytearray(random.Random(8).randbytes(64 * CS))
    base[0:3 * CS] = b"A" * 3 * CS
    s1 = bytes(base)
    base[CS:6 * CS] = b"B" * 5 * CS
    s2 = bytearray(base)
    s2[30 * CS:32 * CS] = b"D" * 2 * CS
    base[2 * CS:22 * CS] = b"C" * 20 * CS
    return {"origin": bytes(base), "s1": s1, "s2": bytes(s2)}


def v1_image(name: str) -> bytes:
    with gzip.open(DATA / f"v1-{name}.img.gz") as f:
        return f.read()


@pytest.mark.parametrize("name", ["clean", "unclean"])
def test_upgrade_keeps_every_snapshot(name):
    dev = MemoryDevice(1 << 20, v1_image(name))
    with pytest.raises(FormatTooOld):
        SharedStore.open(dev)
    n = upgrade_store(dev)
    assert n >= 4
    assert header_version(dev.pread(4096, 0)) == VERSION
    assert header_version(dev.pread(4096, 4096)) == VERSION
    want = expected()
    svc = MetadataService(SharedStore.open(dev), MemoryDevice(64 * CS, want["origin"]))
    assert [s.name for s in svc.snapshots()] == ["s1", "s2"]
    for s in ("s1", "s2"):
        assert Snapshot(svc, svc.snapshot(s)).read(0, 64 * CS) == want[s], s
    assert svc.store.check() == []
    # ... and it works as a v2 store from then on.
    Origin(svc).write(40 * CS, b"E" * CS)
    svc.close()
    again = SharedStore.open(dev)
    assert again.check() == []


@pytest.mark.parametrize("mode", ["drop", "all"])
def test_upgrade_interrupted_at_every_write_and_flush_finishes_on_a_second_run(mode):
    """A crash at each write and flush of the upgrade, then ``upgrade`` again: the store
    ends up v2 with every snapshot intact."""
    image = v1_image("unclean")
    want = expected()
    k = 0
    while True:
        k += 1
        dev = RecordingDevice(1 << 20, image, clock=CrashClock(crash_after=k))
        try:
            upgrade_store(dev)
            break  # no crash point left
        except CrashNow:
            pass
        after = MemoryDevice(1 << 20, dev.crash_image(mode=mode))
        try:
            upgrade_store(after)
        except DdsnapError as e:  # the crash came after the upgrade was complete
            assert "already format v2" in str(e), (k, e)
        svc = MetadataService(SharedStore.open(after), MemoryDevice(64 * CS, want["origin"]))
        for s in ("s1", "s2"):
            assert Snapshot(svc, svc.snapshot(s)).read(0, 64 * CS) == want[s], (k, s)
    assert k > 5


def test_cli_refuses_v1_and_upgrades(tmp_path):
    store = tmp_path / "old.img"
    store.write_bytes(v1_image("clean"))
    fails(21, "status", store, match=r"format-v1 ddsnap store.*ddsnap upgrade")
    p = ok("upgrade", store)
    assert "upgraded" in p.stdout
    fails(1, "upgrade", store, match="already format v2")
    # The recorded origin does not exist here: the store is v2 and says so.
    fails(10, "status", store, match="does not exist")
    dev = FileDevice(str(store), writable=False)
    try:
        assert header_version(dev.pread(4096, 0)) == VERSION
    finally:
        dev.close()
