"""In-flight eviction over the local stack (real Envoy, EPP, sidecar, engine).

The EPP runs with flow control and eviction on, and a concurrency detector that calls
one in-flight request saturation. A sheddable request held at the engine is evicted
when a critical one arrives: its client gets 429 ``evicted``, the engine sees the
request aborted, and the critical request is served.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
import yaml

from examples.local_stack import LocalStack, StackOptions
from examples.local_stack.flow_control import flow_control_config, write_objects
from examples.local_stack.stack import default_epp_config
from tests.conftest import eventually
from tests.faults.epp_support import EppStack

pytestmark = [
    pytest.mark.faults,
    pytest.mark.envoy,
    pytest.mark.asyncio(loop_scope="module"),
]

_CHAT = "/v1/chat/completions"
_OBJECTIVE = "x-llm-d-inference-objective"
_DROPPED = "x-llm-d-request-dropped-reason"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def env(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[EppStack]:
    workdir = Path(tmp_path_factory.mktemp("fc-eviction"))
    doc = yaml.safe_load(
        flow_control_config(default_epp_config(workdir / "endpoints.yaml", 16), batch=1)
    )
    doc["flowControl"]["enableEviction"] = True
    config = workdir / "epp-eviction.yaml"
    config.write_text(yaml.safe_dump(doc, sort_keys=False))
    objects = write_objects(workdir / "api-objects.yaml", "sim-model")
    options = StackOptions(
        prefill=0,
        decode=1,
        gateway_port=0,
        zero_latency=True,
        workdir=workdir,
        epp_config=config,
        epp_args=[f"--api-objects-file={objects}"],
    )
    stack = LocalStack(options)
    await stack.start()
    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
    running = EppStack(stack, session)
    try:
        yield running
    finally:
        await session.close()
        await stack.stop()


async def _chat(env: EppStack, prompt: str, objective: str) -> tuple[int, dict[str, str], bytes]:
    body: dict[str, Any] = {
        "model": "sim-model",
        "max_tokens": 3,
        "messages": [{"role": "user", "content": prompt}],
    }
    async with env.session.post(
        f"{env.stack.gateway_url}{_CHAT}", json=body, headers={_OBJECTIVE: objective}
    ) as resp:
        return resp.status, dict(resp.headers), await resp.read()


async def test_a_critical_request_evicts_a_running_sheddable_one(env: EppStack) -> None:
    [decode] = env.stack.decode_engine_urls
    aborts_before = int((await env.engine_stats(decode))["aborts"])
    # The sheddable request is held at the engine far longer than the test waits.
    await env.add_fault(decode, kind="delay", delay_ms=25000, count=1, paths=[_CHAT])
    batch_prompt = env.prompt()
    batch = asyncio.create_task(_chat(env, batch_prompt, "batch"))

    async def arrived() -> bool:
        return await env.received(decode, batch_prompt)

    await eventually(arrived, "the sheddable request reaches the engine")
    critical = asyncio.create_task(_chat(env, env.prompt(), "critical"))

    status, headers, body = await asyncio.wait_for(batch, 15)
    assert status == 429, body
    assert headers.get(_DROPPED) == "evicted"
    status, _, body = await asyncio.wait_for(critical, 15)
    assert status == 200, body

    async def aborted() -> bool:
        return int((await env.engine_stats(decode))["aborts"]) == aborts_before + 1

    await eventually(aborted, "the engine aborts the evicted request")
    issued = await env.epp_metric(
        "llm_d_epp_flow_control_revocations_issued_total", {"priority": "100"}
    )
    assert issued == 1

    async def confirmed() -> bool:
        got = await env.epp_metric(
            "llm_d_epp_flow_control_revocations_total", {"outcome": "confirmed"}
        )
        return got == 1

    await eventually(confirmed, "the eviction is confirmed when the stream ends")
    await env.clear_faults()
    await env.assert_healthy()
