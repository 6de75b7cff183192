"""Header names the EPP owns and the translation of Envoy header maps."""

from __future__ import annotations

from typing import TYPE_CHECKING

from common.routing_headers import DESTINATION_ENDPOINT as DESTINATION
from common.routing_headers import ENCODER_HOSTS_PORTS as ENCODERS
from common.routing_headers import PREFILLER_HOST_PORT as PREFILLER
from common.routing_headers import ROUTING_HEADERS

if TYPE_CHECKING:
    from epp._proto.disagg_extproc_pb2 import HeaderMap

__all__ = [
    "DESTINATION",
    "DESTINATION_SCORES",
    "DESTINATION_SERVED",
    "DROPPED_REASON",
    "ENCODERS",
    "GATEWAY_HEADERS",
    "LB_METADATA_NAMESPACE",
    "PREFILLER",
    "ROUTING_HEADERS",
    "SUBSET_HINT_KEY",
    "SUBSET_HINT_NAMESPACE",
    "header_dict",
]

# envoy.lb metadata key of the endpoint scores (--emit-endpoint-scores).
DESTINATION_SCORES = "x-gateway-destination-endpoint-scores"
DROPPED_REASON = "x-llm-d-request-dropped-reason"

# The routing headers (DESTINATION, PREFILLER, ENCODERS and the rest of ROUTING_HEADERS)
# are the contract with the pd-sidecar, in common.routing_headers. A client must never
# choose any of them, so all client copies are dropped before the EPP writes its own.

LB_METADATA_NAMESPACE = "envoy.lb"
SUBSET_HINT_NAMESPACE = "envoy.lb.subset_hint"
SUBSET_HINT_KEY = "x-gateway-destination-endpoint-subset"
# The gateway reports the endpoint that really served a request under this key of the
# ``envoy.lb`` metadata it sends with the response.
DESTINATION_SERVED = "x-gateway-destination-endpoint-served"

# Names of the gateway protocol's own messages (reports, hints, refusal reasons). They
# travel as metadata or come from the EPP; a client's copy would only mislead the pod
# or anything between, so it is removed from every routed request.
GATEWAY_HEADERS: tuple[str, ...] = (DESTINATION_SERVED, SUBSET_HINT_KEY, DROPPED_REASON)


def header_dict(header_map: HeaderMap) -> dict[str, str]:
    """Lower-cased names to values; repeated headers are joined with ``,`` as HTTP allows."""
    out: dict[str, str] = {}
    for header in header_map.headers:
        # Current Envoy versions put every value in raw_value and leave value empty.
        value = header.raw_value.decode("utf-8", "replace") if header.raw_value else header.value
        name = header.key.lower()
        previous = out.get(name)
        out[name] = value if previous is None else f"{previous},{value}"
    return out
