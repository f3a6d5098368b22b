"""A real ``twistd -n hyperd`` on a temp socket: start, answer, refuse a twin, survive a crash, stop."""

import json
import os
import signal
import socket
import stat

import pytest

from hyperd.state import StateStore


@pytest.mark.timeout(60)
def test_info_answers_with_and_without_a_version_prefix(hyperd):
    for target in ("/info", "/v1.17/info", "/v0.8.0/info"):
        status, headers, body = hyperd.request("GET", target)
        assert status == 200, body
        assert headers["content-type"] == "application/json"
        info = json.loads(body)
        assert info["ID"] == str(hyperd.proc.pid)
        assert info["DockerRootDir"] == hyperd.root
        assert info["ExecutionDriver"] == "qemu-tcg"
        assert info["Pods"] == 0 and info["Containers"] == 0 and info["Images"] == 1  # the built-in busybox
        with open("/proc/meminfo") as f:
            mem_kb = int(f.readline().split()[1])
        assert info["MemTotal"] == mem_kb * 1024
        assert info["Name"] == socket.gethostname()
        assert info["Operating System"]


@pytest.mark.timeout(60)
def test_ping_and_version(hyperd):
    assert hyperd.request("GET", "/_ping")[2] == b"OK"
    version = json.loads(hyperd.request("GET", "/v1.17/version")[2])
    assert version["ID"] == str(hyperd.proc.pid)
    from hyperd import API_VERSION, __version__

    assert version["Version"] == __version__ and version["ApiVersion"] == API_VERSION


@pytest.mark.timeout(60)
def test_socket_is_mode_0660_and_owned_by_us(hyperd):
    st = os.stat(hyperd.socket_path)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o660
    assert st.st_uid == os.getuid()


@pytest.mark.timeout(60)
def test_socket_group_is_configurable(hyperd_factory):
    import grp

    group = grp.getgrgid(100 if _has_gid(100) else os.getgid()).gr_name
    h = hyperd_factory(extra_args=["--socket-group", group]).start()
    assert os.stat(h.socket_path).st_gid == grp.getgrnam(group).gr_gid


def _has_gid(gid):
    import grp

    try:
        grp.getgrgid(gid)
        return True
    except KeyError:
        return False


@pytest.mark.timeout(60)
def test_sigterm_stops_cleanly_and_removes_the_socket(hyperd):
    # after a clean shutdown twistd re-raises the signal it got, as a well-behaved Unix daemon does
    assert hyperd.stop(signal.SIGTERM) in (0, -signal.SIGTERM)
    assert not os.path.exists(hyperd.socket_path)
    log = hyperd.log()
    assert "Main loop terminated" in log and "Server Shut Down" in log
    assert "Traceback" not in log


@pytest.mark.timeout(60)
def test_start_over_the_socket_of_a_crashed_daemon(hyperd):
    hyperd.kill()  # SIGKILL: socket and lock file stay, the lock's pid is dead
    assert os.path.exists(hyperd.socket_path)
    hyperd.start()
    assert hyperd.request("GET", "/_ping")[2] == b"OK"


@pytest.mark.timeout(60)
def test_start_over_a_stale_socket_without_a_lock(hyperd_factory):
    h = hyperd_factory()
    os.makedirs(h.dir, exist_ok=True)
    s = socket.socket(socket.AF_UNIX)
    s.bind(h.socket_path)  # bound, never listened, then abandoned: what a crashed Go hyperd leaves
    s.close()
    h.start()
    assert h.request("GET", "/_ping")[2] == b"OK"


@pytest.mark.timeout(60)
def test_a_second_daemon_on_the_same_socket_is_refused(hyperd, hyperd_factory):
    twin = hyperd_factory()
    twin.socket_path = hyperd.socket_path
    proc = twin.spawn()
    assert proc.wait(30) == 1
    log = twin.log()
    assert f"another hyperd (pid {hyperd.proc.pid}) is already serving {hyperd.socket_path}" in log
    assert "Traceback" not in log
    # the first one is unharmed
    assert hyperd.request("GET", "/_ping")[2] == b"OK"


@pytest.mark.timeout(60)
def test_state_written_before_a_restart_is_read_back_after_it(hyperd):
    # A created (pending) pod: start-up recovery leaves it as it is (a "running" one without a VM it would fail).
    assert hyperd.request("GET", "/list?item=pod")[0] == 200  # the listing waits for start-up to be over
    store = StateStore(os.path.join(hyperd.root, "state.db"))
    with store.transaction():
        store.put_pod("pod-aaaaaaaaaa", "web", {"id": "web"}, "pending")
        store.put_container("c" * 64, "pod-aaaaaaaaaa", "web-busybox-0", "busybox", "pending")
    store.close()

    def listing():
        out = {}
        for item, key in (("pod", "podData"), ("container", "cData"), ("vm", "vmData")):
            status, _, body = hyperd.request("GET", f"/list?item={item}")
            assert status == 200
            out[item] = json.loads(body)[key]
        return out

    before = listing()
    assert before == {
        "pod": ["pod-aaaaaaaaaa:web::pending"],
        "container": [f"{'c' * 64}:web-busybox-0:pod-aaaaaaaaaa:pending"],
        "vm": [],
    }
    hyperd.restart()
    assert listing() == before
    info = json.loads(hyperd.request("GET", "/info")[2])
    assert (info["Pods"], info["Containers"], info["VMs"]) == (1, 1, 0)


@pytest.mark.timeout(60)
def test_list_filters_by_pod_and_vm(hyperd):
    store = StateStore(os.path.join(hyperd.root, "state.db"))
    store.put_pod("pod-a", "a", {}, "running", vm_id="vm-a")
    store.put_pod("pod-b", "b", {}, "pending")
    store.put_container("ca", "pod-a", "a0", "busybox", "running")
    store.put_container("cb", "pod-b", "b0", "busybox", "pending")
    store.close()
    assert json.loads(hyperd.request("GET", "/list?item=pod&pod=pod-b")[2])["podData"] == ["pod-b:b::pending"]
    assert json.loads(hyperd.request("GET", "/list?item=container&vm=vm-a")[2])["cData"] == [
        "ca:a0:pod-a:running"]
    assert json.loads(hyperd.request("GET", "/list?item=container&pod=pod-b")[2])["cData"] == [
        "cb:b0:pod-b:pending"]


@pytest.mark.timeout(60)
def test_bad_config_value_is_a_startup_error_naming_the_key(hyperd_factory):
    h = hyperd_factory()
    with open(h.config, "w") as f:
        f.write("Root=/var/lib/hyper\nStorageDriver=devicemapper\n")
    assert h.spawn().wait(30) == 1
    assert "bad value for storagedriver" in h.log().lower()
    assert "devicemapper" in h.log()
    assert "Traceback" not in h.log()
    assert not os.path.exists(h.socket_path)


@pytest.mark.timeout(60)
def test_malformed_config_file_is_a_startup_error(hyperd_factory):
    h = hyperd_factory()
    with open(h.config, "w") as f:
        f.write("Kernel=/boot/x\nthis line has no equals sign\n")
    assert h.spawn().wait(30) == 1
    assert "malformed config file" in h.log()


@pytest.mark.timeout(60)
def test_unknown_config_keys_are_warned_about_not_fatal(hyperd_factory):
    h = hyperd_factory()
    with open(h.config, "w") as f:
        f.write("# hyperd config\nBridge=hyper9\nSomeFutureKey=1\nGDBTCPPort=1234\n[Log]\nPodLogPrefix=/x\n")
    h.start()
    assert "unknown key somefuturekey ignored" in h.log()
    assert "gdbtcpport is not used" in h.log()


@pytest.mark.timeout(60)
def test_command_line_wins_over_the_config_file(hyperd_factory):
    h = hyperd_factory()
    with open(h.config, "w") as f:
        f.write("Accel=kvm\n")
    h.start()  # the fixture passes --accel tcg
    assert json.loads(h.request("GET", "/info")[2])["ExecutionDriver"] == "qemu-tcg"


@pytest.mark.timeout(60)
def test_corrupt_state_database_is_a_startup_error_and_is_kept(hyperd_factory):
    h = hyperd_factory()
    os.makedirs(h.root)
    db = os.path.join(h.root, "state.db")
    with open(db, "wb") as f:
        f.write(b"this is not a database" * 500)
    assert h.spawn().wait(30) == 1
    assert f"state database {db}" in h.log()
    assert "Traceback" not in h.log()
    with open(db, "rb") as f:
        assert f.read(22) == b"this is not a database"


@pytest.mark.timeout(60)
def test_host_key_adds_a_tcp_listener(hyperd_factory):
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    h = hyperd_factory()
    with open(h.config, "w") as f:
        f.write(f"Host=tcp://127.0.0.1:{port}\n")
    h.start()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET /v1.17/_ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        reply = b""
        while chunk := s.recv(4096):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 200") and reply.endswith(b"OK")


@pytest.mark.timeout(60)
def test_a_second_daemonized_twistd_reports_the_refusal_to_its_caller(hyperd, hyperd_factory):
    import subprocess

    twin = hyperd_factory()
    argv = [a for a in twin.argv() if a not in ("-n", "--pidfile=")]
    argv[argv.index("--socket") + 1] = hyperd.socket_path
    argv[1:1] = [f"--pidfile={twin.dir}/twistd.pid", f"--logfile={twin.log_path}"]
    with open(twin.config, "w") as f:
        f.write("")
    out = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert out.returncode == 1
    assert "another hyperd" in out.stderr  # printed by twistd's waiting parent
    assert "hyperd cannot start: another hyperd" in twin.log()
    assert hyperd.request("GET", "/_ping")[2] == b"OK"
