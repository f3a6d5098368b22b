"""Host links over netlink (pyroute2), off the reactor thread.

pyroute2's sync ``IPRoute`` runs its own asyncio loop per call and blocks the caller, so every call runs in
one dedicated single-thread pool (reference/twisted.md §6): netlink changes are serialised, the reactor never
waits on them, and each function opens and closes its own ``IPRoute`` inside the thread. The functions are
idempotent, because the daemon runs them again after a restart.
"""

from __future__ import annotations

import errno
import ipaddress
from collections.abc import Callable
from typing import Any, TypeVar

from twisted.internet import threads
from twisted.python.threadpool import ThreadPool

__all__ = ["NetlinkPool", "ensure_bridge", "add_tap", "delete_link", "link_exists", "enable_forwarding"]

T = TypeVar("T")


class NetlinkPool:
    """One thread for every netlink call; stopped at reactor shutdown."""

    def __init__(self, reactor) -> None:
        self.reactor = reactor
        self.pool = ThreadPool(minthreads=1, maxthreads=1, name="hyperd-netlink")
        self._started = False

    def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any):
        """``fn(*args, **kwargs)`` in the netlink thread; a Deferred with its result."""
        if not self._started:
            self.pool.start()
            self._started = True
            self.reactor.addSystemEventTrigger("during", "shutdown", self.stop)
        return threads.deferToThreadPool(self.reactor, self.pool, fn, *args, **kwargs)

    def stop(self) -> None:
        if self._started:
            self._started = False
            self.pool.stop()


def _ipr():
    from pyroute2 import IPRoute

    return IPRoute()


def _lookup(ipr, name: str) -> int | None:
    found = ipr.link_lookup(ifname=name)
    return found[0] if found else None


def link_exists(name: str) -> bool:
    with _ipr() as ipr:
        return _lookup(ipr, name) is not None


def ensure_bridge(name: str, address: str, prefix: int) -> None:
    """The bridge ``name`` exists, holds ``address/prefix`` and is up (created or adopted)."""
    from pyroute2 import NetlinkError

    with _ipr() as ipr:
        index = _lookup(ipr, name)
        if index is None:
            try:
                ipr.link("add", ifname=name, kind="bridge")
            except NetlinkError as e:
                if e.code != errno.EEXIST:
                    raise
            index = _lookup(ipr, name)
        held = {(a.get("address"), a["prefixlen"]) for a in ipr.get_addr(index=index, family=2)}
        if (address, prefix) not in held:
            try:
                ipr.addr("add", index=index, address=address, mask=prefix)
            except NetlinkError as e:
                if e.code != errno.EEXIST:
                    raise
        ipr.link("set", index=index, state="up")


def add_tap(name: str, bridge: str) -> None:
    """A persistent tap ``name`` enslaved to ``bridge`` and up; a stale one of that name is replaced."""
    from pyroute2 import NetlinkError

    with _ipr() as ipr:
        old = _lookup(ipr, name)
        if old is not None:
            ipr.link("del", index=old)
        try:
            ipr.link("add", ifname=name, kind="tuntap", mode="tap")
        except NetlinkError as e:
            if e.code != errno.EEXIST:
                raise
        index = _lookup(ipr, name)
        master = _lookup(ipr, bridge)
        if master is None:
            raise RuntimeError(f"bridge {bridge} does not exist")
        ipr.link("set", index=index, master=master, state="up")


def delete_link(name: str) -> bool:
    """Delete ``name`` if it exists; True if it did."""
    from pyroute2 import NetlinkError

    with _ipr() as ipr:
        index = _lookup(ipr, name)
        if index is None:
            return False
        try:
            ipr.link("del", index=index)
        except NetlinkError as e:
            if e.code != errno.ENODEV:
                raise
            return False
        return True


def links_with_prefix(prefix: str) -> list[str]:
    with _ipr() as ipr:
        return [link.get("ifname") for link in ipr.get_links() if (link.get("ifname") or "").startswith(prefix)]


def enable_forwarding() -> None:
    """IPv4 forwarding on, as hyperd did (per network namespace): needed for DNAT from outside and for the
    pods' traffic out."""
    with open("/proc/sys/net/ipv4/ip_forward", "r+") as f:
        if f.read().strip() != "1":
            f.seek(0)
            f.write("1\n")


def bridge_network(bridge_ip: str) -> tuple[str, ipaddress.IPv4Network]:
    """``BridgeIP`` → (the bridge's address, the subnet). A network address (192.168.123.0/24, the config's
    default) gives the bridge the subnet's first host (192.168.123.1), as hyperd's default."""
    iface = ipaddress.ip_interface(bridge_ip)
    net = iface.network
    address = iface.ip if iface.ip != net.network_address else net.network_address + 1
    return str(address), net
