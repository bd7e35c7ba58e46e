"""TCP settings of a csnap connection between hosts.

A metadata server and a node on another host must each notice within seconds that the
other is gone, even when nothing is being sent (a host that lost power sends no FIN, a
partition drops packets silently): the server to give back what the node held (after
its grace period), the node to stop serving from kept mappings and to reconnect (to a
new server after a failover).  Linux's TCP keepalive (``tcp(7)``: ``TCP_KEEPIDLE``,
``TCP_KEEPINTVL``, ``TCP_KEEPCNT``) probes an idle connection, and ``TCP_USER_TIMEOUT``
bounds how long sent data may stay unacknowledged; both end the connection with
``ETIMEDOUT``.
"""

from __future__ import annotations

import contextlib
import socket

#: seconds of silence before the first keepalive probe, between probes, and probes lost
#: before the connection is given up: a dead peer is noticed within about 5 s
KEEPALIVE_IDLE = 2
KEEPALIVE_INTERVAL = 1
KEEPALIVE_PROBES = 3
#: milliseconds sent data may stay unacknowledged before the connection is given up
USER_TIMEOUT_MS = 5000


def tune_tcp(sock: socket.socket) -> None:
    """Set ``TCP_NODELAY`` (queries are small and wait for their replies), keepalive
    probes and the user timeout above on the connected TCP socket ``sock``.  Options
    this kernel lacks are skipped (they only make a dead peer noticed sooner)."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (("TCP_KEEPIDLE", KEEPALIVE_IDLE),
                        ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL),
                        ("TCP_KEEPCNT", KEEPALIVE_PROBES),
                        ("TCP_USER_TIMEOUT", USER_TIMEOUT_MS)):
        opt = getattr(socket, name, None)
        if opt is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, opt, value)
