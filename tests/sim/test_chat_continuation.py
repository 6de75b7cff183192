"""The simulator's chat continuation, as vLLM's: ``continue_final_message`` continues the
last assistant message instead of opening a new turn (what chunked decode sends)."""

from __future__ import annotations

from typing import Any

import aiohttp

from vllm_sim.tokens import chat_prompt, tokenize

USER = {"role": "user", "content": "tell me something"}


async def _chat(sim: Any, **body: Any) -> tuple[int, Any]:
    payload = {"model": "sim-model", "max_tokens": 4, **body}
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{sim.url}/v1/chat/completions", json=payload) as resp:
            return resp.status, await resp.json()


def test_the_template_leaves_a_continued_message_open() -> None:
    messages = [USER, {"role": "assistant", "content": "Once"}]
    opened = chat_prompt(messages, add_generation_prompt=False, continue_final_message=True)
    assert opened.endswith("<|assistant|> Once")
    closed = chat_prompt(messages, add_generation_prompt=False)
    assert closed.endswith("Once <|end|>")
    assert chat_prompt(messages).endswith("<|end|>\n<|assistant|>")


async def test_a_continuation_joins_the_final_message(start_sim: Any) -> None:
    sim = await start_sim(zero_latency=True)
    messages = [USER, {"role": "assistant", "content": "Once"}]
    status, answer = await _chat(
        sim, messages=messages, continue_final_message=True, add_generation_prompt=False
    )
    assert status == 200, answer
    text = answer["choices"][0]["message"]["content"]
    assert text.startswith(" ")  # continues "Once": not the first word of a new turn
    expected = tokenize(
        chat_prompt(messages, add_generation_prompt=False, continue_final_message=True)
    )
    assert answer["usage"]["prompt_tokens"] == len(expected)
    status, fresh = await _chat(sim, messages=[USER])
    assert not fresh["choices"][0]["message"]["content"].startswith(" ")


async def test_continuation_fields_are_checked_as_vllm_does(start_sim: Any) -> None:
    sim = await start_sim(zero_latency=True)
    messages = [USER, {"role": "assistant", "content": "Once"}]
    status, answer = await _chat(sim, messages=messages, continue_final_message=True)
    assert status == 400  # add_generation_prompt defaults to true
    assert "continue_final_message" in answer["error"]["message"]
    status, answer = await _chat(
        sim, messages=[USER], continue_final_message=True, add_generation_prompt=False
    )
    assert status == 400
    assert "assistant" in answer["error"]["message"]
