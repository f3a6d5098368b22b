"""``hyperctl run --publish`` and ``hyperctl ports ls|add|delete`` as a user runs them: a real hyperctl process
against a real daemon and a real VM, the published ports reached with a real HTTP GET on 127.0.0.1."""

import os
import subprocess
import sys

import pytest

from tests.network.conftest import WWW_SCRIPT, free_port, http_get

HYPERCTL = os.path.join(os.path.dirname(sys.executable), "hyperctl")


def hyperctl(daemon, *args, timeout: float = 90):
    r = subprocess.run([HYPERCTL, "-H", f"unix://{daemon.socket_path}", *args], capture_output=True, text=True,
                       stdin=subprocess.DEVNULL, timeout=timeout)
    return r


@pytest.mark.timeout(240)
def test_publish_and_ports_commands(vm_daemon):
    first, second = free_port(), free_port()
    r = hyperctl(vm_daemon, "run", "-d", "--name", "pub", "--publish", f"{first}:80", "busybox", "sh", "-c",
                 WWW_SCRIPT.format(name="pub", port=80, big_mb=0))
    assert r.returncode == 0, r.stderr
    assert http_get("127.0.0.1", first) == b"hello from pub\n"

    r = hyperctl(vm_daemon, "ports", "add", "-p", f"tcp:{second}:80", "pub")
    assert r.returncode == 0, r.stderr
    assert http_get("127.0.0.1", second) == b"hello from pub\n"
    r = hyperctl(vm_daemon, "ports", "ls", "pub")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["Protocol\tHost Ports\tContainer Ports", f"tcp\t{first}\t80",
                                     f"tcp\t{second}\t80"]

    r = hyperctl(vm_daemon, "ports", "delete", "-p", f"{first}:80", "pub")
    assert r.returncode == 0, r.stderr
    assert hyperctl(vm_daemon, "ports", "ls", "pub").stdout.splitlines()[1:] == [f"tcp\t{second}\t80"]

    # errors: a port in use (409 text), a malformed rule (before any request), an unknown pod
    r = hyperctl(vm_daemon, "ports", "add", "-p", f"{second}:81", "pub")
    assert r.returncode == 1 and f"tcp/{second}" in r.stderr, r.stderr
    r = hyperctl(vm_daemon, "ports", "add", "-p", "80:http", "pub")
    assert r.returncode == 1 and "hyperctl ERROR: -p '80:http'" in r.stderr, r.stderr
    r = hyperctl(vm_daemon, "ports", "ls", "nosuchpod")
    assert r.returncode == 1 and "no such pod: nosuchpod" in r.stderr
    assert hyperctl(vm_daemon, "rm", "pub").returncode == 0
