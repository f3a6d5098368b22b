"""The output broker without a VM: fan-out, the log, pausing the guest's seq while any client is full,
and a stalled client disconnected after the timeout (a Clock, no waiting)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import pytest
from twisted.internet.task import Clock

from hyperd.agent.streams import StreamMux
from hyperd.pod.execs import STDERR, STDOUT, ContainerOutputs


class Client:
    def __init__(self):
        self.sub = None
        self.out = []
        self.ended = []

    def output_started(self, sub):
        self.sub = sub

    def output(self, stream, data):
        self.out.append((stream, data))

    def output_ended(self, error):
        self.ended.append(error)


@pytest.fixture(autouse=True)
def logdir():
    d = tempfile.mkdtemp(prefix="hdt", dir="/tmp")
    _dirs.append(d)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)
        _dirs.remove(d)


_dirs: list[str] = []


def make(stall=None):
    paused = []
    mux = StreamMux(lambda data: None, lambda: paused.append(True), lambda: paused.append(False))
    clock = Clock()
    outputs = ContainerOutputs()
    path = os.path.join(_dirs[-1], "c-json.log")
    early = Client()
    outputs.subscribe("c", early)  # before the container started
    broker = outputs.open("c", mux, 1, 2, path, tty=False, reactor=clock, stall_timeout=stall)
    mux.attach(1, broker.sink(STDOUT))
    mux.attach(2, broker.sink(STDERR))
    return mux, clock, outputs, broker, early, path, paused


def frames(seq, data):
    import struct

    return struct.pack(">QI", seq, 12 + len(data)) + data


def test_fan_out_log_and_end():
    mux, clock, outputs, broker, early, path, _ = make()
    late = Client()
    outputs.subscribe("c", late)
    mux.feed(frames(1, b"one\ntw") + frames(2, b"oops\n") + frames(1, b"o\n"))
    assert early.out == [(1, b"one\ntw"), (2, b"oops\n"), (1, b"o\n")] == late.out
    mux.feed(frames(1, b""))  # EOF on stdio: all output ended
    assert early.ended == [None] == late.ended
    with open(path) as f:
        lines = [json.loads(line) for line in f]
    assert [(e["stream"], e["log"]) for e in lines] == [("stdout", "one\n"), ("stderr", "oops\n"), ("stdout", "two\n")]
    assert outputs.get("c") is None


def test_a_full_client_pauses_the_channel_until_it_drains():
    mux, clock, outputs, broker, early, path, paused = make()
    other = Client()
    outputs.subscribe("c", other)
    early.sub.pauseProducing()
    other.sub.pauseProducing()
    assert paused == [True]
    early.sub.resumeProducing()
    assert paused == [True], "still paused: the other client is full"
    other.sub.cancel()  # a paused client that leaves does not hold the stream
    assert paused == [True, False]
    early.sub.stopProducing()  # a transport closing: harmless
    mux.feed(frames(1, b"x"))
    assert early.out == [(1, b"x")]


def test_a_client_stalled_past_the_timeout_is_disconnected_and_the_stream_resumes():
    mux, clock, outputs, broker, early, path, paused = make(stall=60)
    early.sub.pauseProducing()
    clock.advance(59)
    assert early.ended == []
    clock.advance(2)
    assert len(early.ended) == 1 and "read nothing for 60 s" in early.ended[0]
    assert paused == [True, False]
    mux.feed(frames(1, b"after\n"))
    assert early.out == []  # no longer subscribed
