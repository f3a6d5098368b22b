"""Domain errors. The API maps each to an HTTP status in one place (hyperd/api/)."""


class HyperError(Exception):
    """Anything hyperd refuses or fails to do; the message says what went wrong, for the user."""

    status = 500

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else self.__class__.__name__


class BadParameter(HyperError):
    """The request is malformed or names an impossible value (400)."""

    status = 400


class NotFound(HyperError):
    """No such pod, container, VM, exec or image (404)."""

    status = 404


class Conflict(HyperError):
    """The request contradicts the current state: a duplicate name, a pod already running (409)."""

    status = 409


class VMError(HyperError):
    """A VM failed to boot, or died, or its agent misbehaved (500)."""
