"""The P/D orchestrator: sends the legs a connector describes, and owns everything else.

Retries, cancellation, usage accounting and metrics live here once; connectors
(``sidecar.connectors``) only translate bodies, :mod:`sidecar.plan` has already decided
the route, and every leg is sent through :mod:`sidecar.upstream` (sending, timeouts and
the translation of client errors). One :class:`~sidecar.context.RequestContext` goes
through the stages, each in its own module (:mod:`sidecar.prefill_stage`,
:mod:`sidecar.decode_stage`, :mod:`sidecar.concurrent_stage`); this module keeps the
sequence and the failure decisions. Per request:

1. read the body (bounded) and parse it once;
2. [encode stage, when configured and the request names encoders]; without a prefill
   target (E/PD) its output goes to the decode leg, which follows at once;
3. [a decode-first attempt, when the connector asks for one: see ``connectors.base``];
4. prefill leg(s): retried on connection errors and 502/503/504, moving along the
   prefiller list, each attempt bounded by ``prefill_timeout``;
5. decode leg on the local vLLM: bounded wait for the first byte, then relayed as it
   arrives with a bound on the gap between chunks;
6. failure policy: no KV from the prefill -> error (or local decode when the fallback
   is enabled, announced in a response header and counted). Nothing is retried once a
   byte went to the client.

Cancellation needs nothing special: the server cancels the handler when the client goes
away, and every upstream response is closed in a ``finally`` block.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from common.json_codec import dumps
from sidecar import tracing
from sidecar.api_shapes import ApiShape
from sidecar.chunked_decode import chunking_applies, refuse_unchunkable
from sidecar.client_fields import forbidden_field
from sidecar.concurrent_stage import ConcurrentStage
from sidecar.connectors import Connector, EncodeStage
from sidecar.context import RequestContext
from sidecar.decode_stage import DecodeStage
from sidecar.errors import ForbiddenField, PrefillError, PrefillRejected
from sidecar.exchange import Exchange
from sidecar.headers import REQUEST_ID, request_headers
from sidecar.metrics import Metrics
from sidecar.plan import Failure, Plan, Route, on_prefill_failure, plan
from sidecar.policy import Policy
from sidecar.prefill_stage import PrefillStage, leg_context
from sidecar.request_body import parse_json_object, read_body
from sidecar.routing import HostPort
from sidecar.server import Request, StreamResponse
from sidecar.tracing import Stage, traced
from sidecar.upstream import Upstream

__all__ = ["FALLBACK_HEADER", "Orchestrator", "Policy", "parse_json_object", "read_body"]

FALLBACK_HEADER = "x-pd-prefill-fallback"


class Orchestrator:
    def __init__(
        self,
        *,
        connector: Connector,
        prefill: Upstream,
        decode: Upstream,
        policy: Policy,
        metrics: Metrics,
        encode: EncodeStage | None = None,
    ) -> None:
        self.connector = connector
        self.prefill = prefill
        self.decode = decode
        self.policy = policy
        self.metrics = metrics
        self.encode = encode
        self.prefill_stage = PrefillStage(
            connector=connector, upstream=prefill, metrics=metrics, policy=policy
        )
        self.decode_stage = DecodeStage(
            connector=connector, upstream=decode, metrics=metrics, policy=policy
        )
        self.concurrent_stage = ConcurrentStage(
            connector=connector,
            prefill=self.prefill_stage,
            decode=self.decode_stage,
            metrics=metrics,
            policy=policy,
        )

    async def client_body(self, request: Request, ex: Exchange) -> tuple[bytes, dict[str, Any]]:
        """The client's body, bounded and parsed; refused if it carries a sidecar-only field."""
        raw = await read_body(request, self.policy.max_body_bytes, self.policy.request_body_timeout)
        body = parse_json_object(raw)
        tracing.note_request_body(body)
        if not self.policy.allow_client_transfer_params:
            field = forbidden_field(body)
            if field is not None:
                self.metrics.forbidden_fields.labels(field=field).inc()
                raise ForbiddenField(field)
        refuse_unchunkable(request.path, body, self.policy.decode_chunk_size)
        return raw, body

    def chunks(self, shape: ApiShape, body: dict[str, Any]) -> bool:
        """Whether this request's decode runs in chunks (``--decode-chunk-size``)."""
        return chunking_applies(shape.path, body, self.policy.decode_chunk_size)

    async def serve_local_chunked(
        self,
        request: Request,
        shape: ApiShape,
        route: Plan,
        ex: Exchange,
        decode_base_url: str,
        body: tuple[bytes, dict[str, Any]],
    ) -> StreamResponse:
        """A decode-only request whose decode runs in chunks (see :meth:`chunks`)."""
        raw, parsed = body
        headers = request_headers(request.headers, body_rewritten=True)
        headers[REQUEST_ID] = ex.request_id
        headers["Content-Type"] = "application/json"
        ctx = RequestContext(
            request, shape, route, ex, decode_base_url + request.raw_path, raw, parsed, headers
        )
        return await self.decode_stage.run(ctx, raw)

    def plan(self, prefill_header: str | None, encoders_header: str | None) -> Plan:
        """The route of one request (see :mod:`sidecar.plan`)."""
        return plan(
            prefill_header,
            encoders_header,
            order=self.connector.order,
            decode_first=self.connector.decline_reason is not None,
            encode_stage=self.encode is not None,
            sampling=self.policy.prefiller_sampling,
        )

    async def serve(
        self,
        request: Request,
        shape: ApiShape,
        route: Plan,
        ex: Exchange,
        decode_base_url: str,
        kv_source: HostPort | None = None,
    ) -> StreamResponse:
        """Serve one request planned for an encode stage, a prefill, or both.

        ``kv_source``: a checked peer the prefill leg pulls the cached prefix from."""
        ex.mode = route.mode
        raw, body = await self.client_body(request, ex)
        headers = request_headers(request.headers, body_rewritten=True)
        headers[REQUEST_ID] = ex.request_id
        headers["Content-Type"] = "application/json"
        ctx = RequestContext(
            request, shape, route, ex, decode_base_url + request.raw_path, raw, body, headers,
            kv_source=kv_source,
        )  # fmt: skip
        if self.encode is not None and route.encoders is not None:
            ctx.extra = await self._encode(ctx, self.encode, route.encoders)
        if route.route is Route.ENCODE:
            # E/PD: no prefill, so the decode leg takes the encoder outputs.
            payload = dumps({**body, **ctx.extra}) if ctx.extra else raw
            return await self.decode_stage.run(ctx, payload)
        if route.route is Route.CONCURRENT:
            return await self.concurrent_stage.run(ctx)
        declined = False
        if route.route is Route.DECODE_FIRST and self.connector.decline_reason is not None:
            first_body = self.connector.decode_first_body(leg_context(ctx, route.prefiller(0)))
            if first_body is not None:
                answered = await self.decode_stage.first(
                    ctx, dumps(first_body), self.connector.decline_reason
                )
                if answered is not None:
                    return answered
                declined = True
        try:
            leg, result, cached = await self.prefill_stage.run(ctx)
        except PrefillError as exc:
            return await self._prefill_failed(ctx, exc, declined)
        if result.generation_finished:
            return await self.decode_stage.generation_finished(ctx, leg)
        ex.cached_tokens = cached
        decode_body = dumps(self.connector.decode_body(leg, result))
        leg_headers = self.decode_stage.leg_headers(ctx, leg, result)
        return await self.decode_stage.run(ctx, decode_body, cached=cached, headers=leg_headers)

    @traced(Stage.ENCODE)
    async def _encode(
        self, ctx: RequestContext, stage: EncodeStage, encoders: tuple[HostPort, ...]
    ) -> Mapping[str, Any]:
        """The encode stage, as one (traced) step."""
        return await stage.run(ctx.body, list(encoders), ctx.headers, ctx.ex)

    async def _prefill_failed(
        self, ctx: RequestContext, exc: PrefillError, declined: bool
    ) -> StreamResponse:
        """The prefill stage failed: the error, or a local decode (``--prefill-fallback``)."""
        rejected = isinstance(exc, PrefillRejected)
        self.metrics.prefill_failures.labels(reason=exc.reason).inc()
        outcome = on_prefill_failure(
            self.policy.prefill_fallback,
            rejected=rejected,
            extra=bool(ctx.extra),
            declined=declined,
        )
        if outcome is Failure.ERROR:
            raise exc
        ex = ctx.ex
        ex.mode = "fallback"
        ex.fallback_reason = exc.reason
        self.metrics.prefill_fallbacks.labels(reason=exc.reason).inc()
        note = {FALLBACK_HEADER: exc.reason}
        if outcome is Failure.LOCAL_REBUILT:
            # The body as sent would lack the encoder outputs, or decline again.
            leg = leg_context(ctx, ctx.plan.prefiller(0))
            return await self.decode_stage.without_kv(ctx, leg, note)
        fallback_headers = request_headers(ctx.request.headers, body_rewritten=False)
        fallback_headers[REQUEST_ID] = ex.request_id
        return await self.decode_stage.run(ctx, ctx.raw, headers=fallback_headers, note=note)
