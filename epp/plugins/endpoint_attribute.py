"""``endpoint-attribute-filter`` and ``endpoint-attribute-scorer``: filter or score by
one numeric endpoint attribute (e.g. ``GPUUtilization`` from ``dcgm-extractor``, or a
``customMetrics`` entry of ``core-metrics-extractor``).

The attribute is named by ``attribute`` (filter) / ``attributeKey`` (scorer) and
``producer``: omitted, the producer is ``core-metrics-extractor``; ``""`` names an
attribute without a producer. An attribute name containing ``/`` needs ``producer``
set explicitly (it is probably the combined ``attribute/producer`` spelling).

Filter: ``algorithm.type: threshold`` keeps an endpoint when ``value <operator>
threshold.value`` (``LessThan``, ``LessThanOrEqual``, ``GreaterThan``,
``GreaterThanOrEqual``, ``Equal``, ``NotEqual``); ``onMissing`` ``Pass`` (default)
keeps an endpoint without the attribute, ``Fail`` drops it; ``fallbackOnEmpty`` keeps
every candidate when none passes (default false).

Scorer: ``linear_lower_is_better`` or ``linear_higher_is_better`` over a range:
``adaptiveRange`` (default; the candidates' min and max, all equal -> 1) or
``fixedRange: {min, max}`` (values clamped). An endpoint without the attribute scores
0 and, with ``adaptiveRange``, is left out of the range.

A polled attribute that was not refreshed in time (its source stopped answering)
counts as missing.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from typing import Literal

from pydantic import Field, model_validator

from epp.datalayer.attributes import AttributeKey, read_scalar
from epp.datastore import Endpoint
from epp.plugins.base import Filter, PluginParams, Scorer
from epp.plugins.registry import register
from epp.scheduling.cycle import CycleState

__all__ = ["EndpointAttributeFilter", "EndpointAttributeScorer"]

_DEFAULT_PRODUCER = "core-metrics-extractor"

_OPERATORS: dict[str, Callable[[float, float], bool]] = {
    "LessThan": operator.lt,
    "LessThanOrEqual": operator.le,
    "GreaterThan": operator.gt,
    "GreaterThanOrEqual": operator.ge,
    "Equal": operator.eq,
    "NotEqual": operator.ne,
}


def _resolve_key(attribute: str, producer: str | None, field_name: str) -> AttributeKey:
    if producer is not None:
        return (attribute, producer)
    if "/" in attribute:
        name, _, prod = attribute.rpartition("/")
        raise ValueError(
            f"{field_name} {attribute!r} contains '/' but no producer is set; for the combined "
            f"'attribute/producer' spelling write {field_name}: {name!r} and producer: {prod!r}, "
            "or set producer explicitly if the name itself contains '/'"
        )
    return (attribute, _DEFAULT_PRODUCER)


class _Threshold(PluginParams):
    operator: Literal[
        "LessThan", "LessThanOrEqual", "GreaterThan", "GreaterThanOrEqual", "Equal", "NotEqual"
    ]
    value: float


class _FilterAlgorithm(PluginParams):
    type: Literal["threshold"]
    threshold: _Threshold


@register
class EndpointAttributeFilter(Filter):
    type_name = "endpoint-attribute-filter"

    class Params(PluginParams):
        attribute: str = Field(min_length=1)
        producer: str | None = None
        on_missing: Literal["Pass", "Fail"] = "Pass"
        fallback_on_empty: bool = False
        algorithm: _FilterAlgorithm

        @model_validator(mode="after")
        def _key(self) -> EndpointAttributeFilter.Params:
            _resolve_key(self.attribute, self.producer, "attribute")
            return self

    params: Params

    def __init__(self, params: Params | None = None, name: str | None = None) -> None:
        if params is None:
            raise ValueError("endpoint-attribute-filter needs parameters (attribute, algorithm)")
        super().__init__(params, name)
        self.key = _resolve_key(self.params.attribute, self.params.producer, "attribute")
        threshold = self.params.algorithm.threshold
        self._op = _OPERATORS[threshold.operator]
        self._value = threshold.value
        self._pass_missing = self.params.on_missing == "Pass"

    def filter(self, cycle: CycleState, endpoints: Sequence[Endpoint]) -> Sequence[Endpoint]:
        kept = []
        for ep in endpoints:
            value = read_scalar(ep, self.key, cycle.now)
            if (value is None and self._pass_missing) or (
                value is not None and self._op(value, self._value)
            ):
                kept.append(ep)
        if not kept and self.params.fallback_on_empty:
            return endpoints
        return kept


class _FixedRange(PluginParams):
    min: float
    max: float

    @model_validator(mode="after")
    def _ordered(self) -> _FixedRange:
        if self.min >= self.max:
            raise ValueError(f"fixedRange needs min < max, got min {self.min}, max {self.max}")
        return self


class _AdaptiveRange(PluginParams):
    pass


class _Normalization(PluginParams):
    fixed_range: _FixedRange | None = None
    adaptive_range: _AdaptiveRange | None = None

    @model_validator(mode="after")
    def _one(self) -> _Normalization:
        if self.fixed_range is not None and self.adaptive_range is not None:
            raise ValueError("at most one normalization: fixedRange or adaptiveRange")
        return self


class _ScorerAlgorithm(PluginParams):
    type: Literal["linear_lower_is_better", "linear_higher_is_better"]
    normalization: _Normalization = _Normalization()


@register
class EndpointAttributeScorer(Scorer):
    type_name = "endpoint-attribute-scorer"

    class Params(PluginParams):
        attribute_key: str = Field(min_length=1)
        producer: str | None = None
        algorithm: _ScorerAlgorithm

        @model_validator(mode="after")
        def _key(self) -> EndpointAttributeScorer.Params:
            _resolve_key(self.attribute_key, self.producer, "attributeKey")
            return self

    params: Params

    def __init__(self, params: Params | None = None, name: str | None = None) -> None:
        if params is None:
            raise ValueError("endpoint-attribute-scorer needs parameters (attributeKey, algorithm)")
        super().__init__(params, name)
        self.key = _resolve_key(self.params.attribute_key, self.params.producer, "attributeKey")
        self._lower_is_better = self.params.algorithm.type == "linear_lower_is_better"
        self._fixed = self.params.algorithm.normalization.fixed_range

    def score(self, cycle: CycleState, endpoints: Sequence[Endpoint]) -> Sequence[float]:
        values = [read_scalar(ep, self.key, cycle.now) for ep in endpoints]
        present = [v for v in values if v is not None]
        if not present:
            return [0.0] * len(endpoints)
        if self._fixed is not None:
            lo, hi = self._fixed.min, self._fixed.max
        else:
            lo, hi = min(present), max(present)
        out = []
        for v in values:
            if v is None:
                out.append(0.0)
            elif hi == lo:
                out.append(1.0)
            else:
                norm = min(1.0, max(0.0, (v - lo) / (hi - lo)))
                out.append(1.0 - norm if self._lower_is_better else norm)
        return out
