"""Bridge mode: bridge ``hyper0`` (created or adopted), one tap per VM on it, an address per pod from the
bridge's subnet, and iptables for the way out (MASQUERADE) and in (DNAT per mapped port) — as hyperd did.

The tap is made before qemu starts (``-netdev tap,ifname=TAP,script=no,downscript=no``) and deleted when the
VM is gone; its name is ``vm-XXXXXXXXXX`` plus the NIC's index (``NicName`` in runv). A pod's address is the
lowest free host of the subnet (or the one its ``interfaces[0].ip`` asks for), an allocation owned by the pod,
released when it goes; the guest gets it with the bridge's address as its gateway. Port mappings are DNAT
rules in the nat ``HYPER`` chain, which PREROUTING (from outside) and OUTPUT (from this host, except to
127.0.0.0/8) jump to: a mapped port is reached on any of the host's addresses but loopback.
``DisableIptables`` leaves iptables alone (no masquerade, and port mappings are refused).
"""

from __future__ import annotations

import ipaddress
import secrets

from hyperd.errors import BadParameter, Conflict, HyperError
from hyperd.network import netlink
from hyperd.network.base import NETDEV_ID, PORT, GuestNIC, Lease, Network
from hyperd.network.iptables import IPTables
from hyperd.network.ports import PortRule
from hyperd.pod.spec import UserPod

__all__ = ["BridgeNetwork", "IP", "TAP", "tap_name", "random_mac"]

IP = "ip"
TAP = "tap"


class NetworkExhausted(HyperError):
    status = 503


def tap_name(vm_id: str, index: int = 0) -> str:
    return f"{vm_id[:13]}{index}"[:15]


def random_mac() -> str:
    """``52:54:xx:xx:xx:xx`` as hyperd's, locally administered and unicast by construction."""
    return "52:54:" + ":".join(f"{b:02x}" for b in secrets.token_bytes(4))


class BridgeNetwork(Network):
    mode = "bridge"

    def __init__(self, config, reactor, state, pool: netlink.NetlinkPool | None = None, iptables=None,
                 **kwargs) -> None:
        super().__init__(config, reactor, state, **kwargs)
        self.bridge = config.bridge
        self.bridge_address, self.subnet = netlink.bridge_network(config.bridge_ip)
        self.direct_network = self.subnet  # the host and the other pods on the bridge
        self.use_iptables = not config.disable_iptables
        self.pool = pool or netlink.NetlinkPool(reactor)
        self.iptables = iptables or IPTables(reactor)

    # --- host ---------------------------------------------------------------------------------------------

    async def start(self) -> None:
        await self.pool.run(netlink.ensure_bridge, self.bridge, self.bridge_address, self.subnet.prefixlen)
        await self.pool.run(netlink.enable_forwarding)
        if self.use_iptables:
            await self.iptables.setup(self.bridge, str(self.subnet))

    async def prepare_vm(self, vm_id: str) -> list[str]:
        tap = tap_name(vm_id)
        self.state.allocate(TAP, tap, vm_id)
        try:
            await self.pool.run(netlink.add_tap, tap, self.bridge)
        except BaseException:
            self.state.release(TAP, tap)
            raise
        return ["-netdev", f"tap,id={NETDEV_ID},ifname={tap},script=no,downscript=no",
                "-device", f"virtio-net-pci,netdev={NETDEV_ID},mac={random_mac()}"]

    async def release_vm(self, vm_id: str) -> None:
        for (_, tap), owner in self.state.allocations(TAP).items():
            if owner == vm_id:
                try:
                    await self.pool.run(netlink.delete_link, tap)
                finally:
                    self.state.release(TAP, tap)

    # --- addresses ------------------------------------------------------------------------------------------

    def _pod_kinds(self) -> tuple[str, ...]:
        return (PORT, IP)

    def _guest_nic(self, pod: UserPod) -> GuestNIC:
        mtu, wanted = 0, None
        if pod.interfaces:
            iface = pod.interfaces[0]
            mtu = iface.mtu
            if iface.bridge and iface.bridge != self.bridge:
                raise BadParameter(f"bad parameter: interfaces[0].bridge: only the bridge {self.bridge} is "
                                   f"served here, not {iface.bridge}")
            if iface.ip:
                wanted = ipaddress.ip_interface(iface.ip).ip
                if wanted not in self.subnet or wanted in (self.subnet.network_address,
                                                           self.subnet.broadcast_address) \
                        or str(wanted) == self.bridge_address:
                    raise BadParameter(f"bad parameter: interfaces[0].ip: {iface.ip} is not a free host "
                                       f"address of the bridge's subnet {self.subnet}")
        address = self._allocate_address(pod.id, wanted)
        return GuestNIC(address, self.subnet.prefixlen, self.bridge_address, mtu)

    def _allocate_address(self, pod_id: str, wanted=None) -> str:
        held = self.state.allocations(IP)
        if wanted is not None:
            owner = held.get((IP, str(wanted)))
            if owner not in (None, pod_id):
                raise Conflict(f"conflict: address {wanted} is already held by pod {owner}")
            self.state.allocate(IP, str(wanted), pod_id)
            return str(wanted)
        taken = {key for (_, key) in held}
        for host in self.subnet.hosts():
            address = str(host)
            if address == self.bridge_address or address in taken:
                continue
            self.state.allocate(IP, address, pod_id)
            return address
        raise NetworkExhausted(f"no free address left in {self.subnet} (bridge {self.bridge}): "
                               f"{len(taken)} pods hold one each")

    def _release_address(self, lease: Lease) -> None:
        if self.state.allocations(IP).get((IP, lease.nic.address)) == lease.pod_id:
            self.state.release(IP, lease.nic.address)

    def _recovered_nic(self, pod: UserPod) -> GuestNIC:
        for (_, address), owner in self.state.allocations(IP).items():
            if owner == pod.id:
                mtu = pod.interfaces[0].mtu if pod.interfaces else 0
                return GuestNIC(address, self.subnet.prefixlen, self.bridge_address, mtu)
        raise HyperError(f"pod {pod.id} holds no address")

    async def recover(self, running, live_vms) -> None:
        await super().recover(running, live_vms)
        for owner in set(self.state.allocations(TAP).values()) - set(live_vms):
            await self.release_vm(owner)

    # --- port mappings ----------------------------------------------------------------------------------------

    def _reserve_ports(self, pod_id, mappings):
        if mappings and not self.use_iptables:
            raise BadParameter("bad parameter: portmappings need iptables, and DisableIptables is set")
        return super()._reserve_ports(pod_id, mappings)

    async def _forward_add(self, lease: Lease, rule: PortRule) -> None:
        await self.iptables.add_mapping(rule.protocol, rule.host_port, lease.nic.address, rule.container_port)

    async def _forward_remove(self, lease: Lease, rule: PortRule) -> None:
        await self.iptables.delete("nat", "HYPER", *self.iptables.dnat_rule(
            rule.protocol, rule.host_port, lease.nic.address, rule.container_port))
        # The ACCEPT is per container port: it stays while another mapping of the pod still needs it.
        others = [r for r in lease.forwarded if r != rule and (r.protocol, r.container_port)
                  == (rule.protocol, rule.container_port)]
        if not others:
            await self.iptables.delete("filter", "HYPER", *self.iptables.accept_rule(
                rule.protocol, lease.nic.address, rule.container_port))

    async def _restore_forwards(self, lease: Lease) -> None:
        if self.use_iptables:
            for rule in lease.forwarded:
                await self._forward_add(lease, rule)
