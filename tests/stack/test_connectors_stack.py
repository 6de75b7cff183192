"""The local stack started with each KV connector (and with encoders), one request each
through Envoy; the simulators' stats prove which handshake ran."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from examples.local_stack import LocalStack, StackOptions
from examples.local_stack.__main__ import parse_options
from examples.local_stack.stack import SAMPLE_PROMPT
from tests.conftest import eventually

pytestmark = pytest.mark.envoy


async def stats(url: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session, session.get(f"{url}/sim/stats") as resp:
        result: dict[str, Any] = await resp.json()
        return result


async def run_stack(options: StackOptions) -> LocalStack:
    stack = LocalStack(options)
    await stack.start()
    return stack


@pytest.mark.parametrize("connector", ["shared-storage", "sglang", "mooncake"])
async def test_stack_with_connector(connector: str, tmp_path: Path) -> None:
    stack = await run_stack(
        StackOptions(gateway_port=0, zero_latency=True, workdir=tmp_path, kv_connector=connector)
    )
    try:
        [prefill_url] = stack.prefill_engine_urls
        [decode_url] = stack.decode_engine_urls
        async with openai.AsyncOpenAI(
            base_url=f"{stack.gateway_url}/v1", api_key="unused", max_retries=0
        ) as client:
            reply = await client.chat.completions.create(
                model="sim-model",
                messages=[{"role": "user", "content": SAMPLE_PROMPT}],
                max_tokens=4,
            )
        assert reply.choices[0].finish_reason == "length"
        p, d = await stats(prefill_url), await stats(decode_url)
        assert p["requests_total"] == 1
        if connector == "shared-storage":
            assert d["storage_hit_tokens"] > 0
        else:
            assert d["kv_pulls_ok"] == 1
        if connector == "sglang":
            assert p["kv_pulls_served"] == 1
            # The engines export SGLang's metric names; labelled as SGLang pods, both are
            # read and fresh (not stale, as vLLM's names would leave them).
            await eventually(lambda: _ready_endpoints(stack, 2), "both endpoints fresh")
    finally:
        await stack.stop()


async def _ready_endpoints(stack: LocalStack, expected: int) -> bool:
    url = f"http://127.0.0.1:{stack.epp_metrics_port}/metrics"
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        text = await resp.text()
    lines = [ln for ln in text.splitlines() if ln.startswith("llm_d_epp_ready_endpoints")]
    return sum(float(ln.rsplit(" ", 1)[1]) for ln in lines) == expected


async def test_stack_with_encoders(tmp_path: Path) -> None:
    stack = await run_stack(
        StackOptions(gateway_port=0, zero_latency=True, workdir=tmp_path, encode=2)
    )
    try:
        [prefill_url] = stack.prefill_engine_urls
        content: Any = [
            {"type": "text", "text": SAMPLE_PROMPT},
            {"type": "image_url", "image_url": {"url": "https://example.invalid/a.png"}},
        ]
        async with openai.AsyncOpenAI(
            base_url=f"{stack.gateway_url}/v1", api_key="unused", max_retries=0
        ) as client:
            reply = await client.chat.completions.create(
                model="sim-model", messages=[{"role": "user", "content": content}], max_tokens=4
            )
        assert reply.choices[0].finish_reason == "length"
        encodes = [(await stats(url))["encodes"] for url in stack.encode_engine_urls]
        assert sum(encodes) == 1
        assert (await stats(prefill_url))["ec_loads_ok"] == 1
    finally:
        await stack.stop()


def test_bootstrap_connectors_need_one_prefill_engine(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        parse_options(["--kv-connector", "sglang", "--prefill", "2"])
    options = parse_options(["--kv-connector", "mooncake", "--encode", "1"])
    assert (options.kv_connector, options.encode, options.ec_connector) == (
        "mooncake", 1, "ec-nixl",
    )  # fmt: skip


async def test_stack_refuses_two_prefills_for_sglang(tmp_path: Path) -> None:
    stack = LocalStack(StackOptions(prefill=2, kv_connector="sglang", workdir=tmp_path))
    with pytest.raises(ValueError, match="one prefill engine"):
        await stack.start()
    assert stack.processes == []
