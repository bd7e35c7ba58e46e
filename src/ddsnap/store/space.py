"""Per-snapshot space accounting both stores share (issue 3, "Space accounting"; format
v3): the groups of versioned exceptions and the exact ``exclusive``/``shared`` figures they
give, kept incrementally; and who reads a group (:func:`region_readers`).
"""

from __future__ import annotations

import bisect

from .format import INF, ORIGIN
from .snapshots import VersionTable


class SpaceAccount:
    """Exact per-snapshot space figures of versioned exceptions.

    An exception is *read* by the live snapshots whose lookup ends at it.  For an
    exception of owner ``o`` at a logical chunk with tag ``hi``, whose previous tag there
    is ``lo`` (0 if none), those are: ``o`` itself when ``hi`` is :data:`INF` (its own
    current data) and it is live, and every live version in the subtrees of ``o``'s
    children with ids in ``(lo, hi]``, except the subtrees of the *shadow* set: the
    versions in there that have exceptions of their own at that chunk (nearest first).
    That tuple ``(o, lo, hi, shadow)`` is the exception's *group*; the figures follow
    from how many exceptions each group holds and from the version tree, so creating a
    snapshot changes no group (constant time) even when it becomes a reader of many.

    For a live snapshot ``v``: ``exclusive[v]`` counts exceptions read by ``v`` alone
    (exactly what deleting it frees); ``shared[v]`` those it reads with at least one other
    live snapshot.  ``orphans`` counts exceptions no live snapshot reads (the sweep of a
    delete frees them) and ``exceptions`` all of them.  All in store chunks.

    Costs: a group change is O(1); :meth:`figures` is O(groups x readers) and cached until
    a group or the version tree changes.  Source: issue 3 and issue 9; ZFS's ``used`` of
    a snapshot ("referenced exclusively") made exact for a tree of versions.
    """

    def __init__(self):
        self.groups: dict[tuple, int] = {}
        self.exceptions = 0
        self._cache: tuple | None = None  # (groups generation, table generation, figures)
        self._gen = 0

    def invalidate(self) -> None:
        """Forget the cached figures: the next :meth:`figures` recomputes them from
        :attr:`groups` (after ``groups`` was edited directly, as a damage test does)."""
        self._cache = None

    def add(self, key: tuple, n: int = 1) -> None:
        """``n`` exceptions joined group ``key`` (negative: left it)."""
        if not n:
            return
        m = self.groups.get(key, 0) + n
        if m:
            self.groups[key] = m
        else:
            del self.groups[key]
        self.exceptions += n
        self._gen += 1

    def move(self, old: tuple | None, new: tuple | None) -> None:
        """One exception moved from group ``old`` to ``new`` (None: it did not exist /
        no longer exists)."""
        if old == new:
            return
        if old is not None:
            self.add(old, -1)
        if new is not None:
            self.add(new, 1)

    def _compute(self, table: VersionTable):
        key = (self._gen, table.generation)
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        exclusive: dict[int, int] = {}
        shared: dict[int, int] = {}
        orphans = 0
        for g, n in self.groups.items():
            readers = region_readers(table, g)
            if not readers:
                orphans += n
            elif len(readers) == 1:
                exclusive[readers[0]] = exclusive.get(readers[0], 0) + n
            else:
                for r in readers:
                    shared[r] = shared.get(r, 0) + n
        out = (exclusive, shared, orphans)
        self._cache = (key, out)
        return out

    def figures(self, table: VersionTable) -> dict[int, tuple[int, int]]:
        """``{id: (exclusive, shared)}`` in chunks for every live snapshot."""
        exclusive, shared, _o = self._compute(table)
        return {v: (exclusive.get(v, 0), shared.get(v, 0)) for v in table.live_ids()}

    def orphans(self, table: VersionTable) -> int:
        """Exceptions no live snapshot reads (freed by the sweep in progress)."""
        return self._compute(table)[2]

    def orphan_groups(self, table: VersionTable) -> set[tuple]:
        """The groups whose exceptions no live snapshot reads."""
        return {g for g in self.groups if not region_readers(table, g, limit=1)}

    def drift(self, truth: SpaceAccount, table: VersionTable, name_of) -> list[str]:
        """How these figures differ from ``truth`` (recounted from the tree); one message
        per wrong figure, naming the snapshot (``name_of(id)``)."""
        out = []
        mine, real = self.figures(table), truth.figures(table)
        for v in sorted(set(mine) | set(real)):
            if mine.get(v) != real.get(v):
                me, tr = mine.get(v, (0, 0)), real.get(v, (0, 0))
                out.append(f"space accounting of snapshot {name_of(v)!r} (id {v}) "
                           f"drifted: exclusive {me[0]}, shared {me[1]} chunks counted, "
                           f"exclusive {tr[0]}, shared {tr[1]} in the tree")
        if (self.exceptions, self.orphans(table)) != (truth.exceptions, truth.orphans(table)):
            out.append(f"space accounting drifted: {self.exceptions} exception chunks "
                       f"({self.orphans(table)} of deleted snapshots) counted, "
                       f"{truth.exceptions} ({truth.orphans(table)}) in the tree")
        if self.groups != truth.groups:
            diff = sorted(set(self.groups.items()) ^ set(truth.groups.items()), key=repr)
            out.append(f"space accounting drifted: {len(diff)} exception group counts "
                       f"differ from the tree, first {diff[0][0]!r}")
        return out


def region_readers(table: VersionTable, group: tuple, limit: int | None = None,
                   reaching: int | None = None) -> list[int]:
    """The live versions reading the exceptions of ``group`` ``(owner, lo, hi, shadow)``
    (see :class:`SpaceAccount`), in no particular order; at most ``limit`` of them.

    ``reaching``: a byte offset; only versions whose size is bigger count (a snapshot
    taken before the origin grew never reads the copy-outs past its end that its id
    range groups it with: docs/format.md "Resizing").  A version's clones have its size,
    so a subtree that ends there is skipped whole.  None: sizes do not matter (the space
    figures and the sweep's orphans, which count those readers too)."""
    owner, lo, hi, shadow = group

    def counts(y: int) -> bool:
        return reaching is None or table.slot(y).size > reaching

    out = []
    if hi == INF and owner != ORIGIN and table.is_live(owner) and counts(owner):
        out.append(owner)
    kids = table.children.get(owner, ())
    i = bisect.bisect_right(kids, lo)
    j = len(kids) if hi == INF else bisect.bisect_right(kids, hi)
    stack = [y for y in kids[i:j] if y not in shadow and counts(y)]
    while stack and (limit is None or len(out) < limit):
        y = stack.pop()
        if table.is_live(y):
            out.append(y)
        stack.extend(z for z in table.children.get(y, ()) if z not in shadow)
    return out
