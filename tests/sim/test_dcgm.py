"""The simulator's DCGM exporter page: valid Prometheus text, utilization from load."""

from __future__ import annotations

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import StartSim


async def _page(url: str) -> dict[str, float]:
    async with aiohttp.ClientSession() as session, session.get(f"{url}/dcgm/metrics") as r:
        assert r.status == 200
        text = await r.text()
    values = {}
    for family in text_string_to_metric_families(text):
        assert family.type == "gauge"
        [sample] = family.samples
        assert sample.labels["gpu"] == "0"
        assert sample.labels["UUID"].startswith("GPU-")
        assert "pod" not in sample.labels  # a sidecar exporter, not Kubernetes mode
        values[sample.name] = sample.value
    return values


async def test_dcgm_page_reports_batch_slots_in_use(start_sim: StartSim) -> None:
    sim = await start_sim(max_num_seqs=4, itl_ms=20.0)
    idle = await _page(sim.url)
    assert idle["DCGM_FI_DEV_GPU_UTIL"] == 0
    assert idle["DCGM_FI_DEV_FB_USED"] + idle["DCGM_FI_DEV_FB_FREE"] == 80 * 1024
    body = {
        "model": "sim-model",
        "messages": [{"role": "user", "content": "x"}],
        "max_tokens": 2000,
        "stream": True,
    }
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{sim.url}/v1/chat/completions", json=body) as resp:
            await resp.content.readline()
            busy = await _page(sim.url)
    assert busy["DCGM_FI_DEV_GPU_UTIL"] == 25  # one of four slots
