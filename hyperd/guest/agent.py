"""The guest agent: hyperstart's protocol (API 4244) over the two virtio-serial ports, in a poll loop.

Runs as PID 1 inside the VM, standard library only. The framing lives here and in ``hyperd.agent.codec``;
commands are entries of a dispatch table (``Agent.handlers``: code -> handler(payload) -> ACK payload), so
that new commands are added without touching the framing. A handler raises ``CommandError`` (or any
exception) to answer ERROR; the agent always goes on.

Besides the two ports the loop watches any file descriptor registered with ``add_reader``/``add_writer``
(child pipes, ptys) and reaps children on SIGCHLD, calling the callback given to ``watch_child``.
"""

import _signal as signal  # the C module: `signal` would import enum, ~0.1 s under TCG before READY
import errno
import os
import select
import struct
import time
from _collections import deque

from hyperd.agent import codec
from hyperd.guest import jsonc

#: A partial control frame that gets no more bytes for this long is dropped with an ERROR, so that a
#: truncated frame cannot swallow the next command.
PARTIAL_FRAME_TIMEOUT = 5.0

#: How often a port whose host side is disconnected (poll says POLLHUP) is checked again.
RECONNECT_INTERVAL = 0.01
RECONNECT_INTERVAL_IDLE = 0.25

#: Stop reading process output while this much is waiting to go out on the stream port.
STREAM_BACKLOG_LIMIT = 1 << 20

_POLLIN = select.POLLIN
_POLLOUT = select.POLLOUT
_POLLHUP = select.POLLHUP
_POLLERR = select.POLLERR
_POLLNVAL = select.POLLNVAL


#: ``HYPERD_DEBUG=1`` on the kernel command line logs, with the guest's uptime, how long each command and each
#: piece of idle work (kernel module loads) took.
DEBUG = bool(os.environ.get("HYPERD_DEBUG"))


def uptime() -> float:
    return time.clock_gettime(time.CLOCK_BOOTTIME)


class CommandError(Exception):
    """A command that cannot be done: its message goes back to the host in an ERROR reply."""


def log(message: str) -> None:
    try:
        os.write(2, ("hyperd-agent: %s\n" % message).encode("utf-8", "replace"))
    except OSError:
        pass


def describe_exception(exc: BaseException) -> str:
    """``Type: message (file:line)`` of the innermost frame, without importing traceback."""
    tb = exc.__traceback__
    where = ""
    while tb is not None:
        where = " (%s:%d)" % (tb.tb_frame.f_code.co_filename, tb.tb_lineno)
        tb = tb.tb_next
    return "%s: %s%s" % (type(exc).__name__, exc, where)


def decode_json(payload: bytes):
    try:
        value = jsonc.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise CommandError("malformed JSON payload: %s" % e) from None
    if not isinstance(value, dict):
        raise CommandError("payload must be a JSON object")
    return value


def encode_json(value) -> bytes:
    return jsonc.dumps(value).encode("ascii")


class Port:
    """One virtio-serial port: a non-blocking fd, frames waiting to go out, and the host's presence.

    While the host side is not connected, the kernel reports POLLHUP on every poll, so a hung-up port
    leaves the poll set and is retried on a timer.
    """

    def __init__(self, name: str, fd: int) -> None:
        self.name = name
        self.fd = fd
        os.set_blocking(fd, False)
        self.out = deque()  # of [bytes, keep_on_disconnect]
        self.offset = 0  # bytes of out[0] already written
        self.queued = 0
        self.connected = True
        self.retry_at = 0.0

    def queue(self, data: bytes, keep: bool = True) -> None:
        if data:
            self.out.append([data, keep])
            self.queued += len(data)
            self.flush()

    def flush(self) -> None:
        while self.out:
            data = self.out[0][0]
            try:
                # virtio_console takes at most 32 KiB per write; a memoryview avoids copying the rest.
                n = os.write(self.fd, memoryview(data)[self.offset:])
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in (errno.EAGAIN, errno.EPIPE, errno.ENODEV, errno.EIO):
                    return
                raise
            self.offset += n
            self.queued -= n
            if self.offset >= len(data):
                self.out.popleft()
                self.offset = 0

    def drop_unkept(self) -> None:
        """Forget replies meant for a host that went away (keep a half-written frame and kept ones)."""
        kept = deque()
        for index, item in enumerate(self.out):
            if item[1] or (index == 0 and self.offset):
                kept.append(item)
        self.out = kept
        self.queued = sum(len(item[0]) for item in kept) - self.offset


class Agent:
    def __init__(self, ctl_fd: int, stream_fd=None, deferred_loads=(), clock=time.monotonic) -> None:
        self.clock = clock
        self.ctl = Port(codec.CTL_CHANNEL, ctl_fd)
        self.stream = Port(codec.STREAM_CHANNEL, stream_fd) if stream_fd is not None else None
        self.ctl_decoder = codec.CtlDecoder()
        self.stream_decoder = codec.StreamDecoder()
        self.partial_since = None
        self.stopping = False
        #: ``(name, callable)`` run one at a time while idle (kernel modules loaded after READY);
        #: ``require_deferred`` runs them now.
        self.deferred = deque(deferred_loads)
        self.readers = {}  # fd -> callback()
        self.writers = {}  # fd -> callback()
        self.throttled = set()  # readers paused while the stream port has a backlog
        self.children = {}  # pid -> callback(status)
        #: seq -> callback(data); an empty ``data`` is EOF.
        self.stream_sinks = {}
        #: Seqs that ended recently: frames for them are dropped rather than answered with EOF.
        self.retired_seqs = {}
        self.handlers = {
            codec.GETVERSION: self.cmd_getversion,
            codec.PING: self.cmd_ping,
            codec.DESTROYPOD: self.cmd_destroypod,
        }
        #: Called (no arguments) by DESTROYPOD before its ACK, to stop everything.
        self.destroy_hooks = []
        self._sigchld_r, self._sigchld_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self._sigchld_w)
        signal.signal(signal.SIGCHLD, _ignore_signal)

    # ---- public API for command modules ----

    def register(self, code: int, handler) -> None:
        self.handlers[code] = handler

    def send_ctl(self, code: int, payload: bytes = b"", keep: bool = False) -> None:
        self.ctl.queue(codec.encode_ctl(code, payload), keep)

    def send_event(self, code: int, value) -> None:
        """An unsolicited message (PROCESSASYNCEVENT): kept across a host reconnect."""
        self.send_ctl(code, encode_json(value), keep=True)

    def send_stream(self, seq: int, data: bytes) -> None:
        if self.stream is not None:
            self.stream.queue(codec.encode_stream(seq, data))

    def add_reader(self, fd: int, callback, throttled: bool = False) -> None:
        self.readers[fd] = callback
        if throttled:
            self.throttled.add(fd)

    def remove_reader(self, fd: int) -> None:
        self.readers.pop(fd, None)
        self.throttled.discard(fd)

    def add_writer(self, fd: int, callback) -> None:
        self.writers[fd] = callback

    def remove_writer(self, fd: int) -> None:
        self.writers.pop(fd, None)

    def watch_child(self, pid: int, callback) -> None:
        self.children[pid] = callback

    def add_stream_sink(self, seq: int, callback) -> None:
        self.retired_seqs.pop(seq, None)
        self.stream_sinks[seq] = callback

    def remove_stream_sink(self, seq: int) -> None:
        if self.stream_sinks.pop(seq, None) is not None:
            self.retired_seqs[seq] = True
            while len(self.retired_seqs) > 1024:
                del self.retired_seqs[next(iter(self.retired_seqs))]

    def require_deferred(self, until=None) -> None:
        """Run the pending idle work now: all of it, or up to and including the task named ``until`` (nothing
        when that one has run already)."""
        if until is not None and all(name != until for name, _ in self.deferred):
            return
        while self.deferred:
            name = self.deferred[0][0]
            self._run_deferred_one()
            if name == until:
                return

    # ---- commands of phase 1 ----

    def cmd_getversion(self, payload: bytes) -> bytes:
        return struct.pack(">I", codec.API_VERSION)

    def cmd_ping(self, payload: bytes) -> bytes:
        return b""

    def cmd_destroypod(self, payload: bytes) -> bytes:
        for hook in self.destroy_hooks:
            try:
                hook()
            except Exception as e:
                log("destroy: %s" % describe_exception(e))
        self.stopping = True
        return b""

    # ---- the loop ----

    def send_ready(self) -> None:
        """READY, written blocking: the write returns as soon as the host connects to the socket."""
        fd = self.ctl.fd
        os.set_blocking(fd, True)
        try:
            data = codec.encode_ctl(codec.READY)
            while data:
                data = data[os.write(fd, data):]
        finally:
            os.set_blocking(fd, False)

    def run(self) -> None:
        """Serve until DESTROYPOD; then flush the ACK and return (the caller powers off)."""
        while not self.stopping:
            try:
                self.run_once()
            except Exception as e:
                # PID 1 must not die: log, pause a moment so that a persistent fault cannot spin, go on.
                log("loop: %s" % describe_exception(e))
                time.sleep(0.01)
        self.flush_ctl(2.0)

    def flush_ctl(self, timeout: float) -> None:
        deadline = self.clock() + timeout
        poller = select.poll()
        poller.register(self.ctl.fd, _POLLOUT)
        while self.ctl.out and self.clock() < deadline:
            poller.poll(50)
            self.ctl.flush()

    def run_once(self, max_wait=None) -> None:
        """One poll and the work it found; ``max_wait`` (seconds) bounds the wait (tests)."""
        now = self.clock()
        poller = select.poll()
        registered = {}
        timeout = None

        def want(fd, events):
            registered[fd] = registered.get(fd, 0) | events

        for port in (self.ctl, self.stream):
            if port is None:
                continue
            if port.connected or now >= port.retry_at:
                want(port.fd, _POLLIN | (_POLLOUT if port.out else 0))
            else:
                timeout = _min(timeout, port.retry_at - now)
        backlog = self.stream.queued if self.stream is not None else 0
        for fd in self.readers:
            if fd in self.throttled and backlog > STREAM_BACKLOG_LIMIT:
                continue
            want(fd, _POLLIN)
        for fd in self.writers:
            want(fd, _POLLOUT)
        want(self._sigchld_r, _POLLIN)
        if self.partial_since is not None:
            timeout = _min(timeout, self.partial_since + PARTIAL_FRAME_TIMEOUT - now)
        if self.deferred:
            timeout = 0
        if max_wait is not None:
            timeout = _min(timeout, max_wait)
        for fd, events in registered.items():
            poller.register(fd, events)
        ms = None if timeout is None else max(0, int(timeout * 1000) + 1)
        events = poller.poll(ms)
        # A hung-up port that polled quietly has its host back.
        for port in (self.ctl, self.stream):
            if port is not None and not port.connected and port.fd in registered:
                if not any(fd == port.fd for fd, _ in events):
                    port.connected = True
        if not events:
            if self.deferred:
                self._run_deferred_one()
            self._check_partial_frame()
            return
        for fd, revents in events:
            try:
                self._handle_event(fd, revents)
            except Exception as e:
                # One bad fd must not take the agent down: log it and keep serving.
                log("event on fd %d: %s" % (fd, describe_exception(e)))
            if self.stopping:
                return
        self._check_partial_frame()

    def _handle_event(self, fd: int, revents: int) -> None:
        if fd == self.ctl.fd:
            self._port_event(self.ctl, revents, self._ctl_readable)
        elif self.stream is not None and fd == self.stream.fd:
            self._port_event(self.stream, revents, self._stream_readable)
        elif fd == self._sigchld_r:
            self.reap_children()
        elif revents & _POLLNVAL:
            # Closed behind our back: forget it rather than poll it forever.
            log("fd %d was closed while watched" % fd)
            self.remove_reader(fd)
            self.remove_writer(fd)
        else:
            if revents & (_POLLIN | _POLLHUP | _POLLERR) and fd in self.readers:
                self.readers[fd]()
            if revents & (_POLLOUT | _POLLERR | _POLLHUP) and fd in self.writers:
                self.writers[fd]()

    def _port_event(self, port: Port, revents: int, on_readable) -> None:
        # virtio_console reports POLLHUP while the host side is not connected, together with POLLIN
        # (a read then returns 0); without POLLHUP the host is there.
        if revents & _POLLIN:
            on_readable()
        if revents & _POLLHUP:
            self._hangup(port)
            return
        if not port.connected:
            port.connected = True
        if revents & _POLLOUT or port.out:
            port.flush()

    def _hangup(self, port: Port) -> None:
        if port.connected:
            port.connected = False
            if port is self.ctl:
                # A new host starts a new conversation: half a frame or old replies would confuse it.
                self.ctl_decoder = codec.CtlDecoder()
                self.partial_since = None
                port.drop_unkept()
            else:
                self.stream_decoder = codec.StreamDecoder()
        interval = RECONNECT_INTERVAL if port.out else RECONNECT_INTERVAL_IDLE
        port.retry_at = self.clock() + interval

    def _read_port(self, port: Port):
        try:
            data = os.read(port.fd, 65536)
        except (BlockingIOError, InterruptedError):
            return None
        if not data:
            self._hangup(port)
            return None
        return data

    def _ctl_readable(self) -> None:
        data = self._read_port(self.ctl)
        if data is None:
            return
        # hyperstart's flow control: one NEXT per read(), before the replies to what was read.
        self.ctl.queue(codec.encode_next(len(data)), False)
        try:
            frames = self.ctl_decoder.feed(data)
        except codec.FrameError as e:
            self.ctl_decoder = codec.CtlDecoder()
            self.partial_since = None
            self.send_ctl(codec.ERROR, ("malformed frame: %s" % e).encode())
            return
        self.partial_since = self.clock() if self.ctl_decoder.pending else None
        for code, payload in frames:
            self.dispatch(code, payload)
            if self.stopping:
                return

    def _check_partial_frame(self) -> None:
        if self.partial_since is not None and self.clock() - self.partial_since >= PARTIAL_FRAME_TIMEOUT:
            pending = self.ctl_decoder.pending
            self.ctl_decoder = codec.CtlDecoder()
            self.partial_since = None
            self.send_ctl(codec.ERROR, ("truncated frame: %d bytes dropped" % pending).encode())

    def dispatch(self, code: int, payload: bytes) -> None:
        handler = self.handlers.get(code)
        if handler is None:
            name = codec.CODE_NAMES.get(code)
            what = "unsupported command %s (%d)" % (name, code) if name else "unknown command code %d" % code
            self.send_ctl(codec.ERROR, what.encode())
            return
        started = uptime() if DEBUG else 0.0
        try:
            result = handler(payload)
        except CommandError as e:
            self.send_ctl(codec.ERROR, str(e).encode("utf-8", "replace"))
        except Exception as e:
            log("command %d failed: %s" % (code, describe_exception(e)))
            self.send_ctl(codec.ERROR, ("%s: %s" % (type(e).__name__, e)).encode("utf-8", "replace"))
        else:
            self.send_ctl(codec.ACK, result or b"")
        if DEBUG:
            log("%s at %.3f s took %.3f s" % (codec.CODE_NAMES.get(code, code), started, uptime() - started))

    def _stream_readable(self) -> None:
        data = self._read_port(self.stream)
        if data is None:
            return
        try:
            frames = self.stream_decoder.feed(data)
        except codec.FrameError as e:
            log("stream channel: %s; resynchronising" % e)
            self.stream_decoder = codec.StreamDecoder()
            return
        for seq, chunk in frames:
            sink = self.stream_sinks.get(seq)
            if sink is not None:
                try:
                    sink(chunk)
                except Exception as e:
                    log("stream seq %d: %s" % (seq, describe_exception(e)))
            elif seq not in self.retired_seqs:
                # hyperstart answers a frame for a seq it does not know with an empty frame (EOF).
                self.send_stream(seq, b"")

    def reap_children(self) -> None:
        try:
            while os.read(self._sigchld_r, 4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            callback = self.children.pop(pid, None)
            if callback is not None:
                try:
                    callback(status)
                except Exception as e:
                    log("child %d: %s" % (pid, describe_exception(e)))

    def _run_deferred_one(self) -> None:
        name, task = self.deferred.popleft()
        started = uptime() if DEBUG else 0.0
        try:
            task()
        except Exception as e:
            log("deferred %s: %s" % (name, describe_exception(e)))
        if DEBUG:
            log("idle work %s at %.3f s took %.3f s" % (name, started, uptime() - started))


def _ignore_signal(signum, frame) -> None:
    # A Python-level handler is needed for set_wakeup_fd to see SIGCHLD; the work happens in reap_children.
    pass


def _min(a, b):
    return b if a is None else min(a, b)


def exit_status(status: int) -> int:
    """A wait status as a shell would report it: the exit code, or 128+N when killed by signal N."""
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    if os.WIFEXITED(status):
        return os.WEXITSTATUS(status)
    return 255
