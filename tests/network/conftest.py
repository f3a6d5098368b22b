"""Fixtures for the network tests: real daemons booting real VMs (TCG), httpd pods, network namespaces.

``guest_files``, ``vm_daemon`` and ``Api`` are shared (tests/conftest.py, tests/support.py). ``netns`` makes a
network namespace for one test and deletes it afterwards, whatever happened, with every process still in it.
No test here sends traffic anywhere but loopback or a namespace it made.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import time

import pytest

from tests.support import WWW_SCRIPT  # noqa: E402,F401  (re-exported for the tests here)


def http_get(host: str, port: int, path: str = "/", timeout: float = 30.0, retry_for: float = 30.0) -> bytes:
    """GET http://host:port/path with the standard library; retried (the server may still be starting)."""
    deadline = time.monotonic() + retry_for
    while True:
        try:
            with socket.create_connection((host, port), timeout=timeout) as s:
                s.sendall(f"GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
                chunks = []
                while True:
                    data = s.recv(1 << 20)
                    if not data:
                        break
                    chunks.append(data)
            reply = b"".join(chunks)
            head, _, body = reply.partition(b"\r\n\r\n")
            if head.startswith(b"HTTP/1.") and b" 200 " in head.split(b"\r\n")[0]:
                return body
            raise OSError(f"reply {head[:60]!r}")
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def run_in_pod(daemon, pod: str, script: str) -> str:
    """Run ``script`` in a second container of the pod and return its output (from its log)."""
    api = daemon.api
    cid = api.ok("POST", "/container/create", {"podId": pod},
                 body={"image": "busybox", "command": ["sh", "-c", script]})["ID"]
    api.ok("POST", "/container/start", {"container": cid})
    assert api.ok("GET", "/exitcode", {"container": cid}) == 0
    path = os.path.join(daemon.root, "logs", pod, f"{cid}-json.log")
    deadline = time.monotonic() + 10
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.05)
    with open(path) as f:
        return "".join(json.loads(line)["log"] for line in f)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _netns_pids(name: str) -> list[int]:
    out = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


class NetNS:
    """A network namespace of our own with loopback up; ``run``/``popen`` run commands in it."""

    def __init__(self, name: str) -> None:
        self.name = name

    def argv(self, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    def run(self, *argv: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(self.argv(*argv), capture_output=True, text=True, check=check, **kwargs)

    def delete(self) -> None:
        for pid in _netns_pids(self.name):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)


@pytest.fixture
def netns():
    """``make() -> NetNS``: namespaces deleted at teardown (with any process left in them), even on failure."""
    made: list[NetNS] = []

    def make() -> NetNS:
        ns = NetNS("hdt" + secrets.token_hex(4))
        subprocess.run(["ip", "netns", "add", ns.name], check=True)
        made.append(ns)
        ns.run("ip", "link", "set", "lo", "up")
        return ns

    try:
        yield make
    finally:
        for ns in made:
            ns.delete()
        leftover = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        for ns in made:
            assert ns.name not in leftover, f"namespace {ns.name} was not deleted"
