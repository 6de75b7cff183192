"""Saturation detectors: how loaded the pool is, as a gradient where 1.0 is the set point.

``utilization-detector`` (from scraped metrics: the roofline of queue depth and KV-cache
usage, stale or missing metrics count as fully saturated) and ``concurrency-detector``
(from the EPP's own in-flight accounting, including requests dispatched but not yet
placed). Both are P/D-aware through ``stage_saturation``:
the prefill stage is the prefill-capable endpoints of a pool that has dedicated prefill
pods; the decode stage is every endpoint that decodes. The value used for gating is the
larger of the two (``effective``).

Both detectors also have llm-d's scheduling-filter role (``epp.flowcontrol.detector_filter``):
referenced from a scheduling profile, the concurrency detector keeps only the endpoints
whose own in-flight load is under ``maxConcurrency x (1 + headroom)``
(``maxTokenConcurrency`` likewise in token and hybrid modes), so a request leaves the
EPP for an engine with a free batch slot rather than for one whose slots are full while
another's are free; the utilization detector keeps the endpoints whose metrics are fresh,
whose waiting queue is under ``queueDepthThreshold x (1 + headroom)`` and whose KV-cache
usage is under ``min(1, kvCacheUtilThreshold x (1 + headroom))``, and keeps every
candidate when none passes. ``headroom`` sizes only the filter role: the saturation
gradient always uses the thresholds themselves.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from common.durations import PositiveSeconds
from epp.datastore import Endpoint
from epp.flowcontrol.ledger import EndpointLoad, InflightLedger

__all__ = [
    "ConcurrencyDetector",
    "SaturationDetector",
    "StageSaturation",
    "UtilizationDetector",
    "concurrency_admits",
    "stage_saturation",
    "utilization_admits",
]

log = logging.getLogger(__name__)

_PREFILL_ONLY = frozenset({"prefill", "encode-prefill"})
_PREFILL_CAPABLE = _PREFILL_ONLY | {"prefill-decode", "both", "encode-prefill-decode"}
_NOT_DECODING = _PREFILL_ONLY | {"encode"}


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class UtilizationParams(_Params):
    queueDepthThreshold: int = Field(5, gt=0)  # noqa: N815
    kvCacheUtilThreshold: float = Field(0.8, gt=0.0, le=1.0)  # noqa: N815
    metricsStalenessThreshold: PositiveSeconds = 0.2  # noqa: N815
    # Burst allowance of the scheduling-filter role over the thresholds (a fraction).
    headroom: float = Field(0.0, ge=0.0)


class ConcurrencyParams(_Params):
    concurrencyMode: Literal["requests", "tokens", "hybrid"] = "requests"  # noqa: N815
    maxConcurrency: int = Field(100, gt=0)  # noqa: N815
    maxTokenConcurrency: int = Field(1_000_000, gt=0)  # noqa: N815
    # Burst allowance of the scheduling-filter role over the per-endpoint limits.
    headroom: float = Field(0.0, ge=0.0)


class SaturationDetector:
    """Base: ``saturation`` over one stage's endpoints; empty reads 1.0."""

    type_name: ClassVar[str] = ""
    Params: ClassVar[type[_Params]] = _Params

    def __init__(self, params: _Params | None = None, name: str | None = None) -> None:
        self.params = params if params is not None else self.Params()
        self.name = name or self.type_name
        self.stale_endpoints = 0

    def saturation(
        self, endpoints: Sequence[Endpoint], now: float, ledger: InflightLedger, *, pending: bool
    ) -> float:
        raise NotImplementedError


def _ratio(num: float, den: float) -> float:
    return num / den if den > 0 else 1.0


def utilization_admits(ep: Endpoint, now: float, params: UtilizationParams) -> bool:
    """Whether the utilization filter keeps ``ep``: fresh metrics, a waiting queue under
    ``queueDepthThreshold x (1 + headroom)`` and KV-cache usage under
    ``min(1, kvCacheUtilThreshold x (1 + headroom))``."""
    if not ep.is_fresh(now, params.metricsStalenessThreshold):
        return False
    scale = 1.0 + params.headroom
    m = ep.metrics
    return m.waiting < params.queueDepthThreshold * scale and m.kv_usage < min(
        1.0, params.kvCacheUtilThreshold * scale
    )


class UtilizationDetector(SaturationDetector):
    type_name = "utilization-detector"
    Params = UtilizationParams
    params: UtilizationParams

    def __init__(self, params: _Params | None = None, name: str | None = None) -> None:
        super().__init__(params, name)
        if self.params.headroom > 1.0:
            log.warning(
                "%s: headroom %s allows a %.0f%% burst over the thresholds; headroom is a "
                "fraction, not a percentage",
                self.name,
                self.params.headroom,
                self.params.headroom * 100,
            )

    def admitting(self, endpoints: Sequence[Endpoint], now: float) -> list[Endpoint]:
        """The scheduling-filter role: the endpoints within their limits, or every
        candidate when none is (fail-open, so the scorers pick the least loaded)."""
        p = self.params
        kept = [ep for ep in endpoints if utilization_admits(ep, now, p)]
        return kept if kept else list(endpoints)

    def endpoint_score(self, ep: Endpoint, now: float) -> float:
        p = self.params
        if not ep.is_fresh(now, p.metricsStalenessThreshold):
            return 1.0
        m = ep.metrics
        return max(m.waiting / p.queueDepthThreshold, m.kv_usage / p.kvCacheUtilThreshold)

    def saturation(
        self, endpoints: Sequence[Endpoint], now: float, ledger: InflightLedger, *, pending: bool
    ) -> float:
        if not endpoints:
            self.stale_endpoints = 0
            return 1.0
        p = self.params
        stale = sum(1 for ep in endpoints if not ep.is_fresh(now, p.metricsStalenessThreshold))
        self.stale_endpoints = stale
        return sum(self.endpoint_score(ep, now) for ep in endpoints) / len(endpoints)


def concurrency_admits(load: EndpointLoad, params: ConcurrencyParams) -> bool:
    """Whether an endpoint with this in-flight ``load`` is under the filter's limits."""
    scale = 1.0 + params.headroom
    req_ok = load.requests < int(params.maxConcurrency * scale)
    tok_ok = load.tokens < int(params.maxTokenConcurrency * scale)
    if params.concurrencyMode == "tokens":
        return tok_ok
    if params.concurrencyMode == "hybrid":
        return req_ok and tok_ok
    return req_ok


class ConcurrencyDetector(SaturationDetector):
    type_name = "concurrency-detector"
    Params = ConcurrencyParams
    params: ConcurrencyParams

    def __init__(self, params: _Params | None = None, name: str | None = None) -> None:
        super().__init__(params, name)
        # The admission path's ledger, bound when the request manager starts; the
        # scheduling filter reads it.
        self.ledger: InflightLedger | None = None

    def admitting(self, endpoints: Sequence[Endpoint]) -> list[Endpoint]:
        """The scheduling-filter role: the endpoints under their in-flight limit (all of
        them while no ledger is bound)."""
        ledger, p = self.ledger, self.params
        if ledger is None:
            return list(endpoints)
        return [ep for ep in endpoints if concurrency_admits(ledger.load(ep.key), p)]

    def saturation(
        self, endpoints: Sequence[Endpoint], now: float, ledger: InflightLedger, *, pending: bool
    ) -> float:
        if not endpoints:
            return 1.0
        p = self.params
        n = len(endpoints)
        req = sum(ledger.load(ep.key).requests for ep in endpoints)
        tok = sum(ledger.load(ep.key).tokens for ep in endpoints)
        if pending:
            req += ledger.pending_requests
            tok += ledger.pending_tokens
        if p.concurrencyMode == "tokens":
            return _ratio(tok, n * p.maxTokenConcurrency)
        if p.concurrencyMode == "hybrid":
            total = 0.0
            share = (ledger.pending_requests / n, ledger.pending_tokens / n) if pending else (0, 0)
            for ep in endpoints:
                load = ledger.load(ep.key)
                total += max(
                    (load.requests + share[0]) / p.maxConcurrency,
                    (load.tokens + share[1]) / p.maxTokenConcurrency,
                )
            return total / n
        return _ratio(req, n * p.maxConcurrency)


@dataclass(frozen=True, slots=True)
class StageSaturation:
    prefill: float | None  # None: the pool has no dedicated prefill stage
    decode: float

    @property
    def effective(self) -> float:
        return self.decode if self.prefill is None else max(self.prefill, self.decode)


def stage_saturation(
    detector: SaturationDetector,
    endpoints: Sequence[Endpoint],
    now: float,
    ledger: InflightLedger,
) -> StageSaturation:
    """Per-stage saturation. Monolithic pools (no prefill-only pods) are all decode."""
    has_prefill_stage = any(ep.role in _PREFILL_ONLY for ep in endpoints)
    decoders = [ep for ep in endpoints if ep.role not in _NOT_DECODING]
    prefill = None
    if has_prefill_stage:
        prefillers = [ep for ep in endpoints if ep.role in _PREFILL_CAPABLE]
        prefill = detector.saturation(prefillers, now, ledger, pending=True)
        stale = detector.stale_endpoints
        decode = detector.saturation(decoders, now, ledger, pending=True)
        detector.stale_endpoints = max(stale, detector.stale_endpoints)
    else:
        decode = detector.saturation(decoders, now, ledger, pending=True)
    return StageSaturation(prefill, decode)
