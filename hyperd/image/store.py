"""The local image store: an OCI image layout of blobs plus one unpacked read-only rootfs per image.

On disk, under the daemon's root::

    oci/                      an OCI image layout (oci-layout, index.json, blobs/sha256/<hex>)
    images/<id>/rootfs/       the image unpacked, shared read-only into every VM over 9p (tag ``images``)

``index.json`` is the one list of images: each manifest descriptor carries its reference in the
``org.opencontainers.image.ref.name`` annotation (the full canonical name, ``docker.io/library/busybox:latest``).
An image's id is the hex digest of its config, as Docker's is. Blobs are verified as they are written and renamed
into place only when whole, so an interrupted write never leaves a corrupt blob; a rootfs is unpacked beside its
final place and renamed when complete.

The methods here block on the disk: the daemon calls them in a worker thread.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
import tempfile
import threading
from collections.abc import Callable, Iterable
from typing import BinaryIO

import attrs
from zope.interface import implementer

from hyperd.errors import BadParameter, Conflict, NotFound
from hyperd.image.reference import Reference, parse_reference
from hyperd.image.unpack import apply_layer
from hyperd.interfaces import IImageStore

REF_ANNOTATION = "org.opencontainers.image.ref.name"
#: Beside an image's rootfs: what unpacking learnt of it ({"size": the layers' uncompressed bytes}).
INFO_FILE = "image.json"
MANIFEST_TYPES = (
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
)
INDEX_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
)


@attrs.frozen
class Removal:
    """What ``ImageStore.remove`` did: the names it untagged, and whether it deleted the image."""

    image: Image
    untagged: tuple[str, ...]
    deleted: bool


@attrs.frozen
class Image:
    id: str
    names: tuple[str, ...]
    manifest_digest: str
    config: dict
    created: str = ""
    size: int = 0

    @property
    def run_config(self) -> dict:
        """The image's runtime defaults: Env, Cmd, Entrypoint, WorkingDir, User."""
        return self.config.get("config") or {}


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _atomic_write(path: str, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


class BlobWriter:
    """One blob written in pieces into a temp file beside the blobs, hashed as it goes.

    ``commit`` checks the digest and renames the file into place (atomic: a reader sees the whole blob or
    none); ``abort`` (idempotent, harmless after ``commit``) removes the temp file. ``size`` lets a download
    resume where it was cut off; ``reset`` starts over when the server cannot resume.
    """

    def __init__(self, store: ImageStore, digest: str | None) -> None:
        self.store = store
        self.digest = digest
        fd, self.tmp = tempfile.mkstemp(dir=store.blobs_dir, prefix=".tmp-")
        self._file = os.fdopen(fd, "wb")
        self._hasher = hashlib.sha256()
        self.size = 0
        self.done = False

    def write(self, data: bytes) -> None:
        self._hasher.update(data)
        self._file.write(data)
        self.size += len(data)

    def reset(self) -> None:
        self._file.seek(0)
        self._file.truncate()
        self._hasher = hashlib.sha256()
        self.size = 0

    def commit(self) -> str:
        """Verify and put the blob in place; return its digest. A mismatch raises and keeps nothing."""
        self._file.close()
        actual = "sha256:" + self._hasher.hexdigest()
        if self.digest is not None and actual != self.digest:
            self.abort()
            raise BadParameter(f"bad parameter: blob digest mismatch: expected {self.digest}, got {actual}")
        os.rename(self.tmp, self.store.blob_path(actual))
        self.done = True
        return actual

    def abort(self) -> None:
        if self.done:
            return
        self.done = True
        self._file.close()
        try:
            os.unlink(self.tmp)
        except FileNotFoundError:
            pass


@implementer(IImageStore)
class ImageStore:
    def __init__(self, root: str):
        self.root = root
        self.oci_dir = os.path.join(root, "oci")
        self.images_dir = os.path.join(root, "images")
        self.blobs_dir = os.path.join(self.oci_dir, "blobs", "sha256")
        self._lock = threading.Lock()
        self._pinned: dict[str, int] = {}
        os.makedirs(self.blobs_dir, exist_ok=True)
        os.makedirs(self.images_dir, exist_ok=True)
        layout = os.path.join(self.oci_dir, "oci-layout")
        if not os.path.exists(layout):
            _atomic_write(layout, b'{"imageLayoutVersion": "1.0.0"}')
        if not os.path.exists(self._index_path):
            self._write_index({"schemaVersion": 2, "manifests": []})

    # -- the index ---------------------------------------------------------------------------------------------

    @property
    def _index_path(self) -> str:
        return os.path.join(self.oci_dir, "index.json")

    def _read_index(self) -> dict:
        with open(self._index_path, "rb") as f:
            return json.load(f)

    def _write_index(self, index: dict) -> None:
        _atomic_write(self._index_path, json.dumps(index, indent=1, sort_keys=True).encode())

    def images(self) -> list[Image]:
        """Every image, its names gathered from the index."""
        by_digest: dict[str, list[str]] = {}
        for desc in self._read_index()["manifests"]:
            name = (desc.get("annotations") or {}).get(REF_ANNOTATION)
            by_digest.setdefault(desc["digest"], [])
            if name:
                by_digest[desc["digest"]].append(name)
        return [self._image(digest, names) for digest, names in sorted(by_digest.items())]

    def _image(self, manifest_digest: str, names: Iterable[str]) -> Image:
        manifest = json.loads(self.read_blob(manifest_digest))
        config_digest = manifest["config"]["digest"]
        config = json.loads(self.read_blob(config_digest))
        image_id = config_digest.split(":", 1)[1]
        try:
            with open(os.path.join(self.images_dir, image_id, INFO_FILE)) as f:
                size = int(json.load(f)["size"])  # the layers' uncompressed size, as Docker reports it
        except (OSError, ValueError, KeyError, TypeError):
            size = sum(layer.get("size", 0) for layer in manifest.get("layers", ()))  # unpacked by an older hyperd
        return Image(config_digest.split(":", 1)[1], tuple(sorted(names)), manifest_digest, config,
                     config.get("created", ""), size)

    def lookup(self, ref: str) -> Image:
        """The image named ``ref`` (a name, with or without registry and tag) or with that id (prefix)."""
        images = self.images()
        bare = ref.removeprefix("sha256:")
        if len(bare) >= 12 and all(c in "0123456789abcdef" for c in bare):
            matches = [i for i in images if i.id.startswith(bare)]
            if len(matches) == 1:
                return matches[0]
        try:
            wanted = parse_reference(ref).name
        except BadParameter:
            raise NotFound(f"no such image: {ref}") from None
        for image in images:
            if wanted in image.names:
                return image
        raise NotFound(f"no such image: {ref}")

    # -- blobs -------------------------------------------------------------------------------------------------

    def blob_path(self, digest: str) -> str:
        algorithm, _, hexdigest = digest.partition(":")
        if algorithm != "sha256" or len(hexdigest) != 64:
            raise BadParameter(f"bad parameter: unsupported digest {digest!r}")
        return os.path.join(self.blobs_dir, hexdigest)

    def has_blob(self, digest: str) -> bool:
        return os.path.exists(self.blob_path(digest))

    def read_blob(self, digest: str) -> bytes:
        with open(self.blob_path(digest), "rb") as f:
            return f.read()

    def write_blob(self, source: BinaryIO, digest: str | None = None) -> str:
        """Copy a blob in, verifying ``digest`` when given; return its digest. Nothing is kept on a mismatch."""
        writer = self.blob_writer(digest)
        try:
            while chunk := source.read(1024 * 1024):
                writer.write(chunk)
            return writer.commit()
        finally:
            writer.abort()

    def blob_writer(self, digest: str | None = None) -> BlobWriter:
        """A blob being written piece by piece (a download): verified and put in place by ``commit``."""
        if digest is not None:
            self.blob_path(digest)  # refuse an unsupported digest before writing anything
        return BlobWriter(self, digest)

    def clean_temporaries(self) -> None:
        """Remove what writes cut off by a crash left behind (``.tmp-*`` blobs, ``.unpack-*`` dirs)."""
        for directory, prefix in ((self.blobs_dir, ".tmp-"), (self.images_dir, ".unpack-")):
            for entry in os.listdir(directory):
                if entry.startswith(prefix):
                    path = os.path.join(directory, entry)
                    shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.unlink(path)

    # -- adding images -----------------------------------------------------------------------------------------

    def add(self, manifest: bytes, names: Iterable[str],
            on_layer: Callable[[str, str], None] | None = None) -> Image:
        """Register a manifest whose config and layers are already blobs; unpack it; tag it with ``names``.

        Names another image had move to this one; an image left with no name stays, untagged (Docker's
        dangling image). ``on_layer(digest, phase)`` hears ``"extracting"`` and ``"done"`` for each layer.
        """
        parsed = json.loads(manifest)
        if not isinstance(parsed, dict) or not isinstance(parsed.get("config"), dict):
            raise BadParameter("bad parameter: not an image manifest (no config)")
        for blob in [parsed["config"], *parsed.get("layers", ())]:
            if not self.has_blob(blob["digest"]):
                raise BadParameter(f"bad parameter: the image lacks blob {blob['digest']}")
        manifest_digest = self.write_blob(io.BytesIO(manifest))
        image = self._image(manifest_digest, ())
        self._unpack(image, parsed, on_layer)
        canonical = list(dict.fromkeys(parse_reference(n).name for n in names))
        with self._lock:
            index = self._read_index()
            manifests = index["manifests"]
            moved_from = {d["digest"] for d in manifests if _ref_name(d) in canonical}
            kept = [d for d in manifests if _ref_name(d) not in canonical]
            desc = {"mediaType": parsed.get("mediaType", MANIFEST_TYPES[0]), "digest": manifest_digest,
                    "size": len(manifest)}
            for name in canonical:
                kept.append(dict(desc, annotations={REF_ANNOTATION: name}))
            if not any(d["digest"] == manifest_digest for d in kept):
                kept.append(desc)  # no name: listed untagged
            for digest in moved_from - {manifest_digest}:
                if not any(d["digest"] == digest for d in kept):
                    kept.append({"mediaType": desc["mediaType"], "digest": digest})  # now dangling
            # one nameless entry per digest at most, and none beside named ones
            named = {d["digest"] for d in kept if _ref_name(d)}
            seen: set[str] = set()
            index["manifests"] = []
            for d in kept:
                if not _ref_name(d) and (d["digest"] in named or d["digest"] in seen):
                    continue
                seen.add(d["digest"])
                index["manifests"].append(d)
            self._write_index(index)
        return self._image(manifest_digest, [n for d in index["manifests"]
                                             if d["digest"] == manifest_digest and (n := _ref_name(d))])

    def _unpack(self, image: Image, manifest: dict, on_layer: Callable[[str, str], None] | None = None) -> None:
        final = self.rootfs_dir(image.id)
        if os.path.isdir(final):
            return
        layers = manifest.get("layers", ())
        diff_ids = (image.config.get("rootfs") or {}).get("diff_ids")
        if isinstance(diff_ids, list) and len(diff_ids) != len(layers):
            raise BadParameter(f"bad parameter: the image has {len(layers)} layers but its config lists "
                               f"{len(diff_ids)} (rootfs.diff_ids)")
        work = tempfile.mkdtemp(dir=self.images_dir, prefix=".unpack-")
        try:
            rootfs = os.path.join(work, "rootfs")
            os.mkdir(rootfs)
            size = 0
            for index, layer in enumerate(layers):
                if "zstd" in layer.get("mediaType", ""):
                    raise BadParameter(f"bad parameter: layer {layer['digest']}: zstd layers are not supported")
                if on_layer:
                    on_layer(layer["digest"], "extracting")
                with open(self.blob_path(layer["digest"]), "rb") as f:
                    applied = apply_layer(rootfs, f, layer["digest"][7:19])
                # The blob matched its digest when it was stored; this checks that its content is the layer the
                # config (whose digest is the image id) describes, as Docker does.
                if isinstance(diff_ids, list) and diff_ids[index] != applied.diff_id:
                    raise BadParameter(f"bad parameter: layer {layer['digest']} does not match the image config: "
                                       f"its content is {applied.diff_id}, the config says {diff_ids[index]}")
                size += applied.size
                if on_layer:
                    on_layer(layer["digest"], "done")
            os.chmod(rootfs, 0o755)
            with open(os.path.join(work, INFO_FILE), "w") as f:
                json.dump({"size": size}, f)
            try:
                os.rename(work, os.path.dirname(final))
            except OSError:
                if not os.path.isdir(final):  # else another unpack of the same image won the race: fine
                    raise
                shutil.rmtree(work, ignore_errors=True)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise

    def rootfs_dir(self, image_id: str) -> str:
        return os.path.join(self.images_dir, image_id, "rootfs")

    def import_layout(self, path: str, name: str | None = None) -> list[Image]:
        """Import the images of an OCI image-layout directory (``name`` overrides a single image's reference)."""
        try:
            with open(os.path.join(path, "index.json"), "rb") as f:
                index = json.load(f)
        except (OSError, ValueError) as e:
            raise BadParameter(f"bad parameter: {path} is not an OCI image layout: {e}") from None
        imported = []
        manifests = index.get("manifests") or []
        if not manifests:
            raise BadParameter(f"bad parameter: the OCI layout {path} holds no image")
        for desc in manifests:
            annotations = desc.get("annotations") or {}
            # containerd and docker save put the full name here, and only the tag in ref.name
            ref = name or annotations.get("io.containerd.image.name") or annotations.get(REF_ANNOTATION)
            manifest = self._copy_manifest(path, desc)
            imported.append(self.add(manifest, [ref] if ref and ("/" in ref or ":" in ref or ref.isalnum())
                                     else []))
        return imported

    def _copy_manifest(self, layout: str, desc: dict) -> bytes:
        def source_blob(digest: str) -> str:
            return os.path.join(layout, "blobs", *digest.split(":", 1))

        def copy(digest: str) -> bytes:
            with open(source_blob(digest), "rb") as f:
                self.write_blob(f, digest)
            return self.read_blob(digest)

        data = copy(desc["digest"])
        parsed = json.loads(data)
        if parsed.get("mediaType", desc.get("mediaType")) in INDEX_TYPES or "manifests" in parsed:
            chosen = pick_platform(parsed["manifests"])
            return self._copy_manifest(layout, chosen)
        for blob in [parsed["config"], *parsed.get("layers", ())]:
            if not self.has_blob(blob["digest"]):
                copy(blob["digest"])
        return data

    def remove(self, ref: str, in_use: Iterable[str] = (), force: bool = False) -> Removal:
        """Remove an image as ``docker rmi`` does; unneeded blobs go too.

        A name of an image that has other names is only untagged. The last name, or an id, deletes the
        image: refused while a container uses it (Conflict) unless ``force``, which then only untags it, since
        a running VM still reads its rootfs (delete it by id once nothing uses it). An id naming an image
        with several names is refused unless ``force``.
        """
        image = self.lookup(ref)
        named = parse_reference_or_none(ref)
        by_id = named is None or named.name not in image.names
        used = image.id in set(in_use)
        if by_id:
            if len(image.names) > 1 and not force:
                raise Conflict(f"conflict: unable to delete {ref} (must be forced): the image is referenced "
                               f"by several names: {', '.join(image.names)}")
            untag = list(image.names)
        else:
            untag = [parse_reference(ref).name]
        delete = len(untag) == len(image.names)
        if delete and used:
            if not force:
                raise Conflict(f"conflict: unable to remove image {ref}: it is used by a container")
            delete = False
        with self._lock:
            index = self._read_index()
            manifests = [d for d in index["manifests"]
                         if not (d["digest"] == image.manifest_digest and _ref_name(d) in untag)]
            if delete:
                manifests = [d for d in manifests if d["digest"] != image.manifest_digest]
            elif not any(d["digest"] == image.manifest_digest for d in manifests):
                manifests.append({"mediaType": MANIFEST_TYPES[0], "digest": image.manifest_digest})
            index["manifests"] = manifests
            self._write_index(index)
            if delete:
                self._collect(index)
        if delete:
            shutil.rmtree(os.path.dirname(self.rootfs_dir(image.id)), ignore_errors=True)
        return Removal(image, tuple(untag), delete)

    def pin(self, digests: Iterable[str]) -> None:
        """Keep these blobs from collection while a pull or load that will need them runs."""
        with self._lock:
            for digest in digests:
                self._pinned[digest] = self._pinned.get(digest, 0) + 1

    def unpin(self, digests: Iterable[str]) -> None:
        with self._lock:
            for digest in digests:
                count = self._pinned.get(digest, 0) - 1
                if count > 0:
                    self._pinned[digest] = count
                else:
                    self._pinned.pop(digest, None)

    def _collect(self, index: dict) -> None:
        needed = set(self._pinned)
        for desc in index["manifests"]:
            needed.add(desc["digest"])
            manifest = json.loads(self.read_blob(desc["digest"]))
            needed.add(manifest["config"]["digest"])
            needed.update(layer["digest"] for layer in manifest.get("layers", ()))
        for entry in os.listdir(self.blobs_dir):
            if not entry.startswith(".") and "sha256:" + entry not in needed:
                os.unlink(os.path.join(self.blobs_dir, entry))


def _ref_name(desc: dict) -> str | None:
    return (desc.get("annotations") or {}).get(REF_ANNOTATION)


def parse_reference_or_none(text: str) -> Reference | None:
    try:
        return parse_reference(text)
    except BadParameter:
        return None


def pick_platform(manifests: list[dict], os_name: str = "linux", arch: str = "amd64") -> dict:
    for desc in manifests:
        platform = desc.get("platform") or {}
        if platform.get("os") == os_name and platform.get("architecture") == arch:
            return desc
    raise NotFound(f"no such image for {os_name}/{arch} in the index")


def build_layer(entries: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    """A deterministic uncompressed layer from (TarInfo, data) pairs, in the order given."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in entries:
            info.mtime = info.mtime or 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buffer.getvalue()


def add_single_layer_image(store: ImageStore, layer: bytes, config: dict, names: Iterable[str]) -> Image:
    """Store one image made of one uncompressed layer (the built-in image, and tests)."""
    diff_id = "sha256:" + sha256_hex(layer)
    config = dict(config, rootfs={"type": "layers", "diff_ids": [diff_id]})
    config_bytes = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
    layer_digest = store.write_blob(io.BytesIO(layer))
    config_digest = store.write_blob(io.BytesIO(config_bytes))
    manifest = {
        "schemaVersion": 2,
        "mediaType": MANIFEST_TYPES[0],
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest,
                   "size": len(config_bytes)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer_digest,
                    "size": len(layer)}],
    }
    return store.add(json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode(), names)
