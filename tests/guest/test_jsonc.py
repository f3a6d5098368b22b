"""hyperd.guest.jsonc (JSON through _json alone) agrees with the json package."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hyperd.guest import jsonc

values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(values)
def test_round_trips_like_json(value):
    text = jsonc.dumps(value)
    assert text == json.dumps(value, separators=(",", ":"))
    assert jsonc.loads(text) == json.loads(text)
    assert jsonc.loads(" \n" + json.dumps(value, indent=2) + "\t") == value


def test_raw_decode_reports_where_the_value_ends():
    value, end = jsonc.raw_decode('  {"container":"c1","file":"/x"}RAW BYTES')
    assert value == {"container": "c1", "file": "/x"}
    assert end == len('  {"container":"c1","file":"/x"}')


@pytest.mark.parametrize("bad", ["", "{", '{"a":}', "[1,]", '"\\q"', "nul", "{} x", '{"a" 1}'])
def test_invalid_json_is_a_value_error(bad):
    with pytest.raises(ValueError):
        jsonc.loads(bad)


def test_event_encoding_matches_hyperstart():
    assert jsonc.dumps({"container": "c1", "process": "init", "event": "finished", "status": 3}) == \
        '{"container":"c1","process":"init","event":"finished","status":3}'
