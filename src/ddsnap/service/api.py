"""The metadata seam: what a data path asks the metadata server, as a ``typing.Protocol``.

Seed 000 (csnap) splits a snapshot server in two: one metadata server owns the B-tree,
the bitmap and the journal and does the copy-outs; the data path (volumes in this
process today, worker processes and client nodes later) does every data read and write
itself and only asks for mappings and locks.  :class:`MetadataService` is that question
list.  Its methods exchange chunk ranges, mappings (:class:`ReadMap`, store chunk
numbers), tickets (a prepared origin write is one, ended by
:meth:`~MetadataService.finish_origin_write`) and descriptions (:class:`SnapshotInfo`,
:class:`StoreStatus`, :class:`ServiceStatistics`): never data bytes, never store or
device objects.  :class:`~ddsnap.service.local.LocalService` is the in-process
implementation; a networked one can stand in for it.

Units: chunks are logical chunks of ``chunk_size`` bytes; ranges of chunks are
inclusive ``first..last``; sizes are bytes unless a name says chunks.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from ..errors import SnapshotNotFound
from ..store.blockdev import BlockDevice
from ..store.model import Finding, SnapshotInfo

__all__ = ["DataDevices", "Finding", "MetadataService", "ReadMap", "ServiceStatistics",
           "find_snapshot",
           "SnapshotInfo", "StoreStatus"]


def find_snapshot(snaps: Iterable[SnapshotInfo], name: str) -> SnapshotInfo:
    """The snapshot called ``name`` among ``snaps`` (a service's live list).

    Raises:
        SnapshotNotFound: none is.
    """
    for s in snaps:
        if s.name == name:
            return s
    raise SnapshotNotFound(name)


@dataclass
class ReadMap:
    """How to read a volume's chunks ``first..last``: per chunk a store chunk or None.

    None means "read the origin".  The logical chunks in ``locked`` are read-locked
    (origin writes and merge steps on them wait) until
    :meth:`MetadataService.release_read` (seed 000 ``QUERY_SNAPSHOT_READ`` replies and
    ``FINISH_SNAPSHOT_READ``).  ``cacheable``: a node may keep this mapping (and the
    read locks of its origin chunks) after the read, until the server recalls or
    revokes it (docs/protocol.md "Read mappings a node keeps").
    """

    first: int
    sources: list[int | None]
    locked: list[int]
    cacheable: bool = False


@dataclass(frozen=True)
class DataDevices:
    """Where a data path does its I/O: the origin device and the snapshot store's
    device (exception data at ``store_chunk * chunk_size``).  A node opens these itself
    (seed 000: the data never passes through the metadata server); in one process the
    service's opener hands over the devices it opened."""

    origin: BlockDevice
    cow: BlockDevice
    chunk_size: int


@dataclass(frozen=True)
class StoreStatus:
    """The store's geometry, settings and space, as ``ddsnap status`` shows them.

    Sizes in bytes, ``chunks_*`` in chunks of ``chunk_size`` bytes.  The on-disk store's
    own figures (``uuid`` hex, ``tree_levels``, ``journal_blocks``,
    ``recovered_transactions``, ``journal_damage`` as ``(block, message)``) are None for a
    store kept in memory.  ``failure`` is the last failed commit (see
    :attr:`~ddsnap.service.local.LocalService.failure`), ``reopens`` counts the reopens
    after failures, ``auto_deleted`` the snapshots the full-store policy deleted,
    ``receive`` the receive in progress (:func:`ddsnap.service.local.receive_status`).
    """

    store_size: int
    chunk_size: int
    chunks_total: int
    chunks_free: int
    chunks_used: int
    origin: str
    origin_size: int
    max_snapshots: int | None
    full_policy: str
    auto_deleted: list[dict]
    failure: dict | None
    reopens: int
    uuid: str | None = None
    tree_levels: int | None = None
    journal_blocks: int | None = None
    recovered_transactions: int | None = None
    journal_damage: list[tuple[int | None, str]] | None = None
    #: the receive in progress (``ddsnap receive``), with its resume token; None if none
    receive: dict | None = None


@dataclass(frozen=True)
class ServiceStatistics:
    """A snapshot of the metadata service's counters (trio-style ``statistics()``):
    taken under the metadata lock in microseconds, for tests, ``status`` and debugging.

    Attributes:
        epoch: the commit batch changes go into now; ``durable``: every batch up to
            this one is durable (so ``epoch - durable - 1`` batches wait to commit).
        committing: a commit is being written now.
        pending: (version, chunk) mappings whose latest change is not durable yet.
        read_locked_chunks / read_locks: chunks read-locked by snapshot (or merging
            origin) readers, and the locks on them (a chunk may have several).
        origin_writes: origin writes prepared and not finished (merge steps count).
        barrier: operations holding new origin writes back (a snapshot creation, a
            merge start, a resize).
        merge_busy: chunks a merge step is copying.
        exports_open: open exports by name (NBD connections).
        cache_blocks: metadata blocks the store keeps in memory (0 for a memory store).
        failures / reopens: failed commits, and reopens of the store after them.
    """

    epoch: int
    durable: int
    committing: bool
    pending: int
    read_locked_chunks: int
    read_locks: int
    origin_writes: int
    barrier: int
    merge_busy: int
    exports_open: dict[str, int] = field(default_factory=dict)
    cache_blocks: int = 0
    failures: int = 0
    reopens: int = 0


class MetadataService(Protocol):
    """What the data path asks the metadata server (seed 000's messages).

    Every method may block (on the metadata lock, a commit, a read lock) except those
    that say they never wait.  Errors are :class:`~ddsnap.errors.DdsnapError` subclasses
    (each method lists its own) carrying the errno an NBD reply uses.
    """

    #: bytes per chunk (fixed for the store's life)
    chunk_size: int

    @property
    def origin_size(self) -> int:
        """The origin's size in bytes now (a resize changes it; never waits)."""
        ...

    # -- origin writes (seed 000 QUERY_WRITE on the origin) -----------------------------

    def prepare_origin_write(self, first: int, last: int) -> None:
        """Make origin chunks ``first..last`` unique (copy-outs durable, no reader left
        on them); the caller then writes the origin and calls
        :meth:`finish_origin_write`."""
        ...

    def prepare_origin_writes(self, ranges: list[tuple[int, int]]
                              ) -> list[BaseException | None]:
        """:meth:`prepare_origin_write` for several ranges at once; per range None
        (prepared: finish it) or its error; ranges past the list were not started."""
        ...

    def prepare_origin_write_nowait(self, first: int, last: int) -> bool:
        """:meth:`prepare_origin_write` if chunks ``first..last`` are known unique
        without waiting for anything (a grant; never waits, may be called on an event
        loop): True, then write the origin and call :meth:`finish_origin_write`; False
        (nothing prepared): use :meth:`prepare_origin_write`."""
        ...

    def finish_origin_write(self) -> None:
        """An origin write prepared above is done (its ticket given back)."""
        ...

    # -- reads (seed 000 QUERY_SNAPSHOT_READ / FINISH_SNAPSHOT_READ) --------------------

    def map_snapshot_read(self, snap: SnapshotInfo, first: int, last: int) -> ReadMap:
        """Where ``snap`` reads chunks ``first..last``; origin chunks read-locked."""
        ...

    def map_origin_read(self, first: int, last: int) -> ReadMap | None:
        """Where the origin reads ``first..last`` while a merge runs; None: the origin."""
        ...

    def release_read(self, rmap: ReadMap) -> None:
        """Drop the read locks of ``rmap``."""
        ...

    def origin_reads_itself(self) -> bool:
        """True while no merge is in progress: the origin reads from its device with no
        mapping (never waits)."""
        ...

    def map_snapshot_read_nowait(self, snap: SnapshotInfo, first: int, last: int
                                 ) -> list[int | None] | None:
        """The sources of ``snap``'s chunks ``first..last`` if known without waiting, or
        None (then ask :meth:`map_snapshot_read`); a mapping returned stays valid until
        :meth:`finish_snapshot_read_nowait`, which the caller calls on the same thread
        right after its page-cache reads.  Never waits for the disk."""
        ...

    def finish_snapshot_read_nowait(self) -> None:
        """The reads of the last no-wait mapping on this thread are done."""
        ...

    # -- snapshot writes (seed 000 QUERY_WRITE on a snapshot) ----------------------------

    def prepare_snapshot_write(self, snap: SnapshotInfo, first: int, last: int) -> list[int]:
        """Make ``snap``'s chunks ``first..last`` unique to it; their store chunks."""
        ...

    # -- snapshots ------------------------------------------------------------------------

    def snapshots(self) -> list[SnapshotInfo]:
        """Live snapshots, oldest first (never waits)."""
        ...

    def snapshot(self, name: str) -> SnapshotInfo:
        """The live snapshot ``name`` (SnapshotNotFound)."""
        ...

    def is_merging(self, snap: SnapshotInfo) -> bool:
        """True if ``snap`` is being merged into the origin (never waits)."""
        ...

    def create_snapshot(self, name: str, read_only: bool = False,
                        parent: str | None = None) -> SnapshotInfo: ...

    def delete_snapshot(self, name: str) -> SnapshotInfo: ...

    def snapshot_space(self) -> dict[int, tuple[int, int]]:
        """``{id: (exclusive, shared)}`` in chunks (CorruptMetadata if uncountable)."""
        ...

    def changed_chunks(self, a: int, b: int, start: int = 0, limit: int = 4096
                       ) -> tuple[list[int], int | None]:
        """Chunks ``>= start`` whose data may differ between versions ``a`` and ``b``
        (snapshot ids; 0: the origin), ascending, and where to go on (None: done);
        ``ExceptionStore.changed_chunks`` (issue 13)."""
        ...

    # -- merge (seed 003) -------------------------------------------------------------------

    def start_merge(self, name: str, keep: bool = False) -> dict: ...

    def merge_cursor(self) -> int | None:
        """The merge in progress's cursor in chunks, None if no merge (no side effect)."""
        ...

    def merge_status(self, running: bool = False) -> dict | None: ...

    def run_merge(self, stop: threading.Event | None = None,
                  on_step: Callable[[dict | None], None] | None = None) -> bool: ...

    # -- administration ---------------------------------------------------------------------

    def set_full_policy(self, policy: str) -> None: ...

    def resize_origin(self, size: int) -> dict: ...

    def resize_store(self, size: int) -> dict: ...

    def status(self) -> StoreStatus: ...

    def check(self) -> list[Finding]: ...

    def free_leaked(self, blocks: list[int]) -> None: ...

    def statistics(self) -> ServiceStatistics: ...

    def recover(self) -> None: ...

    def commit(self) -> None: ...

    def export_open(self, name: str) -> None: ...

    def export_close(self, name: str) -> None: ...

    def close(self) -> None: ...
