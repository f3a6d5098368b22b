"""The agent's framing and dispatch, fast, on the host: socketpairs stand in for the two virtio ports.

What a socketpair cannot show (port hang-up semantics, READY blocking until the host connects) is covered
against the real VM in test_boot.py.
"""

import signal
import socket
import struct

import pytest

from hyperd.agent import codec
from hyperd.guest.agent import PARTIAL_FRAME_TIMEOUT, Agent, CommandError

pytestmark = pytest.mark.timeout(20)


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture
def harness():
    ctl_host, ctl_guest = socket.socketpair()
    stream_host, stream_guest = socket.socketpair()
    old_handler = signal.getsignal(signal.SIGCHLD)
    old_wakeup = signal.set_wakeup_fd(-1)
    clock = FakeClock()
    agent = Agent(ctl_guest.fileno(), stream_guest.fileno(), clock=clock)
    agent.clock_obj = clock
    try:
        yield agent, ctl_host, stream_host
    finally:
        signal.set_wakeup_fd(old_wakeup)
        signal.signal(signal.SIGCHLD, old_handler)
        for s in (ctl_host, ctl_guest, stream_host, stream_guest):
            s.close()


def pump(agent, times=3):
    for _ in range(times):
        agent.run_once(max_wait=0.05)


def read_frames(sock, decoder_cls=codec.CtlDecoder):
    sock.settimeout(1)
    decoder = decoder_cls()
    frames = []
    sock.setblocking(False)
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                break
            frames += decoder.feed(data)
    except BlockingIOError:
        pass
    return frames


def test_next_precedes_the_reply_and_counts_the_bytes_read(harness):
    agent, ctl, _ = harness
    ctl.sendall(codec.encode_ctl(codec.GETVERSION))
    pump(agent)
    frames = read_frames(ctl)
    assert frames[0] == (codec.NEXT, struct.pack(">I", 8))
    assert frames[1] == (codec.ACK, struct.pack(">I", 4244))


def test_merged_commands_are_answered_in_order(harness):
    agent, ctl, _ = harness
    ctl.sendall(codec.encode_ctl(codec.PING) + codec.encode_ctl(99) + codec.encode_ctl(codec.GETVERSION))
    pump(agent)
    frames = [f for f in read_frames(ctl) if f[0] != codec.NEXT]
    assert [code for code, _ in frames] == [codec.ACK, codec.ERROR, codec.ACK]
    assert frames[2][1] == struct.pack(">I", 4244)


def test_malformed_header_gets_error_and_resynchronises(harness):
    agent, ctl, _ = harness
    ctl.sendall(struct.pack(">II", codec.PING, 2))
    pump(agent)
    replies = [f for f in read_frames(ctl) if f[0] != codec.NEXT]
    assert replies[0][0] == codec.ERROR and b"malformed" in replies[0][1]
    ctl.sendall(codec.encode_ctl(codec.PING))
    pump(agent)
    assert [f for f in read_frames(ctl) if f[0] != codec.NEXT] == [(codec.ACK, b"")]


def test_truncated_frame_is_dropped_after_the_timeout(harness):
    agent, ctl, _ = harness
    ctl.sendall(struct.pack(">II", codec.PING, 50) + b"abc")
    pump(agent, 1)
    assert [f for f in read_frames(ctl) if f[0] != codec.NEXT] == []
    agent.clock_obj.now += PARTIAL_FRAME_TIMEOUT + 0.1
    pump(agent, 1)
    replies = [f for f in read_frames(ctl) if f[0] != codec.NEXT]
    assert replies[0][0] == codec.ERROR and b"truncated" in replies[0][1]


def test_handler_errors_become_error_replies(harness):
    agent, ctl, _ = harness

    def refuse(payload):
        raise CommandError("no, because " + payload.decode())

    def crash(payload):
        return {}["missing"]

    agent.register(200, refuse)
    agent.register(201, crash)
    ctl.sendall(codec.encode_ctl(200, b"reasons") + codec.encode_ctl(201))
    pump(agent)
    replies = [f for f in read_frames(ctl) if f[0] != codec.NEXT]
    assert replies == [(codec.ERROR, b"no, because reasons"), (codec.ERROR, b"KeyError: 'missing'")]


def test_unknown_stream_seq_is_answered_with_eof(harness):
    agent, _, stream = harness
    stream.sendall(codec.encode_stream(42, b"hello?"))
    pump(agent)
    assert read_frames(stream, codec.StreamDecoder) == [(42, b"")]


def test_stream_frames_reach_their_sink(harness):
    agent, _, stream = harness
    got = []
    agent.add_stream_sink(7, got.append)
    stream.sendall(codec.encode_stream(7, b"a") + codec.encode_stream(7, b"bc") + codec.encode_stream(7))
    pump(agent)
    assert got == [b"a", b"bc", b""]
    agent.remove_stream_sink(7)
    stream.sendall(codec.encode_stream(7, b"late"))
    pump(agent)
    assert read_frames(stream, codec.StreamDecoder) == []  # a retired seq is dropped, not answered


def test_destroypod_runs_hooks_then_acks_and_stops(harness):
    agent, ctl, _ = harness
    calls = []
    agent.destroy_hooks.append(lambda: calls.append("hook"))
    agent.destroy_hooks.append(lambda: 1 / 0)  # a failing hook does not stop the ACK
    ctl.sendall(codec.encode_ctl(codec.DESTROYPOD))
    agent.run()  # returns once stopping
    assert calls == ["hook"]
    assert [f for f in read_frames(ctl) if f[0] != codec.NEXT] == [(codec.ACK, b"")]


def test_idle_work_runs_one_task_per_idle_turn_and_on_demand_up_to_a_name(harness):
    agent, _, _ = harness
    ran = []
    agent.deferred.extend((name, lambda name=name: ran.append(name)) for name in ("a", "b", "c", "d"))
    agent.run_once(max_wait=0.05)  # nothing to read: one piece of idle work
    assert ran == ["a"]
    agent.require_deferred(until="c")  # a command that needs "c" runs what comes before it too
    assert ran == ["a", "b", "c"]
    agent.require_deferred(until="b")  # done already: nothing else is pulled forward
    assert ran == ["a", "b", "c"]
    agent.require_deferred()
    assert ran == ["a", "b", "c", "d"]


def test_failing_idle_work_is_logged_and_the_rest_still_runs(harness, capfd):
    agent, _, _ = harness
    ran = []

    def broken():
        raise ValueError("bad module")

    agent.deferred.extend([("broken", broken), ("after", lambda: ran.append("after"))])
    agent.require_deferred()
    assert ran == ["after"]
    assert "deferred broken: ValueError: bad module" in capfd.readouterr().err
