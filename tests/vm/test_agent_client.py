"""The control-channel state machine, fed bytes by hand: READY, FIFO replies, NEXT flow control, events."""

import json
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.internet.testing import StringTransport

from hyperd.agent import codec
from hyperd.agent.client import AgentClient, AgentClosed, AgentError, AgentProtocol


class Guest:
    """The guest end: collects what the host wrote, answers with frames."""

    def __init__(self, **kw):
        self.writes = []
        self.fatal = []
        self.events = []
        self.client = AgentClient(self.writes.append, on_event=self.events.append,
                                  on_fatal=self.fatal.append, **kw)

    def send(self, *frames, split=None):
        data = b"".join(frames)
        if split is None:
            self.client.feed(data)
        else:
            for i in range(0, len(data), split):
                self.client.feed(data[i:i + split])

    def take(self):
        out, self.writes[:] = list(self.writes), []
        return out

    def ack_all(self):
        """NEXT for everything written since the last call, as one read each."""
        for chunk in self.take():
            self.send(codec.encode_next(len(chunk)))


def result(d):
    out = []
    d.addBoth(out.append)
    assert out, "the Deferred has not fired"
    return out[0]


def ready_guest(**kw):
    g = Guest(**kw)
    g.send(codec.encode_ctl(codec.READY))
    return g


def test_nothing_is_written_before_ready():
    g = Guest()
    d = g.client.request(codec.PING)
    assert g.writes == []
    assert not d.called
    g.send(codec.encode_ctl(codec.READY))
    assert g.take() == [codec.encode_ctl(codec.PING)]


def test_handshake_accepts_4244_and_4242():
    for version in (4244, 4242):
        g = Guest()
        hs = defer.ensureDeferred(g.client.handshake())
        g.send(codec.encode_ctl(codec.READY))
        (w,) = g.take()
        assert w == codec.encode_ctl(codec.GETVERSION)
        g.send(codec.encode_next(8), codec.encode_ctl(codec.ACK, struct.pack(">I", version)))
        assert result(hs) == version
        assert g.client.version == version


def test_handshake_refuses_another_version():
    g = ready_guest()
    hs = defer.ensureDeferred(g.client.handshake())
    g.take()
    g.send(codec.encode_next(8), codec.encode_ctl(codec.ACK, struct.pack(">I", 4243)))
    f = result(hs)
    assert f.check(AgentError) and "4243" in str(f.value)


def test_reattach_mode_does_not_wait_for_ready():
    g = Guest(wait_ready=False)
    d = g.client.ping()
    assert g.take() == [codec.encode_ctl(codec.PING)]
    g.send(codec.encode_next(8), codec.encode_ctl(codec.ACK))
    assert result(d) == b""


def test_replies_are_matched_fifo_and_error_carries_the_text():
    g = ready_guest()
    d1 = g.client.request(codec.PING)
    d2 = g.client.request_json(codec.EXECCMD, {"container": "c1"})
    d3 = g.client.request(codec.PING)
    g.ack_all()
    g.ack_all()
    g.ack_all()
    g.send(codec.encode_ctl(codec.ACK, b"one"), codec.encode_ctl(codec.ERROR, b"no such container c1"),
           codec.encode_ctl(codec.ACK, b"three"))
    assert result(d1) == b"one"
    f = result(d2)
    assert f.check(AgentError)
    assert f.value.text == "no such container c1"
    assert f.value.code == codec.EXECCMD
    assert "EXECCMD" in str(f.value) and "no such container c1" in str(f.value)
    assert result(d3) == b"three"


def test_large_messages_go_in_512_byte_chunks_each_after_next():
    g = ready_guest()
    payload = json.dumps({"data": "x" * 1700}).encode()
    message = codec.encode_ctl(codec.EXECCMD, payload)
    d = g.client.request(codec.EXECCMD, payload)
    g.client.request(codec.PING)
    first = g.take()
    assert first == [message[:512]]
    # The guest reads the header, then the rest of what is there, as hyperstart does: NEXT(8), NEXT(504).
    g.send(codec.encode_next(8))
    assert g.take() == []
    g.send(codec.encode_next(504))
    assert g.take() == [message[512:1024]]
    g.send(codec.encode_next(512))
    assert g.take() == [message[1024:1536]]
    g.send(codec.encode_next(300))
    assert g.take() == []
    g.send(codec.encode_next(212))
    rest = g.take()
    assert rest == [message[1536:]]
    g.send(codec.encode_next(len(rest[0])))
    # Only now the next message (the PING) goes.
    assert g.take() == [codec.encode_ctl(codec.PING)]
    g.send(codec.encode_ctl(codec.ACK, b"ok"))
    assert result(d) == b"ok"
    assert b"".join([first[0], message[512:1536], rest[0]]) == message


def test_stale_next_beyond_what_was_written_is_ignored():
    g = ready_guest()
    g.send(codec.encode_next(100))
    g.client.ping()
    assert g.take() == [codec.encode_ctl(codec.PING)]
    g.client.ping()
    assert g.take() == []  # the first PING is not acknowledged yet: the stale count did not pre-pay it
    g.send(codec.encode_next(8))
    assert g.take() == [codec.encode_ctl(codec.PING)]


def test_process_events_are_delivered_and_bad_ones_ignored():
    g = ready_guest()
    d = g.client.ping()
    g.ack_all()
    ev = {"container": "c1", "process": "init", "event": "finished", "status": 3}
    g.send(codec.encode_ctl(codec.PROCESSASYNCEVENT, json.dumps(ev).encode()),
           codec.encode_ctl(codec.PROCESSASYNCEVENT, b"{not json"),
           codec.encode_ctl(codec.PROCESSASYNCEVENT, b"[1]"),
           codec.encode_ctl(99, b"who knows"),
           codec.encode_ctl(codec.ACK), split=5)
    assert g.events == [ev]
    assert result(d) == b""


def test_unsolicited_ack_and_second_ready_do_not_break_the_channel():
    g = ready_guest()
    g.send(codec.encode_ctl(codec.ACK, b"stale"), codec.encode_ctl(codec.READY))
    d = g.client.ping()
    g.ack_all()
    g.send(codec.encode_ctl(codec.ACK, b"mine"))
    assert result(d) == b"mine"


def test_truncated_frame_waits_for_the_rest():
    g = ready_guest()
    d = g.client.ping()
    g.ack_all()
    reply = codec.encode_ctl(codec.ACK, b"payload")
    g.send(reply[:5])
    g.send(reply[5:11])
    assert not d.called
    g.send(reply[11:])
    assert result(d) == b"payload"


def test_malformed_frame_fails_everything_and_closes():
    g = ready_guest()
    d = g.client.ping()
    g.ack_all()
    g.send(struct.pack(">II", codec.ACK, 3))  # a length smaller than the header
    f = result(d)
    assert f.check(AgentClosed)
    assert g.fatal and "malformed" in g.fatal[0]
    assert g.client.closed
    assert result(g.client.ping()).check(AgentClosed)


def test_bad_next_payload_is_fatal():
    g = ready_guest()
    d = g.client.ping()
    g.take()
    g.send(codec.encode_ctl(codec.NEXT, b"\x00\x01"))
    assert result(d).check(AgentClosed)


def test_connection_loss_fails_pending_requests_and_ready_waiters():
    g = Guest()
    w = g.client.when_ready()
    d = g.client.ping()
    g.client.connection_lost("qemu died")
    assert result(d).check(AgentClosed)
    f = result(w)
    assert f.check(AgentClosed) and "qemu died" in str(f.value)
    assert result(g.client.when_ready()).check(AgentClosed)


def test_cancelled_request_still_consumes_its_reply():
    g = ready_guest()
    d1 = g.client.ping()
    d2 = g.client.ping()
    d1.cancel()
    result(d1)  # consume the CancelledError
    g.ack_all()
    g.ack_all()
    g.send(codec.encode_ctl(codec.ACK, b"first"), codec.encode_ctl(codec.ACK, b"second"))
    assert result(d2) == b"second"


@settings(max_examples=60, deadline=None)
@given(st.lists(st.binary(max_size=1500), min_size=1, max_size=6), st.integers(1, 40))
def test_any_split_of_any_replies_gives_the_same_results(payloads, split):
    g = ready_guest()
    ds = [g.client.request(codec.PING, p) for p in payloads]
    written = bytearray()
    while True:
        chunks = g.take()
        if not chunks:
            break
        for c in chunks:
            assert len(c) <= codec.CTL_CHUNK
            written += c
            g.send(codec.encode_next(len(c)))
    assert bytes(written) == b"".join(codec.encode_ctl(codec.PING, p) for p in payloads)
    g.send(*[codec.encode_ctl(codec.ACK, p[::-1]) for p in payloads], split=split)
    assert [result(d) for d in ds] == [p[::-1] for p in payloads]


def test_protocol_adapter_feeds_and_writes_and_closes():
    proto = AgentProtocol()
    t = StringTransport()
    proto.makeConnection(t)
    d = proto.client.ping()
    proto.dataReceived(codec.encode_ctl(codec.READY))
    assert t.value() == codec.encode_ctl(codec.PING)
    proto.dataReceived(codec.encode_next(8) + codec.encode_ctl(codec.ACK, b"pong"))
    assert result(d) == b"pong"
    d2 = proto.client.ping()
    proto.dataReceived(b"\x00\x00\x00\x09\x00\x00\x00\x01")  # malformed: aborts the transport
    assert t.disconnecting
    assert result(d2).check(AgentClosed)
    proto.connectionLost(None)
    assert proto.closed.called


def test_agent_error_is_a_vm_error():
    from hyperd.errors import VMError
    assert issubclass(AgentError, VMError)
    with pytest.raises(VMError):
        raise AgentClosed("x")
