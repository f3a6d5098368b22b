"""VMFactory's bookkeeping on its own: which VMs it boots and when (the daemon's part is tests/pod/test_factory.py,
with real VMs). ``boot`` here is a callable the test answers, as the daemon's booting of a real VM would."""

import pytest
from twisted.internet import defer, task

from hyperd.config import CacheSpec
from hyperd.vm import factory as factory_mod
from hyperd.vm.factory import VMFactory


class Boots:
    """The boots the factory asked for, each answered by the test."""

    def __init__(self):
        self.pending = []  # (cpu, mem, Deferred)
        self.count = 0

    def __call__(self, cpu, mem):
        d = defer.Deferred()
        self.pending.append((cpu, mem, d))
        return d

    def finish(self, ok=True):
        cpu, mem, d = self.pending.pop(0)
        self.count += 1
        if ok:
            d.callback(f"vm-{cpu}-{mem}-{self.count}")
        else:
            d.errback(RuntimeError("no boot"))


@pytest.fixture
def setup():
    clock, boots, idle = task.Clock(), Boots(), set()
    f = VMFactory(clock, (CacheSpec(2, 1, 128), CacheSpec(1, 2, 256)), boots, lambda vm: vm not in idle)
    return f, clock, boots, idle


def test_boots_one_vm_at_a_time_until_every_shape_has_its_count(setup):
    f, _, boots, _ = setup
    f.start()
    for expected in ((1, 128), (1, 128), (2, 256)):
        assert [(c, m) for c, m, _ in boots.pending] == [expected]
        boots.finish()
    assert boots.pending == [] and len(f.members()) == 3


def test_a_taken_vm_is_replaced_only_when_the_daemon_says_its_pod_started(setup):
    f, _, boots, _ = setup
    f.start()
    for _ in range(3):
        boots.finish()
    vm = f.take(1, 128)
    assert vm in ("vm-1-128-1", "vm-1-128-2") and vm not in f.members()
    assert boots.pending == []  # not while the pod starts in it
    f.fill()
    assert [(c, m) for c, m, _ in boots.pending] == [(1, 128)]
    assert f.take(4, 512) is None  # no such shape: the daemon boots one for the pod itself


def test_an_unusable_vm_is_skipped_and_a_dead_one_replaced_at_once(setup):
    f, _, boots, gone = setup
    f.start()
    for _ in range(3):
        boots.finish()
    first, second = sorted(vm for vm in f.members() if "-1-128-" in vm)
    gone.add(first)  # killed behind the factory's back, its death not told yet
    assert f.take(1, 128) == second
    f.forget("vm-2-256-3")  # its death told: the factory refills at once, one boot at a time, every shape
    booted = []
    while boots.pending:
        booted.append(boots.pending[0][:2])
        boots.finish()
    assert booted == [(1, 128), (1, 128), (2, 256)]


def test_a_failed_boot_is_retried_after_a_delay_and_stop_cancels_the_boot_in_progress(setup):
    f, clock, boots, _ = setup
    f.start()
    boots.finish(ok=False)
    assert boots.pending == []
    clock.advance(factory_mod.RETRY_DELAY)
    assert len(boots.pending) == 1
    _, _, d = boots.pending[0]
    f.stop()
    assert d.called  # cancelled: the daemon's boot kills the half-booted VM
    d.addErrback(lambda failure: failure.trap(defer.CancelledError))
    f.fill()
    assert len(boots.pending) == 1 and boots.count == 1  # stopped: nothing new


def test_adopting_the_vms_a_previous_daemon_booted(setup):
    f, _, boots, _ = setup
    assert f.adopt("vm-a", 1, 128) and f.adopt("vm-b", 1, 128)
    assert not f.adopt("vm-c", 1, 128), "two is the policy's count"
    assert not f.adopt("vm-d", 4, 512), "a shape the policy no longer has"
    f.start()
    assert [(c, m) for c, m, _ in boots.pending] == [(2, 256)]
