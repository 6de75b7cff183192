"""The nixlv2 P/D flow against simulated engines: both legs per API shape, the handshake,
usage accounting, request ids, trace context and header stripping."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import openai
import pytest

from tests.sidecar.conftest import PD, roles

PROMPT = "the quick brown fox jumps over the lazy dog " * 6  # 54 sim tokens

REMOTE_DECODE = {
    "do_remote_decode": True,
    "do_remote_prefill": False,
    "remote_engine_id": None,
    "remote_block_ids": None,
    "remote_host": None,
    "remote_port": None,
}

BODIES: dict[str, dict[str, Any]] = {
    "/v1/chat/completions": {
        "model": "sim-model",
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": 7,
        "min_tokens": 2,
    },
    "/v1/completions": {"model": "sim-model", "prompt": PROMPT, "max_tokens": 7},
    "/v1/responses": {"model": "sim-model", "input": PROMPT, "max_output_tokens": 7},
    "/v1/messages": {
        "model": "sim-model",
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": 7,
    },
    "/inference/v1/generate": {
        "model": "sim-model",
        "token_ids": list(range(1, 60)),
        "sampling_params": {"max_tokens": 7, "min_tokens": 2},
    },
}


def expected_prefill_body(path: str, body: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in body.items() if k not in ("stream_options", "min_tokens")}
    out["stream"] = False
    out["kv_transfer_params"] = REMOTE_DECODE
    if path == "/v1/responses":
        out["max_output_tokens"] = 1
    elif path == "/inference/v1/generate":
        out["sampling_params"] = {"max_tokens": 1}
    else:
        out["max_tokens"] = 1
    return out


def cached_tokens(path: str, payload: dict[str, Any]) -> int:
    if path == "/v1/responses":
        usage = payload.get("response", payload)["usage"]
        return int(usage["input_tokens_details"]["cached_tokens"])
    if path == "/v1/messages":
        usage = payload["usage"] if "usage" in payload else payload["message"]["usage"]
        return int(usage["cache_read_input_tokens"])
    return int(payload["usage"]["prompt_tokens_details"]["cached_tokens"])


def sse_payloads(text: str) -> list[dict[str, Any]]:
    out = []
    for line in text.splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            out.append(json.loads(line[6:]))
    return out


def usage_payloads(path: str, payloads: list[dict[str, Any]]) -> list[dict[str, Any]]:
    found = []
    for payload in payloads:
        try:
            cached_tokens(path, payload)
        except (KeyError, TypeError):
            continue
        found.append(payload)
    return found


async def assert_legs(pd: PD, path: str, body: dict[str, Any]) -> tuple[dict[str, Any], ...]:
    p_stats, d_stats = await pd.prefill.stats(), await pd.decode.stats()
    assert roles(p_stats) == {"prefill": 1, "decode": 0, "aggregated": 0}
    assert roles(d_stats) == {"prefill": 0, "decode": 1, "aggregated": 0}
    assert d_stats["kv_pulls_ok"] == 1 and d_stats["kv_pulls_failed"] == 0
    assert p_stats["kv_pulls_served"] == 1
    assert d_stats["recomputes"] == 0
    (p_rec,) = p_stats["recorded"]
    (d_rec,) = d_stats["recorded"]
    assert p_rec["path"] == d_rec["path"] == path
    assert p_rec["body"] == expected_prefill_body(path, body)
    params = d_rec["body"].pop("kv_transfer_params")
    assert d_rec["body"] == body  # the client's body, as sent
    assert params["do_remote_prefill"] is True
    assert params["remote_engine_id"] == p_stats["engine_id"]
    assert params["remote_port"] == pd.prefill.engine.side_channel_port
    return p_rec, d_rec


@pytest.mark.parametrize("path", list(BODIES))
async def test_json_flow_per_shape(pd: PD, client: aiohttp.ClientSession, path: str) -> None:
    body = BODIES[path]
    async with client.post(pd.url + path, json=body, headers=pd.headers) as resp:
        assert resp.status == 200, await resp.text()
        payload = await resp.json()
    await assert_legs(pd, path, body)
    # A fresh prefiller had nothing cached; the decode engine counted the pulled KV as
    # cached (prompt - 1). The client must see the prefill's view.
    assert cached_tokens(path, payload) == 0


@pytest.mark.parametrize("path", list(BODIES))
async def test_streaming_flow_per_shape(pd: PD, client: aiohttp.ClientSession, path: str) -> None:
    body = {**BODIES[path], "stream": True}
    if path in ("/v1/chat/completions", "/v1/completions", "/inference/v1/generate"):
        body["stream_options"] = {"include_usage": True}
    async with client.post(pd.url + path, json=body, headers=pd.headers) as resp:
        assert resp.status == 200
        assert resp.content_type == "text/event-stream"
        text = await resp.text()
    await assert_legs(pd, path, body)
    usages = usage_payloads(path, sse_payloads(text))
    assert usages, text
    assert all(cached_tokens(path, u) == 0 for u in usages)


async def test_cached_tokens_report_the_prefill_view_on_a_warm_prefiller(
    pd: PD, client: aiohttp.ClientSession
) -> None:
    path, body = "/v1/completions", BODIES["/v1/completions"]
    for _ in range(2):
        async with client.post(pd.url + path, json=body, headers=pd.headers) as resp:
            payload = await resp.json()
    prompt_tokens = payload["usage"]["prompt_tokens"]
    relayed = cached_tokens(path, payload)
    # The warm prefiller hit whole blocks (16 tokens); the decode's view would be prompt - 1.
    assert relayed > 0
    assert relayed % 16 == 0
    assert relayed != prompt_tokens - 1


async def test_openai_client_json_and_stream(pd: PD) -> None:
    async with openai.AsyncOpenAI(
        base_url=pd.url + "/v1", api_key="unused", default_headers=pd.headers, max_retries=0
    ) as oai:
        completion = await oai.chat.completions.create(
            model="sim-model", messages=[{"role": "user", "content": PROMPT}], max_tokens=5
        )
        assert completion.choices[0].finish_reason == "length"
        assert completion.usage is not None and completion.usage.completion_tokens == 5
        stream = await oai.chat.completions.create(
            model="sim-model",
            messages=[{"role": "user", "content": PROMPT}],
            max_tokens=6,
            stream=True,
            stream_options={"include_usage": True},
        )
        pieces, usage = [], None
        async for chunk in stream:
            pieces.extend(c.delta.content or "" for c in chunk.choices)
            usage = chunk.usage or usage
    assert usage is not None and usage.completion_tokens == 6
    assert usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.cached_tokens != usage.prompt_tokens - 1
    assert "".join(pieces)
    d_stats = await pd.decode.stats()
    assert d_stats["kv_pulls_ok"] == 2
    assert d_stats["requests_by_role"]["decode"] == 2


async def test_one_fresh_request_id_on_both_legs_client_id_echoed(
    pd: PD, client: aiohttp.ClientSession
) -> None:
    # Two clients may send the same id; an engine keys its requests (and NIXL its
    # leases) by it. The legs share one id of ours; the client gets its own id back.
    headers = {**pd.headers, "x-request-id": "client-chosen-id-1"}
    body = BODIES["/v1/completions"]
    leg_ids = []
    for _ in range(2):
        async with client.post(pd.url + "/v1/completions", json=body, headers=headers) as resp:
            assert resp.status == 200
            assert resp.headers["x-request-id"] == "client-chosen-id-1"
        p_rec, d_rec = await assert_legs(pd, "/v1/completions", body)
        assert p_rec["headers"]["x-request-id"] == d_rec["headers"]["x-request-id"]
        leg_ids.append(p_rec["headers"]["x-request-id"])
        await pd.prefill.reset()
        await pd.decode.reset()
    assert "client-chosen-id-1" not in leg_ids
    assert leg_ids[0] != leg_ids[1]


async def test_generated_request_id_shared_and_traceparent_propagated(
    pd: PD, client: aiohttp.ClientSession
) -> None:
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    headers = {**pd.headers, "traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"}
    body = BODIES["/v1/completions"]
    async with client.post(pd.url + "/v1/completions", json=body, headers=headers) as resp:
        assert resp.status == 200
        rid = resp.headers["x-request-id"]
    p_rec, d_rec = await assert_legs(pd, "/v1/completions", body)
    assert p_rec["headers"]["x-request-id"] == d_rec["headers"]["x-request-id"] == rid
    p_trace = p_rec["headers"]["traceparent"].split("-")
    d_trace = d_rec["headers"]["traceparent"].split("-")
    assert p_trace[1] == d_trace[1] == trace_id
    assert p_trace[2] != d_trace[2] != "00f067aa0ba902b7"  # each leg is its own span


async def test_routing_headers_stripped_on_both_legs(pd: PD, client: aiohttp.ClientSession) -> None:
    routing = {
        "x-encoder-hosts-ports": "10.9.9.9:1",
        "x-gateway-destination-endpoint": "10.9.9.9:2",
        "x-kv-cache-source-host-port": "10.9.9.9:3",
        # A rank of this sidecar (its own): honoured, then stripped like the rest.
        "x-data-parallel-host-port": f"127.0.0.1:{pd.sidecar.servers.port}",
        "x-data-parallel-rank": "3",
    }
    headers = {**pd.headers, **routing, "x-custom": "kept"}
    body = BODIES["/v1/completions"]
    async with client.post(pd.url + "/v1/completions", json=body, headers=headers) as resp:
        assert resp.status == 200
    for rec in await assert_legs(pd, "/v1/completions", body):
        sent = rec["headers"]
        assert not set(sent) & {*routing, "x-prefiller-host-port"}
        assert sent["x-custom"] == "kept"


async def test_ipv6_and_http_prefix_header_forms(
    start_sim: Any, start_sidecar: Any, client: aiohttp.ClientSession
) -> None:
    prefill = await start_sim(role="prefill", zero_latency=True)
    decode = await start_sim(role="decode", zero_latency=True)
    sidecar = await start_sidecar(model_server_port=decode.port)
    header = f" http://{prefill.host_port} , 127.0.0.1:1"
    async with client.post(
        sidecar.url + "/v1/completions",
        json=BODIES["/v1/completions"],
        headers={"x-prefiller-host-port": header},
    ) as resp:
        assert resp.status == 200
    assert (await decode.stats())["kv_pulls_ok"] == 1
