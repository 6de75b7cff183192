"""no-hit-lru-scorer: spread cold requests (no prefix-cache hit anywhere) over the
endpoints that served cold requests least recently.

A request is cold when no candidate holds a block of its prefix (per the prefix
producer's match; no match data at all counts as cold). Cold: endpoints never used for
a cold request score highest, then the least recently used; with n candidates the
i-th in that order scores 1 - i/(n-1) (one candidate scores 1). Warm: every endpoint
scores 0.5, leaving cache locality to the prefix scorer. After a cold request is
scheduled, its decode (primary) and prefill picks become the most recently used. The
LRU remembers ``lruSize`` endpoints (1024).

``prefixMatchInfoProducerName`` names the producer whose match is read (default: the
approximate or precise producer). ``prefixPluginType`` / ``prefixPluginName`` are
accepted and unused, as in llm-d.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from pydantic import Field

from epp.datastore import Endpoint
from epp.plugins.base import PluginParams, PluginSet, Release, RequestTracker, Scorer
from epp.plugins.prefix_producer import (
    PrefixMatch,
    check_match_producer,
    match_source,
)
from epp.plugins.registry import register
from epp.scheduling.cycle import CycleState, StateKey
from epp.scheduling.result import SchedulingResult

__all__ = ["NoHitLruScorer", "lru_scores"]

_DEFAULT_LRU_SIZE = 1024
NEUTRAL = 0.5


def lru_scores(endpoints: Sequence[Endpoint], order: Sequence[str]) -> list[float]:
    """Cold-request scores: never-used endpoints first (in candidate order), then the
    used ones oldest first (``order``: least recently used first)."""
    n = len(endpoints)
    if n == 1:
        return [1.0]
    position = {key: i for i, key in enumerate(order)}
    never = [ep for ep in endpoints if ep.key not in position]
    rank: dict[str, int] = {ep.key: i for i, ep in enumerate(never)}
    out = []
    for ep in endpoints:
        r = rank[ep.key] if ep.key in rank else len(never) + position[ep.key]
        out.append(max(0.0, 1.0 - r / (n - 1)))
    return out


@register
class NoHitLruScorer(Scorer, RequestTracker):
    type_name = "no-hit-lru-scorer"

    class Params(PluginParams):
        prefix_plugin_type: str = ""
        prefix_plugin_name: str = ""
        # Values <= 0 take the default, as in llm-d.
        lru_size: int = Field(default=_DEFAULT_LRU_SIZE)
        prefix_match_info_producer_name: str = ""

    params: Params

    def __init__(self, params: Params | None = None, name: str | None = None) -> None:
        super().__init__(params, name)
        self.size = self.params.lru_size if self.params.lru_size > 0 else _DEFAULT_LRU_SIZE
        # endpoint key -> None; least recently used first.
        self.lru: OrderedDict[str, None] = OrderedDict()
        producer = self.params.prefix_match_info_producer_name
        self._match: StateKey[PrefixMatch] = match_source(producer)
        self._cold: StateKey[bool] = StateKey(f"{self.name}-cold")

    @property
    def needs_prefix_producer(self) -> bool:
        return not self.params.prefix_match_info_producer_name

    def bind(self, plugins: PluginSet) -> None:
        check_match_producer(self.params.prefix_match_info_producer_name, plugins)

    def score(self, cycle: CycleState, endpoints: Sequence[Endpoint]) -> Sequence[float]:
        match = cycle.get(self._match)
        cold = match is None or not any(match.blocks(ep) for ep in endpoints)
        cycle.put(self._cold, cold)
        if not cold:
            return [NEUTRAL] * len(endpoints)
        return lru_scores(endpoints, list(self.lru))

    def _touch(self, key: str) -> None:
        self.lru.pop(key, None)
        self.lru[key] = None
        while len(self.lru) > self.size:
            self.lru.popitem(last=False)

    def track(self, cycle: CycleState, result: SchedulingResult) -> tuple[Release, Release]:
        if cycle.get(self._cold):
            for profile in (result.primary, result.prefill_profile):
                for target in result.targets(profile)[:1]:
                    self._touch(target.key)
        return _noop, _noop

    def reassign(
        self, cycle: CycleState, served: SchedulingResult, release_decode: Release
    ) -> Release:
        """The endpoint that served a cold request is the one whose cache grew."""
        if cycle.get(self._cold):
            for target in served.targets(served.primary)[:1]:
                self._touch(target.key)
        return release_decode

    def endpoints_changed(self, added: Sequence[Endpoint], removed: Sequence[Endpoint]) -> None:
        for ep in removed:
            self.lru.pop(ep.key, None)


def _noop() -> None:
    return None
