"""The datastore and the /metrics scraper."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from aiohttp import web

from epp.datastore import Datastore, Endpoint, format_host_port
from epp.scraper import MetricsScraper, parse_vllm_metrics

from .fixtures import wait_until

VLLM_PAGE = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="a"} 3.0
vllm:num_requests_running{engine="0",model_name="b"} 1.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="a"} 7.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="a"} 0.42
# TYPE vllm:cache_config_info gauge
vllm:cache_config_info{block_size="32",num_gpu_blocks="1024"} 1.0
# TYPE vllm:lora_requests_info gauge
vllm:lora_requests_info{max_lora="4",running_lora_adapters="x,y",waiting_lora_adapters=""} 1.7e9
vllm:lora_requests_info{max_lora="4",running_lora_adapters="old",waiting_lora_adapters="z"} 1.6e9
# TYPE vllm:prefix_cache_queries counter
vllm:prefix_cache_queries_total{model_name="a"} 100.0
"""


def test_parse_vllm_metrics() -> None:
    m = parse_vllm_metrics(VLLM_PAGE, 12.5)
    assert m.running == 4.0
    assert m.waiting == 7.0
    assert m.kv_usage == 0.42
    assert m.block_size == 32 and m.num_gpu_blocks == 1024
    assert m.running_loras == ("x", "y") and m.waiting_loras == () and m.max_lora == 4
    assert m.updated_at == 12.5


def test_parse_empty_page_is_all_zero() -> None:
    m = parse_vllm_metrics("", 1.0)
    assert (m.waiting, m.running, m.kv_usage, m.block_size) == (0.0, 0.0, 0.0, None)


def test_format_host_port_brackets_ipv6() -> None:
    assert format_host_port("10.0.0.1", 80) == "10.0.0.1:80"
    assert format_host_port("fd00::1", 80) == "[fd00::1]:80"
    assert format_host_port("pod.ns.svc", 80) == "pod.ns.svc:80"


def test_datastore_replace_source_keeps_metrics_and_notifies() -> None:
    ds = Datastore()
    events: list[tuple[list[str], list[str]]] = []
    ds.add_listener(lambda a, r: events.append(([e.key for e in a], [e.key for e in r])))
    a = Endpoint("a", "10.0.0.1", 8000)
    ds.replace_source("s", [a])
    a.metrics.waiting = 5
    relabelled = Endpoint("a", "10.0.0.1", 8000, labels={"llm-d.ai/role": "decode"})
    b = Endpoint("b", "10.0.0.2", 8000)
    ds.replace_source("s", [relabelled, b])
    current = ds.get("10.0.0.1:8000")
    assert current is a and current.metrics.waiting == 5 and current.role == "decode"
    ds.replace_source("other", [Endpoint("c", "10.0.0.3", 8000)])
    ds.replace_source("s", [b])
    assert sorted(e.key for e in ds.snapshot()) == ["10.0.0.2:8000", "10.0.0.3:8000"]
    assert events[0] == (["10.0.0.1:8000"], [])
    assert events[1] == (["10.0.0.2:8000"], [])
    assert events[3] == ([], ["10.0.0.1:8000"])


def test_endpoint_staleness() -> None:
    ep = Endpoint("a", "h", 1)
    now = time.monotonic()
    assert not ep.is_fresh(now, 2.0)  # never scraped
    assert ep.signals(now, 2.0).waiting > 1000
    ep.metrics.updated_at = now - 1.0
    assert ep.is_fresh(now, 2.0)
    ep.metrics.updated_at = now - 3.0
    assert not ep.is_fresh(now, 2.0)


async def _serve(handler: Any) -> tuple[web.AppRunner, int]:
    app = web.Application()
    app.router.add_get("/metrics", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    assert site._server is not None
    return runner, site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]


async def test_scrape_against_simulator(start_sim: Any) -> None:
    sim = await start_sim(zero_latency=True, block_size=16)
    ds = Datastore()
    ep = Endpoint("sim", "127.0.0.1", sim.port)
    ds.replace_source("t", [ep])
    scraper = MetricsScraper(ds, interval_s=0.02)
    await scraper.start()
    try:
        await wait_until(lambda: ep.metrics.updated_at > 0)
        assert ep.metrics.block_size == 16
        assert ep.metrics.waiting == 0
    finally:
        await scraper.stop()


async def test_scrape_is_bounded_and_failures_keep_old_values() -> None:
    release = asyncio.Event()

    async def hang(request: web.Request) -> web.Response:
        await release.wait()
        return web.Response(text="")

    runner, port = await _serve(hang)
    ds = Datastore()
    ep = Endpoint("slow", "127.0.0.1", port)
    ep.metrics.waiting = 3
    ds.replace_source("t", [ep])
    scraper = MetricsScraper(ds, interval_s=10, timeout_s=0.1)
    await scraper.start()
    try:
        t0 = time.monotonic()
        ok = await scraper.scrape_once(ep)
        assert not ok
        assert time.monotonic() - t0 < 2.0
        assert ep.metrics.waiting == 3 and ep.metrics.updated_at == 0.0
    finally:
        release.set()
        await scraper.stop()
        await runner.cleanup()


async def test_scraper_follows_membership(start_sim: Any) -> None:
    sim = await start_sim(zero_latency=True)
    ds = Datastore()
    scraper = MetricsScraper(ds, interval_s=0.02)
    await scraper.start()
    try:
        ep = Endpoint("sim", "127.0.0.1", sim.port)
        ds.replace_source("t", [ep])
        await wait_until(lambda: ep.metrics.updated_at > 0)
        ds.replace_source("t", [])
        assert len(scraper._loops) == 0
    finally:
        await scraper.stop()
    assert scraper.scrapes_ok >= 1


def test_parse_ignores_lookalike_names_and_histograms() -> None:
    lines = [
        "# HELP vllm:num_requests_waiting Waiting.",
        "# TYPE vllm:num_requests_waiting gauge",
        'vllm:num_requests_waiting{model_name="m"} 2.0',
        "# TYPE vllm:num_requests_waiting_by_reason gauge",
        'vllm:num_requests_waiting_by_reason{reason="preempted"} 99.0',
        "vllm:kv_cache_usage_perc 0.25",
    ]
    for i in range(50):
        lines.append(f"# TYPE vllm:latency_{i}_seconds histogram")
        lines += [f'vllm:latency_{i}_seconds_bucket{{le="{b}"}} {b}.0' for b in range(10)]
    m = parse_vllm_metrics("\n".join(lines), 1.0)  # no trailing newline either
    assert m.waiting == 2.0
    assert m.kv_usage == 0.25
