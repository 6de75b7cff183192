"""Flow control with stale metrics, over the local stack (real Envoy, EPP, sidecar,
engine): while the only engine's metrics are stale the utilization detector calls the
pool saturated, so nothing is dispatched; queued requests end at their TTL with a 429
and never reach the engine; once the metrics are fresh again requests flow.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
import yaml

from examples.local_stack import LocalStack, StackOptions
from examples.local_stack.stack import default_epp_config
from tests.conftest import eventually
from tests.faults.epp_support import EppStack

pytestmark = [
    pytest.mark.faults,
    pytest.mark.envoy,
    pytest.mark.asyncio(loop_scope="module"),
]

TTL_S = 3.0


def _config(endpoints: Path) -> str:
    config = yaml.safe_load(default_epp_config(endpoints, 16))
    config["featureGates"] = ["flowControl"]
    config["plugins"].append(
        {"type": "utilization-detector", "parameters": {"metricsStalenessThreshold": "1s"}}
    )
    config["flowControl"] = {
        "defaultRequestTTL": f"{TTL_S:g}s",
        "saturationDetector": {"pluginRef": "utilization-detector"},
    }
    return yaml.safe_dump(config, sort_keys=False)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def env(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[EppStack]:
    import aiohttp

    workdir = Path(tmp_path_factory.mktemp("fc-stale"))
    config = workdir / "epp-fc-stale.yaml"
    config.write_text(_config(workdir / "endpoints.yaml"))
    stack = LocalStack(
        StackOptions(
            prefill=0,
            decode=1,
            gateway_port=0,
            zero_latency=True,
            workdir=workdir,
            epp_config=config,
        )
    )
    await stack.start()
    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
    try:
        yield EppStack(stack, session)
    finally:
        await session.close()
        await stack.stop()


async def test_stale_metrics_halt_dispatch_and_queued_requests_end_at_their_ttl(
    env: EppStack,
) -> None:
    [decode] = env.stack.decode_engine_urls

    async def fresh() -> bool:
        return await env.epp_metric("llm_d_epp_ready_endpoints") == 1

    await eventually(fresh, "the engine's metrics fresh")
    assert (await env.complete(env.prompt())).ok
    await env.add_fault(decode, kind="hang", count=-1, paths=["/metrics"])
    try:

        async def saturated() -> bool:
            return await env.epp_metric("llm_d_epp_ready_endpoints") == 0

        await eventually(saturated, "the engine's metrics stale")
        before = await env.requests_total(decode)
        expired_before = await env.epp_metric(
            "llm_d_epp_flow_control_requests_total", {"outcome": "EvictedTTL"}
        )
        outcome = await env.complete(env.prompt())
        assert outcome.status == 429, outcome
        assert outcome.elapsed >= TTL_S * 0.9, outcome  # it waited out its TTL
        assert outcome.json_error() is not None, outcome
        assert await env.requests_total(decode) == before, "nothing was dispatched"
        expired = await env.epp_metric(
            "llm_d_epp_flow_control_requests_total", {"outcome": "EvictedTTL"}
        )
        assert expired == expired_before + 1
    finally:
        await env.clear_faults()
    await eventually(fresh, "the engine's metrics fresh again")
    assert (await env.complete(env.prompt())).ok, "dispatch resumes with fresh metrics"
    await env.assert_healthy()
