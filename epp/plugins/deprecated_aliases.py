"""Deprecated llm-d plugin types still found in deployed configs.

- ``by-label-selector``: the old name of ``label-selector-filter`` (same parameters).
- ``by-label`` (``label``, ``validValues``, ``allowsNoLabel``): keeps pods whose
  ``label`` value is one of ``validValues``, and pods without the label when
  ``allowsNoLabel``; ``validValues`` may be empty only with ``allowsNoLabel``.
- ``disagg-headers-handler`` (``prefillProfile``, ``encodeProfile``; default
  ``prefill``/``encode``): set the prefill and encoder routing headers from those
  profiles' picks. The disaggregating profile handler's decision already carries them,
  so this checks that its profile names are the handler's and adds nothing more.
  ``prefill-header-handler`` is the same plugin under an older name.
- ``tokenizer``: the old name of ``token-producer`` (same parameters).
- ``precise-prefix-cache-scorer``: a ``precise-prefix-cache-producer`` (its
  parameters) and a ``prefix-cache-scorer`` reading it, in one plugin. When the
  configuration declares a ``precise-prefix-cache-producer`` of its own, this plugin
  only scores from that producer's match and its own parameters are ignored.

Each logs once at start that it is deprecated and names the replacement.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from pydantic import Field, model_validator

from epp.datastore import Endpoint
from epp.plugins.base import Filter, Plugin, PluginParams, PluginSet, Release, Scorer
from epp.plugins.filters import LabelSelectorFilter
from epp.plugins.precise_prefix_producer import PreciseParams, PrecisePrefixCacheProducer
from epp.plugins.prefix_producer import PrefixMatch, match_key
from epp.plugins.prefix_scorer import prefix_scores
from epp.plugins.profile_handlers import DisaggProfileHandler
from epp.plugins.registry import register
from epp.plugins.token_producer import TokenProducer, TokenProducerParams
from epp.scheduling.cycle import CycleState, StateKey
from epp.scheduling.result import SchedulingResult

__all__ = [
    "ByLabelFilter",
    "ByLabelSelectorFilter",
    "DisaggHeadersHandler",
    "LegacyTokenizer",
    "PrecisePrefixCacheScorer",
]

log = logging.getLogger(__name__)


def _deprecated(plugin: Plugin, instead: str) -> None:
    log.warning(
        "plugin '%s': type '%s' is deprecated; use %s", plugin.name, plugin.type_name, instead
    )


@register
class ByLabelSelectorFilter(LabelSelectorFilter):
    type_name = "by-label-selector"

    def __init__(
        self, params: LabelSelectorFilter.Params | None = None, name: str | None = None
    ) -> None:
        super().__init__(params, name)
        _deprecated(self, "'label-selector-filter'")


@register
class ByLabelFilter(Filter):
    type_name = "by-label"

    class Params(PluginParams):
        label: str = Field(min_length=1)
        valid_values: list[str] = Field(default_factory=list)
        allows_no_label: bool = False

        @model_validator(mode="after")
        def _something_passes(self) -> ByLabelFilter.Params:
            if not self.valid_values and not self.allows_no_label:
                raise ValueError("validValues must be non-empty unless allowsNoLabel is true")
            return self

    params: Params

    def __init__(self, params: Params | None = None, name: str | None = None) -> None:
        if params is None:
            raise ValueError("by-label needs parameters.label")
        super().__init__(params, name)
        self._valid = frozenset(self.params.valid_values)
        _deprecated(
            self, "'label-selector-filter', or 'decode-filter'/'prefill-filter'/'encode-filter'"
        )

    def filter(self, cycle: CycleState, endpoints: Sequence[Endpoint]) -> Sequence[Endpoint]:
        label = self.params.label
        allows_missing = self.params.allows_no_label
        valid = self._valid
        kept = []
        for ep in endpoints:
            value = ep.labels.get(label)
            # A pod without the label has the value "" (as in llm-d).
            if (value is None and allows_missing) or (value or "") in valid:
                kept.append(ep)
        return kept


@register
class DisaggHeadersHandler(Plugin):
    type_name = "disagg-headers-handler"

    class Params(PluginParams):
        prefill_profile: str = "prefill"
        encode_profile: str = "encode"

    params: Params

    def __init__(self, params: Params | None = None, name: str | None = None) -> None:
        super().__init__(params, name)
        _deprecated(self, "'disagg-profile-handler', which sets these headers itself")

    def bind(self, plugins: PluginSet) -> None:
        for handler in plugins.of_kind(DisaggProfileHandler):
            names = handler.params.profiles
            for stage, mine, theirs in (
                ("prefillProfile", self.params.prefill_profile, names.prefill),
                ("encodeProfile", self.params.encode_profile, names.encode),
            ):
                if mine != theirs:
                    raise ValueError(
                        f"{stage}: '{mine}' differs from profile handler '{handler.name}', "
                        f"whose {stage[:-7]} profile is '{theirs}'"
                    )


@register
class LegacyTokenizer(TokenProducer):
    type_name = "tokenizer"

    def __init__(self, params: TokenProducerParams | None = None, name: str | None = None) -> None:
        super().__init__(params, name)
        _deprecated(self, "'token-producer'")


@register
class PrecisePrefixCacheScorer(PrecisePrefixCacheProducer, Scorer):
    type_name = "precise-prefix-cache-scorer"

    def __init__(self, params: PreciseParams | None = None, name: str | None = None) -> None:
        super().__init__(params, name)
        self._read: StateKey[PrefixMatch] = self.key
        # Set when another precise producer is declared: this plugin only scores.
        self.peer: PrecisePrefixCacheProducer | None = None
        _deprecated(
            self,
            "'precise-prefix-cache-producer' with a 'prefix-cache-scorer' whose "
            "prefixMatchInfoProducerName names it",
        )

    def bind(self, plugins: PluginSet) -> None:
        super().bind(plugins)
        for other in plugins.of_kind(PrecisePrefixCacheProducer):
            if other is not self and not isinstance(other, PrecisePrefixCacheScorer):
                self.peer = other
                self._read = match_key(other.name)
                log.warning(
                    "plugin '%s': scoring from '%s'; this plugin's parameters are ignored",
                    self.name,
                    other.name,
                )
                return

    def score(self, cycle: CycleState, endpoints: Sequence[Endpoint]) -> Sequence[float]:
        return prefix_scores(cycle.get(self._read), endpoints)

    async def prefetch(self, cycle: CycleState, endpoints: Sequence[Endpoint]) -> None:
        if self.peer is None:
            await super().prefetch(cycle, endpoints)

    def prepare(self, cycle: CycleState, endpoints: Sequence[Endpoint]) -> None:
        if self.peer is None:
            super().prepare(cycle, endpoints)

    def track(self, cycle: CycleState, result: SchedulingResult) -> tuple[Release, Release]:
        if self.peer is None:
            return super().track(cycle, result)
        return _noop, _noop

    def reassign(
        self, cycle: CycleState, served: SchedulingResult, release_decode: Release
    ) -> Release:
        if self.peer is None:
            return super().reassign(cycle, served, release_decode)
        return release_decode

    def endpoints_changed(self, added: Sequence[Endpoint], removed: Sequence[Endpoint]) -> None:
        if self.peer is None:
            super().endpoints_changed(added, removed)


def _noop(*_: Any) -> None:
    return None
