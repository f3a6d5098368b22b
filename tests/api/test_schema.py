"""The open-schema JSON reader: keys in any case, unknown keys ignored, errors that name the field."""

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hyperd.errors import BadParameter
from hyperd.schema import MISSING, JSONObject, field, loads, unwrap

keys = st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=12)
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=10))


@st.composite
def recased(draw, key):
    return "".join(c.upper() if draw(st.booleans()) else c.lower() for c in key)


@given(st.dictionaries(keys, scalars, min_size=1), st.data())
def test_any_spelling_of_a_key_finds_its_value(obj, data):
    # keys that fold to the same thing would collide; Go keeps the last one, so do we: use unique folds
    folded = {}
    for k, v in obj.items():
        folded[k.casefold()] = (k, v)
    doc = loads(json.dumps({k: v for k, v in folded.values()}))
    for k, v in folded.values():
        spelling = data.draw(recased(k))
        assert spelling in doc
        assert doc[spelling] == v


@given(st.dictionaries(keys, scalars), st.dictionaries(keys, scalars))
def test_unknown_keys_are_ignored(known, unknown):
    known = {k.lower(): v for k, v in known.items()}
    extra = {f"unknown-{k}": v for k, v in unknown.items() if f"unknown-{k}".lower() not in known}
    doc = loads(json.dumps({**extra, **known}))
    for k, v in known.items():
        assert field(doc, k.upper()) == v
    assert unwrap(doc) == {**extra, **known}


def test_nested_objects_and_arrays_are_case_insensitive_too():
    doc = loads(b'{"Containers": [{"IMAGE": "busybox", "Ports": [{"containerport": "80"}]}]}')
    assert doc["containers"][0]["image"] == "busybox"
    assert doc["CONTAINERS"][0]["ports"][0]["ContainerPort"] == "80"


def test_last_spelling_wins_like_go():
    assert loads('{"id": "a", "ID": "b"}')["Id"] == "b"


def test_malformed_json_carries_the_parser_complaint():
    with pytest.raises(BadParameter) as e:
        loads(b'{"id": ', what="pod spec")
    assert "pod spec does not parse" in e.value.message
    assert "line 1 column" in e.value.message


@pytest.mark.parametrize("data", [b"", b"   ", b"\xff\xfe"])
def test_empty_or_undecodable_input_is_a_bad_parameter(data):
    with pytest.raises(BadParameter):
        loads(data)


def test_field_checks_types_and_names_the_path():
    doc = loads('{"containers": [{"image": 3, "tty": true}]}')
    c = doc["containers"][0]
    with pytest.raises(BadParameter) as e:
        field(c, "Image", str)
    assert e.value.message.startswith("containers[0].image: expected a string")
    with pytest.raises(BadParameter) as e:
        field(c, "name", str, MISSING)
    assert e.value.message == "containers[0].name: required"
    assert field(c, "TTY", bool) is True
    assert field(c, "workdir", str, "/") == "/"
    with pytest.raises(BadParameter):
        field(c, "tty", int)  # true is not an integer


def test_objects_are_dicts_for_code_that_wants_one():
    doc = loads('{"a": {"B": [1, {"c": 2}]}}')
    assert isinstance(doc, JSONObject) and isinstance(doc, dict)
    assert list(doc) == ["a"] and len(doc) == 1
    assert list(doc.items())[0][0] == "a"
    assert doc["A"].get("b")[1].get("C") == 2
    assert doc.get("missing", 7) == 7
    assert json.loads(json.dumps(doc)) == {"a": {"B": [1, {"c": 2}]}}
