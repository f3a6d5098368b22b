"""The image routes: pull with streamed progress, list, remove, load and save.

Registered on :class:`hyperd.api.app.HyperAPI`'s Klein app (``self`` is the HyperAPI, ``self.daemon`` the
Daemon, whose ``image_service`` is a :class:`~hyperd.image.service.ImageService`); importing this module adds
them.

``POST /image/create`` streams Docker's JSON progress messages, one per line. An error before the first
message (a bad name, an unknown image, a registry that cannot be reached or refuses us) is an ordinary error
reply with its status (404, 401, 500); after it, the status line is gone, so the error ends the stream as
``{"error": ..., "errorDetail": {"message": ...}}``, as Docker's engine does. A client that goes away does
not stop the pull: the image lands in the store for the next one.
"""

from __future__ import annotations

import json
import os
from typing import Any

from twisted.logger import Logger
from twisted.protocols.basic import FileSender
from twisted.web.iweb import IRequest

from hyperd.api.app import HyperAPI, json_reply
from hyperd.api.params import arg, bool_arg
from hyperd.errors import BadParameter, HyperError
from hyperd.image.reference import parse_reference
from hyperd.image.registry import parse_registry_auth

__all__ = ["ProgressStream"]

app = HyperAPI.app
log = Logger()


class ProgressStream:
    """Docker JSON messages written as they come; the status line goes out with the first one."""

    def __init__(self, request: IRequest) -> None:
        self.request = request
        self.started = False
        self.gone = False
        request.notifyFinish().addErrback(self._lost)

    def _lost(self, _failure: Any) -> None:
        self.gone = True

    def write(self, message: dict[str, Any]) -> None:
        if self.gone:
            return
        if not self.started:
            self.started = True
            self.request.setResponseCode(200)
            self.request.setHeader(b"content-type", b"application/json")
        self.request.write(json.dumps(message, sort_keys=True).encode("utf-8") + b"\r\n")

    def error(self, message: str) -> None:
        self.write({"error": message, "errorDetail": {"message": message}})


async def _service(api: HyperAPI) -> Any:
    """The daemon's ImageService, once the daemon has started (it adds the built-in image then)."""
    service = getattr(api.daemon, "image_service", None)
    if service is None:
        raise HyperError("images are not available: the daemon has no image service")
    ready = getattr(api.daemon, "ready", None) or getattr(api.daemon, "_ready", None)
    if ready is not None:
        await ready()
    return service


@app.route("/image/create", methods=["POST"])
async def image_create(self: HyperAPI, request: IRequest) -> bytes:
    name = arg(request, "imageName", "fromImage")
    if name is None:
        if arg(request, "fromSrc") is not None:
            raise BadParameter("bad parameter: importing a root filesystem (fromSrc) is not supported; "
                               "use POST /image/load")
        raise BadParameter("bad parameter: imageName is required")
    tag = arg(request, "tag")
    auth = parse_registry_auth(request.getHeader(b"x-registry-auth"))
    service = await _service(self)
    service.reference(name, tag)  # a malformed name is a 400 before anything is sent
    stream = ProgressStream(request)
    try:
        await service.pull(name, tag, auth, stream.write)
    except HyperError as e:
        if not stream.started:
            raise
        stream.error(e.message)
    except Exception as e:  # noqa: BLE001 - the status is sent: the stream is the only place left to say it
        if not stream.started:
            raise
        log.failure("pull of {name} failed", name=name)
        stream.error(f"internal error: {e}")
    return b""


@app.route("/images/get", methods=["GET"])
async def images_get(self: HyperAPI, request: IRequest) -> bytes:
    service = await _service(self)
    return json_reply(request, {"imagesList": service.list(bool_arg(request, "all", default=False))})


@app.route("/image", methods=["DELETE"])
async def image_remove(self: HyperAPI, request: IRequest) -> bytes:
    ref = arg(request, "imageId", "image", "name", required=True)
    force = bool_arg(request, "force", default=False)
    service = await _service(self)
    removed = await service.remove(ref, force)
    return json_reply(request, {"imagesList": removed})


@app.route("/image/load", methods=["POST"])
async def image_load(self: HyperAPI, request: IRequest) -> bytes:
    # Twisted has spooled a large body to a temporary file already (all of it before we run).
    body = request.content
    if body is None or body.seek(0, os.SEEK_END) == 0:
        raise BadParameter("bad parameter: the body must be an image archive (docker save or OCI layout tar)")
    service = await _service(self)
    images = await service.load(body)
    lines = []
    for image in images:
        names = [parse_reference(n).short for n in image.names] or [f"sha256:{image.id}"]
        for name in names:
            kind = "image" if not name.startswith("sha256:") else "image ID"
            lines.append(json.dumps({"stream": f"Loaded {kind}: {name}\n"}, sort_keys=True))
    data = ("\r\n".join(lines) + "\r\n").encode()
    request.setResponseCode(200)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"content-length", b"%d" % len(data))
    return data


@app.route("/images/save", methods=["GET"])
async def images_save(self: HyperAPI, request: IRequest) -> bytes:
    names = [v.decode("utf-8", "replace") for v in request.args.get(b"names", []) if v]
    if not names:
        raise BadParameter("bad parameter: names is required")
    fmt = arg(request, "format", default="oci")
    if fmt not in ("oci", "docker"):
        raise BadParameter(f"bad parameter: format must be oci, got {fmt!r}")
    service = await _service(self)
    path = await service.save(names)
    f = open(path, "rb")  # noqa: SIM115 - closed when sent, below
    try:
        os.unlink(path)  # the open file lives on; nothing is left behind whatever happens
        size = os.fstat(f.fileno()).st_size
        request.setResponseCode(200)
        request.setHeader(b"content-type", b"application/x-tar")
        request.setHeader(b"content-length", b"%d" % size)
        # FileSender reads 16 kB at a time as the client takes them (twisted.web.static serves files so)
        await _send(f, request)
    finally:
        f.close()
    return b""


async def _send(f: Any, request: IRequest) -> None:
    try:
        await FileSender().beginFileTransfer(f, request)
    except Exception:  # noqa: BLE001 - the client went away: nothing to say to anyone
        log.info("images/save: the client went away")
