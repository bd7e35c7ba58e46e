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
"""

from __future__ import annotations

from .errors import InvalidArgument, ReadOnlyVolume
from .service.api import DataDevices, MetadataService, ReadMap, SnapshotInfo

#: WRITE_ZEROES is done as writes of this many bytes at a time
ZERO_STEP = 1 << 20


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
        """A discard hint; ddsnap keeps the data, so no other volume can be affected."""
        self._range(offset, length)

    def block_status(self, offset: int, length: int) -> list[tuple[int, int]]:
        """Everything reads as allocated data: one extent over the range."""
        self._range(offset, length)
        return [(length, 0)]

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
