"""The seams between hyperd's parts, as zope interfaces.

A second hypervisor, storage driver or network mode is a new class providing one of these, not an edit
across the tree.
"""

from zope.interface import Attribute, Interface


class IStateStore(Interface):
    """What must survive a daemon restart: pods, containers, VMs, images, allocations (hyperd/state.py)."""

    def transaction():
        """A context manager: the writes inside it are committed together, or not at all."""


class IVM(Interface):
    """One running virtual machine with our agent inside it (hyperd/vm/)."""

    vm_id = Attribute("The VM's id, vm-XXXXXXXXXX.")
    agent = Attribute("The IAgent speaking hyperstart's protocol to the guest.")

    def stop():
        """Stop the VM, escalating DESTROYPOD -> QMP quit -> SIGTERM -> SIGKILL. Returns a Deferred."""

    def when_dead():
        """A Deferred that fires with the reason (a str) once the VM's qemu is gone, whoever ended it."""


class IAgent(Interface):
    """The host side of hyperstart's control channel (hyperd/agent/)."""

    def request(code, payload=b""):
        """Send one command; a Deferred firing with the ACK payload, or failing with AgentError on ERROR."""


class IImageStore(Interface):
    """Images by reference, unpacked into read-only rootfs directories (hyperd/image/)."""

    def lookup(ref):
        """The image named ``ref`` (a reference or an id prefix); NotFound otherwise."""

    def rootfs_dir(image_id):
        """The host directory holding the image's root filesystem, shared read-only into VMs."""


class INetwork(Interface):
    """How a VM's NICs reach the world: user mode (slirp) or bridge + tap (hyperd/network/)."""

    def start():
        """Prepare the host side (a bridge, iptables chains); a Deferred."""

    def prepare_vm(vm_id):
        """The qemu arguments of the VM's NIC, created before qemu starts; a Deferred."""

    def release_vm(vm_id):
        """Undo ``prepare_vm`` for a VM that is gone; a Deferred."""

    def reserve(pod):
        """Reserve the pod's address and host ports before any VM boots for it; a Lease, or Conflict."""

    def attach(lease, vm):
        """Configure the guest NIC and apply the port mappings; a Deferred firing with the pod spec as
        started (host ports filled in)."""

    def release_pod(pod_id, vm_kept=False):
        """Give back everything the pod holds; a Deferred."""

    def vm_died(vm_id, pod_id):
        """A VM is gone without a stop: release what it and its pod held."""

    def recover(running, live_vms):
        """After a daemon restart: keep what running pods hold, release the rest; a Deferred."""
