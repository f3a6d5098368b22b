"""Pod commands against the real guest under qemu TCG, with a busybox image shared read-only over 9p.

One VM and one pod serve the whole module (a boot costs seconds under TCG); each test uses its own
container ids and stream seqs.
"""

import base64
import itertools
import os
import shutil
import subprocess
import tempfile

import pytest

from hyperd.agent import codec

IMAGE = "bbimg"


@pytest.fixture(scope="module")
def images_dir():
    """``<tmp>/images/bbimg/rootfs``: busybox-static, its applet links, /etc/passwd and /etc/group."""
    top = tempfile.mkdtemp(prefix="hdimg", dir="/tmp")
    rootfs = os.path.join(top, IMAGE, "rootfs")
    try:
        for d in ("bin", "etc", "root", "tmp"):
            os.makedirs(os.path.join(rootfs, d))
        shutil.copy("/bin/busybox", os.path.join(rootfs, "bin", "busybox"))
        applets = subprocess.run(["/bin/busybox", "--list"], capture_output=True, text=True, check=True).stdout
        for applet in applets.split():
            if applet != "busybox":
                os.symlink("busybox", os.path.join(rootfs, "bin", applet))
        with open(os.path.join(rootfs, "etc", "passwd"), "w") as f:
            f.write("root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/sh\n")
        with open(os.path.join(rootfs, "etc", "group"), "w") as f:
            f.write("root:x:0:\nnogroup:x:65534:\n")
        with open(os.path.join(rootfs, "etc", "motd"), "w") as f:
            f.write("from the image\n")
        yield top
    finally:
        shutil.rmtree(top, ignore_errors=True)


@pytest.fixture(scope="module")
def pod(guest_files, images_dir, guest_vm_class):
    vm = guest_vm_class(guest_files, images_dir=images_dir)
    try:
        vm.start()
        vm.wait_ready()
        vm.ok(codec.STARTPOD, {"hostname": "testpod", "dns": ["10.0.2.3"], "dnsSearch": ["example.com"],
                               "shareDir": "share_dir"})
        yield vm
    finally:
        vm.kill()


_seqs = itertools.count(1)
_ids = itertools.count(1)


def new_seqs():
    return next(_seqs), next(_seqs)


def run_container(vm, args, cid=None, image=IMAGE, extra=None, **process):
    """NEWCONTAINER with a busybox image; returns (cid, stdio seq, stderr seq)."""
    cid = cid or "c%d" % next(_ids)
    stdio, stderr = new_seqs()
    spec = {"id": process.pop("id", "init"), "args": args, "stdio": stdio, "stderr": stderr, "workdir": "/"}
    spec.update(process)
    payload = {"id": cid, "image": "images/" + image, "rootfs": "rootfs", "process": spec}
    payload.update(extra or {})
    vm.ok(codec.NEWCONTAINER, payload)
    return cid, stdio, stderr


def finish(vm, cid, stdio, process="init"):
    """Wait for both the exit event and the stdio EOF (the host's rule) → (status, stdout)."""
    event = vm.wait_event(cid, process)
    out = vm.wait_eof(stdio)
    assert event["event"] == "finished"
    return event["status"], out


@pytest.mark.timeout(180)
def test_echo_hello_prints_and_exits_zero(pod):
    cid, stdio, stderr = run_container(pod, ["echo", "hello"])
    status, out = finish(pod, cid, stdio)
    assert (status, out) == (0, b"hello\n")
    assert stderr not in pod.eof  # the one EOF goes on the stdio seq only


@pytest.mark.timeout(120)
def test_exit_code_is_reported(pod):
    cid, stdio, _ = run_container(pod, ["sh", "-c", "exit 3"])
    assert finish(pod, cid, stdio) == (3, b"")


@pytest.mark.timeout(120)
def test_stderr_goes_to_its_own_seq(pod):
    cid, stdio, stderr = run_container(pod, ["sh", "-c", "echo out; echo err >&2; echo out2"])
    status, out = finish(pod, cid, stdio)
    assert status == 0
    assert out == b"out\nout2\n"
    assert bytes(pod.streams[stderr]) == b"err\n"


@pytest.mark.timeout(120)
def test_stdin_is_echoed_through_cat_until_eof(pod):
    cid, stdio, _ = run_container(pod, ["cat"])
    for piece in (b"line one\n", b"line ", b"two\n"):
        pod.send_stream(stdio, piece)
    pod.wait_output(stdio, b"line one\nline two\n")
    pod.send_stream(stdio, b"")  # closes cat's stdin
    assert finish(pod, cid, stdio) == (0, b"line one\nline two\n")


@pytest.mark.timeout(120)
def test_environment_workdir_user_hostname_and_dns(pod):
    cid, stdio, _ = run_container(
        pod, ["sh", "-c", "echo $GREETING; pwd; id -u; hostname; cat /etc/resolv.conf; echo $$"],
        envs=[{"env": "GREETING", "value": "hi there"}], workdir="/tmp/work", user="nobody")
    status, out = finish(pod, cid, stdio)
    lines = out.decode().splitlines()
    assert status == 0
    assert lines[:4] == ["hi there", "/tmp/work", "65534", "testpod"]
    assert "nameserver 10.0.2.3" in lines and "search example.com" in lines
    assert int(lines[-1]) > 1  # PID 1 of the pod's namespace is the pod init, not the container


@pytest.mark.timeout(120)
def test_containers_share_the_pod_pid_namespace(pod):
    a, a_stdio, _ = run_container(pod, ["sleep", "1000"])
    b, b_stdio, _ = run_container(pod, ["sh", "-c", "ps -o comm | sort | uniq"])
    status, out = finish(pod, b, b_stdio)
    assert status == 0
    assert b"sleep" in out.split()
    pod.ok(codec.KILLCONTAINER, {"container": a, "signal": 9})
    assert finish(pod, a, a_stdio) == (128 + 9, b"")


@pytest.mark.timeout(120)
def test_killcontainer_reports_128_plus_signal(pod):
    cid, stdio, _ = run_container(pod, ["sleep", "1000"])
    pod.ok(codec.KILLCONTAINER, {"container": cid, "signal": 15})
    assert finish(pod, cid, stdio) == (128 + 15, b"")


@pytest.mark.timeout(120)
def test_container_writes_do_not_touch_the_image(pod, images_dir):
    rootfs = os.path.join(images_dir, IMAGE, "rootfs")
    before = sorted(os.listdir(os.path.join(rootfs, "bin")))
    cid, stdio, _ = run_container(pod, ["sh", "-c", "echo changed >> /etc/motd; rm /bin/vi; touch /newfile; "
                                                    "cat /etc/motd; ls /bin/vi 2>&1; ls /newfile"])
    status, out = finish(pod, cid, stdio)
    assert status == 0
    assert out.startswith(b"from the image\nchanged\n")
    assert b"/newfile" in out
    with open(os.path.join(rootfs, "etc", "motd")) as f:
        assert f.read() == "from the image\n"
    assert sorted(os.listdir(os.path.join(rootfs, "bin"))) == before
    assert not os.path.exists(os.path.join(rootfs, "newfile"))
    # a second container of the same image starts from the image, not from the first one's changes
    cid2, stdio2, _ = run_container(pod, ["sh", "-c", "cat /etc/motd; ls /bin/vi"])
    assert finish(pod, cid2, stdio2) == (0, b"from the image\n/bin/vi\n")


@pytest.mark.timeout(120)
def test_writefile_then_readfile_and_the_container_sees_it(pod):
    cid, stdio, _ = run_container(pod, ["sh", "-c", "read line; cat /etc/app/conf"])
    data = b"key=value\n\x00\xffbinary\n"
    header = b'{"container":"%s","file":"/etc/app/conf"}' % cid.encode()
    pod.ok(codec.WRITEFILE, header + data)
    assert pod.ok(codec.READFILE, {"container": cid, "file": "/etc/app/conf"}) == data
    assert pod.ok(codec.READFILE, {"container": cid, "file": "/etc/motd"}) == b"from the image\n"
    reply, message = pod.command(codec.READFILE, {"container": cid, "file": "/no/such/file"})
    assert reply == codec.ERROR and b"No such file" in message
    pod.send_stream(stdio, b"go\n")
    status, out = finish(pod, cid, stdio)
    assert status == 0
    assert out == data


@pytest.mark.timeout(120)
def test_execcmd_into_a_running_container_and_into_hyperstart(pod):
    cid, stdio, _ = run_container(pod, ["sh", "-c", "echo ready > /tmp/mark; sleep 1000"])
    exec_out, exec_err = new_seqs()
    # a process in the container sees its filesystem and the pod's processes
    for _ in range(50):
        reply, _ = pod.command(codec.READFILE, {"container": cid, "file": "/tmp/mark"})
        if reply == codec.ACK:
            break
    pod.ok(codec.EXECCMD, {"container": cid, "process": {
        "id": "exec1", "args": ["sh", "-c", "cat /tmp/mark; hostname; ps -o comm | grep -c sleep"],
        "stdio": exec_out, "stderr": exec_err}})
    status, out = finish(pod, cid, exec_out, process="exec1")
    assert (status, out) == (0, b"ready\ntestpod\n1\n")
    # "hyperstart": the VM itself, outside any container
    vm_out, vm_err = new_seqs()
    pod.ok(codec.EXECCMD, {"container": "hyperstart", "process": {
        "id": "vm1", "args": ["sh", "-c", "test -d /tmp/hyper/shared/images && echo in-vm; exit 5"],
        "stdio": vm_out, "stderr": vm_err}})
    assert finish(pod, "hyperstart", vm_out, process="vm1") == (5, b"in-vm\n")
    pod.ok(codec.SIGNALPROCESS, {"container": cid, "process": "init", "signal": 9})
    assert finish(pod, cid, stdio)[0] == 137


@pytest.mark.timeout(120)
def test_terminal_process_and_winsize(pod):
    cid, stdio, _ = run_container(pod, ["sh", "-c", "read x; stty size; test -t 0 && echo tty"],
                                  terminal=True, stderr=0)
    pod.ok(codec.WINSIZE, {"container": cid, "process": "init", "row": 33, "column": 101})
    pod.send_stream(stdio, b"go\r")
    status, out = finish(pod, cid, stdio)
    assert status == 0
    assert b"33 101" in out and b"tty" in out


@pytest.mark.timeout(120)
def test_fsmap_volume_is_shared_between_containers(pod):
    os.makedirs(os.path.join(pod.share, "vol1"), exist_ok=True)
    stdio, stderr = new_seqs()
    vol = [{"source": "vol1", "path": "/data", "readOnly": False}]
    pod.ok(codec.NEWCONTAINER, {"id": "volw", "image": "images/" + IMAGE, "rootfs": "rootfs", "fsmap": vol,
                                "process": {"id": "init", "args": ["sh", "-c", "echo shared > /data/f"],
                                            "stdio": stdio, "stderr": stderr}})
    assert finish(pod, "volw", stdio) == (0, b"")
    with open(os.path.join(pod.share, "vol1", "f")) as f:
        assert f.read() == "shared\n"
    stdio, stderr = new_seqs()
    ro = [{"source": "vol1", "path": "/ro", "readOnly": True}]
    pod.ok(codec.NEWCONTAINER, {"id": "volr", "image": "images/" + IMAGE, "rootfs": "rootfs", "fsmap": ro,
                                "process": {"id": "init", "args": ["sh", "-c", "cat /ro/f; touch /ro/g"],
                                            "stdio": stdio, "stderr": stderr}})
    status, out = finish(pod, "volr", stdio)
    assert out == b"shared\n"
    assert status != 0
    assert b"Read-only" in bytes(pod.streams[stderr])


@pytest.mark.timeout(120)
def test_bad_commands_get_errors(pod):
    reply, message = pod.command(codec.NEWCONTAINER, {"id": "bad1", "image": "images/" + IMAGE,
                                                      "process": {"args": ["no-such-program"]}})
    assert reply == codec.ERROR and b"not found" in message
    reply, message = pod.command(codec.NEWCONTAINER, {"id": "bad2", "image": "images/nope",
                                                      "process": {"args": ["true"]}})
    assert reply == codec.ERROR and b"not found" in message
    reply, message = pod.command(codec.NEWCONTAINER, {"id": "bad3", "image": "../../etc",
                                                      "process": {"args": ["true"]}})
    assert reply == codec.ERROR
    reply, message = pod.command(codec.EXECCMD, {"container": "nosuch", "process": {"args": ["true"]}})
    assert reply == codec.ERROR and b"not found" in message
    reply, message = pod.command(codec.KILLCONTAINER, b"{not json")
    assert reply == codec.ERROR and b"JSON" in message
    # the failed container left nothing behind: its id can be used again
    cid, stdio, _ = run_container(pod, ["true"], cid="bad1")
    assert finish(pod, cid, stdio) == (0, b"")


@pytest.mark.timeout(120)
def test_newcontainer_files_are_in_place_before_the_process_starts(pod):
    script = base64.b64encode(b"#!/bin/sh\necho from the file $1\n").decode()
    files = [{"path": "/usr/local/bin/hello", "content": script, "perm": "0755"},
             {"path": "/etc/app/owned", "content": "", "uid": 65534, "gid": 65534}]
    cid, stdio, _ = run_container(pod, ["sh", "-c", "hello world; stat -c %u:%g /etc/app/owned"],
                                  extra={"files": files})
    assert finish(pod, cid, stdio) == (0, b"from the file world\n65534:65534\n")


@pytest.mark.timeout(120)
def test_image_added_after_the_pod_started_is_usable(pod, images_dir):
    # warm start: the host unpacks a new image into its store while the VM runs
    shutil.copytree(os.path.join(images_dir, IMAGE), os.path.join(images_dir, "late"), symlinks=True)
    with open(os.path.join(images_dir, "late", "rootfs", "etc", "motd"), "w") as f:
        f.write("late image\n")
    cid, stdio, _ = run_container(pod, ["cat", "/etc/motd"], image="late")
    assert finish(pod, cid, stdio) == (0, b"late image\n")


@pytest.mark.timeout(120)
def test_frame_for_an_unknown_seq_is_answered_with_eof(pod):
    pod.send_stream(9999, b"anyone?")
    pod.wait_eof(9999)


@pytest.mark.timeout(120)
def test_removecontainer_cleans_up(pod):
    cid, stdio, _ = run_container(pod, ["sleep", "1000"])
    pod.ok(codec.REMOVECONTAINER, {"container": cid})
    assert finish(pod, cid, stdio)[0] == 137
    reply, message = pod.command(codec.READFILE, {"container": cid, "file": "/etc/motd"})
    assert reply == codec.ERROR
    vm_out, vm_err = new_seqs()
    pod.ok(codec.EXECCMD, {"container": "hyperstart", "process": {
        "id": "check-rm", "args": ["sh", "-c", "test -e /tmp/hyper/%s && echo left || echo gone" % cid],
        "stdio": vm_out, "stderr": vm_err}})
    assert finish(pod, "hyperstart", vm_out, process="check-rm") == (0, b"gone\n")


@pytest.mark.timeout(120)
def test_a_waiting_vm_mounts_the_shares_before_startpod(images_dir, boot_vm):
    vm = boot_vm(images_dir=images_dir)
    vm.wait_ready()
    vm.ok(codec.PING)
    out, err = new_seqs()
    # Idle work runs between commands: by the time this exec runs, the modules are in and the shares mounted.
    script = ("for i in $(seq 100); do grep -q ' /tmp/hyper/shared/images 9p ' /proc/mounts && break; sleep 0.05; "
              "done; grep ' 9p ' /proc/mounts | cut -d' ' -f1,2,4")
    vm.ok(codec.EXECCMD, {"container": "hyperstart", "process": {
        "id": "mounts", "args": ["sh", "-c", script], "stdio": out, "stderr": err}})
    status, text = finish(vm, "hyperstart", out, process="mounts")
    mounts = {line.split()[1]: line.split() for line in text.decode().splitlines()}
    assert status == 0
    assert mounts["/tmp/hyper/shared"][0] == "share_dir"
    assert mounts["/tmp/hyper/shared/images"][0] == "images"
    assert "ro" in mounts["/tmp/hyper/shared/images"][2].split(",")
    assert "loose" in mounts["/tmp/hyper/shared/images"][2].split(",")  # immutable: the guest may cache it
    # STARTPOD finds them mounted, and the pod's init made while idle, which takes the pod's hostname.
    vm.ok(codec.STARTPOD, {"hostname": "after-idle"})
    cid, stdio, _ = run_container(vm, ["sh", "-c", "hostname; cat /etc/hostname; echo $$"])
    assert finish(vm, cid, stdio) == (0, b"after-idle\nafter-idle\n2\n")  # the pod init is its PID 1


@pytest.mark.timeout(120)
def test_destroypod_stops_the_vm(guest_files, images_dir, boot_vm):
    vm = boot_vm(images_dir=images_dir)
    vm.wait_ready()
    vm.ok(codec.STARTPOD, {"hostname": "p2"})
    cid, stdio, _ = run_container(vm, ["sleep", "1000"])
    assert vm.ok(codec.DESTROYPOD) == b""
    assert vm.wait_exit() == 0


@pytest.mark.timeout(120)
def test_second_startpod_replaces_the_pod_in_the_same_vm(images_dir, boot_vm):
    vm = boot_vm(images_dir=images_dir)
    vm.wait_ready()
    vm.ok(codec.STARTPOD, {"hostname": "first"})
    old, old_stdio, _ = run_container(vm, ["sleep", "1000"])
    vm.ok(codec.STARTPOD, {"hostname": "second"})  # the old pod's containers are removed
    assert finish(vm, old, old_stdio)[0] == 137
    cid, stdio, _ = run_container(vm, ["sh", "-c", "hostname; ps -o comm | grep -c sleep"])
    assert finish(vm, cid, stdio) == (1, b"second\n0\n")
