"""The edges of the P/D handshake through the sidecar, against simulated engines: a
prefill whose generation already finished, prefill and decode engines that report no
cached-token count, and the leg id on retries."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import pytest

from tests.sidecar.conftest import StartSidecar, roles
from tests.sidecar.test_pd_flow import BODIES, cached_tokens, sse_payloads, usage_payloads
from vllm_sim.tokens import chat_prompt, output_token_ids, tokenize

PROMPT = "the quick brown fox jumps over the lazy dog " * 6
CHAT = {"model": "sim-model", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 6}


def first_token_id() -> int:
    return output_token_ids(tokenize(chat_prompt(CHAT["messages"])), 1)[0]


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
async def test_prefill_whose_generation_finished_is_answered_like_one_engine(
    start_sim: Any, start_sidecar: StartSidecar, client: aiohttp.ClientSession, stream: bool
) -> None:
    # An engine that keeps KV only for a prefill stopped at the cap (vLLM before 0.32
    # for EOS and stop tokens) answers a first-token stop with finish_reason "stop" and
    # no kv_transfer_params. That is the whole answer, not a failed prefill.
    p = await start_sim(zero_latency=True, kv_params_on_stop=False)
    d = await start_sim(zero_latency=True)
    sidecar = await start_sidecar(model_server_port=d.port)
    body = {**CHAT, "stop_token_ids": [first_token_id()], "stream": stream}
    async with client.post(f"{d.url}/v1/chat/completions", json=body) as resp:
        alone = await resp.text()
    await d.reset(cache=True)
    headers = {"x-prefiller-host-port": p.host_port}
    async with client.post(sidecar.url + "/v1/chat/completions", json=body, headers=headers) as r:
        assert r.status == 200
        assert "x-pd-prefill-fallback" not in r.headers
        through = await r.text()
    if stream:
        strip = [{k: v for k, v in e.items() if k not in ("id", "created")}
                 for e in sse_payloads(through)]  # fmt: skip
        assert strip == [{k: v for k, v in e.items() if k not in ("id", "created")}
                         for e in sse_payloads(alone)]  # fmt: skip
    else:
        got, want = json.loads(through), json.loads(alone)
        assert got["choices"] == want["choices"]
        assert got["choices"][0]["finish_reason"] == "stop"
        assert got["usage"] == want["usage"]
    p_stats, d_stats = await p.stats(), await d.stats()
    assert roles(p_stats)["prefill"] == 1
    # The decode ran the client's own body: no kv_transfer_params, nothing pulled.
    (d_rec,) = d_stats["recorded"]
    assert d_rec["body"] == body
    assert d_stats["kv_pulls_ok"] == d_stats["kv_pulls_failed"] == 0
    assert sidecar.sample("pd_sidecar_prefill_finished_total") == 1
    assert (
        sidecar.sample("pd_sidecar_prefill_failures_total", reason="missing_kv_transfer_params")
        == 0
    )


async def test_prefill_at_the_cap_without_params_is_still_a_502(
    start_sim: Any, start_sidecar: StartSidecar, client: aiohttp.ClientSession
) -> None:
    p = await start_sim(zero_latency=True)
    d = await start_sim(zero_latency=True)
    sidecar = await start_sidecar(model_server_port=d.port)
    await p.add_fault(kind="omit_kv_transfer_params")
    headers = {"x-prefiller-host-port": p.host_port}
    async with client.post(sidecar.url + "/v1/chat/completions", json=CHAT, headers=headers) as r:
        assert r.status == 502
        assert "length cap" in (await r.json())["error"]["message"]
    assert (await d.stats())["requests_total"] == 0
    assert sidecar.sample("pd_sidecar_prefill_finished_total") == 0


@pytest.mark.parametrize("path", list(BODIES))
@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
@pytest.mark.parametrize("prefill_details", [True, False], ids=["p-reports", "p-silent"])
async def test_usage_reports_the_prefills_count_whoever_leaves_it_out(
    start_sim: Any,
    start_sidecar: StartSidecar,
    client: aiohttp.ClientSession,
    path: str,
    stream: bool,
    prefill_details: bool,
) -> None:
    # The decode engine runs without --enable-prompt-tokens-details (vLLM's default):
    # its usage has no cached count, which the client would read as "whatever". The
    # prefill's count goes in; a prefill that reports none counts as 0.
    p = await start_sim(zero_latency=True, enable_prompt_tokens_details=prefill_details)
    d = await start_sim(zero_latency=True, enable_prompt_tokens_details=False)
    sidecar = await start_sidecar(model_server_port=d.port)
    body = dict(BODIES[path])
    # Warm the prefill engine's prefix cache, so that its count is not 0.
    async with client.post(f"{p.url}{path}", json=body) as resp:
        assert resp.status == 200
    if stream:
        body["stream"] = True
        if path in ("/v1/chat/completions", "/v1/completions", "/inference/v1/generate"):
            body["stream_options"] = {"include_usage": True}
    headers = {"x-prefiller-host-port": p.host_port}
    async with client.post(sidecar.url + path, json=body, headers=headers) as resp:
        assert resp.status == 200
        text = await resp.text()
    payloads = usage_payloads(path, sse_payloads(text)) if stream else [json.loads(text)]
    assert payloads, text
    expected = (await p.stats())["recorded"][-1]  # the prefill leg
    assert expected["body"].get("kv_transfer_params")
    counts = {cached_tokens(path, payload) for payload in payloads}
    # vLLM's Responses API reports the cached count whatever the flag says.
    reports = prefill_details or path == "/v1/responses"
    assert counts == ({48} if reports else {0})
    if path == "/v1/messages":
        # Anthropic's input_tokens excludes the cache reads it reports.
        prompt = len(tokenize(chat_prompt(body["messages"])))
        for payload in payloads:
            usage = payload.get("usage") or payload["message"]["usage"]
            if "input_tokens" in usage:
                assert usage["input_tokens"] + usage["cache_read_input_tokens"] == prompt


async def test_retries_keep_one_leg_id(
    start_sim: Any, start_sidecar: StartSidecar, client: aiohttp.ClientSession
) -> None:
    p = await start_sim(zero_latency=True)
    d = await start_sim(zero_latency=True)
    sidecar = await start_sidecar(model_server_port=d.port, prefill_max_retries=2)
    await p.add_fault(kind="status", status=503, count=2)
    headers = {"x-prefiller-host-port": p.host_port, "x-request-id": "mine"}
    async with client.post(sidecar.url + "/v1/chat/completions", json=CHAT, headers=headers) as r:
        assert r.status == 200
        assert r.headers["x-request-id"] == "mine"
    ids = {rec["headers"]["x-request-id"] for rec in (await p.stats())["recorded"]}
    ids |= {rec["headers"]["x-request-id"] for rec in (await d.stats())["recorded"]}
    assert len(ids) == 1 and "mine" not in ids
    assert sidecar.sample("pd_sidecar_prefill_retries_total", reason="status_503") == 2
