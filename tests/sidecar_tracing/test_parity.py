"""``--tracing`` beyond the basic P/D tree, against a real OTLP collector:

- a request that is not a generation (``GET /v1/models``) has llm-d's server span and
  one client span, and no ``forward_request``;
- an SSE answer's token counts come from its usage event, P/D and decode-only alike;
- a chunked decode is one decode span holding llm-d's ``chunked_decode`` span, with one
  client span per chunk under it, and the total token counts;
- ``x-data-parallel-host-port`` sets ``llm_d.pd_proxy.decode.data_parallel``;
- ``x-kv-cache-source-host-port`` sets ``llm_d.pd_proxy.kv_cache_source``;
- a client span of a leg that could not connect is in error, with ``error.type``;
- MoRI-IO parallel dispatch: sibling legs under llm-d's prefixed names, marked
  ``llm_d.pd_proxy.parallel_dispatch``.
"""

from __future__ import annotations

from typing import Any

import aiohttp
from aiohttp import web

from tests.sidecar.conftest import StartSidecar
from tests.sidecar.test_failures import closed_port
from tests.sidecar_connectors.test_moriio import chat as moriio_chat
from tests.sidecar_connectors.test_moriio import moriio_pd
from tests.sidecar_dp.conftest import contiguous
from tests.sidecar_tracing.conftest import Collector, attributes
from tests.sidecar_tracing.test_tracing import CALLER, ERROR, TRACE_ID, parent_of

CHAT = "/v1/chat/completions"


def chat(max_tokens: int, stream: bool = False) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": "sim-model",
        "messages": [{"role": "user", "content": "tell me about tracing " * 5}],
        "max_tokens": max_tokens,
    }
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return body


async def ask(client: aiohttp.ClientSession, url: str, body: Any, headers: dict[str, str]) -> bytes:
    async with client.post(url, json=body, headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.read()


async def test_a_passthrough_request_has_the_server_span_and_a_client_span(
    otlp_env: Collector,
    start_sidecar: StartSidecar,
    client: aiohttp.ClientSession,
) -> None:
    sink = otlp_env
    seen: list[str] = []

    async def models(request: web.Request) -> web.Response:
        seen.append(request.headers["traceparent"])
        return web.json_response({"object": "list", "data": []})

    engine = web.Application()
    engine.router.add_get("/v1/models", models)
    runner = web.AppRunner(engine)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        sidecar = await start_sidecar(model_server_port=port, tracing=True)
        async with client.get(sidecar.url + "/v1/models", headers={"traceparent": CALLER}) as r:
            assert r.status == 200
            await r.read()
    finally:
        await runner.cleanup()

    name = "llm_d.pd_proxy.GET /v1/models"
    await sink.wait_for(lambda: len(sink.named("HTTP GET")) == 1, "the client span")
    await sink.wait_for(lambda: len(sink.named(name)) == 1, "the server span")
    (server,) = sink.named(name)
    (http,) = sink.named("HTTP GET")
    assert sink.named("forward_request") == []
    assert server.parent_span_id.hex() == parent_of(CALLER)[1]
    assert attributes(server)["http.request.method"] == "GET"
    assert attributes(server)["http.response.status_code"] == 200
    assert http.parent_span_id == server.span_id
    assert attributes(http)["url.full"] == f"http://127.0.0.1:{port}/v1/models"
    assert [parent_of(t) for t in seen] == [(TRACE_ID, http.span_id.hex())]


async def test_sse_answers_carry_their_token_counts(
    otlp_env: Collector,
    start_sim: Any,
    start_sidecar: StartSidecar,
    client: aiohttp.ClientSession,
) -> None:
    sink = otlp_env
    prefill = await start_sim(role="prefill", zero_latency=True)
    decode = await start_sim(role="decode", zero_latency=True)
    sidecar = await start_sidecar(model_server_port=decode.port, tracing=True)
    url = sidecar.url + CHAT
    pd = {"x-prefiller-host-port": prefill.host_port}
    await ask(client, url, chat(6, stream=True), pd)
    await ask(client, url, chat(4, stream=True), {})  # decode-only

    await sink.wait_for(
        lambda: len(sink.named("forward_request")) == 2 and len(sink.named("decode")) == 2,
        "both requests' spans",
    )
    by_disagg = {
        attributes(s)["llm_d.pd_proxy.disaggregation_used"]: s
        for s in sink.named("forward_request")
    }
    for disaggregated, tokens in ((True, 6), (False, 4)):
        request = by_disagg[disaggregated]
        assert attributes(request)["gen_ai.usage.output_tokens"] == tokens
        assert attributes(request)["gen_ai.usage.input_tokens"] > 0  # type: ignore[operator]
        (d_span,) = [s for s in sink.named("decode") if s.trace_id == request.trace_id]
        d_attrs = attributes(d_span)
        assert d_attrs["gen_ai.usage.output_tokens"] == tokens
        assert d_attrs["llm_d.pd_proxy.decode.streaming"] is True


async def test_a_chunked_decode_is_one_decode_span_with_a_client_span_per_chunk(
    otlp_env: Collector,
    start_sim: Any,
    start_sidecar: StartSidecar,
    client: aiohttp.ClientSession,
) -> None:
    sink = otlp_env
    decode = await start_sim(zero_latency=True)
    sidecar = await start_sidecar(model_server_port=decode.port, tracing=True, decode_chunk_size=2)
    await ask(client, sidecar.url + CHAT, chat(5), {})

    await sink.wait_for(
        lambda: len(sink.named("decode")) == 1 and len(sink.named("HTTP POST")) == 3,
        "the decode span and its three chunks",
    )
    (d_span,) = sink.named("decode")
    (request,) = sink.named("forward_request")
    # llm-d's chunked_decode span, under the decode span, holds the chunks' client spans.
    (chunked,) = sink.children(d_span, "chunked_decode")
    c_attrs = attributes(chunked)
    assert c_attrs["llm_d.pd_proxy.chunked_decode.chunk_size"] == 2
    assert c_attrs["llm_d.pd_proxy.chunked_decode.streaming"] is False
    assert c_attrs["llm_d.pd_proxy.chunked_decode.chunks"] == 3
    assert c_attrs["llm_d.pd_proxy.chunked_decode.total_tokens"] == 5
    assert c_attrs["llm_d.pd_proxy.chunked_decode.duration_ms"] >= 0  # type: ignore[operator]
    chunks = sink.children(chunked, "HTTP POST")
    assert len(chunks) == 3
    assert all(attributes(c)["http.response.status_code"] == 200 for c in chunks)
    assert attributes(d_span)["gen_ai.usage.output_tokens"] == 5
    assert attributes(request)["gen_ai.usage.output_tokens"] == 5
    legs = [r for r in (await decode.stats())["recorded"] if r["path"] == CHAT]
    assert [parent_of(r["headers"]["traceparent"]) for r in legs] == [
        (d_span.trace_id.hex(), c.span_id.hex()) for c in chunks
    ]


async def test_the_data_parallel_header_is_noted_on_the_decode_span(
    otlp_env: Collector,
    start_sim: Any,
    start_sidecar: StartSidecar,
    client: aiohttp.ClientSession,
) -> None:
    sink = otlp_env
    engines = await contiguous(start_sim, 2, role="decode", zero_latency=True)
    prefill = await start_sim(role="prefill", zero_latency=True)
    sidecar = await start_sidecar(
        model_server_port=engines[0].port, data_parallel_size=2, tracing=True
    )
    rank0 = f"http://127.0.0.1:{sidecar.servers.ports[0]}/v1/completions"
    named = {"x-data-parallel-host-port": f"127.0.0.1:{sidecar.servers.ports[1]}"}
    body = {"model": "sim-model", "prompt": "data parallel " * 10, "max_tokens": 2}
    await ask(client, rank0, body, {**named, "x-prefiller-host-port": prefill.host_port})
    await ask(client, rank0, body, {})

    await sink.wait_for(lambda: len(sink.named("decode")) == 2, "both decode spans")
    by_dp = {attributes(s)["llm_d.pd_proxy.decode.data_parallel"]: s for s in sink.named("decode")}
    assert set(by_dp) == {True, False}
    assert attributes(by_dp[True])["llm_d.pd_proxy.decode.target"] == engines[1].host_port
    assert attributes(by_dp[False])["llm_d.pd_proxy.decode.target"] == engines[0].host_port


async def test_the_kv_cache_source_is_noted_on_the_request_span(
    otlp_env: Collector,
    start_sim: Any,
    start_sidecar: StartSidecar,
    client: aiohttp.ClientSession,
) -> None:
    sink = otlp_env
    source = await start_sim(zero_latency=True)
    decode = await start_sim(zero_latency=True)
    sidecar = await start_sidecar(
        model_server_port=decode.port,
        kv_connector="offloading",
        p2p_connector_port=source.engine.side_channel_port,
        tracing=True,
    )
    headers = {"x-kv-cache-source-host-port": source.host_port}
    await ask(client, sidecar.url + CHAT, chat(2), headers)

    await sink.wait_for(lambda: len(sink.named("forward_request")) == 1, "the request span")
    (request,) = sink.named("forward_request")
    assert attributes(request)["llm_d.pd_proxy.kv_cache_source"] == source.host_port
    # offloading's legs carry llm-d's prefixed names.
    assert len(sink.named("llm_d.pd_proxy.decode")) == 1


async def test_a_leg_that_cannot_connect_is_a_client_span_in_error(
    otlp_env: Collector,
    start_sim: Any,
    start_sidecar: StartSidecar,
    client: aiohttp.ClientSession,
) -> None:
    sink = otlp_env
    decode = await start_sim(role="decode", zero_latency=True)
    sidecar = await start_sidecar(
        model_server_port=decode.port, tracing=True, prefill_max_retries=0
    )
    dead = f"127.0.0.1:{closed_port()}"
    body = {"model": "sim-model", "prompt": "nobody home " * 5, "max_tokens": 2}
    async with client.post(
        sidecar.url + "/v1/completions", json=body, headers={"x-prefiller-host-port": dead}
    ) as resp:
        await resp.read()

    await sink.wait_for(lambda: len(sink.named("prefill")) >= 1, "the prefill span")
    await sink.wait_for(lambda: len(sink.named("HTTP POST")) >= 1, "the client span")
    (p_span,) = sink.named("prefill")[:1]
    (http, *_) = sink.children(p_span, "HTTP POST")
    assert http.status.code == ERROR
    assert attributes(http)["error.type"]
    assert attributes(http)["server.port"] == int(dead.rsplit(":", 1)[1])
    assert "http.response.status_code" not in attributes(http)


async def test_parallel_dispatch_legs_are_siblings_under_llm_ds_names(
    otlp_env: Collector,
    start_sim: Any,
    start_sidecar: StartSidecar,
    client: aiohttp.ClientSession,
) -> None:
    sink = otlp_env
    p, _d, sidecar = await moriio_pd(
        start_sim, start_sidecar, "write", moriio_parallel_dispatch=True, tracing=True
    )
    status, _ = await moriio_chat(client, sidecar, p)
    assert status == 200

    await sink.wait_for(
        lambda: (
            len(sink.named("forward_request")) == 1
            and len(sink.named("llm_d.pd_proxy.prefill")) == 1
            and len(sink.named("llm_d.pd_proxy.decode")) == 1
        ),
        "the parallel legs' spans",
    )
    (request,) = sink.named("forward_request")
    (p_span,) = sink.named("llm_d.pd_proxy.prefill")
    (d_span,) = sink.named("llm_d.pd_proxy.decode")
    assert p_span.parent_span_id == d_span.parent_span_id == request.span_id
    assert attributes(p_span)["llm_d.pd_proxy.parallel_dispatch"] is True
    assert attributes(d_span)["llm_d.pd_proxy.parallel_dispatch"] is True
    attrs = attributes(request)
    assert attrs["llm_d.pd_proxy.parallel_dispatch"] is True
    assert attrs["llm_d.pd_proxy.parallel_window_ms"] > 0  # type: ignore[operator]
