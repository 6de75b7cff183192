"""OpenTelemetry tracing of the sidecar (``--tracing``), with llm-d's span tree and names.

- every request: a SERVER span ``llm_d.pd_proxy.<METHOD> <path>`` (what Go's otelhttp
  handler makes in llm-d, with its HTTP semantic-convention attributes), a child of the
  trace the request arrived with (W3C ``traceparent``, ``baggage``) or the root of a new
  trace;
- a generation request (the API paths of :mod:`sidecar.api_shapes`): its child SERVER
  span ``forward_request`` (the access log's ``trace_id`` is its trace), holding the
  INTERNAL stage spans ``encode``, ``prefill`` (once per attempt, so retries show as
  siblings), ``decode_first`` (a decode tried before any prefill) and ``decode``, which,
  as in llm-d, is a child of the latest prefill span (siblings under MoRI-IO parallel
  dispatch); a chunked decode adds ``chunked_decode`` under ``decode``; a decode-only
  request has its ``decode`` span too. Mooncake, offloading and parallel dispatch name
  the legs ``llm_d.pd_proxy.prefill`` and ``llm_d.pd_proxy.decode``, as llm-d does;
- every HTTP request sent upstream: a CLIENT span ``HTTP <METHOD>`` under the span
  current when it is sent (otelhttp's transport in llm-d), ended with the answer's body;
  its context is the ``traceparent`` sent, so the engines' own spans join the trace
  (:func:`send_traced`, called by :class:`sidecar.upstream.Upstream`).

Attributes are llm-d's (``llm_d.pd_proxy.*``, ``llm_d.ec_proxy.*``, ``llm_d.openai.api``)
plus a few of ours where llm-d has none (listed in the README) and the GenAI conventions'
``gen_ai.request.model`` and ``gen_ai.usage.*`` where the sidecar sees them (JSON answers,
SSE usage events). A failed stage, or a request answered 5xx, has status ERROR.

Exporter, sampler and resource come from the ``OTEL_*`` environment
(:mod:`common.tracing`), default service name ``llm-d-disagg-sidecar``. Without
``--tracing`` none of this is installed: each hook costs one context-variable read.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, Protocol, TypeVar
from urllib.parse import urlsplit

from multidict import CIMultiDict
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from yarl import URL

from common.json_codec import loads
from common.tracing import PROPAGATOR, provider_from_environment
from sidecar.errors import SidecarError, TargetForbidden
from sidecar.headers import CURRENT_SPAN_TRACEPARENT, TRACEPARENT, TraceContext
from sidecar.routing import DATA_PARALLEL_HOST_PORT
from sidecar.server import Request, Response, StreamResponse

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

    from sidecar.context import RequestContext
    from sidecar.exchange import Exchange

__all__ = [
    "REQUEST_SPAN",
    "SERVICE_NAME",
    "SidecarTracing",
    "Stage",
    "note",
    "note_answer",
    "note_request_body",
    "note_usage",
    "traced",
]

SERVICE_NAME = "llm-d-disagg-sidecar"
SCOPE = "llm-d-router/pkg/sidecar/proxy"
REQUEST_SPAN = "forward_request"

# llm-d's names for the API a path belongs to (llm_d.openai.api).
_API_TYPES = {
    "/v1/chat/completions": "chat_completions",
    "/v1/completions": "chat_completions",
    "/v1/messages": "chat_completions",
    "/v1/responses": "responses",
    "/inference/v1/generate": "generate",
}


class Stage(enum.Enum):
    ENCODE = "encode"
    PREFILL = "prefill"
    DECODE = "decode"
    DECODE_FIRST = "decode_first"


# Connectors whose legs llm-d names with its attribute prefix.
_PREFIXED_LEG_NAMES = frozenset({"mooncake", "offloading"})


def span_names(kv_connector: str, parallel_dispatch: bool = False) -> dict[Stage, str]:
    names = {stage: stage.value for stage in Stage}
    if kv_connector in _PREFIXED_LEG_NAMES or parallel_dispatch:
        names[Stage.PREFILL] = "llm_d.pd_proxy.prefill"
        names[Stage.DECODE] = "llm_d.pd_proxy.decode"
    return names


def traceparent(span: Span) -> str:
    """The W3C traceparent naming ``span`` as the parent."""
    sc = span.get_span_context()
    return f"00-{sc.trace_id:032x}-{sc.span_id:016x}-{int(sc.trace_flags):02x}"


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def _usage(payload: object) -> Mapping[str, Any] | None:
    """The usage object of an answer: at the top, or in a Responses/Anthropic envelope."""
    if not isinstance(payload, Mapping):
        return None
    for holder in (payload, payload.get("response"), payload.get("message")):
        usage = holder.get("usage") if isinstance(holder, Mapping) else None
        if isinstance(usage, Mapping):
            return usage
    return None


def usage_attributes(payload: object) -> dict[str, int]:
    """``gen_ai.usage.input_tokens`` / ``output_tokens`` from an answer's usage, if any."""
    usage = _usage(payload)
    out: dict[str, int] = {}
    if usage is None:
        return out
    for names, key in (
        (("prompt_tokens", "input_tokens"), "gen_ai.usage.input_tokens"),
        (("completion_tokens", "output_tokens"), "gen_ai.usage.output_tokens"),
    ):
        for name in names:
            value = usage.get(name)
            if isinstance(value, int) and not isinstance(value, bool):
                out[key] = value
                break
    return out


@dataclass(slots=True)
class _Request:
    """The traced request being served in this task: its server span (``server``) and,
    on a generation path, its ``forward_request`` span (``span``)."""

    tracing: SidecarTracing
    server: Span
    span: Span | None = None
    usage: dict[str, int] = field(default_factory=dict)  # token counts seen on the legs
    prefill: Span | None = None  # the latest prefill attempt: the decode span's parent
    decode_ms: float | None = None
    clients: list[Span] = field(default_factory=list)  # client spans, ended at the latest here


_ACTIVE: ContextVar[_Request | None] = ContextVar("sidecar_traced_request", default=None)


def _set(span: Span, attributes: Mapping[str, Any]) -> None:
    if span.is_recording():
        span.set_attributes({k: v for k, v in attributes.items() if v is not None})


def note(key: str, value: Any) -> None:
    """Set an attribute on the span current in this task (a stage's, else the request's)."""
    if _ACTIVE.get() is not None and value is not None:
        trace.get_current_span().set_attribute(key, value)


def note_request_body(body: Mapping[str, Any]) -> None:
    """The client's parsed body: the request span gets ``gen_ai.request.model``."""
    active = _ACTIVE.get()
    if active is not None and active.span is not None:
        model = body.get("model")
        if isinstance(model, str):
            active.span.set_attribute("gen_ai.request.model", model)


_INPUT = "gen_ai.usage.input_tokens"
_OUTPUT = "gen_ai.usage.output_tokens"


def note_usage(payload: object) -> None:
    """The prefill's parsed answer: its token counts on its span, and its prompt count
    (the one the client is billed for) on the request's."""
    active = _ACTIVE.get()
    if active is None:
        return
    counts = usage_attributes(payload)
    if counts:
        trace.get_current_span().set_attributes(counts)
        if _INPUT in counts:
            active.usage[_INPUT] = counts[_INPUT]


def note_answer(body: bytes, content_type: str) -> None:
    """A whole JSON answer relayed to the client: its token counts, when traced."""
    active = _ACTIVE.get()
    if active is None or content_type != "application/json" or b'"usage"' not in body:
        return
    if not trace.get_current_span().is_recording():
        return
    try:
        payload = loads(body)
    except ValueError:
        return
    note_final_usage(payload)


def note_final_usage(payload: object) -> None:
    """An answer's usage the sidecar assembled or saw go by (an SSE usage event, a
    chunked decode's total): its token counts on the current span and the request's."""
    active = _ACTIVE.get()
    if active is None:
        return
    counts = usage_attributes(payload)
    if counts:
        trace.get_current_span().set_attributes(counts)
        if _OUTPUT in counts:
            active.usage[_OUTPUT] = counts[_OUTPUT]
        if _INPUT in counts:
            active.usage.setdefault(_INPUT, counts[_INPUT])  # the prefill's count first


def _watch_events(data: bytes) -> None:
    if b'"usage"' not in data:
        return
    for line in reversed(data.split(b"\n")):
        if line.startswith(b"data:") and b'"usage"' in line:
            try:
                payload = loads(line[5:].strip())
            except ValueError:
                return
            if _usage(payload) is not None:
                note_final_usage(payload)
                return


_WATCHED_JSON_LIMIT = 1 << 20  # a larger JSON answer's usage is not read


class UsageWatcher:
    """Reads the usage of an answer relayed chunk by chunk: each SSE event as it passes,
    or a JSON body (up to 1 MiB) once whole."""

    __slots__ = ("_held", "_size", "_sse")

    def __init__(self, sse: bool) -> None:
        self._sse = sse
        self._held: list[bytes] | None = None if sse else []
        self._size = 0

    def feed(self, data: bytes) -> None:
        if self._held is None:
            if self._sse:
                _watch_events(data)
            return
        self._size += len(data)
        if self._size > _WATCHED_JSON_LIMIT:
            self._held = None
        else:
            self._held.append(data)

    def close(self) -> None:
        if self._held is not None:
            note_answer(b"".join(self._held), "application/json")
            self._held = None


def usage_watcher(sse: bool, content_type: str) -> UsageWatcher | None:
    """For a traced generation request, what reads the usage of the answer relayed (SSE
    in whole events, or JSON, by the answer's ``content_type``); None otherwise."""
    active = _ACTIVE.get()
    if active is None or active.span is None or not trace.get_current_span().is_recording():
        return None
    if not sse and content_type != "application/json":
        return None
    return UsageWatcher(sse)


def is_traced() -> bool:
    """Whether the request served in this task is a traced generation request."""
    active = _ACTIVE.get()
    return active is not None and active.span is not None


async def chunked_decode(
    chunk_size: int,
    streaming: bool,
    run: Callable[[], Awaitable[StreamResponse]],
    progress: Callable[[], tuple[int, int]],
) -> StreamResponse:
    """Run a chunked decode under llm-d's ``chunked_decode`` span (a child of the decode
    span); ``progress`` gives (chunks sent, tokens generated) at the end."""
    active = _ACTIVE.get()
    assert active is not None
    span = active.tracing.tracer.start_span(
        "chunked_decode",
        kind=SpanKind.INTERNAL,
        attributes={
            "llm_d.pd_proxy.chunked_decode.chunk_size": chunk_size,
            "llm_d.pd_proxy.chunked_decode.streaming": streaming,
        },
    )
    started = time.perf_counter()
    try:
        with _current(span):
            response = await run()
        if response.status >= 400:
            span.set_status(Status(StatusCode.ERROR, "chunk decode failed"))
        return response
    except BaseException as failure:
        _fail(span, failure, reason=False)
        raise
    finally:
        chunks, tokens = progress()
        _set(span, {"llm_d.pd_proxy.chunked_decode.chunks": chunks,
                    "llm_d.pd_proxy.chunked_decode.total_tokens": tokens,
                    "llm_d.pd_proxy.chunked_decode.duration_ms":
                        _ms(time.perf_counter() - started)})  # fmt: skip
        span.end()


@contextlib.contextmanager
def _current(span: Span, parent: otel_context.Context | None = None) -> Iterator[None]:
    """Make ``span`` current in this task: the parent of later spans and of the legs."""
    token = otel_context.attach(trace.set_span_in_context(span, parent))
    leg_token = CURRENT_SPAN_TRACEPARENT.set(traceparent(span))
    try:
        yield
    finally:
        CURRENT_SPAN_TRACEPARENT.reset(leg_token)
        otel_context.detach(token)


def _fail(span: Span, failure: BaseException, *, reason: bool = True) -> None:
    if not isinstance(failure, Exception):  # cancelled: the client left, or a leg was stopped
        span.set_status(Status(StatusCode.ERROR, "cancelled"))
        return
    error = getattr(failure, "error", failure)  # a Retryable carries the stage's error
    message = getattr(error, "message", None) or str(error) or type(error).__name__
    span.set_status(Status(StatusCode.ERROR, message))
    if reason:
        _set(span, {"llm_d.pd_proxy.error": getattr(error, "reason", None) or type(error).__name__})


def _end(span: Span) -> None:
    """End ``span`` unless it has ended already (a recording span stops recording then)."""
    if span.is_recording():
        span.end()


def _default_port(port: int | None, https: bool) -> bool:
    return port is None or port == (443 if https else 80)


def server_request_attributes(request: Request) -> dict[str, Any]:
    """The HTTP semantic-convention attributes of a received request, as Go's otelhttp
    handler sets them on llm-d's server span."""
    https = request.secure
    try:
        authority = URL.build(authority=request.host)
        host, port = authority.host or "", authority.explicit_port
    except ValueError:
        host, port = request.host, None
    attributes: dict[str, Any] = {
        "server.address": host,
        "http.request.method": request.method,
        "url.scheme": "https" if https else "http",
    }
    if not _default_port(port, https):
        attributes["server.port"] = port
    peer = request.transport.get_extra_info("peername") if request.transport is not None else None
    peer_address = None
    if isinstance(peer, tuple) and len(peer) >= 2:
        peer_address = str(peer[0])
        attributes["network.peer.address"] = peer_address
        attributes["network.peer.port"] = int(peer[1])
    agent = request.headers.get("User-Agent")
    if agent:
        attributes["user_agent.original"] = agent
    forwarded = request.headers.get("X-Forwarded-For", "").split(",")[0].strip()
    client = forwarded or peer_address
    if client:
        attributes["client.address"] = client
    if request.path:
        attributes["url.path"] = request.path
    attributes["network.protocol.version"] = f"{request.version.major}.{request.version.minor}"
    return attributes


def server_response_attributes(
    request: Request, response: StreamResponse | None, status: int
) -> dict[str, Any]:
    attributes: dict[str, Any] = {}
    if request.content_length:
        attributes["http.request.body.size"] = request.content_length
    if response is not None:
        size = response.body_length
        if not size and isinstance(response, Response) and isinstance(response.body, bytes):
            size = len(response.body)
        if size:
            attributes["http.response.body.size"] = size
    if status:
        attributes["http.response.status_code"] = status
    return attributes


def client_request_attributes(method: str, url: URL) -> dict[str, Any]:
    """The HTTP semantic-convention attributes of a sent request, as Go's otelhttp
    transport sets them on its client span."""
    https = url.scheme == "https"
    attributes: dict[str, Any] = {
        "http.request.method": method,
        "url.full": str(url.with_user(None)),
        "server.address": url.raw_host or "",
    }
    if not _default_port(url.explicit_port, https):
        attributes["server.port"] = url.explicit_port
    attributes["network.protocol.version"] = "1.1"
    return attributes


def client_tracing() -> SidecarTracing | None:
    """The tracing of the request served in this task, or None (not traced): the one
    check the upstream layer makes before each send."""
    active = _ACTIVE.get()
    return None if active is None else active.tracing


class _Answer(Protocol):
    """What :func:`send_traced` reads of an answer (aiohttp's or the HTTP/1.1 client's)."""

    @property
    def status(self) -> int: ...

    @property
    def content(self) -> Any: ...


_A = TypeVar("_A", bound=_Answer)


async def send_traced(
    send: Callable[[str, str, CIMultiDict[str], Any], Awaitable[_A]],
    method: str,
    url: str,
    headers: CIMultiDict[str],
    body: Any,
) -> _A:
    """Send one HTTP request under a CLIENT span ``HTTP <METHOD>``, a child of the span
    current in this task; the span is the ``traceparent`` sent, and ends with the answer's
    body (or at the latest with the request)."""
    active = _ACTIVE.get()
    assert active is not None
    span = active.tracing.tracer.start_span(
        f"HTTP {method}",
        kind=SpanKind.CLIENT,
        attributes=client_request_attributes(method, URL(url)),
    )
    headers[TRACEPARENT] = traceparent(span)
    try:
        response = await send(method, url, headers, body)
    except BaseException as failure:
        if isinstance(failure, Exception):
            span.record_exception(failure)
            span.set_attribute("error.type", type(failure).__qualname__)
        span.set_status(Status(StatusCode.ERROR, str(failure) or type(failure).__name__))
        span.end()
        raise
    status = response.status
    if span.is_recording():
        span.set_attribute("http.response.status_code", status)
        if status >= 400:
            span.set_attribute("error.type", str(status))
            span.set_status(Status(StatusCode.ERROR))
        active.clients.append(span)
        response.content.on_eof(functools.partial(_end, span))
    return response


def _refused(span: Span, error: SidecarError) -> bool:
    """The request ended with the sidecar's own error answer: an ERROR when it is a 5xx,
    or SSRF protection refusing a target (as llm-d marks it); a client's 4xx is not."""
    if isinstance(error, TargetForbidden) and error.status == 403:
        _set(span, {"llm_d.pd_proxy.error": "ssrf_protection_denied",
                    "llm_d.pd_proxy.denied_target": error.target})  # fmt: skip
        span.set_status(Status(StatusCode.ERROR, error.message))
        return True
    _set(span, {"llm_d.pd_proxy.error": error.reason})
    if error.status >= 500:
        span.set_status(Status(StatusCode.ERROR, error.message))
        return True
    return False


class SidecarTracing:
    """The tracer provider of one sidecar process and its request and stage spans."""

    def __init__(
        self,
        provider: TracerProvider,
        *,
        kv_connector: str,
        ec_connector: str,
        parallel_dispatch: bool = False,
    ) -> None:
        self._provider = provider
        self.tracer = provider.get_tracer(SCOPE)
        self.kv_connector = kv_connector
        self.ec_connector = ec_connector
        # MoRI-IO write mode dispatching both legs at once: sibling legs, llm-d's names.
        self.parallel_dispatch = parallel_dispatch
        self._names = span_names(kv_connector, parallel_dispatch)

    @classmethod
    def from_environment(
        cls,
        *,
        kv_connector: str,
        ec_connector: str,
        parallel_dispatch: bool = False,
        environ: Mapping[str, str] | None = None,
    ) -> SidecarTracing:
        return cls(
            provider_from_environment(SERVICE_NAME, environ),
            kv_connector=kv_connector,
            ec_connector=ec_connector,
            parallel_dispatch=parallel_dispatch,
        )

    def shutdown(self) -> None:
        """Flush and close the exporter (blocking: call from a thread)."""
        self._provider.shutdown()

    async def serve(
        self,
        request: Request,
        ex: Exchange,
        handler: Callable[[Request], Awaitable[StreamResponse]],
    ) -> StreamResponse:
        """Serve ``request`` under its server span ``llm_d.pd_proxy.<METHOD> <path>`` (every
        request, as llm-d's HTTP middleware does) and, on a generation path, under that
        span's ``forward_request`` child."""
        parent = PROPAGATOR.extract(request.headers)
        server = self.tracer.start_span(
            f"llm_d.pd_proxy.{request.method} {request.path}",
            context=parent,
            kind=SpanKind.SERVER,
            attributes=server_request_attributes(request),
        )
        active = _Request(self, server)
        active_token = _ACTIVE.set(active)
        status = 0
        response: StreamResponse | None = None
        try:
            with _current(server, parent):
                api = _API_TYPES.get(request.path)
                if api is None or request.method != "POST":
                    response = await handler(request)
                else:
                    response = await self._forward(request, ex, handler, api, active)
            status = ex.status or response.status
            return response
        except SidecarError as error:  # answered by the error middleware, outside this one
            status = error.status
            raise
        except BaseException as failure:
            _fail(server, failure, reason=False)
            raise
        finally:
            _ACTIVE.reset(active_token)
            for client in active.clients:
                _end(client)
            status = status or ex.status
            if server.is_recording():
                _set(server, server_response_attributes(request, response, status))
                if status >= 500:
                    server.set_status(Status(StatusCode.ERROR))
            server.end()

    async def _forward(
        self,
        request: Request,
        ex: Exchange,
        handler: Callable[[Request], Awaitable[StreamResponse]],
        api: str,
        active: _Request,
    ) -> StreamResponse:
        span = self.tracer.start_span(
            REQUEST_SPAN,
            kind=SpanKind.SERVER,
            attributes={
                "llm_d.pd_proxy.connector": self.kv_connector,
                "llm_d.pd_proxy.kv_connector": self.kv_connector,
                "llm_d.pd_proxy.ec_connector": self.ec_connector,
                "llm_d.pd_proxy.request_path": request.path,
                "llm_d.openai.api": api,
                "llm_d.pd_proxy.request_id": ex.request_id,
            },
        )
        active.span = span
        sc = span.get_span_context()
        ex.trace = TraceContext(f"{sc.trace_id:032x}", f"{int(sc.trace_flags):02x}")
        status = 0
        failed = False
        try:
            with _current(span):
                response = await handler(request)
            status = ex.status or response.status
            return response
        except SidecarError as error:
            status = error.status
            failed = _refused(span, error)
            raise
        except BaseException as failure:
            _fail(span, failure)
            failed = True
            raise
        finally:
            self._finish_request(span, ex, status or ex.status, active, failed)
            span.end()

    def _finish_request(
        self, span: Span, ex: Exchange, status: int, active: _Request, failed: bool
    ) -> None:
        if not span.is_recording():
            return
        used = ex.prefill_attempts > 0
        total = _ms(time.perf_counter() - ex.start)
        parallel = self.parallel_dispatch and used
        _set(
            span,
            {
                "llm_d.pd_proxy.parallel_dispatch": True if parallel else None,
                "llm_d.pd_proxy.parallel_window_ms": total if parallel else None,
                "llm_d.pd_proxy.disaggregation_used": used,
                "llm_d.pd_proxy.prefill_target": ex.prefiller,
                "llm_d.pd_proxy.prefill_attempts": ex.prefill_attempts if used else None,
                "llm_d.pd_proxy.reason": None if used else "no_prefill_header",
                "llm_d.pd_proxy.mode": ex.mode,
                "llm_d.pd_proxy.fallback_reason": ex.fallback_reason,
                "llm_d.ec_proxy.encode_disaggregation_used": ex.encode_s is not None,
                "llm_d.ec_proxy.encode_items": ex.encode_items if ex.encode_s is not None else None,
                "llm_d.pd_proxy.total_duration_ms": total,
                "llm_d.pd_proxy.true_ttft_ms": _ms(ex.ttft_s),
                "llm_d.pd_proxy.prefill_duration_ms": _ms(ex.prefill_s),
                "llm_d.pd_proxy.decode_duration_ms": active.decode_ms,
                "llm_d.pd_proxy.coordinator_overhead_ms": _ms(ex.overhead_s),
                **active.usage,
                "gen_ai.usage.cache_read.input_tokens": ex.cached_tokens,
            },
        )
        if status >= 500 and not failed:
            span.set_status(Status(StatusCode.ERROR, ex.error or f"answered {status}"))

    @contextlib.contextmanager
    def stage(self, stage: Stage, ctx: RequestContext, active: _Request) -> Iterator[Span]:
        """One stage's span, current (and the legs' parent) while the stage runs.

        As in llm-d, the decode span is a child of the prefill span when there is one."""
        ex = ctx.ex
        concurrent = ctx.plan.route.value == "concurrent"
        attributes: dict[str, Any] = {"llm_d.pd_proxy.request_id": ex.request_id}
        if stage is Stage.ENCODE:
            attributes["llm_d.pd_proxy.ec_connector"] = self.ec_connector
            attributes["llm_d.ec_proxy.encoder_count"] = len(ctx.plan.encoders or ())
        else:
            attributes["llm_d.pd_proxy.connector"] = self.kv_connector
        parent: otel_context.Context | None = None
        if self.parallel_dispatch and stage in (Stage.PREFILL, Stage.DECODE):
            attributes["llm_d.pd_proxy.parallel_dispatch"] = True
        if stage is Stage.PREFILL:
            attributes["llm_d.pd_proxy.prefill_target"] = ex.prefiller
            attributes["llm_d.pd_proxy.prefill.attempt"] = ex.prefill_attempts
            attributes["llm_d.pd_proxy.prefill.async"] = concurrent
        elif stage is not Stage.ENCODE:
            attributes["llm_d.pd_proxy.decode.target"] = urlsplit(ctx.decode_url).netloc
            attributes["llm_d.pd_proxy.decode.streaming"] = ctx.body.get("stream") is True
            attributes["llm_d.pd_proxy.decode.data_parallel"] = (
                DATA_PARALLEL_HOST_PORT in ctx.request.headers
            )
            if stage is Stage.DECODE:
                attributes["llm_d.pd_proxy.decode.concurrent_with_prefill"] = concurrent
                if active.prefill is not None and not self.parallel_dispatch:
                    parent = trace.set_span_in_context(active.prefill)
        span = self.tracer.start_span(
            self._names[stage],
            context=parent,
            kind=SpanKind.INTERNAL,
            attributes={k: v for k, v in attributes.items() if v is not None},
        )
        if stage is Stage.PREFILL:
            active.prefill = span
        started = time.perf_counter()
        try:
            with _current(span, parent):
                yield span
        except BaseException as failure:
            _fail(span, failure)
            reason = getattr(getattr(failure, "error", failure), "reason", "")
            if stage is Stage.PREFILL and str(reason)[7:].isdigit():
                # A retryable answer (502/503/504): the status is only in the reason.
                _set(span, {"llm_d.pd_proxy.prefill.status_code": int(reason[7:])})
            raise
        finally:
            elapsed = _ms(time.perf_counter() - started)
            if stage is Stage.PREFILL:
                _set(span, {"llm_d.pd_proxy.prefill.duration_ms": elapsed})
            elif stage is Stage.ENCODE:
                _set(span, {"llm_d.ec_proxy.duration_ms": elapsed,
                            "llm_d.ec_proxy.encode_items": ex.encode_items})  # fmt: skip
            else:
                active.decode_ms = elapsed
                _set(span, {"llm_d.pd_proxy.decode.duration_ms": elapsed,
                            "llm_d.pd_proxy.decode_first.verdict": ex.decode_first})  # fmt: skip
                if concurrent and stage is Stage.DECODE and active.span is not None:
                    _set(active.span, {"llm_d.pd_proxy.concurrent_pd": True})
            span.end()

    @contextlib.contextmanager
    def local_decode(
        self, request: Request, ex: Exchange, active: _Request, decode_url: str, streaming: bool
    ) -> Iterator[Span]:
        """The decode span of a decode-only request (sent to the engine as it came)."""
        span = self.tracer.start_span(
            self._names[Stage.DECODE],
            kind=SpanKind.INTERNAL,
            attributes={
                "llm_d.pd_proxy.request_id": ex.request_id,
                "llm_d.pd_proxy.connector": self.kv_connector,
                "llm_d.pd_proxy.decode.target": urlsplit(decode_url).netloc,
                "llm_d.pd_proxy.decode.streaming": streaming,
                "llm_d.pd_proxy.decode.data_parallel": DATA_PARALLEL_HOST_PORT in request.headers,
            },
        )
        started = time.perf_counter()
        try:
            with _current(span):
                yield span
        except BaseException as failure:
            _fail(span, failure)
            raise
        finally:
            active.decode_ms = _ms(time.perf_counter() - started)
            _set(span, {"llm_d.pd_proxy.decode.duration_ms": active.decode_ms})
            span.end()


async def decode_only(
    request: Request,
    ex: Exchange,
    decode_url: str,
    streaming: bool,
    call: Callable[[], Awaitable[StreamResponse]],
) -> StreamResponse:
    """Run a decode-only request's relay under its decode span when traced."""
    active = _ACTIVE.get()
    if active is None or active.span is None:
        return await call()
    with active.tracing.local_decode(request, ex, active, decode_url, streaming) as span:
        response = await call()
        if response.status >= 500:
            span.set_status(Status(StatusCode.ERROR, f"answered {response.status}"))
        return response


def _stage_result(span: Span, stage: Stage, result: object) -> None:
    if stage is Stage.PREFILL and isinstance(result, tuple) and len(result) == 3:
        _set(span, {"gen_ai.usage.cache_read.input_tokens": result[2]})
    elif isinstance(result, StreamResponse) and result.status >= 500:
        span.set_status(Status(StatusCode.ERROR, f"answered {result.status}"))


S = TypeVar("S")
P = ParamSpec("P")
R = TypeVar("R")
_StageMethod = Callable[Concatenate[S, "RequestContext", P], Awaitable[R]]


def traced(
    stage: Stage,
) -> Callable[[_StageMethod[S, P, R]], _StageMethod[S, P, R]]:
    """Run an orchestrator stage method (``(self, ctx: RequestContext, ...)``) inside its
    span when the request is traced; otherwise call it as it is.

    Untraced, the wrapper hands back the method's own coroutine: no frame of its own
    stays between the caller and the stage while it runs."""

    def decorate(method: _StageMethod[S, P, R]) -> _StageMethod[S, P, R]:
        async def under_span(
            active: _Request, self: S, ctx: RequestContext, /, *args: P.args, **kwargs: P.kwargs
        ) -> R:
            with active.tracing.stage(stage, ctx, active) as span:
                result = await method(self, ctx, *args, **kwargs)
                _stage_result(span, stage, result)
                return result

        @functools.wraps(method)
        def wrapper(
            self: S, ctx: RequestContext, /, *args: P.args, **kwargs: P.kwargs
        ) -> Awaitable[R]:
            active = _ACTIVE.get()
            if active is None:
                return method(self, ctx, *args, **kwargs)
            return under_span(active, self, ctx, *args, **kwargs)

        return wrapper

    return decorate
