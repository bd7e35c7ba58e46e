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
import socket
import stat
import time

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
