"""``header-profile-handler``: run the one profile a request header names.

With a single profile configured, that profile always runs. With several, the header's
value (matched exactly against the profile names) picks one; a missing or blank header
runs ``defaultProfile``; a value naming no profile runs nothing and the request is
refused with 400 naming the value (llm-d can only answer 429 there).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from pydantic import Field

from epp.decision import BadRequest, NoEndpoints
from epp.plugins.base import PluginParams, ProfileHandler
from epp.plugins.registry import register
from epp.scheduling.cycle import CycleState
from epp.scheduling.profile import Profile
from epp.scheduling.result import ProfileResult, SchedulingResult

__all__ = ["HeaderProfileHandler", "profile_for"]


def profile_for(
    profiles: Sequence[str], header_value: str | None, default_profile: str
) -> str | None:
    """The profile to run, or None when the header names an unconfigured profile."""
    if len(profiles) == 1:
        return profiles[0]
    value = (header_value or "").strip()
    if not value:
        return default_profile if default_profile in profiles else None
    return value if value in profiles else None


@register
class HeaderProfileHandler(ProfileHandler):
    """Exactly one profile per request, chosen by a request header."""

    type_name = "header-profile-handler"

    class Params(PluginParams):
        header_name: str = Field(default="EPP-Profile", min_length=1)
        default_profile: str = Field(default="decode", min_length=1)

    params: Params

    def _choice(self, cycle: CycleState, profiles: Sequence[str]) -> str | None:
        value = cycle.request.headers.get(self.params.header_name.lower())
        return profile_for(profiles, value, self.params.default_profile)

    def pick_profiles(
        self,
        cycle: CycleState,
        profiles: Mapping[str, Profile],
        results: Mapping[str, ProfileResult | None],
    ) -> list[str]:
        if results:
            return []
        choice = self._choice(cycle, list(profiles))
        return [] if choice is None else [choice]

    def destination_profile(self, cycle: CycleState, profiles: Mapping[str, Profile]) -> str | None:
        return self._choice(cycle, list(profiles))

    def process_results(
        self, cycle: CycleState, results: Mapping[str, ProfileResult | None]
    ) -> SchedulingResult:
        if not results:
            value = cycle.request.headers.get(self.params.header_name.lower())
            if value and value.strip():
                raise BadRequest(
                    f"header {self.params.header_name}: '{value}' names no scheduling profile"
                )
            raise NoEndpoints(
                f"no {self.params.header_name} header and no scheduling profile "
                f"'{self.params.default_profile}' to default to"
            )
        name, result = next(iter(results.items()))
        if result is None:
            raise NoEndpoints(f"no endpoint passed the filters of profile '{name}'")
        return SchedulingResult(results=results, primary=name)
