"""``./dev stack --flow-control``: flow control on, example objectives and a rewrite."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest

from examples.local_stack import LocalStack, StackOptions
from examples.local_stack.__main__ import parse_options
from examples.local_stack.stack import SAMPLE_PROMPT

pytestmark = pytest.mark.envoy


def test_flag_parses() -> None:
    assert parse_options(["--flow-control"]).flow_control
    assert not parse_options([]).flow_control


async def test_flow_control_stack_serves_a_rewritten_model_by_objective(tmp_path: Path) -> None:
    stack = LocalStack(
        StackOptions(gateway_port=0, zero_latency=True, workdir=tmp_path, flow_control=True)
    )
    await stack.start()
    try:
        body = {
            "model": "chat",
            "messages": [{"role": "user", "content": SAMPLE_PROMPT}],
            "max_tokens": 4,
        }
        headers = {"x-llm-d-inference-objective": "critical"}
        async with aiohttp.ClientSession() as session:
            async with session.post(
                f"{stack.gateway_url}/v1/chat/completions", json=body, headers=headers
            ) as r:
                assert r.status == 200, await r.text()
                assert (await r.json())["model"] == "sim-model"
            metrics_url = f"http://127.0.0.1:{stack.epp_metrics_port}/metrics"
            async with session.get(metrics_url) as r:
                text = await r.text()
        assert "llm_d_epp_flow_control_requests_total{inference_pool" in text or (
            'outcome="Dispatched"' in text
        )
        assert 'model_rewrite_name="chat-alias"' in text
    finally:
        await stack.stop()
