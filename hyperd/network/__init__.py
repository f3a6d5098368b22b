"""hyperd.network: how a pod's VM reaches the world, in one of two modes chosen by ``Network=`` in the config.

- ``user`` (default; hyperd/network/user.py): QEMU's user-mode network per VM, port mappings as slirp host
  forwards on 127.0.0.1 added and removed at runtime over QMP.
- ``bridge`` (hyperd/network/bridge.py): bridge ``hyper0`` with ``BridgeIP``, a tap per VM, an address per pod,
  iptables MASQUERADE and DNAT (unless ``DisableIptables``).

:func:`make_network` builds the one the config names; the Daemon drives it (see hyperd/network/base.py for
the lifecycle). docs/network.md is the user's guide.
"""

from __future__ import annotations

from hyperd.network.base import Lease, Network
from hyperd.network.ports import Mapping, parse_mappings, parse_publish

__all__ = ["make_network", "Network", "Lease", "Mapping", "parse_mappings", "parse_publish"]


def make_network(config, reactor, state) -> Network:
    """The Network of ``config.network``. Port mappings in user mode listen on ``config.port_host_ip`` when
    the config has one, else on 127.0.0.1."""
    if config.network == "bridge":
        from hyperd.network.bridge import BridgeNetwork

        return BridgeNetwork(config, reactor, state)
    from hyperd.network.user import UserNetwork

    return UserNetwork(config, reactor, state, host_ip=config.port_host_ip)
