"""The pod file parser: hyperd's fields, defaults, case-insensitive keys, and errors that name the field."""

import json
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hyperd.errors import BadParameter
from hyperd.pod.spec import PortMapping, parse_pod

FULL = {
    "id": "web", "hostname": "web1", "type": "pod", "tty": False,
    "labels": {"app": "demo"},
    "resource": {"vcpu": 2, "memory": 512},
    "log": {"type": "json-file", "config": {}},
    "dns": ["8.8.8.8"], "dnsSearch": ["example.com"], "dnsOptions": ["ndots:2"],
    "containers": [{
        "name": "nginx", "image": "nginx:latest",
        "entrypoint": ["/docker-entrypoint.sh"], "command": ["nginx", "-g", "daemon off;"],
        "workdir": "/", "tty": False, "readOnly": False,
        "envs": [{"env": "MODE", "value": "prod"}],
        "user": {"name": "nginx", "group": "nginx", "additionalGroups": []},
        "sysctl": {"net.core.somaxconn": "1024"},
        "ulimits": [{"Name": "nofile", "Hard": 65536, "Soft": 65536}],
        "volumes": [{"volume": "logs", "path": "/var/log/nginx", "readOnly": False}],
        "files": [{"filename": "conf", "path": "/etc/nginx/conf.d/site.conf", "perm": "0644"}],
    }],
    "volumes": [{"name": "logs", "source": "/srv/logs", "format": "vfs"}],
    "files": [{"name": "conf", "encoding": "raw", "content": "server { listen 80; }"}],
    "interfaces": [{"bridge": "hyper0", "ip": "192.168.123.10/24", "gateway": "192.168.123.1", "ifname": "tap-web0"}],
    "portmappings": [{"containerPort": "80", "hostPort": "8080", "protocol": "tcp"}],
    "portmappingWhiteLists": {"internalNetworks": ["192.168.123.0/24"], "externalNetworks": ["0.0.0.0/0"]},
    "services": [{"serviceIP": "10.254.0.24", "servicePort": 2834, "protocol": "TCP",
                  "hosts": [{"hostIP": "192.168.23.2", "hostPort": 2345}]}],
}


def test_every_field_of_the_reference_example_is_read():
    pod = parse_pod(FULL)
    assert (pod.id, pod.hostname, pod.vcpu, pod.memory) == ("web", "web1", 2, 512)
    c = pod.containers[0]
    assert c.name == "nginx" and c.image == "nginx:latest"
    assert c.command == ("nginx", "-g", "daemon off;") and c.entrypoint == ("/docker-entrypoint.sh",)
    assert c.envs[0].env == "MODE" and c.envs[0].value == "prod"
    assert c.user.name == "nginx" and c.sysctl == {"net.core.somaxconn": "1024"}
    assert c.ulimits[0].hard == 65536
    assert c.volumes[0].path == "/var/log/nginx" and c.files[0].perm == 0o644
    assert pod.volumes[0].format == "vfs" and pod.files[0].content.startswith("server")
    assert pod.dns == ("8.8.8.8",) and pod.dns_search == ("example.com",) and pod.dns_options == ("ndots:2",)
    assert pod.portmappings == (PortMapping((80, 80), (8080, 8080), "tcp"),)
    assert pod.interfaces[0].gateway == "192.168.123.1"
    assert pod.services[0].protocol == "tcp" and pod.services[0].hosts[0].host_port == 2345
    assert pod.labels == {"app": "demo"}


def test_defaults_are_hyperds():
    pod = parse_pod({"id": "x", "containers": [{"image": "busybox"}, {"image": "docker.io/library/busybox:1"}]})
    assert (pod.vcpu, pod.memory, pod.type, pod.hostname) == (1, 128, "pod", "x")
    assert [c.name for c in pod.containers] == ["x-busybox-0", "x-docker.io-library-busybox-1-1"]
    assert pod.containers[0].tty is False and pod.containers[0].restart_policy == "never"


def test_the_generated_id_is_used_when_the_pod_names_none():
    pod = parse_pod({"containers": [{"image": "busybox"}]}, pod_id="pod-abcdefghij")
    assert pod.id == "pod-abcdefghij" and pod.containers[0].name == "pod-abcdefghij-busybox-0"


def test_keys_match_case_insensitively_and_unknown_keys_are_ignored():
    pod = parse_pod(json.dumps({
        "ID": "p", "Containers": [{"IMAGE": "busybox", "Command": ["true"], "whatever": 1}],
        "portmappings": [{"containerport": 80, "hostport": "8080"}], "Resource": {"VCPU": 2}, "futureField": [],
    }))
    assert pod.id == "p" and pod.containers[0].command == ("true",) and pod.vcpu == 2
    assert pod.portmappings[0].container_port == (80, 80) and pod.portmappings[0].host_port == (8080, 8080)


def test_pod_level_tty_forces_every_container_to_tty():
    pod = parse_pod({"id": "t", "tty": True, "containers": [{"image": "busybox"}]})
    assert pod.containers[0].tty is True


@pytest.mark.parametrize("document, message", [
    ({"id": "p", "containers": [{"name": "a"}]}, "containers[0].image: required"),
    ({"id": "p", "containers": {"image": "x"}}, "containers: must be an array"),
    ({"id": "p", "containers": [{"image": "x", "command": "ls -l"}]}, "containers[0].command: must be an array"),
    ({"id": "p", "resource": {"memory": "lots"}}, "resource.memory: must be an integer"),
    ({"id": "p", "resource": {"vcpu": 0}}, "resource.vcpu: must be at least 1"),
    ({"id": "p", "containers": [{"image": "x", "name": "a"}, {"image": "y", "name": "a"}]},
     "duplicate container name 'a'"),
    ({"id": "p", "containers": [{"image": "x", "volumes": [{"volume": "v", "path": "/v"}]}]},
     "containers[0].volumes[0].volume: no pod volume named 'v'"),
    ({"id": "p", "portmappings": [{"containerPort": "80-81", "hostPort": "8080"}]}, "ranges differ in size"),
    ({"id": "p", "portmappings": [{"containerPort": "70000"}]}, "portmappings[0].containerPort"),
    ({"id": "p", "portmappings": [{"containerPort": "80", "protocol": "sctp"}]}, "portmappings[0].protocol"),
    ({"id": "p", "dns": ["not-an-ip"]}, "dns[0]: 'not-an-ip' is not an IP address"),
    ({"id": "p", "hostname": "Bad_Host"}, "hostname:"),
    ({"id": "p", "interfaces": [{"ip": "10.0.0.300/24"}]}, "interfaces[0].ip"),
    ({"id": "p", "containers": [{"image": "x", "envs": [{"env": "A"}, {"env": "A"}]}]}, "duplicate env 'A'"),
    ({"id": "p", "containers": [{"image": "x", "files": [{"filename": "f", "path": "/f", "perm": "rwx"}]}]},
     "perm"),
    ("{not json", "the pod is not valid JSON"),
    ([1, 2], "pod: must be an object"),
])
def test_bad_pod_files_are_refused_with_the_field_named(document, message):
    with pytest.raises(BadParameter) as e:
        parse_pod(document, pod_id="pod-x")
    assert message in e.value.message


USER_MAPS = {"labels", "sysctl", "config"}  # keys inside these are the user's data: their case is kept


@given(st.integers(min_value=0, max_value=2**32))
def test_any_casing_of_any_key_parses_the_same(seed):
    rnd = random.Random(seed)

    def recase(value):
        if isinstance(value, dict):
            return {
                "".join(c.upper() if rnd.random() < 0.5 else c.lower() for c in k):
                    (v if k in USER_MAPS else recase(v))
                for k, v in value.items()
            }
        if isinstance(value, list):
            return [recase(v) for v in value]
        return value
    assert parse_pod(recase(FULL)) == parse_pod(FULL)


def test_a_container_round_trips_through_its_document():
    from hyperd.pod.spec import container_document, parse_container

    for c in parse_pod(FULL).containers + parse_pod({"id": "x", "containers": [{"image": "busybox"}]}).containers:
        assert parse_container(container_document(c), "web", 0) == c


def test_portmapping_white_lists_are_read_as_networks_and_a_bad_one_is_named():
    pod = parse_pod({"id": "w", "containers": [{"image": "busybox"}],
                     "portmappingWhiteLists": {"internalNetworks": ["192.168.123.7/24"],
                                               "externalNetworks": ["0.0.0.0/0"]}})
    assert pod.whitelist_internal == ("192.168.123.0/24",) and pod.whitelist_external == ("0.0.0.0/0",)
    with pytest.raises(BadParameter, match=r"portmappingWhiteLists.externalNetworks\[1\]: 'x' is not a network"):
        parse_pod({"id": "w", "containers": [{"image": "busybox"}],
                   "portmappingWhiteLists": {"externalNetworks": ["0.0.0.0/0", "x"]}})
