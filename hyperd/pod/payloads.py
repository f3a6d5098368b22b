"""What the guest is told: a pod spec and its images turned into hyperstart's STARTPOD and NEWCONTAINER payloads.

Pure functions, no I/O, so that the rules Docker users rely on (entrypoint + command, image defaults for env,
workdir and user) are tested without a VM. Paths in payloads are relative to the VM's 9p share
(``/tmp/hyper/shared`` in the guest): image roots live under ``images/<image id>/rootfs`` (the read-only
``images`` tag mounted there), volumes under ``volumes/<name>`` and files under ``files/<container>/<n>``.
"""

from __future__ import annotations

from hyperd.errors import BadParameter
from hyperd.image.store import Image
from hyperd.pod.spec import UserContainer, UserPod

SHARED_VOLUMES = "volumes"
SHARED_FILES = "files"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def startpod_payload(pod: UserPod) -> dict:
    payload = {
        "hostname": pod.hostname,
        "dns": list(pod.dns),
        "dnsSearch": list(pod.dns_search),
        "dnsOptions": list(pod.dns_options),
        "shareDir": "share_dir",
    }
    if pod.services:  # our guest's extension (hyperd programmed ipvs through exec)
        payload["services"] = [
            {"serviceIP": s.service_ip, "servicePort": s.service_port, "protocol": s.protocol,
             "hosts": [{"hostIP": h.host_ip, "hostPort": h.host_port} for h in s.hosts]}
            for s in pod.services]
    return payload


def command_line(container: UserContainer, image: Image) -> list[str]:
    """Docker's rule: the entrypoint (the container's, else the image's) followed by the command (the
    container's, else the image's — unless the container overrides the entrypoint, which resets it)."""
    config = image.run_config
    entrypoint = list(container.entrypoint) or list(config.get("Entrypoint") or ())
    if container.command:
        command = list(container.command)
    elif container.entrypoint:
        command = []
    else:
        command = list(config.get("Cmd") or ())
    args = entrypoint + command
    if not args:
        raise BadParameter(f"bad parameter: container {container.name}: no command given and the image "
                           f"{container.image} has none")
    return args


def environment(container: UserContainer, image: Image) -> list[dict]:
    """The image's Env, overridden by the container's envs, in a stable order."""
    merged: dict[str, str] = {}
    for item in image.run_config.get("Env") or ():
        name, _, value = item.partition("=")
        merged[name] = value
    for env in container.envs:
        merged[env.env] = env.value
    merged.setdefault("PATH", DEFAULT_PATH)
    merged.setdefault("HOME", "/root")
    return [{"env": name, "value": value} for name, value in merged.items()]


def process_payload(process_id: str, args: list[str], envs: list[dict], workdir: str, terminal: bool,
                    stdio: int, stderr: int, user: str = "", group: str = "",
                    additional_groups: tuple[str, ...] = ()) -> dict:
    return {
        "id": process_id,
        "user": user,
        "group": group,
        "additionalGroups": list(additional_groups),
        "terminal": terminal,
        "stdio": stdio,
        "stderr": 0 if terminal else stderr,
        "args": args,
        "envs": envs,
        "workdir": workdir or "/",
    }


def newcontainer_payload(container_id: str, container: UserContainer, image: Image, pod: UserPod,
                         stdio: int, stderr: int) -> dict:
    config = image.run_config
    user = container.user.name or (config.get("User") or "")
    user, _, group_from_user = user.partition(":")
    fsmap = []
    for volume in container.volumes:
        fsmap.append({"source": f"{SHARED_VOLUMES}/{volume.volume}", "path": volume.path,
                      "readOnly": volume.read_only, "dockerVolume": False})
    for index, file in enumerate(container.files):
        fsmap.append({"source": f"{SHARED_FILES}/{container_id}/{index}", "path": file.path,
                      "readOnly": False, "dockerVolume": False})
    sysctl = {"vm.overcommit_memory": "1"}
    sysctl.update(container.sysctl)
    return {
        "id": container_id,
        "rootfs": "rootfs",
        "image": f"images/{image.id}",
        "fsmap": fsmap,
        "volumes": [],
        "sysctl": sysctl,
        "restartPolicy": "never",
        "initialize": False,
        "readOnly": container.read_only,
        "process": process_payload(
            "init", command_line(container, image), environment(container, image),
            container.workdir or config.get("WorkingDir") or "/", container.tty, stdio, stderr,
            user, container.user.group or group_from_user, container.user.additional_groups,
        ),
    }
