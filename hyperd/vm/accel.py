"""Choosing the accelerator: KVM when it really runs a guest here, TCG otherwise.

/dev/kvm existing is not enough: under nested virtualization (as on our CI machines) ``-accel kvm`` starts,
runs a trivial real-mode payload, and then hangs forever in the guest kernel's early boot. So the probe boots
the real guest kernel under KVM and waits for its first console line ("Linux version"), which a working KVM
prints within a few tens of milliseconds; if that does not happen within ``timeout`` seconds the answer is
TCG. The probe never blocks the reactor and always answers.

The answer is kept in a small file (the daemon's run dir) for as long as the host has not rebooted and the
kernel and qemu are the same files, so that a daemon restart does not wait for the probe again (3 s where
KVM hangs).
"""

from __future__ import annotations

import json
import os

from twisted.internet import defer, error
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger

from hyperd.vm.qemu import QEMU_BINARY

log = Logger()

PROBE_TIMEOUT = 3.0
_MARKER = b"Linux version"


class _ProbeProtocol(ProcessProtocol):
    def __init__(self) -> None:
        self.seen: defer.Deferred = defer.Deferred()
        self.ended: defer.Deferred = defer.Deferred()
        self._buffer = b""

    def outReceived(self, data: bytes) -> None:
        self._buffer = (self._buffer + data)[-4096:]
        if _MARKER in self._buffer and not self.seen.called:
            self.seen.callback(True)

    def errReceived(self, data: bytes) -> None:
        log.debug("accel probe: {data!r}", data=data[:500])

    def processEnded(self, reason) -> None:
        if not self.seen.called:
            self.seen.callback(False)
        self.ended.callback(None)

    def kill(self) -> None:
        try:
            self.transport.signalProcess("KILL")
        except error.ProcessExitedAlready:
            pass


async def kernel_boots(reactor, accel: str, kernel: str, timeout: float = PROBE_TIMEOUT,
                       qemu: str = QEMU_BINARY) -> bool:
    """Whether ``kernel`` under ``-accel accel`` prints its first console line within ``timeout`` seconds."""
    proto = _ProbeProtocol()
    argv = [qemu, "-M", "q35", "-accel", accel, "-m", "128", "-smp", "1", "-display", "none",
            "-nodefaults", "-no-user-config", "-no-reboot", "-kernel", kernel,
            "-append", "console=ttyS0 earlyprintk=ttyS0 panic=-1", "-serial", "stdio"]
    null_fd = os.open(os.devnull, os.O_RDONLY)
    try:
        reactor.spawnProcess(proto, qemu, argv, env={"PATH": "/usr/bin:/bin"},
                             childFDs={0: null_fd, 1: "r", 2: "r"})
    finally:
        os.close(null_fd)
    timer = reactor.callLater(timeout, lambda: proto.seen.called or proto.seen.callback(False))
    try:
        return await proto.seen
    finally:
        if timer.active():
            timer.cancel()
        # We never wait for the probe's exit: a qemu stuck in KVM may take its time to die, the daemon won't.
        proto.kill()


BOOT_ID = "/proc/sys/kernel/random/boot_id"


def _fingerprint(kvm_device: str, kernel: str, qemu: str) -> dict:
    """What the probe's answer depends on: this boot of the host, the kernel and qemu files."""
    def stat(path: str):
        try:
            st = os.stat(path)
        except OSError:
            return None
        return [st.st_size, st.st_mtime_ns, st.st_ino]

    try:
        with open(BOOT_ID) as f:
            boot = f.read().strip()
    except OSError:
        boot = None
    qemu_path = qemu if os.path.isabs(qemu) else next(
        (os.path.join(d, qemu) for d in os.environ.get("PATH", "/usr/bin:/bin").split(":")
         if os.path.exists(os.path.join(d, qemu))), qemu)
    return {"boot_id": boot, "kvm": stat(kvm_device), "kernel": [kernel, stat(kernel)],
            "qemu": [qemu_path, stat(qemu_path)]}


class AccelProbe:
    """Answers "kvm" or "tcg"; with "auto" the probe runs once and its answer is kept (in ``cache`` too)."""

    def __init__(self, timeout: float = PROBE_TIMEOUT, kvm_device: str = "/dev/kvm", qemu: str = QEMU_BINARY,
                 cache: str | None = None):
        self.timeout = timeout
        self.kvm_device = kvm_device
        self.qemu = qemu
        self.cache = cache
        self._auto: defer.Deferred | None = None
        self._answer: str | None = None
        self.why: str = ""

    def probe(self, reactor, mode: str, kernel: str | None) -> defer.Deferred:
        if mode in ("kvm", "tcg"):
            self.why = "forced by configuration"
            return defer.succeed(mode)
        if mode != "auto":
            return defer.fail(ValueError("accel must be auto, kvm or tcg, not %r" % (mode,)))
        if self._answer is not None:
            return defer.succeed(self._answer)
        if self._auto is None:
            self._auto = defer.ensureDeferred(self._probe(reactor, kernel))
        # Every caller gets its own Deferred chained to the one probe.
        d: defer.Deferred = defer.Deferred()
        self._auto.addBoth(lambda r: (d.callback(r), r)[1])
        return d

    def _cached(self, fingerprint: dict) -> dict | None:
        if self.cache is None:
            return None
        try:
            with open(self.cache) as f:
                kept = json.load(f)
        except (OSError, ValueError):
            return None
        if not isinstance(kept, dict) or kept.get("for") != fingerprint or kept.get("answer") not in ("kvm", "tcg"):
            return None
        return kept

    def _keep(self, fingerprint: dict, answer: str) -> None:
        if self.cache is None or fingerprint["boot_id"] is None:
            return
        tmp = self.cache + ".tmp"
        try:
            with open(tmp, "w") as f:
                json.dump({"for": fingerprint, "answer": answer, "why": self.why}, f)
            os.replace(tmp, self.cache)
        except OSError as e:
            log.warn("accelerator: cannot keep the probe's answer in {path}: {e}", path=self.cache, e=e)

    async def _probe(self, reactor, kernel: str | None) -> str:
        fingerprint = _fingerprint(self.kvm_device, kernel or "", self.qemu)
        kept = self._cached(fingerprint)
        if kept is not None:
            self._answer, self.why = kept["answer"], "%s (probed earlier in this boot)" % kept.get("why", "")
            log.info("accelerator: {answer} ({why})", answer=self._answer, why=self.why)
            return self._answer
        answer = "tcg"
        if not os.access(self.kvm_device, os.R_OK | os.W_OK):
            self.why = "%s is missing or not accessible" % self.kvm_device
        elif kernel is None or not os.path.exists(kernel):
            self.why = "no guest kernel to probe KVM with"
        else:
            try:
                ok = await kernel_boots(reactor, "kvm", kernel, self.timeout, self.qemu)
            except Exception as e:
                ok = False
                self.why = "KVM probe failed: %s" % e
            else:
                self.why = ("a guest kernel booted under KVM" if ok else
                            "KVM did not boot a guest kernel within %.1f s" % self.timeout)
            if ok:
                answer = "kvm"
        self._answer = answer
        log.info("accelerator: {answer} ({why})", answer=answer, why=self.why)
        self._keep(fingerprint, answer)
        return answer


_default_probe = AccelProbe()


def probe_accel(reactor, mode: str = "auto", kernel: str | None = None, cache: str | None = None) -> defer.Deferred:
    """A Deferred firing with "kvm" or "tcg" (see the module docstring); "auto" probes once per process, and
    with ``cache`` (a file path) once per host boot."""
    if cache is not None:
        _default_probe.cache = cache
    return _default_probe.probe(reactor, mode, kernel)
