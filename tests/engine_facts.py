"""What a vLLM engine does at the edges of the P/D handshake, asked the same way of real
vLLM (``tests/e2e_vllm/test_engine_facts.py``) and of the simulator
(``tests/sim/test_engine_facts.py``), and compared with one recorded answer, so that the
simulator is exactly as lenient as the engine it stands in for.

Each fact is read from the engines' own answers, sent directly (no sidecar): a decode
engine's usage on a fresh prompt and after a NIXL pull, and what a one-token prefill leg
answers when its first token ends the generation (a stop string, a stop token id).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import aiohttp

__all__ = ["VLLM_0_32", "EngineFacts", "PairUnderTest", "first_token", "observe"]

# What the sidecar sends on a prefill leg (reference section 2).
PREFILL_PARAMS = {
    "do_remote_decode": True,
    "do_remote_prefill": False,
    "remote_engine_id": None,
    "remote_block_ids": None,
    "remote_host": None,
    "remote_port": None,
}


@dataclass(frozen=True)
class PrefillEnding:
    finish_reason: str | None
    kv_transfer_params: bool  # present (a non-empty object) in the answer


@dataclass(frozen=True)
class EngineFacts:
    # Decode-only, fresh prompt, engine run with --enable-prompt-tokens-details.
    fresh_details_present: bool
    fresh_cached_tokens: int | None
    # The decode engine's own usage after pulling a fresh prompt's KV from the prefill.
    pulled_details_present: bool
    pulled_cached_tokens: int | None
    # A one-token prefill leg whose first token is a stop string / a stop token id.
    stop_string: PrefillEnding
    stop_token: PrefillEnding


# Recorded with real vLLM 0.32.0 on CPU (./dev e2e): usage reports cached tokens even
# when 0; after a pull the decode counts only its own prefix-cache hits (the pulled
# tokens show in its external prefix-cache metrics); a one-token prefill that meets a
# stop string or a stop token still hands its KV over (the engine core finished it at
# the length cap or as stopped, and 0.32's NixlConnector keeps the blocks for both).
VLLM_0_32 = EngineFacts(
    fresh_details_present=True,
    fresh_cached_tokens=0,
    pulled_details_present=True,
    pulled_cached_tokens=0,
    stop_string=PrefillEnding(finish_reason="stop", kv_transfer_params=True),
    stop_token=PrefillEnding(finish_reason="stop", kv_transfer_params=True),
)


@dataclass(frozen=True)
class PairUnderTest:
    session: aiohttp.ClientSession
    prefill_url: str
    decode_url: str
    model: str


async def _post(pair: PairUnderTest, url: str, body: dict[str, Any]) -> dict[str, Any]:
    async with pair.session.post(f"{url}/v1/completions", json=body) as resp:
        text = await resp.text()
        assert resp.status == 200, text
        answer = await resp.json(content_type=None)
        assert isinstance(answer, dict)
        return answer


def _details(answer: dict[str, Any]) -> tuple[bool, int | None]:
    details = (answer.get("usage") or {}).get("prompt_tokens_details")
    if not isinstance(details, dict):
        return False, None
    return True, details.get("cached_tokens")


def _ending(answer: dict[str, Any]) -> PrefillEnding:
    params = answer.get("kv_transfer_params")
    return PrefillEnding(
        finish_reason=answer["choices"][0].get("finish_reason"),
        kv_transfer_params=isinstance(params, dict) and bool(params),
    )


def _story(topic: str) -> str:
    return " ".join(f"{topic} line {i}: the river ran past the old mill at dawn." for i in range(8))


async def first_token(pair: PairUnderTest, topic: str) -> tuple[str, str, list[int]]:
    """A prompt no engine has seen, its greedy first token's text and id. The text is not
    empty (a byte-level model may start with a partial character: then the next prompt)."""
    for attempt in range(32):
        prompt = _story(f"{topic}-stop-{attempt}")
        first = await _post(
            pair,
            pair.prefill_url,
            {"model": pair.model, "temperature": 0, "prompt": prompt, "max_tokens": 1,
             "return_token_ids": True},
        )  # fmt: skip
        text = first["choices"][0]["text"]
        token_ids = first["choices"][0].get("token_ids") or []
        if text.strip():
            assert len(token_ids) == 1, first
            return prompt, text, token_ids
    raise AssertionError(f"no prompt with a printable first token: {first}")


async def observe(pair: PairUnderTest, topic: str) -> EngineFacts:
    """Ask ``pair`` the questions above, with prompts no engine has seen (per ``topic``)."""
    base = {"model": pair.model, "temperature": 0}

    fresh = await _post(pair, pair.decode_url, {**base, "prompt": _story(f"{topic}-fresh"),
                                                 "max_tokens": 2})  # fmt: skip
    fresh_present, fresh_cached = _details(fresh)

    prompt = _story(f"{topic}-pull")
    prefill = await _post(
        pair,
        pair.prefill_url,
        {**base, "prompt": prompt, "max_tokens": 1, "kv_transfer_params": PREFILL_PARAMS},
    )
    params = prefill.get("kv_transfer_params")
    assert isinstance(params, dict) and params, prefill
    pulled = await _post(
        pair,
        pair.decode_url,
        {**base, "prompt": prompt, "max_tokens": 2, "kv_transfer_params": params},
    )
    pulled_present, pulled_cached = _details(pulled)

    stop_prompt, text, token_ids = await first_token(pair, topic)
    leg = {**base, "prompt": stop_prompt, "max_tokens": 1, "kv_transfer_params": PREFILL_PARAMS}
    stop_string = _ending(await _post(pair, pair.prefill_url, {**leg, "stop": [text.strip()]}))
    stop_token = _ending(await _post(pair, pair.prefill_url, {**leg, "stop_token_ids": token_ids}))
    return EngineFacts(
        fresh_details_present=fresh_present,
        fresh_cached_tokens=fresh_cached,
        pulled_details_present=pulled_present,
        pulled_cached_tokens=pulled_cached,
        stop_string=stop_string,
        stop_token=stop_token,
    )
