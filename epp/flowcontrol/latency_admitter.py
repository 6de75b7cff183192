"""latency-slo-admitter: refuse a sheddable request no endpoint can serve within its SLOs.

llm-d's rule, decided after flow control dispatched the request and the data producers
ran on its candidates:

- a request with priority >= 0 is always admitted;
- a request without a TTFT or TPOT SLO header (``x-llm-d-slo-ttft-ms``,
  ``x-llm-d-slo-tpot-ms``, > 0) is admitted;
- a request for which the producer published no prediction (predictor down, timed
  out) is admitted: fail open;
- otherwise it is admitted when some candidate has a valid prediction (TTFT and TPOT
  within the SLOs), or is idle (no running requests), or is cold (KV cache usage
  below 2 %, predictions unreliable); else refused. The refusal is llm-d's: HTTP 500,
  "request cannot be admitted: no valid endpoint available to serve the request".

The predictions are ``predicted-latency-producer``'s (another one's with
``latencyPredictionInfoProducerName``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict

from epp.datalayer.latency import (
    DEFAULT_PREDICTION_PRODUCER,
    TPOT_SLO_HEADERS,
    TTFT_SLO_HEADERS,
    LatencyPredictionInfo,
    read_predictions,
    slo_ms,
)
from epp.datastore import Endpoint
from epp.flowcontrol.admitters import Admitter

if TYPE_CHECKING:
    from epp.scheduling.cycle import CycleState

__all__ = [
    "COLD_KV_USAGE",
    "NO_VALID_ENDPOINT",
    "Candidate",
    "LatencySloAdmitter",
    "latency_slo_refusal",
]

log = logging.getLogger(__name__)

# Below this KV cache usage an endpoint is cold: its predictions are not trusted.
COLD_KV_USAGE = 0.02
NO_VALID_ENDPOINT = "no valid endpoint available to serve the request"


@dataclass(frozen=True, slots=True)
class Candidate:
    """What the decision needs of one endpoint."""

    kv_usage: float
    running: float
    prediction: LatencyPredictionInfo | None


def latency_slo_refusal(
    priority: int, ttft_slo_ms: float, tpot_slo_ms: float, candidates: Sequence[Candidate]
) -> str | None:
    """None to admit, else the reason of the refusal (pure: llm-d's decision table)."""
    if priority >= 0:
        return None
    if not (ttft_slo_ms > 0 or tpot_slo_ms > 0):
        return None
    has_valid = has_idle = has_cold = has_predictions = False
    for c in candidates:
        if c.kv_usage < COLD_KV_USAGE:
            has_cold = True
        if c.running == 0:
            has_idle = True
        if c.prediction is not None:
            has_predictions = True
            if c.prediction.is_valid:
                has_valid = True
    if not has_predictions:
        return None
    if has_valid or has_idle or has_cold:
        return None
    return NO_VALID_ENDPOINT


class LatencySloAdmitter(Admitter):
    type_name = "latency-slo-admitter"
    after_producers = True

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid", frozen=True)
        latencyPredictionInfoProducerName: str = ""  # noqa: N815

    params: Params

    @property
    def prediction_producer(self) -> str:
        return self.params.latencyPredictionInfoProducerName or DEFAULT_PREDICTION_PRODUCER

    def admit(self, priority: int, endpoints: Sequence[Endpoint], now: float) -> str | None:
        return None  # decided in ``admit_request``, once the predictions exist

    def admit_request(
        self, priority: int, cycle: CycleState, endpoints: Sequence[Endpoint]
    ) -> str | None:
        headers: Mapping[str, str] = cycle.request.headers
        predictions = read_predictions(cycle, self.prediction_producer)
        candidates = [
            Candidate(ep.metrics.kv_usage, ep.metrics.running, predictions.get(ep.key))
            for ep in endpoints
        ]
        reason = latency_slo_refusal(
            priority, slo_ms(headers, TTFT_SLO_HEADERS), slo_ms(headers, TPOT_SLO_HEADERS),
            candidates,
        )  # fmt: skip
        if reason is not None:
            log.debug(
                "latency-slo-admitter %s: refusing sheddable request %s over %d endpoints",
                self.name, cycle.request.request_id or "-", len(endpoints),
            )  # fmt: skip
        return reason
