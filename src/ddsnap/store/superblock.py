"""The superblock slots of the on-disk store and its layout: where a store of a given size
puts its metadata, the smallest store a geometry accepts, and reading both slots with a
report on each (docs/format.md "Superblock"; a damaged or stale slot is a warning while
the other is good).
"""


from __future__ import annotations

from dataclasses import dataclass

from ..errors import CorruptMetadata, FormatTooOld, NotAStore
from .blockdev import BlockDevice
from .format import (
    BITS_PER_BITMAP,
    BLOCK_SHIFT,
    BLOCK_SIZE,
    MAGIC,
    T_SNAPTABLE,
    VERSION_V1,
    VERSION_V2,
    Superblock,
    header_version,
)
from .model import Finding, check_geometry


def layout(blocks: int, bpc: int, max_snapshots: int, journal_blocks: int | None):
    """Where a store of ``blocks`` 4 KiB blocks puts its metadata: returns
    ``(snaptable blocks, bitmap blocks, journal blocks, first data block)``.  The table
    starts as one block; it grows as a chain of blocks from the data area."""
    st_blocks = 1
    bm_blocks = -(-blocks // BITS_PER_BITMAP)
    if journal_blocks is None:
        journal_blocks = min(2048, max(256, blocks // 16))
    j_start = 2 + st_blocks + bm_blocks
    data_start = -(-(j_start + journal_blocks) // bpc) * bpc
    return st_blocks, bm_blocks, journal_blocks, data_start


def fits(blocks: int, bpc: int, data_start: int) -> bool:
    """The rule of :meth:`SharedStore.create`: the metadata, the tree's first two blocks
    and at least one data chunk fit in ``blocks``."""
    return data_start + 2 + bpc <= blocks


def min_store_size(chunk_size: int, max_snapshots: int = 0,
                   journal_blocks: int | None = None) -> int:
    """The smallest store, in bytes, :meth:`SharedStore.create` accepts for this geometry.

    That store holds its metadata, the tree's first leaf and index node and one data
    chunk; it is a whole number of chunks.  A bigger size is accepted too (the layout only
    grows with the size by less than the size does).

    Args:
        chunk_size: bytes per chunk (a power of two from 4 KiB to 1 MiB).
        max_snapshots: the snapshot limit (0: none; it does not change the layout).
        journal_blocks: journal size in 4 KiB blocks (default: as ``create`` chooses it).

    Raises:
        InvalidArgument: bad geometry.
    """
    check_geometry(chunk_size, max_snapshots)
    bpc = chunk_size >> BLOCK_SHIFT
    blocks = bpc
    while True:
        # The layout only grows with ``blocks``, so stepping up to what the last guess
        # needs reaches the least size that fits, from below.
        data_start = layout(blocks, bpc, max_snapshots, journal_blocks)[3]
        if fits(blocks, bpc, data_start):
            return blocks * BLOCK_SIZE
        need = data_start + 2 + bpc
        blocks = max(blocks + bpc, -(-need // bpc) * bpc)


@dataclass
class SlotReport:
    """What one superblock slot holds: ``status`` is ``"ok"``, ``"stale"`` (valid but
    older than the generation before the newest), ``"damaged"`` (fails its checks) or
    ``"blank"`` (no ddsnap magic); ``generation`` when valid; ``why`` for the others."""

    slot: int
    status: str
    generation: int | None = None
    journal_tail: int | None = None
    journal_seq: int | None = None
    why: str = ""

    def finding(self) -> Finding | None:
        """A warning naming the slot, or None for a good one."""
        if self.status == "ok":
            return None
        return Finding("warning", self.slot, f"superblock slot {self.slot} is {self.status}"
                                             f"{': ' + self.why if self.why else ''}")


def read_superblocks(dev: BlockDevice) -> tuple[Superblock, list[SlotReport]]:
    """Read both superblock slots; return the newest valid one and a report per slot.

    A slot that fails its checks while the other is valid is a warning, not an error:
    the journal is never overwritten from the older slot's tail on and freed space is
    not reused until both slots are past it, so recovery from the older slot is safe.

    Raises:
        NotAStore: no slot has the ddsnap magic and nothing else says it is a store.
        CorruptMetadata: no slot checks out (block 0 or the slot that failed), for a
            device that is a ddsnap store by its other metadata.
        FormatTooOld: a format-v1 or v2 store (``ddsnap upgrade`` converts it).
    """
    if dev.size < 2 * BLOCK_SIZE:
        raise NotAStore(dev.path, "too small")
    found: list[Superblock] = []
    reports: list[SlotReport] = []
    v1 = 0  # the older format version found, if any
    for slot in (0, 1):
        buf = dev.pread(BLOCK_SIZE, slot * BLOCK_SIZE)
        if buf[:4] != MAGIC:
            reports.append(SlotReport(slot, "blank", why="no ddsnap magic"))
            continue
        try:
            sb = Superblock.decode(buf, slot)
        except CorruptMetadata as e:
            old = header_version(buf)
            if old in (VERSION_V1, VERSION_V2):
                try:
                    Superblock.decode(buf, slot, version=old)
                    v1 = old
                except CorruptMetadata:
                    pass
            reports.append(SlotReport(slot, "damaged", why=e.why))
            continue
        found.append(sb)
        reports.append(SlotReport(slot, "ok", sb.generation, sb.journal_tail, sb.journal_seq))
    if not found:
        if v1:
            raise FormatTooOld(dev.path, v1)
        if all(r.status == "blank" for r in reports):
            # Both slots overwritten is damage, not "not a store", if the rest says store.
            if _looks_like_store(dev):
                raise CorruptMetadata(0, "both superblock slots are damaged (no ddsnap "
                                         "magic), but the rest of the device is a store")
            raise NotAStore(dev.path)
        bad = next(r for r in reports if r.status == "damaged")
        raise CorruptMetadata(bad.slot, f"no valid superblock: slot {bad.slot}: {bad.why}")
    sb = max(found, key=lambda s: s.generation)
    for r in reports:
        if r.status == "ok" and r.generation != sb.generation and r.generation != sb.generation - 1:
            r.status = "stale"
            r.why = f"generation {r.generation}, the other slot has {sb.generation}"
        elif (r.status == "ok" and r.generation == sb.generation - 1
              and sb.journal_tail < (r.journal_tail or 0)):
            r.status = "stale"
            r.why = "its journal tail is past the newer slot's"
    return sb, reports


def read_superblock(dev: BlockDevice) -> Superblock:
    """The newest valid superblock of ``dev`` (see :func:`read_superblocks`)."""
    return read_superblocks(dev)[0]


def _looks_like_store(dev: BlockDevice) -> bool:
    """True if block 2 (the first snapshot table block) carries ddsnap's magic."""
    if dev.size < 3 * BLOCK_SIZE:
        return False
    buf = dev.pread(BLOCK_SIZE, 2 * BLOCK_SIZE)
    return buf[:4] == MAGIC and buf[4:6] == T_SNAPTABLE.to_bytes(2, "little")
