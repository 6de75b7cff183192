"""Fixtures shared by every test package: simulated engines on loopback."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest

from vllm_sim import SimConfig, SimServer


async def eventually(
    check: Callable[[], Awaitable[bool]], what: str = "a condition", *, timeout: float = 10.0
) -> float:
    """Poll ``check`` until it holds (readiness, not a fixed sleep); the seconds it took.
    Fails the test after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    while not await check():
        if loop.time() - started > timeout:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        await asyncio.sleep(0.01)
    return loop.time() - started


def sample_sum(registry: Any, name: str, **labels: str) -> float:
    """The sum of the samples ``name`` whose labels include ``labels`` (0 when none)."""
    total = 0.0
    for family in registry.collect():
        for sample in family.samples:
            if sample.name == name and labels.items() <= sample.labels.items():
                total += sample.value
    return total


@dataclass
class RunningSim:
    """A simulated engine started by ``start_sim``; stopped at teardown."""

    server: SimServer
    session: aiohttp.ClientSession

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def host_port(self) -> str:
        return self.server.host_port

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def bootstrap_port(self) -> int | None:
        return self.server.bootstrap_port

    @property
    def engine(self) -> Any:
        return self.server.engine

    async def stats(self) -> dict[str, Any]:
        async with self.session.get(f"{self.url}/sim/stats") as resp:
            resp.raise_for_status()
            result: dict[str, Any] = await resp.json()
            return result

    async def add_fault(self, **fault: Any) -> None:
        async with self.session.post(f"{self.url}/sim/faults", json=fault) as resp:
            resp.raise_for_status()

    async def clear_faults(self) -> None:
        async with self.session.delete(f"{self.url}/sim/faults") as resp:
            resp.raise_for_status()

    async def reset(self, *, cache: bool = False) -> None:
        query = "?cache=1" if cache else ""
        async with self.session.post(f"{self.url}/sim/reset{query}") as resp:
            resp.raise_for_status()


StartSim = Callable[..., Awaitable[RunningSim]]


@pytest.fixture(autouse=True)
def _collect_garbage_after_each_test() -> Iterator[None]:
    """Unclosed sessions, sockets and tasks are reported by the test that leaked them,
    not by whichever later test the garbage collector happens to run in."""
    yield
    gc.collect()


@pytest.fixture
async def start_sim() -> AsyncIterator[StartSim]:
    """``sim = await start_sim(role="prefill", zero_latency=True, ...)`` (SimConfig fields)."""
    started: list[SimServer] = []
    session = aiohttp.ClientSession()

    async def start(**overrides: Any) -> RunningSim:
        overrides.setdefault("port", 0)
        # Engines as deployments run them (vLLM's default is off: tests of that say so).
        overrides.setdefault("enable_prompt_tokens_details", True)
        server = await SimServer(SimConfig(**overrides)).start()
        started.append(server)
        return RunningSim(server, session)

    try:
        yield start
    finally:
        for server in reversed(started):
            await server.stop()
        await session.close()
