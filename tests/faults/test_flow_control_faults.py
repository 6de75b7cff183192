"""Flow control under faults, over the local stack (real Envoy, EPP, sidecar, engine):
the EPP stopping with a full queue, and a flood of clients leaving while queued.

The EPP runs with flow control on and a concurrency detector that calls one in-flight
request saturation, so one request held at the engine makes every later one wait in the
EPP's queue.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from examples.local_stack import LocalStack, StackOptions
from examples.local_stack.flow_control import flow_control_config
from examples.local_stack.stack import default_epp_config
from tests.conftest import eventually
from tests.faults.epp_support import EppStack

pytestmark = [
    pytest.mark.faults,
    pytest.mark.envoy,
    pytest.mark.asyncio(loop_scope="module"),
]

_CHAT = "/v1/chat/completions"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def env(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[EppStack]:
    import aiohttp

    workdir = Path(tmp_path_factory.mktemp("fc-faults"))
    config = workdir / "epp-fc.yaml"
    config.write_text(
        flow_control_config(default_epp_config(workdir / "endpoints.yaml", 16), batch=1)
    )
    options = StackOptions(
        prefill=0,
        decode=1,
        gateway_port=0,
        zero_latency=True,
        workdir=workdir,
        epp_config=config,
        epp_args=["--shutdown-grace=5s"],
    )
    stack = LocalStack(options)
    await stack.start()
    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20))
    running = EppStack(stack, session)
    try:
        yield running
    finally:
        await session.close()
        await stack.stop()


async def _queued(env: EppStack) -> float:
    return await env.epp_metric("llm_d_epp_flow_control_queue_size")


async def _hold_one(env: EppStack) -> asyncio.Task:  # type: ignore[type-arg]
    [decode] = env.stack.decode_engine_urls
    await env.add_fault(decode, kind="delay", delay_ms=3000, count=1, paths=[_CHAT])
    prompt = env.prompt()
    held = asyncio.create_task(env.complete(prompt, chat=True))

    async def arrived() -> bool:
        return await env.received(decode, prompt)

    await eventually(arrived, "the held request reaches the engine")
    return held


async def test_epp_stop_with_a_full_queue_ends_queued_requests_cleanly(env: EppStack) -> None:
    env.mark_logs()
    held = await _hold_one(env)
    queued = [asyncio.create_task(env.complete(env.prompt())) for _ in range(5)]

    async def full() -> bool:
        return await _queued(env) == 5

    await eventually(full, "five requests wait in the EPP")
    await env.stack.restart_epp(signal.SIGTERM)
    async with asyncio.timeout(15):
        outcomes = await asyncio.gather(*queued)
    for o in outcomes:
        assert o.error is None, o
        assert o.status == 503, o
        error = o.json_error()
        assert error is not None, o
    assert (await held).ok, "the dispatched request drained"
    assert (await env.complete(env.prompt())).ok, "served again after the restart"
    await env.assert_healthy()


async def test_a_flood_of_cancellations_empties_the_queue(env: EppStack) -> None:
    env.mark_logs()
    held = await _hold_one(env)
    clients = [asyncio.create_task(env.complete(env.prompt())) for _ in range(40)]

    async def all_queued() -> bool:
        return await _queued(env) == 40

    await eventually(all_queued, "forty requests wait in the EPP")
    for c in clients:
        c.cancel()
    await asyncio.gather(*clients, return_exceptions=True)

    async def empty() -> bool:
        return await _queued(env) == 0

    await eventually(empty, "the queue empties as the clients leave")
    cancelled = await env.epp_metric(
        "llm_d_epp_flow_control_requests_total", {"outcome": "EvictedContextCancelled"}
    )
    assert cancelled >= 40
    assert (await held).ok
    [decode] = env.stack.decode_engine_urls
    before = await env.requests_total(decode)
    assert (await env.complete(env.prompt())).ok
    assert await env.requests_total(decode) == before + 1, "no abandoned request was sent on"
    await env.assert_healthy()
