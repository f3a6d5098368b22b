"""attach (several clients, tty detach, before start, after a daemon restart) and container logs."""

from __future__ import annotations

import socket
import time

import pytest

pytestmark = pytest.mark.timeout(180)

TICKER = ["sh", "-c", "i=0; while :; do echo tick$i; i=$((i+1)); sleep 0.2; done"]


def test_attach_shows_a_running_containers_output_to_several_clients(vm_daemon, hijack, tools):
    vm_daemon.api.run_pod("ticker", TICKER)
    first = hijack(vm_daemon, "/attach", {"container": "ticker"})
    second = hijack(vm_daemon, "/attach", {"container": "ticker"})
    assert first.status == second.status == 101
    assert first.headers["content-type"] == "application/vnd.docker.multiplexed-stream"
    for stream in (first, second):
        stream.read_until(b"\n", timeout=10)
        stream.read_until(b"tick", timeout=10)
    # both see the same ticks once both are subscribed
    first.read_until(b"tick9\n", timeout=20)
    second.read_until(b"tick9\n", timeout=20)
    one = tools.demux(first.buffer[:first.buffer.index(b"tick9\n") + 6])
    assert all(s == 1 for s, _ in one)
    first.close()
    second.read_until(b"tick12\n", timeout=20)  # the other client is unaffected
    assert vm_daemon.api.container_status("ticker") == "running"


def test_attach_sends_stdin_to_the_container(vm_daemon, hijack, tools):
    vm_daemon.api.run_pod("echoer", ["cat"])
    stream = hijack(vm_daemon, "/attach", {"container": "echoer"})
    stream.send(b"ping\n")
    stream.read_until(b"ping\n", timeout=20)
    assert tools.demux(stream.buffer) == [(1, b"ping\n")]


def test_tty_attach_is_raw_and_ctrl_p_ctrl_q_detaches_leaving_it_running(vm_daemon, hijack):
    vm_daemon.api.run_pod("shell", ["sh"], tty=True)
    stream = hijack(vm_daemon, "/attach", {"container": "shell"})
    assert stream.headers["content-type"] == "application/vnd.docker.raw-stream"
    stream.send(b"echo $((6*7))\r")
    stream.read_until(b"42", timeout=20)
    stream.send(b"\x10")  # ctrl-p alone is held back until we know what follows
    stream.send(b"\x11")
    stream.read_all(timeout=10)  # the daemon closed the stream
    assert vm_daemon.api.container_status("shell") == "running"
    again = hijack(vm_daemon, "/attach", {"container": "shell"})
    again.send(b"echo again$((1+1))\r")
    again.read_until(b"again2", timeout=20)


def test_attach_before_a_start_that_fails_ends_with_the_reason(vm_daemon, hijack, tools):
    api = vm_daemon.api
    spec = {"id": "doomed", "containers": [{"name": "doomed", "image": "busybox", "command": ["no-such-tool"]}]}
    pod_id = api.ok("POST", "/pod/create", body=spec)["ID"]
    stream = hijack(vm_daemon, "/attach", {"container": "doomed"})
    status, reply = api.call("POST", "/pod/start", {"podId": pod_id})
    assert status >= 400 and "no-such-tool" in reply
    frames = tools.demux(stream.read_all(timeout=30))  # the stream ends instead of waiting for the client
    assert b"did not start" in tools.joined(frames, 3) and b"no-such-tool" in tools.joined(frames, 3)


def test_attach_before_the_pod_starts_sees_everything_and_ends_at_exit(vm_daemon, hijack, tools):
    api = vm_daemon.api
    spec = {"id": "early", "containers": [{"name": "early", "image": "busybox",
                                           "command": ["sh", "-c", "echo first; echo second >&2"]}]}
    pod_id = api.ok("POST", "/pod/create", body=spec)["ID"]
    stream = hijack(vm_daemon, "/attach", {"container": "early"})
    api.ok("POST", "/pod/start", {"podId": pod_id})
    frames = tools.demux(stream.read_all(timeout=30))
    assert tools.joined(frames, 1) == b"first\n" and tools.joined(frames, 2) == b"second\n"
    assert api.ok("GET", "/exitcode", {"container": "early"}) == 0


def test_attach_keeps_working_after_a_daemon_restart(vm_daemon, hijack):
    vm_daemon.api.run_pod("survivor", TICKER)
    hijack(vm_daemon, "/attach", {"container": "survivor"}).read_until(b"tick1\n", timeout=20)
    vm_daemon.restart()
    stream = hijack(vm_daemon, "/attach", {"container": "survivor"})
    stream.read_until(b"tick", timeout=20)
    seen = stream.buffer.count(b"tick")
    stream.sock.settimeout(20)
    while stream.buffer.count(b"tick") <= seen:  # output that comes after the attach, not only the backlog
        data = stream.sock.recv(4096)
        assert data, "the stream ended"
        stream.buffer += data


def _logs(daemon, **params):
    params = {"container": params.pop("container"), **{k: str(v) for k, v in params.items()}}
    return daemon.api.call("GET", "/container/logs", params)


def test_logs_are_framed_filtered_tailed_and_timestamped(vm_daemon, tools):
    api = vm_daemon.api
    api.run_pod("chatty", ["sh", "-c", "for i in 1 2 3 4 5; do echo out$i; echo err$i >&2; done"])
    assert api.ok("GET", "/exitcode", {"container": "chatty"}) == 0
    status, headers, body = vm_daemon.request("GET", "/container/logs?container=chatty&stdout=1&stderr=1")
    assert status == 200 and headers["content-type"] == "application/vnd.docker.multiplexed-stream"
    frames = tools.demux(body)
    assert tools.joined(frames, 1) == b"".join(b"out%d\n" % i for i in range(1, 6))
    assert tools.joined(frames, 2) == b"".join(b"err%d\n" % i for i in range(1, 6))
    _, _, body = vm_daemon.request("GET", "/container/logs?container=chatty&stdout=1&stderr=0&tail=2")
    assert tools.demux(body) == [(1, b"out4\n"), (1, b"out5\n")]
    _, _, body = vm_daemon.request("GET", "/container/logs?container=chatty&stderr=1&stdout=0&timestamps=1"
                                          "&tail=1")
    ((stream, line),) = tools.demux(body)
    stamp, _, text = line.partition(b" ")
    assert stream == 2 and text == b"err5\n" and stamp.endswith(b"Z") and b"T" in stamp
    _, _, body = vm_daemon.request("GET", f"/container/logs?container=chatty&since={time.time() + 60}")
    assert body == b""
    status, _, _ = vm_daemon.request("GET", "/container/logs?container=nope")
    assert status == 404
    status, _, _ = vm_daemon.request("GET", "/container/logs?container=chatty&stdout=0&stderr=0")
    assert status == 400


def test_logs_follow_streams_until_the_container_exits(vm_daemon, tools):
    api = vm_daemon.api
    api.run_pod("slow", ["sh", "-c", "for i in 1 2 3 4 5 6; do echo line$i; sleep 0.5; done"])
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(30)
    s.connect(vm_daemon.socket_path)
    s.sendall(b"GET /container/logs?container=slow&follow=yes HTTP/1.1\r\nHost: h\r\n\r\n")
    data = b""
    started = time.monotonic()
    firsts = None
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
        if firsts is None and b"line1" in data:
            firsts = time.monotonic() - started
        if data.endswith(b"0\r\n\r\n"):
            break
    s.close()
    assert firsts is not None and firsts < 2.5, "the first line came while the container was running"
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"chunked" in head.lower()
    lines = tools.joined(tools.demux(tools.unchunk(body)), 1)
    assert lines == b"".join(b"line%d\n" % i for i in range(1, 7))
    assert api.ok("GET", "/exitcode", {"container": "slow"}) == 0


def test_detach_keys_split_across_reads_still_detach(vm_daemon, hijack):
    """ctrl-p in one read, ctrl-q in the next: the held-back ctrl-p must not end the client's stdin."""
    import time

    vm_daemon.api.run_pod("split", ["sh"], tty=True)
    stream = hijack(vm_daemon, "/attach", {"container": "split"})
    stream.send(b"echo $((3*5))\r")
    stream.read_until(b"15", timeout=20)
    stream.send(b"\x10")
    time.sleep(0.3)  # so the daemon reads ctrl-p on its own
    stream.send(b"\x11")
    stream.read_all(timeout=10)
    assert vm_daemon.api.container_status("split") == "running"
