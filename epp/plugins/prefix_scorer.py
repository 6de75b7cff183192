"""prefix-cache-scorer: how much of the prompt's prefix an endpoint already holds.

score = w * min(1, matchedTokens / matchLengthScaleTokens)^2 + (1 - w) * matched/total
blocks, with w = ``matchLengthWeight`` (0 by default: the plain ratio) and
matchedTokens = matched blocks x tokens per block. No match data, or a prompt of zero
blocks, scores 0.

``prefixMatchInfoProducerName`` names the producer whose match is read (an
``approx-prefix-cache-producer``, ``precise-prefix-cache-producer`` or
``burst-prefix-cache-producer``); without it the scorer reads the approximate (or
precise) producer's match, and the configuration adds an approximate producer built
from this scorer's own prefix parameters when none is declared (as llm-d's older
prefix scorer was configured).
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import Field

from epp.datastore import Endpoint
from epp.plugins.base import PluginSet, Scorer
from epp.plugins.prefix_producer import (
    PrefixMatch,
    PrefixParams,
    check_match_producer,
    match_source,
)
from epp.plugins.registry import register
from epp.scheduling.cycle import CycleState, StateKey

__all__ = ["PrefixCacheScorer", "PrefixScorerParams", "prefix_scores"]


class PrefixScorerParams(PrefixParams):
    match_length_weight: float = Field(default=0.0, ge=0.0, le=1.0)
    match_length_scale_tokens: int = Field(default=8192, gt=0)
    prefix_match_info_producer_name: str = ""


def prefix_scores(
    match: PrefixMatch | None,
    endpoints: Sequence[Endpoint],
    weight: float = 0.0,
    scale_tokens: int = 8192,
) -> list[float]:
    """The scores of ``endpoints`` for one match (pure)."""
    if match is None or not match.total_blocks or not match.matched:
        return [0.0] * len(endpoints)
    total = match.total_blocks
    out = []
    for ep in endpoints:
        blocks = match.matched.get(ep.key, 0)
        ratio = blocks / total
        if weight:
            length = min(1.0, blocks * match.block_tokens / scale_tokens) ** 2
            out.append(weight * length + (1.0 - weight) * ratio)
        else:
            out.append(ratio)
    return out


@register
class PrefixCacheScorer(Scorer):
    type_name = "prefix-cache-scorer"
    Params = PrefixScorerParams
    params: PrefixScorerParams

    def __init__(self, params: PrefixScorerParams | None = None, name: str | None = None) -> None:
        super().__init__(params, name)
        producer = self.params.prefix_match_info_producer_name
        self._key: StateKey[PrefixMatch] = match_source(producer)

    @property
    def needs_prefix_producer(self) -> bool:
        return not self.params.prefix_match_info_producer_name

    def bind(self, plugins: PluginSet) -> None:
        check_match_producer(self.params.prefix_match_info_producer_name, plugins)

    def score(self, cycle: CycleState, endpoints: Sequence[Endpoint]) -> Sequence[float]:
        p = self.params
        return prefix_scores(
            cycle.get(self._key), endpoints, p.match_length_weight, p.match_length_scale_tokens
        )
