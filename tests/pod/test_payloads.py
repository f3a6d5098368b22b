"""What the guest is told for a container: Docker's rules for command, env, workdir and user."""

import pytest

from hyperd.errors import BadParameter
from hyperd.image.store import Image
from hyperd.pod.payloads import command_line, environment, newcontainer_payload, startpod_payload
from hyperd.pod.spec import parse_pod


def image(**config):
    return Image("ab" * 32, ("docker.io/library/x:latest",), "sha256:" + "cd" * 32, {"config": config})


def container(**fields):
    return parse_pod({"id": "p", "containers": [dict(image="x", **fields)]}).containers[0]


@pytest.mark.parametrize("fields, config, args", [
    ({}, {"Cmd": ["sh"]}, ["sh"]),
    ({"command": ["echo", "hi"]}, {"Entrypoint": ["/ep"], "Cmd": ["x"]}, ["/ep", "echo", "hi"]),
    ({"entrypoint": ["/bin/true"]}, {"Entrypoint": ["/ep"], "Cmd": ["x"]}, ["/bin/true"]),
    ({}, {"Entrypoint": ["/ep"], "Cmd": ["a", "b"]}, ["/ep", "a", "b"]),
])
def test_entrypoint_and_command_follow_dockers_rules(fields, config, args):
    assert command_line(container(**fields), image(**config)) == args


def test_no_command_anywhere_is_a_bad_parameter():
    with pytest.raises(BadParameter, match="no command"):
        command_line(container(), image())


def test_container_env_overrides_the_image_env():
    envs = environment(container(envs=[{"env": "A", "value": "2"}, {"env": "B", "value": "b"}]),
                       image(Env=["PATH=/bin", "A=1"]))
    assert envs == [{"env": "PATH", "value": "/bin"}, {"env": "A", "value": "2"}, {"env": "B", "value": "b"},
                    {"env": "HOME", "value": "/root"}]


def test_newcontainer_payload_has_hyperstarts_shape():
    pod = parse_pod({"id": "p", "dns": ["1.1.1.1"], "volumes": [{"name": "data"}],
                     "containers": [{"image": "x", "tty": True, "workdir": "/w", "command": ["top"],
                                     "volumes": [{"volume": "data", "path": "/data", "readOnly": True}]}]})
    payload = newcontainer_payload("c" * 64, pod.containers[0], image(User="nobody:nogroup"), pod, 3, 4)
    assert payload["image"] == "images/" + "ab" * 32 and payload["rootfs"] == "rootfs"
    assert payload["fsmap"] == [{"source": "volumes/data", "path": "/data", "readOnly": True,
                                 "dockerVolume": False}]
    process = payload["process"]
    assert (process["id"], process["terminal"], process["stdio"], process["stderr"]) == ("init", True, 3, 0)
    assert (process["workdir"], process["user"], process["group"], process["args"]) == ("/w", "nobody", "nogroup",
                                                                                        ["top"])
    assert startpod_payload(pod) == {"hostname": "p", "dns": ["1.1.1.1"], "dnsSearch": [], "dnsOptions": [],
                                     "shareDir": "share_dir"}


def test_startpod_carries_the_pods_services_and_the_guest_checks_them():
    from hyperd.guest import services
    from hyperd.guest.agent import CommandError

    pod = parse_pod({"id": "s", "containers": [{"image": "busybox"}], "services": [
        {"serviceIP": "10.254.0.24", "servicePort": 2834, "protocol": "TCP",
         "hosts": [{"hostIP": "10.0.2.2", "hostPort": 80}, {"hostIP": "10.0.2.3", "hostPort": 81}]}]})
    payload = startpod_payload(pod)
    assert services.parse(payload["services"]) == [("10.254.0.24", 2834, [("10.0.2.2", 80), ("10.0.2.3", 81)])]
    assert "services" not in startpod_payload(parse_pod({"id": "t", "containers": [{"image": "busybox"}]}))
    for bad, message in (([{"serviceIP": "10.0.0.1", "servicePort": 1, "hosts": []}], r"services\[0\].hosts"),
                         ([{"serviceIP": "x", "servicePort": 1, "hosts": [{"hostIP": "1.1.1.1", "hostPort": 1}]}],
                          r"services\[0\].serviceIP: 'x' is not an IPv4 address"),
                         ([{"serviceIP": "10.0.0.1", "servicePort": 1, "protocol": "udp",
                            "hosts": [{"hostIP": "1.1.1.1", "hostPort": 1}]}], "only tcp"),
                         ([{"serviceIP": "10.0.0.1", "servicePort": 0,
                            "hosts": [{"hostIP": "1.1.1.1", "hostPort": 1}]}], r"servicePort: 0 is not a port")):
        with pytest.raises(CommandError, match=message):
            services.parse(bad)
