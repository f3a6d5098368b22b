"""hyperctl's pod commands as a user runs them: a real hyperctl process against a real daemon and real VMs."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(180)

HYPERCTL = os.path.join(os.path.dirname(sys.executable), "hyperctl")


def hyperctl(daemon, *args, timeout: float = 90):
    return subprocess.run([HYPERCTL, "-H", f"unix://{daemon.socket_path}", *args], capture_output=True,
                          stdin=subprocess.DEVNULL, timeout=timeout)


def test_run_prints_the_output_and_exits_with_the_containers_code(vm_daemon):
    r = hyperctl(vm_daemon, "run", "--name", "hello", "busybox", "echo", "hello from a VM")
    assert r.returncode == 0, r.stderr
    out = r.stdout.decode()
    assert "POD id is hello\n" in out and "Time to run a POD is " in out and "hello from a VM\n" in out
    r = hyperctl(vm_daemon, "run", "--rm", "--name", "seven", "busybox", "sh", "-c", "echo err >&2; exit 7")
    assert r.returncode == 7 and r.stderr == b"err\n", "the container's stderr is hyperctl's"
    listed = hyperctl(vm_daemon, "list").stdout.decode()
    assert "hello" in listed and "seven" not in listed, "--rm removed the pod"


def test_create_start_stop_rm_with_a_yaml_pod_file(vm_daemon, tmp_path):
    podfile = tmp_path / "pod.yaml"
    podfile.write_text("id: yamlpod\ncontainers:\n  - name: sleeper\n    image: busybox\n"
                       "    command: [sleep, '60']\n")
    r = hyperctl(vm_daemon, "create", "-y", "-p", str(podfile))
    assert r.returncode == 0 and r.stdout.decode() == "Pod ID is yamlpod\n", r.stderr
    assert hyperctl(vm_daemon, "start", "yamlpod").stdout.decode() == "Successfully started the Pod(yamlpod)\n"
    listed = hyperctl(vm_daemon, "list").stdout.decode().splitlines()
    assert listed[0].split() == ["POD", "ID", "POD", "Name", "VM", "name", "Status"]
    assert listed[1].split()[0] == "yamlpod" and listed[1].split()[-1] == "running"
    r = hyperctl(vm_daemon, "pause", "yamlpod")
    assert r.returncode == 0 and "paused" in hyperctl(vm_daemon, "list").stdout.decode()
    assert hyperctl(vm_daemon, "unpause", "yamlpod").returncode == 0
    r = hyperctl(vm_daemon, "kill", "-s", "TERM", "sleeper")
    assert r.returncode == 0, r.stderr
    code = json.loads(vm_daemon.request("GET", "/exitcode?container=sleeper")[2])
    assert code == 143
    r = hyperctl(vm_daemon, "rm", "yamlpod", "nosuchpod")
    assert r.returncode == 1 and r.stdout.decode() == "Pod(yamlpod) is successfully deleted!\n"
    assert b"hyperctl ERROR: no such pod: nosuchpod" in r.stderr


def test_stop_shuts_the_pod_down(vm_daemon):
    assert hyperctl(vm_daemon, "run", "-d", "--name", "bg", "busybox", "sleep", "60").returncode == 0
    r = hyperctl(vm_daemon, "stop", "bg")
    assert r.returncode == 0 and r.stdout.decode() == "Successfully shutdown the POD: bg!\n"
    assert hyperctl(vm_daemon, "list", "vm").stdout.decode().count("\n") == 1, "only the header is left"


def test_an_unknown_image_is_an_error_naming_it(vm_daemon):
    r = hyperctl(vm_daemon, "create", "127.0.0.1:1/nothere")
    assert r.returncode == 1 and b"hyperctl ERROR:" in r.stderr and b"127.0.0.1:1" in r.stderr
