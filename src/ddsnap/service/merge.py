"""The merge (seed 003, dm snapshot-merge): roll the origin back to a snapshot, online.

The origin reads as the snapshot at once; merge steps copy the snapshot's exceptions into
the origin in the background (pipelined: one step's flush and commit overlap the next
step's copy), and origin writes to chunks not merged yet merge them first."""


from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from ..errors import (
    InvalidArgument,
    MergeInProgress,
    SnapshotBusy,
    StoreFull,
    host_error,
)
from ..store.blockdev import copy_range
from ..units import human_bytes
from .core import COPY_CHUNKS, ServiceCore
from .progress import MergeProgress

log = logging.getLogger("ddsnap.service")


class MergeOps(ServiceCore):
    """Starting, stepping and finishing a merge, and its status."""

    def start_merge(self, name: str, keep: bool = False) -> dict:
        """Start merging snapshot ``name`` into the origin (``lvconvert --merge``); return
        its status (:meth:`merge_status`; with ``"complete": True`` when it was merged to
        the end before this returned).

        From now on the origin reads as ``name``; the chunks are copied in by
        :meth:`merge_step` (a background worker) or by origin writes that touch them.
        Starting the merge already in progress for ``name`` again is allowed (a resume).

        Raises:
            SnapshotNotFound: no such snapshot.
            MergeInProgress: another snapshot is being merged (one merge per origin).
            SnapshotBusy: clients have ``name`` open.
        """
        with self.lock:
            self._enter_locked()
            info = self.store.snapshot(name)
            m = self.store.merging
            if m is not None:
                if m == info.id:
                    return self._started_status_locked()
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
            with self._origin_writes_held_locked():
                if self.store.merging is not None:  # another merge started meanwhile
                    raise MergeInProgress("another merge started meanwhile")
                self.store.set_merge(info.id, keep)
                self._merging = info.id
            progress = self._merge_progress = MergeProgress(self._count_merge_left_locked())
            log.info("merge of snapshot %s into the origin started (%d chunks)", name,
                     progress.total)
        self.commit()
        # Nodes reading the origin themselves switch to merge mappings before this
        # returns (a read issued after it must see the snapshot's content).
        self._notify({"event": "merge-started", "snapshot": info.id}, wait=True)
        with self.lock:
            st = self._merge_status_locked(True)
            if st is None or st["snapshot"] != name:
                # Merged to the end while this committed (a merge worker of an earlier
                # request for it, or origin writes): say so rather than nothing.
                progress.done = progress.total
                st = progress.to_dict(name, keep, self.store.origin_chunks, running=False)
                st["complete"] = True
            return st

    def _started_status_locked(self) -> dict:
        """The status of the merge in progress, which a request resumes (lock held)."""
        st = self._merge_status_locked(True)
        if st is None:  # cannot happen: the caller saw it recorded, under the lock
            raise AssertionError("a merge in progress has no status")
        return st

    def merge_cursor(self) -> int | None:
        """The durable merge cursor (chunks below it are merged) of the merge in
        progress, or None if there is none.  Unlike :meth:`merge_status` it leaves the
        rate accounting alone (a status taken as not running marks the merge paused)."""
        with self.lock:
            return None if self.store.merging is None else self.store.state.merge_cursor

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
            self._enter_locked()
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
            self._wait_locked()
        # Re-read: another step may have merged some of these while we waited.
        todo = [(c, sc) for c, sc in todo if self.store.merge_source(c) == sc]
        if not todo:
            return []
        ready: list[tuple[int, int]] = []
        moves: list[tuple[int, int]] = []
        adds: list[tuple[int, int, int]] = []
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
                        if not ready and self._can_make_room_locked():
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
                self._copy_locked(moves, self.origin)
                k, no_room, _full = self._record_copyouts_locked(adds)
                if no_room is not None:
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
                        self._pending[(0, c)] = self.epoch
                        c += 1
                    self._merge_busy.difference_update(x for x, _ in ready if x >= c)
                    self.cond.notify_all()
                    ready = [(x, sc) for x, sc in ready if x < c]
                    if not ready:
                        raise no_room
            if moves or any(self._pending.get((0, c), -1) > self.durable for c, _ in ready):
                self._commit_now_locked()
            while any(self._readlocks.get(c) for c, _ in ready):
                self._wait_locked()
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
            self._wait_locked()
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
        self._refresh_snaps_locked()
        self.cond.notify_all()
        self._notify({"event": "merge-ended", "snapshot": m, "deleted": not keep},
                     wait=False)

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
