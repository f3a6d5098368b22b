"""Fixtures for image tests: a real Debian ``docker-registry`` (anonymous, and one with basic auth), OCI
layouts built here and pushed with ``skopeo copy``, and an ImageService on a temp store.

Each registry runs on 127.0.0.1:<free port> with its storage in a temp dir, for the whole session, and is
killed (its process group) at teardown, even after failures.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import tarfile
import tempfile
import time
import urllib.request

import pytest
import pytest_twisted

REGISTRY = "/usr/bin/docker-registry"
USER, PASSWORD = "alice", "s3cret-pw"


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Registry:
    """A docker-registry process; ``host`` is ``127.0.0.1:PORT``."""

    def __init__(self, htpasswd: bool = False) -> None:
        self.dir = tempfile.mkdtemp(prefix="hdreg", dir="/tmp")
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.auth = htpasswd
        auth = ""
        if htpasswd:
            path = os.path.join(self.dir, "htpasswd")
            with open(path, "wb") as f:
                f.write(subprocess.run(["htpasswd", "-Bbn", USER, PASSWORD], check=True,
                                       capture_output=True).stdout)
            auth = f"auth:\n  htpasswd: {{realm: hyperd-test, path: {path}}}\n"
        config = os.path.join(self.dir, "config.yml")
        with open(config, "w") as f:
            f.write("version: 0.1\nlog: {level: warn, fields: {service: registry}}\n"
                    f"storage:\n  filesystem: {{rootdirectory: {self.dir}/data}}\n  delete: {{enabled: true}}\n"
                    f"http: {{addr: '{self.host}', secret: hyperd-test}}\n" + auth)
        self.log = open(os.path.join(self.dir, "registry.log"), "wb")
        self.proc = subprocess.Popen([REGISTRY, "serve", config], stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + 15
        while True:
            try:
                urllib.request.urlopen(f"http://{self.host}/v2/", timeout=1)
                break
            except urllib.error.HTTPError:
                break  # 401 with auth: it is up
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"docker-registry did not start on {self.host}") from None
                time.sleep(0.05)

    def push(self, layout: str, tag: str, dest: str, format: str | None = None) -> None:
        """``skopeo copy`` the image ``tag`` of an OCI layout to ``<host>/<dest>`` (it gzips plain layers;
        ``format="v2s2"`` makes a Docker schema 2 manifest)."""
        creds = ["--dest-creds", f"{USER}:{PASSWORD}"] if self.auth else []
        fmt = ["--format", format] if format else []
        subprocess.run(["skopeo", "copy", "--quiet", "--dest-tls-verify=false", *creds, *fmt,
                        f"oci:{layout}:{tag}", f"docker://{self.host}/{dest}"], check=True, capture_output=True)

    def upload(self, layout: str, desc: dict, dest: str) -> None:
        """Push an image as it is, byte for byte (skopeo would compress plain layers): the v2 upload API."""
        repo, _, tag = dest.partition(":")
        manifest = _read_blob(layout, desc["digest"])
        parsed = json.loads(manifest)
        for blob in [parsed["config"], *parsed["layers"]]:
            start = urllib.request.Request(f"http://{self.host}/v2/{repo}/blobs/uploads/", method="POST")
            location = urllib.request.urlopen(start).headers["Location"]
            if location.startswith("/"):
                location = f"http://{self.host}{location}"
            put = urllib.request.Request(location + ("&" if "?" in location else "?") + f"digest={blob['digest']}",
                                         data=_read_blob(layout, blob["digest"]), method="PUT",
                                         headers={"Content-Type": "application/octet-stream"})
            urllib.request.urlopen(put).read()
        put = urllib.request.Request(f"http://{self.host}/v2/{repo}/manifests/{tag or 'latest'}", data=manifest,
                                     method="PUT", headers={"Content-Type": parsed["mediaType"]})
        urllib.request.urlopen(put).read()

    def manifest(self, dest: str) -> dict:
        """The manifest the registry holds for ``repo:tag``."""
        repo, _, tag = dest.partition(":")
        request = urllib.request.Request(
            f"http://{self.host}/v2/{repo}/manifests/{tag or 'latest'}",
            headers={"Accept": "application/vnd.oci.image.manifest.v1+json, "
                               "application/vnd.docker.distribution.manifest.v2+json"})
        if self.auth:
            request.add_header("Authorization", "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode())
        return json.loads(urllib.request.urlopen(request).read())

    def blob_data_path(self, digest: str) -> str:
        """Where the registry keeps a blob on disk."""
        hexdigest = digest.split(":", 1)[1]
        return os.path.join(self.dir, "data/docker/registry/v2/blobs/sha256", hexdigest[:2], hexdigest, "data")

    def log_lines(self, needle: str) -> list[str]:
        with open(os.path.join(self.dir, "registry.log"), errors="replace") as f:
            return [line for line in f if needle in line]

    def push_all(self, layout: str, dest: str) -> None:
        """Push a multi-image index (``--all``)."""
        creds = ["--dest-creds", f"{USER}:{PASSWORD}"] if self.auth else []
        subprocess.run(["skopeo", "copy", "--quiet", "--all", "--dest-tls-verify=false", *creds,
                        f"oci:{layout}", f"docker://{self.host}/{dest}"], check=True, capture_output=True)

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def registry():
    r = Registry()
    try:
        yield r
    finally:
        r.stop()


@pytest.fixture(scope="session")
def auth_registry():
    r = Registry(htpasswd=True)
    try:
        yield r
    finally:
        r.stop()


# --- OCI layouts built by the tests ---------------------------------------------------------------------


def tar_layer(files: dict[str, bytes | str], compress: bool = True) -> bytes:
    """A layer: name -> bytes (a file), or "dir/" (a directory), or "->target" (a symlink)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name.rstrip("/"))
            if isinstance(data, str) and data.startswith("->"):
                info.type, info.linkname, info.mode = tarfile.SYMTYPE, data[2:], 0o777
                tar.addfile(info)
            elif isinstance(data, str) and data == "dir/":
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            else:
                info.size, info.mode = len(data), 0o755
                tar.addfile(info, io.BytesIO(data))
    raw = buffer.getvalue()
    return gzip.compress(raw, compresslevel=1, mtime=0) if compress else raw


def _read_blob(layout: str, digest: str) -> bytes:
    with open(os.path.join(layout, "blobs", *digest.split(":", 1)), "rb") as f:
        return f.read()


def _put(layout: str, data: bytes) -> dict:
    digest = hashlib.sha256(data).hexdigest()
    os.makedirs(os.path.join(layout, "blobs", "sha256"), exist_ok=True)
    with open(os.path.join(layout, "blobs", "sha256", digest), "wb") as f:
        f.write(data)
    return {"digest": f"sha256:{digest}", "size": len(data)}


def _uncompressed_digest(layer: bytes) -> str:
    raw = gzip.decompress(layer) if layer[:2] == b"\x1f\x8b" else layer
    return "sha256:" + hashlib.sha256(raw).hexdigest()


def image_manifest(layout: str, layers: list[bytes], config: dict | None = None, arch: str = "amd64") -> dict:
    """Write config and layers into ``layout``; return the manifest descriptor (manifest written too)."""
    config = dict(config or {"config": {"Env": ["PATH=/bin"], "Cmd": ["sh"]}})
    config.update({"architecture": arch, "os": "linux", "created": "2024-01-02T03:04:05.123456789Z",
                   "rootfs": {"type": "layers", "diff_ids": [_uncompressed_digest(layer) for layer in layers]}})
    config_desc = _put(layout, json.dumps(config).encode())
    layer_descs = []
    for layer in layers:
        media = "application/vnd.oci.image.layer.v1.tar" + ("+gzip" if layer[:2] == b"\x1f\x8b" else "")
        layer_descs.append(dict(_put(layout, layer), mediaType=media))
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": dict(config_desc, mediaType="application/vnd.oci.image.config.v1+json"),
                "layers": layer_descs}
    desc = _put(layout, json.dumps(manifest).encode())
    return dict(desc, mediaType=manifest["mediaType"], platform={"architecture": arch, "os": "linux"})


def write_layout(layout: str, entries: list[tuple[str, dict]]) -> str:
    """Write ``index.json`` naming each (tag, descriptor)."""
    os.makedirs(layout, exist_ok=True)
    with open(os.path.join(layout, "oci-layout"), "w") as f:
        json.dump({"imageLayoutVersion": "1.0.0"}, f)
    manifests = [dict(desc, annotations={"org.opencontainers.image.ref.name": tag}) for tag, desc in entries]
    with open(os.path.join(layout, "index.json"), "w") as f:
        json.dump({"schemaVersion": 2, "manifests": manifests}, f)
    return layout


def multi_arch_index(layout: str, per_arch: dict[str, dict]) -> dict:
    """An OCI index blob listing the given per-architecture manifest descriptors."""
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
             "manifests": [dict(desc, platform={"architecture": arch, "os": "linux"})
                           for arch, desc in per_arch.items()]}
    return dict(_put(layout, json.dumps(index).encode()), mediaType=index["mediaType"])


@pytest.fixture
def workdir():
    path = tempfile.mkdtemp(prefix="hdimg", dir="/tmp")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def service(workdir):
    """An ImageService on a temp store (closed at teardown)."""
    from twisted.internet import defer, reactor

    from hyperd.image.service import ImageService
    from hyperd.image.store import ImageStore

    svc = ImageService(reactor, ImageStore(os.path.join(workdir, "root")))
    try:
        yield svc
    finally:
        pytest_twisted.blockon(defer.ensureDeferred(svc.close()))
