"""The decode stage: the leg on the local engine, relayed to the client.

A bounded wait for the first byte, then the answer relayed as it arrives with a bound
on the gap between chunks (usage rewritten to the prefill's cached-token count); or, with
``--decode-chunk-size``, a run of chunks; or a decode-first attempt the engine may
decline before any prefill. Nothing is retried once a byte went to the client.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Any

import aiohttp
from multidict import CIMultiDict

from common import deadlines
from common.json_codec import dumps
from sidecar import server, tracing
from sidecar.chunked_decode import (
    ChunkAnswer,
    ChunkedDecode,
    chunking_applies,
    run_chunked,
)
from sidecar.connectors import Connector, LegContext, PrefillResult
from sidecar.context import RequestContext
from sidecar.decode_first import FinishScan, Verdict
from sidecar.errors import DecodeError, DecodeTimeout, SidecarError
from sidecar.exchange import Exchange
from sidecar.headers import REQUEST_ID, TRACEPARENT, response_headers
from sidecar.metrics import Metrics
from sidecar.policy import MAX_PREFILL_ANSWER, Policy
from sidecar.relay import error_event, is_event_stream, relay_body
from sidecar.request_body import parse_json_object
from sidecar.server import StreamResponse
from sidecar.tracing import Stage, traced
from sidecar.upstream import Response, Upstream, read_bounded
from sidecar.usage import SseUsageRewriter, rewrite_json

__all__ = ["DecodeStage"]


class DecodeStage:
    """Decode legs on the local engine and the relay of their answers to the client."""

    def __init__(
        self, *, connector: Connector, upstream: Upstream, metrics: Metrics, policy: Policy
    ) -> None:
        self.connector = connector
        self.upstream = upstream
        self.metrics = metrics
        self.policy = policy

    def leg_headers(
        self, ctx: RequestContext, leg: LegContext, result: PrefillResult | None
    ) -> CIMultiDict[str] | None:
        """The decode leg's headers when the connector adds some (else None: the usual)."""
        extra = self.connector.decode_headers(leg, result)
        if not extra:
            return None
        headers = ctx.headers.copy()
        headers.update(extra)
        return headers

    async def generation_finished(self, ctx: RequestContext, leg: LegContext) -> StreamResponse:
        """The prefill's generation ended on its first token (EOS or a stop string), so it
        holds no KV to hand over. The answer a single engine gives is the decode engine's
        answer to the client's own body: a normal outcome, counted, never a 502."""
        ctx.ex.prefill_finish = "stopped"
        self.metrics.prefill_finished.inc()
        return await self.without_kv(ctx, leg, None)

    async def without_kv(
        self, ctx: RequestContext, leg: LegContext, note: Mapping[str, str] | None
    ) -> StreamResponse:
        """Decode the client's body (with the encode stage's output) on the local engine."""
        return await self.run(ctx, dumps(self.connector.local_body(leg)), note=note)

    async def open(
        self, ctx: RequestContext, body: bytes, headers: CIMultiDict[str] | None
    ) -> tuple[Response, bytes]:
        """Send the decode leg; return once its first body bytes (or its end) arrived."""
        leg_headers = (headers if headers is not None else ctx.headers).copy()
        leg_headers[TRACEPARENT] = ctx.ex.trace.leg_header()
        started = time.perf_counter()
        response, first = await self.upstream.open(
            "POST",
            ctx.decode_url,
            leg_headers,
            body,
            first_byte_timeout=self.policy.decode_first_byte_timeout,
            what="decode",
        )
        ctx.ex.decode_wait_s = time.perf_counter() - started
        self.metrics.decode_ttft_seconds.observe(ctx.ex.decode_wait_s)
        return response, first

    @traced(Stage.DECODE)
    async def run(
        self,
        ctx: RequestContext,
        body: bytes,
        *,
        cached: int | None = None,
        headers: CIMultiDict[str] | None = None,
        note: Mapping[str, str] | None = None,
        commit: asyncio.Future[PrefillResult] | None = None,
    ) -> StreamResponse:
        """The decode leg, relayed to the client; ``cached`` rewrites its usage, ``note``
        adds response headers, ``headers`` replaces the rewritten-body leg headers.
        With ``commit`` (a concurrent prefill) nothing is relayed before it succeeded."""
        # Every leg body keeps the client's budget: decided on the client's parsed body,
        # the leg's own is parsed only for a chunked decode.
        if chunking_applies(ctx.shape.path, ctx.body, self.policy.decode_chunk_size):
            decoded = parse_json_object(body)
            return await self._run_chunked(ctx, decoded, cached, note, headers, commit)
        response, first = await self.open(ctx, body, headers)
        if commit is not None:
            try:
                await asyncio.wait([commit])
            except BaseException:
                response.close()
                raise
            if commit.cancelled() or commit.exception() is not None:
                response.close()
                # The prefill failed: ConcurrentStage reports its error.
                raise asyncio.CancelledError
        return await self.relay(ctx, response, first, cached, note)

    async def _run_chunked(
        self,
        ctx: RequestContext,
        body: dict[str, Any],
        cached: int | None,
        note: Mapping[str, str] | None,
        headers: CIMultiDict[str] | None,
        commit: asyncio.Future[PrefillResult] | None,
    ) -> StreamResponse:
        """The decode leg as a run of chunks (:mod:`sidecar.chunked_decode`). Every chunk
        carries the decode leg's ``headers``; with ``commit`` (a concurrent prefill) the
        first chunk's answer is used only once the prefill succeeded."""

        state = ChunkedDecode(body, self.policy.decode_chunk_size)

        async def send(payload: bytes) -> ChunkAnswer:
            waited = ctx.ex.decode_wait_s
            response, first = await self.open(ctx, payload, headers)
            if state.chunks:  # the access log keeps the first chunk's wait
                ctx.ex.decode_wait_s = waited
            complete = False
            try:
                rest = await self.read_rest(response, first)
                complete = True
            finally:
                if complete:
                    response.release()
                else:
                    response.close()
            if commit is not None and not state.chunks:
                await asyncio.wait([commit])
                if commit.cancelled() or commit.exception() is not None:
                    # The prefill failed: ConcurrentStage reports its error.
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
            on_abort=self.end_aborted_stream,
        )

    @traced(Stage.DECODE_FIRST)
    async def first(
        self, ctx: RequestContext, body: bytes, decline_reason: str
    ) -> StreamResponse | None:
        """Try the decode before any prefill; None when it declined (nothing was sent)."""
        response, first = await self.open(ctx, body, None)
        held = [first]
        verdict = Verdict.ACCEPTED  # an error answer is the client's answer
        try:
            if 200 <= response.status < 300:
                scan = FinishScan(decline_reason, sse=is_event_stream(response))
                verdict = scan.feed(first) if first else scan.end()
                async with deadlines.timeout(self.policy.stream_idle_timeout):
                    while verdict is Verdict.PENDING:
                        chunk = await response.content.readany()
                        held.append(chunk)
                        verdict = scan.feed(chunk) if chunk else scan.end()
                    if verdict is Verdict.DECLINED:
                        # Read the (short) rest so the pooled connection stays usable.
                        await read_bounded(response, MAX_PREFILL_ANSWER)
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
        return await self.relay(ctx, response, b"".join(held), None, None)

    async def relay(
        self,
        ctx: RequestContext,
        response: Response,
        first: bytes,
        cached: int | None,
        extra_headers: Mapping[str, str] | None,
    ) -> StreamResponse:
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
                out = StreamResponse(
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
                    await self.end_aborted_stream(out, ex)
                    return out
                complete = True
                return out
            rest = await self.read_rest(response, first)
            complete = True
            if rewrite and cached is not None and response.content_type == "application/json":
                rest = rewrite_json(shape, rest, cached)
            tracing.note_answer(rest, response.content_type)
            ex.first_byte()
            return server.Response(
                status=response.status, reason=response.reason, headers=out_headers, body=rest
            )
        finally:
            if complete:
                response.release()
            else:
                response.close()

    async def end_aborted_stream(self, out: StreamResponse, ex: Exchange) -> None:
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

    async def read_rest(self, response: Response, first: bytes) -> bytes:
        content = response.content
        chunks = [first]
        try:
            if not first or content.is_eof():
                # Everything arrived with the first read: no timer needed.
                rest = content.read_nowait() if first else b""
                return first + rest if rest else first
            async with deadlines.timeout(self.policy.stream_idle_timeout):
                while chunks[-1]:
                    chunks.append(await content.readany())
        except TimeoutError:
            raise DecodeTimeout(
                f"decode answer stalled for more than {self.policy.stream_idle_timeout:g}s"
            ) from None
        except aiohttp.ClientError as exc:
            raise DecodeError(f"decode answer broken: {exc!r}") from None
        return b"".join(chunks)
