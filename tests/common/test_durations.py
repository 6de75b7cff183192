"""One Go duration parser for every component, as Go's ``time.ParseDuration`` reads."""

from __future__ import annotations

from typing import Annotated

import pytest
from pydantic import BaseModel, BeforeValidator, ValidationError

from common.durations import duration_value, parse_duration, parse_go_duration


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("1h2m3.5s", 3723.5),
        ("200ms", 0.2),
        ("1.5us", 1.5e-6),
        ("1.5\u00b5s", 1.5e-6),  # micro sign
        ("1.5\u03bcs", 1.5e-6),  # Greek mu
        ("100ns", 1e-7),
        ("0", 0.0),
        ("-0", 0.0),
        ("+5s", 5.0),
        ("-1m", -60.0),
        (".5m", 30.0),
        ("5.s", 5.0),
        ("1.5h", 5400.0),
        ("2h45m", 9900.0),
        ("1m30s500ms", 90.5),
        ("  30s ", 30.0),
        ("0s", 0.0),
    ],
)
def test_go_syntax(text: str, seconds: float) -> None:
    assert parse_go_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "text",
    ["", "-", "+", "5", "200", ".", ".s", "ms", "5 s", "1d", "1s2", "1m30", "abc", "1S", "1..5s",
     "1e3s", "true", "s5"],
)  # fmt: skip
def test_not_go_syntax(text: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_go_duration(text)


def test_numbers_are_seconds_and_never_negative() -> None:
    assert parse_duration(3) == 3.0
    assert parse_duration(0.25) == 0.25
    assert parse_duration("1m") == 60.0
    for bad in (-1, "-1s"):
        with pytest.raises(ValueError, match="negative"):
            parse_duration(bad)
    with pytest.raises(ValueError, match="boolean"):
        parse_duration(True)


class _Model(BaseModel):
    timeout: Annotated[float, BeforeValidator(duration_value)]


def test_validator_for_pydantic_fields() -> None:
    assert _Model(timeout="1m30s").timeout == 90.0
    assert _Model(timeout=2).timeout == 2.0
    for bad in ("soon", "-5s", True, [1]):
        with pytest.raises(ValidationError, match="timeout"):
            _Model(timeout=bad)
