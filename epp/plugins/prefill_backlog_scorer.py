"""disagg-prefill-backlog-scorer (this EPP's own, not an llm-d type): the endpoint that
would compute this request's prompt soonest is best.

An endpoint's backlog is the prompt tokens this EPP sent it that it has not yet
computed, plus the tokens this request would add there: each request counts its
uncached prompt tokens (the prompt's token estimate less the prefix match's cached
tokens on that endpoint, when a prefix producer runs) from the decision until its
response's first token passes the gateway (or the request ends, or ``requestTimeout``
passes). The score is ``(least backlog + smoothingTokens) / (backlog +
smoothingTokens)``: 1 for the endpoint that would start the prompt first, half for one
with twice the work ahead of it. Unlike a min-max normalised request count it still
separates endpoints when every one of them has a queue, and it weighs a request by its
work rather than by one, so a cached prefix (less to compute) and a short queue trade
off in one unit. The charge goes where the prompt is computed: to the prefill endpoint
of a P/D request (its decode endpoint only receives the KV), otherwise to the endpoint
serving it; so in a P/D configuration the scorer ranks the prefill profile's endpoints
by their prefill work, and the decode profile's by the prompts they compute locally.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from pydantic import Field

from common.durations import PositiveSeconds
from epp.datastore import Endpoint
from epp.plugins.base import PluginParams, Release, RequestTracker, Scorer
from epp.plugins.charges import Charges
from epp.plugins.prefix_producer import PREFIX_MATCH
from epp.plugins.registry import register
from epp.scheduling.cycle import CycleState, StateKey
from epp.scheduling.result import SchedulingResult

__all__ = ["PrefillBacklogScorer", "backlog_scores"]


def backlog_scores(backlogs: Sequence[int], smoothing: float) -> list[float]:
    """``(min + smoothing) / (b + smoothing)`` for each backlog ``b``."""
    if not backlogs:
        return []
    least = min(backlogs) + smoothing
    if least <= 0:
        return [1.0 if b <= 0 else 0.0 for b in backlogs]
    return [least / (b + smoothing) for b in backlogs]


def uncached_tokens(cycle: CycleState, endpoint: Endpoint) -> int:
    """The request's prompt tokens ``endpoint`` would have to compute."""
    prompt = max(0, cycle.request.token_estimate)
    match = cycle.get(PREFIX_MATCH)
    if match is None:
        return prompt
    return max(0, prompt - match.cached_tokens(endpoint))


@register
class PrefillBacklogScorer(Scorer, RequestTracker):
    type_name = "disagg-prefill-backlog-scorer"

    class Params(PluginParams):
        smoothing_tokens: int = Field(default=256, ge=0)
        # Seconds, or a duration string like "2m".
        request_timeout: PositiveSeconds = 120.0

    params: Params

    def __init__(
        self,
        params: Params | None = None,
        name: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(params, name)
        self._charges = Charges(self.params.request_timeout, clock)
        self._key: StateKey[int] = StateKey(f"prefill-backlog/{self.name}")
        self._prefilled: StateKey[bool] = StateKey(f"prefill-backlog/{self.name}/prefilled")

    @property
    def backlog(self) -> dict[str, int]:
        """Endpoint key -> uncached prompt tokens charged there (absent: none)."""
        return self._charges.totals

    def score(self, cycle: CycleState, endpoints: Sequence[Endpoint]) -> Sequence[float]:
        self._charges.expire()
        get = self.backlog.get
        loads = [get(ep.key, 0) + uncached_tokens(cycle, ep) for ep in endpoints]
        return backlog_scores(loads, float(self.params.smoothing_tokens))

    def track(self, cycle: CycleState, result: SchedulingResult) -> tuple[Release, Release]:
        # The endpoint that computes the prompt: the prefill stage's when one runs.
        prefill = result.targets(result.prefill_profile)
        targets = prefill or result.targets(result.primary)
        if not targets:
            return _noop, _noop
        ep = targets[0]
        charges = self._charges
        cid = charges.charge([ep.key], uncached_tokens(cycle, ep))
        cycle.put(self._key, cid)
        cycle.put(self._prefilled, bool(prefill))
        return _noop, lambda: charges.release(cid)

    def reassign(
        self, cycle: CycleState, served: SchedulingResult, release_decode: Release
    ) -> Release:
        if cycle.get(self._prefilled):
            return release_decode  # the prefiller computes the prompt, wherever it decodes
        return super().reassign(cycle, served, release_decode)

    def first_token(self, cycle: CycleState) -> None:
        cid = cycle.get(self._key)
        if cid is not None:
            self._charges.release(cid)

    def outstanding(self) -> int:
        """Requests still charged (for tests and debugging)."""
        return len(self._charges)

    def endpoints_changed(self, added: Sequence[Endpoint], removed: Sequence[Endpoint]) -> None:
        self._charges.forget({ep.key for ep in removed})


def _noop() -> None:
    return None
