"""The in-process metadata service: :class:`LocalService`, one implementation of the
seam :class:`~ddsnap.service.api.MetadataService`.

In seed 000 the data never passes through the metadata server.  A node asks the server to
make origin chunks unique (the server copies out, commits, and answers once no snapshot
reader holds those chunks), then writes the origin itself; for a snapshot read it gets
"read these from the origin (read-locked)" and "read these store chunks", reads them
itself and releases the locks.  Here the server runs in the volumes' own process, on the
store object it was given; the volumes do their data I/O on :attr:`LocalService.data`.

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

import contextlib
import errno
import logging
import os
import threading
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field

from ..errors import (
    CorruptMetadata,
    InvalidArgument,
    MergeInProgress,
    ReadOnlyVolume,
    ServiceFailed,
    ShrinkRefused,
    SnapshotBusy,
    SnapshotNotFound,
    StoreFull,
    host_error,
)
from ..store.api import ExceptionStore, Finding, NotCached, SnapshotInfo
from ..store.blockdev import BlockDevice, copy_range
from ..units import human_bytes, parse_size
from .api import DataDevices, ReadMap, ServiceStatistics, StoreStatus

#: most chunks one coalesced copy I/O moves (csnap's copybuf is 32 chunks)
COPY_CHUNKS = 32
#: data one merge step moves at most (bytes): one origin flush and one commit per step
MERGE_STEP_BYTES = 32 << 20
#: longest the event loop waits for the metadata lock before a READ goes to a thread (s)
NOWAIT_LOCK_WAIT = 0.001
#: environment variable that sets the merge step instead (``4K``, ``1M``, bytes)
MERGE_STEP_ENV = "DDSNAP_MERGE_STEP"


def merge_step_bytes() -> int:
    """Bytes of data a merge step moves at most: ``$DDSNAP_MERGE_STEP`` or
    :data:`MERGE_STEP_BYTES`.  Smaller steps make writes to chunks being merged wait less
    (each waits for its step), larger ones merge faster.

    Raises:
        InvalidArgument: the variable is not a positive size.
    """
    text = os.environ.get(MERGE_STEP_ENV, "").strip()
    if not text:
        return MERGE_STEP_BYTES
    return parse_size(text, MERGE_STEP_ENV, positive=True)

log = logging.getLogger("ddsnap.service")


@dataclass
class MergeProgress:
    """How far the merge has come, in chunks (exceptions of the merging snapshot).

    What can be counted honestly: the format records which snapshot is being merged and
    the merge cursor, but not how many exceptions the merge began with, and a merged
    exception is gone.  So the count starts where this process met the merge:

    * ``counted_from == "start"``: this process started the merge; ``total`` is every
      exception the snapshot had then, so ``done`` and ``total`` cover the whole merge,
      across ``merge --stop`` and resumes in this process.
    * ``counted_from == "open"``: an earlier process started it (the store was reopened:
      a server restart, crash recovery, a local ``merge --wait``); ``total`` is what was
      left when this process opened the store, and what was merged before is not
      counted.  (Below the merge cursor everything is merged.)

    ``done`` counts the exceptions merged since, by merge steps and by origin writes that
    merge their chunks first; ``total - done`` is what is left.

    The rate is ``done`` over the seconds the merge was running since the count began:
    a status taken while it is not running (stopped with ``--stop``, stopped by an
    error, or nobody serving the store) marks it paused, the time until a status sees it
    running again is left out, and a paused merge reports no rate and no ETA (None).  So
    a pause never shows as a decaying rate.
    """

    total: int
    counted_from: str = "start"
    done: int = 0
    #: seconds of running time before :attr:`since`
    active: float = 0.0
    #: monotonic time the current running stretch began; None while paused
    since: float | None = field(default_factory=time.monotonic)

    def to_dict(self, name: str, keep: bool, cursor: int, running: bool) -> dict:
        """The status dict (``merge --status --json``); ``running`` says whether a worker
        is merging now.  Rate in chunks per second, ETA in seconds (None if unknown)."""
        now = time.monotonic()
        rate = eta = None
        left = max(0, self.total - self.done)
        if running:
            if self.since is None:
                self.since = now
            rate = self.done / max(1e-9, self.active + now - self.since)
            if rate > 0:
                eta = round(left / rate, 1)
            rate = round(rate, 3)
        elif self.since is not None:
            self.active += now - self.since
            self.since = None
        return {"snapshot": name, "keep": keep, "chunks_done": self.done,
                "chunks_total": self.total, "counted_from": self.counted_from,
                "cursor": cursor, "running": running, "chunks_per_second": rate,
                "eta_seconds": eta}


class LocalService:
    """Decides mappings, copies out, commits and orders origin writes after snapshot reads
    (:class:`~ddsnap.service.api.MetadataService`, in this process).

    A failed commit (the host's ENOSPC or EIO on the store, say) leaves the store's state
    in memory untrusted: the service records the failure (:attr:`failure`, logged once)
    and the next operation reopens the store with ``reopen`` (recovery from the journal)
    once the operations in flight have left, then goes on with the reopened store.

    Args:
        store: the exception store (shared or memory).
        origin: the origin device.
        reopen: ``() -> ExceptionStore``: the store opened afresh from its device (None:
            a failed commit fails every later operation with ServiceFailed).

    Attributes:
        data: the devices volumes in this process do their I/O on (the origin, and the
            store's device for exception data); not part of the seam.
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
        self._barrier = 0  # operations holding new origin writes back (_origin_writes_held)
        self._opens: Counter[str] = Counter()
        self._snaps: tuple[SnapshotInfo, ...] = ()
        self._refresh_snaps()
        m = store.merging
        #: version id of the snapshot being merged, None if none (read without the lock)
        self._merging: int | None = m
        self._merge_busy: set[int] = set()  # chunks a merge step is working on
        #: most chunks one :meth:`merge_step` merges
        self.merge_step_chunks = max(1, merge_step_bytes() // self.chunk_size)
        #: snapshots the full-store policy deleted (name, id, time), newest last
        self.auto_deleted: list[dict] = store.auto_deleted()
        self._merge_progress = (MergeProgress(self._count_merge_left(), "open")
                                if m is not None else None)
        if not getattr(store, "read_only", False):  # a degraded open never writes
            self._finish_interrupted_delete()

    # -- commit ---------------------------------------------------------------------------

    def _check(self) -> None:
        """Raise ServiceFailed if a commit failed (lock held, in an operation's middle)."""
        if self._failed is not None:
            self._raise_failed()

    def _raise_failed(self):
        f = self._failed
        raise ServiceFailed(f"the snapshot store failed ({f}); it is reopened from its "
                            "journal and this request did not complete",
                            getattr(f, "errno", None) or errno.EIO)

    def _enter(self) -> None:
        """Start an operation (lock held, holding nothing yet): reopen the store first
        if a commit failed.

        Raises:
            ServiceFailed: the store cannot be reopened (yet).
        """
        if self._failed is not None:
            self._recover_locked()

    def _wait(self) -> None:
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
            self._enter()

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
            try:
                store = self.reopen_store()
            except Exception as e:
                if self.failure["reopen_error"] != str(e):  # say it once, not per request
                    log.error("reopening the snapshot store failed: %s; the next request "
                              "tries again", e)
                self.failure["reopen_error"] = str(e)
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
        self._refresh_snaps()
        m = store.merging
        self._merging = m
        if m is None:
            self._merge_progress = None
        elif self._merge_progress is None:
            self._merge_progress = MergeProgress(self._count_merge_left())
        self.reopens += 1
        self.failure["reopened"] = True
        self.failure["reopen_error"] = None
        log.warning("snapshot store reopened from its journal after the failure; "
                    "serving again")

    def _start_commit(self):
        """Capture the open batch (lock held); returns ``(batch or None, its epoch)``."""
        self._committing = True
        self._commit_done = threading.Event()
        batch = self.store.begin_commit()
        target = self.epoch
        self.epoch += 1
        return batch, target

    def _end_commit(self, target: int, error: BaseException | None) -> None:
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
                self._check()
                if epoch in self._lost:
                    raise ServiceFailed("a commit to the snapshot store failed and the "
                                        "store was reopened without this change")
                if self.durable >= epoch:
                    return
                if self._committing:
                    done = self._commit_done
                else:
                    done = None
                    batch, target = self._start_commit()
            if done is not None:
                done.wait()
                continue
            self._write_commit(batch, target, holding_lock=False)

    def _write_commit(self, batch, target: int, holding_lock: bool) -> None:
        """Write a captured batch and record the outcome (failure fails the service)."""
        error = None
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
                self._end_commit(target, error)
            else:
                with self.lock:
                    self._end_commit(target, error)

    def _commit_now_locked(self) -> None:
        """Make everything changed so far durable, holding the lock throughout."""
        self._check()  # never commit a state a failed commit left untrusted
        while self._committing:
            self._wait()
        batch, target = self._start_commit()
        self._write_commit(batch, target, holding_lock=True)

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
            self._wait()
        if self.store.pending_blocks() < self.store.commit_threshold:
            return
        self._commit_now_locked()

    def commit(self) -> None:
        """Make every change made so far durable."""
        with self.lock:
            e = self.epoch
        self.wait_durable(e)

    # -- copying --------------------------------------------------------------------------

    def _copy(self, moves: list[tuple[int, int]], source: BlockDevice) -> None:
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

    @contextmanager
    def _origin_writes_held(self):
        """Lock held: hold new origin writes back (``_barrier``), wait until those in
        flight are done, and let them go again on leaving.  For what must see the origin
        still: a snapshot creation, a merge start, a resize."""
        self._barrier += 1
        try:
            while self._origin_writes:
                self._wait()
            yield
        finally:
            self._barrier -= 1
            self.cond.notify_all()

    def _flush_origin(self) -> None:
        """``origin.flush()``, a host failure raised as HostIOError naming the origin."""
        try:
            self.origin.flush()
        except OSError as e:
            raise host_error(e, "origin", self.origin.path, "flushing it") from e

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
            HostIOError: the host failed a copy-out (HostFull: ENOSPC); the chunks it
                took are given back.
            ServiceFailed: the commit failed, or the store cannot be reopened after one.
        """
        with self.lock:
            if self._failed is not None:
                self._recover_locked()
            need = self._prepare_origin_locked(first, last)
        self._await_origin_write(first, last, need)

    def prepare_origin_writes(self, ranges: list[tuple[int, int]]
                              ) -> list[BaseException | None]:
        """:meth:`prepare_origin_write` for several writes at once (the NBD server's
        batch of WRITEs that arrived together): the copy-outs of all of them under one
        lock hold, one wait for their commit.  Returns, for the first ranges (possibly
        not all), None (prepared: write the origin, then :meth:`finish_origin_write`) or
        the exception that range got (nothing to finish).  Ranges past the returned list
        were not started: a snapshot creation waits for the writes in flight, so the
        batch stops growing; the caller prepares those one at a time afterwards."""
        out: list[BaseException | None] = []
        needs = []
        with self.lock:
            if self._failed is not None:
                self._recover_locked()
            for first, last in ranges:
                if out and self._barrier:
                    break
                try:
                    needs.append(self._prepare_origin_locked(first, last))
                    out.append(None)
                except Exception as e:
                    needs.append(None)
                    out.append(e)
        for k, (first, last) in enumerate(ranges):
            if out[k] is None:
                try:
                    self._await_origin_write(first, last, needs[k])
                except Exception as e:
                    out[k] = e
        return out

    def _prepare_origin_locked(self, first: int, last: int) -> int:
        """The locked part of :meth:`prepare_origin_write`: copy-outs recorded, the
        write counted in flight.  Returns the batch that must be durable before the
        origin is written."""
        self._check()
        while self._barrier:
            self._wait()
        if self._merging is not None:
            # Chunks not merged yet are merged first: the write lands on the merged
            # content (seed 003 patches 09/10: writes to chunks under merge wait).
            self._merge_range_locked(first, last)
            # Every chunk written is merged from now on, also where the target read the
            # origin: a copy-out this write makes for the target must not become what
            # the origin reads there.
            # (The merge may have completed while this waited for chunks.)
            for c in range(max(first, self.store.state.merge_cursor), last + 1):
                if self.store.merging is not None and self.store.merge_source(c) is None:
                    self.store.mark_merged(c)
                    self._pending[(0, c)] = self.epoch
        while True:
            need, moves, adds, err = self._origin_copyouts_locked(first, last)
            if not moves:
                break
            self._copy(moves, self.origin)
            limit = self.store.commit_threshold
            k, full = 0, False
            try:
                while k < len(adds):
                    c, sc, sharers = adds[k]
                    self.store.add_origin_exception(c, sc, sharers)
                    self._pending[(0, c)] = self.epoch
                    k += 1
                    if self.store.pending_blocks() >= limit:
                        full = True
                        break
            except BaseException as e:
                # Chunk k not recorded (no room for the metadata, or a tree block could
                # not be read): it and the ones after it go back.
                for _c, unused, _s in adds[k:]:
                    self.store.release_chunk(unused)
                if not isinstance(e, StoreFull):
                    raise
                err = e
            if full:
                # The batch must be committed now, and a commit must not make chunks not
                # recorded yet durably allocated (a crash or a failed commit would leak
                # them): they go back, and the rest of the request starts again.
                for _c, unused, _s in adds[k:]:
                    self.store.release_chunk(unused)
                self._bound_batch()
                if k < len(adds):
                    continue
            need = self.epoch
            break
        if err is not None:
            raise err
        self._origin_writes += 1
        return need

    def _origin_copyouts_locked(self, first: int, last: int):
        """Allocate a store chunk for each of chunks ``first..last`` the origin still
        shares with a snapshot (lock held; the full-store policy and reclaims applied).

        Returns ``(need, moves, adds, err)``: the batch the chunks without sharers wait
        for, ``[(chunk, store_chunk)]``, ``[(chunk, store_chunk, sharers)]``, and the
        StoreFull that stopped the allocations early (the chunks before it are still
        copied out), or None.  On any other error nothing is held.
        """
        while True:
            need = -1
            moves, adds = [], []
            err = None
            retry = False
            try:
                for c in range(first, last + 1):
                    sharers = self.store.origin_sharers(c)
                    if sharers:
                        try:
                            sc = self._allocate_held(moves)
                        except _Reclaim:
                            retry = True  # gave back what it held, reclaimed: again
                            break
                        except StoreFull as e:
                            err = e
                            break
                        moves.append((c, sc))
                        adds.append((c, sc, sharers))
                    else:
                        # No sharer now, but maybe only since a change not yet durable
                        # (a copy-out, or a snapshot write unsharing the chunk): until it
                        # is, a crash would bring the origin's sharers back.
                        need = max(need, self._pending.get((0, c), -1))
            except BaseException:
                # A tree block could not be read, or a reclaim's commit failed: what
                # this request took goes back.
                for _c, sc in moves:
                    self.store.release_chunk(sc)
                raise
            if retry:
                continue
            if err is None or not self._can_make_room():
                return need, moves, adds, err
            # Full, and the policy deletes the oldest snapshot: give back what this
            # request took (its sharers may include the victim) and start again.
            for _c, sc in moves:
                self.store.release_chunk(sc)
            self._make_room_locked()

    def _await_origin_write(self, first: int, last: int, need: int) -> None:
        """The waiting part of :meth:`prepare_origin_write`: the copy-outs durable, and
        no read lock left on the chunks.  On failure the write is no longer in flight."""
        try:
            self.wait_durable(need)
            # Readers that mapped these origin chunks before the copy-outs hold read
            # locks; later ones map the exceptions.  So no read lock at all (the usual
            # case: event-loop reads hold the metadata lock instead) needs no wait.
            if self._readlocks:
                with self.lock:
                    while any(self._readlocks[c] for c in range(first, last + 1)
                              if c in self._readlocks):
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

    def _version(self, snap: SnapshotInfo) -> int:
        """``snap``'s version id, checking it is still live."""
        if snap.id in self._ids:
            return snap.id
        raise SnapshotNotFound(snap.name)

    def map_snapshot_read(self, snap: SnapshotInfo, first: int, last: int) -> ReadMap:
        """Where snapshot ``snap`` reads chunks ``first..last`` (seed 000
        ``QUERY_SNAPSHOT_READ``); origin chunks stay read-locked until released."""
        with self.lock:
            self._enter()
            v = self._version(snap)
            sources, locked = [], []
            lookup = self.store.snapshot_chunk
            for c in range(first, last + 1):
                sc = lookup(v, c)
                if sc is None:
                    self._readlocks[c] += 1
                    locked.append(c)
                sources.append(sc)
            return ReadMap(first, sources, locked)

    def map_origin_read(self, first: int, last: int) -> ReadMap | None:
        """Where the origin reads chunks ``first..last`` while a merge runs, else None.

        During a merge the origin already shows the merging snapshot's content: a chunk
        not merged yet is read from that snapshot's exception (read-locked, so the merge
        step waits for the read) (seed 003: reads of the merging origin).
        """
        if self._merging is None:
            return None
        with self.lock:
            self._enter()
            if self.store.merging is None:
                return None
            sources, locked = [], []
            for c in range(first, last + 1):
                sc = self.store.merge_source(c)
                if sc is not None:
                    self._readlocks[c] += 1
                    locked.append(c)
                sources.append(sc)
            return ReadMap(first, sources, locked)

    def release_read(self, rmap: ReadMap) -> None:
        """Drop the read locks of a read map (seed 000 ``FINISH_SNAPSHOT_READ``)."""
        if not rmap.locked:
            return
        with self.lock:
            wake = False
            for c in rmap.locked:
                self._readlocks[c] -= 1
                if not self._readlocks[c]:
                    del self._readlocks[c]
                    wake = True
            if wake:
                self.cond.notify_all()

    release_snapshot_read = release_read

    def map_read_nowait(self, snap: SnapshotInfo | None, first: int, last: int
                        ) -> _NowaitMap:
        """The sources of chunks ``first..last`` of ``snap`` (None: the origin), as a
        context whose value is ``[store chunk or None per chunk]``, or None when the
        mapping needs a wait: the metadata lock for more than :data:`NOWAIT_LOCK_WAIT`,
        a tree block not in memory, a merge in progress, a failed store, a deleted
        snapshot (then :meth:`map_snapshot_read` answers, or raises the error).

        The NBD server tries reads on its event loop first.  The metadata lock is held
        until the context exits (the caller's page-cache copies: microseconds), which is
        what the read locks of :meth:`map_snapshot_read` otherwise ensure: no origin
        chunk mapped to the origin can be overwritten before the read is done.  The
        origin outside a merge needs no lock: it maps to itself.
        """
        if self._merging is not None:
            return _NO_MAP
        if snap is None:
            return _NowaitMap(None, [None] * (last - first + 1))
        # Worth a short wait: the lock is mostly held for microseconds (a mapping) by a
        # thread that needs the GIL, which waiting here releases; giving up at once made
        # every read that met a busy lock go to a thread, which kept the lock busier.
        if not self.lock.acquire(timeout=NOWAIT_LOCK_WAIT):
            return _NO_MAP
        try:
            v = snap.id
            if self._failed is not None or self._merging is not None or v not in self._ids:
                self.lock.release()
                return _NO_MAP
            lookup = self.store.snapshot_exception_nowait
            if first == last:  # the common small read
                return _NowaitMap(self.lock, [lookup(v, first)[0]])
            return _NowaitMap(self.lock, [lookup(v, c)[0] for c in range(first, last + 1)])
        except NotCached:
            self.lock.release()
            return _NO_MAP
        except BaseException:
            self.lock.release()
            raise

    def prepare_snapshot_write(self, snap: SnapshotInfo, first: int, last: int) -> list[int]:
        """Make snapshot chunks ``first..last`` unique to ``snap``; return their store chunks.

        A chunk the snapshot still shares (with the origin, other snapshots or snapshots
        taken of it) gets a new exception holding a copy of its current content; when
        snapshots taken of ``snap`` read that content through it, they keep a copy too.
        Committed durably before this returns (seed 000 ``make_unique`` for a snapshot).
        The caller then writes the returned store chunks.

        Raises:
            ReadOnlyVolume: the snapshot is read-only.
            StoreFull: no room (ENOSPC).
            HostIOError: the host failed a copy (HostFull: ENOSPC); the chunks it took
                are given back (chunks made unique before it stay so).
            ServiceFailed: the commit failed, or the store cannot be reopened after one.
        """
        if snap.read_only:
            raise ReadOnlyVolume(f"snapshot {snap.name} is read-only")
        with self.lock:
            self._enter()
            v = self._version(snap)
            if v == self._merging:
                raise MergeInProgress(f"snapshot {snap.name} is being merged into the origin")
            need = -1
            out = []
            for c in range(first, last + 1):
                sc, unique = self.store.snapshot_exception(v, c)
                if unique:
                    # Unique maybe only by a change not yet durable (its own unshare, a
                    # snapshot taken of it unsharing, or another reader of an ancestor's
                    # exception leaving it): data written there before that commits is
                    # lost to a crash.
                    for a in [v] + self._ancestors(v):
                        need = max(need, self._pending.get((a, c), -1))
                    out.append(sc)
                    continue
                while True:
                    try:
                        new = self._allocate_locked()
                        kept = None
                        if self.store.snapshot_write_keeps(v, c):
                            try:
                                kept = self._allocate_locked()
                            except BaseException:
                                self.store.release_chunk(new)
                                raise
                        break
                    except StoreFull:
                        if not self._can_make_room(exclude=v):
                            raise
                        self._make_room_locked(exclude=v)
                        sc, unique = self.store.snapshot_exception(v, c)
                dests = [new] if kept is None else [new, kept]
                # (a failed copy gives the chunks back itself)
                if sc is None:
                    self._copy([(c, d) for d in dests], self.origin)
                else:
                    self._copy([(sc, d) for d in dests], self.store.cow)
                try:
                    self.store.add_snapshot_exception(v, c, new, kept)
                except BaseException:
                    # Not recorded (no room for the metadata, a tree block unreadable):
                    # the chunks go back.
                    for d in dests:
                        self.store.release_chunk(d)
                    raise
                # Who reads this chunk changed for the writer and every version above it
                # (an origin write or an ancestor's write may now skip its copy-out).
                for a in [v] + self._ancestors(v):
                    self._pending[(a, c)] = self.epoch
                need = self.epoch
                out.append(new)
                self._bound_batch()
        self.wait_durable(need)
        return out

    def _ancestors(self, version: int) -> list[int]:
        return self.store.table.ancestors(version)

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
        #: version ids of the live snapshots (replaced, never changed)
        self._ids = frozenset(s.id for s in self._snaps)

    def create_snapshot(self, name: str, read_only: bool = False,
                        parent: str | None = None) -> SnapshotInfo:
        """Snapshot the origin (or, with ``parent``, the live snapshot of that name) as
        of every write to it completed so far.

        For the origin, new origin writes wait while earlier ones drain and the origin is
        flushed; for a snapshot, the store is flushed (writes to a snapshot land in it).
        Then the snapshot is committed: constant time in the size of the volume and in
        the number of snapshots.

        Raises:
            SnapshotExists, TooManySnapshots, MergeInProgress: as the names say.
            SnapshotNotFound: no live snapshot called ``parent``.
            HostIOError: the host failed the flush (HostFull: ENOSPC); nothing changed.
            ServiceFailed: the commit failed (the committing request gets the host's
                error instead); once the store is reopened the snapshot exists if that
                commit reached the journal, and not otherwise.
        """
        with self.lock:
            self._enter()
            if self._merging is not None:
                raise MergeInProgress("cannot take a snapshot while a snapshot is being "
                                      "merged into the origin")
            if parent is not None:
                pv = self.store.snapshot(parent).id
                # Completed writes to the parent are in the store: durable first, so a
                # crash cannot change what the new snapshot reads (invariant 1).
                self._flush_store()
                info = self.store.create_snapshot(name, read_only, parent=pv)
                self._refresh_snaps()
                e = self.epoch
            else:
                with self._origin_writes_held():
                    # Completed origin writes are part of the snapshot: make them durable
                    # so a crash cannot change what the snapshot reads (invariant 1).
                    self._flush_origin()
                    info = self.store.create_snapshot(name, read_only)
                    self._refresh_snaps()
                    e = self.epoch
        self.wait_durable(e)
        return info

    def delete_snapshot(self, name: str) -> SnapshotInfo:
        """Delete snapshot ``name``, free the chunks only it used and compact the tree.

        Raises:
            SnapshotNotFound: no such snapshot.
            SnapshotBusy: clients have it open.
            HostIOError / ServiceFailed: a commit failed (the committing request gets
                the host's error); once the store is reopened the snapshot is gone if
                the delete reached the journal (its sweep resumes then), else still there.
        """
        with self.lock:
            self._enter()
            info = self.store.snapshot(name)
            if info.id == self._merging:
                raise MergeInProgress(f"snapshot {name} is being merged into the origin")
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
                self._check()
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

    def _finish_interrupted_delete(self) -> None:
        """A delete cut short by a crash resumes when the store is next opened."""
        self._sweep()

    def _allocate_held(self, moves: list[tuple[int, int]]) -> int:
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

    # -- the full-store policy -------------------------------------------------------------

    def _victim(self, exclude: int | None = None) -> SnapshotInfo | None:
        """The oldest snapshot the ``delete-oldest`` policy may delete, if any: not
        ``exclude`` (a version id), not the one being merged."""
        if self.store.full_policy != "delete-oldest":
            return None
        for s in self._snaps:  # oldest first
            if s.id != exclude and s.id != self._merging:
                return s
        return None

    def _can_make_room(self, exclude: int | None = None) -> bool:
        return self._victim(exclude) is not None

    def _make_room_locked(self, exclude: int | None = None) -> None:
        """Delete the oldest snapshot to make room (``full-policy=delete-oldest``), lock
        held: its chunks are swept, committed and checkpointed so they can be reused.
        Logged and kept in :attr:`auto_deleted` for ``status`` (invariant 7: never silent).
        """
        victim = self._victim(exclude)
        self.store.note_auto_deleted(victim, time.time_ns())  # durable with the delete
        self.store.begin_delete(victim.name)
        self._refresh_snaps()
        while not self._sweep_step_locked():
            self._commit_now_locked()
        self._commit_now_locked()
        self.auto_deleted = self.store.auto_deleted()
        log.warning("snapshot store full: deleted the oldest snapshot %s "
                    "(full-policy=delete-oldest)", victim.name)

    def set_full_policy(self, policy: str) -> None:
        """Choose what a write does when the store is full (``error``/``delete-oldest``)."""
        with self.lock:
            self._enter()
            self.store.set_full_policy(policy)
        self.commit()

    # -- merge (seed 003): roll the origin back to a snapshot, online ---------------------

    def _count_merge_left(self) -> int:
        m = self.store.merging
        return len(self.store.merge_todo(0, 1 << 62)) if m is not None else 0

    def start_merge(self, name: str, keep: bool = False) -> dict:
        """Start merging snapshot ``name`` into the origin (``lvconvert --merge``).

        From now on the origin reads as ``name``; the chunks are copied in by
        :meth:`merge_step` (a background worker) or by origin writes that touch them.
        Starting the merge already in progress for ``name`` again is allowed (a resume).

        Raises:
            SnapshotNotFound: no such snapshot.
            MergeInProgress: another snapshot is being merged (one merge per origin).
            SnapshotBusy: clients have ``name`` open.
        """
        with self.lock:
            self._enter()
            info = self.store.snapshot(name)
            m = self.store.merging
            if m is not None:
                if m == info.id:
                    return self._merge_status_locked(True)
                raise MergeInProgress(f"snapshot {self._name_of(m)} is already being merged "
                                      "into the origin")
            if self._opens[name]:
                raise SnapshotBusy(f"snapshot {name} is in use by {self._opens[name]} "
                                   "connection(s); disconnect them before merging it")
            if info.size != self.store.origin_size:
                raise InvalidArgument(
                    f"snapshot {name} is {human_bytes(info.size)} but the origin is now "
                    f"{human_bytes(self.store.origin_size)}: resize the origin back to "
                    f"{human_bytes(info.size)} to merge it")
            # Origin writes in flight finish first (seed 003 patch 10); new ones wait and
            # then see the merge.
            with self._origin_writes_held():
                if self.store.merging is not None:  # another merge started meanwhile
                    raise MergeInProgress("another merge started meanwhile")
                self.store.set_merge(info.id, keep)
                self._merging = info.id
            self._merge_progress = MergeProgress(self._count_merge_left())
            log.info("merge of snapshot %s into the origin started (%d chunks)", name,
                     self._merge_progress.total)
        self.commit()
        with self.lock:
            return self._merge_status_locked(True)

    def is_merging(self, snap: SnapshotInfo) -> bool:
        """True if ``snap`` is being merged (it is not exported meanwhile)."""
        return snap.id == self._merging

    def _name_of(self, version: int) -> str:
        for s in self._snaps:
            if s.id == version:
                return s.name
        return f"#{version}"

    def merge_status(self, running: bool = False) -> dict | None:
        """The merge in progress as a dict (snapshot, chunks done/total and what they count
        from, cursor, rate, ETA: see :class:`MergeProgress`), or None.  ``running`` says
        whether a worker is merging now (without one, no rate or ETA is given)."""
        with self.lock:
            return self._merge_status_locked(running)

    def _merge_status_locked(self, running: bool) -> dict | None:
        m = self.store.merging
        if m is None or self._merge_progress is None:
            return None
        st = self.store.state
        return self._merge_progress.to_dict(self._name_of(m), st.merge_keep, st.merge_cursor,
                                            running)

    def merge_step(self) -> bool:
        """Merge the next exceptions of the merging snapshot, up to
        :attr:`merge_step_chunks` chunks (:data:`MERGE_STEP_BYTES` of data) in one step.

        The copy-outs the step needs are committed first; then the data is copied into
        the origin *outside* the metadata lock (the chunks are marked busy, so origin
        writes to them wait, and origin reads still find the snapshot's exceptions), the
        origin is flushed once, and the exceptions are dropped and committed.  One
        flush and one commit per step is what makes a merge stream like a copy.

        Returns True when the merge is complete (or none is in progress); on completion
        the snapshot is deleted unless the merge was started with ``keep``.
        """
        step = self._merge_begin()
        if step is None:
            return True
        self._merge_end(step, self._merge_copy_step(step))
        return False

    def _merge_begin(self, start: int | None = None) -> _MergeStep | None:
        """Pick and prepare the next step: the merging snapshot's next exceptions from
        ``start`` (default: the durable merge cursor).  Returns None when there are none
        left from there; from the cursor that completes the merge (committed, the
        snapshot deleted unless kept)."""
        with self.lock:
            self._enter()
            m = self.store.merging
            if m is None:
                return None
            cursor = self.store.state.merge_cursor
            todo = self.store.merge_todo(
                cursor if start is None else max(start, cursor), self.merge_step_chunks)
            if todo:
                runs = self._merge_prepare_locked(m, todo)
                self._origin_writes += 1  # a snapshot creation waits for the copy
                return _MergeStep(m, todo, runs)
            if start is not None:
                return None
            self._finish_merge_locked(m)
        self.commit()
        self._sweep()  # frees the merged snapshot's slot (unless kept)
        return None

    def _merge_copy_step(self, step: _MergeStep) -> bool:
        """Copy a prepared step's data into the origin (no lock, no flush).

        Raises:
            HostIOError: the host failed the copy; the step is ended dropping nothing
                (the snapshot's exceptions still serve those chunks).
        """
        try:
            for run in step.runs:
                self._merge_copy(run)
        except BaseException:
            self._end_failed_step(step)
            raise
        return True

    def _end_failed_step(self, step: _MergeStep) -> None:
        """End a step that failed, dropping nothing, while an error is being raised."""
        try:
            self._merge_end(step, False)
        except Exception as e:  # noqa: BLE001 - the error being raised is the one to report
            log.debug("ending a failed merge step failed too: %s", e)

    def _merge_end(self, step: _MergeStep, copied: bool) -> None:
        """Finish a step: flush the origin, then drop the merged exceptions, move the
        merge cursor and commit."""
        try:
            if copied and step.runs:
                self._flush_origin()
        except BaseException:
            copied = False
            raise
        finally:
            m, todo, runs = step.m, step.todo, step.runs
            with self.lock:
                self._origin_writes -= 1
                try:
                    if copied and self._failed is None:
                        for run in runs:
                            self._merge_drop_locked(m, run)
                    # Up to the first exception not merged yet, never past one: a full
                    # store may have let a step merge only part, and with pipelined steps
                    # a later step can end while an earlier one's chunks are still to do.
                    if self.store.merging == m and self._failed is None:
                        cursor = self.store.state.merge_cursor
                        left = self.store.merge_todo(cursor, 1)
                        cursor = max(cursor, min(left[0][0] if left else todo[-1][0] + 1,
                                                 todo[-1][0] + 1))
                        self.store.set_merge_cursor(cursor)
                finally:
                    # Whatever failed, the chunks must not stay busy (writes wait on them).
                    for run in runs:
                        self._merge_busy.difference_update(c for c, _ in run)
                    self.cond.notify_all()
        self.commit()

    def _merge_range_locked(self, first: int, last: int) -> None:
        """Merge every not-yet-merged chunk in ``first..last`` now (lock held)."""
        m = self.store.merging
        if m is None:
            return
        while True:
            # Looked up again after every run: a run may be merged only in part (room for
            # part of its copy-outs), and other requests may merge chunks meanwhile.
            todo = [(c, sc) for c, sc in
                    self.store.merge_todo(first, last - first + 1)
                    if c <= last]
            if not todo:
                return
            self._merge_run_locked(m, _linear_prefix(todo, COPY_CHUNKS))

    def _merge_run_locked(self, m: int, run: list[tuple[int, int]]) -> None:
        """Merge one linear run now, all under the lock (for an origin write that must
        land on merged chunks): prepare, copy, flush the origin, drop."""
        runs = self._merge_prepare_locked(m, run)
        try:
            for r in runs:
                self._merge_copy(r)
            if runs:
                self._flush_origin()
                for r in runs:
                    self._merge_drop_locked(m, r)
        finally:
            for r in runs:
                self._merge_busy.difference_update(c for c, _ in r)
            self.cond.notify_all()

    def _merge_prepare_locked(self, m: int, todo: list[tuple[int, int]]
                              ) -> list[list[tuple[int, int]]]:
        """Get ``todo`` (``[(chunk, store_chunk)]`` of the merging snapshot, ascending)
        ready to be copied into the origin (lock held).  Returns its linear runs that
        are ready, each marked busy (the caller clears that).

        1. Chunks another step or origin write is merging are waited for, and those
           merged meanwhile are left out.
        2. Snapshots that still read these origin chunks get exceptions holding the
           current origin data (seed 003 patch 11), committed durably (one commit).
        3. Snapshot readers of those origin chunks and origin readers of the merging
           snapshot's exceptions drain.

        When the store has no room for every copy-out, the runs there is room for are
        returned (merged chunks free their exceptions for the next steps).  A step can be
        repeated after a crash with the same result (idempotent).

        Raises:
            StoreFull: no room for the copy-outs of even the first chunk.
            HostIOError: the host failed a copy-out; the chunks it took are given back.
        """
        chunks = [c for c, _ in todo]
        while any(c in self._merge_busy for c in chunks):
            self._wait()
        # Re-read: another step may have merged some of these while we waited.
        todo = [(c, sc) for c, sc in todo if self.store.merge_source(c) == sc]
        if not todo:
            return []
        ready: list[tuple[int, int]] = []
        moves, adds = [], []
        full = None
        try:
            for c, sc in todo:
                sharers = self.store.origin_sharers(c)
                if sharers:
                    try:
                        # With copy-outs held, no reclaim (its commit would leak them):
                        # the part ready is merged, and the next step reclaims holding
                        # nothing.
                        dst = (self.store.allocate_chunk() if moves
                               else self._allocate_locked())
                    except StoreFull as e:
                        if not ready and self._can_make_room():
                            # Full, and the policy deletes the oldest snapshot not being
                            # merged: then count the sharers again (the victim may be one).
                            self._make_room_locked()
                            return self._merge_prepare_locked(m, todo)
                        full = e
                        break
                    moves.append((c, dst))
                    adds.append((c, dst, sharers))
                ready.append((c, sc))
        except BaseException:
            for _c, dst in moves:  # a tree block could not be read: nothing kept
                self.store.release_chunk(dst)
            raise
        if not ready:
            raise full if full is not None else StoreFull()
        self._merge_busy.update(c for c, _ in ready)
        try:
            if moves:
                self._copy(moves, self.origin)
                k = 0
                try:
                    for k, (c, dst, sharers) in enumerate(adds):  # noqa: B007 - the except reads k
                        self.store.add_origin_exception(c, dst, sharers)
                except StoreFull:
                    # No room for the metadata of copy-out k: the step's data chunks took
                    # the last free blocks.  The later copy-outs' chunks go back, which
                    # may make room for it; the chunks from the first copy-out not
                    # recorded are left to a later step.
                    for _c, unused, _s in adds[k + 1:]:
                        self.store.release_chunk(unused)
                    c, dst, sharers = adds[k]
                    try:
                        self.store.add_origin_exception(c, dst, sharers)
                    except StoreFull:
                        self.store.release_chunk(dst)
                    except BaseException:
                        self.store.release_chunk(dst)
                        raise
                    else:
                        c += 1
                    self._merge_busy.difference_update(x for x, _ in ready if x >= c)
                    self.cond.notify_all()
                    ready = [(x, sc) for x, sc in ready if x < c]
                    if not ready:
                        raise
                except BaseException:
                    for _c, unused, _s in adds[k:]:
                        self.store.release_chunk(unused)
                    raise
            if moves or any(self._pending.get((0, c), -1) > self.durable for c, _ in ready):
                self._commit_now_locked()
            while any(self._readlocks.get(c) for c, _ in ready):
                self._wait()
        except BaseException:
            self._merge_busy.difference_update(c for c, _ in ready)
            self.cond.notify_all()
            raise
        runs = []
        while ready:
            run = _linear_prefix(ready)
            runs.append(run)
            ready = ready[len(run):]
        return runs

    def _merge_copy(self, run: list[tuple[int, int]]) -> None:
        """Copy a linear run's data from the store into the origin (no flush), at most
        :data:`COPY_CHUNKS` chunks per I/O.  Needs no lock: the chunks are busy."""
        cs = self.chunk_size
        size = self.store.origin_size
        try:
            for i in range(0, len(run), COPY_CHUNKS):
                first_c, first_sc = run[i]
                n = min(COPY_CHUNKS, len(run) - i)
                end = min(size, (first_c + n) * cs)
                copy_range(self.store.cow, first_sc * cs, self.origin, first_c * cs,
                           end - first_c * cs)
        except OSError as e:
            raise host_error(e, "origin", self.origin.path,
                             f"merging chunks from the snapshot store {self.store.cow.path}"
                             ) from e

    def _merge_drop_locked(self, m: int, run: list[tuple[int, int]]) -> None:
        """After a run's data is durable in the origin: mark its chunks merged (the origin
        reads its own data there now), once no reader is using the exceptions."""
        while any(self._readlocks.get(c) for c, _ in run):
            self._wait()
        for c, _sc in run:
            cursor = self.store.state.merge_cursor
            if c >= cursor:
                left = self.store.merge_todo(cursor, 1)
                if left and left[0][0] == c:
                    # The first chunk left to merge: the cursor moves past it rather
                    # than a marker being added, which a full store may have no room
                    # for (merging in order from the cursor needs no metadata).
                    self.store.set_merge_cursor(c + 1)
            self.store.mark_merged(c)
            self._pending[(0, c)] = self.epoch
        p = self._merge_progress
        if p is not None:
            p.done += len(run)
            if p.done > p.total:
                # More was left than counted: a write by an ancestor of the target kept
                # its old data for the target where the target read the origin (a chunk
                # to merge that was not one when the count began).  Count what is left.
                p.total = p.done + len(self.store.merge_todo(0, 1 << 62))

    def _finish_merge_locked(self, m: int) -> None:
        keep = self.store.state.merge_keep
        name = self._name_of(m)
        # The merging snapshot kept its own exceptions throughout, so a kept one still
        # reads exactly what it did: the state the origin was rolled back to.
        self.store.set_merge(None)
        self._merging = None
        self._merge_progress = None
        log.info("merge of snapshot %s into the origin complete", name)
        if not keep:
            # LVM's behaviour: the merged snapshot goes away, its space is freed.
            self.store.begin_delete(name)
        self._refresh_snaps()
        self.cond.notify_all()

    def run_merge(self, stop: threading.Event | None = None, on_step=None) -> bool:
        """Merge until complete (True) or ``stop`` is set (False); resumable any time.

        Steps are pipelined: while one step's origin flush, drops and commit run in a
        second thread, the next step's data is already being copied (the flush then
        covers some of it too, which is harmless: its exceptions stay until its own
        end).  So the disk reads and the writeback overlap, as in a plain copy.
        """
        ender: threading.Thread | None = None
        failure: list[BaseException] = []

        def end(step: _MergeStep) -> None:
            try:
                self._merge_end(step, True)
            except BaseException as e:  # re-raised by the merging thread
                failure.append(e)

        def wait_end() -> None:
            nonlocal ender
            if ender is not None:
                ender.join()
                ender = None
                if failure:
                    raise failure[0]
                if on_step is not None:
                    on_step(self.merge_status(running=True))

        start: int | None = None
        try:
            while stop is None or not stop.is_set():
                try:
                    step = self._merge_begin(start)
                except StoreFull:
                    if ender is None:
                        raise
                    # The step still ending frees chunks this one may need: let it end
                    # (as without pipelining) and try again.
                    wait_end()
                    continue
                if step is None:
                    wait_end()
                    if start is not None:
                        start = None  # back to the cursor: chunks a step skipped, or done
                        continue
                    if on_step is not None:
                        on_step(self.merge_status(running=False))
                    return True
                self._merge_copy_step(step)
                try:
                    wait_end()
                except BaseException:
                    # The step before failed to end: this one, copied, ends dropping
                    # nothing (its count and busy chunks must not outlive the error).
                    self._end_failed_step(step)
                    raise
                start = step.todo[-1][0] + 1
                ender = threading.Thread(target=end, args=(step,), name="ddsnap-merge-end")
                ender.start()
        finally:
            wait_end()
        return False

    # -- resize ---------------------------------------------------------------------------


    def resize_origin(self, size: int) -> dict:
        """Grow or shrink the origin to ``size`` bytes, online (``lvextend``/``lvreduce``
        of the origin; docs/format.md "Resizing").

        Existing snapshots keep their size; snapshots taken from now on have the new
        one; exports opened from now on show it.  A file origin is extended (or
        truncated) here; a block device must have grown already.  Growing extends the
        device and makes that durable before the superblock records the size, and a
        shrink records it before truncating, so a crash in between leaves an origin
        bigger than recorded, which is served at the recorded size.

        Returns ``{"origin_size": bytes, "old_size": bytes}``.

        Raises:
            InvalidArgument: ``size`` is not a positive multiple of 512, or a block
                device origin is smaller than ``size``.
            MergeInProgress: a merge is running (it needs one size throughout).
            ShrinkRefused: a snapshot (or a version kept for its clones) is bigger than
                ``size``, or the origin export is open; nothing was changed.
            HostIOError: the host failed the truncate or the flush (HostFull: ENOSPC).
            ServiceFailed: the commit failed.
        """
        if size <= 0 or size % 512:
            raise InvalidArgument(f"the origin size must be a positive multiple of 512 "
                                  f"bytes, not {size}")
        with self.lock:
            self._enter()
            old = self.store.origin_size
            if self._merging is not None:
                raise MergeInProgress("cannot resize the origin while a snapshot is being "
                                      "merged into it")
            if size < old:
                past = self.store.versions_past(size)
                if past:
                    names = ", ".join(f"{s.name or f'#{s.id}'} ({human_bytes(s.size)})"
                                      for s in past[:5])
                    more = f" and {len(past) - 5} more" if len(past) > 5 else ""
                    raise ShrinkRefused(
                        f"cannot shrink the origin to {human_bytes(size)}: snapshot(s) "
                        f"{names}{more} read past the new end; delete them first. "
                        "Nothing was changed")
                kept = self.store.origin_kept_past(size)
                if kept:
                    raise ShrinkRefused(
                        f"cannot shrink the origin to {human_bytes(size)}: snapshot(s) "
                        f"{', '.join(self._name_of(v) for v in kept[:5])} still hold "
                        "copy-outs past the new end; delete them first. Nothing was "
                        "changed")
                if self._opens["origin"]:
                    raise ShrinkRefused(
                        f"cannot shrink the origin while {self._opens['origin']} "
                        "connection(s) have it open (they could write past the new end); "
                        "disconnect them first. Nothing was changed")
            if size != old:
                with self._origin_writes_held():
                    if size > old:
                        # Bytes a file holds past the recorded end are not the volume's
                        # (a shrink cut short by a crash leaves them): the new part
                        # starts as zeroes.
                        if not getattr(self.origin, "is_block", False):
                            self._resize_origin_device(old)
                        self._resize_origin_device(size)
                    self.store.set_origin_size(size)
                    self._commit_now_locked()
                    if size < old:
                        self._resize_origin_device(size)
                log.info("origin resized from %d to %d bytes", old, size)
        return {"origin_size": size, "old_size": old}

    def _resize_origin_device(self, size: int) -> None:
        try:
            self.origin.resize(size)
            self.origin.flush()  # the new size durable (before the superblock says so)
        except OSError as e:
            raise host_error(e, "origin", self.origin.path, "resizing it") from e

    def resize_store(self, size: int) -> dict:
        """Grow or shrink the snapshot store to ``size`` bytes (whole chunks), online;
        new chunks are free at once (``lvextend`` of a snapshot's COW device).

        Everything changed so far is committed and checkpointed first, with origin
        writes held, so the new bitmap written by the store's resize is the whole truth.
        Returns ``{"store_size": bytes, "old_size": bytes, "chunks_total": n}``.

        Raises:
            InvalidArgument: too small for the metadata, or a block device store
                smaller than ``size``.
            ShrinkRefused: chunks past the new end are in use (named); nothing changed.
            StoreFull: no room for the bigger bitmap.
            HostIOError: the host failed a write, a flush or the truncate; nothing
                switched (the service fails over to a reopen of the store).
            ServiceFailed: the commit failed.
        """
        with self.lock:
            self._enter()
            old = self.store.space()["chunks_total"]
            old_size = self.store.store_size
            with self._origin_writes_held():
                self.store.request_checkpoint()
                self._commit_now_locked()
                try:
                    new_size = self.store.resize_store(size)
                except OSError as e:
                    # A write of the new bitmap (or the truncate) failed: the old geometry
                    # is still what the superblocks say, but the store in memory may not
                    # match it any more: reopen it from disk.
                    err = host_error(e, "snapshot store", self.store.cow.path,
                                     "resizing it")
                    self._fail_locked(err)
                    raise err from e
            chunks = self.store.space()["chunks_total"]
            log.info("snapshot store resized from %d to %d chunks", old, chunks)
        return {"store_size": new_size, "old_size": old_size, "chunks_total": chunks}

    # -- administration ---------------------------------------------------------------------

    @property
    def origin_size(self) -> int:
        """The origin's size in bytes now (never waits)."""
        return self.store.origin_size

    def snapshot_space(self) -> dict[int, tuple[int, int]]:
        """Space each live snapshot uses: ``{id: (exclusive, shared)}``, in chunks
        (``ExceptionStore.snapshot_space``).

        Raises:
            CorruptMetadata: the figures could not be counted (a damaged tree block).
        """
        with self.lock:
            return self.store.snapshot_space()

    def status(self) -> StoreStatus:
        """The store's geometry, settings and space now (``ddsnap status``).  A store a
        failed commit left untrusted is reopened first if it can be (else ``failure``
        says why not)."""
        with contextlib.suppress(ServiceFailed):  # reported in ``failure``
            self.recover()
        with self.lock:
            store = self.store
            space = store.space()
            return StoreStatus(
                store_size=store.store_size, chunk_size=store.chunk_size,
                chunks_total=space["chunks_total"], chunks_free=space["chunks_free"],
                chunks_used=space["chunks_used"], origin=store.origin_path,
                origin_size=store.origin_size, max_snapshots=store.max_snapshots,
                full_policy=store.full_policy, auto_deleted=list(self.auto_deleted),
                failure=dict(self.failure) if self.failure is not None else None,
                reopens=self.reopens, **store.format_figures())

    def check(self) -> list[Finding]:
        """Commit, then check the store's metadata (``ExceptionStore.check``); a damaged
        block that stops the check is one fatal finding naming it.

        Raises:
            ServiceFailed: the store failed and cannot be reopened (yet).
        """
        self.recover()
        self.commit()
        with self.lock:
            # No commit may write the journal or home blocks while they are read: one
            # can only start under the lock, so wait for the one running, if any.
            while self._committing:
                self.cond.wait()
            try:
                return self.store.check()
            except CorruptMetadata as e:
                return [Finding("fatal", e.block, e.why)]

    def free_leaked(self, blocks: list[int]) -> None:
        """Free store blocks ``check`` found allocated but unreferenced (leaks), and
        commit (``check --repair``)."""
        with self.lock:
            self._enter()
            self.store.free_leaked(blocks)
        self.commit()

    def statistics(self) -> ServiceStatistics:
        """The service's counters now (:class:`ServiceStatistics`); holds the metadata
        lock for microseconds."""
        with self.lock:
            return ServiceStatistics(
                epoch=self.epoch, durable=self.durable, committing=self._committing,
                pending=len(self._pending), read_locked_chunks=len(self._readlocks),
                read_locks=sum(self._readlocks.values()),
                origin_writes=self._origin_writes, barrier=self._barrier,
                merge_busy=len(self._merge_busy), exports_open=dict(self._opens),
                cache_blocks=self.store.cached_blocks(), failures=self.failures,
                reopens=self.reopens)

    def export_open(self, name: str) -> None:
        with self.lock:
            self._opens[name] += 1

    def export_close(self, name: str) -> None:
        with self.lock:
            self._opens[name] -= 1
            if self._opens[name] <= 0:
                del self._opens[name]

    def _flush_store(self) -> None:
        """Make exception data written by snapshot writes durable."""
        self.store.cow.flush()

    def close(self) -> None:
        """Commit and close the store (marks it cleanly shut down)."""
        with self.lock:
            failed = self._failed
        if failed is None:
            self._flush_origin()
            self.commit()
            with self.lock:
                self.store.close()


class _NowaitMap:
    """The context :meth:`LocalService.map_read_nowait` returns: its value is the
    sources (or None), and leaving it releases the metadata lock if it holds it."""

    __slots__ = ("lock", "sources")

    def __init__(self, lock: threading.Lock | None, sources: list[int | None] | None):
        self.lock = lock
        self.sources = sources

    def __enter__(self) -> list[int | None] | None:
        return self.sources

    def __exit__(self, *exc) -> None:
        if self.lock is not None:
            self.lock.release()


#: "needs a wait": no sources, no lock held
_NO_MAP = _NowaitMap(None, None)


class _Reclaim(Exception):
    """Internal: an allocation gave back the chunks its request held and reclaimed freed
    space; the request starts its allocations again."""


@dataclass
class _MergeStep:
    """A prepared merge step: the merging version, the exceptions it looked at
    (``[(chunk, store_chunk)]``) and the linear runs of them it prepared (busy)."""

    m: int
    todo: list[tuple[int, int]]
    runs: list[list[tuple[int, int]]]


def _linear_prefix(todo: list[tuple[int, int]], limit: int | None = None
                   ) -> list[tuple[int, int]]:
    """The leading run of ``todo`` whose chunks and store chunks both go up by one (at
    most ``limit`` entries)."""
    n = 1
    limit = len(todo) if limit is None else min(limit, len(todo))
    while (n < limit and todo[n][0] == todo[0][0] + n
           and todo[n][1] == todo[0][1] + n):
        n += 1
    return todo[:n]
