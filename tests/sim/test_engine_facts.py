"""The simulator answers the handshake-edge questions exactly as real vLLM 0.32 did
(``tests/engine_facts.py``; the real engines are asked by ``./dev e2e``)."""

from __future__ import annotations

from typing import Any

import aiohttp

from tests.engine_facts import VLLM_0_32, PairUnderTest, observe


async def test_simulator_handshake_edges_match_vllm(start_sim: Any) -> None:
    prefill = await start_sim(zero_latency=True)
    decode = await start_sim(zero_latency=True)
    async with aiohttp.ClientSession() as session:
        pair = PairUnderTest(session, prefill.url, decode.url, "sim-model")
        assert await observe(pair, "sim") == VLLM_0_32


async def test_without_the_details_flag_usage_has_no_cached_count(start_sim: Any) -> None:
    # vLLM's default: no --enable-prompt-tokens-details, no prompt_tokens_details, and
    # messages answers without cache fields (input_tokens is the whole prompt).
    sim = await start_sim(zero_latency=True, enable_prompt_tokens_details=False)
    zero = await start_sim(zero_latency=True, omit_zero_cached_tokens=True)
    chat = {"model": "sim-model", "messages": [{"role": "user", "content": "hi " * 40}],
            "max_tokens": 2}  # fmt: skip
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{sim.url}/v1/chat/completions", json=chat) as resp:
            usage = (await resp.json())["usage"]
        assert "prompt_tokens_details" not in usage
        async with session.post(f"{sim.url}/v1/messages", json=chat) as resp:
            usage = (await resp.json())["usage"]
        assert set(usage) == {"input_tokens", "output_tokens"}
        # Versions that report details only for a non-zero count: absent at 0, then there.
        counts = []
        for _ in range(2):
            async with session.post(f"{zero.url}/v1/chat/completions", json=chat) as resp:
                details = (await resp.json())["usage"].get("prompt_tokens_details")
            counts.append(None if details is None else details["cached_tokens"])
        assert counts[0] is None and counts[1] and counts[1] > 0
