"""hyperd.guest: what runs inside the VM, and the builder of the VM's kernel and initramfs.

Inside the VM (standard library only, imported by the initramfs's ``/init``): ``boot`` (PID 1 set-up),
``agent`` (hyperstart's protocol, API 4244, as a poll loop with a dispatch table), ``pod`` (the pod and
container commands), ``linux`` (ctypes system calls), ``jsonc`` (JSON through ``_json``), ``modules``.
On the host: ``initrd`` (``build_guest``, ``kernel_cmdline``, the ``hyperd-mkinitrd`` script).
See docs/guest-protocol.md.
"""
