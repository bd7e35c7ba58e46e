"""What a run measures, as data: the fio workloads (:class:`Workload` and the selection
by ``--workloads``) and one record per measured run of each workload family (an fio
job, a merge, snapshot creations, peak RSS, a store's metadata count, the scaling
workload's fills and deletes).  A run's results are pickled from these
(``bench/out/last-run.pickle``) for ``--from-state``."""

from __future__ import annotations

from dataclasses import dataclass, field

from ddsnap.units import parse_size

from .common import MiB


@dataclass(frozen=True)
class Workload:
    key: str
    title: str
    rw: str
    bs: str
    iodepth: int
    kind: str  # "write" (origin, fresh setup: copy-on-write), "overwrite" (origin, fresh
    #            setup, every chunk written once first) or "read" (snapshot)
    metric: str  # "iops" or "bw"
    snap: str = "oldest"  # reads: of snap1 ("oldest") or of snapN ("newest")
    connections: int = 1  # NBD connections (fio jobs, reported as one group)

    def fio_extra(self) -> list[str]:
        """fio options for the connections: one job per connection, summed."""
        if self.connections == 1:
            return []
        return [f"--numjobs={self.connections}", "--group_reporting"]

    def export(self, n: int) -> str:
        """The snapshot a read workload reads at N snapshots."""
        return "snap1" if self.snap == "oldest" else f"snap{n}"


def workloads(args) -> list[Workload]:
    """The fio workloads selected with --workloads."""
    return [w for w in all_workloads(args) if w.key in args.workloads]


def all_workloads(args) -> list[Workload]:
    return [
        Workload("randwrite4k", "4 KiB random writes to the origin", "randwrite", "4k",
                 args.iodepth_rand, "write", "iops"),
        Workload("seqwrite1m", "1 MiB sequential writes to the origin", "write", "1m",
                 args.iodepth_seq, "write", "bw"),
        Workload("seqread1m", "1 MiB sequential reads of a snapshot", "read", "1m",
                 args.iodepth_seq, "read", "bw"),
        Workload("randread4k", "4 KiB random reads of a snapshot", "randread", "4k",
                 args.iodepth_rand, "read", "iops"),
        Workload("overwrite4k", "4 KiB random overwrites of the origin (every chunk "
                 "already copied out)", "randwrite", "4k", args.iodepth_rand, "overwrite",
                 "iops"),
        Workload("randread4k-newest", "4 KiB random reads of the newest snapshot",
                 "randread", "4k", args.iodepth_rand, "read", "iops", snap="newest"),
        Workload("overwrite4k-2c", "4 KiB random overwrites of the origin (every chunk "
                 "already copied out), two connections", "randwrite", "4k",
                 args.iodepth_rand, "overwrite", "iops", connections=2),
        Workload("randread4k-2c", "4 KiB random reads of a snapshot, two connections",
                 "randread", "4k", args.iodepth_rand, "read", "iops", connections=2),
    ]


@dataclass
class Measure:
    iops: float
    mibs: float
    runtime_ms: int
    io_bytes: int
    lat_mean_us: float
    lat_p99_us: float
    extra: str = ""
    bad: list[str] = field(default_factory=list)  # data checks that failed around this run
    rep: int = 0  # repetition index (ratios pair rep i of ddsnap with rep i of the peer)
    profiled: bool = False  # py-spy was sampling the server during the run
    server_cpu_s: float | None = None  # CPU time (user + system) the ddsnap server used
    role_cpu_s: dict[str, float] | None = None  # --cluster: that time by process role

    def cpu_us_per_io(self, bs: str) -> float | None:
        """The ddsnap server's CPU time per I/O of the job (µs); what else the machine
        runs moves it less than it moves IOPS."""
        ios = self.io_bytes / parse_size(bs)
        return None if self.server_cpu_s is None or not ios else self.server_cpu_s * 1e6 / ios

    def value(self, metric: str) -> float:
        return self.iops if metric == "iops" else self.mibs


@dataclass
class MergeRun:
    """One timed merge of a snapshot into the origin, with its copy baselines."""

    mode: str  # "local" (store not served, `merge --wait`) or "served" (control socket)
    nbytes: int  # bytes of the snapshot's exceptions merged
    chunks: int
    merge_s: float
    dd_s: float | None = None
    dd_alloc: float | None = None  # fraction of the dd source range that is allocated
    cp_s: float | None = None
    server_rate: float | None = None  # chunks/s last reported by `merge_status` (served)
    status_s: float | None = None  # one `ddsnap merge --status --json` call (served)
    overwrite_mibs: float = 0.0
    used_after_overwrite: int = 0
    bad: list[str] = field(default_factory=list)  # wrong data after the merge
    unclean: list[str] = field(default_factory=list)  # ddsnap check / status not as expected
    profiled: bool = False  # py-spy was sampling the server during the merge (served)

    @property
    def mibs(self) -> float:
        return self.nbytes / MiB / self.merge_s

    @property
    def dd_mibs(self) -> float | None:
        return None if not self.dd_s else self.nbytes / MiB / self.dd_s

    @property
    def cp_mibs(self) -> float | None:
        return None if not self.cp_s else self.nbytes / MiB / self.cp_s


@dataclass
class SnapCreateRun:
    """``snap_create`` timings on one served store with a sparse origin."""

    origin_size: int
    ctl_ms: list[float] = field(default_factory=list)  # control socket round trips
    cli_ms: list[float] = field(default_factory=list)  # whole `ddsnap snap create` commands
    version_ms: list[float] = field(default_factory=list)  # `ddsnap --version` (start-up)
    unclean: list[str] = field(default_factory=list)


@dataclass
class RssRun:
    """Peak RSS of `ddsnap serve` on a sparse origin through the four fio jobs."""

    rep: int
    hwm: int = 0  # VmHWM before the server was stopped (bytes)
    rss: int = 0  # VmRSS at the same moment
    start_rss: int = 0  # VmRSS once serving with the snapshot taken
    phases: list[tuple[str, float, str, int]] = field(default_factory=list)
    # (job, figure, unit, VmHWM after the job)
    bad: list[str] = field(default_factory=list)


@dataclass
class MetaSample:
    """A store's B-tree counted read-only after its server stopped (bench/metaprobe.py)."""

    case: str  # how the store was filled (a key of Report.META_CASES)
    n: int  # snapshots
    chunk_size: int
    levels: int  # index levels above the leaves
    leaves: int
    index_nodes: int
    records: int  # leaf records (exceptions, plus merge markers during a merge)
    exceptions: int  # store.exception_chunks()
    origin_entries: int  # records owned by the origin (its history entries)
    table_blocks: int  # the snapshot table's chain (not tree blocks; information)
    leaf_max: int  # records a full leaf holds

    @property
    def tree_blocks(self) -> int:
        return self.leaves + self.index_nodes

    @property
    def bytes_per_exception(self) -> float | None:
        return self.tree_blocks * 4096 / self.exceptions if self.exceptions else None


@dataclass
class DeleteRun:
    """One `snap_delete` among the snapshots of a ScaleFill."""

    name: str
    k: int  # exclusive copy-outs the fill gave it
    exclusive: int | None  # its `exclusive` figure before the delete (chunks; snap_list)
    ms: float  # control socket round trip (the reply comes after the sweep)
    freed: int  # chunks_used before minus after (exception chunks and tree blocks)


@dataclass
class ScaleFill:
    """A store with N snapshots of a sparse origin (chunk --delete-chunk-size), `extra`
    origin history entries spread over them and snapshots with k exclusive copy-outs;
    snapshot creation timed on it, then one snapshot of each kind deleted."""

    extra: int
    n: int
    chunk_size: int
    create_s: float = 0.0  # wall time of the pipelined snap_create requests (all N)
    write_s: float = 0.0  # wall time of the origin writes between them
    first_ms: list[float] = field(default_factory=list)  # the first creations, timed alone
    at_n_ms: list[float] = field(default_factory=list)  # creations timed when N existed
    list_s: float | None = None  # one `snap_list` round trip at N (figures computed)
    written_chunks: int = 0  # origin chunks written after a snapshot (copy-outs made)
    deletes: list[DeleteRun] = field(default_factory=list)
    meta: MetaSample | None = None  # after the deletes, server stopped
    bad: list[str] = field(default_factory=list)

    @property
    def exceptions_before(self) -> int | None:
        """Exceptions when the deletes started: those left plus those the deletes freed
        (each snapshot's exclusive figure)."""
        if self.meta is None or any(d.exclusive is None for d in self.deletes):
            return None
        return self.meta.exceptions + sum(d.exclusive for d in self.deletes)


@dataclass
class FailoverKill:
    """One SIGKILL of a cluster's metadata server (``--cluster``), timed from the kill:
    the standby's election and its "serving" line (seen in its log), and on each node
    the completion of a 4 KiB write + flush sent right after the kill."""

    index: int
    killed: str  # the server killed ("a" or "b")
    took_over: str  # the standby that took over
    epoch_before: int | None
    epoch_after: int | None = None
    elected_s: float | None = None  # its "elected for cluster" log line
    serving_s: float | None = None  # its "serving ... for cluster" line
    node_s: dict[str, float] = field(default_factory=dict)  # node -> write acknowledged
    node_errors: dict[str, str] = field(default_factory=dict)  # node -> what failed
    standby_s: float | None = None  # the killed one started again, until "standing by"


@dataclass
class SendRun:
    """One repetition of ``--send`` (issue 13) on the same source store: a full and an
    incremental ``ddsnap send -o FILE`` of snapshot s2 (times in seconds, sizes in
    bytes), each after the page cache was dropped (``cold``) or not."""

    rep: int
    full_s: float | None = None  # wall time of `ddsnap send STORE s2 -o FILE`
    full_bytes: int = 0  # bytes of that stream
    full_cpu_s: float | None = None  # CPU (user + system) of that process
    incr_s: float | None = None  # wall time of `ddsnap send STORE s2 --from s1 -o FILE`
    incr_bytes: int = 0
    incr_data_bytes: int = 0  # volume bytes its DATA records carry
    incr_cpu_s: float | None = None
    cold: bool = False  # the page cache was dropped before each of the two sends
    profiled: bool = False
    startup_s: float | None = None  # `ddsnap --version` from a dropped page cache

    @property
    def ratio(self) -> float | None:
        """Full send time over incremental send time."""
        return None if not self.full_s or not self.incr_s else self.full_s / self.incr_s

    @property
    def net_ratio(self) -> float | None:
        """The same without one cold start-up (``startup_s``) in each time, for
        information: what the sends themselves take."""
        if not self.full_s or not self.incr_s or self.startup_s is None:
            return None
        incr = self.incr_s - self.startup_s
        return None if incr <= 0 else (self.full_s - self.startup_s) / incr


@dataclass
class PipeRun:
    """One repetition of ``--send``'s throughput comparison: ``ddsnap send A s2 |
    ddsnap receive B`` into a fresh store against ``nbdcopy`` of s2 from ``ddsnap serve
    A`` into a new file (times in seconds, ``nbytes`` the volume's bytes)."""

    rep: int
    nbytes: int
    pipe_s: float | None = None  # wall time, both processes started to both exited
    send_cpu_s: float | None = None  # CPU (user + system) of the send process
    recv_cpu_s: float | None = None  # ... of the receive process
    stream_bytes: int = 0  # bytes of stream receive read (its --json summary)
    nbdcopy_flush_s: float | None = None  # `nbdcopy --flush URI DEST` (fsyncs DEST)
    nbdcopy_sync_s: float | None = None  # `nbdcopy URI DEST2; sync DEST2` (information)
    server_cpu_s: float | None = None  # CPU of `ddsnap serve` during `nbdcopy --flush`
    nbdcopy_cpu_s: float | None = None  # CPU of that nbdcopy process
    cold: bool = False  # the page cache was dropped before each timed copy
    identical: bool | None = None  # cmp of B's origin with the nbdcopy --flush output
    bad: list[str] = field(default_factory=list)  # what differed, or failed checks
    profiled: bool = False

    @staticmethod
    def _mbs(nbytes: int, secs: float | None) -> float | None:
        return None if not secs else nbytes / 1e6 / secs

    @property
    def pipe_mbs(self) -> float | None:
        """Volume MB/s (10^6 bytes per second) of ``send | receive``."""
        return self._mbs(self.nbytes, self.pipe_s)

    @property
    def flush_mbs(self) -> float | None:
        """Volume MB/s of ``nbdcopy --flush``."""
        return self._mbs(self.nbytes, self.nbdcopy_flush_s)

    @property
    def sync_mbs(self) -> float | None:
        """Volume MB/s of ``nbdcopy`` followed by ``sync`` of its output."""
        return self._mbs(self.nbytes, self.nbdcopy_sync_s)
