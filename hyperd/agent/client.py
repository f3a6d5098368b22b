"""The host side of hyperstart's control channel (``sh.hyper.channel.0``), API 4244.

``AgentClient`` is a state machine that does no I/O: bytes from the guest go in through ``feed()``, bytes for
the guest come out through the ``write`` callable it was given. ``AgentProtocol`` wires it to a Twisted
transport. The rules it keeps (reference/hyperd.md §4.2, §4.5):

- the guest says READY first; we send nothing before it (unless reattaching to a guest that said it long ago);
- commands are strictly FIFO and each gets exactly one ACK (payload = return data) or ERROR (payload = text);
- we write at most 512 bytes at a time and write the next chunk only when the guest's NEXT counts (one per
  guest ``read()``) add up to everything written so far; NEXT arrives before the reply it precedes;
- PROCESSASYNCEVENT ``{"container","process","event","status"}`` arrives unsolicited at any time.
"""

from __future__ import annotations

import collections
import json
from typing import Callable

from twisted.internet import defer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from hyperd.agent import codec
from hyperd.errors import VMError
from hyperd.interfaces import IAgent

log = Logger()

#: Agent API versions we can drive: 4244 is hyperstart 1.x; 4242 differs only in what we do not use.
SUPPORTED_VERSIONS = (4244, 4242)


class AgentError(VMError):
    """The guest answered ERROR, or the channel broke. ``text`` is the guest's message, if any."""

    def __init__(self, message: str, code: int | None = None, text: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.text = text


class AgentClosed(AgentError):
    """The control channel closed (or broke) before the reply came."""


@implementer(IAgent)
class AgentClient:
    """The control-channel state machine. ``write(bytes)`` sends to the guest; ``feed(bytes)`` receives."""

    def __init__(
        self,
        write: Callable[[bytes], None],
        *,
        wait_ready: bool = True,
        on_event: Callable[[dict], None] | None = None,
        on_fatal: Callable[[str], None] | None = None,
    ) -> None:
        self._write = write
        self._on_event = on_event
        self._on_fatal = on_fatal
        self._decoder = codec.CtlDecoder()
        self._is_ready = not wait_ready
        self._ready_waiters: list[defer.Deferred] = []
        #: The agent's API version once ``handshake()`` asked for it.
        self.version: int | None = None
        self._closed: str | None = None
        # Requests whose reply we are waiting for, in the order they were (or will be) written.
        self._replies: collections.deque[tuple[int, defer.Deferred]] = collections.deque()
        # Messages not yet fully written; the first one may be partly written.
        self._outbox: collections.deque[bytearray] = collections.deque()
        self._written = 0
        self._acked = 0

    # -- public API ----------------------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed is not None

    @property
    def is_ready(self) -> bool:
        return self._is_ready

    def when_ready(self) -> defer.Deferred:
        """A Deferred firing once the guest said READY (at once if it did, or if we do not wait for it)."""
        if self._is_ready:
            return defer.succeed(None)
        if self._closed is not None:
            return defer.fail(AgentClosed("agent channel closed before READY: %s" % self._closed))
        d: defer.Deferred = defer.Deferred()
        self._ready_waiters.append(d)
        return d

    def set_event_handler(self, on_event: Callable[[dict], None] | None) -> None:
        self._on_event = on_event

    def request(self, code: int, payload: bytes = b"") -> defer.Deferred:
        """Queue one command; the Deferred fires with the ACK payload (bytes) or fails with AgentError."""
        if self._closed is not None:
            return defer.fail(AgentClosed("agent channel closed: %s" % self._closed, code))
        d: defer.Deferred = defer.Deferred()
        self._replies.append((code, d))
        self._outbox.append(bytearray(codec.encode_ctl(code, payload)))
        self._pump()
        return d

    def request_json(self, code: int, obj) -> defer.Deferred:
        return self.request(code, json.dumps(obj, separators=(",", ":")).encode())

    def ping(self) -> defer.Deferred:
        return self.request(codec.PING)

    async def handshake(self) -> int:
        """Wait for READY (if we wait for it) and check the agent's API version; return it."""
        await self.when_ready()
        payload = await self.request(codec.GETVERSION)
        try:
            version = codec.decode_u32(payload)
        except codec.FrameError as e:
            raise AgentError("GETVERSION: bad reply %r (%s)" % (payload[:16], e), codec.GETVERSION) from e
        if version not in SUPPORTED_VERSIONS:
            raise AgentError("the guest agent speaks API %d; hyperd needs %d" % (version, codec.API_VERSION),
                             codec.GETVERSION)
        self.version = version
        return version

    def feed(self, data: bytes) -> None:
        """Bytes from the guest, split or merged in any way."""
        if self._closed is not None:
            return
        try:
            frames = self._decoder.feed(data)
        except codec.FrameError as e:
            self._fatal("malformed frame from the guest: %s" % e)
            return
        for code, payload in frames:
            self._frame(code, payload)
            if self._closed is not None:
                return

    def connection_lost(self, reason: str = "connection lost") -> None:
        """The channel is gone: every pending and future request fails with AgentClosed."""
        if self._closed is not None:
            return
        self._closed = reason
        replies, self._replies = self._replies, collections.deque()
        self._outbox.clear()
        for code, d in replies:
            if not d.called:
                d.errback(AgentClosed("agent channel closed: %s" % reason, code))
        waiters, self._ready_waiters = self._ready_waiters, []
        for d in waiters:
            if not d.called:
                d.errback(AgentClosed("agent channel closed before READY: %s" % reason))

    # -- internals -----------------------------------------------------------------------------------------

    def _frame(self, code: int, payload: bytes) -> None:
        if code == codec.NEXT:
            try:
                count = codec.decode_u32(payload)
            except codec.FrameError as e:
                self._fatal("bad NEXT: %s" % e)
                return
            self._acked += count
            if self._acked > self._written:
                # A stale NEXT (e.g. for bytes a previous daemon wrote before it died): not ours to count.
                log.warn("agent: NEXT acknowledges {extra} bytes more than written",
                         extra=self._acked - self._written)
                self._acked = self._written
            self._pump()
        elif code in (codec.ACK, codec.ERROR):
            if not self._replies:
                log.warn("agent: {name} with no request pending, ignored", name=codec.CODE_NAMES[code])
                return
            req_code, d = self._replies.popleft()
            if d.called:  # the caller cancelled (e.g. a timeout); the slot still had to be consumed
                return
            if code == codec.ACK:
                d.callback(payload)
            else:
                text = payload.decode("utf-8", "replace")
                name = codec.CODE_NAMES.get(req_code, str(req_code))
                d.errback(AgentError("%s failed in the guest: %s" % (name, text or "(no message)"),
                                     req_code, text))
        elif code == codec.READY:
            if self._is_ready:
                log.info("agent: READY again, ignored")
                return
            self._is_ready = True
            waiters, self._ready_waiters = self._ready_waiters, []
            for d in waiters:
                if not d.called:
                    d.callback(None)
            self._pump()
        elif code == codec.PROCESSASYNCEVENT:
            try:
                event = json.loads(payload)
                if not isinstance(event, dict):
                    raise ValueError("not an object")
            except ValueError as e:
                log.warn("agent: bad PROCESSASYNCEVENT {p!r}: {e}", p=payload[:200], e=e)
                return
            if self._on_event is None:
                log.info("agent: process event with no handler: {e!r}", e=event)
                return
            try:
                self._on_event(event)
            except Exception:
                log.failure("agent: process event handler failed")
        else:
            log.warn("agent: unexpected message code {code} ({n} bytes), ignored", code=code, n=len(payload))

    def _pump(self) -> None:
        """Write the next chunk if the guest has acknowledged everything written so far."""
        if not self._is_ready or self._closed is not None:
            return
        if self._acked < self._written or not self._outbox:
            return
        message = self._outbox[0]
        chunk = bytes(message[: codec.CTL_CHUNK])
        del message[: codec.CTL_CHUNK]
        if not message:
            self._outbox.popleft()
        self._written += len(chunk)
        self._write(chunk)

    def _fatal(self, why: str) -> None:
        log.error("agent: {why}; closing the channel", why=why)
        self.connection_lost(why)
        if self._on_fatal is not None:
            self._on_fatal(why)


class AgentProtocol(Protocol):
    """Feeds an ``AgentClient`` from a Twisted transport (the VM's hyper.sock)."""

    def __init__(self, wait_ready: bool = True, on_event: Callable[[dict], None] | None = None) -> None:
        self.client = AgentClient(self._send, wait_ready=wait_ready, on_event=on_event, on_fatal=self._broken)
        self.closed: defer.Deferred = defer.Deferred()

    def _send(self, data: bytes) -> None:
        self.transport.write(data)

    def _broken(self, why: str) -> None:
        if self.transport is not None:
            self.transport.abortConnection()

    def dataReceived(self, data: bytes) -> None:
        self.client.feed(data)

    def connectionLost(self, reason: Failure = None) -> None:
        self.client.connection_lost(reason.getErrorMessage() if reason is not None else "connection lost")
        if not self.closed.called:
            self.closed.callback(None)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.loseConnection()
