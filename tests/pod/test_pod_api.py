"""Pods end to end on a real daemon: containers run in real VMs (TCG) from the built-in busybox image."""

import json
import os
import signal
import time

import pytest

from tests.support import wait_for

pytestmark = pytest.mark.timeout(180)


def run_pod(api, spec, **start):
    pod_id = api.ok("POST", "/pod/create", body=spec)["ID"]
    api.ok("POST", "/pod/start", {"podId": pod_id, **start})
    return pod_id


def test_seed_routes_run_echo_in_a_vm_and_it_succeeds(vm_daemon):
    api = vm_daemon.api
    args = json.dumps({"containers": [{"image": "busybox", "command": ["echo", "hello from a VM"]}]})
    reply = api.ok("POST", "/pod/create", {"podArgs": args})
    pod_id = reply["ID"]
    assert pod_id.startswith("pod-") and reply["Code"] == 0
    assert api.listing("pod") == [[pod_id, pod_id, "", "pending"]]
    api.ok("POST", "/pod/start", {"podId": pod_id, "vmId": ""})
    (container,) = api.listing("container")
    assert api.ok("GET", "/exitcode", {"container": container[0]}) == 0
    assert api.wait_pod(pod_id) == "succeeded"
    assert api.logs(pod_id) == "hello from a VM\n"
    assert api.listing("vm") == [], "a finished pod's VM is released"
    info = api.ok("GET", "/pod/info", {"podName": pod_id})
    assert info["status"]["phase"] == "Succeeded"
    assert info["status"]["containerStatus"][0]["terminated"]["exitCode"] == 0
    api.ok("POST", "/pod/remove", {"podId": pod_id})
    assert api.listing("pod") == [] and api.listing("container") == []


def test_a_failing_command_reports_its_exit_code_and_the_pod_fails(vm_daemon):
    api = vm_daemon.api
    pod_id = run_pod(api, {"id": "fails", "containers": [
        {"name": "bad", "image": "busybox", "command": ["sh", "-c", "echo oops >&2; exit 3"]}]})
    assert api.ok("GET", "/exitcode", {"container": "bad"}) == 3
    assert api.wait_pod(pod_id) == "failed"
    assert [c[1:] for c in api.listing("container")] == [["bad", "fails", "failed"]]
    assert "oops" in api.logs(pod_id)


def test_containers_of_a_pod_share_processes_and_a_volume(vm_daemon):
    api = vm_daemon.api
    spec = {"id": "share", "volumes": [{"name": "data"}], "containers": [
        {"name": "writer", "image": "busybox", "volumes": [{"volume": "data", "path": "/data"}],
         "command": ["sh", "-c", "echo shared > /data/f; exec sleep 30"]},
        {"name": "reader", "image": "busybox", "volumes": [{"volume": "data", "path": "/data"}],
         "command": ["sh", "-c",
                     "while [ ! -s /data/f ]; do sleep 0.1; done; cat /data/f; "
                     "while ! ps | grep -q '[s]leep 30'; do sleep 0.1; done; echo saw sleep"]},
    ]}
    run_pod(api, spec)
    assert api.ok("GET", "/exitcode", {"container": "reader"}) == 0
    logs = api.logs("share")
    assert "shared\n" in logs and "saw sleep\n" in logs
    api.ok("POST", "/pod/stop", {"podId": "share"})


def test_stop_with_stopvm_no_leaves_the_vm_idle_for_the_next_pod(vm_daemon, qemu_pids):
    api = vm_daemon.api
    first = run_pod(api, {"id": "first", "containers": [{"image": "busybox", "command": ["sleep", "60"]}]})
    ((vm_id, pod, status),) = api.listing("vm")
    assert (pod, status) == (first, "associated")
    (pid,) = qemu_pids(os.path.join(vm_daemon.run_dir, vm_id))
    reply = api.ok("POST", "/pod/stop", {"podId": first, "stopVM": "no"})
    assert reply["Code"] == 4
    assert api.listing("vm") == [[vm_id, "", "idle"]]
    assert api.pod_status(first) == "failed"
    started = time.monotonic()
    second = run_pod(api, {"id": "second", "containers": [
        {"image": "busybox", "command": ["sh", "-c", "echo warm; exec sleep 60"]}]}, vmId=vm_id)
    assert time.monotonic() - started < 2.0, "a warm start does not boot"
    wait_for(lambda: api.logs(second) == "warm\n", 5, "the second pod's output")
    assert qemu_pids(os.path.join(vm_daemon.run_dir, vm_id)) == [pid]
    assert api.listing("vm") == [[vm_id, second, "associated"]]


def test_a_running_pod_survives_a_daemon_restart_and_is_stoppable(vm_daemon, qemu_pids):
    api = vm_daemon.api
    pod_id = run_pod(api, {"id": "durable", "containers": [
        {"name": "ticker", "image": "busybox", "command": ["sh", "-c", "echo before; read x; echo after $x"]}]})
    wait_for(lambda: "before" in api.logs(pod_id), 10, "the first output")
    vm_daemon.restart()
    assert api.pod_status(pod_id) == "running"
    assert api.listing("vm")[0][1:] == [pod_id, "associated"]
    reply = api.ok("POST", "/pod/stop", {"podId": pod_id, "stopVm": "yes"})
    assert reply["Code"] == 2
    assert api.listing("vm") == [] and qemu_pids(vm_daemon.run_dir) == []
    assert api.ok("GET", "/exitcode", {"container": "ticker"}) in (143, 137)


def test_a_pod_whose_qemu_is_killed_fails_within_a_second_and_leaks_nothing(vm_daemon, qemu_pids):
    api = vm_daemon.api
    pod_id = run_pod(api, {"id": "victim", "containers": [{"image": "busybox", "command": ["sleep", "60"]}]})
    ((vm_id, _, _),) = api.listing("vm")
    vm_dir = os.path.join(vm_daemon.run_dir, vm_id)
    (pid,) = qemu_pids(vm_dir)
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    wait_for(lambda: api.pod_status(pod_id) == "failed", 1.0, "the pod to fail")
    assert time.monotonic() - killed < 1.0
    info = api.ok("GET", "/pod/info", {"podName": pod_id})
    assert vm_id in info["status"]["reason"] and "died" in info["status"]["reason"]
    wait_for(lambda: not os.path.exists(vm_dir), 1.0, "the VM directory to go")
    assert api.listing("vm") == [] and os.listdir(vm_daemon.run_dir) == []
    api.ok("DELETE", "/pod", {"podId": pod_id})
    assert api.listing("pod") == [] and api.listing("container") == []


def test_pause_and_unpause_a_pod(vm_daemon):
    api = vm_daemon.api
    pod_id = run_pod(api, {"id": "pausable", "containers": [{"image": "busybox", "command": ["sleep", "60"]}]})
    api.ok("POST", "/pod/pause", {"podId": pod_id})
    assert api.pod_status(pod_id) == "paused"
    api.ok("POST", "/pod/unpause", {"podId": pod_id})
    assert api.pod_status(pod_id) == "running"
    api.ok("POST", "/pod/kill", {"podName": pod_id, "signal": "KILL"})
    assert api.wait_pod(pod_id) == "failed"
    assert api.ok("GET", "/exitcode", {"container": "pausable-busybox-0"}) == 137


def test_containers_added_to_a_running_pod_start_without_a_reboot(vm_daemon):
    api = vm_daemon.api
    pod_id = run_pod(api, {"id": "grow", "containers": [{"image": "busybox", "command": ["sleep", "60"]}]})
    cid = api.ok("POST", "/container/create", {"podId": pod_id},
                 body={"name": "extra", "image": "busybox", "command": ["sh", "-c", "echo late >&2; exit 5"]})["ID"]
    assert len(cid) == 64
    assert api.ok("GET", "/container/info", {"container": "extra"})["status"]["phase"] == "pending"
    api.ok("POST", "/container/start", {"container": cid})
    assert api.ok("GET", "/exitcode", {"container": "extra"}) == 5
    api.ok("POST", "/container/rename", {"oldName": "extra", "newName": "renamed"})
    assert api.ok("GET", "/container/info", {"container": cid})["container"]["name"] == "renamed"
    api.ok("POST", "/container/remove", {"container": "renamed"})
    api.ok("POST", "/container/stop", {"container": "grow-busybox-0"})
    assert api.ok("GET", "/exitcode", {"container": "grow-busybox-0"}) in (143, 137)


def test_removing_a_running_pod_stops_it_first(vm_daemon, qemu_pids):
    api = vm_daemon.api
    pod_id = run_pod(api, {"id": "doomed", "containers": [{"image": "busybox", "command": ["sleep", "60"]}]})
    api.ok("DELETE", "/pod", {"podId": pod_id})
    assert api.listing("pod") == [] and api.listing("vm") == []
    assert qemu_pids(vm_daemon.run_dir) == [] and not os.path.exists(os.path.join(vm_daemon.root, "logs", pod_id))


@pytest.mark.parametrize("method, path, params, body, status, message", [
    ("POST", "/pod/create", {"podArgs": "{not json"}, None, 400, "podArgs"),
    ("POST", "/pod/create", None, {"id": "x", "containers": [{"name": "a"}]}, 400, "containers[0].image: required"),
    ("POST", "/pod/create", None, {"id": "x", "containers": [{"image": "nosuchimage"}]}, 404, "no such image"),
    ("POST", "/pod/create", None, {"id": "x", "resource": {"memory": 64}}, 400, "resource.mem"),
    ("POST", "/pod/start", {"podId": "nothere"}, None, 404, "no such pod"),
    ("POST", "/pod/stop", {"podId": "nothere"}, None, 404, "no such pod"),
    ("DELETE", "/pod", {"podId": "nothere"}, None, 404, "no such pod"),
    ("GET", "/pod/info", {"podName": "nothere"}, None, 404, "no such pod"),
    ("GET", "/exitcode", {"container": "nothere"}, None, 404, "no such container"),
    ("POST", "/pod/kill", {"podName": "x", "signal": "NOPE"}, None, 400, "signal"),
])
def test_bad_pod_requests_are_refused_and_nothing_is_created(vm_daemon, method, path, params, body, status, message):
    api = vm_daemon.api
    got, reply = api.call(method, path, params, body)
    assert got == status and message in reply, reply
    assert api.listing("pod") == [] and api.listing("container") == [] and api.listing("vm") == []


def test_duplicates_and_double_starts_are_conflicts(vm_daemon):
    api = vm_daemon.api
    spec = {"id": "dup", "containers": [{"name": "only", "image": "busybox", "command": ["sleep", "60"]}]}
    api.ok("POST", "/pod/create", body=spec)
    status, reply = api.call("POST", "/pod/create", body=spec)
    assert status == 409 and "dup" in reply
    status, reply = api.call("POST", "/pod/create", body={"id": "other", "containers": spec["containers"]})
    assert status == 409 and "only" in reply
    api.ok("POST", "/pod/start", {"podId": "dup"})
    status, reply = api.call("POST", "/pod/start", {"podId": "dup"})
    assert status == 409 and "running" in reply
    assert len(api.listing("vm")) == 1
    api.ok("POST", "/pod/stop", {"podId": "dup"})
    status, reply = api.call("POST", "/pod/stop", {"podId": "dup"})
    assert status == 409


def test_a_pod_whose_vm_cannot_boot_fails_with_the_console_tail(hyperd_factory, guest_files, make_api, qemu_pids):
    bad = os.path.join(os.path.dirname(guest_files.initrd), "broken-initrd")
    with open(bad, "wb") as f:
        f.write(b"garbage" * 1000)
    try:
        h = hyperd_factory(extra_args=["--kernel", guest_files.kernel, "--initrd", bad]).start()
        api = make_api(h)
        pod_id = api.ok("POST", "/pod/create", body={"id": "noboot", "containers": [{"image": "busybox"}]})["ID"]
        status, reply = api.call("POST", "/pod/start", {"podId": pod_id})
        assert status == 500 and "did not boot" in reply
        assert api.pod_status(pod_id) == "failed"
        assert "did not boot" in api.ok("GET", "/pod/info", {"podName": pod_id})["status"]["reason"]
        assert api.listing("vm") == [] and os.listdir(h.run_dir) == [] and qemu_pids(h.run_dir) == []
    finally:
        os.unlink(bad)


def test_concurrent_start_and_remove_of_one_pod_are_serialized(vm_daemon, qemu_pids):
    import threading

    api = vm_daemon.api
    api.ok("POST", "/pod/create", body={"id": "race", "containers": [{"image": "busybox", "command": ["sleep", "60"]}]})
    results = {}

    def call(name, method, path):
        results[name] = api.call(method, path, {"podId": "race"})

    t1 = threading.Thread(target=call, args=("start", "POST", "/pod/start"))
    t1.start()
    time.sleep(0.2)  # the start is booting its VM
    call("remove", "DELETE", "/pod")
    t1.join()
    assert results["start"][0] == 200 and results["remove"][0] == 200, results
    assert api.listing("pod") == [] and api.listing("vm") == [] and qemu_pids(vm_daemon.run_dir) == []


def test_a_host_directory_volume_is_shared_and_never_deleted_with_the_vm(vm_daemon, tmp_path):
    api = vm_daemon.api
    host = tmp_path / "data"
    host.mkdir()
    (host / "in.txt").write_text("from the host\n")
    spec = {"id": "vfs", "volumes": [{"name": "data", "source": str(host), "format": "vfs"}],
            "containers": [{"name": "user", "image": "busybox", "volumes": [{"volume": "data", "path": "/data"}],
                            "command": ["sh", "-c", "cat /data/in.txt; echo from the pod > /data/out.txt"]}]}
    pod_id = run_pod(api, spec)
    assert api.ok("GET", "/exitcode", {"container": "user"}) == 0
    assert api.wait_pod(pod_id) == "succeeded"
    assert api.logs(pod_id) == "from the host\n"
    assert (host / "out.txt").read_text() == "from the pod\n"
    assert sorted(p.name for p in host.iterdir()) == ["in.txt", "out.txt"], "the VM's cleanup left it alone"
    with open("/proc/self/mountinfo") as f:
        assert vm_daemon.run_dir not in f.read()


@pytest.mark.parametrize("volume, message", [
    ({"name": "d", "source": "/nonexistent/dir", "format": "vfs"}, "volumes[0].source"),
    ({"name": "d", "source": "/tmp/x.img", "format": "qcow2"}, "volumes[0].format"),
])
def test_unsupported_volumes_are_refused_at_create(vm_daemon, volume, message):
    status, reply = vm_daemon.api.call("POST", "/pod/create", body={"id": "v", "volumes": [volume]})
    assert status == 400 and message in reply


def test_a_vm_still_booting_when_the_daemon_dies_is_killed_by_the_next_daemon(vm_daemon, qemu_pids):
    api = vm_daemon.api
    vm_id = api.ok("POST", "/vm/create", {"async": "yes"})["ID"]
    wait_for(lambda: qemu_pids(vm_daemon.run_dir), 10, "its qemu to be spawned")
    vm_daemon.kill()  # before READY: the VM's pid is not recorded yet
    assert qemu_pids(vm_daemon.run_dir), "qemu outlives the daemon by design"
    vm_daemon.start()
    wait_for(lambda: not qemu_pids(vm_daemon.run_dir), 5, "the stray qemu to be killed")
    assert api.listing("vm") == []
    assert not os.path.exists(os.path.join(vm_daemon.run_dir, vm_id))
    assert "no VM accounts for; killed" in vm_daemon.log()
