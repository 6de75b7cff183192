"""Tracing fixtures: an OTLP collector on loopback, the environment that points at it,
and the sidecar fixtures."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1 import trace_pb2

from tests.conftest import eventually
from tests.sidecar.conftest import client, start_sidecar

__all__ = ["Collector", "attributes", "client", "collector", "otlp_env", "start_sidecar"]


def attributes(span: trace_pb2.Span) -> dict[str, object]:
    """A span's attributes as plain values."""
    out: dict[str, object] = {}
    for item in span.attributes:
        kind = item.value.WhichOneof("value")
        out[item.key] = getattr(item.value, kind) if kind else None
    return out


@dataclass
class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP trace collector keeping every span and the service name it came from."""

    port: int = 0
    spans: list[trace_pb2.Span] = field(default_factory=list)
    services: set[str] = field(default_factory=set)

    async def Export(  # noqa: N802 - the gRPC method name
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: object
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        for resource in request.resource_spans:
            for attr in resource.resource.attributes:
                if attr.key == "service.name":
                    self.services.add(attr.value.string_value)
            for scope in resource.scope_spans:
                self.spans.extend(scope.spans)
        return trace_service_pb2.ExportTraceServiceResponse()

    def named(self, name: str) -> list[trace_pb2.Span]:
        return [s for s in self.spans if s.name == name]

    def children(self, parent: trace_pb2.Span, name: str | None = None) -> list[trace_pb2.Span]:
        """The spans whose parent is ``parent`` (named ``name``), oldest first."""
        found = [
            s
            for s in self.spans
            if s.parent_span_id == parent.span_id and s.trace_id == parent.trace_id
            and (name is None or s.name == name)
        ]  # fmt: skip
        return sorted(found, key=lambda s: s.start_time_unix_nano)

    async def wait_for(self, check: Callable[[], bool], what: str) -> None:
        async def holds() -> bool:
            return check()

        await eventually(holds, what, timeout=20.0)


@pytest.fixture
async def collector() -> AsyncIterator[Collector]:
    server = grpc.aio.server()
    sink = Collector()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(sink, server)
    sink.port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield sink
    finally:
        await server.stop(grace=None)


@pytest.fixture
def otlp_env(collector: Collector, monkeypatch: pytest.MonkeyPatch) -> Collector:
    """The OTEL_* environment llm-d's deployments set, aimed at the collector; every trace
    sampled, batches sent after 50 ms."""
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{collector.port}")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "parentbased_always_on")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    monkeypatch.delenv("OTEL_RESOURCE_ATTRIBUTES", raising=False)
    return collector
