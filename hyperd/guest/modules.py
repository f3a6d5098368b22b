"""Which kernel modules the guest loads, in dependency order (checked with ``modinfo -F depends``).

Shared by the initrd builder (host) and the guest's PID 1: the builder copies them to ``/lib/modules/<name>.ko``.
"""

#: Loaded before READY: enough to reach the virtio-serial ports.
SERIAL = (
    "virtio_ring",
    "virtio",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "virtio_console",
)

#: Loaded after READY while the agent is idle, and at once by any command that needs them. virtio_rng comes
#: first so that getrandom() in containers does not stall on the crng; STARTPOD waits for the modules up
#: to POD_NEEDS (9p, overlay), not for the network ones after it.
DEFERRED = (
    "virtio_rng",
    "9pnet",
    "9pnet_virtio",
    "netfs",
    "fscache",
    "9p",
    "overlay",
    "failover",
    "net_failover",
    "virtio_net",
)

POD_NEEDS = "overlay"
NIC_NEEDS = "virtio_net"

ALL = SERIAL + DEFERRED

#: Where the guest finds them.
MODULE_DIR = "/lib/modules"
