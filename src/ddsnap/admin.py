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
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .csnap.wire import coalesce
from .errors import (
    CorruptMetadata,
    DdsnapError,
    InvalidArgument,
    NoMerge,
    OriginMismatch,
    ReadOnlyVolume,
    ServiceFailed,
    StoreBusy,
    StoreNotFound,
    host_error,
)
from .service.api import MetadataService
from .service.local import LocalService
from .store.blockdev import BlockDevice, DirectFileDevice, FencedDevice, FileDevice
from .store.format import VERSION, OriginIdentity
from .store.model import Finding
from .store.shared import SharedStore
from .store.superblock import read_superblocks
from .units import human_bytes

log = logging.getLogger("ddsnap.admin")


@dataclass
class OpenStore:
    """A store opened and locked for exclusive use, with its origin and service."""

    path: str
    dev: BlockDevice
    origin: BlockDevice
    store: SharedStore
    service: LocalService
    #: opened with damage, read-only (``serve --force-degraded``)
    degraded: bool = False
    #: the cluster epoch every transaction records (0: no cluster)
    epoch: int = 0

    def reopen(self) -> SharedStore:
        """Open the store again from its device (journal recovery), for the service to
        serve in place of one a failed commit left untrusted in memory.

        Raises:
            OSError / DdsnapError: the store cannot be read or recovered (yet).
        """
        store = SharedStore.open(self.dev, mode="degraded" if self.degraded else "rw")
        if self.epoch:
            store.claim_epoch(self.epoch)
        self.store = store
        return store

    def close(self) -> None:
        """Commit, record the origin's identity, mark the store clean, release the lock."""
        try:
            if not self.degraded:
                self.store.sb.identity = origin_identity(self.origin)
            self.service.close()
        finally:
            self.origin.close()
            self.dev.close()


def origin_identity(dev: BlockDevice) -> OriginIdentity:
    """What identifies the origin ``dev`` (a :class:`FileDevice`, possibly fenced) now:
    its size, and for a regular file its device, inode, modification and change times
    (``stat``)."""
    if isinstance(dev, FencedDevice):
        dev = dev.inner
    assert isinstance(dev, FileDevice)
    if dev.is_block:
        return OriginIdentity(dev.size)
    st = os.fstat(dev.fd)
    return OriginIdentity(dev.size, st.st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns)


def origin_changes(recorded: OriginIdentity, now: OriginIdentity) -> list[str]:
    """What differs between the identity recorded at the last clean shutdown and now."""
    out = []
    # A block device may grow (lvextend) before `ddsnap resize` records it; a file that
    # grew changed its times as well.
    grown_device = not (recorded.dev or recorded.ino) and now.size > recorded.size
    if recorded.size != now.size and not grown_device:
        out.append(f"size {human_bytes(recorded.size)} -> {human_bytes(now.size)}")
    if (recorded.dev, recorded.ino) != (now.dev, now.ino):
        out.append("it is another file (device/inode differ)")
    if recorded.mtime_ns != now.mtime_ns:
        out.append("modified since (mtime)")
    elif recorded.ctime_ns != now.ctime_ns:
        out.append("changed since (ctime)")
    return out


def _origin_problem(path: str, sb) -> tuple[str, list[str]] | None:
    """What is wrong with the origin ``sb`` records, if anything: ``(message, changes)``
    (``changes`` empty when it is missing or resized)."""
    try:
        origin = FileDevice(sb.origin_path, writable=False, what="origin")
    except StoreNotFound:
        return (f"the origin recorded in {path}, {sb.origin_path}, does not exist (if it "
                f"moved: `ddsnap set {path} origin=NEWPATH`)", [])
    try:
        if origin.size < sb.origin_size:
            return (f"origin {sb.origin_path} is {human_bytes(origin.size)} but the store "
                    f"was made for {human_bytes(sb.origin_size)}", [])
        if not (sb.clean and sb.identity):
            return None  # not shut down cleanly: the last writer may have been us
        changes = origin_changes(sb.identity, origin_identity(origin))
    finally:
        origin.close()
    if not changes:
        return None
    return (f"the origin {sb.origin_path} changed while {path} was not served: "
            f"{'; '.join(changes)}. Snapshots may now read data that is not theirs. If the "
            f"origin moved, `ddsnap set {path} origin=PATH`; to accept the change, serve "
            "with --accept-origin-change", changes)


def _check_origin(path: str, dev: FileDevice, accept: bool) -> None:
    """Refuse an origin missing, resized or changed while nobody served the store
    (before the open writes: the check must hold again if this open is refused)."""
    sb, _slots = read_superblocks(dev)
    problem = _origin_problem(path, sb)
    if problem is None:
        return
    msg, changes = problem
    if not changes:
        raise OriginMismatch(msg)
    if accept:
        log.warning("origin %s changed while %s was not served (%s): accepted; snapshots "
                    "may read the new data", sb.origin_path, path, "; ".join(changes))
        return
    raise OriginMismatch(msg)


def set_origin(path: str, new_origin: str) -> dict:
    """``ddsnap set STORE origin=PATH``: re-point the store at a moved origin (or accept
    a changed one at the same path), recording its identity now.

    Raises:
        StoreBusy: the store is served (stop it first).
        StoreNotFound: ``new_origin`` does not exist.
        OriginMismatch: ``new_origin`` has another size than the store's origin.
    """
    new_origin = os.path.realpath(new_origin)
    dev = FileDevice(path)
    try:
        if not dev.lock_exclusive():
            raise StoreBusy(f"snapshot store {path} is served; stop the server to change "
                            "its origin")
        origin = FileDevice(new_origin, writable=False, what="origin")
        try:
            sb, _slots = read_superblocks(dev)  # refuse before the open writes anything
            if origin.size < sb.origin_size:
                raise OriginMismatch(f"{new_origin} is {human_bytes(origin.size)} but the "
                                     f"store was made for {human_bytes(sb.origin_size)}")
            store = SharedStore.open(dev)
            store.set_origin_path(new_origin)
            store.sb.identity = origin_identity(origin)
            store.close()
        finally:
            origin.close()
    finally:
        dev.close()
    return {"origin": new_origin}


def _in_use(path: str) -> StoreBusy:
    return StoreBusy(f"snapshot store {path} is in use by another ddsnap process "
                     "(is it being served?)")


def check_not_busy(path: str) -> None:
    """Raise StoreBusy (as :func:`open_store` would) if a server holds the store now;
    for a caller that must say so before it binds its listeners (``serve --workers``,
    whose metadata server process opens the store afterwards).

    Raises:
        StoreNotFound: ``path`` does not exist.
        StoreBusy: another process holds the store.
    """
    dev = FileDevice(path, writable=False)
    try:
        if not dev.lock_exclusive():
            raise _in_use(path)
    finally:
        dev.close()  # (the lock goes with it)


def open_store(path: str, degraded: bool = False, accept_origin_change: bool = False,
               direct: bool = False, fence: Callable[[], None] | None = None,
               epoch: int = 0, shared_lock: bool = False) -> OpenStore:
    """Open, lock and recover the store at ``path``, and open its recorded origin.

    With ``degraded`` (``serve --force-degraded``) the store and the origin are opened
    read-only and nothing is ever written: a store whose journal is damaged is read
    through the transactions recovery can trust, and whatever only a damaged block
    could map reads as an error (EIO), never as data.  With ``direct`` (nodes on other
    hosts share the devices: ``serve --metadata-listen tcp:...``) both are opened with
    ``O_DIRECT`` (:class:`~ddsnap.store.blockdev.DirectFileDevice`), since another
    host's writes never reach this host's page cache.  With ``fence`` (a cluster's
    metadata server: ``() -> None`` raising ``Fenced`` once its lease is over) every
    write to either device asks it first (:class:`~ddsnap.store.blockdev.FencedDevice`),
    and the store records ``epoch`` in every transaction from now on
    (:meth:`~ddsnap.store.shared.SharedStore.claim_epoch`).  With ``shared_lock`` (a
    cluster's server, whose exclusion is its etcd election, not a lock one host sees)
    the store's ``flock`` is shared: local commands that need the store to themselves
    are still refused, and a stopped server of an older term on the same host does not
    keep its successor out.

    Raises:
        StoreNotFound: ``path`` does not exist.
        StoreBusy: another process (``ddsnap serve``) holds the store.
        NotAStore / FormatTooOld / CorruptMetadata: not a ddsnap store, an old format,
            or damaged (naming the block).
        OriginMismatch: the recorded origin is missing, its size changed, or (after a
            clean shutdown) it changed while unserved, unless ``accept_origin_change``.
    """
    device = DirectFileDevice if direct else FileDevice
    dev = device(path, writable=not degraded)
    try:
        if not (dev.lock_shared() if shared_lock else dev.lock_exclusive()):
            raise _in_use(path)
        _check_origin(path, dev, accept_origin_change)
        store_dev: BlockDevice = FencedDevice(dev, fence) if fence is not None else dev
        store = SharedStore.open(store_dev, mode="degraded" if degraded else "rw")
        if epoch:
            store.claim_epoch(epoch)
        try:
            origin = device(store.origin_path, writable=not degraded, what="origin",
                            strict=True)
        except StoreNotFound:
            raise OriginMismatch(f"the origin recorded in {path}, {store.origin_path}, "
                                 "does not exist") from None
        if origin.size < store.origin_size:
            origin.close()
            raise OriginMismatch(
                f"origin {store.origin_path} is {human_bytes(origin.size)} but the store "
                f"was made for {human_bytes(store.origin_size)}")
        service = LocalService(store, FencedDevice(origin, fence) if fence else origin)
    except BaseException:
        dev.close()
        raise
    opened = OpenStore(os.path.abspath(path), store_dev, service.data.origin, store, service,
                       degraded, epoch)
    service.reopen_store = opened.reopen
    return opened


def inspect_store(path: str, leaks: list[int] | None = None) -> dict:
    """``ddsnap check`` on a store nobody serves: read-only and complete.

    The device is opened read-only under a shared lock; the journal is replayed in
    memory only; every superblock slot, the journal window, the table, the bitmap and
    the tree are checked.  Returns the findings report (:func:`findings_report`).
    Leaked blocks are appended to ``leaks`` if given.

    Raises:
        StoreNotFound, NotAStore, FormatTooOld: as for :func:`open_store`.
        StoreBusy: a server holds the store (ask it instead).
    """
    dev = FileDevice(path, writable=False)
    try:
        if not dev.lock_shared():
            raise StoreBusy(f"snapshot store {path} is in use by another ddsnap process "
                            "(is it being served?)")
        try:
            store = SharedStore.open(dev, mode="inspect")
        except CorruptMetadata as e:
            return findings_report([Finding("fatal", e.block, e.why)])
        findings = store.check(leaks)
        problem = _origin_problem(path, store.sb)
        if problem is not None:  # not metadata damage: the origin is the user's to fix
            findings.append(Finding("warning", None, problem[0]))
        return findings_report(findings)
    finally:
        dev.close()


def repair_store(path: str, say) -> dict:
    """``ddsnap check --repair``: fix what is safely fixable, and nothing else.

    Fixable: damaged or stale superblock slots (rewritten by the open's checkpoint),
    leaked blocks (freed), space-accounting drift (the figures are recounted at every
    open).  Anything else fatal is refused before anything is written.  ``say(text)``
    is told each action before it is taken.  Returns the findings after the repair.

    Raises:
        CorruptMetadata: the store has damage the repair cannot fix (naming a block).
        StoreBusy: the store is served (stop the server first).
    """
    leaks: list[int] = []
    report = inspect_store(path, leaks)
    fatal = [f for f in report["findings"] if f["severity"] == "fatal"
             and "space accounting" not in f["message"] and "drift" not in f["message"]]
    if fatal:
        f = fatal[0]
        raise CorruptMetadata(f["block"], f"{f['message']} (check --repair fixes only leaks, "
                                          "superblock slots and space accounting)")
    plans = [f["message"] for f in report["findings"]
             if f["message"].startswith("superblock slot")]
    for msg in plans:
        say(f"rewrite: {msg}")
    if leaks:
        say(f"free {len(leaks)} leaked blocks ({leaks[0]}..{leaks[-1]})")
    opened = open_store(path)
    try:
        if leaks:
            opened.service.free_leaked(leaks)
    finally:
        opened.close()
    return inspect_store(path)


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

def snap_create(svc: MetadataService, name: str, read_only: bool = False,
                parent: str | None = None) -> dict:
    """Create snapshot ``name`` of the origin, or of the live snapshot ``parent``."""
    return svc.create_snapshot(name, read_only, parent).to_dict()


def snap_list(svc: MetadataService) -> list[dict]:
    """Each live snapshot (oldest first) with its space: ``exclusive`` bytes (store
    chunks only it uses: exactly what deleting it frees) and ``shared`` bytes (chunks it
    uses with other snapshots); None if the figures could not be counted (a damaged
    tree)."""
    try:
        space: dict[int, tuple[int, int]] | None = svc.snapshot_space()
    except CorruptMetadata:
        space = None
    cs = svc.chunk_size
    out = []
    for s in svc.snapshots():
        d = s.to_dict()
        if space is not None:
            excl, shared = space.get(s.id, (0, 0))
            d["exclusive"] = excl * cs
            d["shared"] = shared * cs
        else:
            d["exclusive"] = d["shared"] = None
        out.append(d)
    return out


def snap_delete(svc: MetadataService, name: str) -> dict:
    return svc.delete_snapshot(name).to_dict()


def status(svc: MetadataService, path: str, served: bool, degraded: bool = False) -> dict:
    """The store's geometry, space and snapshots (``ddsnap status --json``).

    ``failure`` is the last failed commit (None if none since the store was opened):
    ``error``, ``type``, ``errno``, ``time``, ``reopened`` (the store was reopened from
    its journal since) and ``reopen_error`` (why reopening it failed, if it did);
    ``reopens`` counts the reopens.
    """
    st = svc.status()  # reopens a store a failed commit left untrusted, if it can
    out = {
        "store": path,
        "format_version": VERSION,
        "store_size": st.store_size,
        "chunk_size": st.chunk_size,
        "chunks_total": st.chunks_total,
        "chunks_free": st.chunks_free,
        "chunks_used": st.chunks_used,
        "used": st.chunks_used * st.chunk_size,
        "free": st.chunks_free * st.chunk_size,
        "origin": st.origin,
        "origin_size": st.origin_size,
        "max_snapshots": st.max_snapshots,
        "snapshots": snap_list(svc),
        "served": served,
        "full_policy": st.full_policy,
        "auto_deleted": st.auto_deleted,
        "failure": st.failure,
        "reopens": st.reopens,
        "receive": st.receive,
    }
    if st.uuid is not None:
        out["uuid"] = st.uuid
        out["tree_levels"] = st.tree_levels
        out["journal_blocks"] = st.journal_blocks
        out["recovered_transactions"] = st.recovered_transactions
    if degraded and st.journal_damage is not None:
        out["damage"] = [{"block": b, "message": why} for b, why in st.journal_damage]
    return out


def check(svc: MetadataService) -> dict:
    """Commit, then check the on-disk metadata (``ddsnap check --json``).

    Raises:
        ServiceFailed: the store failed and cannot be reopened (yet).
    """
    return findings_report(svc.check())


def findings_report(findings: list[Finding]) -> dict:
    fatal = sum(1 for f in findings if f.severity == "fatal")
    return {"clean": fatal == 0, "fatal": fatal,
            "warnings": len(findings) - fatal,
            "findings": [f.to_dict() for f in findings]}


def set_option(svc: MetadataService, key: str, value: str) -> dict:
    """``ddsnap set STORE KEY=VALUE`` on an open store; the key is ``full-policy``
    (``origin`` is :func:`set_origin`, on a store nobody serves)."""
    if key == "origin":
        raise StoreBusy("the store is served; stop the server to change its origin")
    if key != "full-policy":
        raise InvalidArgument(f"unknown setting {key!r} (settable: full-policy, origin)")
    svc.set_full_policy(value)
    return {key: value}


def resize(svc: MetadataService, origin_size: int | None = None,
           store_size: int | None = None) -> dict:
    """``ddsnap resize STORE``: the origin to ``origin_size`` bytes and/or the store to
    ``store_size`` bytes (either may be None), in that order.  Returns the outcome of
    each (``MetadataService.resize_origin`` / ``resize_store``).

    Raises:
        InvalidArgument: neither size given, or as the service methods raise.
        ShrinkRefused, MergeInProgress, StoreFull, HostIOError: as those methods raise.
    """
    if origin_size is None and store_size is None:
        raise InvalidArgument("give --origin-size SIZE, --store-size SIZE, or both")
    out: dict = {}
    if origin_size is not None:
        out["origin"] = svc.resize_origin(int(origin_size))
    if store_size is not None:
        out["store"] = svc.resize_store(int(store_size))
    return out


class MergeRunner:
    """Runs a merge in a background thread (the server's merge worker)."""

    def __init__(self, svc: MetadataService):
        self.svc = svc
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # Control requests run on executor threads: a merge start and a merge stop can
        # arrive together, and stop must not see a thread that is not started yet.
        self._lock = threading.Lock()
        #: the error that stopped the last merge run, if any
        self.error: DdsnapError | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def ensure(self) -> None:
        """Start the worker if a merge is in progress and nobody is running it."""
        with self._lock:
            if self.running or self.svc.merge_cursor() is None:
                return
            self._stop = threading.Event()
            thread = threading.Thread(target=self._run, name="ddsnap-merge", daemon=True)
            thread.start()
            self._thread = thread

    def _run(self) -> None:
        self.error = None
        cursor = None  # the durable merge cursor when it last went on after a failure
        while True:
            failures = self.svc.statistics().failures
            try:
                self.svc.run_merge(self._stop)
                return
            except DdsnapError as stopped:  # the merge stays recorded and resumable
                err = stopped
                if (not self._stop.is_set()
                        and self.svc.statistics().failures != failures):
                    # A commit failed under the merge: the store is reopened and the
                    # merge goes on from its durable cursor, unless it made no progress
                    # since it last did (a host that keeps failing stops it instead).
                    try:
                        self.svc.recover()
                    except ServiceFailed as again:
                        err = again
                    else:
                        now = self.svc.merge_cursor()
                        if now != cursor:
                            cursor = now
                            continue
                self.error = err
                log.warning("merge stopped: %s; `ddsnap merge STORE NAME` resumes it", err)
                return
            except Exception as e:  # noqa: BLE001 - a bug: keep the server up, say so
                self.error = DdsnapError(f"internal error: {e}")
                log.exception("merge stopped by an internal error")
                return

    def stop(self) -> None:
        """Stop after the current step (the merge stays recorded and resumable)."""
        with self._lock:
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


def merge_stop(svc: MetadataService, runner: MergeRunner | None) -> dict | None:
    st = svc.merge_status()
    if st is None:
        raise NoMerge("no merge is in progress")
    if runner is not None:
        runner.stop()
    return svc.merge_status(running=False)


#: tree entries a ``diff`` page visits per version on the way (about)
DIFF_PAGE = 4096


def diff(svc: MetadataService, from_name: str, to_name: str, start: int = 0,
         limit: int = DIFF_PAGE) -> dict:
    """One page of ``ddsnap diff``: the logical chunks from ``start`` on whose content
    may differ between ``from_name`` and ``to_name`` (snapshot names, or ``origin``),
    as inclusive runs ``[first, last]``, and ``next``, the chunk the next page starts
    at (None: this was the last).  Found from the tree's entries (``changed_chunks``),
    so a page costs about ``limit`` entries per version on the way, never the volume's
    size.  When the two sizes differ, the chunks only the bigger one has are reported
    as changed, in the last page.  Source: issue 13; seed 000's sharemaps.

    Returns ``{"from", "to", "chunk_size", "size", "runs", "next"}`` (``size``: the
    bigger size, bytes).

    Raises:
        SnapshotNotFound: either name is not a live snapshot (nor ``origin``).
        InvalidArgument: ``start`` is negative or ``limit`` is not positive.
    """
    if start < 0 or limit < 1:
        raise InvalidArgument("diff: start must be >= 0 and limit > 0")
    (a, size_a), (b, size_b) = _version(svc, from_name), _version(svc, to_name)
    cs = svc.chunk_size
    # the chunks both have whole (of two sizes, the partial last one of the smaller
    # differs: the bigger has data past it)
    common = -(-size_a // cs) if size_a == size_b else min(size_a, size_b) // cs
    total = -(-max(size_a, size_b) // cs)
    chunks, nxt = svc.changed_chunks(a, b, start, limit) if start < common else ([], None)
    runs = [[first, last] for first, last in coalesce([c for c in chunks if c < common])]
    if nxt is not None and nxt >= common:
        nxt = None
    if nxt is None and total > common:
        if runs and runs[-1][1] == common - 1:
            runs[-1][1] = total - 1
        else:
            runs.append([max(common, start), total - 1])
    return {"from": from_name, "to": to_name, "chunk_size": cs,
            "size": max(size_a, size_b), "runs": runs, "next": nxt}


def _version(svc: MetadataService, name: str) -> tuple[int, int]:
    """``(version id, size in bytes)`` of a snapshot, or of ``origin`` (0)."""
    if name == "origin":
        return 0, svc.origin_size
    info = svc.snapshot(name)
    return info.id, info.size


OPERATIONS: dict[str, Callable[..., Any]] = {
    "diff": diff,
    "snap_create": snap_create,
    "snap_list": snap_list,
    "snap_delete": snap_delete,
    "set": set_option,
    "resize": resize,
}


#: operations that change the store (refused on a degraded, read-only store)
CHANGING_OPS = ("snap_create", "snap_delete", "set", "merge_start", "merge_stop", "resize")


def run_op(svc: MetadataService, op: str, args: dict, path: str, served: bool,
           runner: MergeRunner | None = None, degraded: bool = False):
    """Run operation ``op`` with ``args``; the one dispatcher for local and remote calls.

    ``runner`` is the server's merge worker (None when the CLI opened the store itself:
    a merge started then runs when the store is next served, or with ``merge --wait``).

    Raises:
        DdsnapError: the operation's own errors; an unknown op is a ProtocolError;
            a changing op on a ``degraded`` store is ReadOnlyVolume; an OSError from the
            host is raised as HostIOError (HostFull for ENOSPC).
    """
    if degraded and op in CHANGING_OPS:
        raise ReadOnlyVolume(f"{path} is served read-only (--force-degraded: its metadata "
                             "is damaged); run `ddsnap check` on it once the server stops")
    try:
        return _run_op(svc, op, args, path, served, runner, degraded)
    except OSError as e:
        # The service names the device where it can; this is for the rest.
        raise host_error(e, "snapshot store", path) from e


def _run_op(svc: MetadataService, op: str, args: dict, path: str, served: bool,
            runner: MergeRunner | None, degraded: bool):
    if op == "status":
        st = status(svc, path, served, degraded)
        st["merge"] = merge_status(svc, runner)
        st["degraded"] = degraded
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
