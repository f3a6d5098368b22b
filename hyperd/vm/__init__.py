"""hyperd.vm: one qemu per VM, spawned and supervised under Twisted, with QMP and our agent connected.

The public names, re-exported from their modules:

- ``VMConfig`` (qemu.py): how a VM is started; ``VMConfig.create(run_dir, kernel=, initrd=, append=, cpu=,
  mem=, accel=, images_dir=, extra_args=)`` picks a new ``vm-XXXXXXXXXX`` id and its directory.
- ``VM`` (vm.py): ``await VM.boot(reactor, config)``, ``await VM.reattach(reactor, record)``, ``vm.stop()``,
  ``vm.when_dead()``, ``vm.record()``, ``vm.detach()``, ``vm.pause()``/``vm.resume()``.
- ``VMGone``: a recorded VM whose qemu is no longer running.
- ``probe_accel`` (accel.py): "auto" | "kvm" | "tcg" → the accelerator to use.
"""

from hyperd.vm.accel import probe_accel
from hyperd.vm.qemu import VMConfig, build_command, new_vm_id
from hyperd.vm.vm import VM, VMGone

__all__ = ["VM", "VMConfig", "VMGone", "build_command", "new_vm_id", "probe_accel"]
