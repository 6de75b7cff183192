"""load-aware-scorer: an empty queue scores 0.5, a queue at the threshold scores 0."""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import Field

from epp.datastore import Endpoint
from epp.plugins.base import PluginParams, Scorer
from epp.plugins.registry import register
from epp.scheduling.cycle import CycleState

__all__ = ["LoadAwareScorer"]


@register
class LoadAwareScorer(Scorer):
    """q = 0 -> 0.5, else 0.5 * (1 - min(q, T) / T)."""

    type_name = "load-aware-scorer"

    class Params(PluginParams):
        threshold: int = Field(default=128, gt=0)

    params: Params

    def score(self, cycle: CycleState, endpoints: Sequence[Endpoint]) -> Sequence[float]:
        t = float(self.params.threshold)
        out = []
        for ep in endpoints:
            q = cycle.signals(ep).waiting
            out.append(0.5 if q <= 0 else 0.5 * (1.0 - min(q, t) / t))
        return out
