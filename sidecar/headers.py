"""Which headers cross the proxy, and the per-request trace context.

Hop-by-hop headers (RFC 9110 section 7.6.1), the names listed in ``Connection``, and all
routing headers stop here; everything else is forwarded as the client sent it.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass

from multidict import CIMultiDict, CIMultiDictProxy

from sidecar.routing import ROUTING_HEADERS

__all__ = [
    "CURRENT_SPAN_TRACEPARENT",
    "HEADER_ENCODING",
    "HEADER_ERRORS",
    "REQUEST_ID",
    "TRACEPARENT",
    "TraceContext",
    "request_headers",
    "response_headers",
]

REQUEST_ID = "x-request-id"
# How header bytes become text and back, on both sides of the proxy: UTF-8, with any
# byte that is not UTF-8 kept as a surrogate escape, so writing a field out gives the
# very bytes that came in (a field value may carry any byte above 0x7F, RFC 9110 5.5).
HEADER_ENCODING = "utf-8"
HEADER_ERRORS = "surrogateescape"
TRACEPARENT = "traceparent"

_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "host",
    }
)
# Dropped on legs whose body the sidecar rewrites: length changes and we parse replies.
_REWRITTEN_BODY = frozenset({"content-length", "accept-encoding", "content-encoding"})
# The traceparent of the exported span legs are sent under (``--tracing``), else None.
CURRENT_SPAN_TRACEPARENT: ContextVar[str | None] = ContextVar(
    "current_span_traceparent", default=None
)
_TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")


def _connection_tokens(headers: Mapping[str, str]) -> set[str]:
    value = headers.get("connection")
    if not value:
        return set()
    return {token.strip().lower() for token in value.split(",")}


_DROP_ALWAYS = _HOP_BY_HOP | ROUTING_HEADERS
_DROP_REWRITTEN = _DROP_ALWAYS | _REWRITTEN_BODY


def request_headers(
    incoming: CIMultiDictProxy[str] | CIMultiDict[str], *, body_rewritten: bool
) -> CIMultiDict[str]:
    """Headers for an upstream request, without hop-by-hop and routing headers."""
    drop = _DROP_REWRITTEN if body_rewritten else _DROP_ALWAYS
    if "connection" in incoming:
        drop = drop | _connection_tokens(incoming)
    return CIMultiDict([(k, v) for k, v in incoming.items() if k.lower() not in drop])


def response_headers(
    upstream: CIMultiDictProxy[str], *, drop: Iterable[str] = ()
) -> CIMultiDict[str]:
    """Upstream response headers fit to relay (the server sets framing headers itself)."""
    skip = _connection_tokens(upstream) | set(drop)
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in upstream.items():
        lower = name.lower()
        if lower in _HOP_BY_HOP or lower == "content-length" or lower in skip:
            continue
        out.add(name, value)
    return out


@dataclass(frozen=True, slots=True)
class TraceContext:
    """W3C trace context of one request: the client's trace, or a new one."""

    trace_id: str
    flags: str

    @classmethod
    def from_header(cls, incoming: str | None) -> TraceContext:
        if incoming:
            match = _TRACEPARENT.match(incoming.strip().lower())
            if match and match.group(1) != "ff" and set(match.group(2)) != {"0"}:
                return cls(match.group(2), match.group(4))
        # Trace and span ids need to be unique, not secret: drawn like OpenTelemetry's
        # own generator does (no system call per id); never all zeros (invalid).
        return cls(f"{random.getrandbits(128) or 1:032x}", "01")

    def leg_header(self) -> str:
        """A traceparent for one upstream leg: this trace, and as parent the exported span
        the leg is sent under (``--tracing``), else a fresh span id."""
        current = CURRENT_SPAN_TRACEPARENT.get()
        if current is not None:
            return current
        return f"00-{self.trace_id}-{random.getrandbits(64) or 1:016x}-{self.flags}"
