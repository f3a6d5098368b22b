"""The stream channel: per-seq sinks, split/merged frames, EOF, flow control both ways, exit = event + EOF."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.interfaces import IPushProducer
from twisted.internet.testing import StringTransport
from zope.interface import implementer

from hyperd.agent import codec
from hyperd.agent.streams import (
    MAX_FRAME_DATA,
    UNATTACHED_LIMIT,
    BufferSink,
    ExitTracker,
    ProcessExit,
    StreamMux,
    StreamProtocol,
)


class Channel:
    def __init__(self):
        self.out = []
        self.paused = 0
        self.resumed = 0
        self.fatal = []
        self.mux = StreamMux(self.out.append, self._pause, self._resume, self.fatal.append)

    def _pause(self):
        self.paused += 1

    def _resume(self):
        self.resumed += 1

    def feed(self, data, split=None):
        if split is None:
            self.mux.feed(data)
        else:
            for i in range(0, len(data), split):
                self.mux.feed(data[i:i + split])


@implementer(IPushProducer)
class Producer:
    def __init__(self):
        self.state = "running"

    def pauseProducing(self):
        self.state = "paused"

    def resumeProducing(self):
        self.state = "running"

    def stopProducing(self):
        self.state = "stopped"


def test_frames_go_to_their_sinks_with_eof():
    ch = Channel()
    a, b = BufferSink(), BufferSink()
    ch.mux.attach(1, a)
    ch.mux.attach(2, b)
    data = (codec.encode_stream(1, b"hello ") + codec.encode_stream(2, b"err") +
            codec.encode_stream(1, b"world") + codec.encode_stream(1) + codec.encode_stream(2, b"!"))
    ch.feed(data, split=3)
    assert a.done.called and a.done.result == b"hello world"
    assert not b.done.called and bytes(b.data) == b"err!"


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 3), st.binary(min_size=1, max_size=300)), max_size=12),
       st.integers(1, 50))
def test_any_split_delivers_the_same_bytes(frames, split):
    ch = Channel()
    sinks = {s: BufferSink() for s in (1, 2, 3)}
    for s, sink in sinks.items():
        ch.mux.attach(s, sink)
    ch.feed(b"".join(codec.encode_stream(s, d) for s, d in frames), split=split)
    for s, sink in sinks.items():
        assert bytes(sink.data) == b"".join(d for q, d in frames if q == s)


def test_output_before_attach_is_kept_with_its_eof_and_bounded():
    ch = Channel()
    ch.feed(codec.encode_stream(5, b"early") + codec.encode_stream(5))
    sink = BufferSink()
    ch.mux.attach(5, sink)
    assert sink.done.result == b"early"
    big = b"x" * 60000
    for _ in range(6):
        ch.feed(codec.encode_stream(6, big))
    late = BufferSink()
    ch.mux.attach(6, late)
    assert len(late.data) == UNATTACHED_LIMIT


def test_detached_seq_output_is_dropped():
    ch = Channel()
    sink = BufferSink()
    ch.mux.attach(1, sink)
    ch.mux.detach(1)
    ch.feed(codec.encode_stream(1, b"gone"))
    assert sink.data == b""
    with pytest.raises(ValueError):
        ch.mux.attach(2, BufferSink())
        ch.mux.attach(2, BufferSink())


def test_write_frames_stdin_and_close_sends_empty_frame():
    ch = Channel()
    ch.mux.write(7, b"abc")
    ch.mux.write(7, b"")
    ch.mux.write(7, b"y" * (MAX_FRAME_DATA + 10))
    ch.mux.close_stdin(7)
    assert ch.out[0] == codec.encode_stream(7, b"abc")
    assert ch.out[1] == codec.encode_stream(7, b"y" * MAX_FRAME_DATA)
    assert ch.out[2] == codec.encode_stream(7, b"y" * 10)
    assert ch.out[3] == codec.encode_stream(7)
    assert len(ch.out) == 4


def test_a_paused_consumer_pauses_the_channel_until_all_resume():
    ch = Channel()
    ch.mux.attach(1, BufferSink())
    ch.mux.attach(2, BufferSink())
    p1, p2 = ch.mux.producer_for(1), ch.mux.producer_for(2)
    p1.pauseProducing()
    p2.pauseProducing()
    assert ch.paused == 1
    p1.resumeProducing()
    assert ch.resumed == 0
    p2.resumeProducing()
    assert ch.resumed == 1
    # A consumer that goes away while paused never holds the channel.
    p1.pauseProducing()
    assert ch.paused == 2
    p1.stopProducing()
    assert ch.resumed == 2
    # An EOF of a paused seq releases it too.
    p2.pauseProducing()
    ch.feed(codec.encode_stream(2))
    assert ch.resumed == 3


def test_input_producers_follow_the_transport():
    ch = Channel()
    p = Producer()
    ch.mux.add_input_producer(p)
    ch.mux.writes_paused()
    assert p.state == "paused"
    late = Producer()
    ch.mux.add_input_producer(late)
    assert late.state == "paused"
    ch.mux.writes_resumed()
    assert p.state == late.state == "running"
    ch.mux.remove_input_producer(late)
    ch.mux.connection_lost("gone")
    assert p.state == "stopped" and late.state == "running"


def test_connection_loss_ends_every_stream_and_refuses_writes():
    ch = Channel()
    a = BufferSink()
    ch.mux.attach(1, a)
    ch.mux.connection_lost("qemu died")
    assert a.done.called
    with pytest.raises(ConnectionError):
        ch.mux.write(1, b"x")
    b = BufferSink()
    ch.mux.attach(2, b)
    assert b.done.called


def test_malformed_frame_is_fatal():
    ch = Channel()
    a = BufferSink()
    ch.mux.attach(1, a)
    ch.feed(b"\x00" * 8 + b"\x00\x00\x00\x05")
    assert ch.fatal and a.done.called and ch.mux.closed


@pytest.mark.parametrize("order", ["event-first", "eof-first"])
def test_exit_needs_both_event_and_stdio_eof(order):
    tracker = ExitTracker()
    ch = Channel()
    exit_ = tracker.watch("c1", "init")
    out = BufferSink()
    ch.mux.attach(1, exit_.wrap_sink(out))
    got = []
    exit_.when_exited().addCallback(got.append)
    event = {"container": "c1", "process": "init", "event": "finished", "status": 3}
    if order == "event-first":
        tracker.process_event(event)
        ch.feed(codec.encode_stream(1, b"tail"))
        assert got == []
        ch.feed(codec.encode_stream(1))
    else:
        ch.feed(codec.encode_stream(1, b"tail") + codec.encode_stream(1))
        assert got == []
        tracker.process_event(event)
    assert got == [3]
    assert out.done.result == b"tail"
    assert exit_.when_exited().result == 3


def test_event_before_watch_is_kept():
    tracker = ExitTracker()
    tracker.process_event({"container": "c", "process": "p", "event": "finished", "status": "7"})
    tracker.process_event({"container": "c", "process": "p", "event": "other"})
    e = tracker.watch("c", "p")
    assert e.status == 7
    e.stdio_eof()
    assert e.when_exited().result == 7
    tracker.forget("c", "p")
    assert tracker.watch("c", "p").status is None


def test_process_exit_ignores_duplicates():
    e = ProcessExit("c", "p")
    e.status_received(1)
    e.status_received(2)
    e.stdio_eof()
    e.stdio_eof()
    assert e.when_exited().result == 1


def test_protocol_adapter_registers_as_producer_and_pauses_the_transport():
    proto = StreamProtocol()
    t = StringTransport()
    proto.makeConnection(t)
    assert t.producer is proto and t.streaming
    sink = BufferSink()
    proto.mux.attach(1, sink)
    proto.dataReceived(codec.encode_stream(1, b"x"))
    assert bytes(sink.data) == b"x"
    proto.mux.producer_for(1).pauseProducing()
    assert t.producerState == "paused"
    proto.mux.producer_for(1).resumeProducing()
    assert t.producerState == "producing"
    p = Producer()
    proto.mux.add_input_producer(p)
    proto.pauseProducing()  # what the transport does when its write buffer is full
    assert p.state == "paused"
    proto.resumeProducing()
    assert p.state == "running"
    proto.mux.write(1, b"in")
    assert t.value() == codec.encode_stream(1, b"in")
    proto.connectionLost(None)
    assert sink.done.called and proto.closed.called
