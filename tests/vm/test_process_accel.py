"""Process supervision on real processes, the pid helpers, the pidfd watcher and the accelerator probe."""

import os
import subprocess
import time

import pytest
import pytest_twisted
from twisted.internet import defer, task

from hyperd.vm import accel
from hyperd.vm.process import PidWatcher, pid_alive, pid_cmdline, pid_is_vm, spawn_qemu


@pytest.mark.timeout(20)
@pytest_twisted.ensureDeferred
async def test_exit_code_and_output_go_to_the_log(reactor, run_dir):
    log_path = os.path.join(run_dir, "qemu.log")
    proto = spawn_qemu(reactor, ["/bin/sh", "-c", "echo out; echo err >&2; read x; echo \"stdin=$x\"; exit 3"],
                       log_path)
    assert proto.pid and proto.running
    reason = await proto.ended
    assert reason == "exited with code 3"
    assert not proto.running
    with open(log_path) as f:
        assert f.read() == "out\nerr\nstdin=\n"  # stdin is /dev/null


@pytest.mark.timeout(20)
@pytest_twisted.ensureDeferred
async def test_signal_reason_and_own_session_and_clean_env(reactor, run_dir):
    proto = spawn_qemu(reactor, ["/bin/sh", "-c", "env > %s/env; exec sleep 30" % run_dir],
                       os.path.join(run_dir, "log"))
    await task.deferLater(reactor, 0.3, lambda: None)
    # Its own session: a signal to the daemon's process group does not reach it.
    assert os.getsid(proto.pid) == proto.pid != os.getsid(0)
    with open(os.path.join(run_dir, "env")) as f:
        names = {line.split("=", 1)[0] for line in f if "=" in line}
    assert "PATH" in names and not names & {"PYTEST_CURRENT_TEST", "VIRTUAL_ENV", "HOME"}
    assert proto.signal("KILL")
    assert await proto.ended == "killed by signal 9"
    assert not proto.signal("KILL")


def test_pid_helpers():
    assert pid_alive(os.getpid())
    assert not pid_alive(2 ** 22 - 1)
    assert pid_cmdline(os.getpid())
    assert pid_cmdline(2 ** 22 - 1) == []
    # We are not a qemu, whatever directory we name.
    assert not pid_is_vm(os.getpid(), "/")


@pytest.mark.timeout(20)
@pytest_twisted.ensureDeferred
async def test_pid_watcher_notices_a_process_that_is_not_a_reactor_child(reactor):
    child = subprocess.Popen(["sleep", "30"])
    try:
        fired = defer.Deferred()
        PidWatcher(reactor, child.pid, lambda: fired.callback(time.monotonic()))
        await task.deferLater(reactor, 0.1, lambda: None)
        assert not fired.called
        t0 = time.monotonic()
        child.kill()
        when = await fired
        assert when - t0 < 0.5
    finally:
        child.kill()
        child.wait()
    gone = defer.Deferred()
    PidWatcher(reactor, child.pid, lambda: gone.callback(True))  # already reaped: fires at once
    assert await gone


@pytest.mark.timeout(30)
@pytest_twisted.ensureDeferred
async def test_probe_positive_path_with_tcg(reactor, guest):
    # The probe logic itself: under TCG the guest kernel does print its first line.
    assert await accel.kernel_boots(reactor, "tcg", guest.kernel, timeout=15)


@pytest.mark.timeout(30)
@pytest_twisted.ensureDeferred
async def test_auto_answers_tcg_here_within_a_few_seconds_and_only_probes_once(reactor, guest):
    probe = accel.AccelProbe(timeout=2.0)
    t0 = time.monotonic()
    answers = await defer.gatherResults([probe.probe(reactor, "auto", guest.kernel),
                                         probe.probe(reactor, "auto", guest.kernel)])
    elapsed = time.monotonic() - t0
    # On these machines KVM hangs in the guest's early boot: the probe must time out and choose TCG.
    assert answers == ["tcg", "tcg"]
    assert elapsed < 4
    assert probe.why
    t1 = time.monotonic()
    assert await probe.probe(reactor, "auto", guest.kernel) == "tcg"
    assert time.monotonic() - t1 < 0.1
    await task.deferLater(reactor, 0.3, lambda: None)  # the killed probe qemu is reaped


@pytest_twisted.ensureDeferred
async def test_forced_modes_and_a_missing_device(reactor):
    probe = accel.AccelProbe(kvm_device="/nonexistent/kvm")
    assert await probe.probe(reactor, "kvm", None) == "kvm"
    assert await probe.probe(reactor, "tcg", None) == "tcg"
    assert await probe.probe(reactor, "auto", "/whatever") == "tcg"
    assert "/nonexistent/kvm" in probe.why
    with pytest.raises(ValueError):
        await probe.probe(reactor, "xen", None)


@pytest.mark.timeout(30)
@pytest_twisted.ensureDeferred
async def test_the_answer_is_kept_for_this_host_boot_and_these_files(reactor, guest, tmp_path):
    import json

    cache = str(tmp_path / "accel-probe.json")
    assert await accel.AccelProbe(timeout=2.0, cache=cache).probe(reactor, "auto", guest.kernel) == "tcg"
    with open(cache) as f:
        kept = json.load(f)
    assert kept["answer"] == "tcg" and kept["for"]["boot_id"]
    # The next daemon answers from the file, without the seconds of a probe.
    again = accel.AccelProbe(timeout=2.0, cache=cache)
    t0 = time.monotonic()
    assert await again.probe(reactor, "auto", guest.kernel) == "tcg"
    assert time.monotonic() - t0 < 0.5 and "probed earlier in this boot" in again.why
    # Another boot of the host (or another kernel, or qemu) probes again.
    kept["for"]["boot_id"] = "another-boot"
    with open(cache, "w") as f:
        json.dump(kept, f)
    fresh = accel.AccelProbe(timeout=2.0, cache=cache)
    assert await fresh.probe(reactor, "auto", guest.kernel) == "tcg"
    assert "probed earlier" not in fresh.why
    with open(cache) as f:
        assert json.load(f)["for"]["boot_id"] != "another-boot"
    await task.deferLater(reactor, 0.3, lambda: None)  # the killed probe qemu is reaped
