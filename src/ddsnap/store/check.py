"""``ddsnap check``: verify a shared store's on-disk metadata (seed 000's todo "snapcheck").

Reads every metadata block from the device (not from the in-memory cache; for a store
opened for inspection, through the overlay of journal transactions recovery would apply)
and reports: each superblock slot (damaged or stale: a warning), the live journal window
(a committed transaction with a damaged block: fatal; one damaged copy of a commit
record, or damage in the older superblock slot's part of the window: a warning), every
snapshot table and bitmap block, and then checks
DESIGN.md invariants 4 (self-identifying, checksummed blocks), 5 (bitmap and tree agree:
every referenced block and chunk allocated exactly once; leaks are warnings) and 6 (every
exception owned by a version in the table, tagged with a version that existed, seed 001
``check_leaf``), plus the B-tree's key order and bounds.  Each finding names the block
concerned.  It also recounts
the per-snapshot space figures (issue 3) from the tree and reports, naming the snapshot,
any drift of the figures the store keeps incrementally.
"""

from __future__ import annotations

from ..errors import CorruptMetadata
from .format import (
    BITS_PER_BITMAP,
    INDEX,
    MERGED,
    SLOT_LIVE,
    T_BITMAP,
    T_LEAF,
    T_NODE,
    T_SNAPTABLE,
    Leaf,
    Node,
    check_header,
    unpack_index,
    unpack_key,
)
from .model import Finding


def check_frame(store) -> tuple[list[Finding], list[range]]:
    """The superblock slots, the journal window, the snapshot table and the bitmap.

    Returns the findings and the ranges of store blocks whose bitmap block could not
    be read (leaks there cannot be counted).
    """
    from .superblock import read_superblocks

    findings: list[Finding] = []
    sb = store.sb
    # Read again: a served store has checkpointed since it was opened.
    _sb, reports = read_superblocks(store.dev)
    for r in reports:
        f = r.finding()
        if f is not None:
            findings.append(f)
    j = store.journal
    scan = j.scan()  # from the newer slot's tail: what recovery needs
    for e in scan.damage:
        findings.append(Finding("fatal", e.block, e.why))
    for e in scan.warnings:
        findings.append(Finding("warning", e.block, e.why))
    older = [r for r in reports if r.status == "ok" and r.journal_tail is not None
             and r.journal_tail < j.tail]
    if older:
        # The part only the older slot's recovery would replay: damage there loses
        # nothing now, but that fallback would fail.
        old = j.scan(older[0].journal_tail, older[0].journal_seq, min_epoch=0)
        for e in old.damage:
            if old.next_seq < j.tail_seq:
                findings.append(Finding("warning", e.block, f"{e.why} (already checkpointed: "
                                        "only recovery from the older superblock slot needs it)"))
    for block, img in sorted(store.replayed.items()):
        # Recovery will overwrite these homes from the journal; damage to one loses
        # nothing, but it is still damage to report.
        home = store.dev.pread(len(img), block * len(img))
        kind = int.from_bytes(img[4:6], "little")
        fields = (slice(0, 4), slice(4, 6), slice(16, 24), slice(32, 48))  # magic type block uuid
        if sum(home[f] == img[f] for f in fields) < 3:
            continue  # not an image of this block (a home not written yet)
        try:
            check_header(home, kind, block, store.uuid)
        except CorruptMetadata as e:
            findings.append(Finding("warning", block, f"{e.why} (recovery replaces this "
                                                      "block from the journal)"))
    unreadable = {u.block for u in store.unreadable}
    for u in store.unreadable:
        findings.append(Finding("fatal", u.block, u.why))
    no_leak_count: list[range] = []
    for b in store.table_blocks:
        if b not in unreadable:
            _verify(store, b, T_SNAPTABLE, findings)
    for i in range(sb.bitmap_blocks):
        b = sb.bitmap_start + i
        if b in unreadable or not _verify(store, b, T_BITMAP, findings):
            no_leak_count.append(range(i * BITS_PER_BITMAP, (i + 1) * BITS_PER_BITMAP))
    return findings, no_leak_count


def _verify(store, block: int, kind: int, findings: list[Finding]) -> bool:
    try:
        check_header(store.read_block(block), kind, block, store.uuid)
        return True
    except CorruptMetadata as e:
        findings.append(Finding("fatal", e.block, e.why))
        return False


def check_store(store, leaks: list[int] | None = None) -> list[Finding]:
    """Check ``store`` (a :class:`~ddsnap.store.shared.SharedStore`) as it is on disk.

    Returns findings; any with severity ``"fatal"`` means the store is damaged.  The
    space figures are compared with the tree on disk, or with the tree in memory while
    changes are not committed yet.
    """
    findings, no_leak_count = check_frame(store)
    sb = store.sb
    bpc = store.bpc
    bitmap = store.bitmap
    referenced_blocks: dict[int, str] = {}
    referenced_chunks: dict[int, tuple] = {}
    nchunks = sb.blocks // bpc
    first_data_chunk = -(-bitmap.data_start // bpc)
    entries: list[tuple[int, int, int, int]] = []
    markers = [0]
    index: list[tuple[int, int, int]] = []  # the tag index: (tag, chunk, store chunk)
    incomplete = []  # blocks the walk could not read: the recount is partial

    def fatal(block, msg):
        findings.append(Finding("fatal", block, msg))

    names = [s.name for s in store.table.slots if s.state == SLOT_LIVE]
    if len(names) != len(set(names)):
        fatal(sb.snaptable_start, "two live snapshots share a name")

    def ref_block(block: int, what: str) -> bool:
        if not bitmap.data_start <= block < sb.blocks:
            fatal(block, f"{what} lies outside the metadata area")
            return False
        if block in referenced_blocks:
            fatal(block, f"{what} is also referenced as {referenced_blocks[block]}")
            return False
        referenced_blocks[block] = what
        if not bitmap.test(block):
            fatal(block, f"{what} is in use but free in the allocation bitmap")
        return True

    for b in store.table_blocks:  # the first may be in the fixed area (not counted)
        if b >= bitmap.data_start:
            ref_block(b, "snapshot table block")
    # After a resize the bitmap may live in the data area (docs/format.md "Resizing").
    for b in range(sb.bitmap_start, sb.bitmap_start + sb.bitmap_blocks):
        if b >= bitmap.data_start:
            ref_block(b, "bitmap block")

    def load(block: int, kind: int):
        buf = store.read_block(block)
        check_header(buf, kind, block, store.uuid)
        if kind == T_LEAF:
            return Leaf.decode(buf, block)
        return Node.decode(buf, block)

    def span(lo: int, hi: int | None) -> str:
        a = unpack_key(lo)
        b = "end" if hi is None else str(unpack_key(hi))
        return f"exceptions from (version, chunk, tag) {a} to {b}"

    def walk(block: int, level: int, lo: int, hi: int | None) -> None:
        leaf_level = level == store.state.levels
        what = "leaf" if leaf_level else "index node"
        if not ref_block(block, what):
            incomplete.append(block)
            return
        try:
            obj = load(block, T_LEAF if leaf_level else T_NODE)
        except CorruptMetadata as e:
            fatal(e.block, f"{e.why} (this {what}: {span(lo, hi)} were not checked)")
            incomplete.append(block)
            return
        keys = obj.keys
        if keys and (keys[0] < lo or (hi is not None and keys[-1] >= hi)):
            fatal(block, f"{what} keys outside its range ({span(lo, hi)})")
        if leaf_level:
            for k, sc in zip(obj.keys, obj.vals, strict=True):
                if k >> 96 == INDEX:
                    index.append((*unpack_index(k), sc))
                    continue
                o, c, t = unpack_key(k)
                if c >= store.origin_chunks:
                    fatal(block, f"exception for chunk {c} past the end of the origin")
                if o == MERGED:
                    markers[0] += 1
                    if t != 0 or sc != 0:
                        fatal(block, f"malformed merge marker at chunk {c}")
                    continue
                entries.append((o, c, t, sc))
                if not first_data_chunk <= sc < nchunks:
                    fatal(block, f"chunk {c} (version {o}): store chunk {sc} out of range")
                    continue
                if sc in referenced_chunks:
                    fatal(block, f"store chunk {sc} is the exception of both (version, "
                                 f"chunk) {referenced_chunks[sc]} and {(o, c)}")
                referenced_chunks[sc] = (o, c)
                for b in range(sc * bpc, (sc + 1) * bpc):
                    if not bitmap.test(b):
                        fatal(block, f"store chunk {sc} (version {o}, chunk {c}) is free "
                                     "in the bitmap")
                        break
            return
        if not keys:
            fatal(block, "index node without children")
        for i, (k, child) in enumerate(zip(obj.keys, obj.children, strict=True)):
            child_lo = lo if i == 0 else k
            child_hi = obj.keys[i + 1] if i + 1 < len(obj.keys) else hi
            walk(child, level + 1, child_lo, child_hi)

    walk(store.state.root, 0, 0, None)
    for f in store.check_entries(entries, markers[0]):
        findings.append(f)
    if not incomplete:
        findings += store.check_index(entries, index)

    # The incremental space figures against a recount (only a complete one is exact).
    # They describe the tree as it is in memory: with changes not yet committed, recount
    # that tree instead of the one on disk.
    counted = None
    try:
        if store.has_uncommitted():
            counted = store.recount_space()
        elif not incomplete:
            counted = store.recount_space(entries)
    except CorruptMetadata as e:
        incomplete.append(e.block)
    if not incomplete and counted is not None:
        for msg in store.space_drift(counted, _namer(store)):
            fatal(None, msg)

    # A data chunk must not lie over a tree block (each allocated exactly once).
    for b, what in referenced_blocks.items():
        c = b // bpc
        if c in referenced_chunks:
            fatal(b, f"store chunk {c} (version, chunk {referenced_chunks[c]}) overlaps the "
                     f"{what} in block {b}")

    # Leaks: allocated blocks past the reserved area that nothing references.
    used_by_chunks: set[int] = set()
    for c in referenced_chunks:
        used_by_chunks.update(range(c * bpc, (c + 1) * bpc))
    leaked = 0
    first_leak = None
    skip = no_leak_count
    if incomplete:
        findings.append(Finding("warning", None, "leaked space not counted: the tree walk "
                                                 "did not reach every block"))
        return findings
    for b in range(bitmap.data_start, sb.blocks):
        if skip and any(b in r for r in skip):
            continue
        if bitmap.test(b) and b not in referenced_blocks and b not in used_by_chunks:
            leaked += 1
            if leaks is not None:
                leaks.append(b)
            first_leak = b if first_leak is None else first_leak
    if leaked:
        findings.append(Finding("warning", first_leak,
                                f"{leaked} allocated blocks are not referenced (leaked space)"))
    return findings


def _namer(store):
    def name_of(v: int) -> str:
        try:
            return store.table.slot(v).name
        except KeyError:
            return f"#{v}"
    return name_of
