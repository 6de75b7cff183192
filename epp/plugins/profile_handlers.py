"""Profile handlers: single-profile and the disaggregating (E/P/D) handler."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from epp.decision import NoEndpoints
from epp.plugins.base import Decider, PluginParams, PluginSet, ProfileHandler
from epp.plugins.deciders import AlwaysDisaggMultimodalDecider, AlwaysDisaggPdDecider
from epp.plugins.registry import register
from epp.scheduling.cycle import PEER_ENDPOINT, CycleState, StateKey
from epp.scheduling.profile import Profile
from epp.scheduling.result import ProfileResult, SchedulingResult

__all__ = ["DisaggProfileHandler", "SingleProfileHandler"]


@register
class SingleProfileHandler(ProfileHandler):
    """Runs the one configured profile."""

    type_name = "single-profile-handler"

    def check_profiles(self, names: Sequence[str]) -> None:
        if len(names) != 1:
            raise ValueError(
                f"{self.type_name} needs exactly one scheduling profile, got {len(names)}"
            )

    def pick_profiles(
        self,
        cycle: CycleState,
        profiles: Mapping[str, Profile],
        results: Mapping[str, ProfileResult | None],
    ) -> list[str]:
        return [] if results else list(profiles)[:1]

    def destination_profile(self, cycle: CycleState, profiles: Mapping[str, Profile]) -> str | None:
        return next(iter(profiles), None)

    def process_results(
        self, cycle: CycleState, results: Mapping[str, ProfileResult | None]
    ) -> SchedulingResult:
        name, result = next(iter(results.items()))
        if result is None:
            raise NoEndpoints(f"no endpoint passed the filters of profile '{name}'")
        return SchedulingResult(results=results, primary=name)


class _ProfileNames(PluginParams):
    decode: str = "decode"
    prefill: str = "prefill"
    encode: str = "encode"


class _DeciderNames(PluginParams):
    # None: run the stage whenever its profile exists (prefill) / the request is
    # multimodal (encode).
    prefill: str | None = None
    encode: str | None = None


@dataclass(slots=True)
class _Considered:
    encode: bool = False
    prefill: bool = False


_CONSIDERED: StateKey[_Considered] = StateKey("disagg-considered")


@register
class DisaggProfileHandler(ProfileHandler):
    """``decode-first`` (the default): decode; then encode if its decider approves; then
    prefill if its decider approves (it sees the decode pick). ``prefill-first``: prefill
    whenever its profile exists; then encode if its decider approves; then decode, which
    sees the prefill pick (``PEER_ENDPOINT``). A stage whose profile is not configured
    never runs; a stage whose profile finds no endpoint is skipped (the decode endpoint
    does that work itself). A request that generates nothing (embeddings, a path no
    parser reads) runs the decode profile alone."""

    type_name = "disagg-profile-handler"

    class Params(PluginParams):
        profiles: _ProfileNames = _ProfileNames()
        deciders: _DeciderNames = _DeciderNames()
        stage_order: Literal["decode-first", "prefill-first"] = "decode-first"

    params: Params

    def __init__(self, params: Params | None = None, name: str | None = None) -> None:
        super().__init__(params, name)
        self.prefill_decider: Decider = AlwaysDisaggPdDecider()
        self.encode_decider: Decider = AlwaysDisaggMultimodalDecider()
        self._has_prefill = True
        self._has_encode = True

    def bind(self, plugins: PluginSet) -> None:
        if self.params.stage_order == "prefill-first" and self.params.deciders.prefill:
            raise ValueError("deciders.prefill: not supported with stageOrder prefill-first")
        for stage in ("prefill", "encode"):
            ref = getattr(self.params.deciders, stage)
            if ref is None:
                continue
            plugin = plugins.get(ref)
            if plugin is None:
                raise ValueError(f"deciders.{stage}: no plugin named '{ref}'")
            if not isinstance(plugin, Decider):
                raise ValueError(f"deciders.{stage}: plugin '{ref}' is not a decider")
            setattr(self, f"{stage}_decider", plugin)

    def destination_profile(self, cycle: CycleState, profiles: Mapping[str, Profile]) -> str | None:
        return self.params.profiles.decode

    def _prefill_first(
        self, cycle: CycleState, results: Mapping[str, ProfileResult | None]
    ) -> list[str]:
        p = self.params.profiles
        if p.decode in results:
            return []
        considered = cycle.get(_CONSIDERED)
        if considered is None:
            considered = _Considered()
            cycle.put(_CONSIDERED, considered)
        generation = cycle.request.generation
        if self._has_prefill and generation and not considered.prefill:
            considered.prefill = True
            return [p.prefill]
        if self._has_encode and generation and not considered.encode:
            considered.encode = True
            if self.encode_decider.approve(cycle, None):
                return [p.encode]
        prefill = results.get(p.prefill)
        if prefill is not None:
            cycle.put(PEER_ENDPOINT, prefill.targets[0])
        return [p.decode]

    def check_profiles(self, names: Sequence[str]) -> None:
        p = self.params.profiles
        if p.decode not in names:
            raise ValueError(f"profiles.decode: no scheduling profile named '{p.decode}'")
        self._has_prefill = p.prefill in names
        self._has_encode = p.encode in names

    def pick_profiles(
        self,
        cycle: CycleState,
        profiles: Mapping[str, Profile],
        results: Mapping[str, ProfileResult | None],
    ) -> list[str]:
        if self.params.stage_order == "prefill-first":
            return self._prefill_first(cycle, results)
        p = self.params.profiles
        if p.decode not in results:
            return [p.decode]
        decode = results[p.decode]
        if decode is None or not cycle.request.generation:
            return []
        considered = cycle.get(_CONSIDERED)
        if considered is None:
            considered = _Considered()
            cycle.put(_CONSIDERED, considered)
        target = decode.targets[0]
        if self._has_encode and not considered.encode:
            considered.encode = True
            if self.encode_decider.approve(cycle, target):
                return [p.encode]
        if self._has_prefill and not considered.prefill:
            considered.prefill = True
            if self.prefill_decider.approve(cycle, target):
                cycle.put(PEER_ENDPOINT, target)
                return [p.prefill]
        return []

    def process_results(
        self, cycle: CycleState, results: Mapping[str, ProfileResult | None]
    ) -> SchedulingResult:
        p = self.params.profiles
        decode = results.get(p.decode)
        if decode is None:
            raise NoEndpoints("no decode endpoint available")
        prefill = results.get(p.prefill)
        # A pod that can both prefill and decode gains nothing from a transfer to itself.
        use_prefill = prefill is not None and prefill.targets[0].key != decode.targets[0].key
        encode = results.get(p.encode)
        return SchedulingResult(
            results=results,
            primary=p.decode,
            prefill_profile=p.prefill if use_prefill else None,
            encode_profile=p.encode if encode is not None else None,
        )
