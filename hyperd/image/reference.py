"""Image references as Docker spells them: ``busybox`` is ``docker.io/library/busybox:latest``."""

from __future__ import annotations

import re

import attrs

from hyperd.errors import BadParameter

DEFAULT_REGISTRY = "docker.io"
_COMPONENT = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$")
_TAG = re.compile(r"^[\w][\w.-]{0,127}$")
_DIGEST = re.compile(r"^[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-fA-F0-9]{32,}$")


@attrs.frozen
class Reference:
    registry: str
    repository: str
    tag: str = "latest"
    digest: str = ""

    @property
    def name(self) -> str:
        """The full canonical name, e.g. ``docker.io/library/busybox:latest``."""
        return f"{self.registry}/{self.repository}" + (f"@{self.digest}" if self.digest else f":{self.tag}")

    @property
    def short(self) -> str:
        """The familiar name users type, e.g. ``busybox:latest``."""
        repo = self.repository
        if self.registry == DEFAULT_REGISTRY:
            repo = repo.removeprefix("library/")
        else:
            repo = f"{self.registry}/{repo}"
        return repo + (f"@{self.digest}" if self.digest else f":{self.tag}")

    @property
    def repo(self) -> str:
        """The repository as hyperd's image list shows it (no tag)."""
        return self.short.rsplit("@", 1)[0].rsplit(":", 1)[0] if not self.digest else self.short.split("@")[0]


def parse_reference(text: str) -> Reference:
    """Parse and normalize an image reference; raise BadParameter for one Docker would refuse."""
    original = text
    if not text or text != text.strip():
        raise BadParameter(f"bad parameter: invalid image reference {original!r}")
    digest = ""
    if "@" in text:
        text, digest = text.split("@", 1)
        if not _DIGEST.match(digest):
            raise BadParameter(f"bad parameter: invalid digest in image reference {original!r}")
    tag = "latest"
    last = text.rsplit("/", 1)[-1]
    if ":" in last:
        text, tag = text.rsplit(":", 1)
        if not _TAG.match(tag):
            raise BadParameter(f"bad parameter: invalid tag in image reference {original!r}")
    first, sep, rest = text.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        registry, path = first, rest
    else:
        registry, path = DEFAULT_REGISTRY, text
    if registry == DEFAULT_REGISTRY and "/" not in path:
        path = f"library/{path}"
    if not path or not all(_COMPONENT.match(c) for c in path.split("/")):
        raise BadParameter(f"bad parameter: invalid image reference {original!r}")
    return Reference(registry, path, tag, digest)
