"""JSON for the guest through the C accelerator ``_json`` alone.

The ``json`` package imports ``re`` and ``enum``, which costs ~0.2 s of guest CPU under TCG right when the
first pod starts; ``_json``'s scanner parses everything by itself, and our replies are simple enough to
encode by hand. Standard library only.
"""

import _json

_WHITESPACE = " \t\n\r"
_CONSTANTS = {"NaN": float("nan"), "Infinity": float("inf"), "-Infinity": float("-inf")}


class _Context:
    """What ``_json.make_scanner`` reads from json.JSONDecoder: the default decoding rules."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = staticmethod(_CONSTANTS.__getitem__)


_scan_once = _json.make_scanner(_Context())


def _skip(text: str, index: int) -> int:
    while index < len(text) and text[index] in _WHITESPACE:
        index += 1
    return index


def raw_decode(text: str, start: int = 0):
    """``(value, end)`` for the JSON value at ``text[start:]`` (after whitespace); ValueError if none."""
    index = _skip(text, start)
    try:
        return _scan_once(text, index)
    except StopIteration as e:
        raise ValueError("expecting a value at offset %d" % e.value) from None
    except (ValueError, SystemError, RecursionError) as e:
        # _json formats its detailed errors with json.decoder, which the guest does not import.
        raise ValueError("invalid JSON after offset %d (%s)" % (index, type(e).__name__)) from None


def loads(text: str):
    value, end = raw_decode(text)
    end = _skip(text, end)
    if end != len(text):
        raise ValueError("extra data at offset %d" % end)
    return value


def dumps(value) -> str:
    """Compact JSON (``separators=(",", ":")``, ASCII) of dicts, lists, strings, numbers, booleans, None."""
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, str):
        return _json.encode_basestring_ascii(value)
    if isinstance(value, int):
        return int.__repr__(value)
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError("%r is not JSON" % value)
        return float.__repr__(value)
    if isinstance(value, dict):
        return "{" + ",".join("%s:%s" % (_json.encode_basestring_ascii(str(k)), dumps(v))
                              for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(dumps(v) for v in value) + "]"
    raise TypeError("%s is not JSON serializable" % type(value).__name__)
