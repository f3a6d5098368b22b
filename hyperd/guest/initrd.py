"""Build the guest (kernel + initramfs) from this host's Debian packages: ``hyperd-mkinitrd``.

Host side, standard library only. The kernel is the uncompressed ELF vmlinux taken out of the newest
``/boot/vmlinuz-*`` (qemu boots it through PVH, ~3 s faster under TCG than decompressing the bzImage). The
initramfs is an uncompressed newc cpio written here: busybox-static, the virtio/9p/overlay modules, Debian's
``/usr/bin/python3.11`` with its shared libraries, a zip of only the stdlib modules the agent imports (as
unchecked-hash .pyc) plus the ``hyperd.guest`` package, and ``/init`` starting the agent.

Outputs are written atomically to ``<root>/kernel`` and ``<root>/hyper-initrd.img`` with a manifest of the inputs;
they are rebuilt only when an input changed, and the same inputs give the same bytes.
"""

import argparse
import dataclasses
import fcntl
import gzip
import hashlib
import io
import json
import lzma
import os
import re
import stat
import subprocess
import sys
import tempfile
from functools import lru_cache

from hyperd.guest import modules as guest_modules

#: Bump when the layout of the initramfs changes, so that old builds are redone.
BUILDER_VERSION = 4

DEFAULT_ROOT = "/var/lib/hyper"
KERNEL_NAME = "kernel"
INITRD_NAME = "hyper-initrd.img"
MANIFEST_NAME = "guest-manifest.json"

GUEST_PYTHON = "/usr/bin/python3.11"
BUSYBOX = "/bin/busybox"
STDLIB_DIR = "/usr/lib/python3.11"
#: On the guest's default sys.path (before /usr/lib/python3.11), so no sys.path set-up is needed.
GUEST_ZIP = "usr/lib/python311.zip"
#: The guest's entry points: everything they import (transitively) goes into the zip.
GUEST_ENTRY_MODULES = ("hyperd.guest.boot",)
#: Codecs Python may need at start whatever the host's locale is.
EXTRA_STDLIB_MODULES = ("encodings.utf_8", "encodings.ascii", "encodings.latin_1", "encodings.aliases")

_SRC_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

INIT_SCRIPT = b"""#!/usr/bin/python3.11 -SP
import hyperd.guest.boot
hyperd.guest.boot.main()
"""

#: The guest's kernel command line; see reference/machine.md for what each flag is worth under TCG.
BASE_CMDLINE = (
    "console=ttyS0 quiet panic=-1 cryptomgr.notests init_on_alloc=0 mitigations=off i8042.noaux i8042.nokbd "
    "audit=0 apparmor=0 selinux=0 security=none no_timer_check"
)


@dataclasses.dataclass(frozen=True)
class GuestFiles:
    kernel: str
    initrd: str
    manifest: str
    #: True when this call built them, False when the existing ones were still current.
    built: bool = False


# ---------------------------------------------------------------------------------------------------------
# kernel


def newest_kernel(boot: str = "/boot") -> tuple:
    """``(path of the newest vmlinuz-*, its version)``."""
    candidates = [n for n in os.listdir(boot) if n.startswith("vmlinuz-")]
    if not candidates:
        raise FileNotFoundError("no %s/vmlinuz-* (install linux-image-amd64)" % boot)

    def version_key(name):
        return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name[len("vmlinuz-"):])]

    name = max(candidates, key=version_key)
    return os.path.join(boot, name), name[len("vmlinuz-"):]


def extract_vmlinux(bzimage: bytes) -> bytes:
    """The ELF kernel inside a bzImage whose payload is XZ-compressed (Debian's)."""
    start = 0
    while True:
        at = bzimage.find(b"\xfd7zXZ\x00", start)
        if at < 0:
            raise ValueError("no XZ-compressed kernel found in the bzImage")
        try:
            elf = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(bzimage[at:])
        except lzma.LZMAError:
            start = at + 1
            continue
        if elf.startswith(b"\x7fELF"):
            return elf
        start = at + 1


# ---------------------------------------------------------------------------------------------------------
# cpio (newc)


class Cpio:
    """An uncompressed newc archive built in memory; entries are written sorted, with fixed metadata."""

    def __init__(self) -> None:
        self.entries = {}  # path -> (mode, data, rdev)

    def _parents(self, path: str) -> None:
        parts = path.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            parent = "/".join(parts[:i])
            if parent not in self.entries:
                self.entries[parent] = (stat.S_IFDIR | 0o755, b"", (0, 0))

    def add_dir(self, path: str, perm: int = 0o755) -> None:
        path = path.strip("/")
        self._parents(path)
        self.entries[path] = (stat.S_IFDIR | perm, b"", (0, 0))

    def add_file(self, path: str, data: bytes, perm: int = 0o644) -> None:
        path = path.strip("/")
        self._parents(path)
        self.entries[path] = (stat.S_IFREG | perm, data, (0, 0))

    def add_symlink(self, path: str, target: str) -> None:
        path = path.strip("/")
        self._parents(path)
        self.entries[path] = (stat.S_IFLNK | 0o777, target.encode(), (0, 0))

    def add_chardev(self, path: str, major: int, minor: int, perm: int = 0o600) -> None:
        path = path.strip("/")
        self._parents(path)
        self.entries[path] = (stat.S_IFCHR | perm, b"", (major, minor))

    def __contains__(self, path: str) -> bool:
        return path.strip("/") in self.entries

    def write(self, out) -> None:
        # Sorting by components puts every directory before what it contains.
        for ino, path in enumerate(sorted(self.entries, key=lambda p: p.split("/")), start=1):
            mode, data, (major, minor) = self.entries[path]
            self._entry(out, ino, path, mode, data, major, minor)
        self._entry(out, 0, "TRAILER!!!", 0, b"", 0, 0)

    @staticmethod
    def _entry(out, ino, name, mode, data, rmajor, rminor) -> None:
        encoded = name.encode() + b"\0"
        nlink = 2 if stat.S_ISDIR(mode) else 1
        fields = (ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rmajor, rminor, len(encoded), 0)
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        out.write(header + encoded)
        out.write(b"\0" * (-(len(header) + len(encoded)) % 4))
        out.write(data)
        out.write(b"\0" * (-len(data) % 4))


# ---------------------------------------------------------------------------------------------------------
# inputs


def shared_libraries(binary: str) -> list:
    """``[(path in the guest, real path on the host)]`` of what ``ldd`` says ``binary`` loads."""
    result = subprocess.run(["ldd", binary], capture_output=True, text=True)
    if result.returncode != 0:
        if "not a dynamic executable" in result.stdout + result.stderr:
            return []
        raise RuntimeError("ldd %s: %s" % (binary, result.stderr.strip()))
    libs = []
    for line in result.stdout.splitlines():
        line = line.strip()
        m = re.match(r"\S+ => (/\S+) \(", line) or re.match(r"(/\S+) \(", line)
        if m:
            libs.append((m.group(1), os.path.realpath(m.group(1))))
    return libs


_STDLIB_HELPER = r"""
import sys
src_root, stdlib_dir, zip_path = sys.argv[1:4]
sys.path.insert(0, src_root)
for name in sys.argv[4].split(",") + sys.argv[5].split(","):
    __import__(name)
# Snapshot before this helper imports anything of its own.
modules = dict(sys.modules)
import importlib.util, importlib._bootstrap_external as ext, json, zipfile
files = {}
dynload = []
for name, module in sorted(modules.items()):
    spec = getattr(module, "__spec__", None)
    origin = getattr(spec, "origin", None)
    if not origin or origin in ("built-in", "frozen"):
        continue
    if origin.endswith(".so"):
        dynload.append(origin)
        continue
    if not origin.endswith(".py"):
        continue
    if origin.startswith(src_root + "/hyperd/"):
        arcname = origin[len(src_root) + 1:]
    elif origin.startswith(stdlib_dir + "/"):
        arcname = origin[len(stdlib_dir) + 1:]
    else:
        continue
    files[arcname[:-3] + ".pyc"] = origin
with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_STORED) as z:
    for arcname in sorted(files):
        with open(files[arcname], "rb") as f:
            source = f.read()
        code = compile(source, "/" + %(zip)r + "/" + arcname[:-1], "exec", dont_inherit=True)
        pyc = ext._code_to_hash_pyc(code, importlib.util.source_hash(source), checked=False)
        info = zipfile.ZipInfo(arcname, date_time=(1980, 1, 1, 0, 0, 0))
        info.external_attr = 0o644 << 16
        info.create_system = 3
        z.writestr(info, pyc)
print(json.dumps({"sources": sorted(files.values()), "dynload": sorted(set(dynload))}))
""" % {"zip": GUEST_ZIP}


def build_stdlib_zip(python: str = GUEST_PYTHON, src_root: str = _SRC_ROOT) -> tuple:
    """``(zip bytes, source files, extension modules)`` for what the guest's entry modules import.

    The imports run in the guest's own interpreter with ``-S`` and a bare environment, as in the VM;
    PYTHONHASHSEED=0 keeps set constants in the .pyc in a fixed order.
    """
    with tempfile.TemporaryDirectory(prefix="hd-mkinitrd") as tmp:
        zip_path = os.path.join(tmp, "stdlib.zip")
        env = {"PYTHONHASHSEED": "0", "PATH": "/usr/bin:/bin", "HOME": "/", "TERM": "linux"}
        result = subprocess.run(
            [python, "-S", "-s", "-B", "-c", _STDLIB_HELPER, src_root, STDLIB_DIR, zip_path,
             ",".join(GUEST_ENTRY_MODULES), ",".join(EXTRA_STDLIB_MODULES)],
            capture_output=True, text=True, env=env, cwd=tmp)
        if result.returncode != 0:
            raise RuntimeError("collecting the guest's stdlib failed:\n" + result.stderr)
        info = json.loads(result.stdout)
        with open(zip_path, "rb") as f:
            return f.read(), info["sources"], info["dynload"]


def guest_sources(src_root: str = _SRC_ROOT) -> list:
    """Our own files that end up in the guest (all of them, so that a new module triggers a rebuild)."""
    paths = [os.path.join(src_root, "hyperd", "__init__.py"),
             os.path.join(src_root, "hyperd", "agent", "__init__.py"),
             os.path.join(src_root, "hyperd", "agent", "codec.py")]
    guest = os.path.join(src_root, "hyperd", "guest")
    paths += [os.path.join(guest, n) for n in sorted(os.listdir(guest)) if n.endswith(".py")]
    return paths


def _file_id(path: str) -> list:
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns]


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


# ---------------------------------------------------------------------------------------------------------
# build


def _module_files(version: str) -> dict:
    """``{module name: .ko path}`` for the modules the guest loads (uncompressed .ko only)."""
    found = {}
    for name in guest_modules.ALL:
        result = subprocess.run(["modinfo", "-k", version, "-F", "filename", name], capture_output=True, text=True)
        path = result.stdout.strip()
        if result.returncode != 0 or not path or path == "(builtin)" or path.startswith("(builtin)"):
            continue
        if not path.endswith((".ko", ".ko.xz", ".ko.gz")):
            raise RuntimeError("%s: cannot unpack %s (plain, .xz and .gz modules are supported)" % (name, path))
        found[name] = path
    missing = [n for n in guest_modules.SERIAL if n not in found]
    if missing:
        raise RuntimeError("modules missing for kernel %s: %s" % (version, ", ".join(missing)))
    return found


_SIG_MAGIC = b"~Module signature appended~\n"


def strip_module_signature(data: bytes) -> bytes:
    """The module without its appended signature.

    The kernel (CONFIG_MODULE_SIG without _FORCE) verifies a signature when one is present: SHA-256 and RSA
    under TCG, ~10 ms a module. The modules come from this host's own package into an initramfs we build,
    so the check buys nothing in the guest; unsigned, they load after one "tainting kernel" line.
    """
    if not data.endswith(_SIG_MAGIC):
        return data
    # struct module_signature (12 bytes, sig_len is its last field, u32 BE) precedes the magic
    sig_len = int.from_bytes(data[-len(_SIG_MAGIC) - 4:-len(_SIG_MAGIC)], "big")
    end = len(data) - len(_SIG_MAGIC) - 12 - sig_len
    if end <= 0:
        return data
    return data[:end]


def _build_initrd(version: str, python: str) -> tuple:
    """``(cpio bytes, {host input path: identity})``."""
    cpio = Cpio()
    inputs = {}

    def add_host_file(guest_path, host_path, perm=None):
        with open(host_path, "rb") as f:
            data = f.read()
        if perm is None:
            perm = 0o755 if os.stat(host_path).st_mode & 0o111 else 0o644
        cpio.add_file(guest_path, data, perm)
        inputs[host_path] = _file_id(host_path)

    for d in ("proc", "sys", "dev", "tmp", "run", "mnt", "root", "etc", "sbin", "usr/bin", "usr/sbin",
              guest_modules.MODULE_DIR):
        cpio.add_dir(d)
    cpio.add_dir("tmp", 0o1777)
    cpio.add_chardev("dev/console", 5, 1)
    cpio.add_chardev("dev/null", 1, 3, 0o666)

    # busybox and its applets
    add_host_file("bin/busybox", BUSYBOX, 0o755)
    applets = subprocess.run([BUSYBOX, "--list-full"], capture_output=True, text=True, check=True).stdout.split()
    for applet in applets:
        if applet.strip("/") not in cpio:
            cpio.add_symlink(applet, "/bin/busybox")

    # python, its libraries and extension modules
    add_host_file(python.lstrip("/"), python, 0o755)
    zip_bytes, sources, dynload = build_stdlib_zip(python)
    cpio.add_file(GUEST_ZIP, zip_bytes)
    for source in sources:
        if source.startswith(_SRC_ROOT + "/"):
            inputs[source] = _sha256(source)
        else:
            inputs[source] = _file_id(source)
    for source in guest_sources():
        inputs[source] = _sha256(source)
    # getpath's landmarks: prefix (lib/python3.11/os.py) and exec_prefix (lib-dynload).
    cpio.add_file(STDLIB_DIR + "/os.py", b"")
    cpio.add_dir(STDLIB_DIR + "/lib-dynload")
    libs = dict(shared_libraries(python))
    for so in dynload:
        add_host_file(so.lstrip("/"), so, 0o644)
        libs.update(shared_libraries(so))
    for guest_path, host_path in sorted(libs.items()):
        add_host_file(guest_path.lstrip("/"), host_path, 0o755)

    # kernel modules, flat, under the names the guest loads them by; decompressed here, since
    # finit_module of a compressed module needs kernel support this kernel may not have
    for name, path in sorted(_module_files(version).items()):
        with open(path, "rb") as f:
            data = f.read()
        if path.endswith(".xz"):
            data = lzma.decompress(data)
        elif path.endswith(".gz"):
            data = gzip.decompress(data)
        data = strip_module_signature(data)
        cpio.add_file("%s/%s.ko" % (guest_modules.MODULE_DIR.strip("/"), name), data, 0o644)
        inputs[path] = _file_id(path)

    cpio.add_file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
    cpio.add_file("etc/group", b"root:x:0:\ntty:x:5:\n")
    cpio.add_file("etc/hostname", b"hyper\n")
    cpio.add_file("init", INIT_SCRIPT, 0o755)

    out = io.BytesIO()
    cpio.write(out)
    return out.getvalue(), inputs


def _atomic_write(path: str, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _manifest_current(manifest_path: str, kernel_path: str, python: str) -> bool:
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return False
    if manifest.get("builder_version") != BUILDER_VERSION or manifest.get("kernel_source") != kernel_path:
        return False
    if manifest.get("python") != python:
        return False
    for key in ("kernel", "initrd"):
        entry = manifest.get(key) or {}
        try:
            if os.path.getsize(entry["path"]) != entry["size"]:
                return False
        except (OSError, KeyError, TypeError):
            return False
    inputs = manifest.get("inputs") or {}
    if any(source not in inputs for source in guest_sources()):
        return False
    for path, identity in inputs.items():
        try:
            current = _sha256(path) if isinstance(identity, str) else _file_id(path)
        except OSError:
            return False
        if current != identity:
            return False
    return True


def build_guest(root: str, force: bool = False, python: str = GUEST_PYTHON, boot: str = "/boot") -> GuestFiles:
    """Build (or reuse) ``<root>/kernel`` and ``<root>/hyper-initrd.img``."""
    os.makedirs(root, exist_ok=True)
    kernel_out = os.path.join(root, KERNEL_NAME)
    initrd_out = os.path.join(root, INITRD_NAME)
    manifest_out = os.path.join(root, MANIFEST_NAME)
    kernel_src, version = newest_kernel(boot)
    with open(os.path.join(root, ".guest-build.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two daemons or tests building at once take turns
        if not force and _manifest_current(manifest_out, kernel_src, python):
            return GuestFiles(kernel_out, initrd_out, manifest_out, built=False)
        with open(kernel_src, "rb") as f:
            vmlinux = extract_vmlinux(f.read())
        initrd, inputs = _build_initrd(version, python)
        inputs[kernel_src] = _file_id(kernel_src)
        _atomic_write(kernel_out, vmlinux)
        _atomic_write(initrd_out, initrd)
        manifest = {
            "builder_version": BUILDER_VERSION,
            "kernel_source": kernel_src,
            "kernel_version": version,
            "python": python,
            "kernel": {"path": kernel_out, "size": len(vmlinux), "sha256": hashlib.sha256(vmlinux).hexdigest()},
            "initrd": {"path": initrd_out, "size": len(initrd), "sha256": hashlib.sha256(initrd).hexdigest()},
            "inputs": dict(sorted(inputs.items())),
        }
        _atomic_write(manifest_out, (json.dumps(manifest, indent=1) + "\n").encode())
        return GuestFiles(kernel_out, initrd_out, manifest_out, built=True)


# ---------------------------------------------------------------------------------------------------------
# kernel command line


@lru_cache(maxsize=1)
def host_tsc_khz():
    """The host's TSC frequency in kHz when it is trustworthy, else None.

    Under TCG the guest's TSC is the host's, so passing its frequency skips the guest's slow calibration.
    Trusted only with an invariant TSC (constant_tsc + nonstop_tsc) and a frequency the kernel itself
    reported ("tsc: Refined TSC clocksource calibration" or "tsc: Detected ... MHz processor").
    """
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return None
    if "constant_tsc" not in flags or "nonstop_tsc" not in flags:
        return None
    text = _kernel_log()
    refined = re.findall(r"Refined TSC clocksource calibration: (\d+)\.(\d+) MHz", text)
    detected = re.findall(r"tsc: Detected (\d+)\.(\d+) MHz processor", text)
    found = refined or detected
    if not found:
        return None
    mhz, frac = found[-1]
    return int(mhz) * 1000 + int(frac.ljust(3, "0")[:3])


def _kernel_log() -> str:
    try:
        fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return ""
    chunks = []
    try:
        while True:
            try:
                chunks.append(os.read(fd, 8192))
            except BlockingIOError:
                break
            except OSError as e:
                if e.errno == 32:  # EPIPE: a record was overwritten while reading; go on
                    continue
                break
    finally:
        os.close(fd)
    return b"".join(chunks).decode("utf-8", "replace")


@lru_cache(maxsize=1)
def _kernel_hz():
    """CONFIG_HZ of the guest kernel (for lpj), from /boot/config-<version>; None when unknown."""
    try:
        _, version = newest_kernel()
        with open("/boot/config-%s" % version) as f:
            for line in f:
                if line.startswith("CONFIG_HZ="):
                    return int(line.split("=", 1)[1])
    except (OSError, ValueError):
        pass
    return None


def kernel_cmdline(extra: str = "") -> str:
    """The ``-append`` string for qemu (PYTHONHASHSEED=0 becomes the agent's environment)."""
    parts = [BASE_CMDLINE]
    khz = host_tsc_khz()
    if khz:
        parts.append("tsc_early_khz=%d tsc=reliable" % khz)
        hz = _kernel_hz()
        if hz:
            parts.append("lpj=%d" % (khz * 1000 // hz))
    parts.append("PYTHONHASHSEED=0")
    if extra:
        parts.append(extra)
    return " ".join(parts)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="hyperd-mkinitrd", description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default=DEFAULT_ROOT, help="where to write kernel and hyper-initrd.img")
    parser.add_argument("--force", action="store_true", help="rebuild even when nothing changed")
    args = parser.parse_args(argv)
    files = build_guest(args.root, force=args.force)
    print(files.kernel)
    print(files.initrd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
