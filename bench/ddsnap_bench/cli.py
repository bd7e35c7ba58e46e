"""The command line of ``bench/run``: its options and their defaults (``--quick``,
``--scaling``, ``--cluster``, ``--send``), checked before anything runs; ``main`` checks
the tools, runs a :class:`~ddsnap_bench.runner.Bench` with Ctrl-C / SIGTERM cleaning up,
or rewrites a saved run's report (``--from-state``)."""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
from pathlib import Path

from .cluster import have_tools
from .common import (
    ALL_WORKLOADS,
    CLUSTER_KILLS,
    CLUSTER_REPEAT,
    CLUSTER_TTL,
    DDSNAP,
    DEFAULT_QCOW2_MAX,
    DEFAULT_WORKLOADS,
    ROOT,
    SCALING_SNAPSHOTS,
    SCALING_WORKLOADS,
    SEND_CHANGE,
    SEND_QUICK_SIZE,
    SEND_SIZE,
    BenchError,
    GiB,
    KiB,
    MiB,
    Stop,
    TiB,
    size_arg,
)
from .report import report_from_state
from .runner import Bench


def parse_args(argv: list[str]):
    p = argparse.ArgumentParser(
        prog="bench/run",
        description="Run the same fio jobs over NBD against ddsnap, qemu-nbd (qcow2) and "
                    "nbdkit (file), time `ddsnap merge` against dd/cp copies of the same "
                    "bytes, time snapshot creation, measure the server's peak RSS on a "
                    "sparse 1 TiB origin, and write a markdown report headed by issue 4's "
                    "targets; with --scaling, issue 9's snapshot count scaling instead "
                    "(N = 1, 1024, 10000: copy-on-write, overwrite and snapshot read "
                    "figures at N over N=1, creation at 10,000, deletes, metadata per "
                    "exception).",
        epilog="`bench/run --from-state bench/out/last-run.pickle [--out FILE]` writes the "
               "report of the last run again (every run saves its results there) without "
               "running anything.")
    p.add_argument("--snapshots", help="comma-separated snapshot counts N (any N: format v3 "
                                       "stores have no snapshot limit) [1,64,1024; 1,64 "
                                       f"with --quick; {SCALING_SNAPSHOTS} with --scaling]")
    p.add_argument("--scaling", action="store_true",
                   help="issue 9's snapshot count scaling: the defaults become --snapshots "
                        f"{SCALING_SNAPSHOTS} --workloads {','.join(SCALING_WORKLOADS)} "
                        "--out docs/benchmarks-scaling.md (each can still be given)")
    p.add_argument("--cluster", action="store_true",
                   help="issue 12 alone (root: network namespaces): the failover time "
                        "(SIGKILL of a cluster's metadata server to the first write "
                        "acknowledged on each of two nodes, over --kills kills) and a node's "
                        "4 KiB overwrite and snapshot-read IOPS on another host against the "
                        "server's local worker; writes only the section \"Cluster (issue "
                        "12)\" of --out, keeping the rest of the file")
    p.add_argument("--send", action="store_true",
                   help="issue 13 alone: `ddsnap send` of a snapshot with --send-change of "
                        "its chunks changed since the base, full against incremental, and "
                        "`ddsnap send | ddsnap receive` into a fresh store against nbdcopy "
                        "of the same snapshot; writes only the section \"Send and receive "
                        "(issue 13)\" of --out, keeping the rest of the file")
    p.add_argument("--send-change", type=float, default=SEND_CHANGE,
                   help=f"--send: share of the volume's chunks written between the two "
                        f"snapshots, whole chunks picked at random [{SEND_CHANGE:g}]")
    p.add_argument("--kills", type=int,
                   help=f"--cluster: SIGKILLs of the elected metadata server timed "
                        f"[{CLUSTER_KILLS}; 2 with --quick]")
    p.add_argument("--lease-ttl", type=float, default=CLUSTER_TTL,
                   help=f"--cluster: `serve --lease-ttl` [{CLUSTER_TTL:g}]")
    p.add_argument("--chunk-size", type=size_arg,
                   help="ddsnap chunk size and qcow2 cluster size [64K]")
    p.add_argument("--duration", type=float, help="seconds per fio run [10; 2 with --quick]")
    p.add_argument("--size", type=size_arg,
                   help="origin size, all of it random data [1G; 64M with --quick; "
                        f"{SEND_SIZE >> 30}G with --send, "
                        f"{SEND_QUICK_SIZE >> 20}M with --send --quick]")
    p.add_argument("--repeat", type=int,
                   help="runs per cell (fio, merge, peak RSS): median (min–max) "
                        f"[3; {CLUSTER_REPEAT} per endpoint with --cluster; 1 with --quick]")
    p.add_argument("--out", help="markdown file to write [docs/benchmarks.md; "
                                 "bench/out/quick.md with --quick]")
    p.add_argument("--quick", action="store_true",
                   help="small smoke run of every workload: --size 64M --duration 2 "
                        "--snapshots 1,64 --repeat 1 --snap-creates 5 --rss-seq-size 256M")
    p.add_argument("--serve-workers", type=int,
                   help="`ddsnap serve --workers N` (0: one process) [serve's default: "
                        "as many workers as CPUs]")
    p.add_argument("--iodepth-rand", type=int, default=32, help="iodepth of 4 KiB jobs [32]")
    p.add_argument("--iodepth-seq", type=int, default=16, help="iodepth of 1 MiB jobs [16]")
    p.add_argument("--workloads",
                   help=f"comma-separated subset of {','.join(ALL_WORKLOADS)} "
                        f"[{','.join(DEFAULT_WORKLOADS)}; with --scaling "
                        f"{','.join(SCALING_WORKLOADS)}]")
    p.add_argument("--interleave", action=argparse.BooleanOptionalAction,
                   help="run repetition i of a workload at every N back to back (ddsnap's "
                        "reads with one server per N up at once), so that the ratios at N "
                        "over N=1 pair runs made close together in time [on with "
                        "--scaling, else off]")
    p.add_argument("--qcow2-max-snapshots", type=int, default=DEFAULT_QCOW2_MAX,
                   help="largest N at which the qemu-nbd qcow2 peer runs (its image is made "
                        "with one `qemu-img snapshot -c` per snapshot, each slower than the "
                        f"last); 0 never [{DEFAULT_QCOW2_MAX}]")
    p.add_argument("--scaling-count", type=int, default=10000,
                   help="scaling workload: snapshots in the stores where creation and "
                        "deletes are timed [10000]")
    p.add_argument("--create-samples", type=int, default=50,
                   help="scaling workload: `snap_create` requests timed one by one on the "
                        "empty store and again once --scaling-count snapshots exist [50]")
    p.add_argument("--delete-fills", default="0,100000",
                   help="scaling workload: one store per value, with that many extra origin "
                        "history entries (copy-outs) spread over its snapshots [0,100000]")
    p.add_argument("--delete-exclusive", default="100,1000",
                   help="scaling workload: k of the snapshots made with k exclusive "
                        "copy-outs and deleted (after one with none) [100,1000]")
    p.add_argument("--delete-chunk-size", type=size_arg, default=4 * KiB,
                   help="scaling workload: chunk size of those stores (small, so that 10^5 "
                        "copy-outs are 400 MiB, not 6 GiB) [4K]")
    p.add_argument("--delete-write-points", type=int, default=100,
                   help="scaling workload: the extra entries are written in this many "
                        "bursts, spread over the snapshots [100]")
    p.add_argument("--merge-fraction", type=float, default=1.0,
                   help="merge workload: fraction of the origin overwritten after the "
                        "snapshot, i.e. merged back [1.0]")
    p.add_argument("--merge-modes", default="local,served",
                   help="merge workload: local (`merge --wait`, store not served), served "
                        "(through the control socket), or both [local,served]")
    p.add_argument("--snap-creates", type=int,
                   help="snapcreate workload: snapshots K timed through the control socket "
                        "per origin [20; 5 with --quick]")
    p.add_argument("--cli-creates", type=int, default=3,
                   help="snapcreate workload: whole `ddsnap snap create` commands timed "
                        "per origin, for information [3]")
    p.add_argument("--snapcreate-origins", default="64G,1G",
                   help="snapcreate workload: sizes of the sparse origins [64G,1G]")
    p.add_argument("--rss-origin-size", type=size_arg, default=TiB,
                   help="rss workload: size of the sparse origin [1T]")
    p.add_argument("--rss-store-size", type=size_arg, default=64 * GiB,
                   help="rss workload: size of the (sparse) store file [64G]")
    p.add_argument("--rss-seq-size", type=size_arg,
                   help="rss workload: range of the origin / snapshot covered by the 1 MiB "
                        "sequential jobs, from offset 0 [4G; 256M with --quick]")
    p.add_argument("--profile", action="store_true",
                   help="sample the ddsnap server with py-spy during each ddsnap fio job, "
                        "the served merge and the scaling workload's timed creations and "
                        "deletes; raw stacks go to bench/out/profiles/ and the "
                        "report lists the hottest functions (profiled figures are lower)")
    p.add_argument("--profile-rate", type=int, default=250,
                   help="py-spy samples per second [250]")
    p.add_argument("--tmpdir", default="/var/tmp",
                   help="where the temporary directory is made [/var/tmp]")
    p.add_argument("--access", choices=("auto", "nbd", "nbdfuse"), default="auto",
                   help="fio's nbd engine, or nbdfuse + libaio on the FUSE file [auto]")
    p.add_argument("--samples", type=int, default=64,
                   help="chunks read from each checked snapshot by the sampled data check "
                        "[64]")
    p.add_argument("--sample-snapshots", type=int, default=64,
                   help="snapshots the sampled data check reads, evenly spread from the "
                        "first to the last (all of them when N is not larger) [64]")
    p.add_argument("--rev", help="benchmark ddsnap as committed in git revision REV (git "
                                 "archive into the temporary directory) instead of the "
                                 "working tree")
    p.add_argument("--no-verify", action="store_true",
                   help="skip reading snapshots back whole with nbdcopy to compare them")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    a = p.parse_args(argv)
    a.argv = argv
    q = a.quick
    a.snapshots = a.snapshots or (SCALING_SNAPSHOTS if a.scaling else
                                  "1,64" if q else "1,64,1024")
    try:
        a.snapshots = [int(x) for x in a.snapshots.split(",") if x.strip()]
    except ValueError:
        p.error("--snapshots takes comma-separated integers, e.g. 1,64")
    if not a.snapshots or min(a.snapshots) < 1:
        p.error("--snapshots: each N must be at least 1")
    a.snapshots = sorted(set(a.snapshots))
    a.chunk_size = a.chunk_size or 64 * KiB
    if a.chunk_size & (a.chunk_size - 1) or not 4 * KiB <= a.chunk_size <= MiB:
        p.error("--chunk-size must be a power of two from 4K to 1M")
    a.duration = a.duration or (2.0 if q else 10.0)
    a.size = a.size or (SEND_QUICK_SIZE if a.send and q else SEND_SIZE if a.send else
                        64 * MiB if q else GiB)
    if a.size % (2 * a.chunk_size):
        p.error("--size must be a multiple of twice the chunk size")
    a.repeat = a.repeat or (1 if q else CLUSTER_REPEAT if a.cluster else 3)
    if a.repeat < 1:
        p.error("--repeat must be at least 1")
    a.out = a.out or str(ROOT / ("docs/benchmarks-scaling.md" if a.scaling else
                                 "bench/out/quick.md" if q else "docs/benchmarks.md"))
    if sum((a.cluster, a.scaling, a.send)) > 1:
        p.error("--cluster, --scaling and --send are separate runs")
    if not 0 < a.send_change <= 1:
        p.error("--send-change must be in (0, 1]")
    if a.kills is None:
        a.kills = 2 if q else CLUSTER_KILLS
    if a.kills < 1 or a.lease_ttl <= 0:
        p.error("--kills must be at least 1, --lease-ttl more than 0")
    if a.interleave is None:
        a.interleave = a.scaling
    a.workloads = a.workloads or ",".join(SCALING_WORKLOADS if a.scaling
                                          else DEFAULT_WORKLOADS)
    a.workloads = [w.strip() for w in a.workloads.split(",") if w.strip()]
    if not a.workloads or set(a.workloads) - set(ALL_WORKLOADS):
        p.error(f"--workloads: choose from {','.join(ALL_WORKLOADS)}")
    if not 0 < a.merge_fraction <= 1:
        p.error("--merge-fraction must be in (0, 1]")
    a.merge_modes = [m.strip() for m in a.merge_modes.split(",") if m.strip()]
    if not a.merge_modes or set(a.merge_modes) - {"local", "served"}:
        p.error("--merge-modes: local, served or local,served")
    a.snap_creates = a.snap_creates or (5 if q else 20)
    if a.snap_creates < 1 or a.cli_creates < 0:
        p.error("--snap-creates must be at least 1, --cli-creates at least 0")
    try:
        a.delete_fills = [int(x) for x in a.delete_fills.split(",") if x.strip()]
        a.delete_exclusive = [int(x) for x in a.delete_exclusive.split(",") if x.strip()]
    except ValueError:
        p.error("--delete-fills and --delete-exclusive take comma-separated integers")
    if not a.delete_fills or min(a.delete_fills) < 0:
        p.error("--delete-fills: give at least one count, each at least 0")
    if min(a.delete_exclusive, default=1) < 1:
        p.error("--delete-exclusive: each k must be at least 1")
    dcs = a.delete_chunk_size
    if dcs & (dcs - 1) or not 4 * KiB <= dcs <= MiB or a.size % dcs:
        p.error("--delete-chunk-size must be a power of two from 4K to 1M dividing --size")
    if sum(a.delete_exclusive) > a.size // dcs // 4:
        p.error("--delete-exclusive: the k ranges must fit in the first quarter of the "
                "origin (--size / --delete-chunk-size / 4 chunks)")
    if a.scaling_count < 10 * (len(a.delete_exclusive) + 2):
        p.error("--scaling-count is too small for the snapshots to delete")
    if a.create_samples < 1 or a.delete_write_points < 1 or a.sample_snapshots < 2:
        p.error("--create-samples and --delete-write-points must be at least 1, "
                "--sample-snapshots at least 2")
    try:
        a.snapcreate_origins = [size_arg(x) for x in a.snapcreate_origins.split(",")
                                if x.strip()]
    except argparse.ArgumentTypeError as e:
        p.error(f"--snapcreate-origins: {e}")
    if not a.snapcreate_origins:
        p.error("--snapcreate-origins: give at least one size")
    a.rss_seq_size = a.rss_seq_size or (256 * MiB if q else 4 * GiB)
    for name in ("rss_origin_size", "rss_store_size", "rss_seq_size"):
        if getattr(a, name) % a.chunk_size:
            p.error(f"--{name.replace('_', '-')} must be a multiple of the chunk size")
    if a.profile_rate < 1:
        p.error("--profile-rate must be at least 1")
    return a


def main(argv: list[str]) -> int:
    if argv[:1] == ["--from-state"]:
        if len(argv) not in (2, 4) or (len(argv) == 4 and argv[2] != "--out"):
            print("usage: bench/run --from-state STATE [--out FILE]", file=sys.stderr)
            return 2
        return report_from_state(Path(argv[1]), argv[3] if len(argv) == 4 else None)
    args = parse_args(argv)
    tools = (have_tools() if args.cluster else
             [t for t in ("nbdcopy", "openssl", "cmp", "sync") if shutil.which(t) is None]
             if args.send else
             [t for t in ("fio", "qemu-img", "qemu-nbd", "nbdkit", "nbdcopy", "cmp", "dd",
                          "cp", "sync") if shutil.which(t) is None])
    for tool in tools:
        print(f"bench: {tool} not found; run scripts/setup", file=sys.stderr)
        return 2
    if args.cluster and os.geteuid() != 0:
        print("bench: --cluster needs root (it makes network namespaces)", file=sys.stderr)
        return 2
    if not DDSNAP.exists():
        print(f"bench: {DDSNAP} not found; run scripts/setup", file=sys.stderr)
        return 2
    if args.profile and not (shutil.which("py-spy", path=str(ROOT / ".venv" / "bin"))
                             or shutil.which("py-spy")):
        print("bench: --profile needs py-spy; `bench/run` installs it "
              "(.venv/bin/pip install -e '.[test,bench]')", file=sys.stderr)
        return 2

    def stop(signum, frame):
        raise Stop(signal.Signals(signum).name)

    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started in background
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGHUP, stop)
    bench = Bench(args)
    try:
        return bench.main()
    except BenchError as e:
        print(f"bench: {e}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, Stop) as e:
        print(f"\nbench: interrupted ({str(e) or 'SIGINT'}); cleaning up", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # finish cleaning up undisturbed
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        bench.cleanup()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
