"""The snapshot table and the exception-list operations both stores share.

The table maps sharemap bits to snapshots (seed 000 ``snaplist`` with ``tag``/``bit``;
seed 001 wishes for a name table, which format v1 has).  The exception-list helpers work
on one logical chunk's exceptions, a list of ``[sharemap, store_chunk]`` pairs, exactly as
seed 000's leaf operations (``origin_chunk_unique``, ``snapshot_chunk_unique``,
``add_exception_to_leaf``) do on the encoded leaf.
"""

from __future__ import annotations

import time

from ..errors import InvalidArgument, SnapshotExists, SnapshotNotFound, TooManySnapshots
from .api import SnapshotInfo
from .format import MAX_NAME, SLOT_DELETING, SLOT_FREE, SLOT_LIVE, SnapSlot


def validate_name(name: str) -> None:
    """Check a snapshot name: 1..255 bytes of UTF-8, no '/', not ``origin``, and no
    character that would act on a terminal or split a line when the name is printed.

    Refused characters: the C0 controls (U+0000..U+001F: NUL, newline, ESC of terminal
    escape sequences, ...), DEL (U+007F), the C1 controls (U+0080..U+009F, CSI and NEL
    among them) and the Unicode line and paragraph separators (U+2028, U+2029).  The
    message names the first one and its position (counted in characters from 1).

    Raises:
        InvalidArgument: the name is not acceptable.
    """
    if not isinstance(name, str):
        raise InvalidArgument(f"snapshot name must be 1 to {MAX_NAME} bytes of UTF-8")
    try:
        raw = name.encode("utf-8", errors="strict")
    except UnicodeEncodeError as e:
        # A command-line argument that was not UTF-8 (Python keeps its bytes as lone
        # surrogates).
        raise InvalidArgument(f"snapshot name is not valid UTF-8 (at position {e.start + 1})"
                              ) from None
    if not raw or len(raw) > MAX_NAME:
        raise InvalidArgument(f"snapshot name must be 1 to {MAX_NAME} bytes of UTF-8")
    for i, ch in enumerate(name):
        if _is_control(ch):
            raise InvalidArgument(f"snapshot name contains a control character "
                                  f"U+{ord(ch):04X} at position {i + 1}")
    if "/" in name:
        raise InvalidArgument("snapshot name must not contain '/'")
    if name == "origin":
        raise InvalidArgument("'origin' is the origin's export name, not a snapshot name")


def _is_control(ch: str) -> bool:
    c = ord(ch)
    return c < 0x20 or 0x7F <= c <= 0x9F or c in (0x2028, 0x2029)


class SnapshotTable:
    """Snapshot slots indexed by sharemap bit, with the changes since the last commit.

    Attributes:
        slots: one :class:`SnapSlot` per bit.
        dirty: bits whose slot changed since :meth:`take_dirty`.
    """

    def __init__(self, slots: list[SnapSlot]):
        self.slots = slots
        self.dirty: set[int] = set()
        self._live_mask: int | None = None  # cached: every origin write asks for it

    def live(self) -> list[SnapshotInfo]:
        out = [SnapshotInfo(s.name, s.id, bit, s.created, s.read_only)
               for bit, s in enumerate(self.slots) if s.state == SLOT_LIVE]
        out.sort(key=lambda i: i.id)
        return out

    @property
    def live_mask(self) -> int:
        """Bits of the live snapshots (cached; the methods changing slots drop it)."""
        m = self._live_mask
        if m is None:
            m = 0
            for bit, s in enumerate(self.slots):
                if s.state == SLOT_LIVE:
                    m |= 1 << bit
            self._live_mask = m
        return m

    @property
    def deleting_mask(self) -> int:
        m = 0
        for bit, s in enumerate(self.slots):
            if s.state == SLOT_DELETING:
                m |= 1 << bit
        return m

    def find(self, name: str) -> int:
        for bit, s in enumerate(self.slots):
            if s.state == SLOT_LIVE and s.name == name:
                return bit
        raise SnapshotNotFound(name)

    def create(self, name: str, read_only: bool, sid: int, created: int | None) -> SnapshotInfo:
        """Take the lowest free bit for a new snapshot (seed 000 ``create_snapshot``)."""
        validate_name(name)
        if any(s.state == SLOT_LIVE and s.name == name for s in self.slots):
            raise SnapshotExists(name)
        for bit, s in enumerate(self.slots):
            if s.state == SLOT_FREE:
                break
        else:
            deleting = sum(1 for s in self.slots if s.state == SLOT_DELETING)
            more = f" ({deleting} still being deleted)" if deleting else ""
            raise TooManySnapshots(
                f"all {len(self.slots)} snapshot slots are in use{more}; delete a snapshot first")
        created = time.time_ns() if created is None else created
        self.slots[bit] = SnapSlot(SLOT_LIVE, read_only, sid, created, name)
        self.dirty.add(bit)
        self._live_mask = None
        return SnapshotInfo(name, sid, bit, created, read_only)

    def begin_delete(self, name: str) -> SnapshotInfo:
        bit = self.find(name)
        s = self.slots[bit]
        info = SnapshotInfo(s.name, s.id, bit, s.created, s.read_only)
        self.slots[bit] = SnapSlot(SLOT_DELETING, False, s.id, s.created, "")
        self.dirty.add(bit)
        self._live_mask = None
        return info

    def finish_delete(self, mask: int) -> None:
        """Free the slots of the swept bits in ``mask``."""
        for bit, s in enumerate(self.slots):
            if mask >> bit & 1 and s.state == SLOT_DELETING:
                self.slots[bit] = SnapSlot()
                self.dirty.add(bit)
        self._live_mask = None


# -- one logical chunk's exceptions: a list of [sharemap, store_chunk] -------------------

def exc_sharers(excs: list[list[int]] | None, live: int) -> int:
    """Live bits that have no exception here and so read the origin."""
    used = 0
    for share, _c in excs or ():
        used |= share
    return live & ~used


def exc_lookup(excs: list[list[int]] | None, bit: int) -> tuple[int | None, bool]:
    """``(store_chunk, unique)`` of snapshot ``bit`` in this list."""
    mask = 1 << bit
    for share, c in excs or ():
        if share & mask:
            return c, share == mask
    return None, False


def exc_remove_bits(excs: list[list[int]], mask: int) -> list[int]:
    """Clear ``mask`` from every sharemap; drop emptied exceptions; return their chunks."""
    freed = []
    keep = []
    for e in excs:
        if e[0] & mask:
            e[0] &= ~mask
            if not e[0]:
                freed.append(e[1])
                continue
        keep.append(e)
    excs[:] = keep
    return freed


def exc_add_snapshot(excs: list[list[int]], bit: int, store_chunk: int) -> list[int]:
    """Move ``bit`` from its old exception (if any) to a new one at ``store_chunk``.

    Returns store chunks whose exceptions became empty (normally none: a caller only
    makes a chunk unique when it was shared).
    """
    freed = exc_remove_bits(excs, 1 << bit)
    excs.append([1 << bit, store_chunk])
    return freed


# -- per-snapshot space accounting (issue 3, "Space accounting") -------------------------

def _bits(mask: int):
    """The set bits of ``mask``, lowest first (O(popcount))."""
    while mask:
        low = mask & -mask
        yield low.bit_length() - 1
        mask ^= low


class SpaceAccount:
    """Exact per-snapshot space figures, kept up to date as sharemaps change.

    An exception *belongs* to the live snapshots in its sharemap (``sharemap & live``).
    For a live snapshot ``b``:

    * ``exclusive[b]``: exceptions whose live part is exactly ``{b}``.  Deleting ``b``
      (and sweeping) frees exactly these: bits of snapshots already being deleted
      (``SLOT_DELETING``, still in sharemaps until swept) do not keep a chunk alive.
    * ``shared[b]``: exceptions whose live part holds ``b`` and at least one other
      snapshot.

    ``orphans`` counts exceptions with no live snapshot at all (only deleted snapshots'
    bits, freed by the sweep in progress) and ``exceptions`` every exception.  All are in
    store chunks: each exception holds one store chunk.

    The figures follow from ``groups`` (how many exceptions carry each distinct sharemap)
    and ``live``.  ``exclusive`` and ``orphans`` are kept as sharemaps change; ``shared``
    is counted from ``groups`` when it is asked for (status), because keeping it would
    cost every copy-out O(live snapshots) -- the one cost that grew with the number of
    snapshots on the write path.  Costs: :meth:`change` is O(1);
    :meth:`created` is O(1) (a free bit is in no sharemap, DESIGN.md invariant 6);
    :meth:`deleted` is O(number of distinct sharemaps).  Memory is O(distinct sharemaps),
    which copy-on-write makes small: sharemaps are born as the live set of one moment
    (an origin copy-out) or a single bit (a snapshot write) and only lose bits after.

    Source: issue 3 ("Space accounting"); seed 001 leaves ``shared_fraction_full`` a
    FIXME.  ``exclusive`` is what ZFS reports as a snapshot's ``used`` ("space referenced
    exclusively by this snapshot", freed if it is destroyed), made exact and incremental
    for a shared store by counting sharemaps.

    Args:
        width: sharemap width in bits (``max_snapshots``).
        live: the live snapshots' bits.
    """

    def __init__(self, width: int, live: int = 0):
        self.width = width
        self.live = live
        self.groups: dict[int, int] = {}
        self.exclusive = [0] * width
        self._shared: list[int] | None = None  # counted on demand, see shared
        self.orphans = 0
        self.exceptions = 0

    @classmethod
    def from_exceptions(cls, width: int, live: int, exceptions) -> "SpaceAccount":
        """Count ``exceptions`` (``(chunk, [[sharemap, store_chunk], ...])`` as
        :meth:`ExceptionStore.exceptions` yields): the one full walk, at open or check."""
        acc = cls(width, live)
        for _chunk, excs in exceptions:
            for share, _sc in excs:
                acc.change(0, share)
        return acc

    @property
    def shared(self) -> list[int]:
        """Per bit, the exceptions its snapshot shares with another live one (chunks)."""
        if self._shared is None:
            shared = [0] * self.width
            live = self.live
            for share, n in self.groups.items():
                m = share & live
                if m & (m - 1):
                    for b in _bits(m):
                        shared[b] += n
            self._shared = shared
        return self._shared

    def _live_add(self, m: int, n: int) -> None:
        if not m:
            self.orphans += n
        elif not m & (m - 1):
            self.exclusive[m.bit_length() - 1] += n
        else:
            self._shared = None

    def change(self, old: int, new: int) -> None:
        """One exception's sharemap goes from ``old`` to ``new`` (0: no exception)."""
        if old == new:
            return
        groups = self.groups
        if old:
            n = groups[old] - 1
            if n:
                groups[old] = n
            else:
                del groups[old]
            self.exceptions -= 1
        if new:
            groups[new] = groups.get(new, 0) + 1
            self.exceptions += 1
        om, nm = old & self.live, new & self.live
        if old and new and om == nm:
            return  # e.g. the sweep clearing deleted snapshots' bits
        if old:
            self._live_add(om, -1)
        if new:
            self._live_add(nm, 1)

    def diff(self, before, after) -> None:
        """One logical chunk's exception list went from ``before`` to ``after`` (lists
        of ``[sharemap, store_chunk]``); only the exceptions that changed cost anything."""
        if len(before) == 1 and len(after) == 1 and before[0][1] == after[0][1]:
            self.change(before[0][0], after[0][0])
            return
        old = {}
        for share, sc in before:
            old[(share, sc)] = old.get((share, sc), 0) + 1
        for share, sc in after:
            k = (share, sc)
            if old.get(k):
                old[k] -= 1
            else:
                self.change(0, share)
        for (share, _sc), n in old.items():
            for _ in range(n):
                self.change(share, 0)

    def created(self, bit: int) -> None:
        """Snapshot ``bit`` became live.  Its bit was free, so no sharemap holds it."""
        self.live |= 1 << bit
        self._shared = None

    def deleted(self, bit: int) -> None:
        """Snapshot ``bit`` left the live set (its bit may stay in sharemaps until swept):
        the exceptions it shared may now be exclusive to another snapshot, or orphans."""
        mask = 1 << bit
        live = self.live
        self.live = live & ~mask
        self._shared = None
        for share, n in self.groups.items():
            if share & mask:
                self._live_add(share & live, -n)
                self._live_add(share & live & ~mask, n)

    def figures(self) -> dict[int, tuple[int, int]]:
        """``{bit: (exclusive, shared)}`` in chunks for every live snapshot."""
        return {b: (self.exclusive[b], self.shared[b]) for b in _bits(self.live)}

    def drift(self, truth: "SpaceAccount", name_of) -> list[str]:
        """How these figures differ from ``truth`` (recounted from the tree); one message
        per wrong figure, naming the snapshot (``name_of(bit)``)."""
        out = []
        if self.live != truth.live:
            out.append(f"space accounting: live snapshots {self.live:#x} counted, "
                       f"{truth.live:#x} in the snapshot table")
        mine, real = self.figures(), truth.figures()
        for b in sorted(set(mine) | set(real)):
            if mine.get(b) != real.get(b):
                me, tr = mine.get(b, (0, 0)), real.get(b, (0, 0))
                out.append(f"space accounting of snapshot {name_of(b)!r} (bit {b}) "
                           f"drifted: exclusive {me[0]}, shared {me[1]} chunks counted, "
                           f"exclusive {tr[0]}, shared {tr[1]} in the tree")
        if (self.exceptions, self.orphans) != (truth.exceptions, truth.orphans):
            out.append(f"space accounting drifted: {self.exceptions} exception chunks "
                       f"({self.orphans} of deleted snapshots) counted, "
                       f"{truth.exceptions} ({truth.orphans}) in the tree")
        if self.groups != truth.groups:
            diff = sorted(set(self.groups.items()) ^ set(truth.groups.items()))
            out.append(f"space accounting drifted: {len(diff)} sharemap counts differ "
                       f"from the tree, first sharemap {diff[0][0]:#x}")
        return out
