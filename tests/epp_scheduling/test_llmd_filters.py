"""``prefix-cache-affinity-filter`` and ``context-length-aware`` as their llm-d READMEs
describe them: pure decisions, then loaded from a configuration."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from epp.config import ConfigError, load_config
from epp.plugins.base import PluginSet
from epp.plugins.context_length_aware import (
    ContextLengthAware,
    ContextRange,
    parse_range,
    range_score,
)
from epp.plugins.inflight_load import InFlightLoadProducer
from epp.plugins.prefix_cache_affinity_filter import PrefixCacheAffinityFilter, split_sticky
from epp.plugins.prefix_producer import PREFIX_MATCH, PrefixMatch
from epp.request import CHARS_PER_TOKEN
from epp.scheduling.cycle import CycleState
from epp.scheduling.result import ProfileResult, SchedulingResult

from .helpers import cycle, endpoint

# -- prefix-cache-affinity-filter ----------------------------------------------------


def _affinity(params: dict[str, object] | None = None) -> PrefixCacheAffinityFilter:
    plugin = PrefixCacheAffinityFilter(
        PrefixCacheAffinityFilter.Params.model_validate(params or {})
    )
    plugin.bind(PluginSet())
    return plugin


def _with_match(matched: dict[str, int], blocks: int = 10) -> CycleState:
    c = cycle("x")
    c.put(
        PREFIX_MATCH,
        PrefixMatch(
            hashes=[bytes([i]) for i in range(blocks)],
            matched=matched,
            block_bytes=64,
            prompt_bytes=640,
            prompt_tokens=160,
        ),
    )
    return c


A, B, C = endpoint("a", 1), endpoint("b", 2), endpoint("c", 3)


def test_split_sticky_at_the_threshold() -> None:
    assert split_sticky([0.8, 0.79, 1.0], 0.8) == ([0, 2], [1])


def test_affinity_keeps_only_sticky_endpoints() -> None:
    f = _affinity()
    c = _with_match({A.key: 9, B.key: 8, C.key: 2})
    assert [ep.name for ep in f.filter(c, [A, B, C])] == ["a", "b"]


def test_affinity_is_a_noop_without_sticky_endpoints_or_a_prompt_match() -> None:
    f = _affinity()
    assert list(f.filter(_with_match({A.key: 7}), [A, B])) == [A, B]
    assert list(f.filter(cycle("x"), [A, B])) == [A, B]  # no producer ran
    assert list(f.filter(_with_match({A.key: 10}), [A])) == [A]  # a single candidate
    off = _affinity({"affinityThreshold": 0})
    assert list(off.filter(_with_match({A.key: 10}), [A, B])) == [A, B]


def test_affinity_exploration_skips_the_gate() -> None:
    always = _affinity({"explorationProbability": 1.0})
    assert list(always.filter(_with_match({A.key: 10}), [A, B])) == [A, B]
    never = _affinity({"explorationProbability": 0.0})
    assert list(never.filter(_with_match({A.key: 10}), [A, B])) == [A]


def test_affinity_ttft_gate_breaks_stickiness_when_the_sticky_pod_is_loaded() -> None:
    plugins = PluginSet()
    producer = InFlightLoadProducer()
    plugins.add(producer)
    f = PrefixCacheAffinityFilter(
        PrefixCacheAffinityFilter.Params.model_validate(
            {"maxTTFTPenaltyMs": 1000, "peakPrefillThroughput": 1000}
        )
    )
    f.bind(plugins)
    assert f.producer is producer
    # 1500 tokens in flight on the sticky pod: an estimated 1500 ms vs 0 ms elsewhere.
    busy = cycle("y" * (1500 * CHARS_PER_TOKEN))
    producer.track(busy, SchedulingResult({"d": ProfileResult([A])}, "d"))
    assert list(f.filter(_with_match({A.key: 10}), [A, B])) == [A, B]
    # Within the penalty: stays sticky.
    loose = PrefixCacheAffinityFilter(
        PrefixCacheAffinityFilter.Params.model_validate(
            {"maxTTFTPenaltyMs": 2000, "peakPrefillThroughput": 1000}
        )
    )
    loose.bind(plugins)
    assert list(loose.filter(_with_match({A.key: 10}), [A, B])) == [A]
    # 0 turns the gate off.
    off = _affinity({"maxTTFTPenaltyMs": 0})
    assert off.producer is None
    assert list(off.filter(_with_match({A.key: 10}), [A, B])) == [A]


def test_affinity_parameters_are_validated() -> None:
    defaults = PrefixCacheAffinityFilter().params
    assert (defaults.affinity_threshold, defaults.max_ttft_penalty_ms) == (0.8, 18000.0)
    assert defaults.peak_prefill_throughput == 15928.0
    assert defaults.ttft_source == "prefillThroughput"
    for bad in (
        {"affinityThreshold": 1.5},
        {"explorationProbability": 2},
        {"maxTTFTPenaltyMs": -1},
        {"ttftSource": "guess"},
        {"peakPrefillThroughput": 0},
        {"threshold": 0.5},
    ):
        with pytest.raises(ValidationError):
            PrefixCacheAffinityFilter.Params.model_validate(bad)
    # No throughput is needed when the gate is off or fed by the latency predictor.
    PrefixCacheAffinityFilter.Params.model_validate(
        {"peakPrefillThroughput": 0, "maxTTFTPenaltyMs": 0}
    )
    PrefixCacheAffinityFilter.Params.model_validate(
        {"peakPrefillThroughput": 0, "ttftSource": "latencyPredictor"}
    )


# -- context-length-aware ------------------------------------------------------------

LABEL = "llm-d.ai/context-length-range"


def test_parse_range() -> None:
    assert parse_range("0-2048") == ContextRange(0, 2048)
    assert parse_range(" 10 - 20 ") == ContextRange(10, 20)
    for bad in ("", "5", "1-2-3", "a-5", "9-1"):
        with pytest.raises(ValueError, match="invalid range"):
            parse_range(bad)


def test_range_scores_follow_the_readme() -> None:
    narrow, wide = ContextRange(0, 2048), ContextRange(0, 100_000)
    # In range: above 0.3, tighter ranges higher, a matching zero-width range 1.
    assert 0.3 < range_score(1000, wide) < range_score(1000, narrow) <= 1.0
    assert range_score(5, ContextRange(5, 5)) == 1.0
    # More headroom scores higher within the same range.
    assert range_score(100, narrow) > range_score(2000, narrow)
    # Out of range: below 0.3, nearer ranges first.
    near, far = ContextRange(0, 8192), ContextRange(0, 2048)
    assert 0.0 < range_score(9000, far) < range_score(9000, near) < 0.3
    assert range_score(10, ContextRange(1000, 2000)) < 0.3


def _cla(params: dict[str, object] | None = None) -> ContextLengthAware:
    return ContextLengthAware(ContextLengthAware.Params.model_validate(params or {}))


SHORT = endpoint("short", 1, labels={LABEL: "0-2048"})
LONG = endpoint("long", 2, labels={LABEL: "2048-8192"})
PLAIN = endpoint("plain", 3)
BROKEN = endpoint("broken", 4, labels={LABEL: "lots"})


def test_context_length_scores_endpoints() -> None:
    small = cycle("x" * (100 * CHARS_PER_TOKEN))
    s_short, s_long, s_plain, s_broken = _cla().score(small, [SHORT, LONG, PLAIN, BROKEN])
    assert s_short > 0.3 > s_long and s_plain == 0.5 and s_broken == 0.0
    big = cycle("x" * (5000 * CHARS_PER_TOKEN))
    s_short, s_long = _cla().score(big, [SHORT, LONG])
    assert s_long > 0.3 > s_short


def test_context_length_filters_only_when_enabled() -> None:
    big = cycle("x" * (5000 * CHARS_PER_TOKEN))
    eps = [SHORT, LONG, PLAIN, BROKEN]
    assert list(_cla().filter(big, eps)) == eps
    kept = _cla({"enableFiltering": True}).filter(big, eps)
    assert [ep.name for ep in kept] == ["long", "plain"]


def test_context_length_custom_label_and_params() -> None:
    custom = endpoint("c", 5, labels={"tier": "0-10"})
    assert _cla({"label": "tier"}).score(cycle("hi"), [custom])[0] > 0.3
    with pytest.raises(ValidationError):
        _cla({"label": ""})
    with pytest.raises(ValidationError):
        _cla({"enableFilter": True})


def test_both_load_from_a_configuration() -> None:
    text = """\
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: context-length-aware
  name: context-router
  parameters: {label: llm-d.ai/context-length-range, enableFiltering: true}
- type: prefix-cache-affinity-filter
  name: prefix-affinity
  parameters:
    affinityThreshold: 0.80
    explorationProbability: 0.01
    maxTTFTPenaltyMs: 5000
    ttftSource: prefillThroughput
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: prefix-affinity
  - pluginRef: context-router
    weight: 8
  - pluginRef: max-score-picker
"""
    config = load_config(text)
    [profile] = config.scheduler.profiles.values()
    assert [f.name for f in profile.filters] == ["prefix-affinity", "context-router"]
    assert [(s.scorer.name, s.weight) for s in profile.scorers] == [("context-router", 8)]
    # The filter reads the prefix producer and the in-flight producer: both are added.
    assert config.plugins.get("approx-prefix-cache-producer") is not None
    assert config.plugins.get("inflight-load-producer") is not None
    with pytest.raises(ConfigError, match="affinityThreshold"):
        load_config(text.replace("affinityThreshold: 0.80", "affinityThreshold: 2"))


def test_the_llm_d_types_are_registered() -> None:
    from epp.plugins.registry import lookup

    for type_name in (
        "openai-parser",
        "anthropic-parser",
        "vllmhttp-parser",
        "sglanghttp-parser",
        "passthrough-parser",
        "data-parallel-profile-handler",
        "header-profile-handler",
        "prefix-cache-affinity-filter",
        "context-length-aware",
    ):
        cls = lookup(type_name)
        assert cls is not None, type_name
        assert cls.Params.model_config.get("extra") == "forbid", type_name
