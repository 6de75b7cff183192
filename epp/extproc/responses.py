"""Pure builders for the ext_proc messages the EPP sends; no I/O, no state."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from google.protobuf.struct_pb2 import Struct

from epp._proto.disagg_extproc_pb2 import (
    BodyMutation,
    BodyResponse,
    CommonResponse,
    HeaderMutation,
    HeadersResponse,
    HeaderValue,
    HeaderValueOption,
    HttpStatus,
    ImmediateResponse,
    ProcessingResponse,
    StreamedBodyResponse,
    TrailersResponse,
)
from epp.decision import DROPPED_REASONS
from epp.extproc.headers import (
    DESTINATION,
    DESTINATION_SCORES,
    DROPPED_REASON,
    ENCODERS,
    GATEWAY_HEADERS,
    LB_METADATA_NAMESPACE,
    PREFILLER,
    ROUTING_HEADERS,
)

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping

    from epp.decision import Decision

__all__ = [
    "continue_request_headers",
    "decision_body_response",
    "decision_headers_response",
    "destination_value",
    "immediate_response",
    "passthrough_response_body",
    "passthrough_response_headers",
    "passthrough_trailers",
    "routing_mutation",
    "streamed_request_body",
    "streamed_response_body",
    "streamed_response_chunk",
]

_OVERWRITE = HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
CONTENT_LENGTH = "content-length"


def _set(name: str, value: str) -> HeaderValueOption:
    return HeaderValueOption(
        header=HeaderValue(key=name, raw_value=value.encode()), append_action=_OVERWRITE
    )


def destination_value(decision: Decision) -> str:
    """The one value of both the destination header and the ``envoy.lb`` metadata: the
    decode endpoint, then its fallbacks. The gateway protocol forbids the two carrying
    different values, so fallbacks go in both or in neither."""
    return ",".join(decision.destinations)


def routing_mutation(decision: Decision, body_length: int | None = None) -> HeaderMutation:
    """Set the EPP's routing headers and drop every client-supplied one.

    A header the EPP sets is overwritten (which discards all client values of it) rather
    than also listed for removal, so the outcome does not depend on the order in which a
    gateway applies removals and sets. ``body_length`` is the size of the body the EPP
    re-sends, if it does: the request then carries a ``content-length`` that matches it,
    whatever framing the client used.
    """
    values: dict[str, str] = {**decision.headers, DESTINATION: destination_value(decision)}
    if decision.prefill:
        values[PREFILLER] = decision.prefill
    if decision.encoders:
        values[ENCODERS] = ",".join(decision.encoders)
    if body_length is not None:
        values[CONTENT_LENGTH] = str(body_length)
    removed = [name for name in (*ROUTING_HEADERS, *GATEWAY_HEADERS) if name not in values]
    return HeaderMutation(
        set_headers=[_set(name, value) for name, value in values.items()],
        remove_headers=removed,
    )


def _lb_metadata(decision: Decision) -> Struct:
    fields: dict[str, str | dict[str, float]] = {DESTINATION: destination_value(decision)}
    if decision.scores:
        fields[DESTINATION_SCORES] = decision.scores
    struct = Struct()
    struct.update({LB_METADATA_NAMESPACE: fields})
    return struct


def _decision_common(decision: Decision, body_length: int | None) -> CommonResponse:
    return CommonResponse(
        header_mutation=routing_mutation(decision, body_length), clear_route_cache=True
    )


def decision_headers_response(
    decision: Decision, *, body_length: int | None = None
) -> ProcessingResponse:
    """The answer to the request headers that carries the routing decision;
    ``body_length`` when the body follows as body mutations."""
    return ProcessingResponse(
        request_headers=HeadersResponse(response=_decision_common(decision, body_length)),
        dynamic_metadata=_lb_metadata(decision),
    )


def decision_body_response(decision: Decision) -> ProcessingResponse:
    """BUFFERED mode: Envoy still holds the headers, so the body answer may mutate them.
    The body itself is left as Envoy buffered it, so its length needs no header here."""
    if decision.body is not None:
        # A rewritten body replaces the buffered one, with a length to match.
        common = _decision_common(decision, len(decision.body))
        common.body_mutation.body = decision.body
    else:
        common = _decision_common(decision, None)
    return ProcessingResponse(
        request_body=BodyResponse(response=common),
        dynamic_metadata=_lb_metadata(decision),
    )


def continue_request_headers() -> ProcessingResponse:
    return ProcessingResponse(request_headers=HeadersResponse(response=CommonResponse()))


def _chunks(body: bytes | bytearray, chunk_bytes: int) -> Iterator[tuple[bytes, bool]]:
    """Slices of at most ``chunk_bytes``; the flag marks the last (at least one slice)."""
    view = memoryview(body)
    size = len(view)
    if size == 0:
        yield b"", True
        return
    for start in range(0, size, chunk_bytes):
        end = min(start + chunk_bytes, size)
        yield bytes(view[start:end]), end == size


def _streamed(body: bytes, end_of_stream: bool) -> CommonResponse:
    return CommonResponse(
        body_mutation=BodyMutation(
            streamed_response=StreamedBodyResponse(body=body, end_of_stream=end_of_stream)
        )
    )


def streamed_request_body(
    body: bytes | bytearray, *, end_of_stream: bool, chunk_bytes: int
) -> list[ProcessingResponse]:
    """FULL_DUPLEX_STREAMED: the buffered request body, sent back as body mutations."""
    return [
        ProcessingResponse(
            request_body=BodyResponse(response=_streamed(chunk, last and end_of_stream))
        )
        for chunk, last in _chunks(body, chunk_bytes)
    ]


def streamed_response_chunk(body: bytes, end_of_stream: bool) -> ProcessingResponse:
    """One response body mutation carrying ``body``, built in place (the response path
    sends one per chunk of every response)."""
    response = ProcessingResponse()
    streamed = response.response_body.response.body_mutation.streamed_response
    streamed.body = body
    streamed.end_of_stream = end_of_stream
    return response


def streamed_response_body(
    body: bytes, *, end_of_stream: bool, chunk_bytes: int
) -> list[ProcessingResponse]:
    """FULL_DUPLEX_STREAMED: one response chunk passed straight back (split if larger
    than ``chunk_bytes``)."""
    if len(body) <= chunk_bytes:
        return [streamed_response_chunk(body, end_of_stream)]
    return [
        ProcessingResponse(
            response_body=BodyResponse(response=_streamed(chunk, last and end_of_stream))
        )
        for chunk, last in _chunks(body, chunk_bytes)
    ]


def passthrough_response_headers(add: Mapping[str, str] | None = None) -> ProcessingResponse:
    """Let the response headers through, adding ``add`` (headers plugins asked for)."""
    common = CommonResponse()
    if add:
        common = CommonResponse(
            header_mutation=HeaderMutation(set_headers=[_set(k, v) for k, v in add.items()])
        )
    return ProcessingResponse(response_headers=HeadersResponse(response=common))


def passthrough_response_body() -> ProcessingResponse:
    """Any mode but FULL_DUPLEX_STREAMED: Envoy keeps the body, an empty answer lets it go."""
    return ProcessingResponse(response_body=BodyResponse(response=CommonResponse()))


def passthrough_trailers(*, request: bool) -> ProcessingResponse:
    if request:
        return ProcessingResponse(request_trailers=TrailersResponse())
    return ProcessingResponse(response_trailers=TrailersResponse())


def immediate_response(status: int, reason: str, message: str) -> ProcessingResponse:
    """End the HTTP request now with a JSON error body in the OpenAI error shape."""
    body = json.dumps(
        {"error": {"message": message, "type": reason, "param": None, "code": status}}
    ).encode()
    return ProcessingResponse(
        immediate_response=ImmediateResponse(
            status=HttpStatus(code=status),
            headers=HeaderMutation(
                set_headers=[
                    _set("content-type", "application/json"),
                    _set(DROPPED_REASON, DROPPED_REASONS.get(reason, reason)),
                ]
            ),
            body=body,
            details=reason,
        )
    )
