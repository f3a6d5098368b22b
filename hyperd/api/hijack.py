"""Taking an HTTP connection over for a raw stream (attach, exec): Docker's hijack, in twisted.web.

A route validates its parameters (errors are ordinary responses), then returns a :class:`HijackResource`.
Its ``render`` writes ``101 UPGRADED`` (the client sent ``Upgrade: tcp``) or the legacy ``200 OK`` head
itself, swaps the socket's protocol for a :class:`HijackSession` and returns ``NOT_DONE_YET``; the
``Request`` is never written to or finished again (reference/twisted.md §2.3).

Two fixes the reference verified are built in: bytes the client sent right after the request (they sat in
the HTTP channel's private buffer) are replayed to the session after a ``resumeProducing``, and before any
byte read later; and no foreign producer is ever registered directly: :meth:`HijackSession.input_producer`
forwards pause/resume and ignores ``stopProducing``, so closing one side never closes the other.

A session is an ``IHalfCloseableProtocol``: the client's half-close is ``input_ended`` (the process's stdin
EOF) while output keeps flowing; ``finish`` closes the connection once output has ended.
"""

from __future__ import annotations

import select
import socket
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from zope.interface import implementer

__all__ = ["MULTIPLEXED_STREAM", "RAW_STREAM", "HijackResource", "HijackSession"]

RAW_STREAM = b"application/vnd.docker.raw-stream"
MULTIPLEXED_STREAM = b"application/vnd.docker.multiplexed-stream"

log = Logger()


@implementer(IPushProducer)
class _InputProducer:
    """Lets a consumer of the client's bytes (the guest's stream channel) pause reading the socket."""

    def __init__(self, session: HijackSession, reason: str) -> None:
        self._session = session
        self._reason = reason

    def pauseProducing(self) -> None:
        self._session.pause_input(self._reason)

    def resumeProducing(self) -> None:
        self._session.resume_input(self._reason)

    def stopProducing(self) -> None:
        # The consumer closed (the VM's channel went away); the session learns it from its output's end.
        self._session.resume_input(self._reason)


@implementer(IHalfCloseableProtocol)
class HijackSession(Protocol):
    """The protocol of a hijacked connection. Subclasses implement the hooks:

    - ``session_started()``: the head is written; start the process or subscribe to its output;
    - ``input_received(data)``: the client's bytes, in order, once ``open_input()`` was called;
    - ``input_ended()``: the client half-closed (after every byte it sent was delivered);
    - ``session_ended(reason)``: the connection is gone, for whatever reason (exactly once).
    """

    #: After a half-close, how often to check whether the client has gone entirely.
    PEER_CHECK_INTERVAL = 2.0

    def __init__(self) -> None:
        self.request: Any = None
        self.reactor: Any = None
        self._peer_check: Any = None
        self.read_closed = False
        self.closed = False
        self._held = bytearray()
        self._replayed = False
        self._input_open = False
        self._eof_pending = False
        self._pauses: set[str] = {"replay", "input"}
        self._paused: bool | None = None
        self.bytes_out = 0

    # -- set-up ------------------------------------------------------------------------------------------

    def connectionMade(self) -> None:
        self._apply(force=True)
        self.session_started()

    def hijacked(self, early: bytes) -> None:
        """Called once by the resource after the current read unwound: ``early`` came before any byte
        ``dataReceived`` got since."""
        self._replayed = True
        if early:
            self._held[:0] = early
        self._pauses.discard("replay")
        self._flush()
        self._apply(force=True)  # the HTTP channel may have paused the socket (more than 16 KiB arrived)

    def open_input(self) -> None:
        """The process can take stdin now (e.g. EXECCMD was acknowledged)."""
        if self._input_open:
            return
        self._input_open = True
        self._pauses.discard("input")
        self._flush()
        self._apply()

    def input_producer(self, reason: str = "consumer") -> IPushProducer:
        return _InputProducer(self, reason)

    # -- input ---------------------------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if not (self._replayed and self._input_open):
            self._held += data
            return
        self.input_received(data)

    def readConnectionLost(self) -> None:
        if self.read_closed:
            return
        self.read_closed = True
        if self._peer_gone():
            # Not a half-close: the client closed (or died). Nobody reads what we would write.
            self.transport.abortConnection()
            return
        self._schedule_peer_check()
        if self._replayed and self._input_open and not self._held:
            self.input_ended()
        else:
            self._eof_pending = True

    def writeConnectionLost(self) -> None:
        self.finish()

    def _peer_gone(self) -> bool:
        """On a UNIX socket a half-close only shuts our reading side; the peer's close shuts both, which
        poll reports as POLLHUP. (Over TCP the two look alike until a write fails.)"""
        try:
            fd = self.transport.fileno()
            poller = select.poll()
            poller.register(fd, select.POLLIN)
            return any(ev & (select.POLLHUP | select.POLLERR) for _, ev in poller.poll(0))
        except (OSError, ValueError, AttributeError):
            return False

    def _schedule_peer_check(self) -> None:
        if self.reactor is None or self.closed:
            return

        def check() -> None:
            self._peer_check = None
            if self.closed:
                return
            if self._peer_gone():
                self.transport.abortConnection()
            else:
                self._schedule_peer_check()

        self._peer_check = self.reactor.callLater(self.PEER_CHECK_INTERVAL, check)

    def _flush(self) -> None:
        if not (self._replayed and self._input_open):
            return
        if self._held:
            data = bytes(self._held)
            self._held.clear()
            self.input_received(data)
        if self._eof_pending:
            self._eof_pending = False
            self.input_ended()

    def pause_input(self, reason: str) -> None:
        self._pauses.add(reason)
        self._apply()

    def resume_input(self, reason: str) -> None:
        self._pauses.discard(reason)
        self._apply()

    def _apply(self, force: bool = False) -> None:
        # After a half-close the socket must not be resumed: it would read the EOF again.
        if self.closed or self.read_closed or self.transport is None:
            return
        paused = bool(self._pauses)
        if paused == self._paused and not force:
            return
        self._paused = paused
        if paused:
            self.transport.pauseProducing()
        else:
            self.transport.resumeProducing()

    # -- output and the end ----------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if not self.closed:
            self.bytes_out += len(data)
            self.transport.write(data)

    def write_sequence(self, parts: list[bytes]) -> None:
        if not self.closed:
            self.bytes_out += sum(len(p) for p in parts)
            self.transport.writeSequence(parts)

    def finish(self) -> None:
        """Close the connection once what was written has been sent."""
        if not self.closed and self.transport is not None:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = None) -> None:
        if self.closed:
            return
        self.closed = True
        if self._peer_check is not None and self._peer_check.active():
            self._peer_check.cancel()
        self._peer_check = None
        try:
            self.session_ended(reason)
        finally:
            request, self.request = self.request, None
            if request is not None:
                channel = request.channel
                # The channel never sees the socket again: let it (and the Request's finish observers)
                # know it is gone, so nothing waits on it.
                if channel is not None:
                    channel.connectionLost(reason)
                log.info("{method} {uri}: stream closed ({n} bytes sent)", method=request.method.decode(),
                         uri=request.uri.decode("utf-8", "replace"), n=self.bytes_out)

    # -- hooks -------------------------------------------------------------------------------------------

    def session_started(self) -> None:
        pass

    def input_received(self, data: bytes) -> None:
        pass

    def input_ended(self) -> None:
        pass

    def session_ended(self, reason: Failure | None) -> None:
        pass


#: What a stream's socket may hold before its producer is paused, and its kernel buffers. Twisted's
#: default (64 KiB) pauses the guest so often that the two ends rarely run at once; this is still bounded.
STREAM_BUFFER = 1024 * 1024


def _widen(transport: Any) -> None:
    transport.bufferSize = STREAM_BUFFER
    try:
        sock = transport.getHandle()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, STREAM_BUFFER)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, STREAM_BUFFER)
    except (OSError, AttributeError):
        pass


class HijackResource(Resource):
    """A leaf resource whose rendering takes the connection over for ``make_session()``."""

    isLeaf = True

    def __init__(self, make_session: Callable[[], HijackSession], content_type: bytes, reactor: Any,
                 headers: dict[bytes, bytes] | None = None) -> None:
        super().__init__()
        self._make_session = make_session
        self._content_type = content_type
        self._reactor = reactor
        self._headers = headers or {}

    def render(self, request: Any) -> Any:
        channel = request.channel
        if channel is None or getattr(request, "_disconnected", False):
            return NOT_DONE_YET  # the client left while the route ran: nobody to stream to
        if len(channel.requests) > 1:
            # Another request was pipelined behind this one: its bytes are not stdin. Refuse plainly.
            request.setResponseCode(400)
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return b"bad parameter: a streaming request cannot be pipelined\n"
        transport = channel.transport
        channel.setTimeout(None)  # the idle timer would cut a quiet stream
        _widen(transport)
        transport.unregisterProducer()  # the channel registered itself in connectionMade
        headers = Headers({b"Content-Type": [self._content_type]})
        for name, value in self._headers.items():
            headers.setRawHeaders(name, [value])
        if request.getHeader(b"upgrade") is not None:
            headers.setRawHeaders(b"Connection", [b"Upgrade"])
            headers.setRawHeaders(b"Upgrade", [b"tcp"])
            channel.writeHeaders(b"HTTP/1.1", b"101", b"UPGRADED", headers)
        else:
            channel.writeHeaders(b"HTTP/1.1", b"200", b"OK", headers)
        session = self._make_session()
        session.request = request
        session.reactor = self._reactor
        transport.protocol = session  # the socket dispatches reads, EOF and close through .protocol
        session.makeConnection(transport)

        def replay() -> None:
            early = b"".join(channel._dataBuffer)
            channel._dataBuffer = []
            if not session.closed:
                session.hijacked(early)

        self._reactor.callLater(0, replay)
        return NOT_DONE_YET
