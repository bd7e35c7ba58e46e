"""Per-snapshot space accounting (issue 3, "Space accounting"; format v3, issue 9).

Every exception store keeps, for each live snapshot, ``exclusive`` (store chunks only it
reads: exactly what deleting it frees) and ``shared`` (store chunks it reads with another
live snapshot, snapshots taken of it included) up to date as versioned exceptions change
(:meth:`ExceptionStore.snapshot_space`), with :meth:`~ExceptionStore.exception_chunks`
and :meth:`~ExceptionStore.unswept_chunks`.

The figures are checked against a brute-force count that shares no code with the store:
look every live snapshot up at every logical chunk with ``snapshot_exception`` and count
the readers of each store chunk (:func:`brute_force`).

Covered here, for SharedStore (on a MemoryDevice and a FileDevice) and MemoryStore:

* unit tests at the ExceptionStore API level: copy-outs, snapshot writes (in place on a
  copy-out only that snapshot reads; unsharing), snapshots of snapshots (a clone shares
  everything with its parent until one of them writes; a parent's write keeps a copy for
  the clones reading through it), creates (constant: no group changes; only the parent's
  exclusive chunks become shared with the new clone), deletes before and after the sweep,
  deleting a parent whose clones stay (a ghost: what only its clones read counts for
  them), chained deletes, figures across clean and unclean reopens, a failed leaf split
  (StoreFull leaves the figures as they were), a sweep stopped half way, drift reported
  by ``check`` naming the snapshot, figures unavailable after opening a store with a
  damaged leaf;
* deleting a snapshot frees exactly its ``exclusive`` chunks (``space()["chunks_free"]``
  before and after the delete and its sweep), a parent with clones too;
* a hypothesis state machine over origin writes, snapshot writes, creates of snapshots
  of the origin and of snapshots, deletes (parents too; swept at once, step by step or
  later), commits and reopens, checking the incremental figures against the brute-force
  count after every step (with ``exception_chunks`` the number of exceptions and
  ``unswept_chunks`` those nobody reads), ``check()`` after every step that left nothing
  uncommitted, and ``check()`` at the end.
"""

from __future__ import annotations

import pytest
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from conftest import examples
from ddsnap.errors import CorruptMetadata, ShrinkRefused, StoreFull
from ddsnap.store.blockdev import MemoryDevice
from ddsnap.store.format import (
    BLOCK_SIZE,
    INDEX,
    INF,
    LEAF_MAX,
    SLOT_DELETING,
    SLOT_FREE,
    SLOT_GHOST,
)
from ddsnap.store.memory import MemoryStore
from ddsnap.store.model import SnapshotInfo
from ddsnap.store.shared import SharedStore

KINDS = ["shared-memory", "shared-file", "memory"]
SHARED_KINDS = ["shared-memory", "shared-file"]


@pytest.fixture(params=KINDS)
def kind(request):
    return request.param


# -- helpers -------------------------------------------------------------------------------

def lookups(store) -> dict[tuple[int, int], int | None]:
    """``{(id, chunk): store chunk or None}``: what every live snapshot reads, by lookup."""
    return {(s.id, c): store.snapshot_exception(s.id, c)[0]
            for s in store.snapshots() for c in range(store.origin_chunks)}


def brute_force(store) -> tuple[dict[int, tuple[int, int]], int, int]:
    """``(figures, exception chunks, unswept chunks)`` by the definitions: who reads each
    store chunk (every live snapshot looked up at every chunk), and the exceptions the
    store lists.  No code is shared with the store's accounting."""
    readers: dict[int, set[int]] = {}
    for (v, _c), sc in lookups(store).items():
        if sc is not None:
            readers.setdefault(sc, set()).add(v)
    held = [sc for _o, _c, _t, sc in store.exceptions()]
    assert len(held) == len(set(held)), "a store chunk is held by two exceptions"
    assert set(readers) <= set(held), "a snapshot reads a chunk no exception holds"
    figures = {s.id: [0, 0] for s in store.snapshots()}
    for vs in readers.values():
        for v in vs:
            figures[v][len(vs) > 1] += 1
    return ({v: (x[0], x[1]) for v, x in figures.items()}, len(held),
            len(held) - len(readers))


def assert_exact(store) -> None:
    """The incremental figures equal the brute-force count."""
    figures, total, unswept = brute_force(store)
    assert store.snapshot_space() == figures
    assert store.exception_chunks() == total
    assert store.unswept_chunks() == unswept


def space_of(store, name) -> tuple[int, int]:
    return store.snapshot_space()[store.snapshot(name).id]


def sweep_all(store) -> None:
    for _ in range(100000):
        done = store.sweep_step()
        store.commit()
        if done:
            return
    raise AssertionError("sweep never finished")


def tree_blocks(store) -> int:
    """Index nodes and leaves of a shared store's tree (0 for a MemoryStore)."""
    if not isinstance(store, SharedStore):
        return 0

    def count(block, level):
        node = store.node(block)
        if level == store.state.levels - 1:
            return 1 + len(node.children)
        return 1 + sum(count(c, level + 1) for c in node.children)
    return count(store.state.root, 0)


def origin_write(store, chunk: int) -> int | None:
    """Copy out ``chunk`` for the snapshots reading the origin there (metadata only, as
    the service does it); the copy-out's store chunk, or None when nobody reads it."""
    tag = store.origin_sharers(chunk)
    if not tag:
        return None
    sc = store.allocate_chunk()
    try:
        store.add_origin_exception(chunk, sc, tag)
    except StoreFull:
        store.release_chunk(sc)
        raise
    return sc


def snapshot_write(store, version: int, chunk: int) -> int:
    """Make ``chunk`` snapshot ``version``'s own (metadata only, as the service does it:
    in place when unique, else a new chunk, plus a kept copy when
    ``snapshot_write_keeps`` says so); the store chunk it writes."""
    sc, unique = store.snapshot_exception(version, chunk)
    if unique:
        return sc
    new = store.allocate_chunk()
    kept = None
    try:
        if store.snapshot_write_keeps(version, chunk):
            kept = store.allocate_chunk()
        store.add_snapshot_exception(version, chunk, new, kept)
    except StoreFull:
        store.release_chunk(new)
        if kept is not None:
            store.release_chunk(kept)
        raise
    return new


def exc_dict(store) -> dict:
    return {(o, c, t): sc for o, c, t, sc in store.exceptions()}


def fatal(store) -> list:
    return [f for f in store.check() if f.severity == "fatal"]


def image_of(store) -> MemoryDevice:
    """A copy of a shared store's device as it is now (what a crash would leave)."""
    return MemoryDevice(store.dev.size, bytes(store.dev.pread(store.dev.size, 0)))


# =======================================================================================
# unit tests, every store kind

def test_empty_store_uses_nothing(make_store, kind):
    store = make_store(kind)
    assert store.snapshot_space() == {}
    assert (store.exception_chunks(), store.unswept_chunks()) == (0, 0)
    a = store.create_snapshot("a")
    ca = store.create_snapshot("ca", parent=a.id)
    assert store.snapshot_space() == {a.id: (0, 0), ca.id: (0, 0)}  # the origin everywhere
    assert (store.exception_chunks(), store.unswept_chunks()) == (0, 0)


def test_copy_out_is_shared_and_unsharing_makes_it_exclusive(make_store, kind):
    store = make_store(kind)
    a = store.create_snapshot("a")
    b = store.create_snapshot("b")
    first = origin_write(store, 5)
    assert store.snapshot_space() == {a.id: (0, 1), b.id: (0, 1)}
    # Shared: not written in place.
    assert store.snapshot_exception(a.id, 5) == (first, False)
    # a diverges at 5: a gets its own chunk, the copy-out is b's alone.
    free = store.space()["chunks_free"]
    mine = snapshot_write(store, a.id, 5)
    assert mine != first and store.space()["chunks_free"] == free - 1
    assert store.snapshot_space() == {a.id: (1, 0), b.id: (1, 0)}
    # The copy-out only b reads now, and a's own chunk, are written in place: no chunk,
    # no figure moves.
    assert store.snapshot_exception(b.id, 5) == (first, True)
    assert snapshot_write(store, b.id, 5) == first
    assert snapshot_write(store, a.id, 5) == mine
    assert store.space()["chunks_free"] == free - 1
    assert store.snapshot_space() == {a.id: (1, 0), b.id: (1, 0)}
    # b diverges where it still reads the origin: only b's figures move.
    snapshot_write(store, b.id, 9)
    assert store.snapshot_space() == {a.id: (1, 0), b.id: (2, 0)}
    # An origin write at 9 copies out for a alone (b's own chunk shadows it).
    assert origin_write(store, 9) is not None
    assert store.snapshot_space() == {a.id: (2, 0), b.id: (2, 0)}
    # An origin write where every reader has its own copy copies nothing.
    assert origin_write(store, 5) is None
    assert store.exception_chunks() == 4 and store.unswept_chunks() == 0
    assert_exact(store)
    store.commit()
    assert store.check() == []


def test_copy_out_only_one_snapshot_reads_is_written_in_place(make_store, kind):
    store = make_store(kind)
    a = store.create_snapshot("a")
    sc = origin_write(store, 3)
    b = store.create_snapshot("b")  # reads the origin at 3, not a's copy-out
    assert store.snapshot_space() == {a.id: (1, 0), b.id: (0, 0)}
    free = store.space()["chunks_free"]
    assert snapshot_write(store, a.id, 3) == sc
    assert store.space()["chunks_free"] == free
    assert store.snapshot_space() == {a.id: (1, 0), b.id: (0, 0)}
    assert exc_dict(store) == {(0, 3, a.id): sc}
    assert_exact(store)


def test_create_changes_no_group_and_no_other_figure(make_store, kind):
    """A create changes no group (constant time); the only figures that move are the
    parent's: its exclusive chunks are now shared with the new snapshot, which reads
    exactly what its parent reads."""
    store = make_store(kind)
    a = store.create_snapshot("a")
    for c in range(4):
        origin_write(store, c)
    b = store.create_snapshot("b")
    origin_write(store, 7)  # shared by a and b
    snapshot_write(store, b.id, 8)  # b's own
    before = store.snapshot_space()
    assert before == {a.id: (4, 1), b.id: (1, 1)}
    groups = dict(store.space_account().groups)
    exceptions = exc_dict(store)
    c = store.create_snapshot("c")  # of the origin: reads the origin everywhere
    assert store.snapshot_space() == {**before, c.id: (0, 0)}
    ca = store.create_snapshot("ca", parent=a.id)
    assert store.snapshot_space() == {a.id: (0, 5), b.id: (1, 1), c.id: (0, 0),
                                      ca.id: (0, 5)}
    cb = store.create_snapshot("cb", parent=b.id)
    assert store.snapshot_space() == {a.id: (0, 5), b.id: (0, 2), c.id: (0, 0),
                                      ca.id: (0, 5), cb.id: (0, 2)}
    # A clone of a clone shares everything with both.
    cca = store.create_snapshot("cca", parent=ca.id)
    assert store.snapshot_space()[cca.id] == (0, 5)
    assert store.space_account().groups == groups
    assert exc_dict(store) == exceptions
    looked = lookups(store)
    for child, parent in ((ca, a), (cb, b), (cca, ca)):
        for x in range(store.origin_chunks):
            assert looked[(child.id, x)] == looked[(parent.id, x)]
    assert all(looked[(c.id, x)] is None for x in range(store.origin_chunks))
    # The copy-out at 2 is not unique any more: a write by a now unshares.
    assert store.snapshot_exception(a.id, 2)[1] is False
    # Later copy-outs are for the new ones too.
    origin_write(store, 2)  # a (with ca, cca) has its copy: copied out for b, cb and c
    origin_write(store, 20)  # everyone
    assert store.snapshot_space() == {a.id: (0, 6), b.id: (0, 4), c.id: (0, 2),
                                      ca.id: (0, 6), cb.id: (0, 4), cca.id: (0, 6)}
    assert_exact(store)
    store.commit()
    assert store.check() == []


def test_clone_shares_until_one_writes(make_store, kind):
    """Snapshot writes with clones: the parent's write of an exception only its subtree
    reads re-keys it for the clones (no copy); of data others read too (the origin, a
    copy-out a sibling reads) it keeps a copy for them; of its own current data the old
    chunk becomes the clones' history; a clone's write concerns nobody else."""
    store = make_store(kind)
    a = store.create_snapshot("a")
    only_a = origin_write(store, 1)  # a only
    b = store.create_snapshot("b")
    origin_write(store, 4)  # a and b
    snapshot_write(store, a.id, 6)  # a's own, before any clone
    ca = store.create_snapshot("ca", parent=a.id)
    assert store.snapshot_space() == {a.id: (0, 3), b.id: (0, 1), ca.id: (0, 3)}
    assert_exact(store)
    # 1: only a and ca read the copy-out: it becomes ca's, a gets a new chunk.
    assert not store.snapshot_write_keeps(a.id, 1)
    free = store.space()["chunks_free"]
    snapshot_write(store, a.id, 1)
    assert store.space()["chunks_free"] == free - 1
    assert store.snapshot_exception(ca.id, 1) == (only_a, True)
    assert (a.id, 1, ca.id) in exc_dict(store) and (0, 1, a.id) not in exc_dict(store)
    assert store.snapshot_space() == {a.id: (1, 2), b.id: (0, 1), ca.id: (1, 2)}
    assert_exact(store)
    # 2: a and ca read the origin: a keeps a copy for ca.
    assert store.snapshot_write_keeps(a.id, 2)
    snapshot_write(store, a.id, 2)
    assert store.space()["chunks_free"] == free - 3
    assert store.snapshot_space() == {a.id: (2, 2), b.id: (0, 1), ca.id: (2, 2)}
    assert store.origin_sharers(2) == b.id  # b still reads the origin there
    assert_exact(store)
    # 4: the copy-out b reads too: a keeps a copy for ca, the copy-out is b's alone.
    assert store.snapshot_write_keeps(a.id, 4)
    snapshot_write(store, a.id, 4)
    assert store.snapshot_space() == {a.id: (3, 1), b.id: (1, 0), ca.id: (3, 1)}
    assert_exact(store)
    # 6: a's own current data, which ca reads: it becomes ca's history (no copy kept).
    assert not store.snapshot_write_keeps(a.id, 6)
    free = store.space()["chunks_free"]
    snapshot_write(store, a.id, 6)
    assert store.space()["chunks_free"] == free - 1
    assert store.snapshot_space() == {a.id: (4, 0), b.id: (1, 0), ca.id: (4, 0)}
    assert_exact(store)
    # The clone writes: reading the origin through a (nobody else moves), then where it
    # reads its own history (in place).
    assert not store.snapshot_write_keeps(ca.id, 9)
    snapshot_write(store, ca.id, 9)
    assert store.snapshot_space() == {a.id: (4, 0), b.id: (1, 0), ca.id: (5, 0)}
    assert store.snapshot_exception(ca.id, 6)[1] is True
    free = store.space()["chunks_free"]
    snapshot_write(store, ca.id, 6)
    assert store.space()["chunks_free"] == free
    # A clone with its own data there: the parent's write keeps nothing for it.
    assert not store.snapshot_write_keeps(a.id, 9)
    snapshot_write(store, a.id, 9)
    assert store.snapshot_space() == {a.id: (5, 0), b.id: (1, 0), ca.id: (5, 0)}
    # A second clone taken now reads a's current data: shared between a and cb only.
    cb = store.create_snapshot("cb", parent=a.id)
    assert store.snapshot_space() == {a.id: (0, 5), b.id: (1, 0), ca.id: (5, 0),
                                      cb.id: (0, 5)}
    snapshot_write(store, a.id, 6)  # a's current at 6 becomes cb's history
    assert store.snapshot_space() == {a.id: (1, 4), b.id: (1, 0), ca.id: (5, 0),
                                      cb.id: (1, 4)}
    assert_exact(store)
    store.commit()
    assert store.check() == []


def test_snapshot_of_a_clone_reads_through_two_levels(make_store, kind):
    store = make_store(kind)
    a = store.create_snapshot("a")
    origin_write(store, 0)
    ca = store.create_snapshot("ca", parent=a.id)
    cca = store.create_snapshot("cca", parent=ca.id)
    assert store.snapshot_space() == {a.id: (0, 1), ca.id: (0, 1), cca.id: (0, 1)}
    # ca writes where it and cca read a's copy-out (which a reads too): a copy for cca.
    assert store.snapshot_write_keeps(ca.id, 0)
    snapshot_write(store, ca.id, 0)
    assert store.snapshot_space() == {a.id: (1, 0), ca.id: (1, 0), cca.id: (1, 0)}
    # a writes at 1, where the three read the origin: one copy kept for ca and cca.
    assert store.snapshot_write_keeps(a.id, 1)
    snapshot_write(store, a.id, 1)
    assert store.snapshot_space() == {a.id: (2, 0), ca.id: (1, 1), cca.id: (1, 1)}
    # ca writes at 1: the copy a kept is read by ca and cca, only ca's subtree: it
    # becomes cca's, no copy.
    assert not store.snapshot_write_keeps(ca.id, 1)
    free = store.space()["chunks_free"]
    snapshot_write(store, ca.id, 1)
    assert store.space()["chunks_free"] == free - 1
    assert store.snapshot_space() == {a.id: (2, 0), ca.id: (2, 0), cca.id: (2, 0)}
    assert_exact(store)
    store.commit()
    assert store.check() == []


def test_delete_makes_shared_chunks_exclusive_before_the_sweep(make_store, kind):
    """Before the sweep the exceptions of a deleted snapshot are still there: the others'
    figures already count it out, and what only it read is unswept."""
    store = make_store(kind)
    a = store.create_snapshot("a")
    origin_write(store, 3)  # {a}
    b = store.create_snapshot("b")
    origin_write(store, 1)  # {a, b}
    c = store.create_snapshot("c")
    origin_write(store, 2)  # {a, b, c}
    snapshot_write(store, b.id, 4)  # {b}
    snapshot_write(store, b.id, 5)  # {b}
    origin_write(store, 5)  # {a, c}
    assert store.snapshot_space() == {a.id: (1, 3), b.id: (2, 2), c.id: (0, 2)}
    store.commit()
    store.begin_delete("a")
    assert store.table.state(a.id) == SLOT_DELETING
    # {a,b} -> b, {a,b,c} -> b and c, {a} -> nobody, {a,c} -> c.
    assert store.snapshot_space() == {b.id: (3, 1), c.id: (1, 1)}
    assert (store.exception_chunks(), store.unswept_chunks()) == (6, 1)
    assert_exact(store)
    store.commit()
    assert fatal(store) == []
    free = store.space()["chunks_free"]
    sweep_all(store)
    assert store.table.state(a.id) == SLOT_FREE  # nothing was taken of it
    assert store.snapshot_space() == {b.id: (3, 1), c.id: (1, 1)}
    assert (store.exception_chunks(), store.unswept_chunks()) == (5, 0)
    assert store.space()["chunks_free"] == free + 1
    assert_exact(store)
    assert store.check() == []


def test_chained_deletes_before_any_sweep(make_store, kind):
    """Deleting b while a's delete is not swept yet: c inherits what all three shared."""
    store = make_store(kind)
    a = store.create_snapshot("a")
    b = store.create_snapshot("b")
    origin_write(store, 2)  # {a, b}
    c = store.create_snapshot("c")
    origin_write(store, 1)  # {a, b, c}
    snapshot_write(store, a.id, 3)  # {a}
    origin_write(store, 3)  # {b, c}
    snapshot_write(store, b.id, 4)  # {b}
    origin_write(store, 4)  # {a, c}
    assert store.snapshot_space() == {a.id: (1, 3), b.id: (1, 3), c.id: (0, 3)}
    store.begin_delete("a")
    assert store.snapshot_space() == {b.id: (2, 2), c.id: (1, 2)}
    assert store.unswept_chunks() == 1
    store.begin_delete("b")
    assert store.snapshot_space() == {c.id: (3, 0)}
    assert store.unswept_chunks() == 3
    assert_exact(store)
    store.commit()
    assert fatal(store) == []
    free = store.space()["chunks_free"]
    sweep_all(store)
    assert store.snapshot_space() == {c.id: (3, 0)}
    assert (store.exception_chunks(), store.unswept_chunks()) == (3, 0)
    assert store.space()["chunks_free"] == free + 3
    assert store.table.index.keys() == {c.id}
    assert_exact(store)
    assert store.check() == []


def test_deleted_parent_is_a_ghost_whose_exceptions_count_for_its_clones(make_store, kind):
    """Deleting a parent whose clone stays: the parent's exceptions the clone reads count
    for the clone (exclusive once nobody else reads them), the others are swept; the
    parent stays as a ghost until its last clone is gone."""
    store = make_store(kind)
    a = store.create_snapshot("a")
    b = store.create_snapshot("b")
    origin_write(store, 1)  # {a, b} (and ca, once taken)
    snapshot_write(store, a.id, 2)
    snapshot_write(store, a.id, 6)
    ca = store.create_snapshot("ca", parent=a.id)
    snapshot_write(store, a.id, 2)  # a's old current -> ca's history
    snapshot_write(store, a.id, 3)  # a copy of the origin kept for ca
    snapshot_write(store, ca.id, 4)  # ca's own
    snapshot_write(store, a.id, 5)  # a copy kept for ca
    snapshot_write(store, ca.id, 5)  # ca's kept copy, in place
    # 1: {a, b, ca}; 2: {ca}, {a}; 3: {ca}, {a}; 4: {ca}; 5: {ca}, {a}; 6: {a, ca}
    assert store.snapshot_space() == {a.id: (3, 2), b.id: (0, 1), ca.id: (4, 2)}
    assert_exact(store)
    store.commit()
    before = lookups(store)
    free = store.space()["chunks_free"]
    excl_a = space_of(store, "a")[0]
    store.begin_delete("a")
    assert store.snapshot_space() == {b.id: (0, 1), ca.id: (5, 1)}
    assert store.unswept_chunks() == excl_a
    assert store.snapshots()[-1].parent_name is None  # ca's parent has no name now
    assert_exact(store)
    store.commit()
    assert fatal(store) == []
    sweep_all(store)
    assert store.table.state(a.id) == SLOT_GHOST
    assert store.space()["chunks_free"] == free + excl_a
    assert store.snapshot_space() == {b.id: (0, 1), ca.id: (5, 1)}
    assert store.unswept_chunks() == 0
    assert lookups(store) == {
        k: v for k, v in before.items() if k[0] != a.id}
    assert_exact(store)
    assert store.check() == []
    # The clone goes: its exclusive chunks (the ghost's history among them) are freed,
    # and the ghost with them.
    free = store.space()["chunks_free"]
    store.begin_delete("ca")
    assert store.unswept_chunks() == 5
    sweep_all(store)
    assert store.space()["chunks_free"] == free + 5
    assert store.table.state(a.id) == SLOT_FREE and store.table.state(ca.id) == SLOT_FREE
    assert store.snapshot_space() == {b.id: (1, 0)}
    assert exc_dict(store) == {(0, 1, b.id): before[(b.id, 1)]}
    assert_exact(store)
    assert store.check() == []


def test_chained_deletes_of_a_line_of_clones(make_store, kind):
    """a <- ca <- cca: the middle one, then the root go; cca keeps reading what it read,
    each delete frees exactly the exclusive chunks, two ghosts stay for cca."""
    store = make_store(kind)
    a = store.create_snapshot("a")
    b = store.create_snapshot("b")
    for c in range(6):
        origin_write(store, c)  # {a, b, ...}
    snapshot_write(store, a.id, 0)
    ca = store.create_snapshot("ca", parent=a.id)
    snapshot_write(store, a.id, 0)  # history for ca (and cca)
    snapshot_write(store, a.id, 1)  # copy kept for ca (b reads the copy-out)
    snapshot_write(store, ca.id, 2)
    cca = store.create_snapshot("cca", parent=ca.id)
    snapshot_write(store, ca.id, 2)  # history for cca
    snapshot_write(store, ca.id, 3)  # copy kept for cca
    snapshot_write(store, a.id, 4)  # copy kept for ca and cca
    snapshot_write(store, cca.id, 5)
    snapshot_write(store, ca.id, 7)  # reads the origin: a copy kept for cca
    assert_exact(store)
    store.commit()
    want = {c: store.snapshot_exception(cca.id, c)[0] for c in range(store.origin_chunks)}
    for name, ghost in (("ca", ca), ("a", a)):
        excl = space_of(store, name)[0]
        free = store.space()["chunks_free"]
        store.begin_delete(name)
        assert store.unswept_chunks() == excl
        assert_exact(store)
        store.commit()
        sweep_all(store)
        assert store.space()["chunks_free"] - free == excl, name
        assert store.table.state(ghost.id) == SLOT_GHOST
        assert {c: store.snapshot_exception(cca.id, c)[0]
                for c in range(store.origin_chunks)} == want
        assert_exact(store)
        assert store.check() == []
    # cca reads the ghosts' history and kept copies (0, 1, 2, 3, 4, 7) and its own (5);
    # b the copy-outs 0..5 nobody else reads now.
    assert store.snapshot_space() == {b.id: (6, 0), cca.id: (7, 0)}
    excl = 7
    free = store.space()["chunks_free"]
    store.begin_delete("cca")
    sweep_all(store)
    assert store.space()["chunks_free"] - free == excl
    assert store.table.index.keys() == {b.id}  # both ghosts went with their last clone
    assert_exact(store)
    assert store.check() == []


def test_rekeying_a_ghosts_last_entry_regroups_what_its_subtree_reads(make_store, kind):
    store = make_store(kind)
    a = store.create_snapshot("a")
    ca = store.create_snapshot("ca", parent=a.id)
    snapshot_write(store, a.id, 7)  # (a, 7, ca) kept for ca, a's own current
    b = store.create_snapshot("b")
    store.begin_delete("a")
    sweep_all(store)  # a's current goes; a is a ghost holding (a, 7, ca)
    assert store.table.state(a.id) == SLOT_GHOST
    cca = store.create_snapshot("cca", parent=ca.id)
    origin_write(store, 7)  # for b: ca and cca read a's entry (a shadows them)
    store.commit()
    assert store.check() == []
    # ca writes 7: only ca and cca read a's entry, so it becomes ca's history for cca;
    # a has no entry at 7 any more and ca is now what shadows the copy-out.
    assert not store.snapshot_write_keeps(ca.id, 7)
    snapshot_write(store, ca.id, 7)
    assert exc_dict(store).keys() == {(0, 7, b.id), (ca.id, 7, cca.id), (ca.id, 7, INF)}
    assert store.snapshot_space() == {b.id: (1, 0), ca.id: (1, 0), cca.id: (1, 0)}
    assert_exact(store)
    store.commit()
    assert store.check() == []  # fails here: "2 exception group counts differ"
    for name in ("cca", "ca", "b"):
        store.begin_delete(name)
        sweep_all(store)
        assert_exact(store)
        assert store.check() == []
    assert store.exception_chunks() == 0
    assert store.space_account().groups == {}
    assert store.check() == []


def read_within_sizes(store) -> set[int]:
    """Store chunks some live snapshot reads at a chunk inside its own size."""
    out = set()
    for s in store.snapshots():
        for c in range(-(-s.size // store.chunk_size)):
            sc = store.snapshot_exception(s.id, c)[0]
            if sc is not None:
                out.add(sc)
    return out


def small_then_big(store) -> tuple[SnapshotInfo, SnapshotInfo]:
    """``small`` taken of a one-chunk origin, which then grows to 8 chunks for ``big``:
    ``small`` reads nothing past chunk 0, though the lookups (which ignore sizes) send
    it to the origin's copy-outs at every chunk."""
    cs = store.chunk_size
    store.set_origin_size(cs)
    small = store.create_snapshot("small")
    store.set_origin_size(8 * cs)
    return small, store.create_snapshot("big")


def test_copy_out_past_a_small_snapshots_end_is_written_in_place_by_the_big_one(
        make_store, kind):
    """The copy-out made for ``big`` past ``small``'s end is grouped with ``small`` (it
    serves an id range), but ``small`` never reads it: ``big``'s write goes in place
    rather than leaving the copy-out to nobody (docs/format.md "Resizing")."""
    store = make_store(kind)
    small, big = small_then_big(store)
    sc = origin_write(store, 2)
    assert sc is not None
    assert store.snapshot_exception(big.id, 2) == (sc, True)
    assert snapshot_write(store, big.id, 2) == sc
    assert store.exception_chunks() == 1
    assert {sc for *_k, sc in store.exceptions()} <= read_within_sizes(store)
    assert_exact(store)
    store.commit()
    assert store.check() == []


def test_a_big_snapshot_with_clones_re_keys_a_copy_out_past_a_small_ones_end(
        make_store, kind):
    """With a clone reading through ``big``, its write hands the copy-out to the clone
    as it is (re-keyed, no kept copy): ``small`` past its end does not count."""
    store = make_store(kind)
    small, big = small_then_big(store)
    clone = store.create_snapshot("clone", parent=big.id)
    sc = origin_write(store, 2)
    assert not store.snapshot_write_keeps(big.id, 2)
    mine = snapshot_write(store, big.id, 2)
    assert mine != sc and store.snapshot_exception(clone.id, 2)[0] == sc
    assert store.exception_chunks() == 2
    assert {sc for *_k, sc in store.exceptions()} <= read_within_sizes(store)
    assert_exact(store)
    store.commit()
    assert store.check() == []


def test_origin_write_copies_nothing_out_for_a_snapshot_past_its_end(make_store, kind):
    """Where ``big`` has its own chunk, only ``small`` would read a copy-out, and only
    past its end: an origin write copies nothing."""
    store = make_store(kind)
    small, big = small_then_big(store)
    snapshot_write(store, big.id, 2)
    assert store.origin_sharers(2) == 0
    assert origin_write(store, 2) is None
    assert store.exception_chunks() == 1
    assert_exact(store)


def test_merge_frees_a_copy_out_only_its_target_reads_within_its_size(make_store, kind):
    """A merge without keep frees, once merged, a copy-out only its target reads: here
    ``small`` is grouped with it but ends before it."""
    store = make_store(kind)
    _small, big = small_then_big(store)
    origin_write(store, 2)
    store.set_merge(big.id)
    store.mark_merged(2)
    assert store.exception_chunks() == 0
    assert_exact(store)


def test_deleting_frees_exactly_the_exclusive_chunks(make_store, kind):
    """Delete the snapshots one by one, parents before their clones: each delete (and its
    sweep) frees exactly the ``exclusive`` chunks the figures gave (the tree stays one
    leaf, so no metadata block is freed with them)."""
    store = make_store(kind)
    snaps: list[SnapshotInfo] = []
    for round_ in range(6):
        parent = snaps[round_ - 3].id if round_ >= 3 else 0
        snaps.append(store.create_snapshot(f"s{round_}", parent=parent))
        for chunk in range(round_, 40, round_ + 2):
            origin_write(store, chunk)
        for chunk in range(0, 40, 7):
            snapshot_write(store, snaps[round_ // 2].id, chunk + round_)
            snapshot_write(store, snaps[-1].id, chunk + 2 * round_ + 1)
    store.commit()
    assert store.exception_chunks() < LEAF_MAX
    blocks = tree_blocks(store)
    assert blocks in (0, 2)
    assert_exact(store)
    used = store.exception_chunks()
    for name in ("s1", "s0", "s4", "s2", "s5", "s3"):  # s3, s4, s5 are clones of s0..s2
        excl, _shared = space_of(store, name)
        assert excl > 0
        vid = store.snapshot(name).id
        parent = store.table.parent(vid)
        free = store.space()["chunks_free"]
        store.begin_delete(name)
        assert store.unswept_chunks() == excl
        store.commit()
        sweep_all(store)
        assert store.space()["chunks_free"] - free == excl, name
        assert tree_blocks(store) == blocks
        # A parent stays as a ghost for its clone; a clone's delete takes its ghost too.
        ghost = name in ("s0", "s1", "s2")  # their clones are still there
        assert store.table.state(vid) == (SLOT_GHOST if ghost else SLOT_FREE), name
        assert not parent or store.table.state(parent) == SLOT_FREE
        used -= excl
        assert store.exception_chunks() == used
        assert_exact(store)
    assert store.exception_chunks() == 0 and store.table.index == {}
    assert store.check() == []


@pytest.mark.parametrize("kind", SHARED_KINDS)
def test_figures_survive_reopens_mid_delete_and_with_a_ghost(make_store, kind):
    store = make_store(kind)
    a = store.create_snapshot("a")
    b = store.create_snapshot("b")
    for chunk in range(30):
        origin_write(store, chunk)
        if chunk % 3 == 0:
            snapshot_write(store, b.id, chunk)
    ca = store.create_snapshot("ca", parent=a.id)
    for chunk in range(0, 30, 4):
        snapshot_write(store, a.id, chunk)
    c = store.create_snapshot("c")
    origin_write(store, 31)
    store.begin_delete("a")
    want = store.snapshot_space()
    assert want == {b.id: (15, 16), c.id: (0, 1), ca.id: (15, 16)}
    unswept = store.unswept_chunks()
    assert unswept == 8
    assert_exact(store)
    store.commit()
    # Unclean: a copy of the device as it is, the journal replayed by open.
    copy = SharedStore.open(image_of(store))
    assert copy.snapshot_space() == want and copy.unswept_chunks() == unswept
    assert_exact(copy)
    store = make_store.reopen(store)
    assert store.snapshot_space() == want and store.unswept_chunks() == unswept
    assert_exact(store)
    sweep_all(store)
    assert store.snapshot_space() == want and store.unswept_chunks() == 0
    assert store.table.state(a.id) == SLOT_GHOST
    copy = SharedStore.open(image_of(store))
    assert copy.snapshot_space() == want and copy.table.state(a.id) == SLOT_GHOST
    store = make_store.reopen(store)
    assert store.snapshot_space() == want
    assert_exact(store)
    assert store.check() == []


@pytest.mark.parametrize("kind", SHARED_KINDS)
def test_failed_split_leaves_the_figures(make_store, kind):
    """A copy-out and snapshot writes (with and without a kept copy) whose full leaf must
    split, with no block left for the split: StoreFull, nothing changed, the figures as
    they were."""
    store = make_store(kind)
    a = store.create_snapshot("a")
    b = store.create_snapshot("b")
    ca = store.create_snapshot("ca", parent=a.id)
    nxt = 0
    while len(store.leaf_of(0)[1].keys) < LEAF_MAX:
        origin_write(store, nxt)  # {a, b, ca}
        nxt += 1
    store.commit()
    assert store.state.levels == 1 and len(store.node(store.state.root).children) == 1
    filler = []
    while True:
        try:
            filler.append(store.allocate_chunk())  # 4 KiB chunks: a chunk is a block
        except StoreFull:
            break
    before = store.snapshot_space()
    # (the leaf holds the copy-outs and their tag index records)
    assert before == {a.id: (0, nxt), b.id: (0, nxt), ca.id: (0, nxt)}
    exceptions = exc_dict(store)
    for who, chunk in ((None, nxt), (b, 1), (a, 2), (ca, 3)):
        new, kept = filler.pop(), filler.pop()
        with pytest.raises(StoreFull):
            if who is None:
                store.add_origin_exception(chunk, new, store.origin_sharers(chunk))
            else:
                assert store.snapshot_exception(who.id, chunk)[1] is False
                keeps = store.snapshot_write_keeps(who.id, chunk)
                assert keeps == (who is a)
                store.add_snapshot_exception(who.id, chunk, new, kept if keeps else None)
        filler += [new, kept]
        assert store.snapshot_space() == before, (who, chunk)
        assert exc_dict(store) == exceptions
        assert_exact(store)
    for f in filler:
        store.release_chunk(f)
    store.commit()
    assert store.check() == []
    # With room the same write goes in: a's new chunk and the copy kept for ca are
    # theirs, the copy-out b's alone; the leaf split.
    snapshot_write(store, a.id, 2)
    assert store.snapshot_space() == {a.id: (1, nxt - 1), b.id: (1, nxt - 1),
                                      ca.id: (1, nxt - 1)}
    assert len(store.node(store.state.root).children) == 2
    assert_exact(store)
    store.commit()
    assert store.check() == []


@pytest.mark.parametrize("reopen", [False, True])
def test_sweep_stopped_half_way(make_store, kind, reopen):
    """A sweep of a few entries per step (a tree of several leaves for the shared
    kinds): the figures are exact between the steps, the unswept count only goes down,
    and a reopen half way (shared kinds) or a second delete half way lose nothing."""
    if reopen and kind == "memory":
        pytest.skip("a MemoryStore does not reopen")
    store = make_store(kind, origin_size=2 << 20, store_size=8 << 20)
    a = store.create_snapshot("a")
    for chunk in range(0, 500):
        origin_write(store, chunk)  # {a}
    store.create_snapshot("b")
    for chunk in range(0, 500, 5):
        origin_write(store, chunk)  # {b}
    for chunk in range(500, 512):
        origin_write(store, chunk)  # {a, b}
    ca = store.create_snapshot("ca", parent=a.id)
    for chunk in range(0, 500, 7):
        snapshot_write(store, a.id, chunk)  # the copy-out becomes ca's; a's own
    snapshot_write(store, ca.id, 1)
    store.commit()
    if kind != "memory":
        assert len(store.node(store.state.root).children) > 3  # several leaves
    store.sweep_budget = 16
    excl_a = space_of(store, "a")[0]
    store.begin_delete("a")
    want = store.snapshot_space()
    assert store.unswept_chunks() == excl_a == 73  # 72 current entries, the copy-out at 1
    assert_exact(store)
    steps = 0
    last = store.unswept_chunks()
    while not store.sweep_step():
        steps += 1
        store.commit()
        assert store.unswept_chunks() <= last
        last = store.unswept_chunks()
        assert store.snapshot_space() == want
        assert_exact(store)
        if steps == 2:
            assert 0 < last < excl_a  # half way
            if reopen:
                store = make_store.reopen(store)
                store.sweep_budget = 16
                assert store.snapshot_space() == want and store.unswept_chunks() == last
                assert_exact(store)
            else:
                # A second delete half way: b's exclusive chunks join the sweep.
                excl_b = space_of(store, "b")[0]
                store.begin_delete("b")
                want = store.snapshot_space()
                assert store.unswept_chunks() == last + excl_b
                last += excl_b
                assert_exact(store)
    store.commit()
    assert steps >= 4
    assert store.unswept_chunks() == 0
    assert store.snapshot_space() == want
    assert store.table.state(a.id) == SLOT_GHOST
    assert_exact(store)
    assert store.check() == []


def test_check_reports_drift_naming_the_snapshot(make_store, kind):
    store = make_store(kind)
    alpha = store.create_snapshot("alpha")
    origin_write(store, 3)  # {alpha}
    snapshot_write(store, alpha.id, 5)
    beta = store.create_snapshot("beta", parent=alpha.id)
    snapshot_write(store, alpha.id, 5)  # alpha's old current: beta's history
    gamma = store.create_snapshot("gamma")
    snapshot_write(store, gamma.id, 4)
    store.commit()
    assert store.snapshot_space() == {alpha.id: (1, 1), beta.id: (1, 1), gamma.id: (1, 0)}
    assert store.check() == []
    acc = store.space_account()
    groups = dict(acc.groups)
    history = next(g for g in groups if g[0] == alpha.id and g[2] == beta.id)
    own = next(g for g in groups if g[0] == gamma.id)

    def corrupt(change):
        acc.groups.clear()
        acc.groups.update(groups)
        change(acc.groups)
        acc.invalidate()  # the figures are recomputed from the corrupt groups
        return fatal(store)

    # One more exception counted in gamma's own group: gamma's figures drift.
    found = corrupt(lambda g: g.__setitem__(own, g[own] + 1))
    assert found and any("'gamma'" in f.message and f"id {gamma.id}" in f.message
                         for f in found)
    assert not any("'alpha'" in f.message or "'beta'" in f.message for f in found)
    # beta's history counted as shadowed by beta itself: read by nobody, so beta's
    # exclusive chunk would be swept.  Only beta is named.
    found = corrupt(lambda g: g.__setitem__((*history[:3], frozenset({beta.id})),
                                            g.pop(history)))
    assert any("'beta'" in f.message for f in found)
    assert not any("'alpha'" in f.message or "'gamma'" in f.message for f in found)
    # A group with a wrong shadow that changes no figure today (a version that does not
    # exist): still drift, future figures would be wrong.
    found = corrupt(lambda g: g.__setitem__((*own[:3], frozenset({999})), g.pop(own)))
    assert store.snapshot_space() == {alpha.id: (1, 1), beta.id: (1, 1), gamma.id: (1, 0)}
    assert found and all("group" in f.message for f in found)
    corrupt(lambda g: None)
    assert store.check() == []


def damaged_store(which: str):
    """A closed store with a tree of several leaves (a, its clone ca, 400 chunks) and a
    copy of it with one byte of its ``which`` leaf flipped: "first", "last" (the last
    holding exceptions) or "index" (the last, holding tag index records only); returns
    ``(store, damaged image, the leaf)``."""
    store = SharedStore.create(MemoryDevice(4 << 20), origin_size=2 << 20, chunk_size=4096)
    a = store.create_snapshot("a")
    for c in range(400):
        origin_write(store, c)
    ca = store.create_snapshot("ca", parent=a.id)
    snapshot_write(store, a.id, 2)
    store.close()
    assert store.snapshot_space() == {a.id: (1, 399), ca.id: (1, 399)}
    node = store.node(store.state.root)
    leaves = node.children
    entry_leaves = [b for k, b in zip(node.keys, leaves, strict=True) if k >> 96 != INDEX]
    assert len(entry_leaves) >= 3 and len(leaves) > len(entry_leaves)
    leaf = {"first": leaves[0], "last": entry_leaves[-1], "index": leaves[-1]}[which]
    image = image_of(store)
    image.data[leaf * BLOCK_SIZE + BLOCK_SIZE - 3] ^= 4
    return store, image, leaf


@pytest.mark.parametrize("which", ["first", "last"])
def test_damaged_leaf_makes_the_figures_unavailable(which):
    store, image, leaf = damaged_store(which)
    damaged = SharedStore.open(image)  # the root is intact: open succeeds
    for figure in (damaged.snapshot_space, damaged.exception_chunks, damaged.unswept_chunks):
        with pytest.raises(CorruptMetadata) as e:
            figure()
        assert e.value.block == leaf
    damaged.begin_delete("ca")  # the sweep needs the figures: it cannot run
    with pytest.raises(CorruptMetadata) as e:
        damaged.sweep_step()
    assert e.value.block == leaf
    intact = SharedStore.open(image_of(store))
    assert intact.snapshot_space() == store.snapshot_space()
    assert_exact(intact)


@pytest.mark.parametrize("which", [
    "first",
    "last",
    "index",
])
def test_check_names_a_damaged_leaf(which):
    """``check`` reports the damaged leaf as a fatal finding (the recount of the figures
    is skipped: the walk is incomplete), in both open modes."""
    _store, image, leaf = damaged_store(which)
    for mode in ("rw", "inspect"):
        damaged = SharedStore.open(MemoryDevice(image.size, bytes(image.data)), mode=mode)
        found = [f for f in damaged.check() if f.severity == "fatal"]
        assert found and all(f.block == leaf for f in found), mode


# =======================================================================================
# the state machine: incremental figures against a brute-force count after every step

class SpaceMachine(RuleBasedStateMachine):
    """Store-API level operations on a small store (StoreFull happens), checked with
    :func:`assert_exact` after every step."""

    SHARED = True
    CHUNK = 4096
    ORIGIN_CHUNKS = 24
    STORE = 48 * 4096  # shared: device bytes (26 chunks for data and tree); memory: data
    JOURNAL = 16
    MAX_LIVE = 6
    MAX_RUN = 4  # chunks one write rule touches
    BUDGET = 3  # entries a sweep step looks at

    def __init__(self):
        super().__init__()
        origin = self.ORIGIN_CHUNKS * self.CHUNK
        self.store: SharedStore | MemoryStore
        if self.SHARED:
            self.dev = MemoryDevice(self.STORE)
            self.store = SharedStore.create(self.dev, origin_size=origin, chunk_size=self.CHUNK,
                                            journal_blocks=self.JOURNAL)
        else:
            self.store = MemoryStore(origin, self.STORE, self.CHUNK)
        self.store.sweep_budget = self.BUDGET
        self.counter = 0

    def _ids(self):
        return [s.id for s in self.store.snapshots()]

    def _name(self, vid):
        return next(s.name for s in self.store.snapshots() if s.id == vid)

    def _others_unchanged(self, before, gone):
        after = lookups(self.store)
        assert after == {k: v for k, v in before.items() if k[0] != gone}

    def _run(self, data):
        """Logical chunks one write rule touches (drawn per machine geometry)."""
        start = data.draw(st.integers(0, self.ORIGIN_CHUNKS - 1), label="start")
        n = data.draw(st.integers(1, self.MAX_RUN), label="chunks")
        return range(start, min(start + n, self.ORIGIN_CHUNKS))

    @rule(data=st.data())
    def write_origin(self, data):
        for c in self._run(data):
            try:
                origin_write(self.store, c)
            except StoreFull:
                event("store full")
                return

    @precondition(lambda self: self.store.snapshots())
    @rule(data=st.data())
    def write_snapshot(self, data):
        v = data.draw(st.sampled_from(self._ids()), label="snapshot")
        for c in self._run(data):
            try:
                snapshot_write(self.store, v, c)
            except StoreFull:
                event("store full")
                return

    @precondition(lambda self: len(self.store.snapshots()) < self.MAX_LIVE)
    @rule(data=st.data())
    def create(self, data):
        store = self.store
        parent = data.draw(st.sampled_from([0] + self._ids()), label="parent")
        before = store.snapshot_space()
        groups = dict(store.space_account().groups)
        self.counter += 1
        try:
            info = store.create_snapshot(f"s{self.counter}", parent=parent)
        except StoreFull:  # no block for one more snapshot table block
            event("store full")
            assert store.snapshot_space() == before
            return
        if parent:
            event("clone of a clone" if store.table.parent(parent) else "clone")
        assert store.space_account().groups == groups
        if parent:
            both = (0, sum(before[parent]))
            assert store.snapshot_space() == {**before, parent: both, info.id: both}
        else:
            assert store.snapshot_space() == {**before, info.id: (0, 0)}
        for c in range(store.origin_chunks):
            want = store.snapshot_exception(parent, c)[0] if parent else None
            assert store.snapshot_exception(info.id, c)[0] == want

    @precondition(lambda self: self.store.snapshots())
    @rule(data=st.data(), sweep=st.sampled_from(["now", "later", "one step"]))
    def delete(self, data, sweep):
        store = self.store
        v = data.draw(st.sampled_from(self._ids()), label="snapshot")
        excl = store.snapshot_space()[v][0]
        unswept = store.unswept_chunks()
        free = store.space()["chunks_free"]
        blocks = tree_blocks(store)
        before = lookups(store)
        if store.table.children.get(v):
            event("delete of a parent")
        store.begin_delete(self._name(v))
        assert store.unswept_chunks() == unswept + excl
        self._others_unchanged(before, v)
        store.commit()
        if sweep == "now":
            sweep_all(store)
            assert store.unswept_chunks() == 0
            freed = store.space()["chunks_free"] - free
            # Exactly its exclusive chunks, those of earlier unswept deletes, and the
            # tree blocks the sweep merged away (a 4 KiB chunk is one block).
            assert freed == excl + unswept + blocks - tree_blocks(store)
            self._others_unchanged(before, v)
        elif sweep == "one step":
            store.sweep_step()
            store.commit()
            if store.unswept_chunks():
                event("sweep stopped half way")
        if store.table.with_state(SLOT_GHOST):
            event("ghost")

    @precondition(lambda self: self.store.unswept_chunks())
    @rule()
    def sweep_step(self):
        before = self.store.unswept_chunks()
        self.store.sweep_step()
        self.store.commit()
        assert self.store.unswept_chunks() <= before

    @rule(sweep=st.booleans())
    def commit(self, sweep):
        if sweep:
            sweep_all(self.store)
            assert self.store.unswept_chunks() == 0
        self.store.commit()

    @precondition(lambda self: self.SHARED)
    @rule(clean=st.booleans())
    def reopen(self, clean):
        figures = self.store.snapshot_space()
        unswept = self.store.unswept_chunks()
        if clean:
            self.store.close()
        else:
            self.store.commit()
            self.dev = MemoryDevice(self.dev.size, bytes(self.dev.data))
        self.store = SharedStore.open(self.dev)
        self.store.sweep_budget = self.BUDGET
        assert self.store.snapshot_space() == figures
        assert self.store.unswept_chunks() == unswept

    @rule(data=st.data())
    def resize_store(self, data):
        """Grow or shrink the store (as the service does it: everything committed and
        checkpointed first), also with a delete half swept: refused or not, no lookup,
        no figure and nothing unswept changes; the chunk total moves by the change."""
        store = self.store
        now, least = store.store_size // self.CHUNK, store.min_size // self.CHUNK
        new = data.draw(st.integers(least, now + 8), label="chunks")
        before = lookups(store)
        figures = store.snapshot_space()
        unswept = store.unswept_chunks()
        total = store.space()["chunks_total"]
        store.request_checkpoint()
        store.commit()
        try:
            store.resize_store(new * self.CHUNK)
        except ShrinkRefused:
            event("store shrink refused")
            assert new < now
            new = now
        except StoreFull:  # no free run for the new bitmap
            event("store resize: no room for the bitmap")
            assert self.SHARED
            new = now
        else:
            event("store grown" if new > now else "store shrunk" if new < now else "same")
        assert store.space()["chunks_total"] == total + new - now
        assert lookups(store) == before
        assert store.snapshot_space() == figures
        assert store.unswept_chunks() == unswept

    @invariant()
    def figures_are_exact(self):
        assert_exact(self.store)
        if not self.store.pending_blocks():  # check() reads the store as it is on disk
            assert fatal(self.store) == []
        if tree_blocks(self.store) > 2:
            event("tree of several leaves")
        used = self.store.space()["chunks_used"]
        if self.SHARED:
            # Data chunks, tree blocks, and table blocks past the first (4 KiB chunks).
            # After a store resize the bitmap may live in the data area.
            shared = self.store
            assert isinstance(shared, SharedStore)  # SHARED
            sb = shared.sb
            meta = (tree_blocks(shared) + len(shared.table_blocks) - 1
                    + sum(1 for b in range(sb.bitmap_start, sb.bitmap_start + sb.bitmap_blocks)
                          if b >= shared.data_start))
            assert used == self.store.exception_chunks() + meta
        else:
            assert used == self.store.exception_chunks()

    def teardown(self):
        self.store.commit()
        assert fatal(self.store) == []
        sweep_all(self.store)
        assert_exact(self.store)
        assert self.store.check() == []


STATEFUL = settings(max_examples=examples(100), stateful_step_count=80, deadline=None)


class SharedSpaceMachine(SpaceMachine):
    SHARED = True


class SharedWideSpaceMachine(SpaceMachine):
    """More chunks than a leaf holds (168) and long writes: edits split leaves (and fail
    to, when the store is full) and sweeps merge them."""

    SHARED = True
    ORIGIN_CHUNKS = 300
    STORE = 320 * 4096  # 280 chunks for data and tree
    JOURNAL = 32
    MAX_LIVE = 4
    MAX_RUN = 120
    BUDGET = 50


class MemorySpaceMachine(SpaceMachine):
    SHARED = False
    STORE = 30 * 4096


TestSharedSpace = SharedSpaceMachine.TestCase
TestSharedSpace.settings = STATEFUL
TestSharedWideSpace = SharedWideSpaceMachine.TestCase
TestSharedWideSpace.settings = settings(STATEFUL, max_examples=examples(25))
TestMemorySpace = MemorySpaceMachine.TestCase
TestMemorySpace.settings = STATEFUL
