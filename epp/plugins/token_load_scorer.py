"""token-load-scorer: fewer tokens in flight on an endpoint is better.

An endpoint's load is the tokens ``inflight-load-producer`` counts on it plus the
tokens this request would add there (its uncached prompt, and the output estimate when
the producer adds one); score ``1 - min(1, load / queueThresholdTokens)``
(``queueThresholdTokens`` default 4194304, i.e. 128 requests of 32K tokens; 0 means the
default). ``inFlightLoadProducerName`` names the producer (default: the default one).
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import Field

from epp.datastore import Endpoint
from epp.plugins.base import PluginParams, PluginSet, Scorer
from epp.plugins.inflight_load import InFlightLoadProducer, bind_inflight_producer
from epp.plugins.registry import register
from epp.scheduling.cycle import CycleState

__all__ = ["TokenLoadScorer"]

_DEFAULT_THRESHOLD = 4_194_304


@register
class TokenLoadScorer(Scorer):
    type_name = "token-load-scorer"

    class Params(PluginParams):
        queue_threshold_tokens: int = Field(default=_DEFAULT_THRESHOLD, ge=0)
        in_flight_load_producer_name: str = ""

    params: Params

    def __init__(self, params: Params | None = None, name: str | None = None) -> None:
        super().__init__(params, name)
        self.threshold = float(self.params.queue_threshold_tokens or _DEFAULT_THRESHOLD)
        self.producer: InFlightLoadProducer | None = None

    def bind(self, plugins: PluginSet) -> None:
        self.producer = bind_inflight_producer(
            plugins, self.params.in_flight_load_producer_name, self.name
        )

    def score(self, cycle: CycleState, endpoints: Sequence[Endpoint]) -> Sequence[float]:
        producer = self.producer
        if producer is None:
            raise RuntimeError(f"{self.name}: not bound to an inflight-load-producer")
        t = self.threshold
        out = []
        for ep in endpoints:
            load = producer.tokens(ep) + producer.request_tokens(cycle, ep)
            out.append(1.0 if load <= 0 else 1.0 - min(load, t) / t)
        return out
