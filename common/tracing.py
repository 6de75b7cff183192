"""The OpenTelemetry set-up the EPP and the sidecar share, from the standard environment.

llm-d starts tracing the same way in both of its binaries; only the default service name
differs. The variables and their defaults:

- ``OTEL_TRACES_EXPORTER``: ``otlp`` (OTLP over gRPC; endpoint, TLS, headers and
  timeout from ``OTEL_EXPORTER_OTLP_*``, plaintext ``localhost:4317`` when none is
  set), ``console`` (the default: spans on stdout) or ``none``;
- ``OTEL_TRACES_SAMPLER`` / ``OTEL_TRACES_SAMPLER_ARG``: default
  ``parentbased_traceidratio`` at ``0.1``;
- ``OTEL_SERVICE_NAME`` / ``OTEL_RESOURCE_ATTRIBUTES``: override the default service
  name.

Each call builds its own provider (never the process-global one), so several components
in one process (tests) do not share exporters. W3C ``traceparent`` plus ``baggage`` is
the propagation format (:data:`PROPAGATOR`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider, sampling
    from opentelemetry.sdk.trace.export import SpanExporter

__all__ = ["DEFAULT_RATIO", "PROPAGATOR", "provider_from_environment"]

log = logging.getLogger("common.tracing")

DEFAULT_RATIO = 0.1
PROPAGATOR = CompositePropagator([TraceContextTextMapPropagator(), W3CBaggagePropagator()])


def sampler_from_environment(environ: Mapping[str, str]) -> sampling.Sampler:
    from opentelemetry.sdk.trace import sampling

    name = environ.get("OTEL_TRACES_SAMPLER", "parentbased_traceidratio")
    arg = environ.get("OTEL_TRACES_SAMPLER_ARG")
    try:
        ratio = float(arg) if arg is not None else DEFAULT_RATIO
    except ValueError:
        log.warning("OTEL_TRACES_SAMPLER_ARG=%r is not a number; using %s", arg, DEFAULT_RATIO)
        ratio = DEFAULT_RATIO
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
            DEFAULT_RATIO,
        )
        return sampling.ParentBased(sampling.TraceIdRatioBased(DEFAULT_RATIO))
    return chosen


def exporter_from_environment(environ: Mapping[str, str]) -> SpanExporter | None:
    from opentelemetry.sdk.trace.export import ConsoleSpanExporter

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


def provider_from_environment(
    service_name: str, environ: Mapping[str, str] | None = None
) -> TracerProvider:
    """A tracer provider exporting in batches as the environment says (see above)."""
    from opentelemetry.sdk.resources import OTELResourceDetector, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    env = os.environ if environ is None else environ
    resource = Resource({"service.name": service_name}).merge(OTELResourceDetector().detect())
    provider = TracerProvider(sampler=sampler_from_environment(env), resource=resource)
    exporter = exporter_from_environment(env)
    if exporter is not None:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    log.info(
        "tracing: service %s, exporter %s, sampler %s",
        service_name,
        type(exporter).__name__ if exporter is not None else "none",
        provider.sampler.get_description(),
    )
    return provider
