"""The daemon's configuration: defaults, then hyperd's INI file, then the command line.

The file is hyperd's ``/etc/hyper/config``: ``Key=Value`` lines in a default section (no header needed),
plus an optional ``[Log]`` section. Keys match case-insensitively. An unknown key is warned about (a newer or
older hyperd may have written it); a malformed file or a value we cannot use is a start-up error that names
the key, because a daemon that silently ignores ``Kernel=/typo`` wastes an afternoon.
"""

from __future__ import annotations

import configparser
import grp
import ipaddress
import json
import os
from collections.abc import Mapping
from typing import Any

import attrs

__all__ = ["Config", "ConfigError", "load_config", "socket_endpoint", "DEFAULT_SOCKET", "DEFAULT_CONFIG"]

DEFAULT_SOCKET = "unix:/var/run/hyper.sock:mode=660:lockfile=1"
DEFAULT_CONFIG = "/etc/hyper/config"
ACCELS = ("auto", "kvm", "tcg")
NETWORKS = ("user", "bridge")
#: Storage drivers hyperd knew. We keep images as directories shared over 9p with an overlay in the guest,
#: so only the directory-based names make sense; the others are refused with a clear message.
STORAGE_DRIVERS = ("overlay", "vfs")
HYPERVISORS = ("qemu", "kvm")


#: The most VMs one policy entry may keep (each is a qemu process with its guest's memory).
MAX_CACHE = 64


@attrs.frozen
class CacheSpec:
    """One entry of the policy: keep ``cache`` idle VMs of ``cpu`` vCPUs and ``memory`` MB."""

    cache: int
    cpu: int = 1
    memory: int = 128

    @property
    def shape(self) -> tuple[int, int]:
        return self.cpu, self.memory


def _count(item: dict, key: str, default: int, low: int, high: int | None, index: int) -> int:
    value = item.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"entry {index}: {key} must be a whole number, not {value!r}")
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise ValueError(f"entry {index}: {key} must be {bound}, not {value}")
    return value


def parse_policy(text: str) -> tuple[tuple[CacheSpec, ...], tuple[str, ...]]:
    """``VmFactoryPolicy`` → (the cache entries, warnings). Raises ValueError naming what is wrong.

    Empty (or ``none``) means no factory. Keys match case-insensitively; unknown keys are warned about.
    Entries of the same shape add up.
    """
    text = text.strip()
    if not text or text.lower() == "none":
        return (), ()
    try:
        items = json.loads("[" + text + "]")
    except ValueError as e:
        raise ValueError(f"not a comma-separated list of JSON objects ({e})") from None
    warnings: list[str] = []
    caches: dict[tuple[int, int], int] = {}
    for index, raw in enumerate(items, 1):
        if not isinstance(raw, dict):
            raise ValueError(f"entry {index} is not a JSON object: {raw!r}")
        item = {str(k).lower(): v for k, v in raw.items()}
        for key in sorted(set(item) - {"cache", "cpu", "memory", "template"}):
            warnings.append(f"VmFactoryPolicy entry {index}: unknown key {key!r} ignored")
        if item.get("template"):
            warnings.append(f"VmFactoryPolicy entry {index}: template VMs are not supported; "
                            f"its VMs are booted ahead instead (cache)")
        cache = _count(item, "cache", 1 if item.get("template") else 0, 0, MAX_CACHE, index)
        cpu = _count(item, "cpu", 1, 1, None, index)
        memory = _count(item, "memory", 128, 64, None, index)
        if cache:
            caches[(cpu, memory)] = min(MAX_CACHE, caches.get((cpu, memory), 0) + cache)
    return tuple(CacheSpec(n, cpu, mem) for (cpu, mem), n in caches.items()), tuple(warnings)


def format_policy(specs: tuple[CacheSpec, ...]) -> str:
    return ",".join(json.dumps({"cache": s.cache, "cpu": s.cpu, "memory": s.memory}) for s in specs)


class ConfigError(Exception):
    """The configuration cannot be used; the message names the file, the key and what is wrong."""


@attrs.frozen
class Config:
    """Everything the daemon is told at start-up. Paths are absolute strings."""

    socket: str = DEFAULT_SOCKET
    root: str = "/var/lib/hyper"
    run_dir: str = "/var/run/hyper"
    config_file: str = DEFAULT_CONFIG
    kernel: str | None = None  # None: <root>/kernel, built by hyperd-mkinitrd
    initrd: str | None = None  # None: <root>/hyper-initrd.img
    accel: str = "auto"
    hypervisor: str = "qemu"
    socket_group: str | None = None
    storage_driver: str = "overlay"
    network: str = "user"
    bridge: str = "hyper0"
    bridge_ip: str = "192.168.123.0/24"
    disable_iptables: bool = False
    host: str | None = None  # an extra listener, hyperd's Host=tcp://ip:port
    stop_vms_on_exit: bool = False  # False: VMs outlive the daemon and are picked up again
    pod_log_prefix: str | None = None  # None: <root>/logs (kept across reboots, unlike hyperd's /var/run)
    port_host_ip: str = "127.0.0.1"  # where user-mode port mappings listen on the host
    insecure_registries: tuple[str, ...] = ()  # registries pulled from over plain HTTP (host or host:port)
    vm_factory_policy: tuple[CacheSpec, ...] = ()  # idle VMs booted ahead (hyperd's VmFactoryPolicy)
    warnings: tuple[str, ...] = ()  # unknown keys and ignored settings, for the log

    @property
    def kernel_path(self) -> str:
        return self.kernel or os.path.join(self.root, "kernel")

    @property
    def initrd_path(self) -> str:
        return self.initrd or os.path.join(self.root, "hyper-initrd.img")

    @property
    def log_dir(self) -> str:
        """Where containers' json-file logs go: ``<log_dir>/<pod>/<container>-json.log``."""
        return self.pod_log_prefix or os.path.join(self.root, "logs")

    @property
    def state_path(self) -> str:
        return os.path.join(self.root, "state.db")

    @property
    def socket_path(self) -> str | None:
        """The filesystem path of a ``unix:`` socket endpoint, or None."""
        return unix_path(self.socket)


# --- value parsers ---------------------------------------------------------------------------------


def parse_bool(value: str) -> bool:
    """Go's strconv.ParseBool plus yes/no/on/off."""
    v = value.strip().lower()
    if v in ("1", "t", "true", "yes", "y", "on"):
        return True
    if v in ("0", "f", "false", "no", "n", "off", ""):
        return False
    raise ValueError(f"expected true or false, got {value!r}")


def _choice(choices: tuple[str, ...]):
    def parse(value: str) -> str:
        v = value.strip().lower()
        if v not in choices:
            raise ValueError(f"{value!r} is not one of {', '.join(choices)}")
        return v

    return parse


def _abspath(value: str) -> str:
    v = value.strip()
    if not v:
        raise ValueError("empty path")
    if not os.path.isabs(v):
        raise ValueError(f"{v!r} is not an absolute path")
    return os.path.normpath(v)


def _existing_file(value: str) -> str:
    v = _abspath(value)
    if not os.path.isfile(v):
        raise ValueError(f"{v} does not exist or is not a file")
    return v


def _cidr(value: str) -> str:
    try:
        net = ipaddress.ip_interface(value.strip())
    except ValueError as e:
        raise ValueError(f"{value!r} is not an IPv4 address/prefix: {e}") from None
    if net.version != 4 or net.network.prefixlen > 30:
        raise ValueError(f"{value!r} must be an IPv4 network with room for hosts (prefix <= 30)")
    return str(net)


def _ifname(value: str) -> str:
    v = value.strip()
    if not v or len(v) > 15 or "/" in v or " " in v:
        raise ValueError(f"{value!r} is not a valid interface name (1-15 characters)")
    return v


def _group(value: str) -> str:
    v = value.strip()
    try:
        if v.isdigit():
            grp.getgrgid(int(v))
        else:
            grp.getgrnam(v)
    except KeyError:
        raise ValueError(f"no such group {v!r}") from None
    return v


def _host(value: str) -> str:
    v = value.strip()
    if not v:
        return v
    if v.startswith("tcp://"):
        hostport = v[len("tcp://"):]
        host, sep, port = hostport.rpartition(":")
        if not sep or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{value!r} is not tcp://IP:PORT")
        return v
    if v.startswith("unix://"):
        _abspath(v[len("unix://"):])
        return v
    raise ValueError(f"{value!r} must be tcp://IP:PORT or unix:///path")


def _endpoint(value: str) -> str:
    v = value.strip()
    if not v:
        raise ValueError("empty socket")
    return socket_endpoint(v)


def _host_ip(value: str) -> str:
    import ipaddress

    try:
        return str(ipaddress.ip_address(value.strip()))
    except ValueError:
        raise ValueError(f"{value!r} is not an IP address") from None


def _registries(value: str) -> tuple[str, ...]:
    """``InsecureRegistries=a:5000, b`` → ("a:5000", "b"): hosts or host:port, comma or space separated."""
    items = tuple(v for v in value.replace(",", " ").split() if v)
    for item in items:
        host, _, port = item.rpartition(":") if ":" in item else (item, "", "")
        if not host or "/" in item or (port and not port.isdigit()):
            raise ValueError(f"{item!r} is not a host or host:port")
    return items


def _factory_policy(value: str) -> _Warned:
    specs, warnings = parse_policy(value)
    return _Warned(specs, warnings)


@attrs.frozen
class _Warned:
    """A parsed value that comes with warnings for the log."""

    value: Any
    warnings: tuple[str, ...]


#: INI key (lower-cased) -> (Config field, parser). ``None`` as field: known to hyperd, ignored by us.
_KEYS: dict[str, tuple[str | None, Any]] = {
    "root": ("root", _abspath),
    "kernel": ("kernel", _existing_file),
    "initrd": ("initrd", _existing_file),
    "hypervisor": ("hypervisor", _choice(HYPERVISORS)),
    "storagedriver": ("storage_driver", _choice(STORAGE_DRIVERS)),
    "bridge": ("bridge", _ifname),
    "bridgeip": ("bridge_ip", _cidr),
    "host": ("host", _host),
    "disableiptables": ("disable_iptables", parse_bool),
    # ours
    "socket": ("socket", _endpoint),
    "rundir": ("run_dir", _abspath),
    "accel": ("accel", _choice(ACCELS)),
    "socketgroup": ("socket_group", _group),
    "network": ("network", _choice(NETWORKS)),
    "stopvmsonexit": ("stop_vms_on_exit", parse_bool),
    "insecureregistries": ("insecure_registries", _registries),
    "porthostip": ("port_host_ip", _host_ip),
    "vmfactorypolicy": ("vm_factory_policy", _factory_policy),
    # hyperd's, accepted and ignored
    "bios": (None, str),
    "cbfs": (None, str),
    "vbox": (None, str),
    "storagebasesize": (None, str),
    "grpchost": (None, str),
    "enablevsock": (None, parse_bool),
    "logger": (None, str),
    "gdbtcpport": (None, str),
    "buffergoroutinesmax": (None, str),
    "bufferchannelsize": (None, str),
}
_LOG_KEYS: dict[str, tuple[str | None, Any]] = {
    "podlogprefix": ("pod_log_prefix", _abspath),
    "podidinpath": (None, parse_bool),
}

_SECTION = "hyperd"


def _read_ini(path: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=True, default_section="__none__")
    parser.optionxform = str.lower  # hyperd's keys are case-insensitive
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text: {e}") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    try:
        # hyperd's file has its keys before any [section] header: give them one.
        parser.read_string(f"[{_SECTION}]\n" + text, source=path)
    except configparser.Error as e:
        # line numbers are off by one because of the header we added
        msg = str(e).replace(f"[line {getattr(e, 'lineno', 0)}]", f"[line {getattr(e, 'lineno', 1) - 1}]")
        raise ConfigError(f"{path}: malformed config file: {msg}") from None
    return parser


def read_config_file(path: str) -> tuple[dict[str, Any], list[str]]:
    """Parse hyperd's INI file into Config field values, plus warnings for unknown or ignored keys."""
    parser = _read_ini(path)
    values: dict[str, Any] = {}
    warnings: list[str] = []
    for section in parser.sections():
        if section == _SECTION:
            table, prefix = _KEYS, ""
        elif section.lower() == "log":
            table, prefix = _LOG_KEYS, f"[{section}] "
        else:
            warnings.append(f"{path}: unknown section [{section}] ignored")
            continue
        for key, raw in parser.items(section):
            if key not in table:
                warnings.append(f"{path}: unknown key {prefix}{key} ignored")
                continue
            name, parse = table[key]
            try:
                value = parse(raw)
            except ValueError as e:
                raise ConfigError(f"{path}: bad value for {prefix}{key}: {e}") from None
            if isinstance(value, _Warned):
                warnings += [f"{path}: {w}" for w in value.warnings]
                value = value.value
            if name is None:
                warnings.append(f"{path}: {prefix}{key} is not used by this hyperd; ignored")
            else:
                values[name] = value
    return values, warnings


def load_config(path: str | None = None, overrides: Mapping[str, Any] | None = None) -> Config:
    """Build the Config: defaults < the INI file at ``path`` < ``overrides`` (the command line).

    ``path`` None means the default file, which may be missing; an explicitly named file must exist.
    ``overrides`` holds Config field names; None values are ignored (option not given).
    """
    explicit = path is not None
    path = path or DEFAULT_CONFIG
    values: dict[str, Any] = {"config_file": path}
    warnings: list[str] = []
    if os.path.exists(path):
        file_values, warnings = read_config_file(path)
        values.update(file_values)
    elif explicit:
        raise ConfigError(f"{path}: config file does not exist")
    fields = attrs.fields_dict(Config)
    for name, value in (overrides or {}).items():
        if value is None:
            continue
        if name not in fields:
            raise ConfigError(f"unknown setting {name!r}")
        values[name] = value
    # Values that came from the command line are checked here, the file's were checked when read.
    checks = {
        "root": _abspath,
        "run_dir": _abspath,
        "accel": _choice(ACCELS),
        "kernel": _existing_file,
        "initrd": _existing_file,
        "socket": _endpoint,
        "socket_group": _group,
        "network": _choice(NETWORKS),
    }
    for name, check in checks.items():
        value = (overrides or {}).get(name)
        if value is None:
            continue
        try:
            values[name] = check(str(value))
        except ValueError as e:
            raise ConfigError(f"bad value for --{name.replace('_', '-')}: {e}") from None
    values["warnings"] = tuple(warnings)
    return Config(**values)


# --- endpoints ----------------------------------------------------------------------------------------


def _escape(path: str) -> str:
    # ':' and '\' are special in endpoint strings (twisted.internet.endpoints.quoteStringArgument)
    return path.replace("\\", "\\\\").replace(":", "\\:")


def socket_endpoint(value: str) -> str:
    """A bare path or unix:// URL becomes our default unix endpoint string; others pass through."""
    if value.startswith("unix://"):
        value = value[len("unix://"):]
    if value.startswith("/"):
        return f"unix:{_escape(value)}:mode=660:lockfile=1"
    return value


def unix_path(endpoint: str) -> str | None:
    """The socket path named by a ``unix:`` endpoint string (positional or ``address=``), else None."""
    if not endpoint.startswith("unix:"):
        return None
    parts, cur, i, rest = [], [], 0, endpoint[len("unix:"):]
    while i < len(rest):
        c = rest[i]
        if c == "\\" and i + 1 < len(rest):
            cur.append(rest[i + 1])
            i += 2
            continue
        if c == ":":
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        i += 1
    parts.append("".join(cur))
    for part in parts:
        if part.startswith("address="):
            return part[len("address="):] or None
    return parts[0] if parts and "=" not in parts[0] and parts[0] else None
