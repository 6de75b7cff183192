"""``--tracing`` across the other stages: the encode stage of E/P/D, and a decode tried
before any prefill (shared-storage's cache-hit threshold), declined then accepted."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp

from tests.sidecar.conftest import StartSidecar
from tests.sidecar_tracing.conftest import Collector, attributes
from tests.sidecar_tracing.test_tracing import CALLER, TRACE_ID, parent_of

ERROR_CODE = 2  # STATUS_CODE_ERROR


def image(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


async def test_the_encode_stage_is_one_span_and_its_legs_name_it(
    otlp_env: Collector,
    start_sim: Any,
    start_sidecar: StartSidecar,
    client: aiohttp.ClientSession,
) -> None:
    sink = otlp_env
    encoders = [
        await start_sim(zero_latency=True, role="encode", ec_connector="ec-nixl") for _ in range(2)
    ]
    prefill = await start_sim(zero_latency=True, ec_connector="ec-nixl")
    decode = await start_sim(zero_latency=True)
    sidecar = await start_sidecar(
        model_server_port=decode.port, ec_connector="ec-nixl", tracing=True
    )
    content = [
        {"type": "text", "text": "describe what you see " * 4},
        image("https://example.invalid/cat.png"),
        image("https://example.invalid/dog.png"),
    ]
    body = {
        "model": "sim-model", "messages": [{"role": "user", "content": content}],
        "max_tokens": 3, "stream": True,
    }  # fmt: skip
    headers = {
        "x-prefiller-host-port": prefill.host_port,
        "x-encoder-hosts-ports": ",".join(e.host_port for e in encoders),
        "traceparent": CALLER,
    }
    async with client.post(sidecar.url + "/v1/chat/completions", json=body, headers=headers) as r:
        assert r.status == 200
        await r.read()

    await sink.wait_for(
        lambda: all(
            len(sink.named(n)) == 1 for n in ("forward_request", "encode", "prefill", "decode")
        ),
        "the request, encode and decode spans",
    )
    (request,) = sink.named("forward_request")
    (encode,) = sink.named("encode")
    (decode_span,) = sink.named("decode")
    (prefill_span,) = sink.named("prefill")
    assert encode.parent_span_id == request.span_id
    assert encode.end_time_unix_nano <= prefill_span.start_time_unix_nano
    e_attrs = attributes(encode)
    assert e_attrs["llm_d.pd_proxy.ec_connector"] == "ec-nixl"
    assert e_attrs["llm_d.ec_proxy.encoder_count"] == 2
    assert e_attrs["llm_d.ec_proxy.encode_items"] == 2
    attrs = attributes(request)
    assert attrs["llm_d.ec_proxy.encode_disaggregation_used"] is True
    assert attrs["llm_d.ec_proxy.encoder_candidates"] == 2
    assert attrs["llm_d.pd_proxy.ec_connector"] == "ec-nixl"
    assert attrs["llm_d.openai.api"] == "chat_completions"
    assert attributes(decode_span)["llm_d.pd_proxy.decode.streaming"] is True
    # Every encoder leg is a client span of the encode span.
    await sink.wait_for(lambda: len(sink.children(encode, "HTTP POST")) == 2, "encode legs")
    legs = [rec for e in encoders for rec in (await e.stats())["recorded"]]
    assert len(legs) == 2
    assert {parent_of(leg["headers"]["traceparent"]) for leg in legs} == {
        (TRACE_ID, c.span_id.hex()) for c in sink.children(encode, "HTTP POST")
    }


async def test_a_decode_first_attempt_is_a_span_declined_then_accepted(
    otlp_env: Collector,
    start_sim: Any,
    start_sidecar: StartSidecar,
    client: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    sink = otlp_env
    prefill = await start_sim(zero_latency=True, shared_storage_path=str(tmp_path))
    decode = await start_sim(zero_latency=True, shared_storage_path=str(tmp_path))
    sidecar = await start_sidecar(
        model_server_port=decode.port, kv_connector="shared-storage", tracing=True
    )
    body = {
        "model": "sim-model", "messages": [{"role": "user", "content": "kv caches " * 20}],
        "max_tokens": 4, "cache_hit_threshold": 0.5,
    }  # fmt: skip
    headers = {"x-prefiller-host-port": prefill.host_port, "traceparent": CALLER}

    async def ask() -> None:
        async with client.post(
            sidecar.url + "/v1/chat/completions", json=body, headers=headers
        ) as r:
            assert r.status == 200
            await r.read()

    await ask()  # nothing stored: declined, prefilled, decoded
    await sink.wait_for(
        lambda: all(
            len(sink.named(n)) == 1
            for n in ("forward_request", "decode_first", "prefill", "decode")
        ),
        "the first request's spans",
    )
    (first,) = sink.named("decode_first")
    assert attributes(first)["llm_d.pd_proxy.decode_first.verdict"] == "declined"
    assert first.status.code != ERROR_CODE
    (request,) = sink.named("forward_request")
    (prefill_span,) = sink.named("prefill")
    (decode_span,) = sink.named("decode")
    assert first.parent_span_id == prefill_span.parent_span_id == request.span_id
    assert decode_span.parent_span_id == prefill_span.span_id
    await sink.wait_for(lambda: len(sink.named("HTTP POST")) == 3, "the three legs")
    d_legs = (await decode.stats())["recorded"]
    (first_http,) = sink.children(first, "HTTP POST")
    (decode_http,) = sink.children(decode_span, "HTTP POST")
    assert parent_of(d_legs[0]["headers"]["traceparent"]) == (TRACE_ID, first_http.span_id.hex())
    assert parent_of(d_legs[1]["headers"]["traceparent"]) == (TRACE_ID, decode_http.span_id.hex())

    await ask()  # stored now: the decode-first attempt is the answer
    await sink.wait_for(lambda: len(sink.named("forward_request")) == 2, "the second request")
    await sink.wait_for(lambda: len(sink.named("decode_first")) == 2, "the second attempt")
    verdicts = sorted(
        str(attributes(s)["llm_d.pd_proxy.decode_first.verdict"])
        for s in sink.named("decode_first")
    )
    assert verdicts == ["accepted", "declined"]
    assert len(sink.named("prefill")) == 1 and len(sink.named("decode")) == 1
    assert (await prefill.stats())["requests_total"] == 1
