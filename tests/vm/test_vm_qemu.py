"""Real qemu (TCG) with the real guest: boot to READY, PING, stop, death behind our back, reattach, failures."""

import json
import os
import signal
import time

import pytest
import pytest_twisted
from twisted.internet import task

from hyperd.agent import codec
from hyperd.agent.client import AgentClosed
from hyperd.errors import VMError
from hyperd.vm.process import pid_alive
from hyperd.vm.vm import VM, VMGone


def process_gone(pid):
    return not pid_alive(pid)


async def wait_until(reactor, predicate, timeout):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        await task.deferLater(reactor, 0.02, lambda: None)
    return True


@pytest.mark.timeout(90)
@pytest_twisted.ensureDeferred
async def test_boot_ready_ping_stop(reactor, vm_config, cleanup_vms):
    vm = await VM.boot(reactor, vm_config(), ready_timeout=40)
    cleanup_vms.append(vm)
    assert vm.status == "running"
    assert vm.agent.version == 4244
    assert await vm.agent.ping() == b""
    for name in ("qmp.sock", "hyper.sock", "tty.sock", "console.log", "share_dir"):
        assert os.path.exists(os.path.join(vm.vm_dir, name))
    status = await vm.qmp.execute("query-status")
    assert status["status"] == "running"
    rec = vm.record()
    assert json.loads(json.dumps(rec)) == rec
    assert rec["vm_id"] == vm.vm_id and rec["pid"] == vm.pid and rec["accel"] == "tcg"
    pid = vm.pid
    reason = await vm.stop()
    assert "exited with code 0" in reason
    assert process_gone(pid)
    assert not os.path.exists(vm.vm_dir)
    assert (await vm.when_dead()) == reason


@pytest.mark.timeout(90)
@pytest_twisted.ensureDeferred
async def test_sigkill_behind_our_back_is_noticed_within_a_second(reactor, vm_config, cleanup_vms):
    vm = await VM.boot(reactor, vm_config(), ready_timeout=40)
    cleanup_vms.append(vm)
    dead = vm.when_dead()
    t0 = time.monotonic()
    os.kill(vm.pid, signal.SIGKILL)
    assert await wait_until(reactor, lambda: dead.called, 1.0)
    assert time.monotonic() - t0 < 1.0
    assert dead.result == "killed by signal 9"
    assert vm.status == "dead"
    assert not os.path.exists(vm.vm_dir)
    with pytest.raises(AgentClosed):
        await vm.agent.ping()


@pytest.mark.timeout(120)
@pytest_twisted.ensureDeferred
async def test_reattach_after_a_daemon_restart(reactor, vm_config, cleanup_vms):
    first = await VM.boot(reactor, vm_config(), ready_timeout=40)
    cleanup_vms.append(first)
    record = json.loads(json.dumps(first.record()))
    first.detach()  # the old daemon goes away; qemu keeps running
    await task.deferLater(reactor, 0.1, lambda: None)
    assert pid_alive(first.pid)

    second = await VM.reattach(reactor, record)
    cleanup_vms.append(second)
    assert second.vm_id == first.vm_id and second.pid == first.pid
    assert await second.agent.ping() == b""
    status = await second.qmp.execute("query-status")
    assert status["status"] == "running"
    assert second.status == "running"
    # A VM paused under the old daemon is paused under the new one too.
    await second.pause()
    record = second.record()
    second.detach()
    third = await VM.reattach(reactor, record)
    cleanup_vms.append(third)
    assert third.status == "paused"
    await third.resume()
    assert await third.agent.ping() == b""
    second = third
    reason = await second.stop()
    assert "exited" in reason
    assert process_gone(second.pid)
    assert not os.path.exists(second.vm_dir)


@pytest.mark.timeout(120)
@pytest_twisted.ensureDeferred
async def test_reattached_vm_killed_behind_our_back_is_noticed(reactor, vm_config, cleanup_vms):
    first = await VM.boot(reactor, vm_config(), ready_timeout=40)
    cleanup_vms.append(first)
    record = first.record()
    first.detach()
    second = await VM.reattach(reactor, record)
    cleanup_vms.append(second)
    dead = second.when_dead()
    t0 = time.monotonic()
    os.kill(second.pid, signal.SIGKILL)
    assert await wait_until(reactor, lambda: dead.called, 1.0)
    assert time.monotonic() - t0 < 1.0
    assert not os.path.exists(second.vm_dir)


@pytest.mark.timeout(30)
@pytest_twisted.ensureDeferred
async def test_reattach_to_a_vm_that_is_gone_cleans_its_dir(reactor, vm_config, run_dir):
    config = vm_config()
    os.makedirs(config.vm_dir)
    record = {"vm_id": config.vm_id, "pid": 2 ** 22 - 1, "config": config.to_dict()}
    with pytest.raises(VMGone):
        await VM.reattach(reactor, record)
    assert not os.path.exists(config.vm_dir)
    # A live pid that is not that VM's qemu (here: ourselves) is not mistaken for it.
    os.makedirs(config.vm_dir)
    with pytest.raises(VMGone):
        await VM.reattach(reactor, dict(record, pid=os.getpid()))
    assert not os.path.exists(config.vm_dir)


@pytest.mark.timeout(120)
@pytest_twisted.ensureDeferred
async def test_pause_resume_and_stop_escalates_past_a_frozen_guest(reactor, vm_config, cleanup_vms):
    vm = await VM.boot(reactor, vm_config(), ready_timeout=40)
    cleanup_vms.append(vm)
    await vm.pause()
    assert vm.status == "paused"
    assert (await vm.qmp.execute("query-status"))["status"] == "paused"
    await vm.resume()
    assert vm.status == "running"
    assert await vm.agent.ping() == b""
    # A hung guest cannot answer DESTROYPOD: the stop goes on to QMP quit after the grace time. A hang is
    # made by freezing the vCPU; the status is set back so that stop() does not know (as with a real hang).
    await vm.qmp.execute("stop")
    assert vm.status == "paused"  # the STOP event was noticed
    vm.status = "running"
    t0 = time.monotonic()
    reason = await vm.stop(grace=0.5)
    elapsed = time.monotonic() - t0
    assert 0.5 <= elapsed < 3
    assert "exited" in reason
    assert not os.path.exists(vm.vm_dir)


@pytest.mark.timeout(90)
@pytest_twisted.ensureDeferred
async def test_stopping_a_paused_vm_does_not_wait_for_the_agent(reactor, vm_config, cleanup_vms):
    vm = await VM.boot(reactor, vm_config(), ready_timeout=40)
    cleanup_vms.append(vm)
    await vm.pause()
    t0 = time.monotonic()
    reason = await vm.stop(grace=10)
    assert time.monotonic() - t0 < 2
    assert "exited" in reason
    assert not os.path.exists(vm.vm_dir)


@pytest.mark.timeout(60)
@pytest_twisted.ensureDeferred
async def test_boot_with_a_bogus_kernel_fails_with_the_log_and_leaves_nothing(reactor, vm_config, run_dir):
    bogus = os.path.join(run_dir, "not-a-kernel")
    with open(bogus, "wb") as f:
        f.write(b"this is not a kernel\n" * 100)
    config = vm_config(kernel=bogus)
    with pytest.raises(VMError) as e:
        await VM.boot(reactor, config, ready_timeout=20)
    assert "did not boot" in str(e.value)
    assert "qemu" in str(e.value)  # qemu's own complaint about the kernel is quoted
    assert not os.path.exists(config.vm_dir)
    assert os.listdir(run_dir) == ["not-a-kernel"]


@pytest.mark.timeout(60)
@pytest_twisted.ensureDeferred
async def test_boot_with_an_initrd_without_agent_fails_with_the_console_tail(reactor, vm_config, run_dir):
    # A valid (empty) cpio: the kernel boots, finds no init, panics; with panic=-1 and -no-reboot qemu exits.
    empty = os.path.join(run_dir, "empty.cpio")
    trailer = b"070701" + b"0" * 8 * 4 + b"00000001" + b"0" * 8 * 6 + b"0000000B" + b"0" * 8 + b"TRAILER!!!\0"
    with open(empty, "wb") as f:
        f.write(trailer + b"\0" * (512 - len(trailer)))
    config = vm_config(initrd=empty)
    with pytest.raises(VMError) as e:
        await VM.boot(reactor, config, ready_timeout=30)
    message = str(e.value)
    assert "console" in message and "Kernel panic" in message
    assert not os.path.exists(config.vm_dir)


@pytest.mark.timeout(60)
@pytest_twisted.ensureDeferred
async def test_boot_timeout_kills_qemu_and_quotes_the_console(reactor, vm_config, run_dir):
    config = vm_config()
    with pytest.raises(VMError) as e:
        await VM.boot(reactor, config, ready_timeout=0.8)
    assert "not READY within" in str(e.value)
    assert "console" in str(e.value) or "no console output" in str(e.value)
    assert not os.path.exists(config.vm_dir)
    await task.deferLater(reactor, 0.1, lambda: None)
    assert not any(config.vm_dir in open("/proc/%s/cmdline" % p, "rb").read().decode(errors="replace")
                   for p in os.listdir("/proc") if p.isdigit() and os.path.exists("/proc/%s/cmdline" % p))


@pytest.mark.timeout(60)
@pytest_twisted.ensureDeferred
async def test_destroypod_is_a_request_like_any_other(reactor, vm_config, cleanup_vms):
    vm = await VM.boot(reactor, vm_config(), ready_timeout=40)
    cleanup_vms.append(vm)
    dead = vm.when_dead()
    assert await vm.agent.request(codec.DESTROYPOD) == b""
    reason = await dead
    assert "exited with code 0" in reason


BOOT_AND_EXIT = r"""
import json, sys
from twisted.internet import defer, task
from hyperd.vm.qemu import VMConfig
from hyperd.vm.vm import VM

async def main(reactor):
    config = VMConfig.from_dict(json.loads(sys.argv[1]))
    vm = await VM.boot(reactor, config, ready_timeout=40)
    print(json.dumps(vm.record()), flush=True)
    vm.detach()

task.react(lambda r: defer.ensureDeferred(main(r)))
"""


@pytest.mark.timeout(120)
@pytest_twisted.ensureDeferred
async def test_vm_outlives_the_process_that_booted_it(reactor, vm_config, cleanup_vms):
    import sys

    from twisted.internet.utils import getProcessOutputAndValue

    config = vm_config()
    cleanup_vms.append((None, config.vm_dir))
    # A separate "daemon" boots the VM and exits; qemu must keep running without it.
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out, err, code = await getProcessOutputAndValue(
        sys.executable, ["-c", BOOT_AND_EXIT, json.dumps(config.to_dict())], env=dict(os.environ), path=repo)
    assert code == 0, err.decode()[-2000:]
    record = json.loads(out.decode().strip().splitlines()[-1])
    cleanup_vms.append((record["pid"], config.vm_dir))
    await task.deferLater(reactor, 0.3, lambda: None)
    assert pid_alive(record["pid"])
    vm = await VM.reattach(reactor, record)
    cleanup_vms.append(vm)
    assert await vm.agent.ping() == b""
    dead = vm.when_dead()
    reason = await vm.stop()
    assert "exited" in reason and dead.called
    assert process_gone(record["pid"])
    assert not os.path.exists(config.vm_dir)


@pytest.mark.timeout(60)
@pytest_twisted.ensureDeferred
async def test_cancelling_a_boot_kills_qemu_and_leaves_nothing(reactor, vm_config, run_dir):
    from twisted.internet import defer

    config = vm_config()
    booting = defer.ensureDeferred(VM.boot(reactor, config, ready_timeout=40))
    await task.deferLater(reactor, 0.7, lambda: None)
    assert os.path.isdir(config.vm_dir)
    booting.cancel()
    with pytest.raises(defer.CancelledError):
        await booting
    assert not os.path.exists(config.vm_dir)
    assert not any(config.vm_dir in " ".join(open("/proc/%s/cmdline" % p, "rb").read().decode(
        errors="replace").split("\0")) for p in os.listdir("/proc")
        if p.isdigit() and os.path.exists("/proc/%s/cmdline" % p))


@pytest.mark.timeout(90)
@pytest_twisted.ensureDeferred
async def test_console_is_kept_after_death(reactor, vm_config, cleanup_vms):
    from hyperd.guest.initrd import kernel_cmdline

    vm = await VM.boot(reactor, vm_config(append=kernel_cmdline().replace("quiet", "")), ready_timeout=40)
    cleanup_vms.append(vm)
    assert "Linux version" in open(os.path.join(vm.vm_dir, "console.log")).read()
    await vm.stop()
    assert not os.path.exists(vm.vm_dir)
    assert "Power down" in vm.console_tail()


@pytest.mark.timeout(90)
@pytest_twisted.ensureDeferred
async def test_large_messages_and_errors_over_the_real_channel(reactor, vm_config, cleanup_vms):
    vm = await VM.boot(reactor, vm_config(append=""), ready_timeout=40)  # "" → the guest's default cmdline
    cleanup_vms.append(vm)
    assert set(vm.boot_timings) == {"qmp", "connected", "ready", "version"}
    # 5 KB go in 512-byte chunks, each sent only after the guest's NEXT; the answer still comes.
    big = b'{"x":"' + b"y" * 5000 + b'"}'
    assert await vm.agent.request(codec.PING, big) == b""
    from hyperd.agent.client import AgentError

    with pytest.raises(AgentError) as e:
        await vm.agent.request(codec.EXECCMD, b"garbage{")
    assert e.value.code == codec.EXECCMD and e.value.text
    assert await vm.agent.ping() == b""
    await vm.stop()
