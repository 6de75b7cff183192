"""latency-scorer: llm-d's headroom scoring (groups, idle preference, deficit buckets,
strategies), its composite fallback, and picks made with the producer's predictions from
the predictor stand-in."""

from __future__ import annotations

import pytest

from epp.config import ConfigError, load_config
from epp.datalayer.latency import LatencyPredictionInfo
from epp.plugins.latency_scorer import LatencyScorer, headroom_scores
from epp.plugins.predicted_latency import PredictedLatencyProducer
from tests.epp_scheduling.helpers import cycle, endpoint

from .predictor_server import PredictorServer


def info(ttft_h: float, tpot_h: float, dispatched: int = 0) -> LatencyPredictionInfo:
    return LatencyPredictionInfo(ttft_h >= 0, tpot_h >= 0, ttft_h, tpot_h, 100, 10, dispatched)


def scores(*infos: LatencyPredictionInfo | None, most: bool = False) -> list[float]:
    return [
        round(s, 6)
        for s in headroom_scores(list(infos), ttft_weight=0.8, tpot_weight=0.2, most=most)
    ]


def test_positive_headroom_least_prefers_the_endpoint_closest_to_its_slo() -> None:
    assert scores(info(100, 20), info(30, 5)) == [0.01, 1.01]
    assert scores(info(100, 20), info(30, 5), most=True) == [1.01, 0.01]


def test_a_dimension_without_spread_gets_no_weight() -> None:
    # Same TPOT headroom: TTFT alone decides, fully.
    assert scores(info(100, 5), info(50, 5), info(0, 5)) == [0.01, 0.51, 1.01]


def test_violating_endpoints_score_zero_next_to_meeting_ones() -> None:
    # An endpoint without a prediction counts as meeting (headroom 0).
    assert scores(info(50, 1), info(-5, 1), None) == [0.01, 0.0, 1.01]


def test_all_violating_least_deficit_wins_even_with_most() -> None:
    assert scores(info(-10, -5), info(-100, -30), most=True) == [1.01, 0.01]


def test_all_violating_idle_endpoints_are_preferred() -> None:
    assert scores(info(-50, -10, dispatched=5), info(-50, -10, dispatched=0)) == [0.0, 0.51]


def test_all_violating_and_busy_the_least_severe_bucket_is_scored() -> None:
    both, ttft_only, tpot_only = info(-50, -10, 1), info(-30, 5, 1), info(10, -8, 1)
    assert scores(both, ttft_only, tpot_only) == [0.0, 0.0, 0.51]
    assert scores(both, ttft_only) == [0.0, 0.51]
    assert scores(both, info(-60, -10, 2)) == [1.01, 0.01]


def test_composite_fallback_without_predictions() -> None:
    scorer = LatencyScorer()
    eps = [endpoint("a", 8000, waiting=0, kv=0.2), endpoint("b", 8001, waiting=5, kv=0.8)]
    assert list(scorer.score(cycle(), eps)) == [0.6, 0.07]
    kv_only = LatencyScorer(
        LatencyScorer.Params.model_validate({"compositeQueueWeight": 0, "compositePrefixWeight": 0})
    )
    assert list(kv_only.score(cycle(), eps)) == [0.8, 0.2]


CONFIG = """\
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: latency-scorer
  parameters: {params}
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins: [{{pluginRef: latency-scorer}}, {{pluginRef: max-score-picker}}]
"""


@pytest.mark.parametrize(
    ("params", "down", "picked"),
    [
        ("{}", False, "c"),  # least: the busiest endpoint that still meets the SLO
        ("{headroomSelectionStrategy: most}", False, "a"),
        ("{}", True, "a"),  # predictor down: composite (free KV, short queue)
    ],
)
async def test_picks_with_predictions_from_the_predictor(
    server: PredictorServer, monkeypatch: pytest.MonkeyPatch, params: str, down: bool, picked: str
) -> None:
    monkeypatch.setenv("PREDICTION_SERVER_URL", server.url)
    monkeypatch.setenv("TRAINING_SERVER_URL", server.url)
    if down:
        await server.stop()
    c = load_config(CONFIG.format(params=params))
    producer = c.plugins.get("predicted-latency-producer")
    assert isinstance(producer, PredictedLatencyProducer)  # created for the scorer
    try:
        eps = [
            endpoint("a", 8000, waiting=0, kv=0.2),
            endpoint("b", 8001, waiting=2, kv=0.4),
            endpoint("c", 8002, waiting=5, kv=0.6),
        ]
        cyc = cycle("hello", headers={"x-llm-d-slo-ttft-ms": "10000"})
        await c.scheduler.produce(cyc, eps)
        result = c.scheduler.schedule(cyc, eps)
        assert result.targets(result.primary)[0].name == picked
    finally:
        await producer.aclose()


def test_bad_parameters_fail_naming_the_field() -> None:
    with pytest.raises(ConfigError, match="headroomSelectionStrategy"):
        load_config(CONFIG.format(params="{headroomSelectionStrategy: fastest}"))
    with pytest.raises(ConfigError, match="ttftWeight"):
        load_config(CONFIG.format(params="{ttftWeight: -1}"))
