"""Fixtures: the ext_proc server on loopback in front of a fake DecisionMaker."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import grpc
import pytest

from epp.extproc import ExtProcConfig, ExtProcService
from epp.metrics import EppMetrics, error_code
from tests.conftest import sample_sum
from tests.epp_gateway.fakes import ExtProcClient, FakeDecisionMaker


@dataclass
class ExtProcHarness:
    port: int
    fake: FakeDecisionMaker
    metrics: EppMetrics
    channel: grpc.aio.Channel
    server: grpc.aio.Server

    def client(self) -> ExtProcClient:
        return ExtProcClient(self.channel)

    def errors(self, status: int) -> float:
        """Requests counted as errors with the error_code llm-d gives ``status``."""
        return sample_sum(
            self.metrics.registry, "llm_d_epp_request_error_total", error_code=error_code(status)
        )


StartExtProc = Callable[..., Awaitable[ExtProcHarness]]


@pytest.fixture
def fake() -> FakeDecisionMaker:
    return FakeDecisionMaker()


@pytest.fixture
async def start_extproc(fake: FakeDecisionMaker) -> AsyncIterator[StartExtProc]:
    servers: list[grpc.aio.Server] = []
    channels: list[grpc.aio.Channel] = []

    async def start(config: ExtProcConfig | None = None) -> ExtProcHarness:
        metrics = EppMetrics(stream_metrics=True)
        server = grpc.aio.server()
        ExtProcService(fake, metrics, config or ExtProcConfig()).register(server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        servers.append(server)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        channels.append(channel)
        return ExtProcHarness(port=port, fake=fake, metrics=metrics, channel=channel, server=server)

    yield start
    for channel in channels:
        await channel.close()
    for server in servers:
        await server.stop(grace=None)


@pytest.fixture
async def extproc(start_extproc: StartExtProc) -> ExtProcHarness:
    return await start_extproc()
