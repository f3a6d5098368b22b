"""The image operations the daemon offers: pull with progress, list, remove, load and save.

:class:`ImageService` sits between the API and the :class:`~hyperd.image.store.ImageStore`. It runs on the
reactor; everything that blocks on the disk (blob writes and hashing, unpacking, tar reading and writing)
runs in its own small thread pool. A blob several pulls need at once is downloaded once: the others wait for
it. Blobs a pull or load is about to use are pinned so that a concurrent ``rmi`` does not collect them.

Progress is reported as Docker's JSON messages (``{"status", "progressDetail", "progress", "id"}``) through a
callable given to :meth:`ImageService.pull`.
"""

from __future__ import annotations

import datetime
import gzip
import json
import os
import shutil
import tarfile
import tempfile
import zlib
from collections.abc import Callable, Iterable
from typing import Any, BinaryIO

from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from hyperd.errors import BadParameter, HyperError, NotFound
from hyperd.image.reference import Reference, parse_reference
from hyperd.image.registry import Credentials, RegistryClient, RegistryError
from hyperd.image.store import (
    INDEX_TYPES,
    MANIFEST_TYPES,
    REF_ANNOTATION,
    Image,
    ImageStore,
    parse_reference_or_none,
    pick_platform,
)
from hyperd.image.unpack import LayerError, _clean, resolve

__all__ = ["ImageService", "image_list_entry", "progress_bar"]

Progress = Callable[[dict[str, Any]], None]

DOCKER_LAYER_TAR = "application/vnd.docker.image.rootfs.diff.tar"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
CONTAINERD_NAME = "io.containerd.image.name"
#: Layers downloaded at once per pull (Docker's default is 3).
CONCURRENT_DOWNLOADS = 3


def _short(digest: str) -> str:
    return digest.split(":", 1)[-1][:12]


def _size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.4g}{unit}" if unit != "B" else f"{int(n)}B"
        n /= 1000.0
    return f"{n}"


def progress_bar(current: int, total: int, width: int = 50) -> str:
    """Docker's progress text: ``[=====>      ]  1.2MB/3.4MB``."""
    if total <= 0:
        return f"{_size(current)}"
    filled = min(width, int(width * current / total))
    bar = "=" * filled + (">" if filled < width else "") + " " * max(0, width - filled - 1)
    return f"[{bar}] {_size(current):>8}/{_size(total)}"


def _created_unix(created: str) -> int:
    """RFC 3339 with up to nanoseconds (``2023-05-19T20:19:24.343729199Z``) → seconds since the epoch."""
    if not created:
        return 0
    text = created.strip().replace("Z", "+00:00")
    date, sep, rest = text.partition(".")
    if sep:  # drop fractions Python cannot read, keep the offset
        digits = len(rest) - len(rest.lstrip("0123456789"))
        text = date + rest[digits:]
    try:
        return int(datetime.datetime.fromisoformat(text).timestamp())
    except ValueError:
        return 0


def image_list_entry(image: Image, name: str | None) -> str:
    """hyperd's ``repo:tag:<id hex>:<created unix>:<virtual size>`` (``<none>`` for what is missing)."""
    repo, tag = "<none>", "<none>"
    ref = parse_reference_or_none(name) if name else None
    if ref is not None:
        repo = ref.repo
        tag = ref.tag if not ref.digest else "<none>"
    return f"{repo}:{tag}:{image.id}:{_created_unix(image.created)}:{image.size}"


class ImageService:
    """Image operations for the daemon and its API."""

    log = Logger()

    def __init__(self, reactor: Any, store: ImageStore, in_use: Callable[[], Iterable[str]] = lambda: (),
                 insecure_registries: Iterable[str] = (), threads: int = 2,
                 registry: RegistryClient | None = None) -> None:
        self.reactor = reactor
        self.store = store
        self.in_use = in_use
        self._pool = ThreadPool(minthreads=0, maxthreads=threads, name="hyperd-image")
        self._pool.start()
        self._closed = False
        # if nobody calls close(), the reactor's shutdown still stops the threads (else they block the exit)
        self._shutdown_trigger = reactor.addSystemEventTrigger("during", "shutdown", self._stop_pool)
        self.registry = registry or RegistryClient(reactor, insecure_registries, run_in_thread=self.in_thread)
        # digest -> Deferreds of the pulls waiting for the download in progress
        self._downloads: dict[str, list[defer.Deferred]] = {}
        self.tmp_dir = os.path.join(store.root, "tmp")
        os.makedirs(self.tmp_dir, mode=0o700, exist_ok=True)
        store.clean_temporaries()
        for entry in os.listdir(self.tmp_dir):
            path = os.path.join(self.tmp_dir, entry)
            shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.unlink(path)

    def in_thread(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> defer.Deferred:
        """Run blocking ``f`` in the image thread pool."""
        return deferToThreadPool(self.reactor, self._pool, f, *args, **kwargs)

    async def close(self) -> None:
        """Close registry connections and stop the threads (the daemon's stopService)."""
        if self._closed:
            return
        self._closed = True
        self.reactor.removeSystemEventTrigger(self._shutdown_trigger)
        await self.registry.close()
        self._stop_pool()

    def _stop_pool(self) -> None:
        if self._pool.started:
            self._pool.stop()

    # --- list ------------------------------------------------------------------------------------------

    def list(self, all: bool = False) -> list[str]:
        """hyperd's image list: one ``repo:tag:id:created:size`` string per name (an untagged image once)."""
        entries = []
        for image in sorted(self.store.images(), key=lambda i: (-_created_unix(i.created), i.id)):
            for name in image.names or (None,):
                entries.append(image_list_entry(image, name))
        return entries

    def lookup(self, ref: str) -> Image:
        return self.store.lookup(ref)

    # --- pull ------------------------------------------------------------------------------------------

    @staticmethod
    def reference(name: str, tag: str | None = None) -> Reference:
        """``imageName`` and ``tag`` as Docker's API takes them (a tag may also be a digest)."""
        if not name:
            raise BadParameter("bad parameter: imageName is required")
        ref = parse_reference(name)
        if tag:
            parsed = parse_reference(f"{ref.registry}/{ref.repository}" +
                                     (f"@{tag}" if ":" in tag else f":{tag}"))
            if (":" in name.rsplit("/", 1)[-1] or ref.digest) and parsed != ref:
                raise BadParameter(f"bad parameter: imageName {name!r} already names a tag or digest, and tag "
                                   f"{tag!r} differs")
            ref = parsed
        return ref

    async def pull(self, name: str, tag: str | None = None, auth: Credentials | None = None,
                   progress: Progress | None = None) -> Image:
        """Pull ``name`` (and ``tag``) into the store; return the image. Progress goes to ``progress``."""
        ref = self.reference(name, tag)
        emit: Progress = progress or (lambda event: None)
        manifest, media_type, digest = await self.registry.get_manifest(ref, auth)
        if media_type in INDEX_TYPES:
            try:
                chosen = pick_platform(json.loads(manifest).get("manifests") or [])
            except NotFound:
                raise NotFound(f"no such image: {ref.short} has no linux/amd64 image in its index") from None
            manifest, media_type, digest = await self.registry.get_manifest(ref, auth, chosen["digest"])
            if media_type in INDEX_TYPES:
                raise RegistryError(f"{ref.short}: an index inside an index is not supported")
        parsed = json.loads(manifest)
        layers = parsed.get("layers")
        if not isinstance(parsed.get("config"), dict) or not isinstance(layers, list):
            raise RegistryError(f"registry {ref.registry} sent a manifest for {ref.short} without config or "
                                "layers")
        for layer in layers:
            if "zstd" in layer.get("mediaType", ""):
                raise RegistryError(f"{ref.short}: layer {layer.get('digest')} is zstd-compressed, which is "
                                    "not supported")
        emit({"status": f"Pulling from {ref.repository}", "id": ref.digest or ref.tag})
        try:
            before = self.store.lookup(ref.name).manifest_digest
        except (NotFound, BadParameter):
            before = None
        digests = [parsed["config"]["digest"]] + [layer["digest"] for layer in layers]
        self.store.pin(digests)
        try:
            await self._ensure_blob(ref, parsed["config"], auth, None)
            sem = defer.DeferredSemaphore(CONCURRENT_DOWNLOADS)
            pending = []
            for layer in layers:
                lid = _short(layer["digest"])
                if self.store.has_blob(layer["digest"]):
                    emit({"status": "Already exists", "progressDetail": {}, "id": lid})
                    continue
                emit({"status": "Pulling fs layer", "progressDetail": {}, "id": lid})
                pending.append(sem.run(lambda layer=layer: defer.ensureDeferred(
                    self._ensure_blob(ref, layer, auth, emit))))
            if pending:
                results = await defer.DeferredList(pending, consumeErrors=True)
                for ok, value in results:
                    if not ok:
                        value.raiseException()

            def on_layer(layer_digest: str, phase: str) -> None:
                status = "Extracting" if phase == "extracting" else "Pull complete"
                self.reactor.callFromThread(emit, {"status": status, "progressDetail": {},
                                                   "id": _short(layer_digest)})

            image = await self.in_thread(self.store.add, manifest, [ref.name], on_layer)
        finally:
            self.store.unpin(digests)
        emit({"status": f"Digest: {digest}"})
        if before == image.manifest_digest:
            emit({"status": f"Status: Image is up to date for {ref.short}"})
        else:
            emit({"status": f"Status: Downloaded newer image for {ref.short}"})
        return image

    async def _ensure_blob(self, ref: Reference, desc: dict, auth: Credentials | None,
                           emit: Progress | None) -> None:
        digest, total = desc["digest"], int(desc.get("size") or 0)
        lid = _short(digest)
        while True:
            if self.store.has_blob(digest):
                if emit:
                    emit({"status": "Download complete", "progressDetail": {}, "id": lid})
                return
            waiters = self._downloads.get(digest)
            if waiters is None:
                break
            # another pull is downloading it: wait, then look again (if it failed, try ourselves)
            if emit:
                emit({"status": "Waiting", "progressDetail": {}, "id": lid})
            waiter: defer.Deferred = defer.Deferred()
            waiters.append(waiter)
            await waiter
        self._downloads[digest] = []
        writer = None
        last = [0]

        def downloaded(size: int) -> None:
            if total and size > total:
                raise RegistryError(f"registry {ref.registry} sent more than the {total} bytes of blob {digest}")
            if emit and (size - last[0] >= max(total // 100, 256 * 1024) or size == total or size < last[0]):
                last[0] = size
                emit({"status": "Downloading", "progressDetail": {"current": size, "total": total},
                      "progress": progress_bar(size, total), "id": lid})

        try:
            writer = await self.in_thread(self.store.blob_writer, digest)
            await self.registry.download_blob(ref, digest, writer, auth, downloaded)
            if emit:
                emit({"status": "Verifying Checksum", "progressDetail": {}, "id": lid})
            try:
                await self.in_thread(writer.commit)
            except BadParameter as e:
                raise RegistryError(f"registry {ref.registry}: {e.message.removeprefix('bad parameter: ')}; "
                                    "the blob was refused") from None
            if emit:
                emit({"status": "Download complete", "progressDetail": {}, "id": lid})
        finally:
            if writer is not None:
                await self.in_thread(writer.abort)  # nothing after a commit; the temp file otherwise
            for waiter in self._downloads.pop(digest):
                waiter.callback(None)

    # --- remove ----------------------------------------------------------------------------------------

    async def remove(self, ref: str, force: bool = False) -> list[dict[str, str]]:
        """``rmi``: Docker's ``[{"Untagged": name}, ..., {"Deleted": "sha256:<id>"}]``."""
        in_use = set(self.in_use())
        removal = await self.in_thread(self.store.remove, ref, in_use, force)
        out: list[dict[str, str]] = [{"Untagged": parse_reference(n).short} for n in removal.untagged]
        if removal.deleted:
            out.append({"Deleted": f"sha256:{removal.image.id}"})
        return out

    # --- load ------------------------------------------------------------------------------------------

    async def load(self, source: str | BinaryIO) -> list[Image]:
        """Load a ``docker save`` tar or an OCI layout tar (a path or a file object)."""
        return await self.in_thread(self._load, source)

    def _load(self, source: str | BinaryIO) -> list[Image]:
        work = tempfile.mkdtemp(dir=self.tmp_dir, prefix="load-")
        try:
            try:
                if isinstance(source, str):
                    tar = tarfile.open(source, mode="r|*")
                else:
                    source.seek(0)
                    tar = tarfile.open(fileobj=source, mode="r|*")
                with tar:
                    _extract(tar, work)
            except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as e:
                raise BadParameter(f"bad parameter: not an image archive: not a tar ({e})") from None
            if os.path.exists(os.path.join(work, "index.json")):
                return self.store.import_layout(work)
            if os.path.exists(os.path.join(work, "manifest.json")):
                return self._load_docker(work)
            raise BadParameter("bad parameter: not an image archive: the tar has neither index.json (an OCI "
                               "layout) nor manifest.json (docker save)")
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def _load_docker(self, work: str) -> list[Image]:
        try:
            with open(os.path.join(work, "manifest.json"), "rb") as f:
                entries = json.load(f)
            if not isinstance(entries, list) or not entries:
                raise ValueError("not a list of images")
        except ValueError as e:
            raise BadParameter(f"bad parameter: not an image archive: manifest.json: {e}") from None
        loaded = []
        for entry in entries:
            try:
                config_path, layer_paths = entry["Config"], list(entry["Layers"])
                tags = list(entry.get("RepoTags") or [])
            except (KeyError, TypeError):
                raise BadParameter("bad parameter: not an image archive: manifest.json lacks Config or Layers") \
                    from None
            blobs = []
            for rel, kind in [(config_path, "config"), *((p, "layer") for p in layer_paths)]:
                path = resolve(work, _clean(rel, "archive"))
                if not os.path.isfile(path):
                    raise BadParameter(f"bad parameter: not an image archive: {rel} is missing")
                with open(path, "rb") as f:
                    gzipped = f.read(2) == b"\x1f\x8b"
                    f.seek(0)
                    digest = self.store.write_blob(f)
                media_type = DOCKER_CONFIG if kind == "config" else DOCKER_LAYER_GZIP if gzipped else DOCKER_LAYER_TAR
                blobs.append({"mediaType": media_type, "digest": digest, "size": os.path.getsize(path)})
            manifest = {"schemaVersion": 2, "mediaType": MANIFEST_TYPES[1], "config": blobs[0], "layers": blobs[1:]}
            data = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
            loaded.append(self.store.add(data, tags))
        return loaded

    # --- save ------------------------------------------------------------------------------------------

    async def save(self, names: list[str]) -> str:
        """Write the images named to an OCI layout tar (also readable by ``docker load``); return its path.

        The caller owns the file: it removes it once sent.
        """
        if not names:
            raise BadParameter("bad parameter: names is required")
        return await self.in_thread(self._save, list(names))

    def _save(self, names: list[str]) -> str:
        chosen: list[tuple[Image, list[str]]] = []
        for name in names:
            image = self.store.lookup(name)
            ref = parse_reference_or_none(name)
            wanted = [ref.name] if ref is not None and ref.name in image.names else list(image.names)
            chosen.append((image, wanted))
        fd, path = tempfile.mkstemp(dir=self.tmp_dir, prefix="save-", suffix=".tar")
        os.close(fd)
        try:
            with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
                index = {"schemaVersion": 2, "mediaType": INDEX_TYPES[0], "manifests": []}
                docker_manifest = []
                written: set[str] = set()

                def add_blob(digest: str) -> None:
                    if digest in written:
                        return
                    written.add(digest)
                    blob = self.store.blob_path(digest)
                    info = tar.gettarinfo(blob, arcname="blobs/sha256/" + digest.split(":", 1)[1])
                    info.uid = info.gid = 0
                    info.uname = info.gname = ""
                    info.mtime = 0
                    with open(blob, "rb") as f:
                        tar.addfile(info, f)

                for image, wanted in chosen:
                    manifest_bytes = self.store.read_blob(image.manifest_digest)
                    manifest = json.loads(manifest_bytes)
                    for digest in [image.manifest_digest, manifest["config"]["digest"],
                                   *(layer["digest"] for layer in manifest.get("layers", ()))]:
                        add_blob(digest)
                    desc = {"mediaType": manifest.get("mediaType", MANIFEST_TYPES[0]),
                            "digest": image.manifest_digest, "size": len(manifest_bytes)}
                    for name in wanted or [None]:
                        entry = dict(desc)
                        if name:
                            entry["annotations"] = {REF_ANNOTATION: name, CONTAINERD_NAME: name}
                        if entry not in index["manifests"]:
                            index["manifests"].append(entry)
                    docker_manifest.append({
                        "Config": "blobs/sha256/" + manifest["config"]["digest"].split(":", 1)[1],
                        "RepoTags": [parse_reference(n).short for n in wanted if "@" not in n],
                        "Layers": ["blobs/sha256/" + layer["digest"].split(":", 1)[1]
                                   for layer in manifest.get("layers", ())],
                    })
                for arcname, value in (("oci-layout", {"imageLayoutVersion": "1.0.0"}), ("index.json", index),
                                       ("manifest.json", docker_manifest)):
                    data = json.dumps(value, sort_keys=True).encode()
                    info = tarfile.TarInfo(arcname)
                    info.size, info.mode = len(data), 0o644
                    tar.addfile(info, _BytesReader(data))
            return path
        except BaseException:
            os.unlink(path)
            raise


class _BytesReader:
    def __init__(self, data: bytes) -> None:
        self._data, self._pos = data, 0

    def read(self, n: int = -1) -> bytes:
        end = len(self._data) if n < 0 else self._pos + n
        chunk, self._pos = self._data[self._pos:end], min(end, len(self._data))
        return chunk


def _extract(tar: tarfile.TarFile, dest: str) -> None:
    """Extract an image archive: files, directories and links that stay inside ``dest``; nothing else."""
    for member in tar:
        try:
            rel = _clean(member.name, "archive")
        except LayerError as e:
            raise BadParameter(f"bad parameter: not an image archive: {e.message}") from None
        if not rel:
            continue
        parent_rel, base = os.path.split(rel)
        parent = resolve(dest, parent_rel)
        os.makedirs(parent, exist_ok=True)
        target = os.path.join(parent, base)
        if member.isdir():
            os.makedirs(target, exist_ok=True)
        elif member.isreg():
            with open(target, "wb") as out:
                shutil.copyfileobj(tar.extractfile(member), out, 1024 * 1024)
        elif member.issym():
            # resolved within dest when read (docker save links duplicate layers)
            if not os.path.lexists(target):
                os.symlink(member.linkname, target)
        elif member.islnk():
            source = resolve(dest, _clean(member.linkname, "archive"))
            if not os.path.isfile(source):
                raise BadParameter(f"bad parameter: not an image archive: link {member.name!r} to a missing file")
            shutil.copyfile(source, target)


def error_message(failure_value: BaseException) -> str:
    """The message a progress stream carries for an error."""
    if isinstance(failure_value, HyperError):
        return failure_value.message
    return f"internal error: {failure_value}"
