"""The byte-flip campaign of issue 8: damaged metadata is reported and never served as data.

A store with 20 snapshots and scattered copy-outs is built once, in two states: shut down
cleanly, and "killed" (the device as it is after durable commits, with transactions in
the journal waiting for recovery).  Then, for each metadata block kind — superblock slot
0 and 1, snapshot table, bitmap, leaf, index node, and in the killed state each part of
the live journal window (descriptor, image, commit block) — random bytes of a random
block of that kind are flipped in a copy of the store.  For every flip:

* ``check`` (the read-only inspection ``ddsnap check`` runs) reports it: a fatal finding,
  or a warning naming the flipped block;
* serving either refuses the store (the open raises ``CorruptMetadata``), or every
  volume reads either its recorded content or an error (EIO): never other bytes.

A flip is one byte, or a burst of up to 8 bytes within one 512-byte sector (damage to a
sector).  Damage to *both* copies of the last transaction's commit record at once is the
format's documented limit (docs/format.md, "Torn or damaged") and is not generated.

The counts by kind are printed (``pytest -s``) for the closing note.  The flips are
seeded (``DDSNAP_CAMPAIGN_SEED``, default 8) so a failure replays; the number of flips
per state is ``DDSNAP_CAMPAIGN_FLIPS`` (default 120, so 240 a run).
"""

from __future__ import annotations

import os
import random
from collections import Counter

import pytest

from ddsnap.errors import CorruptMetadata
from ddsnap.store.blockdev import MemoryDevice
from ddsnap.store.format import BLOCK_SIZE, T_COMMIT, T_JOURNAL, peek_header
from ddsnap.store.service import MetadataService
from ddsnap.store.shared import SharedStore
from ddsnap.volume import Origin, Snapshot

SEED = int(os.environ.get("DDSNAP_CAMPAIGN_SEED", "8"))
FLIPS = int(os.environ.get("DDSNAP_CAMPAIGN_FLIPS", "120"))
CS = 4096
ORIGIN = 256 * CS
STORE = 3 << 20


def build(state: str):
    """The store image, the origin image and every volume's expected content."""
    rng = random.Random(1)
    origin = MemoryDevice(ORIGIN, rng.randbytes(ORIGIN))
    dev = MemoryDevice(STORE)
    svc = MetadataService(SharedStore.create(dev, ORIGIN, "o", CS, 256, journal_blocks=256),
                          origin)
    want: dict[str, bytes] = {}
    for i in range(20):
        name = f"s{i:02d}"
        svc.create_snapshot(name)
        want[name] = origin.pread(ORIGIN, 0)
        for _ in range(8):  # scattered origin writes: copy-outs shared by many snapshots
            c = rng.randrange(256)
            Origin(svc).write(c * CS, rng.randbytes(rng.choice((1, 2, 3)) * CS))
        if i % 4 == 0:  # and some snapshots' own writes
            c = rng.randrange(250)
            data = rng.randbytes(CS)
            Snapshot(svc, svc.snapshot(name)).write(c * CS, data)
            w = bytearray(want[name])
            w[c * CS:(c + 1) * CS] = data
            want[name] = bytes(w)
    svc.commit()
    if state == "clean":
        svc.close()
    else:
        # Checkpointed once, then more work: some metadata only at home, some only in
        # the journal, which recovery must replay.
        with svc.lock:
            svc.store.request_checkpoint()
        svc.commit()
        for _ in range(6):
            c = rng.randrange(256)
            Origin(svc).write(c * CS, rng.randbytes(CS))
        svc.create_snapshot("s20")
        want["s20"] = origin.pread(ORIGIN, 0)
        Origin(svc).write(rng.randrange(256) * CS, rng.randbytes(CS))
        origin.flush()
    want["origin"] = origin.pread(ORIGIN, 0)
    return bytes(dev.data), bytes(origin.data), want


def kinds(image: bytes) -> dict[str, list[int]]:
    """Blocks of each metadata kind that hold current metadata in ``image``."""
    store = SharedStore.open(MemoryDevice(STORE, image), mode="inspect")
    sb = store.sb
    out: dict[str, list[int]] = {
        "superblock 0": [0], "superblock 1": [1],
        "snapshot table": [sb.snaptable_start + i for i in range(2)],  # the used ones
        "bitmap": [sb.bitmap_start + i for i in range(sb.bitmap_blocks)],
        "leaf": [], "index node": [],
    }
    # A home that recovery rewrites from the journal is not the current copy (the
    # journal's is), but damage to it is still reported (a warning naming it).

    def walk(block: int, level: int) -> None:
        leaf = level == store.state.levels
        if block not in store.replayed:  # a home recovery rewrites is the journal's
            out["leaf" if leaf else "index node"].append(block)
        if not leaf:
            for child in store._read_node(block).children:
                walk(child, level + 1)

    walk(store.state.root, 0)
    j = store.journal
    for pos in range(j.tail, j.head):
        b = j.start + pos % j.size
        h = peek_header(image[b * BLOCK_SIZE:(b + 1) * BLOCK_SIZE])
        kind = ("journal descriptor" if h and h[0] == T_JOURNAL else
                "journal commit block" if h is None or h[0] == T_COMMIT else "journal image")
        if h is None:  # a commit block's header is its own (two copies)
            kind = "journal commit block"
        out.setdefault(kind, []).append(b)
    assert all(out.values()), {k: len(v) for k, v in out.items()}
    return out


def serve_reads(image: bytes, origin: bytes, want: dict[str, bytes]) -> str:
    """Open the damaged store as ``serve`` does and read every volume.

    Returns "refused", "eio" (some read failed, none returned wrong bytes) or "ok".
    Fails the test on a read that returned bytes other than the recorded content.
    """
    try:
        store = SharedStore.open(MemoryDevice(STORE, image))
    except CorruptMetadata:
        return "refused"
    svc = MetadataService(store, MemoryDevice(ORIGIN, origin))
    outcome = "ok"
    for name, content in want.items():
        vol = Origin(svc) if name == "origin" else Snapshot(svc, svc.snapshot(name))
        for off in range(0, ORIGIN, 64 * CS):
            try:
                got = vol.read(off, 64 * CS)
            except CorruptMetadata:
                outcome = "eio"
                continue
            assert got == content[off:off + 64 * CS], f"{name} served wrong bytes at {off}"
    return outcome


@pytest.mark.parametrize("state", ["clean", "killed"])
def test_byte_flip_campaign(state):
    image, origin, want = build(state)
    blocks = kinds(image)
    names = sorted(blocks)
    rng = random.Random(f"{SEED}/{state}")
    counts: Counter = Counter()
    for i in range(FLIPS):
        kind = names[i % len(names)]
        block = rng.choice(blocks[kind])
        damaged = bytearray(image)
        # One byte, or a burst of up to 8 bytes in one 512-byte sector (bit rot of a
        # sector), anywhere in the block.
        sector = block * BLOCK_SIZE + rng.randrange(8) * 512
        for _ in range(rng.choice((1, 1, 2, 8))):
            damaged[sector + rng.randrange(512)] ^= rng.randrange(1, 256)
        damaged = bytes(damaged)
        report = _inspect(damaged)
        fatal = any(f.severity == "fatal" for f in report)
        named = any(f.block == block for f in report)
        assert fatal or named, f"flip {i} in {kind} block {block} not reported: {report}"
        outcome = serve_reads(damaged, origin, want)
        counts[(kind, "fatal" if fatal else "warning", outcome)] += 1
    by_kind = Counter(k for k, _f, _o in counts.elements())
    print(f"\ncampaign ({state}, seed {SEED}): {FLIPS} flips, 0 silent wrong reads")
    for (kind, found, outcome), n in sorted(counts.items()):
        print(f"  {kind:22} check {found:8} serve {outcome:8} {n:4}")
    assert sum(by_kind.values()) == FLIPS and len(by_kind) == len(names)


def _inspect(image: bytes):
    try:
        store = SharedStore.open(MemoryDevice(STORE, image), mode="inspect")
    except CorruptMetadata as e:
        from ddsnap.store.api import Finding
        return [Finding("fatal", e.block, e.why)]
    return store.check()
