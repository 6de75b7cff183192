"""slo-headroom-tier-filter: keep one tier of candidates by predicted latency headroom
(SLO - predicted, from ``predicted-latency-producer``), as llm-d's filter does.

- The positive tier: endpoints whose TTFT and TPOT headroom are both >= 0 (the
  predictions' validity flags are not consulted: a prediction over its SLO has a
  negative headroom). The negative tier: the others, and the endpoints without a
  prediction (nothing says they meet the SLO).
- Both tiers non-empty: the negative tier with probability ``epsilonExploreNeg``
  (default 0.01), so endpoints recovering from overload still see some traffic and get
  re-predicted; the positive tier otherwise. One tier non-empty: that tier.
- No candidate has a prediction (predictor down, producer skipped), or at most one
  candidate: every candidate is kept.

Without SLO headers every headroom is negative (0 - predicted), so every candidate is in
the negative tier and the filter keeps them all. ``latencyPredictionInfoProducerName``
names the producer whose predictions are read (default ``predicted-latency-producer``,
created when the configuration has none).
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from pydantic import Field

from epp.datalayer.latency import (
    DEFAULT_PREDICTION_PRODUCER,
    LatencyPredictionInfo,
    read_predictions,
)
from epp.datastore import Endpoint
from epp.plugins.base import Filter, PluginParams
from epp.plugins.registry import register
from epp.scheduling.cycle import CycleState

__all__ = ["HeadroomTiers", "SloHeadroomTierFilter", "headroom_tiers", "meets_slo"]


@dataclass(frozen=True, slots=True)
class HeadroomTiers:
    """Candidates split by predicted headroom, each tier in candidate order."""

    positive: list[Endpoint]
    negative: list[Endpoint]


def meets_slo(info: LatencyPredictionInfo) -> bool:
    return info.ttft_headroom >= 0 and info.tpot_headroom >= 0


def headroom_tiers(
    endpoints: Sequence[Endpoint], predictions: Mapping[str, LatencyPredictionInfo]
) -> HeadroomTiers | None:
    """The two tiers, or None when no candidate has a prediction."""
    positive: list[Endpoint] = []
    negative: list[Endpoint] = []
    predicted = False
    for ep in endpoints:
        info = predictions.get(ep.key)
        predicted = predicted or info is not None
        (positive if info is not None and meets_slo(info) else negative).append(ep)
    return HeadroomTiers(positive, negative) if predicted else None


@register
class SloHeadroomTierFilter(Filter):
    type_name = "slo-headroom-tier-filter"

    class Params(PluginParams):
        epsilon_explore_neg: float = Field(default=0.01, ge=0.0, le=1.0)
        latency_prediction_info_producer_name: str = ""

    params: Params

    def __init__(
        self,
        params: Params | None = None,
        name: str | None = None,
        rng: random.Random | None = None,
    ) -> None:
        super().__init__(params, name)
        self.rng = rng or random.Random()

    @property
    def prediction_producer(self) -> str:
        return self.params.latency_prediction_info_producer_name or DEFAULT_PREDICTION_PRODUCER

    def filter(self, cycle: CycleState, endpoints: Sequence[Endpoint]) -> Sequence[Endpoint]:
        if len(endpoints) <= 1:
            return endpoints
        tiers = headroom_tiers(endpoints, read_predictions(cycle, self.prediction_producer))
        if tiers is None:
            return endpoints
        if tiers.positive and tiers.negative:
            explore = self.rng.random() < self.params.epsilon_explore_neg
            return tiers.negative if explore else tiers.positive
        return tiers.positive or tiers.negative
