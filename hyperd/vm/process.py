"""Spawning one qemu as a child of the daemon, and noticing its end, whatever ended it.

qemu must outlive the daemon: its stdin is /dev/null and its stdout/stderr go to a file (no pipe to the
daemon, so no SIGPIPE when the daemon is gone), and it runs in its own session (``setsid``), so a signal sent
to the daemon's process group (Ctrl-C in a terminal, a service manager killing the group) does not reach it.
For a qemu that is not our child (after a daemon restart) ``PidWatcher`` notices its end through a pidfd.
"""

from __future__ import annotations

import os
import shutil
from typing import Callable

from twisted.internet import defer, error
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger()

SETSID = shutil.which("setsid") or ""


def describe_exit(reason: Failure) -> str:
    """"exited with code N" or "killed by signal N", from processEnded's reason."""
    value = reason.value
    if isinstance(value, error.ProcessDone):
        return "exited with code 0"
    if isinstance(value, error.ProcessTerminated):
        if value.signal is not None:
            return "killed by signal %d" % value.signal
        return "exited with code %s" % value.exitCode
    return "ended: %s" % reason.getErrorMessage()


class QemuProcessProtocol(ProcessProtocol):
    """Supervises one qemu child; ``ended`` fires with a reason string once it is reaped."""

    def __init__(self) -> None:
        self.ended: defer.Deferred = defer.Deferred()
        self.pid: int | None = None
        self.reason: str | None = None

    def connectionMade(self) -> None:
        # Saved now: transport.pid becomes None once the child is reaped.
        self.pid = self.transport.pid

    def processEnded(self, reason: Failure) -> None:
        self.reason = describe_exit(reason)
        if not self.ended.called:
            self.ended.callback(self.reason)

    @property
    def running(self) -> bool:
        return self.reason is None

    def signal(self, name: str) -> bool:
        """Send a signal ("TERM", "KILL"); False when the process is already gone."""
        try:
            self.transport.signalProcess(name)
            return True
        except error.ProcessExitedAlready:
            return False


def spawn_qemu(reactor, argv: list[str], log_path: str, env: dict | None = None,
               new_session: bool = True) -> QemuProcessProtocol:
    """Start ``argv`` (argv[0] an absolute path) with stdin from /dev/null and stdout/stderr into ``log_path``."""
    proto = QemuProcessProtocol()
    if env is None:
        # A clean, small environment: nothing of the daemon's (proxies, LD_*, locale) leaks into qemu.
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
    args = list(argv)
    executable = args[0]
    if new_session and SETSID:
        # setsid(1) does not fork when the caller is not a group leader, so the pid we get stays qemu's.
        args = [SETSID] + args
        executable = SETSID
    null_fd = os.open(os.devnull, os.O_RDONLY)
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
    try:
        reactor.spawnProcess(proto, executable, args, env=env, childFDs={0: null_fd, 1: log_fd, 2: log_fd})
    finally:
        os.close(null_fd)
        os.close(log_fd)
    return proto


# -- processes that are not our children ----------------------------------------------------------------------


def pid_alive(pid: int) -> bool:
    """True when ``pid`` exists and is not a zombie."""
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            stat = f.read()
    except OSError:
        return False
    # The state follows the ")" that ends the command name (which may itself contain spaces or parens).
    state = stat[stat.rfind(b")") + 2:][:1]
    return state not in (b"Z", b"X", b"")


def pid_cmdline(pid: int) -> list[str]:
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            raw = f.read()
    except OSError:
        return []
    return [a.decode("utf-8", "replace") for a in raw.split(b"\0") if a]


def vm_processes(run_dir: str) -> dict[int, str]:
    """``{pid: vm_dir}`` of the live qemu processes started for a VM directory under ``run_dir``."""
    prefix = os.path.join(run_dir, "vm-")
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        cmdline = pid_cmdline(pid)
        if not cmdline or "qemu" not in os.path.basename(cmdline[0]) or not pid_alive(pid):
            continue
        for arg in cmdline:
            at = arg.find(prefix)
            if at >= 0:
                name = arg[at + len(prefix):].split("/", 1)[0].split(",", 1)[0]
                found[pid] = os.path.join(run_dir, "vm-" + name)
                break
    return found


def pid_is_vm(pid: int, vm_dir: str) -> bool:
    """Whether ``pid`` is a live qemu started for ``vm_dir`` (guards against a recycled pid)."""
    if not pid_alive(pid):
        return False
    cmdline = pid_cmdline(pid)
    if not cmdline or "qemu" not in os.path.basename(cmdline[0]):
        return False
    needle = os.path.join(vm_dir, "")
    return any(needle in arg for arg in cmdline)


class PidWatcher:
    """Calls ``on_exit()`` once when process ``pid`` ends, through a pidfd in the reactor (no polling).

    Works for any process, child or not; for a child, "ends" means it exited (it may still be a zombie).
    """

    def __init__(self, reactor, pid: int, on_exit: Callable[[], None]) -> None:
        self._reactor = reactor
        self._on_exit = on_exit
        self._fd: int | None = None
        try:
            self._fd = os.pidfd_open(pid)
        except ProcessLookupError:
            reactor.callLater(0, self._fire)
            return
        reactor.addReader(self)

    def fileno(self) -> int:
        return self._fd if self._fd is not None else -1

    def logPrefix(self) -> str:
        return "PidWatcher"

    def doRead(self) -> None:
        self._fire()

    def connectionLost(self, reason) -> None:
        self.stop()

    def stop(self) -> None:
        if self._fd is not None:
            self._reactor.removeReader(self)
            os.close(self._fd)
            self._fd = None

    def _fire(self) -> None:
        self.stop()
        on_exit, self._on_exit = self._on_exit, None
        if on_exit is not None:
            on_exit()
