"""Multimodal embeddings cache affinity: prefer endpoints that recently encoded the
request's images, videos or audio.

``mm-embeddings-cache-producer`` takes each request's multimodal item hashes (from the
token producer's multimodal features, else from the request's own media parts; an
item repeated in one request counts once), and, per candidate, how many of them the
endpoint is likely to hold: a per-endpoint LRU of item hashes the endpoint was sent
(``EncoderCacheMatch``). After scheduling, every decode (primary) pick records the
request's items. Capacity per endpoint: ``cacheSizeInMBPerServer`` (4096 MiB; <= 0
takes the default) / 2 MiB per item; llm-d's sample config spells it
``cacheSizeInMB``, accepted as the same setting. An endpoint that leaves the pool is
forgotten at once.

``mm-embeddings-cache-scorer`` scores matched items / the request's items (0 without
match data or items). No parameters.

Metrics (llm-d's): ``llm_d_epp_encoder_cache_queries_total`` {plugin_type,
plugin_name, modality}, ``llm_d_epp_encoder_cache_hits_total`` {plugin_type,
plugin_name, pod, modality}, ``llm_d_epp_encoder_cache_hit_ratio`` {plugin_type,
plugin_name}.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram
from pydantic import AliasChoices, Field

from epp.datastore import Endpoint
from epp.plugins.base import DataProducer, PluginParams, Release, RequestTracker, Scorer
from epp.plugins.registry import register
from epp.plugins.token_producer import TOKENIZED_PROMPT
from epp.scheduling.cycle import CycleState, StateKey
from epp.scheduling.result import SchedulingResult

__all__ = [
    "ENCODER_CACHE_MATCH",
    "EncoderCacheMatch",
    "MmEmbeddingsCacheProducer",
    "MmEmbeddingsCacheScorer",
    "request_items",
]

_DEFAULT_MB = 4096
_MB_PER_ITEM = 2
_MODALITY = {"image_url": "image", "video_url": "video", "audio_url": "audio"}


@dataclass(frozen=True, slots=True)
class EncoderCacheMatch:
    # (hash, modality) of each distinct item of the request.
    items: tuple[tuple[str, str], ...]
    # endpoint key -> items it likely holds (absent = 0)
    matched: dict[str, int]

    def ratio(self, endpoint: Endpoint) -> float:
        if not self.items:
            return 0.0
        return self.matched.get(endpoint.key, 0) / len(self.items)


ENCODER_CACHE_MATCH: StateKey[EncoderCacheMatch] = StateKey("encoder-cache-match")


def request_items(cycle: CycleState) -> tuple[tuple[str, str], ...]:
    """The request's distinct multimodal items, in order of first appearance."""
    seen: dict[str, str] = {}
    tokens = cycle.get(TOKENIZED_PROMPT)
    if tokens is not None and tokens.features:
        for feature in tokens.features:
            if feature.hash:
                seen.setdefault(feature.hash, feature.modality)
    else:
        for item in cycle.request.multimodal:
            seen.setdefault(item.key, _MODALITY.get(item.kind, "audio"))
    return tuple(seen.items())


class _Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.queries = Counter(
            "llm_d_epp_encoder_cache_queries_total",
            "Multimodal item lookups against the encoder-cache affinity LRU.",
            ["plugin_type", "plugin_name", "modality"],
            registry=registry,
        )
        self.hits = Counter(
            "llm_d_epp_encoder_cache_hits_total",
            "Multimodal item lookups that matched an endpoint.",
            ["plugin_type", "plugin_name", "pod", "modality"],
            registry=registry,
        )
        self.ratio = Histogram(
            "llm_d_epp_encoder_cache_hit_ratio",
            "Matched items over the request's items, per endpoint and lookup.",
            ["plugin_type", "plugin_name"],
            buckets=(0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0),
            registry=registry,
        )


@register
class MmEmbeddingsCacheProducer(DataProducer, RequestTracker):
    type_name = "mm-embeddings-cache-producer"

    class Params(PluginParams):
        cache_size_in_mb_per_server: int = Field(
            default=_DEFAULT_MB,
            validation_alias=AliasChoices("cacheSizeInMBPerServer", "cacheSizeInMB"),
            serialization_alias="cacheSizeInMBPerServer",
        )

    params: Params

    def __init__(self, params: Params | None = None, name: str | None = None) -> None:
        super().__init__(params, name)
        mb = self.params.cache_size_in_mb_per_server
        self.capacity = max(1, (mb if mb > 0 else _DEFAULT_MB) // _MB_PER_ITEM)
        self.caches: dict[str, OrderedDict[str, None]] = {}
        self._items: StateKey[tuple[tuple[str, str], ...]] = StateKey(f"{self.name}-items")
        self.metrics: _Metrics | None = None

    def register_metrics(self, registry: CollectorRegistry) -> None:
        self.metrics = _Metrics(registry)

    def prepare(self, cycle: CycleState, endpoints: Sequence[Endpoint]) -> None:
        items = request_items(cycle)
        cycle.put(self._items, items)
        matched: dict[str, int] = {}
        for ep in endpoints:
            cache = self.caches.get(ep.key)
            if cache is None:
                continue
            count = 0
            for h, modality in items:
                if h in cache:
                    count += 1
                    if self.metrics is not None:
                        self.metrics.hits.labels(self.type_name, self.name, ep.key, modality).inc()
            if count:
                matched[ep.key] = count
        if self.metrics is not None and items:
            for _, modality in items:
                self.metrics.queries.labels(self.type_name, self.name, modality).inc()
            for ep in endpoints:
                self.metrics.ratio.labels(self.type_name, self.name).observe(
                    matched.get(ep.key, 0) / len(items)
                )
        cycle.put(ENCODER_CACHE_MATCH, EncoderCacheMatch(items, matched))

    def _record(self, key: str, items: Sequence[tuple[str, str]]) -> None:
        cache = self.caches.get(key)
        if cache is None:
            cache = self.caches[key] = OrderedDict()
        for h, _ in items:
            cache.pop(h, None)
            cache[h] = None
        while len(cache) > self.capacity:
            cache.popitem(last=False)

    def track(self, cycle: CycleState, result: SchedulingResult) -> tuple[Release, Release]:
        items = cycle.get(self._items)
        if items:
            for target in result.targets(result.primary):
                self._record(target.key, items)
        return _noop, _noop

    def endpoints_changed(self, added: Sequence[Endpoint], removed: Sequence[Endpoint]) -> None:
        for ep in removed:
            self.caches.pop(ep.key, None)


@register
class MmEmbeddingsCacheScorer(Scorer):
    type_name = "mm-embeddings-cache-scorer"

    def score(self, cycle: CycleState, endpoints: Sequence[Endpoint]) -> Sequence[float]:
        match = cycle.get(ENCODER_CACHE_MATCH)
        if match is None:
            return [0.0] * len(endpoints)
        return [match.ratio(ep) for ep in endpoints]


def _noop() -> None:
    return None
