"""The send stream format (docs/stream.md; ddsnap.stream) on its own: what a reader
refuses, record by record, and resume tokens.  Whole records dropped, repeated or
reordered pass their own crc32c; the offsets or the digest at END must catch them."""

from __future__ import annotations

import io
import json
import struct

import pytest

from ddsnap.errors import InvalidArgument, StreamDamaged
from ddsnap.stream import (
    DATA,
    HEADER,
    PREAMBLE,
    ZERO,
    StreamReader,
    StreamWriter,
    encode,
    make_token,
    parse_token,
)

SIZE = 1 << 20
BEGIN = {"format": "ddsnap-stream", "version": 1, "source": "ab" * 16,
         "snapshot": {"id": 2, "name": "s2", "size": SIZE, "created": 0, "read_only": True},
         "base": None, "chunk_size": 4096, "start": 0, "sent": "now"}


def stream() -> tuple[bytes, list[tuple[int, int]]]:
    """A stream of three DATA records and a ZERO, and each record's (start, end) byte
    range in it (BEGIN first)."""
    out = io.BytesIO()
    w = StreamWriter(out, BEGIN)
    w.data(0, b"a" * 4096)
    w.data(8192, b"b" * 4096)
    w.zero(12288, 8192)
    w.data(65536, b"c" * 100)
    w.end()
    raw = out.getvalue()
    spans = []
    pos = PREAMBLE.size
    while pos < len(raw):
        length = HEADER.unpack_from(raw, pos)[2]
        spans.append((pos, pos + HEADER.size + length))
        pos += HEADER.size + length
    return raw, spans


def read(raw: bytes) -> list:
    r = StreamReader(io.BytesIO(raw))
    r.begin()
    return [(rec.kind, rec.offset, rec.length) for rec in r]


def test_a_stream_reads_back_as_written():
    raw, spans = stream()
    assert read(raw) == [(DATA, 0, 4096), (DATA, 8192, 4096), (ZERO, 12288, 8192),
                         (DATA, 65536, 100)]
    assert len(spans) == 6  # BEGIN, 4 records, END


def test_a_dropped_record_is_caught_at_end():
    raw, spans = stream()
    a, b = spans[2]
    with pytest.raises(StreamDamaged, match="digest or counts"):
        read(raw[:a] + raw[b:])


def test_a_repeated_or_reordered_record_is_out_of_place():
    raw, spans = stream()
    (a1, b1), (a2, b2) = spans[1], spans[2]
    with pytest.raises(StreamDamaged, match="record 3 .* out of place"):
        read(raw[:b2] + raw[a2:])  # record 2 twice
    with pytest.raises(StreamDamaged, match="record 2 .* out of place"):
        read(raw[:a1] + raw[a2:b2] + raw[a1:b1] + raw[b2:])


def test_a_record_outside_the_volume_is_refused():
    raw, spans = stream()
    a, b = spans[4]
    bad = encode(DATA, SIZE - 10, b"x" * 100)
    with pytest.raises(StreamDamaged, match="record 4 .* out of place"):
        read(raw[:a] + bad + raw[b:])


@pytest.mark.parametrize("where", ["type", "flags", "length"])
def test_a_bad_header_is_refused_at_its_record(where):
    raw, spans = stream()
    a, _b = spans[1]
    buf = bytearray(raw)
    if where == "type":
        struct.pack_into("<H", buf, a, 9)
    elif where == "flags":
        struct.pack_into("<H", buf, a + 2, 1)
    else:
        struct.pack_into("<I", buf, a + 4, (1 << 20) + 1)
    with pytest.raises(StreamDamaged, match=f"record 1 at stream byte {a}"):
        read(bytes(buf))


def test_a_second_begin_and_a_missing_end():
    raw, spans = stream()
    begin = raw[spans[0][0]:spans[0][1]]
    with pytest.raises(StreamDamaged, match="second BEGIN"):
        read(raw[:spans[1][0]] + begin + raw[spans[1][0]:])
    with pytest.raises(StreamDamaged, match="cut short"):
        read(raw[:spans[-1][0]])


def test_a_malformed_begin_is_refused():
    bad = dict(BEGIN, start=SIZE + 1)
    out = io.BytesIO()
    StreamWriter(out, bad).end()
    with pytest.raises(StreamDamaged, match="BEGIN"):
        read(out.getvalue())
    body = json.dumps({"format": "ddsnap-stream"}).encode()
    raw = PREAMBLE.pack(b"DDSNAPST", 1, 0) + encode(1, 0, body)
    with pytest.raises(StreamDamaged, match="malformed header"):
        read(raw)
    with pytest.raises(StreamDamaged, match="version 2"):
        read(PREAMBLE.pack(b"DDSNAPST", 2, 0))


def test_tokens_round_trip_and_a_mistyped_one_is_refused():
    t = make_token(b"\x01" * 16, 7, 3, 65536)
    assert parse_token(t) == (b"\x01" * 16, 7, 3, 65536)
    mid = len(t) // 2
    mistyped = t[:mid] + ("A" if t[mid] != "A" else "B") + t[mid + 1:]
    for bad in (mistyped, "x", "", t + "AAAA"):
        with pytest.raises(InvalidArgument, match="not a resume token"):
            parse_token(bad)
