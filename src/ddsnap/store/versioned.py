"""Versioned exceptions: the snapshot logic both stores share (format v3).

Every snapshot is a *version* of the origin, with an id (1, 2, ... never reused) and a
parent: the origin (version 0) or the snapshot it was taken of.  An exception is one
entry of an ordered map, keyed ``(owner, chunk, tag)`` (:func:`~.format.pack_key`), whose
value is the store chunk holding the data:

* tag :data:`~.format.INF`: the owner's own *current* data at that logical chunk (only
  snapshots have these: the origin's current data is the origin device itself);
* any other tag ``t``: a *history* entry, the data the owner had at that chunk before a
  write, kept for the versions taken of the owner.  ``t`` is the newest version taken
  of the owner when that write happened; the entry serves those of its children whose
  id lies between the previous tag at that chunk (exclusive) and ``t`` (inclusive).

So the data of version ``v`` at chunk ``c`` is its own current entry if it has one, else
its parent's data *as of v's creation*: the parent's first entry at ``c`` with a tag
``>= v`` (a successor probe), else, in turn, the grandparent's as of the parent's
creation, and so on; reaching the origin with no entry means "read the origin device".
For a snapshot of the origin that is one probe, whatever the number of snapshots; a
logical chunk can have any number of exceptions (they are separate entries of one tree).

This is the *versioned pointers* idea of seed 000's author (exceptions labelled with the
version they belong to, found by the nearest ancestor), with the origin kept in place as
in seed 000 (ddsnap's origin is a real device the copy-outs are taken from).  The
subclasses give the ordered map: :class:`~.memory.MemoryStore` a sorted dict,
:class:`~.shared.SharedStore` the on-disk B-tree.  docs/format.md ("Versioned
exceptions") has the reasoning and the costs.

This module is longer than 600 lines on purpose: it is one set of rules over one map.
Lookups, writes, the sweep, merge markers and the checks all edit or read the same entries
under the same invariants, through the same private helpers (``_resolve``, ``_shadow``,
the group keys of the space account); split over modules, each part would reach into the
others' private state.  The space figures themselves are :mod:`~.space`, the version
table :mod:`~.snapshots`.
"""

from __future__ import annotations

import abc
import bisect

from sortedcontainers import SortedList

from .api import ExceptionStore
from .format import (
    INDEX,
    INF,
    MERGED,
    ORIGIN,
    SLOT_DELETING,
    SLOT_FREE,
    SLOT_GHOST,
    index_key,
    pack_key,
    unpack_index,
    unpack_key,
)
from .model import NO_MERGE, Finding, SnapshotInfo
from .snapshots import VersionTable
from .space import SpaceAccount, region_readers

_EMPTY: frozenset = frozenset()
#: entries one sweep step may look at before it commits
SWEEP_BUDGET = 4096


def _prefix(owner: int, chunk: int) -> int:
    """The part of a key that names ``(owner, chunk)`` (the key without its tag)."""
    return (owner << 64) | chunk


class VersionedStore(ExceptionStore):
    """:class:`ExceptionStore` over an ordered map of versioned exceptions.

    Subclasses provide the map (``_kv_*``), freeing data chunks (:meth:`_free_data`),
    the :class:`VersionTable` in ``self.table``, the root state in ``self.state`` and
    the space account in ``self._space`` (None when it could not be counted).
    """

    table: VersionTable
    _space: SpaceAccount | None

    def _versioned_init(self) -> None:
        #: entries each snapshot owns (its own current data and history kept for its
        #: children); the origin and merge markers are not counted
        self._own: dict[int, int] = {}
        #: snapshots owning at least one entry, ascending (only they can shadow)
        self._writers = SortedList()
        #: False while :attr:`_own` is not known (the walk at open failed): then every
        #: lookup probes for a snapshot's own entries instead of trusting it
        self._own_known = True
        self._sweep_pos: int | None = None
        self._sweep_orphans: dict[tuple, bool] = {}
        self._sweep_reach: dict[tuple, int] = {}
        #: key ranges the sweep walks (owners' entries, tag index ranges), and which
        self._sweep_ranges: list[tuple[int, int]] = []
        self._sweep_i = 0
        self.sweep_budget = SWEEP_BUDGET
        #: entries the sweep has looked at since the store was opened (its cost)
        self.sweep_seen = 0

    # -- the ordered map (subclasses) ------------------------------------------------------

    @abc.abstractmethod
    def _kv_get(self, key: int, nowait: bool = False) -> int | None:
        """The value at ``key``, or None.  ``nowait``: raise NotCached rather than read."""

    @abc.abstractmethod
    def _kv_succ(self, key: int, nowait: bool = False) -> tuple[int, int] | None:
        """The first ``(key, value)`` with a key ``>= key``, or None."""

    @abc.abstractmethod
    def _kv_pred(self, key: int) -> tuple[int, int] | None:
        """The last ``(key, value)`` with a key ``<= key``, or None."""

    @abc.abstractmethod
    def _kv_put(self, key: int, value: int) -> None:
        """Insert or replace.  Must not fail after :meth:`_kv_reserve` allowed it."""

    @abc.abstractmethod
    def _kv_del(self, key: int) -> None:
        """Remove ``key`` (present)."""

    @abc.abstractmethod
    def _kv_range(self, lo: int, hi: int, limit: int | None = None) -> list[tuple[int, int]]:
        """``(key, value)`` with ``lo <= key < hi``, ascending, at most ``limit``."""

    def _kv_reserve(self, keys: list[int]) -> None:
        """Raise StoreFull unless inserting ``keys`` surely fits (no change made)."""

    @abc.abstractmethod
    def _free_data(self, store_chunk: int) -> None:
        """An exception's data chunk is no longer referenced."""

    # -- entries ---------------------------------------------------------------------------

    def _put_entry(self, owner: int, chunk: int, tag: int, sc: int) -> None:
        """Add an entry (and, for the origin's history, its tag index record; the
        caller reserved room for both)."""
        self._kv_put(pack_key(owner, chunk, tag), sc)
        if owner == ORIGIN:
            self._kv_put(index_key(tag, chunk), sc)
        else:
            n = self._own.get(owner, 0)
            self._own[owner] = n + 1
            if not n:
                self._writers.add(owner)

    def _del_entry(self, owner: int, chunk: int, tag: int) -> None:
        self._kv_del(pack_key(owner, chunk, tag))
        if owner == ORIGIN:
            self._kv_del(index_key(tag, chunk))
        else:
            n = self._own.get(owner, 1) - 1  # (unknown counts: see _own_known)
            if n > 0:
                self._own[owner] = n
            else:
                self._own.pop(owner, None)
                self._writers.discard(owner)

    def _has_entries(self, owner: int, chunk: int) -> bool:
        if owner != ORIGIN and owner not in self._own and self._own_known:
            return False
        r = self._kv_succ(pack_key(owner, chunk, 0))
        return r is not None and r[0] >> 32 == _prefix(owner, chunk)

    def _prev_tag(self, owner: int, chunk: int, tag: int) -> int:
        """The tag of the entry before ``(owner, chunk, tag)`` at that chunk, 0 if none."""
        r = self._kv_pred(pack_key(owner, chunk, tag) - 1)
        if r is not None and r[0] >> 32 == _prefix(owner, chunk):
            return r[0] & INF
        return 0

    def _next_entry(self, key: int) -> int | None:
        """The key of the next entry of the same owner at the same chunk, or None."""
        r = self._kv_succ(key + 1)
        if r is not None and r[0] >> 32 == key >> 32:
            return r[0]
        return None

    def _newest_child(self, version: int) -> int:
        kids = self.table.children.get(version)
        return kids[-1] if kids else 0

    # -- lookups ---------------------------------------------------------------------------

    def _resolve(self, version: int, chunk: int, nowait: bool = False
                 ) -> tuple[int, int] | None:
        """``(key, store_chunk)`` of the entry ``version`` reads at ``chunk``, or None for
        the origin device (see the module docstring)."""
        if version in self._own or not self._own_known:
            k = pack_key(version, chunk, INF)
            sc = self._kv_get(k, nowait)
            if sc is not None:
                return k, sc
        return self._resolve_above(version, chunk, nowait)

    def _resolve_above(self, version: int, chunk: int, nowait: bool = False
                       ) -> tuple[int, int] | None:
        """What ``version`` reads at ``chunk`` from its ancestors (as if it had no entry
        of its own there)."""
        parent = self.table.parent
        s, x = version, parent(version)
        while True:
            r = self._kv_succ(pack_key(x, chunk, s), nowait)
            if r is not None and r[0] >> 32 == _prefix(x, chunk):
                return r
            if x == ORIGIN:
                return None
            s, x = x, parent(x)

    def _reads(self, version: int, chunk: int, skip: int | None = None) -> bool:
        """True if some live version in ``version``'s subtree (``version`` included,
        unless it is ``skip``) reads at ``chunk`` what ``version`` inherits there: not
        past an entry of its own there, or of a version between, and within its size
        (the subtree has ``version``'s size: a snapshot's clones take its size)."""
        if self._has_entries(version, chunk) or self.table.slot(version).size <= self._at(chunk):
            return False
        if version != skip and self.table.is_live(version):
            return True
        return any(self._reads(y, chunk, skip) for y in self.table.children.get(version, ()))

    def _at(self, chunk: int) -> int:
        """The byte offset where logical ``chunk`` starts."""
        return chunk * self.chunk_size

    def _readers_after(self, owner: int, lo: int, chunk: int, skip: int | None = None
                       ) -> bool:
        """True if a live version (not ``skip``) in the subtree of a child of ``owner``
        with id > ``lo`` reads ``owner``'s current data at ``chunk``."""
        kids = self.table.children.get(owner, ())
        for i in range(len(kids) - 1, bisect.bisect_right(kids, lo) - 1, -1):
            if self._reads(kids[i], chunk, skip):
                return True
        return False

    # -- the groups of the space account ---------------------------------------------------

    def _shadow(self, owner: int, chunk: int, lo: int, hi: int,
                candidates=None) -> frozenset:
        """The versions below ``owner`` that have entries of their own at ``chunk`` and
        would otherwise read the entry ``(owner, chunk, hi)`` (previous tag ``lo``): the
        nearest ones (see :class:`SpaceAccount`)."""
        ws = self._writers if candidates is None else candidates
        if not ws:
            return _EMPTY
        index = self.table.index
        parent = self.table.parent
        found = []
        start = ws.bisect_right(lo) if candidates is None else 0
        for w in (ws.islice(start) if candidates is None else ws):
            if w <= lo or w == owner:
                continue
            x, y = w, None
            while x != ORIGIN and x in index:  # (an owner not in the table: damage)
                p = parent(x)
                if p == owner:
                    y = x
                    break
                x = p
            if y is None or y <= lo or (hi != INF and y > hi):
                continue
            if candidates is None and not self._has_entries(w, chunk):
                continue
            found.append(w)
        if not found:
            return _EMPTY
        if len(found) > 1:
            fs = set(found)
            keep = []
            for w in found:
                x = parent(w)
                while x != owner and x not in fs and x in index:
                    x = parent(x)
                if x == owner:
                    keep.append(w)
            found = keep
        return frozenset(found)

    def _gkey(self, owner: int, chunk: int, tag: int) -> tuple:
        lo = self._prev_tag(owner, chunk, tag)
        return (owner, lo, tag, self._shadow(owner, chunk, lo, tag))

    def _gkey_of(self, key: int) -> tuple:
        return self._gkey(*unpack_key(key))

    def _count_groups(self, entries=None) -> tuple[SpaceAccount, dict]:
        """Count the groups of every exception: the one full walk of the map (at open;
        ``check`` does it again, over the ``entries`` it read from disk, to compare).
        Returns the account and the entry counts per owner.

        Raises:
            CorruptMetadata: a tree block could not be read.
        """
        def all_entries():
            if entries is not None:
                return iter(entries)
            return self._entries(0, pack_key(MERGED, 0, 0))

        by_chunk: dict[int, list[int]] = {}
        counts: dict[int, int] = {}
        for o, c, _t, _sc in all_entries():
            if o == ORIGIN:
                continue
            counts[o] = counts.get(o, 0) + 1
            lst = by_chunk.setdefault(c, [])
            if not lst or lst[-1] != o:
                lst.append(o)
        acc = SpaceAccount()
        prev = None
        for o, c, t, _sc in all_entries():
            lo = prev[2] if prev is not None and prev[0] == o and prev[1] == c else 0
            cand = by_chunk.get(c)
            shadow = self._shadow(o, c, lo, t, sorted(cand)) if cand else _EMPTY
            acc.add((o, lo, t, shadow))
            prev = (o, c, t)
        return acc, counts

    def _entries(self, lo: int, hi: int, batch: int = 4096):
        """Iterate ``(owner, chunk, tag, store_chunk)`` with keys in ``[lo, hi)``."""
        while True:
            part = self._kv_range(lo, hi, batch)
            for k, v in part:
                o, c, t = unpack_key(k)
                yield o, c, t, v
            if len(part) < batch:
                return
            lo = part[-1][0] + 1

    def _set_counts(self, counts: dict[int, int] | None) -> None:
        """The entries each snapshot owns, from the walk at open; None: unknown (the walk
        failed), so lookups must not trust them."""
        if counts is None:
            self._own, self._writers, self._own_known = {}, SortedList(), False
            return
        self._own = {o: n for o, n in counts.items() if o != ORIGIN}
        self._writers = SortedList(self._own)
        self._own_known = True

    def exceptions(self):
        yield from self._entries(0, pack_key(MERGED, 0, 0))

    # -- snapshots -------------------------------------------------------------------------

    def snapshots(self) -> list[SnapshotInfo]:
        return self.table.live()

    def create_snapshot(self, name, read_only=False, created=None, parent=ORIGIN) -> SnapshotInfo:
        # A snapshot of a snapshot has its parent's size (the origin's may have changed
        # since the parent was taken).
        size = self.origin_size if parent == ORIGIN else self.table.slot(parent).size
        info = self.table.create(name, read_only, self.state.next_snapshot_id, created,
                                 parent, size)
        self.state.next_snapshot_id += 1
        self._state_changed()
        self._table_changed()
        return info

    def ancestors(self, version: int) -> list[int]:
        return self.table.ancestors(version)

    def set_origin_size(self, size: int) -> None:
        """Record the origin's new size in bytes (``ddsnap resize --origin-size``).  The
        caller (the service) grew the device first, or shrinks it after, and made sure
        no version is bigger than a smaller size.  Durable at the next commit."""
        self.origin_size = size
        self._state_changed()

    def versions_past(self, size: int) -> list[SnapshotInfo]:
        """Every version (live, being deleted, or kept for its clones) whose volume is
        bigger than ``size`` bytes: what a shrink of the origin to ``size`` would cut."""
        return [self.table.info(s.id) for s in self.table.slots
                if s.state != SLOT_FREE and s.size > size]

    def begin_delete(self, name) -> SnapshotInfo:
        info = self.table.begin_delete(name)
        self._sweep_pos = None
        self._table_changed()
        return info

    def _table_changed(self) -> None:
        """A slot changed (the subclass records it for the next commit)."""

    # -- mapping ---------------------------------------------------------------------------

    def origin_sharers(self, chunk: int) -> int:
        kids = self.table.children[ORIGIN]
        if not kids:
            return 0
        # Snapshots taken before the origin grew end before the new chunks: nobody reads
        # a chunk past the newest snapshot's end (sizes only grow with the id, as a
        # shrink is refused while a bigger version exists).
        if self.table.slot(kids[-1]).size <= chunk * self.chunk_size:
            return 0
        lo = self._prev_tag(ORIGIN, chunk, INF)
        # The target of a merge without keep reads the origin device only where its data
        # is the origin's already (merged, or never different): it is deleted when the
        # merge completes and not exported meanwhile, so no copy-out is made for it alone
        # (as v2 did; the snapshots taken of it still get theirs).
        m = self.state.merge_version
        skip = m if m != NO_MERGE and not self.state.merge_keep else None
        if kids[-1] <= lo or not self._readers_after(ORIGIN, lo, chunk, skip):
            return 0
        return kids[-1]

    def snapshot_exception(self, version: int, chunk: int):
        return self._lookup(version, chunk, False)

    def snapshot_exception_nowait(self, version: int, chunk: int):
        return self._lookup(version, chunk, True)

    def snapshot_chunk(self, version: int, chunk: int) -> int | None:
        r = self._resolve(version, chunk)
        return None if r is None else r[1]

    def _lookup(self, version: int, chunk: int, nowait: bool):
        r = self._resolve(version, chunk, nowait)
        if r is None:
            return None, False
        key, sc = r
        if nowait:
            return sc, False  # the event loop only reads: no uniqueness probes
        owner, _c, tag = unpack_key(key)
        if owner == version:  # its own current data: unique unless a child reads it
            if not self.table.children.get(version):
                return sc, True
            lo = self._prev_tag(version, chunk, INF)
            return sc, not self._readers_after(version, lo, chunk)
        # An ancestor's exception (a copy-out, say) that no other live snapshot reads
        # (within its size): the snapshot may write it in place, as seed 000 does with a
        # unique exception.
        readers = region_readers(self.table, self._gkey(owner, chunk, tag), limit=2,
                                 reaching=self._at(chunk))
        return sc, readers == [version]

    def _within(self, group: tuple, version: int, chunk: int) -> bool:
        """True if every live reader of ``group`` at logical ``chunk`` (within its size)
        is ``version`` or taken (directly or not) of it."""
        for r in region_readers(self.table, group, reaching=self._at(chunk)):
            while r != version and r != ORIGIN:
                r = self.table.parent(r)
            if r != version:
                return False
        return True

    def snapshot_write_keeps(self, version: int, chunk: int) -> bool:
        if self._has_entries(version, chunk) or not self._readers_after(version, 0, chunk):
            return False
        # The snapshots taken of it read an ancestor's exception through it: when nobody
        # else reads that one, it becomes theirs as it is (no copy).
        r = self._resolve_above(version, chunk)
        return r is None or not self._within(self._gkey_of(r[0]), version, chunk)

    def add_origin_exception(self, chunk, store_chunk, tag) -> None:
        self._kv_reserve([pack_key(ORIGIN, chunk, tag), index_key(tag, chunk)])
        self._put_entry(ORIGIN, chunk, tag, store_chunk)
        if self._space is not None:
            self._space.add(self._gkey(ORIGIN, chunk, tag))

    def add_snapshot_exception(self, version, chunk, store_chunk, kept=None) -> None:
        sp = self._space
        r = self._resolve(version, chunk)
        newest = self._newest_child(version)
        self._kv_reserve([pack_key(version, chunk, newest), pack_key(version, chunk, INF)])
        added = []
        own = r is not None and r[0] >> 96 == version
        if r is not None and (own or (kept is None and self._readers_after(version, 0, chunk)
                                      and self._within(self._gkey_of(r[0]), version, chunk))):
            # The exception it read stays, as it is, for the snapshots taken of it: its
            # own current data (they read it), or an ancestor's exception only its subtree
            # reads; it becomes history tagged with the newest of them (re-keyed, not
            # copied), and the write gets the new chunk.
            owner, _c, etag = unpack_key(r[0])
            nxt = None if own else self._next_entry(r[0])  # (current data sorts last)
            # An ancestor's last entry there: the entry its subtree falls back to loses
            # it from its shadow (a ghost's, say).
            last = not own and nxt is None and self._prev_tag(owner, chunk, etag) == 0
            anc = self._resolve_above(owner, chunk) if last and owner != ORIGIN else None
            if sp is not None:
                old_g = self._gkey_of(r[0])
                old_next = self._gkey_of(nxt) if nxt is not None else None
                old_anc = self._gkey_of(anc[0]) if anc is not None else None
            self._del_entry(owner, chunk, etag)
            self._put_entry(version, chunk, newest, r[1])
            self._put_entry(version, chunk, INF, store_chunk)
            if sp is not None:
                sp.move(old_g, self._gkey(version, chunk, newest))
                sp.add(self._gkey(version, chunk, INF))
                if nxt is not None:  # its previous tag changed
                    sp.move(old_next, self._gkey_of(nxt))
                if anc is not None:
                    sp.move(old_anc, self._gkey_of(anc[0]))
            return
        before = self._gkey_of(r[0]) if r is not None and sp is not None else None
        if kept is not None:
            self._put_entry(version, chunk, newest, kept)
            added.append(newest)
        self._put_entry(version, chunk, INF, store_chunk)
        added.append(INF)
        if sp is not None:
            if r is not None:
                sp.move(before, self._gkey_of(r[0]))
            for t in added:
                sp.add(self._gkey(version, chunk, t))

    # -- removing entries (the sweep) ------------------------------------------------------

    def _remove_entry(self, owner: int, chunk: int, tag: int) -> None:
        """Remove one exception whose data nobody reads, free its chunk, and regroup the
        entries whose group it changes: the next one at that chunk (its previous tag) and,
        when it was the owner's last entry there, the ancestor's entry the owner's subtree
        reads again (its shadow)."""
        sp = self._space
        key = pack_key(owner, chunk, tag)
        sc = self._kv_get(key)
        if sc is None:  # the callers read the entry from the tree just before
            raise AssertionError(f"exception {unpack_key(key)} vanished before its removal")
        nxt = self._next_entry(key)
        last = nxt is None and self._prev_tag(owner, chunk, tag) == 0
        anc = self._resolve_above(owner, chunk) if last and owner != ORIGIN else None
        if sp is not None:
            gk = self._gkey(owner, chunk, tag)
            gnext = self._gkey_of(nxt) if nxt is not None else None
            ganc = self._gkey_of(anc[0]) if anc is not None else None
        self._del_entry(owner, chunk, tag)
        self._free_data(sc)
        if sp is not None:
            sp.move(gk, None)
            if nxt is not None:
                sp.move(gnext, self._gkey_of(nxt))
            if anc is not None:
                sp.move(ganc, self._gkey_of(anc[0]))

    def sweep_step(self) -> bool:
        """Remove up to :attr:`sweep_budget` exceptions no live snapshot reads.

        Only what groups no live snapshot reads can hold is walked, resumably: a
        snapshot owner's key range; for the origin, the tag index ranges of those
        groups' tags (so deleting a snapshot of the origin looks at the copy-outs it
        frees, not at all of them); a delete that frees nothing walks nothing.  When the walk
        is through, deleted versions no other version was taken of are forgotten (their
        parent, if a ghost left without children, is then swept in turn), the others
        stay as ghosts.

        Raises:
            CorruptMetadata: the space figures could not be counted at open (a damaged
                tree block), so what is unread cannot be told.
        """
        deleting = self.table.with_state(SLOT_DELETING)
        if not deleting:
            return True
        sp = self._space_account()
        if self._sweep_pos is None:
            orphans = sp.orphan_groups(self.table)
            self._sweep_orphans = {g: True for g in orphans}
            self._sweep_reach = {}
            owners = sorted({g[0] for g in orphans if g[0] != ORIGIN})
            ranges = [(pack_key(o, 0, 0), pack_key(o + 1, 0, 0)) for o in owners]
            if self._origin_kids_differ():
                # Copy-outs only smaller snapshots share (below) can carry any tag: walk
                # all of the origin's (a store whose origin grew between snapshots).
                ranges.append((pack_key(ORIGIN, 0, 0), pack_key(ORIGIN + 1, 0, 0)))
            else:
                # The origin's entries in orphan groups carry those groups' tags: the tag
                # index lists them, so a delete walks what it frees (and what shares its
                # tags), not every copy-out.
                tags = sorted({g[2] for g in orphans if g[0] == ORIGIN})
                ranges += [(index_key(t, 0), index_key(t + 1, 0)) for t in tags]
            self._sweep_ranges = ranges
            self._sweep_i = 0
            self._sweep_pos = ranges[0][0] if ranges else None
        seen = 0
        while self._sweep_pos is not None and seen < self.sweep_budget:
            end = self._sweep_ranges[self._sweep_i][1]
            part = self._kv_range(self._sweep_pos, end, min(256, self.sweep_budget - seen))
            if not part:
                self._sweep_i += 1
                self._sweep_pos = (self._sweep_ranges[self._sweep_i][0]
                                   if self._sweep_i < len(self._sweep_ranges) else None)
                continue
            for k, _sc in part:
                seen += 1
                if k >> 96 == INDEX:
                    t, c = unpack_index(k)
                    o = ORIGIN
                else:
                    o, c, t = unpack_key(k)
                g = self._gkey(o, c, t)
                orphan = self._sweep_orphans.get(g)
                if orphan is None:
                    orphan = not region_readers(self.table, g, limit=1)
                    self._sweep_orphans[g] = orphan
                if orphan or (o == ORIGIN and self._past_readers(g, c)):
                    self._remove_entry(o, c, t)
            self._sweep_pos = part[-1][0] + 1
        self.sweep_seen += seen
        if self._sweep_pos is not None:
            return False
        # Walk done: forget the deleted versions nothing was taken of; keep the others.
        again = False
        for v in deleting:
            if self.table.children.get(v):
                self.table.set_state(v, SLOT_GHOST)
                continue
            parent = self.table.parent(v)
            self.table.free(v)
            if (parent != ORIGIN and self.table.state(parent) == SLOT_GHOST
                    and not self.table.children.get(parent)):
                self.table.set_state(parent, SLOT_DELETING)
                again = True
        self._table_changed()
        self._sweep_pos = None
        return not again

    def _origin_kids_differ(self) -> bool:
        """True if the origin's snapshots are not all one size (the origin grew between
        them).  Their sizes only grow with the id (a shrink is refused while a bigger
        version exists), so the first and the last tell."""
        kids = self.table.children.get(ORIGIN) or []
        return bool(kids) and self.table.slot(kids[0]).size < self.table.slot(kids[-1]).size

    def _past_readers(self, group: tuple, chunk: int) -> bool:
        """True if every version reading the origin-owned ``group`` ends at or before
        logical ``chunk``: a copy-out made for a bigger snapshot, grouped with older,
        smaller ones (docs/format.md "Resizing"), that nobody reads once the bigger ones
        are gone.  Cached per group for one sweep walk."""
        reach = self._sweep_reach.get(group)
        if reach is None:
            reach = max((self.table.slot(v).size for v in region_readers(self.table, group)),
                        default=0)
            self._sweep_reach[group] = reach
        return reach <= chunk * self.chunk_size

    def origin_kept_past(self, size: int) -> list[int]:
        """Live versions reading a copy-out the origin keeps at a chunk wholly past
        ``size`` bytes (none once the snapshots bigger than ``size`` are deleted and
        swept): what a shrink of the origin to ``size`` must not cut."""
        first = -(-size // self.chunk_size)
        out: set[int] = set()
        for k, _sc in self._kv_range(pack_key(ORIGIN, first, 0), pack_key(ORIGIN + 1, 0, 0),
                                     64):
            out.update(region_readers(self.table, self._gkey_of(k)))
        return sorted(out)

    # -- merge -----------------------------------------------------------------------------

    def _merged(self, chunk: int) -> bool:
        return (chunk < self.state.merge_cursor
                or self._kv_get(pack_key(MERGED, chunk, 0)) is not None)

    # -- what changed between two versions (issue 13) --------------------------------------

    def changed_chunks(self, a: int, b: int, start: int = 0, limit: int = 4096
                       ) -> tuple[list[int], int | None]:
        """Logical chunks ``>= start`` whose data may differ between versions ``a`` and
        ``b`` (0: the origin), ascending, from at least one and about ``limit`` entries
        of the tree; and the chunk to go on from (None: no more).

        A chunk differs when the two versions read different entries there, or one an
        entry and the other the origin device; chunks where neither has an entry on its
        way to the origin (no copy-out, no write) read the origin device in both and are
        never visited.  So the cost follows the entries of ``a``, ``b`` and their
        ancestors (the origin's copy-outs included), not the volume's size; a chunk
        rewritten with the bytes it had is still reported.  Chunks past the smaller
        version's size are not considered (the caller reports them).

        Raises:
            SnapshotNotFound: ``a`` or ``b`` is not a live version (via the table).
        """
        versions = {a, b}
        if ORIGIN in versions and self.merging is not None:
            versions.add(self.merging)  # (the origin reads its data not merged yet)
        owners = sorted({*versions, *(x for v in versions for x in self.ancestors(v))}
                        - {ORIGIN}) + [ORIGIN]
        found: set[int] = set()
        end: int | None = None  # the last chunk every owner's entries were read to
        for o in owners:
            part = self._kv_range(pack_key(o, start, 0), pack_key(o + 1, 0, 0), limit)
            chunks = [unpack_key(k)[1] for k, _ in part]
            found.update(chunks)
            if len(part) == limit:
                end = chunks[-1] if end is None else min(end, chunks[-1])
        if end is not None:
            found = {c for c in found if c <= end}
        out = []
        for c in sorted(found):
            if self._version_source(a, c) != self._version_source(b, c):
                out.append(c)
        return out, (None if end is None else end + 1)

    def _version_source(self, version: int, chunk: int) -> int | None:
        """The store chunk ``version`` reads at ``chunk``, or None for the origin
        device (for the origin during a merge: the merging snapshot's data not merged
        yet)."""
        if version == ORIGIN:
            return self.merge_source(chunk)
        r = self._resolve(version, chunk)
        return None if r is None else r[1]

    def merge_source(self, chunk: int) -> int | None:
        m = self.merging
        if m is None or self._merged(chunk):
            return None
        r = self._resolve(m, chunk)
        return None if r is None else r[1]

    def merge_todo(self, start: int, limit: int) -> list[tuple[int, int]]:
        m = self.merging
        if m is None:
            return []
        path = [m] + self.table.ancestors(m)
        pos = max(start, self.state.merge_cursor)
        out: list[tuple[int, int]] = []
        while len(out) < limit:
            nxt = None
            for o in path:
                r = self._kv_succ(pack_key(o, pos, 0))
                if r is not None and r[0] >> 96 == o:
                    c = unpack_key(r[0])[1]
                    if nxt is None or c < nxt:
                        nxt = c
            if nxt is None:
                break
            if self._kv_get(pack_key(MERGED, nxt, 0)) is None:
                r = self._resolve(m, nxt)
                if r is not None:
                    out.append((nxt, r[1]))
            pos = nxt + 1
        return out

    def mark_merged(self, chunk: int) -> None:
        m = self.merging
        if m is None:
            return  # the merge completed meanwhile: nothing to mark
        if not self.state.merge_keep:
            # The target goes when the merge completes and is not exported meanwhile:
            # an exception only it reads is not needed once merged, and freeing it now
            # lets a merge in a nearly full store make room for the next copy-outs.
            r = self._resolve(m, chunk)
            if r is not None:
                g = self._gkey_of(r[0])
                if region_readers(self.table, g, limit=2, reaching=self._at(chunk)) == [m]:
                    self._remove_entry(*unpack_key(r[0]))
        if chunk >= self.state.merge_cursor:
            self._kv_reserve([pack_key(MERGED, chunk, 0)])
            self._kv_put(pack_key(MERGED, chunk, 0), 0)

    def set_merge_cursor(self, cursor: int) -> None:
        old = self.state.merge_cursor
        super().set_merge_cursor(cursor)
        self._drop_markers(pack_key(MERGED, old, 0), pack_key(MERGED, cursor, 0))

    def set_merge(self, version, keep=False, cursor=0) -> None:
        super().set_merge(version, keep, cursor)
        if version is None:
            self._drop_markers(pack_key(MERGED, 0, 0), pack_key(MERGED + 1, 0, 0))

    def _drop_markers(self, lo: int, hi: int) -> None:
        for k, _v in self._kv_range(lo, hi):
            self._kv_del(k)

    # -- checks ----------------------------------------------------------------------------

    def index_records(self):
        """Iterate the tag index as ``(tag, chunk, store_chunk)``."""
        lo = index_key(0, 0)
        while True:
            part = self._kv_range(lo, (INDEX + 1) << 96, 4096)
            for k, v in part:
                t, c = unpack_index(k)
                yield t, c, v
            if len(part) < 4096:
                return
            lo = part[-1][0] + 1

    def check_index(self, entries, index) -> list[Finding]:
        """The tag index against the entries: exactly one record ``(tag, chunk)`` with
        the same store chunk per history entry of the origin, and nothing else.
        ``entries`` as ``(owner, chunk, tag, store_chunk)``, ``index`` as ``(tag, chunk,
        store_chunk)``."""
        want = {(c, t): sc for o, c, t, sc in entries if o == ORIGIN}
        out = []
        for t, c, sc in index:
            if want.get((c, t)) != sc:
                out.append(Finding("fatal", None, f"tag index record (tag {t}, chunk {c}) "
                                                  "names no copy-out of the origin"))
            else:
                del want[(c, t)]
        for (c, t) in list(want)[:10]:
            out.append(Finding("fatal", None, f"the origin's copy-out (chunk {c}, tag {t}) "
                                              "is missing from the tag index"))
        return out

    def check_entries(self, entries=None, markers: int | None = None) -> list[Finding]:
        """The rules of versioned exceptions, over ``entries`` (default: all): every
        owner is a version in the table, every history tag names a version taken of the
        owner, only snapshots have current entries, no store chunk is referenced twice;
        merge markers (``markers`` of them, default: counted from the map) only while a
        merge runs.  (The on-disk store adds the block-level checks and the recount of
        the space figures.)"""
        out: list[Finding] = []
        t = self.table
        for msg in t.problems():
            out.append(Finding("fatal", None, msg))
        seen: set[int] = set()
        for o, c, tag, sc in (self.exceptions() if entries is None else entries):
            where = f"exception (version {o}, chunk {c}, tag {_tag(tag)})"
            if not t.exists(o):
                out.append(Finding("fatal", None, f"{where}: version {o} is not in the "
                                                  "snapshot table"))
            elif tag == INF and o == ORIGIN:
                out.append(Finding("fatal", None, f"{where}: the origin has no current "
                                                  "entries (its data is the origin)"))
            elif tag != INF and not 0 < tag < self.state.next_snapshot_id:
                out.append(Finding("fatal", None, f"{where}: tag names no version yet"))
            if sc in seen:
                out.append(Finding("fatal", None, f"{where}: store chunk {sc} is "
                                                  "referenced twice"))
            seen.add(sc)
        if markers is None:
            markers = len(self._kv_range(pack_key(MERGED, 0, 0), pack_key(MERGED + 1, 0, 0), 1))
        if self.merging is None and markers:
            out.append(Finding("fatal", None, "merge progress markers without a merge"))
        return out


def _tag(tag: int) -> str:
    return "current" if tag == INF else str(tag)
