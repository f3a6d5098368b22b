"""The Daemon: the one object the API calls, and the one place that decides.

It owns the state store and (later) the tables of VMs, pods and containers, runs each lifecycle and keeps
the store in step. It is a Twisted service: the top service built by :func:`hyperd.tap.makeService` starts
it before the API socket listens and stops it after the socket is closed.

The VM and pod operations are filled in by the VM and pod work; until then they raise
``HyperError("not implemented yet: ...")`` so that the API, the client and the CLI are complete and tested.
"""

from __future__ import annotations

import os
import socket
from typing import Any

from twisted.application.service import Service
from twisted.logger import Logger

from hyperd import API_VERSION, __version__
from hyperd.config import Config
from hyperd.errors import BadParameter, HyperError
from hyperd.state import StateStore

__all__ = ["Daemon", "LIST_ITEMS", "host_info"]

#: /list?item= values and the key of their reply array.
LIST_ITEMS = {"pod": "podData", "container": "cData", "vm": "vmData"}

INDEX_SERVER = "https://index.docker.io/v1/"


def _mem_total() -> int:
    """Total memory in bytes, from /proc/meminfo."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    raise HyperError("MemTotal missing from /proc/meminfo")


def _os_name() -> str:
    for path in ("/etc/os-release", "/usr/lib/os-release"):
        try:
            with open(path) as f:
                for line in f:
                    key, _, value = line.strip().partition("=")
                    if key == "PRETTY_NAME":
                        return value.strip().strip('"').strip("'")
        except OSError:
            continue
    return os.uname().sysname


def _backing_filesystem(path: str) -> str:
    """The type of the filesystem holding ``path`` (the longest mount point that contains it)."""
    path = os.path.realpath(path)
    best, fstype = "", "unknown"
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                fields = line.split()
                if len(fields) < 3:
                    continue
                mnt = fields[1].replace("\\040", " ")
                if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                    best, fstype = mnt, fields[2]
    except OSError:
        pass
    return fstype


def host_info() -> dict[str, Any]:
    """Facts about the host that /info reports."""
    return {
        "MemTotal": _mem_total(),
        "Operating System": _os_name(),
        "Name": socket.gethostname(),
        "NCPU": os.cpu_count() or 1,
        "KernelVersion": os.uname().release,
    }


class Daemon(Service):
    """hyperd's core. ``Daemon(config, reactor)`` opens the state store (a StateError if it cannot)."""

    log = Logger()
    name = "daemon"

    def __init__(self, config: Config, reactor: Any = None, state: StateStore | None = None) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.config = config
        self.reactor = reactor
        for directory in (config.root, config.run_dir):
            os.makedirs(directory, mode=0o700, exist_ok=True)
        self.state = state if state is not None else StateStore(config.state_path)
        # The accelerator VMs run with. "auto" becomes kvm only once the VM layer has proved that KVM
        # really runs a guest here (on these machines it hangs); until then TCG.
        self.accel = "tcg" if config.accel == "auto" else config.accel

    # --- service ------------------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        for warning in self.config.warnings:
            self.log.warn("config: {warning}", warning=warning)
        self.log.info(
            "hyperd {version} (pid {pid}) root={root} run_dir={run_dir} accel={accel} "
            "pods={pods} vms={vms}",
            version=__version__, pid=os.getpid(), root=self.config.root, run_dir=self.config.run_dir,
            accel=self.accel, pods=len(self.state.pods()), vms=len(self.state.vms()),
        )

    def stopService(self) -> Any:
        super().stopService()
        self.state.close()

    # --- system -------------------------------------------------------------------------------------

    def version(self) -> dict[str, Any]:
        return {"ID": str(os.getpid()), "Version": __version__, "ApiVersion": API_VERSION}

    def info(self) -> dict[str, Any]:
        """hyperd's /info, computed from the state and the host."""
        info = host_info()
        info.update({
            "ID": str(os.getpid()),
            "Containers": len(self.state.containers()),
            "Images": len(self.state.images()),
            "Pods": len(self.state.pods()),
            "VMs": len(self.state.vms()),
            "Driver": self.config.storage_driver,
            "DriverStatus": [
                ["Root Dir", self.config.root],
                ["Backing Filesystem", _backing_filesystem(self.config.root)],
            ],
            "DockerRootDir": self.config.root,
            "IndexServerAddress": INDEX_SERVER,
            "ExecutionDriver": f"{self.config.hypervisor if self.config.hypervisor != 'kvm' else 'qemu'}-"
                               f"{self.accel}",
            "Accelerator": self.accel,
            "Kernel": self.config.kernel_path,
            "Initrd": self.config.initrd_path,
            "Network": self.config.network,
            "Version": __version__,
            "ApiVersion": API_VERSION,
        })
        return info

    def list_items(self, item: str, pod: str | None = None, vm: str | None = None) -> list[str]:
        """hyperd's colon-joined /list strings for ``item`` in pod, container, vm."""
        if item not in LIST_ITEMS:
            raise BadParameter(f"Can not support {item} list!")
        out = []
        if item == "pod":
            for p in self.state.pods():
                if (pod and p.pod_id != pod) or (vm and p.vm_id != vm):
                    continue
                out.append(f"{p.pod_id}:{p.name}:{p.vm_id or ''}:{p.status}")
        elif item == "container":
            vm_pods = None
            if vm:
                vm_pods = {p.pod_id for p in self.state.pods() if p.vm_id == vm}
            for c in self.state.containers(pod_id=pod or None):
                if vm_pods is not None and c.pod_id not in vm_pods:
                    continue
                out.append(f"{c.container_id}:{c.name}:{c.pod_id}:{c.status}")
        else:
            for v in self.state.vms():
                if (vm and v.vm_id != vm) or (pod and v.pod_id != pod):
                    continue
                out.append(f"{v.vm_id}:{v.pod_id or ''}:{v.status}")
        return out

    # --- VMs (the VM work fills these in) ------------------------------------------------------------

    async def create_vm(self, cpu: int, mem: int, wait: bool = True) -> str:
        """Boot an idle VM; returns its id once its agent is READY (or at once if not ``wait``)."""
        raise HyperError("not implemented yet: create_vm")

    async def kill_vm(self, vm_id: str) -> None:
        raise HyperError("not implemented yet: kill_vm")

    # --- pods (the pod work fills these in) -----------------------------------------------------------

    async def create_pod(self, spec: dict) -> str:
        """Create a pending pod from a UserPod spec (a :class:`hyperd.schema.JSONObject`); returns its id."""
        raise HyperError("not implemented yet: create_pod")

    async def start_pod(self, pod_id: str, vm_id: str | None = None) -> int | None:
        """Start a pod in a new VM, or in the idle VM ``vm_id``; returns a Code (None means 0)."""
        raise HyperError("not implemented yet: start_pod")

    async def stop_pod(self, pod_id: str, stop_vm: bool = True) -> int:
        """Stop a pod; returns hyperd's Code (2: VM shut down, 4: pod stopped and VM left idle)."""
        raise HyperError("not implemented yet: stop_pod")

    async def remove_pod(self, pod_id: str) -> None:
        raise HyperError("not implemented yet: remove_pod")
