"""The client side of hyperd's streams: exec, attach and logs.

treq cannot read a ``101`` (Twisted's HTTP client drops 1xx replies), so a hijacked stream is a small
protocol of its own, :class:`StreamProtocol`: it writes the request, parses the reply's head, keeps the
bytes that came with it (they are the stream's first bytes), demultiplexes Docker's 8-byte frames when the
reply says ``multiplexed-stream``, and half-closes the socket for stdin's EOF (``close_stdin``) while output
keeps coming. A refused request (404, 409...) fails ``head`` with :class:`HyperClientError`.

:class:`StreamClient` wraps a :class:`~hyperd.client.client.HyperClient` with the stream routes::

    streams = StreamClient(client)
    exec_id = await streams.exec_create("web", ["cat"])
    proto = await streams.exec_start("web", exec_id, on_output=lambda stream, data: ...)
    proto.write(b"hello"); proto.close_stdin()
    await proto.done
    code = await streams.exit_code("web", exec_id)

``on_output(stream, data)`` gets stream 1 (stdout), 2 (stderr), 3 (an error from the daemon) or 0 (a tty's
raw bytes). Flow control: ``pause_output``/``resume_output`` stop reading the socket, which pauses the
process in its VM.
"""

from __future__ import annotations

import json
import socket
import struct
from collections.abc import Callable
from typing import Any
from urllib.parse import urlencode

import treq
from twisted.internet import defer
from twisted.internet.endpoints import UNIXClientEndpoint, connectProtocol
from twisted.internet.error import ConnectError
from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer
from twisted.internet.protocol import Protocol
from zope.interface import implementer

from hyperd import __version__
from hyperd.client.client import HyperClient, HyperClientError, _error_message

__all__ = ["RAW", "STDERR", "STDOUT", "SYSTEM_ERROR", "FrameDecoder", "StreamClient", "StreamProtocol"]

RAW, STDOUT, STDERR, SYSTEM_ERROR = 0, 1, 2, 3
_FRAME = struct.Struct(">BxxxL")
STREAM_BUFFER = 1024 * 1024
#: A reply head larger than this is not an HTTP reply we understand.
MAX_HEAD = 64 * 1024

OutputCallback = Callable[[int, bytes], None]


class FrameDecoder:
    """Docker's stdcopy frames → (stream, payload); frames may be split across reads or share one."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        buf = self._buf
        buf += data
        out = []
        pos, end = 0, len(buf)
        while end - pos >= 8:
            stream, size = _FRAME.unpack_from(buf, pos)
            if end - pos - 8 < size:
                break
            out.append((stream, bytes(buf[pos + 8:pos + 8 + size])))
            pos += 8 + size
        if pos:
            del buf[:pos]
        return out

    @property
    def pending(self) -> int:
        return len(self._buf)


class StreamHead:
    def __init__(self, status: int, reason: str, headers: dict[str, str]) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers

    @property
    def framed(self) -> bool:
        return "multiplexed" in self.headers.get("content-type", "")


def request_bytes(method: str, target: str, upgrade: bool = True, body: bytes = b"") -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: hyperd", f"User-Agent: hyperd-client/{__version__}",
             "Content-Type: text/plain", f"Content-Length: {len(body)}"]
    if upgrade:
        lines += ["Connection: Upgrade", "Upgrade: tcp"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8") + body


@implementer(IHalfCloseableProtocol, IPushProducer)
class StreamProtocol(Protocol):
    """One hijacked stream; see the module docstring. ``head`` fires with a :class:`StreamHead` once the
    stream is open; ``done`` fires (None) when the server closed it, after the last output was delivered."""

    def __init__(self, request: bytes, on_output: OutputCallback, framed: bool | None = None) -> None:
        self._request = request
        self._on_output = on_output
        self._framed = framed
        self._decoder = FrameDecoder()
        self._buf = bytearray()
        self._head: StreamHead | None = None
        self._error_status: int | None = None
        self._error_length: int | None = None
        self.head: defer.Deferred = defer.Deferred()
        self.done: defer.Deferred = defer.Deferred()
        self.stdin_closed = False
        self.errors: list[str] = []

    # -- the request and the head ------------------------------------------------------------------------

    def connectionMade(self) -> None:
        # Big reads and kernel buffers: fewer turns of the reactor per MB (and still a bounded buffer).
        self.transport.bufferSize = STREAM_BUFFER
        try:
            sock = self.transport.getHandle()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, STREAM_BUFFER)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, STREAM_BUFFER)
        except (OSError, AttributeError):
            pass
        self.transport.write(self._request)

    def dataReceived(self, data: bytes) -> None:
        if self._head is not None:
            self._deliver(data)
            return
        self._buf += data
        if self._error_status is not None:
            self._error_body()
            return
        end = self._buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buf) > MAX_HEAD:
                self._fail(HyperClientError(0, "hyperd sent a reply head larger than 64 KiB"))
            return
        head, rest = bytes(self._buf[:end]), bytes(self._buf[end + 4:])
        self._buf.clear()
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        try:
            status = int(parts[1])
        except (IndexError, ValueError):
            self._fail(HyperClientError(0, f"hyperd sent a malformed reply: {lines[0]!r}"))
            return
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if status not in (101, 200):
            self._error_status = status
            length = headers.get("content-length")
            self._error_length = int(length) if length and length.isdigit() else None
            self._buf += rest
            self._error_body()
            return
        self._head = StreamHead(status, parts[2] if len(parts) > 2 else "", headers)
        if self._framed is None:
            self._framed = self._head.framed
        self.head.callback(self._head)
        if rest:
            self._deliver(rest)  # bytes that came with the head are the stream's first bytes

    def _error_body(self, at_close: bool = False) -> None:
        if self._error_length is not None and len(self._buf) < self._error_length and not at_close:
            return
        if self._error_length is None and not at_close:
            return
        body = bytes(self._buf[:self._error_length] if self._error_length is not None else self._buf)
        self._fail(HyperClientError(self._error_status, _error_message(body, self._error_status)))

    def _fail(self, error: Exception) -> None:
        if not self.head.called:
            self.head.errback(error)
        if self.transport is not None:
            self.transport.loseConnection()

    def _deliver(self, data: bytes) -> None:
        if not self._framed:
            self._on_output(RAW, data)
            return
        for stream, payload in self._decoder.feed(data):
            if stream == SYSTEM_ERROR:
                self.errors.append(payload.decode("utf-8", "replace").strip())
            self._on_output(stream, payload)

    # -- stdin ---------------------------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if not self.stdin_closed and self.transport is not None:
            self.transport.write(data)

    def close_stdin(self) -> None:
        """stdin's EOF: half-close the socket (Go's CloseWrite); output keeps coming."""
        if not self.stdin_closed and self.transport is not None:
            self.stdin_closed = True
            self.transport.loseWriteConnection()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.loseConnection()

    # -- output flow control (IPushProducer, e.g. for a local stdout transport) --------------------------

    def pauseProducing(self) -> None:
        if self.transport is not None:
            self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        if self.transport is not None:
            self.transport.resumeProducing()

    def stopProducing(self) -> None:
        pass

    pause_output, resume_output = pauseProducing, resumeProducing

    # -- the end ---------------------------------------------------------------------------------------

    def readConnectionLost(self) -> None:
        # The server has sent everything; it closes its side once output ended.
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Any = None) -> None:
        if self._error_status is not None and not self.head.called:
            self._error_body(at_close=True)
        if not self.head.called:
            self.head.errback(HyperClientError(0, "hyperd closed the connection before it replied"))
        if not self.done.called:
            self.done.callback(None)


class StreamClient:
    """The stream routes, on a HyperClient's socket (and its JSON calls for the rest)."""

    def __init__(self, client: HyperClient) -> None:
        self.client = client
        self.reactor = client.reactor

    def _target(self, path: str, params: dict[str, Any]) -> str:
        url = self.client._url(path, params)
        return url[len("http://hyperd"):]

    async def open(self, path: str, params: dict[str, Any], on_output: OutputCallback,
                   upgrade: bool = True) -> StreamProtocol:
        """POST ``path`` and take the stream over; returns once the head arrived (raises a refusal)."""
        proto = StreamProtocol(request_bytes("POST", self._target(path, params), upgrade), on_output)
        endpoint = UNIXClientEndpoint(self.reactor, self.client.socket_path)
        try:
            await connectProtocol(endpoint, proto)
        except ConnectError as e:
            raise HyperClientError(0, f"cannot connect to hyperd at {self.client.socket_path}: {e}") from None
        await proto.head
        return proto

    async def exec_create(self, container: str, command: list[str], tty: bool = False) -> str:
        return await self.client.get_json("POST", "/exec/create", {
            "container": container, "command": json.dumps(command), "tty": "yes" if tty else None})

    async def exec_start(self, container: str, exec_id: str, on_output: OutputCallback) -> StreamProtocol:
        return await self.open("/exec/start", {"container": container, "exec": exec_id}, on_output)

    async def execvm(self, pod: str, command: list[str], on_output: OutputCallback,
                     tty: bool = False) -> tuple[str, StreamProtocol]:
        """Run ``command`` in the pod's VM; (exec id, stream)."""
        proto = await self.open("/execvm", {"pod": pod, "command": json.dumps(command),
                                            "tty": "yes" if tty else None}, on_output)
        return proto._head.headers.get("x-hyper-exec", ""), proto

    async def attach(self, container: str, on_output: OutputCallback) -> StreamProtocol:
        return await self.open("/attach", {"container": container}, on_output)

    async def resize(self, container: str | None, exec_id: str | None, height: int, width: int) -> None:
        await self.client.request("POST", "/tty/resize", {"container": container, "exec": exec_id,
                                                          "h": height, "w": width})

    async def exit_code(self, container: str | None, exec_id: str | None = None) -> int:
        return int(await self.client.get_json("GET", "/exitcode", {"container": container, "exec": exec_id}))

    async def container_info(self, container: str) -> dict[str, Any]:
        return await self.client.get_json("GET", "/container/info", {"container": container})

    async def pod_info(self, pod: str) -> dict[str, Any]:
        return await self.client.get_json("GET", "/pod/info", {"podName": pod})

    async def logs(self, container: str, on_output: OutputCallback, follow: bool = False,
                   timestamps: bool = False, tail: str | int | None = None, since: str | None = None,
                   stdout: bool = True, stderr: bool = True) -> None:
        """Stream a container's log to ``on_output`` (until it exits, with ``follow``)."""
        params = {"container": container, "stdout": "yes" if stdout else "no", "stderr": "yes" if stderr else "no",
                  "follow": "yes" if follow else None, "timestamps": "yes" if timestamps else None,
                  "tail": None if tail is None else str(tail), "since": since}
        url = self.client._url("/container/logs", params)
        try:
            response = await self.client._http.get(url, headers={"Accept": ["application/json"]})
        except ConnectError as e:
            raise HyperClientError(0, f"cannot connect to hyperd at {self.client.socket_path}: {e}") from None
        if response.code != 200:
            content = await treq.content(response)
            raise HyperClientError(response.code, _error_message(content, response.code))
        content_type = (response.headers.getRawHeaders(b"content-type") or [b""])[0]
        if b"multiplexed" in content_type:
            decoder = FrameDecoder()

            def collect(data: bytes) -> None:
                for stream, payload in decoder.feed(data):
                    on_output(stream, payload)
        else:
            def collect(data: bytes) -> None:
                on_output(RAW, data)
        await treq.collect(response, collect)


def query(params: dict[str, Any]) -> str:
    return urlencode({k: v for k, v in params.items() if v is not None})
