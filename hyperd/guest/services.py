"""Pod services (hyperd's ``services``): inside the VM, ``serviceIP:servicePort`` reaches the service's hosts.

hyperd programmed ipvs in the VM (round robin over ``hosts``). The agent does the same for TCP in its own
loop: the service address is put on ``lo``, a listening socket accepts the pod's connections, and each is
relayed to the next host in turn. Flow control is per direction (a side that does not read stops the other
side being read), and a half-close is passed on (``shutdown(SHUT_WR)``), so request/response protocols that
end their request that way work.

Runs inside the VM, standard library only; STARTPOD configures the services, a pod's end clears them.
"""

import _socket
import errno

from hyperd.guest.agent import CommandError, log

#: Bytes held for a side that does not read before the other side is no longer read.
BUFFER_LIMIT = 256 * 1024

_WOULD_BLOCK = (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINPROGRESS, errno.EINTR)


def _ipv4(value, path: str) -> str:
    if not isinstance(value, str):
        raise CommandError("%s must be an IPv4 address" % path)
    try:
        _socket.inet_aton(value)
    except OSError:
        raise CommandError("%s: %r is not an IPv4 address" % (path, value)) from None
    return value


def _port(value, path: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536:
        raise CommandError("%s: %r is not a port" % (path, value))
    return value


def parse(services) -> list:
    """STARTPOD's ``services`` → ``[(ip, port, [(host ip, host port), ...])]``; CommandError naming the field."""
    if services is None:
        return []
    if not isinstance(services, list):
        raise CommandError("services must be a list")
    out = []
    for i, s in enumerate(services):
        path = "services[%d]" % i
        if not isinstance(s, dict):
            raise CommandError("%s must be an object" % path)
        if str(s.get("protocol") or "tcp").lower() != "tcp":
            raise CommandError("%s.protocol: only tcp services are supported" % path)
        hosts = s.get("hosts") or []
        if not isinstance(hosts, list) or not hosts:
            raise CommandError("%s.hosts: at least one host is needed" % path)
        backends = [(_ipv4(h.get("hostIP") if isinstance(h, dict) else None, "%s.hosts[%d].hostIP" % (path, j)),
                     _port(h.get("hostPort"), "%s.hosts[%d].hostPort" % (path, j))) for j, h in enumerate(hosts)]
        out.append((_ipv4(s.get("serviceIP"), path + ".serviceIP"), _port(s.get("servicePort"), path + ".servicePort"),
                    backends))
    return out


class Services:
    """The pod's services: their addresses on ``lo``, their listening sockets and the relayed connections."""

    def __init__(self, agent, run_ip) -> None:
        self.agent = agent
        self.run_ip = run_ip  # ``ip ARGS`` (hyperd.guest.net.run_ip), to add and remove the addresses
        self.addresses = []
        self.listeners = {}  # fd -> (socket, backends, [next index])
        self.relays = set()

    def configure(self, services) -> None:
        """Replace the services with ``services`` (STARTPOD's field). Raises CommandError, having set up none."""
        wanted = parse(services)
        self.clear()
        try:
            for ip, port, backends in wanted:
                if ip not in self.addresses:
                    self.run_ip("addr", "add", ip + "/32", "dev", "lo")
                    self.addresses.append(ip)
                sock = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)
                sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_REUSEADDR, 1)
                try:
                    sock.bind((ip, port))
                except OSError as e:
                    sock.close()
                    raise CommandError("service %s:%d: %s" % (ip, port, e.strerror)) from None
                sock.listen(128)
                sock.setblocking(False)
                self.listeners[sock.fileno()] = (sock, backends, [0])
                self.agent.add_reader(sock.fileno(), lambda fd=sock.fileno(): self._accept(fd))
        except BaseException:
            self.clear()
            raise

    def clear(self) -> None:
        for relay in list(self.relays):
            relay.close()
        for fd, (sock, _, _) in list(self.listeners.items()):
            self.agent.remove_reader(fd)
            sock.close()
        self.listeners = {}
        for ip in self.addresses:
            try:
                self.run_ip("addr", "del", ip + "/32", "dev", "lo")
            except CommandError as e:
                log("service address %s: %s" % (ip, e))
        self.addresses = []

    def _accept(self, fd: int) -> None:
        sock, backends, turn = self.listeners[fd]
        while True:
            try:
                client_fd, _ = sock._accept()
            except OSError as e:
                if e.errno not in _WOULD_BLOCK:
                    log("service accept: %s" % e)
                return
            client = _socket.socket(fileno=client_fd)
            backend = backends[turn[0] % len(backends)]
            turn[0] += 1
            _Relay(self, client, backend)


class _Side:
    """One socket of a relay and the bytes waiting to be written to it."""

    def __init__(self, sock) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.out = bytearray()
        self.eof_in = False  # its peer's EOF, to be passed on once ``out`` is written
        self.shut = False  # SHUT_WR done
        self.read_eof = False  # it said EOF


class _Relay:
    """One connection to a service, relayed to one host."""

    def __init__(self, services: Services, client, backend) -> None:
        self.services = services
        self.agent = services.agent
        client.setblocking(False)
        server = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)
        server.setblocking(False)
        self.client, self.server = _Side(client), _Side(server)
        self.closed = False
        services.relays.add(self)
        err = server.connect_ex(backend)
        if err not in (0,) + _WOULD_BLOCK:
            self.close()
            return
        self.agent.add_writer(self.server.fd, self._connected)

    def _connected(self) -> None:
        err = self.server.sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_ERROR)
        self.agent.remove_writer(self.server.fd)
        if err:
            self.close()  # the host refused: the pod's connection is closed (ipvs would reset it)
            return
        self._watch(self.client, self.server)
        self._watch(self.server, self.client)

    def _watch(self, source: _Side, sink: _Side) -> None:
        if not source.read_eof and len(sink.out) < BUFFER_LIMIT:
            self.agent.add_reader(source.fd, lambda: self._readable(source, sink))
        else:
            self.agent.remove_reader(source.fd)

    def _readable(self, source: _Side, sink: _Side) -> None:
        try:
            data = source.sock.recv(65536)
        except OSError as e:
            if e.errno in _WOULD_BLOCK:
                return
            data = b""
        if data:
            sink.out += data
        else:
            source.read_eof = True
            sink.eof_in = True
        self._flush(sink)
        self._watch(source, sink)

    def _flush(self, sink: _Side) -> None:
        source = self.server if sink is self.client else self.client
        while sink.out:
            try:
                n = sink.sock.send(sink.out)
            except OSError as e:
                if e.errno in _WOULD_BLOCK:
                    self.agent.add_writer(sink.fd, lambda: self._flush(sink))
                    return
                self.close()  # the reader is gone
                return
            del sink.out[:n]
        self.agent.remove_writer(sink.fd)
        if sink.eof_in and not sink.shut:
            sink.shut = True
            try:
                sink.sock.shutdown(_socket.SHUT_WR)
            except OSError:
                pass
        if self.client.shut and self.server.shut:
            self.close()
            return
        self._watch(source, sink)

    def close(self) -> None:
        if self.closed:
            return  # its fds may be another socket's by now
        self.closed = True
        for side in (self.client, self.server):
            self.agent.remove_reader(side.fd)
            self.agent.remove_writer(side.fd)
            side.sock.close()
        self.services.relays.discard(self)
