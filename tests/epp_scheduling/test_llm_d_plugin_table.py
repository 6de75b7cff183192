"""The README's table of llm-d plugin types agrees with llm-d's registry (the types
llm-d-router's EPP registers at ebab687) and with this EPP's plugin registry."""

from __future__ import annotations

import re
from pathlib import Path

from epp.flowcontrol.config import FLOW_CONTROL_TYPES
from epp.plugins.registry import lookup

README = Path(__file__).resolve().parents[2] / "README.md"

# Every type cmd/epp/runner/runner.go registers in llm-d-router at ebab687.
LLM_D_TYPES = frozenset(
    {
        "active-request-scorer",
        "agent-identity",
        "always-disagg-multimodal-decider",
        "always-disagg-pd-decider",
        "anthropic-parser",
        "approx-prefix-cache-producer",
        "burst-prefix-cache-producer",
        "by-label",
        "by-label-selector",
        "concurrency-detector",
        "context-length-aware",
        "core-metrics-extractor",
        "data-parallel-profile-handler",
        "dcgm-data-source",
        "dcgm-extractor",
        "decode-filter",
        "destination-endpoint-served-verifier",
        "disagg-headers-handler",
        "disagg-profile-handler",
        "disaggregatedset-rollout-screener",
        "edf-ordering-policy",
        "encode-filter",
        "endpoint-attribute-filter",
        "endpoint-attribute-scorer",
        "endpoint-notification-source",
        "fcfs-ordering-policy",
        "file-discovery",
        "global-strict-fairness-policy",
        "header-based-testing-filter",
        "header-label-affinity-scorer",
        "header-profile-handler",
        "inflight-load-producer",
        "k8s-notification-source",
        "kv-cache-utilization-scorer",
        "label-selector-filter",
        "latency-scorer",
        "latency-slo-admitter",
        "load-aware-scorer",
        "lora-affinity-scorer",
        "max-score-picker",
        "metrics-data-source",
        "mm-embeddings-cache-producer",
        "mm-embeddings-cache-scorer",
        "models-data-extractor",
        "models-data-source",
        "multicluster-approx-prefix-cache-producer",
        "multicluster-file-discovery",
        "multicluster-kv-cache-utilization-scorer",
        "multicluster-metrics-data-source",
        "multicluster-metrics-extractor",
        "multicluster-prefix-cache-scorer",
        "multicluster-queue-scorer",
        "multicluster-session-affinity-filter",
        "no-hit-lru-scorer",
        "openai-parser",
        "p2p-source-producer",
        "passthrough-parser",
        "pd-profile-handler",
        "precise-prefix-cache-producer",
        "precise-prefix-cache-scorer",
        "predicted-latency-producer",
        "prefill-filter",
        "prefill-header-handler",
        "prefix-based-pd-decider",
        "prefix-cache-affinity-filter",
        "prefix-cache-scorer",
        "priority-holdback-policy",
        "priority-then-time-eviction-order-policy",
        "probabilistic-admitter",
        "program-aware-fairness",
        "queue-scorer",
        "random-picker",
        "request-attribute-reporter",
        "round-robin-fairness-policy",
        "running-requests-size-scorer",
        "session-affinity-filter",
        "session-affinity-scorer",
        "session-id-producer",
        "sglanghttp-parser",
        "sheddable-eviction-filter",
        "single-profile-handler",
        "slo-deadline-ordering-policy",
        "slo-headroom-tier-filter",
        "soft-reflective-ceiling-policy",
        "static-usage-limit-policy",
        "token-load-scorer",
        "token-producer",
        "tokenizer",
        "topology-affinity-filter",
        "topology-affinity-scorer",
        "topology-extractor",
        "utilization-detector",
        "utilization-filter",
        "vertexai-parser",
        "vllmgrpc-parser",
        "vllmhttp-parser",
        "weighted-random-picker",
    }
)

_ROW = re.compile(r"^\| `([a-z0-9-]+)` \| (Alpha|Beta) \| (yes|no)\b(.*)\|$")


def _table() -> dict[str, tuple[str, str]]:
    text = README.read_text()
    section = text.split("### llm-d plugin types", 1)[1].split("\n#", 1)[0]
    rows: dict[str, tuple[str, str]] = {}
    for line in section.splitlines():
        m = _ROW.match(line)
        if m:
            assert m.group(1) not in rows, f"{m.group(1)} is listed twice"
            rows[m.group(1)] = (m.group(3), m.group(4))
    return rows


def test_the_table_lists_every_llm_d_plugin_type_once() -> None:
    rows = _table()
    assert set(rows) == LLM_D_TYPES


def _registered(type_name: str) -> bool:
    """A scheduling or data-layer plugin, or a flow-control one (its own registry)."""
    return lookup(type_name) is not None or type_name in FLOW_CONTROL_TYPES


def test_the_table_says_which_types_this_epp_registers() -> None:
    wrong = [
        f"{t}: README says {here}, the registries {'have' if _registered(t) else 'lack'} it"
        for t, (here, _) in _table().items()
        if (here == "yes") != _registered(t)
    ]
    assert not wrong, "\n".join(wrong)


def test_deprecated_rows_name_a_registered_replacement() -> None:
    for t, (here, note) in _table().items():
        if "deprecated" in note:
            assert here == "yes"
            replacements = re.findall(r"`([a-z0-9-]+)`", note)
            assert replacements, t
            assert all(lookup(r) is not None for r in replacements), t
