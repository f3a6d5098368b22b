"""PID 1 of the guest: mount the pseudo filesystems, load the virtio modules, find the ports, run the agent.

The initramfs's ``/init`` is ``#!/usr/bin/python3.11 -SP`` calling ``main()``. ``PYTHONHASHSEED=0`` comes from
the kernel command line (unknown ``k=v`` parameters become init's environment), so Python does not wait for
the crng at start. PID 1 must never exit (the kernel would panic): any fatal error powers the VM off.
"""

import os
import time

from hyperd.agent import codec
from hyperd.guest import linux, modules, net, pod
from hyperd.guest.agent import Agent, describe_exception, log

PORTS_DIR = "/sys/class/virtio-ports"

#: How long to wait for the virtio-serial ports to appear after virtio_console is loaded.
PORT_TIMEOUT = 20.0


#: ``HYPERD_DEBUG=1`` on the kernel command line logs boot stages with the guest's uptime to the console.
DEBUG = bool(os.environ.get("HYPERD_DEBUG"))


def stage(name: str) -> None:
    if DEBUG:
        log("%s at %.3f s" % (name, time.clock_gettime(time.CLOCK_BOOTTIME)))


def mount_pseudo_filesystems() -> None:
    for source, target, fstype, flags, data in (
        ("proc", "/proc", "proc", linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC, None),
        ("sysfs", "/sys", "sysfs", linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC, None),
        ("devtmpfs", "/dev", "devtmpfs", linux.MS_NOSUID, "mode=0755"),
        ("devpts", "/dev/pts", "devpts", linux.MS_NOSUID | linux.MS_NOEXEC, "gid=5,mode=0620,ptmxmode=0666"),
        ("tmpfs", "/dev/shm", "tmpfs", linux.MS_NOSUID | linux.MS_NODEV, "mode=1777"),
        ("tmpfs", "/tmp", "tmpfs", linux.MS_NOSUID | linux.MS_NODEV, "mode=1777"),
        ("tmpfs", "/run", "tmpfs", linux.MS_NOSUID | linux.MS_NODEV, "mode=0755"),
    ):
        os.makedirs(target, exist_ok=True)
        try:
            linux.mount(source, target, fstype, flags, data)
        except OSError as e:
            log("mount %s: %s" % (target, e))


def load_module(name: str) -> None:
    path = "%s/%s.ko" % (modules.MODULE_DIR, name)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return  # built into this kernel, or not shipped
    try:
        linux.finit_module(fd)
    except OSError as e:
        if e.errno != 17:  # EEXIST: already loaded
            log("insmod %s: %s" % (name, e))
    finally:
        os.close(fd)


def find_ports(names, timeout: float) -> dict:
    """``{name: /dev/vportNpM}`` for the named ports, waiting for them (they appear asynchronously)."""
    found = {}
    deadline = time.monotonic() + timeout
    while True:
        try:
            entries = os.listdir(PORTS_DIR)
        except FileNotFoundError:
            entries = []
        for entry in entries:
            try:
                with open("%s/%s/name" % (PORTS_DIR, entry), "rb") as f:
                    name = f.read().strip(b"\0\n ").decode()
            except OSError:
                continue
            if name in names and os.path.exists("/dev/" + entry):
                found[name] = "/dev/" + entry
        if len(found) == len(names) or time.monotonic() >= deadline:
            return found
        time.sleep(0.002)


def open_port(path: str) -> int:
    return os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOCTTY)


def main() -> None:
    stage("python")
    try:
        os.environ.setdefault("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        mount_pseudo_filesystems()
        stage("init")
        for name in modules.SERIAL:
            load_module(name)
        stage("serial modules")
        ports = find_ports((codec.CTL_CHANNEL, codec.STREAM_CHANNEL), PORT_TIMEOUT)
        if codec.CTL_CHANNEL not in ports:
            raise RuntimeError("control port %s not found" % codec.CTL_CHANNEL)
        ctl = open_port(ports[codec.CTL_CHANNEL])
        stream = open_port(ports[codec.STREAM_CHANNEL]) if codec.STREAM_CHANNEL in ports else None
        if stream is None:
            log("stream port %s not found; running without it" % codec.STREAM_CHANNEL)
        # After READY, while the agent is idle: the loopback up, the other kernel modules, then (if no pod has
        # come yet) the 9p shares mounted and the next pod's init process made.
        idle = [("lo", net.loopback_up)] + [(name, _loader(name)) for name in modules.DEFERRED]
        agent = Agent(ctl, stream, deferred_loads=idle)
        pods = pod.install(agent)
        agent.deferred.extend([("shares", pods.premount_shares), ("pod init", pods.prefork_pod_init)])
        net.install(agent)
        stage("ports")
        agent.send_ready()
        stage("ready")
        agent.run()
    except BaseException as e:
        log("fatal: %s" % describe_exception(e))
    finally:
        try:
            linux.power_off()
        except BaseException as e:
            log("power off: %s" % e)
        while True:  # PID 1 must not exit
            time.sleep(3600)


def _loader(name: str):
    return lambda: load_module(name)
