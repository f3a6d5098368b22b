"""The VM and pod tests use the shared fixtures of tests/conftest.py (guest_files, vm_daemon, make_api,
qemu_pids) and tests/support.py."""
