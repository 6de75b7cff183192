"""slo-headroom-tier-filter: the tiers by predicted headroom, epsilon exploration of the
negative tier, the cases that keep every candidate, its configuration, and picks made
with the producer's predictions from the predictor stand-in."""

from __future__ import annotations

import random

import pytest

from epp.config import ConfigError, load_config
from epp.datalayer.latency import LatencyPredictionInfo, put_predictions
from epp.datastore import Endpoint
from epp.plugins.predicted_latency import PredictedLatencyProducer
from epp.plugins.slo_headroom_tier_filter import SloHeadroomTierFilter, headroom_tiers
from epp.scheduling.cycle import CycleState
from tests.epp_scheduling.helpers import cycle, endpoint

from .predictor_server import PredictorServer


def info(ttft_h: float, tpot_h: float, *, valid: bool | None = None) -> LatencyPredictionInfo:
    ok = (ttft_h >= 0 and tpot_h >= 0) if valid is None else valid
    return LatencyPredictionInfo(ok, ok, ttft_h, tpot_h, 100.0, 10.0, 0)


def pool(n: int = 4) -> list[Endpoint]:
    return [endpoint(f"e{i}", 8000 + i) for i in range(n)]


def with_predictions(
    eps: list[Endpoint], infos: list[LatencyPredictionInfo | None], producer: str = ""
) -> CycleState:
    cyc = cycle("hello")
    put_predictions(
        cyc, producer, {e.key: i for e, i in zip(eps, infos, strict=True) if i is not None}
    )
    return cyc


def names(eps: object) -> list[str]:
    return [e.name for e in eps]  # type: ignore[attr-defined]


def test_tiers_split_on_both_headrooms_and_unpredicted_endpoints_are_negative() -> None:
    eps = pool(5)
    infos = [info(10, 0), info(-1, 5), info(5, -0.5), info(0, 0), None]
    preds = {e.key: i for e, i in zip(eps, infos, strict=True) if i is not None}
    tiers = headroom_tiers(eps, preds)
    assert tiers is not None
    assert names(tiers.positive) == ["e0", "e3"]
    assert names(tiers.negative) == ["e1", "e2", "e4"]
    assert headroom_tiers(eps, {}) is None


def test_validity_flags_are_not_consulted_only_the_headroom() -> None:
    eps = pool(2)
    cyc = with_predictions(eps, [info(5, 5, valid=False), info(-5, 5, valid=True)])
    assert names(SloHeadroomTierFilter(rng=random.Random(1)).filter(cyc, eps)) == ["e0"]


def test_both_tiers_keep_the_positive_one_except_for_epsilon_exploration() -> None:
    eps = pool(4)
    cyc = with_predictions(eps, [info(10, 1), info(-10, 1), info(20, 3), None])
    never = SloHeadroomTierFilter(SloHeadroomTierFilter.Params(epsilon_explore_neg=0.0))
    always = SloHeadroomTierFilter(SloHeadroomTierFilter.Params(epsilon_explore_neg=1.0))
    for _ in range(50):
        assert names(never.filter(cyc, eps)) == ["e0", "e2"]
        assert names(always.filter(cyc, eps)) == ["e1", "e3"]
    # The default explores the negative tier about 1% of the time.
    default = SloHeadroomTierFilter(rng=random.Random(7))
    assert default.params.epsilon_explore_neg == 0.01
    explored = sum(names(default.filter(cyc, eps)) == ["e1", "e3"] for _ in range(20_000))
    assert 100 <= explored <= 320  # expected 200


@pytest.mark.parametrize(
    ("infos", "expected"),
    [
        ([info(1, 1), info(2, 0), info(3, 3)], ["e0", "e1", "e2"]),  # only positive
        ([info(-1, 1), None, info(3, -3)], ["e0", "e1", "e2"]),  # only negative
        ([None, None, None], ["e0", "e1", "e2"]),  # no predictions at all
        # Unpredicted endpoints form the negative tier (explored here, epsilon 1).
        ([info(1, 1), None, None], ["e1", "e2"]),
    ],
)
def test_one_tier_or_no_prediction(
    infos: list[LatencyPredictionInfo | None], expected: list[str]
) -> None:
    eps = pool(3)
    flt = SloHeadroomTierFilter(SloHeadroomTierFilter.Params(epsilon_explore_neg=1.0))
    assert names(flt.filter(with_predictions(eps, infos), eps)) == expected


def test_a_single_candidate_is_kept_whatever_its_prediction() -> None:
    (only,) = eps = pool(1)
    flt = SloHeadroomTierFilter(SloHeadroomTierFilter.Params(epsilon_explore_neg=0.0))
    assert list(flt.filter(with_predictions(eps, [info(-50, -5)]), eps)) == [only]
    assert list(flt.filter(with_predictions([], []), [])) == []


def test_it_reads_the_named_producer() -> None:
    eps = pool(2)
    cyc = with_predictions(eps, [info(1, 1), info(-1, 1)], producer="other")
    default = SloHeadroomTierFilter(SloHeadroomTierFilter.Params(epsilon_explore_neg=0.0))
    assert names(default.filter(cyc, eps)) == ["e0", "e1"]  # nothing under its default name
    named = SloHeadroomTierFilter(
        SloHeadroomTierFilter.Params(
            epsilon_explore_neg=0.0, latency_prediction_info_producer_name="other"
        )
    )
    assert names(named.filter(cyc, eps)) == ["e0"]


CONFIG = """\
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: slo-headroom-tier-filter
  name: slo-tier
  parameters: {params}
- type: kv-cache-utilization-scorer
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: slo-tier
  - pluginRef: kv-cache-utilization-scorer
  - pluginRef: max-score-picker
"""


def test_the_config_loads_with_a_producer_created_for_it() -> None:
    c = load_config(CONFIG.format(params="{epsilonExploreNeg: 0.05}"))
    (flt,) = c.scheduler.profiles["default"].filters
    assert isinstance(flt, SloHeadroomTierFilter) and flt.name == "slo-tier"
    assert flt.params.epsilon_explore_neg == 0.05
    assert isinstance(c.plugins.get("predicted-latency-producer"), PredictedLatencyProducer)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ("{epsilonExploreNeg: 1.5}", "parameters.epsilonExploreNeg"),
        ("{epsilonExploreNeg: -0.1}", "parameters.epsilonExploreNeg"),
        ("{epsilonExploreNeg: often}", "parameters.epsilonExploreNeg"),
        ("{explore: 0.1}", "parameters.explore"),
        (
            "{latencyPredictionInfoProducerName: nope}",
            "latencyPredictionInfoProducerName: 'nope' is not a predicted-latency-producer",
        ),
    ],
)
def test_a_bad_parameter_fails_at_load_naming_the_field(params: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(CONFIG.format(params=params))


@pytest.mark.parametrize(
    ("epsilon", "slo_ms", "picked"),
    [
        # Predicted TTFT = 20 ms + 100 ms per waiting request + 1 ms per prompt token.
        # Every endpoint meets 10 s: all kept, and KV usage picks "c".
        ("0.0", "10000", "c"),
        # Within 150 ms only "a" meets: the filter keeps it although KV prefers "c".
        ("0.0", "150", "a"),
        # Exploration always: the violating tier, where KV prefers "c".
        ("1.0", "150", "c"),
        # No SLO: every headroom negative, all kept.
        ("0.0", "", "c"),
    ],
)
async def test_picks_with_predictions_from_the_predictor(
    server: PredictorServer,
    monkeypatch: pytest.MonkeyPatch,
    epsilon: str,
    slo_ms: str,
    picked: str,
) -> None:
    monkeypatch.setenv("PREDICTION_SERVER_URL", server.url)
    monkeypatch.setenv("TRAINING_SERVER_URL", server.url)
    c = load_config(CONFIG.format(params=f"{{epsilonExploreNeg: {epsilon}}}"))
    producer = c.plugins.get("predicted-latency-producer")
    assert isinstance(producer, PredictedLatencyProducer)
    try:
        eps = [
            endpoint("a", 8000, waiting=0, kv=0.6),
            endpoint("b", 8001, waiting=2, kv=0.4),
            endpoint("c", 8002, waiting=5, kv=0.1),
        ]
        headers = {"x-llm-d-slo-ttft-ms": slo_ms} if slo_ms else {}
        cyc = cycle("hello", headers=headers)
        await c.scheduler.produce(cyc, eps)
        result = c.scheduler.schedule(cyc, eps)
        assert result.targets(result.primary)[0].name == picked
        assert len(server.bulk_requests) == 1
    finally:
        await producer.aclose()
