"""Test-only plugins for the Gateway API Inference Extension conformance cases.

They let a test drive the EPP's pick from the request and read back what the gateway
did with it; a production configuration has no use for either.

``header-based-testing-filter`` keeps only the endpoints named in the request header
``test-epp-endpoint-selection``: a comma list whose items are ``IP`` (every endpoint on
that address, whatever its port: all data-parallel ranks of a pod) or ``IP:port`` (that
endpoint alone); IPv6 with or without brackets. Items keep the header's order and an
endpoint named twice is kept once. No header, or no item naming a known endpoint, leaves
no candidate (the EPP answers 503).

``destination-endpoint-served-verifier`` copies the endpoint the gateway reports as
having served the request (``envoy.lb`` metadata key
``x-gateway-destination-endpoint-served`` on the response) into the response header
``x-conformance-test-served-endpoint``. When the report is missing the header says
``fail: missing envoy lb metadata`` (no ``envoy.lb`` metadata at all) or ``fail: missing
destination endpoint served metadata`` (the namespace without the key).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from epp.datastore import Endpoint, split_address
from epp.extproc.headers import DESTINATION_SERVED
from epp.plugins.base import Filter, ResponseHeaderProcessor
from epp.plugins.registry import register
from epp.scheduling.cycle import CycleState

__all__ = [
    "SELECTION_HEADER",
    "SERVED_ENDPOINT_HEADER",
    "DestinationEndpointServedVerifier",
    "HeaderBasedTestingFilter",
    "select_endpoints",
]

SELECTION_HEADER = "test-epp-endpoint-selection"
SERVED_ENDPOINT_HEADER = "x-conformance-test-served-endpoint"


def select_endpoints(header: str, endpoints: Sequence[Endpoint]) -> list[Endpoint]:
    """The endpoints a ``test-epp-endpoint-selection`` value names, in its order."""
    chosen: list[Endpoint] = []
    seen: set[str] = set()
    for raw in header.split(","):
        item = raw.strip()
        if not item:
            continue
        host, port = split_address(item)
        for ep in endpoints:
            if ep.host == host and (port is None or ep.port == port) and ep.key not in seen:
                seen.add(ep.key)
                chosen.append(ep)
    return chosen


@register
class HeaderBasedTestingFilter(Filter):
    """Test only: the candidates are the endpoints the request's header names."""

    type_name = "header-based-testing-filter"

    def filter(self, cycle: CycleState, endpoints: Sequence[Endpoint]) -> Sequence[Endpoint]:
        return select_endpoints(cycle.request.headers.get(SELECTION_HEADER, ""), endpoints)


def served_report(lb_metadata: Mapping[str, Any] | None) -> str:
    """What ``x-conformance-test-served-endpoint`` says for the gateway's report."""
    if lb_metadata is None:
        return "fail: missing envoy lb metadata"
    served = lb_metadata.get(DESTINATION_SERVED)
    if isinstance(served, list) and served and all(isinstance(s, str) for s in served):
        return ",".join(served)
    if not isinstance(served, str) or not served:
        return "fail: missing destination endpoint served metadata"
    return served


@register
class DestinationEndpointServedVerifier(ResponseHeaderProcessor):
    """Test only: echo the gateway's served-endpoint report in a response header."""

    type_name = "destination-endpoint-served-verifier"

    def response_headers(
        self, cycle: CycleState, lb_metadata: Mapping[str, Any] | None
    ) -> Mapping[str, str]:
        return {SERVED_ENDPOINT_HEADER: served_report(lb_metadata)}
