"""The exception-store API: what the snapshot logic needs from a snapshot store.

Seed 004 splits snapshot logic from a pluggable exception store whose internals hide
behind a small API; seed 001 gives that API for a store shared by many snapshots
(``prepare_exception``, ``commit_exception`` batched with callbacks,
``lookup_completed_exception``, ``fraction_full``, ``status``).  This module is that API
in Python.  Two implementations satisfy it and pass one conformance suite:
:class:`ddsnap.store.shared.SharedStore` (on disk, format v3) and
:class:`ddsnap.store.memory.MemoryStore` (transient, in memory); both keep their
exceptions as versioned pointers (:mod:`ddsnap.store.versioned`).

Units: a *chunk* is ``chunk_size`` bytes.  Logical chunks index the origin (chunk ``c`` is
origin bytes ``[c * chunk_size, (c + 1) * chunk_size)``); store chunks index the store's
data device :attr:`ExceptionStore.cow` the same way.  Snapshots are identified inside the
store by their *version id* (1, 2, ..., never reused; the origin is 0); users see their
names.

Thread safety: none.  The caller (``ddsnap.store.service``) serialises every call under its
metadata lock, except :meth:`ExceptionStore.write_commit`, which it serialises separately so
a commit's disk flushes do not hold up new mappings.
"""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING, Any

from .blockdev import BlockDevice
from .model import (
    FULL_POLICIES,
    NO_MERGE,
    Finding,
    Received,
    Receiving,
    SnapshotInfo,
    State,
    utc_iso,
)

if TYPE_CHECKING:
    from .snapshots import VersionTable
    from .space import SpaceAccount


class NotCached(Exception):
    """A lookup would have to read metadata from disk (see
    :meth:`ExceptionStore.snapshot_exception_nowait`); not an error, a "try elsewhere"."""


class ExceptionStore(abc.ABC):
    """A store of exceptions shared by the snapshots of one origin.

    Attributes:
        chunk_size: bytes per chunk (a power of two, 4 KiB .. 1 MiB).
        origin_size: bytes of the origin this store snapshots.
        origin_path: where the origin was when the store was made.
        max_snapshots: most snapshots (versions) the store may hold, 0 for no limit.
        uuid: the store's 16-byte identity (a send stream names its source by it).
        cow: the device holding exception data; store chunk ``s`` is at
            ``s * chunk_size``.
    """

    chunk_size: int
    origin_size: int
    origin_path: str
    max_snapshots: int
    uuid: bytes
    cow: BlockDevice
    #: the versions: live snapshots, ghosts, and how they descend from each other
    table: VersionTable

    @property
    @abc.abstractmethod
    def store_size(self) -> int:
        """Bytes the store uses for exceptions and metadata (whole chunks)."""

    @property
    @abc.abstractmethod
    def min_size(self) -> int:
        """The fewest bytes :meth:`resize_store` accepts (whole chunks)."""

    @property
    def origin_chunks(self) -> int:
        """Logical chunks in the origin (the last one may be partial)."""
        return -(-self.origin_size // self.chunk_size)

    def note_auto_deleted(self, info: SnapshotInfo, when_ns: int) -> None:
        """Remember that the full-store policy deleted ``info`` at ``when_ns`` (ns since
        the Unix epoch); a store that persists it (SharedStore: in the superblock, at
        the delete's checkpoint) reports it after a restart."""
        self.__dict__.setdefault("_auto_deleted", []).append(
            {"name": info.name, "id": info.id, "deleted": utc_iso(when_ns)})

    def receive_state(self) -> tuple[Receiving | None, Received | None]:
        """The receive in progress (None if none) and the last one completed (None if
        none): see :meth:`record_receive`."""
        return self.__dict__.get("_receive", (None, None))

    def record_receive(self, receiving: Receiving | None, received: Received | None) -> None:
        """Commit, then record the receive in progress and the last completed one (issue
        13, docs/stream.md), durably on return (SharedStore: in both superblock slots).

        Raises:
            OSError / DdsnapError: the commit or the superblock write failed.
        """
        self.commit()
        self.__dict__["_receive"] = (receiving, received)

    def auto_deleted(self) -> list[dict]:
        """Snapshots the full-store policy deleted, oldest first: ``name``, ``id`` and
        ``deleted`` (ISO 8601 UTC)."""
        return list(self.__dict__.get("_auto_deleted", []))

    # -- snapshots -----------------------------------------------------------------------

    @abc.abstractmethod
    def snapshots(self) -> list[SnapshotInfo]:
        """Live snapshots, oldest first."""

    def snapshot(self, name: str) -> SnapshotInfo:
        """The live snapshot called ``name``.

        Raises:
            SnapshotNotFound: no such snapshot.
        """
        from ..errors import SnapshotNotFound

        for s in self.snapshots():
            if s.name == name:
                return s
        raise SnapshotNotFound(name)

    @abc.abstractmethod
    def create_snapshot(self, name: str, read_only: bool = False,
                        created: int | None = None, parent: int = 0) -> SnapshotInfo:
        """Add a snapshot of the origin (``parent`` 0) or of the live snapshot with id
        ``parent`` as it is now, in constant time.

        Raises:
            SnapshotExists: the name is taken.
            SnapshotNotFound: ``parent`` is not a live snapshot.
            TooManySnapshots: the store's ``--max-snapshots`` limit is reached.
            InvalidArgument: the name is empty, too long or has a '/' or NUL.
        """

    @abc.abstractmethod
    def begin_delete(self, name: str) -> SnapshotInfo:
        """Remove ``name`` from the live snapshots; its exceptions are swept later.

        Raises:
            SnapshotNotFound: no such snapshot.
        """

    @abc.abstractmethod
    def ancestors(self, version: int) -> list[int]:
        """The versions ``version`` descends from, nearest first, down to and including
        the origin (0): a clone's parent snapshot, its parent, ... (ghosts included)."""

    @abc.abstractmethod
    def sweep_step(self) -> bool:
        """Do one bounded step of removing exceptions no live snapshot reads any more.

        Frees their chunks (seed 001 ``delete_tree_range``).  Returns True when nothing
        is left to sweep.
        """

    # -- root state: merge progress and the full-store policy ----------------------------
    #
    # Both stores keep these in ``self.state`` (a :class:`~ddsnap.store.format.State`),
    # committed with the next transaction; ``_state_changed`` marks it for that commit.

    state: State

    @abc.abstractmethod
    def _state_changed(self) -> None:
        """The root state changed: include it in the next commit."""

    @property
    def merging(self) -> int | None:
        """Version id of the snapshot being merged into the origin, or None."""
        v = self.state.merge_version
        return None if v == NO_MERGE else v

    def set_merge(self, version: int | None, keep: bool = False, cursor: int = 0) -> None:
        """Start (``version``) or end (None) a merge into the origin (seed 003)."""
        self.state.merge_version = NO_MERGE if version is None else version
        self.state.merge_keep = keep if version is not None else False
        self.state.merge_cursor = cursor
        self._state_changed()

    def set_merge_cursor(self, cursor: int) -> None:
        """Logical chunks below ``cursor`` are merged."""
        self.state.merge_cursor = cursor
        self._state_changed()

    @property
    def full_policy(self) -> str:
        """What a write that finds the store full does: ``error`` or ``delete-oldest``."""
        return FULL_POLICIES[self.state.full_policy]

    def set_full_policy(self, policy: str) -> None:
        """Raises InvalidArgument for an unknown policy."""
        from ..errors import InvalidArgument

        if policy not in FULL_POLICIES:
            raise InvalidArgument(f"full-policy must be one of {', '.join(FULL_POLICIES)}, "
                                  f"not {policy!r}")
        self.state.full_policy = FULL_POLICIES.index(policy)
        self._state_changed()

    # -- sizes (docs/format.md "Resizing") ------------------------------------------------

    @abc.abstractmethod
    def set_origin_size(self, size: int) -> None:
        """Record the origin's new size in bytes; durable at the next commit."""

    @abc.abstractmethod
    def versions_past(self, size: int) -> list[SnapshotInfo]:
        """Every version (live, being deleted, or a ghost) bigger than ``size`` bytes."""

    @abc.abstractmethod
    def origin_kept_past(self, size: int) -> list[int]:
        """Live version ids reading a copy-out the origin keeps wholly past ``size``
        bytes."""

    @abc.abstractmethod
    def resize_store(self, size: int) -> int:
        """Grow or shrink the store to ``size`` bytes (whole chunks); returns the size
        it now uses.

        Raises:
            InvalidArgument: too small for the metadata (below :attr:`min_size`).
            ShrinkRefused: chunks past the new end are in use.
            StoreFull: no room for a bigger bitmap.
        """

    def free_leaked(self, blocks: list[int]) -> None:
        """Free blocks that are allocated but referenced by nothing (``check
        --repair``); a store kept in memory never leaks, so it has none to free.

        Raises:
            InvalidArgument: this store cannot have leaked ``blocks``.
        """
        if blocks:
            from ..errors import InvalidArgument

            raise InvalidArgument(f"{type(self).__name__} keeps no leaked blocks")

    # -- mapping (versioned exceptions: docs/format.md) -----------------------------------

    @abc.abstractmethod
    def origin_sharers(self, chunk: int) -> int:
        """Whether an origin write to logical ``chunk`` must copy it out first (seed 000
        ``origin_chunk_unique``): 0 if no live snapshot reads the origin there, else the
        tag to give the copy-out (pass it to :meth:`add_origin_exception`)."""

    @abc.abstractmethod
    def snapshot_exception(self, version: int, chunk: int) -> tuple[int | None, bool]:
        """``(store_chunk, unique)`` for snapshot ``version`` at logical ``chunk``.

        ``store_chunk`` is None when the snapshot reads the origin; ``unique`` is True when
        the snapshot may write that store chunk in place: it is the snapshot's own and no
        other live snapshot reads it (seed 000 ``snapshot_chunk_unique``).
        """

    def snapshot_chunk(self, version: int, chunk: int) -> int | None:
        """Only the store chunk of :meth:`snapshot_exception` (what a read needs; cheaper:
        uniqueness is not worked out)."""
        return self.snapshot_exception(version, chunk)[0]

    def snapshot_exception_nowait(self, version: int, chunk: int) -> tuple[int | None, bool]:
        """:meth:`snapshot_exception` from metadata already in memory, never from disk.

        The NBD server answers reads on its event loop with this (and falls back to a
        worker thread), so it must not block.  ``unique`` may be False when it is not
        (reads do not need it).

        Raises:
            NotCached: a tree block on the way is not in memory.
        """
        return self.snapshot_exception(version, chunk)

    @abc.abstractmethod
    def snapshot_write_keeps(self, version: int, chunk: int) -> bool:
        """Whether a write by ``version`` to ``chunk`` (not unique) must also keep a copy
        of the current data for the snapshots taken of ``version`` that read it: True
        when ``version`` has no exception of its own there (it reads an ancestor's data
        or the origin) and some live snapshot taken of it reads through it."""

    @abc.abstractmethod
    def allocate_chunk(self) -> int:
        """Reserve a free store chunk for a new exception.

        Raises:
            StoreFull: no free chunk.
        """

    @abc.abstractmethod
    def release_chunk(self, store_chunk: int) -> None:
        """Give back a chunk from :meth:`allocate_chunk` that no exception ever used
        (its exception could not be recorded)."""

    @abc.abstractmethod
    def add_origin_exception(self, chunk: int, store_chunk: int, tag: int) -> None:
        """Record the copy-out of origin ``chunk`` to ``store_chunk``, with the ``tag``
        :meth:`origin_sharers` gave: the snapshots that read the origin there read it.

        Raises:
            StoreFull: no room for the metadata; nothing was changed (the caller still
                owns ``store_chunk`` and gives it back with :meth:`release_chunk`).
        """

    @abc.abstractmethod
    def add_snapshot_exception(self, version: int, chunk: int, store_chunk: int,
                               kept: int | None = None) -> None:
        """Make ``store_chunk`` the data of snapshot ``version`` alone at ``chunk``.

        The data it read before stays for the snapshots taken of it: its own old
        exception is kept for them, or, when :meth:`snapshot_write_keeps` said so,
        ``kept`` (a chunk the caller filled with a copy of that data) is recorded.

        Raises:
            StoreFull: as :meth:`add_origin_exception` (the caller still owns both).
        """

    # -- merge (seed 003) ------------------------------------------------------------------

    @abc.abstractmethod
    def merge_source(self, chunk: int) -> int | None:
        """During a merge: the store chunk the origin reads at ``chunk`` because the
        merging snapshot's data there is not merged yet, or None (the origin device)."""

    @abc.abstractmethod
    def merge_todo(self, start: int, limit: int) -> list[tuple[int, int]]:
        """Up to ``limit`` ``(chunk, store_chunk)`` of the merging snapshot's data not yet
        merged into the origin, with ``chunk >= start``, ascending (what a merge copies,
        seed 003)."""

    @abc.abstractmethod
    def mark_merged(self, chunk: int) -> None:
        """The merging snapshot's data at ``chunk`` is in the origin now (durable)."""

    # -- durability ----------------------------------------------------------------------

    @abc.abstractmethod
    def begin_commit(self) -> object | None:
        """Capture the changes made since the last commit; None if there are none.

        Called under the caller's metadata lock; cheap (encodes, does no I/O).
        """

    @abc.abstractmethod
    def write_commit(self, batch: Any) -> None:
        """Make a captured batch durable: exception data first, then the metadata commit.

        DESIGN.md invariant 3.  Called without the metadata lock, one batch at a time, in
        the order the batches were captured.
        """

    def reclaimable(self) -> bool:
        """True if freed chunks wait for a checkpoint before they can be reused."""
        return False

    def request_checkpoint(self) -> None:  # noqa: B027 - a no-op unless overridden
        """Checkpoint at the next commit (releasing freed chunks for reuse)."""

    def cached_blocks(self) -> int:
        """Metadata blocks kept in memory (0 for a store that is all memory)."""
        return 0

    def format_figures(self) -> dict:
        """Figures of the store's on-disk format for ``status``: ``uuid`` (hex),
        ``tree_levels``, ``journal_blocks``, ``recovered_transactions`` and
        ``journal_damage`` (``[(block, message)]`` or None); empty in memory."""
        return {}

    def pending_blocks(self) -> int:
        """Metadata blocks changed since the last :meth:`begin_commit` (0 in memory)."""
        return 0

    @property
    def commit_threshold(self) -> int:
        """Commit once :meth:`pending_blocks` reaches this, so that a transaction always
        fits the journal."""
        return 1 << 62

    def commit(self) -> None:
        """Capture and write the pending changes (for single-threaded callers)."""
        batch = self.begin_commit()
        if batch is not None:
            self.write_commit(batch)

    # -- accounting and checks -----------------------------------------------------------

    @abc.abstractmethod
    def space(self) -> dict:
        """``{"chunks_total", "chunks_free", "chunks_used"}`` for exception data, in chunks."""

    @abc.abstractmethod
    def changed_chunks(self, a: int, b: int, start: int = 0, limit: int = 4096
                       ) -> tuple[list[int], int | None]:
        """Logical chunks ``>= start`` whose data may differ between versions ``a`` and
        ``b`` (0: the origin), ascending, visiting about ``limit`` entries; and the chunk
        to go on from (None: no more).  Never misses a chunk that differs."""

    @abc.abstractmethod
    def exceptions(self):
        """Iterate ``(owner, chunk, tag, store_chunk)`` in key order: every exception
        (docs/format.md, "Versioned exceptions")."""

    @abc.abstractmethod
    def check(self) -> list[Finding]:
        """Check the store's invariants (DESIGN.md 4, 5, 6); return what is wrong.

        Also recounts :meth:`snapshot_space` from the tree: drift is a fatal finding that
        names the snapshot.
        """

    @abc.abstractmethod
    def close(self) -> None:
        """Commit, mark the store cleanly shut down and release it."""

    # -- per-snapshot space (issue 3, "Space accounting") --------------------------------
    #
    # Kept up to date incrementally by both stores wherever an exception changes (a
    # :class:`~ddsnap.store.space.SpaceAccount` of exception groups): asking never
    # walks the tree.  ``check()`` recounts them from the tree and reports drift.

    @abc.abstractmethod
    def _space_account(self) -> SpaceAccount:
        """The store's incremental figures.

        Raises:
            CorruptMetadata: they could not be counted when the store was opened (a
                damaged tree block; ``check`` names it).
        """

    def space_account(self) -> SpaceAccount:
        """The exception groups behind the space figures, as kept incrementally
        (:class:`~ddsnap.store.space.SpaceAccount`): for ``check`` and tests.

        Raises:
            CorruptMetadata: as :meth:`_space_account`.
        """
        return self._space_account()

    def snapshot_space(self) -> dict[int, tuple[int, int]]:
        """Space each live snapshot uses: ``{id: (exclusive, shared)}``, in chunks
        (multiply by :attr:`chunk_size` for bytes).

        ``exclusive``: store chunks only this snapshot reads, exactly what deleting it
        frees.  ``shared``: store chunks it reads together with at least one other live
        snapshot (snapshots taken of it included).  Chunks the snapshot reads from the
        origin are in neither.  Metadata blocks are not counted.

        Exact and up to date after every call that changed the store, committed or not.

        Raises:
            CorruptMetadata: as :meth:`_space_account`.
        """
        return self._space_account().figures(self.table)

    def exception_chunks(self) -> int:
        """Store chunks holding exception data that some exception references, in chunks;
        includes :meth:`unswept_chunks`, excludes metadata (so at most
        ``space()["chunks_used"]``).

        Raises:
            CorruptMetadata: as :meth:`_space_account`.
        """
        return self._space_account().exceptions

    def unswept_chunks(self) -> int:
        """Store chunks no live snapshot reads: the sweep in progress frees them (0 when
        no delete is pending).

        Raises:
            CorruptMetadata: as :meth:`_space_account`.
        """
        return self._space_account().orphans(self.table)
