"""The local image store: the built-in busybox, OCI layout import, and layers that try to escape."""

import io
import json
import os
import shutil
import subprocess
import tarfile
import tempfile

import pytest

from hyperd.errors import BadParameter, Conflict, NotFound
from hyperd.image.builtin import ensure_busybox
from hyperd.image.reference import parse_reference
from hyperd.image.store import ImageStore, add_single_layer_image, build_layer
from hyperd.image.unpack import LayerError, apply_layer


@pytest.fixture
def root():
    path = tempfile.mkdtemp(prefix="hdimg", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def entry(name, kind=tarfile.REGTYPE, data=b"", linkname="", mode=0o644):
    info = tarfile.TarInfo(name)
    info.type, info.size, info.linkname, info.mode = kind, len(data) if kind == tarfile.REGTYPE else 0, linkname, mode
    return info, data if kind == tarfile.REGTYPE else None


def layer(*entries):
    return io.BytesIO(build_layer(list(entries)))


@pytest.mark.parametrize("text, name, short", [
    ("busybox", "docker.io/library/busybox:latest", "busybox:latest"),
    ("busybox:1.36", "docker.io/library/busybox:1.36", "busybox:1.36"),
    ("me/app", "docker.io/me/app:latest", "me/app:latest"),
    ("127.0.0.1:5000/app:v1", "127.0.0.1:5000/app:v1", "127.0.0.1:5000/app:v1"),
    ("localhost/x", "localhost/x:latest", "localhost/x:latest"),
])
def test_references_are_normalized_as_docker_does(text, name, short):
    ref = parse_reference(text)
    assert (ref.name, ref.short) == (name, short)


@pytest.mark.parametrize("text", ["", "UPPER", "a b", "x:bad tag!", "x@sha256:zz"])
def test_invalid_references_are_bad_parameters(text):
    with pytest.raises(BadParameter):
        parse_reference(text)


def test_builtin_busybox_is_a_runnable_rootfs(root):
    store = ImageStore(root)
    image = ensure_busybox(store)
    rootfs = store.rootfs_dir(image.id)
    assert os.path.isfile(os.path.join(rootfs, "bin/busybox"))
    assert os.readlink(os.path.join(rootfs, "bin/sh")) == "/bin/busybox"
    assert oct(os.stat(os.path.join(rootfs, "tmp")).st_mode & 0o7777) == "0o1777"
    assert image.run_config["Cmd"] == ["sh"]
    assert store.lookup("busybox").id == image.id == store.lookup("docker.io/library/busybox:latest").id
    assert store.lookup(image.id[:12]).id == image.id
    # Deterministic: a second store builds the very same image id.
    other = tempfile.mkdtemp(prefix="hdimg", dir="/tmp")
    try:
        assert ensure_busybox(ImageStore(other)).id == image.id
    finally:
        shutil.rmtree(other)


def test_unknown_image_is_not_found(root):
    with pytest.raises(NotFound, match="no such image: nothere"):
        ImageStore(root).lookup("nothere")


def test_oci_layout_written_by_skopeo_imports(root):
    store = ImageStore(root)
    image = ensure_busybox(store)
    layout = os.path.join(root, "layout")
    subprocess.run(["skopeo", "copy", "--quiet", f"oci:{store.oci_dir}:docker.io/library/busybox:latest",
                    f"oci:{layout}:mine:v2"], check=True)
    other = ImageStore(os.path.join(root, "other"))
    (imported,) = other.import_layout(layout)
    assert imported.id == image.id and imported.names == ("docker.io/library/mine:v2",)
    assert os.path.isfile(os.path.join(other.rootfs_dir(imported.id), "bin/busybox"))


def test_whiteouts_and_opaque_directories_are_honoured(root):
    rootfs = os.path.join(root, "r")
    os.mkdir(rootfs)
    apply_layer(rootfs, layer(entry("a", tarfile.DIRTYPE, mode=0o755), entry("a/one", data=b"1"),
                              entry("b", tarfile.DIRTYPE, mode=0o755), entry("b/two", data=b"2"),
                              entry("c", data=b"3")))
    apply_layer(rootfs, layer(entry("a/.wh..wh..opq"), entry("a/new", data=b"n"), entry(".wh.c"),
                              entry("b/.wh.two")))
    assert sorted(os.listdir(rootfs)) == ["a", "b"]
    assert os.listdir(os.path.join(rootfs, "a")) == ["new"] and os.listdir(os.path.join(rootfs, "b")) == []


@pytest.mark.parametrize("entries, message", [
    ([entry("../escape", data=b"x")], "escapes the rootfs"),
    ([entry("/etc/abs", data=b"x")], "absolute path"),
    ([entry("x", tarfile.LNKTYPE, linkname="../../etc/passwd")], "escapes the rootfs"),
])
def test_hostile_layers_are_refused_naming_the_entry(root, entries, message):
    rootfs = os.path.join(root, "r")
    os.mkdir(rootfs)
    with pytest.raises(LayerError, match=message):
        apply_layer(rootfs, layer(*entries))


def test_a_symlink_out_of_the_rootfs_cannot_carry_writes_out(root):
    rootfs, outside = os.path.join(root, "r"), os.path.join(root, "outside")
    os.mkdir(rootfs)
    os.mkdir(outside)
    apply_layer(rootfs, layer(entry("evil", tarfile.SYMTYPE, linkname=outside),
                              entry("up", tarfile.SYMTYPE, linkname="../../../../.."),
                              entry("evil/file", data=b"x"), entry("up/tmp-file", data=b"y")))
    assert os.listdir(outside) == []
    # Both writes landed inside the rootfs, where the links point when seen from the container.
    assert os.path.isfile(os.path.join(rootfs, outside.lstrip("/"), "file"))
    assert os.path.isfile(os.path.join(rootfs, "tmp-file"))


def test_not_a_tar_is_a_bad_parameter(root):
    with pytest.raises(LayerError, match="not a tar"):
        apply_layer(root, io.BytesIO(b"this is not a tar archive" * 40))


def test_remove_refuses_an_image_in_use_and_collects_blobs(root):
    store = ImageStore(root)
    image = add_single_layer_image(store, build_layer([entry("f", data=b"hello")]), {"config": {}}, ["t:1"])
    with pytest.raises(Conflict, match="used by a container"):
        store.remove("t:1", in_use=[image.id])
    # Forced while in use: untagged only, since a running VM still reads the rootfs.
    removal = store.remove("t:1", in_use=[image.id], force=True)
    assert removal.untagged == ("docker.io/library/t:1",) and not removal.deleted
    assert [i.names for i in store.images()] == [()]
    assert os.path.isdir(store.rootfs_dir(image.id))
    # Once unused, by id: gone with its blobs and rootfs.
    assert store.remove(image.id[:12]).deleted
    assert store.images() == [] and os.listdir(store.blobs_dir) == []
    assert not os.path.exists(store.rootfs_dir(image.id))


def test_names_move_and_untag_before_delete(root):
    store = ImageStore(root)
    one = add_single_layer_image(store, build_layer([entry("f", data=b"1")]), {"config": {}}, ["a:1", "b:1"])
    assert store.lookup("a:1").names == ("docker.io/library/a:1", "docker.io/library/b:1")
    # Re-adding with another name adds it; the old names stay.
    add_single_layer_image(store, build_layer([entry("f", data=b"1")]), {"config": {}}, ["c:1"])
    assert len(store.lookup("c:1").names) == 3
    # A name that moves to a new image leaves the old one named by what is left.
    two = add_single_layer_image(store, build_layer([entry("f", data=b"2")]), {"config": {}}, ["a:1"])
    assert store.lookup("a:1").id == two.id and store.lookup("b:1").id == one.id
    # An id with several names is refused unless forced; a name is only untagged.
    with pytest.raises(Conflict, match="several names"):
        store.remove(one.id)
    assert store.remove("b:1").untagged == ("docker.io/library/b:1",)
    assert store.lookup(one.id).names == ("docker.io/library/c:1",)
    assert store.remove("c:1").deleted
    with pytest.raises(NotFound):
        store.lookup(one.id)
    # The last name moving away leaves the old image dangling (listed, no name), as Docker does.
    add_single_layer_image(store, build_layer([entry("f", data=b"3")]), {"config": {}}, ["a:1"])
    assert sorted(len(i.names) for i in store.images()) == [0, 1]
    assert store.remove(two.id).deleted


def test_interrupted_writes_leave_nothing(root):
    store = ImageStore(root)
    writer = store.blob_writer("sha256:" + "1" * 64)
    writer.write(b"half a blob")
    writer.abort()
    assert os.listdir(store.blobs_dir) == []
    # what a crash leaves behind is cleaned when the store is opened by the service
    open(os.path.join(store.blobs_dir, ".tmp-crash"), "wb").close()
    os.mkdir(os.path.join(store.images_dir, ".unpack-crash"))
    store.clean_temporaries()
    assert os.listdir(store.blobs_dir) == [] and os.listdir(store.images_dir) == []


def test_a_blob_with_the_wrong_digest_is_not_kept(root):
    store = ImageStore(root)
    with pytest.raises(BadParameter, match="digest mismatch"):
        store.write_blob(io.BytesIO(b"data"), "sha256:" + "0" * 64)
    assert os.listdir(store.blobs_dir) == []
    assert json.load(open(os.path.join(store.oci_dir, "index.json")))["manifests"] == []


def _gzip_image(store, layer_bytes, diff_ids):
    """Store a one-layer image whose layer blob is ``layer_bytes`` gzipped and whose config lists ``diff_ids``."""
    import gzip

    compressed = gzip.compress(layer_bytes, mtime=0)
    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode()
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                           "digest": store.write_blob(io.BytesIO(config)), "size": len(config)},
                "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                            "digest": store.write_blob(io.BytesIO(compressed)), "size": len(compressed)}]}
    return store.add(json.dumps(manifest).encode(), ["example/app:1"]), len(compressed)


def test_a_gzip_layer_is_checked_against_the_config_and_the_size_is_uncompressed(root):
    import hashlib

    store = ImageStore(root)
    tar = build_layer([entry("hello", data=b"hello world\n" * 1000)])
    image, compressed_size = _gzip_image(store, tar, ["sha256:" + hashlib.sha256(tar).hexdigest()])
    with open(os.path.join(store.rootfs_dir(image.id), "hello"), "rb") as f:
        assert f.read() == b"hello world\n" * 1000
    assert store.lookup("example/app:1").size == len(tar) > compressed_size  # Docker reports unpacked sizes


def test_a_layer_whose_content_is_not_what_the_config_says_is_refused_and_nothing_is_left(root):
    store = ImageStore(root)
    tar = build_layer([entry("hello", data=b"swapped content\n")])
    with pytest.raises(BadParameter, match="does not match the image config: its content is sha256:"):
        _gzip_image(store, tar, ["sha256:" + "0" * 64])
    assert [e for e in os.listdir(store.images_dir)] == []
    with pytest.raises(NotFound):
        store.lookup("example/app:1")
    with pytest.raises(BadParameter, match="the image has 1 layers but its config lists 2"):
        _gzip_image(store, tar, ["sha256:" + "0" * 64] * 2)


def test_corrupt_gzip_data_is_a_bad_parameter_naming_the_layer(root):
    import gzip

    data = bytearray(gzip.compress(build_layer([entry("x", data=os.urandom(50000))])))
    data[len(data) // 2] ^= 0xFF
    with pytest.raises(LayerError, match="layer corrupt: corrupt"):
        apply_layer(root, io.BytesIO(bytes(data)), "corrupt")
