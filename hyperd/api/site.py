"""The HTTP site in front of the Klein app: the ``/vX.Y[.Z]/`` prefix and a request that tolerates no Host.

Every route answers both as ``/path`` and ``/v1.17/path`` (hyperd's clients send their own version, e.g.
``/v0.8.0/``): :class:`VersionedRoot` strips a first segment that looks like a version, remembers it on the
request (``request.api_version``), and hands the rest of the path to Klein. Any other path goes to Klein
unchanged.
"""

from __future__ import annotations

import re
from typing import Any

from twisted.web.resource import IResource, Resource
from twisted.web.server import Request, Site

from hyperd.api.app import HyperAPI

__all__ = ["HyperRequest", "VersionedRoot", "make_site"]

_VERSION = re.compile(rb"v[0-9]+(\.[0-9]+)*")


class HyperRequest(Request):
    """A Request for a UNIX socket, where the peer has no host name to fall back on.

    Twisted falls back to ``getHost().host`` without a Host header, which a UNIXAddress lacks (a 500 from
    deep inside Klein). HTTP/1.0 clients and ``curl -H 'Host:'`` send none.
    """

    api_version: str | None = None

    def getRequestHostname(self) -> bytes:
        if self.getHeader(b"host") is None:
            return b"localhost"
        return super().getRequestHostname()


class VersionedRoot(Resource):
    """Routes ``/v<version>/<path>`` and ``/<path>`` to the same Klein resource."""

    def __init__(self, api: IResource) -> None:
        super().__init__()
        self._api = api

    def getChildWithDefault(self, name: bytes, request: Any) -> IResource:
        if _VERSION.fullmatch(name):
            request.api_version = name[1:].decode("ascii")
        else:
            # not a version: undo this traversal step so Klein sees the whole path
            request.prepath.pop()
            request.postpath.insert(0, name)
        return self._api

    def render(self, request: Any) -> Any:
        return self._api.render(request)


def make_site(daemon: Any) -> Site:
    """The Site serving hyperd's API for ``daemon``."""
    site = Site(VersionedRoot(HyperAPI(daemon).resource()), requestFactory=HyperRequest)
    site.displayTracebacks = False
    site.noisy = False
    return site
