"""The write path: origin writes (copy-outs first: seed 000 ``make_unique`` with
``snapnum == -1``) and snapshot writes (chunks made unique to the snapshot)."""


from __future__ import annotations

import logging

from ..errors import (
    MergeInProgress,
    ReadOnlyVolume,
    StoreFull,
)
from ..store.model import SnapshotInfo
from .core import ServiceCore, _Reclaim

log = logging.getLogger("ddsnap.service")


class WritePath(ServiceCore):
    """Origin and snapshot writes: the chunks made unique, durable, and unlocked."""

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
        needs: list[int] = []
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
                    needs.append(-1)  # never awaited: its error is the outcome
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
        self._check_locked()
        while self._barrier:
            self._wait_locked()
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
            self._copy_locked(moves, self.origin)
            k, no_room, full = self._record_copyouts_locked(adds, self.store.commit_threshold)
            # Chunks not recorded go back: no room for their metadata (the request fails
            # with what it did so far), or the batch must be committed now and a commit
            # must not make chunks not recorded yet durably allocated (a crash or a failed
            # commit would leak them; the rest of the request starts again).
            for _c, unused, _s in adds[k:]:
                self.store.release_chunk(unused)
            if no_room is not None:
                err = no_room
            if full:
                self._bound_batch_locked()
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
            moves: list[tuple[int, int]] = []
            adds: list[tuple[int, int, int]] = []
            err = None
            retry = False
            try:
                for c in range(first, last + 1):
                    sharers = self.store.origin_sharers(c)
                    if sharers:
                        try:
                            sc = self._allocate_held_locked(moves)
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
            if err is None or not self._can_make_room_locked():
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
            with self.lock:
                if self._readlocks:
                    self._recall_read_locks_locked(first, last)
                while self._readlocks and any(
                        self._readlocks[c] for c in range(first, last + 1)
                        if c in self._readlocks):
                    self.cond.wait()
                # Unique now, and until the next barrier (none can complete while this
                # write is in flight; one raised meanwhile cleared the set already).
                if not self._barrier and self._merging is None and self._failed is None:
                    self._unique.add(first, last)
        except BaseException:
            self.finish_origin_write()
            raise

    def prepare_origin_write_nowait(self, first: int, last: int) -> bool:
        """:meth:`prepare_origin_write` without waiting, for chunks made unique since
        the last barrier (the in-process form of a grant, see :meth:`take_origin_grant`):
        True if all of ``first..last`` are and no barrier, merge or failure stands in
        the way (then write, then :meth:`finish_origin_write`); False when they are not
        or the lock is busy (nothing prepared).  Never waits."""
        if not self.lock.acquire(blocking=False):
            return False
        try:
            if (self._barrier or self._merging is not None or self._failed is not None
                    or not self._unique.has(first, last)):
                return False
            self._origin_writes += 1
            return True
        finally:
            self.lock.release()

    def take_origin_grant(self) -> int | None:
        """Let a node write the origin chunks it has prepared again and again without
        asking, until the grant is revoked; return the grant's serial, or None when no
        grant can be given now.

        A chunk that :meth:`prepare_origin_write` made unique stays unique for every
        snapshot that exists until the next snapshot of the origin (and no reader holds
        it: a new reader would map the copy-out), so only what raises the origin-write
        barrier (a snapshot creation, a merge start, a resize) can invalidate it, and
        none happens during a merge (whose writes must merge first).  A grant is
        therefore one origin write in flight (``_origin_writes``) held by the node as a
        whole: the barrier raises ``grant_serial``, tells the observers
        (``grants-revoked``), and waits for it as for any origin write, until the node
        has drained its granted writes and gives it back with
        :meth:`finish_origin_write`.  A grant whose serial is below the serial of a
        later ``grants-revoked`` is void.  None while a barrier is up, a merge runs or
        the store failed.  Never waits for the disk (issue 11's grants; seed 000 has
        every write ask)."""
        with self.lock:
            if self._barrier or self._merging is not None or self._failed is not None:
                return None
            self._origin_writes += 1
            return self.grant_serial

    def finish_origin_write(self) -> None:
        """The origin write prepared by :meth:`prepare_origin_write` completed."""
        with self.lock:
            self._origin_writes -= 1
            if not self._origin_writes:
                self.cond.notify_all()

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
            self._enter_locked()
            v = self._version(snap)
            if v == self._merging:
                raise MergeInProgress(f"snapshot {snap.name} is being merged into the origin")
            need = -1
            out: list[int] = []
            moved = False
            for c in range(first, last + 1):
                sc, unique = self.store.snapshot_exception(v, c)
                if unique and sc is not None:  # (unique means its own store chunk)
                    # Unique maybe only by a change not yet durable (its own unshare, a
                    # snapshot taken of it unsharing, or another reader of an ancestor's
                    # exception leaving it): data written there before that commits is
                    # lost to a crash.
                    for a in [v] + self._ancestors_locked(v):
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
                        if not self._can_make_room_locked(exclude=v):
                            raise
                        self._make_room_locked(exclude=v)
                        sc, unique = self.store.snapshot_exception(v, c)
                dests = [new] if kept is None else [new, kept]
                # (a failed copy gives the chunks back itself)
                if sc is None:
                    self._copy_locked([(c, d) for d in dests], self.origin)
                else:
                    self._copy_locked([(sc, d) for d in dests], self.store.cow)
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
                for a in [v] + self._ancestors_locked(v):
                    self._pending[(a, c)] = self.epoch
                need = self.epoch
                out.append(new)
                moved = True
                self._bound_batch_locked()
        if moved:
            # Nodes may keep the old mapping of these chunks (the origin, or an
            # exception shared with other snapshots): dropped before this write is done.
            self._revoke_read_mappings()
        self.wait_durable(need)
        return out
