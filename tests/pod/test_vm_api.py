"""The seed VM routes on a real daemon booting real VMs under TCG: create, list, kill, death, restart."""

import os
import signal
import time

import pytest

from tests.support import wait_for

pytestmark = pytest.mark.timeout(120)


def test_create_list_and_kill_a_vm(vm_daemon, qemu_pids):
    api = vm_daemon.api
    reply = api.ok("POST", "/vm/create", {"cpu": 1, "mem": 128})
    vm_id = reply["ID"]
    assert vm_id.startswith("vm-") and len(vm_id) == 13 and reply["Code"] == 0 and reply["Cause"] == ""
    assert api.listing("vm") == [[vm_id, "", "idle"]]
    vm_dir = os.path.join(vm_daemon.run_dir, vm_id)
    assert os.path.isdir(vm_dir) and len(qemu_pids(vm_dir)) == 1
    assert api.ok("GET", "/info")["VMs"] == 1
    assert api.ok("POST", "/vm/kill", {"vm": vm_id})["ID"] == vm_id
    assert api.listing("vm") == []
    assert not os.path.exists(vm_dir) and qemu_pids(vm_dir) == []


def test_delete_vm_route_and_async_create(vm_daemon):
    api = vm_daemon.api
    vm_id = api.ok("POST", "/v1.17/vm/create", {"async": "yes"})["ID"]
    assert api.listing("vm") == [[vm_id, "", "booting"]]
    wait_for(lambda: api.listing("vm") == [[vm_id, "", "idle"]], 30, "the async VM to be idle")
    api.ok("DELETE", "/vm", {"vm": vm_id})
    assert api.listing("vm") == []


def test_a_vm_killed_behind_the_daemons_back_is_noticed_within_a_second(vm_daemon, qemu_pids):
    api = vm_daemon.api
    vm_id = api.ok("POST", "/vm/create")["ID"]
    vm_dir = os.path.join(vm_daemon.run_dir, vm_id)
    (pid,) = qemu_pids(vm_dir)
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    wait_for(lambda: api.listing("vm") == [], 1.0, "the dead VM to leave /list")
    assert time.monotonic() - killed < 1.0
    wait_for(lambda: not os.path.exists(vm_dir), 1.0, "the dead VM's directory to go")
    assert "died" in vm_daemon.log()


def test_vms_outlive_a_daemon_restart_and_are_killed_afterwards(vm_daemon, qemu_pids):
    api = vm_daemon.api
    vm_id = api.ok("POST", "/vm/create")["ID"]
    vm_dir = os.path.join(vm_daemon.run_dir, vm_id)
    (pid,) = qemu_pids(vm_dir)
    vm_daemon.restart()
    assert qemu_pids(vm_dir) == [pid], "the VM kept running across the restart"
    assert api.listing("vm") == [[vm_id, "", "idle"]]
    api.ok("POST", "/vm/kill", {"vm": vm_id})
    assert api.listing("vm") == [] and qemu_pids(vm_dir) == []


def test_a_vm_that_died_while_the_daemon_was_down_is_cleaned_up(vm_daemon, qemu_pids):
    api = vm_daemon.api
    vm_id = api.ok("POST", "/vm/create")["ID"]
    vm_dir = os.path.join(vm_daemon.run_dir, vm_id)
    (pid,) = qemu_pids(vm_dir)
    vm_daemon.stop()
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not qemu_pids(vm_dir), 5, "qemu to die")
    vm_daemon.start()
    assert api.listing("vm") == []
    assert not os.path.exists(vm_dir)


@pytest.mark.parametrize("params, message", [
    ({"cpu": "two"}, "cpu"),
    ({"cpu": 0}, "cpu must be between 1 and"),
    ({"cpu": 4096}, "cpu must be between 1 and"),
    ({"mem": 64}, "mem must be between 128 and"),
    ({"mem": 10 ** 9}, "mem must be between 128 and"),
    ({"mem": "lots"}, "mem"),
])
def test_bad_vm_parameters_are_refused_naming_the_parameter(vm_daemon, params, message):
    status, reply = vm_daemon.api.call("POST", "/vm/create", params)
    assert status == 400 and message in reply
    assert vm_daemon.api.listing("vm") == []


def test_killing_an_unknown_vm_is_404(vm_daemon):
    status, reply = vm_daemon.api.call("POST", "/vm/kill", {"vm": "vm-nothere000"})
    assert status == 404 and "vm-nothere000" in reply


def test_a_vm_that_cannot_boot_reports_its_console_and_leaves_nothing(hyperd_factory, guest_files, qemu_pids, make_api):
    bad = os.path.join(os.path.dirname(guest_files.initrd), "not-an-initrd")
    with open(bad, "wb") as f:
        f.write(b"this is not a cpio archive\n" * 100)
    try:
        h = hyperd_factory(extra_args=["--kernel", guest_files.kernel, "--initrd", bad]).start()
        api = make_api(h)
        status, reply = api.call("POST", "/vm/create")
        assert status == 500 and "did not boot" in reply
        assert "Kernel panic" in reply or "VFS" in reply or "initramfs" in reply.lower(), reply
        assert api.listing("vm") == []
        assert os.listdir(h.run_dir) == [] and qemu_pids(h.run_dir) == []
    finally:
        os.unlink(bad)
