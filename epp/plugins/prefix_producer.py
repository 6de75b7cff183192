"""approx-prefix-cache-producer: per request, which endpoints hold the prompt's prefix.

Before profiles run it hashes the prompt's tokens (from the token producer: the
estimate by default, an engine's render endpoint when configured) into blocks of
``blockSizeTokens`` and asks the index how many leading blocks each endpoint holds
(``PrefixMatch`` in the cycle state, read by the prefix-cache scorer, the no-hit LRU
scorer and the prefix-based P/D decider). After the decision it records the blocks on
the chosen decode endpoint and, for P/D, on the prefill endpoint: both end up holding
that KV.

Parameters as llm-d's: ``blockSizeTokens`` (16; below 64 it is raised to 64 when
hashing), ``maxPrefixTokensToMatch`` (131072; wins when > 0, as tokens / block size),
``maxPrefixBlocksToMatch`` (2048; used when the token cap is 0; both 0 = the whole
prompt), ``lruCapacityPerServer`` (31250), ``autoTune`` (true: an engine's reported
block size and GPU block count replace ``blockSizeTokens`` and
``lruCapacityPerServer`` when its metrics carry them). ``blockSize`` is the deprecated
name of ``blockSizeTokens``. ``hashBlockSize`` (not an llm-d parameter) keeps this
EPP's older byte-block hashing of the prompt text (full blocks only, at most
``maxPrefixBlocksToMatch`` of them, 256 unless set).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Gauge, Histogram
from pydantic import Field, model_validator

from epp.datastore import Endpoint
from epp.metrics import PerRegistry
from epp.plugins.base import DataProducer, PluginParams, PluginSet, Release, RequestTracker
from epp.plugins.prefix_index import PrefixIndex, block_hashes, token_block_hashes
from epp.plugins.registry import register
from epp.plugins.token_producer import tokenized_prompt
from epp.scheduling.cycle import CycleState, StateKey
from epp.scheduling.result import SchedulingResult

__all__ = [
    "HASH_SLICE_BLOCKS",
    "MIN_BLOCK_SIZE_TOKENS",
    "PREFIX_MATCH",
    "ApproxPrefixCacheProducer",
    "PrefixIndexerMetrics",
    "PrefixMatch",
    "PrefixParams",
    "check_match_producer",
    "match_key",
    "match_source",
    "max_blocks",
]

log = logging.getLogger(__name__)

MIN_BLOCK_SIZE_TOKENS = 64
_DEFAULT_BLOCK_SIZE_TOKENS = 16
_LEGACY_MAX_BLOCKS = 256
# ``blocks_in_slices`` hashes this many blocks between two turns of the event loop
# (about a millisecond).
HASH_SLICE_BLOCKS = 512


@dataclass(frozen=True, slots=True)
class PrefixMatch:
    hashes: list[bytes]
    # endpoint key -> leading blocks held (absent = 0)
    matched: dict[str, int]
    block_bytes: int
    prompt_bytes: int
    prompt_tokens: int
    # Which producer computed the match: "approximate", "precise" or "burst".
    source: str = "approximate"
    # Tokens per block (the prefix-cache scorer's match length); 0: unknown.
    block_tokens: int = 0
    # The prompt's blocks (up to the match cap) when ``hashes`` holds only the leading
    # ones: hashing stopped where no endpoint's run could go on. 0: all are hashed.
    blocks_total: int = 0

    def blocks(self, endpoint: Endpoint) -> int:
        return self.matched.get(endpoint.key, 0)

    @property
    def total_blocks(self) -> int:
        """The prompt's blocks, up to the match cap: what a match is a share of."""
        return self.blocks_total or len(self.hashes)

    @property
    def hit(self) -> bool:
        """Some endpoint holds at least one block of the prompt."""
        return any(self.matched.values())

    def cached_tokens(self, endpoint: Endpoint) -> int:
        """Estimated prompt tokens already cached on ``endpoint``."""
        blocks = self.matched.get(endpoint.key, 0)
        if not blocks or not self.prompt_bytes:
            return 0
        cached_bytes = blocks * self.block_bytes
        return min(self.prompt_tokens, cached_bytes * self.prompt_tokens // self.prompt_bytes)


PREFIX_MATCH: StateKey[PrefixMatch] = StateKey("prefix-match")
_MATCH_KEYS: dict[str, StateKey[PrefixMatch]] = {}


def match_key(producer: str) -> StateKey[PrefixMatch]:
    """Where the producer named ``producer`` leaves its match (``PREFIX_MATCH`` holds
    the approximate or precise producer's, the default a consumer reads)."""
    key = _MATCH_KEYS.get(producer)
    if key is None:
        key = _MATCH_KEYS[producer] = StateKey(f"prefix-match/{producer}")
    return key


def match_source(producer: str) -> StateKey[PrefixMatch]:
    """The match a consumer reads: the producer its ``prefixMatchInfoProducerName``
    names, or the default (``PREFIX_MATCH``) when it names none."""
    return match_key(producer) if producer else PREFIX_MATCH


def check_match_producer(producer: str, plugins: PluginSet) -> None:
    """A consumer's ``prefixMatchInfoProducerName`` must name a declared plugin."""
    if producer and plugins.get(producer) is None:
        raise ValueError(
            f"prefixMatchInfoProducerName: no plugin named '{producer}'"
            " (declare the producer in plugins)"
        )


class PrefixParams(PluginParams):
    """Shared by the producer and by the prefix-cache scorer (which may configure the
    producer implicitly, as llm-d's older prefix scorer did)."""

    auto_tune: bool = True
    block_size_tokens: int = Field(default=_DEFAULT_BLOCK_SIZE_TOKENS, gt=0)
    max_prefix_tokens_to_match: int = Field(default=131072, ge=0)
    max_prefix_blocks_to_match: int = Field(default=2048, ge=0)
    lru_capacity_per_server: int = Field(default=31250, gt=0)
    # Deprecated name of block_size_tokens (taken when block_size_tokens is the default).
    block_size: int | None = Field(default=None, gt=0)
    # This EPP's older setting: prompt bytes per block (byte hashing of the text).
    hash_block_size: int | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _deprecated_block_size(self) -> PrefixParams:
        if self.block_size is not None and self.block_size_tokens == _DEFAULT_BLOCK_SIZE_TOKENS:
            object.__setattr__(self, "block_size_tokens", self.block_size)
        if (
            self.hash_block_size is None
            and 0 < self.max_prefix_tokens_to_match < self.block_size_tokens
        ):
            raise ValueError(
                f"maxPrefixTokensToMatch ({self.max_prefix_tokens_to_match}) must be 0 or at "
                f"least blockSizeTokens ({self.block_size_tokens})"
            )
        return self

    @property
    def byte_blocks(self) -> bool:
        """The legacy byte hashing of the prompt text (``hashBlockSize`` set)."""
        return self.hash_block_size is not None

    @property
    def block_bytes(self) -> int:
        return self.hash_block_size if self.hash_block_size is not None else 64


_RATIO_BUCKETS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
_BYTES_BUCKETS = (0, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)
_BYTES_PER_TOKEN = 4


class PrefixIndexerMetrics(PerRegistry):
    """llm-d's prefix indexer families (``llm_d_epp_prefix_indexer_*`` by plugin, and
    the deprecated unlabelled ``inference_extension_prefix_indexer_*``); one set per
    registry, shared by every approximate producer."""

    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ["plugin_name", "plugin_type"]
        self.size = Gauge(
            "llm_d_epp_prefix_indexer_size",
            "Size of the prefix indexer.",
            labels,
            registry=registry,
        )
        self.ratio = Histogram(
            "llm_d_epp_prefix_indexer_hit_ratio",
            "Ratio of prefix length matched to total prefix length in the cache lookup.",
            labels,
            buckets=_RATIO_BUCKETS,
            registry=registry,
        )
        self.hit_bytes = Histogram(
            "llm_d_epp_prefix_indexer_hit_bytes",
            "Length of the prefix match in number of bytes in the cache lookup.",
            labels,
            buckets=_BYTES_BUCKETS,
            registry=registry,
        )
        self.legacy_size = Gauge(
            "inference_extension_prefix_indexer_size",
            "[Deprecated: Use llm_d_epp_prefix_indexer_size] Size of the prefix indexer.",
            registry=registry,
        )
        self.legacy_ratio = Histogram(
            "inference_extension_prefix_indexer_hit_ratio",
            "[Deprecated: Use llm_d_epp_prefix_indexer_hit_ratio] Ratio of prefix length "
            "matched to total prefix length in the cache lookup.",
            buckets=_RATIO_BUCKETS,
            registry=registry,
        )
        self.legacy_hit_bytes = Histogram(
            "inference_extension_prefix_indexer_hit_bytes",
            "[Deprecated: Use llm_d_epp_prefix_indexer_hit_bytes] Length of the prefix "
            "match in number of bytes in the cache lookup.",
            buckets=_BYTES_BUCKETS,
            registry=registry,
        )

    def record(self, plugin: str, plugin_type: str, match: PrefixMatch, held: int) -> None:
        """One routed request: ``held`` of its blocks were on the pick."""
        unit = match.block_tokens * _BYTES_PER_TOKEN
        total = match.total_blocks * unit
        matched = held * unit
        self.hit_bytes.labels(plugin, plugin_type).observe(matched)
        self.legacy_hit_bytes.observe(matched)
        if total:
            self.ratio.labels(plugin, plugin_type).observe(matched / total)
            self.legacy_ratio.observe(matched / total)

    def set_size(self, plugin: str, plugin_type: str, size: int) -> None:
        self.size.labels(plugin, plugin_type).set(size)
        self.legacy_size.set(size)


def max_blocks(params: PrefixParams, block_tokens: int) -> int | None:
    """The block cap for one request (None: the whole prompt)."""
    if params.max_prefix_tokens_to_match > 0:
        return params.max_prefix_tokens_to_match // block_tokens
    if params.max_prefix_blocks_to_match == 0:
        return None
    return params.max_prefix_blocks_to_match


@register
class ApproxPrefixCacheProducer(DataProducer, RequestTracker):
    type_name = "approx-prefix-cache-producer"
    Params = PrefixParams
    params: PrefixParams

    def __init__(self, params: PrefixParams | None = None, name: str | None = None) -> None:
        super().__init__(params, name)
        self.index = PrefixIndex(self.params.lru_capacity_per_server)
        self.key = match_key(self.name)
        # Per request: the decode pick and the blocks ``track`` added to it.
        self._recorded: StateKey[tuple[str, list[bytes]]] = StateKey(f"{self.name}-recorded")
        self.metrics: PrefixIndexerMetrics | None = None
        if self.params.byte_blocks:
            log.warning(
                "plugin '%s': hashBlockSize hashes %d-byte blocks of the prompt text; "
                "blockSizeTokens (token blocks) is llm-d's setting",
                self.name,
                self.params.block_bytes,
            )

    def register_metrics(self, registry: CollectorRegistry) -> None:
        self.metrics = PrefixIndexerMetrics.of(registry)

    def block_tokens(self, endpoints: Sequence[Endpoint]) -> int:
        """Tokens per block for this request: an engine's reported block size with
        autoTune, else blockSizeTokens; never below 64."""
        size = self.params.block_size_tokens
        if self.params.auto_tune:
            for ep in endpoints:
                reported = ep.metrics.block_size
                if reported:
                    size = reported
                    break
        return max(size, MIN_BLOCK_SIZE_TOKENS)

    def compute(
        self, cycle: CycleState, endpoints: Sequence[Endpoint], *, match: bool = True
    ) -> PrefixMatch:
        """The request's blocks and, with ``match``, the leading run each endpoint
        holds (without: none, and the index is not read)."""
        req = cycle.request
        p = self.params
        if p.byte_blocks:
            # The legacy mode keeps its own default cap (256 blocks of 64 bytes).
            cap = (
                p.max_prefix_blocks_to_match
                if "max_prefix_blocks_to_match" in p.model_fields_set
                else _LEGACY_MAX_BLOCKS
            ) or len(req.prompt)
            hashes = block_hashes(req.prompt, p.block_bytes, cap)
            return PrefixMatch(
                hashes=hashes,
                matched=self.index.match(hashes) if match else {},
                block_bytes=p.block_bytes,
                prompt_bytes=len(req.prompt),
                prompt_tokens=req.token_estimate,
                block_tokens=max(1, p.block_bytes // 4),
            )
        tokens = tokenized_prompt(cycle).token_ids
        size = self.block_tokens(endpoints)
        hashes = token_block_hashes(tokens, size, max_blocks(p, size), req.model)
        return self._token_match(cycle, tokens, size, hashes, match=match)

    async def blocks_in_slices(
        self, cycle: CycleState, endpoints: Sequence[Endpoint]
    ) -> PrefixMatch:
        """``compute(cycle, endpoints, match=False)``, a long prompt hashed
        ``HASH_SLICE_BLOCKS`` blocks at a time with the event loop turning between two
        slices (the same hashes; a prompt of one slice is hashed without yielding)."""
        p = self.params
        if p.byte_blocks:
            return self.compute(cycle, endpoints, match=False)
        tokens = tokenized_prompt(cycle).token_ids
        size = self.block_tokens(endpoints)
        cap = max_blocks(p, size)
        limit = len(tokens) if cap is None else min(len(tokens), cap * size)
        step = HASH_SLICE_BLOCKS * size
        hashes: list[bytes] = []
        for start in range(0, limit, step):
            if start:
                await asyncio.sleep(0)
            piece = tokens[start : min(start + step, limit)]
            parent = hashes[-1] if hashes else None
            hashes += token_block_hashes(piece, size, None, cycle.request.model, parent=parent)
        return self._token_match(cycle, tokens, size, hashes, match=False)

    def _token_match(
        self,
        cycle: CycleState,
        tokens: Sequence[int],
        size: int,
        hashes: list[bytes],
        *,
        match: bool,
    ) -> PrefixMatch:
        return PrefixMatch(
            hashes=hashes,
            matched=self.index.match(hashes) if match else {},
            block_bytes=size,
            prompt_bytes=len(tokens),
            prompt_tokens=cycle.request.token_estimate,
            block_tokens=size,
        )

    def prepare(self, cycle: CycleState, endpoints: Sequence[Endpoint]) -> None:
        match = self.compute(cycle, endpoints)
        cycle.put(PREFIX_MATCH, match)
        cycle.put(self.key, match)

    def _capacity(self, endpoint: Endpoint) -> int | None:
        if self.params.auto_tune and endpoint.metrics.num_gpu_blocks:
            return endpoint.metrics.num_gpu_blocks
        return None

    def track(self, cycle: CycleState, result: SchedulingResult) -> tuple[Release, Release]:
        match = cycle.get(self.key)
        if match is not None and match.hashes:
            for target in result.targets(result.primary)[:1]:
                if self.metrics is not None:
                    held = match.blocks(target)
                    self.metrics.record(self.name, self.type_name, match, held)
                added = self.index.record(target.key, match.hashes, self._capacity(target))
                cycle.put(self._recorded, (target.key, added))
            for target in result.targets(result.prefill_profile)[:1]:
                self.index.record(target.key, match.hashes, self._capacity(target))
            if self.metrics is not None:
                self.metrics.set_size(self.name, self.type_name, self.index.total_blocks())
        return _noop, _noop

    def reassign(
        self, cycle: CycleState, served: SchedulingResult, release_decode: Release
    ) -> Release:
        """The blocks this request added to the pick move to the endpoint that served it
        (blocks the pick already held stay: it still holds them)."""
        recorded = cycle.get(self._recorded)
        if recorded is not None:
            picked, added = recorded
            self.index.discard(picked, added)
        return super().reassign(cycle, served, release_decode)

    def endpoints_changed(self, added: Sequence[Endpoint], removed: Sequence[Endpoint]) -> None:
        for ep in removed:
            self.index.remove_endpoint(ep.key)


def _noop() -> None:
    return None
