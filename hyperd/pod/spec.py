"""The pod file: hyperd's UserPod JSON (reference/hyperd.md §2), parsed into attrs value objects.

Keys match case-insensitively and unknown keys are ignored, as Go's encoding/json did (real pod files say
``containerport``). Missing fields take hyperd's defaults. Every error names the field it is about, as a path:
``containers[0].image: required``.
"""

from __future__ import annotations

import ipaddress
import json
import re
from typing import Any, Callable

import attrs

from hyperd.errors import BadParameter
from hyperd.schema import wrap

DEFAULT_VCPU = 1
DEFAULT_MEMORY = 128

_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_NAME_UNSAFE = re.compile(r"[^a-zA-Z0-9_.-]+")

RESTART_POLICIES = ("never", "always", "onfailure")
VOLUME_FORMATS = ("", "raw", "qcow2", "vdi", "vfs", "rbd", "nas")
VOLUME_CACHES = ("", "off", "none", "directsync", "writeback", "unsafe", "writethrough")
FILE_ENCODINGS = ("", "raw", "base64")
PROTOCOLS = ("tcp", "udp")


class _Fields:
    """One JSON object seen through case-insensitive keys, with its path for error messages."""

    def __init__(self, value: Any, path: str):
        if not isinstance(value, dict):
            raise BadParameter(f"{path or 'pod'}: must be an object, not {_kind(value)}")
        self.path = path
        # The API's open-schema reader: keys match case-insensitively, the last spelling wins (as in Go).
        self._values = wrap(value)

    def at(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def raw(self, name: str) -> Any:
        return self._values.get(name)

    def str(self, name: str, default: str = "", choices: tuple = ()) -> str:
        value = self.raw(name)
        if value is None:
            return default
        if not isinstance(value, str):
            raise BadParameter(f"{self.at(name)}: must be a string, not {_kind(value)}")
        if choices and value.lower() not in choices:
            allowed = ", ".join(repr(c) for c in choices if c)
            raise BadParameter(f"{self.at(name)}: {value!r} is not one of {allowed}")
        return value

    def bool(self, name: str, default: bool = False) -> bool:
        value = self.raw(name)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise BadParameter(f"{self.at(name)}: must be true or false, not {_kind(value)}")
        return value

    def int(self, name: str, default: int = 0, minimum: int | None = None) -> int:
        value = self.raw(name)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            else:
                raise BadParameter(f"{self.at(name)}: must be an integer, not {_kind(value)}")
        if minimum is not None and value < minimum:
            raise BadParameter(f"{self.at(name)}: must be at least {minimum}, not {value}")
        return value

    def strings(self, name: str) -> tuple[str, ...]:
        value = self.raw(name)
        if value is None:
            return ()
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise BadParameter(f"{self.at(name)}: must be an array of strings")
        return tuple(value)

    def mapping(self, name: str) -> dict[str, str]:
        value = self.raw(name)
        if value is None:
            return {}
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            raise BadParameter(f"{self.at(name)}: must be an object of strings")
        return {str(k): v for k, v in value.items()}

    def objects(self, name: str, parse: Callable[[_Fields], Any]) -> tuple:
        value = self.raw(name)
        if value is None:
            return ()
        if not isinstance(value, list):
            raise BadParameter(f"{self.at(name)}: must be an array, not {_kind(value)}")
        return tuple(parse(_Fields(item, f"{self.at(name)}[{i}]")) for i, item in enumerate(value))

    def object(self, name: str, parse: Callable[[_Fields], Any]) -> Any:
        value = self.raw(name)
        if value is None:
            return None
        return parse(_Fields(value, self.at(name)))


def _kind(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number"
    )


def _port(value: Any, path: str) -> tuple[int, int] | None:
    """A port or range as hyperd wrote them ("80", 80, "8000-8010"); None when empty (any host port)."""
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise BadParameter(f"{path}: must be a port or a range like \"8000-8010\"")
    text = str(value).strip()
    low, sep, high = text.partition("-")
    try:
        first, last = int(low), int(high) if sep else int(low)
    except ValueError:
        raise BadParameter(f"{path}: {text!r} is not a port or a range like \"8000-8010\"") from None
    if not (1 <= first <= last <= 65535):
        raise BadParameter(f"{path}: {text!r} is not within 1-65535 (low-high)")
    return (first, last)


@attrs.frozen
class EnvVar:
    env: str
    value: str = ""


@attrs.frozen
class User:
    name: str = ""
    group: str = ""
    additional_groups: tuple[str, ...] = ()


@attrs.frozen
class UserFile:
    name: str
    encoding: str = "raw"
    uri: str = ""
    content: str = ""


@attrs.frozen
class UserVolume:
    name: str
    source: str = ""
    format: str = ""
    fstype: str = ""
    cache: str = ""


@attrs.frozen
class ContainerVolume:
    volume: str
    path: str
    read_only: bool = False
    detail: UserVolume | None = None


@attrs.frozen
class ContainerFile:
    filename: str
    path: str
    perm: int = 0o755
    user: str = ""
    group: str = ""
    detail: UserFile | None = None


@attrs.frozen
class Ulimit:
    name: str
    hard: int
    soft: int


@attrs.frozen
class UserContainer:
    name: str
    image: str
    command: tuple[str, ...] = ()
    entrypoint: tuple[str, ...] = ()
    workdir: str = ""
    envs: tuple[EnvVar, ...] = ()
    tty: bool = False
    volumes: tuple[ContainerVolume, ...] = ()
    files: tuple[ContainerFile, ...] = ()
    user: User = User()
    sysctl: dict = attrs.field(factory=dict)
    labels: dict = attrs.field(factory=dict)
    restart_policy: str = "never"
    ulimits: tuple[Ulimit, ...] = ()
    stop_signal: str = ""
    read_only: bool = False


@attrs.frozen
class PortMapping:
    container_port: tuple[int, int]
    host_port: tuple[int, int] | None
    protocol: str = "tcp"


@attrs.frozen
class Interface:
    bridge: str = ""
    ip: str = ""
    ifname: str = ""
    mac: str = ""
    mtu: int = 0
    gateway: str = ""


@attrs.frozen
class ServiceHost:
    host_ip: str
    host_port: int


@attrs.frozen
class Service:
    service_ip: str
    service_port: int
    protocol: str = "tcp"
    hosts: tuple[ServiceHost, ...] = ()


@attrs.frozen
class UserPod:
    id: str
    hostname: str
    containers: tuple[UserContainer, ...] = ()
    vcpu: int = DEFAULT_VCPU
    memory: int = DEFAULT_MEMORY
    type: str = "pod"
    tty: bool = False
    labels: dict = attrs.field(factory=dict)
    volumes: tuple[UserVolume, ...] = ()
    files: tuple[UserFile, ...] = ()
    dns: tuple[str, ...] = ()
    dns_search: tuple[str, ...] = ()
    dns_options: tuple[str, ...] = ()
    portmappings: tuple[PortMapping, ...] = ()
    interfaces: tuple[Interface, ...] = ()
    services: tuple[Service, ...] = ()
    #: portmappingWhiteLists: who may reach the pod's address directly, and its port mappings (CIDRs).
    whitelist_internal: tuple[str, ...] = ()
    whitelist_external: tuple[str, ...] = ()
    log_type: str = "json-file"
    log_config: dict = attrs.field(factory=dict)
    restart_policy: str = "never"
    #: The document as the user sent it, kept to be persisted and shown back.
    source: dict = attrs.field(factory=dict, eq=False, repr=False)


def _env(f: _Fields) -> EnvVar:
    name = f.str("env")
    if not name:
        raise BadParameter(f"{f.at('env')}: required")
    return EnvVar(name, f.str("value"))


def _user(f: _Fields) -> User:
    return User(f.str("name"), f.str("group"), f.strings("additionalGroups"))


def _file(f: _Fields) -> UserFile:
    name = f.str("name")
    if not name:
        raise BadParameter(f"{f.at('name')}: required")
    uri = f.str("uri")
    if uri and not uri.startswith(("http://", "https://", "file:///")):
        raise BadParameter(f"{f.at('uri')}: {uri!r} is not an http(s):// or file:/// URI")
    return UserFile(name, f.str("encoding", "raw", FILE_ENCODINGS) or "raw", uri, f.str("content"))


def _volume(f: _Fields) -> UserVolume:
    name = f.str("name")
    if not name:
        raise BadParameter(f"{f.at('name')}: required")
    return UserVolume(name, f.str("source"), f.str("format", "", VOLUME_FORMATS).lower(), f.str("fstype"),
                      f.str("cache", "", VOLUME_CACHES).lower())


def _container_volume(f: _Fields) -> ContainerVolume:
    volume, path = f.str("volume"), f.str("path")
    if not volume:
        raise BadParameter(f"{f.at('volume')}: required")
    if not path.startswith("/"):
        raise BadParameter(f"{f.at('path')}: must be an absolute path in the container")
    detail = f.object("detail", lambda d: _volume(_with_default_name(d, volume)))
    return ContainerVolume(volume, path, f.bool("readOnly"), detail)


def _with_default_name(f: _Fields, name: str) -> _Fields:
    if f.raw("name") is None:
        f._values["name"] = name
    return f


def _container_file(f: _Fields) -> ContainerFile:
    filename, path = f.str("filename"), f.str("path")
    if not filename:
        raise BadParameter(f"{f.at('filename')}: required")
    if not path.startswith("/"):
        raise BadParameter(f"{f.at('path')}: must be an absolute path in the container")
    perm_text = f.str("perm", "0755") or "0755"
    try:
        perm = int(perm_text, 8)
    except ValueError:
        raise BadParameter(f"{f.at('perm')}: {perm_text!r} is not an octal mode like \"0644\"") from None
    if not 0 <= perm <= 0o7777:
        raise BadParameter(f"{f.at('perm')}: {perm_text!r} is not a file mode")
    detail = f.object("detail", lambda d: _file(_with_default_name(d, filename)))
    return ContainerFile(filename, path, perm, f.str("user"), f.str("group"), detail)


def _ulimit(f: _Fields) -> Ulimit:
    name = f.str("name")
    if not name:
        raise BadParameter(f"{f.at('name')}: required")
    return Ulimit(name, f.int("hard", 0, 0), f.int("soft", 0, 0))


def _portmapping(f: _Fields) -> PortMapping:
    container = _port(f.raw("containerPort"), f.at("containerPort"))
    if container is None:
        raise BadParameter(f"{f.at('containerPort')}: required")
    host = _port(f.raw("hostPort"), f.at("hostPort"))
    if host is not None and host[1] - host[0] != container[1] - container[0]:
        raise BadParameter(f"{f.path}: the host and container port ranges differ in size")
    return PortMapping(container, host, f.str("protocol", "tcp", PROTOCOLS).lower() or "tcp")


def _interface(f: _Fields) -> Interface:
    ip = f.str("ip")
    if ip:
        try:
            ipaddress.ip_interface(ip)
        except ValueError:
            raise BadParameter(f"{f.at('ip')}: {ip!r} is not an address in CIDR form") from None
    gateway = f.str("gateway")
    if gateway:
        _ip(gateway, f.at("gateway"))
    return Interface(f.str("bridge"), ip, f.str("ifname"), f.str("mac"), f.int("mtu", 0, 0), gateway)


def _ip(text: str, path: str) -> str:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        raise BadParameter(f"{path}: {text!r} is not an IP address") from None
    return text


def _networks(f: _Fields, key: str) -> tuple[str, ...]:
    out = []
    for i, text in enumerate(f.strings(key)):
        try:
            out.append(str(ipaddress.ip_network(text, strict=False)))
        except ValueError:
            raise BadParameter(f"{f.at(key)}[{i}]: {text!r} is not a network (CIDR)") from None
    return tuple(out)


def _service(f: _Fields) -> Service:
    hosts = f.objects("hosts", lambda h: ServiceHost(_ip(h.str("hostIP"), h.at("hostIP")), h.int("hostPort", 0, 1)))
    return Service(_ip(f.str("serviceIP"), f.at("serviceIP")), f.int("servicePort", 0, 1),
                   f.str("protocol", "tcp", PROTOCOLS).lower() or "tcp", hosts)


def _unique(items, key, path: str, what: str) -> None:
    seen = set()
    for i, item in enumerate(items):
        name = key(item)
        if name in seen:
            raise BadParameter(f"{path}[{i}]: duplicate {what} {name!r}")
        seen.add(name)


def _hostname(name: str, path: str) -> str:
    if len(name) > 63:
        raise BadParameter(f"{path}: {name!r} is longer than 63 characters")
    for segment in name.split("."):
        if not _LABEL.match(segment):
            raise BadParameter(f"{path}: {name!r} is not a valid hostname (lower-case DNS-1123 labels)")
    return name


def check_references(container: UserContainer, volumes, files, path: str = "") -> None:
    """Every volume and file the container maps is the pod's (by name) or carries its own ``detail``."""
    volume_names = {v.name for v in volumes}
    file_names = {f.name for f in files}
    for j, v in enumerate(container.volumes):
        if v.detail is None and v.volume not in volume_names:
            raise BadParameter(f"{path}volumes[{j}].volume: no pod volume named {v.volume!r}")
    for j, cf in enumerate(container.files):
        if cf.detail is None and cf.filename not in file_names:
            raise BadParameter(f"{path}files[{j}].filename: no pod file named {cf.filename!r}")


def default_container_name(pod_id: str, image: str, index: int) -> str:
    """hyperd's default container name, ``<pod>-<image>-<idx>``, with characters unfit for a name replaced."""
    return _NAME_UNSAFE.sub("-", f"{pod_id}-{image}-{index}")


def _container(f: _Fields, pod_id: str, index: int, pod_tty: bool) -> UserContainer:
    image = f.str("image")
    if not image:
        raise BadParameter(f"{f.at('image')}: required")
    name = f.str("name") or default_container_name(pod_id, image, index)
    envs = f.objects("envs", _env)
    _unique(envs, lambda e: e.env, f.at("envs"), "env")
    workdir = f.str("workdir")
    if workdir and not workdir.startswith("/"):
        raise BadParameter(f"{f.at('workdir')}: must be an absolute path")
    return UserContainer(
        name=name,
        image=image,
        command=f.strings("command"),
        entrypoint=f.strings("entrypoint"),
        workdir=workdir,
        envs=envs,
        tty=pod_tty or f.bool("tty"),
        volumes=f.objects("volumes", _container_volume),
        files=f.objects("files", _container_file),
        user=f.object("user", _user) or User(),
        sysctl=f.mapping("sysctl"),
        labels=f.mapping("labels"),
        restart_policy=(f.str("restartPolicy", "never", RESTART_POLICIES) or "never"),
        ulimits=f.objects("ulimits", _ulimit),
        stop_signal=f.str("stopSignal"),
        read_only=f.bool("readOnly"),
    )


def parse_pod(document: dict | str | bytes, pod_id: str = "") -> UserPod:
    """Parse a pod file (a dict, or its JSON text) into a UserPod.

    ``pod_id`` is used when the document names no ``id`` (the daemon generates ``pod-XXXXXXXXXX``).
    Raises BadParameter naming the field at fault.
    """
    if isinstance(document, (str, bytes)):
        try:
            document = json.loads(document)
        except ValueError as e:
            raise BadParameter(f"the pod is not valid JSON: {e}") from None
    f = _Fields(document, "")
    pid = f.str("id") or pod_id
    if not pid:
        raise BadParameter("id: required")
    hostname = f.str("hostname")
    if hostname:
        _hostname(hostname, "hostname")
    else:
        # The id is the default hostname; lower-case and trim it into a valid one.
        hostname = re.sub(r"[^a-z0-9-]+", "-", pid.lower()).strip("-")[:63].strip("-") or "pod"
    pod_tty = f.bool("tty")
    containers_raw = f.raw("containers")
    if containers_raw is not None and not isinstance(containers_raw, list):
        raise BadParameter(f"containers: must be an array, not {_kind(containers_raw)}")
    containers = tuple(
        _container(_Fields(c, f"containers[{i}]"), pid, i, pod_tty) for i, c in enumerate(containers_raw or ())
    )
    _unique(containers, lambda c: c.name, "containers", "container name")
    resource = f.object("resource", lambda r: (r.int("vcpu", DEFAULT_VCPU, 1), r.int("memory", DEFAULT_MEMORY, 1)))
    vcpu, memory = resource or (DEFAULT_VCPU, DEFAULT_MEMORY)
    volumes = f.objects("volumes", _volume)
    _unique(volumes, lambda v: v.name, "volumes", "volume name")
    files = f.objects("files", _file)
    _unique(files, lambda v: v.name, "files", "file name")
    for i, c in enumerate(containers):
        check_references(c, volumes, files, f"containers[{i}].")
    dns = f.strings("dns")
    for i, server in enumerate(dns):
        _ip(server, f"dns[{i}]")
    interfaces = f.objects("interfaces", _interface)
    if sum(1 for i in interfaces if i.gateway) > 1:
        raise BadParameter("interfaces: at most one interface may set a gateway")
    services = f.objects("services", _service)
    whitelists = f.object("portmappingWhiteLists", lambda w: (_networks(w, "internalNetworks"),
                                                              _networks(w, "externalNetworks")))
    log = f.object("log", lambda lg: (lg.str("type", "json-file") or "json-file", lg.raw("config") or {}))
    log_type, log_config = log or ("json-file", {})
    return UserPod(
        id=pid,
        hostname=hostname,
        containers=containers,
        vcpu=vcpu,
        memory=memory,
        type=f.str("type", "pod") or "pod",
        tty=pod_tty,
        labels=f.mapping("labels"),
        volumes=volumes,
        files=files,
        dns=dns,
        dns_search=f.strings("dnsSearch"),
        dns_options=f.strings("dnsOptions"),
        portmappings=f.objects("portmappings", _portmapping),
        interfaces=interfaces,
        services=services,
        whitelist_internal=whitelists[0] if whitelists else (),
        whitelist_external=whitelists[1] if whitelists else (),
        log_type=log_type,
        log_config=log_config if isinstance(log_config, dict) else {},
        restart_policy=f.str("restartPolicy", "never") or "never",
        source=dict(document),
    )


def parse_container(document: dict, pod_id: str, index: int) -> UserContainer:
    """One UserContainer on its own (``POST /container/create`` adds it to an existing pod)."""
    return _container(_Fields(document, ""), pod_id, index, False)


def _drop_empty(d: dict) -> dict:
    return {k: v for k, v in d.items() if v not in (None, "", (), [], {})}


def container_document(c: UserContainer) -> dict:
    """A UserContainer back as hyperd's JSON, which ``parse_container`` reads back to an equal value."""

    def file_detail(f: UserFile | None):
        return _drop_empty({"name": f.name, "encoding": f.encoding, "uri": f.uri, "content": f.content}) if f else None

    def volume_detail(v: UserVolume | None):
        return _drop_empty({"name": v.name, "source": v.source, "format": v.format, "fstype": v.fstype,
                            "cache": v.cache}) if v else None

    return _drop_empty({
        "name": c.name,
        "image": c.image,
        "command": list(c.command),
        "entrypoint": list(c.entrypoint),
        "workdir": c.workdir,
        "envs": [{"env": e.env, "value": e.value} for e in c.envs],
        "tty": c.tty or None,
        "volumes": [_drop_empty({"volume": v.volume, "path": v.path, "readOnly": v.read_only or None,
                                 "detail": volume_detail(v.detail)}) for v in c.volumes],
        "files": [_drop_empty({"filename": f.filename, "path": f.path, "perm": "%04o" % f.perm, "user": f.user,
                               "group": f.group, "detail": file_detail(f.detail)}) for f in c.files],
        "user": _drop_empty({"name": c.user.name, "group": c.user.group,
                             "additionalGroups": list(c.user.additional_groups)}),
        "sysctl": c.sysctl,
        "labels": c.labels,
        "restartPolicy": c.restart_policy if c.restart_policy != "never" else None,
        "ulimits": [{"name": u.name, "hard": u.hard, "soft": u.soft} for u in c.ulimits],
        "stopSignal": c.stop_signal,
        "readOnly": c.read_only or None,
    })
