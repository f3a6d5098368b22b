"""The twistd plugin is installed where Twisted finds it, and its options reach the Config."""

import os
import subprocess
import sys

import pytest
from twisted.application.service import IServiceMaker
from twisted.plugin import getPlugins

from hyperd.tap import Options


def test_plugin_is_discoverable():
    makers = {p.tapname: p for p in getPlugins(IServiceMaker)}
    assert "hyperd" in makers
    assert isinstance(makers["hyperd"].options(), Options)


@pytest.mark.timeout(60)
def test_plugin_is_discoverable_from_another_directory():
    # the project directory on sys.path would hide a packaging mistake: look from / instead
    code = ("from twisted.plugin import getPlugins; from twisted.application.service import IServiceMaker; "
            "print(sorted(p.tapname for p in getPlugins(IServiceMaker)))")
    out = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True, timeout=60,
                         env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert out.returncode == 0, out.stderr
    assert "'hyperd'" in out.stdout


@pytest.mark.timeout(60)
def test_twistd_help_lists_hyperd():
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    out = subprocess.run([twistd, "--help"], cwd="/", capture_output=True, text=True, timeout=60)
    assert "hyperd" in out.stdout


def test_options_map_to_config_fields():
    o = Options()
    o.parseOptions(["--socket", "/tmp/x.sock", "--root", "/r", "--run-dir", "/rr", "--accel", "tcg",
                    "--stop-vms-on-exit"])
    assert o.overrides() == {
        "socket": "/tmp/x.sock", "root": "/r", "run_dir": "/rr", "kernel": None, "initrd": None,
        "accel": "tcg", "socket_group": None, "stop_vms_on_exit": True,
    }
