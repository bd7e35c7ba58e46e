"""The store's model, free of any format or device: what a snapshot is (its description),
what a check finds, the root state every commit carries, the full-store policies, and the
rule for a store's geometry.  Every layer above the on-disk format (the store API, the
service, the CLI) speaks these; ``format.py`` only adds how they are packed into bytes.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import time
from dataclasses import dataclass

from ..errors import InvalidArgument, ProtocolError


@dataclass(frozen=True)
class SnapshotInfo:
    """A live snapshot.

    Attributes:
        name: the export name (1..255 bytes of UTF-8).
        id: its version id: unique, never reused.
        created: creation time, nanoseconds since the Unix epoch (UTC).
        read_only: writes are refused.
        parent: the version it was taken of: 0 for the origin, else a snapshot's id.
        parent_name: ``"origin"``, the parent snapshot's name, or None when the parent
            was deleted (it lives on as a ghost for this snapshot's sake).
        size: the volume's size in bytes (0: the origin's size).
    """

    name: str
    id: int
    created: int
    read_only: bool
    parent: int = 0
    parent_name: str | None = "origin"
    size: int = 0

    @property
    def created_iso(self) -> str:
        """Creation time as ISO 8601 UTC, e.g. ``2026-11-21T10:00:00.123456Z``."""
        t = _dt.datetime.fromtimestamp(self.created / 1e9, tz=_dt.UTC)
        return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")

    def to_wire(self) -> dict:
        """Every field as JSON types (the csnap protocol's snapshot record)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_wire(cls, d: dict) -> SnapshotInfo:
        """The snapshot :meth:`to_wire` described (ProtocolError if it is not one)."""
        try:
            info = cls(**d)
        except TypeError as e:
            raise ProtocolError(f"not a snapshot record: {e}") from None
        if not (isinstance(info.name, str) and isinstance(info.id, int)
                and isinstance(info.created, int) and isinstance(info.size, int)):
            raise ProtocolError(f"not a snapshot record: {d!r:.200}")
        return info

    def to_dict(self) -> dict:
        return {"name": self.name, "id": self.id, "created": self.created_iso,
                "read_only": self.read_only, "parent": self.parent_name,
                "parent_id": self.parent, "size": self.size}


@dataclass
class Finding:
    """One result of a consistency check.

    Attributes:
        severity: ``"fatal"`` (data or metadata is wrong) or ``"warning"`` (e.g. a leak).
        block: the metadata block number concerned, or None.
        message: what is wrong.
    """

    severity: str
    block: int | None
    message: str

    def to_dict(self) -> dict:
        return {"severity": self.severity, "block": self.block, "message": self.message}


def utc_iso(ns: int) -> str:
    """``ns`` nanoseconds since the Unix epoch as ``2026-11-21T10:00:00Z`` (UTC, seconds)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ns / 1e9))


#: no snapshot is being merged
NO_MERGE = 0xFFFFFFFF
#: full-store policies (``ddsnap set STORE full-policy=...``)
FULL_POLICIES = ("error", "delete-oldest")


@dataclass
class State:
    """The volatile root state, carried by every journal commit and by the superblock.

    Attributes:
        root: block number of the B-tree root (an index node).
        levels: number of index-node levels above the leaves (>= 1).
        next_snapshot_id: the id the next snapshot gets (ids are never reused).
        merge_version: version id of the snapshot being merged into the origin, or
            :data:`NO_MERGE`.
        merge_keep: keep the merged snapshot when the merge completes.
        merge_cursor: logical chunks below this are merged (seed 003's progress).
        full_policy: index into :data:`FULL_POLICIES`.
    """

    root: int = 0
    levels: int = 1
    next_snapshot_id: int = 1
    merge_version: int = NO_MERGE
    merge_keep: bool = False
    merge_cursor: int = 0
    full_policy: int = 0

    def copy(self) -> State:
        return State(self.root, self.levels, self.next_snapshot_id, self.merge_version,
                     self.merge_keep, self.merge_cursor, self.full_policy)


@dataclass(frozen=True)
class Receiving:
    """A receive in progress on a store (``ddsnap receive``, issue 13; docs/stream.md).

    ``source`` is the sending store's 16-byte UUID; ``snapshot`` and ``base`` the ids of
    the stream's snapshot and of its base in that store (``base`` 0: a full stream);
    ``offset`` the bytes of the volume, from 0, whose records are applied to the origin
    and durable (a resumed stream starts there); ``size`` the volume size in bytes;
    ``name``, ``created`` (ns since the Unix epoch) and ``read_only`` describe the
    snapshot the receive creates when it completes.
    """

    source: bytes
    snapshot: int
    base: int
    offset: int
    size: int
    name: str
    created: int
    read_only: bool


@dataclass(frozen=True)
class Received:
    """The last receive a store completed: snapshot ``snapshot`` of the store with UUID
    ``source`` is this store's snapshot ``local`` (the base an incremental stream from
    that store must start from)."""

    source: bytes
    snapshot: int
    local: int


def check_geometry(chunk_size: int, max_snapshots: int) -> None:
    """Validate ``--chunk-size`` and ``--max-snapshots``.

    Raises:
        InvalidArgument: chunk size not a power of two in [4 KiB, 1 MiB], or a snapshot
            limit that is negative or above 2^32 - 3 (0 means no limit).
    """
    if chunk_size < 4096 or chunk_size > 1 << 20 or chunk_size & (chunk_size - 1):
        raise InvalidArgument(f"chunk size must be a power of two from 4K to 1M, not {chunk_size}")
    if not 0 <= max_snapshots <= 0xFFFFFFFD:
        raise InvalidArgument(f"max snapshots must be 0 (no limit) or a positive count, "
                              f"not {max_snapshots}")
