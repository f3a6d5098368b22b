"""One VM: a qemu process with our agent inside, supervised from boot (or reattach) to its end.

``await VM.boot(reactor, config)`` returns a VM whose agent said READY and answered GETVERSION, or raises
VMError (carrying the tail of the console) and leaves nothing running or on disk. ``await VM.reattach(reactor,
vm.record())`` picks up a VM that a previous daemon started. ``when_dead()`` fires once qemu is gone, whoever
ended it; the VM's directory is then removed.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from typing import Any, Callable

import attrs
from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from hyperd.agent import codec
from hyperd.agent.client import AgentClient, AgentProtocol
from hyperd.agent.streams import ExitTracker, StreamMux, StreamProtocol
from hyperd.errors import VMError
from hyperd.interfaces import IVM
from hyperd.mounts import remove_tree
from hyperd.vm import qemu
from hyperd.vm.connect import connect_unix
from hyperd.vm.process import PidWatcher, QemuProcessProtocol, pid_alive, pid_is_vm, spawn_qemu
from hyperd.vm.qmp import QMPProtocol, connect_qmp

log = Logger()

DEFAULT_READY_TIMEOUT = 30.0
TAIL_BYTES = 2000


class VMGone(VMError):
    """A recorded VM whose qemu is no longer running (found on reattach)."""


def default_append() -> str:
    """The guest's kernel command line, from the guest builder."""
    from hyperd.guest.initrd import kernel_cmdline

    return kernel_cmdline()


def _tail(path: str, size: int = TAIL_BYTES) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - size))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def first_of(*ds: defer.Deferred) -> defer.Deferred:
    """Fires like the first of ``ds`` to fire (result or failure), then cancels the others."""
    def cancel_all(_):
        for d in ds:
            if not d.called:
                d.cancel()

    out: defer.Deferred = defer.Deferred(cancel_all)

    def settle(result, index):
        if not out.called:
            # Settle first: the losers' CancelledErrors come back through here and must find it settled.
            if isinstance(result, defer.Failure):
                out.errback(result)
            else:
                out.callback(result)
            for j, other in enumerate(ds):
                if j != index and not other.called:
                    other.cancel()
        # Late results (and the CancelledErrors of the losers) are dropped here.
        return None

    for i, d in enumerate(ds):
        d.addBoth(settle, i)
    return out


def _sleep(reactor, seconds: float) -> defer.Deferred:
    d: defer.Deferred = defer.Deferred(lambda d: timer.cancel() if timer.active() else None)
    timer = reactor.callLater(seconds, lambda: d.called or d.callback("timeout"))
    return d


@implementer(IVM)
class VM:
    """A running qemu with our agent. Use ``VM.boot`` or ``VM.reattach``, not the constructor."""

    def __init__(self, reactor, config: qemu.VMConfig, pid: int, process: QemuProcessProtocol | None = None,
                 started_at: float | None = None) -> None:
        self._reactor = reactor
        self.config = config
        self.vm_id = config.vm_id
        self.vm_dir = config.vm_dir
        self.pid = pid
        self.started_at = started_at if started_at is not None else time.time()
        #: "booting", "running", "paused", "stopping" or "dead".
        self.status = "booting"
        self.qmp: QMPProtocol | None = None
        #: The IAgent: ``vm.agent.request(code, payload)``.
        self.agent: AgentClient | None = None
        self.streams: StreamMux | None = None
        #: PROCESSASYNCEVENTs land here unless the agent's handler is replaced.
        self.exits = ExitTracker()
        self._agent_proto: AgentProtocol | None = None
        self._stream_proto: StreamProtocol | None = None
        self._process = process
        self._watcher: PidWatcher | None = None
        self._dead_reason: str | None = None
        self._dead_waiters: list[defer.Deferred] = []
        self._detached = False
        self._guest_shutdown: str | None = None
        #: Seconds from spawn to each boot step ("qmp", "connected", "ready", "version"), for logs and benchmarks.
        self.boot_timings: dict[str, float] = {}
        self._spawned_at = time.monotonic()
        self._last_console: str | None = None
        self._last_tails: str | None = None
        if process is not None:
            process.ended.addCallback(self._process_ended)

    # -- creation ------------------------------------------------------------------------------------------

    @classmethod
    async def boot(cls, reactor, config: qemu.VMConfig, ready_timeout: float = DEFAULT_READY_TIMEOUT) -> "VM":
        """Start ``config``'s VM and wait until its agent is READY and speaks our API version."""
        if not config.append:
            config = attrs.evolve(config, append=default_append())
        for path in (config.kernel, config.initrd):
            if not os.path.isfile(path):
                raise VMError("cannot boot %s: %s does not exist" % (config.vm_id, path))
        os.makedirs(os.path.dirname(config.vm_dir) or ".", exist_ok=True)
        try:
            os.mkdir(config.vm_dir, 0o700)
        except FileExistsError:
            raise VMError("%s: directory %s already exists" % (config.vm_id, config.vm_dir)) from None
        try:
            os.mkdir(config.path(qemu.SHARE_DIR), 0o755)
            spawned_at = time.monotonic()
            process = spawn_qemu(reactor, qemu.build_command(config), config.path(qemu.QEMU_LOG))
        except Exception as e:
            shutil.rmtree(config.vm_dir, ignore_errors=True)
            raise VMError("%s: cannot start qemu: %s" % (config.vm_id, e)) from e
        vm = cls(reactor, config, process.pid, process)
        vm._spawned_at = spawned_at
        log.info("{vm}: qemu pid {pid} started ({accel}, {cpu} cpu, {mem} MB)", vm=vm.vm_id, pid=vm.pid,
                 accel=config.accel, cpu=config.cpu, mem=config.mem)
        steps = defer.ensureDeferred(vm._connect(ready_timeout, wait_ready=True))
        timeout = _sleep(reactor, ready_timeout)
        dead = vm.when_dead()
        try:
            outcome = await first_of(steps, timeout, dead)
        except Exception as e:
            outcome = e
        if outcome is None:
            vm.status = "running"
            log.info("{vm}: ready {timings}", vm=vm.vm_id, timings=vm.boot_timings)
            return vm
        if isinstance(outcome, defer.CancelledError):
            # The caller gave up on the boot (e.g. the VM was killed while booting): clean up, then say so.
            await vm._abort()
            raise outcome
        if isinstance(outcome, Exception):
            why = "the agent failed: %s" % outcome
        elif outcome == "timeout":
            why = "the agent was not READY within %.0f s" % ready_timeout
        else:
            why = "qemu %s" % outcome
        await vm._abort()
        raise VMError("%s did not boot: %s\n%s" % (vm.vm_id, why, vm._tails()))

    @classmethod
    async def reattach(cls, reactor, record: dict, timeout: float = 5.0) -> "VM":
        """Supervise a VM a previous daemon started, from its ``record()``; PING checks the agent is there.

        Raises VMGone (and removes its directory) when its qemu is no longer running, and VMError (after
        killing it) when it runs but cannot be reached.
        """
        config = qemu.VMConfig.from_dict(record["config"])
        pid = int(record["pid"])
        vm = cls(reactor, config, pid, None, started_at=record.get("started_at"))
        try:
            # The pidfd first, then the check: a pid recycled in between would fail the cmdline check.
            vm._watcher = PidWatcher(reactor, pid, vm._pid_exited)
        except OSError as e:
            log.warn("{vm}: cannot watch pid {pid}: {e}", vm=vm.vm_id, pid=pid, e=e)
        if not pid_is_vm(pid, config.vm_dir):
            vm._mark_dead("qemu (pid %d) was gone when the daemon came back" % pid)
            raise VMGone("%s is gone: its qemu (pid %d) is not running" % (vm.vm_id, pid))
        steps = defer.ensureDeferred(vm._connect(timeout, wait_ready=False))
        try:
            outcome = await first_of(steps, _sleep(reactor, timeout), vm.when_dead())
        except Exception as e:
            outcome = e
        if outcome is None:
            log.info("{vm}: reattached to qemu pid {pid}", vm=vm.vm_id, pid=pid)
            return vm
        if isinstance(outcome, str) and outcome != "timeout":
            raise VMGone("%s died while reattaching: qemu %s" % (vm.vm_id, outcome))
        why = "timed out" if outcome == "timeout" else str(outcome)
        await vm._abort()
        raise VMError("%s could not be reattached (%s); it was killed\n%s" % (vm.vm_id, why, vm._tails()))

    async def _connect(self, timeout: float, wait_ready: bool) -> None:
        give_up = lambda: self.dead  # noqa: E731
        c = self.config
        self.qmp = await connect_qmp(self._reactor, c.path(qemu.QMP_SOCKET), timeout)
        self.boot_timings["qmp"] = self._since_spawn()
        self.qmp.add_event_observer(self._qmp_event)
        self.qmp.closed.addCallback(self._qmp_closed)
        self._agent_proto = await connect_unix(
            self._reactor, c.path(qemu.CTL_SOCKET),
            lambda: AgentProtocol(wait_ready=wait_ready, on_event=self.exits.process_event),
            timeout=timeout, give_up=give_up)
        self.agent = self._agent_proto.client
        self._stream_proto = await connect_unix(self._reactor, c.path(qemu.STREAM_SOCKET), StreamProtocol,
                                                timeout=timeout, give_up=give_up)
        self.streams = self._stream_proto.mux
        self.boot_timings["connected"] = self._since_spawn()
        if wait_ready:
            await self.agent.when_ready()
            self.boot_timings["ready"] = self._since_spawn()
            await self.agent.handshake()
            self.boot_timings["version"] = self._since_spawn()
            return
        # Reattaching: a paused guest cannot answer PING; it is checked when it is resumed.
        state = await self.qmp.execute("query-status")
        if state.get("status") == "paused" or state.get("running") is False:
            self.status = "paused"
        else:
            await self.agent.ping()
            self.status = "running"

    def _since_spawn(self) -> float:
        return round(time.monotonic() - self._spawned_at, 4)

    # -- state ---------------------------------------------------------------------------------------------

    @property
    def dead(self) -> bool:
        return self._dead_reason is not None

    @property
    def accel(self) -> str:
        return self.config.accel

    def when_dead(self) -> defer.Deferred:
        """Fires with the reason (a str) once qemu is gone, whoever ended it."""
        if self._dead_reason is not None:
            return defer.succeed(self._dead_reason)
        d: defer.Deferred = defer.Deferred()
        self._dead_waiters.append(d)
        return d

    def record(self) -> dict[str, Any]:
        """What a restarted daemon needs to ``reattach`` (JSON-able)."""
        c = self.config
        return {
            "vm_id": self.vm_id,
            "pid": self.pid,
            "dir": self.vm_dir,
            "cpu": c.cpu,
            "mem": c.mem,
            "accel": c.accel,
            "status": self.status,
            "started_at": self.started_at,
            "config": c.to_dict(),
        }

    def console_tail(self, size: int = TAIL_BYTES) -> str:
        """The end of the guest's console; kept in memory once the VM is dead and its directory gone."""
        if not os.path.isdir(self.vm_dir) and self._last_console is not None:
            return self._last_console[-size:]
        return _tail(self.config.path(qemu.CONSOLE_LOG), size)

    # -- control -------------------------------------------------------------------------------------------

    async def pause(self) -> None:
        await self._qmp_execute("stop")
        self.status = "paused"

    async def resume(self) -> None:
        await self._qmp_execute("cont")
        self.status = "running"

    async def stop(self, grace: float = 5.0, quit_timeout: float = 2.0, term_timeout: float = 2.0,
                   kill_timeout: float = 5.0) -> str:
        """Stop the VM: DESTROYPOD, then QMP quit, then SIGTERM, then SIGKILL, each given its time.

        Returns the reason qemu ended; its directory is gone afterwards.
        """
        if not self.dead:
            # A paused guest cannot answer DESTROYPOD: go straight to QMP quit.
            skip_destroy = self.status == "paused"
            self.status = "stopping"
            steps: list[tuple[str, Callable[[], defer.Deferred], float]] = [
                ("DESTROYPOD", lambda: self.agent.request(codec.DESTROYPOD), grace),
                ("quit", lambda: self._qmp_execute("quit"), quit_timeout),
                ("SIGTERM", lambda: self._signal(signal.SIGTERM), term_timeout),
                ("SIGKILL", lambda: self._signal(signal.SIGKILL), kill_timeout),
            ]
            for name, action, wait in steps:
                if self.dead:
                    break
                if name == "DESTROYPOD" and (skip_destroy or self.agent is None or self.agent.closed):
                    continue
                log.info("{vm}: stop: {step}", vm=self.vm_id, step=name)
                if await self._try_step(action, wait):
                    break
            if not self.dead:
                raise VMError("%s: qemu pid %d did not die, even after SIGKILL" % (self.vm_id, self.pid))
        self._cleanup()
        return self._dead_reason

    async def _try_step(self, action: Callable[[], defer.Deferred], wait: float) -> bool:
        """Run one stop step; True once qemu is dead, False when the step failed or ``wait`` passed."""
        try:
            acted = defer.maybeDeferred(action)
        except Exception:
            return self.dead
        failed: defer.Deferred = defer.Deferred()

        def on_result(result):
            if isinstance(result, defer.Failure) and not failed.called:
                failed.callback("failed")
            return None

        acted.addBoth(on_result)
        outcome = await first_of(self.when_dead(), _sleep(self._reactor, wait), failed)
        if outcome == "failed":
            # The step could not even be tried (agent or QMP already closed): next step, no waiting, but
            # give a dying qemu a moment to be reaped so its exit is not mistaken for a refusal.
            outcome = await first_of(self.when_dead(), _sleep(self._reactor, 0.05))
        return self.dead

    def _qmp_execute(self, name: str, args: dict | None = None) -> defer.Deferred:
        if self.qmp is None:
            return defer.fail(VMError("%s: no QMP connection" % self.vm_id))
        return self.qmp.execute(name, args)

    def _signal(self, sig: int) -> defer.Deferred:
        if self._process is not None:
            if not self._process.signal({signal.SIGTERM: "TERM", signal.SIGKILL: "KILL"}[sig]):
                return defer.fail(ProcessLookupError(self.pid))
        else:
            # Not our child: make sure the pid is still that qemu before signalling it.
            if not pid_is_vm(self.pid, self.vm_dir):
                return defer.fail(ProcessLookupError(self.pid))
            os.kill(self.pid, sig)
        return defer.succeed(None)

    def detach(self) -> None:
        """Let go of the VM without stopping it (the daemon exits and leaves VMs running)."""
        self._detached = True
        self._close_connections()
        if self._watcher is not None:
            self._watcher.stop()
            self._watcher = None

    # -- internals -----------------------------------------------------------------------------------------

    def _qmp_event(self, name: str, event: dict) -> None:
        if name == "SHUTDOWN":
            data = event.get("data") or {}
            self._guest_shutdown = "guest shutdown (%s)" % data.get("reason", "unknown")
        elif name == "STOP":
            if self.status == "running":
                self.status = "paused"
        elif name == "RESUME":
            if self.status == "paused":
                self.status = "running"

    def _qmp_closed(self, _) -> None:
        # For a VM that is not our child, a closed QMP socket is the first sign qemu died: check now.
        if self._process is None and not self.dead and not self._detached and not pid_alive(self.pid):
            self._pid_exited()

    def _process_ended(self, reason: str) -> None:
        if self._detached:
            log.info("{vm}: detached qemu {reason}", vm=self.vm_id, reason=reason)
            return
        self._mark_dead(reason)

    def _pid_exited(self) -> None:
        if self._detached:
            return
        self._mark_dead("exited (pid %d, not our child: status unknown)" % self.pid)

    def _mark_dead(self, reason: str) -> None:
        if self._dead_reason is not None:
            return
        if self._guest_shutdown:
            reason = "%s after %s" % (reason, self._guest_shutdown)
        self._dead_reason = reason
        self.status = "dead"
        log.info("{vm}: qemu {reason}", vm=self.vm_id, reason=reason)
        if self._watcher is not None:
            self._watcher.stop()
            self._watcher = None
        self._close_connections()
        # The tails are kept in memory before the directory goes, for errors that quote them.
        self._last_console = self.console_tail()
        self._last_tails = self._tails()
        self._cleanup()
        waiters, self._dead_waiters = self._dead_waiters, []
        for d in waiters:
            if not d.called:
                d.callback(reason)

    def _close_connections(self) -> None:
        for proto in (self.qmp, self._agent_proto, self._stream_proto):
            if proto is not None and proto.transport is not None:
                proto.transport.loseConnection()

    def _cleanup(self) -> None:
        # A pod's host volumes may still be bind-mounted in the share: never delete through them.
        try:
            remove_tree(self.vm_dir)
        except OSError as e:
            log.error("{vm}: {e}", vm=self.vm_id, e=e)

    def _tails(self) -> str:
        if not os.path.isdir(self.vm_dir) and self._last_tails is not None:
            return self._last_tails
        parts = []
        console = self.console_tail()
        if console.strip():
            parts.append("--- console (tail) ---\n" + console)
        qemu_log = _tail(self.config.path(qemu.QEMU_LOG))
        if qemu_log.strip():
            parts.append("--- qemu (tail) ---\n" + qemu_log)
        return "\n".join(parts) if parts else "(no console output)"

    async def _abort(self) -> None:
        """Kill a VM that failed to come up, wait for its end, remove its directory."""
        self._last_tails = self._tails()
        if not self.dead:
            await self._try_step(lambda: self._signal(signal.SIGKILL), 5.0)
        self._close_connections()
        self._cleanup()
