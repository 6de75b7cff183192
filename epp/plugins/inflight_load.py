"""inflight-load-producer: the requests and prompt tokens this EPP has in flight on each
endpoint, for ``token-load-scorer`` and ``utilization-filter`` (``active-requests``).

When a request is routed, each stage's endpoint (decode, and prefill or encode when
they run) gains one request and the request's tokens: the prompt tokens the endpoint
does not already hold (the prefix match, when a prefix producer runs, discounts the
cached blocks) plus, with ``addEstimatedOutputTokens``, an output estimate:
``round(prompt tokens x outputRatio)`` (default 1.5), capped by the client's own
``max_tokens``/``max_completion_tokens``/``max_output_tokens`` and by
``maxEstimatedOutputTokens``. When the response starts, the prefill endpoint's share
is released, and without the output estimate so are the other endpoints' tokens (the
prompt is processed); when the request ends everything is released. A removed
endpoint's counters are dropped.

Prompt tokens are the request's token estimate. Consumers name this producer with
``inFlightLoadProducerName``; unnamed, they use the one named
``inflight-load-producer``, created with defaults when the configuration has none.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from pydantic import Field

from epp.datastore import Endpoint
from epp.plugins.base import PluginParams, PluginSet, Release, RequestTracker
from epp.plugins.prefix_producer import PREFIX_MATCH
from epp.plugins.registry import register
from epp.scheduling.cycle import CycleState
from epp.scheduling.result import SchedulingResult

__all__ = ["InFlightLoadProducer", "bind_inflight_producer"]

_CLIENT_LIMITS = ("max_tokens", "max_completion_tokens", "max_output_tokens")


@dataclass(slots=True)
class _Share:
    """What one request added on one endpoint (zeroed as it is released)."""

    key: str
    requests: int
    tokens: int
    early: bool  # released when the response starts (the prefill stage)


@dataclass(slots=True)
class _Counters:
    requests: dict[str, int] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)

    def add(self, key: str, requests: int, tokens: int) -> None:
        self.requests[key] = self.requests.get(key, 0) + requests
        self.tokens[key] = self.tokens.get(key, 0) + tokens

    def sub(self, key: str, requests: int, tokens: int) -> None:
        for counts, n in ((self.requests, requests), (self.tokens, tokens)):
            left = counts.get(key, 0) - n
            if left > 0:
                counts[key] = left
            else:
                counts.pop(key, None)

    def drop(self, key: str) -> None:
        self.requests.pop(key, None)
        self.tokens.pop(key, None)


def _client_limit(body: Mapping[str, object]) -> int | None:
    for name in _CLIENT_LIMITS:
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    return None


@register
class InFlightLoadProducer(RequestTracker):
    type_name = "inflight-load-producer"

    class Params(PluginParams):
        add_estimated_output_tokens: bool = False
        output_ratio: float = Field(default=1.5, ge=0)
        max_estimated_output_tokens: int | None = Field(default=None, ge=0)

    params: Params

    def __init__(self, params: Params | None = None, name: str | None = None) -> None:
        super().__init__(params, name)
        self._counters = _Counters()

    def requests(self, endpoint: Endpoint) -> int:
        return self._counters.requests.get(endpoint.key, 0)

    def tokens(self, endpoint: Endpoint) -> int:
        return self._counters.tokens.get(endpoint.key, 0)

    def request_tokens(self, cycle: CycleState, endpoint: Endpoint) -> int:
        """The tokens this request would add on ``endpoint``."""
        prompt = max(0, cycle.request.token_estimate)
        tokens = prompt
        match = cycle.get(PREFIX_MATCH)
        if match is not None:
            tokens = max(0, prompt - match.cached_tokens(endpoint))
        if self.params.add_estimated_output_tokens and prompt > 0:
            estimate = round(prompt * self.params.output_ratio)
            for cap in (_client_limit(cycle.request.body), self.params.max_estimated_output_tokens):
                if cap is not None:
                    estimate = min(estimate, cap)
            tokens += estimate
        return tokens

    def track(self, cycle: CycleState, result: SchedulingResult) -> tuple[Release, Release]:
        shares: list[_Share] = []
        stages = (
            (result.primary, False),
            (result.prefill_profile, True),
            (result.encode_profile, False),
        )
        for profile, is_prefill in stages:
            targets = result.targets(profile)
            if not targets:
                continue
            ep = targets[0]
            share = _Share(ep.key, 1, self.request_tokens(cycle, ep), is_prefill)
            self._counters.add(share.key, share.requests, share.tokens)
            shares.append(share)
        keep_output = self.params.add_estimated_output_tokens

        def release_early() -> None:
            for share in shares:
                if share.early:
                    self._release(share, requests=True)
                elif not keep_output:
                    self._release(share, requests=False)

        def release_all() -> None:
            for share in shares:
                self._release(share, requests=True)

        return release_early, release_all

    def _release(self, share: _Share, *, requests: bool) -> None:
        n = share.requests if requests else 0
        self._counters.sub(share.key, n, share.tokens)
        share.tokens = 0
        if requests:
            share.requests = 0

    def endpoints_changed(self, added: Sequence[Endpoint], removed: Sequence[Endpoint]) -> None:
        for ep in removed:
            self._counters.drop(ep.key)


def bind_inflight_producer(plugins: PluginSet, name: str, owner: str) -> InFlightLoadProducer:
    """The producer ``owner`` reads: the one named ``name``, else the default (created
    when absent). ``ValueError`` when ``name`` names no such producer."""
    if name:
        found = plugins.get(name)
        if not isinstance(found, InFlightLoadProducer):
            raise ValueError(
                f"inFlightLoadProducerName: '{name}' is not an inflight-load-producer ({owner})"
            )
        return found
    default = plugins.get(InFlightLoadProducer.type_name)
    if isinstance(default, InFlightLoadProducer):
        return default
    if default is not None:
        raise ValueError(
            f"the plugin named '{InFlightLoadProducer.type_name}' is not an "
            f"inflight-load-producer ({owner})"
        )
    created = InFlightLoadProducer()
    plugins.add(created)
    return created
