"""The byte-flip campaign of issue 8: damaged metadata is reported and never served as data.

A store with 20 snapshots and scattered copy-outs is built once, in two states: shut down
cleanly, and "killed" (the device as it is after durable commits, with transactions in
the journal waiting for recovery).  Then, for each metadata block kind of format v3 —
superblock slot 0 and 1, the snapshot table's first block and the chained blocks after
it (20 snapshots need two blocks of 14 slots), bitmap, leaf, index node, and in the
killed state each part of the live journal window (descriptor, image, commit block) —
random bytes of a random block of that kind are flipped in a copy of the store.  For
every flip:

* ``check`` (the read-only inspection ``ddsnap check`` runs) reports it: a fatal finding,
  or a warning naming the flipped block; it never passes a flip over as clean;
* serving either refuses the store (the open raises ``CorruptMetadata``), or every
  volume reads either its recorded content or an error (EIO): never other bytes.

A flip is one byte, or a burst of up to 8 bytes within one 512-byte sector (damage to a
sector).  Damage to *both* copies of the last transaction's commit record at once is the
format's documented limit (docs/format.md, "Torn or damaged") and is not generated.

The flips of a state are made once (:func:`campaign`) and judged by the tests below: the
serving guarantee per block kind, the check guarantee per state.  The counts by kind are
printed (``pytest -s``) for the closing note.  The flips are seeded
(``DDSNAP_CAMPAIGN_SEED``, default 8) so a failure replays; the number of flips per state
is ``DDSNAP_CAMPAIGN_FLIPS`` (default 120, so 240 a run).
"""

from __future__ import annotations

import functools
import os
import random
from collections import Counter
from dataclasses import dataclass

import pytest

from ddsnap.errors import CorruptMetadata
from ddsnap.service.local import LocalService
from ddsnap.store.api import Finding
from ddsnap.store.blockdev import MemoryDevice
from ddsnap.store.format import BLOCK_SIZE, T_COMMIT, T_JOURNAL, peek_header
from ddsnap.store.shared import SharedStore
from ddsnap.volume import Origin, Snapshot

SEED = int(os.environ.get("DDSNAP_CAMPAIGN_SEED", "8"))
FLIPS = int(os.environ.get("DDSNAP_CAMPAIGN_FLIPS", "120"))
CS = 4096
ORIGIN = 256 * CS
STORE = 3 << 20

#: the metadata block kinds each state has (flips go round them in this order)
_FIXED = ["bitmap", "index node", "leaf", "snapshot table", "snapshot table, chained",
          "superblock 0", "superblock 1"]
KINDS = {
    "clean": _FIXED,
    "killed": sorted(_FIXED + ["journal commit block", "journal descriptor",
                               "journal image"]),
}


def build(state: str):
    """The store image, the origin image and every volume's expected content."""
    rng = random.Random(1)
    origin = MemoryDevice(ORIGIN, rng.randbytes(ORIGIN))
    dev = MemoryDevice(STORE)
    svc = LocalService(SharedStore.create(dev, ORIGIN, "o", CS, 256, journal_blocks=256),
                          origin)
    want: dict[str, bytes] = {}
    for i in range(20):
        name = f"s{i:02d}"
        svc.create_snapshot(name)
        want[name] = origin.pread(ORIGIN, 0)
        for _ in range(8):  # scattered origin writes: copy-outs shared by many snapshots
            c = rng.randrange(256)
            Origin(svc, svc.data).write(c * CS, rng.randbytes(rng.choice((1, 2, 3)) * CS))
        if i % 4 == 0:  # and some snapshots' own writes
            c = rng.randrange(250)
            data = rng.randbytes(CS)
            Snapshot(svc, svc.data, svc.snapshot(name)).write(c * CS, data)
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
            Origin(svc, svc.data).write(c * CS, rng.randbytes(CS))
        svc.create_snapshot("s20")
        want["s20"] = origin.pread(ORIGIN, 0)
        Origin(svc, svc.data).write(rng.randrange(256) * CS, rng.randbytes(CS))
        origin.flush()
    want["origin"] = origin.pread(ORIGIN, 0)
    return bytes(dev.data), bytes(origin.data), want


def kinds(image: bytes) -> dict[str, list[int]]:
    """Blocks of each metadata kind that hold current metadata in ``image``."""
    store = SharedStore.open(MemoryDevice(STORE, image), mode="inspect")
    sb = store.sb
    # Format v3's table is a chain: its first block in the fixed area, the others
    # allocated in the data area as snapshots were made (14 slots a block).
    assert store.table_blocks[0] == sb.snaptable_start and len(store.table_blocks) >= 2
    out: dict[str, list[int]] = {
        "superblock 0": [0], "superblock 1": [1],
        "snapshot table": [sb.snaptable_start],
        "snapshot table, chained": store.table_blocks[1:],
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
            for child in store.node(block).children:
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

    Returns "refused", "eio" (some read failed, none returned wrong bytes), "ok", or
    "wrong: ..." naming the first volume and offset that read other bytes than its
    recorded content.
    """
    try:
        store = SharedStore.open(MemoryDevice(STORE, image))
    except CorruptMetadata:
        return "refused"
    svc = LocalService(store, MemoryDevice(ORIGIN, origin))
    outcome = "ok"
    for name, content in want.items():
        vol = (Origin(svc, svc.data) if name == "origin"
               else Snapshot(svc, svc.data, svc.snapshot(name)))
        for off in range(0, ORIGIN, 64 * CS):
            try:
                got = vol.read(off, 64 * CS)
            except CorruptMetadata:
                outcome = "eio"
                continue
            if got != content[off:off + 64 * CS]:
                return f"wrong: {name} served wrong bytes at {off}"
    return outcome


def check_report(image: bytes) -> tuple[list[Finding], str | None]:
    """What ``ddsnap check`` makes of ``image``: its findings (an open that refuses is a
    fatal finding naming the block, as ``ddsnap check`` reports it), and what was
    raised instead of returning findings (None if nothing was)."""
    try:
        store = SharedStore.open(MemoryDevice(STORE, image), mode="inspect")
    except CorruptMetadata as e:
        return [Finding("fatal", e.block, e.why)], None
    except Exception as e:  # noqa: BLE001 - recorded, judged by the tests
        return [], f"the inspection open raised {type(e).__name__}: {e!r}"
    try:
        return store.check(), None
    except Exception as e:  # noqa: BLE001
        return [], f"check raised {type(e).__name__}: {e}"


@dataclass
class Flip:
    i: int
    kind: str
    block: int
    findings: list[Finding]
    raised: str | None  # check raised this instead of returning findings
    outcome: str  # serving: refused, eio, ok, or wrong: ...

    @property
    def fatal(self) -> bool:
        return any(f.severity == "fatal" for f in self.findings)

    @property
    def reported(self) -> bool:
        """Check did not pass it over: a fatal finding, one naming the block, or no
        report at all because check failed (loudly; test_check_returns_findings_for_every_
        flip asserts that never happens)."""
        return self.fatal or any(f.block == self.block for f in self.findings) or bool(
            self.raised)

    def __str__(self) -> str:
        return (f"flip {self.i} in {self.kind} block {self.block}: check "
                f"{self.raised or self.findings}, serve {self.outcome}")


@functools.cache
def campaign(state: str) -> tuple[Flip, ...]:
    """Every flip of ``state`` (seeded), checked and served."""
    image, origin, want = build(state)
    blocks = kinds(image)
    names = KINDS[state]
    assert sorted(blocks) == names, sorted(blocks)
    rng = random.Random(f"{SEED}/{state}")
    flips = []
    for i in range(FLIPS):
        kind = names[i % len(names)]
        block = rng.choice(blocks[kind])
        flipping = bytearray(image)
        # One byte, or a burst of up to 8 bytes in one 512-byte sector (bit rot of a
        # sector), anywhere in the block.
        sector = block * BLOCK_SIZE + rng.randrange(8) * 512
        for _ in range(rng.choice((1, 1, 2, 8))):
            flipping[sector + rng.randrange(512)] ^= rng.randrange(1, 256)
        damaged = bytes(flipping)
        findings, raised = check_report(damaged)
        flips.append(Flip(i, kind, block, findings, raised,
                          serve_reads(damaged, origin, want)))
    return tuple(flips)




@pytest.mark.parametrize("state,kind", [
    (state, kind) for state in KINDS for kind in KINDS[state]])
def test_flips_are_never_served_as_other_bytes(state, kind):
    """Serving refuses the store or reads each volume's recorded content or EIO."""
    flips = [f for f in campaign(state) if f.kind == kind]
    assert len(flips) >= FLIPS // len(KINDS[state])
    wrong = [str(f) for f in flips if f.outcome not in ("refused", "eio", "ok")]
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("state", list(KINDS))
def test_every_flip_is_reported_by_check(state):
    """Check never passes a flip over: every one is a fatal finding or a warning naming
    the flipped block (or check fails on it: the next test)."""
    flips = campaign(state)
    missed = [str(f) for f in flips if not f.reported]
    assert not missed, "\n".join(missed)
    counts = Counter((f.kind, "raised" if f.raised else "fatal" if f.fatal else "warning",
                      f.outcome if not f.outcome.startswith("wrong") else "WRONG")
                     for f in flips)
    wrong = sum(n for (_k, _c, o), n in counts.items() if o == "WRONG")
    print(f"\ncampaign ({state}, seed {SEED}): {FLIPS} flips, {len(missed)} unreported, "
          f"{wrong} with wrong reads")
    for (kind, found, outcome), n in sorted(counts.items()):
        print(f"  {kind:24} check {found:8} serve {outcome:8} {n:4}")
    assert sum(counts.values()) == FLIPS
    assert {f.kind for f in flips} == set(KINDS[state])


@pytest.mark.parametrize("state", list(KINDS))
def test_check_returns_findings_for_every_flip(state):
    """Check reports damage as findings (``ddsnap check --json`` prints them all); it
    never fails on damage itself."""
    raised = [str(f) for f in campaign(state) if f.raised]
    assert not raised, "\n".join(raised)
