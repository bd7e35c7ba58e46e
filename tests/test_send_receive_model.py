"""Model-based test of send and receive (issue 13): a hypothesis state machine against
plain bytes models of a source store's volumes and of what a receiving store holds.

The source store sees origin writes, snapshots (read-only, as one sends them), deletes
and rollbacks (a merge of a snapshot with keep).  Every snapshot taken is sent to the
receiving store: whole for the first, then incrementally from the last one it received
(or whole into a fresh store, once the base is gone).  Streams are also damaged on the
way (a byte flipped or the stream cut at a drawn point): the receive must refuse them at
a record with StreamDamaged, the store must then say a receive is in progress (with a
token), and that receive then either resumes (from a ``send --resume`` stream or from
the whole stream again) or is aborted (an incremental one rolls the origin back to its
base).  The receiving store's snapshots are deleted too (not the last received).

After every step every snapshot the receiving store holds reads exactly as the source
snapshot did when it was sent, its origin as the last one received (when no receive is
in progress), and ``check()`` finds nothing fatal.  Both stores are SharedStores on
memory devices, through the same LocalService a served store uses.
"""

from __future__ import annotations

import io
import random

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from conftest import examples
from ddsnap import sendrecv
from ddsnap.errors import ReceiveRefused, StreamDamaged
from ddsnap.service.local import LocalService
from ddsnap.store.blockdev import MemoryDevice
from ddsnap.store.shared import SharedStore
from ddsnap.stream import make_token
from ddsnap.volume import Origin, Snapshot

CHUNK = 4096
ORIGIN = 48 * CHUNK
STORE = 4 << 20


@pytest.fixture(autouse=True)
def save_often(monkeypatch):
    """Records of two chunks (the default is 1 MiB) and a receive's progress recorded
    every three (the default is 64 MiB), so that a damaged stream leaves receives
    resumed from the middle."""
    monkeypatch.setattr(sendrecv, "SAVE_EVERY", 3 * CHUNK)
    monkeypatch.setattr(sendrecv, "RECORD_MAX", 2 * CHUNK)


def service(seed: int | None = None) -> LocalService:
    """A store on a memory device over an origin of ``ORIGIN`` bytes (random, or zero)."""
    data = random.Random(seed).randbytes(ORIGIN) if seed is not None else bytes(ORIGIN)
    origin = MemoryDevice(ORIGIN, data)
    store = SharedStore.create(MemoryDevice(STORE), origin_size=ORIGIN, origin_path="origin",
                               chunk_size=CHUNK, max_snapshots=0)
    return LocalService(store, origin)


def read_all(svc: LocalService, name: str | None) -> bytes:
    if name is None:
        return Origin(svc, svc.data).read(0, svc.origin_size)
    info = svc.snapshot(name)
    return Snapshot(svc, svc.data, info).read(0, info.size)


class SendReceiveMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.src = service(seed=1)
        self.dst = service()
        self.origin = bytearray(random.Random(1).randbytes(ORIGIN))
        self.taken: dict[str, bytes] = {}  # source snapshots and their bytes
        self.received: dict[str, bytes] = {}  # what the receiving store must hold
        self.last: str | None = None  # the last snapshot received (the next base)
        self.pending: tuple[str, str | None] | None = None  # a receive in progress
        self.n = 0
        self.stats = {"full": 0, "incremental": 0, "damaged": 0, "resumed": 0,
                      "aborted": 0, "zero records": 0}

    def teardown(self):
        print(self.stats)

    # -- the source --------------------------------------------------------------------

    @rule(data=st.data(), pattern=st.sampled_from([0, 0x11, 0x22, 0xFF]))
    def write_origin(self, data, pattern):
        off = data.draw(st.integers(0, ORIGIN - 1), label="offset")
        n = data.draw(st.integers(1, min(3 * CHUNK, ORIGIN - off)), label="length")
        Origin(self.src, self.src.data).write(off, bytes([pattern]) * n)
        self.origin[off:off + n] = bytes([pattern]) * n

    @rule(first=st.integers(0, ORIGIN // CHUNK - 1), count=st.integers(1, 4))
    def zero_origin_chunks(self, first, count):
        """Whole chunks of zeroes: sent as ZERO records."""
        off = first * CHUNK
        n = min(count * CHUNK, ORIGIN - off)
        Origin(self.src, self.src.data).write(off, bytes(n))
        self.origin[off:off + n] = bytes(n)

    @precondition(lambda self: len(self.taken) > 1)
    @rule(data=st.data())
    def delete_source_snapshot(self, data):
        # (not those of a receive in progress: it is resumed from them)
        keep = set(self.pending or ())
        names = sorted(set(self.taken) - keep)
        if not names:
            return
        name = data.draw(st.sampled_from(names), label="deleted")
        self.src.delete_snapshot(name)
        del self.taken[name]

    @precondition(lambda self: self.taken)
    @rule(data=st.data())
    def roll_back_source(self, data):
        name = data.draw(st.sampled_from(sorted(self.taken)), label="rolled back to")
        self.src.start_merge(name, keep=True)
        self.src.run_merge()
        self.origin[:] = self.taken[name]

    # -- sending -----------------------------------------------------------------------

    def _stream(self, name: str, base: str | None, token: str | None = None) -> bytes:
        out = io.BytesIO()
        summary = sendrecv.send(self.src, name, out, base, token)
        self.stats["zero records"] += summary["zero_bytes"] > 0
        return out.getvalue()

    @precondition(lambda self: self.pending is None)
    @rule(damage=st.sampled_from([None, None, "flip", "cut"]), data=st.data())
    def snapshot_and_send(self, damage, data):
        self.n += 1
        name = f"s{self.n}"
        self.src.create_snapshot(name, read_only=True)
        self.taken[name] = bytes(self.origin)
        base = self.last if self.last in self.taken else None
        if base is None and self.received:
            # the base is gone at the source: start over in a fresh receiving store
            self.dst, self.received, self.last = service(), {}, None
        stream = self._stream(name, base)
        self.stats["incremental" if base else "full"] += 1
        if damage is not None:
            # past the preamble and BEGIN: a damaged header refuses before anything
            at = data.draw(st.integers(16, len(stream) - 1), label="damaged at")
            bad = (stream[:at] + bytes([stream[at] ^ 0x40]) + stream[at + 1:]
                   if damage == "flip" else stream[:at])
            try:
                sendrecv.receive(self.dst, "dst", io.BytesIO(bad))
            except StreamDamaged:
                self.stats["damaged"] += 1
            else:
                raise AssertionError(f"a stream {damage} at byte {at} was received")
            r, _d = self.dst.store.receive_state()
            if r is not None:
                self.pending = (name, base)
                return
            # (damage in BEGIN: refused before the receive began, nothing changed)
            assert read_all(self.dst, None) == (self.received[self.last] if self.last
                                                else bytes(ORIGIN))
            return
        self._received(sendrecv.receive(self.dst, "dst", io.BytesIO(stream)), name)

    def _received(self, summary: dict, name: str) -> None:
        assert summary["snapshot"] == name
        self.received[name] = self.taken[name]
        self.last = name
        self.pending = None

    @precondition(lambda self: self.pending is not None)
    @rule(whole=st.booleans())
    def resume(self, whole):
        assert self.pending is not None
        name, base = self.pending
        r, _d = self.dst.store.receive_state()
        assert r is not None and r.name == name
        token = make_token(r.source, r.snapshot, r.base, r.offset)
        stream = self._stream(name, base, None if whole else token)
        summary = sendrecv.receive(self.dst, "dst", io.BytesIO(stream), token)
        assert summary["resumed_at"] == r.offset
        self.stats["resumed"] += 1
        self._received(summary, name)

    @precondition(lambda self: self.pending is not None)
    @rule()
    def abort(self):
        assert self.pending is not None
        _name, base = self.pending
        done = sendrecv.abort(self.dst, "dst")
        assert done["rolled_back_to"] == base
        self.pending = None
        self.stats["aborted"] += 1
        if base is None:  # a full receive given up: the store is empty again
            self.dst, self.received, self.last = service(), {}, None

    @precondition(lambda self: self.pending is not None)
    @rule()
    def a_new_stream_is_refused_while_a_receive_is_in_progress(self):
        assert self.pending is not None
        name, base = self.pending
        with pytest.raises(ReceiveRefused, match="--resume"):
            sendrecv.receive(self.dst, "dst", io.BytesIO(self._stream(name, base)))

    @precondition(lambda self: len(self.received) > 1)
    @rule(data=st.data())
    def delete_received_snapshot(self, data):
        old = sorted(n for n in self.received if n != self.last)
        if not old:
            return
        name = data.draw(st.sampled_from(old), label="deleted here")
        self.dst.delete_snapshot(name)
        del self.received[name]

    # -- invariants --------------------------------------------------------------------

    @invariant()
    def the_receiving_store_holds_what_was_sent(self):
        for name, want in self.received.items():
            assert read_all(self.dst, name) == want, f"received {name} differs"
        if self.pending is None and self.last is not None:
            assert read_all(self.dst, None) == self.received[self.last]
        assert {s.name for s in self.dst.snapshots()} == set(self.received)

    @invariant()
    def the_source_reads_as_its_model(self):
        assert read_all(self.src, None) == bytes(self.origin)
        for name, want in self.taken.items():
            assert read_all(self.src, name) == want

    @invariant()
    def nothing_fatal(self):
        for svc in (self.src, self.dst):
            svc.commit()
            assert not [f for f in svc.store.check() if f.severity == "fatal"]


SendReceiveMachine.TestCase.settings = settings(
    max_examples=examples(60), stateful_step_count=25)
TestSendReceiveModel = SendReceiveMachine.TestCase
