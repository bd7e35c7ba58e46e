"""Fencing a cluster's metadata server in the store (issue 12, docs/format.md "Cluster
epoch"): every journal transaction records the election epoch of the server that wrote
it; a server claiming an epoch stakes it in both superblock slots; a server whose epoch
is older than one on the device refuses to commit or checkpoint; recovery and ``check``
refuse a journal in which an older epoch follows a newer one (split brain); and the
devices of a fenced server refuse every write once their fence says no."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from ddsnap import admin
from ddsnap.errors import CorruptMetadata, Fenced, StaleEpoch
from ddsnap.store.blockdev import FencedDevice, FileDevice, MemoryDevice
from ddsnap.store.format import (
    BLOCK_SIZE,
    COMMIT_COPY,
    CommitRecord,
    decode_commit,
    encode_commit,
)
from ddsnap.store.shared import SharedStore
from ddsnap.store.superblock import read_superblock
from served import MiB, make_origin, ok

UUID = bytes(range(16))


def test_the_commit_record_carries_the_epoch_at_byte_104_of_each_copy():
    from ddsnap.store.model import State

    rec = CommitRecord(7, 100, 3, State(), epoch=0x0102030405060708)
    buf = encode_commit(rec, 42, UUID)
    for copy in (0, 1):
        assert struct.unpack_from("<Q", buf, copy * COMMIT_COPY + 104)[0] == rec.epoch
    back, bad = decode_commit(bytes(buf), 42, UUID)
    assert bad == [] and back == rec


def file_store(tmp_path: Path, name: str = "store.img") -> FileDevice:
    dev = FileDevice(str(tmp_path / name), create_size=4 * MiB)
    SharedStore.create(dev, origin_size=MiB, origin_path="origin.img", chunk_size=4096)
    return dev


def reopen(tmp_path: Path, name: str = "store.img") -> SharedStore:
    return SharedStore.open(FileDevice(str(tmp_path / name)))


def test_a_claimed_epoch_is_recorded_in_both_superblocks_and_every_transaction(tmp_path):
    dev = file_store(tmp_path)
    store = SharedStore.open(dev)
    assert store.epoch == 0
    store.claim_epoch(5)
    for slot in (0, 1):
        raw = dev.pread(BLOCK_SIZE, slot * BLOCK_SIZE)
        assert struct.unpack_from("<Q", raw, 4000)[0] == 5
    store.create_snapshot("s1")
    store.commit()
    (tx,) = store.journal.scan().transactions
    assert tx.epoch == 5
    again = reopen(tmp_path)  # (a crash: nothing closed; recovery replays the journal)
    assert again.epoch == 5 and read_superblock(again.dev).epoch == 5
    assert [s.name for s in again.snapshots()] == ["s1"]


def test_an_older_epoch_is_refused_at_claim(tmp_path):
    dev = file_store(tmp_path)
    SharedStore.open(dev).claim_epoch(9)
    with pytest.raises(StaleEpoch, match="epoch 9; this server's epoch 4 is older"):
        reopen(tmp_path).claim_epoch(4)
    assert isinstance(StaleEpoch("x"), Fenced) and StaleEpoch("x").exit_code == 30


def test_a_server_superseded_by_a_newer_epoch_commits_nothing(tmp_path):
    old = SharedStore.open(file_store(tmp_path))
    old.claim_epoch(3)
    old.create_snapshot("before")
    old.commit()
    new = reopen(tmp_path)  # a failover: the standby recovers the same device
    new.claim_epoch(4)
    old.create_snapshot("stale")  # the old server wakes up and goes on
    with pytest.raises(StaleEpoch, match="records cluster epoch 4"):
        old.commit()
    with pytest.raises(StaleEpoch):
        old.write_superblock(clean=False)
    # the device holds what the new server holds: no "stale"
    assert [s.name for s in reopen(tmp_path).snapshots()] == ["before"]


def test_recovery_and_check_refuse_an_older_epoch_after_a_newer_one(tmp_path):
    origin = tmp_path / "origin.img"
    make_origin(origin, MiB, seed=1)
    ok("init", tmp_path / "store.img", "--origin", origin, "--size", "4M",
       "--chunk-size", "4K")
    first = reopen(tmp_path)
    first.claim_epoch(2)
    new = reopen(tmp_path)
    new.claim_epoch(6)
    new.create_snapshot("new")
    new.commit()
    # The old server, paused between its check and its write, writes a transaction of
    # its epoch after the new server's, where its own journal head is (over the new
    # server's transaction): what a stale server could still do.
    first.create_snapshot("stale")
    batch = first.begin_commit()
    assert batch is not None
    first.journal.commit(batch.tx)
    with pytest.raises(CorruptMetadata, match=r"cluster epoch 2 after one of epoch 6 had "
                                              r"written the store.*split brain"):
        reopen(tmp_path)
    report = admin.inspect_store(str(tmp_path / "store.img"))
    fatal = [f for f in report["findings"] if f["severity"] == "fatal"]
    assert any("split brain" in f["message"] for f in fatal), report


def test_a_fenced_device_writes_nothing_once_its_fence_says_no():
    inner = MemoryDevice(8192)
    allowed = [True]

    def fence() -> None:
        if not allowed[0]:
            raise Fenced("lease over")

    dev = FencedDevice(inner, fence)
    dev.pwrite(b"a" * 10, 0)
    allowed[0] = False
    for write in (lambda: dev.pwrite(b"b" * 10, 0), lambda: dev.pwrite_cached(b"b", 0),
                  dev.flush, lambda: dev.discard(0, 4096), lambda: dev.resize(4096)):
        with pytest.raises(Fenced):
            write()
    assert dev.pread(10, 0) == b"a" * 10 and dev.size == 8192  # reads go on
    assert inner.flushes == 0


def test_a_fenced_server_stops_writing_the_store_and_origin(tmp_path):
    origin = tmp_path / "origin.img"
    data = make_origin(origin, MiB, seed=2)
    store_path = tmp_path / "store.img"
    ok("init", store_path, "--origin", origin, "--size", "4M", "--chunk-size", "4K")
    allowed = [True]

    def fence() -> None:
        if not allowed[0]:
            raise Fenced("lease over")

    opened = admin.open_store(str(store_path), fence=fence, epoch=7)
    svc = opened.service
    info = svc.create_snapshot("s1")
    assert info.name == "s1"
    allowed[0] = False  # the lease is over
    with pytest.raises(Fenced):
        svc.data.origin.pwrite(b"x" * 4096, 0)
    with pytest.raises(Fenced):
        svc.prepare_origin_write(0, 0)  # a copy-out would write the store
    assert origin.read_bytes() == data
    before = store_path.read_bytes()
    with pytest.raises(Fenced):
        opened.close()
    assert store_path.read_bytes() == before
    assert [s.name for s in reopen(tmp_path).snapshots()] == ["s1"]
