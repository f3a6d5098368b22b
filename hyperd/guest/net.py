"""Network commands of the guest agent: SETUPINTERFACE, SETUPROUTE, DELETEINTERFACE (hyperd.md §4.2).

Runs inside the VM, standard library only. Containers share the VM's network namespace. Links and routes
are set with busybox ``ip`` (one short exec each, fine for a handful of calls per pod); the loopback is
brought up with an ioctl right after READY.
"""

import _signal as signal
import _socket
import fcntl
import os
import struct

from hyperd.agent import codec
from hyperd.guest import modules
from hyperd.guest.agent import CommandError, decode_json

BUSYBOX = "/bin/busybox"  # run as "ip": busybox picks the applet from argv[0]
NET_CLASS = "/sys/class/net"

SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
SIOCGIFADDR = 0x8915
SIOCSIFADDR = 0x8916
SIOCSIFNETMASK = 0x891C
SIOCSIFMTU = 0x8922
SIOCADDRT = 0x890B
IFF_UP = 0x1
RTF_UP = 0x1
RTF_GATEWAY = 0x2


def install(agent) -> None:
    handlers = NetCommands(agent)
    agent.register(codec.SETUPINTERFACE, handlers.cmd_setupinterface)
    agent.register(codec.SETUPROUTE, handlers.cmd_setuproute)
    agent.register(codec.DELETEINTERFACE, handlers.cmd_deleteinterface)
    # /etc/hosts names the pod's address: STARTPOD (pod.py) writes the file, we then put the address in.
    startpod = agent.handlers.get(codec.STARTPOD)
    if startpod is not None:
        def cmd_startpod(payload: bytes) -> bytes:
            reply = startpod(payload)
            handlers.update_hosts()
            return reply

        agent.register(codec.STARTPOD, cmd_startpod)


def loopback_up() -> None:
    link_up("lo")


# The common case of a pod's NIC (its first address, MTU, up, a default route) is set with ioctls, as
# ifconfig/route do: a busybox ``ip`` spawn costs tens of ms under TCG, on every pod start. Anything else
# (renames, more addresses, other routes, an address already there) goes through ``ip`` for its semantics
# and its error messages.

def _ioctl(request: int, arg: bytes) -> bytes:
    sock = _socket.socket(_socket.AF_INET, _socket.SOCK_DGRAM)
    try:
        return fcntl.ioctl(sock.fileno(), request, arg)
    finally:
        sock.close()


def _ifname(name: str) -> bytes:
    return name.encode()[:15]


def _sockaddr_in(ip: str) -> bytes:
    return struct.pack("=HH4s8x", _socket.AF_INET, 0, _socket.inet_aton(ip))


def link_up(name: str) -> None:
    flags = struct.unpack_from("16sH", _ioctl(SIOCGIFFLAGS, struct.pack("16sH22x", _ifname(name), 0)))[1]
    _ioctl(SIOCSIFFLAGS, struct.pack("16sH22x", _ifname(name), flags | IFF_UP))


def has_ipv4(name: str) -> bool:
    try:
        _ioctl(SIOCGIFADDR, struct.pack("16s24x", _ifname(name)))
        return True
    except OSError:
        return False


def set_ipv4(name: str, ip: str, prefix: int) -> None:
    mask = ((1 << 32) - 1) ^ ((1 << (32 - prefix)) - 1) if prefix else 0
    _ioctl(SIOCSIFADDR, struct.pack("16s16s8x", _ifname(name), _sockaddr_in(ip)))
    _ioctl(SIOCSIFNETMASK, struct.pack("16s16s8x", _ifname(name), _sockaddr_in(_socket.inet_ntoa(
        mask.to_bytes(4, "big")))))


def set_mtu(name: str, mtu: int) -> None:
    _ioctl(SIOCSIFMTU, struct.pack("16si20x", _ifname(name), mtu))


def add_default_route(gateway: str) -> None:
    """``route add default gw GATEWAY`` (struct rtentry, x86_64 layout; the kernel finds the device)."""
    entry = struct.pack("=8x16s16s16sH2x4x8x8xh6x8x8x8xH6x", _sockaddr_in("0.0.0.0"), _sockaddr_in(gateway),
                        _sockaddr_in("0.0.0.0"), RTF_UP | RTF_GATEWAY, 0, 0)
    _ioctl(SIOCADDRT, entry)


def run_ip(*args: str) -> None:
    """``ip ARGS``, waited for; its output becomes the ERROR message when it fails."""
    read_fd, write_fd = os.pipe()
    try:
        pid = os.posix_spawn(BUSYBOX, ["ip", *args], {"PATH": "/bin:/sbin"},
                             file_actions=[(os.POSIX_SPAWN_DUP2, write_fd, 1), (os.POSIX_SPAWN_DUP2, write_fd, 2)],
                             setsigdef=(signal.SIGPIPE, signal.SIGCHLD))
    except OSError:
        os.close(read_fd)
        raise
    finally:
        os.close(write_fd)
    chunks = []
    while True:
        chunk = os.read(read_fd, 4096)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(read_fd)
    _, status = os.waitpid(pid, 0)
    if status != 0:
        output = b"".join(chunks).decode("utf-8", "replace").strip()
        raise CommandError("ip %s: %s" % (" ".join(args), output or "exit status %d" % (status >> 8)))


def prefix_length(netmask: str) -> int:
    """``"24"`` or ``"255.255.255.0"`` → 24."""
    netmask = netmask.strip()
    if netmask.isdigit():
        return int(netmask)
    try:
        value = int.from_bytes(_socket.inet_aton(netmask), "big")
    except OSError:
        raise CommandError("invalid netMask %r" % netmask) from None
    length = bin(value).count("1")
    if value != ((1 << 32) - 1) ^ ((1 << (32 - length)) - 1):
        raise CommandError("netMask %r is not contiguous" % netmask)
    return length


def find_device(spec: dict) -> str:
    """The interface a command is about: ``device`` (a name), or ``macAddr``."""
    mac = spec.get("macAddr")
    device = spec.get("device")
    if isinstance(device, str) and device and os.path.exists("%s/%s" % (NET_CLASS, device)):
        return device
    if isinstance(mac, str) and mac:
        for name in os.listdir(NET_CLASS):
            try:
                with open("%s/%s/address" % (NET_CLASS, name)) as f:
                    if f.read().strip().lower() == mac.lower():
                        return name
            except OSError:
                continue
    raise CommandError("no network interface %s" % (device or mac or "given"))


HOSTS = "/tmp/hyper/hosts"  # pod.py's HYPER_DIR + "/hosts", bind-mounted on each container's /etc/hosts
HOSTNAME = "/tmp/hyper/hostname"


class NetCommands:
    def __init__(self, agent) -> None:
        self.agent = agent
        self.addresses = []  # the pod's addresses, for /etc/hosts

    def update_hosts(self) -> None:
        """``ADDRESS<TAB>hostname`` in the pod's hosts file, in place of 127.0.1.1 (as Docker's).

        Written in place (not renamed over), so that containers that bind-mounted it see the change."""
        try:
            with open(HOSTNAME) as f:
                hostname = f.read().strip()
            with open(HOSTS) as f:
                lines = f.read().splitlines()
        except OSError:
            return
        if not hostname:
            return
        kept = [line for line in lines if not (line.split()[1:2] == [hostname] and not line.startswith("::"))]
        address = self.addresses[0] if self.addresses else "127.0.1.1"
        kept.append("%s\t%s" % (address, hostname))
        with open(HOSTS, "r+") as f:
            f.write("\n".join(kept) + "\n")
            f.truncate()

    def cmd_setupinterface(self, payload: bytes) -> bytes:
        self.agent.require_deferred(until=modules.NIC_NEEDS)
        spec = decode_json(payload)
        device = find_device(spec)
        new_name = spec.get("newDeviceName") or device
        if not isinstance(new_name, str):
            raise CommandError("newDeviceName must be a string")
        if new_name != device:
            run_ip("link", "set", "dev", device, "down")
            run_ip("link", "set", "dev", device, "name", new_name)
        for index, address in enumerate(spec.get("ipAddresses") or []):
            if not isinstance(address, dict) or not isinstance(address.get("ipAddress"), str):
                raise CommandError("ipAddresses entries need an ipAddress")
            ip = address["ipAddress"]
            mask = address.get("netMask")
            cidr = ip if "/" in ip else "%s/%d" % (ip, prefix_length(str(mask or "32")))
            ip, prefix = cidr.split("/")[0], int(cidr.split("/")[1])
            if index == 0 and ":" not in ip and not has_ipv4(new_name):
                try:
                    set_ipv4(new_name, ip, prefix)
                except OSError:
                    run_ip("addr", "add", cidr, "dev", new_name)
            else:
                run_ip("addr", "add", cidr, "dev", new_name)
            self.addresses.append(ip)
        mtu = spec.get("mtu")
        if mtu:
            try:
                set_mtu(new_name, int(mtu))
            except OSError:
                run_ip("link", "set", "dev", new_name, "mtu", str(int(mtu)))
        try:
            link_up(new_name)
        except OSError:
            run_ip("link", "set", "dev", new_name, "up")
        self.update_hosts()
        return b""

    def cmd_setuproute(self, payload: bytes) -> bytes:
        self.agent.require_deferred(until=modules.NIC_NEEDS)
        spec = decode_json(payload)
        routes = spec.get("routes") or []
        if not isinstance(routes, list):
            raise CommandError("routes must be a list")
        for route in routes:
            if not isinstance(route, dict):
                raise CommandError("routes entries must be objects")
            dest = route.get("dest") or "default"
            if dest in ("0.0.0.0/0", "::/0"):
                dest = "default"
            gateway = route.get("gateway")
            if dest == "default" and isinstance(gateway, str) and gateway.count(".") == 3:
                try:
                    add_default_route(gateway)
                    continue
                except OSError:
                    pass  # one there already (replace it), or a gateway ip will explain
            args = ["route", "replace", dest]
            if route.get("gateway"):
                args += ["via", route["gateway"]]
            if route.get("device"):
                args += ["dev", route["device"]]
            run_ip(*args)
        return b""

    def cmd_deleteinterface(self, payload: bytes) -> bytes:
        spec = decode_json(payload)
        device = find_device(spec)
        run_ip("addr", "flush", "dev", device)
        run_ip("link", "set", "dev", device, "down")
        self.addresses = []
        return b""
