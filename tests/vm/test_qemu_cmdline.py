"""The qemu command line: device names the guest relies on, accel options, optional devices."""

import pytest

from hyperd.vm.qemu import VMConfig, build_command, new_vm_id


def config(**kw):
    base = dict(run_dir="/tmp/hdx", kernel="/k/kernel", initrd="/k/initrd", append="console=ttyS0 quiet",
                cpu=2, mem=256, accel="tcg", images_dir="/var/lib/hyper/images")
    base.update(kw)
    return VMConfig.create(**base)


def pairs(argv):
    """(option, value) pairs of the argv after argv[0]."""
    out = []
    i = 1
    while i < len(argv):
        if argv[i] in ("-no-reboot", "-nodefaults", "-no-user-config"):
            out.append((argv[i], None))
            i += 1
        else:
            out.append((argv[i], argv[i + 1]))
            i += 2
    return out


def test_new_vm_id_has_hyperds_form():
    ids = {new_vm_id() for _ in range(100)}
    assert len(ids) == 100
    for i in ids:
        assert i.startswith("vm-") and len(i) == 13 and i[3:].isalnum()


def test_command_has_the_devices_the_guest_relies_on():
    c = config()
    argv = build_command(c)
    d = c.vm_dir
    assert d == "/tmp/hdx/" + c.vm_id
    assert argv[0] == "/usr/bin/qemu-system-x86_64"
    p = pairs(argv)
    assert ("-M", "q35") in p
    assert ("-accel", "tcg,tb-size=32") in p
    assert ("-m", "256") in p and ("-smp", "2") in p
    assert ("-display", "none") in p
    for flag in ("-no-reboot", "-nodefaults", "-no-user-config"):
        assert (flag, None) in p
    assert ("-kernel", "/k/kernel") in p and ("-initrd", "/k/initrd") in p
    assert ("-append", "console=ttyS0 quiet") in p
    assert ("-device", "virtio-serial-pci,id=vs0") in p
    assert ("-chardev", "socket,id=ctl,path=%s/hyper.sock,server=on,wait=off" % d) in p
    assert ("-device", "virtserialport,bus=vs0.0,chardev=ctl,name=sh.hyper.channel.0") in p
    assert ("-chardev", "socket,id=tty,path=%s/tty.sock,server=on,wait=off" % d) in p
    assert ("-device", "virtserialport,bus=vs0.0,chardev=tty,name=sh.hyper.channel.1") in p
    assert ("-device", "virtio-rng-pci") in p
    assert ("-fsdev", "local,id=share,path=%s/share_dir,security_model=none" % d) in p
    assert ("-device", "virtio-9p-pci,fsdev=share,mount_tag=share_dir") in p
    assert ("-fsdev", "local,id=images,path=/var/lib/hyper/images,security_model=none,readonly=on") in p
    assert ("-device", "virtio-9p-pci,fsdev=images,mount_tag=images") in p
    assert ("-qmp", "unix:%s/qmp.sock,server=on,wait=off" % d) in p
    assert ("-serial", "file:%s/console.log" % d) in p


def test_kvm_and_no_images_dir_and_extra_args():
    c = config(accel="kvm", images_dir=None, extra_args=["-netdev", "user,id=n0", "-device",
                                                          "virtio-net-pci,netdev=n0"])
    argv = build_command(c)
    p = pairs(argv)
    assert ("-accel", "kvm") in p
    assert not any("mount_tag=images" in a for a in argv)
    assert argv[-4:] == ["-netdev", "user,id=n0", "-device", "virtio-net-pci,netdev=n0"]


def test_bad_accel_and_commas_are_refused():
    with pytest.raises(ValueError):
        build_command(config(accel="xen"))
    with pytest.raises(ValueError):
        build_command(config(images_dir="/a,b"))


def test_config_round_trips_through_a_dict():
    c = config(extra_args=["-x", "y"])
    assert VMConfig.from_dict(c.to_dict()) == c
    assert VMConfig.from_dict(dict(c.to_dict(), unknown_key=1)) == c
