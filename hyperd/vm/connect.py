"""Connecting to the UNIX sockets qemu serves, retrying until qemu has created them.

qemu creates its ``server=on,wait=off`` sockets a few tens of milliseconds after it starts; a connect before
that fails with ENOENT or ECONNREFUSED, so we retry on a short period until a deadline.
"""

from __future__ import annotations

from typing import Callable, TypeVar

from twisted.internet import error, task
from twisted.internet.endpoints import UNIXClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol

P = TypeVar("P", bound=Protocol)

RETRY_PERIOD = 0.02


class SocketUnavailable(Exception):
    """The socket did not accept a connection before the deadline."""


async def connect_unix(
    reactor,
    path: str,
    factory: Callable[[], P],
    timeout: float = 10.0,
    period: float = RETRY_PERIOD,
    give_up: Callable[[], bool] = lambda: False,
) -> P:
    """Connect a new ``factory()`` protocol to ``path``, retrying every ``period`` s for up to ``timeout`` s.

    ``give_up()`` is asked before each retry (e.g. "has qemu exited?") so that a dead VM fails fast.
    """
    deadline = reactor.seconds() + timeout
    last: Exception | None = None
    while True:
        endpoint = UNIXClientEndpoint(reactor, path, timeout=max(1, int(timeout)))
        try:
            return await connectProtocol(endpoint, factory())
        except (error.ConnectError, OSError) as e:
            last = e
        if give_up():
            raise SocketUnavailable("%s: the process behind it is gone (%s)" % (path, last))
        if reactor.seconds() + period > deadline:
            raise SocketUnavailable("%s: no connection within %.1f s (%s)" % (path, timeout, last))
        await task.deferLater(reactor, period, lambda: None)
