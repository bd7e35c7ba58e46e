"""``ddsnap upgrade``: real format-v1 and format-v2 stores, made by ddsnap 0.1 and 0.2 and
kept in ``tests/data``, converted to format v3 and read back.

``v1-clean`` and ``v1-unclean`` were made by the 0.1 code (commit 6d51d5d): a 1 MiB store
of 4 KiB chunks, 64 snapshot slots and a 64-block journal, for a 64-chunk origin
(seeded random bytes, ``random.Random(8)``) recorded as ``/nonexistent/origin.img``, and
the workload: write chunks 0-2 ("A"), snapshot ``s1``, write chunks 1-5 ("B"), snapshot
``s2``, write chunks 2-21 ("C"), write chunks 30-31 of ``s2`` ("D"), commit;
``v1-clean`` was then closed cleanly, ``v1-unclean`` was not (its last transactions are
only in the v1 journal).

``v2-clean`` and ``v2-unclean`` were made by the 0.2 code (commit 4f0e466) with
``tests/data/make_v2_images.py`` (its docstring says how to run it): the same geometry
and the same workload, then snapshots ``s3``-``s5``, origin writes, snapshot writes that
unshare one chunk inside a range several snapshots share, and a merge of ``s2`` into the
origin (kept and complete in ``v2-clean``; in progress, with ``s5`` being deleted, in
``v2-unclean``, whose last transaction is only in the v2 journal).  The merge is what
makes the conversion copy chunks: ``s2`` then reads the origin where older and newer
snapshots read copy-outs.  :func:`make_v2_images.expected` is the model both the script
and these tests read the stores against.
"""

from __future__ import annotations

import gzip
import importlib.util
import random
from pathlib import Path

import pytest

from ddsnap.errors import DdsnapError, FormatTooOld, OriginMismatch, StoreFull
from ddsnap.service.local import LocalService
from ddsnap.store import upgrade as upgrade_mod
from ddsnap.store.blockdev import FileDevice, MemoryDevice
from ddsnap.store.format import BLOCK_SIZE, VERSION, VERSION_V2, header_version
from ddsnap.store.journal import Journal
from ddsnap.store.legacy import read_old_superblock
from ddsnap.store.model import NO_MERGE
from ddsnap.store.shared import SharedStore
from ddsnap.store.upgrade import upgrade_store
from ddsnap.testing.crash import CrashClock, CrashNow, RecordingDevice
from ddsnap.volume import Origin, Snapshot
from served import fails, ok, on_a_terminal

DATA = Path(__file__).parent / "data"
CS = 4096
SIZE = 1 << 20

_spec = importlib.util.spec_from_file_location("make_v2_images", DATA / "make_v2_images.py")
assert _spec is not None and _spec.loader is not None  # a .py file: a source loader
make_v2_images = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_v2_images)


def expected_v1() -> dict[str, bytes]:
    """What the v1 workload left: the origin and each snapshot."""
    base = bytearray(random.Random(8).randbytes(64 * CS))
    base[0:3 * CS] = b"A" * 3 * CS
    s1 = bytes(base)
    base[CS:6 * CS] = b"B" * 5 * CS
    s2 = bytearray(base)
    s2[30 * CS:32 * CS] = b"D" * 2 * CS
    base[2 * CS:22 * CS] = b"C" * 20 * CS
    return {"origin": bytes(base), "origin_device": bytes(base), "s1": s1, "s2": bytes(s2)}


def expected(name: str) -> dict[str, bytes]:
    """The model of store ``name`` ("v1-clean", ..., "v2-unclean"): ``origin_device``
    (the origin file's bytes), ``origin`` (the origin volume as read) and each live
    snapshot."""
    if name.startswith("v1-"):
        return expected_v1()
    return make_v2_images.expected(name[3:])


def snapshot_names(want: dict[str, bytes]) -> list[str]:
    return sorted(k for k in want if k.startswith("s"))


def image(name: str) -> bytes:
    with gzip.open(DATA / f"{name}.img.gz") as f:
        return f.read()


def origin_of(want: dict[str, bytes]) -> MemoryDevice:
    return MemoryDevice(64 * CS, want["origin_device"])


def read_back(dev, want: dict[str, bytes], what) -> LocalService:
    """Open ``dev`` as v3 and read every volume against the model ``want``."""
    svc = LocalService(SharedStore.open(dev), origin_of(want))
    names = snapshot_names(want)
    assert [s.name for s in svc.snapshots()] == names, what
    assert Origin(svc, svc.data).read(0, 64 * CS) == want["origin"], (what, "origin")
    for s in names:
        assert Snapshot(svc, svc.data, svc.snapshot(s)).read(0, 64 * CS) == want[s], (what, s)
    return svc


IMAGES = ["v1-clean", "v1-unclean", "v2-clean", "v2-unclean"]


@pytest.mark.parametrize("name", IMAGES)
def test_upgrade_keeps_every_snapshot(name):
    want = expected(name)
    dev = MemoryDevice(SIZE, image(name))
    with pytest.raises(FormatTooOld) as e:
        SharedStore.open(dev)
    assert e.value.version == int(name[1]) and e.value.exit_code == 21
    r = upgrade_store(dev, origin=origin_of(want))
    assert r.from_version == int(name[1])
    assert r.snapshots == len(snapshot_names(want))
    assert r.replayed == name.endswith("unclean")
    if name.startswith("v2-"):
        # After the merge, s2 reads the origin between snapshots reading copy-outs.
        assert r.copies > 0
    else:
        assert r.copies == 0
    assert r >= r.copies + 5  # the copies, table, tree, bitmap, two superblocks
    assert header_version(dev.pread(BLOCK_SIZE, 0)) == VERSION
    assert header_version(dev.pread(BLOCK_SIZE, BLOCK_SIZE)) == VERSION
    svc = read_back(dev, want, name)
    store = svc.store
    assert isinstance(store, SharedStore)  # an upgraded store is a shared one
    assert store.check() == []
    assert all(s.parent == 0 for s in svc.snapshots())
    assert store.sb.max_snapshots == 0 and store.sb.journal_tail == 0
    if name == "v2-unclean":
        assert r.dropped_snapshots == 1 and r.dropped_exceptions == 1  # s5's chunk 52
        assert store.state.merge_version == svc.snapshot("s2").id
        assert store.state.merge_cursor > 0
    else:
        assert store.state.merge_version == NO_MERGE
    # ... and it works as a v3 store from then on.
    if store.state.merge_version != NO_MERGE:
        svc.run_merge()  # the merge goes on where 0.2 left it
        assert [s.name for s in svc.snapshots()] == ["s1", "s3", "s4"]
        assert Origin(svc, svc.data).read(0, 64 * CS) == want["s2"]
        assert svc.origin.pread(64 * CS, 0) == want["s2"]
        want = {k: v for k, v in want.items() if k != "s2"}
    Origin(svc, svc.data).write(40 * CS, b"E" * CS)
    svc.create_snapshot("after")
    Snapshot(svc, svc.data, svc.snapshot("s1")).write(41 * CS, b"W" * CS)
    svc.delete_snapshot(snapshot_names(want)[-1])
    for s in snapshot_names(want)[:-1]:
        v = bytearray(want[s])
        if s == "s1":
            v[41 * CS:42 * CS] = b"W" * CS
        assert Snapshot(svc, svc.data, svc.snapshot(s)).read(0, 64 * CS) == bytes(v), s
    assert svc.store.check() == []
    svc.close()
    assert SharedStore.open(dev).check() == []


def test_check_counts_the_first_table_block():
    """An upgraded store's first table block lies in the data area (the superblock says
    where): check counts it as referenced, so check --repair can never free it."""
    dev = MemoryDevice(SIZE, image("v1-clean"))
    upgrade_store(dev)
    store = SharedStore.open(dev)
    assert store.table_blocks[0] >= store.data_start
    assert store.check() == []


def test_v3_never_replays_the_old_journal():
    """The v2 journal's blocks stay in the journal area after the upgrade; the v3 journal
    (from position 0, sequence 1) does not accept them: their version differs."""
    dev = MemoryDevice(SIZE, image("v2-unclean"))
    sb = read_old_superblock(dev)[0]
    old = Journal(dev, sb.uuid, sb.journal_start, sb.journal_blocks, sb.journal_tail,
                  sb.journal_seq, version=VERSION_V2).scan()
    assert old.transactions  # there is something to replay in the v2 journal
    want = expected("v2-unclean")
    upgrade_store(dev, origin=origin_of(want))
    area = dev.pread(sb.journal_blocks * BLOCK_SIZE, sb.journal_start * BLOCK_SIZE)
    assert any(header_version(area[i:i + BLOCK_SIZE]) == VERSION_V2
               for i in range(0, len(area), BLOCK_SIZE))
    store = SharedStore.open(dev)
    assert store.recovered == 0
    assert store.journal_scan is not None  # open scans the journal
    assert not store.journal_scan.damage and not store.journal_scan.warnings
    new = Journal(dev, sb.uuid, sb.journal_start, sb.journal_blocks, 0, 1).scan(0, 1)
    assert not new.transactions and not new.damage
    # Also with the old sequence numbers: none of it is a v3 transaction.
    assert not Journal(dev, sb.uuid, sb.journal_start, sb.journal_blocks, sb.journal_tail,
                       sb.journal_seq).scan().transactions


def test_copies_of_the_origin_need_the_origin_and_nothing_changes_without_it():
    before = image("v2-clean")
    dev = MemoryDevice(SIZE, before)
    with pytest.raises(OriginMismatch, match=r"/nonexistent/origin\.img.*--origin"):
        upgrade_store(dev)  # the recorded origin does not exist here
    assert dev.data == before
    wrong = MemoryDevice(32 * CS)
    with pytest.raises(OriginMismatch, match="was made for"):
        upgrade_store(dev, origin=wrong)
    assert dev.data == before


def test_v1_needs_no_origin():
    dev = MemoryDevice(SIZE, image("v1-unclean"))
    r = upgrade_store(dev)  # /nonexistent/origin.img: never opened
    assert r.copies == 0
    read_back(dev, expected("v1-unclean"), "v1-unclean")


def test_full_store_is_refused_before_anything_is_written(monkeypatch):
    class FullBitmap(upgrade_mod.Bitmap):
        def alloc_chunk(self):
            raise StoreFull()

    monkeypatch.setattr(upgrade_mod, "Bitmap", FullBitmap)
    before = image("v2-unclean")
    dev = MemoryDevice(SIZE, before)
    want = expected("v2-unclean")
    with pytest.raises(StoreFull, match="no room to upgrade.*Nothing was changed"):
        upgrade_store(dev, origin=origin_of(want))
    assert dev.data == before


def test_already_v3_and_not_a_store():
    dev = MemoryDevice(SIZE, image("v1-clean"))
    upgrade_store(dev)
    with pytest.raises(DdsnapError, match="already format v3"):
        upgrade_store(dev)
    from ddsnap.errors import NotAStore
    with pytest.raises(NotAStore):
        upgrade_store(MemoryDevice(SIZE))


def test_progress_counts_up_to_the_total():
    calls = []
    want = expected("v2-clean")
    dev = MemoryDevice(SIZE, image("v2-clean"))
    r = upgrade_store(dev, origin=origin_of(want), progress=lambda d, t: calls.append((d, t)))
    assert calls and all(0 <= d <= t for d, t in calls)
    assert [d for d, _t in calls] == sorted(d for d, _t in calls)
    assert calls[-1][0] == calls[-1][1]
    assert calls[-1][1] - calls[0][1] <= r  # what it wrote, on top of what it read


@pytest.mark.parametrize("name", ["v1-unclean", "v2-unclean"])
@pytest.mark.parametrize("mode", ["drop", "all", "subset", "torn"])
def test_upgrade_interrupted_at_every_write_and_flush_finishes_on_a_second_run(name, mode):
    """A crash at each write and flush of the upgrade (the unflushed writes lost, all
    kept, a random subset kept, or a subset with one torn), then ``upgrade`` again: the
    store ends up v3 with every snapshot intact."""
    img = image(name)
    want = expected(name)
    k = 0
    outcomes = set()
    while True:
        k += 1
        dev = RecordingDevice(SIZE, img, clock=CrashClock(crash_after=k))
        try:
            upgrade_store(dev, origin=origin_of(want))
            break  # no crash point left
        except CrashNow:
            pass
        after = MemoryDevice(SIZE, bytes(dev.crash_image(rng=random.Random(k), mode=mode)))
        try:
            upgrade_store(after, origin=origin_of(want))
            outcomes.add("converted again")
        except DdsnapError as e:  # the crash came after a v3 superblock was durable
            assert "already format v3" in str(e), (k, e)
            outcomes.add("already v3")
        svc = read_back(after, want, (mode, k))
        assert svc.store.check() == [], (mode, k)
    assert k > 6  # at least: metadata, flush, bitmap, flush, two superblocks and flushes
    assert outcomes == {"converted again", "already v3"}


def test_cli_refuses_v1_and_upgrades(tmp_path):
    store = tmp_path / "old.img"
    store.write_bytes(image("v1-clean"))
    fails(21, "status", store, match=r"format-v1 ddsnap store.*ddsnap upgrade")
    p = ok("upgrade", store)
    assert "upgraded" in p.stdout and "from format v1 to v3: 2 snapshot(s)" in p.stdout
    assert "0 chunk(s) copied" in p.stdout
    fails(1, "upgrade", store, match="already format v3")
    # The recorded origin does not exist here: the store is v3 and says so.
    fails(10, "status", store, match="does not exist")
    dev = FileDevice(str(store), writable=False)
    try:
        assert header_version(dev.pread(4096, 0)) == VERSION
    finally:
        dev.close()


def test_cli_upgrades_v2_with_the_origin_given(tmp_path):
    store = tmp_path / "old.img"
    store.write_bytes(image("v2-unclean"))
    fails(21, "status", store, match=r"format-v2 ddsnap store \(ddsnap 0\.2\)")
    fails(10, "upgrade", store, match=r"cannot be opened.*--origin PATH.*Nothing was changed")
    assert store.read_bytes() == image("v2-unclean")
    origin = tmp_path / "origin.img"
    want = expected("v2-unclean")
    origin.write_bytes(want["origin_device"])
    status, _out, shown = on_a_terminal("upgrade", "--origin", origin, store)
    assert status == 0, shown
    assert "from format v2 to v3: 4 snapshot(s)" in shown
    assert "1 snapshot(s) being deleted were dropped" in shown
    dev = MemoryDevice(SIZE, store.read_bytes())
    read_back(dev, want, "cli")


def test_v1_store_half_resealed_by_the_v2_upgrade():
    """ddsnap 0.2's ``upgrade`` (v1 to v2) re-sealed every block as v2, then wrote the
    superblock: interrupted, it left a v1 superblock over v1 and v2 blocks."""
    from ddsnap.store.format import HEADER, T_NODE, T_SNAPTABLE, VERSION_V1, seal

    dev = MemoryDevice(SIZE, image("v1-clean"))
    sb = read_old_superblock(dev)[0]
    for block, kind in ((sb.snaptable_start, T_SNAPTABLE), (sb.state.root, T_NODE)):
        raw = dev.pread(BLOCK_SIZE, block * BLOCK_SIZE)
        assert header_version(raw) == VERSION_V1
        buf = bytearray(raw)
        seal(buf, kind, block, HEADER.unpack_from(buf, 0)[6], sb.uuid, version=VERSION_V2)
        dev.pwrite(buf, block * BLOCK_SIZE)
    upgrade_store(dev)
    read_back(dev, expected("v1-clean"), "half re-sealed")
