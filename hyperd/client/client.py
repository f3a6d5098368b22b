"""An asynchronous client for hyperd's API: treq over the daemon's UNIX socket.

``HyperClient(reactor, "/var/run/hyper.sock")`` has one method per route; each returns the decoded reply
or raises :class:`HyperClientError` carrying the server's status and message. Call :meth:`close` when done
(it closes the pooled connections).
"""

from __future__ import annotations

import json
import os
from typing import Any
from urllib.parse import urlencode

import attrs
import treq
from treq.client import HTTPClient
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.error import ConnectError
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from hyperd import API_VERSION, __version__

__all__ = ["HyperClient", "HyperClientError", "DEFAULT_SOCKET_PATH", "parse_host"]

DEFAULT_SOCKET_PATH = "/var/run/hyper.sock"


class HyperClientError(Exception):
    """The daemon refused or failed a request (``status`` is the HTTP status; 0: no daemon reached)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(status, message)
        self.status = status
        self.message = message

    def __str__(self) -> str:
        return self.message


def parse_host(host: str | None) -> str:
    """``-H unix:///path`` (or a bare path) → the socket path."""
    if not host:
        return DEFAULT_SOCKET_PATH
    if host.startswith("unix://"):
        host = host[len("unix://"):]
    if not host.startswith("/"):
        raise ValueError(f"unsupported host {host!r}: use unix:///path/to/hyper.sock")
    return host


@implementer(IAgentEndpointFactory)
@attrs.frozen
class _UNIXEndpointFactory:
    reactor: Any
    path: str

    def endpointForURI(self, uri: Any) -> UNIXClientEndpoint:
        return UNIXClientEndpoint(self.reactor, self.path)


class HyperClient:
    """hyperd's API, one method per route."""

    def __init__(self, reactor: Any, socket_path: str = DEFAULT_SOCKET_PATH) -> None:
        self.reactor = reactor
        self.socket_path = socket_path
        self._pool = HTTPConnectionPool(reactor, persistent=True)
        self._pool.retryAutomatically = False  # a POST must not be sent twice
        agent = Agent.usingEndpointFactory(reactor, _UNIXEndpointFactory(reactor, socket_path), pool=self._pool)
        self._http = HTTPClient(agent)

    async def close(self) -> None:
        await self._pool.closeCachedConnections()

    # --- transport --------------------------------------------------------------------------------------

    def _url(self, path: str, params: dict[str, Any] | None = None) -> str:
        query = ""
        if params:
            clean = {k: v for k, v in params.items() if v is not None}
            if clean:
                query = "?" + urlencode(clean)
        return f"http://hyperd/v{API_VERSION}{path}{query}"

    async def request(self, method: str, path: str, params: dict[str, Any] | None = None,
                      body: Any = None) -> tuple[int, bytes]:
        """One request; returns (status, body) for a 2xx status, raises HyperClientError otherwise."""
        headers = {"Accept": ["application/json"], "User-Agent": [f"hyperd-client/{__version__}"]}
        kwargs: dict[str, Any] = {}
        if body is not None:
            headers["Content-Type"] = ["application/json"]
            kwargs["data"] = json.dumps(body).encode("utf-8")
        try:
            response = await self._http.request(method, self._url(path, params), headers=headers, **kwargs)
            content = await treq.content(response)
        except ConnectError as e:
            reason = os.strerror(e.osError) if isinstance(e.osError, int) else (e.args[0] if e.args else str(e))
            raise HyperClientError(0, f"cannot connect to hyperd at {self.socket_path}: {reason}") from None
        if not 200 <= response.code < 300:
            raise HyperClientError(response.code, _error_message(content, response.code))
        return response.code, content

    async def get_json(self, method: str, path: str, params: dict[str, Any] | None = None,
                       body: Any = None) -> Any:
        _, content = await self.request(method, path, params, body)
        try:
            return json.loads(content) if content.strip() else None
        except ValueError:
            raise HyperClientError(0, f"hyperd sent a reply that is not JSON: {content[:80]!r}") from None

    # --- system -----------------------------------------------------------------------------------------

    async def ping(self) -> str:
        _, content = await self.request("GET", "/_ping")
        return content.decode("utf-8", "replace")

    async def info(self) -> dict[str, Any]:
        return await self.get_json("GET", "/info")

    async def version(self) -> dict[str, Any]:
        return await self.get_json("GET", "/version")

    async def list(self, item: str = "pod", pod: str | None = None, vm: str | None = None) -> list[str]:
        """hyperd's colon-joined strings for pods, containers or VMs."""
        reply = await self.get_json("GET", "/list", {"item": item, "pod": pod, "vm": vm})
        key = {"pod": "podData", "container": "cData", "vm": "vmData"}.get(item, "")
        return list(reply.get(key) or [])

    # --- VMs --------------------------------------------------------------------------------------------

    async def create_vm(self, cpu: int = 1, mem: int = 128, wait: bool = True) -> str:
        reply = await self.get_json("POST", "/vm/create",
                                    {"cpu": cpu, "mem": mem, "async": None if wait else "yes"})
        return reply["ID"]

    async def kill_vm(self, vm_id: str) -> dict[str, Any]:
        return await self.get_json("DELETE", "/vm", {"vm": vm_id})

    # --- pods -------------------------------------------------------------------------------------------

    async def create_pod(self, spec: dict[str, Any], seed: bool = False) -> str:
        """Create a pod from a UserPod spec: as the JSON body (v1), or as ``podArgs`` (the seed API)."""
        if seed:
            reply = await self.get_json("POST", "/pod/create", {"podArgs": json.dumps(spec)})
        else:
            reply = await self.get_json("POST", "/pod/create", body=spec)
        return reply["ID"]

    async def start_pod(self, pod_id: str, vm_id: str | None = None) -> dict[str, Any]:
        return await self.get_json("POST", "/pod/start", {"podId": pod_id, "vmId": vm_id})

    async def stop_pod(self, pod_id: str, stop_vm: bool = True) -> dict[str, Any]:
        return await self.get_json("POST", "/pod/stop", {"podId": pod_id, "stopVm": "yes" if stop_vm else "no"})

    async def remove_pod(self, pod_id: str) -> dict[str, Any]:
        return await self.get_json("DELETE", "/pod", {"podId": pod_id})


def _error_message(content: bytes, status: int) -> str:
    text = content.decode("utf-8", "replace").strip()
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if isinstance(value, dict) and isinstance(value.get("message"), str):
        return value["message"]
    return text or f"HTTP status {status}"
