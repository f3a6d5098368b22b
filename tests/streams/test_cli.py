"""hyperctl exec, attach and logs as a user runs them: a real hyperctl process, a real daemon, real VMs, and
for -t a real pty (window size, SIGWINCH resizes, the terminal restored afterwards)."""

from __future__ import annotations

import fcntl
import os
import select
import struct
import subprocess
import sys
import termios
import time

import pytest

pytestmark = pytest.mark.timeout(180)

HYPERCTL = os.path.join(os.path.dirname(sys.executable), "hyperctl")


def hyperctl(daemon, *args, input: bytes | None = b"", timeout: float = 60):
    return subprocess.run([HYPERCTL, "-H", f"unix://{daemon.socket_path}", *args], input=input,
                          capture_output=True, timeout=timeout)


@pytest.fixture
def box(vm_daemon):
    vm_daemon.api.run_pod("box", ["sleep", "3600"])
    return vm_daemon


def test_hyperctl_exec_pipes_stdin_and_exits_with_the_commands_code(box):
    r = hyperctl(box, "exec", "box", "cat", input=b"through the VM\n")
    assert (r.returncode, r.stdout, r.stderr) == (0, b"through the VM\n", b"")
    r = hyperctl(box, "exec", "box", "sh", "-c", "echo to-out; echo to-err >&2; exit 7")
    assert (r.returncode, r.stdout, r.stderr) == (7, b"to-out\n", b"to-err\n")
    r = hyperctl(box, "exec", "box-pod", "cat", "/etc/hostname")  # a pod name: its first container
    assert (r.returncode, r.stdout) == (0, b"box-pod\n")
    r = hyperctl(box, "exec", "-m", "box-pod", "sh", "-c", "test -d /tmp/hyper && echo in-vm")
    assert (r.returncode, r.stdout) == (0, b"in-vm\n")
    r = hyperctl(box, "exec", "nothere", "ls")
    assert r.returncode == 1 and b"hyperctl ERROR: no such container or pod: nothere" in r.stderr


def _set_size(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def _read_until(master: int, needle: bytes, buf: bytearray, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while needle not in buf:
        left = deadline - time.monotonic()
        assert left > 0, f"no {needle!r} in {bytes(buf)!r}"
        ready, _, _ = select.select([master], [], [], left)
        if ready:
            try:
                data = os.read(master, 4096)
            except OSError:
                data = b""
            assert data, f"pty closed before {needle!r}: {bytes(buf)!r}"
            buf += data


def test_tty_exec_sees_the_window_size_and_a_resize_and_the_terminal_is_restored(box):
    master, slave = os.openpty()
    try:
        _set_size(slave, 31, 97)
        before = termios.tcgetattr(slave)
        script = 's=$(stty size); echo "size=$s"; while [ "$(stty size)" = "$s" ]; do sleep 0.1; done; ' \
                 'echo "now=$(stty size)"'

        def controlling_tty():
            os.setsid()
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

        proc = subprocess.Popen([HYPERCTL, "-H", f"unix://{box.socket_path}", "exec", "-t", "box", "sh", "-c",
                                 script], stdin=slave, stdout=slave, stderr=slave, preexec_fn=controlling_tty)
        buf = bytearray()
        try:
            _read_until(master, b"size=31 97", buf)
            _set_size(master, 44, 120)  # the kernel sends SIGWINCH to hyperctl
            _read_until(master, b"now=44 120", buf)
            assert proc.wait(30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert termios.tcgetattr(slave) == before, "hyperctl left the terminal raw"
    finally:
        os.close(master)
        os.close(slave)


def test_hyperctl_attach_and_logs_follow(vm_daemon):
    api = vm_daemon.api
    api.run_pod("counter", ["sh", "-c", "for i in 1 2 3 4 5 6 7 8; do echo n$i; sleep 0.3; done; exit 3"])
    logs = subprocess.Popen([HYPERCTL, "-H", f"unix://{vm_daemon.socket_path}", "logs", "-f", "counter"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    attach = hyperctl(vm_daemon, "attach", "counter", input=None)
    assert attach.returncode == 3  # it ended with the container, whose code it returns
    assert attach.stdout.endswith(b"n8\n")
    out, err = logs.communicate(timeout=30)
    assert logs.returncode == 0, err
    assert out == b"".join(b"n%d\n" % i for i in range(1, 9))
    r = hyperctl(vm_daemon, "logs", "--tail", "2", "counter")
    assert r.stdout == b"n7\nn8\n"
