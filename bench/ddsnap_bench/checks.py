"""Data checks around the measured runs (not timed): a snapshot read back whole with
``nbdcopy`` and compared with the bytes it was taken of, and sampled chunks of many
snapshots read with the small NBD client.  A figure measured on a server that then
fails a check is marked "wrong data" in the report."""

from __future__ import annotations

import os
import random
import subprocess
import time

from .common import MiB, fmt_size, say, spread, tail
from .nbdclient import NbdClient, NbdError


class DataChecks:
    """Snapshot data checks for :class:`~ddsnap_bench.runner.Bench` (a
    mixin: uses its ``args``, ``sock``, ``pristine``, ``uri()`` and ``problem()``)."""

    def verify(self, uri: str, what: str) -> list[str]:
        """Read the whole export with nbdcopy and compare it with the pristine bytes."""
        if self.args.no_verify:
            return []
        t0 = time.monotonic()
        cp = subprocess.Popen(["nbdcopy", uri, "-"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
        try:
            cmp = subprocess.run(["cmp", "-", str(self.pristine)], stdin=cp.stdout,
                                 capture_output=True, text=True,
                                 timeout=120 + self.args.size / (5 * MiB))
        except subprocess.TimeoutExpired:
            cp.kill()
            cp.wait()
            return [f"verify {what}: `nbdcopy {uri} - | cmp - pristine` did not finish in "
                    f"time (hang?)"]
        finally:
            cp.stdout.close()
        cerr = cp.stderr.read().decode(errors="replace")
        cp.stderr.close()
        crc = cp.wait()
        if cmp.returncode != 0:
            return [f"verify {what}: WRONG DATA: `nbdcopy {uri} - | cmp - pristine.raw`: "
                    f"{(cmp.stdout + cmp.stderr).strip()}"]
        if crc != 0:
            return [f"verify {what}: nbdcopy exit {crc}: {tail(cerr)}"]
        say(f"verified {what}: same bytes as the original image "
            f"({time.monotonic() - t0:.1f} s)")
        return []

    def sample_check(self, exports: list[str], what: str) -> list[str]:
        """Read --samples random chunks of each export (same offsets for all) and compare
        them with the pristine bytes; for a wrong chunk, say whether it holds the origin's
        current data."""
        if self.args.no_verify or not self.args.samples:
            return []
        cs, n = self.args.chunk_size, self.args.size // self.args.chunk_size
        picks = sorted(random.Random(1).sample(range(n), min(self.args.samples, n)))
        issues = []
        t0 = time.monotonic()
        with open(self.pristine, "rb") as f:
            want = {i: os.pread(f.fileno(), cs, i * cs) for i in picks}
        for export in exports:
            try:
                with NbdClient(str(self.sock), export) as c:
                    wrong = [i for i in picks if c.pread(cs, i * cs) != want[i]]
                    first = c.pread(cs, wrong[0] * cs) if wrong else None
                if wrong:
                    with NbdClient(str(self.sock), "origin") as c:
                        same = c.pread(cs, wrong[0] * cs) == first
                    issues.append(
                        f"{what}: WRONG DATA in snapshot {export}: {len(wrong)} of "
                        f"{len(picks)} sampled {fmt_size(cs)} chunks differ from the bytes "
                        f"it was taken with (first at offset {wrong[0] * cs}); that chunk "
                        + ("holds the origin's current data" if same else
                           "does not match the origin either"))
            except (OSError, NbdError) as e:
                issues.append(f"{what}: reading snapshot {export} with the NBD client: {e}")
        if not issues:
            say(f"sample check {what}: {len(picks)} chunks of each of {len(exports)} "
                f"snapshot(s) hold the original bytes ({time.monotonic() - t0:.1f} s)")
        return issues

    def check_ddsnap(self, n: int, what: str) -> list[str]:
        """Full compare of the first and last snapshot, sampled compare of up to
        --sample-snapshots of them (all of them when there are no more)."""
        issues = []
        for s in sorted({1, n}):
            issues += self.verify(self.uri(f"snap{s}"), f"ddsnap snap{s} {what}")
        issues += self.sample_check([f"snap{i}" for i in spread(n, self.args.sample_snapshots)],
                                    f"ddsnap {what}")
        for i in issues:
            self.problem(i)
        return issues
