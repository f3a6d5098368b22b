"""The seams between hyperd's parts, as zope interfaces.

A second hypervisor, storage driver or network mode is a new class providing one of these, not an edit
across the tree.
"""

from zope.interface import Attribute, Interface


class IStateStore(Interface):
    """What must survive a daemon restart: pods, containers, VMs, images, allocations (hyperd/state.py)."""


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


class INetwork(Interface):
    """How a VM's NICs reach the world: user mode (slirp) or bridge + tap (hyperd/network/)."""
