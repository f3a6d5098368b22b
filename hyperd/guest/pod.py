"""The pod commands of the guest agent: STARTPOD, NEWCONTAINER, EXECCMD, signals, files, window sizes.

Runs inside the VM, standard library only; ``install(agent)`` adds the handlers to the agent's dispatch table.
Layout (as hyperstart's): the 9p tag ``share_dir`` at /tmp/hyper/shared, ``images`` read-only at
/tmp/hyper/shared/images; a container's rootfs is an overlay of ``/tmp/hyper/shared/<image>/<rootfs>`` (lower,
read-only) with upper/work on guest tmpfs, mounted at /tmp/hyper/<cid>/root. The pod's shared pid/ipc/uts
namespaces belong to a small pod init process (PID 1 of the pod); each container has its own mount
namespace and is entered with chroot. See docs/guest-protocol.md for every payload and reply.

Nothing heavy is imported at module level: this module loads before READY.
"""

import _signal as signal
import _socket
import binascii
import errno
import fcntl
import os
import struct

from hyperd.agent import codec
from hyperd.guest import jsonc, linux, modules, net, services
from hyperd.guest.agent import DEBUG, CommandError, decode_json, describe_exception, exit_status, log, uptime

HYPER_DIR = "/tmp/hyper"
SHARED_DIR = HYPER_DIR + "/shared"
IMAGES_TAG = "images"
DEFAULT_SHARE_TAG = "share_dir"
DEFAULT_HOSTNAME = "hyper"
SHM_DIR = HYPER_DIR + "/shm"
NINEP_DRIVER = "/sys/bus/virtio/drivers/9pnet_virtio"
NINEP_OPTIONS = "trans=virtio,version=9p2000.L,msize=512000"
#: Unpacked images never change (a digest names each), so the guest may keep their pages and inodes: with the
#: default cache=none every exec of an image's binary read it again over 9p (0.05-0.13 s for busybox under TCG,
#: 0.015-0.025 s cached). Negative lookups are never cached, so images unpacked later still appear.
IMAGES_OPTIONS = NINEP_OPTIONS + ",cache=loose"

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
HYPERSTART = "hyperstart"  # the pseudo-container: run in the VM itself, outside any container

F_SETPIPE_SZ = 1031
#: Output pipes are enlarged to this, and read in chunks this big: fewer trips through the Python loop,
#: which is what limits throughput under TCG (~45 MB/s with 64 KiB pipes).
PIPE_SIZE = 1 << 20

TIOCSCTTY = 0x540E
TIOCSWINSZ = 0x5414

MAX_READFILE = 32 * 1024 * 1024

#: The device nodes a container's /dev gets (a tmpfs, not the VM's devtmpfs: the ports stay out of reach).
DEVICES = (("null", 1, 3), ("zero", 1, 5), ("full", 1, 7), ("random", 1, 8), ("urandom", 1, 9), ("tty", 5, 0))
DEV_LINKS = (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
             ("stderr", "/proc/self/fd/2"), ("ptmx", "pts/ptmx"), ("core", "/proc/kcore"))


def install(agent) -> "Pod":
    pod = Pod(agent)
    for code, handler in (
        (codec.STARTPOD, pod.cmd_startpod),
        (codec.NEWCONTAINER, pod.cmd_newcontainer),
        (codec.EXECCMD, pod.cmd_execcmd),
        (codec.KILLCONTAINER, pod.cmd_killcontainer),
        (codec.SIGNALPROCESS, pod.cmd_signalprocess),
        (codec.REMOVECONTAINER, pod.cmd_removecontainer),
        (codec.WRITEFILE, pod.cmd_writefile),
        (codec.READFILE, pod.cmd_readfile),
        (codec.WINSIZE, pod.cmd_winsize),
    ):
        agent.register(code, handler)
    agent.destroy_hooks.append(pod.destroy)
    return pod


# ---------------------------------------------------------------------------------------------------------
# value helpers


def _str(value, field: str, default: str = "") -> str:
    if value is None:
        return default
    if not isinstance(value, str):
        raise CommandError("%s must be a string" % field)
    return value


def _int(value, field: str, default: int = 0) -> int:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise CommandError("%s must be an integer" % field)
    return value


def _strings(value, field: str) -> list:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise CommandError("%s must be a list of strings" % field)
    return value


def _inside(base: str, relative: str, field: str) -> str:
    """``base/relative``, refusing anything that leaves ``base``."""
    path = os.path.normpath(os.path.join(base, relative.lstrip("/")))
    if path != base and not path.startswith(base + "/"):
        raise CommandError("%s %r leaves %s" % (field, relative, base))
    return path


def resolve_in_root(root: str, path: str, follow_last: bool = True) -> str:
    """The host path of ``path`` as seen from a chroot at ``root``: symlinks resolve against ``root``."""
    if root == "/":
        return os.path.normpath("/" + path)
    parts = [p for p in path.split("/") if p and p != "."]
    resolved = []
    links = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        candidate = root + "/" + "/".join(resolved + [part])
        if (parts or follow_last) and os.path.islink(candidate):
            links += 1
            if links > 40:
                raise CommandError("too many levels of symbolic links in %r" % path)
            target = os.readlink(candidate)
            if target.startswith("/"):
                resolved = []
            parts = [p for p in target.split("/") if p and p != "."] + parts
            continue
        resolved.append(part)
    return root + "/" + "/".join(resolved) if resolved else root


def _makedirs(path: str, mode: int = 0o755) -> None:
    try:
        os.makedirs(path, mode, exist_ok=True)
    except FileExistsError:
        pass


def _rmtree(path: str) -> None:
    """rm -rf without following symlinks (shutil is too heavy to import in the guest)."""
    try:
        entries = list(os.scandir(path))
    except NotADirectoryError:
        os.unlink(path)
        return
    except FileNotFoundError:
        return
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            _rmtree(entry.path)
        else:
            try:
                os.unlink(entry.path)
            except FileNotFoundError:
                pass
    try:
        os.rmdir(path)
    except FileNotFoundError:
        pass


def _db_lines(path: str) -> list:
    """The lines of a passwd-style file; none if it is missing."""
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return []


def _passwd_lookup(name: str, path: str = "/etc/passwd"):
    """``(uid, gid, home)`` for a user name or number, from the (already chrooted) passwd file."""
    for line in _db_lines(path):
        fields = line.split(":")
        if len(fields) >= 7 and (fields[0] == name or fields[2] == name):
            return int(fields[2]), int(fields[3]), fields[5]
    if name.isdigit():
        return int(name), int(name), "/"
    raise CommandError("unable to find user %s: no matching entries in passwd file" % name)


def _group_lookup(name: str, path: str = "/etc/group") -> int:
    for line in _db_lines(path):
        fields = line.split(":")
        if len(fields) >= 3 and (fields[0] == name or fields[2] == name):
            return int(fields[2])
    if name.isdigit():
        return int(name)
    raise CommandError("unable to find group %s: no matching entries in group file" % name)


def _ninep_tags() -> set:
    tags = set()
    try:
        devices = os.listdir(NINEP_DRIVER)
    except FileNotFoundError:
        return tags
    for device in devices:
        try:
            with open("%s/%s/mount_tag" % (NINEP_DRIVER, device), "rb") as f:
                tags.add(f.read().strip(b"\0\n ").decode())
        except OSError:
            continue
    return tags


def _is_mountpoint(path: str) -> bool:
    try:
        with open("/proc/self/mountinfo") as f:
            return any(line.split()[4] == path for line in f)
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------------------
# processes


class Process:
    """One process the host started (a container's init or an EXECCMD) and its stdio on the stream port."""

    def __init__(self, container: str, process_id: str, stdio: int, stderr: int, terminal: bool) -> None:
        self.container = container
        self.id = process_id
        self.stdio = stdio
        self.stderr = stderr
        self.terminal = terminal
        self.pid = 0
        self.status = None
        self.stdin_fd = -1
        self.stdin_buffer = bytearray()
        self.stdin_eof = False
        self.outputs = {}  # fd -> seq (0: discard)
        self.tty_fd = -1
        self.finished = False


class Container:
    def __init__(self, container_id: str, root: str, directory: str) -> None:
        self.id = container_id
        self.root = root
        self.dir = directory
        self.init = None
        self.processes = {}  # process id -> Process
        self.mnt_ns = None  # inode of the container's mount namespace
        self.mnt_fd = -1  # and an fd of it, which keeps it (see cmd_newcontainer)
        self.exited = False


class Pod:
    def __init__(self, agent) -> None:
        self.agent = agent
        self.started = False
        self.hostname = "hyper"
        self.init_pid = 0
        self.ns_fds = {}  # "pid"/"ipc"/"uts" -> fd of the pod init's namespaces
        self.own_pid_ns = -1
        self.containers = {}
        self.host_processes = {}  # EXECCMD into "hyperstart"
        self.processes_by_seq = {}
        self.share_tag = None  # the 9p tag mounted at SHARED_DIR
        self.services = services.Services(agent, net.run_ip)

    # ---- idle work, before the first pod ----

    def premount_shares(self) -> None:
        """Idle work (after the kernel modules): mount the 9p shares under the default tag before STARTPOD
        asks, so that a pod started in a waiting VM does not pay for it."""
        if not self.started:
            self._mount_shares(DEFAULT_SHARE_TAG)

    def prefork_pod_init(self) -> None:
        """Idle work: the next pod's init process (its pid, ipc and uts namespaces) made before STARTPOD;
        STARTPOD then only names its host."""
        if not self.started and not self.init_pid:
            self._start_pod_init(DEFAULT_HOSTNAME)

    # ---- STARTPOD ----

    def cmd_startpod(self, payload: bytes) -> bytes:
        self.agent.require_deferred(until=modules.POD_NEEDS)  # 9p and overlay; not the NIC's
        spec = decode_json(payload)
        hostname = _str(spec.get("hostname"), "hostname") or DEFAULT_HOSTNAME
        if len(hostname) > 64:
            raise CommandError("hostname %r is longer than 64 characters" % hostname)
        dns = _strings(spec.get("dns"), "dns")
        search = _strings(spec.get("dnsSearch"), "dnsSearch")
        options = _strings(spec.get("dnsOptions"), "dnsOptions")
        share_tag = _str(spec.get("shareDir"), "shareDir") or DEFAULT_SHARE_TAG
        if self.started:
            self._stop_pod()
        self._mount_shares(share_tag)
        self.services.configure(spec.get("services"))  # ours: hyperd set them up with ipvs after STARTPOD
        _makedirs(SHM_DIR)
        if not _is_mountpoint(SHM_DIR):
            linux.mount("shm", SHM_DIR, "tmpfs", linux.MS_NOSUID | linux.MS_NODEV, "mode=1777")
        self._write(HYPER_DIR + "/hostname", hostname + "\n")
        self._write(HYPER_DIR + "/hosts", "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
                    "127.0.1.1\t%s\n" % hostname)
        resolv = HYPER_DIR + "/resolv.conf"
        if dns or search or options:
            lines = ["nameserver %s" % d for d in dns]
            if search:
                lines.append("search " + " ".join(search))
            if options:
                lines.append("options " + " ".join(options))
            self._write(resolv, "\n".join(lines) + "\n")
        else:
            try:
                os.unlink(resolv)
            except FileNotFoundError:
                pass
        self.hostname = hostname
        if self.init_pid and self.ns_fds:
            self._set_pod_hostname(hostname)  # the init made while the VM waited: it becomes this pod's
        else:
            self._start_pod_init(hostname)
        self.started = True
        return b""

    @staticmethod
    def _write(path: str, text: str) -> None:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)

    def _mount_shares(self, share_tag: str) -> None:
        tags = _ninep_tags()
        _makedirs(SHARED_DIR)
        images = SHARED_DIR + "/" + IMAGES_TAG
        if self.share_tag not in (None, share_tag) and share_tag in tags:
            # Mounted while idle under the default tag; this pod names another one.
            for path in (images, SHARED_DIR):
                if _is_mountpoint(path):
                    linux.umount(path, linux.MNT_DETACH)
            self.share_tag = None
        if share_tag in tags and not _is_mountpoint(SHARED_DIR):
            linux.mount(share_tag, SHARED_DIR, "9p", 0, NINEP_OPTIONS)
            self.share_tag = share_tag
        if IMAGES_TAG in tags and not _is_mountpoint(images):
            try:
                os.mkdir(images)
            except FileExistsError:
                pass
            linux.mount(IMAGES_TAG, images, "9p", linux.MS_RDONLY, IMAGES_OPTIONS)

    def _start_pod_init(self, hostname: str) -> None:
        """PID 1 of the pod's pid namespace, also holding its ipc and uts namespaces (like hyperstart)."""
        if self.own_pid_ns < 0:
            self.own_pid_ns = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
        self._close_pod_namespaces()  # of an init that died
        ready_r, ready_w = os.pipe()
        linux.unshare(linux.CLONE_NEWPID)  # only our children go into the new pid namespace
        try:
            pid = os.fork()
        except BaseException:
            linux.setns(self.own_pid_ns, linux.CLONE_NEWPID)
            raise
        if pid == 0:
            _pod_init_main(hostname, ready_w)  # never returns
        linux.setns(self.own_pid_ns, linux.CLONE_NEWPID)
        self.agent.watch_child(pid, _bind(self._pod_init_exited, pid))
        os.close(ready_w)
        try:
            ok = os.read(ready_r, 1)
        finally:
            os.close(ready_r)
        if ok != b"1":
            raise CommandError("the pod's init process failed to start")
        self.init_pid = pid
        for name in ("pid", "ipc", "uts"):
            self.ns_fds[name] = os.open("/proc/%d/ns/%s" % (pid, name), os.O_RDONLY | os.O_CLOEXEC)

    def _set_pod_hostname(self, hostname: str) -> None:
        own = os.open("/proc/self/ns/uts", os.O_RDONLY | os.O_CLOEXEC)
        try:
            linux.setns(self.ns_fds["uts"], linux.CLONE_NEWUTS)
            try:
                _socket.sethostname(hostname)
            finally:
                linux.setns(own, linux.CLONE_NEWUTS)
        finally:
            os.close(own)

    def _pod_init_exited(self, pid: int, status: int) -> None:
        if pid != self.init_pid:
            return  # an earlier pod's init, killed when that pod ended
        log("pod init exited (%d)" % exit_status(status))
        self.init_pid = 0

    def _close_pod_namespaces(self) -> None:
        for fd in self.ns_fds.values():
            os.close(fd)
        self.ns_fds = {}

    def _stop_pod(self) -> None:
        self.services.clear()
        for container in list(self.containers.values()):
            self._remove_container(container)
        if self.init_pid:
            try:
                os.kill(self.init_pid, 9)
            except ProcessLookupError:
                pass
            self.init_pid = 0
        self._close_pod_namespaces()
        self.started = False

    # ---- NEWCONTAINER ----

    def cmd_newcontainer(self, payload: bytes) -> bytes:
        if not self.started:
            raise CommandError("STARTPOD first: the pod is not started")
        spec = decode_json(payload)
        cid = _str(spec.get("id"), "id")
        if not cid or "/" in cid or cid in (".", "..", HYPERSTART):
            raise CommandError("invalid container id %r" % cid)
        if cid in self.containers:
            raise CommandError("container %s already exists" % cid)
        process = spec.get("process")
        if not isinstance(process, dict):
            raise CommandError("process is required")
        if spec.get("volumes"):
            raise CommandError("block device volumes are not supported; use fsmap")
        image = _str(spec.get("image"), "image")
        if not image:
            raise CommandError("image is required")
        lower = _inside(SHARED_DIR, image + "/" + (_str(spec.get("rootfs"), "rootfs") or "rootfs"), "image")
        if not os.path.isdir(lower):
            raise CommandError("container %s: rootfs %s not found in the share" % (cid, lower))
        directory = HYPER_DIR + "/" + cid
        root = directory + "/root"
        container = Container(cid, root, directory)
        try:
            self._prepare_rootfs(container, lower, bool(spec.get("readOnly")))
            self._mount_volumes(container, spec.get("fsmap") or [])
            self._write_files(container, spec.get("files") or [])
            self._apply_sysctl(spec.get("sysctl") or {})
            self.containers[cid] = container
            proc = self._spawn(container, process, default_id="init")
        except BaseException:
            self.containers.pop(cid, None)
            self._unmount_container(container)
            raise
        container.init = proc
        try:
            # Held until the container is removed: its mounts then outlive its last process, so that process
            # exits (and its exit is reported) without first tearing them all down (an RCU grace period
            # and a dozen unmounts, 10-20 ms under TCG).
            container.mnt_fd = os.open("/proc/%d/ns/mnt" % proc.pid, os.O_RDONLY | os.O_CLOEXEC)
            container.mnt_ns = os.fstat(container.mnt_fd).st_ino
        except OSError:
            pass
        return b""

    def _prepare_rootfs(self, container: Container, lower: str, read_only: bool) -> None:
        upper, work = container.dir + "/upper", container.dir + "/work"
        for d in (container.dir, upper, work, container.root):
            _makedirs(d)
        options = "lowerdir=%s,upperdir=%s,workdir=%s" % (lower, upper, work)
        linux.mount("overlay", container.root, "overlay", 0, options)
        root = container.root
        for d in ("proc", "dev", "sys", "etc", "tmp"):
            path = root + "/" + d
            if not os.path.lexists(path):
                _makedirs(path, 0o1777 if d == "tmp" else 0o755)
        for name in ("hostname", "hosts", "resolv.conf"):
            source = HYPER_DIR + "/" + name
            if not os.path.exists(source):
                continue
            target = resolve_in_root(root, "/etc/" + name)
            if not target.startswith(root + "/"):
                continue
            if os.path.islink(target) or os.path.isdir(target):
                continue
            if not os.path.exists(target):
                with open(target, "wb"):
                    pass
            linux.mount(source, target, None, linux.MS_BIND)
        if read_only:
            linux.mount(None, root, None, linux.MS_REMOUNT | linux.MS_RDONLY)

    def _mount_volumes(self, container: Container, fsmap) -> None:
        if not isinstance(fsmap, list):
            raise CommandError("fsmap must be a list")
        for index, volume in enumerate(fsmap):
            if not isinstance(volume, dict):
                raise CommandError("fsmap[%d] must be an object" % index)
            source = _inside(SHARED_DIR, _str(volume.get("source"), "fsmap[%d].source" % index), "fsmap source")
            path = _str(volume.get("path"), "fsmap[%d].path" % index)
            if not path.startswith("/"):
                raise CommandError("fsmap[%d].path must be absolute" % index)
            if not os.path.exists(source):
                raise CommandError("fsmap[%d]: %s not found in the share" % (index, volume.get("source")))
            target = resolve_in_root(container.root, path)
            if os.path.isdir(source):
                _makedirs(target)
            elif not os.path.exists(target):
                _makedirs(os.path.dirname(target))
                with open(target, "wb"):
                    pass
            linux.mount(source, target, None, linux.MS_BIND | linux.MS_REC)
            if volume.get("readOnly"):
                linux.mount(None, target, None, linux.MS_REMOUNT | linux.MS_BIND | linux.MS_RDONLY)

    def _write_files(self, container: Container, files) -> None:
        if not isinstance(files, list):
            raise CommandError("files must be a list")
        for index, item in enumerate(files):
            if not isinstance(item, dict):
                raise CommandError("files[%d] must be an object" % index)
            path = _str(item.get("path"), "files[%d].path" % index)
            try:
                data = binascii.a2b_base64(_str(item.get("content"), "files[%d].content" % index).encode(),
                                           strict_mode=True)
            except (ValueError, binascii.Error) as e:
                raise CommandError("files[%d].content: %s" % (index, e)) from None
            perm = item.get("perm", "0644")
            mode = int(perm, 8) if isinstance(perm, str) else _int(perm, "files[%d].perm" % index)
            target = self._write_file(container.root, path, data, mode)
            uid, gid = item.get("uid"), item.get("gid")
            if uid is not None or gid is not None:
                os.chown(target, _int(uid, "uid", -1), _int(gid, "gid", -1))

    @staticmethod
    def _write_file(root: str, path: str, data: bytes, mode=None) -> str:
        if not path or path.endswith("/"):
            raise CommandError("file %r is not a file path" % path)
        target = resolve_in_root(root, path)
        if os.path.isdir(target):
            raise CommandError("%s is a directory" % path)
        _makedirs(os.path.dirname(target))
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o644 if mode is None else mode)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if mode is not None:
                os.fchmod(fd, mode)
        finally:
            os.close(fd)
        return target

    @staticmethod
    def _apply_sysctl(sysctl) -> None:
        if not isinstance(sysctl, dict):
            raise CommandError("sysctl must be an object")
        for key, value in sysctl.items():
            path = _inside("/proc/sys", key.replace(".", "/"), "sysctl")
            try:
                with open(path, "w") as f:
                    f.write(str(value))
            except OSError as e:
                raise CommandError("sysctl %s=%s: %s" % (key, value, e.strerror)) from None

    # ---- EXECCMD ----

    def cmd_execcmd(self, payload: bytes) -> bytes:
        spec = decode_json(payload)
        cid = _str(spec.get("container"), "container")
        process = spec.get("process")
        if not isinstance(process, dict):
            raise CommandError("process is required")
        if cid == HYPERSTART:
            self._spawn(None, process, default_id="")
            return b""
        container = self.containers.get(cid)
        if container is None:
            raise CommandError("container %s not found" % cid)
        if container.exited:
            raise CommandError("container %s is not running" % cid)
        self._spawn(container, process, default_id="")
        return b""

    # ---- spawning ----

    def _spawn(self, container, spec: dict, default_id: str) -> Process:
        cname = container.id if container is not None else HYPERSTART
        pid_ = _str(spec.get("id"), "process.id") or default_id
        if not pid_:
            raise CommandError("process.id is required")
        table = container.processes if container is not None else self.host_processes
        if pid_ in table:
            raise CommandError("process %s already exists in %s" % (pid_, cname))
        args = _strings(spec.get("args"), "process.args")
        if not args:
            raise CommandError("process.args must not be empty")
        envs = spec.get("envs") or []
        if not isinstance(envs, list):
            raise CommandError("process.envs must be a list")
        env = {}
        for item in envs:
            if isinstance(item, dict) and isinstance(item.get("env"), str):
                env[item["env"]] = str(item.get("value", ""))
            elif isinstance(item, str) and "=" in item:
                key, _, value = item.partition("=")
                env[key] = value
        terminal = bool(spec.get("terminal"))
        stdio = _int(spec.get("stdio"), "process.stdio")
        stderr = _int(spec.get("stderr"), "process.stderr")
        for seq in (stdio, stderr):
            if seq and seq in self.processes_by_seq:
                raise CommandError("stream seq %d is already in use" % seq)
        setup = {
            "args": args,
            "env": env,
            "workdir": _str(spec.get("workdir"), "process.workdir") or "/",
            "user": _str(spec.get("user"), "process.user"),
            "group": _str(spec.get("group"), "process.group"),
            "groups": [str(g) for g in (spec.get("additionalGroups") or [])],
            "terminal": terminal,
            "hostname": self.hostname,
        }
        proc = Process(cname, pid_, stdio, stderr, terminal)
        child_fds = []
        parent_fds = []
        try:
            if terminal:
                master, slave = os.openpty()
                parent_fds.append(master)
                child_fds.append(slave)
                stdio_fds = (slave, slave, slave)
            else:
                in_r, in_w = os.pipe()
                out_r, out_w = os.pipe()
                parent_fds += [in_w, out_r]
                child_fds += [in_r, out_w]
                if stderr:
                    err_r, err_w = os.pipe()
                    parent_fds.append(err_r)
                    child_fds.append(err_w)
                else:
                    err_r, err_w = None, out_w  # no stderr seq: stderr goes with stdout
                stdio_fds = (in_r, out_w, err_w)
            status_r, status_w = os.pipe()
            child_fds.append(status_w)
            parent_fds.append(status_r)
            mnt_fd = -1
            if container is not None and container.init is not None:
                mnt_fd = os.open("/proc/%d/ns/mnt" % container.init.pid, os.O_RDONLY | os.O_CLOEXEC)
                parent_fds.append(mnt_fd)
            in_pod = container is not None
            if in_pod:
                # Children forked now are born in the pod's pid namespace; the agent itself stays out.
                linux.setns(self.ns_fds["pid"], linux.CLONE_NEWPID)
            try:
                pid = os.fork()
            except BaseException:
                if in_pod:
                    linux.setns(self.own_pid_ns, linux.CLONE_NEWPID)
                raise
            if pid == 0:
                _child_main(setup, container, stdio_fds, status_w, mnt_fd, self.ns_fds if in_pod else None)
            if in_pod:
                linux.setns(self.own_pid_ns, linux.CLONE_NEWPID)
        except BaseException:
            for fd in child_fds + parent_fds:
                _close(fd)
            raise
        for fd in child_fds:
            _close(fd)
        if mnt_fd >= 0:
            _close(mnt_fd)
        error = _read_all(status_r)
        _close(status_r)
        if error:
            for fd in parent_fds:
                if fd not in (status_r, mnt_fd):
                    _close(fd)
            os.waitpid(pid, 0)
            raise CommandError(error.decode("utf-8", "replace"))
        proc.pid = pid
        table[pid_] = proc
        if terminal:
            proc.tty_fd = master
            os.set_blocking(master, False)
            proc.outputs[master] = stdio
        else:
            if stdio:
                proc.stdin_fd = in_w
                os.set_blocking(in_w, False)
            else:
                _close(in_w)  # no stdio stream: stdin is at EOF at once
            proc.outputs[out_r] = stdio
            if err_r is not None:
                proc.outputs[err_r] = stderr
        for fd in proc.outputs:
            os.set_blocking(fd, False)
            if not terminal:
                try:
                    fcntl.fcntl(fd, F_SETPIPE_SZ, PIPE_SIZE)
                except OSError:
                    pass
            self.agent.add_reader(fd, _bind(self._on_output, proc, fd), throttled=True)
        if stdio:
            self.processes_by_seq[stdio] = proc
            self.agent.add_stream_sink(stdio, _bind(self._on_stdin, proc))
        if stderr:
            self.processes_by_seq[stderr] = proc
        self.agent.watch_child(pid, _bind(self._on_exit, proc))
        return proc

    # ---- stdio ----

    def _on_output(self, proc: Process, fd: int) -> None:
        try:
            data = os.read(fd, PIPE_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            if e.errno != errno.EIO:  # EIO: the pty's last slave closed
                log("read output of %s/%s: %s" % (proc.container, proc.id, e))
            data = b""
        seq = proc.outputs.get(fd, 0)
        if data:
            if seq:
                self.agent.send_stream(seq, data)
            return
        self.agent.remove_reader(fd)
        proc.outputs.pop(fd, None)
        _close(fd)
        if proc.tty_fd == fd:
            proc.tty_fd = -1
        if DEBUG:
            log("%s/%s: output fd %d closed at %.3f s" % (proc.container, proc.id, fd, uptime()))
        if not proc.outputs:
            # All output is in: the one EOF, on the stdio seq (hyperstart never sends one on stderr).
            if proc.stdio:
                self.agent.send_stream(proc.stdio, b"")
            self._maybe_finish(proc)

    def _on_stdin(self, proc: Process, data: bytes) -> None:
        if proc.terminal:
            if data and proc.tty_fd >= 0:
                proc.stdin_buffer += data
                self._flush_stdin(proc, proc.tty_fd)
            return  # an empty frame means nothing for a tty
        if proc.stdin_fd < 0:
            return
        if data:
            proc.stdin_buffer += data
        else:
            proc.stdin_eof = True
        self._flush_stdin(proc, proc.stdin_fd)

    def _flush_stdin(self, proc: Process, fd: int) -> None:
        while proc.stdin_buffer:
            try:
                n = os.write(fd, proc.stdin_buffer)
            except (BlockingIOError, InterruptedError):
                self.agent.add_writer(fd, _bind(self._flush_stdin, proc, fd))
                return
            except OSError:
                proc.stdin_buffer.clear()  # EPIPE: the reader is gone
                proc.stdin_eof = not proc.terminal
                break
            del proc.stdin_buffer[:n]
        self.agent.remove_writer(fd)
        if proc.stdin_eof and fd == proc.stdin_fd:
            _close(fd)
            proc.stdin_fd = -1

    # ---- exits ----

    def _on_exit(self, proc: Process, status: int) -> None:
        proc.status = exit_status(status)
        if DEBUG:
            log("%s/%s: exited %d, reaped at %.3f s" % (proc.container, proc.id, proc.status, uptime()))
        self.agent.send_event(codec.PROCESSASYNCEVENT, {
            "container": proc.container, "process": proc.id, "event": "finished", "status": proc.status})
        container = self.containers.get(proc.container)
        if container is not None and container.init is proc:
            container.exited = True
            # The container ends with its init: whatever else runs in its mount namespace goes too,
            # so that pipes close and every process's EOF arrives.
            self._kill_container_processes(container, 9)
        self._maybe_finish(proc)

    def _maybe_finish(self, proc: Process) -> None:
        if proc.finished or proc.status is None or proc.outputs:
            return
        proc.finished = True
        if proc.stdin_fd >= 0:
            self.agent.remove_writer(proc.stdin_fd)
            _close(proc.stdin_fd)
            proc.stdin_fd = -1
        for seq in (proc.stdio, proc.stderr):
            if seq and self.processes_by_seq.get(seq) is proc:
                del self.processes_by_seq[seq]
                self.agent.remove_stream_sink(seq)
        container = self.containers.get(proc.container)
        table = container.processes if container is not None else self.host_processes
        if proc.container == HYPERSTART or (container is not None and container.init is not proc):
            if table.get(proc.id) is proc:
                del table[proc.id]

    def _container_pids(self, container: Container) -> list:
        pids = []
        if container.mnt_ns is None:
            return [p.pid for p in container.processes.values() if p.status is None]
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                if os.stat("/proc/%s/ns/mnt" % entry).st_ino == container.mnt_ns:
                    pids.append(int(entry))
            except OSError:
                continue
        return pids

    def _kill_container_processes(self, container: Container, sig: int) -> None:
        for pid in self._container_pids(container):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    # ---- signals ----

    def cmd_killcontainer(self, payload: bytes) -> bytes:
        spec = decode_json(payload)
        container = self._container(spec)
        sig = _int(spec.get("signal"), "signal", 15)
        if container.init is not None and container.init.status is None:
            try:
                os.kill(container.init.pid, sig)
            except ProcessLookupError:
                pass
            except OSError as e:
                raise CommandError("kill %s: %s" % (container.id, e.strerror)) from None
        return b""

    def cmd_signalprocess(self, payload: bytes) -> bytes:
        spec = decode_json(payload)
        proc = self._process(spec)
        sig = _int(spec.get("signal"), "signal", 15)
        if proc.status is None:
            try:
                os.kill(proc.pid, sig)
            except ProcessLookupError:
                pass
            except OSError as e:
                raise CommandError("signal %s/%s: %s" % (proc.container, proc.id, e.strerror)) from None
        return b""

    def cmd_winsize(self, payload: bytes) -> bytes:
        spec = decode_json(payload)
        if "seq" in spec and "process" not in spec:  # API 4242's form
            proc = self.processes_by_seq.get(_int(spec.get("seq"), "seq"))
            if proc is None:
                raise CommandError("no process has stream seq %s" % spec.get("seq"))
        else:
            proc = self._process(spec)
        if proc.tty_fd < 0:
            raise CommandError("process %s/%s has no terminal" % (proc.container, proc.id))
        rows, cols = _int(spec.get("row"), "row"), _int(spec.get("column"), "column")
        fcntl.ioctl(proc.tty_fd, TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        return b""

    def _container(self, spec: dict) -> Container:
        cid = _str(spec.get("container"), "container")
        container = self.containers.get(cid)
        if container is None:
            raise CommandError("container %s not found" % cid)
        return container

    def _process(self, spec: dict) -> Process:
        cid = _str(spec.get("container"), "container")
        process_id = _str(spec.get("process"), "process") or "init"
        if cid == HYPERSTART:
            table = self.host_processes
        else:
            table = self._container(spec).processes
        proc = table.get(process_id)
        if proc is None:
            raise CommandError("process %s not found in %s" % (process_id, cid))
        return proc

    # ---- REMOVECONTAINER ----

    def cmd_removecontainer(self, payload: bytes) -> bytes:
        spec = decode_json(payload)
        self._remove_container(self._container(spec))
        return b""

    def _remove_container(self, container: Container) -> None:
        self._kill_container_processes(container, 9)
        for proc in container.processes.values():
            if proc.status is None:
                try:
                    os.kill(proc.pid, 9)
                except ProcessLookupError:
                    pass
        self.containers.pop(container.id, None)
        self._unmount_container(container)

    @staticmethod
    def _unmount_container(container: Container) -> None:
        _close(container.mnt_fd)
        container.mnt_fd = -1
        try:
            linux.umount(container.root, linux.MNT_DETACH)
        except OSError as e:
            if e.errno not in (errno.EINVAL, errno.ENOENT):
                log("umount %s: %s" % (container.root, e))
        try:
            _rmtree(container.dir)
        except OSError as e:
            log("remove %s: %s" % (container.dir, e))

    # ---- files ----

    def _file_root(self, cid: str) -> str:
        if cid == HYPERSTART:
            return "/"
        container = self.containers.get(cid)
        if container is None:
            raise CommandError("container %s not found" % cid)
        return container.root

    def cmd_writefile(self, payload: bytes) -> bytes:
        try:
            # The JSON object is followed by the raw bytes: find where it ends without decoding the bytes
            # (latin-1 maps bytes to characters one to one), then decode that part properly.
            _, end = jsonc.raw_decode(payload.decode("latin-1"))
            spec = jsonc.loads(payload[:end].decode("utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise CommandError("malformed WRITEFILE header: %s" % e) from None
        if not isinstance(spec, dict):
            raise CommandError("WRITEFILE header must be a JSON object")
        root = self._file_root(_str(spec.get("container"), "container"))
        self._write_file(root, _str(spec.get("file"), "file"), payload[end:])
        return b""

    def cmd_readfile(self, payload: bytes) -> bytes:
        spec = decode_json(payload)
        root = self._file_root(_str(spec.get("container"), "container"))
        path = _str(spec.get("file"), "file")
        target = resolve_in_root(root, path)
        try:
            fd = os.open(target, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise CommandError("read %s: %s" % (path, e.strerror)) from None
        try:
            size = os.fstat(fd).st_size
            if size > MAX_READFILE:
                raise CommandError("%s is too large (%d bytes)" % (path, size))
            chunks = []
            while True:
                chunk = os.read(fd, 1 << 20)
                if not chunk:
                    break
                chunks.append(chunk)
        except IsADirectoryError:
            raise CommandError("%s is a directory" % path) from None
        finally:
            os.close(fd)
        return b"".join(chunks)

    # ---- DESTROYPOD ----

    def destroy(self) -> None:
        """Kill every process, wait (briefly) for them so their exit events go out, unmount."""
        import time

        pids = []
        for container in self.containers.values():
            self._kill_container_processes(container, 9)
            pids += [p.pid for p in container.processes.values() if p.status is None]
        for proc in self.host_processes.values():
            if proc.status is None:
                try:
                    os.kill(proc.pid, 9)
                except ProcessLookupError:
                    pass
                pids.append(proc.pid)
        for pid in pids:
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 2.0
        while any(pid in self.agent.children for pid in pids) and time.monotonic() < deadline:
            self.agent.reap_children()
            time.sleep(0.005)
        if self.init_pid:
            try:
                os.kill(self.init_pid, 9)
            except ProcessLookupError:
                pass
        for container in list(self.containers.values()):
            self._unmount_container(container)
        self.containers = {}
        for path in (SHARED_DIR + "/" + IMAGES_TAG, SHARED_DIR):
            try:
                linux.umount(path, linux.MNT_DETACH)
            except OSError:
                pass


# ---------------------------------------------------------------------------------------------------------
# child side (after fork: never returns)


def _pod_init_main(hostname: str, ready_w: int) -> None:
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # orphans of the pod are reaped by the kernel
        linux.unshare(linux.CLONE_NEWIPC | linux.CLONE_NEWUTS)
        _socket.sethostname(hostname)
        os.closerange(3, ready_w)
        os.closerange(ready_w + 1, 65536)
        os.write(ready_w, b"1")
        os.close(ready_w)
        while True:
            signal.pause()
    except BaseException as e:
        log("pod init: %s" % describe_exception(e))
    finally:
        os._exit(1)


def _child_main(setup: dict, container, stdio_fds, status_w: int, mnt_fd: int, ns_fds) -> None:
    """Set up and exec one process; any failure is written to ``status_w`` (the agent's ERROR text)."""
    try:
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGPIPE, signal.SIGXFSZ):
            signal.signal(sig, signal.SIG_DFL)
        os.setsid()
        if container is not None:
            linux.setns(ns_fds["uts"], linux.CLONE_NEWUTS)
            linux.setns(ns_fds["ipc"], linux.CLONE_NEWIPC)
            if mnt_fd >= 0:
                linux.setns(mnt_fd, linux.CLONE_NEWNS)
            else:
                _setup_container_mounts(container.root)
            os.chroot(container.root)
        env = dict(setup["env"])
        uid, gid, home = _passwd_lookup(setup["user"] or "0")
        if setup["group"]:
            gid = _group_lookup(setup["group"])
        groups = [_group_lookup(g) for g in setup["groups"]]
        env.setdefault("PATH", DEFAULT_PATH)
        env.setdefault("HOME", home or "/")
        env.setdefault("HOSTNAME", setup["hostname"])
        if setup["terminal"]:
            env.setdefault("TERM", "xterm")
        workdir = setup["workdir"]
        try:
            os.chdir(workdir)
        except FileNotFoundError:
            os.makedirs(workdir, 0o755, exist_ok=True)
            os.chdir(workdir)
        os.setgroups(groups)
        os.setgid(gid)
        os.setuid(uid)
        stdin, stdout, stderr = stdio_fds
        if setup["terminal"]:
            fcntl.ioctl(stdin, TIOCSCTTY, 0)
        os.dup2(stdin, 0)
        os.dup2(stdout, 1)
        os.dup2(stderr, 2)
        _exec(setup["args"], env)
    except BaseException as e:
        message = str(e) if isinstance(e, CommandError) else "%s: %s" % (type(e).__name__, e)
        try:
            os.write(status_w, message.encode("utf-8", "replace") or b"failed")
        except OSError:
            pass
    finally:
        os._exit(127)


def _exec(args: list, env: dict) -> None:
    """execvpe without os.execvpe: that imports warnings lazily, which fails once chrooted away from the zip."""
    name = args[0]
    if "/" in name:
        candidates = [name]
    else:
        candidates = [(d or ".") + "/" + name for d in env.get("PATH", DEFAULT_PATH).split(":")]
    denied = None
    for candidate in candidates:
        try:
            os.execve(candidate, args, env)
        except (FileNotFoundError, NotADirectoryError):
            continue
        except PermissionError as e:
            denied = e
        except OSError as e:
            raise CommandError('exec: "%s": %s' % (name, e.strerror)) from None
    if denied is not None:
        raise CommandError('exec: "%s": permission denied' % name)
    if "/" in name:
        raise CommandError('exec: "%s": no such file or directory' % name)
    raise CommandError('exec: "%s": executable file not found in $PATH' % name)


def _setup_container_mounts(root: str) -> None:
    """In the container's new mount namespace (already in the pod's pid namespace): /proc, /dev, /sys."""
    linux.unshare(linux.CLONE_NEWNS)
    linux.mount(None, "/", None, linux.MS_REC | linux.MS_PRIVATE)
    nosuid = linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC
    linux.mount("proc", root + "/proc", "proc", nosuid)
    try:
        linux.mount("sysfs", root + "/sys", "sysfs", nosuid | linux.MS_RDONLY)
    except OSError:
        pass
    dev = root + "/dev"
    linux.mount("tmpfs", dev, "tmpfs", linux.MS_NOSUID, "mode=0755,size=65536k")
    for name, major, minor in DEVICES:
        os.mknod(dev + "/" + name, 0o666 | 0o020000, os.makedev(major, minor))
        os.chmod(dev + "/" + name, 0o666)
    for name, target in DEV_LINKS:
        os.symlink(target, dev + "/" + name)
    for name in ("pts", "shm", "mqueue"):
        os.mkdir(dev + "/" + name, 0o755)
    linux.mount("devpts", dev + "/pts", "devpts", linux.MS_NOSUID | linux.MS_NOEXEC,
                "newinstance,ptmxmode=0666,mode=0620,gid=5")
    linux.mount(SHM_DIR, dev + "/shm", None, linux.MS_BIND)


def _read_all(fd: int) -> bytes:
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 4096)
        except InterruptedError:
            continue
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def _close(fd) -> None:
    if fd is None or fd < 0:
        return
    try:
        os.close(fd)
    except OSError:
        pass


def _bind(function, *args):
    return lambda *more: function(*args, *more)
