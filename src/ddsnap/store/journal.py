"""The metadata journal: atomic, checksummed transactions over a circular block area.

A transaction is a run of *records*.  Each record is a descriptor block (type
``T_JOURNAL``) listing up to :data:`~ddsnap.store.format.JD_MAX` home block numbers,
followed by the images of those blocks.  Every block of a transaction carries the
transaction's sequence number and its own crc32c, and each image names its home block, so
a transaction is committed exactly when every block of every record up to the one flagged
FINAL reads back intact with the right sequence: the descriptors are the checksummed
commit records, and a torn write anywhere leaves the transaction uncommitted.  The final
descriptor also carries the root :class:`~ddsnap.store.format.State` after the
transaction.

Positions are monotonically increasing block counts; slot ``p`` lives at block
``start + p % size``.  The superblock's ``journal_tail`` and ``journal_seq`` say where
replay starts; a checkpoint (all home writes flushed, superblock rewritten) moves them.

Source: seed 000 (csnap.c ``commit_transaction``, ``recover_journal``), with a crc32c per
block instead of csnap's additive checksum and a sequence check instead of its scan for
the newest commit block.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import JournalError
from .blockdev import BlockDevice
from .format import (BLOCK_SIZE, JD_MAX, T_JOURNAL, State, check_header, decode_descriptor,
                     encode_descriptor, peek_header, seal)


@dataclass
class Transaction:
    """A captured transaction: sealed home-block images and the root state after it."""

    seq: int
    images: list[tuple[int, bytes]]
    state: State

    @property
    def journal_blocks(self) -> int:
        """Journal slots the transaction needs (descriptors plus images)."""
        n = len(self.images)
        return n + max(1, -(-n // JD_MAX))


class Journal:
    """Writes and replays transactions in the journal area of a store device.

    Args:
        dev: the store device.
        uuid: the store UUID every block must carry.
        start: first journal block number; size: journal slots (blocks).
        tail: the checkpointed position; seq: the sequence expected there.
    """

    def __init__(self, dev: BlockDevice, uuid: bytes, start: int, size: int, tail: int, seq: int):
        self.dev = dev
        self.uuid = uuid
        self.start = start
        self.size = size
        self.tail = tail
        self.head = tail
        self.next_seq = seq  # sequence of the next transaction written

    def _slot_block(self, pos: int) -> int:
        return self.start + pos % self.size

    @property
    def used(self) -> int:
        """Slots written since the last checkpoint."""
        return self.head - self.tail

    def room_for(self, tx: Transaction) -> bool:
        return self.used + tx.journal_blocks <= self.size

    def append(self, tx: Transaction) -> None:
        """Write ``tx`` at the head (not flushed: the caller flushes once after).

        Raises:
            JournalError: the transaction is bigger than the whole journal.
        """
        if tx.journal_blocks > self.size:
            raise JournalError(self.start, f"transaction of {len(tx.images)} blocks exceeds "
                                           f"the {self.size}-block journal")
        if tx.seq != self.next_seq:
            raise JournalError(self.start, f"transaction {tx.seq} out of order (expected {self.next_seq})")
        pos = self.head
        images = tx.images
        groups = [images[i:i + JD_MAX] for i in range(0, len(images), JD_MAX)] or [[]]
        blocks: list[bytes] = []  # the transaction's journal blocks, from slot ``head``
        for gi, group in enumerate(groups):
            desc = encode_descriptor([b for b, _ in group], gi == len(groups) - 1, tx.state)
            seal(desc, T_JOURNAL, self._slot_block(pos + len(blocks)), tx.seq, self.uuid)
            blocks.append(desc)
            blocks.extend(img for _b, img in group)
        # One write per stretch of consecutive slots (two if the journal wraps), not one
        # per block: each record carries its own checksum, so a torn write is still
        # found at replay as it was with single-block writes.
        i = 0
        while i < len(blocks):
            first = self._slot_block(pos + i)
            n = min(len(blocks) - i, self.start + self.size - first)
            self.dev.pwrite(b"".join(blocks[i:i + n]), first * BLOCK_SIZE)
            i += n
        self.head = pos + len(blocks)
        self.next_seq += 1

    def checkpointed(self) -> None:
        """The caller made every home write durable and recorded ``head`` as the tail."""
        self.tail = self.head

    def replay(self) -> tuple[State | None, int]:
        """Apply every committed transaction from the tail to its home blocks.

        Returns ``(state, count)``: the root state after the last applied transaction
        (None if none applied) and how many were applied.  Stops at the first record that
        does not check out: that transaction was never committed.  Home writes are not
        flushed; the caller checkpoints.
        """
        pos, seq, applied, state = self.tail, self.next_seq, 0, None
        while True:
            tx_images: list[tuple[int, bytes]] = []
            p = pos
            final_state = None
            ok = True
            while ok:
                if p - pos >= self.size:
                    ok = False
                    break
                dblock = self._slot_block(p)
                buf = self.dev.pread(BLOCK_SIZE, dblock * BLOCK_SIZE)
                try:
                    check_header(buf, T_JOURNAL, dblock, self.uuid, seq)
                    targets, final, st = decode_descriptor(buf)
                except Exception:
                    ok = False
                    break
                p += 1
                for t in targets:
                    img = self.dev.pread(BLOCK_SIZE, self._slot_block(p) * BLOCK_SIZE)
                    h = peek_header(img)
                    if h is None or h[1] != t or h[2] != seq or img[32:48] != self.uuid:
                        ok = False
                        break
                    tx_images.append((t, img))
                    p += 1
                if ok and final:
                    final_state = st
                    break
            if not ok:
                break
            for t, img in tx_images:
                self.dev.pwrite(img, t * BLOCK_SIZE)
            state = final_state
            applied += 1
            pos = p
            seq += 1
        self.head = pos
        self.next_seq = seq
        return state, applied
