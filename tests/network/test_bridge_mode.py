"""Bridge mode on a real daemon running INSIDE a network namespace the test made (its own bridge, taps and
iptables; nothing on the host changes): a pod reached by its address and by a port mapping, a port in use
refused, addresses and rules released and reused, the rules restored after a daemon restart."""

import json

import pytest

from tests.network.conftest import run_in_pod
from tests.support import Api

BRIDGE = "hdbr0"
SUBNET = "192.168.150"


@pytest.fixture
def bridge_daemon(hyperd_factory, guest_files, netns):
    ns = netns()
    h = hyperd_factory(extra_args=["--kernel", guest_files.kernel, "--initrd", guest_files.initrd])
    with open(h.config, "w") as f:
        f.write(f"Network=bridge\nBridge={BRIDGE}\nBridgeIP={SUBNET}.1/24\n")
    argv = h.argv
    h.argv = lambda: ns.argv(*argv())
    h.start(timeout=40)
    h.api = Api(h)
    h.ns = ns
    wait_started(h)
    return h


def wait_started(h) -> None:
    """The routes wait for the daemon's start-up (bridge, iptables, recovery); this one answers 404 after it."""
    status, reply = h.api.call("GET", "/pod/nosuchpod/portmappings")
    assert status == 404, (status, reply, h.log()[-3000:])


def ns_get(ns, url: str, timeout: int = 30) -> str:
    """wget inside the namespace, retried while the server starts."""
    out = ns.run("sh", "-c", f"for i in $(seq 100); do wget -q -T 5 -O - {url} && exit 0; sleep 0.2; done; exit 1",
                 check=False, timeout=timeout + 30)
    assert out.returncode == 0, (url, out.stderr)
    return out.stdout


def iptables_nat(ns) -> str:
    return ns.run("iptables", "-w", "-t", "nat", "-S").stdout


def taps(ns) -> list[str]:
    links = json.loads(ns.run("ip", "-j", "link", "show", "master", BRIDGE).stdout or "[]")
    return [link["ifname"] for link in links]


@pytest.mark.timeout(300)
def test_pod_by_address_and_by_port_mapping(bridge_daemon):
    h, api, ns = bridge_daemon, bridge_daemon.api, bridge_daemon.ns
    assert f"{SUBNET}.1/24" in ns.run("ip", "-br", "addr", "show", BRIDGE).stdout
    nat = iptables_nat(ns)
    assert f"-A POSTROUTING -s {SUBNET}.0/24 ! -o {BRIDGE} -j MASQUERADE" in nat
    assert "-A OUTPUT ! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL -j HYPER" in nat

    pod = api.httpd_pod("br", [{"containerPort": "80", "hostPort": "8080"}])
    api.ok("POST", "/pod/start", {"podId": pod})
    info = api.ok("GET", "/pod/info", {"podName": pod})
    assert info["status"]["podIP"] == [f"{SUBNET}.2"]
    assert ns_get(ns, f"http://{SUBNET}.2/index.html") == "hello from br\n"
    assert ns_get(ns, f"http://{SUBNET}.1:8080/index.html") == "hello from br\n"
    assert f"--to-destination {SUBNET}.2:80" in iptables_nat(ns)
    assert len(taps(ns)) == 1

    # the guest: its address, the bridge as its gateway, itself in /etc/hosts
    out = run_in_pod(h, pod, "ip -4 addr show eth0; ip route; cat /etc/hosts")
    assert f"{SUBNET}.2/24" in out and f"default via {SUBNET}.1" in out and f"{SUBNET}.2\tbr" in out, out

    # the same host port again: 409; another port: a second pod with the next address
    other = api.httpd_pod("br2", [{"containerPort": "80", "hostPort": "8080"}])
    status, reply = api.call("POST", "/pod/start", {"podId": other})
    assert status == 409 and "tcp/8080" in str(reply)
    api.ok("PUT", f"/pod/{other}/portmappings/delete", body=[{"containerPort": "80"}])
    api.ok("PUT", f"/pod/{other}/portmappings/add", body=[{"containerPort": "80", "hostPort": "8081"}])
    api.ok("POST", "/pod/start", {"podId": other})
    assert api.ok("GET", "/pod/info", {"podName": other})["status"]["podIP"] == [f"{SUBNET}.3"]
    assert ns_get(ns, f"http://{SUBNET}.1:8081/") == "hello from br2\n"
    assert ns_get(ns, f"http://{SUBNET}.1:8080/") == "hello from br\n"

    # mappings on a running pod
    api.ok("PUT", f"/pod/{pod}/portmappings/add", body=[{"containerPort": "80-81", "hostPort": "9000-9001"}])
    assert ns_get(ns, f"http://{SUBNET}.1:9000/") == "hello from br\n"
    api.ok("PUT", f"/pod/{pod}/portmappings/delete", body=[{"containerPort": "80", "hostPort": "8080"}])
    assert "--dport 8080 " not in iptables_nat(ns)
    assert ns_get(ns, f"http://{SUBNET}.1:9000/") == "hello from br\n"

    # a daemon restart: the pods keep running, the (flushed and refilled) rules still lead to them
    h.restart(timeout=40)
    wait_started(h)
    nat = iptables_nat(ns)
    assert nat.count("-j DNAT") == 3, nat  # 9000 and 9001 (a range is a rule per port) and 8081
    assert ns_get(ns, f"http://{SUBNET}.1:9000/") == "hello from br\n"
    assert ns_get(ns, f"http://{SUBNET}.1:8081/") == "hello from br2\n"

    # removed: rules, taps and addresses go; the next pod gets .2 again
    api.ok("DELETE", "/pod", {"podId": pod})
    api.ok("DELETE", "/pod", {"podId": other})
    assert "-j DNAT" not in iptables_nat(ns)
    assert taps(ns) == []
    again = api.httpd_pod("br3")
    api.ok("POST", "/pod/start", {"podId": again})
    assert api.ok("GET", "/pod/info", {"podName": again})["status"]["podIP"] == [f"{SUBNET}.2"]
    assert ns_get(ns, f"http://{SUBNET}.2/") == "hello from br3\n"
    api.ok("DELETE", "/pod", {"podId": again})


@pytest.mark.timeout(300)
def test_addresses_released_and_reused_over_real_vm_cycles(bridge_daemon):
    api, ns = bridge_daemon.api, bridge_daemon.ns
    seen = []
    for i in range(4):
        pod = api.httpd_pod(f"cyc{i}", [{"containerPort": "80", "hostPort": "8080"}])
        api.ok("POST", "/pod/start", {"podId": pod})
        seen.append(api.ok("GET", "/pod/info", {"podName": pod})["status"]["podIP"])
        assert ns_get(ns, f"http://{SUBNET}.1:8080/") == f"hello from cyc{i}\n"
        api.ok("DELETE", "/pod", {"podId": pod})
        assert taps(ns) == []
    assert seen == [[f"{SUBNET}.2"]] * 4
    assert "-j DNAT" not in iptables_nat(ns)


@pytest.mark.timeout(120)
def test_an_internal_white_list_without_the_bridge_is_refused(bridge_daemon):
    api = bridge_daemon.api

    def create(internal):
        return api.call("POST", "/pod/create", body={"containers": [{"image": "busybox"}], "portmappingWhiteLists": {
            "internalNetworks": internal, "externalNetworks": ["0.0.0.0/0"]}})

    status, reply = create(["10.99.0.0/16"])
    assert status == 400 and f"reachable from {SUBNET}.0/24 here" in reply
    assert create([f"{SUBNET}.0/24"])[0] in (200, 201)  # hyperd's own example: the bridge, and anyone on ports
