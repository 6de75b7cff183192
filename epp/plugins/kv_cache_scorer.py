"""kv-cache-utilization-scorer: more free KV cache is better."""

from __future__ import annotations

from collections.abc import Sequence

from epp.datastore import Endpoint
from epp.plugins.base import Scorer
from epp.plugins.registry import register
from epp.scheduling.cycle import CycleState

__all__ = ["KvCacheUtilizationScorer"]


@register
class KvCacheUtilizationScorer(Scorer):
    """1 - KV usage fraction (a stale endpoint counts as full)."""

    type_name = "kv-cache-utilization-scorer"

    def score(self, cycle: CycleState, endpoints: Sequence[Endpoint]) -> Sequence[float]:
        return [1.0 - cycle.signals(ep).kv_usage for ep in endpoints]
