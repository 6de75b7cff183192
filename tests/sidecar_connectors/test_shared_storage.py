"""shared-storage: prefill then decode through a shared KV store, and the decode-first
cache_hit_threshold path (simulated LMCache-style storage)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from tests.sidecar.conftest import StartSidecar
from tests.sidecar_connectors.conftest import sse_events

PROMPT = "tell me about kv caches " * 8


async def storage_pd(start_sim: Any, start_sidecar: StartSidecar, path: Path) -> Any:
    p = await start_sim(zero_latency=True, shared_storage_path=str(path))
    d = await start_sim(zero_latency=True, shared_storage_path=str(path))
    sidecar = await start_sidecar(model_server_port=d.port, kv_connector="shared-storage")
    return p, d, sidecar


async def test_prefill_then_decode_hits_storage(
    start_sim: Any, start_sidecar: StartSidecar, tmp_path: Path
) -> None:
    p, d, sidecar = await storage_pd(start_sim, start_sidecar, tmp_path)
    headers = {"x-prefiller-host-port": p.host_port}
    messages: Any = [{"role": "user", "content": PROMPT}]
    async with openai.AsyncOpenAI(
        base_url=f"{sidecar.url}/v1", api_key="unused", max_retries=0, default_headers=headers
    ) as client:
        reply = await client.chat.completions.create(
            model="sim-model", messages=messages, max_tokens=5, extra_body={"min_tokens": 2}
        )
        stream = await client.chat.completions.create(
            model="sim-model", messages=[{"role": "user", "content": "other " + PROMPT}],
            max_tokens=5, stream=True, stream_options={"include_usage": True},
        )  # fmt: skip
        chunks = [c async for c in stream]
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage is not None
    n = reply.usage.prompt_tokens
    d_stats = await d.stats()
    assert d_stats["storage_hit_tokens"] > 0
    assert d_stats["storage_hit_tokens"] >= n // 16 * 16
    # The decode found the prompt in storage, but the client is told the prefill's view:
    # nothing was cached, the prompt was computed (by the prefill).
    assert reply.usage.prompt_tokens_details is not None
    assert reply.usage.prompt_tokens_details.cached_tokens == 0
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == 5
    assert usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.cached_tokens == 0
    p_bodies = [r["body"] for r in (await p.stats())["recorded"]]
    d_bodies = [r["body"] for r in d_stats["recorded"]]
    assert p_bodies[0]["max_tokens"] == 1 and p_bodies[0]["stream"] is False
    assert "min_tokens" not in p_bodies[0] and "kv_transfer_params" not in p_bodies[0]
    assert "stream_options" not in p_bodies[1]
    assert d_bodies[0]["max_tokens"] == 5 and d_bodies[0]["min_tokens"] == 2
    assert d_bodies[1]["stream"] is True and "kv_transfer_params" not in d_bodies[1]


@pytest.mark.parametrize("stream", [False, True])
async def test_decode_first_both_branches(
    start_sim: Any,
    start_sidecar: StartSidecar,
    client: aiohttp.ClientSession,
    tmp_path: Path,
    stream: bool,
) -> None:
    p, d, sidecar = await storage_pd(start_sim, start_sidecar, tmp_path)
    headers = {"x-prefiller-host-port": p.host_port}
    body = {
        "model": "sim-model", "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": 4, "cache_hit_threshold": 0.5, "stream": stream,
    }  # fmt: skip

    async def ask() -> tuple[str, Any]:
        async with client.post(
            sidecar.url + "/v1/chat/completions", json=body, headers=headers
        ) as r:
            assert r.status == 200
            if stream:
                events = sse_events(await r.text())
                assert events[-1] == "[DONE]"
                reasons = [
                    c["finish_reason"] for e in events[:-1] for c in e["choices"]
                    if c["finish_reason"]
                ]  # fmt: skip
                return reasons[-1], events
            answer = await r.json()
            return answer["choices"][0]["finish_reason"], answer

    # Nothing stored yet: the decode declines, the prefill runs, the decode runs again.
    reason, _ = await ask()
    assert reason == "length"
    d_stats, p_stats = await d.stats(), await p.stats()
    assert d_stats["cache_threshold_rejections"] == 1
    # After the decline, the prefill and the decode carry an explicit 0 (not no field):
    # an engine-wide default threshold must not make them decline too.
    assert [r["body"].get("cache_hit_threshold") for r in d_stats["recorded"]] == [0.5, 0]
    assert p_stats["requests_total"] == 1
    assert p_stats["recorded"][0]["body"]["cache_hit_threshold"] == 0
    assert p_stats["recorded"][0]["body"]["max_tokens"] == 1

    # Stored now: the decode-first attempt is the answer, no prefill.
    reason, _ = await ask()
    assert reason == "length"
    d_stats, p_stats = await d.stats(), await p.stats()
    assert d_stats["cache_threshold_rejections"] == 1
    assert d_stats["requests_total"] == 3
    assert p_stats["requests_total"] == 1
    assert sidecar.sample("pd_sidecar_requests_total", path="/v1/chat/completions",
                          mode="pd", status="200") == 2  # fmt: skip


async def test_without_threshold_the_prefill_goes_first(
    start_sim: Any, start_sidecar: StartSidecar, client: aiohttp.ClientSession, tmp_path: Path
) -> None:
    p, d, sidecar = await storage_pd(start_sim, start_sidecar, tmp_path)
    body = {"model": "sim-model", "prompt": PROMPT, "max_tokens": 2}
    headers = {"x-prefiller-host-port": p.host_port}
    async with client.post(sidecar.url + "/v1/completions", json=body, headers=headers) as r:
        assert r.status == 200
    p_stats, d_stats = await p.stats(), await d.stats()
    assert p_stats["requests_total"] == 1
    assert d_stats["cache_threshold_rejections"] == 0
    assert p_stats["recorded"][0]["body"]["cache_hit_threshold"] == 0
    assert d_stats["recorded"][0]["body"]["cache_hit_threshold"] == 0


async def test_fallback_after_a_declined_decode_does_not_decline_again(
    start_sim: Any, start_sidecar: StartSidecar, client: aiohttp.ClientSession, tmp_path: Path
) -> None:
    p = await start_sim(zero_latency=True, shared_storage_path=str(tmp_path))
    d = await start_sim(zero_latency=True, shared_storage_path=str(tmp_path))
    sidecar = await start_sidecar(
        model_server_port=d.port, kv_connector="shared-storage", prefill_fallback="local",
        prefill_max_retries=0,
    )  # fmt: skip
    await p.add_fault(kind="status", status=503)
    body = {"model": "sim-model", "prompt": PROMPT, "max_tokens": 2, "cache_hit_threshold": 0.9}
    headers = {"x-prefiller-host-port": p.host_port}
    async with client.post(sidecar.url + "/v1/completions", json=body, headers=headers) as r:
        assert r.status == 200
        assert r.headers["x-pd-prefill-fallback"] == "status_503"
        answer = await r.json()
    assert answer["choices"][0]["finish_reason"] == "length"
    bodies = [rec["body"] for rec in (await d.stats())["recorded"]]
    assert [b.get("cache_hit_threshold") for b in bodies] == [0.9, 0]
