"""``--tracing``: the sidecar's spans reach an OTLP collector and its legs join the trace.

A real collector (the OTLP TraceService over gRPC on loopback), simulated prefill and
decode engines, the sidecar in between:

- a P/D request sent with a ``traceparent`` gives llm-d's span tree: the server span
  ``llm_d.pd_proxy.POST <path>`` (a child of the caller's span, with the HTTP semantic
  conventions' attributes), its ``forward_request`` child, ``prefill`` under that and
  ``decode`` under the prefill, each carrying llm-d's attributes, and under each stage
  one CLIENT span ``HTTP POST`` per leg, the ``traceparent`` its engine received;
- a prefill retried after a 503 shows one span per attempt, the failed one in error;
  a prefill that never succeeds leaves every attempt and the request in error;
- the mooncake connector's legs run concurrently under llm-d's prefixed span names;
- a request without a ``traceparent`` starts a trace that its legs continue;
- without ``--tracing`` nothing is exported and the legs keep the caller's trace id;
- an SSRF refusal is an error (as llm-d marks it), a client's bad body is not.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from opentelemetry.proto.trace.v1 import trace_pb2

from sidecar.app import TRACING
from tests.sidecar.conftest import StartSidecar
from tests.sidecar_tracing.conftest import Collector, attributes

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
CALLER = f"00-{TRACE_ID}-{PARENT_ID}-01"
BODY = {"model": "sim-model", "prompt": "hello world " * 20, "max_tokens": 5}
ERROR = trace_pb2.Status.STATUS_CODE_ERROR
SERVER_SPAN = "llm_d.pd_proxy.POST /v1/completions"


async def post(
    client: aiohttp.ClientSession, url: str, headers: dict[str, str], body: Any = BODY
) -> int:
    async with client.post(url + "/v1/completions", json=body, headers=headers) as resp:
        await resp.read()
        return resp.status


def parent_of(traceparent: str) -> tuple[str, str]:
    """(trace id, parent span id) of a traceparent header."""
    version, trace_id, span_id, _ = traceparent.split("-")
    assert version == "00"
    return trace_id, span_id


async def _recorded(sim: Any) -> list[dict[str, Any]]:
    stats = await sim.stats()
    return [r for r in stats["recorded"] if r["path"] == "/v1/completions"]


async def test_a_pd_request_is_one_span_with_prefill_and_decode_children(
    otlp_env: Collector,
    start_sim: Any,
    start_sidecar: StartSidecar,
    client: aiohttp.ClientSession,
) -> None:
    sink = otlp_env
    prefill = await start_sim(role="prefill", zero_latency=True)
    decode = await start_sim(role="decode", zero_latency=True)
    sidecar = await start_sidecar(model_server_port=decode.port, tracing=True)
    headers = {"x-prefiller-host-port": prefill.host_port, "traceparent": CALLER}
    assert await post(client, sidecar.url, headers) == 200

    await sink.wait_for(
        lambda: (
            len(sink.named(SERVER_SPAN)) == 1
            and len(sink.named("forward_request")) == 1
            and len(sink.named("prefill")) == 1
            and len(sink.named("decode")) == 1
            and len(sink.named("HTTP POST")) == 2
        ),
        "the server, request, prefill, decode and client spans",
    )
    (server,) = sink.named(SERVER_SPAN)
    (request,) = sink.named("forward_request")
    (p_span,) = sink.named("prefill")
    (d_span,) = sink.named("decode")
    assert sink.services == {"llm-d-disagg-sidecar"}

    # The server span: a child of the caller's, with otelhttp's attributes.
    assert server.trace_id.hex() == TRACE_ID
    assert server.parent_span_id.hex() == PARENT_ID
    assert server.kind == trace_pb2.Span.SPAN_KIND_SERVER
    assert server.status.code != ERROR
    s_attrs = attributes(server)
    assert s_attrs["http.request.method"] == "POST"
    assert s_attrs["url.path"] == "/v1/completions"
    assert s_attrs["url.scheme"] == "http"
    assert s_attrs["server.address"] == "127.0.0.1"
    assert s_attrs["server.port"] == sidecar.servers.port
    assert s_attrs["network.peer.address"] == "127.0.0.1"
    assert s_attrs["client.address"] == "127.0.0.1"
    assert s_attrs["network.protocol.version"] == "1.1"
    assert s_attrs["http.response.status_code"] == 200
    assert s_attrs["http.request.body.size"] == len(json.dumps(BODY))
    assert s_attrs["http.response.body.size"] > 0  # type: ignore[operator]

    assert request.trace_id.hex() == TRACE_ID
    assert request.parent_span_id == server.span_id
    assert request.kind == trace_pb2.Span.SPAN_KIND_SERVER
    assert request.status.code != ERROR
    (p_leg,) = await _recorded(prefill)
    (d_leg,) = await _recorded(decode)
    leg_id = d_leg["headers"]["x-request-id"]
    attrs = attributes(request)
    assert attrs["llm_d.pd_proxy.request_id"] == leg_id
    assert attrs["llm_d.pd_proxy.connector"] == "nixlv2"
    assert attrs["llm_d.pd_proxy.kv_connector"] == "nixlv2"
    assert attrs["llm_d.pd_proxy.request_path"] == "/v1/completions"
    assert attrs["llm_d.openai.api"] == "chat_completions"
    assert attrs["llm_d.pd_proxy.disaggregation_used"] is True
    assert attrs["llm_d.pd_proxy.prefill_target"] == prefill.host_port
    assert attrs["llm_d.pd_proxy.prefill_candidates"] == 1
    assert attrs["gen_ai.request.model"] == "sim-model"
    assert isinstance(attrs["gen_ai.usage.input_tokens"], int)
    assert attrs["gen_ai.usage.input_tokens"] > 0
    assert "http.response.status_code" not in attrs  # the server span's
    assert attrs["llm_d.pd_proxy.true_ttft_ms"] > 0  # type: ignore[operator]
    assert attrs["llm_d.pd_proxy.total_duration_ms"] >= attrs["llm_d.pd_proxy.true_ttft_ms"]  # type: ignore[operator]
    assert attrs["llm_d.pd_proxy.decode_duration_ms"] > 0  # type: ignore[operator]
    assert attrs["llm_d.pd_proxy.decode_duration_ms"] <= attrs["llm_d.pd_proxy.total_duration_ms"]  # type: ignore[operator]

    # As in llm-d, the decode span is a child of the prefill span.
    assert p_span.parent_span_id == request.span_id
    assert d_span.parent_span_id == p_span.span_id
    for child in (p_span, d_span):
        assert child.trace_id == request.trace_id
        assert child.kind == trace_pb2.Span.SPAN_KIND_INTERNAL
        assert child.status.code != ERROR
        assert attributes(child)["llm_d.pd_proxy.request_id"] == leg_id
        assert attributes(child)["llm_d.pd_proxy.connector"] == "nixlv2"
    assert p_span.end_time_unix_nano <= d_span.start_time_unix_nano  # prefill, then decode
    p_attrs = attributes(p_span)
    assert p_attrs["llm_d.pd_proxy.prefill_target"] == prefill.host_port
    assert p_attrs["llm_d.pd_proxy.prefill.status_code"] == 200
    assert p_attrs["llm_d.pd_proxy.prefill.attempt"] == 1
    assert p_attrs["llm_d.pd_proxy.prefill.async"] is False
    assert p_attrs["gen_ai.usage.input_tokens"] == attrs["gen_ai.usage.input_tokens"]
    assert isinstance(p_attrs["llm_d.pd_proxy.prefill.duration_ms"], float)
    d_attrs = attributes(d_span)
    assert d_attrs["llm_d.pd_proxy.decode.target"] == f"127.0.0.1:{decode.port}"
    assert d_attrs["llm_d.pd_proxy.decode.streaming"] is False
    assert d_attrs["llm_d.pd_proxy.decode.data_parallel"] is False
    assert "http.response.status_code" not in d_attrs  # its client span's
    assert d_attrs["gen_ai.usage.output_tokens"] == BODY["max_tokens"]
    assert attrs["gen_ai.usage.output_tokens"] == BODY["max_tokens"]

    # One client span per leg, under its stage; its context is what the engine received.
    for stage, engine, leg in ((p_span, prefill, p_leg), (d_span, decode, d_leg)):
        (http,) = sink.children(stage, "HTTP POST")
        assert http.kind == trace_pb2.Span.SPAN_KIND_CLIENT
        assert http.status.code != ERROR
        assert attributes(http) == {
            "http.request.method": "POST",
            "url.full": f"http://127.0.0.1:{engine.port}/v1/completions",
            "server.address": "127.0.0.1",
            "server.port": engine.port,
            "network.protocol.version": "1.1",
            "http.response.status_code": 200,
        }
        assert parent_of(leg["headers"]["traceparent"]) == (TRACE_ID, http.span_id.hex())
        assert stage.start_time_unix_nano <= http.start_time_unix_nano
        assert http.end_time_unix_nano <= stage.end_time_unix_nano


async def test_a_retried_prefill_shows_one_span_per_attempt(
    otlp_env: Collector,
    start_sim: Any,
    start_sidecar: StartSidecar,
    client: aiohttp.ClientSession,
) -> None:
    sink = otlp_env
    prefill = await start_sim(role="prefill", zero_latency=True)
    decode = await start_sim(role="decode", zero_latency=True)
    sidecar = await start_sidecar(model_server_port=decode.port, tracing=True)
    await prefill.add_fault(kind="status", status=503, count=1)
    headers = {"x-prefiller-host-port": prefill.host_port, "traceparent": CALLER}
    assert await post(client, sidecar.url, headers) == 200

    await sink.wait_for(
        lambda: (
            len(sink.named("forward_request")) == 1
            and len(sink.named("prefill")) == 2
            and len(sink.named("HTTP POST")) == 3
        ),
        "two prefill attempts",
    )
    (request,) = sink.named("forward_request")
    attempts = sorted(sink.named("prefill"), key=lambda s: s.start_time_unix_nano)
    assert [attributes(s)["llm_d.pd_proxy.prefill.attempt"] for s in attempts] == [1, 2]
    assert [attributes(s)["llm_d.pd_proxy.prefill.status_code"] for s in attempts] == [503, 200]
    assert attempts[0].status.code == ERROR
    assert attributes(attempts[0])["llm_d.pd_proxy.error"] == "status_503"
    assert attempts[1].status.code != ERROR
    assert all(s.parent_span_id == request.span_id for s in attempts)
    assert request.status.code != ERROR
    assert attributes(request)["llm_d.pd_proxy.prefill_attempts"] == 2
    # Each attempt's leg is a client span of its own, the failed one in error.
    sent = [sink.children(s, "HTTP POST") for s in attempts]
    assert [len(c) for c in sent] == [1, 1]
    assert attributes(sent[0][0])["http.response.status_code"] == 503
    assert attributes(sent[0][0])["error.type"] == "503"
    assert sent[0][0].status.code == ERROR
    assert sent[1][0].status.code != ERROR
    legs = await _recorded(prefill)
    assert [parent_of(r["headers"]["traceparent"]) for r in legs] == [
        (TRACE_ID, c[0].span_id.hex()) for c in sent
    ]


async def test_a_prefill_that_never_succeeds_leaves_every_attempt_in_error(
    otlp_env: Collector,
    start_sim: Any,
    start_sidecar: StartSidecar,
    client: aiohttp.ClientSession,
) -> None:
    sink = otlp_env
    prefill = await start_sim(role="prefill", zero_latency=True)
    decode = await start_sim(role="decode", zero_latency=True)
    sidecar = await start_sidecar(
        model_server_port=decode.port, tracing=True, prefill_max_retries=2
    )
    await prefill.add_fault(kind="status", status=503, count=-1)
    headers = {"x-prefiller-host-port": prefill.host_port, "traceparent": CALLER}
    assert await post(client, sidecar.url, headers) == 502

    await sink.wait_for(
        lambda: (
            len(sink.named(SERVER_SPAN)) == 1
            and len(sink.named("forward_request")) == 1
            and len(sink.named("prefill")) == 3
        ),
        "three failed prefill attempts",
    )
    (server,) = sink.named(SERVER_SPAN)
    (request,) = sink.named("forward_request")
    attempts = sink.named("prefill")
    assert all(s.status.code == ERROR for s in attempts)
    assert sorted(attributes(s)["llm_d.pd_proxy.prefill.attempt"] for s in attempts) == [1, 2, 3]
    assert sink.named("decode") == []
    assert request.status.code == ERROR
    assert "503" in request.status.message
    assert attributes(server)["http.response.status_code"] == 502
    assert server.status.code == ERROR


async def test_mooncake_legs_run_concurrently_under_llm_ds_prefixed_names(
    otlp_env: Collector,
    start_sim: Any,
    start_sidecar: StartSidecar,
    client: aiohttp.ClientSession,
) -> None:
    sink = otlp_env
    prefill = await start_sim(zero_latency=True, bootstrap_port=0)
    decode = await start_sim(zero_latency=True)
    sidecar = await start_sidecar(
        model_server_port=decode.port,
        kv_connector="mooncake",
        mooncake_bootstrap_port=prefill.bootstrap_port,
        tracing=True,
    )
    headers = {"x-prefiller-host-port": prefill.host_port, "traceparent": CALLER}
    assert await post(client, sidecar.url, headers) == 200

    await sink.wait_for(
        lambda: (
            len(sink.named("forward_request")) == 1
            and len(sink.named("llm_d.pd_proxy.prefill")) == 1
            and len(sink.named("llm_d.pd_proxy.decode")) == 1
        ),
        "mooncake's prefill and decode spans",
    )
    (request,) = sink.named("forward_request")
    (p_span,) = sink.named("llm_d.pd_proxy.prefill")
    (d_span,) = sink.named("llm_d.pd_proxy.decode")
    assert p_span.parent_span_id == request.span_id
    assert d_span.parent_span_id == p_span.span_id  # as llm-d nests them
    assert attributes(request)["llm_d.pd_proxy.concurrent_pd"] is True
    assert attributes(p_span)["llm_d.pd_proxy.prefill.async"] is True
    assert attributes(d_span)["llm_d.pd_proxy.decode.concurrent_with_prefill"] is True
    assert attributes(d_span)["llm_d.pd_proxy.connector"] == "mooncake"
    await sink.wait_for(lambda: len(sink.named("HTTP POST")) >= 2, "the client spans")
    (p_leg,) = await _recorded(prefill)
    (d_leg,) = await _recorded(decode)
    (p_http,) = [c for c in sink.children(p_span, "HTTP POST")
                 if attributes(c)["server.port"] == prefill.port]  # fmt: skip
    (d_http,) = sink.children(d_span, "HTTP POST")
    assert parent_of(p_leg["headers"]["traceparent"]) == (TRACE_ID, p_http.span_id.hex())
    assert parent_of(d_leg["headers"]["traceparent"]) == (TRACE_ID, d_http.span_id.hex())


async def test_a_request_without_traceparent_starts_a_trace_its_legs_continue(
    otlp_env: Collector,
    start_sim: Any,
    start_sidecar: StartSidecar,
    client: aiohttp.ClientSession,
) -> None:
    sink = otlp_env
    decode = await start_sim(zero_latency=True)
    sidecar = await start_sidecar(model_server_port=decode.port, tracing=True)
    # Decode-only: the body goes to the engine as sent, under the request span.
    assert await post(client, sidecar.url, {}) == 200

    await sink.wait_for(
        lambda: len(sink.named(SERVER_SPAN)) == 1 and len(sink.named("HTTP POST")) == 1,
        "the server and client spans",
    )
    (server,) = sink.named(SERVER_SPAN)
    (request,) = sink.named("forward_request")
    assert server.parent_span_id == b""  # a root span
    assert request.parent_span_id == server.span_id
    attrs = attributes(request)
    assert attrs["llm_d.pd_proxy.disaggregation_used"] is False
    assert attrs["llm_d.pd_proxy.reason"] == "no_prefill_header"
    # Decode-only has its decode span too, with the answer's token counts.
    (d_span,) = sink.children(request, "decode")
    assert attributes(d_span)["gen_ai.usage.output_tokens"] == BODY["max_tokens"]
    assert attributes(d_span)["llm_d.pd_proxy.decode.data_parallel"] is False
    assert attrs["gen_ai.usage.output_tokens"] == BODY["max_tokens"]
    assert attrs["llm_d.pd_proxy.decode_duration_ms"] > 0  # type: ignore[operator]
    (http,) = sink.children(d_span, "HTTP POST")
    (leg,) = await _recorded(decode)
    assert parent_of(leg["headers"]["traceparent"]) == (
        request.trace_id.hex(),
        http.span_id.hex(),
    )


async def test_without_tracing_nothing_is_exported(
    otlp_env: Collector,
    start_sim: Any,
    start_sidecar: StartSidecar,
    client: aiohttp.ClientSession,
) -> None:
    sink = otlp_env
    prefill = await start_sim(role="prefill", zero_latency=True)
    decode = await start_sim(role="decode", zero_latency=True)
    sidecar = await start_sidecar(model_server_port=decode.port)
    assert TRACING not in sidecar.servers.app
    headers = {"x-prefiller-host-port": prefill.host_port, "traceparent": CALLER}
    assert await post(client, sidecar.url, headers) == 200
    await sidecar.servers.drain_and_stop()  # anything batched would be flushed now

    assert sink.spans == []
    # The legs still carry the caller's trace, each with a span id of its own.
    (p_leg,) = await _recorded(prefill)
    (d_leg,) = await _recorded(decode)
    p_trace, p_parent = parent_of(p_leg["headers"]["traceparent"])
    d_trace, d_parent = parent_of(d_leg["headers"]["traceparent"])
    assert p_trace == d_trace == TRACE_ID
    assert len({p_parent, d_parent, PARENT_ID}) == 3


async def test_a_trace_the_caller_did_not_sample_is_continued_but_not_exported(
    otlp_env: Collector,
    monkeypatch: pytest.MonkeyPatch,
    start_sim: Any,
    start_sidecar: StartSidecar,
    client: aiohttp.ClientSession,
) -> None:
    sink = otlp_env
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "parentbased_traceidratio")  # llm-d's default
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "1.0")
    prefill = await start_sim(role="prefill", zero_latency=True)
    decode = await start_sim(role="decode", zero_latency=True)
    sidecar = await start_sidecar(model_server_port=decode.port, tracing=True)
    unsampled = f"00-{TRACE_ID}-{PARENT_ID}-00"
    headers = {"x-prefiller-host-port": prefill.host_port, "traceparent": unsampled}
    assert await post(client, sidecar.url, headers) == 200
    # A sampled request afterwards: its spans arriving means the first one's would have.
    sampled = {"x-prefiller-host-port": prefill.host_port, "traceparent": CALLER}
    assert await post(client, sidecar.url, sampled) == 200
    await sink.wait_for(lambda: len(sink.named("forward_request")) == 1, "the sampled request")
    await sidecar.servers.drain_and_stop()

    assert {s.trace_id.hex() for s in sink.spans} == {TRACE_ID}
    assert len(sink.named("prefill")) == len(sink.named("decode")) == 1
    # The unsampled request's legs still carry its trace, marked unsampled.
    p_leg = (await _recorded(prefill))[0]
    _, trace_id, span_id, flags = p_leg["headers"]["traceparent"].split("-")
    assert (trace_id, flags) == (TRACE_ID, "00")
    assert span_id not in {PARENT_ID, *(s.span_id.hex() for s in sink.spans)}


async def test_refusals_ssrf_in_error_a_clients_bad_body_not(
    otlp_env: Collector,
    tmp_path: Path,
    start_sim: Any,
    start_sidecar: StartSidecar,
    client: aiohttp.ClientSession,
) -> None:
    sink = otlp_env
    prefill = await start_sim(role="prefill", zero_latency=True)
    decode = await start_sim(role="decode", zero_latency=True)
    allow = tmp_path / "allow.json"
    allow.write_text(json.dumps({"allow": [{"host": "127.0.0.1", "ports": [1]}]}))
    sidecar = await start_sidecar(
        model_server_port=decode.port,
        tracing=True,
        enable_ssrf_protection=True,
        ssrf_allowlist_file=str(allow),
    )
    headers = {"x-prefiller-host-port": prefill.host_port, "traceparent": CALLER}
    assert await post(client, sidecar.url, headers) == 403
    assert await post(client, sidecar.url, {}, body=[1, 2]) == 400  # not a JSON object

    await sink.wait_for(
        lambda: len(sink.named("forward_request")) == len(sink.named(SERVER_SPAN)) == 2,
        "both request spans",
    )
    by_status = {attributes(s)["http.response.status_code"]: s for s in sink.named(SERVER_SPAN)}
    (denied,) = sink.children(by_status[403], "forward_request")
    (bad,) = sink.children(by_status[400], "forward_request")
    assert denied.status.code == ERROR
    assert attributes(denied)["llm_d.pd_proxy.error"] == "ssrf_protection_denied"
    assert attributes(denied)["llm_d.pd_proxy.denied_target"] == prefill.host_port
    assert bad.status.code != ERROR
    # A 4xx leaves the server spans unset, as otelhttp's handler does.
    assert by_status[403].status.code != ERROR
    assert by_status[400].status.code != ERROR
    assert (await _recorded(prefill)) == []  # the refused target was never sent anything
