"""The pod's DNS settings: its own ``dns``/``dnsSearch``/``dnsOptions``, or else the host's resolv.conf.

hyperd injected the host's ``/etc/resolv.conf`` into every container when the pod named no ``dns``, unless
a container mapped its own ``/etc/resolv.conf`` (reference/hyperd.md §2). We do the same through STARTPOD's
dns fields. A resolver the host reaches on its own loopback (127.0.0.53, systemd-resolved or dnsmasq) is not
reachable from the guest: in user mode it becomes slirp's forwarder 10.0.2.3, in bridge mode it is dropped.
"""

from __future__ import annotations

import ipaddress

import attrs

from hyperd.pod.spec import UserPod

__all__ = ["HostDNS", "read_resolv_conf", "pod_dns", "RESOLV_CONF"]

RESOLV_CONF = "/etc/resolv.conf"


@attrs.frozen
class HostDNS:
    nameservers: tuple[str, ...] = ()
    search: tuple[str, ...] = ()
    options: tuple[str, ...] = ()


def parse_resolv_conf(text: str) -> HostDNS:
    nameservers: list[str] = []
    search: list[str] = []
    options: list[str] = []
    for line in text.splitlines():
        fields = line.split("#", 1)[0].split(";", 1)[0].split()
        if not fields:
            continue
        key, values = fields[0], fields[1:]
        if key == "nameserver" and values:
            try:
                ipaddress.ip_address(values[0].split("%", 1)[0])
            except ValueError:
                continue
            nameservers.append(values[0])
        elif key in ("search", "domain"):
            search = list(values)  # the last search/domain line wins, as in glibc
        elif key == "options":
            options += values
    return HostDNS(tuple(nameservers), tuple(search), tuple(options))


def read_resolv_conf(path: str = RESOLV_CONF) -> HostDNS:
    try:
        with open(path) as f:
            return parse_resolv_conf(f.read())
    except OSError:
        return HostDNS()


def _maps_resolv_conf(pod: UserPod) -> bool:
    """The user brings their own resolv.conf: a container file at that path, or a pod file read from it."""
    if any(f.uri == "file://" + RESOLV_CONF for f in pod.files):
        return True
    for c in pod.containers:
        for f in c.files:
            if f.path.rstrip("/") == RESOLV_CONF or (f.detail is not None and f.detail.uri == "file://" + RESOLV_CONF):
                return True
    return False


def pod_dns(pod: UserPod, host: HostDNS, loopback_to: str | None) -> UserPod:
    """``pod`` with the dns fields the guest is to write: the pod's own, or the host's.

    ``loopback_to``: the address a host resolver on 127.0.0.0/8 (or ::1) is replaced by; None drops it.
    """
    if pod.dns or _maps_resolv_conf(pod):
        return pod
    servers: list[str] = []
    for server in host.nameservers:
        address = ipaddress.ip_address(server.split("%", 1)[0])
        if address.is_loopback:
            if loopback_to is None:
                continue
            server = loopback_to
        elif address.version != 4:
            continue  # neither slirp nor our bridge give the guest IPv6
        if server not in servers:
            servers.append(server)
    if not servers:
        return pod
    return attrs.evolve(pod, dns=tuple(servers), dns_search=pod.dns_search or host.search,
                        dns_options=pod.dns_options or host.options)
