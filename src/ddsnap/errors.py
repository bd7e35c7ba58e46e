"""The ddsnap error hierarchy.

Every error a user can cause or meet is a :class:`DdsnapError` subclass.  Each class
says whose fault it is (``fault``: ``"user"``, ``"store"``, ``"peer"`` or ``"system"``),
carries what a user needs to act on it (a path, a block number, a snapshot name), and
owns a distinct process exit code so scripts can tell failures apart.  The CLI prints
``str(error)`` on one line and exits with ``error.exit_code``; it never prints a traceback
for these.

Source of the idea: DESIGN.md, "Errors".
"""

from __future__ import annotations

import errno as _errno


class DdsnapError(Exception):
    """Base of every error ddsnap reports to a user.

    Attributes:
        exit_code: the CLI's process exit status for this error (distinct per class).
        fault: whose fault it is: "user", "store", "peer" or "system".
        errno: the POSIX errno an NBD client sees for this error on the data path.
    """

    exit_code = 1
    fault = "system"
    errno = _errno.EIO

    def to_dict(self) -> dict:
        """Serialise for the control socket: ``{"type": class name, "message": str}``."""
        return {"type": type(self).__name__, "message": str(self)}


class InvalidArgument(DdsnapError):
    """A command-line or API argument is out of range or malformed."""

    exit_code = 2
    fault = "user"
    errno = _errno.EINVAL


class StoreNotFound(DdsnapError):
    """The snapshot store (or origin) path does not exist."""

    exit_code = 3
    fault = "user"
    errno = _errno.ENOENT

    def __init__(self, path: str, what: str = "snapshot store"):
        self.path = path
        super().__init__(f"{what} not found: {path}")


class NotAStore(DdsnapError):
    """The path exists but holds no ddsnap snapshot store (no valid superblock)."""

    exit_code = 4
    fault = "user"

    def __init__(self, path: str, why: str = "no ddsnap superblock"):
        self.path = path
        super().__init__(f"{path} is not a ddsnap snapshot store ({why})")


class CorruptMetadata(DdsnapError):
    """A metadata block failed its self-check (type, block number, UUID, crc32c).

    Attributes:
        block: the 4 KiB metadata block number that failed.
    """

    exit_code = 5
    fault = "store"

    def __init__(self, block: int, why: str):
        self.block = block
        self.why = why
        super().__init__(f"corrupt metadata in block {block}: {why}")


class StoreFull(DdsnapError):
    """The snapshot store has no free chunk for a copy-out or snapshot write (ENOSPC)."""

    exit_code = 6
    fault = "user"
    errno = _errno.ENOSPC

    def __init__(self, msg: str = "snapshot store is full"):
        super().__init__(msg)


class SnapshotExists(DdsnapError):
    """A snapshot with this name already exists."""

    exit_code = 7
    fault = "user"
    errno = _errno.EEXIST

    def __init__(self, name: str):
        self.name = name
        super().__init__(f"snapshot already exists: {name}")


class SnapshotNotFound(DdsnapError):
    """No snapshot has this name."""

    exit_code = 8
    fault = "user"
    errno = _errno.ENOENT

    def __init__(self, name: str):
        self.name = name
        super().__init__(f"no such snapshot: {name}")


class StoreBusy(DdsnapError):
    """The store is already served (its exclusive lock is held by another process)."""

    exit_code = 9
    fault = "user"
    errno = _errno.EBUSY


class OriginMismatch(DdsnapError):
    """The origin recorded in the store is missing or has changed size."""

    exit_code = 10
    fault = "user"


class TooManySnapshots(DdsnapError):
    """The store holds its ``--max-snapshots`` limit of snapshots."""

    exit_code = 11
    fault = "user"
    errno = _errno.ENOSPC


class SnapshotBusy(DdsnapError):
    """The snapshot is in use (exported to connected clients) and cannot be deleted."""

    exit_code = 12
    fault = "user"
    errno = _errno.EBUSY


class ReadOnlyVolume(DdsnapError):
    """A write was addressed to a read-only snapshot."""

    exit_code = 13
    fault = "user"
    errno = _errno.EPERM


class ProtocolError(DdsnapError):
    """The NBD or control-socket peer broke the protocol (the peer's fault)."""

    exit_code = 14
    fault = "peer"
    errno = _errno.EINVAL


class ControlError(DdsnapError):
    """The control socket of a serving ddsnap could not be reached or answered badly."""

    exit_code = 15
    fault = "system"


class StoreExists(DdsnapError):
    """``init`` was pointed at something that already holds a ddsnap store."""

    exit_code = 16
    fault = "user"
    errno = _errno.EEXIST

    def __init__(self, path: str):
        self.path = path
        super().__init__(f"{path} already holds a ddsnap snapshot store (use --force to overwrite)")


class MergeInProgress(DdsnapError):
    """The operation conflicts with the merge in progress (one merge per origin)."""

    exit_code = 17
    fault = "user"
    errno = _errno.EBUSY


class NoMerge(DdsnapError):
    """There is no merge to report on or stop."""

    exit_code = 18
    fault = "user"


class FormatTooOld(DdsnapError):
    """The store is in an older on-disk format; ``ddsnap upgrade STORE`` converts it."""

    exit_code = 21
    fault = "user"

    def __init__(self, path: str, version: int = 1):
        self.path = path
        self.version = version
        made_by = {1: "ddsnap 0.1", 2: "ddsnap 0.2"}.get(version, "an older ddsnap")
        super().__init__(f"{path} is a format-v{version} ddsnap store ({made_by}); run "
                         f"`ddsnap upgrade {path}` to convert it to the current format")


class JournalError(CorruptMetadata):
    """The journal cannot be replayed (a commit record is inconsistent)."""


class DirectoryNotFound(StoreNotFound):
    """The directory a new file (a snapshot store) would be created in does not exist."""

    def __init__(self, path: str):
        self.path = path
        DdsnapError.__init__(self, f"directory {path} does not exist")


class Cancelled(DdsnapError):
    """The user answered no when asked to confirm (``snap delete``, ``init --force``)."""

    exit_code = 19
    fault = "user"
    errno = _errno.ECANCELED


class ListenError(DdsnapError):
    """``serve`` cannot listen on an NBD address (in use, no such directory, not a socket,
    permission denied, ...).

    Attributes:
        address: the listen address as given (``unix:PATH``, ``tcp:HOST:PORT``).
        reason: why, in words (the OS error's text).
        errno: the OS errno of the failure (``EADDRINUSE``, ``ENOENT``, ...), or EIO.
    """

    exit_code = 22
    fault = "user"

    def __init__(self, address: str, reason: str, os_errno: int | None = None):
        self.address = address
        self.reason = reason
        self.errno = os_errno or _errno.EIO
        super().__init__(f"cannot listen on {address}: {reason}")


class ControlPathError(ListenError):
    """``serve`` cannot listen on its control socket path (``--control PATH``, by default
    ``STORE.ctl``): its directory does not exist, another server uses it, it is not a
    socket, ...  A :class:`ListenError` with an exit code of its own.

    Attributes:
        path: the control socket path; ``address`` is ``path`` too.
    """

    exit_code = 20

    def __init__(self, path: str, reason: str, os_errno: int | None = None):
        self.path = self.address = path
        self.reason = reason
        self.errno = os_errno or _errno.EIO
        DdsnapError.__init__(self, f"cannot use control socket {path}: {reason}")


class TlsRefused(DdsnapError):
    """A TLS handshake of a csnap connection between hosts failed: the peer's
    certificate is not signed by the cluster CA, the peer sent none, the peer refused
    ours, the peer does not speak TLS, it closed the connection or did not answer in
    time.  The message says which, in words; the connection is closed."""

    exit_code = 28
    fault = "peer"
    errno = _errno.ECONNREFUSED


class TlsFileError(DdsnapError):
    """A TLS file given to ``serve`` or ``attach`` (``--tls-ca``, ``--tls-cert``,
    ``--tls-key``) cannot be used: missing, unreadable, not PEM, a key that does not
    match its certificate or is encrypted.

    Attributes:
        path: the file (for a key that does not match its certificate, the key).
        reason: why, in words.
    """

    exit_code = 29
    fault = "user"
    errno = _errno.EINVAL

    def __init__(self, path: str, what: str, reason: str):
        self.path = path
        self.reason = reason
        super().__init__(f"cannot use the TLS {what} {path}: {reason}")


class Fenced(DdsnapError):
    """A metadata server of a cluster may not write the store any more: its etcd lease
    could not be renewed in time (by its own clock, before etcd could hand the lease
    on), or another server was elected.  Every write it would make is refused (issue
    12's fencing: leases are not locks); the server stops."""

    exit_code = 30
    fault = "peer"
    errno = _errno.EIO


class StaleEpoch(Fenced):
    """A metadata server's election epoch is older than one that already wrote the
    store: another server took over while this one did not know."""


class ServiceFailed(DdsnapError):
    """A commit failed, so the store's state in memory can no longer be trusted.

    The store on disk is as of the last durable commit; the service reopens it from its
    journal and serves again.  Requests that were waiting on the failed commit, or that
    arrive while the store cannot be reopened, get this error.

    Attributes:
        errno: the errno of the failure behind it (ENOSPC when the host was full).
    """

    exit_code = 23
    fault = "system"

    def __init__(self, msg: str, errno: int = _errno.EIO):
        self.errno = errno
        super().__init__(msg)


class EtcdUnavailable(ServiceFailed):
    """etcd could not be reached or did not answer in time (a one-shot query:
    ``election.leader``, ``election.status``).  The election itself retries instead; a
    node looking for its server retries it as it does a lost server (a ServiceFailed)."""

    exit_code = 31
    fault = "system"

    def __init__(self, url: str, why: object):
        self.url = url
        super().__init__(f"etcd at {url} did not answer: {why}", _errno.EIO)


class HostIOError(DdsnapError):
    """The host failed a read, write or flush of the snapshot store or the origin (EIO,
    EROFS, ...): the device or the file system under it, not ddsnap's metadata.

    Attributes:
        path: the store or origin path the I/O was on.
        errno: the host's errno.
    """

    exit_code = 24
    fault = "system"

    def __init__(self, msg: str, path: str = "", errno: int = _errno.EIO):
        self.path = path
        self.errno = errno
        super().__init__(msg)


class HostFull(HostIOError):
    """The host has no space left for a write to the store or the origin (ENOSPC, or
    EDQUOT): a sparse store file on a full file system, say.  Writes succeed again once
    the host has room; nothing has to be restarted."""

    exit_code = 25
    errno = _errno.ENOSPC

    def __init__(self, msg: str, path: str = ""):
        super().__init__(msg, path, _errno.ENOSPC)


class ShrinkRefused(DdsnapError):
    """A shrink of the origin or the store would cut off what still lives past the new
    end (the message names it); nothing was changed."""

    exit_code = 26
    fault = "user"
    errno = _errno.EBUSY


class WorkerFailed(DdsnapError):
    """A worker or metadata server process of ``serve --workers`` could not start (when
    it reported its own error, that error is raised instead)."""

    exit_code = 27
    fault = "system"


class StreamDamaged(DdsnapError):
    """A send stream (``ddsnap receive``'s input) is not a ddsnap stream, or one of its
    records is damaged, cut short or out of place: the message names the record and its
    byte in the stream.  Nothing of that record or after it was applied."""

    exit_code = 32
    fault = "peer"


class ReceiveRefused(DdsnapError):
    """A stream does not apply to this store as it is (the message says why: it does
    not hold the stream's base, its origin moved on since the base, another receive is
    in progress, the token is not this receive's, ...); nothing was changed."""

    exit_code = 33
    fault = "user"
    errno = _errno.EBUSY


def host_error(e: OSError, what: str, path: str, doing: str = "") -> HostIOError:
    """The :class:`HostIOError` (:class:`HostFull` for ENOSPC/EDQUOT) for the OSError
    ``e`` the host raised on an I/O of ``what`` (e.g. "snapshot store") at ``path``,
    ``doing`` saying what for (e.g. "committing metadata")."""
    reason = e.strerror or str(e)
    during = f" while {doing}" if doing else ""
    if e.errno in (_errno.ENOSPC, _errno.EDQUOT):
        return HostFull(f"no space left on the host for the {what} {path}{during}: "
                        f"{reason} (free space on its file system, then try again)", path)
    return HostIOError(f"I/O error on the {what} {path}{during}: {reason}", path,
                       e.errno or _errno.EIO)


#: Every error class by name, for re-raising errors that crossed the control socket.
BY_NAME: dict[str, type[DdsnapError]] = {}


def _register(cls: type[DdsnapError]) -> None:
    BY_NAME[cls.__name__] = cls
    for sub in cls.__subclasses__():
        _register(sub)


_register(DdsnapError)


def from_dict(d: dict) -> DdsnapError:
    """Rebuild an error sent over the control socket by :meth:`DdsnapError.to_dict`.

    The message is kept verbatim; the class (and so the exit code) is looked up by name,
    falling back to :class:`ControlError` for an unknown name.
    """
    cls = BY_NAME.get(d.get("type", ""), ControlError)
    err = DdsnapError.__new__(cls)
    Exception.__init__(err, d.get("message", "unknown error"))
    return err
