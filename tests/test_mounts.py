"""remove_tree never deletes through a bind mount: a pod's host volume survives its VM's cleanup."""

import os
import shutil
import tempfile

import pytest

from hyperd.mounts import bind_mount, mounts_below, remove_tree


@pytest.fixture
def dirs():
    top = tempfile.mkdtemp(prefix="hdm", dir="/tmp")
    host, vm = os.path.join(top, "host dir"), os.path.join(top, "vm")
    os.makedirs(host)
    os.makedirs(os.path.join(vm, "share"))
    try:
        yield host, vm
    finally:
        for point in mounts_below(top):
            os.system(f"umount -l '{point}'")
        shutil.rmtree(top, ignore_errors=True)


def test_remove_tree_unmounts_first_and_keeps_the_host_files(dirs):
    host, vm = dirs
    with open(os.path.join(host, "precious"), "w") as f:
        f.write("keep me")
    target = os.path.join(vm, "share", "volumes", "v")
    bind_mount(host, target)
    assert mounts_below(vm) == [target]
    with open(os.path.join(target, "precious")) as f:
        assert f.read() == "keep me"
    remove_tree(vm)
    assert not os.path.exists(vm)
    assert os.listdir(host) == ["precious"]


def test_a_read_only_bind_mount_refuses_writes(dirs):
    host, vm = dirs
    target = os.path.join(vm, "ro")
    bind_mount(host, target, read_only=True)
    with pytest.raises(OSError):
        open(os.path.join(target, "new"), "w")
    remove_tree(vm)
    assert os.listdir(host) == []
