"""How big a merge step is and how far a merge has come: the figures ``merge --status``
shows (seed 003: a merge runs in steps, resumable from its durable cursor)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

from ..units import parse_size

#: data one merge step moves at most (bytes): one origin flush and one commit per step
MERGE_STEP_BYTES = 32 << 20


#: environment variable that sets the merge step instead (``4K``, ``1M``, bytes)
MERGE_STEP_ENV = "DDSNAP_MERGE_STEP"


def merge_step_bytes() -> int:
    """Bytes of data a merge step moves at most: ``$DDSNAP_MERGE_STEP`` or
    :data:`MERGE_STEP_BYTES`.  Smaller steps make writes to chunks being merged wait less
    (each waits for its step), larger ones merge faster.

    Raises:
        InvalidArgument: the variable is not a positive size.
    """
    text = os.environ.get(MERGE_STEP_ENV, "").strip()
    if not text:
        return MERGE_STEP_BYTES
    return parse_size(text, MERGE_STEP_ENV, positive=True)


@dataclass
class MergeProgress:
    """How far the merge has come, in chunks (exceptions of the merging snapshot).

    What can be counted honestly: the format records which snapshot is being merged and
    the merge cursor, but not how many exceptions the merge began with, and a merged
    exception is gone.  So the count starts where this process met the merge:

    * ``counted_from == "start"``: this process started the merge; ``total`` is every
      exception the snapshot had then, so ``done`` and ``total`` cover the whole merge,
      across ``merge --stop`` and resumes in this process.
    * ``counted_from == "open"``: an earlier process started it (the store was reopened:
      a server restart, crash recovery, a local ``merge --wait``); ``total`` is what was
      left when this process opened the store, and what was merged before is not
      counted.  (Below the merge cursor everything is merged.)

    ``done`` counts the exceptions merged since, by merge steps and by origin writes that
    merge their chunks first; ``total - done`` is what is left.

    The rate is ``done`` over the seconds the merge was running since the count began:
    a status taken while it is not running (stopped with ``--stop``, stopped by an
    error, or nobody serving the store) marks it paused, the time until a status sees it
    running again is left out, and a paused merge reports no rate and no ETA (None).  So
    a pause never shows as a decaying rate.
    """

    total: int
    counted_from: str = "start"
    done: int = 0
    #: seconds of running time before :attr:`since`
    active: float = 0.0
    #: monotonic time the current running stretch began; None while paused
    since: float | None = field(default_factory=time.monotonic)

    def to_dict(self, name: str, keep: bool, cursor: int, running: bool) -> dict:
        """The status dict (``merge --status --json``); ``running`` says whether a worker
        is merging now.  Rate in chunks per second, ETA in seconds (None if unknown)."""
        now = time.monotonic()
        rate = eta = None
        left = max(0, self.total - self.done)
        if running:
            if self.since is None:
                self.since = now
            rate = self.done / max(1e-9, self.active + now - self.since)
            if rate > 0:
                eta = round(left / rate, 1)
            rate = round(rate, 3)
        elif self.since is not None:
            self.active += now - self.since
            self.since = None
        return {"snapshot": name, "keep": keep, "chunks_done": self.done,
                "chunks_total": self.total, "counted_from": self.counted_from,
                "cursor": cursor, "running": running, "chunks_per_second": rate,
                "eta_seconds": eta}
