"""prefix-cache-scorer: the fraction of the prompt's blocks an endpoint already holds."""

from __future__ import annotations

from collections.abc import Sequence

from epp.datastore import Endpoint
from epp.plugins.base import Scorer
from epp.plugins.prefix_producer import PREFIX_MATCH, PrefixParams
from epp.plugins.registry import register
from epp.scheduling.cycle import CycleState

__all__ = ["PrefixCacheScorer"]


@register
class PrefixCacheScorer(Scorer):
    """matched leading blocks / prompt blocks, from ``approx-prefix-cache-producer``.

    Its parameters configure the producer that the configuration adds when none is
    declared, so llm-d configs that tune the scorer directly keep working.
    """

    type_name = "prefix-cache-scorer"
    Params = PrefixParams
    params: PrefixParams
    needs_prefix_producer = True

    def score(self, cycle: CycleState, endpoints: Sequence[Endpoint]) -> Sequence[float]:
        match = cycle.get(PREFIX_MATCH)
        if match is None or not match.hashes or not match.matched:
            return [0.0] * len(endpoints)
        total = len(match.hashes)
        matched = match.matched
        return [matched.get(ep.key, 0) / total for ep in endpoints]
