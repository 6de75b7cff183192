"""The seam between the ext_proc server and the scheduler.

The server knows nothing about scheduling: it hands the parsed HTTP request to a
``DecisionMaker`` and turns the returned ``Decision`` (or ``SchedulingError``) into
ext_proc messages. The scheduler knows nothing about gRPC.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from epp.flowcontrol.eviction import EvictionItem

__all__ = [
    "DROPPED_REASONS",
    "BadRequest",
    "Decision",
    "DecisionMaker",
    "InternalError",
    "NoCapacity",
    "NoEndpoints",
    "SchedulingError",
]


class SchedulingError(Exception):
    """A request the EPP refuses; ends the HTTP request with an immediate response."""

    status: int = 500
    reason: str = "internal_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
        # The request's model, when it was parsed before the refusal (for the metrics).
        self.model = ""


class BadRequest(SchedulingError):
    status = 400
    reason = "bad_request"


class NoCapacity(SchedulingError):
    status = 429
    reason = "no_capacity"


class NoEndpoints(SchedulingError):
    status = 503
    reason = "no_endpoints"


class InternalError(SchedulingError):
    status = 500
    reason = "internal_error"


# x-llm-d-request-dropped-reason values for refusals llm-d names: an empty pool is
# "rejected-no-endpoints", filters that leave no candidate "rejected-saturated". Other
# refusals carry their own reason.
DROPPED_REASONS = {
    NoEndpoints.reason: "rejected-no-endpoints",
    NoCapacity.reason: "rejected-saturated",
}


def _noop() -> None:
    return None


def _noop_reassign(_served: str) -> None:
    return None


@dataclass
class Decision:
    """Where one request goes. Addresses are ``host:port`` (IPv6 bracketed)."""

    decode: str
    prefill: str | None = None
    encoders: list[str] = field(default_factory=list)
    # decode-only | prefill-decode | encode-decode | encode-prefill-decode
    decision_type: str = "decode-only"
    # Fallback decode endpoints, in order, for the x-gateway-destination-endpoint list.
    decode_fallbacks: list[str] = field(default_factory=list)
    # The model the request asked for.
    model: str = ""
    # More request headers to set (the trace context for the pods).
    headers: dict[str, str] = field(default_factory=dict)
    # The primary profile's endpoint scores (``--emit-endpoint-scores``), address -> score.
    scores: dict[str, float] = field(default_factory=dict)
    # Headers to add to the client's response (e.g. a session token).
    response_headers: dict[str, str] = field(default_factory=dict)
    # The body to send on instead of the client's (a model rewrite), when not None.
    body: bytes | None = None
    # The model the request is served as (after a rewrite) and its priority.
    target_model: str = ""
    priority: int = 0
    # The response's token usage (prompt, completion), when it reports one.
    on_usage: Callable[[int, int], None] = field(default=lambda _p, _c: None, repr=False)
    # In-flight bookkeeping hooks, set by the scheduler.
    release_prefill: Callable[[], None] = _noop
    release_all: Callable[[], None] = _noop
    # Runs once, when the response's first token passes the gateway; set by the scheduler.
    release_first_token: Callable[[], None] = _noop
    # Moves the decode bookkeeping to the endpoint the gateway reports as having served
    # the request (``host:port``), when that is not ``decode``; set by the scheduler.
    reassign: Callable[[str], None] = _noop_reassign
    # Headers response-header plugins add once the response headers pass the gateway,
    # given the ``envoy.lb`` metadata sent with them (None: none); set by the scheduler
    # when such plugins are configured.
    response_header_hook: Callable[[Mapping[str, Any] | None], Mapping[str, str]] | None = None
    # Called with each response body message's end_of_stream flag, for plugins that
    # watch the response (set by the scheduler when such plugins are configured).
    response_body_hook: Callable[[bool], None] | None = None
    served: str | None = field(default=None, repr=False)
    # Set when flow control may evict the request in flight: its signal fires then.
    eviction: EvictionItem | None = field(default=None, repr=False)
    _prefill_released: bool = field(default=False, repr=False)
    _first_token_seen: bool = field(default=False, repr=False)
    _released: bool = field(default=False, repr=False)

    @property
    def destinations(self) -> list[str]:
        """The decode endpoint followed by its fallbacks, in the gateway's order."""
        return [self.decode, *self.decode_fallbacks]

    def on_served(self, endpoint: str) -> None:
        """The gateway reported the endpoint that served the request. Only the first
        report counts, and none after the request ended."""
        if self.served is not None or self._released:
            return
        self.served = endpoint
        if endpoint != self.decode:
            self.reassign(endpoint)

    def on_response_started(self) -> None:
        """The decode response began: the prefill stage is over."""
        if not self._prefill_released:
            self._prefill_released = True
            self.release_prefill()

    def on_first_token(self) -> None:
        """The response's first token (its first body bytes) passed the gateway: the
        decode endpoint has computed the prompt. Idempotent."""
        if not self._first_token_seen:
            self._first_token_seen = True
            self.release_first_token()

    def on_finished(self) -> None:
        """The request ended (any way). Idempotent."""
        self.on_response_started()
        self.on_first_token()
        if not self._released:
            self._released = True
            self.release_all()


class DecisionMaker(Protocol):
    """What the ext_proc server needs from the scheduler."""

    def is_ready(self) -> bool:
        """Configuration loaded and at least one endpoint known."""
        ...

    async def decide(
        self,
        path: str,
        headers: Mapping[str, str],
        body: bytes,
        subset: Sequence[str] | None,
        *,
        headers_only: bool = False,
    ) -> Decision:
        """Pick endpoints for one request, or raise ``SchedulingError``.

        ``subset`` is Envoy's subset hint: when not None, only these ``ip:port``
        endpoints may be chosen (an empty list means none may). ``headers_only``: the
        request has no body at all (e.g. a GET).
        """
        ...
