"""The P/D orchestrator: sends the legs a connector describes, and owns everything else.

Retries, cancellation, usage accounting and metrics live here once; connectors
(``sidecar.connectors``) only translate bodies, :mod:`sidecar.plan` has already decided
the route, and every leg is sent through :mod:`sidecar.upstream` (sending, timeouts and
the translation of client errors). One :class:`~sidecar.context.RequestContext` goes
through the stages. Per request:

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

import asyncio
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential_jitter,
)

from sidecar import tracing
from sidecar._json import dumps, loads
from sidecar.api_shapes import ApiShape
from sidecar.chunked_decode import (
    CHAT_PATH,
    ChunkAnswer,
    ChunkedDecode,
    chunking_applies,
    refuse_unchunkable,
    run_chunked,
)
from sidecar.client_fields import forbidden_field
from sidecar.connectors import Connector, EncodeStage, LegContext, PrefillResult
from sidecar.context import RequestContext
from sidecar.decode_first import FinishScan, Verdict
from sidecar.errors import (
    BodyTooLarge,
    DecodeError,
    DecodeTimeout,
    ForbiddenField,
    InvalidBody,
    PrefillError,
    PrefillRejected,
    PrefillTimeout,
    PrefillUnavailable,
    PrepareError,
    RequestBodyTimeout,
    SidecarError,
)
from sidecar.exchange import Exchange
from sidecar.headers import REQUEST_ID, TRACEPARENT, request_headers, response_headers
from sidecar.metrics import Metrics
from sidecar.plan import Failure, Plan, Route, on_prefill_failure, plan
from sidecar.relay import error_event, is_event_stream, relay_body
from sidecar.routing import HostPort
from sidecar.tracing import Stage, traced
from sidecar.upstream import Response, Retryable, StageErrors, Upstream, read_bounded
from sidecar.usage import SseUsageRewriter, rewrite_json

__all__ = ["FALLBACK_HEADER", "Orchestrator", "Policy"]

FALLBACK_HEADER = "x-pd-prefill-fallback"
_MAX_PREFILL_ANSWER = 16 * 1024 * 1024
_PREFILL_ERRORS = StageErrors(timeout=PrefillTimeout, failed=PrefillUnavailable)


@dataclass(frozen=True, slots=True)
class Policy:
    max_body_bytes: int = 32 * 1024 * 1024
    request_body_timeout: float = 60.0
    prefill_max_retries: int = 3
    prefill_retry_backoff: float = 0.1
    prefiller_sampling: bool = False
    prefill_fallback: Literal["error", "local"] = "error"
    prefill_timeout: float = 300.0
    decode_first_byte_timeout: float = 600.0
    stream_idle_timeout: float = 120.0
    # Trusted clients only: let bodies carry kv_transfer_params & co (client_fields).
    allow_client_transfer_params: bool = False
    decode_chunk_size: int = 0  # > 0: chat decodes in chunks of this many tokens


async def read_body(request: web.Request, limit: int, deadline_s: float) -> bytes:
    """The whole request body: at most ``limit`` bytes, arriving within ``deadline_s``."""
    if request.content_length is not None and request.content_length > limit:
        raise BodyTooLarge(limit)
    content = request.content
    if content.is_eof():
        # The whole body already arrived (the usual case for small bodies): no timer.
        whole = content.read_nowait()
        if len(whole) > limit:
            raise BodyTooLarge(limit)
        return whole
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(deadline_s):
            async for chunk in request.content.iter_any():
                size += len(chunk)
                if size > limit:
                    raise BodyTooLarge(limit)
                chunks.append(chunk)
    except TimeoutError:
        raise RequestBodyTimeout(deadline_s, size) from None
    return b"".join(chunks)


def parse_json_object(raw: bytes) -> dict[str, Any]:
    try:
        body = loads(raw)
    except ValueError as exc:
        raise InvalidBody(f"request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise InvalidBody("request body nests too deeply") from None
    if not isinstance(body, dict):
        raise InvalidBody("request body must be a JSON object")
    return body


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
        self._prepared: dict[HostPort, asyncio.Task[object | None]] = {}
        # Prefill legs left to finish after their decode answered (see Connector).
        self._detached: set[asyncio.Future[PrefillResult]] = set()
        self._needs_prepare = type(connector).prepare is not Connector.prepare
        backoff = policy.prefill_retry_backoff
        # Attempts after the first retry: exponential from twice the backoff, with jitter.
        self._retry_wait = wait_exponential_jitter(
            multiplier=backoff * 2, max=max(backoff * 16, 0.001), jitter=backoff
        )

    async def client_body(self, request: web.Request, ex: Exchange) -> tuple[bytes, dict[str, Any]]:
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
        request: web.Request,
        shape: ApiShape,
        route: Plan,
        ex: Exchange,
        decode_base_url: str,
        body: tuple[bytes, dict[str, Any]],
    ) -> web.StreamResponse:
        """A decode-only request whose decode runs in chunks (see :meth:`chunks`)."""
        raw, parsed = body
        headers = request_headers(request.headers, body_rewritten=True)
        headers[REQUEST_ID] = ex.request_id
        headers["Content-Type"] = "application/json"
        ctx = RequestContext(
            request, shape, route, ex, decode_base_url + request.raw_path, raw, parsed, headers
        )
        return await self._decode(ctx, raw)

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
        request: web.Request,
        shape: ApiShape,
        route: Plan,
        ex: Exchange,
        decode_base_url: str,
        kv_source: HostPort | None = None,
    ) -> web.StreamResponse:
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
            return await self._decode(ctx, payload)
        if route.route is Route.CONCURRENT:
            return await self._concurrent(ctx)
        declined = False
        if route.route is Route.DECODE_FIRST and self.connector.decline_reason is not None:
            first_body = self.connector.decode_first_body(self._leg(ctx, route.prefiller(0)))
            if first_body is not None:
                answered = await self._decode_first(
                    ctx, dumps(first_body), self.connector.decline_reason
                )
                if answered is not None:
                    return answered
                declined = True
        try:
            leg, result, cached = await self._prefill(ctx)
        except PrefillError as exc:
            return await self._prefill_failed(ctx, exc, declined)
        if result.generation_finished:
            return await self._generation_finished(ctx, leg)
        ex.cached_tokens = cached
        decode_body = dumps(self.connector.decode_body(leg, result))
        leg_headers = self._decode_headers(ctx, leg, result)
        return await self._decode(ctx, decode_body, cached=cached, headers=leg_headers)

    @traced(Stage.ENCODE)
    async def _encode(
        self, ctx: RequestContext, stage: EncodeStage, encoders: tuple[HostPort, ...]
    ) -> Mapping[str, Any]:
        """The encode stage, as one (traced) step."""
        return await stage.run(ctx.body, list(encoders), ctx.headers, ctx.ex)

    async def _prefill_failed(
        self, ctx: RequestContext, exc: PrefillError, declined: bool
    ) -> web.StreamResponse:
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
            leg = self._leg(ctx, ctx.plan.prefiller(0))
            return await self._decode_without_kv(ctx, leg, note)
        fallback_headers = request_headers(ctx.request.headers, body_rewritten=False)
        fallback_headers[REQUEST_ID] = ex.request_id
        return await self._decode(ctx, ctx.raw, headers=fallback_headers, note=note)

    def _decode_headers(
        self, ctx: RequestContext, leg: LegContext, result: PrefillResult | None
    ) -> CIMultiDict[str] | None:
        """The decode leg's headers when the connector adds some (else None: the usual)."""
        extra = self.connector.decode_headers(leg, result)
        if not extra:
            return None
        headers = ctx.headers.copy()
        headers.update(extra)
        return headers

    def _leg(
        self, ctx: RequestContext, target: HostPort, prepared: object | None = None
    ) -> LegContext:
        return LegContext(
            shape=ctx.shape,
            body=ctx.body,
            request_id=ctx.ex.request_id,
            prefiller=target,
            prepared=prepared,
            extra=ctx.extra,
            kv_source=ctx.kv_source,
        )

    async def _generation_finished(
        self, ctx: RequestContext, leg: LegContext
    ) -> web.StreamResponse:
        """The prefill's generation ended on its first token (EOS or a stop string), so it
        holds no KV to hand over. The answer a single engine gives is the decode engine's
        answer to the client's own body: a normal outcome, counted, never a 502."""
        ctx.ex.prefill_finish = "stopped"
        self.metrics.prefill_finished.inc()
        return await self._decode_without_kv(ctx, leg, None)

    async def _decode_without_kv(
        self, ctx: RequestContext, leg: LegContext, note: Mapping[str, str] | None
    ) -> web.StreamResponse:
        """Decode the client's body (with the encode stage's output) on the local engine."""
        return await self._decode(ctx, dumps(self.connector.local_body(leg)), note=note)

    # -- prefill ---------------------------------------------------------------------

    async def _prefill(self, ctx: RequestContext) -> tuple[LegContext, PrefillResult, int | None]:
        """The prefill stage: attempts along the prefiller list, retried while retryable."""
        ex = ctx.ex
        loop = asyncio.get_running_loop()
        started = loop.time()

        def count_retry(state: RetryCallState) -> None:
            outcome = state.outcome
            failure = outcome.exception() if outcome is not None else None
            reason = failure.error.reason if isinstance(failure, Retryable) else "unknown"
            self.metrics.prefill_retries.labels(reason=reason).inc()

        def next_target() -> HostPort:
            target = ctx.plan.prefiller(ex.prefill_attempts)
            ex.prefill_attempts += 1
            ex.prefiller = target.authority
            return target

        try:
            # The first attempt runs without the retry machinery: it is the hot path.
            try:
                return await self._prefill_once(ctx, next_target())
            except Retryable as exc:
                if self.policy.prefill_max_retries == 0:
                    raise exc.error from None
                self.metrics.prefill_retries.labels(reason=exc.error.reason).inc()
                backoff = self.policy.prefill_retry_backoff
                await asyncio.sleep(backoff + random.uniform(0, backoff))
            retrying = AsyncRetrying(
                stop=stop_after_attempt(self.policy.prefill_max_retries),
                wait=self._retry_wait,
                retry=retry_if_exception_type(Retryable),
                before_sleep=count_retry,
                reraise=True,
            )
            async for attempt in retrying:
                with attempt:
                    return await self._prefill_once(ctx, next_target())
        except Retryable as exc:
            raise exc.error from None
        finally:
            ex.prefill_s = loop.time() - started
            self.metrics.prefill_seconds.observe(ex.prefill_s)
        raise AssertionError("unreachable: tenacity either returns or raises")

    async def _prepare(self, target: HostPort) -> object | None:
        if not self._needs_prepare:
            return None
        task = self._prepared.get(target)
        if task is None or (task.done() and (task.cancelled() or task.exception() is not None)):
            task = asyncio.ensure_future(self.connector.prepare(target, self.prefill.session))
            self._prepared[target] = task
        try:
            # shield: one caller going away must not cancel the shared preparation
            return await asyncio.shield(task)
        except SidecarError:
            self._forget(target)
            raise
        except Exception as exc:
            self._forget(target)
            raise PrepareError(f"preparing prefiller {target} failed: {exc!r}") from exc

    @traced(Stage.PREFILL)
    async def _prefill_once(
        self, ctx: RequestContext, target: HostPort, paired: LegContext | None = None
    ) -> tuple[LegContext, PrefillResult, int | None]:
        """One prefill attempt; ``paired`` is the decode leg's context (concurrent legs)."""
        # Concurrent legs must agree on pairing and preparation: they share one context.
        leg = paired if paired is not None else self._leg(ctx, target, await self._prepare(target))
        result, cached = await self._prefill_leg(ctx, leg)
        return leg, result, cached

    async def _prefill_leg(
        self, rctx: RequestContext, ctx: LegContext
    ) -> tuple[PrefillResult, int | None]:
        target = ctx.prefiller
        shape = ctx.shape
        payload = dumps(self.connector.prefill_body(ctx))
        leg_headers = rctx.headers.copy()
        leg_headers.update(self.connector.prefill_headers(ctx))
        leg_headers[TRACEPARENT] = rctx.ex.trace.leg_header()
        url = target.base_url + shape.path
        try:
            fetched = await self.prefill.fetch(
                url,
                leg_headers,
                payload,
                target=str(target),
                errors=_PREFILL_ERRORS,
                limit=_MAX_PREFILL_ANSWER,
                timeout=self.policy.prefill_timeout,
            )
        except (Retryable, PrefillError):
            self._forget(target)
            raise
        status, answer = fetched.status, fetched.body
        tracing.note("llm_d.pd_proxy.prefill.status_code", status)
        if 400 <= status < 500:
            raise PrefillRejected(status, answer, fetched.content_type)
        if not 200 <= status < 300:
            self._forget(target)
            raise PrefillUnavailable(f"prefill at {target} answered {status}", f"status_{status}")
        try:
            parsed = loads(answer)
        except ValueError:
            raise PrefillUnavailable(
                f"prefill at {target} answered with malformed JSON", "malformed_answer"
            ) from None
        tracing.note_usage(parsed)
        result = self.connector.read_prefill(ctx, parsed)
        # A prefill engine without --enable-prompt-tokens-details reports no count: it
        # found nothing it will own up to, and the client is billed for that view.
        cached = shape.read_cached(parsed)
        return result, 0 if cached is None else cached

    def _forget(self, target: HostPort) -> None:
        self._prepared.pop(target, None)

    # -- decode ----------------------------------------------------------------------

    async def _open_decode(
        self, ctx: RequestContext, body: bytes, headers: CIMultiDict[str] | None
    ) -> tuple[Response, bytes]:
        """Send the decode leg; return once its first body bytes (or its end) arrived."""
        leg_headers = (headers if headers is not None else ctx.headers).copy()
        leg_headers[TRACEPARENT] = ctx.ex.trace.leg_header()
        loop = asyncio.get_running_loop()
        started = loop.time()
        response, first = await self.decode.open(
            "POST",
            ctx.decode_url,
            leg_headers,
            body,
            first_byte_timeout=self.policy.decode_first_byte_timeout,
            what="decode",
        )
        ctx.ex.decode_wait_s = loop.time() - started
        self.metrics.decode_ttft_seconds.observe(ctx.ex.decode_wait_s)
        return response, first

    @traced(Stage.DECODE)
    async def _decode(
        self,
        ctx: RequestContext,
        body: bytes,
        *,
        cached: int | None = None,
        headers: CIMultiDict[str] | None = None,
        note: Mapping[str, str] | None = None,
        commit: asyncio.Future[PrefillResult] | None = None,
    ) -> web.StreamResponse:
        """The decode leg, relayed to the client; ``cached`` rewrites its usage, ``note``
        adds response headers, ``headers`` replaces the rewritten-body leg headers.
        With ``commit`` (a concurrent prefill) nothing is relayed before it succeeded."""
        if self.policy.decode_chunk_size and ctx.shape.path == CHAT_PATH:
            decoded = parse_json_object(body)
            if chunking_applies(CHAT_PATH, decoded, self.policy.decode_chunk_size):
                return await self._decode_chunked(ctx, decoded, cached, note, headers, commit)
        response, first = await self._open_decode(ctx, body, headers)
        if commit is not None:
            try:
                await asyncio.wait([commit])
            except BaseException:
                response.close()
                raise
            if commit.cancelled() or commit.exception() is not None:
                response.close()
                # The prefill failed: _concurrent_once reports its error.
                raise asyncio.CancelledError
        return await self._relay(ctx, response, first, cached, note)

    async def _decode_chunked(
        self,
        ctx: RequestContext,
        body: dict[str, Any],
        cached: int | None,
        note: Mapping[str, str] | None,
        headers: CIMultiDict[str] | None,
        commit: asyncio.Future[PrefillResult] | None,
    ) -> web.StreamResponse:
        """The decode leg as a run of chunks (:mod:`sidecar.chunked_decode`). Every chunk
        carries the decode leg's ``headers``; with ``commit`` (a concurrent prefill) the
        first chunk's answer is used only once the prefill succeeded."""

        state = ChunkedDecode(body, self.policy.decode_chunk_size)

        async def send(payload: bytes) -> ChunkAnswer:
            waited = ctx.ex.decode_wait_s
            response, first = await self._open_decode(ctx, payload, headers)
            if state.chunks:  # the access log keeps the first chunk's wait
                ctx.ex.decode_wait_s = waited
            complete = False
            try:
                rest = await self._read_rest(response, first)
                complete = True
            finally:
                if complete:
                    response.release()
                else:
                    response.close()
            if commit is not None and not state.chunks:
                await asyncio.wait([commit])
                if commit.cancelled() or commit.exception() is not None:
                    # The prefill failed: _concurrent_once reports its error.
                    raise asyncio.CancelledError
            return ChunkAnswer(response.status, response.headers, rest)

        return await run_chunked(
            ctx.request,
            ctx.ex,
            ctx.shape,
            state,
            send,
            cached=cached,
            note=note,
            on_chunk=self.metrics.decode_chunks.inc,
            on_abort=self._end_aborted_stream,
        )

    @traced(Stage.DECODE_FIRST)
    async def _decode_first(
        self, ctx: RequestContext, body: bytes, decline_reason: str
    ) -> web.StreamResponse | None:
        """Try the decode before any prefill; None when it declined (nothing was sent)."""
        response, first = await self._open_decode(ctx, body, None)
        held = [first]
        verdict = Verdict.ACCEPTED  # an error answer is the client's answer
        try:
            if 200 <= response.status < 300:
                scan = FinishScan(decline_reason, sse=is_event_stream(response))
                verdict = scan.feed(first) if first else scan.end()
                async with asyncio.timeout(self.policy.stream_idle_timeout):
                    while verdict is Verdict.PENDING:
                        chunk = await response.content.readany()
                        held.append(chunk)
                        verdict = scan.feed(chunk) if chunk else scan.end()
                    if verdict is Verdict.DECLINED:
                        # Read the (short) rest so the pooled connection stays usable.
                        await read_bounded(response, _MAX_PREFILL_ANSWER)
        except TimeoutError:
            response.close()
            raise DecodeTimeout(
                f"decode answer stalled for more than {self.policy.stream_idle_timeout:g}s"
            ) from None
        except aiohttp.ClientError as exc:
            response.close()
            raise DecodeError(f"decode answer broken: {exc!r}") from None
        except BaseException:
            response.close()
            raise
        ctx.ex.decode_first = verdict.value
        if verdict is Verdict.DECLINED:
            response.release()
            return None
        return await self._relay(ctx, response, b"".join(held), None, None)

    async def _relay(
        self,
        ctx: RequestContext,
        response: Response,
        first: bytes,
        cached: int | None,
        extra_headers: Mapping[str, str] | None,
    ) -> web.StreamResponse:
        ex = ctx.ex
        shape = ctx.shape
        complete = False
        try:
            out_headers = response_headers(response.headers)
            out_headers[REQUEST_ID] = ex.reply_id
            if extra_headers:
                out_headers.update(extra_headers)
            rewrite = cached is not None and 200 <= response.status < 300
            if is_event_stream(response):
                out = web.StreamResponse(
                    status=response.status, reason=response.reason, headers=out_headers
                )
                await out.prepare(ctx.request)
                ex.first_byte()
                rewriter = (
                    SseUsageRewriter(shape, cached) if rewrite and cached is not None else None
                )
                try:
                    await relay_body(
                        out,
                        response,
                        first,
                        ex=ex,
                        idle_timeout=self.policy.stream_idle_timeout,
                        rewriter=rewriter,
                        sse=True,
                    )
                except asyncio.CancelledError:
                    await self._end_aborted_stream(out, ex)
                    return out
                complete = True
                return out
            rest = await self._read_rest(response, first)
            complete = True
            if rewrite and cached is not None and response.content_type == "application/json":
                rest = rewrite_json(shape, rest, cached)
            tracing.note_answer(rest, response.content_type)
            ex.first_byte()
            return web.Response(
                status=response.status, reason=response.reason, headers=out_headers, body=rest
            )
        finally:
            if complete:
                response.release()
            else:
                response.close()

    async def _end_aborted_stream(self, out: web.StreamResponse, ex: Exchange) -> None:
        """A concurrent leg failed mid-stream: end the stream with its error event.

        Re-raises when the cancellation (also) came from elsewhere, e.g. the client left.
        """
        task = asyncio.current_task()
        failure = ex.abort
        if task is None or not isinstance(failure, SidecarError) or task.cancelling() > 1:
            raise asyncio.CancelledError
        task.uncancel()
        ex.status = failure.status
        ex.error = failure.message
        await out.write(b"\n\n" + error_event(failure, ex.reply_id))
        await out.write_eof()

    async def _read_rest(self, response: Response, first: bytes) -> bytes:
        content = response.content
        chunks = [first]
        try:
            if not first or content.is_eof():
                # Everything arrived with the first read: no timer needed.
                rest = content.read_nowait() if first else b""
                return first + rest if rest else first
            async with asyncio.timeout(self.policy.stream_idle_timeout):
                while chunks[-1]:
                    chunks.append(await content.readany())
        except TimeoutError:
            raise DecodeTimeout(
                f"decode answer stalled for more than {self.policy.stream_idle_timeout:g}s"
            ) from None
        except aiohttp.ClientError as exc:
            raise DecodeError(f"decode answer broken: {exc!r}") from None
        return b"".join(chunks)

    # -- concurrent legs -------------------------------------------------------------

    async def _concurrent(self, ctx: RequestContext) -> web.StreamResponse:
        """Both legs at once, retried together on the next prefiller while nothing has
        reached the client; each attempt pairs the legs afresh (a new room, transfer id)."""
        ex = ctx.ex
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            while True:
                target = ctx.plan.prefiller(ex.prefill_attempts)
                ex.prefill_attempts += 1
                ex.prefiller = target.authority
                leg = self._leg(ctx, target, await self._prepare(target))
                try:
                    return await self._concurrent_once(ctx, leg)
                except Retryable as exc:
                    if ex.response_started or ex.prefill_attempts > self.policy.prefill_max_retries:
                        self.metrics.prefill_failures.labels(reason=exc.error.reason).inc()
                        raise exc.error from None
                    self.metrics.prefill_retries.labels(reason=exc.error.reason).inc()
                    ex.abort = None
                    backoff = self.policy.prefill_retry_backoff * ex.prefill_attempts
                    await asyncio.sleep(backoff + random.uniform(0, backoff))
        finally:
            ex.prefill_s = loop.time() - started

    async def _concurrent_once(self, ctx: RequestContext, leg: LegContext) -> web.StreamResponse:
        """One paired attempt. A failed prefill ends the decode leg: with ``Retryable``
        (or the error) before the client saw a byte, with an error event after it. A
        prefill whose generation finished leaves nothing to pull: the decode is replaced
        by a local one when the client has seen nothing yet."""
        ex = ctx.ex
        hold = self.connector.commit_timeout
        prefill = asyncio.ensure_future(self._concurrent_prefill(ctx, leg, hold))
        decode_body = dumps(self.connector.decode_body(leg, None))
        relay = asyncio.ensure_future(
            self._decode(
                ctx,
                decode_body,
                headers=self._decode_headers(ctx, leg, None),
                commit=prefill if hold is not None else None,
            )
        )

        def stop_decode(task: asyncio.Future[PrefillResult]) -> None:
            if task.cancelled():
                return
            failure = task.exception()
            if failure is not None:
                ex.abort = failure.error if isinstance(failure, Retryable) else failure
                relay.cancel()
            elif task.result().generation_finished and not ex.response_started:
                relay.cancel()

        prefill.add_done_callback(stop_decode)
        answered: web.StreamResponse | None = None
        try:
            answered = await relay
            if answered.status >= 500:
                # The decode could not use what prepare() learned (e.g. the prefiller
                # restarted with a new engine id): ask again next time.
                self._forget(leg.prefiller)
            return answered
        except asyncio.CancelledError:
            # stop_decode cancels the relay (see above); anything else (the client left,
            # the prefill still running) is a cancellation of this request.
            current = asyncio.current_task()
            if not prefill.done() or prefill.cancelled() or (current and current.cancelling()):
                raise
            failure = prefill.exception()
            if failure is not None:
                raise failure from None
            ex.abort = None
            return await self._generation_finished(ctx, leg)
        finally:
            prefill.remove_done_callback(stop_decode)
            if (
                answered is not None
                and not prefill.done()
                and self.connector.prefill_outlives_decode
            ):
                self._detach(prefill)
            else:
                if not prefill.done():
                    prefill.cancel()
                await asyncio.gather(prefill, return_exceptions=True)

    def _detach(self, prefill: asyncio.Future[PrefillResult]) -> None:
        """Let a prefill leg run on after its request answered; its outcome is counted by
        :meth:`_concurrent_prefill` and otherwise dropped."""
        self._detached.add(prefill)

        def done(task: asyncio.Future[PrefillResult]) -> None:
            self._detached.discard(task)
            if not task.cancelled():
                task.exception()  # retrieved: a failure is already counted

        prefill.add_done_callback(done)

    async def _concurrent_prefill(
        self, ctx: RequestContext, leg: LegContext, bound: float | None = None
    ) -> PrefillResult:
        """The prefill of concurrent legs; ``bound``: seconds the held decode waits for it."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            try:
                async with asyncio.timeout(bound):
                    _, result, _ = await self._prefill_once(ctx, leg.prefiller, paired=leg)
            except TimeoutError:
                raise PrefillTimeout(
                    f"prefill at {leg.prefiller} did not complete within {bound:g}s while"
                    " the decode waited for its KV"
                ) from None
            return result
        except PrefillError as exc:
            self.metrics.prefill_failures.labels(reason=exc.reason).inc()
            raise
        finally:
            self.metrics.prefill_seconds.observe(loop.time() - started)
