"""The host side of hyperstart's stream channel (``sh.hyper.channel.1``): process stdio, multiplexed.

Frames are ``[seq u64 BE][length u32 BE, header included][data]``; an empty frame ends a stream (guest → host:
that output ended; host → guest: close that process's stdin). The host allocates the sequence numbers and
passes them in EXECCMD/NEWCONTAINER, so it attaches a sink to a seq before the process can write.

``StreamMux`` does no I/O (bytes in through ``feed``, out through ``write``); ``StreamProtocol`` wires it to
the VM's tty.sock. Flow control, both ways, without unbounded buffers:

- guest → host: a slow consumer pauses its seq through ``mux.producer_for(seq)`` (an IPushProducer to
  register with, e.g., an HTTP transport); while any seq is paused the whole channel stops being read, which
  backs up into the guest's virtio queue;
- host → guest: producers of stdin data register with ``mux.add_input_producer``; they are paused while the
  tty.sock transport's write buffer is full.

A process has exited only when both its PROCESSASYNCEVENT and the EOF of its stdio seq arrived (they travel on
different channels and race): ``ExitTracker``/``ProcessExit`` wait for both.
"""

from __future__ import annotations

from typing import Callable
from typing import Protocol as TypingProtocol

from twisted.internet import defer
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from hyperd.agent import codec

log = Logger()

#: Largest data part of one frame we send.
MAX_FRAME_DATA = 32 * 1024
#: Output kept for a seq nobody attached to yet (a late attach, e.g. after a daemon restart); beyond it we drop.
UNATTACHED_LIMIT = 256 * 1024


class StreamSink(TypingProtocol):
    """Where one seq's output goes."""

    def stream_data(self, data: bytes) -> None: ...

    def stream_eof(self) -> None: ...


class CallbackSink:
    """A StreamSink from two callables."""

    def __init__(self, on_data: Callable[[bytes], None], on_eof: Callable[[], None] = lambda: None) -> None:
        self.stream_data = on_data
        self.stream_eof = on_eof


class BufferSink:
    """Collects a stream into memory (tests, short commands); ``done`` fires with all bytes at EOF."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.done: defer.Deferred = defer.Deferred()

    def stream_data(self, data: bytes) -> None:
        self.data += data

    def stream_eof(self) -> None:
        if not self.done.called:
            self.done.callback(bytes(self.data))


@implementer(IPushProducer)
class _SeqProducer:
    """Lets a consumer of one seq's output pause the channel (IPushProducer)."""

    def __init__(self, mux: "StreamMux", seq: int) -> None:
        self._mux = mux
        self._seq = seq

    def pauseProducing(self) -> None:
        self._mux._pause_seq(self._seq)

    def resumeProducing(self) -> None:
        self._mux._resume_seq(self._seq)

    def stopProducing(self) -> None:
        # The consumer is gone: never hold the shared channel for it, drop what comes for it.
        self._mux._resume_seq(self._seq)
        self._mux.detach(self._seq)


class StreamMux:
    """Demultiplexes guest output to per-seq sinks and frames host input. No I/O."""

    def __init__(
        self,
        write: Callable[[bytes], None],
        pause_reading: Callable[[], None] = lambda: None,
        resume_reading: Callable[[], None] = lambda: None,
        on_fatal: Callable[[str], None] = lambda why: None,
    ) -> None:
        self._write = write
        self._pause_reading = pause_reading
        self._resume_reading = resume_reading
        self._on_fatal = on_fatal
        self._decoder = codec.StreamDecoder()
        self._sinks: dict[int, StreamSink] = {}
        self._unattached: dict[int, bytearray] = {}
        self._unattached_eof: set[int] = set()
        self._paused_seqs: set[int] = set()
        self._input_producers: list[IPushProducer] = []
        self._input_paused = False
        self._closed: str | None = None

    @property
    def closed(self) -> bool:
        return self._closed is not None

    # -- output (guest → host) -----------------------------------------------------------------------------

    def attach(self, seq: int, sink: StreamSink) -> None:
        """Send ``seq``'s output to ``sink`` (and whatever arrived for it already)."""
        if seq in self._sinks:
            raise ValueError("stream %d already has a sink" % seq)
        self._sinks[seq] = sink
        early = self._unattached.pop(seq, None)
        if early:
            sink.stream_data(bytes(early))
        if seq in self._unattached_eof or self._closed is not None:
            self._unattached_eof.discard(seq)
            self._eof(seq)

    def detach(self, seq: int) -> None:
        """Stop delivering ``seq``; later output for it is dropped (not kept)."""
        self._sinks.pop(seq, None)
        self._unattached.pop(seq, None)
        self._unattached_eof.discard(seq)
        self._resume_seq(seq)

    def producer_for(self, seq: int) -> IPushProducer:
        return _SeqProducer(self, seq)

    def feed(self, data: bytes) -> None:
        if self._closed is not None:
            return
        try:
            frames = self._decoder.feed(data)
        except codec.FrameError as e:
            self._fatal("malformed stream frame from the guest: %s" % e)
            return
        for seq, payload in frames:
            if payload:
                self._data(seq, payload)
            else:
                self._eof(seq)

    def connection_lost(self, reason: str = "connection lost") -> None:
        """The channel is gone: every attached stream ends now (nobody waits for EOFs that cannot come)."""
        if self._closed is not None:
            return
        self._closed = reason
        for seq in list(self._sinks):
            self._eof(seq)
        for p in list(self._input_producers):
            p.stopProducing()
        self._input_producers.clear()

    def _data(self, seq: int, payload: bytes) -> None:
        sink = self._sinks.get(seq)
        if sink is not None:
            sink.stream_data(payload)
            return
        buf = self._unattached.setdefault(seq, bytearray())
        room = UNATTACHED_LIMIT - len(buf)
        if room < len(payload):
            log.warn("streams: dropping {n} bytes for unattached seq {seq}", n=len(payload) - max(room, 0), seq=seq)
        if room > 0:
            buf += payload[:room]

    def _eof(self, seq: int) -> None:
        sink = self._sinks.pop(seq, None)
        self._resume_seq(seq)
        if sink is None:
            self._unattached_eof.add(seq)
            return
        sink.stream_eof()

    def _pause_seq(self, seq: int) -> None:
        if seq not in self._sinks or seq in self._paused_seqs:
            return
        self._paused_seqs.add(seq)
        if len(self._paused_seqs) == 1:
            self._pause_reading()

    def _resume_seq(self, seq: int) -> None:
        if seq not in self._paused_seqs:
            return
        self._paused_seqs.discard(seq)
        if not self._paused_seqs:
            self._resume_reading()

    # -- input (host → guest) ------------------------------------------------------------------------------

    def write(self, seq: int, data: bytes) -> None:
        """Send ``data`` to ``seq``'s stdin (framed; empty data sends nothing)."""
        if self._closed is not None:
            raise ConnectionError("stream channel closed: %s" % self._closed)
        view = memoryview(data)
        for start in range(0, len(view), MAX_FRAME_DATA):
            self._write(codec.encode_stream(seq, bytes(view[start:start + MAX_FRAME_DATA])))

    def close_stdin(self, seq: int) -> None:
        """Tell the guest ``seq``'s stdin ended (an empty frame)."""
        if self._closed is None:
            self._write(codec.encode_stream(seq, b""))

    def add_input_producer(self, producer: IPushProducer) -> None:
        """``producer`` feeds ``write()``; it is paused whenever the channel cannot take more."""
        self._input_producers.append(producer)
        if self._input_paused:
            producer.pauseProducing()

    def remove_input_producer(self, producer: IPushProducer) -> None:
        if producer in self._input_producers:
            self._input_producers.remove(producer)

    def writes_paused(self) -> None:
        """The transport's buffer is full: pause every input producer."""
        self._input_paused = True
        for p in list(self._input_producers):
            p.pauseProducing()

    def writes_resumed(self) -> None:
        self._input_paused = False
        for p in list(self._input_producers):
            p.resumeProducing()

    def _fatal(self, why: str) -> None:
        log.error("streams: {why}; closing the channel", why=why)
        self.connection_lost(why)
        self._on_fatal(why)


@implementer(IPushProducer)
class StreamProtocol(Protocol):
    """Feeds a ``StreamMux`` from the VM's tty.sock; is the transport's producer to pause stdin sources."""

    def __init__(self) -> None:
        self.mux = StreamMux(self._send, self._pause, self._resume, self._broken)
        self.closed: defer.Deferred = defer.Deferred()

    def _send(self, data: bytes) -> None:
        self.transport.write(data)

    def _pause(self) -> None:
        self.transport.pauseProducing()

    def _resume(self) -> None:
        if self.transport is not None and self.connected:
            self.transport.resumeProducing()

    def _broken(self, why: str) -> None:
        self.transport.abortConnection()

    def connectionMade(self) -> None:
        self.transport.registerProducer(self, True)

    def dataReceived(self, data: bytes) -> None:
        self.mux.feed(data)

    def connectionLost(self, reason: Failure = None) -> None:
        self.mux.connection_lost(reason.getErrorMessage() if reason is not None else "connection lost")
        if not self.closed.called:
            self.closed.callback(None)

    # IPushProducer, called by the transport about our writes.
    def pauseProducing(self) -> None:
        self.mux.writes_paused()

    def resumeProducing(self) -> None:
        self.mux.writes_resumed()

    def stopProducing(self) -> None:
        pass

    def close(self) -> None:
        if self.transport is not None:
            self.transport.loseConnection()


class ProcessExit:
    """One process's end: its exit status (PROCESSASYNCEVENT) and its stdio EOF, in either order."""

    def __init__(self, container: str, process: str) -> None:
        self.container = container
        self.process = process
        self.status: int | None = None
        self.stdio_closed = False
        self._waiters: list[defer.Deferred] = []

    @property
    def exited(self) -> bool:
        return self.status is not None and self.stdio_closed

    def when_exited(self) -> defer.Deferred:
        """Fires with the exit status once both halves are in."""
        if self.exited:
            return defer.succeed(self.status)
        d: defer.Deferred = defer.Deferred()
        self._waiters.append(d)
        return d

    def status_received(self, status: int) -> None:
        if self.status is None:
            self.status = status
            self._check()

    def stdio_eof(self) -> None:
        if not self.stdio_closed:
            self.stdio_closed = True
            self._check()

    def wrap_sink(self, sink: StreamSink) -> StreamSink:
        """A sink that forwards to ``sink`` and counts its EOF as this process's stdio EOF."""

        def eof() -> None:
            sink.stream_eof()
            self.stdio_eof()

        return CallbackSink(sink.stream_data, eof)

    def _check(self) -> None:
        if not self.exited:
            return
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(self.status)


class ExitTracker:
    """Routes PROCESSASYNCEVENTs to ``ProcessExit`` objects; use ``process_event`` as the agent's handler."""

    def __init__(self) -> None:
        self._exits: dict[tuple[str, str], ProcessExit] = {}

    def watch(self, container: str, process: str) -> ProcessExit:
        key = (container, process)
        if key not in self._exits:
            self._exits[key] = ProcessExit(container, process)
        return self._exits[key]

    def forget(self, container: str, process: str) -> None:
        self._exits.pop((container, process), None)

    def process_event(self, event: dict) -> None:
        if event.get("event") != "finished":
            log.info("streams: process event {e!r} ignored", e=event)
            return
        try:
            status = int(event.get("status", 255))
        except (TypeError, ValueError):
            status = 255
        # An event before anyone watches (fast processes) is kept: watch() then finds it.
        self.watch(str(event.get("container", "")), str(event.get("process", ""))).status_received(status)
