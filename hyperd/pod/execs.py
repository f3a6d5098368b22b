"""Execs, and the fan-out of a process's output to the clients that attached to it.

An :class:`OutputBroker` is the one sink of a process's output seqs (a seq takes one sink): it writes the
container's json-file log, tells ``logs -f`` followers that the log grew, and forwards every chunk to each
attached client. Flow control is end to end and bounded: a client whose socket is full pauses the guest's
stream (through ``StreamMux.producer_for``) until it drains; a container's broker disconnects a client that
stays paused longer than ``stall_timeout`` instead of holding the container's output forever.

:data:A :class:`ContainerOutputs` (``daemon.outputs``) maps a container id to its broker. ``Sandbox._watch`` opens
one when a container starts; an attach to a container that has not started yet waits there for it
(``hyperctl run`` attaches before it starts the pod).

The :class:`ExecManager` (``daemon.execs``) keeps exec records: ``create`` checks the container runs,
``start`` sends EXECCMD with output already routed to the caller, ``exit_code`` waits for both the exit
event and the end of output, ``resize`` sends WINSIZE (remembered until the process has started).
Records are kept in the state store too: a restarted daemon knows them (``recover``).
"""

from __future__ import annotations

import os
import secrets
import string
import time
from collections.abc import Callable
from typing import Any, Protocol

import attrs
from twisted.internet import defer
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from zope.interface import implementer

from hyperd.agent import codec
from hyperd.agent.streams import CallbackSink, StreamMux, StreamSink
from hyperd.errors import BadParameter, Conflict, HyperError, NotFound

__all__ = [
    "ATTACH_STALL_TIMEOUT",
    "HYPERSTART",
    "STDERR",
    "STDOUT",
    "ContainerOutputs",
    "ExecManager",
    "ExecRecord",
    "OutputBroker",
    "Subscriber",
    "Subscription",
]

log = Logger()

#: Docker's stream numbers (stdcopy), used for the two outputs of a process.
STDOUT = 1
STDERR = 2

#: The guest's name for "in the VM, outside any container".
HYPERSTART = "hyperstart"

#: How long an attached client may keep a container's output paused before it is disconnected.
ATTACH_STALL_TIMEOUT = 60.0

#: Exec records kept; the oldest finished ones are forgotten beyond this.
MAX_EXECS = 1024

_LETTERS = string.ascii_letters


def new_exec_id() -> str:
    return "exec-" + "".join(secrets.choice(_LETTERS) for _ in range(10))


class Subscriber(Protocol):
    """A client of a process's output (an attach or exec stream)."""

    def output_started(self, subscription: Subscription) -> None: ...

    def output(self, stream: int, data: bytes) -> None: ...

    def output_ended(self, error: str | None) -> None: ...


@implementer(IPushProducer)
class Subscription:
    """One subscriber's link to a broker: register it as the producer of the subscriber's transport (a full
    socket pauses the guest), write the process's stdin through it, ``cancel`` it when the client is gone.

    ``stopProducing`` does nothing: a transport calls it as it closes, and the session cancels explicitly.
    """

    def __init__(self, broker: OutputBroker, subscriber: Subscriber) -> None:
        self.broker = broker
        self.subscriber = subscriber
        self.active = not broker.ended

    @property
    def mux(self) -> StreamMux:
        return self.broker.mux

    def write_input(self, data: bytes) -> bool:
        """Send ``data`` to the process's stdin; False when it can no longer take any."""
        if self.broker.ended or self.mux.closed or not data:
            return False
        self.mux.write(self.broker.stdio, data)
        return True

    def close_input(self) -> None:
        if not self.broker.ended and not self.mux.closed:
            self.mux.close_stdin(self.broker.stdio)

    def pauseProducing(self) -> None:
        self.broker._pause(self)

    def resumeProducing(self) -> None:
        self.broker._resume(self)

    def stopProducing(self) -> None:
        pass

    def cancel(self) -> None:
        self.broker._remove(self)


class OutputBroker:
    """The sink of one process's output seqs; see the module docstring."""

    def __init__(self, mux: StreamMux, stdio: int, stderr: int = 0, logs: dict[int, Any] | None = None,
                 reactor: Any = None, stall_timeout: float | None = None,
                 on_end: Callable[[OutputBroker], None] | None = None) -> None:
        self.mux = mux
        self.stdio = stdio
        self.stderr = stderr
        self.ended = False
        self.error: str | None = None
        self._logs = logs or {}
        self._reactor = reactor
        self._stall_timeout = stall_timeout
        self._on_end = on_end
        self._subs: list[Subscription] = []
        self._paused: dict[Subscription, Any] = {}
        self._upstream_paused = False
        self._watchers: list[tuple[Callable[[], None], Callable[[], None]]] = []
        #: Fires once the process can take stdin (the guest drops stdin sent before its ACK).
        self.input_ready: defer.Deferred = defer.succeed(None)

    def sink(self, stream: int) -> StreamSink:
        """The StreamSink for the seq carrying ``stream``. Only stdout's EOF counts: the guest sends the
        one EOF of a process on its stdio seq once both outputs have closed."""
        if stream == STDOUT:
            return CallbackSink(lambda data: self._data(STDOUT, data), self._eof)
        return CallbackSink(lambda data: self._data(stream, data))

    @property
    def subscribers(self) -> int:
        return len(self._subs)

    def subscribe(self, subscriber: Subscriber) -> Subscription:
        sub = Subscription(self, subscriber)
        if not self.ended:
            self._subs.append(sub)
        subscriber.output_started(sub)
        if self.ended:
            subscriber.output_ended(self.error)
        return sub

    def watch(self, on_written: Callable[[], None], on_end: Callable[[], None]) -> Callable[[], None]:
        """Call ``on_written`` after each chunk reached the log, ``on_end`` once output ended; returns a
        function that stops watching."""
        pair = (on_written, on_end)
        if self.ended:
            on_end()
            return lambda: None
        self._watchers.append(pair)
        return lambda: self._watchers.remove(pair) if pair in self._watchers else None

    def end(self, error: str | None = None) -> None:
        """Output is over (EOF, or the daemon gave up on it): every subscriber and watcher hears it once."""
        if self.ended:
            return
        self.ended, self.error = True, error
        for log_ in self._logs.values():
            log_.stream_eof()
        for call in self._paused.values():
            if call is not None and call.active():
                call.cancel()
        self._paused.clear()
        self._set_upstream_paused(False)
        subs, self._subs = self._subs, []
        for sub in subs:
            sub.active = False
            sub.subscriber.output_ended(error)
        watchers, self._watchers = self._watchers, []
        for _, on_end in watchers:
            on_end()
        if self._on_end is not None:
            self._on_end(self)

    # -- from the mux ----------------------------------------------------------------------------------

    def _data(self, stream: int, data: bytes) -> None:
        if self.ended:
            return
        log_ = self._logs.get(stream)
        if log_ is not None:
            log_.stream_data(data)
        for on_written, _ in list(self._watchers):
            on_written()
        for sub in list(self._subs):
            if sub.active:
                sub.subscriber.output(stream, data)

    def _eof(self) -> None:
        self.end(None)

    # -- flow control ----------------------------------------------------------------------------------

    def _pause(self, sub: Subscription) -> None:
        if not sub.active or sub in self._paused:
            return
        call = None
        if self._stall_timeout is not None and self._reactor is not None:
            call = self._reactor.callLater(self._stall_timeout, self._stalled, sub)
        self._paused[sub] = call
        self._set_upstream_paused(True)

    def _resume(self, sub: Subscription) -> None:
        call = self._paused.pop(sub, None)
        if call is not None and call.active():
            call.cancel()
        if not self._paused:
            self._set_upstream_paused(False)

    def _remove(self, sub: Subscription) -> None:
        if sub in self._subs:
            self._subs.remove(sub)
        sub.active = False
        self._resume(sub)

    def _stalled(self, sub: Subscription) -> None:
        self._paused.pop(sub, None)
        self._remove(sub)
        log.info("output of seq {seq}: a client read nothing for {t:.0f} s; disconnected", seq=self.stdio,
                 t=self._stall_timeout)
        sub.subscriber.output_ended(f"hyperd: disconnected: the client read nothing for "
                                    f"{self._stall_timeout:.0f} s while the container was writing")

    def _set_upstream_paused(self, paused: bool) -> None:
        if paused == self._upstream_paused:
            return
        self._upstream_paused = paused
        if self.mux.closed:
            return
        # A fresh producer each time: never registered with a transport, so its stopProducing (which would
        # detach the seq) is never called.
        producer = self.mux.producer_for(self.stdio)
        if paused:
            producer.pauseProducing()
        else:
            producer.resumeProducing()


class ContainerOutputs:
    """Container id → the broker of its running process; subscribers and watchers that came early wait."""

    def __init__(self) -> None:
        self._brokers: dict[str, OutputBroker] = {}
        self._waiting: dict[str, list[Subscriber]] = {}
        self._waiting_watchers: dict[str, list[tuple[Callable[[], None], Callable[[], None]]]] = {}

    def open(self, container_id: str, mux: StreamMux, stdio: int, stderr: int, log_path: str, tty: bool,
             reactor: Any = None, stall_timeout: float | None = ATTACH_STALL_TIMEOUT, agent: Any = None,
             starting: bool = False) -> OutputBroker:
        """The broker for a container's init that is starting (or was adopted after a restart).

        ``starting``: NEWCONTAINER is about to be sent through ``agent``; stdin may flow once a PING sent
        right behind it is answered (the guest answers in order), which ``broker.input_ready`` tells."""
        from hyperd.pod.sandbox import JSONFileLog

        logs: dict[int, Any] = {STDOUT: JSONFileLog(log_path, "stdout")}
        if stderr and not tty:
            logs[STDERR] = JSONFileLog(log_path, "stderr")
        old = self._brokers.get(container_id)
        if old is not None and not old.ended:
            old.end("hyperd: the container was restarted")
        broker = OutputBroker(mux, stdio, 0 if tty else stderr, logs, reactor, stall_timeout, self._closed)
        self._brokers[container_id] = broker
        broker.container_id = container_id  # type: ignore[attr-defined]
        if starting and agent is not None and reactor is not None:
            broker.input_ready = _after_queued(reactor, agent)
        for on_written, on_end in self._waiting_watchers.pop(container_id, []):
            broker.watch(on_written, on_end)
        for subscriber in self._waiting.pop(container_id, []):
            broker.subscribe(subscriber)
        return broker

    def get(self, container_id: str) -> OutputBroker | None:
        broker = self._brokers.get(container_id)
        if broker is not None and (broker.ended or broker.mux.closed):
            return None
        return broker

    def subscribe(self, container_id: str, subscriber: Subscriber) -> None:
        """Subscribe now if the container's output is live, else as soon as it starts."""
        broker = self.get(container_id)
        if broker is not None:
            broker.subscribe(subscriber)
        else:
            self._waiting.setdefault(container_id, []).append(subscriber)

    def unsubscribe_waiting(self, container_id: str, subscriber: Subscriber) -> None:
        waiting = self._waiting.get(container_id, [])
        if subscriber in waiting:
            waiting.remove(subscriber)
        if not waiting:
            self._waiting.pop(container_id, None)

    def watch(self, container_id: str, on_written: Callable[[], None], on_end: Callable[[], None],
              wait: bool) -> Callable[[], None]:
        """Follow a container's log growth; ``wait``: also if it has not started yet."""
        broker = self.get(container_id)
        if broker is not None:
            return broker.watch(on_written, on_end)
        if not wait:
            on_end()
            return lambda: None
        pair = (on_written, on_end)
        self._waiting_watchers.setdefault(container_id, []).append(pair)

        def cancel() -> None:
            pairs = self._waiting_watchers.get(container_id, [])
            if pair in pairs:
                pairs.remove(pair)
            if not pairs:
                self._waiting_watchers.pop(container_id, None)

        return cancel

    def forget(self, container_id: str, error: str | None = None) -> None:
        """The container is gone: end its broker and everyone waiting for it."""
        broker = self._brokers.pop(container_id, None)
        if broker is not None:
            broker.end(error)
        for subscriber in self._waiting.pop(container_id, []):
            subscriber.output_ended(error)
        for _, on_end in self._waiting_watchers.pop(container_id, []):
            on_end()

    def _closed(self, broker: OutputBroker) -> None:
        cid = getattr(broker, "container_id", None)
        if cid is not None and self._brokers.get(cid) is broker:
            del self._brokers[cid]


def _after_queued(reactor: Any, agent: Any) -> defer.Deferred:
    """Fires once the guest has answered everything queued up to the next turn of the reactor."""
    ready: defer.Deferred = defer.Deferred()

    def ping() -> None:
        d = agent.ping()
        d.addBoth(lambda _: ready.called or ready.callback(None))

    reactor.callLater(0, ping)
    return ready


@attrs.define(eq=False)
class ExecRecord:
    """One exec: a process started in a running container (or in the VM: ``container_id`` hyperstart)."""

    exec_id: str
    container_id: str
    pod_id: str
    args: list[str]
    tty: bool
    container_name: str = ""
    status: str = "created"  # created, starting, running, exited
    exit_code: int | None = None
    error: str | None = None
    stdio: int = 0
    stderr: int = 0
    vm: Any = None
    size: tuple[int, int] | None = None
    stdin_gone: bool = False
    created: float = attrs.field(factory=time.time)
    waiters: list = attrs.field(factory=list)

    @property
    def in_vm(self) -> bool:
        return self.container_id == HYPERSTART


def _exec_failed_code(message: str) -> int:
    """Docker's codes for a command that could not run: 127 not found, 126 not executable."""
    text = message.lower()
    return 127 if ("not found" in text or "no such file" in text) else 126


class ExecManager:
    """``daemon.execs``: exec records, EXECCMD, exit codes, WINSIZE, and the lookups attach and logs need."""

    def __init__(self, daemon: Any, outputs: ContainerOutputs) -> None:
        self.daemon = daemon
        self.outputs = outputs
        self._execs: dict[str, ExecRecord] = {}

    # -- lookups ---------------------------------------------------------------------------------------

    def _running(self, container: str):
        """(pod id, plan, sandbox) of a running container; 404 unknown, 409 not running."""
        pod_id, plan = self.daemon._container_plan(container)
        sandbox = self.daemon._sandboxes.get(pod_id)
        if sandbox is None or plan.status != "running" or sandbox.vm is None or sandbox.vm.streams is None:
            raise Conflict(f"conflict: container {container} is not running")
        return pod_id, plan, sandbox

    def attach_target(self, container: str):
        """The plan of a container one may attach to: running, or not started yet (409 once exited)."""
        pod_id, plan = self.daemon._container_plan(container)
        if plan.status not in ("running", "pending"):
            raise Conflict(f"conflict: container {container} is not running (it {plan.status})")
        return pod_id, plan

    def log_target(self, container: str) -> tuple[str, Any, str]:
        """(json-file log path, plan, pod id) of a container."""
        pod_id, plan = self.daemon._container_plan(container)
        path = os.path.join(self.daemon._log_dir(pod_id), f"{plan.container_id}-json.log")
        return path, plan, pod_id

    def first_container(self, pod: str) -> str:
        """The id of a pod's first container (``hyperctl exec pod-...``); 404 no pod or no container."""
        record = self.daemon._pod_record(pod)
        rows = self.daemon.state.containers(record.pod_id)
        if not rows:
            raise NotFound(f"no such container: pod {pod} has none")
        return rows[0].container_id

    # -- execs -----------------------------------------------------------------------------------------

    def create(self, container: str, args: list[str], tty: bool = False) -> str:
        _check_args(args)
        pod_id, plan, _ = self._running(container)
        record = ExecRecord(new_exec_id(), plan.container_id, pod_id, list(args), tty, plan.spec.name)
        self._remember(record)
        return record.exec_id

    def create_in_vm(self, pod: str, args: list[str], tty: bool = False) -> str:
        _check_args(args)
        record = self.daemon._pod_record(pod)
        sandbox = self.daemon._sandboxes.get(record.pod_id)
        if sandbox is None or sandbox.vm is None or sandbox.vm.streams is None:
            raise Conflict(f"conflict: pod {pod} is not running")
        rec = ExecRecord(new_exec_id(), HYPERSTART, record.pod_id, list(args), tty, HYPERSTART)
        self._remember(rec)
        return rec.exec_id

    def _remember(self, record: ExecRecord) -> None:
        self._execs[record.exec_id] = record
        self._save(record)
        if len(self._execs) > MAX_EXECS:
            for old in sorted(self._execs.values(), key=lambda r: r.created):
                if len(self._execs) <= MAX_EXECS:
                    break
                if old.status in ("exited", "created"):
                    self._execs.pop(old.exec_id, None)
                    self.daemon.state.delete_exec(old.exec_id)

    def _save(self, record: ExecRecord) -> None:
        """The exec's row: a restarted daemon knows it, its exit code, and (while it runs) its streams."""
        self.daemon.state.put_exec(
            record.exec_id, record.pod_id, record.container_id, record.status, record.exit_code,
            {"args": record.args, "tty": record.tty, "name": record.container_name, "error": record.error,
             "stdio": record.stdio, "stderr": record.stderr}, created=record.created)

    def forget_pod(self, pod_id: str) -> None:
        """The pod is removed: so are its execs (its rows go with the pod's)."""
        for record in [r for r in self._execs.values() if r.pod_id == pod_id]:
            del self._execs[record.exec_id]

    def recover(self) -> None:
        """After a daemon restart (the pods are adopted): the execs the previous daemon knew.

        One that was running in a pod still running is watched again: its exit is reported and its code
        kept. Its client went away with the old daemon, so its input ends (a tty gets ^D) and its output is
        read and dropped. One whose pod did not survive ended with it (137).
        """
        for row in self.daemon.state.execs():
            r = row.record
            record = ExecRecord(row.exec_id, row.container_id, row.pod_id, list(r.get("args") or []),
                                bool(r.get("tty")), r.get("name") or "", row.status, row.exit_code,
                                r.get("error"), int(r.get("stdio") or 0), int(r.get("stderr") or 0),
                                created=row.created)
            self._execs[record.exec_id] = record
            if record.status in ("starting", "running"):
                self._readopt(record)

    def _readopt(self, record: ExecRecord) -> None:
        sandbox = self.daemon._sandboxes.get(record.pod_id)
        vm = sandbox.vm if sandbox is not None else None
        if vm is None or vm.streams is None or vm.dead or not record.stdio:
            self._finished(record, 137, "its pod stopped while hyperd was down")
            return
        record.vm, record.status = vm, "running"
        exit_ = vm.exits.watch(record.container_id, record.exec_id)
        vm.streams.attach(record.stdio, exit_.wrap_sink(CallbackSink(lambda data: None, lambda: None)))
        if record.stderr:
            vm.streams.attach(record.stderr, CallbackSink(lambda data: None, lambda: None))
        exit_.when_exited().addCallback(self._exited, record)
        vm.when_dead().addCallback(self._vm_gone, record)
        self.input_gone(record)
        self._save(record)

    def lookup(self, exec_id: str, container: str | None = None) -> ExecRecord:
        """An exec by id; with ``container`` (its id or name, or for a VM exec the pod) it must match."""
        record = self._execs.get(exec_id)
        if record is None:
            raise NotFound(f"no such exec: {exec_id}")
        if container and container not in (record.container_id, record.container_name, record.pod_id):
            row = self.daemon.state.find_container(container)
            pod = self.daemon.state.get_pod(container) or self.daemon.state.get_pod_by_name(container)
            if not ((row is not None and row.container_id == record.container_id)
                    or (pod is not None and pod.pod_id == record.pod_id and record.in_vm)):
                raise NotFound(f"no such exec {exec_id} in container {container}")
        return record

    def check_startable(self, record: ExecRecord) -> None:
        if record.status != "created":
            raise Conflict(f"conflict: exec {record.exec_id} was started already")
        if record.in_vm:
            sandbox = self.daemon._sandboxes.get(record.pod_id)
            if sandbox is None or sandbox.vm is None or sandbox.vm.streams is None:
                raise Conflict(f"conflict: pod {record.pod_id} is not running")
        else:
            self._running(record.container_id)

    async def start(self, record: ExecRecord, subscriber: Subscriber) -> None:
        """Run the exec: route its output to ``subscriber`` (before the process can write), then EXECCMD.

        A failure to start ends the subscriber's output with the guest's message and gives the exec
        Docker's 126/127; it is not raised (the caller's stream is already open)."""
        try:
            self.check_startable(record)
            if self.daemon._vms.get(self._sandbox_of(record).vm.vm_id) is None:
                raise Conflict(f"conflict: the VM of pod {record.pod_id} is stopping")
        except HyperError as e:
            subscriber.output_ended(f"hyperd: {e.message}")  # never subscribed: nothing was started
            return
        record.status = "starting"
        plan = None if record.in_vm else self._running(record.container_id)[1]
        vm = self._sandbox_of(record).vm
        record.vm = vm
        entry = self.daemon._vms.get(vm.vm_id)
        record.stdio = entry.allocate_seq()
        record.stderr = 0 if record.tty else entry.allocate_seq()
        with self.daemon.state.transaction():
            self.daemon._save_vm(entry)  # seqs are never reused, also across a daemon restart
            self._save(record)
        broker = OutputBroker(vm.streams, record.stdio, record.stderr, reactor=self.daemon.reactor)
        exit_ = vm.exits.watch(record.container_id, record.exec_id)
        vm.streams.attach(record.stdio, exit_.wrap_sink(broker.sink(STDOUT)))
        if record.stderr:
            vm.streams.attach(record.stderr, broker.sink(STDERR))
        broker.subscribe(subscriber)
        try:
            await vm.agent.request_json(codec.EXECCMD, {"container": record.container_id,
                                                        "process": self._process(record, plan)})
        except Exception as e:
            message = getattr(e, "message", None) or str(e)
            vm.exits.forget(record.container_id, record.exec_id)
            if not vm.streams.closed:
                vm.streams.detach(record.stdio)
                if record.stderr:
                    vm.streams.detach(record.stderr)
            self._finished(record, _exec_failed_code(message), message)
            broker.end(f"hyperd: exec failed: {message}")
            return
        record.status = "running"
        self._save(record)
        exit_.when_exited().addCallback(self._exited, record)
        vm.when_dead().addCallback(self._vm_gone, record)
        if record.stdin_gone:
            self.input_gone(record)
        if record.size is not None:
            await self._winsize(record, *record.size)

    def _sandbox_of(self, record: ExecRecord):
        return self.daemon._sandboxes[record.pod_id]

    def _process(self, record: ExecRecord, plan) -> dict:
        from hyperd.pod import payloads

        if plan is None:
            return payloads.process_payload(record.exec_id, record.args, [], "/", record.tty, record.stdio,
                                            record.stderr)
        spec, image = plan.spec, plan.image
        config = image.run_config
        user, _, group = (spec.user.name or (config.get("User") or "")).partition(":")
        return payloads.process_payload(
            record.exec_id, record.args, payloads.environment(spec, image),
            spec.workdir or config.get("WorkingDir") or "/", record.tty, record.stdio, record.stderr,
            user, spec.user.group or group, spec.user.additional_groups)

    def _exited(self, status: int, record: ExecRecord) -> None:
        vm = record.vm
        vm.exits.forget(record.container_id, record.exec_id)
        if record.stderr and not vm.streams.closed:
            vm.streams.detach(record.stderr)
        self._finished(record, status)

    def _vm_gone(self, reason: str, record: ExecRecord) -> None:
        """The VM ended with the exec still running: no exit event will come, it ended with the VM."""
        if record.status != "exited":
            self._finished(record, 137, f"its VM stopped: {reason}")

    def _finished(self, record: ExecRecord, code: int, error: str | None = None) -> None:
        record.status, record.exit_code, record.error = "exited", code, error
        if record.exec_id in self._execs:
            self._save(record)
        waiters, record.waiters = record.waiters, []
        for d in waiters:
            if not d.called:
                d.callback(code)

    async def exit_code(self, container: str | None, exec_id: str) -> int:
        """Wait until the exec has exited (its exit event and the end of its output); its code."""
        record = self.lookup(exec_id, container)
        if record.status == "exited":
            return record.exit_code
        if record.status == "created":
            raise Conflict(f"conflict: exec {exec_id} has not been started")
        d: defer.Deferred = defer.Deferred()
        record.waiters.append(d)
        return await d

    def input_gone(self, record: ExecRecord) -> None:
        """The exec's client went away: its stdin ends (a tty gets ^D); the process runs on, unread."""
        if record.status == "starting":
            record.stdin_gone = True  # the guest takes stdin only after its ACK: done in start()
            return
        if record.status != "running" or record.vm is None or record.vm.streams.closed:
            return
        if record.tty:
            record.vm.streams.write(record.stdio, b"\x04")
        else:
            record.vm.streams.close_stdin(record.stdio)

    # -- tty -------------------------------------------------------------------------------------------

    async def resize(self, container: str | None, exec_id: str | None, height: int, width: int) -> None:
        if not (0 < height <= 0xFFFF and 0 < width <= 0xFFFF):
            raise BadParameter(f"bad parameter: h and w must be between 1 and 65535, not {height}x{width}")
        if exec_id:
            record = self.lookup(exec_id, container)
            if not record.tty:
                raise Conflict(f"conflict: exec {exec_id} has no terminal")
            if record.status in ("created", "starting"):
                record.size = (height, width)  # sent once the process runs
                return
            if record.status != "running":
                raise Conflict(f"conflict: exec {exec_id} is not running")
            await self._winsize(record, height, width)
            return
        if not container:
            raise BadParameter("bad parameter: container is required")
        _, plan, sandbox = self._running(container)
        if not plan.spec.tty:
            raise Conflict(f"conflict: container {container} has no terminal")
        await sandbox.vm.agent.request_json(codec.WINSIZE, {"container": plan.container_id, "process": "init",
                                                            "row": height, "column": width})

    async def _winsize(self, record: ExecRecord, height: int, width: int) -> None:
        record.size = (height, width)
        try:
            await record.vm.agent.request_json(codec.WINSIZE, {"container": record.container_id,
                                                               "process": record.exec_id,
                                                               "row": height, "column": width})
        except Exception as e:
            if record.status == "running":
                raise
            log.info("resize of {exec_id} after its end: {e}", exec_id=record.exec_id, e=e)


def _check_args(args: Any) -> None:
    if not isinstance(args, list) or not args or not all(isinstance(a, str) for a in args):
        raise BadParameter("bad parameter: command must be a non-empty JSON array of strings")
    if not args[0]:
        raise BadParameter("bad parameter: command[0] is empty")
