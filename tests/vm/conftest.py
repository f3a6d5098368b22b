"""Fixtures for the VM tests: a guard against unhandled errors, and (for real-qemu tests) the guest."""

import gc

import pytest
from twisted.logger import globalLogPublisher


@pytest.fixture(autouse=True)
def no_unhandled_errors():
    """Fail a test that let a Deferred error go unhandled or logged a failure (as magic-wormhole does)."""
    errors = []

    def observer(event):
        if event.get("isError") or event.get("log_failure") is not None:
            errors.append(event)

    globalLogPublisher.addObserver(observer)
    try:
        yield
        gc.collect()
    finally:
        globalLogPublisher.removeObserver(observer)
    if errors:
        from twisted.logger import formatEvent

        pytest.fail("unhandled errors were logged:\n" + "\n".join(
            formatEvent(e) + ("\n" + e["log_failure"].getTraceback() if e.get("log_failure") else "")
            for e in errors))


# -- real qemu ------------------------------------------------------------------------------------------------

import os  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import tempfile  # noqa: E402

import pytest_twisted  # noqa: E402


@pytest.fixture(scope="session")
def guest(guest_files):
    """The guest kernel and initrd (tests/conftest.py builds them once per session)."""
    return guest_files


@pytest.fixture
def run_dir():
    d = tempfile.mkdtemp(prefix="hd", dir="/tmp")
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def reactor():
    from twisted.internet import reactor as r

    return r


@pytest.fixture
def vm_config(guest, run_dir):
    """Makes configs of VMs under this test's run dir."""
    from hyperd.guest.initrd import kernel_cmdline
    from hyperd.vm.qemu import VMConfig

    def make(**kw):
        base = dict(run_dir=run_dir, kernel=guest.kernel, initrd=guest.initrd, append=kernel_cmdline(),
                    accel="tcg")
        base.update(kw)
        return VMConfig.create(**base)

    return make


@pytest.fixture
def cleanup_vms(run_dir):
    """Tests add VMs (or bare pids) here; whatever still runs at the end is killed, even on failure."""
    vms = []
    yield vms
    from hyperd.vm.process import pid_is_vm

    for vm in vms:
        pid, vm_dir = (vm.pid, vm.vm_dir) if hasattr(vm, "pid") else vm
        if pid and pid_is_vm(pid, vm_dir):
            os.kill(pid, signal.SIGKILL)
        if hasattr(vm, "detach"):
            vm.detach()
    # Any qemu left under this run dir (e.g. spawned by a boot that raised) is killed too.
    for entry in os.listdir("/proc"):
        if entry.isdigit() and pid_is_vm(int(entry), run_dir):
            os.kill(int(entry), signal.SIGKILL)
    from twisted.internet import defer

    pytest_twisted.blockon(defer.ensureDeferred(_settle()))


async def _settle():
    from twisted.internet import reactor, task

    # Give the reactor a moment to reap what was killed.
    await task.deferLater(reactor, 0.2, lambda: None)
