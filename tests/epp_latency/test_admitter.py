"""latency-slo-admitter: llm-d's decision table, the reading of the SLO headers and of
the producer's predictions, and its configuration."""

from __future__ import annotations

import pytest

from epp.config import ConfigError, load_config
from epp.datalayer.latency import LatencyPredictionInfo, put_predictions, slo_ms
from epp.flowcontrol.latency_admitter import (
    NO_VALID_ENDPOINT,
    Candidate,
    LatencySloAdmitter,
    latency_slo_refusal,
)
from epp.plugins.predicted_latency import PredictedLatencyProducer
from tests.epp_scheduling.helpers import cycle, endpoint


def info(valid: bool, dispatched: int = 1) -> LatencyPredictionInfo:
    headroom = 10.0 if valid else -10.0
    return LatencyPredictionInfo(valid, True, headroom, 0.0, 100.0, 10.0, dispatched)


BUSY_WARM_INVALID = Candidate(kv_usage=0.5, running=3, prediction=info(False))


@pytest.mark.parametrize(
    ("priority", "ttft", "tpot", "candidates", "refused"),
    [
        # Non-sheddable requests always pass.
        (0, 100.0, 0.0, [BUSY_WARM_INVALID], False),
        (5, 100.0, 0.0, [BUSY_WARM_INVALID], False),
        # No SLO header: nothing to check against.
        (-1, 0.0, 0.0, [BUSY_WARM_INVALID], False),
        (-1, -5.0, 0.0, [BUSY_WARM_INVALID], False),
        # Either SLO counts.
        (-1, 0.0, 20.0, [BUSY_WARM_INVALID], True),
        (-1, 100.0, 0.0, [BUSY_WARM_INVALID], True),
        # No prediction on any endpoint (predictor down): fail open.
        (-1, 100.0, 0.0, [Candidate(0.5, 3, None)], False),
        # One valid prediction is enough.
        (-1, 100.0, 0.0, [BUSY_WARM_INVALID, Candidate(0.5, 3, info(True))], False),
        # An idle endpoint (no running request) admits.
        (-1, 100.0, 0.0, [BUSY_WARM_INVALID, Candidate(0.5, 0, info(False))], False),
        # A cold endpoint (KV < 2 %) admits; 2 % itself is warm.
        (-1, 100.0, 0.0, [BUSY_WARM_INVALID, Candidate(0.019, 3, info(False))], False),
        (-1, 100.0, 0.0, [BUSY_WARM_INVALID, Candidate(0.02, 3, info(False))], True),
        # Idle or cold counts even without a prediction for that endpoint.
        (-1, 100.0, 0.0, [BUSY_WARM_INVALID, Candidate(0.5, 0, None)], False),
        (-1, 100.0, 0.0, [BUSY_WARM_INVALID, Candidate(0.0, 3, None)], False),
        # Busy, warm and every prediction violates: refused.
        (-1, 100.0, 0.0, [BUSY_WARM_INVALID, BUSY_WARM_INVALID], True),
        (-1, 100.0, 0.0, [BUSY_WARM_INVALID, Candidate(0.5, 3, None)], True),
    ],
)
def test_decision_table(
    priority: int, ttft: float, tpot: float, candidates: list[Candidate], refused: bool
) -> None:
    reason = latency_slo_refusal(priority, ttft, tpot, candidates)
    assert (reason == NO_VALID_ENDPOINT) if refused else reason is None


def test_a_valid_prediction_needs_both_ttft_and_tpot() -> None:
    only_ttft = LatencyPredictionInfo(True, False, 5.0, -1.0, 10.0, 30.0, 1)
    assert not only_ttft.is_valid
    assert latency_slo_refusal(-1, 50.0, 20.0, [Candidate(0.5, 2, only_ttft)]) is not None


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"x-llm-d-slo-ttft-ms": "250"}, 250.0),
        ({"x-slo-ttft-ms": "300.5"}, 300.5),
        # The current name wins over the deprecated alias, even when empty.
        ({"x-llm-d-slo-ttft-ms": "", "x-slo-ttft-ms": "300"}, 0.0),
        ({"x-llm-d-slo-ttft-ms": "fast"}, 0.0),
        ({"x-llm-d-slo-ttft-ms": " 250"}, 0.0),
        ({"x-llm-d-slo-ttft-ms": "NaN"}, 0.0),
        ({"x-llm-d-slo-ttft-ms": "1e3"}, 1000.0),
        ({}, 0.0),
    ],
)
def test_slo_header_parsing(headers: dict[str, str], expected: float) -> None:
    assert slo_ms(headers, ("x-llm-d-slo-ttft-ms", "x-slo-ttft-ms")) == expected


def test_admit_request_reads_the_named_producers_predictions() -> None:
    busy = endpoint("a", 8000, waiting=2, running=3, kv=0.5)
    other = endpoint("b", 8001, waiting=2, running=3, kv=0.5)
    c = cycle(headers={"x-llm-d-slo-ttft-ms": "100"})
    put_predictions(c, "mine", {busy.key: info(False), other.key: info(False)})
    default = LatencySloAdmitter()
    named = LatencySloAdmitter(LatencySloAdmitter.Params(latencyPredictionInfoProducerName="mine"))
    # The default producer published nothing: fail open.
    assert default.admit_request(-1, c, [busy, other]) is None
    assert named.admit_request(-1, c, [busy, other]) == NO_VALID_ENDPOINT
    assert named.admit_request(0, c, [busy, other]) is None
    # Before queueing it never refuses (it decides once the producers ran).
    assert named.admit(-1, [busy, other], 0.0) is None
    put_predictions(c, "mine", {busy.key: info(False), other.key: info(True)})
    assert named.admit_request(-1, c, [busy, other]) is None


CONFIG = """\
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: latency-slo-admitter
  name: latency-admitter
{extra}- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: latency-admitter
  - pluginRef: max-score-picker
"""


def test_llm_d_example_loads_and_creates_the_default_producer() -> None:
    c = load_config(CONFIG.format(extra=""))
    (admitter,) = c.flow_control.admitters
    assert isinstance(admitter, LatencySloAdmitter) and admitter.name == "latency-admitter"
    producer = c.plugins.get("predicted-latency-producer")
    assert isinstance(producer, PredictedLatencyProducer)
    assert producer in c.scheduler.producers
    assert producer in c.scheduler.body_processors


def test_a_named_producer_is_used_and_a_wrong_name_is_refused() -> None:
    extra = (
        "  parameters: {latencyPredictionInfoProducerName: lat}\n"
        "- type: predicted-latency-producer\n"
        "  name: lat\n"
    )
    c = load_config(CONFIG.format(extra=extra))
    assert isinstance(c.plugins.get("lat"), PredictedLatencyProducer)
    assert c.plugins.get("predicted-latency-producer") is None
    bad = "  parameters: {latencyPredictionInfoProducerName: nope}\n"
    with pytest.raises(ConfigError, match="latencyPredictionInfoProducerName: 'nope'"):
        load_config(CONFIG.format(extra=bad))


def test_unknown_admitter_parameter_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"latency-slo-admitter.*bogus"):
        load_config(CONFIG.format(extra="  parameters: {bogus: 1}\n"))


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ("{sloBufferFactor: 0}", "sloBufferFactor"),
        ("{contextTTL: 0s}", "contextTTL"),
        ("{useEncoderCacheFeatures: true}", "useEncoderCacheFeatures"),
        ("{streamingMode: maybe}", "streamingMode"),
        ("{bogus: 1}", "bogus"),
    ],
)
def test_bad_producer_parameters_fail_naming_the_field(params: str, field: str) -> None:
    extra = f"- type: predicted-latency-producer\n  parameters: {params}\n"
    with pytest.raises(ConfigError, match=field):
        load_config(CONFIG.format(extra=extra))


def test_producer_accepts_llm_d_parameters() -> None:
    extra = (
        "- type: predicted-latency-producer\n"
        "  parameters: {samplingMean: 500, maxDecodeTokenSamplesForPrediction: 3,\n"
        "    sloBufferFactor: 0.9, contextTTL: 2m, streamingMode: true,\n"
        "    endpointRoleLabel: llm-d.ai/role, predictInProduce: false}\n"
    )
    c = load_config(CONFIG.format(extra=extra))
    producer = c.plugins.get("predicted-latency-producer")
    assert isinstance(producer, PredictedLatencyProducer)
    p = producer.params
    assert (p.slo_buffer_factor, p.context_ttl, p.streaming_mode) == (0.9, 120.0, True)
    assert not p.predict_in_produce
