"""The snapshot table: the versions of the origin and their tree (the per-snapshot space
accounting over it is :mod:`ddsnap.store.space`).

The table maps version ids to snapshots (seed 000's ``snaplist`` with its ``tag``; seed
001 wishes for a name table).  In format v3 a snapshot is a *version*: it has an id
(1, 2, ... never reused), a parent version (the origin, 0, or another snapshot) and a
state; a deleted snapshot that other snapshots were taken of stays as a *ghost* until
the last of them is gone (the versioned pointers of the seed's author; docs/format.md,
"Versioned exceptions").
"""

from __future__ import annotations

import bisect
import dataclasses
import heapq
import time

from ..errors import InvalidArgument, SnapshotExists, SnapshotNotFound, TooManySnapshots
from .format import (
    MAX_NAME,
    MAX_VERSION,
    ORIGIN,
    SLOT_DELETING,
    SLOT_FREE,
    SLOT_LIVE,
    SnapSlot,
)
from .model import SnapshotInfo


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


class VersionTable:
    """The snapshot table: slots (their index is where they are stored) holding the
    versions of the origin, and the version tree they make.

    Every version but the origin has a slot; ``children`` lists, per version, the ids of
    the versions taken of it that are not free (live, ghost or being deleted), ascending.
    The origin (id 0) has no slot.

    Attributes:
        slots: one :class:`SnapSlot` per slot.
        dirty: slot indexes changed since the last commit.
        cap: most versions (live, ghosts, being deleted) the store may hold; 0 for no
            limit (``ddsnap init --max-snapshots``).
    """

    def __init__(self, slots: list[SnapSlot], cap: int = 0):
        self.slots = slots
        self.dirty: set[int] = set()
        self.cap = cap
        self.index: dict[int, int] = {}  # version id -> slot index
        self.children: dict[int, list[int]] = {ORIGIN: []}
        self._free: list[int] = []  # free slot indexes (a heap)
        self.names: dict[str, int] = {}  # live snapshot name -> version id
        #: bumped on every change of the tree or of a state (cached figures depend on it)
        self.generation = 0
        for i, s in enumerate(slots):
            if s.state == SLOT_FREE:
                self._free.append(i)
            else:
                self.index[s.id] = i
                if s.state == SLOT_LIVE:
                    self.names[s.name] = s.id
        heapq.heapify(self._free)
        for vid in sorted(self.index):
            self.children.setdefault(vid, [])
        for vid in sorted(self.index):
            self.children.setdefault(self.slot(vid).parent, []).append(vid)
        #: the live snapshots' descriptions, by id (ascending: ids only grow)
        self._live: dict[int, SnapshotInfo] = {
            vid: self.info(vid) for vid in sorted(self.names.values())}

    def problems(self) -> list[str]:
        """What is wrong with the tree as read (``check``): duplicate ids, parents that
        are not versions."""
        out = []
        seen: set[int] = set()
        for s in self.slots:
            if s.state != SLOT_FREE:
                if s.id in seen:
                    out.append(f"snapshot id {s.id} is in the table twice")
                seen.add(s.id)
        for vid in self.index:
            p = self.slot(vid).parent
            if p != ORIGIN and p not in self.index:
                out.append(f"snapshot id {vid} was taken of version {p}, which is not in "
                           "the table")
        return out

    # -- looking up ------------------------------------------------------------------------

    def slot(self, vid: int) -> SnapSlot:
        return self.slots[self.index[vid]]

    def parent(self, vid: int) -> int:
        return self.slots[self.index[vid]].parent

    def state(self, vid: int) -> int:
        i = self.index.get(vid)
        return SLOT_FREE if i is None else self.slots[i].state

    def is_live(self, vid: int) -> bool:
        i = self.index.get(vid)
        return i is not None and self.slots[i].state == SLOT_LIVE

    def exists(self, vid: int) -> bool:
        return vid == ORIGIN or vid in self.index

    def ancestors(self, vid: int) -> list[int]:
        """``vid``'s parent, grandparent, ... down to and including the origin."""
        out = []
        while vid != ORIGIN:
            vid = self.parent(vid)
            out.append(vid)
        return out

    def info(self, vid: int) -> SnapshotInfo:
        s = self.slot(vid)
        parent_name = None
        if s.parent == ORIGIN:
            parent_name = "origin"
        elif self.is_live(s.parent):
            parent_name = self.slot(s.parent).name
        return SnapshotInfo(s.name, s.id, s.created, s.read_only, s.parent, parent_name,
                            s.size)

    def live(self) -> list[SnapshotInfo]:
        """Live snapshots, oldest (lowest id) first."""
        return list(self._live.values())

    def live_ids(self) -> list[int]:
        return list(self._live)

    def with_state(self, state: int) -> list[int]:
        return sorted(vid for vid in self.index if self.state(vid) == state)

    def find(self, name: str) -> int:
        """The id of the live snapshot called ``name``.

        Raises:
            SnapshotNotFound: no such snapshot.
        """
        vid = self.names.get(name)
        if vid is None:
            raise SnapshotNotFound(name)
        return vid

    # -- changing --------------------------------------------------------------------------

    def has_free_slot(self) -> bool:
        return bool(self._free)

    def extend(self, n: int) -> None:
        """Add ``n`` free slots at the end (a new table block)."""
        base = len(self.slots)
        self.slots.extend(SnapSlot() for _ in range(n))
        for i in range(base, base + n):
            heapq.heappush(self._free, i)
            self.dirty.add(i)

    def _touch(self, i: int) -> None:
        self.dirty.add(i)
        self.generation += 1

    def create(self, name: str, read_only: bool, sid: int, created: int | None,
               parent: int = ORIGIN, size: int = 0) -> SnapshotInfo:
        """Add version ``sid`` taken of ``parent`` in a free slot (a new slot at the end
        when none is free: the caller stores it), in O(log slots).

        Raises:
            SnapshotExists, InvalidArgument: as the names say.
            TooManySnapshots: :attr:`cap` versions exist, or ids are exhausted.
        """
        validate_name(name)
        if name in self.names:
            raise SnapshotExists(name)
        if sid > MAX_VERSION:
            raise TooManySnapshots(f"snapshot ids are exhausted ({MAX_VERSION})")
        if self.cap and len(self.index) >= self.cap:
            pending = len(self.index) - len(self.live_ids())
            more = f" ({pending} deleted but still needed or being swept)" if pending else ""
            raise TooManySnapshots(f"the store holds its limit of {self.cap} snapshots"
                                   f"{more}; delete a snapshot first")
        if parent != ORIGIN and not self.is_live(parent):
            raise SnapshotNotFound(f"#{parent}")
        created = time.time_ns() if created is None else created
        if self._free:
            i = heapq.heappop(self._free)
        else:
            i = len(self.slots)
            self.slots.append(SnapSlot())
        self.slots[i] = SnapSlot(SLOT_LIVE, read_only, sid, created, name, parent, size)
        self.index[sid] = i
        self.names[name] = sid
        self.children[sid] = []
        bisect.insort(self.children.setdefault(parent, []), sid)
        self._touch(i)
        info = self._live[sid] = self.info(sid)
        return info

    def set_state(self, vid: int, state: int) -> None:
        """Move version ``vid`` to ``state`` (live, ghost or being deleted)."""
        i = self.index[vid]
        s = self.slots[i]
        if s.state == SLOT_LIVE and state != SLOT_LIVE:
            self.names.pop(s.name, None)
            del self._live[vid]
            for child in self.children.get(vid, ()):
                if child in self._live:  # its parent has no name any more
                    self._live[child] = dataclasses.replace(self._live[child],
                                                            parent_name=None)
        name = s.name if state == SLOT_LIVE else ""
        self.slots[i] = SnapSlot(state, s.read_only and state == SLOT_LIVE, s.id, s.created,
                                 name, s.parent, s.size)
        self._touch(i)

    def begin_delete(self, name: str) -> SnapshotInfo:
        """The live snapshot ``name`` becomes a version being deleted (its name is free
        at once).

        Raises:
            SnapshotNotFound: no such snapshot.
        """
        vid = self.find(name)
        info = self.info(vid)
        self.set_state(vid, SLOT_DELETING)
        return info

    def free(self, vid: int) -> None:
        """Forget version ``vid`` (swept, no versions taken of it left)."""
        i = self.index.pop(vid)
        if self.slots[i].state == SLOT_LIVE:
            self.names.pop(self.slots[i].name, None)
            del self._live[vid]
        parent = self.slots[i].parent
        self.slots[i] = SnapSlot()
        heapq.heappush(self._free, i)
        kids = self.children.get(parent)
        if kids is not None:
            k = bisect.bisect_left(kids, vid)
            if k < len(kids) and kids[k] == vid:
                del kids[k]
        self.children.pop(vid, None)
        self._touch(i)
