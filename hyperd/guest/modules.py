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
#: first so that getrandom() in containers does not stall on the crng; then the NIC's, which SETUPINTERFACE
#: (the first command of a pod) waits for, then the 9p stack and overlay, which STARTPOD waits for: the
#: round trips between the host's commands are then spent loading the next module.
DEFERRED = (
    "virtio_rng",
    "failover",
    "net_failover",
    "virtio_net",
    "9pnet",
    "9pnet_virtio",
    "netfs",
    "fscache",
    "9p",
    "overlay",
)

POD_NEEDS = "overlay"
NIC_NEEDS = "virtio_net"

ALL = SERIAL + DEFERRED

#: Where the guest finds them.
MODULE_DIR = "/lib/modules"
