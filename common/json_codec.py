"""JSON on the hot paths: the sidecar's request and answer bodies, the EPP's requests.

Writing uses orjson (about 70x faster than the standard library for a 64 KB prompt),
falling back to the standard library for what orjson refuses: integers beyond 64 bits,
lone surrogates (a client may send ``"\\ud800"``) and nesting deeper than 255 levels.

Reading gives exactly what ``json.loads`` gives, values and errors alike, faster
(1.6-2.4x for the sidecar's 0.5-1 KB bodies, about 2x for large ones). orjson parses a
text only when its answer is provably the same: orjson turns integers beyond 64 bits
into floats where ``json`` keeps them exact, so a text with a run of 19 digits anywhere
(in a number or not) goes to ``json``; and whatever orjson refuses (NaN, lone
surrogates, a byte order mark, UTF-16, nesting, malformed text) goes to ``json`` too,
which accepts it or raises its own error.
"""

from __future__ import annotations

import json
from typing import Any

import orjson

__all__ = ["dumps", "loads", "loads_checked"]

_DIGITS_AS_ZERO = bytes.maketrans(b"0123456789", b"0" * 10)
_LONG_DIGIT_RUN = b"0" * 19


def dumps(payload: object) -> bytes:
    """Compact UTF-8 JSON."""
    try:
        return orjson.dumps(payload)
    except TypeError:
        # ASCII escapes: a lone surrogate a client sent as \ud800 has no UTF-8 form, and
        # goes on escaped exactly as it came.
        return json.dumps(payload, separators=(",", ":")).encode()


def loads(body: bytes | bytearray | str) -> Any:
    """``json.loads(body)``: the same result and the same errors, faster."""
    return loads_checked(body)[0]


def loads_checked(body: bytes | bytearray | str) -> tuple[Any, bool]:
    """``loads(body)``, and whether the text holds no run of 19 digits (then every
    integer in it fits 64 bits signed)."""
    data = body.encode("utf-8", "surrogatepass") if isinstance(body, str) else bytes(body)
    if _LONG_DIGIT_RUN in data.translate(_DIGITS_AS_ZERO):
        return json.loads(body), False
    try:
        return orjson.loads(data), True
    except orjson.JSONDecodeError:
        return json.loads(body), True
