"""iptables for bridge mode: hyperd's MASQUERADE, its ``HYPER`` chains, and one DNAT per mapped port
(reference/hyperd.md §7).

Each rule is added only when ``iptables -C`` says it is missing, so setting up again after a restart changes
nothing; the ``HYPER`` chains are flushed at start and refilled for the pods still running, so a rule of a
pod that ended while the daemon was down does not linger. ``iptables`` runs as a child process through the
reactor (never blocking it), with ``-w`` so that it waits for the xtables lock rather than failing.
"""

from __future__ import annotations

from twisted.internet import utils

from hyperd.errors import HyperError

__all__ = ["IPTables", "IPTablesError"]

CHAIN = "HYPER"
IPTABLES = "iptables"


class IPTablesError(HyperError):
    pass


class IPTables:
    def __init__(self, reactor, binary: str = IPTABLES) -> None:
        self.reactor = reactor
        self.binary = binary

    async def run(self, *args: str, check: bool = True) -> int:
        out, err, code = await utils.getProcessOutputAndValue(
            self.binary, ("-w", *args), env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}, reactor=self.reactor)
        if code != 0 and check:
            raise IPTablesError(f"iptables {' '.join(args)}: {(err or out).decode(errors='replace').strip()}")
        return code

    async def ensure_chain(self, table: str, chain: str) -> None:
        if await self.run("-t", table, "-n", "-L", chain, check=False) != 0:
            await self.run("-t", table, "-N", chain)

    async def ensure(self, table: str, chain: str, *rule: str, insert: bool = False) -> None:
        """Add ``rule`` to ``chain`` unless it is there already."""
        if await self.run("-t", table, "-C", chain, *rule, check=False) == 0:
            return
        await self.run("-t", table, "-I" if insert else "-A", chain, *rule)

    async def delete(self, table: str, chain: str, *rule: str) -> None:
        """Delete every copy of ``rule`` from ``chain`` (none: nothing to do)."""
        while await self.run("-t", table, "-C", chain, *rule, check=False) == 0:
            await self.run("-t", table, "-D", chain, *rule)

    async def setup(self, bridge: str, subnet: str) -> None:
        """hyperd's base rules: masquerade the pods' traffic out, and jump to the HYPER chains."""
        await self.ensure("nat", "POSTROUTING", "-s", subnet, "!", "-o", bridge, "-j", "MASQUERADE", insert=True)
        await self.ensure_chain("nat", CHAIN)
        await self.ensure("nat", "PREROUTING", "-m", "addrtype", "--dst-type", "LOCAL", "-j", CHAIN)
        await self.ensure("nat", "OUTPUT", "!", "-d", "127.0.0.0/8", "-m", "addrtype", "--dst-type", "LOCAL",
                          "-j", CHAIN)
        await self.ensure_chain("filter", CHAIN)
        await self.ensure("filter", "FORWARD", "-o", bridge, "-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED",
                          "-j", "ACCEPT", insert=True)
        await self.ensure("filter", "FORWARD", "-i", bridge, "-j", "ACCEPT")
        await self.ensure("filter", "FORWARD", "-o", bridge, "-j", CHAIN)
        await self.run("-t", "nat", "-F", CHAIN)
        await self.run("-t", "filter", "-F", CHAIN)

    @staticmethod
    def dnat_rule(protocol: str, host_port: int, address: str, container_port: int) -> tuple[str, ...]:
        return ("-p", protocol, "-m", protocol, "--dport", str(host_port), "-j", "DNAT",
                "--to-destination", f"{address}:{container_port}")

    @staticmethod
    def accept_rule(protocol: str, address: str, container_port: int) -> tuple[str, ...]:
        return ("-d", f"{address}/32", "-p", protocol, "-m", protocol, "--dport", str(container_port), "-j", "ACCEPT")

    async def add_mapping(self, protocol: str, host_port: int, address: str, container_port: int) -> None:
        await self.ensure("nat", CHAIN, *self.dnat_rule(protocol, host_port, address, container_port))
        await self.ensure("filter", CHAIN, *self.accept_rule(protocol, address, container_port))

    async def remove_mapping(self, protocol: str, host_port: int, address: str, container_port: int) -> None:
        await self.delete("nat", CHAIN, *self.dnat_rule(protocol, host_port, address, container_port))
        await self.delete("filter", CHAIN, *self.accept_rule(protocol, address, container_port))
