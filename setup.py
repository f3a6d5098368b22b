"""Packaging for hyperd. The twistd plugin lives in twisted/plugins/ (no __init__.py there), listed explicitly."""

import re

from setuptools import setup

with open("hyperd/__init__.py") as f:
    version = re.search(r'__version__ = "([^"]+)"', f.read()).group(1)

setup(
    name="hyperd",
    version=version,
    description="Pods of containers, each in its own lightweight QEMU VM, behind hyperd's REST API",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=[
        "hyperd",
        "hyperd.agent",
        "hyperd.api",
        "hyperd.client",
        "hyperd.guest",
        "hyperd.image",
        "hyperd.network",
        "hyperd.pod",
        "hyperd.vm",
        "twisted.plugins",
    ],
    package_data={"twisted": ["plugins/hyperd_plugin.py"]},
    install_requires=[
        "twisted[tls]>=24.7,<27",
        "klein>=24.8,<25",
        "treq>=24.9,<27",
        "zope.interface>=6,<9",
        "pyroute2>=0.9,<0.10",
        "attrs>=23.1",
        "pyyaml>=6,<7",
    ],
    extras_require={
        "test": [
            "pytest>=8,<10",
            "pytest-twisted>=1.14,<2",
            "hypothesis>=6.100,<7",
            "pytest-timeout>=2.2,<3",
            "ruff>=0.6",
        ],
    },
    entry_points={
        "console_scripts": [
            "hyperctl = hyperd.client.cli:main",
            "hyperd-mkinitrd = hyperd.guest.initrd:main",
        ],
    },
)
