"""Pulls from a real docker-registry: formats, auth, multi-arch, bad input, shared and interrupted downloads."""

from __future__ import annotations

import base64
import json
import os
import random

import pytest
import pytest_twisted
from twisted.internet import defer, protocol, reactor
from twisted.protocols import portforward

from hyperd.errors import NotFound
from hyperd.image.registry import Credentials, RegistryClient, RegistryError, Unauthorized, parse_registry_auth
from hyperd.image.service import ImageService
from hyperd.image.store import ImageStore
from hyperd.image.unpack import LayerError
from tests.image.conftest import PASSWORD, USER, image_manifest, multi_arch_index, tar_layer, write_layout


def _blob_digests(store: ImageStore) -> set[str]:
    return {e for e in os.listdir(store.blobs_dir)}


def _image(workdir: str, name: str, files: list[dict], compress: bool | list[bool] = True, arch: str = "amd64",
           cmd: str = "sh") -> tuple[str, dict]:
    layout = os.path.join(workdir, f"layout-{name.replace('/', '-')}-{arch}")
    flags = compress if isinstance(compress, list) else [compress] * len(files)
    desc = image_manifest(layout, [tar_layer(f, c) for f, c in zip(files, flags, strict=True)],
                          {"config": {"Env": ["PATH=/bin"], "Cmd": [cmd]}}, arch)
    write_layout(layout, [("latest", desc)])
    return layout, desc


@pytest.mark.timeout(60)
@pytest_twisted.ensureDeferred
async def test_pull_gzip_and_plain_layers_with_progress(registry, service, workdir):
    layout, desc = _image(workdir, "two", [{"bin/": "dir/", "bin/hello": b"hello\n", "etc/": "dir/",
                                            "etc/motd": b"one"},
                                           {"etc/motd": b"two", "etc/.wh.gone": b"", "bin/link": "->hello"}],
                          compress=[True, False])
    registry.upload(layout, desc, "test/two:v1")  # byte for byte: one layer stays uncompressed
    assert [layer["mediaType"].endswith("gzip") for layer in registry.manifest("test/two:v1")["layers"]] == \
        [True, False]
    events = []
    image = await service.pull(f"{registry.host}/test/two", "v1", progress=events.append)
    rootfs = service.store.rootfs_dir(image.id)
    assert open(os.path.join(rootfs, "etc/motd"), "rb").read() == b"two"
    assert os.readlink(os.path.join(rootfs, "bin/link")) == "hello"
    assert image.names == (f"{registry.host}/test/two:v1",)
    assert image.run_config["Cmd"] == ["sh"]
    statuses = [e["status"] for e in events]
    assert statuses[0] == "Pulling from test/two" and events[0]["id"] == "v1"
    for status in ("Pulling fs layer", "Downloading", "Verifying Checksum", "Download complete", "Extracting",
                   "Pull complete"):
        assert status in statuses
    downloading = [e for e in events if e["status"] == "Downloading"]
    assert all(set(e["progressDetail"]) == {"current", "total"} and e["id"] for e in downloading)
    assert statuses[-2].startswith("Digest: sha256:")
    assert statuses[-1] == f"Status: Downloaded newer image for {registry.host}/test/two:v1"
    # The same pull again: nothing downloaded.
    again = []
    same = await service.pull(f"{registry.host}/test/two:v1", progress=again.append)
    assert same.id == image.id
    assert [e["status"] for e in again].count("Already exists") == 2
    assert again[-1]["status"] == f"Status: Image is up to date for {registry.host}/test/two:v1"
    assert service.lookup(f"{registry.host}/test/two:v1").id == image.id
    (line,) = [entry for entry in service.list() if entry.startswith(f"{registry.host}/test/two:")]
    repo_tag, image_id, created, size = line.rsplit(":", 3)
    assert repo_tag == f"{registry.host}/test/two:v1" and image_id == image.id
    assert int(created) == 1704164645 and int(size) == image.size > 0


@pytest.mark.timeout(60)
@pytest_twisted.ensureDeferred
async def test_pull_by_digest(registry, service, workdir):
    layout, desc = _image(workdir, "bydigest", [{"f": b"by digest"}])
    registry.upload(layout, desc, "test/bydigest:latest")
    image = await service.pull(f"{registry.host}/test/bydigest@{desc['digest']}")
    assert image.manifest_digest == desc["digest"]
    assert service.lookup(f"{registry.host}/test/bydigest@{desc['digest']}").id == image.id
    assert service.list()[0].startswith(f"{registry.host}/test/bydigest:<none>:{image.id}:")


@pytest.mark.timeout(60)
@pytest_twisted.ensureDeferred
async def test_pull_docker_schema_2(registry, service, workdir):
    layout, _ = _image(workdir, "docker", [{"from": b"docker"}])
    registry.push(layout, "latest", "test/docker:latest", format="v2s2")
    manifest = registry.manifest("test/docker:latest")
    assert manifest["mediaType"] == "application/vnd.docker.distribution.manifest.v2+json"
    image = await service.pull(f"{registry.host}/test/docker")
    assert open(os.path.join(service.store.rootfs_dir(image.id), "from"), "rb").read() == b"docker"
    assert json.loads(service.store.read_blob(image.manifest_digest))["mediaType"] == manifest["mediaType"]


@pytest.mark.timeout(60)
@pytest_twisted.ensureDeferred
async def test_multi_arch_index_picks_linux_amd64(registry, service, workdir):
    layout = os.path.join(workdir, "multi")
    arm = image_manifest(layout, [tar_layer({"arch": b"arm64"})], arch="arm64")
    amd = image_manifest(layout, [tar_layer({"arch": b"amd64"})], arch="amd64")
    write_layout(layout, [("latest", multi_arch_index(layout, {"arm64": arm, "amd64": amd}))])
    registry.push_all(layout, "test/multi:latest")
    image = await service.pull(f"{registry.host}/test/multi")
    assert image.manifest_digest == amd["digest"]
    assert open(os.path.join(service.store.rootfs_dir(image.id), "arch"), "rb").read() == b"amd64"
    # An index without linux/amd64 is not found, saying why.
    only_arm = os.path.join(workdir, "armonly")
    arm2 = image_manifest(only_arm, [tar_layer({"arch": b"arm64"})], arch="arm64")
    write_layout(only_arm, [("latest", multi_arch_index(only_arm, {"arm64": arm2}))])
    registry.push_all(only_arm, "test/armonly:latest")
    with pytest.raises(NotFound, match="no linux/amd64"):
        await service.pull(f"{registry.host}/test/armonly")


@pytest.mark.timeout(60)
@pytest_twisted.ensureDeferred
async def test_basic_auth(auth_registry, service, workdir):
    layout, _ = _image(workdir, "secret", [{"secret": b"only for alice"}])
    auth_registry.push(layout, "latest", "test/secret:latest")
    name = f"{auth_registry.host}/test/secret"
    with pytest.raises(Unauthorized, match="requires a user name and password"):
        await service.pull(name)
    with pytest.raises(Unauthorized, match="refused with the credentials given"):
        await service.pull(name, auth=Credentials(USER, "wrong"))
    header = base64.urlsafe_b64encode(json.dumps({"username": USER, "password": PASSWORD}).encode()).rstrip(b"=")
    image = await service.pull(name, auth=parse_registry_auth(header))
    assert open(os.path.join(service.store.rootfs_dir(image.id), "secret"), "rb").read() == b"only for alice"


def test_registry_auth_header_forms():
    both = {"username": "u", "password": "p:w"}
    assert parse_registry_auth(base64.urlsafe_b64encode(json.dumps(both).encode())) == Credentials("u", "p:w")
    legacy = {"auth": base64.b64encode(b"u:p:w").decode()}
    assert parse_registry_auth(base64.urlsafe_b64encode(json.dumps(legacy).encode())) == Credentials("u", "p:w")
    assert parse_registry_auth(base64.urlsafe_b64encode(b"{}")) is None
    assert parse_registry_auth(None) is None


@pytest.mark.timeout(60)
@pytest_twisted.ensureDeferred
async def test_unknown_image_and_unreachable_registry(registry, service):
    with pytest.raises(NotFound, match=f"no such image: {registry.host}/nothere/at-all:latest"):
        await service.pull(f"{registry.host}/nothere/at-all")
    from tests.image.conftest import free_port

    dead = f"127.0.0.1:{free_port()}"
    with pytest.raises(RegistryError, match=f"registry {dead} is unreachable"):
        await service.pull(f"{dead}/some/image")
    assert service.store.images() == []


@pytest.mark.timeout(60)
@pytest_twisted.ensureDeferred
async def test_a_blob_whose_digest_does_not_match_is_refused(registry, service, workdir):
    layout, desc = _image(workdir, "corrupt", [{"data": os.urandom(4096)}])
    registry.push(layout, "latest", "test/corrupt:latest")
    manifest = registry.manifest("test/corrupt:latest")
    # same length, other bytes: the registry serves it as it is
    with open(registry.blob_data_path(manifest["layers"][0]["digest"]), "r+b") as f:
        f.seek(100)
        f.write(b"X" * 16)
    with pytest.raises(RegistryError, match="digest mismatch"):
        await service.pull(f"{registry.host}/test/corrupt")
    assert not service.store.has_blob(manifest["layers"][0]["digest"])
    assert [e for e in os.listdir(service.store.blobs_dir) if e.startswith(".")] == []
    assert service.store.images() == []


@pytest.mark.timeout(60)
@pytest_twisted.ensureDeferred
async def test_a_hostile_layer_is_refused_naming_the_entry(registry, service, workdir):
    layout, _ = _image(workdir, "hostile", [{"ok": b"fine", "../../escape": b"x"}])
    registry.push(layout, "latest", "test/hostile:latest")
    with pytest.raises(LayerError, match=r"'\.\./\.\./escape'"):
        await service.pull(f"{registry.host}/test/hostile")
    assert service.store.images() == []
    assert not os.path.exists(os.path.join(service.store.root, "..", "escape"))
    assert [e for e in os.listdir(service.store.images_dir)] == []


@pytest.mark.timeout(90)
@pytest_twisted.ensureDeferred
async def test_concurrent_pulls_download_each_blob_once(registry, service, workdir):
    shared = tar_layer({"big": random.randbytes(3 * 1024 * 1024)}, compress=False)
    layout = os.path.join(workdir, "shared")
    one = image_manifest(layout, [shared, tar_layer({"one": b"1"})])
    two = image_manifest(layout, [shared, tar_layer({"two": b"2"})])
    write_layout(layout, [("one", one), ("two", two)])
    registry.push(layout, "one", "test/shared-one:latest")
    registry.push(layout, "two", "test/shared-two:latest")
    events: dict[str, list] = {"one": [], "two": []}
    a, b, c = await defer.gatherResults([
        defer.ensureDeferred(service.pull(f"{registry.host}/test/shared-one", progress=events["one"].append)),
        defer.ensureDeferred(service.pull(f"{registry.host}/test/shared-two", progress=events["two"].append)),
        defer.ensureDeferred(service.pull(f"{registry.host}/test/shared-one")),
    ])
    assert a.id == c.id != b.id
    layer = registry.manifest("test/shared-one:latest")["layers"][0]["digest"]
    assert layer == registry.manifest("test/shared-two:latest")["layers"][0]["digest"]
    gets = [line for line in registry.log_lines(f"blobs/{layer} ") if '"GET ' in line]
    assert len(gets) == 1, gets
    assert any(e["status"] == "Waiting" for e in events["one"] + events["two"])


class _CuttingProxy(portforward.ProxyServer):
    """Forwards to the registry; the factory's ``cuts`` first connections die after ``cut_at`` bytes down."""

    def connectionMade(self):
        self.factory.connections += 1
        self.limit = self.factory.cut_at if self.factory.cuts > 0 else None
        if self.limit is not None:
            self.factory.cuts -= 1
        self.sent = 0
        super().connectionMade()

    def write_down(self, data):
        if self.limit is not None and self.sent + len(data) > self.limit:
            self.transport.write(data[: self.limit - self.sent])
            if self.factory.stall:  # swallow the rest: the connection stays open, silent
                self.sent = self.limit
                return
            self.transport.abortConnection()
            if self.peer is not None:
                self.peer.transport.abortConnection()
            self.limit = None
            return
        self.sent += len(data)
        self.transport.write(data)


class _CuttingClient(portforward.ProxyClient):
    def dataReceived(self, data):
        self.peer.write_down(data)


class _CuttingClientFactory(portforward.ProxyClientFactory):
    protocol = _CuttingClient


class _CuttingProxyFactory(protocol.Factory):
    protocol = _CuttingProxy

    def __init__(self, host, port, cut_at, cuts, stall=False):
        self.host, self.port, self.cut_at, self.cuts, self.connections = host, port, cut_at, cuts, 0
        self.stall = stall


_CuttingProxy.clientProtocolFactory = _CuttingClientFactory


@pytest.fixture
def cutting_proxy(registry):
    factories = []

    def make(cut_at: int, cuts: int = 1, stall: bool = False):
        factory = _CuttingProxyFactory("127.0.0.1", registry.port, cut_at, cuts, stall)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        factories.append(port)
        return factory, f"127.0.0.1:{port.getHost().port}"

    try:
        yield make
    finally:
        for port in factories:
            pytest_twisted.blockon(defer.maybeDeferred(port.stopListening))


@pytest.mark.timeout(90)
@pytest_twisted.ensureDeferred
async def test_a_pull_cut_off_halfway_leaves_nothing_and_a_retry_works(registry, workdir, cutting_proxy):
    layout, desc = _image(workdir, "cut", [{"big": random.randbytes(2 * 1024 * 1024)}], compress=False)
    registry.push(layout, "latest", "test/cut:latest")
    factory, host = cutting_proxy(cut_at=1024 * 1024, cuts=1)
    store = ImageStore(os.path.join(workdir, "root"))
    no_retry = ImageService(reactor, store, registry=None)
    no_retry.registry.retries = 0
    try:
        with pytest.raises(RegistryError, match="cut off after"):
            await no_retry.pull(f"{host}/test/cut")
        # nothing half-written stays, and no image
        assert not [e for e in os.listdir(store.blobs_dir) if e.startswith(".")]
        assert store.images() == []
        layer = registry.manifest("test/cut:latest")["layers"][0]
        assert not store.has_blob(layer["digest"])
        # pulled again (the proxy no longer cuts): whole and verified
        image = await no_retry.pull(f"{host}/test/cut")
        assert os.path.getsize(os.path.join(store.rootfs_dir(image.id), "big")) == 2 * 1024 * 1024
    finally:
        await no_retry.close()


@pytest.mark.timeout(90)
@pytest_twisted.ensureDeferred
async def test_a_download_cut_off_is_resumed_within_the_pull(registry, workdir, cutting_proxy):
    layout, desc = _image(workdir, "resume", [{"big": random.randbytes(3 * 1024 * 1024)}], compress=False)
    registry.push(layout, "latest", "test/resume:latest")
    factory, host = cutting_proxy(cut_at=1024 * 1024, cuts=2)
    store = ImageStore(os.path.join(workdir, "root"))
    svc = ImageService(reactor, store)
    svc.registry.backoff = 0.05
    try:
        image = await svc.pull(f"{host}/test/resume")
        assert os.path.getsize(os.path.join(store.rootfs_dir(image.id), "big")) == 3 * 1024 * 1024
        assert factory.cuts == 0 and factory.connections >= 3
        layer = registry.manifest("test/resume:latest")["layers"][0]
        resumed = [line for line in registry.log_lines(f"test/resume/blobs/{layer['digest']} ") if '" 206 ' in line]
        assert resumed, "the retry did not resume with a Range request"
    finally:
        await svc.close()


@pytest.mark.timeout(90)
@pytest_twisted.ensureDeferred
async def test_a_stalled_download_is_cut_and_resumed(registry, workdir, cutting_proxy):
    layout, _ = _image(workdir, "stall", [{"big": random.randbytes(2 * 1024 * 1024)}], compress=False)
    registry.push(layout, "latest", "test/stall:latest")
    factory, host = cutting_proxy(cut_at=1024 * 1024, cuts=1, stall=True)
    store = ImageStore(os.path.join(workdir, "root"))
    svc = ImageService(reactor, store)
    svc.registry.backoff, svc.registry.stall_timeout = 0.05, 0.5
    try:
        image = await svc.pull(f"{host}/test/stall")
        assert os.path.getsize(os.path.join(store.rootfs_dir(image.id), "big")) == 2 * 1024 * 1024
        assert factory.connections >= 2
    finally:
        await svc.close()


def test_plain_http_only_for_loopback_and_insecure_registries():
    client = RegistryClient(reactor, ["my.registry:5000", "10.1.2.3"])
    assert client.base_url("127.0.0.1:5000") == "http://127.0.0.1:5000"
    assert client.base_url("localhost:5000") == "http://localhost:5000"
    assert client.base_url("[::1]:5000") == "http://[::1]:5000"
    assert client.base_url("my.registry:5000") == "http://my.registry:5000"
    assert client.base_url("10.1.2.3:443") == "http://10.1.2.3:443"
    assert client.base_url("quay.io") == "https://quay.io"
    assert client.base_url("docker.io") == "https://registry-1.docker.io"
