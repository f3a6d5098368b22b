"""Reading query parameters and bodies: every malformed input becomes BadParameter naming the parameter."""

from __future__ import annotations

from typing import Any

from twisted.web.iweb import IRequest

from hyperd.errors import BadParameter
from hyperd.schema import loads

__all__ = ["arg", "int_arg", "bool_arg", "json_arg", "json_body", "MAX_BODY"]

#: The biggest JSON body we read; a pod spec is a few kB.
MAX_BODY = 16 * 1024 * 1024

_TRUE = ("yes", "true", "1", "on", "y", "t")
_FALSE = ("no", "false", "0", "off", "n", "f")


def arg(request: IRequest, *names: str, default: Any = None, required: bool = False) -> Any:
    """The first present query/form parameter among ``names`` (spellings of one parameter), as text.

    An empty value counts as absent, as Go's ``r.Form.Get`` made it indistinguishable.
    """
    for name in names:
        values = request.args.get(name.encode("ascii"))
        if values and values[0] != b"":
            try:
                return values[0].decode("utf-8")
            except UnicodeDecodeError:
                raise BadParameter(f"bad parameter: {name} is not valid UTF-8") from None
    if required:
        raise BadParameter(f"bad parameter: {names[0]} is required")
    return default


def int_arg(request: IRequest, name: str, default: int | None = None, required: bool = False) -> int | None:
    value = arg(request, name, required=required)
    if value is None:
        return default
    try:
        return int(value.strip(), 10)
    except ValueError:
        raise BadParameter(f"bad parameter: {name} must be an integer, got {value!r}") from None


def bool_arg(request: IRequest, *names: str, default: bool = False) -> bool:
    value = arg(request, *names)
    if value is None:
        return default
    v = value.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise BadParameter(f"bad parameter: {names[0]} must be yes or no, got {value!r}")


def json_arg(request: IRequest, name: str, required: bool = False) -> Any:
    """A query parameter holding JSON (hyperd's ``podArgs``), read with the open-schema reader."""
    value = arg(request, name, required=required)
    if value is None:
        return None
    try:
        return loads(value, what=name)
    except BadParameter as e:
        raise BadParameter(f"bad parameter: {e.message}") from None


def json_body(request: IRequest, what: str = "request body") -> Any:
    """The request body as JSON (open schema); empty, too big or malformed → BadParameter."""
    data = request.content.read(MAX_BODY + 1) if request.content is not None else b""
    if len(data) > MAX_BODY:
        raise BadParameter(f"bad parameter: {what} is larger than {MAX_BODY} bytes")
    try:
        return loads(data, what=what)
    except BadParameter as e:
        raise BadParameter(f"bad parameter: {e.message}") from None
