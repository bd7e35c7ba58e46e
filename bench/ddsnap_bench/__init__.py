"""ddsnap benchmark: the same fio jobs over NBD against ddsnap and its peers.

Peers:

* ``ddsnap``  -- ``ddsnap serve`` on a store (``--chunk-size``, format v3: no snapshot
                 limit) whose origin is a raw file;
* ``qemu``    -- ``qemu-nbd`` on a qcow2 image (cluster size = ``--chunk-size``) holding the
                 same number of internal snapshots (up to ``--qcow2-max-snapshots``:
                 ``qemu-img snapshot -c`` slows down as they accumulate); the active
                 layer for writes, the snapshot (``-l``, read-only) for reads;
* ``nbdkit``  -- nbdkit's file plugin on a raw file holding the snapshot's bytes (the read
                 baseline).

Workloads, at each snapshot count N of ``--snapshots``:

1. 4 KiB random writes to the origin right after taking N snapshots (fresh setup);
2. 1 MiB sequential writes to the origin right after taking N snapshots (fresh setup);
3. 1 MiB sequential reads of a snapshot;
4. 4 KiB random reads of a snapshot;
5. ``merge``: ``ddsnap merge`` of a snapshot back into the origin (local ``--wait`` and
   served), in MiB/s of snapshot data, against ``dd`` and ``cp`` copying the same number
   of bytes; the origin must then equal the snapshot's bytes;
6. ``snapcreate``: wall time of ``snap_create`` requests on the control socket of a served
   store whose origin is a sparse 64 GiB file (and, to show it does not grow, 1 GiB), and
   of the whole ``ddsnap snap create`` command for information;
7. ``rss``: peak RSS (``VmHWM``) of ``ddsnap serve`` on a sparse 1 TiB origin with one
   snapshot while the four fio jobs run against it.

Issue 9 (snapshot count scaling; ``--scaling`` selects them with N = 1, 1024, 10000 and
writes the report's "Snapshot count scaling (issue 9)" section, to
``docs/benchmarks-scaling.md`` by default):

8. ``overwrite4k``: 4 KiB random writes to the origin after one 1 MiB pass over all of
   it, so that no write copies out (fresh setup, ``time_based``);
9. ``randread4k-newest``: 4 KiB random reads of snapshot N (``randread4k`` reads snap1);
10. ``scaling``: on stores of ``--scaling-count`` snapshots (4 KiB chunks, sparse
   origin, ``--delete-fills`` extra origin history entries each), ``snap_create``
   round trips timed on the empty store and with all of them there, then deletes of a
   snapshot with no exclusive data and of snapshots with k exclusive copy-outs
   (``--delete-exclusive``), each ``snap_delete`` timed (its reply comes after the
   sweep).

With ``randwrite4k`` (copy-on-write) and ``randread4k`` (oldest snapshot) that is every
figure issue 9's criteria name, as ddsnap at N over ddsnap at 1; every ddsnap store is
also counted read-only after its server stopped (``bench/metaprobe.py``) for the
metadata bytes per exception.

Issue 12 (``--cluster``, run on its own; writes only the section "Cluster (issue 12)"
of ``--out``): etcd, two metadata servers and two nodes, each in a network namespace of
its own (a host), for

11. the failover time: the elected metadata server killed (SIGKILL) ``--kills`` times,
    timed to the first 4 KiB write + flush acknowledged through each node;
12. a node's ``overwrite4k`` and ``randread4k`` IOPS on another host over the server's
    local worker's (and, for information, a worker without ``--metadata-listen``).

Issue 13 (``--send``, run on its own; writes only the section "Send and receive (issue
13)" of ``--out``): a store over a 4 GiB origin of random data (``--size``), snapshot
s1, 1% of its chunks rewritten (``--send-change``), snapshot s2, for

13. the time of a full ``ddsnap send`` of s2 over an incremental one (``--from s1``);
14. ``ddsnap send | ddsnap receive`` into a fresh store against ``nbdcopy`` of s2 from
    ``ddsnap serve``, in MB/s of the volume, the received origin compared byte for byte.

With ``--profile``, py-spy samples the ddsnap server during each ddsnap fio job, the
served merge and, in the scaling workload, the creations timed at N and each delete; the
report then lists the hottest functions (with ``--send``: the send and receive
processes).

Run it through ``bench/run`` (which installs what it needs first); ``bench/run --help``
lists the parameters.  Results go to stdout and to a markdown file (``--out``), headed by
a table of issue 4's targets (measured, target, met or not).  Nothing fails the run on a
threshold.

The package, one module per part (each says what it measures or holds):

* :mod:`.cli` -- the command line; :mod:`.runner` -- one run (:class:`~.runner.Bench`,
  made of the mixins below) and what it ran on;
* :mod:`.common` -- paths, units, workload names, errors, helpers; :mod:`.results` --
  the fio workloads and the records of what was measured; :mod:`.processes` -- the
  long-running processes;
* :mod:`.peers` -- ddsnap, qemu-nbd qcow2 and nbdkit servers; :mod:`.fio` -- the fio
  runner; :mod:`.checks` -- the data checks; :mod:`.profiling` -- py-spy;
  :mod:`.nbdclient` -- the small NBD client of the data checks;
* the workloads: :mod:`.fio_workloads` (1-4, 8, 9), :mod:`.merge` (5),
  :mod:`.snapcreate` (6), :mod:`.rss` (7), :mod:`.scaling` (10), :mod:`.cluster` (11, 12,
  on hosts made by :mod:`.netns`), :mod:`.sendbench` (13, 14);
* the report: :mod:`.report` (the document), :mod:`.report_base`,
  :mod:`.report_targets`, :mod:`.report_sections`, :mod:`.report_scaling`,
  :mod:`.report_cluster`, :mod:`.report_send`.
"""
