"""exec over hijacked connections on a real daemon with real VMs: stdin, half-close, frames, exit codes."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def sleeper(vm_daemon):
    """A running pod whose container ``box`` sleeps."""
    vm_daemon.api.run_pod("box", ["sleep", "3600"])
    return vm_daemon


def test_exec_cat_echoes_stdin_and_exits_0_after_the_half_close(sleeper, hijack, tools):
    api = sleeper.api
    exec_id = api.exec_create("box", ["cat"])
    assert exec_id.startswith("exec-") and len(exec_id) == 15
    stream = hijack(sleeper, "/exec/start", {"container": "box", "exec": exec_id})
    assert stream.status == 101
    assert stream.headers["upgrade"] == "tcp" and stream.headers["connection"] == "Upgrade"
    assert stream.headers["content-type"] == "application/vnd.docker.multiplexed-stream"
    stream.send(b"hello\n")
    stream.read_until(b"hello\n")
    stream.send(b"world\n")
    stream.half_close()
    frames = tools.demux(stream.read_all())
    assert tools.joined(frames, 1) == b"hello\nworld\n"
    assert api.ok("GET", "/exitcode", {"container": "box", "exec": exec_id}) == 0
    assert api.container_status("box") == "running"


def test_stdout_and_stderr_arrive_separated_and_each_in_order(sleeper, hijack, tools):
    script = "i=0; while [ $i -lt 300 ]; do echo out$i; echo err$i >&2; i=$((i+1)); done"
    exec_id = sleeper.api.exec_create("box", ["sh", "-c", script])
    stream = hijack(sleeper, "/exec/start", {"container": "box", "exec": exec_id})
    stream.half_close()
    frames = tools.demux(stream.read_all())
    assert {s for s, _ in frames} == {1, 2}
    assert tools.joined(frames, 1).decode() == "".join(f"out{i}\n" for i in range(300))
    assert tools.joined(frames, 2).decode() == "".join(f"err{i}\n" for i in range(300))


def test_exit_code_of_an_exec(sleeper, hijack, tools):
    api = sleeper.api
    exec_id = api.exec_create("box", ["sh", "-c", "echo bye; exit 7"])
    stream = hijack(sleeper, "/exec/start", {"container": "box", "exec": exec_id})
    assert tools.joined(tools.demux(stream.read_all()), 1) == b"bye\n"
    assert api.ok("GET", "/exitcode", {"container": "box", "exec": exec_id}) == 7
    assert api.ok("GET", "/exitcode", {"exec": exec_id}) == 7
    status, reply = api.call("POST", "/exec/start", {"container": "box", "exec": exec_id})
    assert status == 409 and "started already" in reply


def test_legacy_200_form_without_upgrade(sleeper, hijack, tools):
    exec_id = sleeper.api.exec_create("box", ["echo", "legacy"])
    stream = hijack(sleeper, "/exec/start", {"container": "box", "exec": exec_id}, upgrade=False)
    assert stream.status == 200 and "transfer-encoding" not in stream.headers
    assert tools.joined(tools.demux(stream.read_all()), 1) == b"legacy\n"


def test_stdin_sent_with_the_request_is_not_lost(sleeper, hijack, tools):
    """Bytes right behind the request land in the HTTP channel's buffer; they are replayed first."""
    exec_id = sleeper.api.exec_create("box", ["head", "-c", "40000"])
    early = bytes(range(256)) * 160  # 40 KiB: more than the channel's 16 KiB eager read
    stream = hijack(sleeper, "/exec/start", {"container": "box", "exec": exec_id}, early=early)
    assert tools.joined(tools.demux(stream.read_all()), 1) == early[:40000]


def test_errors_before_the_hijack_are_ordinary_replies(sleeper):
    api = sleeper.api
    status, reply = api.call("POST", "/exec/create", {"container": "nope", "command": '["ls"]'})
    assert status == 404 and "no such container" in reply
    status, reply = api.call("POST", "/exec/create", {"container": "box", "command": "ls"})
    assert status == 400 and "command" in reply
    status, reply = api.call("POST", "/exec/create", {"container": "box", "command": "[]"})
    assert status == 400
    status, reply = api.call("POST", "/exec/start", {"container": "box", "exec": "exec-nothere123"})
    assert status == 404 and "no such exec" in reply
    status, reply = api.call("GET", "/exitcode", {"container": "box", "exec": "exec-nothere123"})
    assert status == 404
    done = sleeper.api.run_pod("done", ["true"])
    assert api.ok("GET", "/exitcode", {"container": "done"}) == 0
    status, reply = api.call("POST", "/exec/create", {"container": "done", "command": '["ls"]'})
    assert status == 409 and "not running" in reply
    status, reply = api.call("POST", "/attach", {"container": "done"})
    assert status == 409
    assert done


def test_a_command_that_cannot_run_says_why_in_the_stream_and_exits_127(sleeper, hijack, tools):
    api = sleeper.api
    exec_id = api.exec_create("box", ["/no/such/program"])
    stream = hijack(sleeper, "/exec/start", {"container": "box", "exec": exec_id})
    frames = tools.demux(stream.read_all())
    assert b"no such file" in tools.joined(frames, 3).lower()
    assert api.ok("GET", "/exitcode", {"container": "box", "exec": exec_id}) == 127


def test_execvm_runs_in_the_vm_outside_the_containers(sleeper, hijack, tools):
    stream = hijack(sleeper, "/execvm", {"pod": "box-pod", "command": json.dumps(["ls", "/tmp/hyper"])})
    assert stream.status == 101
    exec_id = stream.headers["x-hyper-exec"]
    out = tools.joined(tools.demux(stream.read_all()), 1).decode()
    info = sleeper.api.ok("GET", "/container/info", {"container": "box"})
    assert info["container"]["containerID"] in out.split()
    assert sleeper.api.ok("GET", "/exitcode", {"container": "box-pod", "exec": exec_id}) == 0


def test_the_old_exec_route_runs_in_the_pods_first_container(sleeper, hijack, tools):
    stream = hijack(sleeper, "/exec", {"type": "pod", "value": "box-pod",
                                       "command": json.dumps(["cat", "/etc/hostname"])})
    assert tools.joined(tools.demux(stream.read_all()), 1) == b"box-pod\n"


def test_a_slow_reader_pauses_the_process_and_the_daemon_buffers_little(sleeper, hijack, tools):
    exec_id = sleeper.api.exec_create("box", ["dd", "if=/dev/zero", "bs=65536", "count=800"])  # 50 MiB
    before = tools.daemon_rss_kb(sleeper)
    stream = hijack(sleeper, "/exec/start", {"container": "box", "exec": exec_id})
    stream.sock.setsockopt(__import__("socket").SOL_SOCKET, __import__("socket").SO_RCVBUF, 65536)
    import time

    time.sleep(3)  # not reading: the process must be held back, not buffered in the daemon
    grown = tools.daemon_rss_kb(sleeper) - before
    assert grown < 16 * 1024, f"the daemon grew by {grown} kB while the client read nothing"
    data = stream.read_all(timeout=120)
    assert len(tools.joined(tools.demux(data), 1)) == 800 * 65536
    assert sleeper.api.ok("GET", "/exitcode", {"container": "box", "exec": exec_id}) == 0


def test_a_client_that_vanishes_leaves_the_container_running_and_the_daemon_clean(sleeper, hijack, tools):
    api = sleeper.api
    # one stream so the daemon's lazily opened fds (logs, sqlite) exist before counting
    first = api.exec_create("box", ["true"])
    hijack(sleeper, "/exec/start", {"container": "box", "exec": first}).read_all()
    fds = tools.daemon_fds(sleeper)
    for _ in range(3):
        exec_id = api.exec_create("box", ["sh", "-c", "cat; echo stdin closed"])
        stream = hijack(sleeper, "/exec/start", {"container": "box", "exec": exec_id})
        stream.send(b"some input\n")
        stream.read_until(b"some input\n")
        stream.close()  # gone without a word
        assert api.ok("GET", "/exitcode", {"container": "box", "exec": exec_id}) == 0  # its stdin was closed
        attached = hijack(sleeper, "/attach", {"container": "box"})
        attached.close()
    tools.wait_for(lambda: tools.daemon_fds(sleeper) <= fds, 10, "the daemon's fds back to where they were")
    assert api.container_status("box") == "running"
    exec_id = api.exec_create("box", ["echo", "still fine"])
    assert tools.joined(tools.demux(hijack(sleeper, "/exec/start", {"container": "box", "exec": exec_id})
                                    .read_all()), 1) == b"still fine\n"


def test_tty_resize_errors_and_a_resize_before_the_exec_runs(sleeper, hijack, tools):
    api = sleeper.api
    plain = api.exec_create("box", ["true"])
    status, reply = api.call("POST", "/tty/resize", {"container": "box", "exec": plain, "h": 10, "w": 20})
    assert status == 409 and "no terminal" in reply
    status, _ = api.call("POST", "/tty/resize", {"container": "box", "h": 10, "w": 20})
    assert status == 409  # the container has no tty
    status, _ = api.call("POST", "/tty/resize", {"container": "box", "exec": plain, "h": 0, "w": 20})
    assert status == 400
    status, _ = api.call("POST", "/tty/resize", {"container": "box", "exec": "exec-unknown0000", "h": 5, "w": 5})
    assert status == 404
    tty = api.exec_create("box", ["sh", "-c", "sleep 0.5; stty size"], tty=True)
    api.ok("POST", "/tty/resize", {"container": "box", "exec": tty, "h": 33, "w": 111})  # before it starts
    stream = hijack(sleeper, "/exec/start", {"container": "box", "exec": tty})
    assert stream.headers["content-type"] == "application/vnd.docker.raw-stream"
    assert b"33 111" in stream.read_all()


def test_execs_outlive_a_daemon_restart(sleeper, hijack, tools):
    api = sleeper.api
    done = api.exec_create("box", ["sh", "-c", "exit 3"])
    hijack(sleeper, "/exec/start", {"container": "box", "exec": done}).read_all()
    assert api.ok("GET", "/exitcode", {"exec": done}) == 3
    waiting = api.exec_create("box", ["echo", "started after the restart"])  # created, not started
    running = api.exec_create("box", ["sh", "-c", "echo ready; read line; echo got $line; exit 5"])
    stream = hijack(sleeper, "/exec/start", {"container": "box", "exec": running})
    stream.read_until(b"ready\n")  # running; its client stays connected and sends nothing: it waits on stdin
    sleeper.restart()  # the client's connection goes with the old daemon
    # The new daemon knows all three. The running one's input has ended (its client is gone): read gets EOF.
    assert api.ok("GET", "/exitcode", {"container": "box", "exec": running}) == 5
    assert api.ok("GET", "/exitcode", {"exec": done}) == 3
    out = hijack(sleeper, "/exec/start", {"container": "box", "exec": waiting}).read_all()
    assert tools.joined(tools.demux(out), 1) == b"started after the restart\n"
    # Removing the pod removes its execs.
    api.ok("DELETE", "/pod", {"podId": "box-pod"})
    status, reply = api.call("GET", "/exitcode", {"exec": done})
    assert status == 404 and "no such exec" in reply


def test_an_exec_whose_vm_is_killed_ends_with_137_instead_of_hanging(sleeper, hijack, tools):
    api = sleeper.api
    exec_id = api.exec_create("box", ["sh", "-c", "echo up; sleep 600"])
    hijack(sleeper, "/exec/start", {"container": "box", "exec": exec_id}).read_until(b"up\n")
    ((vm_id, _, _),) = api.listing("vm")
    api.ok("POST", "/vm/kill", {"vm": vm_id})
    assert api.ok("GET", "/exitcode", {"exec": exec_id}) == 137
