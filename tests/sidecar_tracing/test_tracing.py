"""``--tracing``: the sidecar's spans reach an OTLP collector and its legs join the trace.

A real collector (the OTLP TraceService over gRPC on loopback), simulated prefill and
decode engines, the sidecar in between:

- a P/D request sent with a ``traceparent`` gives a ``forward_request`` SERVER span that
  is a child of the caller's span, with ``prefill`` and ``decode`` children carrying
  llm-d's attributes; each leg reached its engine with a ``traceparent`` naming the
  span it was sent under;
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
            len(sink.named("forward_request")) == 1
            and len(sink.named("prefill")) == 1
            and len(sink.named("decode")) == 1
        ),
        "the request span and its prefill and decode spans",
    )
    (request,) = sink.named("forward_request")
    (p_span,) = sink.named("prefill")
    (d_span,) = sink.named("decode")
    assert sink.services == {"llm-d-disagg-sidecar"}

    assert request.trace_id.hex() == TRACE_ID
    assert request.parent_span_id.hex() == PARENT_ID  # a child of the caller's span
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
    assert attrs["gen_ai.request.model"] == "sim-model"
    assert isinstance(attrs["gen_ai.usage.input_tokens"], int)
    assert attrs["gen_ai.usage.input_tokens"] > 0
    assert attrs["http.response.status_code"] == 200
    assert attrs["llm_d.pd_proxy.true_ttft_ms"] > 0  # type: ignore[operator]
    assert attrs["llm_d.pd_proxy.total_duration_ms"] >= attrs["llm_d.pd_proxy.true_ttft_ms"]  # type: ignore[operator]

    for child in (p_span, d_span):
        assert child.trace_id == request.trace_id
        assert child.parent_span_id == request.span_id
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
    assert d_attrs["http.response.status_code"] == 200
    assert d_attrs["gen_ai.usage.output_tokens"] == BODY["max_tokens"]
    assert attrs["gen_ai.usage.output_tokens"] == BODY["max_tokens"]

    # Each engine saw the trace, with the span of its own leg as the parent.
    assert parent_of(p_leg["headers"]["traceparent"]) == (TRACE_ID, p_span.span_id.hex())
    assert parent_of(d_leg["headers"]["traceparent"]) == (TRACE_ID, d_span.span_id.hex())


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
        lambda: len(sink.named("forward_request")) == 1 and len(sink.named("prefill")) == 2,
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
    # Each attempt's leg names its own span.
    legs = await _recorded(prefill)
    assert [parent_of(r["headers"]["traceparent"]) for r in legs] == [
        (TRACE_ID, s.span_id.hex()) for s in attempts
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
        lambda: len(sink.named("forward_request")) == 1 and len(sink.named("prefill")) == 3,
        "three failed prefill attempts",
    )
    (request,) = sink.named("forward_request")
    attempts = sink.named("prefill")
    assert all(s.status.code == ERROR for s in attempts)
    assert sorted(attributes(s)["llm_d.pd_proxy.prefill.attempt"] for s in attempts) == [1, 2, 3]
    assert sink.named("decode") == []
    assert request.status.code == ERROR
    assert "503" in request.status.message
    assert attributes(request)["http.response.status_code"] == 502


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
    assert p_span.parent_span_id == d_span.parent_span_id == request.span_id
    assert attributes(p_span)["llm_d.pd_proxy.prefill.async"] is True
    assert attributes(d_span)["llm_d.pd_proxy.decode.concurrent_with_prefill"] is True
    assert attributes(d_span)["llm_d.pd_proxy.connector"] == "mooncake"
    (p_leg,) = await _recorded(prefill)
    (d_leg,) = await _recorded(decode)
    assert parent_of(p_leg["headers"]["traceparent"]) == (TRACE_ID, p_span.span_id.hex())
    assert parent_of(d_leg["headers"]["traceparent"]) == (TRACE_ID, d_span.span_id.hex())


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

    await sink.wait_for(lambda: len(sink.named("forward_request")) == 1, "the request span")
    (request,) = sink.named("forward_request")
    assert request.parent_span_id == b""  # a root span
    attrs = attributes(request)
    assert attrs["llm_d.pd_proxy.disaggregation_used"] is False
    assert attrs["llm_d.pd_proxy.reason"] == "no_prefill_header"
    (leg,) = await _recorded(decode)
    assert parent_of(leg["headers"]["traceparent"]) == (
        request.trace_id.hex(),
        request.span_id.hex(),
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

    await sink.wait_for(lambda: len(sink.named("forward_request")) == 2, "both request spans")
    by_status = {
        attributes(s)["http.response.status_code"]: s for s in sink.named("forward_request")
    }
    denied, bad = by_status[403], by_status[400]
    assert denied.status.code == ERROR
    assert attributes(denied)["llm_d.pd_proxy.error"] == "ssrf_protection_denied"
    assert bad.status.code != ERROR
    assert (await _recorded(prefill)) == []  # the refused target was never sent anything
