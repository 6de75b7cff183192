"""The simulator in SGLang mode exports SGLang's metric names, as a real SGLang server does
(and none of vLLM's)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from epp.engine_metrics import BUILTIN_ENGINES
from epp.scraper import parse_metrics


async def _page(session: aiohttp.ClientSession, url: str) -> str:
    async with session.get(f"{url}/metrics") as resp:
        assert resp.status == 200
        return await resp.text()


def _samples(text: str) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append(sample)
    return out


async def test_sglang_mode_exports_sglang_names_while_busy(start_sim: Any) -> None:
    sim = await start_sim(
        engine_type="sglang",
        max_num_seqs=1,
        itl_ms=20.0,
        ttft_base_ms=0,
        block_size=32,
        num_blocks=100,
        served_model_name="m",
    )
    body = {"model": "m", "messages": [{"role": "user", "content": "queue me " * 10}]}
    body["max_tokens"] = 30
    async with aiohttp.ClientSession() as session:
        first = await session.post(f"{sim.url}/v1/chat/completions", json={**body, "stream": True})
        await first.content.readline()
        second = asyncio.create_task(session.post(f"{sim.url}/v1/chat/completions", json=body))
        deadline = time.monotonic() + 10
        while True:
            text = await _page(session, sim.url)
            busy = _samples(text)
            if busy["sglang:num_queue_reqs"][0].value == 1:
                break
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)  # polling the page with a deadline
        await first.read()
        first.release()
        (await second).release()
        after = _samples(await _page(session, sim.url))

    assert not any(name.startswith("vllm:") for name in busy)
    assert busy["sglang:num_running_reqs"][0].value == 1
    assert 0 < busy["sglang:token_usage"][0].value <= 1
    assert busy["sglang:max_total_num_tokens"][0].value == 3200
    labels = busy["sglang:num_running_reqs"][0].labels
    assert labels == {
        "model_name": "m",
        "engine_type": "unified",
        "tp_rank": "0",
        "pp_rank": "0",
        "moe_ep_rank": "0",
    }
    assert busy["sglang:cache_config_info"][0].labels == {"page_size": "32", "num_pages": "100"}
    assert after["sglang:num_queue_reqs"][0].value == 0
    assert after["sglang:num_running_reqs"][0].value == 0
    assert after["sglang:num_requests_total"][0].value == 2
    assert after["sglang:prompt_tokens_total"][0].value > 0
    assert after["sglang:generation_tokens_total"][0].value == 60

    # The EPP reads the busy page with its SGLang mapping: the pod does not look idle.
    parsed = parse_metrics(text, BUILTIN_ENGINES["sglang"], 1.0)
    assert parsed.missing == {}
    assert (parsed.metrics.waiting, parsed.metrics.running) == (1.0, 1.0)
    assert parsed.metrics.kv_usage > 0
    assert (parsed.metrics.block_size, parsed.metrics.num_gpu_blocks) == (32, 100)
    # ... while vLLM's names find nothing on it.
    assert parse_metrics(text, BUILTIN_ENGINES["vllm"], 1.0).no_load_signal


async def test_sglang_disaggregation_implies_sglang_names(start_sim: Any) -> None:
    prefill = await start_sim(zero_latency=True, disaggregation_mode="prefill", bootstrap_port=0)
    decode = await start_sim(zero_latency=True, disaggregation_mode="decode")
    plain = await start_sim(zero_latency=True)
    forced = await start_sim(zero_latency=True, disaggregation_mode="decode", engine_type="vllm")
    async with aiohttp.ClientSession() as session:
        pages = {
            name: _samples(await _page(session, sim.url))
            for name, sim in (
                ("prefill", prefill),
                ("decode", decode),
                ("plain", plain),
                ("forced", forced),
            )
        }
    for role in ("prefill", "decode"):
        [sample] = pages[role]["sglang:num_queue_reqs"]
        assert sample.labels["engine_type"] == role
        assert not any(name.startswith("vllm:") for name in pages[role])
    for name in ("plain", "forced"):
        assert "vllm:num_requests_waiting" in pages[name]
        assert not any(n.startswith("sglang:") for n in pages[name])
