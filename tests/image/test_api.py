"""The image routes and hyperctl's image commands, over a real UNIX socket, against a real registry.

The API here is served in-process around a small daemon object that holds only an ImageService (the routes
need nothing else); tests/image/test_daemon.py runs the same through the real daemon.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import types

import pytest
import pytest_twisted
from twisted.internet import defer, reactor

import hyperd.api.images  # noqa: F401 - registers the routes
from hyperd.api.site import make_site
from hyperd.client import cli
from hyperd.client import images as client_images
from hyperd.client.client import HyperClient, HyperClientError
from hyperd.image.builtin import ensure_busybox
from hyperd.image.service import ImageService
from tests.image.conftest import image_manifest, tar_layer, write_layout


class Api:
    def __init__(self, service: ImageService, socket_path: str) -> None:
        self.service = service
        self.socket_path = socket_path
        self.in_use: set[str] = set()
        service.in_use = lambda: self.in_use
        self.port = reactor.listenUNIX(socket_path, make_site(types.SimpleNamespace(image_service=service)))
        self.client = HyperClient(reactor, socket_path)

    async def close(self) -> None:
        await self.client.close()
        await self.port.stopListening()

    async def hyperctl(self, *argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        status = await cli.run(reactor, ["-H", f"unix://{self.socket_path}", *argv], out, err)
        return status, out.getvalue(), err.getvalue()


@pytest.fixture
def api(service, workdir):
    a = Api(service, os.path.join(workdir, "h.sock"))
    try:
        yield a
    finally:
        pytest_twisted.blockon(defer.ensureDeferred(a.close()))


def _push(registry, workdir: str, name: str, files: dict) -> dict:
    layout = os.path.join(workdir, "layout-" + name.replace("/", "-"))
    desc = image_manifest(layout, [tar_layer(files)])
    write_layout(layout, [("latest", desc)])
    registry.push(layout, "latest", f"{name}:latest")
    return desc


@pytest.mark.timeout(60)
@pytest_twisted.ensureDeferred
async def test_pull_list_and_remove_through_the_api(registry, api, workdir):
    _push(registry, workdir, "api/one", {"hello": b"world"})
    messages = []
    await client_images.pull(api.client, f"{registry.host}/api/one", on_progress=messages.append)
    assert messages[0] == {"status": "Pulling from api/one", "id": "latest"}
    assert messages[-1]["status"] == f"Status: Downloaded newer image for {registry.host}/api/one:latest"
    assert {"status", "progressDetail", "id"} <= set(next(m for m in messages if m["status"] == "Downloading"))
    (entry,) = await client_images.images(api.client)
    image = api.service.lookup(f"{registry.host}/api/one")
    assert entry.startswith(f"{registry.host}/api/one:latest:{image.id}:")
    # in use: refused (409) unless forced
    api.in_use.add(image.id)
    with pytest.raises(HyperClientError) as refused:
        await client_images.remove(api.client, f"{registry.host}/api/one")
    assert refused.value.status == 409
    api.in_use.clear()
    removed = await client_images.remove(api.client, f"{registry.host}/api/one")
    assert removed == [{"Untagged": f"{registry.host}/api/one:latest"}, {"Deleted": f"sha256:{image.id}"}]
    assert await client_images.images(api.client) == []
    with pytest.raises(HyperClientError) as gone:
        await client_images.remove(api.client, image.id)
    assert gone.value.status == 404


@pytest.mark.timeout(60)
@pytest_twisted.ensureDeferred
async def test_pull_errors_before_the_stream_are_statuses(registry, api):
    from tests.image.conftest import free_port

    with pytest.raises(HyperClientError) as unknown:
        await client_images.pull(api.client, f"{registry.host}/api/nothere")
    assert unknown.value.status == 404 and "no such image" in unknown.value.message
    with pytest.raises(HyperClientError) as bad:
        await client_images.pull(api.client, "UPPER/case")
    assert bad.value.status == 400
    with pytest.raises(HyperClientError) as missing:
        await api.client.request("POST", "/image/create")
    assert missing.value.status == 400 and "imageName" in missing.value.message
    dead = f"127.0.0.1:{free_port()}"
    with pytest.raises(HyperClientError) as unreachable:
        await client_images.pull(api.client, f"{dead}/x/y")
    assert unreachable.value.status == 500 and f"registry {dead} is unreachable" in unreachable.value.message


@pytest.mark.timeout(60)
@pytest_twisted.ensureDeferred
async def test_an_error_after_the_stream_began_ends_it(registry, api, workdir):
    _push(registry, workdir, "api/corrupt", {"data": os.urandom(2048)})
    layer = registry.manifest("api/corrupt:latest")["layers"][0]["digest"]
    with open(registry.blob_data_path(layer), "r+b") as f:
        f.write(b"garbage!")
    response = await client_images._request(api.client, "POST", "/image/create",
                                             {"imageName": f"{registry.host}/api/corrupt"})
    assert response.code == 200
    lines = [json.loads(line) for line in (await response.content()).splitlines() if line.strip()]
    assert lines[0]["status"] == "Pulling from api/corrupt"
    assert "digest mismatch" in lines[-1]["error"] and lines[-1]["errorDetail"]["message"] == lines[-1]["error"]
    with pytest.raises(HyperClientError, match="digest mismatch"):
        await client_images.pull(api.client, f"{registry.host}/api/corrupt")
    assert await client_images.images(api.client) == []


def _docker_save_tar(layer: bytes, config: dict, tags: list[str]) -> bytes:
    """The legacy ``docker save`` format: manifest.json, <id>.json, <dir>/layer.tar (+ a linked duplicate)."""
    config_bytes = json.dumps(config).encode()
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        add("abc/layer.tar", layer)
        link = tarfile.TarInfo("def/layer.tar")
        link.type, link.linkname = tarfile.SYMTYPE, "../abc/layer.tar"
        tar.addfile(link)
        add("cfg.json", config_bytes)
        add("manifest.json", json.dumps([{"Config": "cfg.json", "RepoTags": tags,
                                          "Layers": ["abc/layer.tar", "def/layer.tar"]}]).encode())
    return buffer.getvalue()


@pytest.mark.timeout(60)
@pytest_twisted.ensureDeferred
async def test_save_and_load_round_trip(api, workdir):
    busybox = await api.service.in_thread(ensure_busybox, api.service.store)
    archive = os.path.join(workdir, "busybox.tar")
    with open(archive, "wb") as f:
        size = await client_images.save(api.client, ["busybox"], f)
    assert size == os.path.getsize(archive) > 1_000_000
    with tarfile.open(archive) as tar:
        names = tar.getnames()
        index = json.load(tar.extractfile("index.json"))
        docker = json.load(tar.extractfile("manifest.json"))
    assert {"oci-layout", "index.json", "manifest.json"} <= set(names)
    assert index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"] == \
        "docker.io/library/busybox:latest"
    assert docker[0]["RepoTags"] == ["busybox:latest"]
    # Removed, then loaded back: the same image.
    await client_images.remove(api.client, "busybox")
    with open(archive, "rb") as f:
        assert await client_images.load(api.client, f) == ["Loaded image: busybox:latest"]
    assert api.service.lookup("busybox").id == busybox.id
    assert os.path.isfile(os.path.join(api.service.store.rootfs_dir(busybox.id), "bin/busybox"))
    # skopeo reads what we save as an OCI layout
    import subprocess

    extracted = os.path.join(workdir, "extracted")
    with tarfile.open(archive) as tar:
        tar.extractall(extracted)
    inspect = subprocess.run(["skopeo", "inspect", f"oci:{extracted}:docker.io/library/busybox:latest"],
                             capture_output=True, text=True, check=True)
    assert json.loads(inspect.stdout)["Digest"] == busybox.manifest_digest
    # unknown names: 404
    with pytest.raises(HyperClientError) as unknown:
        await client_images.save(api.client, ["nothere"], io.BytesIO())
    assert unknown.value.status == 404


@pytest.mark.timeout(60)
@pytest_twisted.ensureDeferred
async def test_load_a_docker_save_tar_and_refuse_what_is_not_an_image(api, workdir):
    layer = tar_layer({"bin/": "dir/", "bin/tool": b"#!/bin/sh\n"}, compress=False)
    diff_id = "sha256:" + hashlib.sha256(layer).hexdigest()
    config = {"architecture": "amd64", "os": "linux", "config": {"Cmd": ["tool"]},
              "rootfs": {"type": "layers", "diff_ids": [diff_id, diff_id]}}  # the layer twice, as the tar has it
    lines = await client_images.load(api.client, io.BytesIO(_docker_save_tar(layer, config, ["legacy/app:1"])))
    assert lines == ["Loaded image: legacy/app:1"]
    image = api.service.lookup("legacy/app:1")
    assert image.run_config["Cmd"] == ["tool"]
    assert open(os.path.join(api.service.store.rootfs_dir(image.id), "bin/tool"), "rb").read() == b"#!/bin/sh\n"
    not_an_image = io.BytesIO()
    with tarfile.open(fileobj=not_an_image, mode="w") as tar:
        info = tarfile.TarInfo("README")
        info.size = 5
        tar.addfile(info, io.BytesIO(b"hello"))
    for body, message in [(not_an_image.getvalue(), "neither index.json"), (b"x" * 2000, "not a tar"),
                          (b"", "must be an image archive")]:
        with pytest.raises(HyperClientError) as refused:
            await client_images.load(api.client, io.BytesIO(body))
        assert refused.value.status == 400 and message in refused.value.message, refused.value.message
    hostile = io.BytesIO()
    with tarfile.open(fileobj=hostile, mode="w") as tar:
        info = tarfile.TarInfo("../../evil")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(HyperClientError) as refused:
        await client_images.load(api.client, io.BytesIO(hostile.getvalue()))
    assert refused.value.status == 400 and "escapes" in refused.value.message
    assert [i.names for i in api.service.store.images()] == [("docker.io/legacy/app:1",)]


@pytest.mark.timeout(60)
@pytest_twisted.ensureDeferred
async def test_hyperctl_pull_images_rmi_save_load(registry, api, workdir):
    _push(registry, workdir, "cli/app", {"app": b"cli"})
    name = f"{registry.host}/cli/app"
    status, out, err = await api.hyperctl("pull", name)
    assert status == 0, err
    assert "Pulling from cli/app" in out and "Pull complete" in out
    assert f"Status: Downloaded newer image for {name}:latest" in out
    status, out, _ = await api.hyperctl("images")
    header, row = out.splitlines()
    assert header.split()[:3] == ["REPOSITORY", "TAG", "IMAGE"]
    image = api.service.lookup(name)
    assert row.split()[:3] == [name, "latest", image.id[:12]]
    status, out, _ = await api.hyperctl("images", "-q")
    assert out == f"{image.id[:12]}\n"
    archive = os.path.join(workdir, "cli.tar")
    status, _, err = await api.hyperctl("save", "-o", archive, name)
    assert status == 0 and os.path.getsize(archive) > 0, err
    status, out, _ = await api.hyperctl("rmi", name)
    assert out == f"Untagged: {name}:latest\nDeleted: sha256:{image.id}\n"
    status, out, err = await api.hyperctl("rmi", name)
    assert status == 1 and "no such image" in err
    status, out, err = await api.hyperctl("load", "-i", archive)
    assert (status, out) == (0, f"Loaded image: {name}:latest\n"), err
    status, _, err = await api.hyperctl("pull", f"{registry.host}/cli/nothere")
    assert status == 1 and "hyperctl ERROR: no such image" in err


def test_progress_display_draws_one_line_per_layer():
    out = io.StringIO()
    display = client_images.ProgressDisplay(out, tty=True)
    display({"status": "Pulling from x", "id": "latest"})
    display({"status": "Pulling fs layer", "progressDetail": {}, "id": "aaa"})
    display({"status": "Pulling fs layer", "progressDetail": {}, "id": "bbb"})
    display({"status": "Downloading", "progressDetail": {"current": 1, "total": 2}, "progress": "[==>  ]",
             "id": "aaa"})
    text = out.getvalue()
    assert text.startswith("latest: Pulling from x\n")
    assert text.endswith("\x1b[2A\x1b[2Kaaa: Downloading [==>  ]\n\x1b[2Kbbb: Pulling fs layer\n")
    plain = io.StringIO()
    display = client_images.ProgressDisplay(plain, tty=False)
    for current in (1, 2):
        display({"status": "Downloading", "progressDetail": {"current": current, "total": 2}, "id": "aaa"})
    assert plain.getvalue() == "aaa: Downloading\n"
