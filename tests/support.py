"""Helpers shared by the tests that drive a real daemon booting real VMs (imported as ``tests.support``)."""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator

WWW_SCRIPT = ("mkdir -p /www && echo hello from {name} > /www/index.html && "
              "dd if=/dev/zero of=/www/big bs=1M count={big_mb} 2>/dev/null; exec httpd -f -p {port} -h /www")


@contextlib.contextmanager
def host_http_server(reply: Callable[[str], bytes]) -> Iterator[int]:
    """An HTTP server on the host's 127.0.0.1 answering ``GET path`` with ``reply(path)``; yields its port (a
    user-mode guest reaches it at 10.0.2.2)."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            body = reply(self.path)
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def wait_for(predicate, timeout: float, what: str):
    """Poll ``predicate`` until it is true (returning its value), or fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.02)


def qemu_pids(path: str) -> list[int]:
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


class Api:
    """JSON calls to one daemon over its real socket, and the few composite steps the tests repeat."""

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

    # -- listings --------------------------------------------------------------------------------------------

    def listing(self, item: str) -> list[list[str]]:
        key = {"pod": "podData", "container": "cData", "vm": "vmData"}[item]
        return [s.split(":") for s in self.ok("GET", "/list", {"item": item})[key]]

    def pod_status(self, pod_id: str) -> str:
        return {p[0]: p[3] for p in self.listing("pod")}[pod_id]

    def container_status(self, name: str) -> str:
        return {c[1]: c[3] for c in self.listing("container")}[name]

    def wait_pod(self, pod_id: str, statuses=("succeeded", "failed"), timeout: float = 30.0) -> str:
        return wait_for(lambda: (s := self.pod_status(pod_id)) in statuses and s, timeout,
                        f"pod {pod_id} in {statuses}")

    def logs(self, pod_id: str) -> str:
        """Everything the pod's containers wrote, from their json-file logs."""
        d = os.path.join(self.daemon.root, "logs", pod_id)
        out = []
        for name in sorted(os.listdir(d)):
            with open(os.path.join(d, name)) as f:
                out += [json.loads(line)["log"] for line in f]
        return "".join(out)

    # -- pods --------------------------------------------------------------------------------------------------

    def run_pod(self, name: str, command: list[str], tty: bool = False, extra: dict | None = None) -> str:
        """Create and start a pod ``<name>-pod`` whose one busybox container ``name`` runs ``command``."""
        container = {"name": name, "image": "busybox", "command": command, "tty": tty}
        container.update(extra or {})
        pod_id = self.ok("POST", "/pod/create", body={"id": f"{name}-pod", "containers": [container]})["ID"]
        self.ok("POST", "/pod/start", {"podId": pod_id})
        return pod_id

    def exec_create(self, container: str, command: list[str], tty: bool = False) -> str:
        return self.ok("POST", "/exec/create", {"container": container, "command": json.dumps(command),
                                                "tty": "yes" if tty else "no"})

    def httpd_pod(self, name: str, portmappings=(), port: int = 80, big_mb: int = 0, **extra) -> str:
        """Create a pod whose one container serves /www (index.html and a ``big_mb`` MB file) with busybox httpd."""
        spec = {"id": name, "containers": [{"name": f"{name}-web", "image": "busybox", "command": [
            "sh", "-c", WWW_SCRIPT.format(name=name, port=port, big_mb=big_mb)]}],
            "portmappings": list(portmappings), **extra}
        return self.ok("POST", "/pod/create", body=spec)["ID"]

    def mappings(self, pod_id: str) -> list[dict]:
        return self.ok("GET", f"/pod/{pod_id}/portmappings")["portMappings"]
