"""Fixtures for the VM and pod tests: real daemons booting real VMs (TCG) from one guest built per session."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import urllib.parse

import pytest


@pytest.fixture(scope="session")
def guest_files():
    """The guest kernel and initrd, built once per session (every daemon of these tests boots them)."""
    from hyperd.guest.initrd import build_guest

    root = tempfile.mkdtemp(prefix="hdg", dir="/tmp")
    try:
        yield build_guest(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


class Api:
    """JSON calls to one daemon over its real socket."""

    def __init__(self, daemon):
        self.daemon = daemon

    def call(self, method: str, path: str, params: dict | None = None, body=None):
        target = path + ("?" + urllib.parse.urlencode(params) if params else "")
        data = json.dumps(body).encode() if body is not None else b""
        headers = {"Content-Type": "application/json"} if body is not None else {}
        status, _, content = self.daemon.request(method, target, headers=headers, body=data)
        try:
            return status, json.loads(content)
        except ValueError:
            return status, content.decode(errors="replace")

    def ok(self, method: str, path: str, params: dict | None = None, body=None):
        status, reply = self.call(method, path, params, body)
        assert status in (200, 201, 204), f"{method} {path} {params}: {status} {reply}\n{self.daemon.log()[-3000:]}"
        return reply

    def listing(self, item: str) -> list[list[str]]:
        key = {"pod": "podData", "container": "cData", "vm": "vmData"}[item]
        return [s.split(":") for s in self.ok("GET", "/list", {"item": item})[key]]

    def pod_status(self, pod_id: str) -> str:
        return {p[0]: p[3] for p in self.listing("pod")}[pod_id]

    def wait_pod(self, pod_id: str, statuses=("succeeded", "failed"), timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            status = self.pod_status(pod_id)
            if status in statuses:
                return status
            assert time.monotonic() < deadline, f"pod {pod_id} still {status}\n{self.daemon.log()[-3000:]}"
            time.sleep(0.05)

    def logs(self, pod_id: str) -> str:
        d = os.path.join(self.daemon.root, "logs", pod_id)
        out = []
        for name in sorted(os.listdir(d)):
            with open(os.path.join(d, name)) as f:
                out += [json.loads(line)["log"] for line in f]
        return "".join(out)


@pytest.fixture
def vm_daemon(hyperd_factory, guest_files):
    """A started hyperd whose VMs boot the session's guest; ``.api`` makes JSON calls to it."""
    h = hyperd_factory(extra_args=["--kernel", guest_files.kernel, "--initrd", guest_files.initrd])
    h.start()
    h.api = Api(h)
    return h


@pytest.fixture
def make_api():
    """``make_api(daemon) -> Api``, for daemons made with ``hyperd_factory``."""
    return Api


@pytest.fixture
def qemu_pids():
    """``qemu_pids(path)``: the qemu processes whose command line mentions ``path``."""
    return _qemu_pids


def _qemu_pids(path: str) -> list[int]:
    """The qemu processes whose command line mentions ``path``."""
    pids = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if b"qemu-system" in cmd and path.encode() in cmd:
            pids.append(int(pid))
    return pids
