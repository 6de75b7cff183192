"""Prefix cache, latency model, batch bound, metrics, health and models."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from vllm_sim import SimConfig
from vllm_sim.engine import GenerationParams, SimEngine
from vllm_sim.nixl import LeaseTable, PullRejected, PullRequest
from vllm_sim.prefix_cache import PrefixCache, block_hashes


def test_block_hashes_are_chained() -> None:
    a = block_hashes([1, 2, 3, 4, 5, 6, 7, 8, 9], 4)
    b = block_hashes([0, 2, 3, 4, 5, 6, 7, 8], 4)
    assert len(a) == 2  # the partial third block is not hashed
    assert a[1] != b[1]  # same second chunk, different history


def test_prefix_cache_hits_and_lru_eviction() -> None:
    cache = PrefixCache(num_blocks=4, block_size=2)
    first = cache.allocate([1, 2, 3, 4])
    cache.release(first.block_ids)
    second = cache.allocate([1, 2, 3, 4, 9])
    assert second.hit_blocks == 2
    assert len(second.block_ids) == 3  # two shared full blocks and a private partial one
    cache.release(second.block_ids)
    cache.reset()
    assert cache.cached_prefix_blocks(block_hashes([1, 2, 3, 4], 2)) == 0
    # Fill: A (2 blocks) then B (2 blocks), both released; A is least recently used.
    for prompt in ([1, 1, 2, 2], [3, 3, 4, 4]):
        cache.release(cache.allocate(prompt).block_ids)
    cache.release(cache.allocate([5, 5]).block_ids)  # evicts A's first block
    assert cache.cached_prefix_blocks(block_hashes([1, 1, 2, 2], 2)) == 0
    assert cache.cached_prefix_blocks(block_hashes([3, 3, 4, 4], 2)) == 2


def test_referenced_blocks_are_never_evicted() -> None:
    cache = PrefixCache(num_blocks=2, block_size=2)
    held = cache.allocate([1, 1, 2, 2])
    assert cache.usage == 1.0
    other = cache.allocate([7, 7])
    assert other.block_ids == []  # no room: nothing evicted from a running request
    cache.release(held.block_ids)
    assert cache.usage == 0.0
    assert cache.cached_prefix_blocks(block_hashes([1, 1, 2, 2], 2)) == 2


def test_lease_table_checks_and_frees() -> None:
    now = [0.0]
    cache = PrefixCache(num_blocks=8, block_size=2)
    leases = LeaseTable(cache, lease_seconds=5, clock=lambda: now[0])
    alloc = cache.allocate([1, 2, 3, 4])
    leases.grant("r1", alloc.block_ids, [1, 2, 3, 4])
    pull = PullRequest(
        remote_engine_id="e", remote_block_ids=alloc.block_ids, remote_request_id="r1"
    )
    for bad, reason in (
        (pull.model_copy(update={"remote_engine_id": "x"}), "engine"),
        (pull.model_copy(update={"remote_block_ids": [7]}), "block_ids"),
    ):
        try:
            leases.claim("e", bad)
        except PullRejected as exc:
            assert reason in exc.reason
        else:
            raise AssertionError("bad pull accepted")
    # Newer vLLM nests block ids per KV-cache group.
    nested = pull.model_copy(update={"remote_block_ids": [alloc.block_ids]})
    assert leases.claim("e", nested).token_ids == [1, 2, 3, 4]
    assert cache.usage == 0.0
    leases.grant("r2", cache.allocate([5, 6]).block_ids, [5, 6])
    now[0] = 6.0
    assert leases.expire() == 1
    assert len(leases) == 0


async def test_latency_model_charges_only_uncached_tokens() -> None:
    config = SimConfig(ttft_base_ms=0, prefill_ms_per_token=2.0, itl_ms=0, block_size=4)
    engine = SimEngine(config)
    await engine.start()
    try:
        prompt = list(range(300, 300 + 200))
        timings = []
        for _ in range(2):
            run = engine.admit(GenerationParams(prompt_ids=prompt, max_tokens=1), "r")
            start = time.monotonic()
            async with engine.running_slot(run):
                async for _ in run.tokens():
                    pass
            timings.append(time.monotonic() - start)
    finally:
        await engine.close()
    # 200 uncached tokens at 2 ms each, then a fully cached prompt.
    assert timings[0] >= 0.4
    assert timings[1] < timings[0] / 2


async def test_batch_bound_queues_requests_and_metrics_show_it(start_sim: Any) -> None:
    sim = await start_sim(max_num_seqs=1, itl_ms=20.0, ttft_base_ms=0)
    body = {"messages": [{"role": "user", "content": "queue me " * 10}], "max_tokens": 30}
    async with aiohttp.ClientSession() as session:
        first = await session.post(f"{sim.url}/v1/chat/completions", json={**body, "stream": True})
        await first.content.readline()
        second = asyncio.create_task(session.post(f"{sim.url}/v1/chat/completions", json=body))
        deadline = time.monotonic() + 10
        while True:
            metrics = await _metrics(session, sim.url)
            if metrics["vllm:num_requests_waiting"] == 1:
                break
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        assert metrics["vllm:num_requests_running"] == 1
        assert metrics["vllm:kv_cache_usage_perc"] > 0
        await first.read()
        first.release()
        resp = await second
        assert resp.status == 200
        resp.release()
        after = await _metrics(session, sim.url)
    assert after["vllm:num_requests_waiting"] == 0
    assert after["vllm:num_requests_running"] == 0


async def test_metrics_health_models(start_sim: Any) -> None:
    sim = await start_sim(zero_latency=True, block_size=32, num_blocks=100, served_model_name="m")
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{sim.url}/health") as resp:
            assert resp.status == 200
        async with session.get(f"{sim.url}/v1/models") as resp:
            models = await resp.json()
        body = {"model": "m", "prompt": "tok " * 64, "max_tokens": 2}
        for _ in range(2):
            async with session.post(f"{sim.url}/v1/completions", json=body) as resp:
                assert resp.status == 200
        async with session.get(f"{sim.url}/metrics") as resp:
            text = await resp.text()
    assert models["data"][0]["id"] == "m"
    families = {f.name: f for f in text_string_to_metric_families(text)}
    info = families["vllm:cache_config_info"].samples[0].labels
    assert info["block_size"] == "32" and info["num_gpu_blocks"] == "100"
    queries = families["vllm:prefix_cache_queries"].samples[0].value
    hits = families["vllm:prefix_cache_hits"].samples[0].value
    assert queries == 128 and hits == 64
    assert families["vllm:num_requests_running"].samples[0].labels["model_name"] == "m"


async def _metrics(session: aiohttp.ClientSession, url: str) -> dict[str, float]:
    async with session.get(f"{url}/metrics") as resp:
        text = await resp.text()
    return {
        s.name: s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name.startswith("vllm:num_requests") or s.name == "vllm:kv_cache_usage_perc"
    }
