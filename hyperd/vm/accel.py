"""Choosing the accelerator: KVM when it really runs a guest here, TCG otherwise.

/dev/kvm existing is not enough: under nested virtualization (as on our CI machines) ``-accel kvm`` starts,
runs a trivial real-mode payload, and then hangs forever in the guest kernel's early boot. So the probe boots
the real guest kernel under KVM and waits for its first console line ("Linux version"), which a working KVM
prints within a few tens of milliseconds; if that does not happen within ``timeout`` seconds the answer is
TCG. The probe never blocks the reactor and always answers.
"""

from __future__ import annotations

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


class AccelProbe:
    """Answers "kvm" or "tcg"; with "auto" the probe runs once and its answer is kept."""

    def __init__(self, timeout: float = PROBE_TIMEOUT, kvm_device: str = "/dev/kvm", qemu: str = QEMU_BINARY):
        self.timeout = timeout
        self.kvm_device = kvm_device
        self.qemu = qemu
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

    async def _probe(self, reactor, kernel: str | None) -> str:
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
        return answer


_default_probe = AccelProbe()


def probe_accel(reactor, mode: str = "auto", kernel: str | None = None) -> defer.Deferred:
    """A Deferred firing with "kvm" or "tcg" (see the module docstring); "auto" probes once per process."""
    return _default_probe.probe(reactor, mode, kernel)
