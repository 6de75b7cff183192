"""Per-stream state: one ``RequestContext`` lives exactly as long as one HTTP request."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from google.protobuf import json_format

from epp.extproc.headers import (
    DESTINATION_SERVED,
    LB_METADATA_NAMESPACE,
    SUBSET_HINT_KEY,
    SUBSET_HINT_NAMESPACE,
)

if TYPE_CHECKING:
    from google.protobuf.struct_pb2 import Value

    from epp._proto.disagg_extproc_pb2 import ProcessingRequest
    from epp.decision import Decision, DecisionMaker
    from epp.extproc.config import BodyMode, ExtProcConfig
    from epp.metrics import EppMetrics
    from epp.request_telemetry import RequestTelemetry

__all__ = ["RequestContext", "StreamEnv", "lb_metadata", "served_endpoint"]

log = logging.getLogger("epp.extproc")


@dataclass(frozen=True, slots=True)
class StreamEnv:
    """What every stream shares: the scheduler, the metrics and the tunables."""

    decision_maker: DecisionMaker
    metrics: EppMetrics
    config: ExtProcConfig
    telemetry: RequestTelemetry


@dataclass(slots=True)
class RequestContext:
    env: StreamEnv
    request_body_mode: BodyMode
    response_body_mode: BodyMode
    request_id: str = "-"
    headers_seen: bool = False
    path: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    body: bytearray = field(default_factory=bytearray)
    # None: no hint from the gateway; a list (maybe empty): pick only among these.
    subset: list[str] | None = None
    decision: Decision | None = None
    # The model the request names, once parsed (for the metrics).
    model: str = ""
    # Set once an immediate response was sent: the gateway ends the stream after it.
    ended: bool = False
    # Set once the gateway sent the end of the response (the stream is complete).
    response_ended: bool = False
    # Set once the gateway's report of the serving endpoint was taken (or found absent).
    served_checked: bool = False

    @classmethod
    def new(cls, env: StreamEnv) -> RequestContext:
        return cls(
            env=env,
            request_body_mode=env.config.default_request_body_mode,
            response_body_mode=env.config.default_response_body_mode,
        )

    def observe(self, request: ProcessingRequest) -> None:
        """Take what any message may carry: body modes and the subset hint."""
        if request.HasField("protocol_config"):
            proto = request.protocol_config
            self.request_body_mode = proto.request_body_mode
            self.response_body_mode = proto.response_body_mode
        if request.HasField("metadata_context"):
            hint = request.metadata_context.filter_metadata
            if SUBSET_HINT_NAMESPACE in hint:
                fields = hint[SUBSET_HINT_NAMESPACE].fields
                if SUBSET_HINT_KEY in fields:
                    self.subset = _addresses(fields[SUBSET_HINT_KEY])

    def observe_served(self, request: ProcessingRequest) -> None:
        """Response side: hand the decision the endpoint the gateway reports as having
        served the request (``envoy.lb`` metadata), once."""
        if self.served_checked or self.decision is None:
            return
        self.served_checked = True
        served = served_endpoint(request)
        if served is None:
            return
        try:
            self.decision.on_served(served)
        except Exception:
            log.exception("request %s: charging the served endpoint failed", self.request_id)

    def finish(self) -> None:
        """The stream is over, however it ended: release the scheduler's bookkeeping."""
        if self.decision is not None:
            try:
                self.decision.on_finished()
            except Exception:
                log.exception("request %s: releasing the decision failed", self.request_id)


def served_endpoint(request: ProcessingRequest) -> str | None:
    """The ``x-gateway-destination-endpoint-served`` address in a message's metadata."""
    if not request.HasField("metadata_context"):
        return None
    namespaces = request.metadata_context.filter_metadata
    if LB_METADATA_NAMESPACE not in namespaces:
        return None
    fields = namespaces[LB_METADATA_NAMESPACE].fields
    if DESTINATION_SERVED not in fields:
        return None
    # One address by the protocol; the first if a gateway sends a list.
    addresses = _addresses(fields[DESTINATION_SERVED])
    return addresses[0] if addresses else None


def lb_metadata(request: ProcessingRequest) -> dict[str, Any] | None:
    """The ``envoy.lb`` metadata a message carries, as plain values (None: absent)."""
    if not request.HasField("metadata_context"):
        return None
    namespaces = request.metadata_context.filter_metadata
    if LB_METADATA_NAMESPACE not in namespaces:
        return None
    return json_format.MessageToDict(namespaces[LB_METADATA_NAMESPACE])


def _addresses(value: Value) -> list[str]:
    # The gateway protocol sends a list of strings; a comma list in one string is accepted
    # too, since some gateways flatten it.
    if value.WhichOneof("kind") == "list_value":
        items = [v.string_value for v in value.list_value.values]
    else:
        items = value.string_value.split(",")
    return [item.strip() for item in items if item.strip()]
