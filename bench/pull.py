"""Benchmark: pulling a ~50 MB multi-layer image from a local registry, hyperd against ``skopeo copy``.

Starts Debian's ``docker-registry`` on 127.0.0.1 (storage in a temp dir), builds an image of ``--layers``
gzip layers of incompressible data (``--mb`` MB in all) plus a small one, pushes it with skopeo, then
alternates, ``-n`` times each on a fresh destination:

- hyperd: ``ImageService.pull`` into a fresh store: manifest, blobs streamed to disk and verified, layers
  unpacked into the rootfs (what a pod needs);
- skopeo: ``skopeo copy docker://... oci:<dir>``: manifest and blobs to an OCI layout, verified, not
  unpacked.

Prints the medians, hyperd's download phase alone (to the last ``Download complete``), and the ratio of
the totals (goal ≤ 1.5).

    .venv/bin/python bench/pull.py [-n 3] [--mb 50] [--layers 5]
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request

from twisted.internet import defer, task

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import free_port  # noqa: E402

from hyperd.image.service import ImageService  # noqa: E402
from hyperd.image.store import ImageStore  # noqa: E402


def start_registry(workdir: str) -> tuple[subprocess.Popen, str]:
    host = f"127.0.0.1:{free_port()}"
    config = os.path.join(workdir, "registry.yml")
    with open(config, "w") as f:
        f.write("version: 0.1\nlog: {level: error, accesslog: {disabled: true}}\n"
                f"storage:\n  filesystem: {{rootdirectory: {workdir}/registry}}\n"
                f"http: {{addr: '{host}', secret: bench}}\n")
    log = open(os.path.join(workdir, "registry.log"), "wb")  # noqa: SIM115 - lives as long as the registry
    proc = subprocess.Popen(["docker-registry", "serve", config], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.monotonic() + 15
    while True:
        try:
            urllib.request.urlopen(f"http://{host}/v2/", timeout=1)
            return proc, host
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("docker-registry did not start") from None
            time.sleep(0.05)


def build_layout(layout: str, total_mb: int, layers: int) -> int:
    """An OCI layout with ``layers`` gzip layers of random data; returns the bytes of all layers."""
    blobs = os.path.join(layout, "blobs", "sha256")
    os.makedirs(blobs)

    def put(data: bytes) -> dict:
        digest = hashlib.sha256(data).hexdigest()
        with open(os.path.join(blobs, digest), "wb") as f:
            f.write(data)
        return {"digest": f"sha256:{digest}", "size": len(data)}

    descs, diff_ids, size = [], [], 0
    per_layer = total_mb * 1024 * 1024 // layers
    for i in range(layers + 1):
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            files = {f"layer{i}/": None} if i < layers else {"etc/": None}
            if i < layers:
                # a few files per layer, like a real image's; incompressible, so the bytes on the wire are real
                for j in range(8):
                    files[f"layer{i}/file{j}"] = os.urandom(per_layer // 8)
            else:
                files["etc/hostname"] = b"bench\n"
            for name, data in files.items():
                info = tarfile.TarInfo(name.rstrip("/"))
                if data is None:
                    info.type, info.mode = tarfile.DIRTYPE, 0o755
                    tar.addfile(info)
                else:
                    info.size, info.mode = len(data), 0o644
                    tar.addfile(info, io.BytesIO(data))
        raw = buffer.getvalue()
        diff_ids.append("sha256:" + hashlib.sha256(raw).hexdigest())
        compressed = gzip.compress(raw, compresslevel=1, mtime=0)
        size += len(compressed)
        descs.append(dict(put(compressed), mediaType="application/vnd.oci.image.layer.v1.tar+gzip"))
    config = {"architecture": "amd64", "os": "linux", "config": {"Cmd": ["sh"]},
              "rootfs": {"type": "layers", "diff_ids": diff_ids}}
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": dict(put(json.dumps(config).encode()), mediaType="application/vnd.oci.image.config.v1+json"),
                "layers": descs}
    desc = dict(put(json.dumps(manifest).encode()), mediaType=manifest["mediaType"],
                annotations={"org.opencontainers.image.ref.name": "latest"})
    with open(os.path.join(layout, "index.json"), "w") as f:
        json.dump({"schemaVersion": 2, "manifests": [desc]}, f)
    with open(os.path.join(layout, "oci-layout"), "w") as f:
        json.dump({"imageLayoutVersion": "1.0.0"}, f)
    return size


def skopeo_pull(host: str, dest: str) -> float:
    t0 = time.monotonic()
    subprocess.run(["skopeo", "copy", "--quiet", "--src-tls-verify=false", f"docker://{host}/bench/big:latest",
                    f"oci:{dest}:latest"], check=True)
    return time.monotonic() - t0


async def hyperd_pull(reactor, host: str, root: str, expected_bytes: int) -> tuple[float, float]:
    service = ImageService(reactor, ImageStore(root))
    marks = []
    try:
        t0 = time.monotonic()

        def progress(message: dict) -> None:
            if message.get("status") == "Download complete":
                marks.append(time.monotonic() - t0)

        image = await service.pull(f"{host}/bench/big", progress=progress)
        elapsed = time.monotonic() - t0
        rootfs = service.store.rootfs_dir(image.id)
        unpacked = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(rootfs) for f in files)
        assert unpacked >= expected_bytes, (unpacked, expected_bytes)  # really there, not just fast
        return elapsed, max(marks)
    finally:
        await service.close()


async def main(reactor, args) -> None:
    workdir = tempfile.mkdtemp(prefix="hdbench", dir="/tmp")
    proc = None
    try:
        proc, host = start_registry(workdir)
        layout = os.path.join(workdir, "layout")
        size = build_layout(layout, args.mb, args.layers)
        subprocess.run(["skopeo", "copy", "--quiet", "--dest-tls-verify=false", f"oci:{layout}:latest",
                        f"docker://{host}/bench/big:latest"], check=True)
        print(f"image: {args.layers + 1} layers, {size / 1e6:.1f} MB compressed, registry {host}")
        ours, downloads, theirs = [], [], []
        for i in range(args.n):
            root, dest = os.path.join(workdir, f"root{i}"), os.path.join(workdir, f"skopeo{i}")
            file_bytes = args.mb * 1024 * 1024 // args.layers // 8 * 8 * args.layers
            total, download = await hyperd_pull(reactor, host, root, file_bytes)
            ours.append(total)
            downloads.append(download)
            theirs.append(await defer.Deferred.fromCoroutine(_in_thread(reactor, skopeo_pull, host, dest)))
            print(f"run {i + 1}: hyperd {total:.2f} s (downloads {download:.2f} s), skopeo {theirs[-1]:.2f} s")
            shutil.rmtree(root, ignore_errors=True)
            shutil.rmtree(dest, ignore_errors=True)
        h, d, s = statistics.median(ours), statistics.median(downloads), statistics.median(theirs)
        print(f"median hyperd pull (download + verify + unpack): {h:.2f} s  ({size / 1e6 / h:.0f} MB/s)")
        print(f"median hyperd download phase:                    {d:.2f} s")
        print(f"median skopeo copy (download + verify, no unpack): {s:.2f} s  ({size / 1e6 / s:.0f} MB/s)")
        print(f"ratio hyperd/skopeo: {h / s:.2f} (goal <= 1.5); download phase only: {d / s:.2f}")
    finally:
        if proc is not None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        shutil.rmtree(workdir, ignore_errors=True)


async def _in_thread(reactor, f, *args):
    from twisted.internet.threads import deferToThread

    return await deferToThread(f, *args)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=3, help="runs of each (default 3)")
    parser.add_argument("--mb", type=int, default=50, help="image size in MB (default 50)")
    parser.add_argument("--layers", type=int, default=5, help="big layers (default 5)")
    arguments = parser.parse_args()
    task.react(lambda reactor: defer.ensureDeferred(main(reactor, arguments)))
