"""The scheduling framework: cycle state, profiles and the profile handler loop."""

from __future__ import annotations

from epp.scheduling.cycle import CycleState, StateKey
from epp.scheduling.profile import Profile, WeightedScorer
from epp.scheduling.result import ProfileResult, SchedulingResult
from epp.scheduling.scheduler import Scheduler

__all__ = [
    "CycleState",
    "Profile",
    "ProfileResult",
    "Scheduler",
    "SchedulingResult",
    "StateKey",
    "WeightedScorer",
]
