"""Prometheus series on the metrics port, and every module's public surface."""

from __future__ import annotations

import importlib
import pkgutil

import aiohttp

import sidecar
from tests.sidecar.conftest import PD


async def test_metrics_port_series(pd: PD, client: aiohttp.ClientSession) -> None:
    body = {"model": "sim-model", "prompt": "hello " * 30, "max_tokens": 4}
    async with client.post(pd.url + "/v1/completions", json=body, headers=pd.headers) as resp:
        assert resp.status == 200
    async with client.get(pd.url + "/v1/models") as resp:
        assert resp.status == 200
    async with client.get(pd.sidecar.metrics_url) as resp:
        assert resp.status == 200
        text = await resp.text()
    lines = set(text.splitlines())
    assert 'pd_sidecar_requests_total{mode="pd",path="/v1/completions",status="200"} 1.0' in lines
    assert 'pd_sidecar_requests_total{mode="passthrough",path="other",status="200"} 1.0' in lines
    for histogram in (
        "pd_sidecar_prefill_seconds",
        "pd_sidecar_decode_ttft_seconds",
        "pd_sidecar_overhead_seconds",
    ):
        assert f"{histogram}_count 1.0" in lines
    assert "pd_sidecar_ttft_seconds_count 2.0" in lines
    assert "pd_sidecar_request_seconds_count 2.0" in lines
    assert "pd_sidecar_in_flight_requests 0.0" in lines
    [tasks] = [line for line in lines if line.startswith("python_asyncio_tasks ")]
    assert float(tasks.split()[1]) >= 1  # counted in the serving loop, not outside it
    assert "vllm:" not in text  # the engine's metrics stay on the main port


def test_every_module_declares_what_it_exports() -> None:
    for info in pkgutil.walk_packages(sidecar.__path__, "sidecar."):
        module = importlib.import_module(info.name)
        if info.name == "sidecar.__main__":
            continue
        exported = getattr(module, "__all__", None)
        assert exported is not None, f"{info.name} has no __all__"
        for name in exported:
            assert hasattr(module, name), f"{info.name}.__all__ names missing {name}"
