"""Fixtures: simulated engines as pool pods, conformance EPPs and gateways, all stopped at
teardown."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from epp.app import EppApp
from tests.conftest import RunningSim, StartSim
from tests.epp_conformance.harness import Pod, start_epp
from tests.epp_gateway.envoy_gateway import EnvoyGateway

StartPods = Callable[[Sequence[str], int], Awaitable[list[tuple[Pod, RunningSim]]]]
StartEpp = Callable[..., Awaitable[EppApp]]
StartEnvoy = Callable[[dict[str, Any]], Awaitable[EnvoyGateway]]


@pytest.fixture
async def start_pods(start_sim: StartSim) -> StartPods:
    """``await start_pods(hosts, ranks)``: one simulated engine per host and rank, as a pod
    per host whose data-parallel ranks listen on their own ports (the same ports on every
    host, as a deployment's pods have)."""

    async def start(hosts: Sequence[str], ranks: int = 1) -> list[tuple[Pod, RunningSim]]:
        ports: list[int] = []
        out: list[tuple[Pod, RunningSim]] = []
        for h, host in enumerate(hosts):
            for rank in range(ranks):
                port = ports[rank] if h else 0
                sim = await start_sim(host=host, port=port, zero_latency=True)
                if not h:
                    ports.append(sim.port)
                out.append((Pod(f"pod{h}-rank{rank}", host, sim.port), sim))
        return out

    return start


@pytest.fixture
async def start_conformance_epp(tmp_path: Path) -> AsyncIterator[StartEpp]:
    """``await start_conformance_epp(pods, tls=False)``; ``app.stop()`` may be called
    early (an EPP going away)."""
    apps: list[EppApp] = []

    async def start(pods: Sequence[Pod], **kwargs: Any) -> EppApp:
        app = await start_epp(tmp_path / f"epp-{len(apps)}", pods, **kwargs)
        apps.append(app)
        return app

    yield start
    for app in apps:
        await app.stop()


@pytest.fixture
async def start_envoy(tmp_path: Path) -> AsyncIterator[StartEnvoy]:
    envoys: list[EnvoyGateway] = []

    async def start(config: dict[str, Any]) -> EnvoyGateway:
        envoy = EnvoyGateway(config, tmp_path / f"envoy-{len(envoys)}")
        envoys.append(envoy)
        await envoy.start()
        return envoy

    yield start
    for envoy in envoys:
        await envoy.stop()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s
