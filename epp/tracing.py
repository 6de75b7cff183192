"""OpenTelemetry tracing of the EPP (``--tracing``), configured as llm-d configures it.

One SERVER span ``gateway.request`` per ext_proc stream, a child of the trace the
request arrived with (W3C ``traceparent``), carrying the scheduling result; one INTERNAL
child ``run_scheduler_profile`` per profile run. The EPP sets ``traceparent`` (and
``tracestate``/``baggage`` when present) on the request it routes, so the pd-sidecar and
the engines continue the same trace.

The standard variables decide the rest, with llm-d's defaults (``common.tracing``); the
default service name is ``llm-d-epp``.

The provider belongs to one ``Tracing`` object (not the process-global one), so several
EPPs in one process (tests) do not share exporters.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import SpanKind, Status, StatusCode

from common.tracing import PROPAGATOR, provider_from_environment

if TYPE_CHECKING:
    from epp.datastore import Endpoint
    from epp.scheduling.cycle import CycleState
    from epp.scheduling.profile import Profile
    from epp.scheduling.result import ProfileResult

__all__ = ["RequestSpan", "Tracing", "inject_current", "run_profile"]

SERVICE_NAME = "llm-d-epp"
INSTRUMENTATION = "llm-d-router"
_PROPAGATOR = PROPAGATOR
# The tracer of the request being handled in this task (None: tracing is off for it).
_ACTIVE: ContextVar[trace.Tracer | None] = ContextVar("epp_active_tracer", default=None)


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
        return cls(provider_from_environment(SERVICE_NAME, environ))

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
