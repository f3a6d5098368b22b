"""The qemu command line of one VM, built from a value object and nothing else (no I/O).

The device names and ids are part of the contract with the guest (hyperd/guest/): the two virtio-serial
ports are found by name, the 9p shares by mount tag.
"""

from __future__ import annotations

import os
import secrets
import string

import attrs

from hyperd.agent.codec import CTL_CHANNEL, STREAM_CHANNEL

QEMU_BINARY = "/usr/bin/qemu-system-x86_64"
DEFAULT_RUN_DIR = "/var/run/hyper"

# Files inside a VM's directory.
QMP_SOCKET = "qmp.sock"
CTL_SOCKET = "hyper.sock"
STREAM_SOCKET = "tty.sock"
CONSOLE_LOG = "console.log"
QEMU_LOG = "qemu.log"
SHARE_DIR = "share_dir"

SHARE_TAG = "share_dir"
IMAGES_TAG = "images"

_ID_ALPHABET = string.ascii_letters + string.digits


def new_vm_id() -> str:
    """A fresh id in hyperd's form, ``vm-`` and ten letters or digits."""
    return "vm-" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(10))


@attrs.frozen
class VMConfig:
    """Everything that decides how one VM's qemu is started; also what a restarted daemon needs to know."""

    vm_id: str
    vm_dir: str
    kernel: str
    initrd: str
    append: str = ""
    cpu: int = 1
    mem: int = 128
    accel: str = "tcg"
    images_dir: str | None = None
    qemu: str = QEMU_BINARY
    #: Extra arguments appended as they are, e.g. ``-netdev user,id=n0 -device virtio-net-pci,netdev=n0``.
    extra_args: tuple[str, ...] = attrs.field(default=(), converter=tuple)

    @classmethod
    def create(cls, run_dir: str = DEFAULT_RUN_DIR, **kwargs) -> "VMConfig":
        """A config with a new id whose directory is ``<run_dir>/<vm_id>``."""
        vm_id = kwargs.pop("vm_id", None) or new_vm_id()
        return cls(vm_id=vm_id, vm_dir=os.path.join(run_dir, vm_id), **kwargs)

    def path(self, name: str) -> str:
        return os.path.join(self.vm_dir, name)

    def to_dict(self) -> dict:
        d = attrs.asdict(self)
        d["extra_args"] = list(self.extra_args)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "VMConfig":
        names = {a.name for a in attrs.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def accel_args(accel: str) -> list[str]:
    if accel == "tcg":
        # A 32 MiB translation cache instead of 1 GiB reserved: ~35 MiB less RSS per VM at the same speed.
        return ["-accel", "tcg,tb-size=32"]
    if accel == "kvm":
        return ["-accel", "kvm"]
    raise ValueError("unknown accelerator %r" % (accel,))


def build_command(config: VMConfig) -> list[str]:
    """The full argv (argv[0] included) that starts ``config``'s VM."""
    for value in (config.vm_dir, config.images_dir or ""):
        # qemu's option syntax splits on commas; a comma in a path would silently change the device.
        if "," in value:
            raise ValueError("a comma in %r cannot be passed to qemu" % (value,))
    d = config.path
    args = [
        config.qemu,
        "-M", "q35",
        *accel_args(config.accel),
        "-m", str(config.mem),
        "-smp", str(config.cpu),
        "-display", "none",
        "-no-reboot",
        "-nodefaults",
        "-no-user-config",
        "-kernel", config.kernel,
        "-initrd", config.initrd,
        "-append", config.append,
        "-device", "virtio-serial-pci,id=vs0",
        "-chardev", "socket,id=ctl,path=%s,server=on,wait=off" % d(CTL_SOCKET),
        "-device", "virtserialport,bus=vs0.0,chardev=ctl,name=%s" % CTL_CHANNEL,
        "-chardev", "socket,id=tty,path=%s,server=on,wait=off" % d(STREAM_SOCKET),
        "-device", "virtserialport,bus=vs0.0,chardev=tty,name=%s" % STREAM_CHANNEL,
        "-device", "virtio-rng-pci",
        "-fsdev", "local,id=share,path=%s,security_model=none" % d(SHARE_DIR),
        "-device", "virtio-9p-pci,fsdev=share,mount_tag=%s" % SHARE_TAG,
    ]
    if config.images_dir is not None:
        args += [
            "-fsdev", "local,id=images,path=%s,security_model=none,readonly=on" % config.images_dir,
            "-device", "virtio-9p-pci,fsdev=images,mount_tag=%s" % IMAGES_TAG,
        ]
    args += [
        "-qmp", "unix:%s,server=on,wait=off" % d(QMP_SOCKET),
        "-serial", "file:%s" % d(CONSOLE_LOG),
    ]
    args += list(config.extra_args)
    return args
