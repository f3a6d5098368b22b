"""User-mode networking on a real daemon and real VMs: a busybox httpd pod reached through its port mapping on
127.0.0.1, a host port in use refused with 409, mappings added to and deleted from a running pod, the guest's
address, routes, /etc/hosts and resolv.conf, and the mappings released on stop for the next pod."""

import contextlib
import socket

import pytest

from tests.network.conftest import free_port, http_get, run_in_pod
from tests.support import host_http_server


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        return False
    except OSError:
        return True


@pytest.mark.timeout(240)
def test_httpd_pod_through_its_port_mapping(vm_daemon):
    api = vm_daemon.api
    port = free_port()
    pod = api.httpd_pod("web", [{"containerPort": "80", "hostPort": str(port)}])
    api.ok("POST", "/pod/start", {"podId": pod})
    assert http_get("127.0.0.1", port, "/index.html") == b"hello from web\n"
    assert api.mappings(pod) == [{"containerPort": "80", "hostPort": str(port), "protocol": "tcp"}]
    info = api.ok("GET", "/pod/info", {"podName": pod})
    assert info["status"]["podIP"] == ["10.0.2.15"]

    # the same host port for a second pod: 409 naming the port, and no VM booted for it
    other = api.httpd_pod("web2", [{"containerPort": "80", "hostPort": str(port)}])
    status, reply = api.call("POST", "/pod/start", {"podId": other})
    assert status == 409 and f"tcp/{port}" in str(reply), (status, reply)
    assert [v for v in api.ok("GET", "/list", {"item": "vm"})["vmData"]] and \
        len(api.ok("GET", "/list", {"item": "vm"})["vmData"]) == 1

    # stopped: the port is free again and the second pod gets it
    api.ok("POST", "/pod/stop", {"podId": pod})
    assert _refused(port)
    api.ok("POST", "/pod/start", {"podId": other})
    assert http_get("127.0.0.1", port, "/index.html") == b"hello from web2\n"
    api.ok("DELETE", "/pod", {"podId": other})
    api.ok("DELETE", "/pod", {"podId": pod})
    assert _refused(port)


@pytest.mark.timeout(240)
def test_host_port_used_by_another_program_is_409(vm_daemon):
    api = vm_daemon.api
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        pod = api.httpd_pod("busy", [{"containerPort": "80", "hostPort": str(port)}])
        status, reply = api.call("POST", "/pod/start", {"podId": pod})
        assert status == 409, (status, reply)
        assert f"tcp/{port}" in str(reply) and "in use" in str(reply)
        assert api.ok("GET", "/list", {"item": "vm"})["vmData"] == []
    # bad input: 400
    for bad in ([{"containerPort": "0"}], [{"containerPort": "80", "protocol": "sctp"}],
                [{"containerPort": "80-81", "hostPort": "8080"}], {"containerPort": "80"}):
        status, reply = api.call("PUT", f"/pod/{pod}/portmappings/add", body=bad)
        assert status == 400, (bad, status, reply)
    status, reply = api.call("PUT", f"/pod/{pod}/portmappings/replace", body=[])
    assert status == 400
    assert api.call("GET", "/pod/nosuchpod/portmappings")[0] == 404


@pytest.mark.timeout(300)
def test_portmappings_added_and_deleted_on_a_running_pod(vm_daemon):
    api = vm_daemon.api
    first, second = free_port(), free_port()
    pod = api.httpd_pod("live", [{"containerPort": "80", "hostPort": str(first)}],
                        dns=[], dnsSearch=["example.test"])
    api.ok("POST", "/pod/start", {"podId": pod})
    assert http_get("127.0.0.1", first) == b"hello from live\n"

    api.ok("PUT", f"/pod/{pod}/portmappings/add", body=[{"containerPort": "80", "hostPort": str(second)},
                                                         {"containerPort": "81"}])
    assert http_get("127.0.0.1", second) == b"hello from live\n"
    mappings = api.mappings(pod)
    assert mappings[:2] == [{"containerPort": "80", "hostPort": str(first), "protocol": "tcp"},
                            {"containerPort": "80", "hostPort": str(second), "protocol": "tcp"}]
    assert mappings[2]["containerPort"] == "81" and 1025 <= int(mappings[2]["hostPort"]) <= 65535
    # adding a port it maps already: 409
    status, reply = api.call("PUT", f"/pod/{pod}/portmappings/add",
                             body=[{"containerPort": "80", "hostPort": str(second)}])
    assert status == 409 and f"tcp/{second}" in str(reply)

    api.ok("PUT", f"/pod/{pod}/portmappings/delete", body=[{"containerPort": "80", "hostPort": str(first)}])
    assert _refused(first)
    assert http_get("127.0.0.1", second) == b"hello from live\n"
    status, _ = api.call("PUT", f"/pod/{pod}/portmappings/delete", body=[{"containerPort": "99"}])
    assert status == 404
    assert [m["hostPort"] for m in api.mappings(pod)] == [str(second), mappings[2]["hostPort"]]

    # inside: the address, the default route, /etc/hosts with the pod's address, the host's resolv.conf
    # (with dnsSearch from the pod)
    exec_out = run_in_pod(vm_daemon, pod, "ip -4 addr show eth0; ip route; cat /etc/hosts /etc/resolv.conf")
    assert "10.0.2.15/24" in exec_out and "default via 10.0.2.2" in exec_out
    assert "10.0.2.15\tlive" in exec_out
    assert "search example.test" in exec_out and "nameserver " in exec_out

    # stopped with the VM kept idle: the mappings and the guest address go; the next pod in that VM works
    vm = api.ok("GET", "/pod/info", {"podName": pod})["vm"]
    api.ok("POST", "/pod/stop", {"podId": pod, "stopVm": "no"})
    assert _refused(second)
    nxt = api.httpd_pod("warm", [{"containerPort": "80", "hostPort": str(first)}])
    api.ok("POST", "/pod/start", {"podId": nxt, "vmId": vm})
    assert http_get("127.0.0.1", first) == b"hello from warm\n"
    assert _refused(second)
    api.ok("DELETE", "/pod", {"podId": nxt})
    api.ok("DELETE", "/pod", {"podId": pod})


@pytest.mark.timeout(300)
def test_port_mappings_survive_a_daemon_restart(vm_daemon):
    api = vm_daemon.api
    first, second = free_port(), free_port()
    pod = api.httpd_pod("keep", [{"containerPort": "80", "hostPort": str(first)},
                                 {"containerPort": "80", "hostPort": str(second)}])
    api.ok("POST", "/pod/start", {"podId": pod})
    assert http_get("127.0.0.1", first) == b"hello from keep\n"

    vm_daemon.restart()
    # the forwards live in qemu, which kept running; the new daemon knows them and still holds the ports
    assert http_get("127.0.0.1", first) == b"hello from keep\n"
    assert [m["hostPort"] for m in api.mappings(pod)] == [str(first), str(second)]
    assert api.ok("GET", "/pod/info", {"podName": pod})["status"]["podIP"] == ["10.0.2.15"]
    other = api.httpd_pod("other", [{"containerPort": "80", "hostPort": str(second)}])
    status, reply = api.call("POST", "/pod/start", {"podId": other})
    assert status == 409 and f"already mapped by pod {pod}" in str(reply), (status, reply)
    # and can change them (QMP is reconnected)
    api.ok("PUT", f"/pod/{pod}/portmappings/delete", body=[{"containerPort": "80", "hostPort": str(second)}])
    assert _refused(second)
    api.ok("POST", "/pod/start", {"podId": other})
    assert http_get("127.0.0.1", second) == b"hello from other\n"
    api.ok("DELETE", "/pod", {"podId": pod})
    api.ok("DELETE", "/pod", {"podId": other})
    assert _refused(first) and _refused(second)


@pytest.mark.timeout(300)
def test_ports_released_when_the_pod_finishes_or_its_vm_is_killed(vm_daemon):
    import time

    api = vm_daemon.api
    port = free_port()
    spec = {"id": "short", "portmappings": [{"containerPort": "80", "hostPort": str(port)}],
            "containers": [{"image": "busybox", "command": ["sleep", "1"]}]}
    pod = api.ok("POST", "/pod/create", body=spec)["ID"]
    api.ok("POST", "/pod/start", {"podId": pod})
    assert api.ok("GET", "/exitcode", {"container": "short-busybox-0"}) == 0
    deadline = time.monotonic() + 30
    while api.pod_status(pod) != "succeeded":
        assert time.monotonic() < deadline
        time.sleep(0.1)

    # the port went with it: a second pod takes it, then loses its VM
    web = api.httpd_pod("killed", [{"containerPort": "80", "hostPort": str(port)}])
    api.ok("POST", "/pod/start", {"podId": web})
    assert http_get("127.0.0.1", port) == b"hello from killed\n"
    vm = api.ok("GET", "/pod/info", {"podName": web})["vm"]
    api.ok("DELETE", "/vm", {"vm": vm})
    assert api.pod_status(web) == "failed"
    assert _refused(port)
    assert api.ok("GET", "/pod/info", {"podName": web})["status"]["podIP"] == []
    again = api.httpd_pod("again", [{"containerPort": "80", "hostPort": str(port)}])
    api.ok("POST", "/pod/start", {"podId": again})
    assert http_get("127.0.0.1", port) == b"hello from again\n"
    for p in (pod, web, again):
        api.ok("DELETE", "/pod", {"podId": p})


@pytest.mark.timeout(60)
def test_white_lists_that_would_keep_someone_out_are_refused_not_ignored(vm_daemon):
    api = vm_daemon.api

    def create(lists):
        return api.call("POST", "/pod/create", body={"containers": [{"image": "busybox"}],
                                                     "portmappingWhiteLists": lists})

    status, reply = create({"externalNetworks": ["10.0.0.0/8"]})
    assert status == 400 and "cannot limit which networks reach a pod's port mappings" in reply
    assert api.listing("pod") == []
    # Open to all: nothing to enforce. And in user mode nothing reaches a pod's address directly, so any
    # internal list holds already.
    assert create({"internalNetworks": ["10.1.0.0/16"], "externalNetworks": ["0.0.0.0/0"]})[0] in (200, 201)


@pytest.fixture
def two_host_servers():
    """Two HTTP servers on the host's loopback, answering "one" and "two" (4 MB of them for /big)."""
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(host_http_server(lambda path, body=body: body * (1_000_000 if path == "/big"
                                                                                   else 1)))
               for body in (b"one\n", b"two\n")]


@pytest.mark.timeout(240)
def test_a_pod_service_is_reached_at_its_address_round_robin_over_its_hosts(vm_daemon, two_host_servers):
    api = vm_daemon.api
    hosts = [{"hostIP": "10.0.2.2", "hostPort": port} for port in two_host_servers]
    pod_id = api.ok("POST", "/pod/create", body={
        "id": "svc", "containers": [{"image": "busybox", "command": ["sleep", "600"]}],
        "services": [{"serviceIP": "10.254.0.24", "servicePort": 2834, "protocol": "TCP", "hosts": hosts}]})["ID"]
    api.ok("POST", "/pod/start", {"podId": pod_id})
    out = run_in_pod(vm_daemon, pod_id, "for i in 1 2 3 4; do wget -q -O - http://10.254.0.24:2834/; done")
    assert out == "one\ntwo\none\ntwo\n"
    # A reply far bigger than the relay's buffers (the pod reads it slower than the host sends it).
    big = run_in_pod(vm_daemon, pod_id, "wget -q -O - http://10.254.0.24:2834/big | wc -c")
    assert big.split() == ["4000000"]
    status, reply = api.call("POST", "/pod/create", body={
        "containers": [{"image": "busybox"}],
        "services": [{"serviceIP": "10.254.0.25", "servicePort": 53, "protocol": "udp", "hosts": hosts}]})
    assert status == 400 and "udp" in reply
