"""Make ``v2-clean.img.gz`` and ``v2-unclean.img.gz``: real format-v2 stores, written by
ddsnap 0.2 (commit 4f0e466), for ``tests/test_upgrade.py``.

Run it with ddsnap 0.2 on the path (the stores must be made by 0.2's own code)::

    git worktree add /tmp/ddsnap-0.2 4f0e466
    PYTHONPATH=/tmp/ddsnap-0.2/src python tests/data/make_v2_images.py tests/data
    git worktree remove /tmp/ddsnap-0.2

Both stores are 1 MiB with 4 KiB chunks, 64 snapshot slots and a 64-block journal, for a
64-chunk origin (seeded random bytes, ``random.Random(8)``) recorded as
``/nonexistent/origin.img``.  The workload (:data:`WORKLOAD`) is the v1 images' one, then
more snapshots, origin writes, snapshot writes that unshare one chunk inside a range
several snapshots share, and a merge, so that every case of the conversion to v3 occurs:

* ``v2-clean``: ``s5`` deleted (swept), ``s2`` merged into the origin *with keep* (so
  ``s2`` reads the origin where the others read copy-outs, and the same copy-out serves
  snapshots older and newer than ``s2``: the conversion must copy), closed cleanly;
* ``v2-unclean``: ``s5`` being deleted (the crash came between the delete's commit and
  its sweep), ``s2`` being merged (3 steps of 8 chunks done: chunks 2-21, 30, 31, 40, 41
  merged), and the process died after its last commit point: the image is what was
  *flushed* (a :class:`RecordingDevice` crash image), so the last transaction is only in
  the journal.

:func:`expected` is the model of what each store holds (no ddsnap code); the script
checks 0.2 reads every volume back as the model says before it writes an image, and the
test reads the upgraded stores against the same model.  Not byte-reproducible (the store
UUID and creation times are random), but every run makes equivalent stores.
"""

from __future__ import annotations

import gzip
import random
import sys
from pathlib import Path

CS = 4096
CHUNKS = 64
STORE_SIZE = 1 << 20
ORIGIN_PATH = "/nonexistent/origin.img"
#: merge steps of ``MERGE_STEP`` chunks the unclean store did before the crash
MERGE_STEP = 8
MERGE_STEPS = 3


def _fill(ch: str, n: int) -> bytes:
    return ch.encode() * n * CS


#: (operation, target, first chunk, chunk count, fill): the workload of both images,
#: up to where they differ
WORKLOAD = [
    ("write", "origin", 0, 3, "A"),
    ("snap", "s1"),
    ("write", "origin", 1, 5, "B"),
    ("snap", "s2"),
    ("write", "origin", 2, 20, "C"),
    ("write", "s2", 30, 2, "D"),           # the v1 images end here
    ("snap", "s3"),
    ("write", "origin", 40, 4, "G"),       # copy-outs shared by s1, s2, s3
    ("write", "s2", 41, 1, "H"),           # unshares chunk 41 of s2 inside that range
    ("write", "s1", 10, 1, "F"),           # unshares chunk 10 of s1 (shared with s2)
    ("snap", "s4"),
    ("write", "origin", 50, 1, "I"),
    ("snap", "s5"),
    ("write", "origin", 51, 1, "J"),
    ("write", "s5", 52, 1, "K"),           # only s5 uses it: gone with s5
]


def base() -> bytes:
    """The origin before the workload."""
    return random.Random(8).randbytes(CHUNKS * CS)


def _merged_chunks_unclean(s2_own: list[int]) -> set[int]:
    return set(s2_own[:MERGE_STEP * MERGE_STEPS])


def expected(name: str) -> dict[str, bytes]:
    """What store ``name`` (``"clean"`` or ``"unclean"``) holds: ``"origin_device"``
    (the origin file's bytes, what the merge copied in included), ``"origin"`` (the
    origin volume as read, which during a merge already shows the merged snapshot) and
    each live snapshot."""
    origin = bytearray(base())
    snaps: dict[str, bytearray] = {}
    s2_exc: set[int] = set()  # chunks where s2 has an exception (what a merge copies)
    for op in WORKLOAD:
        if op[0] == "snap":
            snaps[op[1]] = bytearray(origin)
            continue
        _w, target, first, n, fill = op
        lo, hi = first * CS, (first + n) * CS
        if target == "origin":
            if "s2" in snaps:  # copied out for s2 (if it had no exception there yet)
                s2_exc.update(range(first, first + n))
            origin[lo:hi] = _fill(fill, n)
        else:
            if target == "s2":
                s2_exc.update(range(first, first + n))
            snaps[target][lo:hi] = _fill(fill, n)
    del snaps["s5"]  # deleted (clean) or being deleted (unclean): not live either way
    out = {k: bytes(v) for k, v in snaps.items()}
    if name == "clean":
        # s2 merged (kept): the origin is s2, on the device too.
        out["origin"] = out["origin_device"] = out["s2"]
    else:
        # s2 being merged: the origin reads as s2; the device has s2's data at the
        # merged chunks only.
        dev = bytearray(origin)
        for c in _merged_chunks_unclean(sorted(s2_exc)):
            dev[c * CS:(c + 1) * CS] = out["s2"][c * CS:(c + 1) * CS]
        out["origin_device"] = bytes(dev)
        out["origin"] = out["s2"]
    return out


def make(name: str):
    """Run the workload with ddsnap 0.2; return the store image and the origin device."""
    from ddsnap.store.blockdev import MemoryDevice, RecordingDevice
    from ddsnap.store.service import MetadataService
    from ddsnap.store.shared import SharedStore
    from ddsnap.volume import Origin, Snapshot

    dev = RecordingDevice(STORE_SIZE)
    origin = MemoryDevice(CHUNKS * CS, base())
    store = SharedStore.create(dev, CHUNKS * CS, ORIGIN_PATH, chunk_size=CS,
                               max_snapshots=64, journal_blocks=64)
    svc = MetadataService(store, origin)
    for op in WORKLOAD:
        if op[0] == "snap":
            svc.create_snapshot(op[1])
            continue
        _w, target, first, n, fill = op
        vol = Origin(svc) if target == "origin" else Snapshot(svc, svc.snapshot(target))
        vol.write(first * CS, _fill(fill, n))
        svc.commit()
    if name == "clean":
        svc.delete_snapshot("s5")
        svc.start_merge("s2", keep=True)
        while not svc.merge_step():
            pass
        svc.close()
        return bytes(dev.current), origin
    # The delete's commit, without its sweep (what a crash between the two leaves).
    svc.store.begin_delete("s5")
    svc._refresh_snaps()  # noqa: SLF001 - ddsnap 0.2's service, as it was
    svc.commit()
    svc.merge_step_chunks = MERGE_STEP
    svc.start_merge("s2", keep=False)
    for _ in range(MERGE_STEPS):
        assert not svc.merge_step()
    # Killed here: what reached the disk is what was flushed (the last commit's home
    # writes were not).
    return bytes(dev.crash_image(mode="drop")), origin


def verify(name: str, image: bytes, origin) -> None:
    """Open ``image`` with 0.2 (recovering its journal) and read every volume against the
    model."""
    from ddsnap.store.blockdev import MemoryDevice
    from ddsnap.store.service import MetadataService
    from ddsnap.store.shared import SharedStore
    from ddsnap.volume import Origin, Snapshot

    want = expected(name)
    assert origin.data == want["origin_device"], "origin device differs from the model"
    store = SharedStore.open(MemoryDevice(STORE_SIZE, image))
    if name == "unclean":
        assert store.recovered > 0, "the unclean store's journal has nothing to replay"
        assert store.merging_bit is not None
    svc = MetadataService(store, MemoryDevice(CHUNKS * CS, bytes(origin.data)))
    names = [s.name for s in svc.snapshots()]
    assert names == ["s1", "s2", "s3", "s4"], names
    assert Origin(svc).read(0, CHUNKS * CS) == want["origin"], "origin"
    for s in names:
        assert Snapshot(svc, svc.snapshot(s)).read(0, CHUNKS * CS) == want[s], s


def main(outdir: str) -> None:
    import ddsnap.store.format as fmt

    assert fmt.VERSION == 2, "run this with ddsnap 0.2 (commit 4f0e466) on PYTHONPATH"
    for name in ("clean", "unclean"):
        image, origin = make(name)
        verify(name, image, origin)
        path = Path(outdir) / f"v2-{name}.img.gz"
        with gzip.GzipFile(path, "wb", compresslevel=9, mtime=0) as f:
            f.write(image)
        print(f"wrote {path}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else str(Path(__file__).parent))
