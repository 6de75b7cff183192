"""Per-request metrics and the request span, from what crosses one ext_proc stream.

A ``RequestRecord`` watches the messages of one stream go by (``received`` for the
gateway's, ``sent`` for the EPP's) and ``finish`` closes it, however the stream ended.
It never changes a message. From them it records llm-d's request families (count, size,
running, errors by ``error_code``, duration, TTFT, TPOT, inter-token latency, tokens
from the response's ``usage``) and the EPP processing overhead, and keeps the
``gateway.request`` span (``epp.tracing``) open for the life of the stream.

Times are the EPP's view, as llm-d measures them: from the request headers reaching the
EPP to the first response body chunk (TTFT) and to the response's last chunk.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from time import perf_counter
from typing import TYPE_CHECKING, Any

from epp.extproc.headers import header_dict
from epp.metrics import MODEL_SERVER_ERROR, error_code
from epp.tracing import Tracing

if TYPE_CHECKING:
    from prometheus_client import Histogram

    from epp._proto.disagg_extproc_pb2 import ProcessingRequest, ProcessingResponse
    from epp.extproc.context import RequestContext
    from epp.metrics import EppMetrics
    from epp.tracing import RequestSpan

__all__ = ["FAIRNESS_HEADERS", "RequestRecord", "RequestTelemetry", "parse_usage"]

log = logging.getLogger("epp.extproc")

# The flow-control fairness id, current header first (llm-d's names and default).
FAIRNESS_HEADERS = ("x-llm-d-inference-fairness-id", "x-gateway-inference-fairness-id")
DEFAULT_FAIRNESS_ID = "default-flow"
# Without an InferenceObjective a request has llm-d's default priority, 0.
DEFAULT_PRIORITY = "0"
# The end of a response kept to find its usage block in (the usage comes last).
_TAIL_BYTES = 64 * 1024
_USAGE = b'"usage"'
_DECODER = json.JSONDecoder()


@dataclass(frozen=True, slots=True)
class Usage:
    prompt: int = 0
    completion: int = 0
    cached: int | None = None


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def parse_usage(tail: bytes) -> Usage | None:
    """The last ``usage`` object in the end of a response (JSON or SSE), if any.

    OpenAI shapes (``prompt_tokens``, ``completion_tokens``,
    ``prompt_tokens_details.cached_tokens``) and Anthropic's (``input_tokens``,
    ``output_tokens``, ``cache_read_input_tokens``).
    """
    at = tail.rfind(_USAGE)
    while at >= 0:
        text = tail[at + len(_USAGE) :].decode("utf-8", "replace").lstrip()
        if text.startswith(":"):
            try:
                value, _ = _DECODER.raw_decode(text[1:].lstrip())
            except ValueError:
                value = None
            if isinstance(value, dict):
                details = value.get("prompt_tokens_details")
                cached = details.get("cached_tokens") if isinstance(details, dict) else None
                if cached is None:
                    cached = value.get("cache_read_input_tokens")
                return Usage(
                    prompt=_int(value.get("prompt_tokens")) or _int(value.get("input_tokens")),
                    completion=_int(value.get("completion_tokens"))
                    or _int(value.get("output_tokens")),
                    cached=cached if isinstance(cached, int) and cached >= 0 else None,
                )
        at = tail.rfind(_USAGE, 0, at)
    return None


class RequestTelemetry:
    """What every stream's record shares: the metric families and the tracer."""

    def __init__(self, metrics: EppMetrics, tracing: Tracing | None = None) -> None:
        self.metrics = metrics
        self.tracing = tracing if tracing is not None else Tracing()

    def start(self) -> RequestRecord:
        return RequestRecord(self)


class RequestRecord:
    """The telemetry of one ext_proc stream (one HTTP request)."""

    __slots__ = (
        "_admitted",
        "_first_chunk",
        "_itl",
        "_labels_value",
        "_last_chunk",
        "_model_counted",
        "_response_done",
        "_response_processing",
        "_response_size",
        "_span",
        "_started",
        "_status",
        "_streaming",
        "_tail",
        "_telemetry",
        "code",
        "refused_status",
    )

    def __init__(self, telemetry: RequestTelemetry) -> None:
        self._telemetry = telemetry
        self._started = perf_counter()
        self._span: RequestSpan | None = None
        self._admitted = False
        self._model_counted = False
        self._status = 0
        self._streaming = False
        self._first_chunk = 0.0
        self._last_chunk = 0.0
        self._response_done = 0.0
        self._response_size = 0
        self._response_processing = 0.0
        self._tail = bytearray()
        # The inter-token latency series of this request, once its labels are known.
        self._itl: Histogram | None = None
        self._labels_value = ("", "", DEFAULT_FAIRNESS_ID, DEFAULT_PRIORITY)
        # The gRPC status the stream ends with (for the stream metrics).
        self.code = "OK"
        self.refused_status = 0
        streams = telemetry.metrics.streams_inflight
        if streams is not None:
            streams.inc()

    # -- the gateway's messages -----------------------------------------------------------

    def received(
        self, ctx: RequestContext, request: ProcessingRequest, kind: str | None = None
    ) -> None:
        """``kind``: the message's ``request`` field, when the caller has it already."""
        if kind is None:
            kind = request.WhichOneof("request")
        if kind == "response_body":
            body = request.response_body
            self._response_chunk(body.body, body.end_of_stream)
        elif kind == "request_headers":
            tracing = self._telemetry.tracing
            if tracing.enabled and self._span is None:
                headers = header_dict(request.request_headers.headers)
                self._span = tracing.start_request(headers)
                if self._span is not None:
                    self._span.set({"http.request.path": headers.get(":path")})
        elif kind == "response_headers":
            headers = header_dict(request.response_headers.headers)
            status = headers.get(":status", "")
            self._status = int(status) if status.isdigit() else 0
            self._streaming = "text/event-stream" in headers.get("content-type", "")
            if request.response_headers.end_of_stream:
                self._response_done = perf_counter()

    def _response_chunk(self, body: bytes, end: bool) -> None:
        now = perf_counter()
        if body:
            if not self._first_chunk:
                self._first_chunk = now
            elif self._streaming and self._admitted:
                itl = self._itl
                if itl is None:
                    # The labels are fixed once the request is admitted.
                    itl = self._itl = self._telemetry.metrics.itl.labels(*self._labels)
                itl.observe(now - self._last_chunk)
            self._last_chunk = now
            self._response_size += len(body)
            tail = self._tail
            tail += body
            # Trimmed to the last _TAIL_BYTES only when twice that accumulated, so a long
            # response does not move the whole window on every chunk.
            if len(tail) > 2 * _TAIL_BYTES:
                del tail[:-_TAIL_BYTES]
        if end:
            self._response_done = now
        self._response_processing += perf_counter() - now

    # -- the EPP's messages ---------------------------------------------------------------

    def sent(self, ctx: RequestContext, response: ProcessingResponse) -> None:
        kind = response.WhichOneof("response")
        if kind == "immediate_response":
            self.refused_status = int(response.immediate_response.status.code)
            self._count_model(ctx)
            if self._span is not None:
                self._span.set({"llm_d.epp.dropped_reason": response.immediate_response.details})
                self._span.fail(response.immediate_response.details or "refused")
        elif not self._admitted and ctx.decision is not None:
            self._admit(ctx)

    def _admit(self, ctx: RequestContext) -> None:
        self._admitted = True
        self._count_model(ctx)
        m = self._telemetry.metrics
        labels = self._labels
        m.running.labels(*labels).inc()
        m.legacy_running.labels(labels[0]).inc()
        processing = perf_counter() - self._started
        m.request_processing.observe(processing)
        log.debug("request %s: routed %.2f ms after its stream opened", ctx.request_id,
                  processing * 1000)  # fmt: skip
        size = len(ctx.body)
        m.request_size.labels(*labels).observe(size)
        m.legacy_request_size.labels(*labels[:2]).observe(size)
        decision = ctx.decision
        if self._span is not None and decision is not None:
            self._span.set(
                {
                    "gen_ai.request.model": decision.model or None,
                    "llm_d.epp.decision_type": decision.decision_type,
                    "llm_d.epp.endpoint": decision.decode,
                    "llm_d.epp.pd.prefill_endpoint": decision.prefill,
                    "llm_d.epp.encode.endpoints": ",".join(decision.encoders) or None,
                    "llm_d.epp.fallback_endpoints": ",".join(decision.decode_fallbacks) or None,
                }
            )

    def _count_model(self, ctx: RequestContext) -> None:
        if self._model_counted:
            return
        self._model_counted = True
        decision = ctx.decision
        model = decision.model if decision is not None else ctx.model
        fairness = next((ctx.headers[h] for h in FAIRNESS_HEADERS if ctx.headers.get(h)), "")
        m = self._telemetry.metrics
        model, fairness = m.bound(model, fairness or DEFAULT_FAIRNESS_ID)
        target, priority = model, DEFAULT_PRIORITY
        if decision is not None:
            if decision.target_model and decision.target_model != model:
                target = m.models(decision.target_model)
            priority = str(decision.priority)
        self._labels_value = (model, target, fairness, priority)
        if model:
            m.request_total.labels(*self._labels).inc()
            m.legacy_request_total.labels(model, model, DEFAULT_PRIORITY).inc()

    @property
    def _labels(self) -> tuple[str, str, str, str]:
        return self._labels_value

    # -- the end --------------------------------------------------------------------------

    def finish(self, ctx: RequestContext) -> None:
        """The stream is over (any way): record what the request amounted to."""
        m = self._telemetry.metrics
        if not self._model_counted and (ctx.model or ctx.decision is not None):
            self._count_model(ctx)
        labels = self._labels
        code = ""
        if self.refused_status:
            code = error_code(self.refused_status)
        elif self._status >= 400:
            code = MODEL_SERVER_ERROR
        if code:
            m.request_errors.labels(*labels, code).inc()
            m.legacy_request_errors.labels(labels[0], labels[1], code).inc()
        if self._admitted:
            m.running.labels(*labels).dec()
            m.legacy_running.labels(labels[0]).dec()
            if self._response_done:
                usage = self._record_response(labels)
                if usage is not None and ctx.decision is not None:
                    ctx.decision.on_usage(usage.prompt, usage.completion)
        if self._span is not None:
            if self._status >= 400:
                self._span.fail(f"model server answered {self._status}")
            self._span.set({"http.response.status_code": self._status or self.refused_status})
            self._span.end()
        if m.streams_inflight is not None:
            m.streams_inflight.dec()
            assert m.stream_duration is not None
            assert m.streams_total is not None
            m.stream_duration.observe(perf_counter() - self._started)
            m.streams_total.labels(self.code).inc()

    def _record_response(self, labels: tuple[str, str, str, str]) -> Usage | None:
        m = self._telemetry.metrics
        e2e = self._response_done - self._started
        pair = labels[:2]
        m.request_duration.labels(*labels).observe(e2e)
        m.legacy_request_duration.labels(*pair).observe(e2e)
        m.response_size.labels(*labels).observe(self._response_size)
        m.legacy_response_size.labels(*pair).observe(self._response_size)
        m.response_processing.observe(self._response_processing)
        if self._first_chunk:
            streaming = "true" if self._streaming else "false"
            m.ttft.labels(*labels, streaming).observe(self._first_chunk - self._started)
        usage = parse_usage(bytes(memoryview(self._tail)[-_TAIL_BYTES:])) if self._tail else None
        if usage is None:
            return None
        if usage.prompt:
            m.input_tokens.labels(*labels).observe(usage.prompt)
            m.legacy_input_tokens.labels(*pair).observe(usage.prompt)
        if usage.cached is not None:
            m.cached_tokens.labels(*labels).observe(usage.cached)
            m.legacy_cached_tokens.labels(*pair).observe(usage.cached)
        if usage.completion:
            m.output_tokens.labels(*labels).observe(usage.completion)
            m.legacy_output_tokens.labels(*pair).observe(usage.completion)
            m.ntpot.labels(*labels).observe(e2e / usage.completion)
            m.legacy_ntpot.labels(*pair).observe(e2e / usage.completion)
            first = self._first_chunk
            if self._streaming and first and usage.completion > 1 and self._response_done > first:
                m.tpot.labels(*labels).observe(
                    (self._response_done - first) / (usage.completion - 1)
                )
        return usage
