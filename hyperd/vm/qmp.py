"""A Twisted client for QMP, the QEMU Machine Protocol: newline-delimited JSON over a UNIX socket.

qemu greets, we send ``qmp_capabilities``, then each command carries an id and gets one reply with that id;
events (SHUTDOWN, STOP, RESUME, ...) arrive at any time, even during negotiation, and go to observers.
"""

from __future__ import annotations

import itertools
import json
from typing import Any, Callable

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver
from twisted.python.failure import Failure

from hyperd.vm.connect import connect_unix

log = Logger()


class QMPError(Exception):
    """qemu answered a command with an error; ``error_class`` is QMP's class, e.g. CommandNotFound."""

    def __init__(self, error_class: str, desc: str) -> None:
        super().__init__("%s: %s" % (error_class, desc))
        self.error_class = error_class
        self.desc = desc


class QMPClosed(Exception):
    """The QMP connection closed before the reply came."""


class QMPProtocol(LineOnlyReceiver):
    """One QMP session. ``ready`` fires (with the greeting) once capabilities are negotiated."""

    delimiter = b"\n"
    MAX_LENGTH = 16 * 1024 * 1024

    def __init__(self) -> None:
        self.ready: defer.Deferred = defer.Deferred()
        self.closed: defer.Deferred = defer.Deferred()
        self.greeting: dict | None = None
        self._ids = itertools.count(1)
        self._pending: dict[str, defer.Deferred] = {}
        self._observers: list[Callable[[str, dict], None]] = []
        self._connected = False

    # -- public API ----------------------------------------------------------------------------------------

    def add_event_observer(self, observer: Callable[[str, dict], None]) -> None:
        """``observer(name, event)`` is called for every event; ``event`` is the whole JSON object."""
        self._observers.append(observer)

    def remove_event_observer(self, observer: Callable[[str, dict], None]) -> None:
        if observer in self._observers:
            self._observers.remove(observer)

    def execute(self, name: str, arguments: dict | None = None) -> defer.Deferred:
        """Run one command; the Deferred fires with its ``return`` value or fails with QMPError/QMPClosed."""
        if not self._connected:
            return defer.fail(QMPClosed("QMP is not connected"))
        qid = "hd-%d" % next(self._ids)
        message: dict[str, Any] = {"execute": name, "id": qid}
        if arguments:
            message["arguments"] = arguments
        d = defer.Deferred()
        self._pending[qid] = d
        self.sendLine(json.dumps(message).encode())
        return d

    def close(self) -> None:
        if self.transport is not None:
            self.transport.loseConnection()

    # -- Twisted -------------------------------------------------------------------------------------------

    def connectionMade(self) -> None:
        self._connected = True

    def lineReceived(self, line: bytes) -> None:
        line = line.strip()
        if not line:
            return
        try:
            message = json.loads(line)
        except ValueError:
            log.warn("QMP: ignoring a line that is not JSON: {line!r}", line=line[:200])
            return
        if not isinstance(message, dict):
            return
        if "QMP" in message:
            self.greeting = message
            self._negotiate()
        elif "event" in message:
            self._dispatch_event(message)
        elif "id" in message:
            d = self._pending.pop(message["id"], None)
            if d is None:
                log.warn("QMP: reply with an unknown id: {m!r}", m=message)
            elif "error" in message:
                err = message["error"] or {}
                d.errback(QMPError(str(err.get("class", "GenericError")), str(err.get("desc", ""))))
            else:
                d.callback(message.get("return"))
        else:
            log.warn("QMP: unexpected message {m!r}", m=message)

    def lineLengthExceeded(self, line: bytes) -> None:
        log.error("QMP: line longer than {n} bytes, closing", n=self.MAX_LENGTH)
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure = None) -> None:
        self._connected = False
        pending, self._pending = self._pending, {}
        for d in pending.values():
            d.errback(QMPClosed("QMP connection lost"))
        if not self.ready.called:
            self.ready.errback(QMPClosed("QMP connection lost before negotiation"))
        if not self.closed.called:
            self.closed.callback(None)

    # -- internals -----------------------------------------------------------------------------------------

    def _negotiate(self) -> None:
        d = self.execute("qmp_capabilities")

        def done(_):
            if not self.ready.called:
                self.ready.callback(self.greeting)

        def failed(f):
            if not self.ready.called:
                self.ready.errback(f)

        d.addCallbacks(done, failed)

    def _dispatch_event(self, message: dict) -> None:
        name = str(message.get("event"))
        for observer in list(self._observers):
            try:
                observer(name, message)
            except Exception:
                log.failure("QMP event observer failed on {name}", name=name)


async def connect_qmp(reactor: IReactorTime, path: str, timeout: float = 10.0) -> QMPProtocol:
    """Connect to qemu's QMP socket (retrying until it exists) and negotiate capabilities."""
    proto = await connect_unix(reactor, path, QMPProtocol, timeout=timeout)
    d = proto.ready
    d.addTimeout(timeout, reactor)
    try:
        await d
    except Exception:
        proto.close()
        raise
    return proto
