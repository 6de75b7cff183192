"""Go duration strings, as Go's ``time.ParseDuration`` reads them.

A duration is an optional sign, then one or more decimal numbers (an optional fraction,
``1.5``, ``.5``, ``5.``), each followed by a unit: ``ns``, ``us``, ``µs`` (micro sign),
``μs`` (Greek mu), ``ms``, ``s``, ``m``, ``h``. ``0`` alone needs no unit. So
``1h2m3.5s``, ``200ms`` and ``1.5us`` are durations; ``""``, ``5``, ``5 s`` and ``1d``
are not.

- :func:`parse_go_duration`: a string, signed, in seconds (flags and settings).
- :func:`parse_duration`: a string or a number of seconds, never negative (plugin
  parameters in configuration files).
- :func:`duration_value`: a pydantic ``BeforeValidator`` for a field in seconds;
  :data:`PositiveSeconds` is such a field that must be above zero.
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import BeforeValidator, Field

__all__ = ["PositiveSeconds", "duration_value", "parse_duration", "parse_go_duration"]

_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "\u00b5s": 1e-6,  # micro sign
    "\u03bcs": 1e-6,  # Greek mu
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
# A number (``1``, ``1.5``, ``.5``, ``5.``) and a run of letters read as its unit.
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)([^\d.]*)")
_EXAMPLES = "e.g. 200ms, 30s, 1m30s, 1h2m3.5s"


def parse_go_duration(text: str) -> float:
    """Seconds from a Go duration string; ``ValueError`` naming the text otherwise."""
    s = text.strip()
    sign = 1.0
    if s[:1] in ("+", "-"):
        sign = -1.0 if s[0] == "-" else 1.0
        s = s[1:]
    if s == "0":
        return 0.0
    if not s:
        raise ValueError(f"not a duration: {text!r} ({_EXAMPLES})")
    total, pos = 0.0, 0
    while pos < len(s):
        match = _PART.match(s, pos)
        if match is None:
            raise ValueError(f"not a duration: {text!r} ({_EXAMPLES})")
        number, unit = match.groups()
        if not unit:
            raise ValueError(f"not a duration: {text!r} (a number needs a unit; {_EXAMPLES})")
        if unit not in _UNITS:
            raise ValueError(f"not a duration: {text!r} (unknown unit {unit!r}; {_EXAMPLES})")
        total += float(number) * _UNITS[unit]
        pos = match.end()
    return sign * total


def parse_duration(value: str | float | int) -> float:
    """Seconds from a Go duration string or a number of seconds; never negative."""
    if isinstance(value, bool):
        raise ValueError("a duration is required, not a boolean")
    seconds = float(value) if isinstance(value, int | float) else parse_go_duration(value)
    if seconds < 0:
        raise ValueError(f"duration must not be negative: {value!r}")
    return seconds


def duration_value(value: object) -> object:
    """For ``BeforeValidator``: strings and numbers become seconds (never negative);
    other types are left for pydantic to refuse."""
    if isinstance(value, str | int | float):
        return parse_duration(value)
    return value


# A configuration field in seconds, given as a Go duration string or a number; above 0.
PositiveSeconds = Annotated[float, BeforeValidator(duration_value), Field(gt=0)]
