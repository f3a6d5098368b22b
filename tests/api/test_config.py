"""Configuration: hyperd's INI keys, precedence, and errors that name the key."""

import os
import shutil
import tempfile

import pytest

from hyperd.config import DEFAULT_SOCKET, Config, ConfigError, load_config, socket_endpoint, unix_path


@pytest.fixture
def tmp():
    d = tempfile.mkdtemp(prefix="hd", dir="/tmp")
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def write(tmp, text):
    path = os.path.join(tmp, "config")
    with open(path, "w") as f:
        f.write(text)
    return path


def test_defaults():
    c = Config()
    assert c.socket == DEFAULT_SOCKET and c.socket_path == "/var/run/hyper.sock"
    assert (c.root, c.run_dir, c.accel, c.stop_vms_on_exit) == ("/var/lib/hyper", "/var/run/hyper", "auto", False)
    assert c.kernel_path == "/var/lib/hyper/kernel" and c.initrd_path == "/var/lib/hyper/hyper-initrd.img"


def test_hyperd_keys_in_any_case_without_a_section_header(tmp):
    kernel = write(tmp, "")  # any existing file will do as a kernel
    path = write(tmp, f"""# hyperd's sample
Root=/srv/hyper
kernel={kernel}
HYPERVISOR=qemu
StorageDriver=vfs
Bridge=br-hyper
BridgeIP=10.9.0.1/24
Host=tcp://127.0.0.1:12345
DisableIptables=true
[Log]
PodLogPrefix=/srv/logs
""")
    c = load_config(path)
    assert (c.root, c.kernel, c.hypervisor, c.storage_driver) == ("/srv/hyper", kernel, "qemu", "vfs")
    assert (c.bridge, c.bridge_ip, c.host, c.disable_iptables) == ("br-hyper", "10.9.0.1/24",
                                                                   "tcp://127.0.0.1:12345", True)
    assert c.pod_log_prefix == "/srv/logs"
    assert c.warnings == ()


def test_command_line_wins(tmp):
    path = write(tmp, "Root=/srv/hyper\nAccel=kvm\n")
    c = load_config(path, {"root": "/other", "accel": "tcg", "kernel": None})
    assert (c.root, c.accel) == ("/other", "tcg")


@pytest.mark.parametrize("text,key", [
    ("StorageDriver=devicemapper", "storagedriver"),
    ("Root=relative/path", "root"),
    ("Kernel=/no/such/kernel", "kernel"),
    ("BridgeIP=300.1.1.1/24", "bridgeip"),
    ("DisableIptables=sometimes", "disableiptables"),
    ("Host=http://x", "host"),
    ("Accel=fast", "accel"),
    ("Bridge=a-name-much-too-long-for-linux", "bridge"),
    ("[Log]\nPodLogPrefix=logs", "[Log] podlogprefix"),
])
def test_bad_values_name_the_key(tmp, text, key):
    path = write(tmp, text + "\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert f"bad value for {key}:" in str(e.value)
    assert path in str(e.value)


@pytest.mark.parametrize("text", ["no equals sign here\n", "Root=/a\nRoot=/b\n", "[unterminated\n"])
def test_malformed_files_are_errors(tmp, text):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp, text))
    assert "malformed config file" in str(e.value)


def test_unknown_keys_and_sections_are_warnings(tmp):
    c = load_config(write(tmp, "Frobnicate=1\nGDBTCPPort=1234\n[Other]\nx=1\n"))
    assert any("unknown key frobnicate" in w for w in c.warnings)
    assert any("gdbtcpport is not used" in w for w in c.warnings)
    assert any("unknown section [Other]" in w for w in c.warnings)


def test_missing_default_file_is_fine_but_a_named_one_must_exist(tmp, monkeypatch):
    import hyperd.config

    monkeypatch.setattr(hyperd.config, "DEFAULT_CONFIG", os.path.join(tmp, "absent"))
    c = load_config(None, {"root": tmp})
    assert (c.root, c.config_file, c.warnings) == (tmp, os.path.join(tmp, "absent"), ())
    with pytest.raises(ConfigError) as e:
        load_config(os.path.join(tmp, "nope"))
    assert "does not exist" in str(e.value)


def test_bad_command_line_values_name_the_option(tmp):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp, ""), {"accel": "warp"})
    assert "--accel" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp, ""), {"socket_group": "no-such-group-here"})
    assert "--socket-group" in str(e.value)


@pytest.mark.parametrize("given,endpoint,path", [
    ("/tmp/h.sock", "unix:/tmp/h.sock:mode=660:lockfile=1", "/tmp/h.sock"),
    ("unix:///tmp/h.sock", "unix:/tmp/h.sock:mode=660:lockfile=1", "/tmp/h.sock"),
    ("/tmp/a:b.sock", "unix:/tmp/a\\:b.sock:mode=660:lockfile=1", "/tmp/a:b.sock"),
    ("unix:/x.sock:mode=600", "unix:/x.sock:mode=600", "/x.sock"),
    ("systemd:domain=UNIX:index=0", "systemd:domain=UNIX:index=0", None),
])
def test_socket_endpoints(given, endpoint, path):
    assert socket_endpoint(given) == endpoint
    assert unix_path(endpoint) == path


def test_our_network_image_and_log_keys(tmp):
    c = load_config(write(tmp, "PortHostIP = 0.0.0.0\nInsecureRegistries = reg.local:5000, mirror\nRoot=/srv/h\n"))
    assert c.port_host_ip == "0.0.0.0" and c.insecure_registries == ("reg.local:5000", "mirror")
    assert c.log_dir == "/srv/h/logs", "logs live under the root unless [Log] PodLogPrefix says otherwise"
    for bad, key in (("PortHostIP = nowhere\n", "porthostip"), ("InsecureRegistries = a/b\n", "insecureregistries")):
        with pytest.raises(ConfigError, match=key):
            load_config(write(tmp, bad))
