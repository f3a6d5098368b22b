"""VmFactoryPolicy on a real daemon: idle VMs booted ahead, taken by pods of their shape, replaced, and
taken back after a daemon restart."""

import pytest

from hyperd.config import CacheSpec, ConfigError, parse_policy, read_config_file
from tests.support import Api, wait_for

POLICY = '{"cache": 1, "cpu": 1, "memory": 128}'


def idle_vms(api: Api) -> set[str]:
    return {vm for vm, pod, status in api.listing("vm") if status == "idle" and not pod}


def start_sleeper(api: Api) -> str:
    spec = {"containers": [{"image": "busybox", "command": ["sleep", "60"]}]}
    pod_id = api.ok("POST", "/pod/create", body=spec)["ID"]
    api.ok("POST", "/pod/start", {"podId": pod_id})
    return pod_id


def pod_vm(api: Api, pod_id: str) -> str:
    return {p[0]: p[2] for p in api.listing("pod")}[pod_id]


@pytest.fixture
def factory_daemon(hyperd_factory, guest_files):
    h = hyperd_factory(extra_args=["--kernel", guest_files.kernel, "--initrd", guest_files.initrd])
    with open(h.config, "w") as f:
        f.write(f"VmFactoryPolicy={POLICY}\n")
    h.start()
    h.api = Api(h)
    return h


@pytest.mark.timeout(240)
def test_a_pod_of_the_policy_shape_starts_in_a_vm_booted_ahead_which_is_then_replaced(factory_daemon, qemu_pids):
    api = factory_daemon.api
    (vm_id,) = wait_for(lambda: idle_vms(api), 30, "the factory's VM to boot")
    pod_id = start_sleeper(api)
    assert pod_vm(api, pod_id) == vm_id, "the pod took the VM booted ahead"
    replacement = wait_for(lambda: idle_vms(api), 30, "a replacement VM")
    assert vm_id not in replacement and len(replacement) == 1

    # A pod of another shape boots its own VM and leaves the factory's alone.
    big = api.ok("POST", "/pod/create", body={"resource": {"memory": 192},
                                              "containers": [{"image": "busybox", "command": ["true"]}]})["ID"]
    api.ok("POST", "/pod/start", {"podId": big})
    assert api.wait_pod(big) == "succeeded"
    assert idle_vms(api) == replacement

    # Killing the factory's VM gets it replaced too; the daemon stops it all on the way out.
    (spare,) = replacement
    api.ok("POST", "/vm/kill", {"vm": spare})
    wait_for(lambda: idle_vms(api) - {spare}, 30, "a VM replacing the killed one")
    assert api.ok("POST", "/pod/stop", {"podId": pod_id, "stopVm": "yes"})["Code"] == 2


@pytest.mark.timeout(240)
def test_the_vm_booted_ahead_is_taken_back_after_a_restart_and_used(factory_daemon):
    api = factory_daemon.api
    (vm_id,) = wait_for(lambda: idle_vms(api), 30, "the factory's VM to boot")
    factory_daemon.restart()
    assert idle_vms(api) == {vm_id}, "the same VM, still idle: no second one was booted"
    pod_id = start_sleeper(api)
    assert pod_vm(api, pod_id) == vm_id


@pytest.mark.timeout(240)
def test_a_vm_booted_ahead_for_a_policy_since_dropped_is_stopped(factory_daemon, qemu_pids):
    api = factory_daemon.api
    (vm_id,) = wait_for(lambda: idle_vms(api), 30, "the factory's VM to boot")
    factory_daemon.stop()
    with open(factory_daemon.config, "w") as f:
        f.write("VmFactoryPolicy=none\n")
    factory_daemon.start()
    assert api.listing("vm") == []
    assert qemu_pids(factory_daemon.run_dir) == []


def test_policy_parsing_follows_hyperd_and_names_what_is_wrong(tmp_path):
    specs, warnings = parse_policy('{"cache":2,"cpu":1,"memory":128},{"Cache":1,"CPU":2,"memory":256}')
    assert specs == (CacheSpec(2, 1, 128), CacheSpec(1, 2, 256)) and warnings == ()
    assert parse_policy("none") == ((), ())
    assert parse_policy('{"cache":1},{"cache":2}')[0] == (CacheSpec(3, 1, 128),), "same shape: they add up"
    specs, warnings = parse_policy('{"cache":1,"template":true,"color":"red"}')
    assert specs == (CacheSpec(1, 1, 128),)
    assert any("template VMs are not supported" in w for w in warnings)
    assert any("unknown key 'color'" in w for w in warnings)
    for text, message in (("cache:2", "not a comma-separated list of JSON objects"),
                          ("[1]", "entry 1 is not a JSON object"),
                          ('{"cache":-1}', "entry 1: cache must be between 0 and 64, not -1"),
                          ('{"cache":1,"cpu":"two"}', "entry 1: cpu must be a whole number, not 'two'"),
                          ('{"cache":1},{"cache":1,"memory":8}', "entry 2: memory must be at least 64, not 8")):
        with pytest.raises(ValueError, match=message):
            parse_policy(text)
    config = tmp_path / "config"
    config.write_text("VmFactoryPolicy=cache:2\n")
    with pytest.raises(ConfigError, match="bad value for vmfactorypolicy"):
        read_config_file(str(config))
