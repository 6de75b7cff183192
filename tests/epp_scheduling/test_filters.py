"""Role filters and the label-selector filter."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from epp.plugins.filters import DecodeFilter, EncodeFilter, LabelSelectorFilter, PrefillFilter

from .helpers import cycle, endpoint

ROLES = [
    None,
    "decode",
    "prefill",
    "prefill-decode",
    "both",
    "encode",
    "encode-prefill",
    "encode-prefill-decode",
    "something-else",
]


def _accepted(flt: object) -> set[str | None]:
    eps = [endpoint(f"p{i}", 8000 + i, role) for i, role in enumerate(ROLES)]
    out = flt.filter(cycle(), eps)  # type: ignore[attr-defined]
    return {ep.role for ep in out}


def test_decode_filter_accepts_unlabelled() -> None:
    assert _accepted(DecodeFilter()) == {
        None,
        "decode",
        "prefill-decode",
        "both",
        "encode-prefill-decode",
    }


def test_prefill_filter_rejects_unlabelled() -> None:
    assert _accepted(PrefillFilter()) == {
        "prefill",
        "encode-prefill",
        "prefill-decode",
        "both",
        "encode-prefill-decode",
    }


def test_encode_filter() -> None:
    assert _accepted(EncodeFilter()) == {"encode", "encode-prefill", "encode-prefill-decode"}


def test_filters_keep_empty_empty() -> None:
    assert list(DecodeFilter().filter(cycle(), [])) == []


def test_label_selector_match_labels_and_expressions() -> None:
    eps = [
        endpoint("a", 1, labels={"zone": "a", "gpu": "h100"}),
        endpoint("b", 2, labels={"zone": "b", "gpu": "h100"}),
        endpoint("c", 3, labels={"zone": "a"}),
        endpoint("d", 4, labels={"zone": "c", "gpu": "a10", "spot": "1"}),
    ]

    def names(params: dict[str, object]) -> list[str]:
        flt = LabelSelectorFilter(LabelSelectorFilter.Params.model_validate(params))
        return [ep.name for ep in flt.filter(cycle(), eps)]

    assert names({"matchLabels": {"zone": "a"}}) == ["a", "c"]
    assert names({"matchExpressions": [{"key": "gpu", "operator": "Exists"}]}) == ["a", "b", "d"]
    assert names({"matchExpressions": [{"key": "gpu", "operator": "DoesNotExist"}]}) == ["c"]
    assert names(
        {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a", "c"]}]}
    ) == ["a", "c", "d"]
    assert names(
        {"matchExpressions": [{"key": "gpu", "operator": "NotIn", "values": ["h100"]}]}
    ) == ["c", "d"]
    assert names(
        {"matchLabels": {"zone": "a"}, "matchExpressions": [{"key": "gpu", "operator": "Exists"}]}
    ) == ["a"]
    assert names({}) == ["a", "b", "c", "d"]


def test_label_selector_rejects_unknown_operator_and_fields() -> None:
    with pytest.raises(ValidationError):
        LabelSelectorFilter.Params.model_validate(
            {"matchExpressions": [{"key": "k", "operator": "Gt"}]}
        )
    with pytest.raises(ValidationError, match="selector"):
        LabelSelectorFilter.Params.model_validate({"selector": {}})
