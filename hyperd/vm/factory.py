"""``VmFactoryPolicy``: idle VMs booted ahead, so that a pod starts in one instead of waiting for a boot.

hyperd's policy is a comma list of JSON objects, ``{"cache": N, "cpu": C, "memory": M}``: keep N idle VMs
of C vCPUs and M MB booted. A pod started without a ``vmId`` whose resources are exactly C and M starts in
one of them, as a warm start (about 0.25 s under TCG instead of 2.6 s), and the factory boots a replacement
behind it. VMs are booted one at a time, so that refilling the cache never takes more than one core from
the pods that are running.

The daemon owns the VMs (they are listed, and can be killed, like any idle VM); the factory only knows which
of them are its own. Its VMs are marked in their state record, so a restarted daemon takes them back.

hyperd's ``"template": true`` (VMs cloned from a memory snapshot of a booted one) is not supported: such an
entry is a plain cache, with a warning. Templates share guest memory between pods, the side channel that
Kata's documentation warns about.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable

from twisted.internet import defer
from twisted.logger import Logger

from hyperd.config import CacheSpec

log = Logger()

#: After a failed boot, the factory waits this long before it tries again.
RETRY_DELAY = 10.0


class VMFactory:
    """Keeps the policy's idle VMs booted.

    ``boot(cpu, memory)`` boots one idle VM for the factory and returns its id; ``usable(vm_id)`` says whether
    that VM is still idle and alive. The daemon calls ``take`` when a pod needs a VM, ``forget`` when one of
    the factory's VMs ends or is used some other way, and ``adopt`` for those a previous daemon left.
    """

    def __init__(self, reactor: Any, specs: tuple[CacheSpec, ...],
                 boot: Callable[[int, int], Awaitable[str]], usable: Callable[[str], bool]) -> None:
        self._reactor = reactor
        self._targets = {spec.shape: spec.cache for spec in specs}
        self._boot = boot
        self._usable = usable
        self._ready: dict[tuple[int, int], list[str]] = {shape: [] for shape in self._targets}
        self._booting: tuple[tuple[int, int], defer.Deferred] | None = None
        self._retry: Any = None
        self._running = False

    @property
    def enabled(self) -> bool:
        return bool(self._targets)

    def members(self) -> set[str]:
        """The ids of the factory's booted, idle VMs."""
        return {vm_id for ids in self._ready.values() for vm_id in ids}

    def adopt(self, vm_id: str, cpu: int, memory: int) -> bool:
        """A VM of the factory's that outlived the previous daemon; False if the policy no longer wants it."""
        ready = self._ready.get((cpu, memory))
        if ready is None or len(ready) >= self._targets[(cpu, memory)]:
            return False
        ready.append(vm_id)
        return True

    def start(self) -> None:
        self._running = True
        self.fill()

    def stop(self) -> None:
        """No more boots; a boot in progress is cancelled (its VM is killed)."""
        self._running = False
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        if self._booting is not None:
            self._booting[1].cancel()

    def take(self, cpu: int, memory: int) -> str | None:
        """An idle VM of exactly this shape, now no longer the factory's; None if there is none ready.

        The replacement is not booted yet: the caller calls ``fill`` once the pod it took the VM for has
        started, so that the boot does not take a core from that start (0.30 → 0.25 s on two cores).
        """
        ready = self._ready.get((cpu, memory), [])
        while ready:
            vm_id = ready.pop(0)
            if self._usable(vm_id):
                return vm_id
        return None

    def forget(self, vm_id: str, refill: bool = True) -> None:
        """``vm_id`` is gone, or taken by other means (an explicit ``vmId``): boot its replacement (now, or
        with ``refill`` False at the caller's ``fill``)."""
        for ready in self._ready.values():
            if vm_id in ready:
                ready.remove(vm_id)
                if refill:
                    self.fill()
                return

    def fill(self) -> None:
        """Boot the next missing VM, if any (one boot at a time)."""
        if not self._running or self._booting is not None or (self._retry is not None and self._retry.active()):
            return
        for shape, target in self._targets.items():
            if len(self._ready[shape]) < target:
                d = defer.ensureDeferred(self._boot(*shape))
                self._booting = (shape, d)
                d.addCallbacks(self._booted, self._boot_failed, callbackArgs=(shape,), errbackArgs=(shape,))
                return

    def _booted(self, vm_id: str, shape: tuple[int, int]) -> None:
        self._booting = None
        if self._running:
            self._ready[shape].append(vm_id)
            log.info("VM factory: {vm} ({cpu} cpu, {mem} MB) is ready", vm=vm_id, cpu=shape[0], mem=shape[1])
            self.fill()

    def _boot_failed(self, failure, shape: tuple[int, int]) -> None:
        self._booting = None
        if failure.check(defer.CancelledError) or not self._running:
            return
        log.warn("VM factory: booting a {cpu} cpu, {mem} MB VM failed: {e}; trying again in {delay:.0f} s",
                 cpu=shape[0], mem=shape[1], e=failure.getErrorMessage(), delay=RETRY_DELAY)
        self._retry = self._reactor.callLater(RETRY_DELAY, self.fill)
