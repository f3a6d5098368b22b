"""Network commands against the real guest: qemu user-mode networking, a host HTTP server reached from a container."""

import pytest

from hyperd.agent import codec
from tests.support import host_http_server


@pytest.fixture
def http_server():
    with host_http_server(lambda path: b"hello from the host\n") as port:
        yield port


def run_in_vm(vm, pid, script, seq):
    vm.ok(codec.EXECCMD, {"container": "hyperstart", "process": {
        "id": pid, "args": ["sh", "-c", script], "stdio": seq, "stderr": 0}})
    event = vm.wait_event("hyperstart", pid)
    return event["status"], vm.wait_eof(seq)


@pytest.mark.timeout(120)
def test_setupinterface_and_route_reach_the_host(boot_vm, http_server):
    vm = boot_vm(nic=True)
    vm.wait_ready()
    vm.ok(codec.STARTPOD, {"hostname": "netpod"})
    vm.ok(codec.SETUPINTERFACE, {"device": "eth0", "newDeviceName": "eth0", "mtu": 1500,
                                 "ipAddresses": [{"ipAddress": "10.0.2.15", "netMask": "255.255.255.0"}]})
    vm.ok(codec.SETUPROUTE, {"routes": [{"dest": "0.0.0.0/0", "gateway": "10.0.2.2", "device": "eth0"}]})
    status, out = run_in_vm(vm, "show", "ip -4 addr show eth0; ip route; ip link show lo", 1)
    assert status == 0
    assert b"10.0.2.15/24" in out
    assert b"default via 10.0.2.2 dev eth0" in out
    assert b"UP" in out.split(b"lo:")[1]
    status, out = run_in_vm(vm, "get", "wget -q -O - http://10.0.2.2:%d/" % http_server, 3)
    assert (status, out) == (0, b"hello from the host\n")
    reply, message = vm.command(codec.SETUPINTERFACE, {"device": "eth9", "ipAddresses": []})
    assert reply == codec.ERROR and b"eth9" in message
    reply, message = vm.command(codec.SETUPROUTE, {"routes": [{"dest": "10.9.0.0/16", "gateway": "192.0.2.1"}]})
    assert reply == codec.ERROR and message.startswith(b"ip route")
    vm.ok(codec.DELETEINTERFACE, {"device": "eth0"})
    status, out = run_in_vm(vm, "after", "ip -4 addr show eth0", 5)
    assert b"10.0.2.15" not in out
