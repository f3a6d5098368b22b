"""``hyperctl create|run|start|stop|rm|kill|pause|unpause``: pods from a pod file or from the command line.

Flags and output follow hyperd's hyperctl (reference/hyperd.md §3). ``run`` attaches to the first container
before starting the pod (so no output is lost), waits for it, and exits with its exit code; an image that is
not there yet is pulled first. Importing this module registers the commands (``hyperd.client.cli`` does).
"""

from __future__ import annotations

import argparse
import json
import random
import signal as signals
import sys
import time
from typing import Any, TextIO

from hyperd.client.cli import UsageFailure, command
from hyperd.client.client import HyperClient, HyperClientError


def _pod_arguments(p: argparse.ArgumentParser, run: bool) -> None:
    p.add_argument("-p", "--podfile", help="create the pod from this pod file (JSON, or YAML with -y)")
    p.add_argument("-y", "--yaml", action="store_true", help="the pod file is YAML")
    p.add_argument("--name", help="the pod's name (default <image>-<tag>-<10 digits>)")
    p.add_argument("--workdir", default="", help="the container's working directory")
    p.add_argument("-t", "--tty", action="store_true", help="allocate a terminal")
    p.add_argument("--read-only", action="store_true", help="mount the container's rootfs read-only")
    p.add_argument("--cpu", type=int, default=1, help="vCPUs of the VM (default 1)")
    p.add_argument("--memory", type=int, default=128, help="memory of the VM in MB (default 128)")
    p.add_argument("--env", action="append", default=[], metavar="K=V", help="an environment variable")
    p.add_argument("--entrypoint", help="override the image's entrypoint")
    p.add_argument("--restart", default="never", choices=["never", "onFailure", "always"])
    p.add_argument("--label", action="append", default=[], metavar="K=V", help="a pod label")
    p.add_argument("-v", "--volume", action="append", default=[], metavar="[HOSTDIR:]DIR[:ro]",
                   help="a volume (a host directory shared over 9p, or an empty pod volume)")
    p.add_argument("--publish", action="append", default=[], metavar="[tcp|udp:]HOST:CONTAINER",
                   help="map a host port (range) to a container port (range); repeatable")
    if run:
        p.add_argument("-d", "--detach", action="store_true", help="start the pod and return at once")
        p.add_argument("-a", "--attach", action="store_true", help="attach to a pod-file pod's first container")
        p.add_argument("--rm", action="store_true", help="remove the pod when its container has exited")
    p.add_argument("image", nargs="?", metavar="IMAGE")
    p.add_argument("cmd", nargs=argparse.REMAINDER, metavar="CMD")


def _pairs(values: list[str], what: str) -> list[tuple[str, str]]:
    out = []
    for value in values:
        key, sep, val = value.partition("=")
        if not sep or not key:
            raise UsageFailure(f"{what} {value!r} is not KEY=VALUE")
        out.append((key, val))
    return out


def default_name(image: str) -> str:
    repo, _, tag = image.rpartition(":") if ":" in image.rsplit("/", 1)[-1] else (image, "", "latest")
    base = repo.rsplit("/", 1)[-1]
    return f"{base}-{tag}-{random.randrange(10 ** 9, 10 ** 10)}"


def pod_spec(args: argparse.Namespace) -> dict[str, Any]:
    """The pod file, or one pod of one container from the command line."""
    if args.podfile:
        try:
            with open(args.podfile) as f:
                text = f.read()
        except OSError as e:
            raise UsageFailure(f"cannot read {args.podfile}: {e.strerror}") from None
        try:
            if args.yaml or args.podfile.endswith((".yaml", ".yml")):
                import yaml

                spec = yaml.safe_load(text)
            else:
                spec = json.loads(text)
        except Exception as e:
            raise UsageFailure(f"{args.podfile} does not parse: {e}") from None
        if not isinstance(spec, dict):
            raise UsageFailure(f"{args.podfile}: a pod file holds one object")
        if args.name:
            spec["id"] = args.name
        _publish(spec, args)
        return spec
    if not args.image:
        raise UsageFailure("an IMAGE or a pod file (-p) is required")
    container: dict[str, Any] = {"image": args.image, "tty": args.tty, "readOnly": args.read_only,
                                 "envs": [{"env": k, "value": v} for k, v in _pairs(args.env, "--env")]}
    if args.cmd:
        container["command"] = list(args.cmd)
    if args.entrypoint:
        container["entrypoint"] = args.entrypoint.split()
    if args.workdir:
        container["workdir"] = args.workdir
    if args.restart != "never":
        container["restartPolicy"] = args.restart
    name = args.name or default_name(args.image)
    spec: dict[str, Any] = {"id": name, "containers": [container], "resource": {"vcpu": args.cpu,
                                                                               "memory": args.memory},
                            "labels": dict(_pairs(args.label, "--label")), "tty": args.tty}
    volumes, mounts = [], []
    for i, value in enumerate(args.volume):
        parts = value.split(":")
        read_only = parts[-1] in ("ro", "rw") and parts.pop() == "ro"
        if len(parts) == 1:
            host, path = "", parts[0]
        elif len(parts) == 2:
            host, path = parts
        else:
            raise UsageFailure(f"--volume {value!r} is not [HOSTDIR:]DIR[:ro|rw]")
        volumes.append({"name": f"volume{i}", "source": host, "format": "vfs" if host else ""})
        mounts.append({"volume": f"volume{i}", "path": path, "readOnly": read_only})
    if volumes:
        spec["volumes"] = volumes
        container["volumes"] = mounts
    _publish(spec, args)
    return spec


def _publish(spec: dict[str, Any], args: argparse.Namespace) -> None:
    """``--publish`` rules join the pod's portmappings (a pod file's too)."""
    if getattr(args, "publish", None):
        from hyperd.client.net_commands import publish_mappings

        key = next((k for k in spec if k.lower() == "portmappings"), "portmappings")
        spec[key] = list(spec.get(key) or []) + publish_mappings(args.publish)


async def create_or_pull(client: HyperClient, spec: dict[str, Any], out: TextIO) -> str:
    """Create the pod; an image that is not there (404) is pulled, then the create is tried again."""
    try:
        return await client.create_pod(spec)
    except HyperClientError as e:
        if e.status != 404 or "no such image" not in str(e).lower():
            raise
    from hyperd.client.images import pull

    for container in spec.get("containers") or []:
        image = container.get("image")
        if image:
            out.write(f"{image}: pulling\n")
            await pull(client, image)
    return await client.create_pod(spec)


@command("create", "Create a pod (from IMAGE [CMD...] or a pod file), without starting it",
         lambda p: _pod_arguments(p, run=False))
async def cmd_create(client: HyperClient, args: argparse.Namespace, out: TextIO) -> None:
    pod_id = await create_or_pull(client, pod_spec(args), out)
    out.write(f"Pod ID is {pod_id}\n")


@command("run", "Create and start a pod, attached to its first container", lambda p: _pod_arguments(p, run=True))
async def cmd_run(client: HyperClient, args: argparse.Namespace, out: TextIO) -> int:
    from twisted.internet import reactor

    from hyperd.client.stream_commands import LocalIO, pump
    from hyperd.client.streams import StreamClient

    spec = pod_spec(args)
    started = time.monotonic()
    pod_id = await create_or_pull(client, spec, out)
    attach = not args.detach and (not args.podfile or args.attach)
    streams = StreamClient(client)
    container = proto = None
    io = LocalIO(reactor)
    try:
        if attach:
            info = await client.get_json("GET", "/pod/info", {"podName": pod_id})
            first = (info.get("spec", {}).get("containers") or [None])[0]
            if first is not None:
                container = first["containerID"]
                proto = await streams.attach(container, io.output if out is sys.stdout else _writer(out))
        await client.start_pod(pod_id)
        out.write(f"POD id is {pod_id}\n")
        out.write(f"Time to run a POD is {int((time.monotonic() - started) * 1000)} ms\n")
        out.flush()
        if proto is None:
            return 0
        tty = bool(spec.get("tty")) or any(c.get("tty") for c in spec.get("containers") or [])
        await pump(io, proto, tty, lambda h, w: streams.resize(container, None, h, w), stdin=tty)
        return await streams.exit_code(container)
    finally:
        if args.rm and not args.detach:
            try:
                await client.remove_pod(pod_id)
            except HyperClientError as e:
                sys.stderr.write(f"hyperctl ERROR: removing {pod_id}: {e}\n")


def _writer(out: TextIO):
    def output(stream: int, data: bytes) -> None:
        out.write(data.decode("utf-8", "replace"))
    return output


def _id_arguments(p: argparse.ArgumentParser, container_flag: bool = True, many: bool = False) -> None:
    if container_flag:
        p.add_argument("-c", "--container", action="store_true", help="the ID is a container's")
    p.add_argument("ids", nargs="+" if many else 1, metavar="ID")


@command("start", "Start a pod (or with -c a container)", lambda p: _id_arguments(p))
async def cmd_start(client: HyperClient, args: argparse.Namespace, out: TextIO) -> None:
    (target,) = args.ids
    if args.container:
        await client.get_json("POST", "/container/start", {"container": target})
        out.write(f"Successfully started container {target}\n")
    else:
        await client.start_pod(target)
        out.write(f"Successfully started the Pod({target})\n")


def _stop_arguments(p: argparse.ArgumentParser) -> None:
    _id_arguments(p)
    p.add_argument("--keep-vm", action="store_true", help="leave the VM idle for the next pod (stopVm=no)")


@command("stop", "Stop a pod (or with -c a container)", _stop_arguments)
async def cmd_stop(client: HyperClient, args: argparse.Namespace, out: TextIO) -> None:
    (target,) = args.ids
    if args.container:
        await client.get_json("POST", "/container/stop", {"container": target})
        out.write(f"Successfully stopped container {target}\n")
    else:
        await client.stop_pod(target, stop_vm=not args.keep_vm)
        out.write(f"Successfully shutdown the POD: {target}!\n")


@command("rm", "Remove pods (or with -c containers)", lambda p: _id_arguments(p, many=True))
async def cmd_rm(client: HyperClient, args: argparse.Namespace, out: TextIO) -> int:
    failed = 0
    for target in args.ids:
        try:
            if args.container:
                await client.request("POST", "/container/remove", {"container": target})
                out.write(f"container {target} is successfully deleted!\n")
            else:
                await client.remove_pod(target)
                out.write(f"Pod({target}) is successfully deleted!\n")
        except HyperClientError as e:
            sys.stderr.write(f"hyperctl ERROR: {e}\n")
            failed = 1
    return failed


def signal_number(value: str) -> int:
    if value.isdigit():
        return int(value)
    name = value.upper()
    number = getattr(signals, name if name.startswith("SIG") else "SIG" + name, None)
    if not isinstance(number, int):
        raise UsageFailure(f"unknown signal {value!r}")
    return int(number)


def _kill_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-p", "--pod", action="store_true", help="the ID is a pod's: signal all its containers")
    p.add_argument("-s", "--signal", default="KILL", help="the signal (default KILL)")
    p.add_argument("ids", nargs=1, metavar="ID")


@command("kill", "Send a signal to a container (or with -p every container of a pod)", _kill_arguments)
async def cmd_kill(client: HyperClient, args: argparse.Namespace, out: TextIO) -> None:
    (target,) = args.ids
    sig = signal_number(args.signal)
    if args.pod or target.startswith("pod-"):
        await client.get_json("POST", "/pod/kill", {"podName": target, "signal": sig})
    else:
        await client.get_json("POST", "/container/kill", {"container": target, "signal": sig})


@command("pause", "Pause a pod's VM", lambda p: _id_arguments(p, container_flag=False))
async def cmd_pause(client: HyperClient, args: argparse.Namespace, out: TextIO) -> None:
    await client.request("POST", "/pod/pause", {"podId": args.ids[0]})


@command("unpause", "Resume a paused pod's VM", lambda p: _id_arguments(p, container_flag=False))
async def cmd_unpause(client: HyperClient, args: argparse.Namespace, out: TextIO) -> None:
    await client.request("POST", "/pod/unpause", {"podId": args.ids[0]})
