"""Socket activation (``--socket systemd:domain=UNIX:index=0``): serve an adopted socket, never unlink it."""

import os
import signal
import socket
import subprocess
import sys

import pytest

from tests.conftest import http_request

TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")


def _spawn_activated(h, listener):
    """Start hyperd as systemd would: the socket on fd 3, LISTEN_FDS=1, LISTEN_FDNAMES, LISTEN_PID=its own pid."""
    fd = listener.fileno()
    argv = [TWISTD, "-n", "--pidfile=", "hyperd", "--socket", "systemd:domain=UNIX:index=0",
            "--root", h.root, "--run-dir", h.run_dir, "--accel", "tcg", "--config", h.config]
    # LISTEN_PID must be the daemon's pid: let the shell export its own pid, then exec twistd in place.
    script = 'export LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES=hyperd.socket; exec "$@"'
    log = open(h.log_path, "ab")
    with open(h.config, "w") as f:
        f.write("")
    proc = subprocess.Popen(["/bin/sh", "-c", script, "sh", *argv], stdout=log, stderr=subprocess.STDOUT,
                            close_fds=False, preexec_fn=lambda: os.dup2(fd, 3), start_new_session=True)
    log.close()
    h.proc = proc
    return proc


@pytest.mark.timeout(60)
def test_adopted_socket_is_served_and_left_in_place(hyperd_factory):
    h = hyperd_factory()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(h.socket_path)
    listener.listen(16)
    try:
        for _ in range(2):  # a restart serves the same socket again
            _spawn_activated(h, listener)
            h.wait_ready()
            status, _, body = http_request(h.socket_path, "GET", "/v1.17/_ping")
            assert (status, body) == (200, b"OK")
            assert h.stop(signal.SIGTERM) in (0, -signal.SIGTERM)
            assert os.path.exists(h.socket_path), "the daemon unlinked systemd's socket"
    finally:
        listener.close()
    assert "Traceback" not in h.log()
