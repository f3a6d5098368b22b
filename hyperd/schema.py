"""The open-schema JSON reader every JSON input goes through.

hyperd was written in Go, whose ``encoding/json`` matches object keys case-insensitively and ignores
unknown ones; real pod files rely on that (``"containerport"``, ``"hostport"``). This module gives Python
the same reading rules:

* :func:`loads` parses bytes or text and turns a syntax error into :class:`~hyperd.errors.BadParameter`
  carrying the parser's complaint (line, column, what was expected).
* :class:`JSONObject` is a ``dict`` over a parsed object whose lookups ignore case; nested objects and
  arrays come back wrapped the same way, so ``spec["Containers"][0]["IMAGE"]`` works, and code that
  expects a plain dict (``isinstance(x, dict)``, ``.items()``, ``json.dumps``) still gets one.
* :func:`field` reads one field with a type check and a default, and names the field's path in the
  error (``containers[0].image: expected a string``), which is what a user needs to fix a pod file.

Unknown keys are never an error: a reader only looks up the keys it knows.
"""

from __future__ import annotations

import json
from typing import Any

from hyperd.errors import BadParameter

__all__ = ["JSONObject", "JSONArray", "loads", "wrap", "unwrap", "field", "MISSING"]


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


#: Default for :func:`field` meaning "this field is required".
MISSING: Any = _Missing()


def loads(data: bytes | str, what: str = "JSON") -> Any:
    """Parse JSON text; a syntax error becomes BadParameter with the parser's complaint.

    Objects come back as :class:`JSONObject`, arrays as :class:`JSONArray`.
    """
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise BadParameter(f"{what} is not valid UTF-8: {e}") from None
    if not data.strip():
        raise BadParameter(f"{what} is empty")
    try:
        value = json.loads(data)
    except json.JSONDecodeError as e:
        raise BadParameter(f"{what} does not parse: {e}") from None
    return wrap(value)


def wrap(value: Any, path: str = "") -> Any:
    """Wrap a plain decoded JSON value (dict/list/scalar) for case-insensitive reading."""
    if isinstance(value, (JSONObject, JSONArray)):
        return value
    if isinstance(value, dict):
        return JSONObject(value, path)
    if isinstance(value, list):
        return JSONArray(value, path)
    return value


def unwrap(value: Any) -> Any:
    """The plain dict/list/scalar behind a wrapped value (original key spelling kept)."""
    if isinstance(value, (JSONObject, JSONArray)):
        return value.raw
    return value


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


class JSONObject(dict):
    """A parsed JSON object whose keys match case-insensitively (as Go's encoding/json does).

    It is a ``dict`` (so code that expects one, and ``json.dumps``, keep working) holding the keys as
    written, with nested objects and arrays wrapped too; lookups with ``[]``, ``get`` and ``in`` ignore
    case. If an object spells one key twice in different cases, lookups find the last, as in Go.
    Treat it as read-only: it is what the client sent.
    """

    def __init__(self, raw: dict, path: str = "") -> None:
        super().__init__((k, wrap(v, _join(path, k))) for k, v in raw.items())
        self.raw = raw
        self.path = path
        self._folded = {k.casefold(): k for k in raw}

    def _key(self, key: str) -> str:
        return self._folded[key.casefold()]

    def __getitem__(self, key: str) -> Any:
        try:
            real = self._key(key)
        except (KeyError, AttributeError):
            raise KeyError(key) from None
        return super().__getitem__(real)

    def get(self, key: str, default: Any = None) -> Any:
        try:
            return self[key]
        except KeyError:
            return default

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key.casefold() in self._folded

    def __repr__(self) -> str:
        return f"JSONObject({self.raw!r})"

    def field(self, name: str, kind: Any = object, default: Any = None) -> Any:
        """Shorthand for :func:`field` on this object."""
        return field(self, name, kind, default)


class JSONArray(list):
    """A parsed JSON array whose elements are wrapped on access and know their path."""

    def __init__(self, raw: list, path: str = "") -> None:
        super().__init__(wrap(v, _join(path, i)) for i, v in enumerate(raw))
        self.raw = raw
        self.path = path


_KIND_NAMES = {
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "a boolean",
    list: "an array",
    dict: "an object",
}


def _kind_name(kind: Any) -> str:
    if isinstance(kind, tuple):
        return " or ".join(_kind_name(k) for k in kind)
    return _KIND_NAMES.get(kind, getattr(kind, "__name__", str(kind)))


def _matches(value: Any, kind: Any) -> bool:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    for k in kinds:
        if k is object:
            return True
        if k is dict and isinstance(value, JSONObject):
            return True
        if k is list and isinstance(value, JSONArray):
            return True
        if k is int and isinstance(value, bool):
            continue  # JSON true is not an integer
        if k is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return True
        if k not in (dict, list) and isinstance(value, k):
            return True
    return False


def field(obj: JSONObject, name: str, kind: Any = object, default: Any = None) -> Any:
    """Read ``obj[name]`` (any case) checking its type; absent or null gives ``default``.

    ``kind`` is a type or tuple of types among str/int/float/bool/list/dict/object. With
    ``default=MISSING`` the field is required. Errors name the field's path.
    """
    # name the field as the document spelled it, so the user finds it
    path = _join(obj.path, obj._key(name) if name in obj else name)
    if name not in obj or obj[name] is None:
        if default is MISSING:
            raise BadParameter(f"{path}: required")
        return default
    value = obj[name]
    if not _matches(value, kind):
        raise BadParameter(f"{path}: expected {_kind_name(kind)}, got {json.dumps(unwrap(value))[:60]}")
    return value
