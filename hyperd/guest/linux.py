"""Thin ctypes wrappers for the Linux system calls the guest needs and Python 3.11 lacks.

Runs inside the VM (standard library only). Every wrapper raises OSError with the real errno, like ``os``.
"""

import ctypes
import os

_libc = ctypes.CDLL(None, use_errno=True)

# x86_64 system call numbers.
_SYS_FINIT_MODULE = 313

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18

MNT_DETACH = 2

LINUX_REBOOT_CMD_POWER_OFF = 0x4321FEDC


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, "%s: %s" % (what, os.strerror(err)))
    return result


def _b(value):
    if value is None:
        return None
    return os.fsencode(value)


def mount(source, target, fstype=None, flags: int = 0, data=None) -> None:
    _check(_libc.mount(_b(source), _b(target), _b(fstype), ctypes.c_ulong(flags), _b(data)),
           "mount %s" % (target,))


def umount(target, flags: int = 0) -> None:
    _check(_libc.umount2(_b(target), flags), "umount %s" % (target,))


def unshare(flags: int) -> None:
    _check(_libc.unshare(flags), "unshare")


def setns(fd: int, nstype: int = 0) -> None:
    _check(_libc.setns(fd, nstype), "setns")


def finit_module(fd: int, params: bytes = b"") -> None:
    _check(_libc.syscall(_SYS_FINIT_MODULE, fd, params, 0), "finit_module")


def power_off() -> None:
    """Turn the VM off now (qemu exits 0). Only PID 1 (or CAP_SYS_BOOT) may do this."""
    _libc.sync()
    _check(_libc.reboot(LINUX_REBOOT_CMD_POWER_OFF), "reboot")
