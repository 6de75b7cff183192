"""``GET /metrics``: the Prometheus series the EPP and dashboards read.

vLLM's names (``vllm:*``) by default; in SGLang mode SGLang's own (``sglang:*``, with
its scheduler labels), as a real SGLang server exports them instead of vLLM's.
"""

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
        if self._engine.config.metrics_engine == "sglang":
            yield from _sglang_families(self._engine)
            return
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


# SGLang's engine_type label, from its --disaggregation-mode.
_SGLANG_ENGINE_TYPE = {"null": "unified", "prefill": "prefill", "decode": "decode"}


def _sglang_families(e: SimEngine) -> Iterator[Metric]:
    """SGLang's scheduler gauges (labelled as one TP/PP rank's scheduler) and its
    tokenizer counters."""
    cfg = e.config
    labels = ["model_name", "engine_type", "tp_rank", "pp_rank", "moe_ep_rank"]
    values = [cfg.served_model_name, _SGLANG_ENGINE_TYPE[cfg.disaggregation_mode], "0", "0", "0"]
    capacity = cfg.num_blocks * cfg.block_size
    usage = e.cache.usage

    def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
        g = GaugeMetricFamily(name, doc, labels=labels)
        g.add_metric(values, value)
        return g

    def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
        c = CounterMetricFamily(name, doc, labels=["model_name"])
        c.add_metric([cfg.served_model_name], value)
        return c

    yield gauge("sglang:num_running_reqs", "The number of running requests.", e.running)
    yield gauge("sglang:num_queue_reqs", "The number of requests in the waiting queue.", e.waiting)
    yield gauge("sglang:token_usage", "The token usage.", usage)
    yield gauge("sglang:num_used_tokens", "The number of used tokens.", round(usage * capacity))
    yield gauge(
        "sglang:max_total_num_tokens",
        "Maximum total number of tokens in the KV cache pool.",
        capacity,
    )
    queries = e.cache.queries_tokens
    yield gauge(
        "sglang:cache_hit_rate",
        "The prefix cache hit rate.",
        e.cache.hits_tokens / queries if queries else 0.0,
    )
    info = GaugeMetricFamily(
        "sglang:cache_config_info",
        "Information of the KV cache configuration.",
        labels=["page_size", "num_pages"],
    )
    info.add_metric([str(cfg.block_size), str(cfg.num_blocks)], 1.0)
    yield info
    yield counter(
        "sglang:prompt_tokens", "Number of prefill tokens processed.", e.prompt_tokens_total
    )
    yield counter(
        "sglang:generation_tokens", "Number of generation tokens processed.", e.generation_tokens
    )
    yield counter("sglang:cached_tokens", "Number of cached prompt tokens.", e.cache.hits_tokens)
    yield counter("sglang:num_requests", "Number of requests processed.", sum(e.finished.values()))
    failed = CounterMetricFamily(
        "sglang:num_transfer_failed_reqs", "The number of transfer failed requests.", labels=labels
    )
    failed.add_metric(values, e.nixl_failed_transfers)
    yield failed


def engine_registry(engine: SimEngine) -> CollectorRegistry:
    """A registry whose scrape reads the engine's live state."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_EngineCollector(engine))
    return registry
