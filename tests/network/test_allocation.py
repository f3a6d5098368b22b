"""The network's bookkeeping without VMs: addresses and host ports as allocations in a real state store,
never handed out twice, released and reused over 20 create/remove cycles, released on every failure path;
port mapping and --publish parsing; the host's resolv.conf for the guest."""

import shutil
import socket
import tempfile

import pytest
from twisted.internet import defer, reactor

from hyperd.config import Config
from hyperd.errors import BadParameter, Conflict, HyperError
from hyperd.network import dns
from hyperd.network.bridge import IP, BridgeNetwork, tap_name
from hyperd.network.ports import Mapping, parse_mappings, parse_publish, set_spec_mappings
from hyperd.network.user import UserNetwork
from hyperd.pod.spec import parse_pod
from hyperd.state import StateStore


@pytest.fixture
def state():
    d = tempfile.mkdtemp(prefix="hdn", dir="/tmp")
    store = StateStore(d + "/state.db")
    try:
        yield store
    finally:
        store.close()
        shutil.rmtree(d, ignore_errors=True)


def bridge(state, cidr="10.77.0.1/24", **kw):
    return BridgeNetwork(Config(network="bridge", bridge="hdx0", bridge_ip=cidr, **kw), reactor, state)


def pod(name, **fields):
    return parse_pod({"id": name, "containers": [{"image": "busybox"}], **fields})


def release(net, pod_id):
    """release_pod with no VM attached does its work at once (no reactor turn needed)."""
    d = defer.ensureDeferred(net.release_pod(pod_id))
    assert d.called
    failures = []
    d.addErrback(failures.append)
    assert not failures, failures


def test_addresses_are_released_and_reused_over_20_cycles(state):
    net = bridge(state)
    for cycle in range(20):
        leases = [net.reserve(pod(f"p{cycle}-{i}")) for i in range(3)]
        addresses = [lease.nic.address for lease in leases]
        assert addresses == ["10.77.0.2", "10.77.0.3", "10.77.0.4"]  # lowest free first, never twice
        assert all(lease.nic.gateway == "10.77.0.1" and lease.nic.prefix == 24 for lease in leases)
        for lease in leases:
            release(net, lease.pod_id)
        assert state.allocations(IP) == {}


def test_a_network_address_gives_the_bridge_the_first_host(state):
    net = bridge(state, "192.168.123.0/24")  # the config's default form
    assert net.bridge_address == "192.168.123.1"
    assert net.reserve(pod("a")).nic.address == "192.168.123.2"


def test_exhausted_subnet_is_a_clear_error_and_holds_nothing(state):
    net = bridge(state, "10.78.0.1/29")  # hosts .1-.6; .1 is the bridge
    for i in range(5):
        net.reserve(pod(f"x{i}"))
    with pytest.raises(HyperError) as e:
        net.reserve(pod("one-too-many", portmappings=[{"containerPort": "80"}]))
    assert "no free address left in 10.78.0.0/29" in e.value.message and e.value.status == 503
    assert "one-too-many" not in state.allocations().values()
    release(net, "x3")
    assert net.reserve(pod("next")).nic.address == "10.78.0.5"


def test_requested_address_checked_against_subnet_and_holders(state):
    net = bridge(state)
    assert net.reserve(pod("a", interfaces=[{"ip": "10.77.0.9/24"}])).nic.address == "10.77.0.9"
    with pytest.raises(Conflict, match="10.77.0.9 is already held by pod a"):
        net.reserve(pod("b", interfaces=[{"ip": "10.77.0.9/24"}]))
    for bad in ("10.99.0.5/24", "10.77.0.1/24", "10.77.0.255/24"):
        with pytest.raises(BadParameter, match="interfaces"):
            net.reserve(pod("c", interfaces=[{"ip": bad}]))
    with pytest.raises(BadParameter, match="one network interface"):
        net.reserve(pod("d", interfaces=[{"ip": "10.77.0.20/24"}, {"ip": "10.77.0.21/24"}]))
    assert set(state.allocations().values()) == {"a"}


def test_host_ports_never_twice_and_released_on_failure(state):
    net = UserNetwork(Config(), reactor, state)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        busy = s.getsockname()[1]
        free = _free_port()
        lease = net.reserve(pod("a", portmappings=[{"containerPort": "80", "hostPort": str(free)}]))
        assert [r.key for r in lease.rules] == [f"tcp:{free}"]
        with pytest.raises(Conflict, match=f"tcp/{free} is already mapped by pod a"):
            net.reserve(pod("b", portmappings=[{"containerPort": "80", "hostPort": str(free)}]))
        # b's first mapping was taken before its second failed: released again
        other = _free_port()
        with pytest.raises(Conflict, match=f"tcp/{busy} is already in use on 127.0.0.1"):
            net.reserve(pod("b", portmappings=[{"containerPort": "81", "hostPort": str(other)},
                                               {"containerPort": "80", "hostPort": str(busy)}]))
        assert set(state.allocations().values()) == {"a"}
        # udp is another namespace of ports; an empty host port gets a free one; a range a run of them
        lease_b = net.reserve(pod("b", portmappings=[{"containerPort": "80", "hostPort": str(free), "protocol": "udp"},
                                                     {"containerPort": "53-55"}]))
        ranged = lease_b.mappings[1]
        assert ranged.host[1] - ranged.host[0] == 2
        assert len(state.allocations("port")) == 5
    release(net, "a")
    release(net, "b")
    assert state.allocations() == {}


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_mapping_parsing_and_publish_rules():
    assert parse_mappings([{"containerPort": "80", "hostPort": "8080"}, {"containerport": 53, "Protocol": "UDP"},
                           {"containerPort": "8000-8002", "hostPort": "9000-9002"}]) == [
        Mapping("tcp", (80, 80), (8080, 8080)), Mapping("udp", (53, 53), None),
        Mapping("tcp", (8000, 8002), (9000, 9002))]
    for bad, message in ([{"containerPort": "0"}], "1-65535"), ([{"containerPort": "x"}], "not a port"), \
            ([{"containerPort": "80", "protocol": "sctp"}], "protocol"), \
            ([{"containerPort": "80-81", "hostPort": "1"}], "differ in size"), ({}, "JSON array"):
        with pytest.raises(BadParameter, match=message):
            parse_mappings(bad)
    assert parse_publish("8080:80") == {"containerPort": "80", "hostPort": "8080", "protocol": "tcp"}
    assert parse_publish("udp:5353:53") == {"containerPort": "53", "hostPort": "5353", "protocol": "udp"}
    assert parse_publish("9000-9001:80-81")["hostPort"] == "9000-9001"
    assert parse_publish("80") == {"containerPort": "80", "hostPort": "", "protocol": "tcp"}
    for bad in ("a:b:c:d", "8080:http", "9000-9002:80"):
        with pytest.raises(ValueError):
            parse_publish(bad)
    doc = {"id": "p", "portMappings": [{"containerPort": "1"}]}
    assert set_spec_mappings(doc, [Mapping("tcp", (80, 80), (8080, 8080))]) == {
        "id": "p", "portmappings": [{"containerPort": "80", "hostPort": "8080", "protocol": "tcp"}]}
    assert Mapping("tcp", (80, 80), (8080, 8080)).matches(Mapping("tcp", (80, 80)))
    assert not Mapping("tcp", (80, 80), (8080, 8080)).matches(Mapping("udp", (80, 80)))


def test_host_dns_for_the_guest():
    host = dns.parse_resolv_conf("# generated\nnameserver 127.0.0.53\nnameserver 10.1.1.1 # ours\n"
                                 "nameserver fe80::1%eth0\nsearch a.test b.test\noptions edns0 trust-ad\n")
    assert host == dns.HostDNS(("127.0.0.53", "10.1.1.1", "fe80::1%eth0"), ("a.test", "b.test"),
                               ("edns0", "trust-ad"))
    user = dns.pod_dns(pod("p"), host, "10.0.2.3")
    assert (user.dns, user.dns_search, user.dns_options) == (("10.0.2.3", "10.1.1.1"), ("a.test", "b.test"),
                                                             ("edns0", "trust-ad"))
    assert dns.pod_dns(pod("p"), host, None).dns == ("10.1.1.1",)  # bridge: the loopback resolver is dropped
    own = pod("p", dns=["9.9.9.9"])
    assert dns.pod_dns(own, host, "10.0.2.3") is own
    mapped = pod("p", containers=[{"image": "busybox", "files": [{"filename": "r", "path": "/etc/resolv.conf"}]}],
                 files=[{"name": "r", "content": "nameserver 1.1.1.1\n"}])
    assert dns.pod_dns(mapped, host, "10.0.2.3").dns == ()
    assert dns.pod_dns(pod("p"), dns.HostDNS(("127.0.0.1",)), None).dns == ()


def test_tap_names_fit_an_interface_name():
    assert tap_name("vm-abcdefghij") == "vm-abcdefghij0" and len(tap_name("vm-abcdefghij", 9)) <= 15


def test_disable_iptables_refuses_port_mappings_with_nothing_held(state):
    net = bridge(state, disable_iptables=True)
    with pytest.raises(BadParameter, match="DisableIptables"):
        net.reserve(pod("p", portmappings=[{"containerPort": "80", "hostPort": "8080"}]))
    assert state.allocations() == {}
    assert net.reserve(pod("q")).nic.address == "10.77.0.2"  # without mappings it starts
