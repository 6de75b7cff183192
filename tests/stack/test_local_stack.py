"""The local stack (the README's main job), driven with the official openai client."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from examples.local_stack import LocalStack, StackOptions
from examples.local_stack.__main__ import parse_options
from examples.local_stack.stack import SAMPLE_PROMPT

pytestmark = pytest.mark.envoy

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[LocalStack]:
    options = StackOptions(gateway_port=0, zero_latency=True, workdir=tmp_path)
    running = LocalStack(options)
    await running.start()
    try:
        yield running
    finally:
        await running.stop()


async def stats(url: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session, session.get(f"{url}/sim/stats") as resp:
        result: dict[str, Any] = await resp.json()
        return result


async def test_pd_then_decode_only_through_the_gateway(stack: LocalStack) -> None:
    [prefill_url] = stack.prefill_engine_urls
    [decode_url] = stack.decode_engine_urls
    messages: Any = [{"role": "user", "content": SAMPLE_PROMPT}]
    async with openai.AsyncOpenAI(
        base_url=f"{stack.gateway_url}/v1", api_key="unused", max_retries=0
    ) as client:
        first = await client.chat.completions.create(
            model="sim-model", messages=messages, max_tokens=8
        )
        after_first = await stats(prefill_url), await stats(decode_url)
        stream = await client.chat.completions.create(
            model="sim-model",
            messages=messages,
            max_tokens=8,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [c async for c in stream]
    prefill_stats, decode_stats = await stats(prefill_url), await stats(decode_url)

    # First request: remote prefill, KV pulled by the decode engine.
    assert after_first[0]["requests_by_role"]["prefill"] == 1
    assert after_first[1]["kv_pulls_ok"] == 1
    assert first.choices[0].finish_reason == "length"
    assert first.usage is not None
    assert first.usage.completion_tokens == 8
    # Same prompt again: the decode pod holds the prefix, so no second prefill.
    assert prefill_stats["requests_by_role"]["prefill"] == 1
    assert decode_stats["requests_by_role"]["aggregated"] == 1
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == first.choices[0].message.content
    usage = chunks[-1].usage
    assert usage is not None
    assert usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.cached_tokens > 0


async def test_short_prompt_is_decode_only(stack: LocalStack) -> None:
    [prefill_url] = stack.prefill_engine_urls
    async with openai.AsyncOpenAI(
        base_url=f"{stack.gateway_url}/v1", api_key="unused", max_retries=0
    ) as client:
        reply = await client.completions.create(model="sim-model", prompt="hi", max_tokens=3)
    assert reply.choices[0].text
    assert (await stats(prefill_url))["requests_total"] == 0


def test_options_parse() -> None:
    options = parse_options(["--prefill", "2", "--decode", "3", "--gateway-port", "0"])
    assert (options.prefill, options.decode, options.gateway_port) == (2, 3, 0)
    with pytest.raises(SystemExit):
        parse_options(["--decode", "0"])


async def test_ctrl_c_stops_every_process() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "examples.local_stack", "--gateway-port", "0", "--zero-latency",
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    assert proc.stdout is not None
    output = ""
    try:
        while "Ctrl-C" not in output:
            line = await asyncio.wait_for(proc.stdout.readline(), 90)
            assert line, f"stack exited early:\n{output}"
            output += line.decode()
        gateway = re.search(r"gateway:\s+(\S+)", output)
        pids_line = re.search(r"pids:\s+([\d ]+)", output)
        assert gateway is not None
        assert pids_line is not None
        pids = [int(p) for p in pids_line.group(1).split()]
        assert len(pids) == 5  # prefill engine, decode engine, sidecar, EPP, Envoy
        async with aiohttp.ClientSession() as session:
            body = {"model": "sim-model", "prompt": "hello", "max_tokens": 2}
            async with session.post(f"{gateway.group(1)}/v1/completions", json=body) as resp:
                assert resp.status == 200
        proc.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(proc.wait(), 60) == 0
        for pid in pids:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
