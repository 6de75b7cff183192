"""Older llm-d plugin types still found in deployed configs, mapped onto ours.

- ``pd-profile-handler`` (``threshold``, ``hashBlockSize``, ``prefillProfile``,
  ``decodeProfile``): the disagg handler with a prefix-based decider whose
  ``nonCachedTokens`` is ``threshold`` (0 = always disaggregate).
- ``prefill-header-handler``: the older name of ``disagg-headers-handler`` (see
  ``epp.plugins.deprecated_aliases``).
"""

from __future__ import annotations

from pydantic import Field

from epp.plugins.base import PluginParams, PluginSet
from epp.plugins.deciders import AlwaysDisaggPdDecider, PrefixBasedPdDecider
from epp.plugins.deprecated_aliases import DisaggHeadersHandler
from epp.plugins.profile_handlers import DisaggProfileHandler
from epp.plugins.registry import register

__all__ = ["PdProfileHandler", "PrefillHeaderHandler"]


@register
class PdProfileHandler(DisaggProfileHandler):
    type_name = "pd-profile-handler"
    needs_prefix_producer = True

    class Params(PluginParams):
        threshold: int = Field(default=0, ge=0)
        hash_block_size: int = Field(default=64, gt=0)
        prefill_profile: str = "prefill"
        decode_profile: str = "decode"
        primary_port: int | None = None

    def __init__(self, params: PluginParams | None = None, name: str | None = None) -> None:
        legacy = params if isinstance(params, PdProfileHandler.Params) else self.Params()
        translated = DisaggProfileHandler.Params.model_validate(
            {"profiles": {"decode": legacy.decode_profile, "prefill": legacy.prefill_profile}}
        )
        super().__init__(translated, name)
        self.legacy = legacy
        self.prefill_decider = (
            PrefixBasedPdDecider(PrefixBasedPdDecider.Params(non_cached_tokens=legacy.threshold))
            if legacy.threshold > 0
            else AlwaysDisaggPdDecider()
        )

    def bind(self, plugins: PluginSet) -> None:
        return None


@register
class PrefillHeaderHandler(DisaggHeadersHandler):
    type_name = "prefill-header-handler"
