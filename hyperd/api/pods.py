"""The v1 routes of pods and containers: pod info, kill, pause, the container routes and /exitcode.

Registered on :class:`hyperd.api.app.HyperAPI`'s Klein app (``self`` is the HyperAPI, ``self.daemon`` the
Daemon); importing this module adds them. Replies follow hyperd v1.x (reference/hyperd.md §1.2).
"""

from __future__ import annotations

import signal as signals

from twisted.web.iweb import IRequest

from hyperd.api.app import HyperAPI, json_reply, result
from hyperd.api.params import arg, json_body
from hyperd.errors import BadParameter

app = HyperAPI.app


def signal_arg(request: IRequest, default: int = 15) -> int:
    """``signal=`` as a number or a name (``9``, ``KILL``, ``SIGKILL``)."""
    value = arg(request, "signal")
    if value is None:
        return default
    if value.isdigit():
        number = int(value)
    else:
        name = value.upper()
        name = name if name.startswith("SIG") else "SIG" + name
        number = getattr(signals, name, None)
        if not isinstance(number, int):
            raise BadParameter(f"bad parameter: signal {value!r} is not a signal")
    if not 1 <= int(number) <= 64:
        raise BadParameter(f"bad parameter: signal {value!r} is out of range")
    return int(number)


def empty_reply(request: IRequest, code: int) -> bytes:
    request.setResponseCode(code)
    return b""


@app.route("/pod/info", methods=["GET"])
def pod_info(self, request: IRequest) -> bytes:
    pod_id = arg(request, "podName", "podId", required=True)
    return json_reply(request, self.daemon.pod_info(pod_id))


@app.route("/pod/kill", methods=["POST"])
async def pod_kill(self, request: IRequest) -> bytes:
    pod_id = arg(request, "podName", "podId", required=True)
    await self.daemon.kill_pod(pod_id, container=arg(request, "container"), sig=signal_arg(request))
    return json_reply(request, {})


@app.route("/pod/pause", methods=["POST"])
async def pod_pause(self, request: IRequest) -> bytes:
    await self.daemon.pause_pod(arg(request, "podId", "podName", required=True))
    return empty_reply(request, 204)


@app.route("/pod/unpause", methods=["POST"])
async def pod_unpause(self, request: IRequest) -> bytes:
    await self.daemon.unpause_pod(arg(request, "podId", "podName", required=True))
    return empty_reply(request, 204)


@app.route("/container/create", methods=["POST"])
async def container_create(self, request: IRequest) -> bytes:
    pod_id = arg(request, "podId", required=True)
    container_id = await self.daemon.create_container(pod_id, json_body(request, "container"))
    return json_reply(request, {"ID": container_id}, 201)


@app.route("/container/start", methods=["POST"])
async def container_start(self, request: IRequest) -> bytes:
    await self.daemon.start_container(arg(request, "container", required=True))
    return json_reply(request, {})


@app.route("/container/stop", methods=["POST"])
async def container_stop(self, request: IRequest) -> bytes:
    await self.daemon.stop_container(arg(request, "container", required=True))
    return json_reply(request, {})


@app.route("/container/kill", methods=["POST"])
async def container_kill(self, request: IRequest) -> bytes:
    await self.daemon.kill_container(arg(request, "container", required=True), sig=signal_arg(request))
    return json_reply(request, {}, 201)


@app.route("/container/remove", methods=["POST"])
@app.route("/container", methods=["DELETE"])
async def container_remove(self, request: IRequest) -> bytes:
    await self.daemon.remove_container(arg(request, "container", required=True))
    return empty_reply(request, 204)


@app.route("/container/rename", methods=["POST"])
async def container_rename(self, request: IRequest) -> bytes:
    new = arg(request, "newName", required=True)
    await self.daemon.rename_container(arg(request, "oldName", required=True), new)
    return json_reply(request, result(new))


@app.route("/container/info", methods=["GET"])
def container_info(self, request: IRequest) -> bytes:
    return json_reply(request, self.daemon.container_info(arg(request, "container", required=True)))


@app.route("/exitcode", methods=["GET"])
async def exitcode(self, request: IRequest) -> bytes:
    """Blocks until the container (or with ``exec=``, that exec) has exited; the code as a bare JSON
    integer, as hyperd wrote it."""
    exec_id = arg(request, "exec")
    if exec_id:
        code = await self.daemon.execs.exit_code(arg(request, "container"), exec_id)
    else:
        code = await self.daemon.exit_code(arg(request, "container", required=True))
    return json_reply(request, code)



