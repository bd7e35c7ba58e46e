"""The metadata journal: atomic, checksummed transactions over a circular block area.

A transaction is a run of *records* followed by a *commit block* (format v2).  Each
record is a descriptor block (type ``T_JOURNAL``) listing up to
:data:`~ddsnap.store.format.JD_MAX` home block numbers, followed by the images of those
blocks.  Every block carries the transaction's sequence number and its own crc32c, and
each image names its home block.  The commit block (type ``T_COMMIT``) is written only
once every record is durable; it holds two identical copies of the commit record
(sequence, where the transaction starts, how many blocks it has, the root state after
it), each with its own crc32c.

That order is what lets recovery tell a transaction a crash cut short from one that was
complete and later damaged (jbd2's commit block; the LevelDB/RocksDB log readers'
reasoning that a valid record after a bad one proves damage):

* no valid commit copy for it, and no valid commit record of it or of any later
  transaction anywhere in the journal: the transaction was never committed (torn); it
  is discarded and the journal ends there;
* a valid commit copy, or a valid commit record of a later transaction (which is only
  ever written after this one's commit was durable): the transaction was committed, so
  every block of it must check out; one that does not is damage, reported as
  :class:`~ddsnap.errors.CorruptMetadata` naming the block.

The limit: both copies of the *last* transaction's commit record damaged, and nothing
written after it, reads as a torn commit (docs/format.md, "Journal").

Positions are monotonically increasing block counts; slot ``p`` lives at block
``start + p % size``.  The superblock's ``journal_tail`` and ``journal_seq`` say where
replay starts; a checkpoint (all home writes flushed, superblock rewritten) moves them.
The journal never overwrites slots from the *older* superblock slot's tail on
(``old_tail``), so recovery from either superblock slot finds every transaction it needs.

Source: seed 000 (csnap.c ``commit_transaction``, ``recover_journal``), with a crc32c per
block instead of csnap's additive checksum, a sequence check instead of its scan for the
newest commit block, and jbd2's commit-after-flush ordering.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import CorruptMetadata, JournalError
from .blockdev import BlockDevice
from .format import (
    BLOCK_SIZE,
    JD_MAX,
    MAGIC,
    T_JOURNAL,
    VERSION,
    CommitRecord,
    check_header,
    decode_commit,
    decode_descriptor,
    encode_commit,
    encode_descriptor,
    peek_header,
    seal,
)
from .model import State


@dataclass
class Transaction:
    """A captured transaction: sealed home-block images and the root state after it."""

    seq: int
    images: list[tuple[int, bytes]]
    state: State
    #: the cluster epoch of the metadata server that wrote it (0: no cluster)
    epoch: int = 0

    @property
    def body_blocks(self) -> int:
        """Descriptor and image blocks (what precedes the commit block)."""
        n = len(self.images)
        return n + max(1, -(-n // JD_MAX))

    @property
    def journal_blocks(self) -> int:
        """Journal slots the transaction needs (descriptors, images, commit block)."""
        return self.body_blocks + 1


@dataclass
class Replay:
    """What :meth:`Journal.scan` found from the tail on.

    Attributes:
        transactions: the committed, intact transactions in order, up to the first
            damaged one (these are what recovery applies).
        end: journal position after the last of them (the new head).
        next_seq: the sequence the next transaction gets.
        damage: the damage found (committed transactions with a bad block), each naming
            the block; empty when the journal is sound.  Recovery refuses such a store.
        warnings: damage that loses nothing (one of two commit copies bad), each naming
            the block.
        later: for a damaged journal, every transaction found committed after the first
            damaged one, in order, with only its intact images; and ``untrusted``: home
            blocks whose newest image is damaged (their home may be stale); ``unknown``
            is True when a damaged descriptor hides which homes a transaction changed.
    """

    transactions: list[Transaction] = field(default_factory=list)
    end: int = 0
    next_seq: int = 1
    damage: list[CorruptMetadata] = field(default_factory=list)
    warnings: list[CorruptMetadata] = field(default_factory=list)
    later: list[Transaction] = field(default_factory=list)
    untrusted: set[int] = field(default_factory=set)
    unknown: bool = False

    @property
    def state(self) -> State | None:
        """Root state after the last transaction recovery can use (None: none)."""
        txs = self.later or self.transactions
        return txs[-1].state if txs else None


class Journal:
    """Writes and replays transactions in the journal area of a store device.

    Args:
        dev: the store device.
        uuid: the store UUID every block must carry.
        start: first journal block number; size: journal slots (blocks).
        tail: the checkpointed position; seq: the sequence expected there.
        old_tail: the tail the other superblock slot records (default ``tail``):
            slots from there on are never overwritten.
        version: the format version every journal block carries and must carry (the
            current one; ``ddsnap upgrade`` reads a format-v2 journal with 2).  Blocks
            of another version are not this journal's: never replayed.
    """

    def __init__(self, dev: BlockDevice, uuid: bytes, start: int, size: int, tail: int,
                 seq: int, old_tail: int | None = None, version: int = VERSION):
        self.dev = dev
        self.uuid = uuid
        self.version = version
        self.start = start
        self.size = size
        self.tail = tail
        self.old_tail = tail if old_tail is None else min(tail, old_tail)
        self.head = tail
        self.next_seq = seq  # sequence of the next transaction written
        self.tail_seq = seq  # sequence of the transaction at the tail
        #: the cluster epoch written into every commit record from now on, and the
        #: lowest one a transaction found at a scan may carry (the superblock's)
        self.epoch = 0
        self.min_epoch = 0

    def _slot_block(self, pos: int) -> int:
        return self.start + pos % self.size

    @property
    def used(self) -> int:
        """Slots written since the last checkpoint."""
        return self.head - self.tail

    def room_for(self, tx: Transaction) -> bool:
        """True if ``tx`` fits without overwriting a slot either superblock slot's
        recovery may still need."""
        return self.head + tx.journal_blocks <= self.old_tail + self.size

    def append(self, tx: Transaction) -> None:
        """Write ``tx``'s descriptors and images at the head (not flushed, and not yet
        committed: the caller flushes, then calls :meth:`write_commit`).

        Raises:
            JournalError: the transaction is bigger than the whole journal.
        """
        if tx.journal_blocks > self.size:
            raise JournalError(self.start, f"transaction of {len(tx.images)} blocks exceeds "
                                           f"the {self.size}-block journal")
        if tx.seq != self.next_seq:
            raise JournalError(self.start, f"transaction {tx.seq} out of order "
                                           f"(expected {self.next_seq})")
        pos = self.head
        images = tx.images
        groups = [images[i:i + JD_MAX] for i in range(0, len(images), JD_MAX)] or [[]]
        blocks: list[bytes | bytearray] = []  # the transaction's journal blocks, from slot ``head``
        for gi, group in enumerate(groups):
            desc = encode_descriptor([b for b, _ in group], gi == len(groups) - 1, tx.state)
            seal(desc, T_JOURNAL, self._slot_block(pos + len(blocks)), tx.seq, self.uuid,
                 self.version)
            blocks.append(desc)
            blocks.extend(img for _b, img in group)
        self._write_slots(pos, blocks)
        self.head = pos + len(blocks)

    def write_commit(self, tx: Transaction) -> None:
        """Write ``tx``'s commit block after its body (the caller flushed the body
        first, and flushes again: that flush is the commit point)."""
        start = self.head - tx.body_blocks
        block = self._slot_block(self.head)
        tx.epoch = self.epoch
        rec = CommitRecord(tx.seq, start, tx.body_blocks, tx.state, tx.epoch)
        self._write_slots(self.head, [encode_commit(rec, block, self.uuid, self.version)])
        self.head += 1
        self.next_seq += 1

    def commit(self, tx: Transaction) -> None:
        """Write and commit ``tx``: its body, a flush (which also makes any exception
        data written before it durable: DESIGN.md invariant 3), its commit block, and
        the flush that is the commit point.  Home blocks are the caller's.

        Raises:
            JournalError: as :meth:`append`.
        """
        self.append(tx)
        self.dev.flush()
        self.write_commit(tx)
        self.dev.flush()

    def _write_slots(self, pos: int, blocks: list[bytes | bytearray]) -> None:
        # One write per stretch of consecutive slots (two if the journal wraps), not one
        # per block: each block carries its own checksum, so a torn write is still
        # found at replay as it was with single-block writes.
        i = 0
        while i < len(blocks):
            first = self._slot_block(pos + i)
            n = min(len(blocks) - i, self.start + self.size - first)
            self.dev.pwrite(b"".join(blocks[i:i + n]), first * BLOCK_SIZE)
            i += n

    def checkpointed(self) -> None:
        """The caller made every home write durable and recorded ``head`` as the tail
        in one superblock slot (the other slot keeps the previous tail)."""
        self.old_tail = self.tail
        self.tail = self.head
        self.tail_seq = self.next_seq

    def fully_checkpointed(self) -> None:
        """Both superblock slots record ``head`` as the tail."""
        self.old_tail = self.tail = self.head
        self.tail_seq = self.next_seq

    def scan(self, tail: int | None = None, seq: int | None = None,
             min_epoch: int | None = None) -> Replay:
        """Read the journal from ``tail`` (default: the tail), where transaction ``seq``
        (default: the tail's) is expected, and classify what is there; writes nothing.

        Every transaction from there is read: committed and intact ones go to
        ``transactions`` until the first that is committed but damaged; a transaction
        with no commit record and no later committed transaction ends the journal (a
        torn commit).  See the module docstring for the rule.  A transaction whose
        cluster epoch is older than ``min_epoch`` (default :attr:`min_epoch`, the
        superblock's) or than one before it is damage too (split brain: a stale
        metadata server wrote after a failover).
        """
        window = self.dev.pread(self.size * BLOCK_SIZE, self.start * BLOCK_SIZE)

        def slot(pos: int) -> tuple[int, bytes]:
            i = pos % self.size
            return self.start + i, window[i * BLOCK_SIZE:(i + 1) * BLOCK_SIZE]

        tail = self.tail if tail is None else tail
        first_seq = self.tail_seq if seq is None else seq
        # Every valid commit copy in the window from the expected sequence on: proof
        # that those transactions, and all before them, were committed.
        commits: dict[int, tuple[int, CommitRecord]] = {}
        half = BLOCK_SIZE // 2
        for i in range(self.size):
            buf = window[i * BLOCK_SIZE:(i + 1) * BLOCK_SIZE]
            if buf[:4] != MAGIC and buf[half:half + 4] != MAGIC:
                continue
            rec, _bad = decode_commit(buf, self.start + i, self.uuid, self.version)
            if rec is not None and rec.seq >= first_seq:
                pos = self._pos_of(i, rec, tail)
                if pos is not None:
                    commits[rec.seq] = (pos, rec)
        last_committed = max(commits, default=first_seq - 1)

        out = Replay(end=tail, next_seq=first_seq)
        pos, seq = tail, first_seq
        epoch = self.min_epoch if min_epoch is None else min_epoch
        while seq <= last_committed or pos - tail < self.size:
            tx, blocks, problem, cwarn = self._read_tx(slot, pos, seq)
            if tx is not None and problem is None and tx.epoch < epoch:
                # Split brain: a metadata server of an older election term wrote after
                # a newer one (a stale server that woke up after a failover).  Nothing
                # from here on is trusted; the store is refused (docs/format.md).
                out.damage.append(CorruptMetadata(
                    self._slot_block(pos + blocks),
                    f"journal transaction {seq} was written by a metadata server of "
                    f"cluster epoch {tx.epoch} after one of epoch {epoch} had written "
                    "the store: a stale server wrote after a failover (split brain)"))
                break
            if tx is not None and problem is None:
                epoch = max(epoch, tx.epoch)
                out.transactions.append(tx)
                out.warnings.extend(cwarn)
                pos += blocks + 1
                seq += 1
                out.end, out.next_seq = pos, seq
                continue
            if seq > last_committed:
                break  # never committed: a torn commit, discarded
            # Committed (its own record or a later one proves it) but not intact.
            where = commits.get(seq)
            if problem is None:
                problem = CorruptMetadata(
                    self._slot_block(pos),
                    f"journal transaction {seq} was committed (a later commit record "
                    "proves it) but its commit block is damaged")
            elif where is not None:
                problem = CorruptMetadata(problem.block, f"journal transaction {seq} was "
                                          f"committed but {problem.why}")
            out.damage.append(problem)
            self._read_later(slot, commits, seq, last_committed, out)
            break
        return out

    def _pos_of(self, index: int, rec: CommitRecord, tail: int) -> int | None:
        """The journal position of a commit block found in slot ``index``, if its record
        agrees with where it lies (its body ends right before it, past ``tail``)."""
        pos = rec.start + rec.blocks
        if pos % self.size != index or pos < tail:
            return None
        return pos

    def _read_tx(self, slot, pos: int, seq: int):
        """Read the transaction expected at ``pos`` with sequence ``seq``.

        Returns ``(tx, body_blocks, problem, warnings)``: ``tx`` is None when no complete
        descriptor chain is there; ``problem`` the first block that does not check out
        (None when the transaction is complete, intact and committed by its own commit
        block).
        """
        images: list[tuple[int, bytes]] = []
        p = pos
        state = None
        while True:
            if p - pos >= self.size:
                return None, 0, CorruptMetadata(self._slot_block(pos),
                                                "journal transaction longer than the journal"), []
            dblock, buf = slot(p)
            try:
                check_header(buf, T_JOURNAL, dblock, self.uuid, seq, self.version)
                targets, final, st = decode_descriptor(buf)
            except (CorruptMetadata, ValueError) as e:
                why = e.why if isinstance(e, CorruptMetadata) else str(e)
                return None, 0, CorruptMetadata(dblock, f"journal descriptor: {why}"), []
            p += 1
            for t in targets:
                iblock, img = slot(p)
                h = peek_header(img, self.version)
                if h is None or h[1] != t or h[2] != seq or img[32:48] != self.uuid:
                    return None, 0, CorruptMetadata(
                        iblock, f"journal image of block {t} fails its check"), []
                images.append((t, img))
                p += 1
            if final:
                state = st
                break
        body = p - pos
        cblock, cbuf = slot(p)
        rec, bad = decode_commit(cbuf, cblock, self.uuid, self.version)
        tx = Transaction(seq, images, state)
        if rec is None or rec.seq != seq or rec.start != pos or rec.blocks != body:
            return tx, body, CorruptMetadata(cblock, f"journal transaction {seq} has no "
                                                     "valid commit record"), []
        tx.state = rec.state
        tx.epoch = rec.epoch
        warn = [CorruptMetadata(cblock, f"copy {k + 1} of the commit record of journal "
                                        f"transaction {seq} is damaged (the other copy "
                                        "is intact)") for k in bad]
        return tx, body, None, warn

    def _read_later(self, slot, commits: dict, first: int, last: int, out: Replay) -> None:
        """After damage in transaction ``first``: gather, for a degraded read-only open,
        the intact images of it and of every later committed transaction, and which home
        blocks only a damaged image could have brought up to date."""
        newest: dict[int, bool] = {}  # home block -> its newest image is intact
        for seq in range(first, last + 1):
            where = commits.get(seq)
            if where is None:
                out.unknown = True  # not even its extent is known
                continue
            cpos, rec = where
            images: list[tuple[int, bytes]] = []
            expect: list[int] = []  # homes the last intact descriptor says follow
            for p in range(rec.start, cpos):
                b, buf = slot(p)
                h = peek_header(buf, self.version)
                ours = h is not None and h[2] == seq and buf[32:48] == self.uuid
                kind, home = (h[0], h[1]) if h is not None else (None, None)
                if ours and kind == T_JOURNAL and home == b:
                    try:
                        expect = decode_descriptor(buf)[0]
                        continue
                    except ValueError:
                        pass
                elif ours and kind != T_JOURNAL and home is not None:
                    images.append((home, buf))
                    newest[home] = True
                    if expect:
                        expect.pop(0)
                    continue
                # A damaged block.  A descriptor (its raw header says so) hides no home:
                # the images after it name their own.
                if (buf[4:6] == T_JOURNAL.to_bytes(2, "little")
                        and buf[16:24] == b.to_bytes(8, "little")):
                    expect = []
                    continue
                # An image: the home it was meant for, if a descriptor says.
                if expect:
                    newest[expect.pop(0)] = False
                else:
                    out.unknown = True
            out.later.append(Transaction(seq, images, rec.state))
        out.untrusted = {b for b, ok in newest.items() if not ok}

    def replay(self) -> tuple[State | None, int]:
        """Apply every committed transaction from the tail to its home blocks
        (:meth:`scan`, then :meth:`apply`).

        Returns ``(state, count)``: the root state after the last applied transaction
        (None if none applied) and how many were applied.

        Raises:
            CorruptMetadata: as :meth:`apply`.
        """
        r = self.scan()
        self.apply(r)
        return r.state, len(r.transactions)

    def apply(self, r: Replay) -> None:
        """Write the transactions of scan ``r`` to their home blocks and continue the
        journal after them.  Home writes are not flushed; the caller checkpoints.

        Raises:
            CorruptMetadata: the scan found a committed transaction damaged (naming the
                block); nothing was written.
        """
        if r.damage:
            raise r.damage[0]
        for tx in r.transactions:
            for t, img in tx.images:
                self.dev.pwrite(img, t * BLOCK_SIZE)
        self.head, self.next_seq = r.end, r.next_seq
