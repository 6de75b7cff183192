"""utilization-filter: drop endpoints over any configured utilization cap.

``conditions`` (at least one): ``{metric, maxValue}`` with metric ``active-requests``
(requests this EPP has in flight there, from ``inflight-load-producer``; named by
``inFlightLoadProducerName``), ``running-requests``, ``waiting-queue`` or
``kv-cache-utilization`` (a fraction, ``maxValue`` at most 1); an endpoint is kept
when every metric is at most its ``maxValue``. ``fallbackOnEmpty`` keeps every
candidate when none passes (default false). A stale endpoint's engine metrics read as
fully loaded, so it fails any engine-metric cap.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from pydantic import Field, model_validator

from epp.datastore import Endpoint
from epp.plugins.base import Filter, PluginParams, PluginSet
from epp.plugins.inflight_load import InFlightLoadProducer, bind_inflight_producer
from epp.plugins.registry import register
from epp.scheduling.cycle import CycleState

__all__ = ["UtilizationFilter"]


class _Condition(PluginParams):
    metric: Literal["active-requests", "running-requests", "waiting-queue", "kv-cache-utilization"]
    max_value: float = Field(ge=0)

    @model_validator(mode="after")
    def _fraction(self) -> _Condition:
        if self.metric == "kv-cache-utilization" and self.max_value > 1:
            raise ValueError(
                f"maxValue for kv-cache-utilization is a fraction, at most 1; got {self.max_value}"
            )
        return self


@register
class UtilizationFilter(Filter):
    type_name = "utilization-filter"

    class Params(PluginParams):
        conditions: list[_Condition] = Field(min_length=1)
        fallback_on_empty: bool = False
        in_flight_load_producer_name: str = ""

    params: Params

    def __init__(self, params: Params | None = None, name: str | None = None) -> None:
        if params is None:
            raise ValueError("utilization-filter needs parameters.conditions")
        super().__init__(params, name)
        self.producer: InFlightLoadProducer | None = None

    def bind(self, plugins: PluginSet) -> None:
        p = self.params
        if p.in_flight_load_producer_name or any(
            c.metric == "active-requests" for c in p.conditions
        ):
            self.producer = bind_inflight_producer(
                plugins, self.params.in_flight_load_producer_name, self.name
            )

    def _value(self, cycle: CycleState, endpoint: Endpoint, metric: str) -> float:
        if metric == "active-requests":
            return float(self.producer.requests(endpoint)) if self.producer is not None else 0.0
        signals = cycle.signals(endpoint)
        if metric == "running-requests":
            return signals.running
        if metric == "waiting-queue":
            return signals.waiting
        return signals.kv_usage

    def filter(self, cycle: CycleState, endpoints: Sequence[Endpoint]) -> Sequence[Endpoint]:
        conditions = self.params.conditions
        kept = [
            ep
            for ep in endpoints
            if all(self._value(cycle, ep, c.metric) <= c.max_value for c in conditions)
        ]
        if not kept and self.params.fallback_on_empty:
            return endpoints
        return kept
