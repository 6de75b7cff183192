"""header-label-affinity-scorer: prefer endpoints whose label equals a request header.

Parameters ``headerName`` and ``labelKey`` (both required). An endpoint whose
``labelKey`` label equals the request's ``headerName`` header scores 1, every other
endpoint 0 (and stays eligible); a request without the header scores 0 everywhere.
One instance per header-to-label mapping, each with its own weight.
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import Field

from epp.datastore import Endpoint
from epp.plugins.base import PluginParams, Scorer
from epp.plugins.registry import register
from epp.scheduling.cycle import CycleState

__all__ = ["HeaderLabelAffinityScorer"]


@register
class HeaderLabelAffinityScorer(Scorer):
    type_name = "header-label-affinity-scorer"

    class Params(PluginParams):
        header_name: str = Field(min_length=1)
        label_key: str = Field(min_length=1)

    params: Params

    def __init__(self, params: Params | None = None, name: str | None = None) -> None:
        if params is None:
            raise ValueError("header-label-affinity-scorer needs parameters headerName, labelKey")
        super().__init__(params, name)
        self._header = self.params.header_name.lower()

    def score(self, cycle: CycleState, endpoints: Sequence[Endpoint]) -> Sequence[float]:
        wanted = cycle.request.headers.get(self._header, "")
        if not wanted:
            return [0.0] * len(endpoints)
        key = self.params.label_key
        return [1.0 if ep.labels.get(key) == wanted else 0.0 for ep in endpoints]
