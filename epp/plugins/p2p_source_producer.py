"""p2p-source-producer: name a peer to pull the prompt's cached prefix from.

Reads the per-endpoint prefix match of a prefix-cache producer (the approximate or
precise one; ``prefixMatchInfoProducerName`` picks a named instance) and, once the
request is scheduled, sets ``x-kv-cache-source-host-port`` to a peer that holds more of
the prompt than the pod computing it (the prefill profile's pick under P/D, the primary
pick otherwise) by at least ``minCachedTokenDelta`` tokens. The routing sidecar turns
the header into an OffloadingConnector P2P pull (``remote_kv_source``).

The source is sampled among the endpoints within one block of the most cached blocks,
each weighted by 1 / (1 + its waiting queue), with a hash of the request id as the
sampling coordinate: replicas of a widely cached prefix share the pull traffic, a
shorter queue is mildly preferred, and one request always gets the same answer.

Parameters as llm-d's: ``prefixMatchInfoProducerName`` (""; the default producer),
``minCachedTokenDelta`` (1, at least 1), ``prefillProfileName`` ("prefill"). The
matches carry no per-tier counts here, so every cached block counts as servable.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from pydantic import Field

from common.routing_headers import KV_CACHE_SOURCE_HOST_PORT
from epp.datastore import Endpoint
from epp.plugins.base import DataProducer, PluginParams, PluginSet, Release, RequestTracker
from epp.plugins.prefix_producer import (
    PrefixMatch,
    check_match_producer,
    match_source,
)
from epp.plugins.registry import register
from epp.scheduling.cycle import REQUEST_HEADERS, CycleState, StateKey
from epp.scheduling.result import SchedulingResult

__all__ = ["P2PSourceParams", "P2PSourceProducer", "SourceCandidate", "pick_source"]

log = logging.getLogger(__name__)


class P2PSourceParams(PluginParams):
    prefix_match_info_producer_name: str = ""
    min_cached_token_delta: int = Field(default=1, ge=1)
    prefill_profile_name: str = "prefill"


@dataclass(frozen=True, slots=True)
class SourceCandidate:
    key: str  # host:port
    blocks: int
    cached_tokens: int
    waiting: float


def spread_fraction(request_id: str) -> float:
    """A request id mapped onto [0, 1) (FNV-1a, 32 bits): uniform, and stable per id."""
    h = 0x811C9DC5
    for byte in request_id.encode():
        h = ((h ^ byte) * 0x01000193) & 0xFFFFFFFF
    return h / 2**32


def pick_source(candidates: Sequence[SourceCandidate], request_id: str) -> SourceCandidate | None:
    """The source among those within one block of the most cached blocks, sampled by
    1 / (1 + waiting queue) at the request id's coordinate; None when nothing is cached."""
    held = [c for c in candidates if c.blocks > 0]
    if not held:
        return None
    most = max(c.blocks for c in held)
    band = [c for c in held if c.blocks + 1 >= most]
    weights = [1.0 / (1.0 + max(c.waiting, 0.0)) for c in band]
    target = spread_fraction(request_id) * sum(weights)
    for candidate, weight in zip(band, weights, strict=True):
        if target < weight:
            return candidate
        target -= weight
    return band[-1]


def worth_pulling(
    source: SourceCandidate, computing_key: str, computing_cached: int, min_delta: int
) -> bool:
    """Whether ``source`` out-caches the computing pod by at least ``min_delta`` tokens."""
    if source.key == computing_key:
        return False
    return source.cached_tokens - computing_cached >= min_delta


@register
class P2PSourceProducer(DataProducer, RequestTracker):
    type_name = "p2p-source-producer"
    Params = P2PSourceParams
    params: P2PSourceParams

    def __init__(self, params: P2PSourceParams | None = None, name: str | None = None) -> None:
        super().__init__(params, name)
        producer = self.params.prefix_match_info_producer_name
        self._match: StateKey[PrefixMatch] = match_source(producer)
        self._candidates: StateKey[list[SourceCandidate]] = StateKey(f"{self.name}-candidates")

    @property
    def needs_prefix_producer(self) -> bool:
        return not self.params.prefix_match_info_producer_name

    def bind(self, plugins: PluginSet) -> None:
        check_match_producer(self.params.prefix_match_info_producer_name, plugins)

    def prepare(self, cycle: CycleState, endpoints: Sequence[Endpoint]) -> None:
        # The prefix match may be produced after this producer runs: keep the
        # candidates' loads now and read the match once the request is scheduled.
        cycle.put(
            self._candidates,
            [SourceCandidate(ep.key, 0, 0, ep.metrics.waiting) for ep in endpoints],
        )

    def track(self, cycle: CycleState, result: SchedulingResult) -> tuple[Release, Release]:
        header = self.source_for(cycle, result)
        if header is not None:
            headers = cycle.get(REQUEST_HEADERS)
            if headers is None:
                headers = {}
                cycle.put(REQUEST_HEADERS, headers)
            headers[KV_CACHE_SOURCE_HOST_PORT] = header
        return _noop, _noop

    def reassign(
        self, cycle: CycleState, served: SchedulingResult, release_decode: Release
    ) -> Release:
        release_decode()  # the header went out with the request: nothing to move
        return _noop

    def source_for(self, cycle: CycleState, result: SchedulingResult) -> str | None:
        """The ``host:port`` to pull from for this scheduled request, or None."""
        match = cycle.get(self._match)
        known = cycle.get(self._candidates)
        if match is None or not known:
            return None
        candidates = [
            SourceCandidate(
                c.key, match.matched.get(c.key, 0), self._tokens(match, c.key), c.waiting
            )
            for c in known
        ]
        source = pick_source(candidates, cycle.request.request_id)
        if source is None:
            return None
        computing = result.targets(self.params.prefill_profile_name) or result.targets(
            result.primary
        )
        if not computing:
            return None
        key = computing[0].key
        if not worth_pulling(
            source, key, self._tokens(match, key), self.params.min_cached_token_delta
        ):
            return None
        log.debug(
            "request %s: KV cache source %s (%d cached tokens) for %s",
            cycle.request.request_id or "-",
            source.key,
            source.cached_tokens,
            key,
        )
        return source.key

    @staticmethod
    def _tokens(match: PrefixMatch, key: str) -> int:
        """Cached prompt tokens of the endpoint ``key``: its blocks times the block size
        (or the match's estimate when the block size is unknown)."""
        blocks = match.matched.get(key, 0)
        if match.block_tokens:
            return blocks * match.block_tokens
        if not blocks or not match.prompt_bytes:
            return 0
        return min(
            match.prompt_tokens,
            blocks * match.block_bytes * match.prompt_tokens // match.prompt_bytes,
        )


def _noop() -> None:
    return None
