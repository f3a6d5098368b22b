"""Shared fixtures: a real hyperd daemon in a subprocess, on a short temp socket, and a client for it.

``hyperd`` gives a started daemon (``twistd -n --pidfile= hyperd``) with its own temp root, run dir and
socket; ``hyperd_factory(**options)`` makes more (not started until ``.start()``). Teardown stops every
daemon made (SIGTERM, then SIGKILL), kills any process still running out of its run dir (a VM's qemu),
and removes the temp dir, even when the test failed. ``hyperd_client`` is a HyperClient on ``hyperd``'s
socket, closed at teardown.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

import pytest
import pytest_twisted

TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")


def unix_http(path: str, raw: bytes, timeout: float = 10.0) -> bytes:
    """Send raw HTTP bytes over a UNIX socket and return everything the server sent until it closed."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(path)
        s.sendall(raw)
        chunks = []
        while True:
            data = s.recv(65536)
            if not data:
                break
            chunks.append(data)
        return b"".join(chunks)
    finally:
        s.close()


def http_request(path: str, method: str, target: str, headers: dict[str, str] | None = None,
                 body: bytes = b"", host: str | None = "hyperd") -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 request (Connection: close) over a UNIX socket; returns (status, headers, body)."""
    lines = [f"{method} {target} HTTP/1.1"]
    if host is not None:
        lines.append(f"Host: {host}")
    hdrs = {"Connection": "close", "Content-Length": str(len(body))}
    hdrs.update(headers or {})
    lines += [f"{k}: {v}" for k, v in hdrs.items()]
    reply = unix_http(path, ("\r\n".join(lines) + "\r\n\r\n").encode() + body)
    head, _, content = reply.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    status = int(status_line.split()[1])
    out = {}
    for line in header_lines:
        k, _, v = line.partition(":")
        out[k.strip().lower()] = v.strip()
    if out.get("transfer-encoding") == "chunked":
        content = unchunk(content)
    return status, out, content


def unchunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += data[:size]
        data = data[size + 2:]
    return out


class HyperdProcess:
    """One hyperd daemon in a subprocess. ``dir`` holds root/, run/, h.sock and daemon.log."""

    def __init__(self, dir: str, extra_args: list[str] | None = None, accel: str = "tcg",
                 config: str | None = None) -> None:
        self.dir = dir
        self.root = os.path.join(dir, "root")
        self.run_dir = os.path.join(dir, "run")
        self.socket_path = os.path.join(dir, "h.sock")
        self.log_path = os.path.join(dir, "daemon.log")
        self.config = config if config is not None else os.path.join(dir, "config")  # absent unless written
        self.accel = accel
        self.extra_args = list(extra_args or [])
        self.proc: subprocess.Popen | None = None
        self.pids: list[int] = []

    def argv(self) -> list[str]:
        return [TWISTD, "-n", "--pidfile=", "hyperd", "--socket", self.socket_path, "--root", self.root,
                "--run-dir", self.run_dir, "--accel", self.accel, "--config", self.config, *self.extra_args]

    def spawn(self) -> subprocess.Popen:
        """Start the daemon without waiting for it (see :meth:`start`)."""
        if not os.path.exists(self.config):
            with open(self.config, "w") as f:
                f.write("# test config\n")
        log = open(self.log_path, "ab")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(self.argv(), stdout=log, stderr=subprocess.STDOUT, env=env,
                                     cwd=self.dir, start_new_session=True)
        log.close()
        self.pids.append(self.proc.pid)
        return self.proc

    def start(self, timeout: float = 20.0) -> HyperdProcess:
        """Start the daemon and wait until ``GET /_ping`` answers OK."""
        self.spawn()
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"hyperd exited with {self.proc.returncode}:\n{self.log()}")
            try:
                status, _, body = http_request(self.socket_path, "GET", "/_ping")
                if status == 200 and body == b"OK":
                    # A listing answers once start-up (guest files, recovery of the VMs left running) is
                    # over, or has failed: tests then see the daemon as its clients will.
                    http_request(self.socket_path, "GET", "/list?item=vm")
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"hyperd did not answer /_ping within {timeout} s:\n{self.log()}")
            time.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        """Signal the daemon and wait for it to exit; SIGKILL after ``timeout``. Returns its exit status."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise AssertionError(f"hyperd did not stop within {timeout} s after signal {sig}:\n{self.log()}") from None

    def kill(self) -> int:
        """SIGKILL the daemon (a crash): its socket and lock file stay behind."""
        return self.stop(signal.SIGKILL)

    def restart(self, timeout: float = 20.0) -> HyperdProcess:
        self.stop()
        return self.start(timeout)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def request(self, method: str, target: str, **kwargs: Any) -> tuple[int, dict[str, str], bytes]:
        """A raw HTTP request to this daemon (see :func:`http_request`)."""
        return http_request(self.socket_path, method, target, **kwargs)

    def cleanup(self) -> None:
        """Stop the daemon and anything it left running from its run dir; remove its files."""
        try:
            if self.running:
                try:
                    self.stop(timeout=20)
                except AssertionError:
                    pass
        finally:
            kill_processes_using(self.dir)
            shutil.rmtree(self.dir, ignore_errors=True)


def kill_processes_using(path: str) -> list[int]:
    """SIGKILL every process whose command line mentions ``path`` (qemu of a VM left by a test)."""
    killed = []
    needle = path.encode()
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if needle in cmdline:
            try:
                os.kill(int(pid), signal.SIGKILL)
                killed.append(int(pid))
            except ProcessLookupError:
                pass
    for pid in killed:  # reap our own children; others are reaped by init
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
    return killed


@pytest.fixture
def hyperd_factory():
    """``make(extra_args=None, accel="tcg", config=None) -> HyperdProcess`` (not started); all cleaned up."""
    made: list[HyperdProcess] = []

    def make(**kwargs: Any) -> HyperdProcess:
        d = tempfile.mkdtemp(prefix="hd", dir="/tmp")  # short: sun_path is at most 107 bytes
        h = HyperdProcess(d, **kwargs)
        made.append(h)
        return h

    try:
        yield make
    finally:
        for h in made:
            h.cleanup()


@pytest.fixture
def hyperd(hyperd_factory) -> HyperdProcess:
    """A started hyperd with a temp root, run dir and socket."""
    return hyperd_factory().start()


@pytest.fixture
def hyperd_client(hyperd):
    """A HyperClient on the ``hyperd`` fixture's socket."""
    from twisted.internet import defer, reactor

    from hyperd.client import HyperClient

    client = HyperClient(reactor, hyperd.socket_path)
    try:
        yield client
    finally:
        pytest_twisted.blockon(defer.ensureDeferred(client.close()))


# --- daemons booting real VMs ------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def guest_files():
    """The guest kernel and initrd, built once per session (every VM of the tests boots them)."""
    from hyperd.guest.initrd import build_guest

    root = tempfile.mkdtemp(prefix="hdg", dir="/tmp")
    try:
        yield build_guest(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def vm_daemon(hyperd_factory, guest_files):
    """A started hyperd whose VMs boot the session's guest; ``.api`` makes JSON calls to it."""
    from tests.support import Api

    h = hyperd_factory(extra_args=["--kernel", guest_files.kernel, "--initrd", guest_files.initrd])
    h.start()
    h.api = Api(h)
    return h


@pytest.fixture
def make_api():
    """``make_api(daemon) -> Api``, for daemons made with ``hyperd_factory``."""
    from tests.support import Api

    return Api


@pytest.fixture
def qemu_pids():
    """``qemu_pids(path)``: the qemu processes whose command line mentions ``path``."""
    from tests.support import qemu_pids

    return qemu_pids
