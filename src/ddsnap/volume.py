"""Volumes: the origin and the snapshots as byte-addressed block devices.

A volume splits a byte range into chunks, asks the metadata service
(:class:`~ddsnap.service.api.MetadataService`) for the mapping (and, for writes, for the
chunks to be made unique), and does the data I/O itself on its :class:`DataDevices`
(seed 000: data never passes through the metadata server).  Volumes are what the NBD
server exports (they satisfy ``ddsnap.nbd.backend.ExportBackend``).  Every method may
block on disk and the server calls them from worker threads, except
``read_into_nowait``, which never waits for the disk and is tried on the event loop.

Offsets and lengths are bytes; a range is ``[offset, offset + length)`` and must lie in
``[0, size)``.

What BLOCK_STATUS reports (issue 13; NBD ``doc/proto.md``, "Metadata querying"):
``base:allocation`` (:meth:`Volume.block_status`) and ``ddsnap:changed:FROM``
(:meth:`Volume.changed_status`), each for a bounded prefix of the range asked, so one
request costs about the same on a 1 TiB volume as on a small one.  TRIM on the origin
(:meth:`Origin.trim`) punches the origin file where that changes no snapshot.
"""

from __future__ import annotations

from .errors import InvalidArgument, ReadOnlyVolume, SnapshotNotFound
from .service.api import DataDevices, MetadataService, ReadMap, SnapshotInfo

#: WRITE_ZEROES is done as writes of this many bytes at a time
ZERO_STEP = 1 << 20

# BLOCK_STATUS flags, as the NBD spec numbers them (``ddsnap.nbd.wire`` names them; the
# layers keep the data path from importing the NBD package):
#: ``base:allocation``: NBD_STATE_HOLE | NBD_STATE_ZERO, a hole of the origin file
HOLE_ZERO = 1 | 2
#: ``ddsnap:changed:FROM``: the extent may differ from FROM (``wire.STATE_CHANGED``)
CHANGED = 1

#: bytes of a snapshot (or of the origin during a merge) one ``base:allocation`` answer
#: maps at most (rounded to whole chunks, at least one): a mapping per chunk is asked
#: for, so the answer covers a prefix of a longer request (32 MiB, the longest READ)
STATUS_SPAN = 32 << 20
#: runs of the origin file's holes and data one ``base:allocation`` answer reports at
#: most (two ``lseek`` each)
STATUS_RUNS = 1024
#: tree entries per version one ``ddsnap:changed`` answer reads at most
#: (``MetadataService.changed_chunks``'s ``limit``)
CHANGED_PAGE = 4096
#: bytes of origin one TRIM step makes unique and punches (a TRIM may cover the volume)
TRIM_STEP = 32 << 20
#: TRIM punches whole blocks of this many bytes only (the file system's block; a partial
#: block at either end of the range is left as it is: TRIM is a hint)
PUNCH_BLOCK = 4096


class Volume:
    """Common range handling for :class:`Origin` and :class:`Snapshot`."""

    name: str
    read_only: bool = False
    #: the snapshot read, None for the origin
    info: SnapshotInfo | None = None

    def __init__(self, service: MetadataService, data: DataDevices):
        self.service = service
        self.data = data
        self.chunk_size = service.chunk_size
        #: bytes; fixed for the volume's life (a resize shows in volumes opened after it)
        self.size = service.origin_size

    def read(self, offset: int, length: int) -> bytes:
        """Return the ``length`` bytes at ``offset``."""
        buf = bytearray(length)
        self.read_into(offset, memoryview(buf))
        return bytes(buf)

    def read_into(self, offset: int, view) -> None:
        """Fill the writable buffer ``view`` with the bytes at ``offset`` (may block):
        each chunk from where :meth:`_map_read` says, the read locks released after."""
        if not len(view):
            return
        first, last = self._range(offset, len(view))
        rmap = self._map_read(first, last)
        if rmap is None:
            self.data.origin.preadinto(view, offset)
            return
        try:
            self._read_runs(rmap.first, rmap.sources, offset, view)
        finally:
            self.service.release_read(rmap)

    def read_into_nowait(self, offset: int, view) -> bool:
        """Fill ``view`` as :meth:`read_into` does if no disk or lock wait is needed
        (page-cache reads with ``RWF_NOWAIT``); False means "use :meth:`read_into`"."""
        raise NotImplementedError

    def _read_runs(self, first: int, sources: list[int | None], offset: int, view,
                   nowait: bool = False) -> bool:
        """Fill ``view`` with volume bytes ``[offset, offset + len(view))`` mapped as
        ``sources`` says (per logical chunk from ``first``: a store chunk, or None for
        the origin).

        Runs of chunks contiguous on one device are read with one I/O.  With ``nowait``
        only what needs no disk wait is read (``BlockDevice.preadinto_nowait``) and
        False is returned as soon as a run would block; otherwise True.
        """
        cs = self.chunk_size
        end = offset + len(view)
        n = len(sources)
        i = 0
        while i < n:
            src = sources[i]
            j = i + 1
            if src is None:
                while j < n and sources[j] is None:
                    j += 1
                dev = self.data.origin
            else:
                while j < n and sources[j] == src + (j - i):
                    j += 1
                dev = self.data.cow
            lo = max(offset, (first + i) * cs)
            hi = min(end, (first + j) * cs)
            at = lo if src is None else src * cs + lo - (first + i) * cs
            part = view[lo - offset: hi - offset]
            if nowait:
                if not dev.preadinto_nowait(part, at):
                    return False
            else:
                dev.preadinto(part, at)
            i = j
        return True

    def _map_read(self, first: int, last: int) -> ReadMap | None:
        """The :class:`ReadMap` of chunks ``first..last``, or None: all from the origin."""
        raise NotImplementedError

    def _range(self, offset: int, length: int) -> tuple[int, int]:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise InvalidArgument(f"range {offset}+{length} is outside the {self.size}-byte volume")
        cs = self.chunk_size
        return offset // cs, (offset + length - 1) // cs

    def write_zeroes(self, offset: int, length: int, fua: bool = False,
                     no_hole: bool = False) -> None:
        """Write zeroes over the range (through the copy-on-write path)."""
        end = offset + length
        while offset < end:
            n = min(ZERO_STEP, end - offset)
            self.write(offset, bytes(n), fua=False)
            offset += n
        if fua:
            self.flush()

    def write(self, offset: int, data: bytes, fua: bool = False) -> None:
        """Write ``data`` at ``offset`` (each kind of volume its own way)."""
        raise NotImplementedError

    def flush(self) -> None:
        """Make the writes completed so far durable."""
        raise NotImplementedError

    def trim(self, offset: int, length: int, fua: bool = False) -> None:
        """A discard hint, ignored: a snapshot's data is kept (its chunks may be shared
        with other snapshots).  :class:`Origin` punches its file instead.

        Raises:
            InvalidArgument: the range is not inside the volume.
        """
        self._range(offset, length)

    @property
    def version(self) -> int:
        """The version id this volume reads: 0 for the origin, else the snapshot's id."""
        return 0 if self.info is None else self.info.id

    def block_status(self, offset: int, length: int) -> list[tuple[int, int]]:
        """``base:allocation`` of ``[offset, offset + length)``: ``(length_bytes,
        flags)`` extents covering a prefix of the range (at least its first byte), flags
        ``HOLE_ZERO`` (NBD_STATE_HOLE | NBD_STATE_ZERO) or 0 (data).

        A chunk this volume reads from the origin device (no exception on its way)
        takes its allocation from the origin file's holes (``SEEK_DATA``/``SEEK_HOLE``);
        a chunk it reads from the store is data, whatever bytes it holds (a copy-out of a
        hole is data in the store).  An origin that is a block device: all data.  Source:
        issue 13; NBD ``doc/proto.md`` "base:allocation".

        Raises:
            InvalidArgument: the range is not inside the volume.
            SnapshotNotFound: a snapshot deleted while exported.
            OSError: the host failed an ``lseek``.
        """
        raise NotImplementedError

    def _mapped_status(self, rmap: ReadMap, offset: int, length: int
                       ) -> list[tuple[int, int]]:
        """``base:allocation`` of ``[offset, offset + length)`` read as ``rmap`` maps it
        (its origin chunks read-locked meanwhile, so no origin write or TRIM changes the
        file under the answer): store chunks are data, runs of origin chunks the origin
        file's holes.  Stops early (a prefix) when the file's runs exceed
        :data:`STATUS_RUNS`."""
        cs = self.chunk_size
        end = offset + length
        first, sources = rmap.first, rmap.sources
        out: list[tuple[int, int]] = []
        budget = STATUS_RUNS
        i, n = 0, len(sources)
        while i < n and budget > 0:
            from_origin = sources[i] is None
            j = i + 1
            while j < n and (sources[j] is None) == from_origin:
                j += 1
            lo = max(offset, (first + i) * cs)
            hi = min(end, (first + j) * cs)
            if not from_origin:
                out.append((hi - lo, 0))
            else:
                runs = self.data.origin.allocation(lo, hi - lo, budget)
                budget -= len(runs)
                out += [(n_, HOLE_ZERO if hole else 0) for n_, hole in runs]
                if sum(n_ for n_, _ in runs) < hi - lo:
                    break  # the runs ran out: answer the prefix
            i = j
        return out

    def _status_span(self, offset: int, length: int) -> int:
        """``length`` cut so that ``[offset, offset + length)`` ends within
        :data:`STATUS_SPAN` bytes (whole chunks, at least one) of the chunk holding
        ``offset``."""
        cs = self.chunk_size
        span = max(1, STATUS_SPAN // cs) * cs
        return min(length, (offset // cs) * cs + span - offset)

    def changed_base(self, name: str) -> SnapshotInfo | None:
        """The live snapshot ``name`` as the base FROM of the ``ddsnap:changed:FROM``
        context (looked up when a client selects it, and kept: a snapshot created later
        under the same name is another snapshot), or None if there is none.  Never
        waits (the service's snapshot list), so it may be called on the event loop."""
        return next((s for s in self.service.snapshots() if s.name == name), None)

    def changed_status(self, base: SnapshotInfo, offset: int, length: int
                       ) -> list[tuple[int, int]]:
        """``ddsnap:changed:FROM`` of ``[offset, offset + length)``, FROM being ``base``
        (from :meth:`changed_base`): ``(length_bytes, flags)`` extents covering a prefix
        of the range (at least its first chunk), flags ``CHANGED`` (1: this chunk may
        read differently here than in FROM) or 0 (it reads the same).  Whole chunks,
        clipped to the range asked.

        From ``MetadataService.changed_chunks``: one page of at most
        :data:`CHANGED_PAGE` tree entries per version, so the cost follows the tree,
        not the range; a long unchanged stretch is one extent.  Chunks past the smaller
        of the two sizes are changed (as ``ddsnap diff`` reports them).  FROM deleted
        since it was selected (or no longer known to the metadata server): every byte is
        reported changed, the one answer that is still true (the spec lets a context
        answer one extent over the request instead of an error).  Source: issue 13.

        Raises:
            InvalidArgument: the range is not inside the volume.
            SnapshotNotFound: this volume's own snapshot was deleted.
            CorruptMetadata: a damaged tree block on the way.
        """
        self._range(offset, length)
        svc = self.service
        if not any(s.id == base.id for s in svc.snapshots()):
            return [(length, CHANGED)]
        cs = self.chunk_size
        # the chunks both versions have whole (of two sizes, the partial last chunk of
        # the smaller one differs: the bigger has data past it), as admin.diff counts
        common = -(-self.size // cs) if self.size == base.size else min(self.size,
                                                                         base.size) // cs
        end = offset + length
        first = offset // cs
        if first >= common:
            return [(length, CHANGED)]
        try:
            chunks, nxt = svc.changed_chunks(base.id, self.version, first, CHANGED_PAGE)
        except SnapshotNotFound:
            if self.info is not None and not any(s.id == self.info.id
                                                 for s in svc.snapshots()):
                raise
            return [(length, CHANGED)]  # FROM went meanwhile
        # known up to chunk ``known`` (exclusive): the page's end, or all of ``common``
        known = common if nxt is None else min(nxt, common)
        stop = min(end, known * cs)
        out: list[tuple[int, int]] = []
        pos = offset
        for c in chunks:
            lo, hi = max(pos, c * cs), min(stop, (c + 1) * cs)
            if lo >= hi:
                continue
            if lo > pos:
                out.append((lo - pos, 0))
            out.append((hi - lo, CHANGED))
            pos = hi
        if pos < stop:
            out.append((stop - pos, 0))
            pos = stop
        if nxt is None and pos < end:
            out.append((end - pos, CHANGED))  # past the smaller size
        return out

    def open(self) -> None:
        self.service.export_open(self.name)

    def close(self) -> None:
        self.service.export_close(self.name)


class Origin(Volume):
    """The live volume.  Writes copy out shared chunks first (seed 000 origin writes)."""

    name = "origin"

    def _map_read(self, first: int, last: int) -> ReadMap | None:
        # While a merge runs, chunks not merged yet come from the merging snapshot's
        # exceptions (the origin already shows its content); otherwise no map at all.
        return self.service.map_origin_read(first, last)

    def read_into_nowait(self, offset: int, view) -> bool:
        # Outside a merge the origin is its device: no mapping, no lock.
        n = len(view)
        if not n:
            return True
        self._range(offset, n)
        if not self.service.origin_reads_itself():
            return False
        return self.data.origin.preadinto_nowait(view, offset)

    def block_status(self, offset: int, length: int) -> list[tuple[int, int]]:
        # The origin file's holes; during a merge, chunks not merged yet read the
        # merging snapshot's data from the store (data), and the answer is bounded as a
        # snapshot's is (a mapping per chunk).
        self._range(offset, length)
        dev = self.data.origin
        if not dev.sparse:
            return [(length, 0)]
        svc = self.service
        if not svc.origin_reads_itself():
            length = self._status_span(offset, length)
            first, last = self._range(offset, length)
            rmap = svc.map_origin_read(first, last)
            if rmap is not None:
                try:
                    return self._mapped_status(rmap, offset, length)
                finally:
                    svc.release_read(rmap)
        return [(n, HOLE_ZERO if hole else 0)
                for n, hole in dev.allocation(offset, length, STATUS_RUNS)]

    def trim(self, offset: int, length: int, fua: bool = False) -> None:
        """TRIM: punch the origin file over the whole :data:`PUNCH_BLOCK` blocks of
        ``[offset, offset + length)`` (a partial block at either end is left as it is),
        so the range reads as zeroes and its space goes back to the host; with ``fua``
        durable before this returns.

        Snapshots never see it: each step of :data:`TRIM_STEP` bytes is prepared as an
        origin write is (``prepare_origin_write``: chunks a snapshot still reads are
        copied out first, durably; readers of the chunks are waited for; during a merge
        the chunks are merged first), then punched, then finished.  Chunks no snapshot
        reads are punched without a copy.  So a TRIM over chunks snapshots share costs
        store space as a write does (StoreFull, or ``full-policy=delete-oldest``, as for
        a write).  An origin that is a block device: nothing (a hint; ddsnap does not
        pass discards to devices).  Source: issue 13; NBD ``doc/proto.md`` "NBD_CMD_TRIM".

        Raises:
            InvalidArgument: the range is not inside the volume.
            StoreFull, HostIOError, ServiceFailed: as ``prepare_origin_write``.
            OSError: EIO if the origin file shrank; the host failed the punch.
        """
        self._range(offset, length)
        dev = self.data.origin
        if not dev.sparse:
            return
        end = offset + length
        start = -(-offset // PUNCH_BLOCK) * PUNCH_BLOCK
        # the end of the volume ends a whole block of the file however it is aligned
        stop = end if end == self.size else end - end % PUNCH_BLOCK
        svc = self.service
        pos = start
        while pos < stop:
            n = min(stop - pos, TRIM_STEP - pos % TRIM_STEP)
            first, last = self._range(pos, n)
            dev.check_size()  # as in write(): a shrunk file would grow back with holes
            svc.prepare_origin_write(first, last)
            try:
                dev.discard(pos, n)
            finally:
                svc.finish_origin_write()
            pos += n
        if fua and start < stop:
            dev.flush()

    def write(self, offset: int, data: bytes, fua: bool = False) -> None:
        """Write ``data`` at ``offset``; copy-outs are durable before the origin changes."""
        if not data:
            return
        first, last = self._range(offset, len(data))
        # A shrunk origin file would grow again with a hole that snapshots then read as
        # zeroes: such writes fail (EIO) instead.  One fstat per write or batch.
        self.data.origin.check_size()
        self.service.prepare_origin_write(first, last)
        try:
            self.data.origin.pwrite(data, offset)
        finally:
            self.service.finish_origin_write()
        if fua:
            self.data.origin.flush()

    def write_nowait(self, offset: int, data: bytes) -> bool:
        """Write ``data`` at ``offset`` if its chunks are known unique without asking
        (:meth:`MetadataService.prepare_origin_write_nowait`: a grant) and the origin
        takes it into the page cache (``BlockDevice.pwrite_cached``); False, with
        nothing written, means "use :meth:`write`".  Never waits for a lock or the
        metadata server; called on the NBD event loop for the common overwrite."""
        n = len(data)
        if not n:
            return False
        first, last = self._range(offset, n)
        svc = self.service
        if not svc.prepare_origin_write_nowait(first, last):
            return False
        try:
            self.data.origin.check_size()  # as in write()
            return self.data.origin.pwrite_cached(data, offset)
        finally:
            svc.finish_origin_write()

    def write_many(self, writes: list[tuple[int, bytes, bool]]) -> list[BaseException | None]:
        """Several writes ``(offset, data, fua)`` at once, as :meth:`write` each: their
        copy-outs share one lock hold and one commit
        (:meth:`MetadataService.prepare_origin_writes`).  Returns per write None or the
        exception it failed with; the others are not affected by it."""
        results: list[BaseException | None] = [None] * len(writes)
        try:
            self.data.origin.check_size()  # as in write()
        except OSError as e:
            return [e] * len(writes)
        todo, ranges = [], []
        for i, (offset, data, _fua) in enumerate(writes):
            if not data:
                continue
            try:
                ranges.append(self._range(offset, len(data)))
                todo.append(i)
            except Exception as e:
                results[i] = e
        prepared = self.service.prepare_origin_writes(ranges) if ranges else []
        fua = False
        for i, outcome in zip(todo, prepared, strict=False):  # prepared may stop short
            if outcome is not None:
                results[i] = outcome
                continue
            offset, data, f = writes[i]
            try:
                self.data.origin.pwrite(data, offset)
                fua = fua or f
            except Exception as e:
                results[i] = e
            finally:
                self.service.finish_origin_write()
        for i in todo[len(prepared):]:  # not started (a snapshot creation came first)
            offset, data, f = writes[i]
            try:
                self.write(offset, data, fua=f)
            except Exception as e:
                results[i] = e
        if fua:
            try:
                self.data.origin.flush()
            except Exception as e:
                for i, (_o, _d, f) in enumerate(writes):
                    if f and results[i] is None:
                        results[i] = e
        return results

    def flush(self) -> None:
        """Origin data durable (the metadata it depends on was committed before it)."""
        self.data.origin.flush()


class Snapshot(Volume):
    """One snapshot: reads come from its exceptions or, where it has none, the origin."""

    info: SnapshotInfo

    def __init__(self, service: MetadataService, data: DataDevices, info: SnapshotInfo):
        super().__init__(service, data)
        self.info = info
        self.size = info.size  # as the origin was when it was taken (resize keeps it)
        self.name = info.name
        self.read_only = info.read_only

    def read_into_nowait(self, offset: int, view) -> bool:
        # The mapping from the service (``map_snapshot_read_nowait``), the data from the
        # page cache; the mapping holds until ``finish_snapshot_read_nowait``.
        n = len(view)
        if not n:
            return True
        first, last = self._range(offset, n)
        svc = self.service
        sources = svc.map_snapshot_read_nowait(self.info, first, last)
        if sources is None:
            return False
        try:
            if first == last:  # the common small read: one device, one call
                sc = sources[0]
                if sc is None:
                    return self.data.origin.preadinto_nowait(view, offset)
                cs = self.chunk_size
                return self.data.cow.preadinto_nowait(view, sc * cs + offset - first * cs)
            return self._read_runs(first, sources, offset, view, nowait=True)
        finally:
            svc.finish_snapshot_read_nowait()

    def _map_read(self, first: int, last: int) -> ReadMap | None:
        # Its exceptions from the store, the rest from the origin (read-locked meanwhile,
        # so no origin write overwrites it mid-read).
        return self.service.map_snapshot_read(self.info, first, last)

    def block_status(self, offset: int, length: int) -> list[tuple[int, int]]:
        # Mapped as a read is, with the origin chunks read-locked while the origin
        # file's holes are looked at: an origin write or TRIM copying a chunk out and
        # punching the file cannot make this answer say "zeroes" for old data.
        self._range(offset, length)
        if not self.data.origin.sparse:
            return [(length, 0)]
        length = self._status_span(offset, length)
        first, last = self._range(offset, length)
        rmap = self.service.map_snapshot_read(self.info, first, last)
        try:
            return self._mapped_status(rmap, offset, length)
        finally:
            self.service.release_read(rmap)

    def write(self, offset: int, data: bytes, fua: bool = False) -> None:
        """Write into chunks made unique to this snapshot."""
        if self.read_only:
            raise ReadOnlyVolume(f"snapshot {self.name} is read-only")
        if not data:
            return
        first, last = self._range(offset, len(data))
        cs = self.chunk_size
        targets = self.service.prepare_snapshot_write(self.info, first, last)
        cow = self.data.cow
        view = memoryview(data)
        for i, sc in enumerate(targets):
            lo = max(offset, (first + i) * cs)
            hi = min(offset + len(data), (first + i + 1) * cs)
            cow.pwrite(view[lo - offset: hi - offset], sc * cs + lo - (first + i) * cs)
        if fua:
            cow.flush()

    def flush(self) -> None:
        """Data written to this snapshot durable (its mappings were committed when the
        chunks were made unique)."""
        self.data.cow.flush()
