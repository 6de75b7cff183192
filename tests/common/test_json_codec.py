"""common.json_codec: the same values, types and errors as the standard library."""

from __future__ import annotations

import json
from array import array
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.json_codec import PACK_FROM_BYTES, dumps, loads, loads_packed, small_ints

CASES = [
    '{"a": 1, "a": 2, "p": "%s"}',  # duplicate keys: the last wins
    '{"big": [1, 123456789012345678901234567890], "p": "%s"}',
    '{"neg": -9223372036854775809, "p": "%s"}',
    '{"edge": [9223372036854775807, -9223372036854775808, 18446744073709551615], "p": "%s"}',
    '{"f": [0.1, 1e19, 5e-324, 1e309, -1e309, 1.0e-400, -0.0], "p": "%s"}',
    '{"digits": "1234567890123456789", "p": "%s"}',  # a long run in a string: json decides
    '{"s": "\\ud800", "p": "%s"}',
    '{"n": NaN, "i": -Infinity, "p": "%s"}',
    '{"deep": {"x": [[{"y": 18446744073709551616}]]}, "p": "%s"}',
    '{"u": "\\u0000\\u00e9\\ud83d\\ude00", "p": "%s"}',
]


@pytest.mark.parametrize("pad", [0, 64 * 1024], ids=["small", "large"])
@pytest.mark.parametrize("case", CASES)
def test_loads_gives_what_json_loads_gives(case: str, pad: int) -> None:
    text = case % ("x" * pad)
    for body in (text.encode(), bytearray(text.encode()), text):
        got, want = loads(body), json.loads(body)
        assert repr(got) == repr(want)  # same values and types (repr: NaN != NaN)


@pytest.mark.parametrize(
    "body",
    [b"\xef\xbb\xbf{}", "{}".encode("utf-16"), b"[1, 2]"],
    ids=["bom", "utf-16", "plain"],
)
def test_loads_reads_the_encodings_json_reads(body: bytes) -> None:
    assert loads(body) == json.loads(body)


@pytest.mark.parametrize(
    "body", [b"", b"{", b"[1,]", b"tru", b"\xff{}", b"{} x", b'{"a": 01}', b'"\x01"']
)
def test_loads_raises_what_json_raises(body: bytes) -> None:
    with pytest.raises(ValueError) as want:
        json.loads(body)
    with pytest.raises(type(want.value)) as got:
        loads(body)
    assert str(got.value) == str(want.value)


def test_deep_nesting_raises_recursion_error_like_json() -> None:
    body = b"[" * 200_000 + b"]" * 200_000
    with pytest.raises(RecursionError):
        loads(body)


def test_long_texts_with_wide_integers_in_long_lists_stay_exact() -> None:
    ids = list(range(5000))
    cases = [
        {"prompt": [*ids, 10**25], "t": 0.5},  # beyond 64 bits, in a long list
        {"prompt": [*ids, -(2**63) - 1], "seed": 10**30},
        {"prompt": [*ids, 2**64 - 1, -(2**63)], "t": 1e19},  # 64 bits, and a wide float
        {"prompt": [*ids, 1e300, -1e19], "d": "1234567890123456789"},  # no wide integer
        {"prompt": [*ids, True, False, None], "x": [[*ids, 2.5]], "y": {"z": [10**20]}},
    ]
    for doc in cases:
        text = json.dumps(doc)
        assert len(text) > 4096
        got = loads(text.encode())
        assert repr(got) == repr(json.loads(text))


def test_deep_values_are_walked() -> None:
    for inner in (b"1e19", b"18446744073709551616", b"1"):
        body = b'{"p": "%s", "x": %s%s%s}' % (b"x" * 8192, b"[" * 900, inner, b"]" * 900)
        assert repr(loads(body)) == repr(json.loads(body))


def test_small_ints_are_ints_below_2_53_and_nothing_else() -> None:
    assert small_ints([0, 1, 150_000, 2**53 - 1, -(2**53 - 1)]) and small_ints([])
    for other in (True, False, 2**53, -(2**53), 2**70, 1.0, float("nan"), None, "1", [1], {}):
        assert not small_ints([1, 2, other]), other
    assert not small_ints(["\ud800"])  # what orjson cannot write


def test_dumps_is_compact_utf8_and_round_trips_what_orjson_refuses() -> None:
    assert dumps({"a": "é", "b": [1, 2]}) == '{"a":"é","b":[1,2]}'.encode()
    refused = {"seed": 2**70, "s": "\ud800"}
    assert dumps(refused) == b'{"seed":1180591620717411303424,"s":"\\ud800"}'
    assert loads(dumps(refused)) == refused


_NUMBERS = st.one_of(
    st.integers(),  # any width: orjson turns the widest into floats, json keeps them
    st.integers(min_value=2**62, max_value=2**66).map(lambda n: n * (1 if n % 2 else -1)),
    st.floats(allow_nan=False, allow_infinity=False),
    st.booleans(),
    st.none(),
)
_VALUES = st.recursive(
    _NUMBERS | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=40) | st.dictionaries(st.text(max_size=3), inner),
    max_leaves=60,
)


@settings(max_examples=300, deadline=None)
@given(value=_VALUES, long=st.booleans())
def test_loads_agrees_with_json_on_any_value(value: object, long: bool) -> None:
    """Short texts (the digit scan) and long ones (orjson first, then the walk)."""
    text = json.dumps({"v": value, "pad": "x" * (8192 if long else 0)})
    assert repr(loads(text.encode())) == repr(json.loads(text))


def _plain(doc: Any) -> Any:
    """``doc`` with its packed fields as lists."""
    if not isinstance(doc, dict):
        return doc
    return {k: v.tolist() if isinstance(v, array) else v for k, v in doc.items()}


_IDS = ",".join(str(i * 7919 % 150_000) for i in range(PACK_FROM_BYTES // 5))


@pytest.mark.parametrize("case", CASES)
def test_loads_packed_gives_what_json_loads_gives(case: str) -> None:
    text = (case % "x")[:-1] + f', "ids": [{_IDS}]}}'
    got = loads_packed(text.encode(), ("ids", "big", "edge", "f", "a"))
    assert repr(_plain(got)) == repr(json.loads(text))


def test_loads_packed_packs_flat_64_bit_int_lists_of_the_named_fields_only() -> None:
    def read(ids: str, field: str = "ids", pad: int = PACK_FROM_BYTES) -> Any:
        text = f'{{"model": "m", "{field}": {ids}, "stop": ["a", "b"], "x": {{"y": null}}, '
        text += f'"p": "{"x" * pad}"}}'
        got = loads_packed(text.encode(), ("ids",))
        assert repr(_plain(got)) == repr(json.loads(text))
        return got[field]

    packed = read(f"[{_IDS}]")
    assert isinstance(packed, array) and packed.typecode == "q"
    assert isinstance(read(f"[-9223372036854775808, {_IDS}, 9223372036854775807]"), array)
    for kept in (
        "[]",
        "[1, 9223372036854775808]",  # beyond 64 bits signed: exact ints
        "[1, true]",
        "[1, 2.0]",
        "[1, null]",
        '[1, "2"]',
        "[[1], 2]",  # nested: flattened by simdjson, so read as a list
        "[[1, 2], [3]]",
    ):
        assert isinstance(read(kept), list), kept
    assert isinstance(read(f"[{_IDS}]", field="other"), list)
    assert isinstance(read("[1, 2]", pad=10), list)  # short: read by loads
    # A list nested anywhere else, or a "[" in a string, and the body is read by loads.
    text = f'{{"ids": [{_IDS}], "m": [{{"c": [1]}}]}}'
    assert isinstance(loads_packed(text.encode(), ("ids",))["ids"], list)
    text = f'{{"ids": [{_IDS}], "s": "["}}'
    assert isinstance(loads_packed(text.encode(), ("ids",))["ids"], list)
    # The last of repeated names counts, as in json.
    text = f'{{"ids": [1], "ids": [{_IDS}]}}'
    assert _plain(loads_packed(text.encode(), ("ids",))) == json.loads(text)


@pytest.mark.parametrize(
    "body", [b"[1, 2]", b"\xef\xbb\xbf{}", b"{", b"\xff{}", b'{"a": NaN}', b'{"s": "\\ud800"}']
)
def test_loads_packed_reads_or_refuses_anything_else_as_loads_does(body: bytes) -> None:
    body += b" " * PACK_FROM_BYTES
    try:
        want = json.loads(body)
    except ValueError as exc:
        with pytest.raises(type(exc)) as got:
            loads_packed(body, ("ids",))
        assert str(got.value) == str(exc)
        return
    assert repr(loads_packed(body, ("ids",))) == repr(want)


@settings(max_examples=200, deadline=None)
@given(value=_VALUES, ids=st.lists(st.integers(-(2**63), 2**63 - 1), min_size=1, max_size=50))
def test_loads_packed_agrees_with_json_on_any_value(value: object, ids: list[int]) -> None:
    doc = {"v": value, "ids": ids, "pad": "x" * PACK_FROM_BYTES}
    text = json.dumps(doc)
    got = loads_packed(text.encode(), ("ids", "v"))
    assert repr(_plain(got)) == repr(json.loads(text))
    if isinstance(got["ids"], array):
        assert got["ids"].tolist() == ids


def test_dumps_writes_a_packed_list_as_a_list() -> None:
    assert dumps({"ids": array("q", [1, -2]), "s": "\ud800"}) == b'{"ids":[1,-2],"s":"\\ud800"}'
    assert dumps({"ids": array("q", [3])}) == b'{"ids":[3]}'
