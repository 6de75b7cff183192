"""Fault scenarios over the local stack: real Envoy + EPP + sidecar + simulated engines.

One stack per test module (``fault_stack``), configured by the module's ``STACK`` dict
(``StackOptions`` fields), or several in turn when a module parametrizes ``fault_stack``
with names from its ``STACKS`` (see test_client_faults.py). Before each test, ``faults`` clears every engine's faults,
counters and prefix cache and marks where the process logs stand; each test then ends
with ``await faults.assert_healthy()``: a normal request through the gateway succeeds,
the health endpoints answer, every process is alive, and the sidecar and EPP logged no
traceback since the mark.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from examples.local_stack import LocalStack, StackOptions
from examples.local_stack.processes import ManagedProcess, wait_until
from examples.local_stack.stack import SAMPLE_PROMPT
from tests.conftest import eventually

__all__ = [
    "FaultStack",
    "SseReply",
    "open_fault_stack",
    "read_sse",
]

MODEL = "sim-model"


@dataclass
class SseReply:
    """A streamed answer as the client saw it: data payloads, error events, the end."""

    status: int
    data: list[str] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    done: bool = False  # saw ``data: [DONE]``

    @property
    def text(self) -> str:
        pieces = []
        for item in self.data:
            chunk = json.loads(item)
            for choice in chunk.get("choices") or []:
                pieces.append(
                    choice.get("text") or (choice.get("delta") or {}).get("content") or ""
                )
        return "".join(pieces)


async def read_sse(resp: aiohttp.ClientResponse) -> SseReply:
    """Read a whole SSE body; a connection cut short ends the read, it does not raise."""
    reply = SseReply(resp.status)
    raw = b""
    try:
        async for chunk in resp.content.iter_any():
            raw += chunk
    except aiohttp.ClientPayloadError:
        pass  # a truncated stream: what arrived is what the client has
    for block in raw.decode().split("\n\n"):
        event = "message"
        data: list[str] = []
        for line in block.splitlines():
            if line.startswith("event:"):
                event = line[len("event:") :].strip()
            elif line.startswith("data:"):
                data.append(line[len("data:") :].strip())
        if not data:
            continue
        payload = "\n".join(data)
        if event == "error":
            reply.errors.append(json.loads(payload))
        elif payload == "[DONE]":
            reply.done = True
        else:
            reply.data.append(payload)
    return reply


class FaultStack:
    """The running stack plus what fault tests need to drive and inspect it."""

    def __init__(self, stack: LocalStack, session: aiohttp.ClientSession) -> None:
        self.stack = stack
        self.session = session

    # -- processes ---------------------------------------------------------------------
    def process(self, name: str) -> ManagedProcess:
        [proc] = [p for p in self.stack.processes if p.name == name]
        return proc

    @property
    def prefill_url(self) -> str:
        return self.stack.prefill_engine_urls[0]

    @property
    def decode_url(self) -> str:
        return self.stack.decode_engine_urls[0]

    @property
    def sidecar_url(self) -> str:
        return f"http://127.0.0.1:{self.process('sidecar-0').flag('port')}"

    @property
    def sidecar_metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.process('sidecar-0').flag('metrics-port')}/metrics"

    @property
    def gateway(self) -> str:
        return self.stack.gateway_url

    async def restart(self, name: str, *, add: list[str] | None = None,
                      remove: list[str] | None = None) -> None:  # fmt: skip
        """Stop a process, adjust its arguments, start it again on the same port."""
        proc = self.process(name)
        await proc.stop()
        proc.argv = [a for a in proc.argv if a not in (remove or [])] + (add or [])
        await proc.start()
        path = "/ready" if name.startswith("sidecar") else "/health"
        url = self.sidecar_url if name.startswith("sidecar") else self._engine_url(name)

        async def up() -> bool:
            async with self.session.get(url + path) as resp:
                return resp.status == 200

        await wait_until(up, name, 30.0, proc.check_alive)

    def _engine_url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.process(name).flag('port')}"

    # -- engines -----------------------------------------------------------------------
    async def stats(self, url: str) -> dict[str, Any]:
        async with self.session.get(f"{url}/sim/stats") as resp:
            assert resp.status == 200
            result: dict[str, Any] = await resp.json()
            return result

    async def arm(self, url: str, **fault: Any) -> None:
        async with self.session.post(f"{url}/sim/faults", json=fault) as resp:
            assert resp.status == 200, await resp.text()

    async def clear_faults(self) -> None:
        for url in (*self.stack.prefill_engine_urls, *self.stack.decode_engine_urls):
            async with self.session.delete(f"{url}/sim/faults") as resp:
                assert resp.status == 200

    async def reset(self) -> None:
        """No faults, zero counters, empty caches; later log lines are this test's."""
        await self.clear_faults()
        for url in (*self.stack.prefill_engine_urls, *self.stack.decode_engine_urls):
            async with self.session.post(f"{url}/sim/reset?cache=1") as resp:
                assert resp.status == 200
        for proc in self.stack.processes:
            proc.mark_log()

    async def wait_stats(
        self, url: str, what: str, check: Callable[[dict[str, Any]], bool], timeout: float = 10.0
    ) -> dict[str, Any]:
        """Poll an engine's counters until ``check`` holds; return them."""
        seen: dict[str, Any] = {}

        async def holds() -> bool:
            nonlocal seen
            seen = await self.stats(url)
            return check(seen)

        await eventually(holds, what, timeout=timeout)
        return seen

    # -- the sidecar's metrics -----------------------------------------------------------
    async def sidecar_sample(self, name: str, **labels: str) -> float:
        """One sample of the sidecar's /metrics (0.0 when absent)."""
        return await self._sample(self.sidecar_metrics_url, name, labels)

    async def epp_sample(self, name: str, **labels: str) -> float:
        """One sample of the EPP's /metrics (it must be there)."""
        url = f"http://127.0.0.1:{self.stack.epp_metrics_port}/metrics"
        return await self._sample(url, name, labels, required=True)

    async def _sample(
        self, url: str, name: str, labels: dict[str, str], *, required: bool = False
    ) -> float:
        async with self.session.get(url) as resp:
            assert resp.status == 200
            text = await resp.text()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(
                    sample.labels.get(k) == v for k, v in labels.items()
                ):
                    return float(sample.value)
        assert not required, f"{url} has no sample {name}{labels}"
        return 0.0

    # -- requests --------------------------------------------------------------------------
    def chat(self, *, max_tokens: int = 4, stream: bool = False, **extra: Any) -> dict[str, Any]:
        """A chat body with a prompt no engine has cached: the EPP sends it P/D."""
        content = f"[{uuid.uuid4().hex}] {SAMPLE_PROMPT}"
        body: dict[str, Any] = {
            "model": MODEL,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": max_tokens,
            **extra,
        }
        if stream:
            body["stream"] = True
        return body

    def post(self, body: dict[str, Any], path: str = "/v1/chat/completions") -> Any:
        """``async with faults.post(body) as resp``: through Envoy, EPP and the sidecar."""
        return self.session.post(self.gateway + path, json=body)

    # -- after every scenario ----------------------------------------------------------------
    def assert_clean_logs(self) -> None:
        """No exception reached a framework handler in the sidecar or the EPP."""
        for proc in self.stack.processes:
            if not (proc.name.startswith("sidecar") or proc.name == "epp"):
                continue
            bad = proc.log_alarms()
            assert not bad, f"{proc.name} logged {bad[:3]}:\n{proc.log_since_mark()[-4000:]}"

    async def assert_healthy(self) -> None:
        """Faults cleared; then processes alive, health endpoints up, a normal P/D
        request answered through the gateway, and clean sidecar and EPP logs."""
        await self.clear_faults()
        for proc in self.stack.processes:
            proc.check_alive()
        async with self.session.get(self.sidecar_url + "/health") as resp:
            assert resp.status == 200
        async with self.session.get(self.sidecar_url + "/ready") as resp:
            assert resp.status == 200
        await self._assert_epp_serving()
        before = (await self.stats(self.prefill_url))["requests_by_role"]["prefill"]
        async with asyncio.timeout(10):
            async with self.post(self.chat(max_tokens=3)) as resp:
                body = await resp.text()
                assert resp.status == 200, body
        reply = json.loads(body)
        assert reply["choices"][0]["message"]["content"]
        assert reply["usage"]["completion_tokens"] == 3
        after = (await self.stats(self.prefill_url))["requests_by_role"]["prefill"]
        assert after == before + 1, "the health request went P/D"

        async def no_stream_left() -> bool:
            return await self.epp_sample("llm_d_epp_extproc_streams_inflight") == 0

        await eventually(no_stream_left, "the EPP to close every ext_proc stream")
        self.assert_clean_logs()

    async def _assert_epp_serving(self) -> None:
        port = self.stack.epp_health_port
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            for service in ("liveness", "readiness"):
                reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING, service


@contextlib.asynccontextmanager
async def open_fault_stack(overrides: dict[str, Any], workdir: Path) -> AsyncIterator[FaultStack]:
    """Start a local stack (zero-latency engines unless ``overrides`` say otherwise)."""
    settings: dict[str, Any] = {"gateway_port": 0, "zero_latency": True, **overrides}
    stack = LocalStack(StackOptions(workdir=workdir, **settings))
    await stack.start()
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
            yield FaultStack(stack, session)
    finally:
        await stack.stop()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def fault_stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[FaultStack]:
    """The module's ``STACK``; or, parametrized (indirectly) with a name, ``STACKS[name]``.

    Two stacks of one test process cannot run at the same time (their Envoys would
    share a base id), but pytest finishes one parameter's stack before the next starts.
    """
    overrides: dict[str, Any] = getattr(request.module, "STACK", {})
    name = getattr(request, "param", None)
    if name is not None:
        overrides = request.module.STACKS[name]
    async with open_fault_stack(overrides, tmp_path_factory.mktemp("faults")) as running:
        yield running


@pytest_asyncio.fixture(loop_scope="module")
async def faults(fault_stack: FaultStack) -> AsyncIterator[FaultStack]:
    """The module's stack, reset for this test; faults are cleared afterwards too."""
    await fault_stack.reset()
    yield fault_stack
    await fault_stack.clear_faults()
