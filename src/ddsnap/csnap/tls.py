"""TLS for csnap connections between hosts.

* :func:`server_context` and :func:`client_context` make the ``ssl.SSLContext`` of a
  metadata server and of a node from the cluster's PEM files: TLS 1.3 only, and each end
  must present a certificate the other verifies.
* :func:`wrap` runs the TLS handshake over a connected socket and gives a
  :class:`TlsSocket`, which offers the part of the socket interface the csnap server and
  client use (``recv``, ``sendall``, ``shutdown``, ``close``, ...) and lets one thread
  receive while any number of threads send.

Trust model: the cluster has its own private CA, and its CA certificate (``--tls-ca``) is
the only trust root (the system's CAs are not loaded).  Any certificate the cluster CA
signed is a member of the cluster, accepted as a server or as a node; host names are not
checked (hosts are reached by IP address, and a certificate names a member, not an
address).  So whoever holds a member's key can act as any member: keep keys readable
only by the user ddsnap runs as, and sign nothing else with the cluster CA.  Member
certificates are used both ways, so if they carry an extended key usage it must list
both ``serverAuth`` and ``clientAuth``.

Why not ``ssl.SSLSocket``: an OpenSSL ``SSL`` object is not safe for one thread in
``SSL_read`` while another is in ``SSL_write``, and both csnap ends have exactly that: a
reader thread and several sender threads.  :class:`TlsSocket` drives an ``ssl.SSLObject``
over two ``ssl.MemoryBIO`` s and moves the bytes to and from the socket itself, so it can
hold a lock around each use of the ``SSLObject`` without ever holding it while blocked on
the network.

Source of the idea: the Python ``ssl`` documentation, "Memory BIO Support"
(``SSLContext.wrap_bio``, ``SSLObject``, ``MemoryBIO``).
"""

from __future__ import annotations

import contextlib
import errno
import select
import socket
import ssl
import threading
import time
from pathlib import Path
from typing import Any

from ddsnap.errors import TlsFileError, TlsRefused

#: seconds a peer has to complete the TLS handshake, by default
HANDSHAKE_TIMEOUT = 10.0
#: bytes asked of the socket per raw read (several TLS records of up to 16 KiB each)
RAW_RECV_BYTES = 1 << 18
#: bytes of plain text one TLS record holds at most (RFC 8446 5.1): one SSLObject.read's
MAX_RECORD = 1 << 14
#: bytes of plain text encrypted per step of sendall: bounds the ciphertext held in memory
#: for a large send to about this much
SEND_CHUNK = 1 << 18

#: X509 verify codes meaning "not signed by a CA we trust" (``openssl verify`` codes:
#: unable to get issuer certificate (locally), self-signed (in chain), unable to verify
#: the first certificate, signature failure)
_NOT_OUR_CA = {2, 7, 18, 19, 20, 21}
#: OpenSSL reasons meaning the bytes the peer sent are not TLS (or not TLS 1.3)
_NOT_TLS = {"WRONG_VERSION_NUMBER", "HTTP_REQUEST", "HTTPS_PROXY_REQUEST", "UNKNOWN_PROTOCOL",
            "PACKET_LENGTH_TOO_LONG", "RECORD_LAYER_FAILURE", "WRONG_SSL_VERSION"}
_OLD_TLS = {"TLSV1_ALERT_PROTOCOL_VERSION", "UNSUPPORTED_PROTOCOL", "NO_PROTOCOLS_AVAILABLE"}
#: alerts a peer sends when it refuses our certificate
_REFUSED_OURS = ("ALERT_BAD_CERTIFICATE", "ALERT_UNSUPPORTED_CERTIFICATE",
                 "ALERT_CERTIFICATE_EXPIRED", "ALERT_CERTIFICATE_REVOKED",
                 "ALERT_CERTIFICATE_UNKNOWN", "ALERT_DECRYPT_ERROR", "ALERT_ACCESS_DENIED")


# -- contexts ---------------------------------------------------------------------------

def server_context(ca: str, cert: str, key: str) -> ssl.SSLContext:
    """The TLS context of a metadata server: TLS 1.3 only; presents ``cert`` (with its
    private ``key``); requires a client certificate signed by the CA in ``ca``.

    ``ca``, ``cert`` and ``key`` are paths of PEM files (the key unencrypted).  The
    context sends one session ticket after each handshake: :func:`wrap` on the client
    side waits for it, as the sign that the server accepted the client's certificate.

    Raises:
        TlsFileError: a file is missing, unreadable or not PEM, ``ca`` holds no CA
            certificate, the key does not match the certificate or is encrypted; the
            message names the file.
    """
    ctx = _context(True, ca, cert, key)
    # (at least one: the client's sign of acceptance, see client_context)
    ctx.num_tickets = 1
    return ctx


def client_context(ca: str, cert: str, key: str) -> ssl.SSLContext:
    """The TLS context of a node connecting to a metadata server: TLS 1.3 only;
    verifies the server's certificate against the CA in ``ca`` without checking host
    names (``check_hostname = False``: the cluster CA is the only trust root and any
    certificate it signed is a cluster member, whatever IP address it is reached at; see
    the module docstring); presents ``cert`` (with its private ``key``).

    Under TLS 1.3 a server verifies the client's certificate after the client's side of
    the handshake is done, so :func:`wrap` then waits for the server's session ticket
    (:func:`server_context` sends one) before it trusts that it was accepted.

    Raises:
        TlsFileError: as :func:`server_context`.
    """
    return _context(False, ca, cert, key)


def _context(server: bool, ca: str, cert: str, key: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    if not server:
        ctx.check_hostname = False  # (before verify_mode: it requires verification)
    ctx.verify_mode = ssl.CERT_REQUIRED
    _load_ca(ctx, ca)
    _load_identity(ctx, cert, key)
    return ctx


def _read_pem(path: str, what: str) -> None:
    """Check that ``path`` can be read and looks like PEM, so that the error names the
    file and says what is wrong instead of OpenSSL's "PEM lib"."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise TlsFileError(path, what, (e.strerror or str(e)).lower()) from None
    if b"-----BEGIN " not in data:
        raise TlsFileError(path, what, "not a PEM file (it has no -----BEGIN line)")


def _words(e: ssl.SSLError) -> str:
    """OpenSSL's reason for ``e`` in lower-case words (``KEY_VALUES_MISMATCH`` ->
    ``key values mismatch``), or its message."""
    if e.reason:
        return e.reason.lower().replace("_", " ")
    return str(e.strerror or e)


def _load_ca(ctx: ssl.SSLContext, ca: str) -> None:
    what = "CA certificate"
    _read_pem(ca, what)
    try:
        ctx.load_verify_locations(cafile=ca)
    except ssl.SSLError as e:
        raise TlsFileError(ca, what, f"no certificate in it can be read ({_words(e)})") from None
    if ctx.cert_store_stats()["x509_ca"] == 0:
        # (a member's certificate given as the CA: every peer would be refused)
        raise TlsFileError(ca, what, "it holds no CA certificate (only certificates "
                                     "that cannot sign others)")


def _load_identity(ctx: ssl.SSLContext, cert: str, key: str) -> None:
    _read_pem(cert, "certificate")
    _read_pem(key, "private key")
    # load_cert_chain's errors do not say which file is bad: the certificate is read
    # alone first, into a scratch context
    scratch = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        scratch.load_verify_locations(cafile=cert)
    except ssl.SSLError as e:
        raise TlsFileError(cert, "certificate",
                           f"no certificate in it can be read ({_words(e)})") from None

    def no_passphrase() -> bytes:
        # (without a callback OpenSSL would prompt on the terminal)
        raise TlsFileError(key, "private key", "it is encrypted with a passphrase; ddsnap "
                           "needs it unencrypted (and readable only by its user)")

    try:
        ctx.load_cert_chain(cert, key, password=no_passphrase)
    except ssl.SSLError as e:
        if e.reason == "KEY_VALUES_MISMATCH":
            raise TlsFileError(key, "private key",
                               f"it is not the key of the certificate {cert}") from None
        raise TlsFileError(key, "private key",
                           f"no private key in it can be read ({_words(e)})") from None


# -- the connection ---------------------------------------------------------------------

def wrap(sock: socket.socket, context: ssl.SSLContext, server_side: bool,
         timeout: float | None = HANDSHAKE_TIMEOUT) -> TlsSocket:
    """TLS over the connected stream socket ``sock``: runs the handshake (at most
    ``timeout`` seconds, None for no limit) and returns the :class:`TlsSocket`, whose
    socket is then blocking (no timeout).

    ``context`` is a :func:`server_context` with ``server_side``, else a
    :func:`client_context`.  On the client side the handshake ends only when the server
    has accepted the client's certificate (its session ticket arrived).

    Raises:
        TlsRefused: the handshake failed (the peer's certificate is not signed by the
            cluster CA, it sent none, it refused ours, it does not speak TLS, it closed
            the connection, a network error, no handshake within ``timeout``); the
            message says which.  ``sock`` is closed.
    """
    try:
        tls = TlsSocket(sock, context, server_side)
    except BaseException:
        sock.close()
        raise
    tls.handshake(timeout)
    return tls


class TlsSocket:
    """A TLS connection over a connected, blocking stream socket, through an
    ``ssl.SSLObject`` and two ``ssl.MemoryBIO`` s (see the module docstring).

    Make one with :func:`wrap` (or construct it, then call :meth:`handshake`).

    Threads: one thread at a time may be in :meth:`recv` while any number of threads call
    :meth:`sendall`; the bytes of each sendall reach the peer whole, never interleaved
    with another's, and TLS records reach the socket in the order they were made.  The
    ``SSLObject`` is used only under ``_ssl_lock``, which is never held while blocked on
    the socket: a receiver must not wait behind a sender blocked on a full send buffer
    whose peer is itself blocked sending (both would wait for ever).  ``_send_lock``
    orders what goes to the socket: a sender holds it from encrypting a record until the
    record is in the socket.  A ``read`` of the ``SSLObject`` may also make bytes to send
    (a TLS 1.3 post-handshake message, an alert): the receiver sends them only if
    ``_send_lock`` is free and without blocking (what does not fit goes out from a
    short-lived thread); a sender that held the lock sends what was left after releasing
    it.

    Attributes:
        family: the socket's address family.
    """

    def __init__(self, sock: socket.socket, context: ssl.SSLContext, server_side: bool):
        """Prepare TLS over ``sock`` (no I/O yet: see :meth:`handshake`)."""
        self._sock = sock
        self._server_side = server_side
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._obj = context.wrap_bio(self._incoming, self._outgoing, server_side=server_side)
        #: guards _obj and both BIOs; never held while blocked on the socket
        self._ssl_lock = threading.Lock()
        #: held from taking bytes out of _outgoing until they are in the socket
        self._send_lock = threading.Lock()
        #: plain text received during the handshake, for the first recv (receiver only)
        self._early = bytearray()
        #: the peer's stream ended (receiver only)
        self._eof = False
        #: a receive error found after some plain text was returned: the next recv's
        self._recv_error: OSError | None = None
        #: the first error sending on the socket: the stream lost bytes, later sends fail
        self._send_error: OSError | None = None
        self._handshaken = False
        self.family = sock.family

    # -- the handshake ------------------------------------------------------------------

    def handshake(self, timeout: float | None = HANDSHAKE_TIMEOUT) -> None:
        """Run the TLS handshake, at most ``timeout`` seconds (None: no limit), then make
        the socket blocking.  Call it once, before anything else.

        Raises:
            TlsRefused: as :func:`wrap`; the socket is closed.
        """
        if self._handshaken:
            raise RuntimeError("TLS handshake already done")
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            self._handshake(deadline)
            self._sock.settimeout(None)
        except TlsRefused:
            self._close_refused()
            raise
        except TimeoutError:
            self._sock.close()
            raise TlsRefused(f"no TLS handshake within {timeout:g} s (the peer does not "
                             "speak TLS, or does not answer)") from None
        except OSError as e:
            self._sock.close()
            raise TlsRefused("the connection failed during the TLS handshake: "
                             f"{e.strerror or e}") from None
        except BaseException:
            self._sock.close()
            raise
        self._handshaken = True

    def _close_refused(self) -> None:
        """Close the socket after a refusal, first reading what the peer sent that is
        not read yet: closing a TCP socket with unread data sends a reset, which can
        reach the peer before the alert saying why, and hide it."""
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_WR)
            self._sock.settimeout(0)
            while self._sock.recv(RAW_RECV_BYTES):
                pass
        self._sock.close()

    def _handshake(self, deadline: float | None) -> None:
        first = True
        while True:
            try:
                self._obj.do_handshake()
                done = True
            except ssl.SSLWantReadError:
                done = False
            except ssl.SSLError as e:
                self._refuse(e)
            self._handshake_send(deadline)
            if done:
                break
            self._handshake_recv(deadline, first)
            first = False
        if self._server_side:
            return
        # Under TLS 1.3 the client is done before the server has checked the client's
        # certificate; the server sends its session ticket once it has (or an alert if
        # it refuses): wait for one or the other, so a refusal is a TlsRefused here, not
        # an error on the first recv.
        while True:
            try:
                data = self._obj.read(RAW_RECV_BYTES)
            except ssl.SSLWantReadError:
                if self._has_ticket():
                    return
                self._handshake_recv(deadline, False)
                continue
            except ssl.SSLError as e:
                self._refuse(e)
            if not data:
                raise TlsRefused("the peer closed the connection right after the TLS "
                                 "handshake")
            # plain text from the server: it accepted us
            self._early += data
            return

    def _has_ticket(self) -> bool:
        try:
            session = self._obj.session
        except ValueError:  # (no session yet)
            return False
        return session is not None and session.has_ticket

    def _handshake_send(self, deadline: float | None) -> None:
        out = self._outgoing.read()
        if out:
            self._sock.settimeout(_remaining(deadline))
            self._sock.sendall(out)

    def _handshake_recv(self, deadline: float | None, first: bool) -> None:
        self._sock.settimeout(_remaining(deadline))
        data = self._sock.recv(RAW_RECV_BYTES)
        if not data:
            raise TlsRefused("the peer closed the connection during the TLS handshake "
                             "(does it speak TLS? did it refuse our certificate?)")
        # A TLS peer's first bytes are a handshake or alert record header (type 22 or
        # 21, version 3.x); anything else is plain text: say so instead of OpenSSL's
        # "wrong version number"
        if first and (data[0] not in (21, 22) or (len(data) > 1 and data[1] != 3)):
            raise TlsRefused(f"the peer does not speak TLS (it sent {bytes(data[:16])!r})")
        self._incoming.write(data)

    def _refuse(self, e: ssl.SSLError) -> None:
        """Raise the TlsRefused for the handshake error ``e``, after sending the alert
        OpenSSL made for the peer (so it learns why) if the socket takes it at once."""
        out = self._outgoing.read()
        if out:
            with contextlib.suppress(OSError):
                self._sock.settimeout(0.5)
                self._sock.sendall(out)
        raise TlsRefused(_why(e)) from None

    # -- receiving ----------------------------------------------------------------------

    def recv(self, bufsize: int) -> bytes:
        """Up to ``bufsize`` bytes of plain text from the peer, blocking until there is
        at least one; b"" once the peer's stream has ended (its close_notify, or its
        socket closing without one: csnap frames its messages, so a cut-off message is
        seen as a connection that ended mid-message).  One thread at a time.

        Raises:
            OSError: a socket error (reset, timeout), or ``ssl.SSLError`` (an OSError)
                for a TLS error: a damaged or forged record, an alert from the peer.
        """
        if self._early:
            data = bytes(self._early[:bufsize])
            del self._early[:bufsize]
            return data
        while True:
            if self._recv_error is not None:
                raise self._recv_error
            if self._eof or bufsize <= 0:
                return b""
            with self._ssl_lock:
                data = self._decrypt(bufsize)
                produced = self._outgoing.pending > 0
            if produced:
                self._flush_from_receiver()
            if data:
                return data
            if self._eof or self._recv_error is not None:
                continue
            raw = self._sock.recv(RAW_RECV_BYTES)  # (no lock held: senders go on)
            with self._ssl_lock:
                if raw:
                    self._incoming.write(raw)
                else:
                    self._incoming.write_eof()

    def _decrypt(self, bufsize: int) -> bytes:
        """(``_ssl_lock`` held) Up to ``bufsize`` bytes of the plain text the records in
        ``_incoming`` hold; sets ``_eof`` or ``_recv_error`` at their end."""
        out = bytearray()
        while len(out) < bufsize:
            try:
                chunk = self._obj.read(min(bufsize - len(out), MAX_RECORD))
            except ssl.SSLWantReadError:
                break
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                # (close_notify; the socket's EOF without one)
                self._eof = True
                break
            except ssl.SSLError as e:
                self._recv_error = e
                break
            if not chunk:
                self._eof = True
                break
            out += chunk
        return bytes(out)

    # -- sending ------------------------------------------------------------------------

    def sendall(self, data: bytes | bytearray | memoryview) -> None:
        """Encrypt ``data`` and send all of it, blocking until it is in the socket's
        send buffer.  Any number of threads may call it at once (and while another
        thread is in :meth:`recv`): their data does not interleave.

        Raises:
            OSError: the socket failed (this time or in an earlier send: the stream then
                lost bytes and every later send fails), or ``ssl.SSLError`` (an OSError).
        """
        view = memoryview(data).cast("B")
        with self._send_lock:
            for start in range(0, len(view), SEND_CHUNK):
                with self._ssl_lock:
                    self._obj.write(view[start:start + SEND_CHUNK])
                    out = self._outgoing.read()
                self._send_raw(out)
        self._flush_left()

    def _send_raw(self, out: bytes) -> None:
        """(``_send_lock`` held) Send ``out`` on the socket, blocking."""
        if self._send_error is not None:
            err = self._send_error
            raise OSError(err.errno, f"an earlier send failed: {err.strerror or err}")
        try:
            self._sock.sendall(out)
        except OSError as e:
            self._send_error = e
            raise

    def _outgoing_pending(self) -> bool:
        with self._ssl_lock:
            return self._outgoing.pending > 0

    def _flush_left(self) -> None:
        """(a sender, after releasing ``_send_lock``) Send what the receiver put in
        ``_outgoing`` but could not send while the lock was held."""
        while self._outgoing_pending():
            with self._send_lock:
                with self._ssl_lock:
                    out = self._outgoing.read()
                if out:
                    self._send_raw(out)

    def _flush_from_receiver(self) -> None:
        """(the receiver) Send what a read put in ``_outgoing``, never blocking: if a
        sender holds ``_send_lock`` it sends it after releasing the lock; what the socket
        does not take at once goes out from a thread that takes over the lock."""
        while self._send_lock.acquire(blocking=False):
            handed_over = False
            try:
                with self._ssl_lock:
                    out = self._outgoing.read()
                if out and self._send_error is None:
                    rest = self._send_nowait(out)
                    if rest:
                        threading.Thread(target=self._send_rest, args=(rest,), daemon=True,
                                         name="ddsnap-tls-send").start()
                        handed_over = True
            finally:
                if not handed_over:
                    self._send_lock.release()
            if handed_over or not self._outgoing_pending():
                return

    def _send_nowait(self, out: bytes) -> bytes:
        """(``_send_lock`` held) Send as much of ``out`` as the socket takes without
        blocking; returns the rest (b"" after an error, recorded in ``_send_error``)."""
        view = memoryview(out)
        fd = self._sock.fileno()
        if fd < 0:
            self._send_error = OSError(errno.EBADF, "the socket is closed")
            return b""
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        try:
            # (poll first: a socket with a timeout would wait in send for room)
            while view and poller.poll(0):
                view = view[self._sock.send(view, socket.MSG_DONTWAIT):]
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as e:
            self._send_error = e
            return b""
        return bytes(view)

    def _send_rest(self, rest: bytes) -> None:
        """(a thread holding ``_send_lock``, handed over by the receiver) Send ``rest``,
        release the lock, then send what was left meanwhile."""
        try:
            with contextlib.suppress(OSError):  # (recorded; the receiver sees it end)
                self._send_raw(rest)
        finally:
            self._send_lock.release()
        with contextlib.suppress(OSError):
            self._flush_left()

    # -- the rest of the socket interface -----------------------------------------------

    def shutdown(self, how: int) -> None:
        """Shut down the socket (``socket.SHUT_RD``, ``SHUT_WR`` or ``SHUT_RDWR``): a
        thread blocked in :meth:`recv` or :meth:`sendall` returns (b"") or fails.  No
        close_notify is sent: that would wait for the send lock, which a sender blocked
        on a peer that reads nothing may hold; the peer sees EOF, which is EOF to it.

        Raises:
            OSError: as ``socket.shutdown`` (not connected, closed).
        """
        self._sock.shutdown(how)

    def close(self) -> None:
        """Close the socket (no close_notify: see :meth:`shutdown`)."""
        self._sock.close()

    def fileno(self) -> int:
        """The socket's file descriptor (-1 once closed).  Its readiness says little:
        decrypted plain text may be waiting in memory."""
        return self._sock.fileno()

    def settimeout(self, timeout: float | None) -> None:
        """Seconds a raw receive or send may block before ``TimeoutError`` (None:
        blocking)."""
        self._sock.settimeout(timeout)

    def gettimeout(self) -> float | None:
        return self._sock.gettimeout()

    def getpeername(self) -> Any:
        """The peer's address, as ``socket.getpeername``."""
        return self._sock.getpeername()

    def getpeercert(self, binary_form: bool = False) -> Any:
        """The peer's certificate, as ``SSLSocket.getpeercert``: a dict of its fields
        (``subject``, ``notAfter``, ...), or its DER bytes with ``binary_form``."""
        with self._ssl_lock:
            return self._obj.getpeercert(binary_form)

    def version(self) -> str | None:
        """The TLS version in use ("TLSv1.3"), None before the handshake."""
        with self._ssl_lock:
            return self._obj.version()

    def __enter__(self) -> TlsSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _remaining(deadline: float | None) -> float | None:
    """Seconds to ``deadline`` (a ``time.monotonic`` time; None: no limit)."""
    if deadline is None:
        return None
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("TLS handshake timed out")
    return left


def _why(e: ssl.SSLError) -> str:
    """What the handshake error ``e`` means, in words a user understands."""
    if isinstance(e, ssl.SSLCertVerificationError):
        code, msg = e.verify_code, e.verify_message
        if code in _NOT_OUR_CA:
            return f"the peer's certificate is not signed by the cluster CA ({msg})"
        if code == 10:
            return f"the peer's certificate has expired ({msg})"
        if code == 9:
            return (f"the peer's certificate is not valid yet ({msg}; are both hosts' "
                    "clocks right?)")
        if code == 26:
            return (f"the peer's certificate is not for this use ({msg}: a cluster "
                    "certificate's extended key usage must allow serverAuth and clientAuth)")
        return f"the peer's certificate was not accepted ({msg})"
    reason = e.reason or ""
    if reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE":
        return "the peer sent no certificate"
    if reason == "TLSV13_ALERT_CERTIFICATE_REQUIRED":
        return "the peer requires a certificate and we sent none"
    if reason == "TLSV1_ALERT_UNKNOWN_CA":
        return ("the peer refused our certificate: it is not signed by the peer's CA (are "
                "both hosts given the same CA certificate?)")
    if reason.endswith(_REFUSED_OURS):
        return f"the peer refused our certificate ({_words(e)})"
    if reason in _OLD_TLS:
        return f"the peer does not speak TLS 1.3 ({_words(e)})"
    if reason in _NOT_TLS:
        return f"the peer does not speak TLS ({_words(e)})"
    if isinstance(e, ssl.SSLZeroReturnError | ssl.SSLEOFError):
        return "the peer closed the connection during the TLS handshake"
    return f"the TLS handshake failed ({_words(e)})"
