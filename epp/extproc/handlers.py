"""One small handler per ext_proc message kind, each over the stream's ``RequestContext``.

A handler returns the messages to send back, in order (possibly none). Handlers never
touch gRPC: the service loop in ``service.py`` does the I/O.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from epp._proto.disagg_extproc_pb2 import ProcessingMode
from epp.decision import Decision, SchedulingError
from epp.extproc import responses
from epp.extproc.context import lb_metadata
from epp.extproc.headers import header_dict

if TYPE_CHECKING:
    from epp._proto.disagg_extproc_pb2 import ProcessingRequest, ProcessingResponse
    from epp.extproc.context import RequestContext

__all__ = ["HANDLERS", "Handler", "ProtocolViolation"]

log = logging.getLogger("epp.extproc")

Handler = Callable[["RequestContext", "ProcessingRequest"], Awaitable["list[ProcessingResponse]"]]

_FULL_DUPLEX = ProcessingMode.FULL_DUPLEX_STREAMED
_BUFFERED_MODES = (ProcessingMode.BUFFERED, ProcessingMode.BUFFERED_PARTIAL)


class ProtocolViolation(Exception):
    """The gateway sent a message the protocol does not allow at this point."""


def _refuse(
    ctx: RequestContext, status: int, reason: str, message: str
) -> list[ProcessingResponse]:
    ctx.ended = True
    level = logging.ERROR if status >= 500 else logging.INFO
    log.log(
        level, "request %s %s refused: %d %s: %s", ctx.request_id, ctx.path, status, reason, message
    )
    return [responses.immediate_response(status, reason, message)]


async def _decide(
    ctx: RequestContext, *, headers_only: bool = False
) -> Decision | list[ProcessingResponse]:
    """Ask the scheduler; a refusal comes back as the immediate response to send."""
    env = ctx.env
    # A request may wait in flow control first: that wait has its own bound (the TTL).
    wait = getattr(env.decision_maker, "queue_wait_bound_s", 0.0)
    limit = None if math.isinf(wait) else env.config.decision_timeout_s + wait
    try:
        async with asyncio.timeout(limit):
            if headers_only:
                decision = await env.decision_maker.decide(
                    ctx.path, ctx.headers, b"", ctx.subset, headers_only=True
                )
            else:
                decision = await env.decision_maker.decide(
                    ctx.path, ctx.headers, bytes(ctx.body), ctx.subset
                )
    except SchedulingError as err:
        ctx.model = err.model
        return _refuse(ctx, err.status, err.reason, err.message)
    except TimeoutError:
        return _refuse(ctx, 500, "decision_timeout", "the endpoint picker did not decide in time")
    except Exception:
        log.exception("request %s: scheduling failed", ctx.request_id)
        return _refuse(ctx, 500, "internal_error", "internal error in the endpoint picker")
    ctx.decision = decision
    ctx.model = decision.model
    log.debug(
        "request %s %s -> decode=%s prefill=%s encoders=%s (%s)",
        ctx.request_id,
        ctx.path,
        decision.decode,
        decision.prefill,
        decision.encoders,
        decision.decision_type,
    )
    return decision


def _require_headers(ctx: RequestContext, kind: str) -> None:
    if not ctx.headers_seen:
        raise ProtocolViolation(f"{kind} before request_headers")


async def on_request_headers(
    ctx: RequestContext, request: ProcessingRequest
) -> list[ProcessingResponse]:
    if ctx.headers_seen:
        raise ProtocolViolation("request_headers sent twice")
    ctx.headers_seen = True
    message = request.request_headers
    ctx.headers = header_dict(message.headers)
    ctx.path = ctx.headers.get(":path", "")
    ctx.request_id = ctx.headers.get("x-request-id", "-")
    mode = ctx.request_body_mode
    if message.end_of_stream or mode == ProcessingMode.NONE:
        # No body will come: decide on the headers alone.
        outcome = await _decide(ctx, headers_only=True)
        if isinstance(outcome, Decision):
            return [responses.decision_headers_response(outcome)]
        return outcome
    if mode == _FULL_DUPLEX:
        # Answered after the last body chunk, together with the routing decision.
        return []
    if mode in _BUFFERED_MODES:
        # Envoy sends the body only after this answer; it still holds the headers, so the
        # body answer can carry the routing headers.
        return [responses.continue_request_headers()]
    name = ProcessingMode.BodySendMode.Name(mode)
    return _refuse(
        ctx,
        500,
        "unsupported_body_mode",
        f"request body mode {name} is not supported: use FULL_DUPLEX_STREAMED or BUFFERED",
    )


async def on_request_body(
    ctx: RequestContext, request: ProcessingRequest
) -> list[ProcessingResponse]:
    _require_headers(ctx, "request_body")
    if ctx.decision is not None:
        raise ProtocolViolation("request_body after the request was routed")
    message = request.request_body
    limit = ctx.env.config.max_body_bytes
    if len(ctx.body) + len(message.body) > limit:
        return _refuse(ctx, 413, "body_too_large", f"request body exceeds {limit} bytes")
    ctx.body += message.body
    if ctx.request_body_mode == _FULL_DUPLEX:
        if not message.end_of_stream:
            return []
        outcome = await _decide(ctx)
        if not isinstance(outcome, Decision):
            return outcome
        body = ctx.body if outcome.body is None else outcome.body
        return [
            responses.decision_headers_response(outcome, body_length=len(body)),
            *responses.streamed_request_body(
                body, end_of_stream=True, chunk_bytes=ctx.env.config.chunk_bytes
            ),
        ]
    # Buffered: this one message is all of the body Envoy will send.
    outcome = await _decide(ctx)
    if not isinstance(outcome, Decision):
        return outcome
    return [responses.decision_body_response(outcome)]


async def on_request_trailers(
    ctx: RequestContext, request: ProcessingRequest
) -> list[ProcessingResponse]:
    _require_headers(ctx, "request_trailers")
    trailers = responses.passthrough_trailers(request=True)
    if ctx.decision is not None:
        return [trailers]
    if ctx.request_body_mode != _FULL_DUPLEX:
        # The headers already went on unrouted; nothing can steer this request any more.
        return _refuse(ctx, 400, "bad_request", "request trailers without a request body")
    # Trailers, not an end_of_stream chunk, closed the body.
    outcome = await _decide(ctx)
    if not isinstance(outcome, Decision):
        return outcome
    if not ctx.body:
        return [responses.decision_headers_response(outcome), trailers]
    sent = ctx.body if outcome.body is None else outcome.body
    body = responses.streamed_request_body(
        sent, end_of_stream=False, chunk_bytes=ctx.env.config.chunk_bytes
    )
    return [
        responses.decision_headers_response(outcome, body_length=len(sent)),
        *body,
        trailers,
    ]


async def on_response_headers(
    ctx: RequestContext, request: ProcessingRequest
) -> list[ProcessingResponse]:
    # Before the prefill is released: the report may move the decode's bookkeeping.
    ctx.observe_served(request)
    if ctx.decision is not None:
        ctx.decision.on_response_started()
    if request.response_headers.end_of_stream or ctx.response_body_mode == ProcessingMode.NONE:
        ctx.response_ended = True  # no more of the response comes this way
        if ctx.decision is not None:
            ctx.decision.on_first_token()  # the body's first bytes will not be seen
    add = ctx.decision.response_headers if ctx.decision is not None else None
    hook = ctx.decision.response_header_hook if ctx.decision is not None else None
    if hook is not None:
        try:
            extra = hook(lb_metadata(request))
        except Exception:
            log.exception("request %s: response-header plugins failed", ctx.request_id)
            extra = {}
        if extra:
            add = {**(add or {}), **extra}
    return [responses.passthrough_response_headers(add)]


async def on_response_body(
    ctx: RequestContext, request: ProcessingRequest
) -> list[ProcessingResponse]:
    ctx.observe_served(request)
    message = request.response_body
    if ctx.decision is not None and (message.body or message.end_of_stream):
        ctx.decision.on_first_token()
    if message.end_of_stream:
        ctx.response_ended = True
    body_hook = ctx.decision.response_body_hook if ctx.decision is not None else None
    if body_hook is not None:
        try:
            body_hook(message.end_of_stream)
        except Exception:
            log.exception("request %s: response-body plugins failed", ctx.request_id)
    if ctx.response_body_mode != _FULL_DUPLEX:
        return [responses.passthrough_response_body()]
    return responses.streamed_response_body(
        message.body, end_of_stream=message.end_of_stream, chunk_bytes=ctx.env.config.chunk_bytes
    )


async def on_response_trailers(
    ctx: RequestContext, request: ProcessingRequest
) -> list[ProcessingResponse]:
    ctx.observe_served(request)
    ctx.response_ended = True
    return [responses.passthrough_trailers(request=False)]


HANDLERS: dict[str, Handler] = {
    "request_headers": on_request_headers,
    "request_body": on_request_body,
    "request_trailers": on_request_trailers,
    "response_headers": on_response_headers,
    "response_body": on_response_body,
    "response_trailers": on_response_trailers,
}
