"""The simulator's vLLM render endpoints (what ``vllm launch render`` serves and the
EPP's token producer calls): the engine's own tokens, without generating."""

from __future__ import annotations

from typing import Any

import aiohttp

from vllm_sim.tokens import chat_prompt, mm_hash, tokenize


async def _post(sim: Any, path: str, body: Any) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{sim.url}{path}", json=body) as resp:
            return resp.status, await resp.json()


async def test_chat_render_matches_tokenize_and_generates_nothing(start_sim: Any) -> None:
    sim = await start_sim(zero_latency=True)
    messages = [{"role": "user", "content": "render me"}]
    status, answer = await _post(
        sim,
        "/v1/chat/completions/render",
        # Fields render does not use are ignored, as vLLM does.
        {"model": "sim-model", "messages": messages, "max_tokens": 5, "stream": True},
    )
    assert status == 200
    assert answer["token_ids"] == tokenize(chat_prompt(messages))
    assert answer["features"] is None
    status, tok = await _post(sim, "/tokenize", {"model": "sim-model", "messages": messages})
    assert tok["tokens"] == answer["token_ids"]
    assert (await sim.stats())["requests_total"] == 0


async def test_chat_render_reports_each_items_hash_and_span(start_sim: Any) -> None:
    sim = await start_sim(zero_latency=True)
    url = "https://example.com/cat.png"
    content = [
        {"type": "text", "text": "what is"},
        {"type": "image_url", "image_url": {"url": url}},
        {"type": "image_url", "image_url": {"url": url}},
    ]
    status, answer = await _post(
        sim, "/v1/chat/completions/render", {"messages": [{"role": "user", "content": content}]}
    )
    assert status == 200
    features = answer["features"]
    assert features["mm_hashes"] == {"image": [mm_hash(f"image_url:{url}")] * 2}
    spans = features["mm_placeholders"]["image"]
    assert len(spans) == 2 and spans[0]["offset"] < spans[1]["offset"]
    marker = tokenize("<|image_url|>")[0]
    assert all(answer["token_ids"][s["offset"]] == marker for s in spans)


async def test_completions_render_one_entry_per_prompt(start_sim: Any) -> None:
    sim = await start_sim(zero_latency=True)
    status, answer = await _post(
        sim, "/v1/completions/render", {"model": "sim-model", "prompt": ["one", "two words"]}
    )
    assert status == 200
    assert [a["token_ids"] for a in answer] == [tokenize("one"), tokenize("two words")]
    status, answer = await _post(sim, "/v1/completions/render", {"prompt": [7, 8, 9]})
    assert status == 200 and answer[0]["token_ids"] == [7, 8, 9]


async def test_render_errors_as_vllm(start_sim: Any) -> None:
    sim = await start_sim(zero_latency=True)
    status, answer = await _post(
        sim, "/v1/chat/completions/render", {"model": "nope", "messages": []}
    )
    assert status == 404 and "nope" in answer["error"]["message"]
    status, _ = await _post(sim, "/v1/chat/completions/render", {"messages": "hi"})
    assert status == 400
    status, _ = await _post(sim, "/v1/completions/render", {"prompt": {"x": 1}})
    assert status == 400
