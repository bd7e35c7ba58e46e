"""The metadata service's core: its state, group commit, failure and reopen, the
origin-write barrier, copying chunks into the store, allocation, the sweep.

:class:`ServiceCore` is the base the concerns of :class:`~ddsnap.service.local.LocalService`
build on (``writes``, ``reads``, ``policy``, ``merge``); each concern is a class of its
own module adding methods over this state.

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

import errno
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from contextlib import contextmanager

from ..errors import (
    ServiceFailed,
    SnapshotNotFound,
    StoreFull,
    host_error,
)
from ..store.api import ExceptionStore
from ..store.blockdev import BlockDevice, copy_range
from ..store.model import SnapshotInfo
from .api import DataDevices, find_snapshot
from .chunkset import ChunkSet
from .progress import MergeProgress, merge_step_bytes

log = logging.getLogger("ddsnap.service")


#: most chunks one coalesced copy I/O moves (csnap's copybuf is 32 chunks)
COPY_CHUNKS = 32


class ServiceCore:
    """The state every concern of the service works on, and the primitives they share:
    the metadata lock and condition, group commit, failure and reopen, the origin-write
    barrier, copying chunks, allocation and the sweep.  Concerns that other concerns
    call (the full-store policy, merging chunks before an origin write) are declared
    here and provided by their own classes (:class:`~ddsnap.service.policy.FullPolicy`,
    :class:`~ddsnap.service.merge.MergeOps`).
    """

    def __init__(self, store: ExceptionStore, origin: BlockDevice, reopen=None):
        self.store = store
        self.origin = origin
        self.reopen_store = reopen
        self.chunk_size = store.chunk_size
        self.data = DataDevices(origin, store.cow, store.chunk_size)
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self.epoch = 0  # the batch changes are going into now
        self.durable = -1  # every batch up to this one is durable
        self._committing = False
        self._commit_done = threading.Event()  # set when the running commit ends
        self._failed: BaseException | None = None
        #: batches lost to failed commits: a wait for one of them fails
        self._lost: set[int] = set()
        self._waiting = 0  # threads waiting on ``cond`` in the middle of an operation
        self._recovering = False
        #: failed commits, and reopens of the store after them
        self.failures = 0
        self.reopens = 0
        #: the last failure (``status``): error, type, errno, time, reopened, reopen_error
        self.failure: dict | None = None
        #: (version, chunk) -> epoch of the batch holding the latest change to who reads
        #: ``version``'s data at logical ``chunk`` (0: the origin): a copy-out, or a
        #: snapshot write there (which changes it for the writer and its ancestors).  A
        #: write relying on that mapping waits for that batch.
        self._pending: dict[tuple[int, int], int] = {}
        self._readlocks: Counter[int] = Counter()
        self._origin_writes = 0
        self._barrier = 0  # operations holding new origin writes back (_origin_writes_held_locked)
        #: origin-write grants given out before the last barrier are void (see
        #: :meth:`take_origin_grant`); counts barriers raised
        self.grant_serial = 0
        #: origin chunks made unique since the last barrier: writes in this process
        #: need no copy-out check for them (see prepare_origin_write_nowait)
        self._unique = ChunkSet()
        #: operations that need no node to keep snapshot read mappings meanwhile (see
        #: :meth:`_read_mappings_revoked`): no mapping is cacheable while it is up
        self._read_barrier = 0
        self._opens: Counter[str] = Counter()
        self._snaps: tuple[SnapshotInfo, ...] = ()
        self._refresh_snaps_locked()
        m = store.merging
        #: version id of the snapshot being merged, None if none (read without the lock)
        self._merging: int | None = m
        self._merge_busy: set[int] = set()  # chunks a merge step is working on
        #: most chunks one :meth:`merge_step` merges
        self.merge_step_chunks = max(1, merge_step_bytes() // self.chunk_size)
        #: snapshots the full-store policy deleted (name, id, time), newest last
        self.auto_deleted: list[dict] = store.auto_deleted()
        self._merge_progress = (MergeProgress(self._count_merge_left_locked(), "open")
                                if m is not None else None)
        #: ``(event, wait) -> None`` callables told of changes nodes in other processes
        #: cache (see :meth:`_notify`): a metadata server's broadcast
        self.observers: list[Callable[[dict, bool], None]] = []
        if not getattr(store, "read_only", False):  # a degraded open never writes
            self._sweep()  # a delete cut short by a crash resumes

    def _check_locked(self) -> None:
        """Raise ServiceFailed if a commit failed (lock held, in an operation's middle)."""
        if self._failed is not None:
            self._raise_failed()

    def _raise_failed(self):
        f = self._failed
        raise ServiceFailed(f"the snapshot store failed ({f}); it is reopened from its "
                            "journal and this request did not complete",
                            getattr(f, "errno", None) or errno.EIO)

    def _enter_locked(self) -> None:
        """Start an operation (lock held, holding nothing yet): reopen the store first
        if a commit failed.

        Raises:
            ServiceFailed: the store cannot be reopened (yet).
        """
        if self._failed is not None:
            self._recover_locked()

    def _wait_locked(self) -> None:
        """``cond.wait()`` in the middle of an operation (lock held).  Raises
        ServiceFailed if a commit fails meanwhile: what the operation holds belongs to
        the store state being discarded, so it must not go on after a reopen (which
        waits until no such waiter is left)."""
        if self._failed is not None:
            self._raise_failed()
        self._waiting += 1
        try:
            self.cond.wait()
        finally:
            self._waiting -= 1
        if self._failed is not None:
            self.cond.notify_all()  # a reopen may be waiting for us to leave
            self._raise_failed()

    def _fail_locked(self, error: BaseException) -> None:
        """A commit failed (lock held): the state in memory is not the store's any more."""
        if self._failed is not None:
            return
        self._failed = error
        self.failures += 1
        self.failure = {"error": str(error), "type": type(error).__name__,
                        "errno": getattr(error, "errno", None),
                        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                        "reopened": False, "reopen_error": None}
        log.error("a commit to the snapshot store failed: %s; its state in memory cannot "
                  "be trusted, it is reopened from its journal", error)

    def recover(self) -> None:
        """Reopen the store if a failed commit left it untrusted (no-op otherwise).

        Raises:
            ServiceFailed: it cannot be reopened (no ``reopen``, or reopening failed).
        """
        with self.lock:
            self._enter_locked()

    def _recover_locked(self) -> None:
        """Reopen the store from its journal (lock held, by a thread holding nothing).

        Waits until the operations in flight have left (origin writes and merge steps,
        the commit running, mid-operation waiters: each fails or finishes), opens the
        store again and resets the state that described the old one.  Readers' locks
        and open exports carry over: they count requests, not store state.
        """
        while self._recovering:
            self.cond.wait()  # another thread is reopening it
        if self._failed is None:
            return
        if self.reopen_store is None:
            self._raise_failed()
        self._recovering = True
        try:
            while self._origin_writes or self._committing or self._waiting:
                self.cond.wait()
            failure = self.failure
            assert failure is not None  # recorded with _failed
            try:
                store = self.reopen_store()
            except Exception as e:
                if failure["reopen_error"] != str(e):  # say it once, not per request
                    log.error("reopening the snapshot store failed: %s; the next request "
                              "tries again", e)
                failure["reopen_error"] = str(e)
                raise ServiceFailed(f"the snapshot store failed ({self._failed}) and "
                                    f"cannot be reopened yet: {e}",
                                    getattr(self._failed, "errno", None) or errno.EIO) from e
            self._reset_locked(store)
            # A delete whose sweep the failure cut short resumes (as at open).
            while not self._sweep_step_locked():
                self._commit_now_locked()
            self._commit_now_locked()
        finally:
            self._recovering = False
            self.cond.notify_all()

    def _reset_locked(self, store: ExceptionStore) -> None:
        """Serve ``store``, just reopened, in place of the failed one (lock held)."""
        # Batches not durable at the failure are lost; their waiters must fail, also
        # once later batches are durable.
        self._lost.update(range(self.durable + 1, self.epoch + 1))
        self.durable = self.epoch
        self.epoch += 1
        self.store = store
        self._failed = None
        self._pending.clear()
        self._merge_busy.clear()
        self._unique.clear()
        self._refresh_snaps_locked()
        m = store.merging
        self._merging = m
        if m is None:
            self._merge_progress = None
        elif self._merge_progress is None:
            self._merge_progress = MergeProgress(self._count_merge_left_locked())
        self.reopens += 1
        if self.failure is not None:
            self.failure["reopened"] = True
            self.failure["reopen_error"] = None
        log.warning("snapshot store reopened from its journal after the failure; "
                    "serving again")

    def _start_commit_locked(self):
        """Capture the open batch (lock held); returns ``(batch or None, its epoch)``."""
        self._committing = True
        self._commit_done = threading.Event()
        batch = self.store.begin_commit()
        target = self.epoch
        self.epoch += 1
        return batch, target

    def _end_commit_locked(self, target: int, error: BaseException | None) -> None:
        """Record a commit's outcome (lock held) and wake everyone waiting on it."""
        self._committing = False
        if error is not None:
            self._fail_locked(error)
        else:
            self.durable = target
            for key in [k for k, v in self._pending.items() if v <= target]:
                del self._pending[key]
        self._commit_done.set()
        self.cond.notify_all()

    @property
    def committing(self) -> bool:
        """True while a commit is being written (read it with :attr:`lock` held; one
        ends with ``cond`` notified)."""
        return self._committing

    def wait_durable(self, epoch: int) -> None:
        """Block until batch ``epoch`` is durable, committing it ourselves if nobody is.

        Waiters wait on the running commit's own event, not on the metadata condition:
        a commit ends with tens of writers waking, and those whose batch is now durable
        return without taking the lock (``durable`` only grows; reading it is atomic).
        """
        while True:
            if self.durable >= epoch and self._failed is None and epoch not in self._lost:
                return
            with self.lock:
                self._check_locked()
                if epoch in self._lost:
                    raise ServiceFailed("a commit to the snapshot store failed and the "
                                        "store was reopened without this change")
                if self.durable >= epoch:
                    return
                if self._committing:
                    done = self._commit_done
                else:
                    done = None
                    batch, target = self._start_commit_locked()
            if done is not None:
                done.wait()
                continue
            self._write_commit(batch, target, holding_lock=False)

    def _write_commit(self, batch, target: int, holding_lock: bool) -> None:
        """Write a captured batch and record the outcome (failure fails the service)."""
        error: BaseException | None = None
        try:
            if batch is not None:
                self.store.write_commit(batch)
        except OSError as e:
            error = host_error(e, "snapshot store", self.store.cow.path,
                               "committing metadata")
            raise error from e
        except BaseException as e:
            error = e
            raise
        finally:
            if holding_lock:
                self._end_commit_locked(target, error)
            else:
                with self.lock:
                    self._end_commit_locked(target, error)

    def _commit_now_locked(self) -> None:
        """Make everything changed so far durable, holding the lock throughout."""
        self._check_locked()  # never commit a state a failed commit left untrusted
        while self._committing:
            self._wait_locked()
        batch, target = self._start_commit_locked()
        self._write_commit(batch, target, holding_lock=True)

    def _bound_batch_locked(self) -> None:
        """Commit now (lock held) if the open batch nears what one transaction may hold.

        A huge request, or many requests grouped together, must not build a transaction
        bigger than the journal; between two chunk edits the tree is consistent, so the
        batch can be committed there.  The disk I/O then runs under the lock: this only
        happens for batches of hundreds of metadata blocks.
        """
        if self.store.pending_blocks() < self.store.commit_threshold:
            return
        while self._committing:
            self._wait_locked()
        if self.store.pending_blocks() < self.store.commit_threshold:
            return
        self._commit_now_locked()

    def commit(self) -> None:
        """Make every change made so far durable."""
        with self.lock:
            e = self.epoch
        self.wait_durable(e)

    def _copy_locked(self, moves: list[tuple[int, int]], source: BlockDevice) -> None:
        """Copy chunks ``src -> dst`` (store chunk numbers) from ``source`` to the store.

        Runs of consecutive sources and destinations move in one I/O of up to
        :data:`COPY_CHUNKS` chunks (csnap ``copyout``/``finish_copyout``).  The
        destinations are chunks just allocated that nothing points at yet: if the copy
        fails they all go back (a host ENOSPC or EIO must not leave them allocated for
        the next commit to keep).

        Raises:
            HostIOError: the host failed the read or the write (HostFull: ENOSPC).
        """
        cs = self.chunk_size
        cow = self.store.cow
        moves = sorted(moves)
        i = 0
        try:
            while i < len(moves):
                src, dst = moves[i]
                n = 1
                while (i + n < len(moves) and n < COPY_CHUNKS and moves[i + n][0] == src + n
                       and moves[i + n][1] == dst + n):
                    n += 1
                copy_range(source, src * cs, cow, dst * cs, n * cs)
                i += n
        except BaseException as e:
            for _src, dst in moves:
                self.store.release_chunk(dst)
            if isinstance(e, OSError):
                raise host_error(e, "snapshot store", cow.path,
                                 f"copying chunks from {source.path}") from e
            raise

    def _record_copyouts_locked(self, adds: list[tuple[int, int, int]],
                                limit: int | None = None
                                ) -> tuple[int, StoreFull | None, bool]:
        """Record copied-out chunks as the origin's exceptions, in order (lock held):
        ``adds`` is ``[(chunk, store_chunk, tag)]`` whose data :meth:`_copy_locked` has written.
        Each recorded chunk's mapping is pending until the next durable commit.

        Stops early when the batch reaches ``limit`` metadata blocks (it must then be
        committed before more is added) or when the store has no room for the metadata.
        Returns ``(k, full, at_limit)``: the first ``k`` are recorded; ``full`` is the
        StoreFull that stopped it, if one did; ``at_limit`` says the limit was reached.
        The store chunks of ``adds[k:]`` are the caller's to give back or retry: the one
        copy-out idiom of the origin write path and of merge steps.

        Raises:
            CorruptMetadata, OSError: a tree block could not be read or written; the
                chunks of ``adds[k:]`` (not recorded) were given back.
        """
        k = 0
        try:
            while k < len(adds):
                c, sc, tag = adds[k]
                self.store.add_origin_exception(c, sc, tag)
                self._pending[(0, c)] = self.epoch
                k += 1
                if limit is not None and self.store.pending_blocks() >= limit:
                    return k, None, True
        except StoreFull as e:
            return k, e, False
        except BaseException:
            for _c, unused, _t in adds[k:]:
                self.store.release_chunk(unused)
            raise
        return k, None, False

    def _notify(self, event: dict, wait: bool) -> None:
        """Tell the observers of ``event`` (``{"event": name, ...}``).  With ``wait`` they
        return once every node applied it (called without the lock: a node's answer may
        need it); without, they only queue it (may be called with the lock held)."""
        for observe in self.observers:
            observe(event, wait)

    @contextmanager
    def _origin_writes_held_locked(self):
        """Lock held: hold new origin writes back (``_barrier``), wait until those in
        flight are done, and let them go again on leaving.  For what must see the origin
        still: a snapshot creation, a merge start, a resize."""
        self._barrier += 1
        # Nodes that write granted chunks without asking (each counted as one origin
        # write, see take_origin_grant) give their grants back: told here, without
        # waiting (the lock is held), and waited for below with the other writes.
        self.grant_serial += 1
        self._unique.clear()
        self._notify({"event": "grants-revoked", "serial": self.grant_serial}, wait=False)
        try:
            while self._origin_writes:
                self._wait_locked()
            yield
        finally:
            self._barrier -= 1
            self.cond.notify_all()

    def _recall_read_locks_locked(self, first: int, last: int) -> None:
        """Lock held, about to wait for the read locks on chunks ``first..last``: ask the
        nodes keeping snapshot read mappings of them (whose read locks they keep after
        the read) to let go (``read-locks-recalled``, not waited for: the caller's wait
        for the locks is).  In one process nothing keeps a lock, and nothing is told."""
        if self.observers and any(self._readlocks.get(c)
                                  for c in range(first, last + 1)):
            self._notify({"event": "read-locks-recalled", "first": first, "last": last},
                         wait=False)

    def _revoke_read_mappings(self) -> None:
        """Lock not held: every node drops the snapshot read mappings it keeps, and
        this returns once each has (``read-cache-revoked``, acknowledged; a node that
        does not answer is cut off).  After a change to mappings nodes may keep (a
        snapshot write giving a chunk a new exception), before the change is
        acknowledged; mappings asked before the change and arriving after are not
        kept (the node's rule, docs/protocol.md)."""
        if self.observers:
            self._notify({"event": "read-cache-revoked"}, wait=True)

    @contextmanager
    def _read_mappings_revoked(self):
        """Lock not held: no node keeps a snapshot read mapping while inside.  Raises
        the read barrier (replies are not cacheable meanwhile), then tells every node to
        drop the mappings it keeps and waits until each has (``read-cache-revoked``,
        acknowledged); lowered on leaving.  For what must change mappings nodes may
        keep without recalling them chunk by chunk (docs/protocol.md "Read mappings a
        node keeps")."""
        with self.lock:
            self._read_barrier += 1
        try:
            self._revoke_read_mappings()
            yield
        finally:
            with self.lock:
                self._read_barrier -= 1

    def _flush_origin(self) -> None:
        """``origin.flush()``, a host failure raised as HostIOError naming the origin."""
        try:
            self.origin.flush()
        except OSError as e:
            raise host_error(e, "origin", self.origin.path, "flushing it") from e

    def _version(self, snap: SnapshotInfo) -> int:
        """``snap``'s version id, checking it is still live."""
        if snap.id in self._ids:
            return snap.id
        raise SnapshotNotFound(snap.name)

    def _ancestors_locked(self, version: int) -> list[int]:
        return self.store.ancestors(version)

    def snapshots(self) -> list[SnapshotInfo]:
        """Live snapshots, oldest first.  Never waits: it reads a list replaced whole on
        every create and delete, so the NBD event loop can call it."""
        return list(self._snaps)

    def snapshot(self, name: str) -> SnapshotInfo:
        """The live snapshot called ``name`` (raises SnapshotNotFound)."""
        return find_snapshot(self._snaps, name)

    def snapshot_by_id(self, snap: int) -> SnapshotInfo:
        """The live snapshot whose version id is ``snap`` (raises SnapshotNotFound,
        naming ``#id``).  Never waits (a dict replaced whole on every create and delete)."""
        try:
            return self._by_id[snap]
        except KeyError:
            raise SnapshotNotFound(f"#{snap}") from None

    def _refresh_snaps_locked(self) -> None:
        self._snaps = tuple(self.store.snapshots())
        #: the live snapshots by version id (replaced, never changed)
        self._by_id = {s.id: s for s in self._snaps}
        #: version ids of the live snapshots (replaced, never changed)
        self._ids = frozenset(self._by_id)

    def _sweep(self) -> None:
        done = False
        while not done:
            with self.lock:
                self._check_locked()
                done = self._sweep_step_locked()
            self.commit()

    def _sweep_step_locked(self) -> bool:
        """``store.sweep_step()`` (lock held).  A step changes leaves as it reads the
        next ones: one the host fails to read leaves the tree in memory half swept, so
        that fails the service (the store is reopened and the sweep resumes there).

        Raises:
            HostIOError: as above.
        """
        try:
            return self.store.sweep_step()
        except OSError as e:
            err = host_error(e, "snapshot store", self.store.cow.path,
                             "sweeping a deleted snapshot")
            self._fail_locked(err)
            self.cond.notify_all()
            raise err from e

    def _allocate_held_locked(self, moves: list[tuple[int, int]]) -> int:
        """A free store chunk for a request already holding the chunks of ``moves``
        (``(chunk, store_chunk)``, allocated but not recorded yet; lock held).

        A reclaim (see :meth:`_allocate_locked`) commits, and a commit must not make
        held, unrecorded chunks durably allocated (a crash would leak them).  So when
        only a reclaim would give a chunk, the held chunks go back first, the reclaim
        runs, and :class:`_Reclaim` tells the caller to start over (``moves`` emptied).

        Raises:
            _Reclaim: as above.
            StoreFull: no chunk, even after a reclaim.
        """
        if not moves:
            return self._allocate_locked()
        try:
            return self.store.allocate_chunk()
        except StoreFull:
            if not self.store.reclaimable():
                raise
        for _c, sc in moves:
            self.store.release_chunk(sc)
        moves.clear()
        self.store.request_checkpoint()
        self._commit_now_locked()
        raise _Reclaim()

    def _allocate_locked(self) -> int:
        """A free store chunk (lock held).  When the only free chunks are ones freed since
        the last checkpoint (a delete, a merge), commit and checkpoint so they can be
        reused, then try again.

        Raises:
            StoreFull: no chunk, even after that.
        """
        try:
            return self.store.allocate_chunk()
        except StoreFull:
            if not self.store.reclaimable():
                raise
        self.store.request_checkpoint()
        self._commit_now_locked()
        return self.store.allocate_chunk()

    def _count_merge_left_locked(self) -> int:
        m = self.store.merging
        return len(self.store.merge_todo(0, 1 << 62)) if m is not None else 0

    def is_merging(self, snap: SnapshotInfo) -> bool:
        """True if ``snap`` is being merged (it is not exported meanwhile)."""
        return snap.id == self._merging

    def _name_of(self, version: int) -> str:
        for s in self._snaps:
            if s.id == version:
                return s.name
        return f"#{version}"

    @property
    def origin_size(self) -> int:
        """The origin's size in bytes now (never waits)."""
        return self.store.origin_size

    def _flush_store(self) -> None:
        """Make exception data written by snapshot writes durable."""
        self.store.cow.flush()


    # -- provided by other concerns ---------------------------------------------------------

    def _can_make_room_locked(self, exclude: int | None = None) -> bool:
        """True if the full-store policy can delete a snapshot (not ``exclude``) to make
        room (:class:`~ddsnap.service.policy.FullPolicy`)."""
        raise NotImplementedError

    def _make_room_locked(self, exclude: int | None = None) -> None:
        """Delete a snapshot to make room, lock held (``FullPolicy``)."""
        raise NotImplementedError

    def _merge_range_locked(self, first: int, last: int) -> None:
        """Merge every chunk of ``first..last`` not merged yet, lock held (``MergeOps``)."""
        raise NotImplementedError


class _Reclaim(Exception):
    """Internal: an allocation gave back the chunks its request held and reclaimed freed
    space; the request starts its allocations again."""
