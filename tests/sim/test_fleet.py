"""The fleet mode and the latency model it relies on: batch-dependent inter-token latency,
serial prefill, the time scale, per-engine state and the oracle prefix-hit figures."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import eventually
from vllm_sim import SimConfig
from vllm_sim.__main__ import parse_command
from vllm_sim.engine import GenerationParams, SimEngine
from vllm_sim.fleet import Fleet, FleetOptions

WORDS = " ".join(f"w{i}" for i in range(400))  # 400 tokens: 25 full blocks of 16


def _metric(text: str, name: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                return float(sample.value)
    raise AssertionError(f"{name} not exported")


def test_itl_grows_with_the_running_batch() -> None:
    engine = SimEngine(SimConfig(itl_ms=10, itl_ms_per_running=2))
    alone = engine.itl_s()
    engine.running = 50
    assert alone == pytest.approx(0.010)
    assert engine.itl_s() == pytest.approx(0.010 + 50 * 0.002)


def test_a_step_budget_slows_decode_steps_while_a_prompt_is_computed() -> None:
    cfg = SimConfig(itl_ms=10, itl_ms_per_running=1, prefill_ms_per_token=0.5)
    engine = SimEngine(cfg.model_copy(update={"max_num_batched_tokens": 256}))
    engine.running = 6
    assert engine.itl_s() == pytest.approx(0.016)  # no prompt in the engine
    engine.prefilling_tokens = 1000  # a step computes 256 - 6 of them with its decodes
    assert engine.itl_s() == pytest.approx(0.016 + 250 * 0.0005)
    engine.prefilling_tokens = 100
    assert engine.itl_s() == pytest.approx(0.016 + 100 * 0.0005)
    unbudgeted = SimEngine(cfg)  # the default: decode steps do not see prompts
    unbudgeted.running, unbudgeted.prefilling_tokens = 6, 1000
    assert unbudgeted.itl_s() == pytest.approx(0.016)


async def test_decodes_slow_down_while_another_prompt_is_computed() -> None:
    # 5 s of compute, cancelled once measured: it outlasts the other request's 0.5 s of
    # decode steps even on a machine that stalls for seconds.
    long_prompt = [5000 + i for i in range(5000)]
    decode_s = {}
    for budget in (0, 101):
        engine = SimEngine(
            SimConfig(
                ttft_base_ms=0, prefill_ms_per_token=1.0, itl_ms=1, max_num_batched_tokens=budget
            )
        )
        computing = asyncio.ensure_future(_run_one(engine, long_prompt, 1))

        async def computed(engine: SimEngine = engine) -> bool:
            return engine.prefilling_tokens == len(long_prompt)

        await eventually(computed, "the long prompt's computation")
        first, end = await _run_one(engine, list(range(16)), 6)
        decode_s[budget] = end - first
        assert engine.prefilling_tokens == len(long_prompt)  # computed all along
        computing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await computing
        assert engine.prefilling_tokens == 0
    # Five steps of 1 ms alone; of 1 + 99 ms (a 99-token chunk of the long prompt each)
    # with a budget of 101 tokens and two requests running.
    assert decode_s[0] < 0.25 < decode_s[101], decode_s


def test_time_scale_divides_every_delay() -> None:
    cfg = SimConfig(itl_ms=10, time_scale=4)
    assert cfg.delay_s(100) == pytest.approx(0.025)
    assert SimEngine(cfg).itl_s() == pytest.approx(0.0025)
    with pytest.raises(ValueError, match="time_scale"):
        SimConfig(time_scale=0)


async def _run_one(engine: SimEngine, prompt: list[int], max_tokens: int) -> tuple[float, float]:
    """(time to first token, end) of one request, measured from the call."""
    t0 = time.monotonic()
    run = engine.admit(GenerationParams(prompt_ids=prompt, max_tokens=max_tokens), "r")
    first = end = 0.0
    async with engine.running_slot(run):
        async for _ in run.tokens():
            if not first:
                first = time.monotonic() - t0
        end = time.monotonic() - t0
    return first, end


async def test_serial_prefill_queues_prompts_and_parallel_does_not() -> None:
    prompts = [[1000 * k + i for i in range(400)] for k in range(2)]  # no shared prefix
    for serial in (True, False):
        engine = SimEngine(
            SimConfig(serial_prefill=serial, ttft_base_ms=0, prefill_ms_per_token=1.0, itl_ms=0)
        )
        runs = asyncio.gather(*(_run_one(engine, p, 1) for p in prompts))
        await asyncio.sleep(0.1)
        # While the first prompt computes, a serial engine reports the second as waiting.
        assert (engine.running, engine.waiting) == ((1, 1) if serial else (2, 0))
        firsts = sorted(f for f, _ in await runs)
        # Each prompt costs 400 ms; serial: the second one waits for the first.
        if serial:
            assert firsts[1] > 0.75, firsts
        else:
            assert firsts[1] < 0.75, firsts


async def test_stream_interval_keeps_the_timing() -> None:
    prompt = list(range(16))
    timings = []
    for every in (1, 8):
        engine = SimEngine(
            SimConfig(
                ttft_base_ms=0, prefill_ms_per_token=0, itl_ms=10, stream_interval_tokens=every
            )
        )
        first, end = await _run_one(engine, prompt, 33)
        timings.append(end - first)
    # 32 steps of 10 ms either way (wide margins for a busy machine).
    for decode in timings:
        assert 0.30 < decode < 1.0, timings


def test_fleet_flags_parse_and_check() -> None:
    config, fleet = parse_command(["--fleet", "8", "--port", "0", "--time-scale", "2"])
    assert fleet is not None
    assert fleet.size == 8
    assert config.time_scale == 2
    assert parse_command(["--port", "0"])[1] is None
    with pytest.raises(SystemExit):
        parse_command(["--fleet", "0"])


async def test_fleet_engines_answer_and_keep_their_own_state() -> None:
    base = SimConfig(port=0, zero_latency=True, enable_prompt_tokens_details=True)
    async with (
        Fleet(base, FleetOptions(size=4, control_port=0)) as fleet,
        aiohttp.ClientSession() as s,
    ):
        urls = [server.url for server in fleet.servers]
        assert len(set(urls)) == 4
        for url in urls:
            async with s.get(f"{url}/health") as resp:
                assert resp.status == 200
        body: dict[str, Any] = {"model": "sim-model", "prompt": WORDS, "max_tokens": 2}
        for _ in range(2):
            async with s.post(f"{urls[0]}/v1/completions", json=body) as resp:
                answer = await resp.json()
        assert answer["usage"]["prompt_tokens_details"]["cached_tokens"] == 400
        # Engine 1 never saw the prompt: its cache, counters and metrics are its own.
        async with s.post(f"{urls[1]}/v1/completions", json=body) as resp:
            other = await resp.json()
        assert other["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        async with s.get(f"{urls[2]}/metrics") as resp:
            assert _metric(await resp.text(), "vllm:prefix_cache_queries_total") == 0
        async with s.get(f"{urls[0]}/metrics") as resp:
            assert _metric(await resp.text(), "vllm:prefix_cache_queries_total") == 800
        # The oracle knew engine 0 held the prompt when engine 1 computed it.
        async with s.get(f"http://127.0.0.1:{fleet.control_port}/fleet/stats") as resp:
            stats = await resp.json()
        totals = stats["totals"]
        assert totals["requests"] == 3
        assert totals["hit_tokens"] == 400
        assert totals["oracle_hit_tokens"] == 800
        # Model time computing prompts: three fixed costs and the 800 tokens computed
        # (engine 0's second request found its whole prompt cached).
        cfg = fleet.servers[0].config
        busy = 3 * cfg.ttft_base_ms + 800 * cfg.prefill_ms_per_token
        assert totals["prompt_compute_ms"] == pytest.approx(busy)
        assert [row["requests"] for row in stats["engines"]] == [2, 1, 0, 0]
        async with s.post(f"http://127.0.0.1:{fleet.control_port}/fleet/reset") as resp:
            assert resp.status == 200
        # Every counter the fleet reports starts again from zero (one run per configuration).
        assert set(fleet.stats()["totals"].values()) == {0}
        assert fleet.best_prefix_blocks([b"x" * 32]) == 0


async def test_fleet_on_distinct_hosts_shares_ports(tmp_path: Any) -> None:
    manifest = tmp_path / "fleet.json"
    base = SimConfig(port=0, zero_latency=True, kv_events_port=0)
    options = FleetOptions(size=3, distinct_hosts=True, manifest=str(manifest))
    async with Fleet(base, options) as fleet, aiohttp.ClientSession() as s:
        hosts = [server.config.host for server in fleet.servers]
        assert hosts == ["127.0.1.1", "127.0.1.2", "127.0.1.3"]
        for server in fleet.servers:
            async with s.get(f"{server.url}/health") as resp:
                assert resp.status == 200
        import json

        listed = json.loads(manifest.read_text())["engines"]
        assert [e["host"] for e in listed] == hosts
        assert all(e["kv_events_port"] for e in listed)
