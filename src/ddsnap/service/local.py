"""The in-process metadata service: :class:`LocalService`, one implementation of the
seam :class:`~ddsnap.service.api.MetadataService`.

In seed 000 the data never passes through the metadata server.  A node asks the server to
make origin chunks unique (the server copies out, commits, and answers once no snapshot
reader holds those chunks), then writes the origin itself; for a snapshot read it gets
"read these from the origin (read-locked)" and "read these store chunks", reads them
itself and releases the locks.  Here the server runs in the volumes' own process, on the
store object it was given; the volumes do their data I/O on :attr:`LocalService.data`.

The concerns live in their own modules (``core``: state, commit, barrier, allocation;
``writes``; ``reads``; ``policy``; ``merge``); this class adds snapshot creation and
deletion, resizing and the administrative questions.
"""


from __future__ import annotations

import contextlib
import logging

from ..errors import (
    CorruptMetadata,
    InvalidArgument,
    MergeInProgress,
    ServiceFailed,
    ShrinkRefused,
    SnapshotBusy,
    host_error,
)
from ..store.model import Finding, SnapshotInfo
from ..stream import make_token
from ..units import human_bytes
from .api import ServiceStatistics, StoreStatus
from .core import COPY_CHUNKS
from .merge import MergeOps
from .policy import FullPolicy
from .reads import ReadMapping
from .writes import WritePath

log = logging.getLogger("ddsnap.service")


class LocalService(WritePath, ReadMapping, MergeOps, FullPolicy):
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
            self._enter_locked()
            if self._merging is not None:
                raise MergeInProgress("cannot take a snapshot while a snapshot is being "
                                      "merged into the origin")
            if parent is not None:
                pv = self.store.snapshot(parent).id
                # Completed writes to the parent are in the store: durable first, so a
                # crash cannot change what the new snapshot reads (invariant 1).
                self._flush_store()
                info = self.store.create_snapshot(name, read_only, parent=pv)
                self._refresh_snaps_locked()
                e = self.epoch
            else:
                with self._origin_writes_held_locked():
                    # Completed origin writes are part of the snapshot: make them durable
                    # so a crash cannot change what the snapshot reads (invariant 1).
                    self._flush_origin()
                    info = self.store.create_snapshot(name, read_only)
                    self._refresh_snaps_locked()
                    e = self.epoch
        self.wait_durable(e)
        # Every node knows the snapshot before this returns (a client may connect to
        # its export on any of them next).
        self._notify({"event": "snapshot-created", "snapshot": info.to_wire()},
                     wait=True)
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
            self._enter_locked()
            info = self.store.snapshot(name)
            if info.id == self._merging:
                raise MergeInProgress(f"snapshot {name} is being merged into the origin")
            if self._opens[name]:
                raise SnapshotBusy(f"snapshot {name} is in use by {self._opens[name]} "
                                   "connection(s)")
            self.store.begin_delete(name)
            self._refresh_snaps_locked()
        self.commit()
        # Acknowledged: nodes drop the snapshot's read mappings they keep before the
        # sweep frees its chunks for reuse.
        self._notify({"event": "snapshot-deleted", "snapshot": info.id}, wait=True)
        self._sweep()
        return info

    def resize_origin(self, size: int, exact: bool = False) -> dict:
        """Grow or shrink the origin to ``size`` bytes, online (``lvextend``/``lvreduce``
        of the origin; docs/format.md "Resizing").  ``exact``: any positive size, not
        only whole sectors (``receive`` gives the origin the sent volume's size).

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
        if size <= 0 or (size % 512 and not exact):
            raise InvalidArgument(f"the origin size must be a positive multiple of 512 "
                                  f"bytes, not {size}")
        with self.lock:
            self._enter_locked()
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
                with self._origin_writes_held_locked():
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
        if size != old:
            # Every node knows the size before this returns (new connections on any of
            # them show it).
            self._notify({"event": "origin-resized", "size": size}, wait=True)
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
            self._enter_locked()
            old = self.store.space()["chunks_total"]
            old_size = self.store.store_size
            with self._origin_writes_held_locked():
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

    def snapshot_space(self) -> dict[int, tuple[int, int]]:
        """Space each live snapshot uses: ``{id: (exclusive, shared)}``, in chunks
        (``ExceptionStore.snapshot_space``).

        Raises:
            CorruptMetadata: the figures could not be counted (a damaged tree block).
        """
        with self.lock:
            return self.store.snapshot_space()

    def changed_chunks(self, a: int, b: int, start: int = 0, limit: int = 4096
                       ) -> tuple[list[int], int | None]:
        """Chunks ``>= start`` whose data may differ between versions ``a`` and ``b``
        (0: the origin), at most about ``limit`` entries of the tree visited, and where
        to go on (None: done): ``ExceptionStore.changed_chunks``, under the metadata
        lock (a page is consistent; pages are not with each other while writes go on).

        Raises:
            SnapshotNotFound: ``a`` or ``b`` is not the origin nor a live snapshot now
                (checked under the lock: a version deleted since the caller looked
                has no answer, rather than a wrong one).
            CorruptMetadata: a damaged tree block on the way.
        """
        with self.lock:
            for v in (a, b):
                if v != 0:
                    self.snapshot_by_id(v)
            return self.store.changed_chunks(a, b, start, limit)

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
                reopens=self.reopens, receive=receive_status(store),
                **store.format_figures())

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
            self._enter_locked()
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

    def adopt_locks(self, read_chunks: list[int], origin_writes: int) -> None:
        """Take over locks a node held with a server that is gone (seed 000
        ``UPLOAD_LOCK``): one read lock per entry of ``read_chunks`` (logical chunks;
        a chunk listed twice is locked twice), and ``origin_writes`` origin writes in
        flight (prepared before the restart, each ended by :meth:`finish_origin_write`)."""
        with self.lock:
            for c in read_chunks:
                self._readlocks[c] += 1
            self._origin_writes += origin_writes

    def export_open(self, name: str) -> None:
        with self.lock:
            self._opens[name] += 1

    def export_close(self, name: str) -> None:
        with self.lock:
            self._opens[name] -= 1
            if self._opens[name] <= 0:
                del self._opens[name]

    def close(self) -> None:
        """Commit and close the store (marks it cleanly shut down)."""
        with self.lock:
            failed = self._failed
        if failed is None:
            self._flush_origin()
            self.commit()
            with self.lock:
                self.store.close()


__all__ = ["COPY_CHUNKS", "LocalService"]


def receive_status(store) -> dict | None:
    """The receive in progress on ``store`` for ``status`` (issue 13): the snapshot it
    creates, the source store's UUID, the base's id there (0: a full stream), bytes
    applied of the volume's size, and the resume token; None if none."""
    r, _done = store.receive_state()
    if r is None:
        return None
    return {"snapshot": r.name, "source": r.source.hex(), "base": r.base,
            "applied": r.offset, "size": r.size,
            "token": make_token(r.source, r.snapshot, r.base, r.offset)}
