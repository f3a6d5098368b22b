"""A small blocking harness (stdlib sockets, no Twisted) that boots the real guest under qemu TCG.

``guest_files`` builds the kernel and initramfs once per session; ``boot_vm()`` starts qemu with the devices
the host passes (hyperd.md §4.1 / machine.md) and returns a ``GuestVM`` speaking the control and stream
channels directly. Every VM is killed and its directory removed in teardown, even when a test fails.
"""

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time

import pytest

from hyperd.agent import codec
from hyperd.guest import initrd

QEMU = "qemu-system-x86_64"


@pytest.fixture(scope="session")
def guest_files():
    root = tempfile.mkdtemp(prefix="hdguest", dir="/tmp")
    try:
        yield initrd.build_guest(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


class ChannelClosed(Exception):
    pass


class GuestVM:
    def __init__(self, files, images_dir=None, memory=128, nic=False):
        self.dir = tempfile.mkdtemp(prefix="hd", dir="/tmp")
        self.share = os.path.join(self.dir, "share_dir")
        os.mkdir(self.share)
        self.images = images_dir or os.path.join(self.dir, "images")
        os.makedirs(self.images, exist_ok=True)
        self.console = os.path.join(self.dir, "console.log")
        self.ctl = None
        self.tty = None
        self.ctl_decoder = codec.CtlDecoder()
        self.stream_decoder = codec.StreamDecoder()
        self.events = []  # PROCESSASYNCEVENT payloads (dicts), in arrival order
        self.streams = {}  # seq -> bytearray
        self.eof = set()  # seqs that got an empty frame
        self.nexts = []  # every NEXT value received
        self._pending_ctl = []  # decoded control frames not consumed yet
        d = self.dir
        self.argv = [
            QEMU, "-accel", "tcg", "-M", "q35", "-m", str(memory), "-smp", "1", "-nodefaults", "-no-reboot",
            "-display", "none", "-kernel", files.kernel, "-initrd", files.initrd,
            "-append", initrd.kernel_cmdline(),
            "-device", "virtio-serial-pci,id=vs0",
            "-chardev", "socket,id=ctl,path=%s/hyper.sock,server=on,wait=off" % d,
            "-device", "virtserialport,bus=vs0.0,chardev=ctl,name=sh.hyper.channel.0",
            "-chardev", "socket,id=tty,path=%s/tty.sock,server=on,wait=off" % d,
            "-device", "virtserialport,bus=vs0.0,chardev=tty,name=sh.hyper.channel.1",
            "-device", "virtio-rng-pci",
            "-fsdev", "local,id=share,path=%s,security_model=none" % self.share,
            "-device", "virtio-9p-pci,fsdev=share,mount_tag=share_dir",
            "-fsdev", "local,id=images,path=%s,security_model=none,readonly=on" % self.images,
            "-device", "virtio-9p-pci,fsdev=images,mount_tag=images",
            "-serial", "file:%s" % self.console,
        ]
        if nic:  # user-mode networking: the guest is 10.0.2.15, the host's loopback is 10.0.2.2
            self.argv += ["-netdev", "user,id=n0", "-device", "virtio-net-pci,netdev=n0"]
        self.proc = None
        self.started_at = None

    # ---- lifecycle ----

    def start(self, connect_tty=True):
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=open(os.path.join(self.dir, "qemu.err"), "wb"))
        self.ctl = self._connect("hyper.sock")
        if connect_tty:
            self.tty = self._connect("tty.sock")
        return self

    def _connect(self, name, timeout=10.0):
        path = os.path.join(self.dir, name)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError("qemu exited %s: %s" % (self.proc.returncode, self.qemu_errors()))
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(path)
                return s
            except OSError:
                s.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.005)

    def wait_ready(self, timeout=30.0):
        code, payload = self.recv_ctl(timeout)
        assert code == codec.READY, (code, payload)
        assert payload == b""
        return time.monotonic() - self.started_at

    def kill(self):
        for s in (self.ctl, self.tty):
            if s is not None:
                s.close()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)

    def qemu_errors(self):
        try:
            with open(os.path.join(self.dir, "qemu.err"), "rb") as f:
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def console_text(self):
        try:
            with open(self.console, "rb") as f:
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    # ---- control channel ----

    def send_raw(self, data):
        self.ctl.sendall(data)

    def _read_ctl(self, timeout):
        """One read of the control channel: NEXT values and PROCESSASYNCEVENTs are recorded, other frames
        queued for ``recv_ctl``. Returns quietly when nothing came within ``timeout``."""
        self.ctl.settimeout(timeout)
        try:
            data = self.ctl.recv(65536)
        except socket.timeout:
            return
        if not data:
            raise ChannelClosed("control channel closed")
        for code, payload in self.ctl_decoder.feed(data):
            if code == codec.NEXT:
                self.nexts.append(codec.decode_u32(payload))
            elif code == codec.PROCESSASYNCEVENT:
                self.events.append(json.loads(payload))
            else:
                self._pending_ctl.append((code, payload))

    def _remaining(self, deadline, what):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("%s; console:\n%s" % (what, self.console_text()[-3000:]))
        return remaining

    def recv_ctl(self, timeout=30.0):
        """The next control frame other than NEXT and PROCESSASYNCEVENT (those are recorded)."""
        deadline = time.monotonic() + timeout
        while not self._pending_ctl:
            self._read_ctl(self._remaining(deadline, "no control frame"))
        return self._pending_ctl.pop(0)

    def command(self, code, payload=b"", timeout=30.0):
        """Send one command the way the host does (≤512-byte chunks, each waiting for NEXT) → (code, payload)."""
        if isinstance(payload, (dict, list)):
            payload = json.dumps(payload).encode()
        frame = codec.encode_ctl(code, payload)
        before = sum(self.nexts)
        for offset in range(0, len(frame), codec.CTL_CHUNK):
            chunk = frame[offset:offset + codec.CTL_CHUNK]
            self.ctl.sendall(chunk)
            self._wait_next(before + offset + len(chunk), timeout)
        return self.recv_ctl(timeout)

    def _wait_next(self, total, timeout):
        deadline = time.monotonic() + timeout
        while sum(self.nexts) < total:
            self._read_ctl(self._remaining(deadline, "NEXT did not reach %d (got %r)" % (total, self.nexts)))

    def ok(self, code, payload=b"", timeout=30.0):
        reply, body = self.command(code, payload, timeout)
        assert reply == codec.ACK, "expected ACK, got %s %r" % (codec.CODE_NAMES.get(reply), body)
        return body

    def wait_event(self, container, process, timeout=30.0):
        deadline = time.monotonic() + timeout
        while True:
            for event in self.events:
                if event.get("container") == container and event.get("process") == process:
                    self.events.remove(event)
                    return event
            if self._pending_ctl:
                raise AssertionError("unexpected control frame %r" % (self._pending_ctl[0],))
            self._read_ctl(min(self._remaining(deadline, "no event for %s/%s" % (container, process)), 0.5))

    # ---- stream channel ----

    def send_stream(self, seq, data=b""):
        self.tty.sendall(codec.encode_stream(seq, data))

    def pump_stream(self, timeout):
        self.tty.settimeout(timeout)
        try:
            data = self.tty.recv(65536)
        except socket.timeout:
            return
        if not data:
            raise ChannelClosed("stream channel closed")
        for seq, chunk in self.stream_decoder.feed(data):
            if chunk:
                self.streams.setdefault(seq, bytearray()).extend(chunk)
            else:
                self.eof.add(seq)

    def wait_eof(self, seq, timeout=30.0):
        deadline = time.monotonic() + timeout
        while seq not in self.eof:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no EOF on seq %d; got %r; console:\n%s"
                                   % (seq, dict(self.streams), self.console_text()[-3000:]))
            self.pump_stream(min(remaining, 0.5))
        return bytes(self.streams.get(seq, b""))

    def wait_output(self, seq, expected, timeout=30.0):
        deadline = time.monotonic() + timeout
        while expected not in bytes(self.streams.get(seq, b"")):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no %r on seq %d; got %r" % (expected, seq, dict(self.streams)))
            self.pump_stream(min(remaining, 0.5))
        return bytes(self.streams[seq])

    def wait_exit(self, timeout=15.0):
        return self.proc.wait(timeout)


@pytest.fixture
def boot_vm(guest_files):
    """``boot_vm(**kw)`` → a started GuestVM; all of them are killed in teardown."""
    vms = []

    def boot(**kwargs):
        connect_tty = kwargs.pop("connect_tty", True)
        vm = GuestVM(guest_files, **kwargs)
        vms.append(vm)
        return vm.start(connect_tty=connect_tty)

    try:
        yield boot
    finally:
        for vm in vms:
            vm.kill()


@pytest.fixture(scope="session")
def guest_vm_class():
    """The harness class, for fixtures of a wider scope than ``boot_vm`` (which must kill what they boot)."""
    return GuestVM
