"""Load plugins against their llm-d READMEs: running requests, in-flight tokens,
utilization caps, and filtering or scoring by an endpoint attribute."""

from __future__ import annotations

import json
import time

import pytest

from epp.config import ConfigError, load_config
from epp.datalayer.attributes import put_attribute
from epp.datastore import Endpoint
from epp.plugins import create_plugin
from epp.plugins.base import PluginSet
from epp.plugins.endpoint_attribute import EndpointAttributeFilter, EndpointAttributeScorer
from epp.plugins.inflight_load import InFlightLoadProducer
from epp.plugins.prefix_producer import PREFIX_MATCH, PrefixMatch
from epp.plugins.running_requests_scorer import RunningRequestsSizeScorer
from epp.plugins.token_load_scorer import TokenLoadScorer
from epp.plugins.utilization_filter import UtilizationFilter
from epp.scheduling.cycle import CycleState
from epp.scheduling.result import ProfileResult, SchedulingResult

from .helpers import cycle, endpoint

GPU = ("GPUUtilization", "dcgm-extractor")


def _prompt_cycle(tokens: int, **body: object) -> CycleState:
    """A request whose token estimate is ``tokens`` (4 characters per token)."""
    payload = {"model": "m", "messages": [{"role": "user", "content": "abcd" * tokens}], **body}
    c = cycle(body=json.dumps(payload).encode())
    # The chat template adds a little; pin the estimate the test reasons about.
    c.request.token_estimate = tokens
    return c


def _result(decode: Endpoint, prefill: Endpoint | None = None) -> SchedulingResult:
    results: dict[str, ProfileResult | None] = {"decode": ProfileResult([decode])}
    if prefill is not None:
        results["prefill"] = ProfileResult([prefill])
    return SchedulingResult(results, "decode", "prefill" if prefill is not None else None)


def test_running_requests_size_scorer_min_max_normalised() -> None:
    eps = [endpoint("a", 1, running=2), endpoint("b", 2, running=10), endpoint("c", 3, running=6)]
    assert RunningRequestsSizeScorer().score(cycle(), eps) == [1.0, 0.0, 0.5]
    same = [endpoint("a", 1, running=4), endpoint("b", 2, running=4)]
    assert RunningRequestsSizeScorer().score(cycle(), same) == [1.0, 1.0]
    # A stale endpoint counts as the busiest.
    mixed = [endpoint("a", 1, running=3), endpoint("s", 2, running=0, fresh=False)]
    assert RunningRequestsSizeScorer().score(cycle(), mixed) == [1.0, 0.0]


def test_inflight_counts_tokens_and_releases_prompt_at_first_byte() -> None:
    producer = InFlightLoadProducer()
    d, p = endpoint("d", 1), endpoint("p", 2)
    release_early, release_all = producer.track(_prompt_cycle(1000), _result(d, p))
    assert (producer.requests(d), producer.tokens(d)) == (1, 1000)
    assert (producer.requests(p), producer.tokens(p)) == (1, 1000)
    release_early()  # the response started: the prefill is done, the prompt processed
    assert (producer.requests(p), producer.tokens(p)) == (0, 0)
    assert (producer.requests(d), producer.tokens(d)) == (1, 0)
    release_all()
    release_all()  # idempotent
    assert (producer.requests(d), producer.tokens(d)) == (0, 0)


def test_inflight_output_estimate_is_capped_and_kept_until_the_end() -> None:
    producer = create_plugin(
        "inflight-load-producer",
        None,
        {"addEstimatedOutputTokens": True, "outputRatio": 2.0, "maxEstimatedOutputTokens": 1500},
    )
    assert isinstance(producer, InFlightLoadProducer)
    d = endpoint("d", 1)
    # 1000 prompt tokens: output estimate min(2000, cap 1500) -> 2500 in flight.
    early, done = producer.track(_prompt_cycle(1000), _result(d))
    assert producer.tokens(d) == 2500
    early()
    assert producer.tokens(d) == 2500  # with the estimate, the decode keeps its share
    done()
    # The client's own max_tokens caps the estimate too.
    producer.track(_prompt_cycle(1000, max_tokens=100), _result(d))
    assert producer.tokens(d) == 1100
    producer.endpoints_changed([], [d])  # a removed endpoint's counters go
    assert producer.tokens(d) == 0
    with pytest.raises(ValueError, match="outputRatio"):
        create_plugin("inflight-load-producer", None, {"outputRatio": -1})


def test_inflight_discounts_cached_prefix_blocks() -> None:
    producer = InFlightLoadProducer()
    warm, cold = endpoint("warm", 1), endpoint("cold", 2)
    c = _prompt_cycle(1000)
    c.put(
        PREFIX_MATCH,
        PrefixMatch(
            hashes=[],
            matched={warm.key: 10},
            block_bytes=256,
            prompt_bytes=4000,
            prompt_tokens=1000,
        ),
    )
    # 10 blocks x 256 bytes of a 4000-byte, 1000-token prompt: 640 tokens cached.
    assert producer.request_tokens(c, warm) == 360
    assert producer.request_tokens(c, cold) == 1000


def test_token_load_scorer_counts_in_flight_plus_this_request() -> None:
    plugins = PluginSet()
    scorer = create_plugin("token-load-scorer", None, {"queueThresholdTokens": 10_000})
    assert isinstance(scorer, TokenLoadScorer)
    plugins.add(scorer)
    scorer.bind(plugins)
    # No producer configured: the default one is created and shared.
    producer = plugins.get("inflight-load-producer")
    assert isinstance(producer, InFlightLoadProducer)
    busy, idle = endpoint("busy", 1), endpoint("idle", 2)
    producer.track(_prompt_cycle(4000), _result(busy))
    scores = scorer.score(_prompt_cycle(1000), [busy, idle])
    assert scores == pytest.approx([1 - 5000 / 10_000, 1 - 1000 / 10_000])
    producer.track(_prompt_cycle(20_000), _result(busy))
    assert scorer.score(_prompt_cycle(1000), [busy])[0] == 0.0  # past the threshold
    empty = _prompt_cycle(0)
    assert scorer.score(empty, [idle]) == [1.0]
    default = create_plugin("token-load-scorer", None, {"queueThresholdTokens": 0})
    assert isinstance(default, TokenLoadScorer)
    assert default.threshold == 4_194_304


def test_consumers_name_their_inflight_producer() -> None:
    text = """
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: inflight-load-producer
  name: load-a
- type: token-load-scorer
  parameters: {inFlightLoadProducerName: load-a}
- type: utilization-filter
  parameters:
    conditions: [{metric: active-requests, maxValue: 4}]
    inFlightLoadProducerName: load-a
schedulingProfiles:
- name: default
  plugins: [{pluginRef: utilization-filter}, {pluginRef: token-load-scorer}]
"""
    cfg = load_config(text)
    producers = cfg.plugins.of_kind(InFlightLoadProducer)
    assert [p.name for p in producers] == ["load-a"]  # no default created
    assert producers[0] in cfg.scheduler.trackers
    bad = text.replace("{inFlightLoadProducerName: load-a}", "{inFlightLoadProducerName: nope}")
    with pytest.raises(ConfigError, match="inFlightLoadProducerName: 'nope'"):
        load_config(bad)


def test_utilization_filter_drops_endpoints_over_any_cap() -> None:
    f = create_plugin(
        "utilization-filter",
        None,
        {
            "conditions": [
                {"metric": "running-requests", "maxValue": 40},
                {"metric": "waiting-queue", "maxValue": 0},
                {"metric": "kv-cache-utilization", "maxValue": 0.8},
            ]
        },
    )
    assert isinstance(f, UtilizationFilter)
    ok = endpoint("ok", 1, running=40, waiting=0, kv=0.8)
    busy = endpoint("busy", 2, running=41)
    queued = endpoint("queued", 3, waiting=1)
    full = endpoint("full", 4, kv=0.81)
    stale = endpoint("stale", 5, fresh=False)
    assert f.filter(cycle(), [ok, busy, queued, full, stale]) == [ok]
    assert f.filter(cycle(), [busy, queued]) == []
    fallback = create_plugin(
        "utilization-filter",
        None,
        {"conditions": [{"metric": "waiting-queue", "maxValue": 0}], "fallbackOnEmpty": True},
    )
    assert isinstance(fallback, UtilizationFilter)
    assert fallback.filter(cycle(), [queued, stale]) == [queued, stale]


def test_utilization_filter_active_requests_and_parameter_checks() -> None:
    plugins = PluginSet()
    f = create_plugin(
        "utilization-filter", None, {"conditions": [{"metric": "active-requests", "maxValue": 1}]}
    )
    assert isinstance(f, UtilizationFilter)
    plugins.add(f)
    f.bind(plugins)
    producer = plugins.get("inflight-load-producer")
    assert isinstance(producer, InFlightLoadProducer)
    a, b = endpoint("a", 1), endpoint("b", 2)
    producer.track(_prompt_cycle(10), _result(a))
    producer.track(_prompt_cycle(10), _result(a))
    assert f.filter(cycle(), [a, b]) == [b]
    for bad, match in (
        ({"conditions": []}, "conditions"),
        ({"conditions": [{"metric": "gpu", "maxValue": 1}]}, "metric"),
        ({"conditions": [{"metric": "waiting-queue"}]}, "maxValue"),
        ({"conditions": [{"metric": "waiting-queue", "maxValue": -1}]}, "maxValue"),
        ({"conditions": [{"metric": "kv-cache-utilization", "maxValue": 80}]}, "fraction"),
    ):
        with pytest.raises(ValueError, match=match):
            create_plugin("utilization-filter", None, bad)


def _with_gpu(
    name: str, port: int, value: float | None, *, expires: float | None = None
) -> Endpoint:
    ep = endpoint(name, port)
    if value is not None:
        put_attribute(ep, GPU, value, expires_at=expires)
    return ep


def _gpu_filter(**extra: object) -> EndpointAttributeFilter:
    params = {
        "attribute": "GPUUtilization",
        "producer": "dcgm-extractor",
        "algorithm": {
            "type": "threshold",
            "threshold": {"operator": "LessThanOrEqual", "value": 0.9},
        },
        **extra,
    }
    f = create_plugin("endpoint-attribute-filter", None, params)
    assert isinstance(f, EndpointAttributeFilter)
    return f


def test_endpoint_attribute_filter_threshold_on_missing_and_fallback() -> None:
    cool, hot, unknown = (
        _with_gpu("cool", 1, 0.3),
        _with_gpu("hot", 2, 0.95),
        _with_gpu("u", 3, None),
    )
    assert _gpu_filter().filter(cycle(), [cool, hot, unknown]) == [cool, unknown]
    assert _gpu_filter(onMissing="Fail").filter(cycle(), [cool, hot, unknown]) == [cool]
    assert _gpu_filter().filter(cycle(), [hot]) == []
    assert _gpu_filter(fallbackOnEmpty=True).filter(cycle(), [hot]) == [hot]
    # An expired reading (its source stopped answering) is missing.
    old = _with_gpu("old", 4, 0.99, expires=time.monotonic() - 1)
    assert _gpu_filter(onMissing="Pass").filter(cycle(), [old]) == [old]
    ops = {
        "LessThan": [0.3],
        "GreaterThan": [0.95],
        "GreaterThanOrEqual": [0.5, 0.95],
        "Equal": [0.5],
        "NotEqual": [0.3, 0.95],
    }
    eps = [_with_gpu("a", 1, 0.3), _with_gpu("b", 2, 0.5), _with_gpu("c", 3, 0.95)]
    for op, kept in ops.items():
        f = _gpu_filter(
            algorithm={"type": "threshold", "threshold": {"operator": op, "value": 0.5}}
        )
        values = [ep.attributes[GPU].value for ep in f.filter(cycle(), eps)]
        assert values == kept, op


def test_endpoint_attribute_key_resolution() -> None:
    # producer omitted: the core metrics extractor's custom metric.
    f = create_plugin(
        "endpoint-attribute-filter",
        None,
        {
            "attribute": "queue_depth",
            "algorithm": {"type": "threshold", "threshold": {"operator": "LessThan", "value": 3}},
        },
    )
    assert isinstance(f, EndpointAttributeFilter)
    assert f.key == ("queue_depth", "core-metrics-extractor")
    with pytest.raises(
        ValueError, match="attribute: 'GPUUtilization' and producer: 'dcgm-extractor'"
    ):
        create_plugin(
            "endpoint-attribute-filter",
            None,
            {
                "attribute": "GPUUtilization/dcgm-extractor",
                "algorithm": {
                    "type": "threshold",
                    "threshold": {"operator": "LessThan", "value": 3},
                },
            },
        )
    empty = create_plugin(
        "endpoint-attribute-scorer",
        None,
        {"attributeKey": "a/b", "producer": "", "algorithm": {"type": "linear_higher_is_better"}},
    )
    assert isinstance(empty, EndpointAttributeScorer)
    assert empty.key == ("a/b", "")
    with pytest.raises(ValueError, match="operator"):
        create_plugin(
            "endpoint-attribute-filter",
            None,
            {
                "attribute": "x",
                "algorithm": {
                    "type": "threshold",
                    "threshold": {"operator": "Between", "value": 1},
                },
            },
        )
    with pytest.raises(ValueError, match="algorithm"):
        create_plugin("endpoint-attribute-filter", None, {"attribute": "x"})


def test_endpoint_attribute_scorer_fixed_and_adaptive_ranges() -> None:
    fixed = create_plugin(
        "endpoint-attribute-scorer",
        None,
        {
            "attributeKey": "GPUUtilization",
            "producer": "dcgm-extractor",
            "algorithm": {
                "type": "linear_lower_is_better",
                "normalization": {"fixedRange": {"min": 0.0, "max": 1.0}},
            },
        },
    )
    assert isinstance(fixed, EndpointAttributeScorer)
    eps = [_with_gpu("a", 1, 0.25), _with_gpu("b", 2, 1.5), _with_gpu("c", 3, None)]
    assert fixed.score(cycle(), eps) == [0.75, 0.0, 0.0]
    adaptive = create_plugin(
        "endpoint-attribute-scorer",
        None,
        {
            "attributeKey": "GPUUtilization",
            "producer": "dcgm-extractor",
            "algorithm": {"type": "linear_higher_is_better"},
        },
    )
    eps = [
        _with_gpu("a", 1, 0.2),
        _with_gpu("b", 2, 0.6),
        _with_gpu("c", 3, 0.4),
        _with_gpu("d", 4, None),
    ]
    assert isinstance(adaptive, EndpointAttributeScorer)
    assert adaptive.score(cycle(), eps) == pytest.approx([0.0, 1.0, 0.5, 0.0])
    same = [_with_gpu("a", 1, 0.5), _with_gpu("b", 2, 0.5), _with_gpu("c", 3, None)]
    assert adaptive.score(cycle(), same) == [1.0, 1.0, 0.0]
    for bad, match in (
        ({"fixedRange": {"min": 1, "max": 1}}, "min < max"),
        ({"fixedRange": {"min": 0, "max": 1}, "adaptiveRange": {}}, "at most one"),
    ):
        with pytest.raises(ValueError, match=match):
            create_plugin(
                "endpoint-attribute-scorer",
                None,
                {
                    "attributeKey": "x",
                    "algorithm": {"type": "linear_lower_is_better", "normalization": bad},
                },
            )
