"""common.json_codec: the same values, types and errors as the standard library."""

from __future__ import annotations

import json
import math

import pytest

from common.json_codec import dumps, loads, loads_checked

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


def test_loads_checked_says_whether_every_integer_fits_64_bits() -> None:
    assert loads_checked(b'{"ids": [1, 2, 999999999999999999]}') == (
        {"ids": [1, 2, 999999999999999999]},
        True,
    )
    doc, short = loads_checked(b'{"ids": [1, 1234567890123456789]}')
    assert doc == {"ids": [1, 1234567890123456789]} and not short
    nan, short = loads_checked(b"[NaN]")  # json decides, the digits were still checked
    assert math.isnan(nan[0]) and short


def test_dumps_is_compact_utf8_and_round_trips_what_orjson_refuses() -> None:
    assert dumps({"a": "é", "b": [1, 2]}) == '{"a":"é","b":[1,2]}'.encode()
    refused = {"seed": 2**70, "s": "\ud800"}
    assert dumps(refused) == b'{"seed":1180591620717411303424,"s":"\\ud800"}'
    assert loads(dumps(refused)) == refused
