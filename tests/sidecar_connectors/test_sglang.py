"""sglang: concurrent legs meeting in the prefiller's bootstrap room (simulated SGLang)."""

from __future__ import annotations

from typing import Any

import aiohttp
import openai
import pytest

from tests.conftest import eventually
from tests.sidecar.conftest import StartSidecar
from tests.sidecar_connectors.conftest import sse_events

PROMPT = "tell me about kv caches " * 8


async def sglang_pd(start_sim: Any, start_sidecar: StartSidecar, timeout: float = 10.0) -> Any:
    p = await start_sim(
        zero_latency=True, disaggregation_mode="prefill", bootstrap_port=0,
        bootstrap_timeout_seconds=timeout,
    )  # fmt: skip
    d = await start_sim(
        zero_latency=True, disaggregation_mode="decode", bootstrap_timeout_seconds=timeout
    )
    sidecar = await start_sidecar(
        model_server_port=d.port, kv_connector="sglang", sglang_bootstrap_port=p.bootstrap_port
    )
    return p, d, sidecar


async def test_sglang_flow_with_the_openai_client(
    start_sim: Any, start_sidecar: StartSidecar
) -> None:
    p, d, sidecar = await sglang_pd(start_sim, start_sidecar)
    headers = {"x-prefiller-host-port": p.host_port}
    messages: Any = [{"role": "user", "content": PROMPT}]
    async with openai.AsyncOpenAI(
        base_url=f"{sidecar.url}/v1", api_key="unused", max_retries=0, default_headers=headers
    ) as client:
        reply = await client.chat.completions.create(
            model="sim-model", messages=messages, max_tokens=6
        )
        stream = await client.chat.completions.create(
            model="sim-model", messages=messages, max_tokens=6, stream=True,
            stream_options={"include_usage": True},
        )  # fmt: skip
        chunks = [c async for c in stream]
    assert reply.choices[0].finish_reason == "length"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reply.choices[0].message.content
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 6

    p_stats, d_stats = await p.stats(), await d.stats()
    assert p_stats["kv_pulls_served"] == 2
    assert (d_stats["kv_pulls_ok"], d_stats["kv_pulls_failed"]) == (2, 0)
    rooms = set()
    for p_rec, d_rec in zip(p_stats["recorded"], d_stats["recorded"], strict=True):
        p_body, d_body = p_rec["body"], d_rec["body"]
        assert p_body["bootstrap_room"] == d_body["bootstrap_room"]
        rooms.add(p_body["bootstrap_room"])
        assert 0 <= p_body["bootstrap_room"] < 2**63
        for body in (p_body, d_body):
            assert body["bootstrap_host"] == "127.0.0.1"
            assert body["bootstrap_port"] == p.bootstrap_port
        assert p_body["stream"] is False and "stream_options" not in p_body
        assert p_body["max_tokens"] == 6  # the same body: SGLang's prefill stops by itself
        assert p_rec["headers"]["x-request-id"] == d_rec["headers"]["x-request-id"]
    assert len(rooms) == 2  # a fresh room per request
    assert d_stats["recorded"][1]["body"]["stream"] is True


@pytest.mark.parametrize("stream", [False, True])
async def test_failed_prefill_ends_the_waiting_decode(
    start_sim: Any, start_sidecar: StartSidecar, client: aiohttp.ClientSession, stream: bool
) -> None:
    # The decode would wait 5 s in the room for a prefill that never comes (the simulated
    # decode keeps waiting internally after its client left, so a short timeout keeps the
    # teardown short; the abort must be seen well before it).
    p, d, sidecar = await sglang_pd(start_sim, start_sidecar, timeout=5.0)
    await p.add_fault(kind="status", status=500)
    body = {"model": "sim-model", "prompt": PROMPT, "max_tokens": 4, "stream": stream}
    headers = {"x-prefiller-host-port": p.host_port}
    async with client.post(sidecar.url + "/v1/completions", json=body, headers=headers) as r:
        assert r.status == 502
        error = (await r.json())["error"]
    assert error["stage"] == "prefill" and "500" in error["message"]

    async def decode_aborted() -> bool:
        return (await d.stats())["aborts"] == 1

    await eventually(decode_aborted, timeout=2.5, what="the decode leg aborted")
    assert (await d.stats())["kv_pulls_ok"] == 0
    assert sidecar.sample("pd_sidecar_prefill_failures_total", reason="status_500") == 1


async def test_streamed_sglang_flow_raw_sse(
    start_sim: Any, start_sidecar: StartSidecar, client: aiohttp.ClientSession
) -> None:
    p, d, sidecar = await sglang_pd(start_sim, start_sidecar)
    body = {"model": "sim-model", "prompt": PROMPT, "max_tokens": 3, "stream": True}
    headers = {"x-prefiller-host-port": p.host_port}
    async with client.post(sidecar.url + "/v1/completions", json=body, headers=headers) as r:
        assert r.status == 200
        assert r.content_type == "text/event-stream"
        events = sse_events(await r.text())
    assert events[-1] == "[DONE]"
    assert [e["choices"][0]["finish_reason"] for e in events[:-1] if e["choices"]][-1] == "length"
    assert (await p.stats())["kv_pulls_served"] == 1
    assert (await d.stats())["kv_pulls_ok"] == 1
