"""Images through the real daemon (``twistd hyperd`` in a subprocess): pull from a real registry, run a pod
from the pulled image in a real VM, rmi refused while the pod exists and done after; save and load."""

from __future__ import annotations

import json
import os
import urllib.parse

import pytest

from hyperd.image.builtin import busybox_layer
from tests.image.conftest import image_manifest, tar_layer, write_layout

pytestmark = pytest.mark.timeout(240)


def _lines(body: bytes) -> list[dict]:
    return [json.loads(line) for line in body.splitlines() if line.strip()]


def test_pull_run_a_pod_from_it_and_rmi(registry, vm_daemon, workdir):
    layout = os.path.join(workdir, "app")
    desc = image_manifest(layout, [tar_layer({"etc/": "dir/"}), busybox_layer(),
                                   tar_layer({"hello.txt": b"pulled from a registry\n"})],
                          {"config": {"Env": ["PATH=/bin", "GREETING=hi"], "Cmd": ["cat", "/hello.txt"]}})
    write_layout(layout, [("latest", desc)])
    registry.push(layout, "latest", "e2e/app:v1")
    name = f"{registry.host}/e2e/app:v1"

    status, headers, body = vm_daemon.request("POST", "/image/create?" + urllib.parse.urlencode({
        "imageName": f"{registry.host}/e2e/app", "tag": "v1"}))
    assert status == 200 and headers["content-type"] == "application/json", body
    messages = _lines(body)
    assert messages[-1] == {"status": f"Status: Downloaded newer image for {name}"}
    assert not [m for m in messages if "error" in m]

    images = vm_daemon.api.ok("GET", "/images/get")["imagesList"]
    (entry,) = [i for i in images if i.startswith(f"{registry.host}/e2e/app:v1:")]
    image_id = entry.rsplit(":", 3)[1]

    pod_id = vm_daemon.api.ok("POST", "/pod/create", body={"id": "pulled", "containers": [
        {"name": "app", "image": name}]})["ID"]
    vm_daemon.api.ok("POST", "/pod/start", {"podId": pod_id})
    assert vm_daemon.api.ok("GET", "/exitcode", {"container": "app"}) == 0
    assert vm_daemon.api.wait_pod(pod_id) == "succeeded"
    assert vm_daemon.api.logs(pod_id) == "pulled from a registry\n"

    # The pod's container still uses the image: refused.
    status, reply = vm_daemon.api.call("DELETE", "/image", {"imageId": name})
    assert status == 409, reply
    vm_daemon.api.ok("DELETE", "/pod", {"podId": pod_id})
    reply = vm_daemon.api.ok("DELETE", "/image", {"imageId": name})
    assert reply == {"imagesList": [{"Untagged": name}, {"Deleted": f"sha256:{image_id}"}]}
    assert not any(i.startswith(f"{registry.host}/e2e/app") for i in vm_daemon.api.ok("GET", "/images/get")
                   ["imagesList"])
    status, reply = vm_daemon.api.call("DELETE", "/image", {"imageId": name})
    assert status == 404, reply

    # An unknown image is a 404 before any stream; so is a pod of one.
    status, _, body = vm_daemon.request("POST", f"/image/create?imageName={registry.host}/e2e/nothere")
    assert status == 404 and b"no such image" in body


def test_save_and_load_through_the_daemon(vm_daemon):
    status, headers, tar = vm_daemon.request("GET", "/images/save?names=busybox")
    assert status == 200 and headers["content-type"] == "application/x-tar"
    assert int(headers["content-length"]) == len(tar) > 1_000_000
    status, reply = vm_daemon.api.call("POST", "/image/load", body=None)
    assert status == 400, reply
    status, _, body = vm_daemon.request("POST", "/image/load", headers={"Content-Type": "application/x-tar"},
                                        body=tar)
    assert status == 200 and _lines(body) == [{"stream": "Loaded image: busybox:latest\n"}]
    status, _, body = vm_daemon.request("POST", "/image/load", body=b"not a tar" * 100)
    assert status == 400 and b"not a tar" in body
