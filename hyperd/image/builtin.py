"""The built-in ``busybox`` image, built from this host's busybox-static so hyperd runs a pod with no registry.

The layer is deterministic (sorted, uid 0, mtime 0), so the image id only changes when busybox does.
"""

from __future__ import annotations

import subprocess
import tarfile

from hyperd.image.store import Image, ImageStore, add_single_layer_image, build_layer

BUSYBOX = "/bin/busybox"
NAME = "busybox:latest"
PATH = "/usr/sbin:/usr/bin:/sbin:/bin"

_DIRS = {"bin": 0o755, "dev": 0o755, "etc": 0o755, "home": 0o755, "proc": 0o555, "root": 0o700, "sbin": 0o755,
         "sys": 0o555, "tmp": 0o1777, "usr": 0o755, "usr/bin": 0o755, "usr/sbin": 0o755, "var": 0o755,
         "var/tmp": 0o1777, "var/run": 0o755, "var/log": 0o755}
_FILES = {
    "etc/passwd": b"root:x:0:0:root:/root:/bin/sh\ndaemon:x:1:1:daemon:/usr/sbin:/bin/false\n"
                  b"www-data:x:33:33:www-data:/var/www:/bin/false\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
    "etc/group": b"root:x:0:\ndaemon:x:1:\nwww-data:x:33:\nnogroup:x:65534:\n",
    "etc/hosts": b"127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n",
    "etc/resolv.conf": b"",
    "etc/hostname": b"",
}


def _info(name: str, kind: bytes, mode: int, size: int = 0, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.size, info.linkname = kind, mode, size, linkname
    return info


def busybox_layer(busybox: str = BUSYBOX) -> bytes:
    with open(busybox, "rb") as f:
        binary = f.read()
    applets = subprocess.run([busybox, "--list-full"], check=True, capture_output=True, text=True).stdout.split()
    entries = [(_info(d, tarfile.DIRTYPE, mode), None) for d, mode in sorted(_DIRS.items())]
    entries.append((_info("bin/busybox", tarfile.REGTYPE, 0o755, len(binary)), binary))
    for name, data in sorted(_FILES.items()):
        entries.append((_info(name, tarfile.REGTYPE, 0o644, len(data)), data))
    for applet in sorted(set(applets)):
        if applet != "bin/busybox":
            entries.append((_info(applet, tarfile.SYMTYPE, 0o777, linkname="/bin/busybox"), None))
    return build_layer(entries)


def ensure_busybox(store: ImageStore, busybox: str = BUSYBOX) -> Image:
    """Add the built-in busybox image unless an image by that name is there already (a pulled one wins)."""
    from hyperd.errors import NotFound

    try:
        return store.lookup(NAME)
    except NotFound:
        pass
    config = {
        "architecture": "amd64",
        "os": "linux",
        "created": "1970-01-01T00:00:00Z",
        "config": {"Env": [f"PATH={PATH}"], "Cmd": ["sh"]},
        "history": [{"created_by": f"hyperd: built from this host's {busybox}"}],
    }
    return add_single_layer_image(store, busybox_layer(busybox), config, [NAME])
