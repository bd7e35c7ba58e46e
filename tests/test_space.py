"""Per-snapshot space accounting (issue 3, "Space accounting").

Every exception store keeps, for each live snapshot, ``exclusive`` (store chunks only it
uses: exactly what deleting it frees) and ``shared`` (store chunks it uses with another
live snapshot) up to date as sharemaps change (:meth:`ExceptionStore.snapshot_space`).

Covered here, for SharedStore (on a MemoryDevice and a FileDevice) and MemoryStore:

* unit tests at the ExceptionStore API level: copy-outs, snapshot writes, merge drops,
  creates, deletes before and after the sweep (bits of deleted snapshots still in the
  sharemaps), chained deletes, figures across clean and unclean reopens, a failed leaf
  split, a sweep stopped half-way through a two-level tree, drift reported by ``check``
  naming the snapshot, figures unavailable after opening a store with a damaged leaf;
* deleting a snapshot frees exactly its ``exclusive`` chunks (``space()["chunks_free"]``
  before and after);
* a hypothesis state machine over origin writes, snapshot writes, merge drops, creates,
  deletes (swept at once, step by step or later), commits and reopens, checking the
  incremental figures against a brute-force count over ``store.exceptions()`` after
  every step, and ``check()`` at the end.
"""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from conftest import examples
from ddsnap.errors import CorruptMetadata, StoreFull
from ddsnap.store.blockdev import MemoryDevice
from ddsnap.store.format import BLOCK_SIZE, LEAF_MAP_OFF
from ddsnap.store.memory import MemoryStore
from ddsnap.store.shared import SharedStore
from ddsnap.store.snapshots import SpaceAccount

KINDS = ["shared-memory", "shared-file", "memory"]
SHARED_KINDS = ["shared-memory", "shared-file"]


@pytest.fixture(params=KINDS)
def kind(request):
    return request.param


# -- helpers -------------------------------------------------------------------------------

def brute_force(store) -> tuple[dict[int, tuple[int, int]], int, int]:
    """``(figures, exception chunks, unswept chunks)`` counted from ``store.exceptions()``
    and the live mask alone, by the definitions (no shared code with the store)."""
    live = store.live_mask
    excl: dict[int, int] = {}
    shared: dict[int, int] = {}
    total = orphans = 0
    for _chunk, excs in store.exceptions():
        for share, _sc in excs:
            total += 1
            users = [b for b in range(store.max_snapshots) if (share & live) >> b & 1]
            if not users:
                orphans += 1
            elif len(users) == 1:
                excl[users[0]] = excl.get(users[0], 0) + 1
            else:
                for b in users:
                    shared[b] = shared.get(b, 0) + 1
    figures = {b: (excl.get(b, 0), shared.get(b, 0))
               for b in range(store.max_snapshots) if live >> b & 1}
    return figures, total, orphans


def assert_exact(store) -> None:
    """The incremental figures equal the brute-force count."""
    figures, total, orphans = brute_force(store)
    assert store.snapshot_space() == figures
    assert store.exception_chunks() == total
    assert store.unswept_chunks() == orphans


def space_of(store, name) -> tuple[int, int]:
    return store.snapshot_space()[store.snapshot(name).bit]


def sweep_all(store) -> None:
    for _ in range(10000):
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
        node = store._read_node(block)
        if level == store.state.levels - 1:
            return 1 + len(node.children)
        return 1 + sum(count(c, level + 1) for c in node.children)
    return count(store.state.root, 0)


def origin_write(store, chunk: int) -> int | None:
    """Copy out ``chunk`` for the snapshots sharing it with the origin (metadata only)."""
    sharers = store.origin_sharers(chunk)
    if not sharers:
        return None
    sc = store.allocate_chunk()
    try:
        store.add_origin_exception(chunk, sc, sharers)
    except StoreFull:
        store.release_chunk(sc)
        raise
    return sc


def snapshot_write(store, bit: int, chunk: int) -> int:
    """Make ``chunk`` unique to snapshot ``bit`` (metadata only); its store chunk."""
    sc, unique = store.snapshot_exception(bit, chunk)
    if unique:
        return sc
    new = store.allocate_chunk()
    try:
        store.add_snapshot_exception(bit, chunk, new)
    except StoreFull:
        store.release_chunk(new)
        raise
    return new


def fatal(store) -> list:
    return [f for f in store.check() if f.severity == "fatal"]


# =======================================================================================
# unit tests, every store kind

def test_empty_store_uses_nothing(make_store, kind):
    store = make_store(kind)
    assert store.snapshot_space() == {}
    assert (store.exception_chunks(), store.unswept_chunks()) == (0, 0)
    a = store.create_snapshot("a")
    assert store.snapshot_space() == {a.bit: (0, 0)}  # reads the origin everywhere


def test_copy_out_is_shared_and_unsharing_makes_it_exclusive(make_store, kind):
    store = make_store(kind)
    a = store.create_snapshot("a")
    b = store.create_snapshot("b")
    origin_write(store, 5)
    assert store.snapshot_space() == {a.bit: (0, 1), b.bit: (0, 1)}
    # a diverges at 5: a gets its own chunk, the old one is b's alone.
    snapshot_write(store, a.bit, 5)
    assert store.snapshot_space() == {a.bit: (1, 0), b.bit: (1, 0)}
    # b diverges where it still reads the origin: only b's figures move.
    snapshot_write(store, b.bit, 9)
    assert store.snapshot_space() == {a.bit: (1, 0), b.bit: (2, 0)}
    # an origin write at 9 copies out for a alone.
    origin_write(store, 9)
    assert store.snapshot_space() == {a.bit: (2, 0), b.bit: (2, 0)}
    assert store.exception_chunks() == 4
    assert_exact(store)
    store.commit()
    assert fatal(store) == []


def test_create_changes_no_other_figures(make_store, kind):
    store = make_store(kind)
    a = store.create_snapshot("a")
    for c in range(4):
        origin_write(store, c)
    before = store.snapshot_space()
    b = store.create_snapshot("b")
    assert store.snapshot_space() == {**before, b.bit: (0, 0)}
    origin_write(store, 2)  # a has its copy already: copied out for b alone
    origin_write(store, 7)  # shared by both
    assert store.snapshot_space() == {a.bit: (4, 1), b.bit: (1, 1)}
    assert_exact(store)


def test_delete_makes_shared_chunks_exclusive_before_the_sweep(make_store, kind):
    """Bits of a snapshot being deleted stay in the sharemaps until swept; the figures of
    the others already count it out, and its own chunks are unswept."""
    store = make_store(kind)
    a, b, c = (store.create_snapshot(n) for n in "abc")
    A, B, C = 1 << a.bit, 1 << b.bit, 1 << c.bit
    chunks = {}
    for chunk, share in ((1, A | B), (2, A | B | C), (3, A), (4, B), (5, A | C)):
        chunks[chunk] = store.allocate_chunk()
        store.add_origin_exception(chunk, chunks[chunk], share)
    assert store.snapshot_space() == {a.bit: (1, 3), b.bit: (1, 2), c.bit: (0, 2)}
    store.commit()
    store.begin_delete("a")
    # {a,b} -> b alone, {a,b,c} -> shared by b and c, {a} -> nobody, {a,c} -> c alone.
    assert store.snapshot_space() == {b.bit: (2, 1), c.bit: (1, 1)}
    assert (store.exception_chunks(), store.unswept_chunks()) == (5, 1)
    assert_exact(store)
    store.commit()
    assert fatal(store) == []
    free = store.space()["chunks_free"]
    sweep_all(store)
    assert store.snapshot_space() == {b.bit: (2, 1), c.bit: (1, 1)}
    assert (store.exception_chunks(), store.unswept_chunks()) == (4, 0)
    assert store.space()["chunks_free"] == free + 1
    assert_exact(store)
    assert store.check() == []


def test_chained_deletes_before_any_sweep(make_store, kind):
    """Deleting b while a's delete is not swept yet: c inherits what all three shared."""
    store = make_store(kind)
    a, b, c = (store.create_snapshot(n) for n in "abc")
    A, B, C = 1 << a.bit, 1 << b.bit, 1 << c.bit
    for chunk, share in ((1, A | B | C), (2, A | B), (3, B | C), (4, A | C)):
        store.add_origin_exception(chunk, store.allocate_chunk(), share)
    store.begin_delete("a")
    assert store.snapshot_space() == {b.bit: (1, 2), c.bit: (1, 2)}
    store.begin_delete("b")
    assert store.snapshot_space() == {c.bit: (3, 0)}
    assert store.unswept_chunks() == 1
    assert_exact(store)
    store.commit()
    assert fatal(store) == []
    free = store.space()["chunks_free"]
    sweep_all(store)
    assert store.snapshot_space() == {c.bit: (3, 0)}
    assert store.space()["chunks_free"] == free + 1
    assert_exact(store)


def test_deleting_frees_exactly_the_exclusive_chunks(make_store, kind):
    """Delete the snapshots one by one: each delete frees ``exclusive`` chunks (the tree
    stays one leaf, so no metadata block is freed with them)."""
    store = make_store(kind)
    snaps = []
    for round_ in range(5):
        snaps.append(store.create_snapshot(f"s{round_}"))
        for chunk in range(round_, 40, round_ + 2):
            origin_write(store, chunk)
        for chunk in range(0, 40, 7):
            snapshot_write(store, snaps[round_ // 2].bit, chunk + round_)
    store.commit()
    assert tree_blocks(store) in (0, 2)
    for name in ("s2", "s0", "s4", "s1", "s3"):
        excl, _shared = space_of(store, name)
        free = store.space()["chunks_free"]
        store.begin_delete(name)
        store.commit()
        sweep_all(store)
        assert store.space()["chunks_free"] - free == excl, name
        assert_exact(store)
    assert store.exception_chunks() == 0
    assert store.check() == []


def test_merge_drop_returns_a_snapshot_to_the_origin(make_store, kind):
    """``drop_snapshot_exception`` (a merge step) leaves the exception: shared becomes
    exclusive for the other user, an exclusive one is freed."""
    store = make_store(kind)
    a = store.create_snapshot("a")
    b = store.create_snapshot("b")
    origin_write(store, 1)  # {a, b}
    snapshot_write(store, a.bit, 2)  # {a}
    store.drop_snapshot_exception(a.bit, 1)
    assert store.snapshot_space() == {a.bit: (1, 0), b.bit: (1, 0)}
    free = store.space()["chunks_free"]
    store.drop_snapshot_exception(a.bit, 2)
    assert store.snapshot_space() == {a.bit: (0, 0), b.bit: (1, 0)}
    assert store.space()["chunks_free"] == free + 1
    store.drop_snapshot_exception(a.bit, 3)  # nothing there: nothing changes
    assert_exact(store)
    store.commit()
    assert store.check() == []


@pytest.mark.parametrize("kind", SHARED_KINDS)
def test_figures_survive_reopen_mid_delete(make_store, kind):
    store = make_store(kind)
    a, b, c = (store.create_snapshot(n) for n in "abc")
    for chunk in range(30):
        origin_write(store, chunk)
        if chunk % 3 == 0:
            snapshot_write(store, b.bit, chunk)
    store.begin_delete("a")
    want = store.snapshot_space()
    assert want == {b.bit: (10, 20), c.bit: (10, 20)}
    store.commit()
    # Unclean: a copy of the device as it is, the journal replayed by open.
    copy = SharedStore.open(MemoryDevice(store.dev.size, bytes(store.dev.pread(store.dev.size, 0))))
    assert copy.snapshot_space() == want and copy.unswept_chunks() == 0
    store = make_store.reopen(store)
    assert store.snapshot_space() == want
    assert_exact(store)
    sweep_all(store)
    assert store.snapshot_space() == want
    assert store.check() == []


@pytest.mark.parametrize("kind", SHARED_KINDS)
def test_failed_split_leaves_the_figures(make_store, kind):
    """An origin copy-out and a snapshot write whose full leaf must split, with no block
    left for the split: StoreFull, the edit is undone, and the figures are as before."""
    store = make_store(kind, origin_size=8 << 20, store_size=2 << 20, max_snapshots=1024)
    a = store.create_snapshot("a")
    b = store.create_snapshot("b")
    ab = (1 << a.bit) | (1 << b.bit)

    def full_for(extra: int) -> bool:
        _p, _b, leaf = store._probe(0)
        return LEAF_MAP_OFF + 8 + leaf.payload(store.exc_size) + extra > BLOCK_SIZE

    nxt = 0
    while not full_for(8 + store.exc_size):  # room for one more chunk's exception
        store.add_origin_exception(nxt, store.allocate_chunk(), ab)
        nxt += 1
    if not full_for(store.exc_size):  # room for one more exception of a chunk
        snapshot_write(store, a.bit, 0)
    store.commit()
    assert store.state.levels == 1 and full_for(store.exc_size)
    filler = []
    while store.space()["chunks_free"] > 1:  # 4 KiB chunks: a chunk is a block
        filler.append(store.allocate_chunk())
    before = store.snapshot_space()
    assert before[b.bit][1] > 0
    for attempt in ("origin", "snapshot"):
        sc = store.allocate_chunk()
        with pytest.raises(StoreFull):
            if attempt == "origin":
                store.add_origin_exception(nxt, sc, ab)
            else:
                store.add_snapshot_exception(b.bit, 1, sc)  # leaves {a, b}: one more
        store.release_chunk(sc)
        assert store.snapshot_space() == before, attempt
        assert_exact(store)
    for f in filler:
        store.release_chunk(f)
    store.commit()
    assert store.check() == []
    # With room the same write goes in: b's chunk 1 becomes its own, the old one a's.
    snapshot_write(store, b.bit, 1)
    excl_a, shared_a = before[a.bit]
    excl_b, shared_b = before[b.bit]
    assert store.snapshot_space() == {a.bit: (excl_a + 1, shared_a - 1),
                                      b.bit: (excl_b + 1, shared_b - 1)}
    assert len(store._read_node(store.state.root).children) == 2  # the leaf split
    assert_exact(store)
    store.commit()
    assert store.check() == []


def test_check_reports_drift_naming_the_snapshot(make_store, kind):
    store = make_store(kind)
    a = store.create_snapshot("alpha")
    b = store.create_snapshot("beta")
    origin_write(store, 3)
    snapshot_write(store, b.bit, 4)
    store.commit()
    assert store.check() == []
    acc = store._space_account()
    acc.exclusive[b.bit] += 1
    found = fatal(store)
    assert len(found) == 1 and "'beta'" in found[0].message and "'alpha'" not in found[0].message
    acc.exclusive[b.bit] -= 1
    acc.shared[a.bit] -= 1
    found = fatal(store)
    assert len(found) == 1 and "'alpha'" in found[0].message
    acc.shared[a.bit] += 1
    acc.groups[1 << a.bit] = 5  # a wrong count of one sharemap: future figures would be wrong
    assert fatal(store)
    del acc.groups[1 << a.bit]
    assert store.check() == []


def test_damaged_leaf_makes_the_figures_unavailable():
    store = SharedStore.create(MemoryDevice(2 << 20), origin_size=1 << 20, chunk_size=4096)
    a = store.create_snapshot("a")
    origin_write(store, 1)
    store.close()
    leaf = store._read_node(store.state.root).children[0]
    image = MemoryDevice(store.dev.size, bytes(store.dev.pread(store.dev.size, 0)))
    image.data[leaf * BLOCK_SIZE + BLOCK_SIZE - 3] ^= 4
    damaged = SharedStore.open(image)  # the root is intact: open succeeds
    with pytest.raises(CorruptMetadata) as e:
        damaged.snapshot_space()
    assert e.value.block == leaf
    found = fatal(damaged)
    assert found and all(f.block == leaf for f in found)
    assert SharedStore.open(MemoryDevice(store.dev.size, bytes(store.dev.pread(store.dev.size, 0)))
                            ).snapshot_space() == {a.bit: (1, 0)}


def test_sweep_stopped_half_way_through_a_big_tree(make_store):
    """A two-level tree swept one bottom index node per step: the figures are exact
    between the steps (some leaves still hold the deleted bit, some do not)."""
    store = make_store("shared-memory", origin_size=64 << 20, store_size=48 << 20,
                       max_snapshots=1024)
    store.sweep_budget = 1
    a = store.create_snapshot("a")
    b = store.create_snapshot("b")
    n = 9000
    for chunk in range(n):
        store.add_origin_exception(chunk, store.allocate_chunk(),
                                   (1 << a.bit) | ((1 << b.bit) if chunk % 3 else 0))
        if chunk % 500 == 0:
            store.commit()
    store.commit()
    assert store.state.levels >= 2
    assert store.snapshot_space() == {a.bit: (n // 3, n - n // 3), b.bit: (0, n - n // 3)}
    c = store.create_snapshot("c")
    store.begin_delete("a")
    assert store.snapshot_space() == {b.bit: (n - n // 3, 0), c.bit: (0, 0)}
    assert store.unswept_chunks() == n // 3
    steps = 0
    while not store.sweep_step():
        steps += 1
        store.commit()
        assert 0 < store.unswept_chunks() < n // 3 or store.unswept_chunks() == 0
        assert store.snapshot_space() == {b.bit: (n - n // 3, 0), c.bit: (0, 0)}
    store.commit()
    assert steps >= 1
    assert store.unswept_chunks() == 0
    assert_exact(store)
    assert store.check() == []


def test_space_account_costs_follow_distinct_sharemaps():
    """The account's memory and a delete's cost grow with distinct sharemaps, not with
    exceptions; an unchanged exception in an edited list costs nothing."""
    acc = SpaceAccount(64)
    for bit in range(3):
        acc.created(bit)
    for _ in range(1000):
        acc.change(0, 0b111)
    acc.change(0, 0b001)
    assert len(acc.groups) == 2
    assert acc.figures() == {0: (1, 1000), 1: (0, 1000), 2: (0, 1000)}
    acc.deleted(1)
    assert acc.figures() == {0: (1, 1000), 2: (0, 1000)}
    acc.deleted(2)
    assert acc.figures() == {0: (1001, 0)}
    acc.diff([[0b111, 7], [0b001, 8]], [[0b111, 7]])
    assert acc.figures() == {0: (1000, 0)} and acc.exceptions == 1000


# =======================================================================================
# the state machine: incremental figures against a brute-force count after every step

class SpaceMachine(RuleBasedStateMachine):
    """Store-API level operations on a small store (StoreFull happens), checked with
    :func:`assert_exact` after every step."""

    SHARED = True
    CHUNK = 4096
    ORIGIN_CHUNKS = 24
    STORE = 48 * 4096  # shared: device bytes (24 chunks of data and tree); memory: data
    MAX_SNAPSHOTS = 64
    JOURNAL = 16

    def __init__(self):
        super().__init__()
        origin = self.ORIGIN_CHUNKS * self.CHUNK
        if self.SHARED:
            self.dev = MemoryDevice(self.STORE)
            self.store = SharedStore.create(self.dev, origin_size=origin, chunk_size=self.CHUNK,
                                            max_snapshots=self.MAX_SNAPSHOTS,
                                            journal_blocks=self.JOURNAL)
        else:
            self.store = MemoryStore(origin, self.STORE, self.CHUNK, self.MAX_SNAPSHOTS)
        self.counter = 0

    def _names(self):
        return sorted(s.name for s in self.store.snapshots())

    @rule(chunks=st.lists(st.integers(0, ORIGIN_CHUNKS - 1), min_size=1, max_size=10))
    def write_origin(self, chunks):
        for c in chunks:
            try:
                origin_write(self.store, c)
            except StoreFull:
                return

    @precondition(lambda self: self.store.snapshots())
    @rule(data=st.data(), chunks=st.lists(st.integers(0, ORIGIN_CHUNKS - 1), min_size=1,
                                          max_size=6))
    def write_snapshot(self, data, chunks):
        bit = self.store.snapshot(data.draw(st.sampled_from(self._names()))).bit
        for c in chunks:
            try:
                snapshot_write(self.store, bit, c)
            except StoreFull:
                return

    @precondition(lambda self: self.store.snapshots())
    @rule(data=st.data(), chunk=st.integers(0, ORIGIN_CHUNKS - 1))
    def merge_drop(self, data, chunk):
        bit = self.store.snapshot(data.draw(st.sampled_from(self._names()))).bit
        self.store.drop_snapshot_exception(bit, chunk)

    @precondition(lambda self: len(self.store.snapshots()) < 6)
    @rule()
    def create(self):
        self.counter += 1
        try:
            self.store.create_snapshot(f"s{self.counter}")
        except Exception as e:  # every slot still being deleted
            assert type(e).__name__ == "TooManySnapshots"

    @precondition(lambda self: self.store.snapshots())
    @rule(data=st.data(), sweep=st.sampled_from(["now", "later", "one step"]))
    def delete(self, data, sweep):
        store = self.store
        name = data.draw(st.sampled_from(self._names()))
        excl = space_of(store, name)[0]
        unswept = store.unswept_chunks()
        free = store.space()["chunks_free"]
        blocks = tree_blocks(store)
        store.begin_delete(name)
        assert store.unswept_chunks() == unswept + excl
        store.commit()
        if sweep == "now":
            sweep_all(store)
            freed = store.space()["chunks_free"] - free
            # Exactly its exclusive chunks, those of earlier unswept deletes, and the
            # tree blocks the sweep compacted away (a 4 KiB chunk is one block).
            assert freed == excl + unswept + blocks - tree_blocks(store)
        elif sweep == "one step":
            store.sweep_step()
            store.commit()

    @rule(sweep=st.booleans())
    def commit(self, sweep):
        if sweep:
            sweep_all(self.store)
        self.store.commit()

    @precondition(lambda self: self.SHARED)
    @rule(clean=st.booleans())
    def reopen(self, clean):
        if clean:
            self.store.close()
        else:
            self.store.commit()
            self.dev = MemoryDevice(self.dev.size, bytes(self.dev.data))
        self.store = SharedStore.open(self.dev)

    @invariant()
    def figures_are_exact(self):
        assert_exact(self.store)

    def teardown(self):
        self.store.commit()
        assert fatal(self.store) == []


STATEFUL = settings(max_examples=examples(30), stateful_step_count=50, deadline=None)


class SharedSpaceMachine(SpaceMachine):
    SHARED = True


class SharedWideSpaceMachine(SpaceMachine):
    """1024-bit sharemaps: leaves hold ~27 chunks, so edits split leaves (and fail to,
    when the store is full) and sweeps merge them."""

    SHARED = True
    ORIGIN_CHUNKS = 24
    MAX_SNAPSHOTS = 1024
    STORE = 140 * 4096  # the snapshot table takes 84 blocks: 47 chunks of data and tree


class MemorySpaceMachine(SpaceMachine):
    SHARED = False
    STORE = 30 * 4096


TestSharedSpace = SharedSpaceMachine.TestCase
TestSharedSpace.settings = STATEFUL
TestSharedWideSpace = SharedWideSpaceMachine.TestCase
TestSharedWideSpace.settings = STATEFUL
TestMemorySpace = MemorySpaceMachine.TestCase
TestMemorySpace.settings = STATEFUL
