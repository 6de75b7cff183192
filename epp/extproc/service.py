"""The ext_proc service: a thin loop from Envoy's stream to the per-kind handlers."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

import grpc

from epp._proto.disagg_extproc_pb2 import ProcessingRequest, ProcessingResponse
from epp.extproc.context import RequestContext, StreamEnv
from epp.extproc.handlers import HANDLERS, ProtocolViolation
from epp.extproc.responses import immediate_response
from epp.flowcontrol.eviction import EVICTED_REASON

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from epp.decision import DecisionMaker
    from epp.extproc.config import ExtProcConfig
    from epp.metrics import EppMetrics
    from epp.request_telemetry import RequestTelemetry

__all__ = ["EXTPROC_METHOD", "EXTPROC_SERVICE", "ExtProcService"]

log = logging.getLogger("epp.extproc")

# Envoy calls this path; the message types behind it are our own (epp._proto).
EXTPROC_SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"
EXTPROC_METHOD = f"/{EXTPROC_SERVICE}/Process"


class ExtProcService:
    """Serves ``Process``: one bidirectional stream per HTTP request."""

    def __init__(
        self,
        decision_maker: DecisionMaker,
        metrics: EppMetrics,
        config: ExtProcConfig,
        telemetry: RequestTelemetry | None = None,
    ) -> None:
        from epp.request_telemetry import RequestTelemetry

        self._env = StreamEnv(
            decision_maker=decision_maker,
            metrics=metrics,
            config=config,
            telemetry=telemetry if telemetry is not None else RequestTelemetry(metrics),
        )

    def register(self, server: grpc.aio.Server) -> None:
        """Add the ``Process`` method to ``server`` under Envoy's service name."""
        handlers = {
            "Process": grpc.stream_stream_rpc_method_handler(
                self.process,
                request_deserializer=ProcessingRequest.FromString,
                response_serializer=ProcessingResponse.SerializeToString,
            )
        }
        server.add_registered_method_handlers(EXTPROC_SERVICE, handlers)

    async def process(
        self, requests: AsyncIterator[ProcessingRequest], context: grpc.aio.ServicerContext
    ) -> None:
        """One stream, read and answered through ``context`` (gRPC's reader/writer API:
        no async generator between a message and its answer). ``requests`` is unused."""
        ctx = RequestContext.new(self._env)
        record = self._env.telemetry.start()
        stream = _Stream(context)
        try:
            while True:
                request = await stream.next(ctx)
                if request is None:
                    return
                if request is _EVICTED:
                    ctx.ended = True
                    response = evicted_response(ctx)
                    record.sent(ctx, response)
                    await stream.write(response)
                    return
                assert isinstance(request, ProcessingRequest)
                kind = request.WhichOneof("request")
                handler = HANDLERS.get(kind or "")
                if handler is None:
                    raise ProtocolViolation(f"message without a known kind ({kind})")
                ctx.observe(request)
                record.received(ctx, request, kind)
                for response in await handler(ctx, request):
                    record.sent(ctx, response)
                    await stream.write(response)
                if ctx.ended:
                    return
        except asyncio.CancelledError:
            # The gateway reset the stream (its client went away, or it gave up on us).
            log.debug("request %s: ext_proc stream cancelled by the gateway", ctx.request_id)
            record.code = "Canceled"
            raise
        except ProtocolViolation as err:
            log.warning("request %s: ext_proc protocol violation: %s", ctx.request_id, err)
            ctx.ended = True
            record.code = "InvalidArgument"
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        except grpc.aio.BaseError as err:
            if stream.write_failed:
                # The gateway is gone while an answer was going out: it ended the stream
                # early, and gRPC ends the RPC.
                raise
            # The RPC itself is over (the server is stopping, or the stream broke): nothing
            # can be sent on it any more, so this is not a handler failure. gRPC ends it.
            log.info(
                "request %s: ext_proc stream ended early: %s",
                ctx.request_id,
                str(err) or type(err).__name__,
            )
            ctx.ended = True
            raise
        except Exception:
            # A bug here must cost one request a clean 500, not the gateway a broken stream.
            log.exception("request %s: ext_proc handler failed", ctx.request_id)
            ctx.ended = True
            response = immediate_response(
                500, "internal_error", "internal error in the endpoint picker"
            )
            record.sent(ctx, response)
            await stream.write(response)
        finally:
            stream.close()
            if not ctx.ended and not ctx.response_ended:
                _ended_early(ctx)
            ctx.finish()
            record.finish(ctx)


_EVICTED = object()


class _Stream:
    """Envoy's messages, raced against the request's eviction signal once flow control
    may evict it (other requests read the stream directly), and the EPP's answers.

    The race costs no task per message: the signal's one waiter cancels the read in
    flight when it fires, and that cancellation (only that one) becomes ``_EVICTED``.
    """

    __slots__ = ("_context", "_evicted", "_interrupted", "_reader", "write_failed")

    def __init__(self, context: grpc.aio.ServicerContext) -> None:
        self._context = context
        self._evicted: asyncio.Task[bool] | None = None
        # The task blocked in a read that the eviction signal may interrupt.
        self._reader: asyncio.Task[Any] | None = None
        self._interrupted = False
        # Set when sending an answer failed (the RPC is over).
        self.write_failed = False

    async def next(self, ctx: RequestContext) -> ProcessingRequest | object | None:
        """The next message; None once the gateway closed its side."""
        item = ctx.decision.eviction if ctx.decision is not None else None
        if item is None or ctx.response_ended:
            return _message(await self._context.read())
        if item.signal.is_set():
            return _EVICTED
        if self._evicted is None:
            self._evicted = asyncio.ensure_future(item.signal.wait())
            self._evicted.add_done_callback(self._interrupt)
        task = asyncio.current_task()
        self._reader = task
        try:
            return _message(await self._context.read())
        except asyncio.CancelledError:
            # Ours alone (the gateway's reset cancels too): the stream is evicted.
            if self._interrupted and task is not None and task.uncancel() == 0:
                return _EVICTED
            raise
        finally:
            self._reader = None

    def _interrupt(self, signal: asyncio.Future[Any]) -> None:
        if signal.cancelled() or self._reader is None:
            return  # not reading: the next read sees the signal set
        self._interrupted = True
        self._reader.cancel()

    async def write(self, response: ProcessingResponse) -> None:
        try:
            await self._context.write(response)
        except grpc.aio.BaseError:
            self.write_failed = True
            raise

    def close(self) -> None:
        if self._evicted is not None:
            self._evicted.cancel()


def _message(message: object) -> ProcessingRequest | None:
    return None if message is grpc.aio.EOF else message  # type: ignore[return-value]


def evicted_response(ctx: RequestContext) -> ProcessingResponse:
    item = ctx.decision.eviction if ctx.decision is not None else None
    reason = (item.reason if item is not None else "") or EVICTED_REASON
    log.info("request %s: evicted by flow control (%s)", ctx.request_id, reason)
    return immediate_response(429, reason, "request evicted by flow control")


def _ended_early(ctx: RequestContext) -> None:
    """The gateway closed or reset the stream before the response ended.

    (gRPC reports a client's reset to the handler as the end of its messages, so a
    half-close and a reset look alike here.)
    """
    if ctx.decision is None:
        stage = "before_routing"
        # Nothing was routed, so no other component logs this request.
        log.info(
            "request %s %s: the gateway ended the ext_proc stream before it was routed",
            ctx.request_id,
            ctx.path or "-",
        )
    else:
        stage = "after_routing"  # the client went away; the pods log the rest
        log.debug("request %s: ext_proc stream ended before the response did", ctx.request_id)
    ctx.env.metrics.streams_ended_early.labels(stage=stage).inc()
