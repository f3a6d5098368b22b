"""Benchmark: exec output through hyperd's API (hijacked stream) against the agent's stream channel read directly.

In one run, alternating:
- **api**: a hyperd daemon (``twistd hyperd`` subprocess) runs a pod; we ``POST /exec/create`` +
  ``/exec/start`` ``dd if=/dev/zero bs=64k count=N`` in its container and read the stdcopy-framed stream with
  hyperd's client (hyperd.client.streams) over the UNIX socket: guest → stream channel → daemon → socket →
  client, with flow control at each hop;
- **direct**: a VM booted in this process with ``hyperd.vm.VM.boot``; EXECCMD runs the same ``dd`` in the VM
  and we count its bytes straight off the agent's stream channel (``vm.streams``), no daemon, no socket.

Prints each run, the medians in MB/s and the ratio api/direct (goal >= 0.8).

    .venv/bin/python bench/stream.py [-n 7] [--count 3200] [--guest-root DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

from twisted.internet import defer, task

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from common import call, fmt, kill_processes_using  # noqa: E402

from hyperd.agent import codec  # noqa: E402
from hyperd.agent.streams import CallbackSink  # noqa: E402
from hyperd.client import HyperClient  # noqa: E402
from hyperd.client.streams import StreamClient  # noqa: E402
from hyperd.vm import qemu  # noqa: E402
from hyperd.vm.vm import VM  # noqa: E402

TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
BS = 65536


class Daemon:
    """A hyperd in a subprocess with its own root, run dir and socket."""

    def __init__(self, guest) -> None:
        self.dir = tempfile.mkdtemp(prefix="hdb", dir="/tmp")
        self.sock = os.path.join(self.dir, "h.sock")
        config = os.path.join(self.dir, "config")
        open(config, "w").close()
        profile = os.environ.get("BENCH_PROFILE")  # a path: the daemon runs under cProfile, stats saved there
        prof = ["--profiler=cprofile", f"--profile={profile}", "--savestats"] if profile else []
        argv = [TWISTD, "-n", "--pidfile=", *prof, "hyperd", "--socket", self.sock, "--root", f"{self.dir}/root",
                "--run-dir", f"{self.dir}/run", "--accel", "tcg", "--config", config,
                "--kernel", guest.kernel, "--initrd", guest.initrd]
        self.log = open(os.path.join(self.dir, "daemon.log"), "ab")
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, cwd=self.dir,
                                     start_new_session=True)
        deadline = time.monotonic() + 60
        while True:
            try:
                if call(self.sock, "GET", "/_ping") == "OK":
                    break
            except OSError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise SystemExit("hyperd did not start; see " + self.log.name)
            time.sleep(0.1)

    def api(self, method: str, path: str, params: dict | None = None, body=None):
        return call(self.sock, method, path, params, body)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        kill_processes_using(self.dir)  # anything left from its run dir (a VM's qemu)
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


async def through_api(streams: StreamClient, count: int) -> float:
    got = [0]

    def output(stream: int, data: bytes) -> None:
        if stream == 1:
            got[0] += len(data)
        elif stream in (2, 3) and b"records" not in data:
            sys.stderr.write(data.decode(errors="replace"))

    t0 = time.monotonic()
    exec_id = await streams.exec_create("bench", ["dd", "if=/dev/zero", f"bs={BS}", f"count={count}"])
    proto = await streams.exec_start("bench", exec_id, output)
    proto.close_stdin()
    await proto.done
    elapsed = time.monotonic() - t0
    if got[0] != count * BS:
        raise SystemExit(f"api: got {got[0]} bytes, expected {count * BS}")
    return elapsed


async def direct(vm: VM, seqs: list[int], count: int) -> float:
    stdio, stderr = seqs.pop(0), seqs.pop(0)
    got = [0]
    done: defer.Deferred = defer.Deferred()
    vm.streams.attach(stdio, CallbackSink(lambda d: got.__setitem__(0, got[0] + len(d)),
                                          lambda: done.callback(None)))
    vm.streams.attach(stderr, CallbackSink(lambda d: None))
    t0 = time.monotonic()
    await vm.agent.request_json(codec.EXECCMD, {"container": "hyperstart", "process": {
        "id": f"dd{stdio}", "args": ["dd", "if=/dev/zero", f"bs={BS}", f"count={count}"],
        "stdio": stdio, "stderr": stderr, "terminal": False}})
    await done
    elapsed = time.monotonic() - t0
    vm.streams.detach(stderr)
    if got[0] != count * BS:
        raise SystemExit(f"direct: got {got[0]} bytes, expected {count * BS}")
    return elapsed


async def main(reactor, args) -> None:
    from hyperd.guest.initrd import build_guest, kernel_cmdline

    own_root = args.guest_root is None
    root = args.guest_root or tempfile.mkdtemp(prefix="hdb", dir="/tmp")
    run_dir = tempfile.mkdtemp(prefix="hdb", dir="/tmp")
    daemon = vm = client = None
    try:
        guest = build_guest(root)
        daemon = Daemon(guest)
        pod = daemon.api("POST", "/pod/create", body={"id": "bench", "containers": [
            {"name": "bench", "image": "busybox", "command": ["sleep", "100000"]}]})["ID"]
        daemon.api("POST", "/pod/start", {"podId": pod})
        client = HyperClient(reactor, daemon.sock)
        streams = StreamClient(client)
        config = qemu.VMConfig.create(run_dir=run_dir, kernel=guest.kernel, initrd=guest.initrd,
                                      append=kernel_cmdline(), cpu=1, mem=128, accel="tcg")
        vm = await VM.boot(reactor, config, ready_timeout=60)
        seqs = list(range(1, 1000))
        mb = args.count * BS / 1e6
        # one untimed run of each: page cache, JIT-less warm-up of both paths
        await through_api(streams, min(args.count, 160))
        await direct(vm, seqs, min(args.count, 160))
        api, raw = [], []
        for i in range(args.n):
            for kind in (("api", "direct") if i % 2 == 0 else ("direct", "api")):
                if kind == "api":
                    t = await through_api(streams, args.count)
                    api.append(mb / t)
                else:
                    t = await direct(vm, seqs, args.count)
                    raw.append(mb / t)
                print("  run %d %-6s %.1f MB in %.3f s = %.0f MB/s" % (i + 1, kind, mb, t, mb / t), flush=True)
                await task.deferLater(reactor, 0.2, lambda: None)
        m_api, m_raw = statistics.median(api), statistics.median(raw)
        print()
        print("exec dd bs=64k count=%d (%.0f MB), %d runs each" % (args.count, mb, args.n))
        print("through the API (hijacked stream, stdcopy frames)  median %.0f MB/s  %s" % (m_api, fmt(api, 0)))
        print("agent stream channel, read directly               median %.0f MB/s  %s" % (m_raw, fmt(raw, 0)))
        b_api, b_raw = max(api), max(raw)
        print("best: api %.0f MB/s, direct %.0f MB/s, ratio %.2f (this machine is shared: the best runs are "
              "the least disturbed)" % (b_api, b_raw, b_api / b_raw))
        print("ratio api/direct of the medians %.2f (goal >= 0.8: %s)"
              % (m_api / m_raw, "met" if m_api / m_raw >= 0.8 else "NOT met"))
    finally:
        if client is not None:
            await client.close()
        if vm is not None:
            await vm.stop()
        if daemon is not None:
            daemon.close()
        shutil.rmtree(run_dir, ignore_errors=True)
        if own_root:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-n", type=int, default=7, help="runs of each kind (default 7)")
    parser.add_argument("--count", type=int, default=3200, help="dd blocks of 64 KiB (default 3200 = 210 MB)")
    parser.add_argument("--guest-root", help="where the guest kernel/initrd are (built if missing)")
    args = parser.parse_args()
    task.react(lambda reactor: defer.ensureDeferred(main(reactor, args)))
