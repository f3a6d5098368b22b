"""Port mappings: hyperd's ``portmappings`` entries, ``--publish`` rules, and host ports that are free.

A pod's mapping is kept as the user wrote it, a range of host ports onto an equal range of container ports
(``"8000-8010"``), and expanded into single-port :class:`PortRule` s where a backend needs them (QEMU's
``hostfwd`` takes one port at a time). Pure functions apart from :func:`host_port_free`, which binds a
socket for an instant.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Iterable
from typing import Any

import attrs

from hyperd.errors import BadParameter
from hyperd.pod.spec import PortMapping, parse_pod

__all__ = ["Mapping", "PortRule", "parse_mappings", "parse_publish", "host_port_free", "set_spec_mappings",
           "EPHEMERAL"]

#: Where a mapping without a host port gets one (hyperd's "empty host port means 1025-65535").
EPHEMERAL = (1025, 65535)


@attrs.frozen
class PortRule:
    """One host port forwarded to one container port."""

    protocol: str
    host_port: int
    container_port: int

    @property
    def key(self) -> str:
        """The allocation key of the host side: ``tcp:8080``."""
        return f"{self.protocol}:{self.host_port}"


def _text(ports: tuple[int, int]) -> str:
    low, high = ports
    return str(low) if low == high else f"{low}-{high}"


@attrs.frozen
class Mapping:
    """A range of host ports onto an equal range of container ports; ``host`` None: not chosen yet."""

    protocol: str
    container: tuple[int, int]
    host: tuple[int, int] | None = None

    @classmethod
    def from_spec(cls, m: PortMapping) -> Mapping:
        return cls(m.protocol, tuple(m.container_port), tuple(m.host_port) if m.host_port else None)

    @property
    def size(self) -> int:
        return self.container[1] - self.container[0] + 1

    def rules(self) -> list[PortRule]:
        if self.host is None:
            raise ValueError("the host ports are not chosen yet")
        return [PortRule(self.protocol, self.host[0] + i, self.container[0] + i) for i in range(self.size)]

    def to_json(self) -> dict[str, str]:
        """hyperd's PortMapping: ports as strings, ranges as ``"a-b"``."""
        return {"containerPort": _text(self.container), "hostPort": _text(self.host) if self.host else "",
                "protocol": self.protocol}

    def matches(self, other: Mapping) -> bool:
        """``other`` (from a delete request) names this mapping: same protocol and container ports, and the
        same host ports when it gives them."""
        return (self.protocol == other.protocol and self.container == other.container
                and (other.host is None or other.host == self.host))


def parse_mappings(value: Any, what: str = "portmappings") -> list[Mapping]:
    """A JSON array of hyperd PortMappings → Mappings; BadParameter naming the entry at fault."""
    if not isinstance(value, list):
        raise BadParameter(f"bad parameter: {what} must be a JSON array of port mappings")
    try:
        pod = parse_pod({"id": "portmappings", "portmappings": value})
    except BadParameter as e:
        raise BadParameter(f"bad parameter: {what}{e.message[len('portmappings'):]}") from None
    return [Mapping.from_spec(m) for m in pod.portmappings]


def parse_publish(rule: str) -> dict[str, str]:
    """hyperctl's ``--publish [tcp|udp:]HOST:CONTAINER`` (ranges allowed; ``CONTAINER`` alone: any host
    port) → a pod file's portmappings entry. Raises ValueError with a message for the user."""
    parts = rule.strip().split(":")
    protocol = "tcp"
    if parts and parts[0].lower() in ("tcp", "udp"):
        protocol = parts.pop(0).lower()
    if len(parts) == 1:
        host, container = "", parts[0]
    elif len(parts) == 2:
        host, container = parts
    else:
        raise ValueError(f"{rule!r} is not [tcp|udp:]HOSTPORT:CONTAINERPORT")
    entry = {"containerPort": container, "hostPort": host, "protocol": protocol}
    try:
        parse_mappings([entry], "--publish")
    except BadParameter as e:
        raise ValueError(f"{rule!r}: {e.message.removeprefix('bad parameter: ')}") from None
    return entry


def set_spec_mappings(document: dict, mappings: Iterable[Mapping]) -> dict:
    """A copy of a pod document whose portmappings are ``mappings`` (keys match case-insensitively, so
    every spelling of the old key goes)."""
    out = {k: v for k, v in document.items() if k.lower() != "portmappings"}
    out["portmappings"] = [m.to_json() for m in mappings]
    return out


def host_port_free(address: str, protocol: str, port: int) -> bool:
    """Can ``port`` be bound on ``address`` now? Binds and closes at once, with SO_REUSEADDR as QEMU's
    slirp does, so a port held only by connections in TIME_WAIT counts as free."""
    kind = socket.SOCK_STREAM if protocol == "tcp" else socket.SOCK_DGRAM
    s = socket.socket(socket.AF_INET, kind)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((address, port))
        return True
    except OSError as e:
        if e.errno in (errno.EADDRINUSE, errno.EACCES):
            return False
        raise
    finally:
        s.close()
