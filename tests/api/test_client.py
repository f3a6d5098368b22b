"""hyperd.client and hyperctl against a real daemon."""

import os
import subprocess
import sys

import pytest
import pytest_twisted
from twisted.internet import reactor

from hyperd.client import HyperClient, HyperClientError
from hyperd.state import StateStore

HYPERCTL = os.path.join(os.path.dirname(sys.executable), "hyperctl")


@pytest.mark.timeout(60)
@pytest_twisted.ensureDeferred
async def test_client_info_version_and_list(hyperd, hyperd_client):
    info = await hyperd_client.info()
    assert info["ID"] == str(hyperd.proc.pid)
    assert info["DockerRootDir"] == hyperd.root
    version = await hyperd_client.version()
    assert version["ID"] == str(hyperd.proc.pid)
    assert await hyperd_client.ping() == "OK"
    assert await hyperd_client.list("pod") == []
    assert await hyperd_client.list("vm") == []


@pytest.mark.timeout(60)
@pytest_twisted.ensureDeferred
async def test_client_errors_carry_status_and_message(hyperd_client):
    with pytest.raises(HyperClientError) as e:
        await hyperd_client.list("image")
    assert e.value.status == 400
    assert "Can not support image list!" in e.value.message
    with pytest.raises(HyperClientError) as e:
        await hyperd_client.get_json("GET", "/no/such/route")
    assert e.value.status == 404
    with pytest.raises(HyperClientError) as e:
        await hyperd_client.request("POST", "/pod/create", body=None)
    assert e.value.status == 400


@pytest.mark.timeout(60)
@pytest_twisted.ensureDeferred
async def test_client_without_a_daemon_says_so():
    client = HyperClient(reactor, "/tmp/hd-no-such-dir/h.sock")
    try:
        with pytest.raises(HyperClientError) as e:
            await client.info()
        assert e.value.status == 0
        assert "cannot connect to hyperd at /tmp/hd-no-such-dir/h.sock" in e.value.message
    finally:
        await client.close()


def hyperctl(h, *args):
    return subprocess.run([HYPERCTL, "-H", f"unix://{h.socket_path}", *args], capture_output=True, text=True,
                          timeout=60)


@pytest.mark.timeout(60)
def test_hyperctl_info_prints_what_hyperctl_printed(hyperd):
    out = hyperctl(hyperd, "info")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[:3] == ["Images: 1", "Containers: 0", "PODs: 0"]  # the built-in busybox
    assert "Storage Driver: overlay" in lines
    assert f"Hyper Root Dir: {hyperd.root}" in lines
    assert "Execution Driver: qemu-tcg" in lines
    assert any(line.startswith("Total Memory: ") and line.endswith(" GB") for line in lines)
    assert lines[-1].startswith("Operating System: ")


@pytest.mark.timeout(60)
def test_hyperctl_list_and_version(hyperd):
    # Rows written behind the daemon's back, once its start-up recovery is over (a listing waits for it):
    # recovery would rightly fail a "running" pod whose VM does not exist.
    assert hyperctl(hyperd, "list").returncode == 0
    store = StateStore(os.path.join(hyperd.root, "state.db"))
    store.put_pod("pod-abcdefghij", "web", {}, "running", vm_id="vm-abcdefghij")
    store.put_vm("vm-abcdefghij", "pod-abcdefghij", "associated")
    store.close()
    out = hyperctl(hyperd, "list")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        f"{'POD ID':>15}{'POD Name':>30}{'VM name':>20}{'Status':>10}",
        f"{'pod-abcdefghij':>15}{'web':>30}{'vm-abcdefghij':>20}{'running':>10}",
    ]
    out = hyperctl(hyperd, "list", "vm", "-q")
    assert out.stdout == "vm-abcdefghij\n"
    out = hyperctl(hyperd, "version")
    assert out.returncode == 0 and "The hyperd version is" in out.stdout


@pytest.mark.timeout(60)
def test_hyperctl_failure_is_an_error_line_and_nonzero_exit(hyperd):
    out = hyperctl(hyperd, "list", "image")
    assert out.returncode != 0
    assert out.stderr.startswith("hyperctl ERROR: ")
    hyperd.stop()
    out = hyperctl(hyperd, "info")
    assert out.returncode == 1
    assert out.stderr.startswith(f"hyperctl ERROR: cannot connect to hyperd at {hyperd.socket_path}")
    assert "Traceback" not in out.stderr


def test_hyperctl_nested_subcommands_parse():
    from hyperd.client.cli import build_parser, cmd_vm_create, cmd_vm_kill

    args = build_parser().parse_args(["-H", "unix:///x.sock", "vm", "create", "--cpu", "2", "--mem", "256",
                                      "--async"])
    assert (args.handler, args.cpu, args.mem, args.async_, args.host) == (cmd_vm_create, 2, 256, True,
                                                                          "unix:///x.sock")
    args = build_parser().parse_args(["vm", "kill", "vm-a", "vm-b"])
    assert (args.handler, args.vm) == (cmd_vm_kill, ["vm-a", "vm-b"])


def test_mem_size_string_matches_hyperctl():
    from hyperd.client.cli import mem_size_string

    assert mem_size_string(1000) == "1000 KB"
    assert mem_size_string(3 * 1024 * 1024 // 2) == "1.5 MB"
    assert mem_size_string(25276203008) == "23.5 GB"
