"""The control socket: administrative operations on a served store.

A Unix stream socket; each request and each reply is one line of JSON (see
``docs/protocol.md``, "Control socket").  Request: ``{"op": NAME, "args": {...}}``.
Reply: ``{"ok": true, "result": ...}`` or ``{"ok": false, "error": {"type": CLASS,
"message": TEXT}}``, where CLASS names a :mod:`ddsnap.errors` class so the client can
re-raise the same error (and exit with the same code) as a local run would.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import selectors
import socket
import stat
import time
from collections.abc import Generator, Iterable, Iterator
from typing import Any

from .errors import ControlError, ControlPathError, DdsnapError, ProtocolError, from_dict

log = logging.getLogger("ddsnap.control")

#: longest request line accepted, in bytes
MAX_LINE = 64 * 1024


class ControlServer:
    """Serves control requests by running ``handler(op, args)`` in a worker thread.

    Args:
        path: the socket path (replaced if a stale socket is there).
        handler: ``(op: str, args: dict) -> JSON-able result``; raises DdsnapError.
    """

    def __init__(self, path: str, handler):
        self.path = path
        self.handler = handler
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        """Listen on the socket path (mode 0600).

        A socket left by a dead server is replaced.

        Raises:
            ControlPathError: the path is in use by a live server, exists and is not a
                socket, or cannot be bound (its directory does not exist, permission
                denied, too long for a unix socket, ...).  Nothing is left behind.
        """
        try:
            mode = os.lstat(self.path).st_mode
        except FileNotFoundError:
            mode = None
        except OSError as e:
            raise ControlPathError(self.path, _why(e), e.errno) from None
        if mode is not None:
            # never remove anything but a dead socket: the path may be a user's file
            if not stat.S_ISSOCK(mode):
                raise ControlPathError(self.path, "exists and is not a socket", errno.EEXIST)
            if _alive(self.path):
                raise ControlPathError(self.path, "in use by another server",
                                       errno.EADDRINUSE)
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            except OSError as e:
                raise ControlPathError(self.path, _why(e), e.errno) from None
        try:
            self._server = await asyncio.start_unix_server(self._client, path=self.path,
                                                           limit=MAX_LINE)
        except OSError as e:
            raise ControlPathError(self.path, _why(e), e.errno) from None
        try:
            os.chmod(self.path, 0o600)
        except OSError as e:
            await self.close()
            raise ControlPathError(self.path, _why(e), e.errno) from None

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                try:
                    line = await reader.readline()
                except (ValueError, asyncio.LimitOverrunError):
                    writer.write(_reply_error(ProtocolError("control request too long")))
                    break
                if not line:
                    break
                try:
                    req = json.loads(line)
                    if not isinstance(req, dict) or not isinstance(req.get("op"), str):
                        raise ValueError("not an object with an 'op'")
                    args = req.get("args") or {}
                    if not isinstance(args, dict):
                        raise ValueError("'args' is not an object")
                except ValueError as e:
                    writer.write(_reply_error(ProtocolError(f"malformed control request: {e}")))
                    await writer.drain()
                    continue
                try:
                    result = await loop.run_in_executor(None, self.handler, req["op"], args)
                    out = json.dumps({"ok": True, "result": result}).encode() + b"\n"
                except DdsnapError as e:
                    out = _reply_error(e)
                except TypeError as e:  # wrong arguments for the op
                    out = _reply_error(ProtocolError(f"bad arguments for {req['op']}: {e}"))
                except Exception as e:  # noqa: BLE001 - report, keep serving
                    log.exception("control operation %s failed", req["op"])
                    out = _reply_error(DdsnapError(f"internal error: {e}"))
                writer.write(out)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            # Retrieves the transport's error, if any: a client that gave up (its
            # --timeout) before the reply went out leaves a broken pipe behind.
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()


def _reply_error(e: DdsnapError) -> bytes:
    return json.dumps({"ok": False, "error": e.to_dict()}).encode() + b"\n"


def _why(e: OSError) -> str:
    """The OS error's text without the path (the message names it already)."""
    return os.strerror(e.errno) if e.errno else str(e)


def _alive(path: str) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


def call(path: str, op: str, args: dict | None = None, timeout: float | None = None):
    """Send one request to the control socket at ``path``; return its result.

    Args:
        timeout: seconds the whole exchange (connect, send, reply) may take; None waits
            as long as the server takes.  A server that is stopped (SIGSTOP), hung or
            overloaded then fails the call instead of hanging the caller.

    Raises:
        ControlError: the socket cannot be reached, answered badly, or did not answer
            within ``timeout``.
        DdsnapError: the operation's own error, re-raised with its original class.
    """
    deadline = None if timeout is None else time.monotonic() + timeout

    def remaining() -> float | None:
        if deadline is None:
            return None
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        return left

    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            s.settimeout(remaining())
            s.connect(path)
        except TimeoutError:
            raise
        except OSError as e:
            raise ControlError(f"cannot reach the ddsnap server at {path}: {e.strerror}") from None
        try:
            s.settimeout(remaining())
            s.sendall(json.dumps({"op": op, "args": args or {}}).encode() + b"\n")
            line = bytearray()
            while not line.endswith(b"\n"):
                s.settimeout(remaining())
                data = s.recv(MAX_LINE)
                if not data:
                    break
                line += data
        except TimeoutError:
            raise
        except OSError as e:
            raise ControlError(f"lost the connection to the ddsnap server at {path}: "
                               f"{e.strerror or e}") from None
        if not line:
            raise ControlError(f"the ddsnap server at {path} closed the connection")
        try:
            reply = json.loads(line)
        except ValueError:
            raise ControlError(f"the ddsnap server at {path} sent a malformed reply") from None
    except TimeoutError:
        # The request may already be queued: a server that resumes still runs it.
        raise ControlError(f"the ddsnap server at {path} did not answer in {timeout:g} s "
                           "(is it stopped or hung? if it resumes, it may still carry out "
                           "the request)") from None
    finally:
        s.close()
    if not isinstance(reply, dict):
        raise ControlError(f"the ddsnap server at {path} sent a malformed reply")
    if reply.get("ok"):
        return reply.get("result")
    raise from_dict(reply.get("error") or {})


def call_many(path: str, requests: Iterable[tuple[str, dict | None]], depth: int = 32,
              timeout: float | None = None) -> Generator[Any, None, None]:
    """Send ``(op, args)`` requests on one connection to the control socket at ``path``,
    up to ``depth`` of them ahead of their replies; yield each result, in request order.

    The protocol allows it (docs/protocol.md: a connection may carry several requests,
    answered in order); the server still runs them one after the other, each as
    :func:`call` would have it run.  Pipelining saves the round trip (and the connection)
    per request: for many small requests, such as taking thousands of snapshots.

    A generator: the connection is made and requests are sent (pulled lazily from
    ``requests``) only as it is iterated, and closing it (or leaving the loop) closes the
    connection.  Requests and replies are written and read as the socket allows, so
    neither side waits on the other however large they are.

    Args:
        requests: ``(op, args)`` pairs; ``args`` may be None (no arguments).
        depth: requests sent ahead of their replies at most (at least 1).
        timeout: seconds the exchange may go without progress: connecting, and each wait
            for the socket to take a request or deliver a reply.  None waits as long as
            the server takes.

    Raises:
        ValueError: ``depth`` is less than 1 (at the call, before any connection).
        ControlError: the socket cannot be reached, answered badly, closed the
            connection with replies outstanding, or made no progress within ``timeout``.
        DdsnapError: an operation's own error, re-raised with its original class; no
            further result is yielded.  Requests already sent after the failed one may
            still be carried out by the server.
    """
    if depth < 1:
        raise ValueError(f"depth must be at least 1, not {depth}")
    return _call_many(path, iter(requests), depth, timeout)


def _call_many(path: str, requests: Iterator[tuple[str, dict | None]], depth: int,
               timeout: float | None) -> Generator[Any, None, None]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sel = selectors.DefaultSelector()
    try:
        try:
            s.settimeout(timeout)
            s.connect(path)
        except TimeoutError:
            raise ControlError(_no_progress(path, timeout)) from None
        except OSError as e:
            raise ControlError(f"cannot reach the ddsnap server at {path}: {e.strerror}") from None
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
        out = bytearray()  # requests not yet taken by the socket
        got = bytearray()  # replies read, not yet yielded
        outstanding = 0  # requests queued or sent, not yet answered
        more = True
        broken: OSError | None = None  # why the socket stopped taking requests
        while more or outstanding:
            while more and outstanding < depth:
                try:
                    op, args = next(requests)
                except StopIteration:
                    more = False
                    break
                out += json.dumps({"op": op, "args": args or {}}).encode() + b"\n"
                outstanding += 1
            if not outstanding:
                break
            end = got.find(b"\n")
            if end >= 0:
                line = bytes(got[:end + 1])
                del got[:end + 1]
                outstanding -= 1
                yield _result(path, line)
                continue
            sel.modify(s, selectors.EVENT_READ | (selectors.EVENT_WRITE if out else 0))
            events = sel.select(timeout)
            if not events:
                raise ControlError(_no_progress(path, timeout))
            mask = events[0][1]
            if mask & selectors.EVENT_READ:
                try:
                    data = s.recv(MAX_LINE)
                except BlockingIOError:
                    data = None
                except OSError as e:
                    raise ControlError(_lost(path, e)) from None
                if data == b"":
                    raise ControlError(_lost(path, broken) if broken else
                                       f"the ddsnap server at {path} closed the connection "
                                       f"with {outstanding} request(s) unanswered")
                if data:
                    got += data
            if mask & selectors.EVENT_WRITE and out:
                try:
                    del out[:s.send(out)]
                except BlockingIOError:
                    pass
                except OSError as e:
                    # The server hung up: what it answered before (perhaps why) is
                    # still to be read; nothing more is sent.
                    broken, more = e, False
                    out.clear()
    finally:
        sel.close()
        s.close()


def _no_progress(path: str, timeout: float | None) -> str:
    return (f"the ddsnap server at {path} did not answer in {timeout:g} s (is it stopped or "
            "hung? if it resumes, it may still carry out the requests sent)")


def _lost(path: str, e: OSError) -> str:
    return f"lost the connection to the ddsnap server at {path}: {e.strerror or e}"


def _result(path: str, line: bytes):
    """The result in one reply line, or its error raised (as :func:`call` does)."""
    try:
        reply = json.loads(line)
    except ValueError:
        raise ControlError(f"the ddsnap server at {path} sent a malformed reply") from None
    if not isinstance(reply, dict):
        raise ControlError(f"the ddsnap server at {path} sent a malformed reply")
    if reply.get("ok"):
        return reply.get("result")
    raise from_dict(reply.get("error") or {})
