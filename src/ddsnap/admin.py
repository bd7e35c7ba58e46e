"""Opening a store for use, and the administrative operations the CLI offers.

The operations (``snap_create``, ``snap_list``, ``snap_delete``, ``status``, ``check``) run
against a :class:`~ddsnap.store.service.MetadataService`.  The CLI runs them on a store it
opened itself or, when ``ddsnap serve`` holds the store, sends them over the server's
control socket (``ddsnap.control``), where the same functions run: the results are the
same either way.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import threading
from dataclasses import dataclass

from .errors import (CorruptMetadata, DdsnapError, InvalidArgument, NoMerge, OriginMismatch,
                     ServiceFailed, StoreBusy, StoreNotFound, host_error)
from .store.api import Finding
from .store.blockdev import FileDevice
from .store.format import VERSION
from .store.service import MetadataService
from .store.shared import SharedStore

log = logging.getLogger("ddsnap.admin")


@dataclass
class OpenStore:
    """A store opened and locked for exclusive use, with its origin and service."""

    path: str
    dev: FileDevice
    origin: FileDevice
    store: SharedStore
    service: MetadataService

    def reopen(self) -> SharedStore:
        """Open the store again from its device (journal recovery), for the service to
        serve in place of one a failed commit left untrusted in memory.

        Raises:
            OSError / DdsnapError: the store cannot be read or recovered (yet).
        """
        store = SharedStore.open(self.dev)
        self.store = store
        return store

    def close(self) -> None:
        """Commit, mark the store clean, release the lock."""
        try:
            self.service.close()
        finally:
            self.origin.close()
            self.dev.close()


def open_store(path: str) -> OpenStore:
    """Open, lock and recover the store at ``path``, and open its recorded origin.

    Raises:
        StoreNotFound: ``path`` does not exist.
        StoreBusy: another process (``ddsnap serve``) holds the store.
        NotAStore / CorruptMetadata: not a ddsnap store, or damaged.
        OriginMismatch: the recorded origin is missing or its size changed.
    """
    dev = FileDevice(path)
    try:
        if not dev.lock_exclusive():
            raise StoreBusy(f"snapshot store {path} is in use by another ddsnap process "
                            "(is it being served?)")
        store = SharedStore.open(dev)
        try:
            origin = FileDevice(store.origin_path, what="origin")
        except StoreNotFound:
            raise OriginMismatch(f"the origin recorded in {path}, {store.origin_path}, "
                                 "does not exist") from None
        if origin.size != store.origin_size:
            origin.close()
            raise OriginMismatch(
                f"origin {store.origin_path} is {origin.size} bytes but the store was made "
                f"for {store.origin_size} bytes")
        service = MetadataService(store, origin)
    except BaseException:
        dev.close()
        raise
    opened = OpenStore(os.path.abspath(path), dev, origin, store, service)
    service.reopen_store = opened.reopen
    return opened


# -- where a serving process can be reached ---------------------------------------------

def run_dir() -> str:
    """Directory for control sockets of block-device stores: ``$DDSNAP_RUNDIR`` or
    ``/run/ddsnap`` (root) or ``/tmp/ddsnap-UID``."""
    d = os.environ.get("DDSNAP_RUNDIR")
    if not d:
        d = "/run/ddsnap" if os.geteuid() == 0 else f"/tmp/ddsnap-{os.geteuid()}"
    os.makedirs(d, mode=0o700, exist_ok=True)
    return d


def registry_path(store_path: str) -> str:
    """The file where ``serve`` records its control socket for ``store_path``."""
    key = hashlib.sha256(os.path.realpath(store_path).encode()).hexdigest()[:16]
    return os.path.join(run_dir(), f"{key}.control")


def default_control_path(store_path: str) -> str:
    """``STORE.ctl`` next to a store file; under :func:`run_dir` for a block device."""
    real = os.path.realpath(store_path)
    try:
        is_blk = stat.S_ISBLK(os.stat(real).st_mode)
    except FileNotFoundError:
        is_blk = False
    if is_blk:
        return registry_path(store_path)[: -len(".control")] + ".ctl"
    return real + ".ctl"


# -- the operations -----------------------------------------------------------------------

def snap_create(svc: MetadataService, name: str, read_only: bool = False) -> dict:
    return svc.create_snapshot(name, read_only).to_dict()


def _snapshot_dicts(svc: MetadataService) -> list[dict]:
    """Each live snapshot with its space (lock held): ``exclusive`` bytes (store chunks
    only it uses: exactly what deleting it frees) and ``shared`` bytes (chunks it uses
    with other snapshots); None if the figures could not be counted (damaged tree)."""
    store = svc.store
    try:
        space = store.snapshot_space()
    except CorruptMetadata:
        space = None
    out = []
    for s in store.snapshots():
        d = s.to_dict()
        if space is not None:
            excl, shared = space.get(s.bit, (0, 0))
            d["exclusive"] = excl * store.chunk_size
            d["shared"] = shared * store.chunk_size
        else:
            d["exclusive"] = d["shared"] = None
        out.append(d)
    return out


def snap_list(svc: MetadataService) -> list[dict]:
    with svc.lock:
        return _snapshot_dicts(svc)


def snap_delete(svc: MetadataService, name: str) -> dict:
    return svc.delete_snapshot(name).to_dict()


def status(svc: MetadataService, path: str, served: bool) -> dict:
    """The store's geometry, space and snapshots (``ddsnap status --json``).

    ``failure`` is the last failed commit (None if none since the store was opened):
    ``error``, ``type``, ``errno``, ``time``, ``reopened`` (the store was reopened from
    its journal since) and ``reopen_error`` (why reopening it failed, if it did);
    ``reopens`` counts the reopens.
    """
    try:
        svc.recover()  # a store waiting to be reopened is reopened now, if it can be
    except ServiceFailed:
        pass  # reported in ``failure``
    with svc.lock:
        store = svc.store
        space = store.space()
        snaps = _snapshot_dicts(svc)
        cs = store.chunk_size
        out = {
            "store": path,
            "format_version": VERSION,
            "store_size": store.cow.size,
            "chunk_size": store.chunk_size,
            "chunks_total": space["chunks_total"],
            "chunks_free": space["chunks_free"],
            "chunks_used": space["chunks_used"],
            "used": space["chunks_used"] * cs,
            "free": space["chunks_free"] * cs,
            "origin": store.origin_path,
            "origin_size": store.origin_size,
            "max_snapshots": store.max_snapshots,
            "snapshots": snaps,
            "served": served,
            "full_policy": store.full_policy,
            "auto_deleted": list(svc.auto_deleted),
            "failure": dict(svc.failure) if svc.failure is not None else None,
            "reopens": svc.reopens,
        }
        if isinstance(store, SharedStore):
            out["uuid"] = store.uuid.hex()
            out["tree_levels"] = store.state.levels
            out["journal_blocks"] = store.journal.size
            out["recovered_transactions"] = store.recovered
    return out


def check(svc: MetadataService) -> dict:
    """Commit, then check the on-disk metadata (``ddsnap check --json``).

    Raises:
        ServiceFailed: the store failed and cannot be reopened (yet).
    """
    svc.recover()
    svc.commit()
    with svc.lock:
        try:
            findings = svc.store.check()
        except CorruptMetadata as e:
            findings = [Finding("fatal", e.block, e.why)]
    return findings_report(findings)


def findings_report(findings: list[Finding]) -> dict:
    fatal = sum(1 for f in findings if f.severity == "fatal")
    return {"clean": fatal == 0, "fatal": fatal,
            "warnings": len(findings) - fatal,
            "findings": [f.to_dict() for f in findings]}


def set_option(svc: MetadataService, key: str, value: str) -> dict:
    """``ddsnap set STORE KEY=VALUE``; the only key is ``full-policy``."""
    if key != "full-policy":
        raise InvalidArgument(f"unknown setting {key!r} (settable: full-policy)")
    svc.set_full_policy(value)
    return {key: value}


class MergeRunner:
    """Runs a merge in a background thread (the server's merge worker)."""

    def __init__(self, svc: MetadataService):
        self.svc = svc
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        #: the error that stopped the last merge run, if any
        self.error: DdsnapError | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def ensure(self) -> None:
        """Start the worker if a merge is in progress and nobody is running it."""
        if self.running or self.svc.store.merging_bit is None:
            return
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ddsnap-merge", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        self.error = None
        cursor = None  # the durable merge cursor when it last went on after a failure
        while True:
            failures = self.svc.failures
            try:
                self.svc.run_merge(self._stop)
                return
            except DdsnapError as e:  # the merge stays recorded and resumable
                if not self._stop.is_set() and self.svc.failures != failures:
                    # A commit failed under the merge: the store is reopened and the
                    # merge goes on from its durable cursor, unless it made no progress
                    # since it last did (a host that keeps failing stops it instead).
                    try:
                        self.svc.recover()
                    except ServiceFailed as again:
                        e = again
                    else:
                        now = self.svc.store.state.merge_cursor
                        if now != cursor:
                            cursor = now
                            continue
                self.error = e
                log.warning("merge stopped: %s; `ddsnap merge STORE NAME` resumes it", e)
                return
            except Exception as e:  # noqa: BLE001 - a bug: keep the server up, say so
                self.error = DdsnapError(f"internal error: {e}")
                log.exception("merge stopped by an internal error")
                return

    def stop(self) -> None:
        """Stop after the current step (the merge stays recorded and resumable)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None


def merge_start(svc: MetadataService, runner: MergeRunner | None, name: str,
                keep: bool = False) -> dict:
    st = svc.start_merge(name, keep)
    if runner is not None:
        runner.ensure()
        st["running"] = runner.running
    else:
        st["running"] = False
    return st


def merge_status(svc: MetadataService, runner: MergeRunner | None) -> dict | None:
    st = svc.merge_status(running=runner is not None and runner.running)
    if st is not None and runner is not None and not st["running"] and runner.error:
        st["error"] = runner.error.to_dict()  # why the merge stopped
    return st


def merge_stop(svc: MetadataService, runner: MergeRunner | None) -> dict:
    st = svc.merge_status()
    if st is None:
        raise NoMerge("no merge is in progress")
    if runner is not None:
        runner.stop()
    return svc.merge_status(running=False)


OPERATIONS = {
    "snap_create": snap_create,
    "snap_list": snap_list,
    "snap_delete": snap_delete,
    "set": set_option,
}


def run_op(svc: MetadataService, op: str, args: dict, path: str, served: bool,
           runner: MergeRunner | None = None):
    """Run operation ``op`` with ``args``; the one dispatcher for local and remote calls.

    ``runner`` is the server's merge worker (None when the CLI opened the store itself:
    a merge started then runs when the store is next served, or with ``merge --wait``).

    Raises:
        DdsnapError: the operation's own errors; an unknown op is a ProtocolError; an
            OSError from the host is raised as HostIOError (HostFull for ENOSPC).
    """
    try:
        return _run_op(svc, op, args, path, served, runner)
    except OSError as e:
        # The service names the device where it can; this is for the rest.
        raise host_error(e, "snapshot store", path) from e


def _run_op(svc: MetadataService, op: str, args: dict, path: str, served: bool,
            runner: MergeRunner | None):
    if op == "status":
        st = status(svc, path, served)
        st["merge"] = merge_status(svc, runner)
        return st
    if op == "check":
        return check(svc)
    if op == "merge_start":
        return merge_start(svc, runner, **args)
    if op == "merge_status":
        return merge_status(svc, runner)
    if op == "merge_stop":
        return merge_stop(svc, runner)
    fn = OPERATIONS.get(op)
    if fn is None:
        from .errors import ProtocolError
        raise ProtocolError(f"unknown control operation {op!r}")
    return fn(svc, **args)


__all__ = ["OpenStore", "open_store", "run_op", "registry_path", "default_control_path",
           "DdsnapError"]
