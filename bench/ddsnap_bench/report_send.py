"""The report's "Send and receive (issue 13)" section (``bench/run --send``): a full
``ddsnap send`` of a snapshot against an incremental one when 1% of the volume changed
since its base (target: full time / incremental time at least 20), and ``ddsnap send |
ddsnap receive`` into a fresh store against ``nbdcopy`` of the same snapshot (target:
at least 0.8 of nbdcopy's MB/s), with how they were measured.  A send run writes only
this section, between ``<!-- send-start -->`` and ``<!-- send-end -->`` in the output
file, keeping the rest of the file (a new one goes after the cluster section); a full
run keeps the section it finds there (:func:`kept_send_section`)."""

from __future__ import annotations

import os
import re
import shlex
import statistics
from pathlib import Path

from .common import (
    SEND_CHANGE,
    SEND_QUICK_SIZE,
    SEND_SEED,
    SEND_SIZE,
    SEND_TARGET_RATIO,
    SEND_TARGET_THROUGHPUT,
    fmt_size,
    say,
    stats_text,
)
from .report_base import ReportBase
from .report_sections import profile_tables

HEADING = "## Send and receive (issue 13)"
START, END = "<!-- send-start -->", "<!-- send-end -->"
_SECTION = re.compile(re.escape(HEADING) + r"\n\n" + re.escape(START) + r".*?"
                      + re.escape(END) + r"\n", re.S)
_CLUSTER_END = "<!-- cluster-end -->\n"


def kept_send_section(out: Path) -> str:
    """The send section of the file ``out`` (heading to end marker and newline), or
    ''."""
    try:
        m = _SECTION.search(out.read_text())
    except OSError:
        return ""
    return m.group(0) if m else ""


def splice(existing: str | None, section: str) -> str:
    """``existing`` with its send section replaced by ``section``; without one, the
    section goes after the cluster section, else before "## How to run it", else at
    the end."""
    if existing is None:
        return "# ddsnap benchmarks\n\n" + section
    if _SECTION.search(existing):
        return _SECTION.sub(lambda _m: section, existing, count=1)
    at = existing.find(_CLUSTER_END)
    if at >= 0:
        at += len(_CLUSTER_END)
        return existing[:at] + "\n" + section + existing[at:]
    at = existing.find("\n## How to run it")
    if at >= 0:
        return existing[:at + 1] + section + "\n" + existing[at + 1:]
    return existing.rstrip("\n") + "\n\n" + section


def write_send_report(b, out: Path) -> int:
    """Write the send section of run ``b`` into ``out`` (the rest kept) and print it."""
    section = SendReport(b).send_section()
    print()
    print(section)
    try:
        existing: str | None = out.read_text()
    except FileNotFoundError:
        existing = None
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(splice(existing, section))
    say(f"wrote the section \"{HEADING[3:]}\" of {out} (the run took {b.elapsed:.0f} s)")
    if b.problems:
        say(f"{len(b.problems)} problem(s) seen; they are listed in that section")
    return 0


def _secs(v: float) -> str:
    return f"{v:.2f} s"


def _mbs(v: float) -> str:
    return f"{v:,.0f} MB/s"


def _ratio(v: float) -> str:
    return f"{v:.2f}" if v < 10 else f"{v:.1f}"


class SendReport(ReportBase):
    """The send section (see the module's docstring)."""

    def _vals(self, runs: list, attr: str) -> list[float]:
        return [v for v in (getattr(m, attr) for m in runs) if v is not None]

    def _cell(self, runs: list, attr: str, fmt) -> str:
        vals = self._vals(runs, attr)
        return stats_text(vals, fmt) if vals else "–"

    def _pipe_ratios(self, attr: str) -> list[float]:
        """Per run: send | receive MB/s over the nbdcopy MB/s ``attr``."""
        return [m.pipe_mbs / getattr(m, attr) for m in self.b.pipe_runs
                if m.pipe_mbs and getattr(m, attr)]

    def targets(self) -> str:
        sr, pr = self.b.send_runs, self.b.pipe_runs
        rows = ["| target (issue 13) | measured: median (min–max) | target | met | notes |",
                "|---|---:|---:|---|---|"]
        ratios = self._vals(sr, "ratio")
        med = statistics.median(ratios) if ratios else None
        met = ("not measured" if med is None else
               "yes" if med >= SEND_TARGET_RATIO else "no")
        rows.append(f"| incremental send of {self.a.send_change:.0%} changed of a "
                    f"{fmt_size(self.a.size)} volume against a full send: full send time / "
                    f"incremental send time | {stats_text(ratios, _ratio) if ratios else '–'}"
                    f" | ≥ {SEND_TARGET_RATIO:g} | {met} | medians: full "
                    f"{self._cell(sr, 'full_s', _secs)}, incremental "
                    f"{self._cell(sr, 'incr_s', _secs)}; a cold `ddsnap --version` "
                    f"{self._cell(sr, 'startup_s', _secs)}, and without one in each time "
                    f"the ratio is {self._cell(sr, 'net_ratio', _ratio)} (information) |")
        ratios = self._pipe_ratios("flush_mbs")
        med = statistics.median(ratios) if ratios else None
        bad = any(m.bad or m.identical is False for m in pr)
        met = ("not measured" if med is None else "no (wrong data)" if bad else
               "yes" if med >= SEND_TARGET_THROUGHPUT else "no")
        rows.append(f"| `ddsnap send \\| ddsnap receive` into a fresh store against "
                    f"`nbdcopy --flush` of the same snapshot from `ddsnap serve`: MB/s over "
                    f"MB/s | {stats_text(ratios, _ratio) if ratios else '–'} | ≥ "
                    f"{SEND_TARGET_THROUGHPUT:g} | {met} | medians: send \\| receive "
                    f"{self._cell(pr, 'pipe_mbs', _mbs)}, nbdcopy --flush "
                    f"{self._cell(pr, 'flush_mbs', _mbs)} |")
        return "\n".join(rows)

    def send_table(self) -> str:
        sr = self.b.send_runs
        if not sr:
            return "(no send was timed; see problems)"
        size = self.a.size

        def per_run(attr: str, fn) -> str:
            vals = [fn(m) for m in sr if getattr(m, attr)]
            return stats_text(vals, lambda v: f"{v:,.0f}") if vals else "–"

        rows = ["| | full: `send STORE s2 -o FILE` | incremental: `send STORE s2 --from s1 "
                "-o FILE` |", "|---|---:|---:|",
                f"| wall time | {self._cell(sr, 'full_s', _secs)} | "
                f"{self._cell(sr, 'incr_s', _secs)} |",
                f"| stream size | {self._cell(sr, 'full_bytes', lambda v: f'{v:,.0f} B')} | "
                f"{self._cell(sr, 'incr_bytes', lambda v: f'{v:,.0f} B')} |",
                f"| volume bytes in DATA records | {size:,} (all of it) | "
                f"{self._cell(sr, 'incr_data_bytes', lambda v: f'{v:,.0f}')} |",
                f"| of which a cold start-up: `ddsnap --version` timed the same way "
                f"(information) | {self._cell(sr, 'startup_s', _secs)} | "
                f"{self._cell(sr, 'startup_s', _secs)} |",
                f"| CPU of the process (user + system) | "
                f"{self._cell(sr, 'full_cpu_s', _secs)} | "
                f"{self._cell(sr, 'incr_cpu_s', _secs)} |",
                f"| stream MB/s | {per_run('full_s', lambda m: m.full_bytes / 1e6 / m.full_s)}"
                f" | {per_run('incr_s', lambda m: m.incr_bytes / 1e6 / m.incr_s)} |"]
        return "\n".join(rows)

    def pipe_table(self) -> str:
        pr = self.b.pipe_runs
        if not pr:
            return "(no copy was timed; see problems)"
        r_flush = self._pipe_ratios("flush_mbs")
        r_sync = self._pipe_ratios("sync_mbs")

        def cpu(attr: str) -> str:
            vals = [getattr(m, attr) for m in pr if getattr(m, attr) is not None]
            share = [getattr(m, attr) / m.pipe_s for m in pr
                     if getattr(m, attr) is not None and m.pipe_s]
            if not vals:
                return "–"
            return (f"{stats_text(vals, _secs)} ("
                    f"{stats_text(share, lambda v: f'{v:.0%}')} of the wall time)")

        server = (f"nbdcopy {self._cell(pr, 'nbdcopy_cpu_s', _secs)}; `ddsnap serve` "
                  f"{self._cell(pr, 'server_cpu_s', _secs)}")
        rows = ["| copy of s2 | wall time | MB/s of the volume | send \\| receive / it "
                "| destination durable at the end | CPU |",
                "|---|---:|---:|---:|---|---|",
                f"| `ddsnap send A s2 \\| ddsnap receive B` | "
                f"{self._cell(pr, 'pipe_s', _secs)} | {self._cell(pr, 'pipe_mbs', _mbs)} | "
                f"1 (reference) | yes: receive flushes B's origin every 64 MiB and at the "
                f"end, and commits B | send {cpu('send_cpu_s')}; receive "
                f"{cpu('recv_cpu_s')} |",
                f"| `nbdcopy --flush URI DEST` | {self._cell(pr, 'nbdcopy_flush_s', _secs)} "
                f"| {self._cell(pr, 'flush_mbs', _mbs)} | "
                f"{stats_text(r_flush, _ratio) if r_flush else '–'} | yes: `--flush` "
                f"(nbdcopy syncs what it writes, and `fsync`s DEST at the end) | "
                f"{server} |",
                f"| `nbdcopy URI DEST2; sync DEST2` (information) | "
                f"{self._cell(pr, 'nbdcopy_sync_s', _secs)} | "
                f"{self._cell(pr, 'sync_mbs', _mbs)} | "
                f"{stats_text(r_sync, _ratio) if r_sync else '–'} | yes: `sync` of the file "
                f"after nbdcopy exited | – |"]
        return "\n".join(rows)

    def details(self) -> str:
        rows = ["| run | page cache dropped | full send | full stream | incremental send | "
                "incremental stream | full / incremental | `ddsnap --version` | send \\| "
                "receive | MB/s | send CPU | receive CPU | nbdcopy --flush | MB/s | nbdcopy "
                "+ sync | MB/s | B's origin == nbdcopy's copy |",
                "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
                "---:|---|"]
        pipes = {m.rep: m for m in self.b.pipe_runs}
        sends = {m.rep: m for m in self.b.send_runs}

        def f(v, fmt) -> str:
            return "–" if v is None else fmt(v)

        for rep in sorted(set(pipes) | set(sends)):
            s, p = sends.get(rep), pipes.get(rep)
            cold = [x.cold for x in (s, p) if x is not None]
            same = "–" if p is None or p.identical is None else (
                "yes" if p.identical else "⚠ NO")
            prof = " (py-spy attached)" if any(x.profiled for x in (s, p) if x) else ""
            rows.append(
                f"| {rep + 1}{prof} | {'yes' if cold and all(cold) else 'no'} | "
                f"{f(s and s.full_s, _secs)} | {f(s and s.full_bytes, lambda v: f'{v:,}')} | "
                f"{f(s and s.incr_s, _secs)} | {f(s and s.incr_bytes, lambda v: f'{v:,}')} | "
                f"{f(s and s.ratio, _ratio)} | {f(s and s.startup_s, _secs)} | "
                f"{f(p and p.pipe_s, _secs)} | "
                f"{f(p and p.pipe_mbs, lambda v: f'{v:,.0f}')} | "
                f"{f(p and p.send_cpu_s, _secs)} | {f(p and p.recv_cpu_s, _secs)} | "
                f"{f(p and p.nbdcopy_flush_s, _secs)} | "
                f"{f(p and p.flush_mbs, lambda v: f'{v:,.0f}')} | "
                f"{f(p and p.nbdcopy_sync_s, _secs)} | "
                f"{f(p and p.sync_mbs, lambda v: f'{v:,.0f}')} | {same} |")
        return "\n".join(rows)

    def cache_text(self) -> str:
        runs = [*self.b.send_runs, *self.b.pipe_runs]
        if not runs:
            return ""
        if all(m.cold for m in runs):
            return ("`sync` and `echo 3 > /proc/sys/vm/drop_caches` before every timed "
                    "command: each one started from a dropped page cache")
        return ("the page cache was NOT dropped before every timed command (see the "
                "notes): some runs read from the page cache")

    def profile_text(self) -> str:
        b, a = self.b, self.a
        if not a.profile:
            return ""
        if not b.profiles:
            return "\n**Profiles**: --profile was given, but none was recorded.\n"
        return (f"\n**Profiles** ({b.pyspy_version} `record --pid PID --format raw --rate "
                f"{a.profile_rate} --nonblocking --function --subprocesses`, attached to "
                f"each ddsnap process once it was started: the figures above are lower "
                f"than unprofiled ones; raw stacks in `bench/out/profiles/<label>.txt`):\n"
                + profile_tables(b.profiles, b.profile_runs, heading="####") + "\n")

    def send_section(self) -> str:
        a, b = self.a, self.b
        cmd = "bench/run" + ("" if not a.argv else " " + shlex.join(a.argv))
        ncpu = len(os.sched_getaffinity(0))
        busy = max([float(b.load_start[0]), float(b.load_end[0]), *b.load_samples])
        caveat = (f"\n\n**Caveat:** the 1-minute load average reached {busy:.1f} on {ncpu} "
                  f"CPUs around this run, so other processes competed for the CPUs; treat "
                  f"these figures as rough (rerun on a quiet machine)."
                  if busy > 0.5 * ncpu else "")
        reps = ("1 run" if a.repeat == 1 else
                f"{a.repeat} runs: median (min–max); a ratio pairs run i with run i and "
                f"shows the median (min–max) of those per-run ratios")
        st = b.send_setup
        chunks = (f"{st['chunks']:,} of its {st['nchunks']:,} chunks" if st else "its chunks")
        notes = "\n".join(f"- {x}" for x in b.send_notes) or "- (none)"
        problems = ("\n\n".join("```\n" + p + "\n```" for p in b.problems) if b.problems
                    else "None: every command exited 0, every server stopped cleanly on "
                         "SIGTERM, every received origin was byte for byte nbdcopy's copy "
                         "of s2, and the checks in the notes passed.")
        setup = "" if not st else (
            f"  Setup (once, not timed): {fmt_size(a.size)} of random data written in "
            f"{st['gen_s']:.1f} s, {st['chunks']:,} chunks written through NBD in "
            f"{st['write_s']:.1f} s; store files of {fmt_size(st['store_size'])} "
            f"(sparse); {st['openssl']}.  Then A's origin and store files were read once "
            f"from a dropped page cache, untimed"
            + (f" ({st['first_read_s']:.1f} s)" if "first_read_s" in st else "")
            + ": on this VM the first read of a file just written takes longer, in "
              "system time, than later ones (`dd` of a new 4 GiB file from a dropped "
              "page cache: 3.4–5.7 s, then 1.7–2.8 s), which would otherwise fall on run "
              "1's full send alone.")
        mach = "; ".join(f"{k}: {v}" for k, v in b.machine_rows if k in (
            "CPU", "memory", "kernel", "ddsnap"))
        nbdcopy = next((v for k, v in b.machine_rows if k == "nbdcopy"), "nbdcopy")
        between = "" if not b.load_samples else (
            f", at most {max(b.load_samples):.2f} in between (sampled every 5 s)")
        return f"""{HEADING}

{START}
Run {b.started.strftime('%Y-%m-%d %H:%M UTC')} with `{cmd}` (the whole run took \
{b.elapsed / 60:.1f} minutes).
Volume {fmt_size(a.size)} of random data, chunk {fmt_size(a.chunk_size)}, \
{a.send_change:.0%} of the volume ({chunks}) changed between snapshots s1 and s2;
{reps}.  Page cache: {self.cache_text()}.{caveat}

{self.targets()}

**Full and incremental send** of s2 to a file (`ddsnap send A s2 [--from s1]
--no-progress --json -o FILE`; send `fsync`s the file before it exits):

{self.send_table()}

**`ddsnap send | ddsnap receive` against `nbdcopy`**: the full stream of s2 piped into
`ddsnap receive B --no-progress --json` (a fresh store B: a new sparse origin file of
the volume's size, `ddsnap init --chunk-size {fmt_size(a.chunk_size)}`), timed from
starting both processes to both having exited, against {nbdcopy} reading s2 from
`ddsnap serve A --listen unix:SOCK --workers 0` (`nbd+unix:///s2?socket=SOCK`, nbdcopy's
default connections and requests) into a new file; MB/s = {a.size:,} bytes of the
volume / 10^6 / wall time; CPU = user + system time of the process (from `wait4`):

{self.pipe_table()}

**Every run**:

{self.details()}
{self.profile_text()}
**How it is run.**  Once: an origin file of {fmt_size(a.size)} of random data (an
AES-128-CTR keystream, `openssl enc -aes-128-ctr -K KEY -iv 0 -in /dev/zero`, key from
seed {SEND_SEED}, read and written in 4 MiB blocks), store A made with `ddsnap init
--chunk-size {fmt_size(a.chunk_size)}`, `ddsnap snap create A s1 --read-only`; then
{chunks}, picked uniformly at random (Python's `random.Random({SEND_SEED}).sample`),
each written whole with new random data through `ddsnap serve A --listen unix:SOCK
--workers 0` (the bench's NBD client on the origin export, 16 writes in flight, then
a flush), the server stopped with SIGTERM, `ddsnap snap create A s2 --read-only`.
`ddsnap diff A s1 s2` must list exactly the chunks written.{setup}  Each run (the
source store is only read, so every run uses the same one): `ddsnap --version`, the
full send, the incremental send, `send | receive` into a new store B, `nbdcopy URI
DEST2; sync DEST2`, then `nbdcopy --flush URI DEST`; the page cache dropped before
each; then `cmp` of B's origin file with DEST.  Run 1 also reads the incremental
stream back and compares its records with A's origin file (which reads as s2), compares
DEST with A's origin file, and runs `ddsnap check` and `ddsnap snap list` of B.  The
stream files, B and the copies are deleted after each run.

**Setup notes**:

{notes}

**Problems seen**:

{problems}

Machine: {mach}; load average (1, 5, 15 min) \
{' '.join(b.load_start)} at the start, {' '.join(b.load_end)} at the end{between}.
{END}
"""


def send_howto() -> str:
    """The lines of "How to run it" about --send (also in the full report)."""
    return f"""\
`bench/run --send` measures issue 13's figures alone and writes only the section "Send
and receive (issue 13)" of `--out` (default `docs/benchmarks.md`; with `--quick`,
`bench/out/quick.md`), keeping the rest of the file: a full `ddsnap send` of a
snapshot against an incremental one after `--send-change` (default {SEND_CHANGE:g}) of
the volume changed since its base, and `ddsnap send | ddsnap receive` into a fresh
store against `nbdcopy` of the same snapshot, each byte-compared (`--size`, default
{fmt_size(SEND_SIZE)} with `--send`, {fmt_size(SEND_QUICK_SIZE)} with `--quick`;
`--repeat`, `--chunk-size`, `--tmpdir`, `--profile`, `--keep` and `--rev REV` as
above).  It needs about 5 times `--size` of free space in `--tmpdir`.  Its results are
saved to `bench/out/last-send-run.pickle` (`--from-state` takes that file too).
"""
