"""Volumes: the origin and the snapshots as byte-addressed block devices.

A volume splits a byte range into chunks, asks the :class:`MetadataService` for the
mapping (and, for writes, for the chunks to be made unique), and does the data I/O itself
(seed 000: data never passes through the metadata server).  Volumes are what the NBD
server exports (they satisfy ``ddsnap.nbd.backend.ExportBackend``).  Every method may
block on disk; the server calls them from worker threads.

Offsets and lengths are bytes; a range is ``[offset, offset + length)`` and must lie in
``[0, size)``.
"""

from __future__ import annotations

from .errors import InvalidArgument, ReadOnlyVolume
from .store.api import SnapshotInfo
from .store.service import MetadataService

#: WRITE_ZEROES is done as writes of this many bytes at a time
ZERO_STEP = 1 << 20


class Volume:
    """Common range handling for :class:`Origin` and :class:`Snapshot`."""

    name: str
    read_only: bool = False

    def __init__(self, service: MetadataService):
        self.service = service
        self.chunk_size = service.chunk_size
        self.size = service.store.origin_size

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

    def read(self, offset: int, length: int) -> bytes:
        """Read the origin; while a merge runs, chunks not merged yet come from the
        merging snapshot's exceptions (the origin already shows its content)."""
        if not length:
            return b""
        first, last = self._range(offset, length)
        rmap = self.service.map_origin_read(first, last)
        if rmap is None:
            return self.service.origin.pread(length, offset)
        try:
            return read_mapped(self.service, rmap, offset, length)
        finally:
            self.service.release_read(rmap)

    def write(self, offset: int, data: bytes, fua: bool = False) -> None:
        """Write ``data`` at ``offset``; copy-outs are durable before the origin changes."""
        if not data:
            return
        first, last = self._range(offset, len(data))
        self.service.prepare_origin_write(first, last)
        try:
            self.service.origin.pwrite(data, offset)
        finally:
            self.service.finish_origin_write()
        if fua:
            self.service.origin.flush()

    def flush(self) -> None:
        """Origin data durable (the metadata it depends on was committed before it)."""
        self.service.origin.flush()


class Snapshot(Volume):
    """One snapshot: reads come from its exceptions or, where it has none, the origin."""

    def __init__(self, service: MetadataService, info: SnapshotInfo):
        super().__init__(service)
        self.info = info
        self.name = info.name
        self.read_only = info.read_only

    def read(self, offset: int, length: int) -> bytes:
        if not length:
            return b""
        first, last = self._range(offset, length)
        cs = self.chunk_size
        rmap = self.service.map_snapshot_read(self.info, first, last)
        try:
            return read_mapped(self.service, rmap, offset, length)
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
        cow = self.service.store.cow
        view = memoryview(data)
        for i, sc in enumerate(targets):
            lo = max(offset, (first + i) * cs)
            hi = min(offset + len(data), (first + i + 1) * cs)
            cow.pwrite(view[lo - offset: hi - offset], sc * cs + lo - (first + i) * cs)
        if fua:
            cow.flush()

    def flush(self) -> None:
        self.service.flush_store()


def read_mapped(service: MetadataService, rmap, offset: int, length: int) -> bytes:
    """Read ``[offset, offset+length)`` as ``rmap`` says: each chunk from the origin
    (source None) or from its store chunk; runs contiguous on one device are read in one
    I/O."""
    cs = service.chunk_size
    first = rmap.first
    out = bytearray(length)
    i = 0
    n = len(rmap.sources)
    while i < n:
        src = rmap.sources[i]
        j = i + 1
        while j < n and ((src is None and rmap.sources[j] is None) or
                         (src is not None and rmap.sources[j] == src + (j - i))):
            j += 1
        lo = max(offset, (first + i) * cs)
        hi = min(offset + length, (first + j) * cs)
        if src is None:
            data = service.origin.pread(hi - lo, lo)
        else:
            data = service.store.cow.pread(hi - lo, src * cs + lo - (first + i) * cs)
        out[lo - offset: hi - offset] = data
        i = j
    return bytes(out)
