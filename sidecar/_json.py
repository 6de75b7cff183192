"""JSON on the hot path.

Serialising uses orjson (measured ~70x faster than the standard library for a 64 KB
prompt: 3 us against 206 us), falling back to the standard library for what orjson
refuses: integers beyond 64 bits, lone surrogates (a client may send ``"\\ud800"``) and
nesting deeper than 255 levels. Parsing stays with the standard library: orjson would
turn such integers into floats, silently changing a client's body, and its gain when
parsing is small (36 us against 58 us for 64 KB).
"""

from __future__ import annotations

import json

import orjson

__all__ = ["dumps", "loads"]

loads = json.loads


def dumps(payload: object) -> bytes:
    """Compact UTF-8 JSON."""
    try:
        return orjson.dumps(payload)
    except TypeError:
        # ASCII escapes: a lone surrogate a client sent as \ud800 has no UTF-8 form, and
        # goes on escaped exactly as it came.
        return json.dumps(payload, separators=(",", ":")).encode()
