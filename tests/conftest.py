"""Shared pytest configuration and fixtures.

Hypothesis profiles, chosen with the ``HYPOTHESIS_PROFILE`` environment variable:

* ``ci`` (the default): derandomized, modest example counts, no deadline, so the suite is
  deterministic and quick on a small CI runner;
* ``thorough``: random seeds and many more examples, for a long run on a developer box.

Tests scale their own ``max_examples`` with :func:`examples`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from hypothesis import HealthCheck, settings

# The multi-host fixtures (``network``, ``etcd``) and the TLS one (``pki``), for every
# module; registered for assertion rewriting before pytest imports them as plugins.
pytest.register_assert_rewrite("hosts", "etcd_server", "certs")
pytest_plugins = ("hosts", "etcd_server", "certs")

if TYPE_CHECKING:
    from ddsnap.store.blockdev import FileDevice
    from ddsnap.store.memory import MemoryStore
    from ddsnap.store.shared import SharedStore

settings.register_profile(
    "ci", derandomize=True, deadline=None, max_examples=40, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile(
    "thorough", derandomize=False, deadline=None, max_examples=400, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
settings.load_profile(PROFILE)


def examples(ci: int) -> int:
    """``ci`` examples under the ``ci`` profile, ten times as many under ``thorough``."""
    return ci * 10 if PROFILE == "thorough" else ci


class StoreFactory:
    """Makes exception stores of each kind: ``make_store(kind, **geometry)``.

    ``kind`` is ``"shared-memory"`` (SharedStore on a MemoryDevice), ``"shared-file"``
    (SharedStore on a FileDevice in ``tmp_path``) or ``"memory"`` (MemoryStore).
    Geometry keywords: ``origin_size``, ``store_size`` (bytes of the store device; for a
    MemoryStore, of its data space), ``chunk_size``, ``max_snapshots`` and, for a shared
    store, ``journal_blocks``.  Returns the store;
    ``reopen(store)`` gives the same store after a clean close (a no-op for a MemoryStore).
    """

    def __init__(self, tmp_path: Path):
        self.tmp_path = tmp_path
        self.counter = 0
        self.opened: list[FileDevice] = []

    def __call__(self, kind: str, origin_size: int = 1 << 20, store_size: int = 4 << 20,
                 chunk_size: int = 4096, max_snapshots: int = 0,
                 journal_blocks: int | None = None) -> MemoryStore | SharedStore:
        from ddsnap.store.blockdev import BlockDevice, FileDevice, MemoryDevice
        from ddsnap.store.memory import MemoryStore
        from ddsnap.store.shared import SharedStore

        if kind == "memory":
            return MemoryStore(origin_size, store_size, chunk_size, max_snapshots)
        dev: BlockDevice
        if kind == "shared-memory":
            dev = MemoryDevice(store_size)
        elif kind == "shared-file":
            self.counter += 1
            file = FileDevice(str(self.tmp_path / f"store{self.counter}.img"),
                              create_size=store_size)
            self.opened.append(file)
            dev = file
        else:
            raise ValueError(kind)
        return SharedStore.create(dev, origin_size=origin_size, origin_path="origin.img",
                                  chunk_size=chunk_size, max_snapshots=max_snapshots,
                                  journal_blocks=journal_blocks)

    def reopen(self, store: MemoryStore | SharedStore) -> MemoryStore | SharedStore:
        from ddsnap.store.memory import MemoryStore
        from ddsnap.store.shared import SharedStore

        if isinstance(store, MemoryStore):
            return store
        store.close()
        return SharedStore.open(store.dev)

    def close(self) -> None:
        for dev in self.opened:
            dev.close()


@pytest.fixture
def make_store(tmp_path: Path) -> Iterator[StoreFactory]:
    """Factory for exception stores of each kind: see :class:`StoreFactory`."""
    factory = StoreFactory(tmp_path)
    yield factory
    factory.close()


@pytest.fixture
def sockdir() -> Iterator[str]:
    """A directory with a short path for unix sockets (their paths are limited to about
    107 bytes, which pytest's tmp_path can exceed); removed afterwards."""
    path = tempfile.mkdtemp(prefix="nbd")
    yield path
    shutil.rmtree(path, ignore_errors=True)
