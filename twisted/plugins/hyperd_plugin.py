"""The ``hyperd`` twistd/twist plugin. Kept import-cheap: hyperd.tap is loaded only when it runs.

No ``__init__.py`` here or in ``twisted/``: Twisted extends ``twisted.plugins.__path__`` with this
directory, and an ``__init__.py`` would shadow Twisted's own plugins.
"""

from twisted.application.service import ServiceMaker

hyperd = ServiceMaker(
    "hyperd",
    "hyperd.tap",
    "Pods of containers, each in its own QEMU VM, behind hyperd's REST API",
    "hyperd",
)
