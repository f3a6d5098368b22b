"""What both network modes share: a pod's address and host ports reserved, its guest NIC configured, its
port mappings applied, and all of it released on every path out.

The lifecycle the Daemon drives (hyperd/daemon.py):

- ``start()`` once, before recovery; ``recover(running, live_vms)`` after the VMs are reattached.
- ``prepare_vm(vm_id)`` before a VM's qemu starts: the qemu arguments of its NIC. A VM has its NIC from boot,
  so an idle VM can take any pod later (warm start). ``vm_died(vm_id, pod_id)`` when its qemu is gone.
- ``reserve(pod)`` when a pod starts, before any VM is booted for it: its address and host ports are taken
  (a host port in use is a Conflict, so nothing is booted for a pod that cannot start). ``attach(lease, vm)``
  then configures the guest NIC and routes and adds the port mappings, and returns the pod with the DNS
  settings the guest is to write. ``release_pod(pod_id, vm_kept)`` undoes all of it and never raises.
- ``port_mappings``/``add_port_mappings``/``delete_port_mappings`` for the portmappings routes.

Everything handed out (addresses, host ports, taps) is an allocation in the state store, owned by the pod
(or the VM), so that it is never handed out twice, survives a restart and is found again to be released.
A pod's port mappings are kept in its spec, with the host ports chosen for it, so a restarted daemon (and
``GET /pod/{id}/portmappings``) knows them. The backends (user.py, bridge.py) fill in the mode's parts.
"""

from __future__ import annotations

import ipaddress
import random
from typing import Any

import attrs
from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from hyperd.agent import codec
from hyperd.deferreds import locked
from hyperd.errors import BadParameter, Conflict, HyperError, NotFound
from hyperd.interfaces import INetwork
from hyperd.network import dns
from hyperd.network.ports import EPHEMERAL, Mapping, PortRule, host_port_free, set_spec_mappings
from hyperd.pod.spec import UserPod, parse_pod

__all__ = ["Network", "Lease", "GuestNIC", "PORT", "GUEST_DEVICE"]

log = Logger()

#: Allocation kinds in the state store.
PORT = "port"
#: The guest's one NIC (virtio-net, the first and only ethernet device).
GUEST_DEVICE = "eth0"
NETDEV_ID = "n0"


@attrs.frozen
class GuestNIC:
    """How the guest's NIC is set: its address with prefix, the default gateway, the MTU (0: leave it)."""

    address: str
    prefix: int
    gateway: str
    mtu: int = 0


@attrs.define
class Lease:
    """One pod's network while it starts and runs."""

    pod_id: str
    pod: UserPod
    nic: GuestNIC
    mappings: list[Mapping]
    vm: Any = None
    #: The rules whose forwarding is in place (added to qemu or iptables).
    forwarded: list[PortRule] = attrs.Factory(list)
    guest_configured: bool = False

    @property
    def rules(self) -> list[PortRule]:
        return [rule for m in self.mappings for rule in m.rules()]


@implementer(INetwork)
class Network:
    """The common part; ``mode`` and the ``_``-hooks come from a backend."""

    mode = "none"

    def __init__(self, config, reactor, state, host_dns: dns.HostDNS | None = None) -> None:
        self.config = config
        self.reactor = reactor
        self.state = state
        self._host_dns = host_dns
        self._leases: dict[str, Lease] = {}
        self._locks: dict[str, defer.DeferredLock] = {}
        self._random = random.Random()

    # --- hooks for the backends -------------------------------------------------------------------------

    #: The address host ports are probed on (and, in user mode, forwarded from).
    port_address = "0.0.0.0"
    #: The forwards live in qemu (user mode): they go with it, nothing to remove once it is dead.
    forwards_in_vm = False
    #: Where a host resolver on loopback is sent instead (None: dropped).
    dns_loopback: str | None = None

    async def start(self) -> None:
        """Bring up what the mode needs on the host (idempotent: it runs again after a restart)."""

    async def prepare_vm(self, vm_id: str) -> list[str]:
        """The qemu arguments of the VM's NIC, and whatever must exist before qemu starts."""
        raise NotImplementedError

    async def release_vm(self, vm_id: str) -> None:
        """Undo prepare_vm (the VM never started, or is gone). Never raises."""

    def _guest_nic(self, pod: UserPod) -> GuestNIC:
        """The pod's address: allocated (owner: the pod) or fixed. BadParameter/Conflict/HyperError."""
        raise NotImplementedError

    def _release_address(self, lease: Lease) -> None:
        pass

    async def _forward_add(self, lease: Lease, rule: PortRule) -> None:
        raise NotImplementedError

    async def _forward_remove(self, lease: Lease, rule: PortRule) -> None:
        raise NotImplementedError

    async def _restore_forwards(self, lease: Lease) -> None:
        """After a daemon restart: make the running pod's forwards exist again (idempotent)."""

    # --- pods ---------------------------------------------------------------------------------------------

    def _lock(self, pod_id: str) -> defer.DeferredLock:
        return self._locks.setdefault(pod_id, defer.DeferredLock())

    def host_dns(self) -> dns.HostDNS:
        return self._host_dns if self._host_dns is not None else dns.read_resolv_conf()

    #: The network from which a pod's own address can be reached (not only its port mappings); None when
    #: nothing reaches it directly (user mode).
    direct_network: ipaddress.IPv4Network | None = None

    def check(self, pod: UserPod) -> None:
        """What this network cannot give the pod, as a BadParameter (at create, and again at start).

        ``portmappingWhiteLists`` are not enforced (hyperd did it with iptables inside the VM); a pod whose
        lists would keep someone out who can get in here is refused rather than run open to everyone.
        """
        if len(pod.interfaces) > 1:
            raise BadParameter(f"bad parameter: interfaces: a pod has one network interface here, "
                               f"not {len(pod.interfaces)}")
        for i, service in enumerate(pod.services):
            if service.protocol != "tcp":
                raise BadParameter(f"bad parameter: services[{i}].protocol: only tcp services are supported "
                                   f"here, not {service.protocol}")
            if not service.hosts:
                raise BadParameter(f"bad parameter: services[{i}].hosts: a service needs at least one host")
            for what, ip in [("serviceIP", service.service_ip)] + [
                    (f"hosts[{j}].hostIP", h.host_ip) for j, h in enumerate(service.hosts)]:
                if ipaddress.ip_address(ip).version != 4:
                    raise BadParameter(f"bad parameter: services[{i}].{what}: {ip} is not an IPv4 address")
        external = [ipaddress.ip_network(n) for n in pod.whitelist_external]
        if external and not any(n.prefixlen == 0 for n in external):
            raise BadParameter("bad parameter: portmappingWhiteLists.externalNetworks: this hyperd cannot limit "
                               "which networks reach a pod's port mappings, and will not open them to all "
                               "instead; list 0.0.0.0/0 or remove the white lists")
        internal = [ipaddress.ip_network(n) for n in pod.whitelist_internal]
        direct = self.direct_network
        if internal and direct is not None and not any(
                n.version == direct.version and direct.subnet_of(n) for n in internal):
            raise BadParameter(f"bad parameter: portmappingWhiteLists.internalNetworks: a pod's address is "
                               f"reachable from {direct} here, which the list does not contain; add it or remove "
                               f"the white lists")

    def reserve(self, pod: UserPod) -> Lease:
        """Take the pod's address and host ports (nothing else happens yet). Raises with nothing held."""
        self.check(pod)
        self._release_allocations(pod.id)  # anything a crashed start left behind
        lease = Lease(pod.id, pod, self._guest_nic(pod), [])
        try:
            lease.mappings = self._reserve_ports(pod.id, [Mapping.from_spec(m) for m in pod.portmappings])
        except BaseException:
            self._release_address(lease)
            raise
        self._leases[pod.id] = lease
        return lease

    async def attach(self, lease: Lease, vm) -> UserPod:
        """Configure the guest's NIC and route and add the port mappings; the pod as the guest is to see
        it (DNS filled in). Raises after undoing its own part; ``release_pod`` releases the rest."""
        lease.vm = vm
        async with locked(self._lock(lease.pod_id)):
            await self._configure_guest(vm, lease.nic)
            lease.guest_configured = True
            for rule in lease.rules:
                await self._forward_add(lease, rule)
                lease.forwarded.append(rule)
            self._save_mappings(lease.pod_id, lease.mappings)
        return dns.pod_dns(lease.pod, self.host_dns(), self.dns_loopback)

    async def release_pod(self, pod_id: str, vm_kept: bool = False) -> None:
        """Undo everything of the pod's network; ``vm_kept``: its VM stays up for another pod, so its guest
        NIC is cleared too. Never raises (a stop must not fail on the network)."""
        lease = self._leases.pop(pod_id, None)
        if lease is not None:
            async with locked(self._lock(pod_id)):
                vm_alive = lease.vm is not None and not getattr(lease.vm, "dead", False)
                for rule in reversed(lease.forwarded):
                    if vm_alive or not self.forwards_in_vm:
                        try:
                            await self._forward_remove(lease, rule)
                        except Exception as e:
                            log.warn("{pod}: removing port mapping {rule}: {e}", pod=pod_id, rule=rule.key, e=e)
                lease.forwarded.clear()
                if vm_kept and vm_alive and lease.guest_configured:
                    try:
                        await lease.vm.agent.request_json(codec.DELETEINTERFACE, {"device": GUEST_DEVICE})
                    except Exception as e:
                        log.warn("{pod}: clearing the guest NIC: {e}", pod=pod_id, e=e)
                self._release_address(lease)
        self._release_allocations(pod_id)
        self._locks.pop(pod_id, None)

    def vm_died(self, vm_id: str, pod_id: str | None) -> None:
        """qemu is gone: its pod's network and the VM's NIC are released (in the background)."""
        def log_failure(f, what):
            log.warn("{what}: network release: {e}", what=what, e=f.getErrorMessage())

        if pod_id:
            defer.ensureDeferred(self.release_pod(pod_id)).addErrback(log_failure, pod_id)
        defer.ensureDeferred(self.release_vm(vm_id)).addErrback(log_failure, vm_id)

    def _release_allocations(self, owner: str) -> None:
        for kind in self._pod_kinds():
            for (k, key), held_by in self.state.allocations(kind).items():
                if held_by == owner:
                    self.state.release(k, key)

    def _pod_kinds(self) -> tuple[str, ...]:
        return (PORT,)

    async def recover(self, running: dict[str, tuple[Any, UserPod]], live_vms: set[str]) -> None:
        """After a restart: the pods still running get their leases back (and their forwards, if the mode
        keeps them outside qemu); allocations of pods and VMs that are gone are released."""
        for kind in self._pod_kinds():
            for (k, key), owner in self.state.allocations(kind).items():
                if owner not in running:
                    self.state.release(k, key)
        for pod_id, (vm, pod) in running.items():
            try:
                nic = self._recovered_nic(pod)
            except HyperError as e:
                log.warn("{pod}: network not recovered: {e}", pod=pod_id, e=e)
                continue
            mappings = [Mapping.from_spec(m) for m in pod.portmappings if m.host_port]
            lease = Lease(pod_id, pod, nic, mappings, vm=vm, guest_configured=True)
            for rule in lease.rules:
                self.state.allocate(PORT, rule.key, pod_id)
            lease.forwarded = list(lease.rules)
            self._leases[pod_id] = lease
            try:
                await self._restore_forwards(lease)
            except Exception as e:
                log.warn("{pod}: port mappings not restored: {e}", pod=pod_id, e=e)

    def _recovered_nic(self, pod: UserPod) -> GuestNIC:
        return self._guest_nic(pod)

    # --- guest ----------------------------------------------------------------------------------------------

    async def _configure_guest(self, vm, nic: GuestNIC) -> None:
        iface = {"device": GUEST_DEVICE, "newDeviceName": GUEST_DEVICE,
                 "ipAddresses": [{"ipAddress": nic.address, "netMask": str(nic.prefix)}]}
        if nic.mtu:
            iface["mtu"] = nic.mtu
        routes = {"routes": [{"dest": "0.0.0.0/0", "gateway": nic.gateway, "device": GUEST_DEVICE}]}
        # The route goes out right behind the interface, not a round trip later (the agent runs them in order).
        setup = vm.agent.request_json(codec.SETUPINTERFACE, iface)
        route = vm.agent.request_json(codec.SETUPROUTE, routes)
        try:
            await setup
        except Exception as e:
            route.addErrback(lambda _: None)  # it followed a failed SETUPINTERFACE: its outcome means nothing
            if "exists" not in str(e):
                raise
            # The VM served a pod whose address was not cleared (a daemon that died mid-stop): clear, retry.
            await vm.agent.request_json(codec.DELETEINTERFACE, {"device": GUEST_DEVICE})
            await vm.agent.request_json(codec.SETUPINTERFACE, iface)
            await vm.agent.request_json(codec.SETUPROUTE, routes)
            return
        await route

    # --- port mappings ------------------------------------------------------------------------------------

    def _reserve_ports(self, pod_id: str, mappings: list[Mapping]) -> list[Mapping]:
        """Take the host ports of ``mappings`` for the pod (choosing them where not given); returns the
        mappings with their host ports. Raises Conflict naming the port, with nothing taken."""
        taken: list[str] = []
        out: list[Mapping] = []
        try:
            for m in mappings:
                if m.host is None:
                    m = attrs.evolve(m, host=self._free_range(m.protocol, m.size))
                for rule in m.rules():
                    self._take_port(pod_id, rule)
                    taken.append(rule.key)
                out.append(m)
        except BaseException:
            for key in taken:
                self.state.release(PORT, key)
            raise
        return out

    def _take_port(self, pod_id: str, rule: PortRule) -> None:
        owner = self.state.allocations(PORT).get((PORT, rule.key))
        if owner is not None:
            if owner == pod_id:
                raise Conflict(f"conflict: host port {rule.protocol}/{rule.host_port} is mapped twice in pod {pod_id}")
            raise Conflict(f"conflict: host port {rule.protocol}/{rule.host_port} is already mapped by pod {owner}")
        if not host_port_free(self.port_address, rule.protocol, rule.host_port):
            raise Conflict(f"conflict: host port {rule.protocol}/{rule.host_port} is already in use on "
                           f"{self.port_address}")
        self.state.allocate(PORT, rule.key, pod_id)

    def _free_range(self, protocol: str, size: int) -> tuple[int, int]:
        low, high = EPHEMERAL
        held = {key for (_, key) in self.state.allocations(PORT)}
        span = high - low + 1 - (size - 1)
        start = self._random.randrange(span)
        for i in range(span):
            first = low + (start + i) % span
            ports = range(first, first + size)
            if any(f"{protocol}:{p}" in held for p in ports):
                continue
            if all(host_port_free(self.port_address, protocol, p) for p in ports):
                return (first, first + size - 1)
        raise HyperError(f"no {size} free host port(s) for {protocol} in {low}-{high}")

    def _save_mappings(self, pod_id: str, mappings: list[Mapping]) -> None:
        record = self.state.get_pod(pod_id)
        if record is not None:
            self.state.update_pod(pod_id, spec=set_spec_mappings(record.spec, mappings))

    def _pod_id(self, pod: str) -> str:
        record = self.state.get_pod(pod) or self.state.get_pod_by_name(pod)
        if record is None:
            raise NotFound(f"no such pod: {pod}")
        return record.pod_id

    def port_mappings(self, pod: str) -> list[dict[str, str]]:
        """hyperd's GET /pod/{id}/portmappings: the mappings in effect (running) or declared."""
        pod_id = self._pod_id(pod)
        lease = self._leases.get(pod_id)
        if lease is not None:
            return [m.to_json() for m in lease.mappings]
        spec = parse_pod(self.state.get_pod(pod_id).spec, pod_id=pod_id)
        return [Mapping.from_spec(m).to_json() for m in spec.portmappings]

    async def add_port_mappings(self, pod: str, mappings: list[Mapping]) -> None:
        """Add mappings to a pod: applied at once if it runs, kept in its spec either way."""
        pod_id = self._pod_id(pod)
        async with locked(self._lock(pod_id)):
            lease = self._leases.get(pod_id)
            if lease is None:
                spec = parse_pod(self.state.get_pod(pod_id).spec, pod_id=pod_id)
                self._save_mappings(pod_id, [Mapping.from_spec(m) for m in spec.portmappings] + mappings)
                return
            added = self._reserve_ports(pod_id, mappings)
            done: list[PortRule] = []
            try:
                if lease.vm is not None:
                    for m in added:
                        for rule in m.rules():
                            await self._forward_add(lease, rule)
                            done.append(rule)
            except BaseException:
                for rule in done:
                    try:
                        await self._forward_remove(lease, rule)
                    except Exception as e:
                        log.warn("{pod}: undo {rule}: {e}", pod=pod_id, rule=rule.key, e=e)
                for m in added:
                    for rule in m.rules():
                        self.state.release(PORT, rule.key)
                raise
            lease.forwarded += done
            lease.mappings += added
            self._save_mappings(pod_id, lease.mappings)

    async def delete_port_mappings(self, pod: str, mappings: list[Mapping]) -> None:
        """Remove mappings (matched by protocol and container ports, and host ports when given)."""
        pod_id = self._pod_id(pod)
        async with locked(self._lock(pod_id)):
            lease = self._leases.get(pod_id)
            if lease is not None:
                current = list(lease.mappings)
            else:
                spec = parse_pod(self.state.get_pod(pod_id).spec, pod_id=pod_id)
                current = [Mapping.from_spec(m) for m in spec.portmappings]
            remove = []
            for wanted in mappings:
                found = [m for m in current if m.matches(wanted) and m not in remove]
                if not found:
                    raise NotFound(f"pod {pod_id} has no port mapping {wanted.protocol} "
                                   f"{wanted.to_json()['hostPort'] or '*'}->{wanted.to_json()['containerPort']}")
                remove.append(found[0])
            keep = [m for m in current if m not in remove]
            if lease is not None:
                for m in remove:
                    for rule in m.rules():
                        if rule in lease.forwarded:
                            await self._forward_remove(lease, rule)
                            lease.forwarded.remove(rule)
                        self.state.release(PORT, rule.key)
                lease.mappings = keep
            self._save_mappings(pod_id, keep)

    def pod_ips(self, pod_id: str) -> list[str]:
        lease = self._leases.get(pod_id)
        return [lease.nic.address] if lease is not None else []
