"""Fixtures for the stream tests: a real daemon booting real VMs (TCG), pods to exec into, raw socket helpers.

``vm_daemon`` comes from tests/conftest.py (one guest built per session); ``pod`` starts a
pod whose single container runs a given command and waits until it runs; ``hijack`` opens a raw hijacked
stream with the standard library, so the server is tested without our own client in the way.
"""

from __future__ import annotations

import os
import socket
import struct
import urllib.parse

import pytest

from tests.conftest import unchunk  # noqa: F401  (one decoder of chunked bodies, offered through Tools)
from tests.support import wait_for


class RawStream:
    """A hijacked stream over a plain socket: the head parsed, the bytes after it kept."""

    def __init__(self, sock: socket.socket, status: int, headers: dict[str, str], rest: bytes):
        self.sock = sock
        self.status = status
        self.headers = headers
        self.buffer = rest

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def half_close(self) -> None:
        self.sock.shutdown(socket.SHUT_WR)

    def read_all(self, timeout: float = 30.0) -> bytes:
        self.sock.settimeout(timeout)
        chunks = [self.buffer]
        self.buffer = b""
        while True:
            data = self.sock.recv(65536)
            if not data:
                break
            chunks.append(data)
        return b"".join(chunks)

    def read_until(self, needle: bytes, timeout: float = 30.0) -> bytes:
        self.sock.settimeout(timeout)
        while needle not in self.buffer:
            data = self.sock.recv(65536)
            assert data, f"stream closed before {needle!r}; got {self.buffer[-500:]!r}"
            self.buffer += data
        return self.buffer

    def close(self) -> None:
        self.sock.close()


def demux(data: bytes) -> list[tuple[int, bytes]]:
    frames = []
    while data:
        assert len(data) >= 8, f"truncated frame header {data!r}"
        stream, size = struct.unpack(">BxxxL", data[:8])
        assert len(data) >= 8 + size, "truncated frame"
        frames.append((stream, data[8:8 + size]))
        data = data[8 + size:]
    return frames


def joined(frames, stream: int) -> bytes:
    return b"".join(p for s, p in frames if s == stream)


@pytest.fixture
def hijack():
    """``hijack(daemon, path, params, upgrade=True, early=b"") -> RawStream`` (closed at teardown)."""
    opened = []

    def open_(daemon, path: str, params: dict, upgrade: bool = True, early: bytes = b"") -> RawStream:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        opened.append(s)
        s.settimeout(30)
        s.connect(daemon.socket_path)
        target = path + "?" + urllib.parse.urlencode(params)
        lines = [f"POST {target} HTTP/1.1", "Host: ", "Content-Type: text/plain", "Content-Length: 0"]
        if upgrade:
            lines += ["Connection: Upgrade", "Upgrade: tcp"]
        s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + early)
        buf = b""
        while b"\r\n\r\n" not in buf:
            data = s.recv(65536)
            assert data, f"closed before the head: {buf!r}"
            buf += data
        head, _, rest = buf.partition(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines)}
        return RawStream(s, int(status_line.split()[1]), headers, rest)

    try:
        yield open_
    finally:
        for s in opened:
            s.close()


def daemon_fds(daemon) -> int:
    return len(os.listdir(f"/proc/{daemon.proc.pid}/fd"))


def daemon_rss_kb(daemon) -> int:
    with open(f"/proc/{daemon.proc.pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class Tools:
    """The helpers above, for test modules (importlib mode: they cannot import this conftest)."""

    demux = staticmethod(demux)
    joined = staticmethod(joined)
    wait_for = staticmethod(wait_for)
    daemon_fds = staticmethod(daemon_fds)
    daemon_rss_kb = staticmethod(daemon_rss_kb)
    unchunk = staticmethod(unchunk)


@pytest.fixture
def tools() -> Tools:
    return Tools()
