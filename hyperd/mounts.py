"""Host bind mounts, and removing a directory without ever deleting through a mount point.

A pod's ``vfs`` volumes are host directories bind-mounted into its VM's 9p share (QEMU's 9p server does not
follow symlinks out of the share). A VM's directory is removed when the VM goes; a bind mount left inside it
would make a plain ``rmtree`` delete the user's own files. :func:`remove_tree` unmounts everything below the
directory first and refuses to delete anything that is still mounted.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import shutil

MS_RDONLY = 1
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MNT_DETACH = 2

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def bind_mount(source: str, target: str, read_only: bool = False) -> None:
    """Bind ``source`` (a directory) onto ``target`` (created if missing)."""
    os.makedirs(target, exist_ok=True)
    _check(_libc.mount(source.encode(), target.encode(), None, MS_BIND | MS_REC, None),
           f"bind-mount {source} on {target}")
    if read_only:
        _check(_libc.mount(None, target.encode(), None, MS_REMOUNT | MS_BIND | MS_RDONLY, None),
               f"make {target} read-only")


def _unescape(field: str) -> str:
    # /proc/self/mountinfo escapes space, tab, newline and backslash as octal
    return field.encode().decode("unicode_escape").encode("latin-1").decode("utf-8", "replace")


def mounts_below(path: str) -> list[str]:
    """Mount points at or below ``path``, deepest first."""
    root = os.path.realpath(path).rstrip("/") + "/"
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = _unescape(line.split()[4])
            if (point.rstrip("/") + "/").startswith(root):
                found.append(point)
    return sorted(set(found), key=lambda p: p.count("/"), reverse=True)


def unmount_below(path: str) -> None:
    """Detach every mount at or below ``path`` (lazily: busy ones go once released)."""
    for point in mounts_below(path):
        _check(_libc.umount2(point.encode(), MNT_DETACH), f"unmount {point}")


def remove_tree(path: str) -> None:
    """``rmtree`` that first unmounts what is below ``path``, and never deletes through a mount."""
    if not os.path.lexists(path):
        return
    unmount_below(path)
    left = mounts_below(path)
    if left:
        raise OSError(f"refusing to delete {path}: {', '.join(left)} still mounted")
    shutil.rmtree(path, ignore_errors=True)
