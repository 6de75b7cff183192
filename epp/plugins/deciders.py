"""Deciders: yes/no questions a profile handler asks before running an optional stage."""

from __future__ import annotations

from pydantic import Field

from epp.datastore import Endpoint
from epp.plugins.base import Decider, PluginParams
from epp.plugins.prefix_producer import PREFIX_MATCH
from epp.plugins.registry import register
from epp.scheduling.cycle import CycleState

__all__ = ["AlwaysDisaggMultimodalDecider", "AlwaysDisaggPdDecider", "PrefixBasedPdDecider"]


@register
class PrefixBasedPdDecider(Decider):
    """Disaggregate when the prompt has at least ``promptTokens`` tokens and at least
    ``nonCachedTokens`` of them are not cached on the chosen decode endpoint.

    Each threshold set to 0 disables its check. Cached tokens come from the approximate
    prefix index (the producer the configuration adds when none is declared).
    """

    type_name = "prefix-based-pd-decider"
    needs_prefix_producer = True

    class Params(PluginParams):
        non_cached_tokens: int = Field(default=0, ge=0)
        prompt_tokens: int = Field(default=0, ge=0)

    params: Params

    def approve(self, cycle: CycleState, decode: Endpoint | None) -> bool:
        tokens = cycle.request.token_estimate
        if tokens < self.params.prompt_tokens:
            return False
        cached = 0
        match = cycle.get(PREFIX_MATCH)
        if match is not None and decode is not None:
            cached = match.cached_tokens(decode)
        return tokens - cached >= self.params.non_cached_tokens


@register
class AlwaysDisaggPdDecider(Decider):
    type_name = "always-disagg-pd-decider"

    def approve(self, cycle: CycleState, decode: Endpoint | None) -> bool:
        return True


@register
class AlwaysDisaggMultimodalDecider(Decider):
    """Run the encode stage whenever the request carries multimodal items."""

    type_name = "always-disagg-multimodal-decider"

    def approve(self, cycle: CycleState, decode: Endpoint | None) -> bool:
        return bool(cycle.request.multimodal)
