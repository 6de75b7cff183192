"""A scheduling profile: filter -> weighted score -> pick."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from time import perf_counter

from epp.datastore import Endpoint
from epp.decision import InternalError
from epp.plugins.base import Filter, Picker, ScoredEndpoint, Scorer
from epp.scheduling.cycle import CycleState
from epp.scheduling.result import ProfileResult

__all__ = ["Profile", "WeightedScorer"]


@dataclass(frozen=True, slots=True)
class WeightedScorer:
    scorer: Scorer
    weight: float


@dataclass(frozen=True, slots=True)
class Profile:
    name: str
    filters: tuple[Filter, ...]
    scorers: tuple[WeightedScorer, ...]
    picker: Picker

    def run(self, cycle: CycleState, endpoints: Sequence[Endpoint]) -> ProfileResult | None:
        """Run the profile; None when no endpoint survives the filters."""
        for f in self.filters:
            t0 = perf_counter()
            endpoints = f.filter(cycle, endpoints)
            f.observe(perf_counter() - t0)
            if not endpoints:
                return None
        totals = [0.0] * len(endpoints)
        for ws in self.scorers:
            t0 = perf_counter()
            scores = ws.scorer.score(cycle, endpoints)
            ws.scorer.observe(perf_counter() - t0)
            if len(scores) != len(totals):
                raise InternalError(
                    f"scorer '{ws.scorer.name}' returned {len(scores)} scores "
                    f"for {len(totals)} endpoints"
                )
            w = ws.weight
            # The framework, not the plugin, keeps every score inside [0, 1] (NaN -> 0).
            for i, s in enumerate(scores):
                totals[i] += w * (s if 0.0 <= s <= 1.0 else 1.0 if s > 1.0 else 0.0)
        scored = [ScoredEndpoint(ep, total) for ep, total in zip(endpoints, totals, strict=True)]
        t0 = perf_counter()
        picked = self.picker.pick(cycle, scored)
        self.picker.observe(perf_counter() - t0)
        return ProfileResult(picked, scored) if picked else None
