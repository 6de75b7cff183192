"""Plugin stability levels as llm-d declares them: Alpha plugins need a flag.

llm-d registers some plugin types as Alpha (experimental, no compatibility promise) and
refuses to start with one unless ``--allow-experimental-plugins`` is set. The same
types are refused here the same way, by the ``type`` the configuration names.
"""

from __future__ import annotations

from collections.abc import Iterable

from epp.config import ConfigError

__all__ = ["ALPHA_PLUGIN_TYPES", "check_plugin_stability"]

# The types llm-d's EPP registers with stability Alpha.
ALPHA_PLUGIN_TYPES = frozenset(
    {
        "agent-identity",
        "burst-prefix-cache-producer",
        "dcgm-data-source",
        "dcgm-extractor",
        "disaggregatedset-rollout-screener",
        "endpoint-attribute-filter",
        "endpoint-attribute-scorer",
        "eviction-priority-then-time-ordering",  # the documented names of the two
        "eviction-sheddable-filter",  # eviction policies, aliases here
        "header-label-affinity-scorer",
        "header-profile-handler",
        "multicluster-approx-prefix-cache-producer",
        "multicluster-file-discovery",
        "multicluster-kv-cache-utilization-scorer",
        "multicluster-metrics-data-source",
        "multicluster-metrics-extractor",
        "multicluster-prefix-cache-scorer",
        "multicluster-queue-scorer",
        "multicluster-session-affinity-filter",
        "p2p-source-producer",
        "priority-holdback-policy",
        "priority-then-time-eviction-order-policy",
        "session-affinity-filter",
        "session-affinity-scorer",
        "sheddable-eviction-filter",
        "soft-reflective-ceiling-policy",
        "topology-affinity-filter",
        "topology-affinity-scorer",
        "topology-extractor",
        "utilization-filter",
    }
)


def check_plugin_stability(plugins: Iterable[tuple[str, str]], allow_experimental: bool) -> None:
    """``plugins`` as (name, type) pairs; raises ``ConfigError`` for an Alpha type."""
    if allow_experimental:
        return
    for name, type_name in plugins:
        if type_name in ALPHA_PLUGIN_TYPES:
            raise ConfigError(
                f"plugin '{name}' (type '{type_name}') has Alpha stability level; start the "
                "EPP with --allow-experimental-plugins to use it"
            )
