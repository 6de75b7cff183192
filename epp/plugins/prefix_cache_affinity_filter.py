"""``prefix-cache-affinity-filter``: keep only the endpoints that hold most of the prompt.

An endpoint is sticky when its prefix-cache score (matched blocks / prompt blocks, from
the prefix producer) is at least ``affinityThreshold``. The filter keeps the sticky
endpoints, or all of them when:

- there are fewer than two candidates, or ``affinityThreshold`` <= 0;
- a draw below ``explorationProbability`` says explore (seeds the cache elsewhere);
- no endpoint is sticky;
- the TTFT load gate breaks: the best sticky endpoint's estimated TTFT exceeds the best
  other one's by more than ``maxTTFTPenaltyMs`` (0 turns the gate off). With
  ``ttftSource: prefillThroughput`` the estimate is in-flight tokens (from
  ``inflight-load-producer``) / ``peakPrefillThroughput`` * 1000 ms. This EPP has no
  latency predictor, so ``ttftSource: latencyPredictor`` leaves the gate closed, as an
  endpoint without a prediction does in llm-d.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Literal

from pydantic import Field, model_validator

from epp.datastore import Endpoint
from epp.plugins.base import Filter, PluginParams, PluginSet
from epp.plugins.inflight_load import InFlightLoadProducer, bind_inflight_producer
from epp.plugins.prefix_producer import PREFIX_MATCH, check_match_producer
from epp.plugins.registry import register
from epp.scheduling.cycle import CycleState

__all__ = ["PrefixCacheAffinityFilter", "split_sticky"]


def split_sticky(scores: Sequence[float], threshold: float) -> tuple[list[int], list[int]]:
    """Indexes of the sticky (score >= threshold) and the other candidates."""
    sticky = [i for i, s in enumerate(scores) if s >= threshold]
    others = [i for i, s in enumerate(scores) if s < threshold]
    return sticky, others


@register
class PrefixCacheAffinityFilter(Filter):
    type_name = "prefix-cache-affinity-filter"
    needs_prefix_producer = True

    class Params(PluginParams):
        affinity_threshold: float = Field(default=0.80, le=1.0)
        exploration_probability: float = Field(default=0.0, ge=0.0, le=1.0)
        max_ttft_penalty_ms: float = Field(default=18000.0, ge=0.0, alias="maxTTFTPenaltyMs")
        ttft_source: Literal["prefillThroughput", "latencyPredictor"] = Field(
            default="prefillThroughput", alias="ttftSource"
        )
        peak_prefill_throughput: float = Field(default=15928.0, ge=0.0)
        prefix_match_info_producer_name: str = ""
        latency_prediction_info_producer_name: str = ""
        in_flight_load_producer_name: str = ""

        @model_validator(mode="after")
        def _throughput_needed(self) -> PrefixCacheAffinityFilter.Params:
            if (
                self.ttft_source == "prefillThroughput"
                and self.max_ttft_penalty_ms > 0
                and self.peak_prefill_throughput == 0
            ):
                raise ValueError(
                    "peakPrefillThroughput must be > 0 when ttftSource is prefillThroughput"
                )
            return self

    params: Params

    def __init__(self, params: Params | None = None, name: str | None = None) -> None:
        super().__init__(params, name)
        self.rng = random.Random()
        self.producer: InFlightLoadProducer | None = None

    @property
    def _gated_by_load(self) -> bool:
        p = self.params
        return p.max_ttft_penalty_ms > 0 and p.ttft_source == "prefillThroughput"

    def bind(self, plugins: PluginSet) -> None:
        check_match_producer(self.params.prefix_match_info_producer_name, plugins)
        if self._gated_by_load:
            self.producer = bind_inflight_producer(
                plugins, self.params.in_flight_load_producer_name, self.name
            )

    def _scores(self, cycle: CycleState, endpoints: Sequence[Endpoint]) -> list[float]:
        match = cycle.get(PREFIX_MATCH)
        if match is None or not match.total_blocks:
            return [0.0] * len(endpoints)
        total = match.total_blocks
        return [match.matched.get(ep.key, 0) / total for ep in endpoints]

    def _ttft_ms(self, ep: Endpoint) -> float:
        assert self.producer is not None
        return self.producer.tokens(ep) / self.params.peak_prefill_throughput * 1000.0

    def filter(self, cycle: CycleState, endpoints: Sequence[Endpoint]) -> Sequence[Endpoint]:
        p = self.params
        if len(endpoints) <= 1 or p.affinity_threshold <= 0:
            return endpoints
        if self.rng.random() < p.exploration_probability:
            return endpoints
        sticky, others = split_sticky(self._scores(cycle, endpoints), p.affinity_threshold)
        if not sticky:
            return endpoints
        if self._gated_by_load and others and self.producer is not None:
            best_sticky = min(self._ttft_ms(endpoints[i]) for i in sticky)
            best_other = min(self._ttft_ms(endpoints[i]) for i in others)
            if best_sticky - best_other > p.max_ttft_penalty_ms:
                return endpoints
        return [endpoints[i] for i in sticky]
