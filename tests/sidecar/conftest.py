"""Sidecar fixtures: an in-process sidecar in front of simulated P and D engines."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest

from sidecar.app import Servers, start
from sidecar.settings import Settings


@dataclass
class RunningSidecar:
    servers: Servers
    settings: Settings

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.servers.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.servers.metrics_port}/metrics"

    def sample(self, name: str, **labels: str) -> float:
        """Current value of one metric sample (0.0 when absent)."""
        value = self.servers.metrics.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value


StartSidecar = Callable[..., Awaitable[RunningSidecar]]


@pytest.fixture
async def start_sidecar() -> AsyncIterator[StartSidecar]:
    """``sc = await start_sidecar(model_server_port=d.port, ...)`` (Settings fields)."""
    started: list[Servers] = []

    async def run(**overrides: Any) -> RunningSidecar:
        overrides.setdefault("port", 0)
        overrides.setdefault("metrics_port", 0)
        overrides.setdefault("listen_host", "127.0.0.1")
        overrides.setdefault("prefill_max_retries", 3)
        overrides.setdefault("prefill_retry_backoff", 0.001)
        overrides.setdefault("drain_timeout", 5.0)
        overrides.setdefault("secure_proxy", False)  # llm-d's default is HTTPS
        settings = Settings(**overrides)
        servers = await start(settings)
        started.append(servers)
        return RunningSidecar(servers, settings)

    try:
        yield run
    finally:
        for servers in reversed(started):
            await servers.drain_and_stop()


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@dataclass
class PD:
    """A prefill sim, a decode sim and a sidecar in front of the decode sim."""

    prefill: Any
    decode: Any
    sidecar: RunningSidecar

    @property
    def url(self) -> str:
        return self.sidecar.url

    @property
    def headers(self) -> dict[str, str]:
        return {"x-prefiller-host-port": self.prefill.host_port}


@pytest.fixture
async def pd(start_sim: Any, start_sidecar: StartSidecar) -> PD:
    prefill = await start_sim(role="prefill", zero_latency=True)
    decode = await start_sim(role="decode", zero_latency=True)
    sidecar = await start_sidecar(model_server_port=decode.port)
    return PD(prefill, decode, sidecar)


def roles(stats: dict[str, Any]) -> dict[str, int]:
    """The simulator's request counts for the roles a P/D flow involves."""
    by_role: dict[str, int] = stats["requests_by_role"]
    return {name: by_role.get(name, 0) for name in ("prefill", "decode", "aggregated")}
