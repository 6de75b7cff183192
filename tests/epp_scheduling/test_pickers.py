"""Pickers: ties, counts, weights."""

from __future__ import annotations

import random
from collections import Counter

from epp.plugins.base import ScoredEndpoint
from epp.plugins.pickers import MaxScorePicker, PickerParams, RandomPicker, WeightedRandomPicker

from .helpers import cycle, endpoint


def _scored(*scores: float) -> list[ScoredEndpoint]:
    return [ScoredEndpoint(endpoint(f"e{i}", 8000 + i), s) for i, s in enumerate(scores)]


def test_max_score_picks_best() -> None:
    picked = MaxScorePicker().pick(cycle(), _scored(0.1, 0.9, 0.5))
    assert [ep.name for ep in picked] == ["e1"]


def test_max_score_breaks_ties_randomly() -> None:
    picker = MaxScorePicker(rng=random.Random(7))
    seen = Counter(picker.pick(cycle(), _scored(1.0, 1.0, 0.0))[0].name for _ in range(200))
    assert set(seen) == {"e0", "e1"}
    assert min(seen.values()) > 50


def test_max_score_many_ranked() -> None:
    picker = MaxScorePicker(PickerParams(max_num_of_endpoints=2))
    assert [ep.name for ep in picker.pick(cycle(), _scored(0.2, 0.9, 0.5))] == ["e1", "e2"]
    assert MaxScorePicker().pick(cycle(), []) == []


def test_max_num_param_alias() -> None:
    assert PickerParams.model_validate({"maxNumOfEndpoints": 3}).max_num_of_endpoints == 3


def test_random_picker_counts() -> None:
    picker = RandomPicker(PickerParams(max_num_of_endpoints=5), rng=random.Random(1))
    picked = picker.pick(cycle(), _scored(0, 0, 0))
    assert len(picked) == 3 and len({ep.name for ep in picked}) == 3


def test_weighted_random_follows_weights() -> None:
    picker = WeightedRandomPicker(rng=random.Random(3))
    seen = Counter(picker.pick(cycle(), _scored(0.0, 3.0, 1.0))[0].name for _ in range(400))
    assert seen["e0"] == 0
    assert seen["e1"] > 2 * seen["e2"] > 0


def test_weighted_random_all_zero_is_uniform_and_no_repeats() -> None:
    picker = WeightedRandomPicker(PickerParams(max_num_of_endpoints=3), rng=random.Random(5))
    picked = picker.pick(cycle(), _scored(0.0, 0.0, 0.0))
    assert sorted(ep.name for ep in picked) == ["e0", "e1", "e2"]
