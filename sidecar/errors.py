"""The sidecar's error tree, translated into HTTP answers at exactly one boundary.

::

    SidecarError                        status  stage     when
    ├── BadRequest                      400     request   the client's request cannot be served
    │   ├── InvalidRoutingHeader        400     request   a routing header does not parse
    │   ├── InvalidBody                 400     request   P/D path, body is not a JSON object
    │   ├── ForbiddenField              400     request   the body carries a field only the
    │   │                                                 sidecar may set (kv_transfer_params...)
    │   ├── NotChunkable                400     request   chunked decode would change what the
    │   │                                                 request asks for (n > 1, grammars...)
    │   ├── RequestBodyTimeout          408     request   P/D body not received in time
    │   └── BodyTooLarge                413     request   body over --max-body-bytes
    ├── TargetForbidden                 403     ssrf      a routing target is not in the pool
    ├── TargetCheckUnavailable          503     ssrf      the pool is not known yet
    ├── UpstreamTLSError                502     (stage)   TLS with an upstream failed (prefill
    │                                                     and decode use their own classes)
    ├── PrefillError                    502     prefill   the prefill stage did not give KV
    │   ├── PrefillRejected             4xx     prefill   the prefiller's own 4xx, relayed as is
    │   ├── PrefillUnavailable          502     prefill   connection errors / 5xx after retries
    │   ├── PrefillIncomplete           502     prefill   answered without kv_transfer_params
    │   └── PrefillTimeout              504     prefill   no complete answer in --prefill-timeout
    ├── DecodeError                     502     decode    the local vLLM failed
    │   ├── DecodeNotReady              503     decode    the local vLLM is unreachable
    │   └── DecodeTimeout               504     decode    no first byte in time
    ├── PrepareError                    502     prepare   a connector's per-prefiller preparation
    └── EncodeError                     502     encode    an encoder failed, or its outputs clash
        └── EncodeTimeout               504     encode    no answer in --prefill-timeout

Before the first response byte, ``sidecar.app``'s error middleware turns any of these into
a JSON answer ``{"error": {"message", "type", "code", "stage", "request_id"}}``. After the
first byte, the stream relay ends the stream with the same object as an error event.
``reason`` is the label used for retry, failure and fallback counters.

Where the errors come from: aiohttp, timeout and TLS failures of an upstream exchange
are translated in ``sidecar.upstream`` (:class:`~sidecar.upstream.StageErrors` names the
classes of each stage); the orchestrator, passthrough and encode stage raise the rest.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "BadRequest",
    "BodyTooLarge",
    "DecodeError",
    "DecodeNotReady",
    "DecodeTimeout",
    "EncodeError",
    "EncodeTimeout",
    "ForbiddenField",
    "InvalidBody",
    "InvalidRoutingHeader",
    "NotChunkable",
    "PrefillError",
    "PrefillIncomplete",
    "PrefillRejected",
    "PrefillTimeout",
    "PrefillUnavailable",
    "PrepareError",
    "RequestBodyTimeout",
    "SidecarError",
    "TargetCheckUnavailable",
    "TargetForbidden",
    "UpstreamTLSError",
]


class SidecarError(Exception):
    """Base of every error the sidecar answers with."""

    status: int = 500
    stage: str = "sidecar"
    kind: str = "internal_error"
    reason: str = "error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def payload(self, request_id: str | None) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.kind,
                "code": self.status,
                "stage": self.stage,
                "request_id": request_id,
            }
        }


class BadRequest(SidecarError):
    status = 400
    stage = "request"
    kind = "invalid_request_error"


class InvalidRoutingHeader(BadRequest):
    def __init__(self, header: str, value: str, problem: str | None = None) -> None:
        if problem is None:
            super().__init__(f"header {header}: cannot parse {value!r} as host:port")
        else:  # the value may be long: name the problem, not the value
            super().__init__(f"header {header}: {problem}")
        self.header = header


class InvalidBody(BadRequest):
    pass


class ForbiddenField(BadRequest):
    """The client's body carries a field that steers an engine's KV side channel."""

    kind = "forbidden_field"

    def __init__(self, field: str) -> None:
        super().__init__(
            f"request body field {field!r} is set by the sidecar only: it would steer where "
            "an engine connects for KV or encoder outputs"
        )
        self.field = field

    def payload(self, request_id: str | None) -> dict[str, Any]:
        body = super().payload(request_id)
        body["error"]["param"] = self.field
        return body


class NotChunkable(BadRequest):
    """A field whose meaning chunked decode (``--decode-chunk-size``) would change."""

    def __init__(self, field: str, why: str) -> None:
        super().__init__(
            f"request body field {field!r} cannot be served with chunked decode"
            f" (--decode-chunk-size): {why}"
        )
        self.field = field

    def payload(self, request_id: str | None) -> dict[str, Any]:
        body = super().payload(request_id)
        body["error"]["param"] = self.field
        return body


class RequestBodyTimeout(BadRequest):
    status = 408
    kind = "timeout"

    def __init__(self, timeout: float, received: int) -> None:
        super().__init__(
            f"request body not received within {timeout:g}s ({received} bytes arrived)"
        )


class BodyTooLarge(BadRequest):
    status = 413

    def __init__(self, limit: int) -> None:
        super().__init__(f"request body exceeds {limit} bytes")


class TargetForbidden(SidecarError):
    """SSRF protection refused a target; ``rule`` names the rule it broke."""

    status = 403
    stage = "ssrf"
    kind = "forbidden"

    def __init__(self, message: str, rule: str, target: str | None = None) -> None:
        super().__init__(message)
        self.rule = rule
        self.target = target  # the refused host:port

    def payload(self, request_id: str | None) -> dict[str, Any]:
        body = super().payload(request_id)
        body["error"]["rule"] = self.rule
        return body


class TargetCheckUnavailable(TargetForbidden):
    """The allowlist is not loaded yet (the first pool listing has not arrived)."""

    status = 503
    kind = "service_unavailable"


class UpstreamTLSError(SidecarError):
    status = 502
    kind = "upstream_error"

    def __init__(self, stage: str, message: str) -> None:
        super().__init__(message)
        self.stage = stage


class PrefillError(SidecarError):
    status = 502
    stage = "prefill"
    kind = "upstream_error"
    reason = "error"


class PrefillRejected(PrefillError):
    """The prefiller answered 4xx: the client's request is at fault, relay that answer."""

    reason = "rejected"

    def __init__(self, status: int, body: bytes, content_type: str | None) -> None:
        super().__init__(f"prefill answered {status}")
        self.status = status
        self.body = body
        self.content_type = content_type


class PrefillUnavailable(PrefillError):
    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class PrefillIncomplete(PrefillError):
    reason = "missing_kv_transfer_params"


class PrefillTimeout(PrefillError):
    status = 504
    kind = "timeout"
    reason = "timeout"


class DecodeError(SidecarError):
    status = 502
    stage = "decode"
    kind = "upstream_error"


class DecodeNotReady(DecodeError):
    status = 503
    kind = "service_unavailable"

    def __init__(self) -> None:
        super().__init__("decode server not ready")


class DecodeTimeout(DecodeError):
    status = 504
    kind = "timeout"


class PrepareError(SidecarError):
    status = 502
    stage = "prepare"
    kind = "upstream_error"


class EncodeError(SidecarError):
    status = 502
    stage = "encode"
    kind = "upstream_error"

    def __init__(self, message: str, reason: str = "error") -> None:
        super().__init__(message)
        self.reason = reason


class EncodeTimeout(EncodeError):
    status = 504
    kind = "timeout"
