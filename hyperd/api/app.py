"""hyperd's REST API as a Klein app: routes, parameter checks, replies, and the one error mapping.

The API knows HTTP only. It parses and checks parameters (a malformed one is a 400 naming it), calls the
:class:`~hyperd.daemon.Daemon`, and formats what comes back the way hyperd did: JSON objects with sorted keys
and ``{"ID", "Code", "Cause"}`` for mutations. Range checks and everything about VMs and pods live in the
Daemon.

Errors are mapped to statuses in :meth:`HyperAPI.domain_error` and its siblings, nowhere else: a
:class:`~hyperd.errors.HyperError` carries its status; an unknown route is 404, a wrong method 405, anything
unexpected 500 (logged with its traceback). The body is ``text/plain`` as hyperd wrote it, or
``{"message": ...}`` when the request's ``Accept`` asks for JSON. Never an HTML page.
"""

from __future__ import annotations

import json
from typing import Any

from klein import Klein
from twisted.internet.defer import CancelledError
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from werkzeug.exceptions import MethodNotAllowed
from werkzeug.exceptions import NotFound as RouteNotFound

from hyperd.api.params import arg, bool_arg, int_arg, json_arg, json_body
from hyperd.daemon import LIST_ITEMS
from hyperd.errors import BadParameter, HyperError
from hyperd.schema import JSONObject

__all__ = ["HyperAPI", "json_reply", "error_reply"]


def wants_json(request: IRequest) -> bool:
    accept = request.getHeader(b"accept") or b""
    return b"json" in accept.lower()


def _reply(request: IRequest, body: bytes, content_type: bytes, code: int) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", content_type)
    # a length, not chunked encoding: what hyperd's Go server sent for small replies, simplest for clients
    request.setHeader(b"content-length", b"%d" % len(body))
    return body


def json_reply(request: IRequest, value: Any, code: int = 200) -> bytes:
    return _reply(request, json.dumps(value, sort_keys=True).encode("utf-8") + b"\n", b"application/json", code)


def text_reply(request: IRequest, text: str, code: int = 200) -> bytes:
    return _reply(request, text.encode("utf-8"), b"text/plain; charset=utf-8", code)


def error_reply(request: IRequest, code: int, message: str) -> bytes:
    """The body of every error: text as hyperd's http.Error wrote it, or JSON if asked for."""
    if wants_json(request):
        return json_reply(request, {"message": message}, code)
    return text_reply(request, message + "\n", code)


def result(id_: str, code: int | None = 0, cause: str = "") -> dict[str, Any]:
    """hyperd's reply to a mutation."""
    return {"ID": id_, "Code": code if isinstance(code, int) and not isinstance(code, bool) else 0,
            "Cause": cause}


class HyperAPI:
    """The routes. ``HyperAPI(daemon).app.resource()`` is the Klein resource (see hyperd.api.site)."""

    app = Klein()
    log = Logger()

    def __init__(self, daemon: Any) -> None:
        self.daemon = daemon

    def resource(self):
        return self.app.resource()

    # --- the error mapping (the one place) ------------------------------------------------------------

    @app.handle_errors(HyperError)
    def domain_error(self, request: IRequest, failure: Failure) -> bytes:
        err = failure.value
        message = err.message
        if isinstance(err, BadParameter) and "bad parameter" not in message.lower():
            message = f"bad parameter: {message}"
        if err.status >= 500:
            self.log.warn("{method} {uri}: {message}", method=request.method.decode(),
                          uri=request.uri.decode("utf-8", "replace"), message=message)
        return error_reply(request, err.status, message)

    @app.handle_errors(RouteNotFound)
    def no_route(self, request: IRequest, failure: Failure) -> bytes:
        path = request.path.decode("utf-8", "replace")
        return error_reply(request, 404, f"page not found: {request.method.decode()} {path}")

    @app.handle_errors(MethodNotAllowed)
    def wrong_method(self, request: IRequest, failure: Failure) -> bytes:
        allowed = sorted(set(failure.value.valid_methods or []))
        if allowed:
            request.setHeader(b"allow", ", ".join(allowed).encode("ascii"))
        path = request.path.decode("utf-8", "replace")
        return error_reply(request, 405, f"method {request.method.decode()} not allowed on {path}"
                                         + (f" (use {', '.join(allowed)})" if allowed else ""))

    @app.handle_errors(Exception)
    def unexpected(self, request: IRequest, failure: Failure) -> bytes | None:
        if failure.check(CancelledError):
            return None  # the client went away; nobody is listening for an answer
        self.log.failure("unexpected error in {method} {uri}", failure,
                         method=request.method.decode(), uri=request.uri.decode("utf-8", "replace"))
        return error_reply(request, 500, f"internal error: {failure.getErrorMessage()}")

    # --- system -----------------------------------------------------------------------------------------

    @app.route("/_ping", methods=["GET", "HEAD"])
    def ping(self, request: IRequest) -> bytes:
        return text_reply(request, "OK")

    @app.route("/version", methods=["GET"])
    def version(self, request: IRequest) -> bytes:
        return json_reply(request, self.daemon.version())

    @app.route("/info", methods=["GET"])
    def info(self, request: IRequest) -> bytes:
        return json_reply(request, self.daemon.info())

    @app.route("/list", methods=["GET"])
    async def list_(self, request: IRequest) -> bytes:
        item = arg(request, "item", default="pod")
        if item not in LIST_ITEMS:
            raise BadParameter(f"bad parameter: Can not support {item} list! (item is pod, container or vm)")
        await self.daemon.ready()  # the VMs a previous daemon left are taken back (or not) first
        data = self.daemon.list_items(item, pod=arg(request, "pod", "podId"), vm=arg(request, "vm", "vmId"))
        return json_reply(request, {"item": item, LIST_ITEMS[item]: data})

    # --- VMs --------------------------------------------------------------------------------------------

    @app.route("/vm/create", methods=["POST"])
    async def vm_create(self, request: IRequest) -> bytes:
        cpu = int_arg(request, "cpu", default=1)
        mem = int_arg(request, "mem", default=128)
        wait = not bool_arg(request, "async", default=False)
        vm_id = await self.daemon.create_vm(cpu, mem, wait=wait)
        return json_reply(request, result(vm_id))

    @app.route("/vm/kill", methods=["POST"])
    @app.route("/vm", methods=["DELETE"])
    async def vm_kill(self, request: IRequest) -> bytes:
        vm_id = arg(request, "vm", required=True)
        code = await self.daemon.kill_vm(vm_id)
        return json_reply(request, result(vm_id, code))

    # --- pods -------------------------------------------------------------------------------------------

    @app.route("/pod/create", methods=["POST"])
    async def pod_create(self, request: IRequest) -> bytes:
        spec = json_arg(request, "podArgs")
        if spec is not None:
            status = 200  # the seed API: podArgs in the query, 200
        else:
            spec = json_body(request, what="pod spec")
            status = 201  # v0.5+: the spec is the body, 201
        if not isinstance(spec, JSONObject):
            raise BadParameter("bad parameter: the pod spec must be a JSON object")
        pod_id = await self.daemon.create_pod(spec)
        return json_reply(request, result(pod_id), status)

    @app.route("/pod/start", methods=["POST"])
    async def pod_start(self, request: IRequest) -> bytes:
        pod_id = arg(request, "podId", required=True)
        vm_id = arg(request, "vmId")
        code = await self.daemon.start_pod(pod_id, vm_id=vm_id)
        return json_reply(request, result(pod_id, code))

    @app.route("/pod/stop", methods=["POST"])
    async def pod_stop(self, request: IRequest) -> bytes:
        pod_id = arg(request, "podId", required=True)
        # the docs say stopVM, the code read stopVm: accept both
        stop_vm = bool_arg(request, "stopVm", "stopVM", "stopvm", default=True)
        code = await self.daemon.stop_pod(pod_id, stop_vm=stop_vm)
        return json_reply(request, result(pod_id, code))

    @app.route("/pod/remove", methods=["POST"])
    @app.route("/pod", methods=["DELETE"])
    async def pod_remove(self, request: IRequest) -> bytes:
        pod_id = arg(request, "podId", required=True)
        code = await self.daemon.remove_pod(pod_id)
        return json_reply(request, result(pod_id, code))


# Route modules register on HyperAPI.app when imported.
from hyperd.api import (  # noqa: E402
    images,  # noqa: E402,F401
    network,  # noqa: E402,F401
    pods,  # noqa: E402,F401
    streams,  # noqa: E402,F401
)
