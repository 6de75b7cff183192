"""Fixtures for Director tests: pools of simulated engines behind file discovery."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web

from epp.datastore import ROLE_LABEL
from epp.director import Director, DirectorSettings, build_director
from epp.metrics import EppMetrics

PD_PLUGINS = """
- type: decode-filter
- type: prefill-filter
- type: encode-filter
- type: prefix-cache-scorer
  parameters: {hashBlockSize: 64}
- type: queue-scorer
- type: kv-cache-utilization-scorer
- type: active-request-scorer
- type: max-score-picker
- type: prefix-based-pd-decider
  parameters: {nonCachedTokens: 64}
- type: disagg-profile-handler
  parameters:
    deciders: {prefill: prefix-based-pd-decider}
"""

PD_PROFILES = """
- name: decode
  plugins:
  - pluginRef: decode-filter
  - pluginRef: prefix-cache-scorer
    weight: 3
  - pluginRef: queue-scorer
  - pluginRef: kv-cache-utilization-scorer
  - pluginRef: active-request-scorer
- name: prefill
  plugins:
  - pluginRef: prefill-filter
  - pluginRef: queue-scorer
- name: encode
  plugins:
  - pluginRef: encode-filter
  - pluginRef: queue-scorer
"""


def pd_config(
    endpoints_file: Path, plugins: str = PD_PLUGINS, profiles: str = PD_PROFILES, watch: bool = True
) -> str:
    disc = (
        "- type: file-discovery\n"
        f"  parameters: {{path: '{endpoints_file}', watchFile: {str(watch).lower()}, "
        "watchIntervalSeconds: 0.02}\n"
    )
    return (
        "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\n"
        f"plugins:\n{disc}{plugins.lstrip(chr(10))}schedulingProfiles:\n{profiles.lstrip(chr(10))}"
    )


def write_endpoints(
    path: Path,
    pods: list[tuple[str, str, int, str | None]],
    extra_labels: dict[str, dict[str, str]] | None = None,
) -> None:
    """pods: (name, address, port, role or None); ``extra_labels`` by pod name."""
    entries = []
    for name, address, port, role in pods:
        labels = {ROLE_LABEL: role} if role else {"app": "vllm"}
        labels.update((extra_labels or {}).get(name, {}))
        entries.append(
            {
                "name": name,
                "namespace": "default",
                "address": address,
                "port": str(port),
                "labels": labels,
            }
        )
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump({"endpoints": entries}))
    tmp.replace(path)


async def wait_until(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll a condition with a deadline (not a sleep used as synchronisation)."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met before the deadline")
        await asyncio.sleep(0.01)


def all_fresh(director: Director) -> bool:
    now = time.monotonic()
    eps = director.datastore.snapshot()
    threshold = director.settings.metrics_staleness_threshold_s
    return bool(eps) and all(ep.is_fresh(now, threshold) for ep in eps)


@dataclass
class FakeMetricsServer:
    """A controllable /metrics page in vLLM's format (for queue and staleness tests), or
    SGLang's with ``engine="sglang"``."""

    waiting: float = 0.0
    kv: float = 0.0
    broken: bool = False
    port: int = 0
    runner: web.AppRunner | None = None
    hits: int = 0
    engine: str = "vllm"

    def page(self) -> str:
        if self.engine == "sglang":
            labels = 'engine_type="unified",model_name="m",moe_ep_rank="0",pp_rank="0",tp_rank="0"'
            return (
                "# TYPE sglang:num_queue_reqs gauge\n"
                f"sglang:num_queue_reqs{{{labels}}} {self.waiting}\n"
                "# TYPE sglang:num_running_reqs gauge\n"
                f"sglang:num_running_reqs{{{labels}}} 1.0\n"
                "# TYPE sglang:token_usage gauge\n"
                f"sglang:token_usage{{{labels}}} {self.kv}\n"
            )
        return (
            "# TYPE vllm:num_requests_waiting gauge\n"
            f'vllm:num_requests_waiting{{model_name="m"}} {self.waiting}\n'
            "# TYPE vllm:num_requests_running gauge\n"
            'vllm:num_requests_running{model_name="m"} 1.0\n'
            "# TYPE vllm:kv_cache_usage_perc gauge\n"
            f'vllm:kv_cache_usage_perc{{model_name="m"}} {self.kv}\n'
        )

    async def handle(self, request: web.Request) -> web.Response:
        self.hits += 1
        if self.broken:
            return web.Response(status=500, text="broken")
        return web.Response(text=self.page(), content_type="text/plain")

    async def start(self) -> FakeMetricsServer:
        app = web.Application()
        app.router.add_get("/metrics", self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


@dataclass
class Pool:
    director: Director
    metrics: EppMetrics
    endpoints_file: Path
    keys: dict[str, str] = field(default_factory=dict)


MakePool = Callable[..., Awaitable[Pool]]


@pytest.fixture
async def make_pool(start_sim: Any, tmp_path: Path) -> AsyncIterator[MakePool]:
    """``pool = await make_pool({"d1": "decode", "p1": "prefill", "u": None})``."""
    directors: list[Director] = []
    fakes: list[FakeMetricsServer] = []

    async def make(
        roles: dict[str, str | None],
        *,
        config: str | None = None,
        fake: dict[str, FakeMetricsServer] | None = None,
        staleness_s: float = 2.0,
        interval_s: float = 0.02,
        hosts: dict[str, str] | None = None,
        labels: dict[str, dict[str, str]] | None = None,
    ) -> Pool:
        pods: list[tuple[str, str, int, str | None]] = []
        keys: dict[str, str] = {}
        for name, role in roles.items():
            # Loopback has a whole /8: pods that must differ by IP get their own address.
            host = (hosts or {}).get(name, "127.0.0.1")
            if fake is not None and name in fake:
                server = await fake[name].start()
                fakes.append(server)
                port = server.port
            else:
                sim = await start_sim(zero_latency=True, role=role or "both", host=host)
                port = sim.port
            pods.append((name, host, port, role))
            keys[name] = f"{host}:{port}"
        endpoints_file = tmp_path / "endpoints.yaml"
        write_endpoints(endpoints_file, pods, labels)
        metrics = EppMetrics()
        settings = DirectorSettings(
            config_text=config or pd_config(endpoints_file),
            refresh_metrics_interval_s=interval_s,
            metrics_staleness_threshold_s=staleness_s,
        )
        director = await build_director(settings, metrics)
        directors.append(director)
        await director.start()
        await wait_until(lambda: all_fresh(director) or not director.datastore.snapshot())
        return Pool(director, metrics, endpoints_file, keys)

    try:
        yield make
    finally:
        for director in directors:
            await director.stop()
        for server in fakes:
            await server.stop()
