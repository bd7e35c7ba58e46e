"""The send stream: what ``ddsnap send`` writes and ``ddsnap receive`` reads (issue 13).

docs/stream.md is the specification; this module encodes and decodes it.  A stream is
a preamble, then records, each with its own crc32c, in this order: one BEGIN (a JSON
header naming the source store, the snapshot, its base and the geometry), DATA and ZERO
records at increasing volume offsets, and one END whose JSON carries the SHA-256 digest
of everything before it but the DATA payloads (their crc32c is in their headers).  A
reader checks each record before it hands it out, so a damaged byte is refused at the
record it is in, and the digest at the end catches what a record's crc cannot (records
dropped, repeated or reordered whole).

The idea is ZFS's send stream (``zfs send``/``zfs receive -s``, its BEGIN/WRITE/END
records and resume tokens), laid out for ddsnap's chunks.
"""

from __future__ import annotations

import base64
import hashlib
import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

import crc32c

from .errors import InvalidArgument, StreamDamaged

#: the stream's first 16 bytes: magic, format version u32, reserved u32
MAGIC = b"DDSNAPST"
VERSION = 1
PREAMBLE = struct.Struct("<8sII")
#: record header: type u16, flags u16 (0), payload length u32, volume offset u64,
#: crc32c u32 (of the header with this field 0, then the payload), reserved u32 (0)
HEADER = struct.Struct("<HHIQII")
BEGIN, DATA, ZERO, END = 1, 2, 3, 4
_NAMES = {BEGIN: "BEGIN", DATA: "DATA", ZERO: "ZERO", END: "END"}
#: the most payload one DATA record carries (bytes)
RECORD_MAX = 1 << 20
#: the most a JSON payload (BEGIN, END) may be: a reader refuses more before reading it
JSON_MAX = 64 << 10


@dataclass(frozen=True)
class Record:
    """One record: ``kind`` (BEGIN, DATA, ZERO, END), ``offset`` in the volume (bytes;
    0 for BEGIN and END), ``payload``, and ``index`` (0 for BEGIN) and ``position``
    (its first byte in the stream) for error messages."""

    kind: int
    offset: int
    payload: bytes
    index: int = 0
    position: int = 0

    @property
    def length(self) -> int:
        """Bytes of the volume the record covers (DATA, ZERO; 0 for the others)."""
        if self.kind == DATA:
            return len(self.payload)
        if self.kind == ZERO:
            return struct.unpack("<Q", self.payload)[0]
        return 0


def header(kind: int, offset: int, payload) -> bytes:
    """The 24-byte header of a record carrying ``payload`` (bytes-like)."""
    head = bytearray(HEADER.pack(kind, 0, len(payload), offset, 0, 0))
    crc = crc32c.crc32c(payload, crc32c.crc32c(bytes(head)))
    struct.pack_into("<I", head, 16, crc)
    return bytes(head)


def encode(kind: int, offset: int, payload: bytes) -> bytes:
    """One record's bytes: header then payload."""
    return header(kind, offset, payload) + payload


class StreamWriter:
    """Writes a stream to a binary file object, keeping the digest and the counts.

    ``begin`` is the BEGIN header (a dict, see docs/stream.md).  Call :meth:`data` and
    :meth:`zero` with increasing offsets, then :meth:`end`.  ``bytes_out`` counts what
    was written.
    """

    def __init__(self, out: BinaryIO, begin: dict):
        self.out = out
        self.digest = hashlib.sha256()
        self.bytes_out = 0
        self.records = 0
        self.data_bytes = 0
        self.zero_bytes = 0
        self._emit(PREAMBLE.pack(MAGIC, VERSION, 0))
        body = json.dumps(begin, sort_keys=True).encode()
        self._emit(header(BEGIN, 0, body), body)

    def _emit(self, head: bytes, payload=b"", digested: bool = True) -> None:
        # The digest covers the headers (each carries its payload's crc32c), BEGIN's
        # payload too: it binds the records' order and number without hashing the data
        # a second time (docs/stream.md).
        self.digest.update(head)
        if digested and payload:
            self.digest.update(payload)
        self.out.write(head)
        if payload:
            self.out.write(payload)
        self.bytes_out += len(head) + len(payload)

    def data(self, offset: int, payload) -> None:
        """A DATA record: ``payload`` (bytes-like, at most :data:`RECORD_MAX` bytes) at
        ``offset``."""
        self._emit(header(DATA, offset, payload), payload, digested=False)
        self.records += 1
        self.data_bytes += len(payload)

    def zero(self, offset: int, length: int) -> None:
        """A ZERO record: ``length`` bytes of zeroes at ``offset``."""
        p = struct.pack("<Q", length)
        self._emit(header(ZERO, offset, p), p)
        self.records += 1
        self.zero_bytes += length

    def end(self) -> dict:
        """Write END (digest of everything before it) and flush; return its JSON."""
        trailer = {"records": self.records, "data_bytes": self.data_bytes,
                   "zero_bytes": self.zero_bytes, "sha256": self.digest.hexdigest()}
        b = encode(END, 0, json.dumps(trailer, sort_keys=True).encode())
        self.out.write(b)
        self.bytes_out += len(b)
        self.out.flush()
        return trailer


class StreamReader:
    """Reads and checks a stream from a binary file object.

    :meth:`begin` returns the BEGIN header; iterating gives the DATA and ZERO records,
    each checked (crc32c, type, bounds: offsets increase and stay inside the volume)
    before it is given; the END record is checked against the digest and counts of
    what came before it, and :attr:`trailer` is its JSON afterwards.

    Raises:
        StreamDamaged: at the first record that is damaged, truncated or out of place
            (naming it), or when the stream is not a ddsnap stream.
    """

    def __init__(self, src: BinaryIO):
        self.src = src
        self.digest = hashlib.sha256()
        self.position = 0
        self.index = 0
        self.header: dict | None = None
        self.trailer: dict | None = None
        self._end = 0  # end of the last DATA/ZERO record (bytes of the volume)
        self._records = self._data = self._zero = 0

    def _read(self, n: int, what: str) -> bytes:
        first = self.src.read(n)
        if len(first) == n:  # (the usual case: no copy)
            self.position += n
            return first
        buf = bytearray(first or b"")
        while len(buf) < n:
            part = self.src.read(n - len(buf))
            if not part:
                raise StreamDamaged(f"the stream is cut short: it ends at byte "
                                    f"{self.position + len(buf)}, inside {what}")
            buf += part
        self.position += n
        return bytes(buf)

    def _record(self) -> Record:
        pos = self.position
        where = f"record {self.index} at stream byte {pos}"
        head = self._read(HEADER.size, where)
        kind, flags, length, offset, crc, reserved = HEADER.unpack(head)
        if kind not in _NAMES or flags or reserved:
            raise StreamDamaged(f"{where}: bad header (type {kind}, flags {flags})")
        limit = RECORD_MAX if kind == DATA else JSON_MAX if kind in (BEGIN, END) else 8
        if length > limit or (kind == ZERO and length != 8):
            raise StreamDamaged(f"{where}: {_NAMES[kind]} payload of {length} bytes")
        payload = self._read(length, where)
        zeroed = head[:16] + b"\0\0\0\0" + head[20:]
        if crc32c.crc32c(payload, crc32c.crc32c(zeroed)) != crc:
            raise StreamDamaged(f"{where}: crc32c mismatch ({_NAMES[kind]} record damaged)")
        rec = Record(kind, offset, payload, self.index, pos)
        if kind != END:  # (see StreamWriter._emit)
            self.digest.update(head)
            if kind != DATA:
                self.digest.update(payload)
        self.index += 1
        return rec

    def begin(self) -> dict:
        """Read the preamble and BEGIN; return its header (checked for the fields every
        reader needs)."""
        pre = self._read(PREAMBLE.size, "the preamble")
        magic, version, _r = PREAMBLE.unpack(pre)
        if magic != MAGIC:
            raise StreamDamaged("not a ddsnap stream (no DDSNAPST magic at byte 0)")
        if version != VERSION:
            raise StreamDamaged(f"stream format version {version}; this ddsnap reads "
                                f"version {VERSION}")
        self.digest.update(pre)
        rec = self._record()
        if rec.kind != BEGIN:
            raise StreamDamaged(f"record 0 is {_NAMES[rec.kind]}, not BEGIN")
        try:
            h = json.loads(rec.payload)
            snap = h["snapshot"]
            ok = (isinstance(h["source"], str) and len(bytes.fromhex(h["source"])) == 16
                  and isinstance(snap["id"], int) and isinstance(snap["name"], str)
                  and isinstance(snap["size"], int) and snap["size"] > 0
                  and isinstance(h["chunk_size"], int) and h["chunk_size"] > 0
                  and isinstance(h["start"], int) and 0 <= h["start"] <= snap["size"]
                  and (h["base"] is None or isinstance(h["base"]["id"], int)))
        except (ValueError, KeyError, TypeError) as e:
            raise StreamDamaged(f"record 0 (BEGIN): malformed header ({e})") from None
        if not ok:
            raise StreamDamaged("record 0 (BEGIN): malformed header")
        self.header = h
        self._end = h["start"]
        return h

    def __iter__(self) -> Iterator[Record]:
        assert self.header is not None, "begin() first"
        size = self.header["snapshot"]["size"]
        while True:
            rec = self._record()
            where = f"record {rec.index} at stream byte {rec.position}"
            if rec.kind == END:
                self._check_end(rec, where)
                return
            if rec.kind == BEGIN:
                raise StreamDamaged(f"{where}: a second BEGIN")
            n = rec.length
            if rec.offset < self._end or n <= 0 or rec.offset + n > size:
                raise StreamDamaged(f"{where}: {_NAMES[rec.kind]} of {n} bytes at offset "
                                    f"{rec.offset} is out of place (previous record ended "
                                    f"at {self._end}, volume size {size})")
            self._end = rec.offset + n
            self._records += 1
            if rec.kind == DATA:
                self._data += n
            else:
                self._zero += n
            yield rec

    def _check_end(self, rec: Record, where: str) -> None:
        try:
            t = json.loads(rec.payload)
            want = (t["records"], t["data_bytes"], t["zero_bytes"], t["sha256"])
        except (ValueError, KeyError, TypeError) as e:
            raise StreamDamaged(f"{where} (END): malformed trailer ({e})") from None
        got = (self._records, self._data, self._zero, self.digest.hexdigest())
        if want != got:
            raise StreamDamaged(f"{where} (END): the stream's digest or counts do not match "
                                f"what was read (records, data, zero bytes, sha256: sent "
                                f"{want}, read {got})")
        self.trailer = t


# -- resume tokens ------------------------------------------------------------------------

_TOKEN = struct.Struct("<B16sIIQ")  # version, source UUID, snapshot id, base id, offset


def make_token(source: bytes, snapshot: int, base: int, offset: int) -> str:
    """The resume token of a receive: where it stands, as ``ddsnap status`` prints it
    and ``send --resume``/``receive --resume`` take it (URL-safe base64, no padding;
    a crc32c at the end catches a mistyped one)."""
    raw = _TOKEN.pack(1, source, snapshot, base, offset)
    raw += struct.pack("<I", crc32c.crc32c(raw))
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def parse_token(token: str) -> tuple[bytes, int, int, int]:
    """``(source UUID, snapshot id, base id, offset)`` of a resume token.

    Raises:
        InvalidArgument: not a token (or mistyped).
    """
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        body, (crc,) = raw[:-4], struct.unpack("<I", raw[-4:])
        version, source, snap, base, offset = _TOKEN.unpack(body)
    except (ValueError, struct.error):
        raise InvalidArgument(f"{token!r} is not a resume token") from None
    if version != 1 or crc32c.crc32c(body) != crc:
        raise InvalidArgument(f"{token!r} is not a resume token (mistyped?)")
    return source, snap, base, offset
