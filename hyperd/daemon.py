"""The Daemon: the one object the API calls, and the one place that decides.

It owns the state store and (later) the tables of VMs, pods and containers, runs each lifecycle and keeps
the store in step. It is a Twisted service: the top service built by :func:`hyperd.tap.makeService` starts
it before the API socket listens and stops it after the socket is closed.

The VM and pod operations are filled in by the VM and pod work; until then they raise
``HyperError("not implemented yet: ...")`` so that the API, the client and the CLI are complete and tested.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import string
import time
from typing import Any

import attrs
from twisted.application.service import Service
from twisted.internet import defer, threads
from twisted.logger import Logger

from hyperd import API_VERSION, __version__
from hyperd.config import Config
from hyperd.deferreds import locked, observe
from hyperd.errors import BadParameter, Conflict, HyperError, NotFound, VMError
from hyperd.image.builtin import ensure_busybox
from hyperd.image.service import ImageService
from hyperd.image.store import ImageStore
from hyperd.mounts import remove_tree
from hyperd.network import make_network
from hyperd.pod.execs import ContainerOutputs, ExecManager
from hyperd.pod.sandbox import ContainerPlan, Sandbox, rfc3339
from hyperd.pod.spec import check_references, container_document, parse_container, parse_pod
from hyperd.state import StateStore
from hyperd.vm import VM, VMConfig, new_vm_id, probe_accel
from hyperd.vm.factory import VMFactory
from hyperd.vm.process import vm_processes

__all__ = ["Daemon", "LIST_ITEMS", "host_info"]

#: /list?item= values and the key of their reply array.
LIST_ITEMS = {"pod": "podData", "container": "cData", "vm": "vmData"}

INDEX_SERVER = "https://index.docker.io/v1/"

#: The guest does not boot in less (reference/machine.md).
MIN_MEM = 128
BOOT_TIMEOUT = 30.0
STOP_GRACE = 5.0

# hyperd's result codes (reference/hyperd.md §1.2).
E_VM_SHUTDOWN = 2
E_POD_STOPPED = 4

_LETTERS = string.ascii_letters


def new_pod_id() -> str:
    return "pod-" + "".join(secrets.choice(_LETTERS) for _ in range(10))


def new_container_id() -> str:
    """Docker-style: 64 hex digits."""
    return secrets.token_hex(32)


@attrs.frozen
class _GuestFiles:
    kernel: str
    initrd: str


@attrs.define
class VMEntry:
    """What the daemon knows of one VM: its qemu (once booted), its status and its pod."""

    vm_id: str
    status: str = "booting"  # booting, idle, associated, stopping
    pod_id: str | None = None
    vm: VM | None = None
    #: Stream sequence numbers are per VM and never reused (they survive a daemon restart in the record).
    next_seq: int = 1
    #: Booted ahead by the VM factory (VmFactoryPolicy) and not yet taken by a pod.
    pooled: bool = False

    def allocate_seq(self) -> int:
        seq, self.next_seq = self.next_seq, self.next_seq + 1
        return seq


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
        self.images = ImageStore(config.root)
        self.image_service = ImageService(reactor, self.images,
                                          in_use=lambda: {c.image for c in self.state.containers()},
                                          insecure_registries=config.insecure_registries)
        self._vms: dict[str, VMEntry] = {}
        self._sandboxes: dict[str, Sandbox] = {}
        #: The output brokers of the running containers: their logs, and the clients attached to them.
        self.outputs = ContainerOutputs()
        self.execs = ExecManager(self, self.outputs)
        self.network = make_network(config, reactor, self.state)
        self._locks: dict[str, defer.DeferredLock] = {}
        self._exit_waiters: dict[str, list[defer.Deferred]] = {}
        self._guest = None
        self._startup: defer.Deferred | None = None
        self._start_error: str | None = None
        self.factory = VMFactory(reactor, self._factory_specs(), self._boot_for_factory, self._idle_vm)

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

        self._startup = defer.ensureDeferred(self._start())
        self._startup.addErrback(self._start_failed)

    def _start_failed(self, failure) -> None:
        self._start_error = failure.getErrorMessage()
        self.log.failure("start-up failed", failure)

    async def _start(self) -> None:
        """What needs the reactor: the guest files, the built-in image, the accelerator, and the VMs that
        outlived the previous daemon. Requests wait for it (``_ready``)."""
        if self.config.kernel is None or self.config.initrd is None:
            from hyperd.guest.initrd import build_guest

            self._guest = await threads.deferToThread(build_guest, self.config.root)
        else:
            self._guest = _GuestFiles(self.config.kernel_path, self.config.initrd_path)
        await threads.deferToThread(ensure_busybox, self.images)
        if self.config.accel == "auto":
            self.accel = await probe_accel(self.reactor, "auto", self._guest.kernel,
                                           cache=os.path.join(self.config.run_dir, "accel-probe.json"))
        await self.network.start()
        await self._recover()
        self.factory.start()

    async def ready(self) -> None:
        """Wait until the daemon has started (guest files, built-in image, recovered VMs)."""
        await self._ready()

    async def _ready(self) -> None:
        if self._startup is None:
            raise HyperError("hyperd is not started")
        if not self._startup.called:
            await observe(self._startup)
        if self._start_error is not None:
            raise HyperError(f"hyperd failed to start: {self._start_error}")

    async def _recover(self) -> None:
        """Reattach to the VMs a previous daemon left running; fail the pods whose VM is gone."""
        for row in self.state.vms():
            record = row.record
            entry = VMEntry(row.vm_id, row.status, row.pod_id, next_seq=int(record.get("next_seq", 1)),
                            pooled=bool(record.get("pooled")))
            vm = None
            if record.get("pid"):
                try:
                    vm = await VM.reattach(self.reactor, record)
                except VMError as e:
                    self.log.warn("{vm}: not recovered: {e}", vm=row.vm_id, e=e)
            if vm is None:
                self.state.delete_vm(row.vm_id)
                if row.pod_id:
                    self._fail_pod_rows(row.pod_id, f"its VM {row.vm_id} died while hyperd was down")
                continue
            entry.vm = vm
            vm.when_dead().addCallback(self._vm_died, entry)
            if not entry.pod_id and entry.pooled and not self.factory.adopt(entry.vm_id, vm.config.cpu,
                                                                            vm.config.mem):
                # Booted ahead for a policy that no longer asks for it: nobody else wants it either.
                self.log.info("{vm}: no longer in VmFactoryPolicy; stopping it", vm=entry.vm_id)
                await self._stop_vm(entry)
                continue
            self._vms[entry.vm_id] = entry
            if entry.pod_id:
                self._adopt_pod(entry)
        # Pods that were running without a recorded VM (e.g. mid-boot when the daemon died) are failed.
        for pod in self.state.pods():
            if pod.status in ("running", "pending") and pod.pod_id not in self._sandboxes and pod.vm_id:
                self._fail_pod_rows(pod.pod_id, "hyperd stopped while the pod was starting")
        self.execs.recover()
        self._reap_strays()
        await self.network.recover({p: (s.vm, s.pod) for p, s in self._sandboxes.items()}, set(self._vms))

    def _reap_strays(self) -> None:
        """Kill the qemu processes of our run dir that no VM accounts for, and remove the VM directories no VM
        owns: a daemon that died while a VM booted left it running, unrecorded (its pid is saved at READY)."""
        known = {entry.vm.vm_dir for entry in self._vms.values() if entry.vm is not None}
        for pid, vm_dir in vm_processes(self.config.run_dir).items():
            if vm_dir not in known:
                self.log.warn("{dir}: a qemu (pid {pid}) no VM accounts for; killed", dir=vm_dir, pid=pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        for name in os.listdir(self.config.run_dir):
            path = os.path.join(self.config.run_dir, name)
            if name.startswith("vm-") and path not in known and os.path.isdir(path):
                try:
                    remove_tree(path)  # unmounts a pod's host volumes first, never deletes through them
                except OSError as e:
                    self.log.warn("{dir}: {e}", dir=path, e=e)

    def _fail_pod_rows(self, pod_id: str, reason: str) -> None:
        for c in self.state.containers(pod_id):
            if c.status == "running":
                self.state.update_container(c.container_id, status="failed", exit_code=137)
        if self.state.get_pod(pod_id) is not None:
            self._set_pod(pod_id, "failed", vm_id=None, reason=reason, finished=time.time())

    def _adopt_pod(self, entry: VMEntry) -> None:
        record = self.state.get_pod(entry.pod_id)
        if record is None or record.status not in ("running", "paused"):
            return
        pod = parse_pod(record.spec, pod_id=record.pod_id)
        plans = self._plans(record.pod_id)
        self._new_sandbox(record.pod_id, entry, pod, plans).adopt()

    def _new_sandbox(self, pod_id: str, entry: VMEntry, pod, plans: list[ContainerPlan]) -> Sandbox:
        sandbox = Sandbox(self.reactor, entry.vm, pod, plans, self._log_dir(pod_id), entry.allocate_seq,
                          lambda plan: self._container_exited(pod_id, plan), self.outputs)
        self._sandboxes[pod_id] = sandbox
        return sandbox

    def stopService(self) -> Any:
        super().stopService()
        return defer.ensureDeferred(self._stop())

    async def _stop(self) -> None:
        """VMs outlive the daemon (a restarted one reattaches) unless the config says stop them."""
        self.factory.stop()
        await self.image_service.close()
        for entry in list(self._vms.values()):
            if entry.vm is None:
                continue
            if self.config.stop_vms_on_exit:
                try:
                    await self._stop_vm(entry)
                except Exception as e:
                    self.log.warn("{vm}: stop: {e}", vm=entry.vm_id, e=e)
            else:
                entry.vm.detach()
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
            "Images": len(self.images.images()),
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

    # --- VMs ----------------------------------------------------------------------------------------

    def _vm_entry(self, vm_id: str) -> VMEntry:
        entry = self._vms.get(vm_id)
        if entry is None:
            raise NotFound(f"no such VM: {vm_id}")
        return entry

    def _check_resources(self, cpu: int, mem: int, what: str = "") -> None:
        ncpu = os.cpu_count() or 1
        if not 1 <= cpu <= ncpu:
            raise BadParameter(f"bad parameter: {what}cpu must be between 1 and {ncpu} (the host's cores), not {cpu}")
        mem_mb = host_info()["MemTotal"] // (1024 * 1024)
        if not MIN_MEM <= mem <= mem_mb:
            raise BadParameter(f"bad parameter: {what}mem must be between {MIN_MEM} and {mem_mb} MB, not {mem}")

    async def create_vm(self, cpu: int, mem: int, wait: bool = True) -> str:
        """Boot an idle VM; returns its id once its agent is READY (or at once if not ``wait``)."""
        await self._ready()
        self._check_resources(cpu, mem)
        entry = self._new_vm_entry()
        d = defer.ensureDeferred(self._boot(entry, cpu, mem))
        if not wait:
            d.addErrback(lambda f: self.log.failure("{vm}: boot failed", f, vm=entry.vm_id))
            return entry.vm_id
        await d
        return entry.vm_id

    def _factory_specs(self):
        """The policy's entries this host can boot; the others are warned about and left out."""
        specs = []
        for spec in self.config.vm_factory_policy:
            try:
                self._check_resources(spec.cpu, spec.memory, "VmFactoryPolicy ")
            except BadParameter as e:
                self.log.warn("config: {e}; that entry is ignored", e=str(e).removeprefix("bad parameter: "))
                continue
            specs.append(spec)
        return tuple(specs)

    async def _boot_for_factory(self, cpu: int, mem: int) -> str:
        entry = self._new_vm_entry()
        entry.pooled = True
        await self._boot(entry, cpu, mem)
        return entry.vm_id

    def _idle_vm(self, vm_id: str) -> bool:
        entry = self._vms.get(vm_id)
        return entry is not None and entry.status == "idle" and entry.vm is not None and not entry.vm.dead

    def _new_vm_entry(self, pod_id: str | None = None) -> VMEntry:
        entry = VMEntry(new_vm_id(), pod_id=pod_id)
        self._vms[entry.vm_id] = entry
        self.state.put_vm(entry.vm_id, pod_id, "booting", {})
        return entry

    async def _boot(self, entry: VMEntry, cpu: int, mem: int) -> VM:
        try:
            config = VMConfig.create(
                self.config.run_dir, vm_id=entry.vm_id, kernel=self._guest.kernel, initrd=self._guest.initrd,
                cpu=cpu, mem=mem, accel=self.accel, images_dir=self.images.images_dir,
                extra_args=await self.network.prepare_vm(entry.vm_id),
            )
            vm = await VM.boot(self.reactor, config, ready_timeout=BOOT_TIMEOUT)
        except BaseException:
            self._vms.pop(entry.vm_id, None)
            self.state.delete_vm(entry.vm_id)
            await self.network.release_vm(entry.vm_id)
            raise
        entry.vm = vm
        entry.status = "associated" if entry.pod_id else "idle"
        self._save_vm(entry)
        vm.when_dead().addCallback(self._vm_died, entry)
        return vm

    def _save_vm(self, entry: VMEntry) -> None:
        record = entry.vm.record() if entry.vm is not None else {}
        record["next_seq"] = entry.next_seq
        record["pooled"] = entry.pooled
        self.state.put_vm(entry.vm_id, entry.pod_id, entry.status, record)

    def _vm_died(self, reason: str, entry: VMEntry) -> None:
        """qemu is gone. Deliberate (stop, kill) or not, the VM row goes; a pod still running in it fails."""
        self._vms.pop(entry.vm_id, None)
        self.state.delete_vm(entry.vm_id)
        self.network.vm_died(entry.vm_id, entry.pod_id)
        if entry.pooled:
            self.factory.forget(entry.vm_id)
        if entry.status != "stopping":
            self.log.warn("{vm}: died: {reason}", vm=entry.vm_id, reason=reason)
        pod_id = entry.pod_id
        sandbox = self._sandboxes.pop(pod_id, None) if pod_id else None
        if pod_id and sandbox is not None and entry.status != "stopping":
            for plan in sandbox.containers:
                if plan.status in ("running", "pending"):
                    plan.status, plan.exit_code, plan.finished = "failed", 137, time.time()
                    self._save_container(plan)
                    self._wake_exit_waiters(plan.container_id, 137)
            self._set_pod(pod_id, "failed", vm_id=None, reason=f"the VM {entry.vm_id} died: {reason}",
                          finished=time.time())

    async def kill_vm(self, vm_id: str) -> None:
        await self._ready()
        entry = self._vm_entry(vm_id)
        if entry.vm is None:
            raise Conflict(f"conflict: VM {vm_id} is still booting")
        pod_id = entry.pod_id
        if pod_id and pod_id in self._sandboxes:
            # The pod loses its VM: it failed, and says why.
            sandbox = self._sandboxes.pop(pod_id)
            for plan in sandbox.containers:
                if plan.status == "running":
                    plan.status, plan.exit_code, plan.finished = "failed", 137, time.time()
                    self._save_container(plan)
                    self._wake_exit_waiters(plan.container_id, 137)
            self._set_pod(pod_id, "failed", vm_id=None, reason=f"its VM {vm_id} was killed", finished=time.time())
        await self._stop_vm(entry)

    async def _stop_vm(self, entry: VMEntry) -> None:
        entry.status = "stopping"
        await entry.vm.stop()
        # when_dead has fired and removed the row; make sure even if it did not.
        self._vms.pop(entry.vm_id, None)
        self.state.delete_vm(entry.vm_id)

    # --- pods ---------------------------------------------------------------------------------------

    def _lock(self, pod_id: str) -> defer.DeferredLock:
        return self._locks.setdefault(pod_id, defer.DeferredLock())

    def _pod_record(self, pod_id: str):
        record = self.state.get_pod(pod_id) or self.state.get_pod_by_name(pod_id)
        if record is None:
            raise NotFound(f"no such pod: {pod_id}")
        return record

    def _set_pod(self, pod_id: str, status: str, **fields) -> None:
        self.state.update_pod(pod_id, status=status, **fields)

    async def create_pod(self, spec) -> str:
        """Create a pending pod from a UserPod document; returns its id. Nothing is created on error."""
        await self._ready()
        pod = parse_pod(spec, pod_id=new_pod_id())
        if self.state.get_pod(pod.id) or self.state.get_pod_by_name(pod.id):
            raise Conflict(f"conflict: a pod named {pod.id} exists already")
        self._check_resources(pod.vcpu, pod.memory, "resource.")
        self.network.check(pod)
        _check_volumes(pod.volumes, "volumes")
        for i, c in enumerate(pod.containers):
            _check_volumes([v.detail for v in c.volumes if v.detail], f"containers[{i}].volumes.detail")
        images = [self.images.lookup(c.image) for c in pod.containers]
        for c in pod.containers:
            if self.state.find_container(c.name):
                raise Conflict(f"conflict: a container named {c.name} exists already")
        with self.state.transaction():
            self.state.put_pod(pod.id, pod.id, pod.source, "pending")
            for c, image in zip(pod.containers, images, strict=True):
                self.state.put_container(new_container_id(), pod.id, c.name, image.id, "pending",
                                         record={"spec": container_document(c)})
        return pod.id

    async def start_pod(self, pod_id: str, vm_id: str | None = None) -> int | None:
        await self._ready()
        record = self._pod_record(pod_id)
        async with locked(self._lock(record.pod_id)):
            return await self._start_pod(self._pod_record(pod_id), vm_id or None)

    async def _start_pod(self, record, vm_id: str | None) -> int:
        if record.status == "running" or record.pod_id in self._sandboxes:
            raise Conflict(f"conflict: pod {record.pod_id} is running already")
        pod = parse_pod(record.spec, pod_id=record.pod_id)
        # The pod's address and host ports are taken before a VM is booted for it (a port in use: 409).
        lease = self.network.reserve(pod)
        try:
            return await self._start_pod_in_vm(record, pod, lease, vm_id)
        except BaseException:
            await self.network.release_pod(record.pod_id)
            raise
        finally:
            self.factory.fill()  # a VM taken from the factory is replaced once its pod has started

    async def _start_pod_in_vm(self, record, pod, lease, vm_id: str | None) -> int:
        plans = self._plans(record.pod_id, fresh=True)
        if not vm_id:
            vm_id = self.factory.take(pod.vcpu, pod.memory)  # one booted ahead, if the policy keeps them
        if vm_id:
            entry = self._vm_entry(vm_id)
            if entry.status != "idle" or entry.vm is None:
                raise Conflict(f"conflict: VM {vm_id} is {entry.status}, not idle")
            if entry.pooled:
                entry.pooled = False
                self.factory.forget(vm_id, refill=False)  # named by the caller: replaced once the pod started
            entry.status, entry.pod_id = "associated", record.pod_id
            self._save_vm(entry)
        else:
            entry = self._new_vm_entry(record.pod_id)
            self._set_pod(record.pod_id, "pending", vm_id=entry.vm_id, reason="")
            try:
                await self._boot(entry, pod.vcpu, pod.memory)
            except Exception as e:
                self._set_pod(record.pod_id, "failed", vm_id=None, reason=str(e), finished=time.time())
                raise
        sandbox = self._new_sandbox(record.pod_id, entry, pod, plans)
        self._set_pod(record.pod_id, "pending", vm_id=entry.vm_id, reason="", started=time.time(), finished=None)
        try:
            sandbox.pod = await self.network.attach(lease, entry.vm)  # the guest NIC, routes, port mappings
            await sandbox.start()
        except Exception as e:
            self.log.warn("{pod}: start failed: {e}", pod=record.pod_id, e=e)
            self._sandboxes.pop(record.pod_id, None)
            self._set_pod(record.pod_id, "failed", vm_id=None, reason=f"start failed: {e}", finished=time.time())
            await self._stop_vm(entry)
            raise
        self._save_vm(entry)
        for plan in plans:
            self._save_container(plan)
        if sandbox.finished:
            await self._pod_finished(record.pod_id)
        else:
            self._set_pod(record.pod_id, "running")
        return 0

    def _plans(self, pod_id: str, fresh: bool = False) -> list[ContainerPlan]:
        """The pod's containers as the sandbox runs them, from their rows (``fresh``: as never run)."""
        plans = []
        for index, row in enumerate(self.state.containers(pod_id)):
            spec = parse_container(row.record["spec"], pod_id, index)
            image = self.images.lookup(row.image)
            if fresh:
                plans.append(ContainerPlan(row.container_id, spec, image))
            else:
                r = row.record
                plans.append(ContainerPlan(row.container_id, spec, image, r.get("stdio", 0), r.get("stderr", 0),
                                           row.status, row.exit_code, r.get("started"), r.get("finished")))
        return plans

    def _wake_exit_waiters(self, container_id: str, code: int | None) -> None:
        for waiter in self._exit_waiters.pop(container_id, []):
            if not waiter.called:  # a client that went away cancelled its wait
                waiter.callback(code)

    def _save_container(self, plan: ContainerPlan) -> None:
        self.state.update_container(plan.container_id, name=plan.spec.name, status=plan.status,
                                    exit_code=plan.exit_code,
                                    record={"spec": container_document(plan.spec), "stdio": plan.stdio,
                                            "stderr": plan.stderr, "started": plan.started,
                                            "finished": plan.finished})

    def _container_exited(self, pod_id: str, plan: ContainerPlan) -> None:
        self._save_container(plan)
        self._wake_exit_waiters(plan.container_id, plan.exit_code)
        sandbox = self._sandboxes.get(pod_id)
        if sandbox is not None and sandbox.finished and not self._lock(pod_id).locked:
            defer.ensureDeferred(self._finish_locked(pod_id)).addErrback(
                lambda f: self.log.failure("{pod}: finishing", f, pod=pod_id))

    async def _finish_locked(self, pod_id: str) -> None:
        async with locked(self._lock(pod_id)):
            sandbox = self._sandboxes.get(pod_id)
            if sandbox is not None and sandbox.finished:
                await self._pod_finished(pod_id)

    async def _pod_finished(self, pod_id: str) -> None:
        """Every container has exited: the pod succeeded (all 0) or failed, and its VM is released."""
        sandbox = self._sandboxes.pop(pod_id)
        ok = all(p.exit_code == 0 for p in sandbox.containers)
        entry = self._vms.get(sandbox.vm.vm_id)
        await self.network.release_pod(pod_id)
        try:
            if entry is not None:
                await self._stop_vm(entry)
        finally:
            self._set_pod(pod_id, "succeeded" if ok else "failed", vm_id=None, finished=time.time(),
                          reason="" if ok else "a container failed")

    async def stop_pod(self, pod_id: str, stop_vm: bool = True) -> int:
        """Stop a pod; returns hyperd's Code (2: VM shut down, 4: pod stopped and VM left idle)."""
        await self._ready()
        record = self._pod_record(pod_id)
        async with locked(self._lock(record.pod_id)):
            return await self._stop_pod(record.pod_id, stop_vm)

    async def _stop_pod(self, pod_id: str, stop_vm: bool) -> int:
        sandbox = self._sandboxes.get(pod_id)
        if sandbox is None:
            raise Conflict(f"conflict: pod {pod_id} is not running")
        await sandbox.stop(grace=STOP_GRACE)
        self._sandboxes.pop(pod_id, None)
        await self.network.release_pod(pod_id, vm_kept=not stop_vm)
        entry = self._vms.get(sandbox.vm.vm_id)
        self._set_pod(pod_id, "failed", vm_id=None, reason="stopped", finished=time.time())
        if entry is None:
            return E_VM_SHUTDOWN
        if stop_vm:
            await self._stop_vm(entry)
            return E_VM_SHUTDOWN
        sandbox.cleanup_share()
        entry.status, entry.pod_id = "idle", None
        self._save_vm(entry)
        return E_POD_STOPPED

    async def remove_pod(self, pod_id: str) -> None:
        await self._ready()
        record = self._pod_record(pod_id)
        async with locked(self._lock(record.pod_id)):
            if record.pod_id in self._sandboxes:
                await self._stop_pod(record.pod_id, True)
            await self.network.release_pod(record.pod_id)
            self.state.delete_pod(record.pod_id)  # its containers' and execs' rows too
            self.execs.forget_pod(record.pod_id)
            shutil.rmtree(self._log_dir(record.pod_id), ignore_errors=True)
        self._locks.pop(record.pod_id, None)

    def _log_dir(self, pod_id: str) -> str:
        return os.path.join(self.config.log_dir, pod_id)

    async def exit_code(self, container: str) -> int:
        """Wait until the container has exited; its exit code (hyperd's GET /exitcode)."""
        await self._ready()
        row = self.state.find_container(container)
        if row is None:
            raise NotFound(f"no such container: {container}")
        if row.status in ("succeeded", "failed") and row.exit_code is not None:
            return row.exit_code
        # A pending container is waited for too: `hyperctl run` asks before the pod has started.
        d = defer.Deferred()
        self._exit_waiters.setdefault(row.container_id, []).append(d)
        return await d

    # --- pod and container operations (the v1 routes) -------------------------------------------------

    def pod_info(self, pod_id: str) -> dict[str, Any]:
        """hyperd's PodInfo (reference/hyperd.md §1.4)."""
        record = self._pod_record(pod_id)
        pod = parse_pod(record.spec, pod_id=record.pod_id)
        sandbox = self._sandboxes.get(record.pod_id)
        plans = sandbox.containers if sandbox is not None else self._plans(record.pod_id)
        return {
            "podID": record.pod_id,
            "podName": record.name,
            "kind": "Pod",
            "apiVersion": "v1",
            "vm": record.vm_id or "",
            "createdAt": int(record.created),
            "spec": {
                "volumes": [{"name": v.name, "source": v.source, "driver": v.format} for v in pod.volumes],
                "containers": [_container_json(p) for p in plans],
                "labels": pod.labels,
                "vcpu": pod.vcpu,
                "memory": pod.memory,
            },
            "status": {
                "phase": record.status.capitalize(),
                "message": record.reason,
                "reason": record.reason,
                "hostIP": "",
                "podIP": self.network.pod_ips(record.pod_id),
                "startTime": _rfc3339(record.started),
                "finishTime": _rfc3339(record.finished),
                "containerStatus": [_container_status(p) for p in plans],
            },
        }

    def _container_plan(self, container: str) -> tuple[str, ContainerPlan]:
        row = self.state.find_container(container)
        if row is None:
            raise NotFound(f"no such container: {container}")
        sandbox = self._sandboxes.get(row.pod_id)
        plans = sandbox.containers if sandbox is not None else self._plans(row.pod_id)
        for plan in plans:
            if plan.container_id == row.container_id:
                return row.pod_id, plan
        raise NotFound(f"no such container: {container}")

    def container_info(self, container: str) -> dict[str, Any]:
        pod_id, plan = self._container_plan(container)
        row = self.state.get_container(plan.container_id)
        return {"container": _container_json(plan), "createdAt": int(self.state.get_pod(pod_id).created),
                "podID": pod_id, "status": _container_status(plan), "tty": plan.spec.tty,
                "image": row.image}

    async def kill_pod(self, pod_id: str, container: str | None = None, sig: int = 15) -> None:
        """Send a signal to the pod's running containers (or to one of them)."""
        await self._ready()
        record = self._pod_record(pod_id)
        sandbox = self._sandboxes.get(record.pod_id)
        if sandbox is None:
            raise Conflict(f"conflict: pod {record.pod_id} is not running")
        plans = [p for p in sandbox.containers if p.status == "running"]
        if container:
            plans = [p for p in plans if container in (p.container_id, p.spec.name)]
            if not plans:
                raise NotFound(f"no such running container in pod {record.pod_id}: {container}")
        for plan in plans:
            await sandbox.signal(plan, sig)

    async def pause_pod(self, pod_id: str) -> None:
        await self._pause(pod_id, "running", "paused")

    async def unpause_pod(self, pod_id: str) -> None:
        await self._pause(pod_id, "paused", "running")

    async def _pause(self, pod_id: str, before: str, after: str) -> None:
        """Freeze (QMP stop) or thaw (cont) the pod's VM, moving the pod from ``before`` to ``after``."""
        await self._ready()
        record = self._pod_record(pod_id)
        async with locked(self._lock(record.pod_id)):
            sandbox = self._sandboxes.get(record.pod_id)
            if sandbox is None or record.status != before:
                raise Conflict(f"conflict: pod {record.pod_id} is {record.status}, not {before}")
            await (sandbox.vm.pause() if after == "paused" else sandbox.vm.resume())
            self._set_pod(record.pod_id, after)

    async def create_container(self, pod_id: str, document: dict) -> str:
        """Add a container to a pod; it starts with the pod, or with /container/start if the pod runs."""
        await self._ready()
        record = self._pod_record(pod_id)
        async with locked(self._lock(record.pod_id)):
            index = len(self.state.containers(record.pod_id))
            spec = parse_container(document, record.pod_id, index)
            if self.state.find_container(spec.name):
                raise Conflict(f"conflict: a container named {spec.name} exists already")
            pod = parse_pod(record.spec, pod_id=record.pod_id)
            check_references(spec, pod.volumes, pod.files)
            _check_volumes([v.detail for v in spec.volumes if v.detail], "volumes.detail")
            image = self.images.lookup(spec.image)
            container_id = new_container_id()
            self.state.put_container(container_id, record.pod_id, spec.name, image.id, "pending",
                                     record={"spec": container_document(spec)})
            sandbox = self._sandboxes.get(record.pod_id)
            if sandbox is not None:
                sandbox.add(ContainerPlan(container_id, spec, image))
            return container_id

    async def start_container(self, container: str) -> None:
        await self._ready()
        pod_id, plan = self._container_plan(container)
        async with locked(self._lock(pod_id)):
            sandbox = self._sandboxes.get(pod_id)
            if sandbox is None:
                raise Conflict(f"conflict: the pod {pod_id} of container {container} is not running; start the pod")
            if plan.status == "running":
                raise Conflict(f"conflict: container {container} is running already")
            if plan.status != "pending":
                # hyperstart cannot restart an exited container: it is removed in the guest and started anew.
                await sandbox.remove(plan)
                plan.status = "pending"
                sandbox.containers.append(plan)
            await sandbox.start_container(plan)
            self._save_container(plan)
            if self.state.get_pod(pod_id).status != "running":
                self._set_pod(pod_id, "running", finished=None)

    async def stop_container(self, container: str, grace: float = STOP_GRACE) -> None:
        await self._ready()
        pod_id, plan = self._container_plan(container)
        sandbox = self._sandboxes.get(pod_id)
        if sandbox is None or plan.status != "running":
            raise Conflict(f"conflict: container {container} is not running")
        await sandbox.stop_containers([plan], grace)

    async def kill_container(self, container: str, sig: int = 15) -> None:
        await self._ready()
        pod_id, plan = self._container_plan(container)
        sandbox = self._sandboxes.get(pod_id)
        if sandbox is None or plan.status != "running":
            raise Conflict(f"conflict: container {container} is not running")
        await sandbox.signal(plan, sig)

    async def remove_container(self, container: str) -> None:
        await self._ready()
        pod_id, plan = self._container_plan(container)
        async with locked(self._lock(pod_id)):
            sandbox = self._sandboxes.get(pod_id)
            if plan.status == "running":
                raise Conflict(f"conflict: container {container} is running; stop it first")
            if sandbox is not None and plan in sandbox.containers:
                try:
                    await sandbox.remove(plan)
                except Exception as e:
                    self.log.info("remove {c}: {e}", c=container, e=e)
            self.state.delete_container(plan.container_id)

    async def rename_container(self, old: str, new: str) -> None:
        await self._ready()
        if not new or not all(ch.isalnum() or ch in "_.-" for ch in new):
            raise BadParameter(f"bad parameter: invalid container name {new!r}")
        pod_id, plan = self._container_plan(old)
        if self.state.find_container(new):
            raise Conflict(f"conflict: a container named {new} exists already")
        plan.spec = attrs.evolve(plan.spec, name=new)
        self.state.update_container(plan.container_id, name=new)
        self._save_container(plan)


def _check_volumes(volumes, path: str) -> None:
    """Volumes hyperd can give a pod: empty ones, and host directories (``vfs``, shared over 9p)."""
    for i, v in enumerate(volumes):
        if v.format not in ("", "vfs"):
            raise BadParameter(f"{path}[{i}].format: {v.format} volumes are not supported; use vfs (a host "
                               "directory) or no source (an empty volume)")
        if v.source and not (os.path.isabs(v.source) and os.path.isdir(v.source)):
            raise BadParameter(f"{path}[{i}].source: {v.source} is not an existing host directory")


def _rfc3339(ts: float | None) -> str:
    return rfc3339(ts, nanoseconds=False) if ts else ""


def _container_json(plan: ContainerPlan) -> dict[str, Any]:
    c = plan.spec
    return {
        "name": c.name,
        "containerID": plan.container_id,
        "image": c.image,
        "imageID": plan.image.id,
        "commands": list(c.entrypoint),
        "args": list(c.command),
        "workingDir": c.workdir,
        "tty": c.tty,
        "env": [{"env": e.env, "value": e.value} for e in c.envs],
        "volumeMounts": [{"name": v.volume, "mountPath": v.path, "readOnly": v.read_only} for v in c.volumes],
        "labels": c.labels,
        "ports": [],
        "user": c.user.name,
    }


def _container_status(plan: ContainerPlan) -> dict[str, Any]:
    status: dict[str, Any] = {"name": plan.spec.name, "containerID": plan.container_id, "phase": plan.status,
                              "waiting": {}, "running": {}, "terminated": {}}
    if plan.status == "pending":
        status["waiting"] = {"reason": "created"}
    elif plan.status == "running":
        status["running"] = {"startedAt": _rfc3339(plan.started)}
    else:
        status["terminated"] = {"exitCode": plan.exit_code if plan.exit_code is not None else -1,
                                "reason": "Completed" if plan.exit_code == 0 else "Error", "message": "",
                                "startedAt": _rfc3339(plan.started), "finishedAt": _rfc3339(plan.finished)}
    return status
