"""The metadata service: the seam between the volumes and the snapshot store.

In seed 000 the data never passes through the metadata server.  A node asks the server to
make origin chunks unique (the server copies out, commits, and answers once no snapshot
reader holds those chunks), then writes the origin itself; for a snapshot read it gets
"read these from the origin (read-locked)" and "read these store chunks", reads them
itself and releases the locks.  :class:`MetadataService` is that server's interface and
this local, in-process implementation of it; a networked one can take its place later.

Concurrency: every mapping decision runs under one metadata lock (csnap's single
server thread).  Changes wait for a durable commit, and commits are grouped: whoever needs
a commit first writes everything changed so far while later requests keep changing the
next batch (seed 001 ``shared_commit_exception`` batching its callbacks).  Ordering is
DESIGN.md invariant 3: copy-out data durable, then the commit durable, then the origin
write may go ahead.

Units: chunk numbers are logical chunks of ``chunk_size`` bytes; ranges of chunks are
inclusive ``first..last``.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass

from ..errors import DdsnapError, ReadOnlyVolume, SnapshotBusy, SnapshotNotFound, StoreFull
from .api import ExceptionStore, SnapshotInfo
from .blockdev import BlockDevice

#: most chunks one coalesced copy I/O moves (csnap's copybuf is 32 chunks)
COPY_CHUNKS = 32


@dataclass
class ReadMap:
    """How to read a snapshot's chunks ``first..last``: per chunk a store chunk or None.

    None means "read the origin"; those chunks are read-locked until
    :meth:`MetadataService.release_snapshot_read`.
    """

    first: int
    sources: list[int | None]


class ServiceFailed(DdsnapError):
    """A commit failed; the store is left as of the last durable commit."""


class MetadataService:
    """Decides mappings, copies out, commits and orders origin writes after snapshot reads.

    Args:
        store: the exception store (shared or memory).
        origin: the origin device.
    """

    def __init__(self, store: ExceptionStore, origin: BlockDevice):
        self.store = store
        self.origin = origin
        self.chunk_size = store.chunk_size
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self.epoch = 0  # the batch changes are going into now
        self.durable = -1  # every batch up to this one is durable
        self._committing = False
        self._failed: BaseException | None = None
        #: (owner, chunk) -> epoch of the batch holding the latest change to the mapping
        #: of logical ``chunk``: owner -1 for any change of who shares the origin chunk
        #: (a copy-out, or a snapshot unsharing it), a snapshot's bit for its own
        #: unshare.  A write relying on that mapping waits for that batch.
        self._pending: dict[tuple[int, int], int] = {}
        self._readlocks: Counter[int] = Counter()
        self._origin_writes = 0
        self._barrier = 0  # snapshot creations waiting for origin writes to drain
        self._opens: Counter[str] = Counter()
        self._snaps: tuple[SnapshotInfo, ...] = ()
        self._refresh_snaps()
        self._finish_interrupted_delete()

    # -- commit ---------------------------------------------------------------------------

    def _check(self) -> None:
        if self._failed is not None:
            raise ServiceFailed(f"the store failed earlier and must be reopened: {self._failed}")

    def _start_commit(self):
        """Capture the open batch (lock held); returns ``(batch or None, its epoch)``."""
        self._committing = True
        batch = self.store.begin_commit()
        target = self.epoch
        self.epoch += 1
        return batch, target

    def _end_commit(self, target: int, error: BaseException | None) -> None:
        """Record a commit's outcome (lock held) and wake everyone waiting on it."""
        self._committing = False
        if error is not None:
            self._failed = error
        else:
            self.durable = target
            for key in [k for k, v in self._pending.items() if v <= target]:
                del self._pending[key]
        self.cond.notify_all()

    def wait_durable(self, epoch: int) -> None:
        """Block until batch ``epoch`` is durable, committing it ourselves if nobody is."""
        while True:
            with self.lock:
                self._check()
                if self.durable >= epoch:
                    return
                if self._committing:
                    self.cond.wait()
                    continue
                batch, target = self._start_commit()
            self._write_commit(batch, target, holding_lock=False)

    def _write_commit(self, batch, target: int, holding_lock: bool) -> None:
        """Write a captured batch and record the outcome (failure fails the service)."""
        error = None
        try:
            if batch is not None:
                self.store.write_commit(batch)
        except BaseException as e:
            error = e
            raise
        finally:
            if holding_lock:
                self._end_commit(target, error)
            else:
                with self.lock:
                    self._end_commit(target, error)

    def _bound_batch(self) -> None:
        """Commit now (lock held) if the open batch nears what one transaction may hold.

        A huge request, or many requests grouped together, must not build a transaction
        bigger than the journal; between two chunk edits the tree is consistent, so the
        batch can be committed there.  The disk I/O then runs under the lock: this only
        happens for batches of hundreds of metadata blocks.
        """
        if self.store.pending_blocks() < self.store.commit_threshold:
            return
        while self._committing:
            self.cond.wait()
        if self.store.pending_blocks() < self.store.commit_threshold:
            return
        batch, target = self._start_commit()
        self._write_commit(batch, target, holding_lock=True)

    def commit(self) -> None:
        """Make every change made so far durable."""
        with self.lock:
            e = self.epoch
        self.wait_durable(e)

    # -- copying --------------------------------------------------------------------------

    def _copy(self, moves: list[tuple[int, int]], source: BlockDevice) -> None:
        """Copy chunks ``src -> dst`` (store chunk numbers) from ``source`` to the store.

        Runs of consecutive sources and destinations move in one I/O of up to
        :data:`COPY_CHUNKS` chunks (csnap ``copyout``/``finish_copyout``).
        """
        cs = self.chunk_size
        cow = self.store.cow
        moves = sorted(moves)
        i = 0
        while i < len(moves):
            src, dst = moves[i]
            n = 1
            while (i + n < len(moves) and n < COPY_CHUNKS and moves[i + n][0] == src + n
                   and moves[i + n][1] == dst + n):
                n += 1
            cow.pwrite(source.pread(n * cs, src * cs), dst * cs)
            i += n

    # -- origin writes ---------------------------------------------------------------------

    def prepare_origin_write(self, first: int, last: int) -> None:
        """Make origin chunks ``first..last`` unique before the origin is overwritten.

        Copies each chunk still shared with a snapshot into a new exception for those
        snapshots, commits, and returns once the commit is durable and no snapshot reader
        holds any of the chunks (seed 000 ``make_unique`` with ``snapnum == -1`` and
        ``waitfor_chunk``).  The caller writes the origin and then calls
        :meth:`finish_origin_write`.

        Raises:
            StoreFull: no room for a copy-out (ENOSPC; nothing already shared is lost).
        """
        with self.lock:
            self._check()
            while self._barrier:
                self.cond.wait()
            need = -1
            moves, adds = [], []
            err = None
            for c in range(first, last + 1):
                sharers = self.store.origin_sharers(c)
                if sharers:
                    try:
                        sc = self.store.allocate_chunk()
                    except StoreFull as e:
                        err = e
                        break
                    moves.append((c, sc))
                    adds.append((c, sc, sharers))
                else:
                    # No sharer now, but maybe only since a change not yet durable (a
                    # copy-out, or a snapshot write unsharing the chunk): until it is, a
                    # crash would bring the origin's sharers back.
                    need = max(need, self._pending.get((-1, c), -1))
            if moves:
                self._copy(moves, self.origin)
                for k, (c, sc, sharers) in enumerate(adds):
                    try:
                        self.store.add_origin_exception(c, sc, sharers)
                    except StoreFull as e:
                        # No room for the metadata: the chunks not recorded go back.
                        for _c, unused, _s in adds[k:]:
                            self.store.release_chunk(unused)
                        err = e
                        break
                    self._pending[(-1, c)] = self.epoch
                    self._bound_batch()
                need = self.epoch
            if err is not None:
                raise err
            self._origin_writes += 1
        try:
            self.wait_durable(need)
            with self.lock:
                while any(self._readlocks[c] for c in range(first, last + 1) if c in self._readlocks):
                    self.cond.wait()
        except BaseException:
            self.finish_origin_write()
            raise

    def finish_origin_write(self) -> None:
        """The origin write prepared by :meth:`prepare_origin_write` completed."""
        with self.lock:
            self._origin_writes -= 1
            if not self._origin_writes:
                self.cond.notify_all()

    # -- snapshot reads and writes -----------------------------------------------------------

    def _bit(self, snap: SnapshotInfo) -> int:
        for s in self._snaps:
            if s.id == snap.id:
                return s.bit
        raise SnapshotNotFound(snap.name)

    def map_snapshot_read(self, snap: SnapshotInfo, first: int, last: int) -> ReadMap:
        """Where snapshot ``snap`` reads chunks ``first..last`` (seed 000
        ``QUERY_SNAPSHOT_READ``); origin chunks stay read-locked until released."""
        with self.lock:
            self._check()
            bit = self._bit(snap)
            sources = []
            for c in range(first, last + 1):
                sc, _u = self.store.snapshot_exception(bit, c)
                if sc is None:
                    self._readlocks[c] += 1
                sources.append(sc)
            return ReadMap(first, sources)

    def release_snapshot_read(self, rmap: ReadMap) -> None:
        """Drop the read locks a :meth:`map_snapshot_read` took (``FINISH_SNAPSHOT_READ``)."""
        with self.lock:
            wake = False
            for i, sc in enumerate(rmap.sources):
                if sc is None:
                    c = rmap.first + i
                    self._readlocks[c] -= 1
                    if not self._readlocks[c]:
                        del self._readlocks[c]
                        wake = True
            if wake:
                self.cond.notify_all()

    def prepare_snapshot_write(self, snap: SnapshotInfo, first: int, last: int) -> list[int]:
        """Make snapshot chunks ``first..last`` unique to ``snap``; return their store chunks.

        A chunk the snapshot still shares (with the origin or other snapshots) gets a new
        exception holding a copy of its current content, committed durably before this
        returns (seed 000 ``make_unique`` for a snapshot).  The caller then writes the
        returned store chunks.

        Raises:
            ReadOnlyVolume: the snapshot is read-only.
            StoreFull: no room (ENOSPC).
        """
        if snap.read_only:
            raise ReadOnlyVolume(f"snapshot {snap.name} is read-only")
        with self.lock:
            self._check()
            bit = self._bit(snap)
            need = -1
            out = []
            for c in range(first, last + 1):
                sc, unique = self.store.snapshot_exception(bit, c)
                if unique:
                    # Unique maybe only by a change not yet durable (its own unshare or
                    # an origin write's copy-out): data written there before that commits
                    # is lost to a crash.
                    need = max(need, self._pending.get((bit, c), -1),
                               self._pending.get((-1, c), -1))
                    out.append(sc)
                    continue
                new = self.store.allocate_chunk()
                if sc is None:
                    self._copy([(c, new)], self.origin)
                else:
                    self._copy([(sc, new)], self.store.cow)
                try:
                    self.store.add_snapshot_exception(bit, c, new)
                except StoreFull:
                    self.store.release_chunk(new)
                    raise
                self._pending[(bit, c)] = self.epoch
                self._pending[(-1, c)] = self.epoch  # the origin's sharers changed too
                need = self.epoch
                out.append(new)
                self._bound_batch()
        self.wait_durable(need)
        return out

    # -- snapshots -----------------------------------------------------------------------

    def snapshots(self) -> list[SnapshotInfo]:
        """Live snapshots, oldest first.  Never waits: it reads a list replaced whole on
        every create and delete, so the NBD event loop can call it."""
        return list(self._snaps)

    def snapshot(self, name: str) -> SnapshotInfo:
        """The live snapshot called ``name`` (raises SnapshotNotFound)."""
        for s in self._snaps:
            if s.name == name:
                return s
        raise SnapshotNotFound(name)

    def _refresh_snaps(self) -> None:
        self._snaps = tuple(self.store.snapshots())

    def create_snapshot(self, name: str, read_only: bool = False) -> SnapshotInfo:
        """Snapshot the origin as of every origin write completed so far.

        New origin writes wait while earlier ones drain, the origin is flushed, and the
        snapshot is committed: constant time in the size of the volume.
        """
        with self.lock:
            self._check()
            self._barrier += 1
            try:
                while self._origin_writes:
                    self.cond.wait()
                # Completed origin writes are part of the snapshot: make them durable so
                # a crash cannot change what the snapshot reads (invariant 1).
                self.origin.flush()
                info = self.store.create_snapshot(name, read_only)
                self._refresh_snaps()
                e = self.epoch
            finally:
                self._barrier -= 1
                self.cond.notify_all()
        self.wait_durable(e)
        return info

    def delete_snapshot(self, name: str) -> SnapshotInfo:
        """Delete snapshot ``name``, free the chunks only it used and compact the tree.

        Raises:
            SnapshotNotFound: no such snapshot.
            SnapshotBusy: clients have it open.
        """
        with self.lock:
            self._check()
            info = self.store.snapshot(name)
            if self._opens[name]:
                raise SnapshotBusy(f"snapshot {name} is in use by {self._opens[name]} "
                                   "connection(s)")
            self.store.begin_delete(name)
            self._refresh_snaps()
        self.commit()
        self._sweep()
        return info

    def _sweep(self) -> None:
        done = False
        while not done:
            with self.lock:
                done = self.store.sweep_step()
            self.commit()

    def _finish_interrupted_delete(self) -> None:
        """A delete cut short by a crash resumes when the store is next opened."""
        self._sweep()

    def export_open(self, name: str) -> None:
        with self.lock:
            self._opens[name] += 1

    def export_close(self, name: str) -> None:
        with self.lock:
            self._opens[name] -= 1
            if self._opens[name] <= 0:
                del self._opens[name]

    def flush_store(self) -> None:
        """Make exception data written by snapshot writes durable."""
        self.store.cow.flush()

    def close(self) -> None:
        """Commit and close the store (marks it cleanly shut down)."""
        with self.lock:
            failed = self._failed
        if failed is None:
            self.origin.flush()
            self.commit()
            with self.lock:
                self.store.close()
