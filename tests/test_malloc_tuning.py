"""``ddsnap serve``'s malloc tuning (``ddsnap.daemon.tune_malloc``): READ reply buffers of
1 MiB are reused from the heap instead of being mapped fresh, and page-faulted, each time."""

from __future__ import annotations

import platform
import resource

import pytest

from ddsnap.daemon import tune_malloc


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_reply_sized_buffers_are_reused_without_page_faults():
    assert tune_malloc() is True
    # As a server with 16 x 1 MiB READs in flight uses them: 16 buffers, all freed, again.
    # Untuned, glibc trims (or unmaps) the freed 16 MiB every round and the next round
    # faults every page in again: about 200,000 faults here.
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(50):
        bufs = [bytearray(1 << 20) for _ in range(16)]  # zero-filled: touches each page
        del bufs
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    assert faults < 50 * 16 * 256 // 10, faults
