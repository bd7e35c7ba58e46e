"""Snapshots without limits (issue 9): 10,000 snapshots of one origin, a hot chunk with
an exception per snapshot, chains of snapshots of snapshots.

Through the real LocalService and volumes over a SharedStore on a MemoryDevice (the
store API, not the CLI).  ``DDSNAP_MANY_SNAPSHOTS`` sets the count (default 10,000).
"""

from __future__ import annotations

import os

from ddsnap.service.local import LocalService
from ddsnap.store.blockdev import MemoryDevice
from ddsnap.store.shared import SharedStore
from ddsnap.volume import Origin, Snapshot

CS = 4096
N = int(os.environ.get("DDSNAP_MANY_SNAPSHOTS", "10000"))


def payload(i: int) -> bytes:
    return i.to_bytes(4, "little") * (CS // 4)


def test_one_chunk_written_between_each_of_many_snapshots():
    """The same chunk (a filesystem's superblock, say) written after every one of N
    snapshot creations: every write succeeds (no per-chunk cap), every snapshot reads
    the version it was taken of, check is clean, and deleting one snapshot among N frees
    exactly its own exception."""
    origin = MemoryDevice(64 * CS)
    store = SharedStore.create(MemoryDevice((N + 4096) * CS), origin_size=origin.size,
                               origin_path="origin", chunk_size=CS)
    svc = LocalService(store, origin)
    vol = Origin(svc, svc.data)
    vol.write(5 * CS, payload(0))
    infos = []
    for i in range(1, N + 1):
        infos.append(svc.create_snapshot(f"s{i}"))
        vol.write(5 * CS, payload(i))  # a copy-out every time
    assert len(svc.snapshots()) == N
    assert store.exception_chunks() == N
    for k in sorted({0, 1, N // 3, N // 2, N - 2, N - 1}):
        assert Snapshot(svc, svc.data, infos[k]).read(5 * CS, CS) == payload(k)
        assert Snapshot(svc, svc.data, infos[k]).read(4 * CS, CS) == bytes(CS)  # reads the origin
    assert vol.read(5 * CS, CS) == payload(N)
    svc.commit()
    assert store.check() == []
    # Each snapshot alone reads its copy-out: deleting one frees exactly that chunk.
    victim = infos[N // 2]
    assert store.snapshot_space()[victim.id] == (1, 0)
    free = store.space()["chunks_free"]
    svc.delete_snapshot(victim.name)
    assert store.space()["chunks_free"] == free + 1
    assert Snapshot(svc, svc.data, infos[N // 2 + 1]).read(5 * CS, CS) == payload(N // 2 + 1)
    svc.close()
    store = SharedStore.open(store.dev)
    assert len(store.snapshots()) == N - 1
    assert store.check() == []


def test_a_chain_of_snapshots_of_snapshots():
    """Each snapshot taken of the one before, each written once: every level reads its
    own data, deleting the middle of the chain keeps the rest whole."""
    depth = 60
    origin = MemoryDevice(16 * CS, bytes(16 * CS))
    store = SharedStore.create(MemoryDevice(4 << 20), origin_size=origin.size,
                               origin_path="origin", chunk_size=CS)
    svc = LocalService(store, origin)
    chain = [svc.create_snapshot("c0")]
    Snapshot(svc, svc.data, chain[0]).write(0, payload(0))
    for i in range(1, depth):
        chain.append(svc.create_snapshot(f"c{i}", parent=f"c{i - 1}"))
        Snapshot(svc, svc.data, chain[i]).write(0, payload(i))
        Snapshot(svc, svc.data, chain[i]).write(CS * (1 + i % 8), payload(1000 + i))
    want = {}
    for info in chain:
        want[info.name] = Snapshot(svc, svc.data, info).read(0, 16 * CS)
    assert [want[f"c{i}"][:4] for i in range(depth)] == [payload(i)[:4] for i in range(depth)]
    for i in range(10, 50, 3):
        svc.delete_snapshot(f"c{i}")
        del want[f"c{i}"]
    for info in svc.snapshots():
        assert Snapshot(svc, svc.data, info).read(0, 16 * CS) == want[info.name], info.name
    svc.commit()
    assert store.check() == []
    svc.close()
    store = SharedStore.open(store.dev)
    svc = LocalService(store, origin)
    for info in svc.snapshots():
        assert Snapshot(svc, svc.data, info).read(0, 16 * CS) == want[info.name], info.name
    for name in list(want):
        svc.delete_snapshot(name)
    assert list(store.exceptions()) == [] and store.table.index == {}
    assert store.check() == []


def test_a_delete_looks_at_the_copy_outs_it_frees_not_at_all_of_them():
    """Deleting a snapshot among many walks its own copy-outs (through the tag index),
    not every copy-out of the origin: the cost criterion of issue 9, counted in entries
    the sweep looks at (no timing).  The big snapshot's copy-outs and one snapshot with
    none are there to be ignored."""
    cs = 4096
    n_big, k = 3000, 25
    origin = MemoryDevice(4 * n_big * cs)
    store = SharedStore.create(MemoryDevice((2 * n_big + 600) * cs), origin.size,
                               chunk_size=cs, journal_blocks=256)
    svc = LocalService(store, origin)
    vol = Origin(svc, svc.data)
    svc.create_snapshot("big")
    vol.write(0, b"b" * n_big * cs)  # n_big copy-outs tagged big
    svc.create_snapshot("small")
    for i in range(k):  # k copy-outs tagged small (only it reads them), spread out
        vol.write(97 * i * cs, b"s" * cs)
    svc.create_snapshot("quiet")  # reads the origin: frees nothing
    for _ in range(20):
        svc.create_snapshot(f"later{_}")
    store.commit()
    before = store.space()["chunks_used"]
    seen = store.sweep_seen
    svc.delete_snapshot("quiet")
    assert store.sweep_seen == seen  # nothing to free: nothing walked
    svc.delete_snapshot("small")
    assert store.sweep_seen - seen == k  # only its own copy-outs (their index records)
    assert store.space()["chunks_used"] <= before - k
    seen = store.sweep_seen
    svc.delete_snapshot("big")
    assert store.sweep_seen - seen == n_big
    assert [f for f in store.check() if f.severity == "fatal"] == []
