"""The cyclic garbage collector's share of a long-running server's CPU.

A server builds most of its objects once, at start-up (modules, settings, plugins,
pools), and then allocates short-lived ones per request. Left as it is, the collector
keeps re-scanning the start-up heap: with CPython's defaults a full collection comes
every few thousand requests and walks every object alive, and young collections run
every 700 allocations, a few times per request. :func:`settle` moves what start-up built
out of the collector's reach (``gc.freeze``) and lets the young generation grow before
it is collected. Reference counting still frees nearly everything a request allocates;
garbage in cycles waits longer, bounded by the thresholds. The price: a start-up object
that later becomes part of an unreachable cycle (say, an endpoint discovered at start-up
and removed since, if its objects referred to each other) is never collected, a one-time
amount bounded by what start-up built.
"""

from __future__ import annotations

import gc

__all__ = ["YOUNG_THRESHOLD", "settle"]

# Allocations (net of deallocations) between young collections; CPython's default is
# 700. At this size a young collection still takes well under a millisecond.
YOUNG_THRESHOLD = 20_000


def settle(young_threshold: int = YOUNG_THRESHOLD) -> None:
    """Call once start-up is done: collect, freeze the survivors, raise the young
    generation's threshold (never lowers one already set higher)."""
    gc.collect()
    gc.freeze()
    young, middle, old = gc.get_threshold()
    gc.set_threshold(max(young, young_threshold), middle, old)
