"""``twistd hyperd`` / ``twist hyperd``: the command-line options and the service tree.

:func:`makeService` reads the configuration, opens the Daemon (and with it the state database) and returns
a :class:`HyperService` that starts the Daemon first, then listens on the API socket; on the way down it
closes the socket first, then stops the Daemon. Anything that makes starting impossible (a bad config
value, a corrupt database, another hyperd on the socket) is a one-line message on stderr and exit status 1,
not a traceback.
"""

from __future__ import annotations

import errno
import grp
import os
import socket
import sys
from typing import Any

from twisted.application.service import MultiService, Service
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.failure import Failure

from hyperd import __version__
from hyperd.config import DEFAULT_SOCKET, ConfigError, load_config, unix_path
from hyperd.daemon import Daemon
from hyperd.state import StateError

__all__ = ["Options", "makeService", "HyperService", "StartupError"]


class StartupError(Exception):
    """hyperd cannot start; the message says why, for the operator."""


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = ("hyperd: runs pods of containers, each pod in its own QEMU virtual machine, behind "
                "hyperd's REST API on a UNIX socket. Command-line options win over the config file.")
    optParameters = [
        ["socket", "s", None,
         f"API endpoint: a socket path or a Twisted endpoint string (default {DEFAULT_SOCKET}; "
         "systemd:domain=UNIX:index=0 under socket activation)"],
        ["root", None, None, "State, images and guest files (default /var/lib/hyper)"],
        ["run-dir", None, None, "Per-VM run directories (default /var/run/hyper)"],
        ["config", "c", None, "hyperd's INI config file (default /etc/hyper/config; may be missing)"],
        ["kernel", None, None, "Guest kernel (default <root>/kernel)"],
        ["initrd", None, None, "Guest initrd (default <root>/hyper-initrd.img)"],
        ["accel", None, None, "auto|kvm|tcg (default auto: KVM only if it really runs a guest)"],
        ["socket-group", None, None, "Group owning the API socket (default root's)"],
    ]
    optFlags = [
        ["stop-vms-on-exit", None, "Stop VMs when the daemon stops (default: they keep running)"],
    ]

    def opt_version(self) -> None:
        print(f"hyperd {__version__}")
        sys.exit(0)

    def overrides(self) -> dict[str, Any]:
        """Config field values given on the command line (None: not given)."""
        return {
            "socket": self["socket"],
            "root": self["root"],
            "run_dir": self["run-dir"],
            "kernel": self["kernel"],
            "initrd": self["initrd"],
            "accel": self["accel"],
            "socket_group": self["socket-group"],
            "stop_vms_on_exit": True if self["stop-vms-on-exit"] else None,
        }


def _fail(message: str) -> None:
    """Say why we cannot start, on the real stderr and in the log, and exit 1.

    twistd may have redirected sys.stderr into its log, and once it has daemonized the real stderr is
    /dev/null: the log line is what an operator then finds in --logfile.
    """
    stream = sys.__stderr__ or sys.stderr
    stream.write(f"hyperd: {message}\n")
    stream.flush()
    if sys.stderr is not sys.__stderr__:
        Logger(namespace="hyperd").critical("hyperd cannot start: {message}", message=message)
    if _stderr_is_dev_null():
        # Daemonized by twistd: its waiting parent only hears of an Exception (through its status pipe;
        # a SystemExit would leave it waiting forever), and prints it for whoever started us.
        raise StartupError(message) from None
    raise SystemExit(1)


def _stderr_is_dev_null() -> bool:
    try:
        err, null = os.fstat(2), os.stat("/dev/null")
    except OSError:
        return False
    return (err.st_dev, err.st_ino, err.st_rdev) == (null.st_dev, null.st_ino, null.st_rdev)


def makeService(options: Options) -> HyperService:
    try:
        config = load_config(options["config"], options.overrides())
    except ConfigError as e:
        _fail(f"configuration error: {e}")
    try:
        daemon = Daemon(config)
    except StateError as e:
        _fail(str(e))
    except OSError as e:
        _fail(f"cannot prepare {e.filename}: {e.strerror}")
    return HyperService(daemon, config)


def _lock_owner(path: str) -> str:
    try:
        return os.readlink(path + ".lock")
    except OSError:
        return "unknown"


def _socket_is_alive(path: str) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)  # immediate for a UNIX socket: accepted or refused
        return True
    except OSError:
        return False
    finally:
        s.close()


class HyperService(MultiService):
    """The top service: the Daemon, then the API listener(s); stopped in the reverse order, one by one."""

    log = Logger()

    def __init__(self, daemon: Daemon, config: Any, reactor: Any = None) -> None:
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.reactor = reactor
        self.daemon = daemon
        self.config = config
        self.ports: list[Any] = []
        self._started = False
        daemon.setServiceParent(self)

    # twistd calls privilegedStartService before the reactor runs and startService once it runs; `twist`
    # calls only startService, before the reactor runs. Either way we start at the first call, while a
    # failure can still end the process with a clear message.
    def privilegedStartService(self) -> None:
        self._start()

    def startService(self) -> None:
        Service.startService(self)
        self._start()

    def _start(self) -> None:
        if self._started:
            return
        self._started = True
        # Take the socket (and its lock) first, so that a second hyperd gives up before it touches any
        # VM; no request is served before the Daemon has started, because both happen before the
        # reactor turns.
        try:
            self.ports.append(self._listen(self.config.socket, group=self.config.socket_group))
            if self.config.host:
                self.ports.append(self._listen(_host_endpoint(self.config.host)))
        except StartupError as e:
            self._close_ports()
            _fail(str(e))
        if not self.daemon.running:
            try:
                self.daemon.startService()
            except Exception as e:
                self.log.failure("the daemon failed to start")
                self._close_ports()
                _fail(f"cannot start: {e}")

    def _close_ports(self) -> None:
        for port in self.ports:
            port.stopListening()
        self.ports = []

    def _listen(self, endpoint_string: str, group: str | None = None) -> Any:
        from hyperd.api.site import make_site

        path = unix_path(endpoint_string)
        if path:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        site = make_site(self.daemon)
        try:
            port = _listen_now(serverFromString(self.reactor, endpoint_string), site)
        except CannotListenError as e:
            if path is None:
                raise StartupError(f"cannot listen on {endpoint_string}: {e.socketError}") from None
            if e.socketError == "Cannot acquire lock":
                raise StartupError(f"another hyperd (pid {_lock_owner(path)}) is already serving {path}; "
                                   "stop it first") from None
            if isinstance(e.socketError, OSError) and e.socketError.errno == errno.EADDRINUSE:
                if _socket_is_alive(path):
                    raise StartupError(f"another process is already listening on {path}") from None
                # a dead socket nobody holds the lock for (e.g. left by Go's hyperd): replace it
                self.log.warn("removing stale socket {path}", path=path)
                os.unlink(path)
                if _lock_owner(path) == str(os.getpid()):
                    os.unlink(path + ".lock")  # the failed attempt took the lock and kept it
                try:
                    port = _listen_now(serverFromString(self.reactor, endpoint_string), site)
                except CannotListenError as e2:
                    raise StartupError(f"cannot listen on {path}: {e2.socketError}") from None
            else:
                raise StartupError(f"cannot listen on {path}: {e.socketError}") from None
        except IndexError:
            raise StartupError(f"{endpoint_string}: no such socket was passed to hyperd "
                               "(LISTEN_FDS/LISTEN_PID unset or wrong: is hyperd.socket active?)") from None
        except (ValueError, KeyError, TypeError) as e:
            raise StartupError(f"bad socket endpoint {endpoint_string!r}: {e}") from None
        if path and group:
            gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
            os.chown(path, -1, gid)
        self.log.info("hyperd API listening on {where}", where=path or endpoint_string)
        return port

    @defer.inlineCallbacks
    def stopService(self):
        Service.stopService(self)
        # the socket first, so no request arrives at a stopping daemon ...
        for port in reversed(self.ports):
            if _is_adopted(port):
                # systemd owns an adopted socket file: stop accepting, never unlink it
                port.stopReading()
                continue
            yield defer.maybeDeferred(port.stopListening)
        self.ports = []
        # ... then the daemon
        if self.daemon.running:
            yield defer.maybeDeferred(self.daemon.stopService)


def _is_adopted(port: Any) -> bool:
    return bool(getattr(port, "_hyperd_adopted", False))


def _listen_now(endpoint: Any, factory: Any) -> Any:
    """Listen, synchronously: UNIX, TCP and adopted endpoints fire their Deferred at once."""
    outcome: list[Any] = []
    d = endpoint.listen(factory)
    d.addBoth(outcome.append)
    if not outcome:
        d.cancel()
        raise StartupError(f"endpoint {endpoint!r} did not start listening at once")
    value = outcome[0]
    if isinstance(value, Failure):
        value.raiseException()
    if type(endpoint).__name__ == "AdoptedStreamServerEndpoint":
        value._hyperd_adopted = True
    return value


def _host_endpoint(host: str) -> str:
    """hyperd's ``Host=tcp://IP:PORT`` (or unix:///path) as an endpoint string."""
    if host.startswith("tcp://"):
        ip, _, port = host[len("tcp://"):].rpartition(":")
        ip = ip.strip("[]")
        return f"tcp:{port}:interface={ip.replace(':', chr(92) + ':')}" if ip else f"tcp:{port}"
    from hyperd.config import socket_endpoint

    return socket_endpoint(host)
