"""Results of profile runs and of a whole scheduling cycle."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from epp.datastore import Endpoint

if TYPE_CHECKING:
    from epp.plugins.base import ScoredEndpoint

__all__ = ["ProfileResult", "SchedulingResult"]


@dataclass(slots=True)
class ProfileResult:
    """The endpoints one profile chose, best first (never empty)."""

    targets: list[Endpoint]
    # Every candidate the picker saw, with its weighted score.
    scored: Sequence[ScoredEndpoint] = field(default_factory=tuple)


@dataclass(slots=True)
class SchedulingResult:
    """Per-profile results; which profile serves the request and which provided the
    optional prefill and encode stages (None when the stage does not run)."""

    results: Mapping[str, ProfileResult | None]
    primary: str
    prefill_profile: str | None = None
    encode_profile: str | None = None
    # Send the request to the primary pick's host on this port instead of its own (the
    # data-parallel handler: one port fronts all of a pod's ranks).
    destination_port: int | None = None

    def targets(self, profile: str | None) -> list[Endpoint]:
        if profile is None:
            return []
        result = self.results.get(profile)
        return result.targets if result is not None else []

    def served_by(self, endpoint: Endpoint) -> SchedulingResult:
        """This result as if ``endpoint`` had been the only pick of the primary profile,
        with no prefill or encode stage: what a tracker charges to the endpoint that
        really served the request."""
        return SchedulingResult(
            results={self.primary: ProfileResult([endpoint])}, primary=self.primary
        )
