"""Send and receive: a snapshot as a stream, whole or as what changed since a base
(issue 13; the stream format is :mod:`ddsnap.stream`, docs/stream.md).

``send`` reads a snapshot of a store (through its :class:`LocalService`) and writes its
stream: every chunk for a full stream (zero runs as ZERO records), or for ``--from BASE``
only the chunks ``changed_chunks`` reports between the base and the snapshot (cost
follows the tree, not the volume).  ``receive`` applies a stream to the *origin* of
another store through the copy-on-write path (so its earlier snapshots keep their data),
then snapshots the origin with the stream's snapshot name: after it, the receiving
store's origin and new snapshot hold the sent snapshot byte for byte, and the next
incremental stream applies on top.  This is ZFS's ``send``/``receive -s`` for a store
of snapshots of one origin.

Restartable: the receive in progress (source store, snapshot, base, bytes applied) is
recorded in the receiving store (:meth:`ExceptionStore.record_receive`) every
:data:`SAVE_EVERY` bytes, after the origin data before it is durable, so a receive that
dies (a cut stream, a damaged record, ``kill -9``) resumes from there
(``receive --resume TOKEN``), re-applying at most what came after the last record.
"""

from __future__ import annotations

import errno
import os
import stat
import time
from collections.abc import Callable
from typing import BinaryIO

from .errors import InvalidArgument, ReceiveRefused, SnapshotNotFound, StreamDamaged
from .service.local import LocalService
from .store.model import Received, Receiving, SnapshotInfo, utc_iso
from .stream import DATA, RECORD_MAX, StreamReader, StreamWriter, make_token, parse_token
from .volume import Origin, Snapshot

#: bytes applied between two records of a receive's progress in the store
SAVE_EVERY = 64 << 20
#: ... or seconds, whichever comes first
SAVE_SECONDS = 5.0

Progress = Callable[[int], None]


def _incremental_ranges(svc: LocalService, base: SnapshotInfo, snap: SnapshotInfo,
                        start: int):
    """``(offset, length)`` byte ranges of ``snap`` that may differ from ``base`` and end
    past ``start``, ascending, each at most :data:`RECORD_MAX` bytes and within whole
    chunks (the last clipped to the volume size), page by page."""
    cs = svc.chunk_size
    size = snap.size
    first_chunk = start // cs
    per = max(1, RECORD_MAX // cs)
    nxt: int | None = first_chunk
    run: list[int] | None = None  # [first, last] chunks

    def pieces(r):
        c = r[0]
        while c <= r[1]:
            last = min(r[1], c + per - 1)
            off = max(c * cs, start)
            end = min((last + 1) * cs, size)
            if end > off:
                yield off, end - off
            c = last + 1

    # Chunks past the base's end (the origin grew between them) are new in full: one
    # run from there to the end, after the changed chunks before it.
    tail = -(-base.size // cs)
    end_chunk = -(-size // cs) - 1
    while nxt is not None:
        chunks, nxt = svc.changed_chunks(base.id, snap.id, nxt, 4096)
        for c in chunks:
            if c >= tail:
                nxt = None
                break
            if run is not None and c == run[1] + 1:
                run[1] = c
                continue
            if run is not None:
                yield from pieces(run)
            run = [c, c]
    if size > base.size and end_chunk >= max(tail, first_chunk):
        lo = max(tail, first_chunk)
        if run is not None and run[1] == lo - 1:
            run[1] = end_chunk
        else:
            if run is not None:
                yield from pieces(run)
            run = [lo, end_chunk]
    if run is not None:
        yield from pieces(run)


def send(svc: LocalService, snap_name: str, out: BinaryIO, base_name: str | None = None,
         token: str | None = None, progress: Progress | None = None) -> dict:
    """Write the stream of snapshot ``snap_name`` (of ``base_name``'s changes to it, if
    given) to ``out``; from where ``token`` (a receive's resume token) says, if given.

    Returns the summary: snapshot, base, ``bytes`` of stream written, ``records``,
    ``data_bytes``, ``zero_bytes``, ``start`` and the ``sha256`` digest.

    Raises:
        SnapshotNotFound: no live snapshot of that name (or base).
        InvalidArgument: the base is the snapshot itself, is not older than it, or the
            token is not one of this snapshot's streams.
    """
    snap = svc.snapshot(snap_name)
    base = svc.snapshot(base_name) if base_name is not None else None
    if base is not None and base.id >= snap.id:
        raise InvalidArgument(f"--from {base.name!r} must be a snapshot taken before "
                              f"{snap.name!r}")
    uuid = svc.store.uuid
    start = 0
    if token is not None:
        source, sid, bid, start = parse_token(token)
        if (source, sid, bid) != (uuid, snap.id, base.id if base else 0):
            raise InvalidArgument("the resume token is for another stream (store, "
                                  "snapshot or base differ): send what the receiving "
                                  "store's status names")
    cs = svc.chunk_size
    start -= start % cs
    header = {
        "format": "ddsnap-stream", "version": 1, "source": uuid.hex(),
        "snapshot": {"id": snap.id, "name": snap.name, "size": snap.size,
                     "created": snap.created, "read_only": snap.read_only},
        "base": (None if base is None else
                 {"id": base.id, "name": base.name, "size": base.size}),
        "chunk_size": cs, "start": start, "sent": utc_iso(time.time_ns()),
    }
    vol = Snapshot(svc, svc.data, snap)
    w = StreamWriter(out, header)
    if base is None:
        ranges = ((o, min(RECORD_MAX, snap.size - o))
                  for o in range(start, snap.size, max(RECORD_MAX, cs)))
    else:
        ranges = _incremental_ranges(svc, base, snap, start)
    buf = bytearray(max(RECORD_MAX, cs))
    zero = bytes(len(buf))
    pending_zero: list[int] | None = None  # [offset, length] of a ZERO run not yet sent
    view = memoryview(buf)
    for off, n in ranges:
        vol.read_into(off, view[:n])
        # Each chunk that reads as zeroes joins a ZERO run (a sparse volume sends little),
        # the others DATA runs.  (bytearray == bytes is a memcmp; a memoryview compares
        # item by item, 60 times slower.)
        if buf == zero if n == len(buf) else buf[:n] == zero[:n]:
            bounds = [(0, n, True)]
        else:
            bounds = []
            i = 0
            while i < n:
                j = min(n, i + cs - (off + i) % cs)
                bounds.append((i, j, buf[i:j] == zero[:j - i]))
                i = j
        data_from: int | None = None
        for i, j, is_zero in bounds:
            if not is_zero:
                if pending_zero is not None:
                    w.zero(*pending_zero)
                    pending_zero = None
                if data_from is None:
                    data_from = i
                continue
            if data_from is not None:
                w.data(off + data_from, view[data_from:i])
                data_from = None
            if pending_zero is not None and sum(pending_zero) == off + i:
                pending_zero[1] += j - i
            else:
                if pending_zero is not None:
                    w.zero(*pending_zero)
                pending_zero = [off + i, j - i]
        if data_from is not None:
            w.data(off + data_from, view[data_from:n])
        if progress is not None:
            progress(n)
    if pending_zero is not None:
        w.zero(*pending_zero)
    trailer = w.end()
    return {"snapshot": snap.name, "base": base.name if base else None, "start": start,
            "bytes": w.bytes_out, "records": trailer["records"],
            "data_bytes": trailer["data_bytes"], "zero_bytes": trailer["zero_bytes"],
            "sha256": trailer["sha256"]}


def _origin_moved(svc: LocalService, base: SnapshotInfo) -> bool:
    """True if the origin reads differently from ``base`` somewhere (written since).

    The metadata lists the chunks that may differ (``changed_chunks``); a rollback
    (a merge of ``base`` with keep) leaves the same bytes in both, so the bytes of those
    chunks are compared: the cost follows what was written, not the volume."""
    if svc.origin_size != base.size:
        return True
    cs = svc.chunk_size
    origin, snap = Origin(svc, svc.data), Snapshot(svc, svc.data, base)
    nxt: int | None = 0
    while nxt is not None:
        chunks, nxt = svc.changed_chunks(base.id, 0, nxt, 4096)
        for c in chunks:
            off = c * cs
            n = min(cs, base.size - off)
            if n > 0 and origin.read(off, n) != snap.read(off, n):
                return True
    return False


def _is_hole(fd: int | None, offset: int, length: int) -> bool:
    """True if the origin file has no data in ``[offset, offset + length)`` (a hole reads
    as zeroes: nothing to write).  False where it cannot tell (a block device)."""
    if fd is None:
        return False
    try:
        return os.lseek(fd, offset, os.SEEK_DATA) >= offset + length
    except OSError as e:
        # ENXIO: no data at or after offset; EINVAL etc.: not supported here
        return e.errno == errno.ENXIO


def receive(svc: LocalService, path: str, src: BinaryIO, token: str | None = None,
            progress: Progress | None = None) -> dict:
    """Apply the stream read from ``src`` to the store, as the module docstring says.

    Without ``token``: a full stream needs a store with no snapshot (its origin is
    resized to the volume's size); an incremental one needs the store to hold its base
    (the last stream it received was that base's, from the same store) with the origin
    as it was then.  With ``token`` (the one ``status`` prints): the receive in progress
    goes on; the stream must be the same one, starting at or before where it stopped.

    Returns the summary: ``snapshot`` (the name created), ``base``, ``source`` (UUID hex),
    ``resumed_at``, ``applied_bytes``, ``records``, ``bytes`` of stream read.

    Raises:
        StreamDamaged: the stream is damaged at a record (named); what came before it is
            applied and recorded, so the receive resumes from there.
        ReceiveRefused: the stream does not apply to this store (why is said); nothing
            changed.
        InvalidArgument: a malformed token.
    """
    store = svc.store
    reader = StreamReader(src)
    h = reader.begin()
    source = bytes.fromhex(h["source"])
    snapinfo, baseinfo = h["snapshot"], h["base"]
    sid, bid = snapinfo["id"], (baseinfo["id"] if baseinfo else 0)
    size = snapinfo["size"]
    receiving, received = store.receive_state()
    if token is not None:
        t_source, t_sid, t_bid, _t_off = parse_token(token)
        if receiving is None:
            raise ReceiveRefused(f"{path} has no receive in progress to resume")
        if (t_source, t_sid, t_bid) != (receiving.source, receiving.snapshot,
                                        receiving.base):
            raise ReceiveRefused("the token is not the receive in progress here (ddsnap "
                                 f"status {path} prints it)")
        if (source, sid, bid) != (receiving.source, receiving.snapshot, receiving.base):
            raise ReceiveRefused("the stream is not the one being received (another "
                                 "store, snapshot or base)")
        if h["start"] > receiving.offset:
            raise ReceiveRefused(f"the stream starts at byte {h['start']}, past where the "
                                 f"receive stopped ({receiving.offset}): send it with "
                                 "--resume and this store's token")
        resumed_at = receiving.offset
    else:
        if receiving is not None:
            tok = make_token(receiving.source, receiving.snapshot, receiving.base,
                             receiving.offset)
            raise ReceiveRefused(f"a receive of {receiving.name!r} is in progress on "
                                 f"{path}: resume it with --resume {tok}")
        if h["start"]:
            raise ReceiveRefused("this stream resumes another receive (it starts at byte "
                                 f"{h['start']}): give its --resume token")
        _check_applies(svc, path, h, source, received)
        receiving = Receiving(source, sid, bid, 0, size, snapinfo["name"],
                              snapinfo["created"], bool(snapinfo["read_only"]))
        store.record_receive(receiving, received)
        resumed_at = 0
    if svc.origin_size != size:
        # A full stream into an empty store, or a volume grown since the base (a smaller
        # one was refused).  After the record: a receive that dies here resumes, where
        # a grown origin without it would read as "written since the base".
        svc.resize_origin(size, exact=True)
    origin = Origin(svc, svc.data)
    fd = _origin_fd(store.origin_path)
    applied = records = 0
    done_to = receiving.offset
    saved_at, saved_time = done_to, time.monotonic()
    try:
        try:
            for rec in reader:
                n = rec.length
                records += 1
                if rec.offset + n <= receiving.offset:
                    if progress is not None:
                        progress(n)
                    continue  # applied before the receive stopped
                if rec.kind == DATA:
                    origin.write(rec.offset, rec.payload)
                elif not _is_hole(fd, rec.offset, n):
                    origin.write_zeroes(rec.offset, n)
                applied += n
                done_to = rec.offset + n
                if progress is not None:
                    progress(n)
                if (done_to - saved_at >= SAVE_EVERY
                        or time.monotonic() - saved_time >= SAVE_SECONDS):
                    origin.flush()
                    receiving = _with_offset(receiving, done_to)
                    store.record_receive(receiving, received)
                    saved_at, saved_time = done_to, time.monotonic()
        except StreamDamaged:
            # What was applied before the damaged record stays, recorded: resumable.
            origin.flush()
            store.record_receive(_with_offset(receiving, max(done_to, receiving.offset)),
                                 received)
            raise
    finally:
        if fd is not None:
            os.close(fd)
    origin.flush()
    store.record_receive(_with_offset(receiving, size), received)
    info = _finish(svc, receiving, source, sid)
    return {"snapshot": info.name, "base": baseinfo["name"] if baseinfo else None,
            "source": source.hex(), "resumed_at": resumed_at, "applied_bytes": applied,
            "records": records, "bytes": reader.position}


def abort(svc: LocalService, path: str) -> dict:
    """Give up the receive in progress (``receive --abort``): for an incremental one,
    first roll the origin back to the base (a merge of the base with keep, unless the
    origin reads as the base already); then forget it.  Returns ``{"aborted": name,
    "rolled_back_to": base name or None}``.

    Raises:
        ReceiveRefused: no receive is in progress, or its base is gone.
    """
    store = svc.store
    receiving, received = store.receive_state()
    if receiving is None:
        raise ReceiveRefused(f"{path} has no receive in progress")
    back = None
    if receiving.base:
        local = None
        if received is not None and received.source == receiving.source:
            local = next((s for s in svc.snapshots() if s.id == received.local), None)
        if local is None:
            raise ReceiveRefused("the receive's base is no longer in the store: the origin "
                                 "cannot be rolled back to it")
        if _origin_moved(svc, local):
            svc.start_merge(local.name, keep=True)
            svc.run_merge()
        back = local.name
    store.record_receive(None, received)
    return {"aborted": receiving.name, "rolled_back_to": back}


def _with_offset(r: Receiving, offset: int) -> Receiving:
    return Receiving(r.source, r.snapshot, r.base, offset, r.size, r.name, r.created,
                     r.read_only)


def _finish(svc: LocalService, r: Receiving, source: bytes, sid: int) -> SnapshotInfo:
    """Snapshot the origin as the stream's snapshot and record the receive as done."""
    try:
        info = svc.snapshot(r.name)  # (a receive that died right after creating it)
    except SnapshotNotFound:
        info = svc.create_snapshot(r.name, read_only=r.read_only)
    svc.store.record_receive(None, Received(source, sid, info.id))
    return info


def _check_applies(svc: LocalService, path: str, h: dict, source: bytes,
                   received: Received | None) -> None:
    """Raise ReceiveRefused unless a new receive of stream header ``h`` applies here."""
    merging = svc.merge_status()
    if merging is not None:
        raise ReceiveRefused(f"a merge of {merging['snapshot']!r} into the origin of {path} "
                             f"is in progress: let it complete first (ddsnap merge {path} "
                             f"{merging['snapshot']} --wait, or serve the store)")
    snaps = svc.snapshots()
    name = h["snapshot"]["name"]
    if any(s.name == name for s in snaps):
        raise ReceiveRefused(f"{path} already has a snapshot called {name!r}")
    base = h["base"]
    if base is None:
        if snaps:
            raise ReceiveRefused(f"a full stream needs a store with no snapshots; "
                                 f"{path} has {len(snaps)} (send with --from "
                                 "BASE, or receive into a new store)")
        return
    local = None
    if received is not None and received.source == source and received.snapshot == base["id"]:
        local = next((s for s in snaps if s.id == received.local), None)
    if local is None:
        raise ReceiveRefused(f"{path} does not hold the stream's base "
                             f"{base['name']!r} (id {base['id']} of store {h['source']}): "
                             "the last stream it received must be that snapshot's")
    if _origin_moved(svc, local):
        raise ReceiveRefused(f"the origin of {path} was written since "
                             f"{local.name!r} was received: roll it back first "
                             f"(ddsnap merge {path} {local.name} --keep --wait)")
    if h["snapshot"]["size"] < local.size:
        raise ReceiveRefused("the stream's volume is smaller than its base's: shrinking "
                             "on receive is not supported")


def _origin_fd(path: str) -> int | None:
    """A read-only descriptor of a file origin, for its holes (None: a block device)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return None
    return fd
