"""Latency predictions per candidate endpoint, and the request's latency SLOs.

``predicted-latency-producer`` publishes, for each request, one
``LatencyPredictionInfo`` per candidate endpoint as the request attribute
``("LatencyPredictionInfoDataKey", <producer name>)`` (a mapping endpoint key ->
info); ``latency-slo-admitter`` and ``latency-scorer`` read it, naming the producer
with ``latencyPredictionInfoProducerName`` (default ``predicted-latency-producer``).

The SLOs are request headers in milliseconds: ``x-llm-d-slo-ttft-ms`` and
``x-llm-d-slo-tpot-ms`` (deprecated aliases ``x-slo-ttft-ms``, ``x-slo-tpot-ms``). A
header that is absent or not a number reads as 0 (no SLO).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from epp.datalayer.attributes import AttributeKey, put_request_attribute, read_request_attribute
from epp.scheduling.cycle import CycleState

__all__ = [
    "DEFAULT_PREDICTION_PRODUCER",
    "LATENCY_PREDICTION_INFO",
    "TPOT_SLO_HEADERS",
    "TTFT_SLO_HEADERS",
    "LatencyPredictionInfo",
    "prediction_key",
    "put_predictions",
    "read_predictions",
    "slo_ms",
]

LATENCY_PREDICTION_INFO = "LatencyPredictionInfoDataKey"
DEFAULT_PREDICTION_PRODUCER = "predicted-latency-producer"

# The current name first, then the deprecated alias.
TTFT_SLO_HEADERS = ("x-llm-d-slo-ttft-ms", "x-slo-ttft-ms")
TPOT_SLO_HEADERS = ("x-llm-d-slo-tpot-ms", "x-slo-tpot-ms")


@dataclass(frozen=True, slots=True)
class LatencyPredictionInfo:
    """One endpoint's predicted latencies (ms) for one request and their fit with the
    request's SLOs (headroom = SLO - prediction; negative violates)."""

    ttft_valid: bool
    tpot_valid: bool
    ttft_headroom: float
    tpot_headroom: float
    ttft: float
    tpot: float
    # Requests this EPP dispatched to the endpoint and still tracks.
    dispatched_request_count: int

    @property
    def is_valid(self) -> bool:
        return self.ttft_valid and self.tpot_valid


def prediction_key(producer: str) -> AttributeKey:
    return (LATENCY_PREDICTION_INFO, producer or DEFAULT_PREDICTION_PRODUCER)


def put_predictions(
    cycle: CycleState, producer: str, infos: Mapping[str, LatencyPredictionInfo]
) -> None:
    put_request_attribute(cycle, prediction_key(producer), dict(infos))


def read_predictions(cycle: CycleState, producer: str) -> Mapping[str, LatencyPredictionInfo]:
    """Endpoint key -> prediction; empty when the producer published none."""
    found = read_request_attribute(cycle, prediction_key(producer))
    return found if isinstance(found, dict) else {}


def _parse_float(text: str) -> float:
    """A number as Go's ``strconv.ParseFloat`` reads it (no surrounding blanks); 0 when
    it is not one."""
    if not text or text != text.strip():
        return 0.0
    try:
        return float(text)
    except ValueError:
        return 0.0


def slo_ms(headers: Mapping[str, str], names: tuple[str, ...]) -> float:
    """The SLO in ms from the first of ``names`` present (even if empty); 0 = none.
    NaN reads as 0 too (it compares false with everything)."""
    for name in names:
        if name in headers:
            value = _parse_float(headers[name])
            return 0.0 if math.isnan(value) else value
    return 0.0
