"""session-affinity-scorer: a session sticks to the decode endpoint it last used."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from pydantic import Field

from epp.datastore import Endpoint
from epp.plugins.base import PluginParams, Release, RequestTracker, Scorer
from epp.plugins.registry import register
from epp.scheduling.cycle import CycleState
from epp.scheduling.result import SchedulingResult

__all__ = ["SessionAffinityScorer"]


@register
class SessionAffinityScorer(Scorer, RequestTracker):
    """1 for the endpoint that served the session's previous request, else 0."""

    type_name = "session-affinity-scorer"

    class Params(PluginParams):
        header_name: str = "x-session-token"
        # Bounded memory: the least recently used sessions are forgotten first.
        max_sessions: int = Field(default=100_000, gt=0)

    params: Params

    def __init__(self, params: Params | None = None, name: str | None = None) -> None:
        super().__init__(params, name)
        self.sessions: OrderedDict[str, str] = OrderedDict()
        self._header = self.params.header_name.lower()

    def _session(self, cycle: CycleState) -> str | None:
        return cycle.request.headers.get(self._header) or None

    def score(self, cycle: CycleState, endpoints: Sequence[Endpoint]) -> Sequence[float]:
        session = self._session(cycle)
        previous = self.sessions.get(session) if session else None
        if previous is None:
            return [0.0] * len(endpoints)
        return [1.0 if ep.key == previous else 0.0 for ep in endpoints]

    def track(self, cycle: CycleState, result: SchedulingResult) -> tuple[Release, Release]:
        session = self._session(cycle)
        targets = result.targets(result.primary)
        if session and targets:
            self.sessions[session] = targets[0].key
            self.sessions.move_to_end(session)
            while len(self.sessions) > self.params.max_sessions:
                self.sessions.popitem(last=False)
        return _noop, _noop

    def endpoints_changed(self, added: Sequence[Endpoint], removed: Sequence[Endpoint]) -> None:
        if removed:
            gone = {ep.key for ep in removed}
            for session in [s for s, key in self.sessions.items() if key in gone]:
                del self.sessions[session]


def _noop() -> None:
    return None
