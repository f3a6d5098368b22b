"""hyperd: pods of containers, each in its own lightweight QEMU virtual machine."""

__version__ = "0.1.0"

#: The API version we report; hyperd's clients send /v1.17/ for hijacked calls.
API_VERSION = "1.17"
