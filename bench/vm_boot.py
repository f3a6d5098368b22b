"""Benchmark: spawn → READY of VMs booted through hyperd's VM.boot, against bare qemu on the same files.

In one run, N VMs through ``VM.boot`` (qemu supervised by Twisted, QMP and agent connected, READY and
GETVERSION awaited) and N bare qemu processes (same command line, started with subprocess, a plain socket
connected to hyper.sock until the READY frame arrives), interleaved so that both see the same machine state.
Prints both medians, the ratio, and qemu's RSS per VM at READY.

    .venv/bin/python bench/vm_boot.py [-n 5] [--guest-root DIR]

Goals: median ≤ 2.5 s under TCG; hyperd's overhead over bare qemu ≤ 10 %.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

from twisted.internet import defer, task

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import fmt  # noqa: E402

from hyperd.agent import codec  # noqa: E402
from hyperd.vm import qemu  # noqa: E402
from hyperd.vm.vm import VM  # noqa: E402


def rss_mib(pid: int) -> float:
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def bare_boot(config: qemu.VMConfig, timeout: float = 60.0) -> tuple[float, float]:
    """Spawn qemu with ``config``'s command line, wait for READY on hyper.sock; (seconds, RSS MiB)."""
    os.makedirs(config.path(qemu.SHARE_DIR))
    argv = qemu.build_command(config)
    with open(config.path(qemu.QEMU_LOG), "wb") as log:
        t0 = time.monotonic()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    try:
        deadline = t0 + timeout
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        while True:
            try:
                sock.connect(config.path(qemu.CTL_SOCKET))
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("bare qemu: no control socket") from None
                time.sleep(0.005)
        decoder = codec.CtlDecoder()
        sock.settimeout(max(0.1, deadline - time.monotonic()))
        while True:
            data = sock.recv(4096)
            if not data:
                raise RuntimeError("bare qemu: control socket closed before READY")
            if any(code == codec.READY for code, _ in decoder.feed(data)):
                elapsed = time.monotonic() - t0
                break
        rss = rss_mib(proc.pid)
        sock.close()
        return elapsed, rss
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        shutil.rmtree(config.vm_dir, ignore_errors=True)


READY_TIMES: list[float] = []


async def daemon_boot(reactor, config: qemu.VMConfig) -> tuple[float, float]:
    t0 = time.monotonic()
    vm = await VM.boot(reactor, config, ready_timeout=60)
    elapsed = time.monotonic() - t0
    rss = rss_mib(vm.pid)
    READY_TIMES.append(vm.boot_timings["ready"])
    await vm.stop()
    return elapsed, rss


async def main(reactor, args) -> None:
    from hyperd.guest.initrd import build_guest, kernel_cmdline

    own_root = args.guest_root is None
    root = args.guest_root or tempfile.mkdtemp(prefix="hdb", dir="/tmp")
    run_dir = tempfile.mkdtemp(prefix="hdb", dir="/tmp")
    try:
        guest = build_guest(root)
        append = kernel_cmdline()

        def config():
            return qemu.VMConfig.create(run_dir=run_dir, kernel=guest.kernel, initrd=guest.initrd, append=append,
                                        cpu=1, mem=128, accel="tcg")

        # One untimed boot of each to warm the page cache.
        await daemon_boot(reactor, config())
        bare_boot(config())
        ours, bare, ours_rss, bare_rss = [], [], [], []
        for i in range(args.n):
            for kind in (("ours", "bare") if i % 2 == 0 else ("bare", "ours")):
                if kind == "ours":
                    t, rss = await daemon_boot(reactor, config())
                    ours.append(t)
                    ours_rss.append(rss)
                else:
                    t, rss = bare_boot(config())
                    bare.append(t)
                    bare_rss.append(rss)
                print("  run %d %-4s %.3f s  RSS %.0f MiB" % (i + 1, kind, t, rss), flush=True)
                await task.deferLater(reactor, 0.3, lambda: None)
        m_ours, m_bare = statistics.median(ours), statistics.median(bare)
        print()
        print("hyperd VM.boot  spawn->READY(+GETVERSION) median %.3f s  %s" % (m_ours, fmt(ours)))
        print("hyperd VM.boot  spawn->READY              median %.3f s  %s"
              % (statistics.median(READY_TIMES[1:]), fmt(READY_TIMES[1:])))
        print("bare qemu       spawn->READY              median %.3f s  %s" % (m_bare, fmt(bare)))
        print("ratio hyperd/bare %.3f (overhead %+.1f %%)" % (m_ours / m_bare, (m_ours / m_bare - 1) * 100))
        print("qemu RSS at READY: hyperd median %.0f MiB, bare median %.0f MiB"
              % (statistics.median(ours_rss), statistics.median(bare_rss)))
        print("goals: median <= 2.5 s: %s; overhead <= 10 %%: %s"
              % ("met" if m_ours <= 2.5 else "NOT met", "met" if m_ours <= m_bare * 1.10 else "NOT met"))
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
        if own_root:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-n", type=int, default=5, help="VMs of each kind (default 5)")
    parser.add_argument("--guest-root", help="where the guest kernel/initrd are (built if missing)")
    args = parser.parse_args()
    task.react(lambda reactor: defer.ensureDeferred(main(reactor, args)))
