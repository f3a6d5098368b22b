"""Apply image layers (tar, optionally gzip) to a rootfs directory, safely.

Layers apply in order; OCI whiteouts are honoured (``.wh.<name>`` deletes, ``.wh..wh..opq`` empties the directory
of what lower layers put there). Paths are resolved as the container will see them: symbolic links inside the
rootfs are followed *within* the rootfs (an absolute target means the rootfs' root), so nothing a layer says can
land outside it. Entries that try (``..``, absolute names, hard links out) are refused with an error naming the
entry; what was extracted before the refusal stays inside the rootfs only.

Runs in a worker thread: it blocks on the disk.
"""

from __future__ import annotations

import bz2
import errno
import gzip
import hashlib
import io
import lzma
import os
import posixpath
import shutil
import stat
import tarfile
import zlib
from typing import BinaryIO

import attrs

from hyperd.errors import BadParameter

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
_MAX_LINKS = 40


class LayerError(BadParameter):
    """A layer that is not a tar, or that tries to write outside the rootfs."""


def _clean(name: str, layer: str) -> str:
    """The member's path relative to the root, or LayerError for one that climbs out."""
    parts = []
    for part in name.replace("\\", "/").split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            raise LayerError(f"layer {layer}: entry {name!r} escapes the rootfs ('..')")
        parts.append(part)
    if name.startswith("/") and parts:
        # Docker strips the leading slash of absolute names; refusing is the safer reading of the issue.
        raise LayerError(f"layer {layer}: entry {name!r} has an absolute path")
    return "/".join(parts)


def resolve(root: str, relpath: str, follow_last: bool = True) -> str:
    """The host path of ``relpath`` in ``root``, following symlinks as if ``root`` were ``/``."""
    todo = [p for p in relpath.split("/") if p not in ("", ".")]
    done: list[str] = []
    hops = 0
    while todo:
        part = todo.pop(0)
        if part == "..":
            if done:
                done.pop()
            continue
        candidate = os.path.join(root, *done, part)
        if (todo or follow_last) and os.path.islink(candidate):
            hops += 1
            if hops > _MAX_LINKS:
                raise LayerError(f"too many levels of symbolic links resolving {relpath!r}")
            target = os.readlink(candidate)
            if target.startswith("/"):
                done = []
            todo = [p for p in target.split("/") if p not in ("", ".")] + todo
            continue
        done.append(part)
    return os.path.join(root, *done)


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)


@attrs.frozen
class Applied:
    """What applying a layer learnt of it: the digest and size of its uncompressed tar (its diff_id)."""

    diff_id: str
    size: int


#: Compressed layer formats by their magic bytes (Docker wrote gzip; bzip2 and xz are legal in a tar layer).
_DECOMPRESSORS = (
    (b"\x1f\x8b", lambda f: gzip.GzipFile(fileobj=f, mode="rb")),
    (b"BZh", lambda f: bz2.BZ2File(f, mode="rb")),
    (b"\xfd7zXZ\x00", lambda f: lzma.LZMAFile(f, mode="rb")),
)
_DECOMPRESS_ERRORS = (gzip.BadGzipFile, EOFError, zlib.error, lzma.LZMAError)


class _Digesting(io.RawIOBase):
    """A read-only stream that hashes and counts what is read through it (under a BufferedReader, so that it
    sees large reads while tarfile makes many small ones)."""

    def __init__(self, raw) -> None:
        self._raw = raw
        self.hash = hashlib.sha256()
        self.size = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self._raw.read(len(buffer))
        n = len(data)
        buffer[:n] = data
        self.hash.update(data)
        self.size += n
        return n


def _uncompressed(fileobj: BinaryIO) -> BinaryIO:
    head = fileobj.read(6)
    fileobj.seek(0)
    for magic, opener in _DECOMPRESSORS:
        if head.startswith(magic):
            return opener(fileobj)
    return fileobj


def _open_layer(fileobj, layer: str) -> tarfile.TarFile:
    try:
        return tarfile.open(fileobj=fileobj, mode="r|")
    except tarfile.TarError as e:
        raise LayerError(f"layer {layer}: not a tar archive ({e})") from None
    except _DECOMPRESS_ERRORS as e:
        raise LayerError(f"layer {layer}: corrupt compressed data ({e})") from None


def apply_layer(root: str, fileobj: BinaryIO, layer: str = "layer") -> Applied:
    """Apply one layer (a tar stream, gzip, bzip2, xz or not compressed; ``fileobj`` seekable) to the rootfs at
    ``root``; returns its diff_id and uncompressed size, for the caller to check against the image config."""
    root = os.path.realpath(root)
    as_root = os.geteuid() == 0
    deferred_dirs = []
    digest = _Digesting(_uncompressed(fileobj))
    stream = io.BufferedReader(digest, 1 << 20)
    tar = _open_layer(stream, layer)
    try:
        for member in tar:
            rel = _clean(member.name, layer)
            if not rel:
                continue
            parent_rel, base = posixpath.split(rel)
            parent = resolve(root, parent_rel)
            os.makedirs(parent, exist_ok=True)
            if base == OPAQUE:
                for entry in os.listdir(parent):
                    _remove(os.path.join(parent, entry))
                continue
            if base.startswith(WHITEOUT):
                _remove(os.path.join(parent, base[len(WHITEOUT):]))
                continue
            target = os.path.join(parent, base)
            if member.isdir():
                if os.path.lexists(target) and not os.path.isdir(target):
                    _remove(target)
                os.makedirs(target, exist_ok=True)
                deferred_dirs.append((target, member))
                continue
            if os.path.lexists(target):
                _remove(target)
            if member.isreg():
                source = tar.extractfile(member)
                with open(target, "wb") as out:
                    shutil.copyfileobj(source, out, 1024 * 1024)
            elif member.issym():
                os.symlink(member.linkname, target)
            elif member.islnk():
                link_rel = _clean(member.linkname, layer)
                link_parent, link_base = posixpath.split(link_rel)
                source_path = os.path.join(resolve(root, link_parent), link_base)
                if not os.path.lexists(source_path):
                    raise LayerError(f"layer {layer}: hard link {member.name!r} points to missing {member.linkname!r}")
                os.link(source_path, target, follow_symlinks=False)
                continue
            elif member.ischr() or member.isblk() or member.isfifo():
                if not as_root and not member.isfifo():
                    continue
                kind = stat.S_IFCHR if member.ischr() else stat.S_IFBLK if member.isblk() else stat.S_IFIFO
                os.mknod(target, member.mode | kind, os.makedev(member.devmajor, member.devminor))
            else:
                continue
            _set_attributes(target, member, as_root)
        while stream.read(1 << 20):  # the end-of-archive blocks and padding are part of the diff_id too
            pass
    except tarfile.TarError as e:
        raise LayerError(f"layer {layer}: corrupt tar archive ({e})") from None
    except _DECOMPRESS_ERRORS as e:
        raise LayerError(f"layer {layer}: corrupt compressed data ({e})") from None
    finally:
        tar.close()
    # Directory modes and times last, so that a read-only directory does not stop its own contents.
    for target, member in reversed(deferred_dirs):
        _set_attributes(target, member, as_root)
    return Applied("sha256:" + digest.hash.hexdigest(), digest.size)


def _set_attributes(path: str, member: tarfile.TarInfo, as_root: bool) -> None:
    if as_root:
        try:
            os.lchown(path, member.uid, member.gid)
        except OSError as e:
            if e.errno != errno.EPERM:
                raise
    if not member.issym():
        os.chmod(path, member.mode & 0o7777)
    try:
        os.utime(path, (member.mtime, member.mtime), follow_symlinks=False)
    except OSError:
        pass
