"""What the EPP tells about requests: OTLP spans, llm-d's per-request metrics, logs.

- ``--tracing`` with ``OTEL_TRACES_EXPORTER=otlp``: a test collector (the OTLP
  TraceService on loopback) receives the ``gateway.request`` span, a child of the
  caller's trace, with one ``run_scheduler_profile`` child per profile; the routed request
  carries a ``traceparent`` of the same trace.
- A streamed response with a ``usage`` block gives llm-d's request families.
- ``--emit-endpoint-scores``, ``--disable-endpoint-subset-filter``,
  ``--allow-experimental-plugins``, ``--validate-config``, the zap log encoders.
"""

from __future__ import annotations

import io
import json
import logging
import re
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1 import trace_pb2

from epp.__main__ import validate_config
from epp.app import EppApp
from epp.logs import configure_logging
from epp.settings import EppSettings, parse_args
from epp.tracing import Tracing
from tests.conftest import eventually, sample_sum
from tests.epp_gateway.backends import RecordingBackend
from tests.epp_gateway.fakes import (
    ExtProcClient,
    request_body,
    request_headers,
    response_body,
    response_headers,
)
from tests.epp_gateway.pool import always_disagg_config, write_endpoints

CHAT = json.dumps(
    {"model": "m", "messages": [{"role": "user", "content": "hello"}], "stream": True}
).encode()
TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_ID = "b7ad6b7169203331"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP trace collector that keeps every span it is sent."""

    def __init__(self) -> None:
        self.spans: list[trace_pb2.Span] = []

    async def Export(  # noqa: N802 - the gRPC method name
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: object
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        for resource in request.resource_spans:
            for scope in resource.scope_spans:
                self.spans.extend(scope.spans)
        return trace_service_pb2.ExportTraceServiceResponse()


@pytest.fixture
async def collector() -> AsyncIterator[tuple[Collector, int]]:
    server = grpc.aio.server()
    sink = Collector()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(sink, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield sink, port
    finally:
        await server.stop(grace=None)


@pytest.fixture
async def pods() -> AsyncIterator[tuple[RecordingBackend, RecordingBackend]]:
    decode, prefill = RecordingBackend("d"), RecordingBackend("p")
    await decode.start()
    await prefill.start()
    yield decode, prefill
    await decode.stop()
    await prefill.stop()


def _settings(endpoints: Path, **overrides: object) -> EppSettings:
    values: dict[str, object] = {
        "grpc_port": 0,
        "grpc_health_port": 0,
        "metrics_port": 0,
        "bind_address": "127.0.0.1",
        "config_text": always_disagg_config(endpoints),
        "secure_serving": False,
        "shutdown_grace": 1.0,
        "metrics_endpoint_auth": False,
        "tracing": False,
        **overrides,
    }
    return EppSettings.model_validate(values)


def _set_headers(response: object) -> dict[str, str]:
    common = response.request_headers.response  # type: ignore[attr-defined]
    return {o.header.key: o.header.raw_value.decode() for o in common.header_mutation.set_headers}


async def _route(app: EppApp, extra: list[tuple[str, str]]) -> object:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
        client = ExtProcClient(channel)
        await client.send(
            request_headers("/v1/chat/completions", extra), request_body(CHAT, end_of_stream=True)
        )
        first = await client.recv()
        await client.recv()  # the body, sent back
        await client.close()
        await client.expect_end()
    return first


async def test_otlp_spans_reach_the_collector_and_the_trace_reaches_the_pods(
    tmp_path: Path,
    pods: tuple[RecordingBackend, RecordingBackend],
    collector: tuple[Collector, int],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sink, port = collector
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "parentbased_always_on")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "epp-under-test")
    endpoints = tmp_path / "endpoints.yaml"
    write_endpoints(endpoints, [(pods[0], "decode"), (pods[1], "prefill")])
    app = EppApp(_settings(endpoints, tracing=True))
    await app.start()
    try:
        first = await _route(app, [("traceparent", TRACEPARENT)])
    finally:
        await app.stop()  # flushes the exporter
    headers = _set_headers(first)
    version, trace_id, span_id, flags = headers["traceparent"].split("-")
    assert (version, trace_id, flags) == ("00", TRACE_ID, "01")

    (request,) = [s for s in sink.spans if s.name == "gateway.request"]
    assert request.trace_id.hex() == TRACE_ID
    assert request.parent_span_id.hex() == PARENT_ID  # a child of the caller's span
    assert request.span_id.hex() == span_id  # the pods continue from the EPP's span
    assert request.kind == trace_pb2.Span.SPAN_KIND_SERVER
    attrs = {a.key: a.value.string_value for a in request.attributes}
    assert attrs["llm_d.epp.decision_type"] == "prefill-decode"
    assert attrs["llm_d.epp.endpoint"] == pods[0].host_port
    assert attrs["llm_d.epp.pd.prefill_endpoint"] == pods[1].host_port
    assert attrs["gen_ai.request.model"] == "m"

    profiles = [s for s in sink.spans if s.name == "run_scheduler_profile"]
    names = set()
    for span in profiles:
        assert span.parent_span_id == request.span_id
        assert span.trace_id == request.trace_id
        names.update(
            a.value.string_value
            for a in span.attributes
            if a.key == "llm_d.epp.scheduling.profile.name"
        )
    assert names == {"decode", "prefill"}


async def test_tracing_off_sets_no_traceparent(
    tmp_path: Path, pods: tuple[RecordingBackend, RecordingBackend]
) -> None:
    endpoints = tmp_path / "endpoints.yaml"
    write_endpoints(endpoints, [(pods[0], "decode"), (pods[1], "prefill")])
    app = EppApp(_settings(endpoints), tracing=Tracing())
    await app.start()
    try:
        first = await _route(app, [("traceparent", TRACEPARENT)])
    finally:
        await app.stop()
    assert "traceparent" not in _set_headers(first)


async def test_a_streamed_response_gives_llm_ds_request_metrics(
    tmp_path: Path,
    pods: tuple[RecordingBackend, RecordingBackend],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="epp.extproc")
    endpoints = tmp_path / "endpoints.yaml"
    write_endpoints(endpoints, [(pods[0], "decode"), (pods[1], "prefill")])
    app = EppApp(_settings(endpoints, enable_grpc_stream_metrics=True))
    await app.start()
    reg = app.metrics.registry
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
            client = ExtProcClient(channel)
            await client.send(
                request_headers("/v1/chat/completions", [("x-llm-d-inference-fairness-id", "t1")]),
                request_body(CHAT, end_of_stream=True),
            )
            await client.recv()
            await client.recv()
            labels = {"model_name": "m", "target_model_name": "m", "fairness_id": "t1",
                      "priority": "0"}  # fmt: skip
            assert reg.get_sample_value("llm_d_epp_request_running", labels) == 1
            sse = response_headers()
            sse.response_headers.headers.headers.add(
                key="content-type", raw_value=b"text/event-stream"
            )
            await client.send(sse)
            await client.recv()
            chunks = [
                b'data: {"choices":[{"delta":{"content":"a"}}]}\n\n',
                b'data: {"choices":[{"delta":{"content":"b"}}]}\n\n',
                b'data: {"choices":[],"usage":{"prompt_tokens":12,"completion_tokens":5,'
                b'"prompt_tokens_details":{"cached_tokens":8}}}\n\ndata: [DONE]\n\n',
            ]
            for i, chunk in enumerate(chunks):
                await client.send(response_body(chunk, end_of_stream=i == len(chunks) - 1))
                await client.recv()
            await client.close()
            await client.expect_end()

        async def finished() -> bool:
            return reg.get_sample_value("llm_d_epp_request_running", labels) == 0

        await eventually(finished, "the request counted as finished")
        assert reg.get_sample_value("llm_d_epp_request_total", labels) == 1
        assert reg.get_sample_value("inference_objective_request_total",
                                    {"model_name": "m", "target_model_name": "m",
                                     "priority": "0"}) == 1  # fmt: skip
        assert reg.get_sample_value("llm_d_epp_request_input_tokens_sum", labels) == 12
        assert reg.get_sample_value("llm_d_epp_request_output_tokens_sum", labels) == 5
        assert reg.get_sample_value("llm_d_epp_request_cached_tokens_sum", labels) == 8
        assert (
            reg.get_sample_value(
                "llm_d_epp_request_ttft_seconds_count", {**labels, "streaming": "true"}
            )
            == 1
        )
        assert reg.get_sample_value("llm_d_epp_request_streaming_tpot_seconds_count", labels) == 1
        assert reg.get_sample_value("llm_d_epp_request_streaming_itl_seconds_count", labels) == 2
        assert reg.get_sample_value("llm_d_epp_request_ntpot_seconds_count", labels) == 1
        assert reg.get_sample_value("llm_d_epp_request_duration_seconds_count", labels) == 1
        assert reg.get_sample_value("llm_d_epp_response_size_bytes_sum", labels) == sum(
            len(c) for c in chunks
        )
        assert reg.get_sample_value("llm_d_epp_request_size_bytes_sum", labels) == len(CHAT)
        assert reg.get_sample_value("llm_d_epp_extproc_streams_total", {"code": "OK"}) == 1
        assert reg.get_sample_value("llm_d_epp_extproc_streams_inflight") == 0
        assert sample_sum(reg, "llm_d_epp_request_error_total") == 0
        # At debug level each routed request says how long the EPP took (the
        # request-processing histogram's observation, exact).
        routed = [m for r in caplog.records if (m := _ROUTED.search(r.getMessage())) is not None]
        assert len(routed) == 1
        processing = reg.get_sample_value("llm_d_epp_request_processing_duration_seconds_sum")
        assert processing is not None
        assert float(routed[0].group(1)) == pytest.approx(processing * 1000, abs=0.01)
    finally:
        await app.stop()


_ROUTED = re.compile(r"routed ([0-9.]+) ms after its stream opened")


async def test_usage_is_counted_from_the_end_of_a_long_response_split_anywhere(
    tmp_path: Path, pods: tuple[RecordingBackend, RecordingBackend]
) -> None:
    # Past 128 KB of response (the kept tail is trimmed along the way) and with the usage
    # block cut across the last two messages, the counts still come from it; every chunk
    # after the first is one inter-token latency sample.
    endpoints = tmp_path / "endpoints.yaml"
    write_endpoints(endpoints, [(pods[0], "decode"), (pods[1], "prefill")])
    app = EppApp(_settings(endpoints))
    await app.start()
    reg = app.metrics.registry
    token = b'data: {"choices":[{"delta":{"content":"' + b"x" * 900 + b'"}}]}\n\n'
    tail = (
        b'data: {"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":150,'
        b'"prompt_tokens_details":{"cached_tokens":0}}}\n\ndata: [DONE]\n\n'
    )
    cut = tail.index(b"completion_tokens") + 5
    chunks = [token] * 150 + [tail[:cut], tail[cut:]]
    assert sum(len(c) for c in chunks) > 128 * 1024
    labels = {"model_name": "m", "target_model_name": "m", "fairness_id": "default-flow",
              "priority": "0"}  # fmt: skip
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
            client = ExtProcClient(channel)
            await client.send(
                request_headers("/v1/chat/completions"), request_body(CHAT, end_of_stream=True)
            )
            await client.recv()
            await client.recv()
            sse = response_headers()
            sse.response_headers.headers.headers.add(
                key="content-type", raw_value=b"text/event-stream"
            )
            await client.send(sse)
            await client.recv()
            for chunk in chunks:
                await client.send(response_body(chunk, end_of_stream=False))
                answer = await client.recv()
                assert answer.response_body.response.body_mutation.streamed_response.body == chunk
            await client.send(response_body(b"", end_of_stream=True))
            last = await client.recv()
            assert last.response_body.response.body_mutation.streamed_response.end_of_stream
            await client.close()
            await client.expect_end()

        async def finished() -> bool:
            return reg.get_sample_value("llm_d_epp_request_running", labels) == 0

        await eventually(finished, "the request counted as finished")
        assert reg.get_sample_value("llm_d_epp_request_input_tokens_sum", labels) == 7
        assert reg.get_sample_value("llm_d_epp_request_output_tokens_sum", labels) == 150
        assert reg.get_sample_value("llm_d_epp_request_cached_tokens_sum", labels) == 0
        assert (
            reg.get_sample_value("llm_d_epp_request_streaming_itl_seconds_count", labels)
            == len(chunks) - 1
        )
        assert reg.get_sample_value("llm_d_epp_response_size_bytes_sum", labels) == sum(
            len(c) for c in chunks
        )
    finally:
        await app.stop()


async def test_endpoint_scores_and_the_subset_filter(
    tmp_path: Path, pods: tuple[RecordingBackend, RecordingBackend]
) -> None:
    endpoints = tmp_path / "endpoints.yaml"
    write_endpoints(endpoints, [(pods[0], "decode"), (pods[1], "prefill")])
    app = EppApp(
        _settings(endpoints, emit_endpoint_scores=True, disable_endpoint_subset_filter=True)
    )
    await app.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
            client = ExtProcClient(channel)
            # A subset hint naming no known endpoint: ignored under the flag.
            headers = request_headers("/v1/chat/completions")
            headers.metadata_context.filter_metadata["envoy.lb.subset_hint"].update(
                {"x-gateway-destination-endpoint-subset": ["10.9.9.9:1"]}
            )
            await client.send(headers, request_body(CHAT, end_of_stream=True))
            first = await client.recv()
            await client.recv()
            await client.close()
        lb = first.dynamic_metadata.fields["envoy.lb"].struct_value.fields
        scores = lb["x-gateway-destination-endpoint-scores"].struct_value.fields
        assert set(scores) == {pods[0].host_port}
        assert lb["x-gateway-destination-endpoint"].string_value == pods[0].host_port
    finally:
        await app.stop()


def test_alpha_plugins_need_the_flag(capsys: pytest.CaptureFixture[str]) -> None:
    config = (
        "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n"
        "- type: session-affinity-scorer\nschedulingProfiles:\n- name: default\n"
        "  plugins:\n  - pluginRef: session-affinity-scorer\n"
    )
    assert validate_config(parse_args(["--validate-config", "--config-text", config])) == 2
    err = capsys.readouterr().err
    assert "session-affinity-scorer" in err and "--allow-experimental-plugins" in err
    args = ["--validate-config", "--allow-experimental-plugins", "--config-text", config]
    out = io.StringIO()
    assert validate_config(parse_args(args), out) == 0
    assert "session-affinity-scorer" in out.getvalue()


def test_validate_config_prints_the_resolved_configuration(tmp_path: Path) -> None:
    endpoints = tmp_path / "endpoints.yaml"
    write_endpoints(endpoints, [])
    config = tmp_path / "config.yaml"
    config.write_text(always_disagg_config(endpoints))
    out = io.StringIO()
    assert (
        validate_config(parse_args(["--validate-config", "--config-file", str(config)]), out) == 0
    )
    text = out.getvalue()
    assert f"configuration: {config}" in text
    assert "profile handler: disagg-profile-handler" in text
    assert "  decode: filters [decode-filter]" in text
    assert "  prefill: filters [prefill-filter]" in text
    assert "discovery: file-discovery" in text


async def test_validate_config_exits_2_naming_the_field(tmp_path: Path) -> None:
    import asyncio

    bad = (
        "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n"
        "- type: queue-scorer\n  parameters: {bogus: 1}\n"
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "epp", "--validate-config", "--config-text", bad,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 2
    assert b"bogus" in err and b"queue-scorer" in err
    assert out == b""


def _log_line(argv: list[str], level: int = logging.INFO) -> str:
    stream = io.StringIO()
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        configure_logging(parse_args(argv), stream)
        logging.getLogger("epp.test").log(level, "hello %s", "world")
        logging.getLogger("epp.test").debug("quiet")
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    return stream.getvalue()


def test_zap_json_encoder() -> None:
    text = _log_line(["--zap-encoder", "json", "--zap-time-encoding", "epoch"])
    (line,) = text.splitlines()
    entry = json.loads(line)
    assert entry["level"] == "info" and entry["msg"] == "hello world"
    assert entry["logger"] == "epp.test" and isinstance(entry["ts"], float)
    assert entry["caller"].startswith("test_telemetry.py:")


def test_zap_console_encoder_and_levels() -> None:
    text = _log_line([])  # console by default (--zap-devel defaults to true)
    assert "\tINFO\tepp.test\t" in text and "hello world" in text
    assert "quiet" not in text  # -v 2: info
    assert "quiet" in _log_line(["-v", "4"])
    assert "quiet" in _log_line(["--zap-log-level", "debug"])
    assert _log_line(["--zap-log-level", "error"]) == ""
    # Development mode: warnings carry the stack they were logged from.
    warned = _log_line(["--zap-encoder", "json"], logging.WARNING)
    assert "test_telemetry.py" in json.loads(warned)["stacktrace"]
    plain = _log_line(["--zap-encoder", "json", "--zap-devel=false"], logging.WARNING)
    assert "stacktrace" not in json.loads(plain)
