"""The parts provide the interfaces that are the seams between them (hyperd/interfaces.py)."""

from zope.interface.verify import verifyClass

from hyperd.agent.client import AgentClient
from hyperd.image.store import ImageStore
from hyperd.interfaces import IVM, IAgent, IImageStore, INetwork, IStateStore
from hyperd.network.base import Network
from hyperd.state import StateStore
from hyperd.vm.vm import VM


def test_every_part_provides_its_interface():
    for cls, iface in ((VM, IVM), (AgentClient, IAgent), (ImageStore, IImageStore), (Network, INetwork),
                       (StateStore, IStateStore)):
        assert verifyClass(iface, cls)
