"""Small Deferred helpers the parts share."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from twisted.internet import defer


@contextlib.asynccontextmanager
async def locked(lock: defer.DeferredLock) -> AsyncIterator[None]:
    """``async with locked(lock):`` holds a DeferredLock for the block, released however the block ends."""
    await lock.acquire()
    try:
        yield
    finally:
        lock.release()


def observe(d: defer.Deferred) -> defer.Deferred:
    """A new Deferred that fires like ``d`` (result or failure) without taking ``d``'s result from the
    callbacks that come after."""
    out: defer.Deferred = defer.Deferred()

    def passthrough(result):
        if not out.called:
            if isinstance(result, defer.Failure):
                out.errback(result)
            else:
                out.callback(result)
        return result

    d.addBoth(passthrough)
    return out
