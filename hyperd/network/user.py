"""User mode (the default): QEMU's slirp per VM, port mappings as slirp host forwards added over QMP.

Every VM boots with ``-netdev user,id=n0 -device virtio-net-pci,netdev=n0``; nothing on the host changes
and no privilege is needed. The guest is 10.0.2.15/24 behind slirp's router 10.0.2.2, whose DNS forwarder
10.0.2.3 replaces a host resolver on loopback. A pod's port mappings are added when it starts, with the
monitor's ``hostfwd_add n0 tcp:127.0.0.1:HOST-:CONTAINER`` (one per port: hostfwd takes no ranges), and
removed with ``hostfwd_remove`` when it stops, so an idle VM can take the next pod and mappings can be added
to and deleted from a running pod. They live inside qemu: they survive a daemon restart with it.
"""

from __future__ import annotations

import ipaddress

from hyperd.errors import BadParameter, Conflict, HyperError
from hyperd.network.base import NETDEV_ID, GuestNIC, Lease, Network
from hyperd.network.ports import PortRule
from hyperd.pod.spec import UserPod

__all__ = ["UserNetwork"]

SLIRP_NET = ipaddress.ip_network("10.0.2.0/24")
GUEST_ADDRESS = "10.0.2.15"
GATEWAY = "10.0.2.2"
DNS = "10.0.2.3"


class UserNetwork(Network):
    mode = "user"
    forwards_in_vm = True
    dns_loopback = DNS

    def __init__(self, config, reactor, state, host_ip: str = "127.0.0.1", **kwargs) -> None:
        super().__init__(config, reactor, state, **kwargs)
        self.port_address = host_ip

    async def prepare_vm(self, vm_id: str) -> list[str]:
        return ["-netdev", f"user,id={NETDEV_ID}", "-device", f"virtio-net-pci,netdev={NETDEV_ID}"]

    def _guest_nic(self, pod: UserPod) -> GuestNIC:
        address, mtu = GUEST_ADDRESS, 0
        if pod.interfaces:
            iface = pod.interfaces[0]
            mtu = iface.mtu
            if iface.ip:
                # slirp serves one fixed subnet; an address in it is honoured, any other cannot work.
                ip = ipaddress.ip_interface(iface.ip).ip
                if ip not in SLIRP_NET or str(ip) in (GATEWAY, DNS, "10.0.2.0", "10.0.2.255"):
                    raise BadParameter(f"bad parameter: interfaces[0].ip: {iface.ip} is not usable in user-mode "
                                       f"networking (its guest addresses are in {SLIRP_NET}; 10.0.2.15 by default)")
                address = str(ip)
        return GuestNIC(address, SLIRP_NET.prefixlen, GATEWAY, mtu)

    async def _monitor(self, lease: Lease, command: str) -> str:
        vm = lease.vm
        if vm is None or vm.qmp is None:
            raise HyperError(f"pod {lease.pod_id}: its VM has no QMP connection")
        reply = await vm.qmp.execute("human-monitor-command", {"command-line": command})
        return (reply or "").strip() if isinstance(reply, str) else ""

    async def _forward_add(self, lease: Lease, rule: PortRule) -> None:
        guest = "" if lease.nic.address == GUEST_ADDRESS else lease.nic.address
        reply = await self._monitor(
            lease, f"hostfwd_add {NETDEV_ID} {rule.protocol}:{self.port_address}:{rule.host_port}-"
                   f"{guest}:{rule.container_port}")
        if reply:
            # slirp could not bind it: someone took the port after we checked.
            raise Conflict(f"conflict: host port {rule.protocol}/{rule.host_port} is already in use on "
                           f"{self.port_address} ({reply})")

    async def _forward_remove(self, lease: Lease, rule: PortRule) -> None:
        reply = await self._monitor(
            lease, f"hostfwd_remove {NETDEV_ID} {rule.protocol}:{self.port_address}:{rule.host_port}")
        if reply and "removed" not in reply.lower():
            raise HyperError(f"hostfwd_remove {rule.key}: {reply}")
