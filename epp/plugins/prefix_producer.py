"""approx-prefix-cache-producer: per request, which endpoints hold the prompt's prefix.

Before profiles run it hashes the prompt and asks the index how many leading blocks
each endpoint holds (``PrefixMatch`` in the cycle state, read by the prefix-cache
scorer and the prefix-based P/D decider). After the decision it records the blocks on
the chosen decode endpoint and, for P/D, on the prefill endpoint: both end up holding
that KV.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from pydantic import Field

from epp.datastore import Endpoint
from epp.plugins.base import DataProducer, PluginParams, Release, RequestTracker
from epp.plugins.prefix_index import PrefixIndex, block_hashes
from epp.plugins.registry import register
from epp.scheduling.cycle import CycleState, StateKey
from epp.scheduling.result import SchedulingResult

__all__ = ["PREFIX_MATCH", "ApproxPrefixCacheProducer", "PrefixMatch", "PrefixParams"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class PrefixMatch:
    hashes: list[bytes]
    # endpoint key -> leading blocks held (absent = 0)
    matched: dict[str, int]
    block_bytes: int
    prompt_bytes: int
    prompt_tokens: int
    # Which producer computed the match: "approximate" or "precise".
    source: str = "approximate"

    def blocks(self, endpoint: Endpoint) -> int:
        return self.matched.get(endpoint.key, 0)

    def cached_tokens(self, endpoint: Endpoint) -> int:
        """Estimated prompt tokens already cached on ``endpoint``."""
        blocks = self.matched.get(endpoint.key, 0)
        if not blocks or not self.prompt_bytes:
            return 0
        cached_bytes = blocks * self.block_bytes
        return min(self.prompt_tokens, cached_bytes * self.prompt_tokens // self.prompt_bytes)


PREFIX_MATCH: StateKey[PrefixMatch] = StateKey("prefix-match")


class PrefixParams(PluginParams):
    """Shared by the producer and by the prefix-cache scorer (which may configure the
    producer implicitly, as llm-d's estimate-mode prefix scorer does)."""

    # Prompt characters (bytes) per hashed block; 64 ~ 16 tokens, vLLM's block size.
    hash_block_size: int = Field(default=64, gt=0)
    # The newer name of hash_block_size; wins when both are set.
    block_size: int | None = Field(default=None, gt=0)
    max_prefix_blocks_to_match: int = Field(default=256, gt=0)
    lru_capacity_per_server: int = Field(default=31250, gt=0)
    # Accepted for config compatibility; the configured sizes are always used.
    auto_tune: bool = False

    @property
    def block_bytes(self) -> int:
        return self.block_size if self.block_size is not None else self.hash_block_size


@register
class ApproxPrefixCacheProducer(DataProducer, RequestTracker):
    type_name = "approx-prefix-cache-producer"
    Params = PrefixParams
    params: PrefixParams

    def __init__(self, params: PrefixParams | None = None, name: str | None = None) -> None:
        super().__init__(params, name)
        self.index = PrefixIndex(self.params.lru_capacity_per_server)
        # Per request: the decode pick and the blocks ``track`` added to it.
        self._recorded: StateKey[tuple[str, list[bytes]]] = StateKey(f"{self.name}-recorded")
        if self.params.auto_tune:
            log.info(
                "%s: autoTune is not supported; using blockSize %d and lruCapacityPerServer %d",
                self.name,
                self.params.block_bytes,
                self.params.lru_capacity_per_server,
            )

    def prepare(self, cycle: CycleState, endpoints: Sequence[Endpoint]) -> None:
        req = cycle.request
        p = self.params
        hashes = block_hashes(req.prompt, p.block_bytes, p.max_prefix_blocks_to_match)
        cycle.put(
            PREFIX_MATCH,
            PrefixMatch(
                hashes=hashes,
                matched=self.index.match(hashes),
                block_bytes=p.block_bytes,
                prompt_bytes=len(req.prompt),
                prompt_tokens=req.token_estimate,
            ),
        )

    def track(self, cycle: CycleState, result: SchedulingResult) -> tuple[Release, Release]:
        match = cycle.get(PREFIX_MATCH)
        if match is not None and match.hashes:
            for target in result.targets(result.primary)[:1]:
                added = self.index.record(target.key, match.hashes)
                cycle.put(self._recorded, (target.key, added))
            for target in result.targets(result.prefill_profile)[:1]:
                self.index.record(target.key, match.hashes)
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
