"""OpenTelemetry tracing of the EPP (``--tracing``), configured as llm-d configures it.

One SERVER span ``gateway.request`` per ext_proc stream, a child of the trace the
request arrived with (W3C ``traceparent``), carrying the scheduling result; one INTERNAL
child ``run_scheduler_profile`` per profile run. The EPP sets ``traceparent`` (and
``tracestate``/``baggage`` when present) on the request it routes, so the pd-sidecar and
the engines continue the same trace.

The standard variables decide the rest, with llm-d's defaults:

- ``OTEL_TRACES_EXPORTER``: ``otlp`` (OTLP over gRPC; endpoint, TLS, headers and
  timeout from ``OTEL_EXPORTER_OTLP_*``, plaintext ``localhost:4317`` when none is
  set), ``console`` (the default, as llm-d: spans on stdout) or ``none``;
- ``OTEL_TRACES_SAMPLER`` / ``OTEL_TRACES_SAMPLER_ARG``: default
  ``parentbased_traceidratio`` at ``0.1``;
- ``OTEL_SERVICE_NAME`` / ``OTEL_RESOURCE_ATTRIBUTES``: default service name
  ``llm-d-epp``.

The provider belongs to one ``Tracing`` object (not the process-global one), so several
EPPs in one process (tests) do not share exporters.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.sdk.resources import OTELResourceDetector, Resource
from opentelemetry.sdk.trace import TracerProvider, sampling
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

if TYPE_CHECKING:
    from epp.datastore import Endpoint
    from epp.scheduling.cycle import CycleState
    from epp.scheduling.profile import Profile
    from epp.scheduling.result import ProfileResult

__all__ = ["RequestSpan", "Tracing", "inject_current", "run_profile"]

log = logging.getLogger("epp.tracing")

SERVICE_NAME = "llm-d-epp"
INSTRUMENTATION = "llm-d-router"
_DEFAULT_RATIO = 0.1
_PROPAGATOR = CompositePropagator([TraceContextTextMapPropagator(), W3CBaggagePropagator()])
# The tracer of the request being handled in this task (None: tracing is off for it).
_ACTIVE: ContextVar[trace.Tracer | None] = ContextVar("epp_active_tracer", default=None)


def _sampler(environ: Mapping[str, str]) -> sampling.Sampler:
    name = environ.get("OTEL_TRACES_SAMPLER", "parentbased_traceidratio")
    arg = environ.get("OTEL_TRACES_SAMPLER_ARG")
    try:
        ratio = float(arg) if arg is not None else _DEFAULT_RATIO
    except ValueError:
        log.warning("OTEL_TRACES_SAMPLER_ARG=%r is not a number; using %s", arg, _DEFAULT_RATIO)
        ratio = _DEFAULT_RATIO
    samplers: dict[str, sampling.Sampler] = {
        "always_on": sampling.ALWAYS_ON,
        "always_off": sampling.ALWAYS_OFF,
        "traceidratio": sampling.TraceIdRatioBased(ratio),
        "parentbased_always_on": sampling.ParentBased(sampling.ALWAYS_ON),
        "parentbased_always_off": sampling.ParentBased(sampling.ALWAYS_OFF),
        "parentbased_traceidratio": sampling.ParentBased(sampling.TraceIdRatioBased(ratio)),
    }
    chosen = samplers.get(name)
    if chosen is None:
        log.warning(
            "OTEL_TRACES_SAMPLER=%r is not supported; using parentbased_traceidratio %s",
            name,
            _DEFAULT_RATIO,
        )
        return sampling.ParentBased(sampling.TraceIdRatioBased(_DEFAULT_RATIO))
    return chosen


def _exporter(environ: Mapping[str, str]) -> SpanExporter | None:
    kind = environ.get("OTEL_TRACES_EXPORTER", "console").strip().lower()
    if kind == "none":
        return None
    if kind == "otlp":
        protocol = environ.get(
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
        )
        if protocol != "grpc":
            log.warning("OTLP protocol %r is not supported; exporting over grpc", protocol)
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()
    if kind != "console":
        log.warning("OTEL_TRACES_EXPORTER=%r is not supported; exporting to the console", kind)
    return ConsoleSpanExporter()


class RequestSpan:
    """The ``gateway.request`` span of one ext_proc stream, current while it is open."""

    __slots__ = ("_active_token", "_context_token", "span")

    def __init__(self, tracer: trace.Tracer, headers: Mapping[str, str]) -> None:
        parent = _PROPAGATOR.extract(headers)
        self.span = tracer.start_span("gateway.request", context=parent, kind=SpanKind.SERVER)
        # Current for the rest of this task (the stream), so the scheduling spans and the
        # injected traceparent descend from it.
        self._context_token = otel_context.attach(trace.set_span_in_context(self.span, parent))
        self._active_token = _ACTIVE.set(tracer)

    def set(self, attributes: Mapping[str, Any]) -> None:
        if self.span.is_recording():
            self.span.set_attributes({k: v for k, v in attributes.items() if v is not None})

    def fail(self, description: str) -> None:
        self.span.set_status(Status(StatusCode.ERROR, description))

    def end(self) -> None:
        try:
            _ACTIVE.reset(self._active_token)
            otel_context.detach(self._context_token)
        except ValueError:  # ended from another context: nothing to restore there
            pass
        self.span.end()


class Tracing:
    """The tracer provider of one EPP; ``enabled`` False makes every call a no-op."""

    def __init__(self, provider: TracerProvider | None = None) -> None:
        self._provider = provider
        self.tracer: trace.Tracer | None = (
            provider.get_tracer(INSTRUMENTATION) if provider is not None else None
        )

    @property
    def enabled(self) -> bool:
        return self.tracer is not None

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> Tracing:
        env = os.environ if environ is None else environ
        resource = Resource({"service.name": SERVICE_NAME}).merge(OTELResourceDetector().detect())
        provider = TracerProvider(sampler=_sampler(env), resource=resource)
        exporter = _exporter(env)
        if exporter is not None:
            provider.add_span_processor(BatchSpanProcessor(exporter))
        log.info(
            "tracing: exporter %s, sampler %s",
            type(exporter).__name__ if exporter is not None else "none",
            provider.sampler.get_description(),
        )
        return cls(provider)

    def start_request(self, headers: Mapping[str, str]) -> RequestSpan | None:
        if self.tracer is None:
            return None
        return RequestSpan(self.tracer, headers)

    def shutdown(self) -> None:
        """Flush and close the exporter (blocking: call from a thread)."""
        if self._provider is not None:
            self._provider.shutdown()


def inject_current() -> dict[str, str]:
    """The trace headers of the current request span ({} when none is active)."""
    if _ACTIVE.get() is None:
        return {}
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier)
    return carrier


@contextlib.contextmanager
def _span(tracer: trace.Tracer, name: str) -> Iterator[trace.Span]:
    with tracer.start_as_current_span(
        "run_scheduler_profile",
        kind=SpanKind.INTERNAL,
        attributes={"llm_d.epp.scheduling.profile.name": name},
    ) as span:
        yield span


def run_profile(
    profile: Profile, cycle: CycleState, endpoints: Sequence[Endpoint]
) -> ProfileResult | None:
    """``profile.run``, inside a ``run_scheduler_profile`` span when tracing is on."""
    tracer = _ACTIVE.get()
    if tracer is None:
        return profile.run(cycle, endpoints)
    with _span(tracer, profile.name) as span:
        result = profile.run(cycle, endpoints)
        if span.is_recording():
            span.set_attribute("llm_d.epp.scheduling.candidate_endpoints", len(endpoints))
            targets = [ep.key for ep in result.targets] if result is not None else []
            span.set_attribute("llm_d.epp.scheduling.target_endpoints", targets)
        return result
