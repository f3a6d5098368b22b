"""What the benchmarks share: JSON calls to a daemon over its UNIX socket, a free TCP port, killing what a run
left behind, and printing a run's values. Standard library only."""

from __future__ import annotations

import json
import os
import signal
import socket
import urllib.parse


def call(sock_path: str, method: str, path: str, params: dict | None = None, body=None, timeout: float = 120.0):
    """One API call (Connection: close); the JSON reply (text if it is not JSON, None if empty). RuntimeError
    for a status >= 300, with the daemon's message."""
    target = path + ("?" + urllib.parse.urlencode(params) if params else "")
    data = json.dumps(body).encode() if body is not None else b""
    head = (f"{method} {target} HTTP/1.1\r\nHost: hyperd\r\nConnection: close\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n").encode()
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(timeout)
        s.connect(sock_path)
        s.sendall(head + data)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    status_line, _, rest = b"".join(chunks).partition(b"\r\n")
    status = int(status_line.split()[1])
    payload = rest.partition(b"\r\n\r\n")[2]
    if status >= 300:
        raise RuntimeError(f"{method} {path}: {status} {payload.decode(errors='replace')}")
    try:
        return json.loads(payload) if payload.strip() else None
    except ValueError:
        return payload.decode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_processes_using(path: str) -> None:
    """SIGKILL the processes whose command line names ``path`` (the VMs of a run, which outlive their daemon
    by design), by pid."""
    needle = path.encode()
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if needle not in f.read():
                    continue
            os.kill(int(pid), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            pass


def fmt(values: list[float], digits: int = 2) -> str:
    return "[" + " ".join("%.*f" % (digits, v) for v in values) + "]"
