"""The port-mapping routes: ``GET /pod/{id}/portmappings`` and ``PUT /pod/{id}/portmappings/{add|delete}``.

As hyperd v1.x (reference/hyperd.md §1.2): the GET answers ``{"portMappings": [...]}``; the PUTs take a JSON
array of PortMappings (``{"containerPort": "80", "hostPort": "8080", "protocol": "tcp"}``, ranges as
``"8000-8010"``) and answer 204. On a running pod they apply at once; on one that is not running they change
what it will get when it starts. Registered on :class:`hyperd.api.app.HyperAPI`'s Klein app when imported.
"""

from __future__ import annotations

from twisted.web.iweb import IRequest

from hyperd.api.app import HyperAPI, json_reply
from hyperd.api.params import json_body
from hyperd.errors import BadParameter
from hyperd.network.ports import parse_mappings

app = HyperAPI.app


@app.route("/pod/<string:pod_id>/portmappings", methods=["GET"])
async def portmappings_list(self, request: IRequest, pod_id: str) -> bytes:
    await self.daemon.ready()
    return json_reply(request, {"portMappings": self.daemon.network.port_mappings(pod_id)})


@app.route("/pod/<string:pod_id>/portmappings/<string:action>", methods=["PUT"])
async def portmappings_change(self, request: IRequest, pod_id: str, action: str) -> bytes:
    if action not in ("add", "delete"):
        raise BadParameter(f"bad parameter: only add or delete are supported, not {action!r}")
    await self.daemon.ready()
    mappings = parse_mappings(json_body(request, "port mappings"), "port mappings")
    if action == "add":
        await self.daemon.network.add_port_mappings(pod_id, mappings)
    else:
        await self.daemon.network.delete_port_mappings(pod_id, mappings)
    request.setResponseCode(204)
    return b""
