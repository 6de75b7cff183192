"""``data-parallel-profile-handler``: one profile; the pick's rank travels in a header.

A pod running several data-parallel ranks serves each on its own port, but is reached
through one primary port (its sidecar), which forwards to the rank named by
``x-data-parallel-host-port``. The handler runs the single profile, puts the picked
endpoint's ``host:port`` in that header and sends the request to the same host on
``primaryPort``. The in-flight bookkeeping stays with the picked rank.
"""

from __future__ import annotations

from collections.abc import Mapping

from pydantic import Field

from common.routing_headers import DATA_PARALLEL_HOST_PORT as DATA_PARALLEL_HEADER
from epp.datastore import format_host_port
from epp.plugins.base import PluginParams
from epp.plugins.profile_handlers import SingleProfileHandler
from epp.plugins.registry import register
from epp.scheduling.cycle import REQUEST_HEADERS, CycleState
from epp.scheduling.result import ProfileResult, SchedulingResult

__all__ = ["DATA_PARALLEL_HEADER", "DataParallelProfileHandler"]


@register
class DataParallelProfileHandler(SingleProfileHandler):
    """Exactly one scheduling profile; routes to ``primaryPort`` of the picked pod."""

    type_name = "data-parallel-profile-handler"

    class Params(PluginParams):
        primary_port: int = Field(default=8000, ge=1, le=65535)

    params: Params

    def process_results(
        self, cycle: CycleState, results: Mapping[str, ProfileResult | None]
    ) -> SchedulingResult:
        result = super().process_results(cycle, results)
        target = results[result.primary].targets[0]  # type: ignore[union-attr]
        headers = cycle.get(REQUEST_HEADERS)
        if headers is None:
            headers = {}
            cycle.put(REQUEST_HEADERS, headers)
        headers[DATA_PARALLEL_HEADER] = format_host_port(target.address, target.port)
        result.destination_port = self.params.primary_port
        return result
