"""``GET /metrics``: the vLLM Prometheus series the EPP and dashboards read."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from .engine import SimEngine

__all__ = ["engine_registry"]


class _EngineCollector(Collector):
    def __init__(self, engine: SimEngine) -> None:
        self._engine = engine

    def collect(self) -> Iterator[Metric]:
        e = self._engine
        cfg = e.config
        labels = ["model_name", "engine"]
        values = [cfg.served_model_name, "0"]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=labels)
            g.add_metric(values, value)
            return g

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(name, doc, labels=labels)
            c.add_metric(values, value)
            return c

        yield gauge("vllm:num_requests_running", "Requests in the running batch.", e.running)
        yield gauge("vllm:num_requests_waiting", "Requests waiting for a slot.", e.waiting)
        yield gauge("vllm:kv_cache_usage_perc", "Fraction of KV blocks in use.", e.cache.usage)
        info = GaugeMetricFamily(
            "vllm:cache_config_info",
            "Information of the KV cache configuration.",
            labels=["block_size", "num_gpu_blocks", "enable_prefix_caching", "engine"],
        )
        info.add_metric([str(cfg.block_size), str(cfg.num_blocks), "True", "0"], 1.0)
        yield info
        yield counter(
            "vllm:prefix_cache_queries",
            "Prompt tokens looked up in the prefix cache.",
            e.cache.queries_tokens,
        )
        yield counter(
            "vllm:prefix_cache_hits",
            "Prompt tokens found in the prefix cache.",
            e.cache.hits_tokens,
        )
        yield counter(
            "vllm:external_prefix_cache_queries",
            "Prompt tokens looked up in external KV (a KV connector).",
            e.external_queries_tokens,
        )
        yield counter(
            "vllm:external_prefix_cache_hits",
            "Prompt tokens loaded from external KV (a KV connector).",
            e.external_hits_tokens,
        )
        by_source = CounterMetricFamily(
            "vllm:prompt_tokens_by_source",
            "Prompt tokens by where their KV came from.",
            labels=[*labels, "source"],
        )
        for source, count in e.tokens_by_source.items():
            by_source.add_metric([*values, source], count)
        yield by_source
        yield counter(
            "vllm:nixl_num_failed_transfers",
            "KV pulls that failed.",
            e.nixl_failed_transfers,
        )
        yield counter("vllm:prompt_tokens", "Prompt tokens processed.", e.prompt_tokens_total)
        yield counter("vllm:generation_tokens", "Tokens generated.", e.generation_tokens)
        success = CounterMetricFamily(
            "vllm:request_success",
            "Finished requests by finish reason.",
            labels=[*labels, "finished_reason"],
        )
        for reason, count in sorted(e.finished.items()):
            success.add_metric([*values, reason], count)
        yield success


def engine_registry(engine: SimEngine) -> CollectorRegistry:
    """A registry whose scrape reads the engine's live state."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_EngineCollector(engine))
    return registry
