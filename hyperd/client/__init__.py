"""hyperd's client side: :class:`HyperClient` (treq over the UNIX socket) and the ``hyperctl`` CLI."""

from hyperd.client.client import DEFAULT_SOCKET_PATH, HyperClient, HyperClientError

__all__ = ["HyperClient", "HyperClientError", "DEFAULT_SOCKET_PATH"]
