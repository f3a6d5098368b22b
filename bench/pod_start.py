"""Benchmark: pod start through a real hyperd, against a bare qemu boot of the same guest, in one run.

- bare: qemu spawned by hand on the same kernel, initrd and devices, until the agent's READY (bench/vm_boot.py);
- cold: ``POST /pod/create`` + ``POST /pod/start`` (a new VM) until ``GET /exitcode`` of a busybox ``true``
  answers, i.e. the container has run and exited;
- warm: the same into an idle VM from ``POST /vm/create`` (``vmId=``), which does not boot; the VM is left
  idle for a second first, as a VM waiting in a pool would be;
- factory: a second daemon with ``VmFactoryPolicy={"cache":1,"cpu":1,"memory":128}``: the same create + start
  without a ``vmId`` (what a user does), once the factory has a VM booted ahead and idle for a second.

Runs interleave so each kind sees the same machine. Prints medians and the ratios cold/bare and warm/cold.

    .venv/bin/python bench/pod_start.py [-n 5]

Goals: cold / bare <= 1.15; warm <= 10 % of cold.
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

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from common import call, kill_processes_using  # noqa: E402
from vm_boot import bare_boot  # noqa: E402

from hyperd.guest.initrd import build_guest, kernel_cmdline  # noqa: E402
from hyperd.vm import qemu  # noqa: E402


def pod_run(sock_path: str, name: str, vm_id: str | None = None) -> float:
    t0 = time.monotonic()
    call(sock_path, "POST", "/pod/create", body={"id": name, "containers": [{"image": "busybox",
                                                                               "command": ["true"]}]})
    call(sock_path, "POST", "/pod/start", {"podId": name, **({"vmId": vm_id} if vm_id else {})})
    code = call(sock_path, "GET", "/exitcode", {"container": f"{name}-busybox-0"})
    elapsed = time.monotonic() - t0
    assert code == 0, code
    return elapsed


def start_daemon(work: str, name: str, guest, config: str = "") -> tuple[subprocess.Popen, str]:
    """A hyperd with its own root, run dir and socket under ``work``; (process, socket path) once it answers."""
    base = os.path.join(work, name)
    os.makedirs(base)
    sock_path = os.path.join(base, "h.sock")
    config_path = os.path.join(base, "config")
    with open(config_path, "w") as f:
        f.write(config)
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    log = open(os.path.join(base, "daemon.log"), "wb")
    daemon = subprocess.Popen([twistd, "-n", "--pidfile=", "hyperd", "--socket", sock_path, "--root",
                               os.path.join(base, "root"), "--run-dir", os.path.join(base, "run"),
                               "--config", config_path, "--accel", "tcg", "--kernel", guest.kernel,
                               "--initrd", guest.initrd],
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 30
    while True:
        try:
            call(sock_path, "GET", "/list", {"item": "vm"})  # answers once start-up is over
            return daemon, sock_path
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError("hyperd did not start") from None
            time.sleep(0.05)


def idle_vms(sock_path: str) -> list[str]:
    return [v for v in call(sock_path, "GET", "/list", {"item": "vm"})["vmData"] if v.endswith(":idle")]


def main(n: int) -> None:
    work = tempfile.mkdtemp(prefix="hdb", dir="/tmp")
    daemons = []
    try:
        guest = build_guest(os.path.join(work, "guest"))
        daemon, sock_path = start_daemon(work, "plain", guest)
        daemons.append(daemon)
        policy = '{"cache":1,"cpu":1,"memory":128}'
        factory_daemon, factory_sock = start_daemon(work, "factory", guest, f"VmFactoryPolicy={policy}\n")
        daemons.append(factory_daemon)
        append = kernel_cmdline()
        bare_dir = os.path.join(work, "bare")
        os.makedirs(bare_dir)

        def bare(i: int = 0) -> float:
            config = qemu.VMConfig.create(run_dir=bare_dir, kernel=guest.kernel, initrd=guest.initrd,
                                          append=append, cpu=1, mem=128, accel="tcg",
                                          images_dir=os.path.join(work, "plain", "root", "images"))
            return bare_boot(config)[0]

        def cold(i: int) -> float:
            return pod_run(sock_path, f"cold{i}")

        def factory_ready() -> None:
            deadline = time.monotonic() + 60
            while not idle_vms(factory_sock):
                if time.monotonic() > deadline:
                    raise RuntimeError("the factory booted no VM")
                time.sleep(0.05)

        def factory(i: int) -> float:
            factory_ready()
            time.sleep(1.0)
            elapsed = pod_run(factory_sock, f"factory{i}")
            factory_ready()  # its replacement booted before the next run is measured
            return elapsed

        def warm(i: int) -> float:
            vm_id = call(sock_path, "POST", "/vm/create")["ID"]
            # An idle VM waits in a pool: by the time a pod comes, its guest has loaded its modules.
            time.sleep(1.0)
            return pod_run(sock_path, f"warm{i}", vm_id)

        pod_run(sock_path, "warmup")  # page cache, image store
        bare()
        results: dict[str, list[float]] = {"bare": [], "cold": [], "warm": [], "factory": []}
        runs = {"bare": bare, "cold": cold, "warm": warm, "factory": factory}
        for i in range(n):
            for kind in (("bare", "cold", "warm", "factory") if i % 2 == 0 else ("factory", "warm", "cold", "bare")):
                t = runs[kind](i)
                results[kind].append(t)
                print(f"  run {i + 1} {kind:4} {t:.3f} s", flush=True)
                time.sleep(0.3)
        m = {k: statistics.median(v) for k, v in results.items()}
        print()
        for kind, label in (("bare", "bare qemu spawn->READY"), ("cold", "cold pod create+start->exit"),
                            ("warm", "warm pod (idle VM)->exit"), ("factory", "factory pod (no vmId)->exit")):
            print(f"{label:30} median {m[kind]:.3f} s  [{' '.join('%.2f' % v for v in results[kind])}]")
        print(f"cold / bare  {m['cold'] / m['bare']:.3f}  (goal <= 1.15: "
              f"{'met' if m['cold'] / m['bare'] <= 1.15 else 'NOT met'})")
        print(f"warm / cold  {m['warm'] / m['cold']:.3f}  (goal <= 0.10: "
              f"{'met' if m['warm'] / m['cold'] <= 0.10 else 'NOT met'})")
        print(f"factory / cold  {m['factory'] / m['cold']:.3f}  (a pod started as users do, with a VmFactoryPolicy)")
    finally:
        for daemon in daemons:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(30)
        # VMs outlive the daemon by design: kill what this run left.
        kill_processes_using(work)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-n", type=int, default=5, help="runs of each kind (default 5)")
    main(parser.parse_args().n)
