"""Pickers: max-score (random among ties), random, weighted-random."""

from __future__ import annotations

import random
from collections.abc import Sequence

from pydantic import Field

from epp.datastore import Endpoint
from epp.plugins.base import Picker, PluginParams, ScoredEndpoint
from epp.plugins.registry import register
from epp.scheduling.cycle import CycleState

__all__ = ["MaxScorePicker", "PickerParams", "RandomPicker", "WeightedRandomPicker"]


class PickerParams(PluginParams):
    max_num_of_endpoints: int = Field(default=1, gt=0)


class _BasePicker(Picker):
    Params = PickerParams
    params: PickerParams

    def __init__(
        self,
        params: PickerParams | None = None,
        name: str | None = None,
        rng: random.Random | None = None,
    ) -> None:
        super().__init__(params, name)
        self.rng = rng or random.Random()


@register
class MaxScorePicker(_BasePicker):
    type_name = "max-score-picker"

    def pick(self, cycle: CycleState, scored: Sequence[ScoredEndpoint]) -> list[Endpoint]:
        if not scored:
            return []
        n = self.params.max_num_of_endpoints
        if n == 1:
            best = max(s.score for s in scored)
            ties = [s.endpoint for s in scored if s.score == best]
            return [ties[0] if len(ties) == 1 else self.rng.choice(ties)]
        shuffled = list(scored)
        self.rng.shuffle(shuffled)
        # Stable sort after a shuffle breaks ties randomly.
        shuffled.sort(key=lambda s: s.score, reverse=True)
        return [s.endpoint for s in shuffled[:n]]


@register
class RandomPicker(_BasePicker):
    type_name = "random-picker"

    def pick(self, cycle: CycleState, scored: Sequence[ScoredEndpoint]) -> list[Endpoint]:
        n = min(self.params.max_num_of_endpoints, len(scored))
        return [s.endpoint for s in self.rng.sample(list(scored), n)]


@register
class WeightedRandomPicker(_BasePicker):
    """Chance proportional to score, without replacement; all-zero scores -> uniform."""

    type_name = "weighted-random-picker"

    def pick(self, cycle: CycleState, scored: Sequence[ScoredEndpoint]) -> list[Endpoint]:
        pool = list(scored)
        out: list[Endpoint] = []
        n = min(self.params.max_num_of_endpoints, len(pool))
        while len(out) < n:
            total = sum(max(s.score, 0.0) for s in pool)
            if total <= 0.0:
                idx = self.rng.randrange(len(pool))
            else:
                x = self.rng.random() * total
                idx = len(pool) - 1
                for i, s in enumerate(pool):
                    x -= max(s.score, 0.0)
                    if x < 0.0:
                        idx = i
                        break
            out.append(pool.pop(idx).endpoint)
        return out
