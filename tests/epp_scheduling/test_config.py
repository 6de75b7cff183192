"""EndpointPickerConfig loading: examples, realistic llm-d configs, defaults, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from epp.config import ConfigError, load_config
from epp.plugins.deciders import PrefixBasedPdDecider
from epp.plugins.file_discovery import FileDiscovery
from epp.plugins.llm_d_compat import PdProfileHandler
from epp.plugins.pickers import MaxScorePicker, RandomPicker
from epp.plugins.prefix_producer import ApproxPrefixCacheProducer
from epp.plugins.profile_handlers import DisaggProfileHandler, SingleProfileHandler

# Every element of reference section 6: all filters, scorers, pickers, both handlers
# with profile and decider names, all deciders.
SECTION_6_PD = """
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: decode-filter
- type: prefill-filter
- type: encode-filter
- type: label-selector-filter
  name: zone-a
  parameters:
    matchLabels: {topology.kubernetes.io/zone: a}
    matchExpressions:
    - {key: gpu, operator: In, values: [h100, h200]}
- type: queue-scorer
- type: kv-cache-utilization-scorer
- type: approx-prefix-cache-producer
  parameters: {hashBlockSize: 64, maxPrefixBlocksToMatch: 256, lruCapacityPerServer: 31250}
- type: prefix-cache-scorer
- type: load-aware-scorer
  parameters: {threshold: 128}
- type: active-request-scorer
- type: session-affinity-scorer
- type: max-score-picker
  parameters: {maxNumOfEndpoints: 2}
- type: random-picker
- type: weighted-random-picker
  name: wr
- type: prefix-based-pd-decider
  parameters: {nonCachedTokens: 256, promptTokens: 64}
- type: always-disagg-pd-decider
- type: always-disagg-multimodal-decider
- type: disagg-profile-handler
  parameters:
    profiles: {decode: decode, prefill: prefill, encode: encode}
    deciders: {prefill: prefix-based-pd-decider, encode: always-disagg-multimodal-decider}
schedulingProfiles:
- name: decode
  plugins:
  - pluginRef: decode-filter
  - pluginRef: queue-scorer
    weight: 2
  - pluginRef: kv-cache-utilization-scorer
  - pluginRef: prefix-cache-scorer
    weight: 3
  - pluginRef: active-request-scorer
  - pluginRef: session-affinity-scorer
  - pluginRef: max-score-picker
- name: prefill
  plugins:
  - pluginRef: prefill-filter
  - pluginRef: load-aware-scorer
  - pluginRef: wr
- name: encode
  plugins:
  - pluginRef: encode-filter
  - pluginRef: zone-a
  - pluginRef: random-picker
"""

# The shape llm-d's P/D guides deploy: featureGates, a prefix-based decider, and the
# decode profile first.
LLM_D_PD_GUIDE = """
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
featureGates:
- prepareDataPlugins
plugins:
- type: prefill-filter
- type: decode-filter
- type: prefix-cache-scorer
  parameters:
    hashBlockSize: 64
    maxPrefixBlocksToMatch: 256
    lruCapacityPerServer: 31250
- type: queue-scorer
- type: kv-cache-utilization-scorer
- type: max-score-picker
- type: prefix-based-pd-decider
  parameters:
    nonCachedTokens: 16
- type: disagg-profile-handler
  parameters:
    deciders:
      prefill: prefix-based-pd-decider
schedulingProfiles:
- name: prefill
  plugins:
  - pluginRef: prefill-filter
  - pluginRef: queue-scorer
    weight: 1.0
  - pluginRef: max-score-picker
- name: decode
  plugins:
  - pluginRef: decode-filter
  - pluginRef: prefix-cache-scorer
    weight: 2.0
  - pluginRef: queue-scorer
    weight: 1.0
  - pluginRef: kv-cache-utilization-scorer
    weight: 1.0
  - pluginRef: max-score-picker
"""

# Older llm-d P/D configs (pd-profile-handler + prefill-header-handler), GIE apiVersion.
LLM_D_LEGACY_PD = """
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: prefill-header-handler
- type: prefix-cache-scorer
  parameters:
    hashBlockSize: 5
    maxPrefixBlocksToMatch: 256
    lruCapacityPerServer: 31250
- type: prefill-filter
- type: decode-filter
- type: max-score-picker
- type: pd-profile-handler
  parameters:
    threshold: 10
    hashBlockSize: 5
schedulingProfiles:
- name: prefill
  plugins:
  - pluginRef: prefill-filter
  - pluginRef: max-score-picker
  - pluginRef: prefix-cache-scorer
    weight: 50
- name: decode
  plugins:
  - pluginRef: decode-filter
  - pluginRef: max-score-picker
  - pluginRef: prefix-cache-scorer
    weight: 50
"""

# Aggregated serving (no P/D), estimate-mode prefix scorer, load-aware scorer, the GIE
# top-level sections that this EPP accepts but does not act on.
LLM_D_AGGREGATED = """
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: single-profile-handler
- type: decode-filter
- type: prefix-cache-scorer
- type: load-aware-scorer
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: decode-filter
  - pluginRef: prefix-cache-scorer
    weight: 2.0
  - pluginRef: load-aware-scorer
    weight: 1.0
  - pluginRef: max-score-picker
saturationDetector:
  queueDepthThreshold: 5
  kvCacheUtilThreshold: 0.8
data:
  sources: []
flowControl: {}
requestHandler: {}
"""

FILE_DISCOVERY_V1 = """
apiVersion: llm-d.ai/v1
kind: EndpointPickerConfig
plugins:
- type: file-discovery
  name: static-pods
  parameters: {path: /tmp/endpoints.yaml, watchFile: true}
- type: decode-filter
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: decode-filter
dataLayer:
  discovery:
    endpoints:
      pluginRef: static-pods
"""


def test_section_6_pd_example_loads_with_every_plugin() -> None:
    cfg = load_config(SECTION_6_PD)
    handler = cfg.scheduler.handler
    assert isinstance(handler, DisaggProfileHandler)
    assert isinstance(handler.prefill_decider, PrefixBasedPdDecider)
    assert set(cfg.scheduler.profiles) == {"decode", "prefill", "encode"}
    decode = cfg.scheduler.profiles["decode"]
    weights = {ws.scorer.type_name: ws.weight for ws in decode.scorers}
    assert weights == {
        "queue-scorer": 2,
        "kv-cache-utilization-scorer": 1,
        "prefix-cache-scorer": 3,
        "active-request-scorer": 1,
        "session-affinity-scorer": 1,
    }
    assert isinstance(decode.picker, MaxScorePicker)
    assert decode.picker.params.max_num_of_endpoints == 2
    assert cfg.scheduler.profiles["prefill"].picker.name == "wr"
    assert isinstance(cfg.scheduler.profiles["encode"].picker, RandomPicker)
    assert [f.name for f in cfg.scheduler.profiles["encode"].filters] == ["encode-filter", "zone-a"]
    producers = [p for p in cfg.scheduler.producers if isinstance(p, ApproxPrefixCacheProducer)]
    assert len(producers) == 1
    assert cfg.discovery is None


def test_llm_d_pd_guide_config_loads_unchanged() -> None:
    cfg = load_config(LLM_D_PD_GUIDE)
    assert isinstance(cfg.scheduler.handler, DisaggProfileHandler)
    # No producer declared: one is added, configured from the scorer's parameters.
    (producer,) = [p for p in cfg.scheduler.producers if isinstance(p, ApproxPrefixCacheProducer)]
    assert producer.params.hash_block_size == 64
    assert cfg.document.featureGates == ["prepareDataPlugins"]


def test_llm_d_legacy_pd_config_loads_unchanged() -> None:
    cfg = load_config(LLM_D_LEGACY_PD)
    handler = cfg.scheduler.handler
    assert isinstance(handler, PdProfileHandler)
    assert isinstance(handler.prefill_decider, PrefixBasedPdDecider)
    assert handler.prefill_decider.params.non_cached_tokens == 10
    (producer,) = [p for p in cfg.scheduler.producers if isinstance(p, ApproxPrefixCacheProducer)]
    assert producer.params.hash_block_size == 5


def test_llm_d_aggregated_config_loads_unchanged() -> None:
    cfg = load_config(LLM_D_AGGREGATED)
    assert isinstance(cfg.scheduler.handler, SingleProfileHandler)
    assert list(cfg.scheduler.profiles) == ["default"]


def test_file_discovery_selected_by_data_layer_v1_shape() -> None:
    cfg = load_config(FILE_DISCOVERY_V1)
    assert isinstance(cfg.discovery, FileDiscovery)
    assert cfg.discovery.name == "static-pods"
    assert cfg.discovery.params.watch_file is True


def test_json_config_and_config_file(tmp_path: Path) -> None:
    doc = {
        "apiVersion": "llm-d.ai/v1alpha1",
        "kind": "EndpointPickerConfig",
        "plugins": [{"type": "queue-scorer"}],
        "schedulingProfiles": [{"name": "only", "plugins": [{"pluginRef": "queue-scorer"}]}],
    }
    path = tmp_path / "epp.json"
    path.write_text(json.dumps(doc))
    cfg = load_config(config_file=str(path))
    assert isinstance(cfg.scheduler.handler, SingleProfileHandler)
    profile = cfg.scheduler.profiles["only"]
    # Defaults: no picker -> max-score-picker; no weight -> 1.
    assert isinstance(profile.picker, MaxScorePicker)
    assert profile.scorers[0].weight == 1.0


def test_no_config_gives_one_default_profile() -> None:
    cfg = load_config()
    assert list(cfg.scheduler.profiles) == ["default"]
    assert isinstance(cfg.scheduler.handler, SingleProfileHandler)
    assert cfg.scheduler.profiles["default"].scorers


def test_plugin_name_defaults_to_type_and_names_may_repeat_types() -> None:
    cfg = load_config("""
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- {type: queue-scorer}
- {type: queue-scorer, name: q2}
schedulingProfiles:
- name: a
  plugins: [{pluginRef: queue-scorer}, {pluginRef: q2, weight: 0.5}]
""")
    assert {p.name for p in cfg.plugins} >= {"queue-scorer", "q2"}


BASE = "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\n"


@pytest.mark.parametrize(
    ("text", "needles"),
    [
        (BASE + "plugin: []\n", ["plugin", "Extra inputs"]),
        ("apiVersion: v9\nkind: EndpointPickerConfig\n", ["apiVersion"]),
        ("apiVersion: llm-d.ai/v1alpha1\nkind: Other\n", ["kind"]),
        (
            BASE + "plugins:\n- type: no-such-plugin\n",
            ["plugins[0]", "no-such-plugin", "unknown plugin type"],
        ),
        (
            BASE + "plugins:\n- type: queue-scorer\n  parameters: {bogus: 1}\n",
            ["plugins[0]", "queue-scorer", "parameters.bogus"],
        ),
        (
            BASE
            + "plugins:\n- type: load-aware-scorer\n  name: la\n  parameters: {threshold: x}\n",
            ["name 'la'", "parameters.threshold"],
        ),
        (
            BASE + "plugins:\n- type: max-score-picker\n  parameters: {maxNumOfEndpoints: 0}\n",
            ["maxNumOfEndpoints"],
        ),
        (BASE + "plugins:\n- {type: queue-scorer, nam: x}\n", ["plugins[0].nam"]),
        (
            BASE + "plugins: [{type: queue-scorer}]\nschedulingProfiles:\n- name: a\n"
            "  plugins: [{pluginRef: nope}]\n",
            ["'a'", "pluginRef 'nope'"],
        ),
        (
            BASE + "plugins: [{type: decode-filter}]\nschedulingProfiles:\n- name: a\n"
            "  plugins: [{pluginRef: decode-filter, weight: 2}]\n",
            ["not a scorer"],
        ),
        (BASE + "plugins: [{type: queue-scorer}, {type: queue-scorer}]\n", ["duplicate"]),
        (
            BASE + "plugins: [{type: queue-scorer}]\nschedulingProfiles:\n- name: a\n"
            "  plugins: [{pluginRef: queue-scorer, wieght: 2}]\n",
            ["wieght"],
        ),
        (
            BASE + "plugins: [{type: decode-filter}]\nschedulingProfiles:\n- name: a\n- name: b\n",
            ["single-profile-handler", "exactly one"],
        ),
        (
            BASE + "plugins:\n- type: disagg-profile-handler\n  parameters:\n"
            "    deciders: {prefill: ghost}\nschedulingProfiles:\n- name: decode\n",
            ["disagg-profile-handler", "deciders.prefill", "ghost"],
        ),
        (
            BASE + "plugins:\n- type: disagg-profile-handler\n  parameters:\n"
            "    profiles: {decod: x}\nschedulingProfiles:\n- name: decode\n",
            ["parameters.profiles.decod"],
        ),
        (
            BASE + "plugins:\n- type: disagg-profile-handler\nschedulingProfiles:\n- name: main\n",
            ["profiles.decode", "'decode'"],
        ),
        (
            BASE + "plugins: [{type: file-discovery}]\nschedulingProfiles: [{name: a}]\n",
            ["file-discovery", "parameters.path"],
        ),
        (BASE + "schedulingProfiles: []\n", ["at least one profile"]),
        (
            BASE + "plugins: [{type: queue-scorer}]\nschedulingProfiles:\n- name: a\n"
            "  plugins: [{pluginRef: queue-scorer}]\ndataLayer: {discovery: {pluginRef: "
            "queue-scorer}}\n",
            ["not a discovery plugin"],
        ),
        ("- a\n- b\n", ["mapping"]),
        (BASE + "plugins: [\n", ["not valid YAML"]),
    ],
)
def test_bad_configs_name_the_problem(text: str, needles: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(text)
    for needle in needles:
        assert needle in str(info.value), str(info.value)


def test_config_text_and_file_are_exclusive(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="only one"):
        load_config("x", str(tmp_path / "f"))
    with pytest.raises(ConfigError, match=r"missing\.yaml"):
        load_config(config_file=str(tmp_path / "missing.yaml"))
