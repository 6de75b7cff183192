"""``context-length-aware``: prefer endpoints whose declared context-length range fits.

Each endpoint may carry a label (``llm-d.ai/context-length-range`` by default) holding
``"min-max"`` tokens. The request's context length is its prompt token estimate.

Scores: an endpoint without the label scores 0.5; one with an unreadable label 0. In
range, the score lies in (0.3, 1]: 0.3 + 0.7 * (0.7 * width_score + 0.3 * headroom),
where ``width_score = 1 / (1 + width / 10000)`` favours specialised (narrow) ranges and
``headroom = (max - length) / width`` favours room to spare; a zero-width range that
matches scores 1. Out of range, the score is ``0.3 / (1 + distance / 1000)``, so a
nearer range ranks higher. With ``enableFiltering`` it also drops endpoints whose range
does not contain the length (unlabelled endpoints stay; unreadable labels are dropped).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from pydantic import Field

from epp.datastore import Endpoint
from epp.plugins.base import Filter, PluginParams, Scorer
from epp.plugins.registry import register
from epp.scheduling.cycle import CycleState

__all__ = ["ContextLengthAware", "ContextRange", "parse_range", "range_score"]

log = logging.getLogger(__name__)

DEFAULT_LABEL = "llm-d.ai/context-length-range"
_FALLBACK_MAX = 0.3
_UNLABELLED = 0.5


@dataclass(frozen=True, slots=True)
class ContextRange:
    low: int
    high: int

    def contains(self, length: int) -> bool:
        return self.low <= length <= self.high


def parse_range(text: str) -> ContextRange:
    """``"min-max"`` (integers, min <= max); ``ValueError`` naming the problem."""
    parts = text.split("-")
    if len(parts) != 2:
        raise ValueError(f"invalid range {text!r} (expected 'min-max')")
    try:
        low, high = int(parts[0].strip()), int(parts[1].strip())
    except ValueError:
        raise ValueError(f"invalid range {text!r}: bounds must be integers") from None
    if low > high:
        raise ValueError(f"invalid range {text!r}: min {low} is above max {high}")
    return ContextRange(low, high)


def range_score(length: int, r: ContextRange) -> float:
    """The score of one endpoint's range for a request of ``length`` tokens."""
    if r.contains(length):
        width = r.high - r.low
        if width == 0:
            return 1.0
        width_score = 1.0 / (1.0 + width / 10000.0)
        headroom = (r.high - length) / width
        raw = 0.7 * width_score + 0.3 * headroom
        return _FALLBACK_MAX + raw * (1.0 - _FALLBACK_MAX)
    distance = length - r.high if length > r.high else r.low - length
    return _FALLBACK_MAX / (1.0 + distance / 1000.0)


@register
class ContextLengthAware(Filter, Scorer):
    """Scores by context-length range; filters too when ``enableFiltering``."""

    type_name = "context-length-aware"

    class Params(PluginParams):
        label: str = Field(default=DEFAULT_LABEL, min_length=1)
        enable_filtering: bool = False

    params: Params

    def _range(self, ep: Endpoint) -> ContextRange | str | None:
        """The endpoint's range, None without the label, the error text when unreadable."""
        text = ep.labels.get(self.params.label)
        if text is None:
            return None
        try:
            return parse_range(text)
        except ValueError as exc:
            log.debug("endpoint %s: label %s: %s", ep.key, self.params.label, exc)
            return str(exc)

    def filter(self, cycle: CycleState, endpoints: Sequence[Endpoint]) -> Sequence[Endpoint]:
        if not self.params.enable_filtering:
            return endpoints
        length = cycle.request.token_estimate
        out = []
        for ep in endpoints:
            r = self._range(ep)
            if r is None or (isinstance(r, ContextRange) and r.contains(length)):
                out.append(ep)
        return out

    def score(self, cycle: CycleState, endpoints: Sequence[Endpoint]) -> Sequence[float]:
        length = cycle.request.token_estimate
        out = []
        for ep in endpoints:
            r = self._range(ep)
            if r is None:
                out.append(_UNLABELLED)
            elif isinstance(r, str):
                out.append(0.0)
            else:
                out.append(range_score(length, r))
        return out
