"""Benchmark: HTTP throughput of a 20 MB file from busybox httpd in a pod, user mode and bridge mode, one run.

- user: a hyperd with the default user-mode network; the pod's port 80 is published on 127.0.0.1 (slirp
  hostfwd) and fetched from the host;
- bridge: a second hyperd, started inside a network namespace made for the run (its own bridge, taps and
  iptables); the file is fetched inside the namespace from the pod's address and through its port mapping
  (iptables DNAT);
- baseline: the same file from busybox httpd on the host's loopback, the ceiling of the client and loopback.

Every fetch is ``curl -o /dev/null`` of the whole file; runs interleave so each sees the same machine.
Prints the median and best MB/s of each and the ratios against the baseline. Nothing leaves loopback or the
namespace; the namespace, the daemons and their VMs are gone at the end, whatever happened.

    .venv/bin/python bench/net.py [-n 5] [--mb 20]
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from common import call, free_port, kill_processes_using  # noqa: E402

from hyperd.guest.initrd import build_guest  # noqa: E402

TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
BUSYBOX = "/bin/busybox"
SUBNET = "192.168.151"


class Daemon:
    def __init__(self, work: str, name: str, guest, prefix: list[str], config: str) -> None:
        self.dir = os.path.join(work, name)
        os.makedirs(self.dir)
        self.sock = os.path.join(self.dir, "h.sock")
        with open(os.path.join(self.dir, "config"), "w") as f:
            f.write(config)
        log = open(os.path.join(self.dir, "daemon.log"), "wb")
        self.proc = subprocess.Popen(
            [*prefix, TWISTD, "-n", "--pidfile=", "hyperd", "--socket", self.sock, "--root",
             os.path.join(self.dir, "root"), "--run-dir", os.path.join(self.dir, "run"), "--accel", "tcg",
             "--kernel", guest.kernel, "--initrd", guest.initrd, "--config", os.path.join(self.dir, "config")],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = time.monotonic() + 60
        while True:
            try:
                # answers 404 once start-up (bridge, iptables) is done
                call(self.sock, "GET", "/pod/none/portmappings")
            except RuntimeError:
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"hyperd did not start, see {self.dir}/daemon.log") from None
                time.sleep(0.1)

    def httpd_pod(self, name: str, mb: int, portmappings: list[dict]) -> dict:
        script = (f"mkdir -p /www && dd if=/dev/urandom of=/www/big bs=1M count={mb} 2>/dev/null && "
                  f"exec httpd -f -p 80 -h /www")
        call(self.sock, "POST", "/pod/create", body={
            "id": name, "resource": {"vcpu": 1, "memory": 256}, "portmappings": portmappings,
            "containers": [{"image": "busybox", "command": ["sh", "-c", script]}]})
        call(self.sock, "POST", "/pod/start", {"podId": name})
        return call(self.sock, "GET", "/pod/info", {"podName": name})

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def curl(url: str, prefix: list[str], expect: int) -> float:
    """One whole download; MB/s (10^6 bytes)."""
    out = subprocess.run([*prefix, "curl", "-sS", "--max-time", "120", "-o", "/dev/null", "-w",
                          "%{http_code} %{size_download} %{time_total}", url],
                         capture_output=True, text=True, check=True).stdout.split()
    code, size, total = int(out[0]), int(out[1]), float(out[2])
    if code != 200 or size != expect:
        raise RuntimeError(f"{url}: HTTP {code}, {size} bytes, expected {expect}")
    return size / total / 1e6


def wait_http(url: str, prefix: list[str], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while subprocess.run([*prefix, "curl", "-sf", "--max-time", "5", "-o", "/dev/null", "-r", "0-0", url]).returncode:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not answer")
        time.sleep(0.3)


def main(n: int, mb: int) -> None:
    work = tempfile.mkdtemp(prefix="hdnb", dir="/tmp")
    ns = "hdnb" + secrets.token_hex(3)
    daemons: list[Daemon] = []
    host_httpd = None
    size = mb * 1024 * 1024
    try:
        subprocess.run(["ip", "netns", "add", ns], check=True)
        in_ns = ["ip", "netns", "exec", ns]
        subprocess.run([*in_ns, "ip", "link", "set", "lo", "up"], check=True)
        guest = build_guest(os.path.join(work, "guest"))

        # baseline: busybox httpd on the host's loopback
        www = os.path.join(work, "www")
        os.makedirs(www)
        with open(os.path.join(www, "big"), "wb") as f:
            f.write(os.urandom(size))
        base_port = free_port()
        host_httpd = subprocess.Popen([BUSYBOX, "httpd", "-f", "-p", f"127.0.0.1:{base_port}", "-h", www])

        user = Daemon(work, "user", guest, [], "Network=user\n")
        daemons.append(user)
        user_port = free_port()
        user.httpd_pod("netuser", mb, [{"containerPort": "80", "hostPort": str(user_port)}])

        bridge = Daemon(work, "bridge", guest, in_ns, f"Network=bridge\nBridge=hdnb0\nBridgeIP={SUBNET}.1/24\n")
        daemons.append(bridge)
        info = bridge.httpd_pod("netbridge", mb, [{"containerPort": "80", "hostPort": "8080"}])
        pod_ip = info["status"]["podIP"][0]

        urls = {
            "baseline (host loopback)": (f"http://127.0.0.1:{base_port}/big", []),
            "user (127.0.0.1 hostfwd)": (f"http://127.0.0.1:{user_port}/big", []),
            "bridge (pod address)": (f"http://{pod_ip}/big", in_ns),
            "bridge (port mapping)": (f"http://{SUBNET}.1:8080/big", in_ns),
        }
        for url, prefix in urls.values():
            wait_http(url, prefix)
            curl(url, prefix, size)  # warm-up: page cache, TCP, the guest's file in memory
        results: dict[str, list[float]] = {k: [] for k in urls}
        order = list(urls)
        for i in range(n):
            for kind in (order if i % 2 == 0 else order[::-1]):
                url, prefix = urls[kind]
                results[kind].append(curl(url, prefix, size))
                print(f"  run {i + 1} {kind:26} {results[kind][-1]:8.1f} MB/s", flush=True)
        print()
        base = statistics.median(results["baseline (host loopback)"])
        print(f"{mb} MiB from busybox httpd, {n} runs each (MB/s = 10^6 bytes/s, curl's time_total):")
        for kind, values in results.items():
            med = statistics.median(values)
            print(f"{kind:26} median {med:8.1f} MB/s  best {max(values):8.1f}  "
                  f"({med / base:.3f} of baseline)")
        user_med = statistics.median(results["user (127.0.0.1 hostfwd)"])
        bridge_med = statistics.median(results["bridge (pod address)"])
        print(f"bridge / user (median)     {bridge_med / user_med:.2f}")
    finally:
        if host_httpd is not None:
            host_httpd.kill()
            host_httpd.wait()
        for d in daemons:
            try:
                d.stop()
            except Exception as e:  # keep cleaning up
                print(f"stopping a daemon: {e}", file=sys.stderr)
        kill_processes_using(work)
        for pid in subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-n", type=int, default=5, help="downloads of each kind (default 5)")
    parser.add_argument("--mb", type=int, default=20, help="file size in MiB (default 20)")
    args = parser.parse_args()
    main(args.n, args.mb)
