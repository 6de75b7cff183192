"""latency-scorer: rate endpoints by their predicted latency headroom (SLO - predicted),
from ``predicted-latency-producer`` (llm-d's scorer).

- Endpoints whose TTFT and TPOT headroom are both >= 0 (or that have no prediction)
  are scored; the others get 0.
- When every endpoint violates an SLO: only the idle ones (no request dispatched by
  this EPP) are scored if there are any; else the least severe group: TPOT-only
  violations, then TTFT-only, then both.
- Within the scored group, |headroom| is min-max normalised per dimension (0.5 when all
  equal) and blended with ``ttftWeight``/``tpotWeight`` (normalised to sum 1; a
  dimension whose values are all equal gets weight 0 when the other varies). Strategy
  ``least`` (default) prefers the endpoint closest to its SLO (bin packing), ``most``
  the one with the most headroom; violating groups always use ``least``. The score is
  ``(int((1 - combined) x 100) + 1) / 100`` (``least``) or ``(int(combined x 100) + 1)
  / 100`` (``most``).
- Without any prediction (predictor down), a composite fallback:
  ``round(100 x (wKV x free KV + wQueue x (maxQ - q) / maxQ + wPrefix x prefix score))
  / 100`` with the ``composite*Weight`` parameters normalised to sum 1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from pydantic import Field

from epp.datalayer.latency import (
    DEFAULT_PREDICTION_PRODUCER,
    LatencyPredictionInfo,
    read_predictions,
)
from epp.datastore import Endpoint
from epp.plugins.base import PluginParams, Scorer
from epp.plugins.prefix_producer import (
    PrefixMatch,
    match_source,
)
from epp.plugins.registry import register
from epp.scheduling.cycle import CycleState, StateKey

__all__ = ["LatencyScorer", "headroom_scores"]

_W_MAX = 100
_EPS = 1e-9


@dataclass(frozen=True, slots=True)
class _Row:
    index: int
    info: LatencyPredictionInfo | None

    @property
    def ttft(self) -> float:
        return self.info.ttft_headroom if self.info is not None else 0.0

    @property
    def tpot(self) -> float:
        return self.info.tpot_headroom if self.info is not None else 0.0


def _weights(a: float, b: float) -> tuple[float, float]:
    total = a + b
    return (1.0, 0.0) if total <= 0 else (a / total, b / total)


def _score_group(
    rows: Sequence[_Row], out: list[float], ttft_w: float, tpot_w: float, most: bool
) -> None:
    alpha, beta = _weights(ttft_w, tpot_w)
    ttfts = [abs(r.ttft) for r in rows]
    tpots = [abs(r.tpot) for r in rows]
    ttft_lo, tpot_lo = min(ttfts), min(tpots)
    ttft_range, tpot_range = max(ttfts) - ttft_lo, max(tpots) - tpot_lo
    if ttft_range <= _EPS < tpot_range:
        alpha, beta = 0.0, 1.0
    elif tpot_range <= _EPS < ttft_range:
        alpha, beta = 1.0, 0.0
    for r, h_ttft, h_tpot in zip(rows, ttfts, tpots, strict=True):
        n_ttft = (h_ttft - ttft_lo) / ttft_range if ttft_range > _EPS else 0.5
        n_tpot = (h_tpot - tpot_lo) / tpot_range if tpot_range > _EPS else 0.5
        combined = alpha * n_ttft + beta * n_tpot
        level = combined if most else 1.0 - combined
        out[r.index] = (int(level * _W_MAX) + 1) / _W_MAX


def headroom_scores(
    infos: Sequence[LatencyPredictionInfo | None],
    *,
    ttft_weight: float,
    tpot_weight: float,
    most: bool,
) -> list[float]:
    """llm-d's scores from the endpoints' predictions (at least one not None)."""
    out = [0.0] * len(infos)
    rows = [_Row(i, info) for i, info in enumerate(infos)]
    positive = [r for r in rows if r.info is None or (r.ttft >= 0 and r.tpot >= 0)]
    if positive:
        _score_group(positive, out, ttft_weight, tpot_weight, most)
        return out
    idle = [r for r in rows if r.info is not None and r.info.dispatched_request_count == 0]
    if idle:
        _score_group(idle, out, ttft_weight, tpot_weight, False)
        return out
    tpot_only = [r for r in rows if r.ttft >= 0 > r.tpot]
    ttft_only = [r for r in rows if r.tpot >= 0 > r.ttft]
    both = [r for r in rows if r.ttft < 0 and r.tpot < 0]
    group = next(g for g in (tpot_only, ttft_only, both) if g)
    _score_group(group, out, ttft_weight, tpot_weight, False)
    return out


@register
class LatencyScorer(Scorer):
    type_name = "latency-scorer"
    # llm-d's scorer consumes the prefix match (its composite fallback).
    needs_prefix_producer = True

    class Params(PluginParams):
        ttft_weight: float = Field(default=0.8, ge=0, alias="ttftWeight")
        tpot_weight: float = Field(default=0.2, ge=0, alias="tpotWeight")
        headroom_selection_strategy: Literal["least", "most"] = "least"
        composite_kv_weight: float = Field(default=1.0, ge=0, alias="compositeKVWeight")
        composite_queue_weight: float = Field(default=1.0, ge=0)
        composite_prefix_weight: float = Field(default=1.0, ge=0)
        latency_prediction_info_producer_name: str = ""
        prefix_match_info_producer_name: str = ""

    params: Params

    def __init__(self, params: Params | None = None, name: str | None = None) -> None:
        super().__init__(params, name)
        p = self.params
        self._match: StateKey[PrefixMatch] = match_source(p.prefix_match_info_producer_name)

    @property
    def prediction_producer(self) -> str:
        return self.params.latency_prediction_info_producer_name or DEFAULT_PREDICTION_PRODUCER

    def score(self, cycle: CycleState, endpoints: Sequence[Endpoint]) -> Sequence[float]:
        p = self.params
        predictions = read_predictions(cycle, self.prediction_producer)
        infos = [predictions.get(ep.key) for ep in endpoints]
        if any(info is not None for info in infos):
            return headroom_scores(
                infos,
                ttft_weight=p.ttft_weight,
                tpot_weight=p.tpot_weight,
                most=p.headroom_selection_strategy == "most",
            )
        return self._composite(cycle, endpoints)

    def _composite(self, cycle: CycleState, endpoints: Sequence[Endpoint]) -> list[float]:
        p = self.params
        wkv, wq, wpref = p.composite_kv_weight, p.composite_queue_weight, p.composite_prefix_weight
        total = wkv + wq + wpref
        if total <= 0:
            wkv, wq, wpref, total = 1.0, 0.0, 0.0, 1.0
        wkv, wq, wpref = wkv / total, wq / total, wpref / total
        signals = [cycle.signals(ep) for ep in endpoints]
        queues = [int(s.waiting) for s in signals]
        max_q = max(queues, default=0)
        match = cycle.get(self._match)
        out: list[float] = []
        for ep, s, q in zip(endpoints, signals, queues, strict=True):
            rel_queue = (max_q - q) / max_q if max_q > 0 else 1.0
            prefix = 0.0
            if match is not None and match.total_blocks:
                prefix = match.blocks(ep) / match.total_blocks
            composite = wkv * (1.0 - s.kv_usage) + wq * rel_queue + wpref * prefix
            out.append(math.floor(_W_MAX * composite + 0.5) / _W_MAX)
        return out
