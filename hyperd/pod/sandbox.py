"""A pod inside its VM: the share directory prepared, STARTPOD, a NEWCONTAINER per container, their output
written to json-file logs, and their exits reported once both the exit status and the end of output are in.

The Sandbox talks to one VM's agent and stream channel; the Daemon decides when to start and stop it and keeps
the state store in step through the ``on_exit`` callback.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import time
from typing import Callable

import attrs
from twisted.internet import defer
from twisted.logger import Logger

from hyperd.agent import codec
from hyperd.deferreds import observe
from hyperd.errors import BadParameter
from hyperd.image.store import Image
from hyperd.mounts import bind_mount, remove_tree
from hyperd.pod import payloads
from hyperd.pod.execs import STDERR, STDOUT, ContainerOutputs
from hyperd.pod.spec import UserContainer, UserPod

log = Logger()


@attrs.define
class ContainerPlan:
    """One container of the pod as the sandbox runs it."""

    container_id: str
    spec: UserContainer
    image: Image
    stdio: int = 0
    stderr: int = 0
    status: str = "pending"
    exit_code: int | None = None
    started: float | None = None
    finished: float | None = None


def rfc3339(ts: float, nanoseconds: bool = True) -> str:
    """RFC 3339 in UTC; with ``nanoseconds`` as Docker's logs write it (RFC3339Nano)."""
    seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts))
    return seconds + (".%09dZ" % int((ts % 1) * 1e9) if nanoseconds else "Z")


class JSONFileLog:
    """Docker's json-file log of one container stream: one JSON object per line of output.

    A line longer than ``PARTIAL_LIMIT`` is written in pieces (as Docker does), so a process that never
    ends its line cannot grow the held part without bound, and ``logs -f`` sees it.
    """

    PARTIAL_LIMIT = 16 * 1024

    def __init__(self, path: str, stream: str):
        self.path = path
        self.stream = stream
        self._partial = b""

    def stream_data(self, data: bytes) -> None:
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        chunks = [line + b"\n" for line in lines]
        while len(self._partial) >= self.PARTIAL_LIMIT:
            chunks.append(self._partial[:self.PARTIAL_LIMIT])
            self._partial = self._partial[self.PARTIAL_LIMIT:]
        if chunks:
            self._write(chunks)

    def stream_eof(self) -> None:
        if self._partial:
            self._write([self._partial])
            self._partial = b""

    def _write(self, chunks: list[bytes]) -> None:
        now = rfc3339(time.time())
        with open(self.path, "ab") as f:
            f.write(b"".join(json.dumps({"log": chunk.decode("utf-8", "replace"), "stream": self.stream,
                                         "time": now}).encode() + b"\n" for chunk in chunks))


def _file_bytes(detail, path: str) -> bytes:
    if detail.uri:
        if not detail.uri.startswith("file:///"):
            raise BadParameter(f"{path}: only file:/// URIs can be read ({detail.uri!r})")
        try:
            with open(detail.uri[len("file://"):], "rb") as f:
                return f.read()
        except OSError as e:
            raise BadParameter(f"{path}: cannot read {detail.uri}: {e.strerror}") from None
    if detail.encoding == "base64":
        try:
            return base64.b64decode(detail.content, validate=True)
        except ValueError:
            raise BadParameter(f"{path}: content is not valid base64") from None
    return detail.content.encode()


class Sandbox:
    """One pod running in one VM."""

    def __init__(self, reactor, vm, pod: UserPod, containers: list[ContainerPlan], log_dir: str,
                 allocate_seq: Callable[[], int], on_exit: Callable[[ContainerPlan], None],
                 outputs: ContainerOutputs):
        self._reactor = reactor
        self.vm = vm
        self.pod = pod
        self.containers = containers
        self.log_dir = log_dir
        self._allocate_seq = allocate_seq
        self._on_exit = on_exit
        self._outputs = outputs
        self._exited: dict[str, defer.Deferred] = {}

    @property
    def share_dir(self) -> str:
        return os.path.join(self.vm.vm_dir, "share_dir")

    def log_path(self, container_id: str) -> str:
        return os.path.join(self.log_dir, f"{container_id}-json.log")

    def prepare_share(self) -> None:
        """Volumes and files the containers map, put into the VM's 9p share: an empty volume is a directory
        there, a ``vfs`` one the host directory bind-mounted there; files are written (blocking: small)."""
        files = {f.name: f for f in self.pod.files}
        volumes = {v.name: v for v in self.pod.volumes}
        for c in self.containers:
            for v in c.spec.volumes:
                volumes.setdefault(v.volume, v.detail)
        for plan in self.containers:
            for mount in plan.spec.volumes:
                target = os.path.join(self.share_dir, payloads.SHARED_VOLUMES, mount.volume)
                volume = volumes.get(mount.volume)
                if volume is not None and volume.source:
                    if not os.path.ismount(target):
                        bind_mount(volume.source, target)
                else:
                    os.makedirs(target, exist_ok=True)
        for plan in self.containers:
            for index, cf in enumerate(plan.spec.files):
                detail = cf.detail or files[cf.filename]
                target = os.path.join(self.share_dir, payloads.SHARED_FILES, plan.container_id, str(index))
                os.makedirs(os.path.dirname(target), exist_ok=True)
                with open(target, "wb") as f:
                    f.write(_file_bytes(detail, f"{plan.spec.name}.files[{index}]"))
                os.chmod(target, cf.perm)
        os.makedirs(self.log_dir, exist_ok=True)

    async def start(self) -> None:
        """STARTPOD, then every container. Raises (AgentError, BadParameter) with nothing half-running."""
        self.prepare_share()
        startpod = self.vm.agent.request_json(codec.STARTPOD, payloads.startpod_payload(self.pod))
        # The NEWCONTAINERs follow STARTPOD at once rather than a round trip each later: the agent runs
        # commands in order, and if STARTPOD fails they fail too ("STARTPOD first"); its error is the one raised.
        starts = [defer.ensureDeferred(self.start_container(plan)) for plan in self.containers
                  if plan.status == "pending"]
        outcomes = await defer.DeferredList([startpod, *starts], consumeErrors=True)
        for ok, result in outcomes:
            if not ok:
                result.raiseException()

    async def start_container(self, plan: ContainerPlan) -> None:
        plan.stdio = plan.stdio or self._allocate_seq()
        plan.stderr = plan.stderr or self._allocate_seq()
        payload = payloads.newcontainer_payload(plan.container_id, plan.spec, plan.image, self.pod,
                                                plan.stdio, plan.stderr)
        self._watch(plan)
        plan.status, plan.started, plan.finished, plan.exit_code = "running", time.time(), None, None
        try:
            await self.vm.agent.request_json(codec.NEWCONTAINER, payload)
        except BaseException as e:
            plan.status = "failed"
            self._outputs.forget(plan.container_id, f"the container did not start: {e}")
            self._exited.pop(plan.container_id, None)
            self.vm.exits.forget(plan.container_id, "init")
            self.vm.streams.detach(plan.stdio)
            self.vm.streams.detach(plan.stderr)
            raise

    def add(self, plan: ContainerPlan) -> None:
        """A container added to the running pod (POST /container/create); started by start_container."""
        self.containers.append(plan)
        self.prepare_share()

    async def signal(self, plan: ContainerPlan, sig: int) -> None:
        await self.vm.agent.request_json(codec.KILLCONTAINER, {"container": plan.container_id, "signal": int(sig)})

    async def remove(self, plan: ContainerPlan) -> None:
        """Forget a container that has exited, in the guest too."""
        await self.vm.agent.request_json(codec.REMOVECONTAINER, {"container": plan.container_id})
        self.containers.remove(plan)

    def adopt(self) -> None:
        """After a daemon restart: listen again for the output and exits of the containers still running."""
        for plan in self.containers:
            if plan.status == "running":
                self._watch(plan)

    def _watch(self, plan: ContainerPlan) -> None:
        # The container's output goes to its broker: the json-file log, logs -f followers, attached clients.
        exit_ = self.vm.exits.watch(plan.container_id, "init")
        broker = self._outputs.open(plan.container_id, self.vm.streams, plan.stdio, plan.stderr,
                                    self.log_path(plan.container_id), plan.spec.tty, self._reactor,
                                    agent=self.vm.agent, starting=plan.status != "running")
        self.vm.streams.attach(plan.stdio, exit_.wrap_sink(broker.sink(STDOUT)))
        if plan.stderr and not plan.spec.tty:
            self.vm.streams.attach(plan.stderr, broker.sink(STDERR))
        d = exit_.when_exited()
        self._exited[plan.container_id] = d
        d.addCallback(self._container_exited, plan)

    def _container_exited(self, status: int, plan: ContainerPlan) -> None:
        self.vm.exits.forget(plan.container_id, "init")
        self.vm.streams.detach(plan.stderr)
        plan.exit_code = status
        plan.status = "succeeded" if status == 0 else "failed"
        plan.finished = time.time()
        log.info("{pod}: container {name} exited with {status}", pod=self.pod.id, name=plan.spec.name,
                 status=status)
        self._on_exit(plan)

    @property
    def finished(self) -> bool:
        return all(p.status in ("succeeded", "failed") for p in self.containers)

    async def stop(self, grace: float = 5.0) -> None:
        """Stop every container, then remove them all in the guest."""
        await self.stop_containers(self.containers, grace)
        for plan in self.containers:
            try:
                await self.vm.agent.request_json(codec.REMOVECONTAINER, {"container": plan.container_id})
            except Exception as e:
                log.info("{pod}: remove {name}: {e}", pod=self.pod.id, name=plan.spec.name, e=e)

    async def stop_containers(self, plans: list[ContainerPlan], grace: float = 5.0) -> None:
        """TERM the running ones of ``plans``, KILL what is left after ``grace``; each ends with an exit."""
        running = [p for p in plans if p.status == "running"]
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if not running:
                break
            for plan in running:
                try:
                    await self.signal(plan, sig)
                except Exception as e:
                    log.info("{pod}: kill {name}: {e}", pod=self.pod.id, name=plan.spec.name, e=e)
            waits = [observe(self._exited[p.container_id]) for p in running if p.container_id in self._exited]
            done = defer.DeferredList(waits, consumeErrors=True)
            timeout = self._reactor.callLater(grace, lambda d=done: d.called or d.cancel())
            try:
                await done
            except defer.CancelledError:
                pass
            if timeout.active():
                timeout.cancel()
            running = [p for p in running if p.status == "running"]
        # What did not report an exit even after SIGKILL is counted as killed (Docker's 137).
        for plan in running:
            self._exited.pop(plan.container_id, None)
            self.vm.exits.forget(plan.container_id, "init")
            plan.exit_code, plan.status, plan.finished = 128 + signal.SIGKILL, "failed", time.time()
            self._on_exit(plan)

    def cleanup_share(self) -> None:
        """Forget this pod's volumes and files in the share, so the VM can serve the next pod clean."""
        for sub in (payloads.SHARED_VOLUMES, payloads.SHARED_FILES):
            remove_tree(os.path.join(self.share_dir, sub))
