"""``hyperctl exec``, ``attach`` and ``logs``: the commands that stream (registered on import by cli.py).

The local side of a stream is :class:`LocalIO`: stdin is read through the reactor and written to the socket
(paused while the socket's buffer is full), output is written to stdout/stderr with blocking writes, so a
slow terminal or pipe holds the stream back rather than filling memory. With ``-t`` the terminal goes raw,
SIGWINCH sends ``/tty/resize``, and the terminal is restored on every exit path (normal end, error,
reactor shutdown on a signal, interpreter exit).
"""

from __future__ import annotations

import argparse
import atexit
import errno
import fcntl
import os
import select
import signal
import struct
import sys
import termios
import tty as ttymod
from typing import Any, Callable, TextIO

from twisted.internet.interfaces import IPushProducer, IReadDescriptor
from zope.interface import implementer

from hyperd.client.cli import UsageFailure, command
from hyperd.client.client import HyperClient, HyperClientError
from hyperd.client.streams import STDERR, SYSTEM_ERROR, StreamClient, StreamProtocol

#: After a tty attach ends, how long to wait for the container's exit before taking it for a detach.
EXIT_GRACE = 1.5

__all__ = ["LocalIO", "cmd_exec", "cmd_attach", "cmd_logs", "resolve_container"]


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except BlockingIOError:
            select.select([], [fd], [])
            continue
        except OSError as e:
            if e.errno == errno.EPIPE:
                return
            raise
        view = view[n:]


@implementer(IReadDescriptor, IPushProducer)
class _StdinReader:
    """Local stdin → the stream's socket; EOF → half-close. Paused while the socket cannot take more."""

    def __init__(self, reactor: Any, fd: int, proto: StreamProtocol) -> None:
        self._reactor = reactor
        self._fd = fd
        self._proto = proto
        self._reading = False
        self._done = False

    def fileno(self) -> int:
        return self._fd

    def logPrefix(self) -> str:
        return "stdin"

    def start(self) -> None:
        if not self._done and not self._reading:
            self._reading = True
            self._reactor.addReader(self)

    def stop(self) -> None:
        if self._reading:
            self._reading = False
            self._reactor.removeReader(self)

    def doRead(self) -> None:
        try:
            data = os.read(self._fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            self._proto.write(data)
            return
        self._done = True
        self.stop()
        self._proto.close_stdin()

    def connectionLost(self, reason: Any) -> None:
        # The reactor saw the pipe's hangup (its writer closed): that is stdin's EOF.
        self._reading = False
        if not self._done:
            self._done = True
            self._proto.close_stdin()

    # IPushProducer, registered with the socket's transport
    def pauseProducing(self) -> None:
        self.stop()

    def resumeProducing(self) -> None:
        self.start()

    def stopProducing(self) -> None:
        self._done = True
        self.stop()


class LocalIO:
    """This terminal (or these pipes) as the far end of a stream."""

    def __init__(self, reactor: Any, stdin: int = 0, stdout: int = 1, stderr: int = 2) -> None:
        self.reactor = reactor
        self.stdin, self.stdout, self.stderr = stdin, stdout, stderr
        self._saved: list | None = None
        self._reader: _StdinReader | None = None
        self._old_winch: Any = None
        self._trigger: Any = None

    def output(self, stream: int, data: bytes) -> None:
        _write_all(self.stderr if stream in (STDERR, SYSTEM_ERROR) else self.stdout, data)

    def read_into(self, proto: StreamProtocol) -> None:
        self._reader = _StdinReader(self.reactor, self.stdin, proto)
        proto.transport.registerProducer(self._reader, True)
        self._reader.start()

    def size(self) -> tuple[int, int] | None:
        for fd in (self.stdout, self.stdin):
            if os.isatty(fd):
                rows, cols, _, _ = struct.unpack("HHHH", fcntl.ioctl(fd, termios.TIOCGWINSZ, b"\0" * 8))
                if rows and cols:
                    return rows, cols
        return None

    def make_raw(self) -> None:
        if not os.isatty(self.stdin) or self._saved is not None:
            return
        self._saved = termios.tcgetattr(self.stdin)
        atexit.register(self.restore)
        self._trigger = self.reactor.addSystemEventTrigger("before", "shutdown", self.restore)
        ttymod.setraw(self.stdin, termios.TCSANOW)

    def on_resize(self, send: Callable[[int, int], Any]) -> None:
        """Call ``send(rows, cols)`` now and on every SIGWINCH."""

        def resized() -> None:
            size = self.size()
            if size is not None:
                send(*size)

        self._old_winch = signal.signal(signal.SIGWINCH, lambda *_: self.reactor.callFromThread(resized))
        resized()

    def restore(self) -> None:
        """Undo everything: safe to call more than once, from any exit path."""
        if self._reader is not None:
            self._reader.stopProducing()
        if self._old_winch is not None:
            signal.signal(signal.SIGWINCH, self._old_winch)
            self._old_winch = None
        saved, self._saved = self._saved, None
        if saved is not None:
            try:
                termios.tcsetattr(self.stdin, termios.TCSADRAIN, saved)
            except termios.error:
                pass
        if self._trigger is not None:
            try:
                self.reactor.removeSystemEventTrigger(self._trigger)
            except (ValueError, KeyError):
                pass
            self._trigger = None


async def resolve_container(streams: StreamClient, target: str) -> str:
    """A container id or name as it is; a pod (``pod-...`` or a pod name) → its first container."""
    if not target.startswith("pod-"):
        try:
            info = await streams.container_info(target)
            return info["container"]["containerID"]
        except HyperClientError as e:
            if e.status != 404:
                raise
    try:
        info = await streams.pod_info(target)
    except HyperClientError as e:
        if e.status == 404:
            raise UsageFailure(f"no such container or pod: {target}") from None
        raise
    containers = info.get("spec", {}).get("containers") or []
    if not containers:
        raise UsageFailure(f"pod {target} has no container")
    return containers[0]["containerID"]


async def pump(io: LocalIO, proto: StreamProtocol, tty: bool, resize: Callable[[int, int], Any] | None,
                stdin: bool = True) -> None:
    """Connect the local end to ``proto`` until the server closes it; the terminal restored after."""
    try:
        if tty:
            io.make_raw()
            if resize is not None:
                io.on_resize(lambda h, w: _quietly(resize(h, w)))
        if stdin:
            io.read_into(proto)
        await proto.done
    finally:
        io.restore()


def _quietly(d: Any) -> None:
    from twisted.internet import defer

    defer.ensureDeferred(d).addErrback(lambda f: None)


def _exec_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-t", "--tty", action="store_true", help="allocate a terminal (local terminal goes raw)")
    p.add_argument("-d", "--detach", action="store_true", help="start it and return at once")
    p.add_argument("-m", "--vm", action="store_true", help="run in the pod's VM, outside its containers")
    p.add_argument("target", metavar="POD|CONTAINER")
    p.add_argument("cmd", nargs=argparse.REMAINDER, metavar="CMD")


@command("exec", "Run a command in a container of a running pod", _exec_arguments)
async def cmd_exec(client: HyperClient, args: argparse.Namespace, out: TextIO) -> int:
    if not args.cmd:
        raise UsageFailure('"exec" needs a command to run')
    from twisted.internet import reactor

    streams = StreamClient(client)
    io = LocalIO(reactor)
    if args.vm:
        container = args.target
        exec_id, proto = await streams.execvm(args.target, args.cmd, io.output, tty=args.tty)
    else:
        container = await resolve_container(streams, args.target)
        exec_id = await streams.exec_create(container, args.cmd, args.tty)
        proto = await streams.exec_start(container, exec_id, io.output)
    if args.detach:
        proto.close()
        out.write(f"{exec_id}\n")
        return 0
    await pump(io, proto, args.tty, lambda h, w: streams.resize(container, exec_id, h, w))
    return await streams.exit_code(container, exec_id)


def _attach_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", metavar="CONTAINER|POD")


@command("attach", "Attach to a running container (leave a tty with ctrl-p ctrl-q)", _attach_arguments)
async def cmd_attach(client: HyperClient, args: argparse.Namespace, out: TextIO) -> int:
    from twisted.internet import reactor

    streams = StreamClient(client)
    container = await resolve_container(streams, args.target)
    tty = bool((await streams.container_info(container)).get("tty"))
    io = LocalIO(reactor)
    proto = await streams.attach(container, io.output)
    await pump(io, proto, tty, lambda h, w: streams.resize(container, None, h, w))
    if not tty:
        return await streams.exit_code(container)  # the output ended: the container is exiting
    # A tty stream also ends when we detach (ctrl-p ctrl-q): wait a moment for an exit, else it runs on.
    from twisted.internet import defer
    from twisted.internet import reactor as clock

    code = defer.ensureDeferred(streams.exit_code(container))
    code.addTimeout(EXIT_GRACE, clock)
    try:
        return await code
    except defer.TimeoutError:
        return 0


def _logs_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-f", "--follow", action="store_true", help="keep streaming until the container exits")
    p.add_argument("-t", "--timestamps", action="store_true", help="prefix each line with its time")
    p.add_argument("--since", help="only lines after this time (unix seconds or RFC 3339)")
    p.add_argument("--tail", default="all", help="only the last N lines (default all)")
    p.add_argument("target", metavar="CONTAINER|POD")


@command("logs", "Fetch the logs of a container", _logs_arguments)
async def cmd_logs(client: HyperClient, args: argparse.Namespace, out: TextIO) -> None:
    from twisted.internet import reactor

    streams = StreamClient(client)
    container = await resolve_container(streams, args.target)
    io = LocalIO(reactor)
    if out is not sys.stdout:  # tests pass their own stream
        def output(stream: int, data: bytes) -> None:
            out.write(data.decode("utf-8", "replace"))
    else:
        output = io.output
    await streams.logs(container, output, follow=args.follow, timestamps=args.timestamps,
                       tail=None if args.tail == "all" else args.tail, since=args.since)
