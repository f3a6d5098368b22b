"""The stream routes: exec (create, start, the old one-shot /exec, /execvm), attach, tty resize, logs.

Registered on :class:`hyperd.api.app.HyperAPI`'s Klein app when imported. Every check happens before the
hijack, synchronously, so errors are ordinary responses (404 no such container or exec, 409 not running,
400 bad parameter) and the connection is taken over in the same turn the request arrived in.

After the hijack a :class:`ProcessStream` carries one process's (or container's) stdio: with a tty raw bytes
both ways; without, Docker's 8-byte stdcopy frames out (1 stdout, 2 stderr, 3 a daemon error) and raw stdin
in. ``GET /container/logs`` streams the json-file log as a chunked 200 reply, framed the same way.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.web.iweb import IRequest
from zope.interface import implementer

from hyperd.api.app import HyperAPI, json_reply
from hyperd.api.hijack import (
    MULTIPLEXED_STREAM,
    RAW_STREAM,
    HijackResource,
    HijackSession,
)
from hyperd.api.params import arg, bool_arg, int_arg, json_arg
from hyperd.errors import BadParameter, HyperError
from hyperd.pod.execs import STDERR, STDOUT, ExecRecord, Subscription
from hyperd.pod.sandbox import rfc3339

app = HyperAPI.app
log = Logger()

#: stdcopy: stream type 3 carries an error raised by the daemon mid-stream.
SYSTEM_ERROR = 3
_FRAME = struct.Struct(">BxxxL")

#: ctrl-p ctrl-q: leave a tty attach, the container running.
DETACH_KEYS = b"\x10\x11"


def frame(stream: int, data: bytes) -> bytes:
    return _FRAME.pack(stream, len(data))


class ProcessStream(HijackSession):
    """One client's stream to a process: its output (a broker subscription), its stdin.

    ``start(session)`` subscribes the session (exec: and starts the process). ``stdin_eof`` says what the
    client's half-close does: ``"close"`` ends the process's stdin, ``"ignore"`` only stops forwarding.
    ``detach_keys``: ctrl-p ctrl-q ends this client's stream, leaving the process running.
    """

    def __init__(self, tty: bool, start: Callable[[ProcessStream], Any], stdin_eof: str = "close",
                 detach_keys: bool = False, on_gone: Callable[[], None] | None = None,
                 open_input_on_start: bool = True) -> None:
        super().__init__()
        self.tty = tty
        self._start = start
        self._stdin_eof = stdin_eof
        self._detach_keys = detach_keys
        self._on_gone = on_gone
        self._open_on_start = open_input_on_start
        self.subscription: Subscription | None = None
        self._ended = False
        self._input_producer: IPushProducer | None = None
        self._pending_key = b""
        self._input_done = False

    # -- session hooks ---------------------------------------------------------------------------------

    def session_started(self) -> None:
        try:
            self._start(self)
        except HyperError as e:
            self.output_ended(f"hyperd: {e.message}")

    def input_received(self, data: bytes) -> None:
        if self._input_done or self.subscription is None:
            return
        if self._detach_keys:
            data = self._pending_key + data
            self._pending_key = b""
            index = data.find(DETACH_KEYS)
            if index >= 0:
                self._forward(data[:index])
                self._detach()
                return
            if data.endswith(DETACH_KEYS[:1]):
                data, self._pending_key = data[:-1], DETACH_KEYS[:1]
        self._forward(data)

    def _forward(self, data: bytes) -> None:
        if not data:
            return  # e.g. a lone ctrl-p held back: nothing to send, and stdin is still open
        try:
            if not self.subscription.write_input(data):
                self._input_done = True
        except ConnectionError:
            self._input_done = True

    def _detach(self) -> None:
        self._input_done = True
        self._ended = True
        self._leave()
        self.finish()

    def input_ended(self) -> None:
        if self._input_done:
            return
        if self._pending_key:
            self._forward(self._pending_key)
            self._pending_key = b""
        self._input_done = True
        if self._stdin_eof == "close" and self.subscription is not None:
            if self.tty:
                self.subscription.write_input(b"\x04")  # a tty ignores the EOF frame; ^D at a line start
            else:
                self.subscription.close_input()

    def session_ended(self, reason) -> None:
        self._leave()
        if self._on_gone is not None and not self._ended:
            self._on_gone()

    def _leave(self) -> None:
        sub, self.subscription = self.subscription, None
        if self._input_producer is not None and sub is not None:
            sub.mux.remove_input_producer(self._input_producer)
            self._input_producer = None
        if sub is not None:
            if self.transport is not None and not self.closed:
                self.transport.unregisterProducer()
            sub.cancel()

    # -- Subscriber ------------------------------------------------------------------------------------

    def output_started(self, subscription: Subscription) -> None:
        if self.closed:
            subscription.cancel()
            return
        self.subscription = subscription
        self.transport.registerProducer(subscription, True)
        self._input_producer = self.input_producer("guest")
        subscription.mux.add_input_producer(self._input_producer)
        if self._open_on_start:
            subscription.broker.input_ready.addCallback(self._input_ready)

    def _input_ready(self, result: Any) -> Any:
        if not self.closed:
            self.open_input()
        return result  # the Deferred is shared by every subscriber of the broker

    def output(self, stream: int, data: bytes) -> None:
        if self.tty:
            self.write(data)
        else:
            self.write_sequence([frame(stream, data), data])

    def output_ended(self, error: str | None) -> None:
        if self._ended:
            return
        self._ended = True
        if error is None and self.subscription is not None and self.subscription.mux.closed:
            error = "hyperd: the VM's stream channel closed"
        if error and not self.closed:
            message = error.encode("utf-8", "replace") + b"\n"
            if self.tty:
                self.write(b"\r\n" + message.replace(b"\n", b"\r\n"))
            else:
                self.write_sequence([frame(SYSTEM_ERROR, message), message])
        self._leave()
        self.finish()


def _content_type(tty: bool) -> bytes:
    return RAW_STREAM if tty else MULTIPLEXED_STREAM


def _command_arg(request: IRequest) -> list[str]:
    command = json_arg(request, "command", required=True)
    if isinstance(command, str):
        command = [command]
    if not isinstance(command, list) or not command or not all(isinstance(c, str) for c in command):
        raise BadParameter("bad parameter: command must be a non-empty JSON array of strings")
    return command


def _exec_stream(api: Any, record: ExecRecord) -> HijackResource:
    execs = api.daemon.execs

    def start(session: ProcessStream) -> None:
        d = _ensure(execs.start(record, session))
        # stdin may flow once the guest acknowledged EXECCMD (the guest's rule)
        d.addCallback(lambda _: session.open_input())
        d.addErrback(lambda f: (log.failure("exec {e}", f, e=record.exec_id),
                                session.output_ended(f"hyperd: {f.getErrorMessage()}")))

    def make() -> ProcessStream:
        return ProcessStream(record.tty, start, stdin_eof="close", on_gone=lambda: execs.input_gone(record),
                             open_input_on_start=False)

    return HijackResource(make, _content_type(record.tty), api.daemon.reactor,
                          {b"X-Hyper-Exec": record.exec_id.encode()})


def _ensure(coro):
    from twisted.internet.defer import ensureDeferred

    return ensureDeferred(coro)


@app.route("/exec/create", methods=["POST"])
def exec_create(self, request: IRequest) -> bytes:
    container = arg(request, "container", required=True)
    exec_id = self.daemon.execs.create(container, _command_arg(request), bool_arg(request, "tty"))
    return json_reply(request, exec_id, 201)


@app.route("/exec/start", methods=["POST"])
def exec_start(self, request: IRequest) -> Any:
    record = self.daemon.execs.lookup(arg(request, "exec", required=True), arg(request, "container"))
    self.daemon.execs.check_startable(record)
    return _exec_stream(self, record)


@app.route("/exec", methods=["POST"])
def exec_legacy(self, request: IRequest) -> Any:
    """The old one-shot exec: ``type=pod|container&value=<id>&command=<JSON array>``."""
    kind = arg(request, "type", default="container")
    value = arg(request, "value", required=True)
    execs = self.daemon.execs
    if kind == "pod":
        value = execs.first_container(value)
    elif kind != "container":
        raise BadParameter(f"bad parameter: type must be pod or container, not {kind!r}")
    exec_id = execs.create(value, _command_arg(request), bool_arg(request, "tty"))
    return _exec_stream(self, execs.lookup(exec_id))


@app.route("/execvm", methods=["POST"])
def execvm(self, request: IRequest) -> Any:
    """A command in the pod's VM, outside its containers (hyperstart's pseudo-container)."""
    execs = self.daemon.execs
    exec_id = execs.create_in_vm(arg(request, "pod", "podId", required=True), _command_arg(request),
                                 bool_arg(request, "tty"))
    return _exec_stream(self, execs.lookup(exec_id))


@app.route("/attach", methods=["POST"])
def attach(self, request: IRequest) -> Any:
    """Several clients may attach at once; a tty client leaves with ctrl-p ctrl-q."""
    execs = self.daemon.execs
    container = arg(request, "container")
    if container is None:  # the old form: type=pod|container&value=
        value = arg(request, "value", required=True)
        container = execs.first_container(value) if arg(request, "type") == "pod" else value
    _, plan = execs.attach_target(container)
    cid, tty = plan.container_id, plan.spec.tty

    def start(session: ProcessStream) -> None:
        execs.outputs.subscribe(cid, session)

    def make() -> ProcessStream:
        session = ProcessStream(tty, start, stdin_eof="ignore", detach_keys=tty)
        session._on_gone = lambda: execs.outputs.unsubscribe_waiting(cid, session)
        return session

    return HijackResource(make, _content_type(tty), self.daemon.reactor)


@app.route("/tty/resize", methods=["POST"])
async def tty_resize(self, request: IRequest) -> bytes:
    height = int_arg(request, "h", required=True)
    width = int_arg(request, "w", required=True)
    await self.daemon.execs.resize(arg(request, "container"), arg(request, "exec"), height, width)
    request.setResponseCode(200)
    request.setHeader(b"content-length", b"0")
    return b""


# --- logs ------------------------------------------------------------------------------------------------


def _since_arg(request: IRequest) -> str | None:
    """``since`` as a unix time (seconds, fractions allowed) or RFC 3339, as the log's time strings."""
    value = arg(request, "since")
    if value is None or value in ("0", ""):
        return None
    try:
        return rfc3339(float(value))
    except ValueError:
        pass
    try:
        from datetime import datetime

        return rfc3339(datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp())
    except ValueError:
        raise BadParameter(f"bad parameter: since must be a unix time or RFC 3339, not {value!r}") from None


def _tail_arg(request: IRequest) -> int | None:
    value = arg(request, "tail", default="all")
    if value == "all":
        return None
    try:
        tail = int(value)
    except ValueError:
        raise BadParameter(f"bad parameter: tail must be a number or all, not {value!r}") from None
    return None if tail < 0 else tail


#: How much of a log file is read per turn of the reactor.
LOG_CHUNK = 64 * 1024


@implementer(IPushProducer)
class LogStreamer:
    """Streams a json-file log to a request: from an offset (``tail``), filtered, framed when not tty;
    with ``follow``, new lines as the container writes them, until its output ends. Reads happen only while
    the client keeps up (the request pauses us), so memory stays bounded; the file is the buffer."""

    def __init__(self, request: IRequest, reactor: Any, path: str, tty: bool, streams: set[str],
                 timestamps: bool, since: str | None, tail: int | None) -> None:
        self._request = request
        self._reactor = reactor
        self._path = path
        self._tty = tty
        self._streams = streams
        self._timestamps = timestamps
        self._since = since
        self._file = None
        self._offset = _tail_offset(path, tail, streams) if tail is not None else 0
        self._partial = b""
        self._paused = False
        self._scheduled = None
        self._following = False
        self._output_ended = True
        self._stop_watching: Callable[[], None] = lambda: None
        self._done = False
        #: Fires when everything was written (Klein then finishes the reply); cancelled if the client left.
        self.done: defer.Deferred = defer.Deferred(lambda _: self._cleanup())

    def follow(self, outputs: Any, container_id: str, wait: bool) -> None:
        self._following, self._output_ended = True, False
        self._stop_watching = outputs.watch(container_id, self._written, self._ended, wait)

    def start(self) -> defer.Deferred:
        self._request.registerProducer(self, True)
        self._schedule()
        return self.done

    def _written(self) -> None:
        self._schedule()

    def _ended(self) -> None:
        self._output_ended = True
        self._schedule()

    def _schedule(self) -> None:
        if self._scheduled is None and not self._paused and not self._done:
            self._scheduled = self._reactor.callLater(0, self._pump)

    def _pump(self) -> None:
        self._scheduled = None
        if self._done or self._paused:
            return
        ended = self._output_ended  # before reading: what the log holds now is complete if so
        data = self._read()
        if data:
            out = self._render(data)
            if out:
                self._request.write(out)
            self._schedule()  # there may be more; the next turn (or resumeProducing) reads it
            return
        if ended or not self._following:
            self._finish()

    def _read(self) -> bytes:
        if self._file is None:
            try:
                self._file = open(self._path, "rb")
            except FileNotFoundError:
                return b""
            self._file.seek(self._offset)
        return self._file.read(LOG_CHUNK)

    def _render(self, data: bytes) -> bytes:
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        out = []
        for line in lines:
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            stream = entry.get("stream", "stdout")
            if stream not in self._streams:
                continue
            when = entry.get("time", "")
            if self._since is not None and when <= self._since:
                continue
            text = entry.get("log", "").encode("utf-8", "replace")
            if self._timestamps:
                text = when.encode() + b" " + text
            if self._tty:
                out.append(text)
            else:
                out.append(frame(STDERR if stream == "stderr" else STDOUT, text))
                out.append(text)
        return b"".join(out)

    def _finish(self) -> None:
        if self._done:
            return
        self._cleanup()
        self._request.unregisterProducer()
        self.done.callback(None)

    def _cleanup(self) -> None:
        self._done = True
        self._stop_watching()
        if self._scheduled is not None and self._scheduled.active():
            self._scheduled.cancel()
        self._scheduled = None
        if self._file is not None:
            self._file.close()
            self._file = None

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._schedule()

    def stopProducing(self) -> None:
        self._cleanup()


def _tail_offset(path: str, tail: int, streams: set[str]) -> int:
    """The offset of the first of the last ``tail`` entries of ``streams`` (scanning back in blocks)."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return 0
    with f:
        end = f.seek(0, os.SEEK_END)
        if tail == 0:
            return end
        position, rest, count = end, b"", 0
        while position > 0:
            step = min(LOG_CHUNK, position)
            position -= step
            f.seek(position)
            block = f.read(step) + rest
            lines = block.split(b"\n")
            rest = lines.pop(0) if position > 0 else b""
            offset = position + len(rest) + (1 if position > 0 else 0)
            starts = []
            for line in lines:
                starts.append((offset, line))
                offset += len(line) + 1
            for start, line in reversed(starts):
                if not line.strip():
                    continue
                try:
                    stream = json.loads(line).get("stream", "stdout")
                except ValueError:
                    continue
                if stream in streams:
                    count += 1
                    if count == tail:
                        return start
        return 0


@app.route("/container/logs", methods=["GET"])
def container_logs(self, request: IRequest) -> Any:
    container = arg(request, "container", required=True)
    want_out = bool_arg(request, "stdout", default=None)
    want_err = bool_arg(request, "stderr", default=None)
    if want_out is None and want_err is None:
        want_out = want_err = True
    streams = {name for name, on in (("stdout", want_out), ("stderr", want_err)) if on}
    if not streams:
        raise BadParameter("bad parameter: you must choose at least one stream (stdout or stderr)")
    follow = bool_arg(request, "follow", default=False)
    execs = self.daemon.execs
    path, plan, _ = execs.log_target(container)
    streamer = LogStreamer(request, self.daemon.reactor, path, plan.spec.tty, streams,
                           bool_arg(request, "timestamps", default=False), _since_arg(request), _tail_arg(request))
    if follow and plan.status in ("running", "pending"):
        streamer.follow(execs.outputs, plan.container_id, wait=True)
    request.setResponseCode(200)
    request.setHeader(b"content-type", _content_type(plan.spec.tty))
    request.write(b"")  # the head goes out now (chunked), as hyperd flushed it at once
    return streamer.start()
