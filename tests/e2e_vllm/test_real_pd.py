"""Real vLLM P/D through Envoy, the EPP and the sidecar, with KV moved by NIXL over TCP.

Every claim is checked against what the engines themselves report: their Prometheus
counters (requests, prompt tokens, local and external prefix-cache hits, NIXL transfers)
and the decode engine's log, never against our own components' view.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import openai
import pytest
import pytest_asyncio

from examples.local_stack.processes import wait_until

from .conftest import STALL_S, RealPd
from .engines import SERVED_MODEL, Metrics, VllmEngine, scrape

pytestmark = [
    pytest.mark.vllm_e2e,
    pytest.mark.envoy,
    pytest.mark.asyncio(loop_scope="module"),
    # The first test also waits for two engines to start (about 90 s, more on a busy box).
    pytest.mark.timeout(900),
]

MAX_TOKENS = 8
# Counters are updated from engine-core stats that trail the HTTP response slightly, or
# by a stall's length on a starved machine.
_SETTLE_S = STALL_S

# Sums over all label sets of these series.
REQUESTS = "vllm:request_success_total"
PROMPT_TOKENS = "vllm:prompt_tokens_total"
LOCAL_HITS = "vllm:prefix_cache_hits_total"
EXTERNAL_HITS = "vllm:external_prefix_cache_hits_total"
NIXL_TRANSFERS = "vllm:nixl_xfer_time_seconds_count"
NIXL_FAILED = "vllm:nixl_num_failed_transfers_total"


def story(topic: str, sentences: int = 12) -> str:
    """A prompt of roughly 20 tokens a sentence, distinct per topic (no shared prefix)."""
    return " ".join(
        f"{topic} number {i}: a long story about the river and the city in the morning light."
        for i in range(sentences)
    )


@pytest_asyncio.fixture(loop_scope="module")
async def client(real_pd: RealPd) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(
        base_url=f"{real_pd.stack.gateway_url}/v1", api_key="unused", max_retries=0, timeout=120
    ) as c:
        yield c


class Probe:
    """Scrapes both engines before and after a request and waits for counters to settle."""

    def __init__(self, pd: RealPd) -> None:
        self.pd = pd
        self.p0 = Metrics({})
        self.d0 = Metrics({})
        self.p = Metrics({})
        self.d = Metrics({})

    async def __aenter__(self) -> Probe:
        self.p0 = await scrape(self.pd.session, self.pd.prefill.url)
        self.d0 = await scrape(self.pd.session, self.pd.decode.url)
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def settle(self, done: Callable[[Probe], bool]) -> None:
        """Re-scrape until ``done`` holds or the settle time passes (then asserts decide)."""
        deadline = time.monotonic() + _SETTLE_S
        while True:
            self.p = await scrape(self.pd.session, self.pd.prefill.url)
            self.d = await scrape(self.pd.session, self.pd.decode.url)
            if done(self) or time.monotonic() > deadline:
                return

    def prefill(self, name: str) -> float:
        return self.p.delta(self.p0, name)

    def decode(self, name: str) -> float:
        return self.d.delta(self.d0, name)


async def token_count(pd: RealPd, **prompt: Any) -> int:
    """What the engine's own tokenizer (and chat template) makes of the prompt."""
    body = {"model": SERVED_MODEL, **prompt}
    if "messages" in prompt:
        body["add_generation_prompt"] = True
    async with pd.session.post(f"{pd.decode.url}/tokenize", json=body) as resp:
        resp.raise_for_status()
        return int((await resp.json())["count"])


async def direct_completion(engine: VllmEngine, pd: RealPd, path: str, body: dict[str, Any]) -> Any:
    async with pd.session.post(f"{engine.url}{path}", json=body) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


def disaggregated(probe: Probe) -> bool:
    return probe.prefill(REQUESTS) >= 1 and probe.decode(REQUESTS) >= 1


def decoded(probe: Probe) -> bool:
    return probe.decode(REQUESTS) >= 1


def assert_kv_pulled(probe: Probe, prompt_tokens: int, locally_cached: int = 0) -> None:
    """One prefill ran on P, and D took every prompt token it lacked from P over NIXL."""
    assert probe.prefill(REQUESTS) == 1, "the prefill engine should have run exactly one leg"
    assert probe.prefill(PROMPT_TOKENS) == prompt_tokens
    assert probe.decode(NIXL_TRANSFERS) == 1, "the decode engine should report one NIXL transfer"
    assert probe.decode(NIXL_FAILED) == 0
    assert probe.decode(EXTERNAL_HITS) == prompt_tokens - locally_cached
    assert probe.decode(LOCAL_HITS) == locally_cached


def assert_decode_only(probe: Probe) -> None:
    assert probe.decode(REQUESTS) == 1
    assert probe.prefill(REQUESTS) == 0, "a decode-only request reached the prefill engine"
    assert probe.prefill(PROMPT_TOKENS) == 0
    assert probe.decode(NIXL_TRANSFERS) == 0
    assert probe.decode(EXTERNAL_HITS) == 0


async def test_chat_runs_prefill_on_p_and_decodes_on_d_with_pulled_kv(
    real_pd: RealPd, client: openai.AsyncOpenAI
) -> None:
    messages: Any = [{"role": "user", "content": story("chat")}]
    tokens = await token_count(real_pd, messages=messages)
    async with Probe(real_pd) as probe:
        reply = await client.chat.completions.create(
            model=SERVED_MODEL, messages=messages, max_tokens=MAX_TOKENS, temperature=0
        )
        await probe.settle(disaggregated)

    assert_kv_pulled(probe, tokens)
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage is not None
    assert reply.usage.prompt_tokens == tokens
    assert reply.usage.completion_tokens == MAX_TOKENS
    assert reply.usage.prompt_tokens_details is not None
    assert reply.usage.prompt_tokens_details.cached_tokens == probe.prefill(LOCAL_HITS) == 0

    # Decoding from the pulled KV gives exactly what one engine computes alone.
    local = await direct_completion(
        real_pd.prefill,
        real_pd,
        "/v1/chat/completions",
        {"model": SERVED_MODEL, "messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0},
    )
    assert reply.choices[0].message.content == local["choices"][0]["message"]["content"]
    assert reply.choices[0].message.content


async def test_decode_engine_logs_successful_nixl_transfers(real_pd: RealPd) -> None:
    # vLLM logs connector statistics with its periodic stats line (every ~10 s).
    marker = "KV Transfer metrics: Num successful transfers="

    async def logged() -> bool:
        return marker in real_pd.decode.log_text()

    await wait_until(logged, "the decode engine's KV transfer log", 30, real_pd.decode.check_alive)
    log = real_pd.decode.log_text()
    successes = [
        int(line.split(marker, 1)[1].split(",", 1)[0])
        for line in log.splitlines()
        if marker in line
    ]
    assert sum(successes) >= 1
    assert "Num failed transfers=0" in log
    assert "KV load failure" not in log


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
async def test_chat_usage_reports_the_prefills_cached_tokens(
    real_pd: RealPd, client: openai.AsyncOpenAI, stream: bool
) -> None:
    messages: Any = [{"role": "user", "content": story(f"cached-{stream}")}]
    tokens = await token_count(real_pd, messages=messages)
    # Warm only the prefill engine: its view of cached tokens now differs from the
    # decode engine's (which has never seen the prompt), so the relayed value tells
    # whose view the client got.
    await direct_completion(
        real_pd.prefill,
        real_pd,
        "/v1/chat/completions",
        {"model": SERVED_MODEL, "messages": messages, "max_tokens": 1},
    )
    async with Probe(real_pd) as probe:
        if stream:
            events = await client.chat.completions.create(
                model=SERVED_MODEL,
                messages=messages,
                max_tokens=MAX_TOKENS,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
            chunks = [chunk async for chunk in events]
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
            usage = chunks[-1].usage
        else:
            reply = await client.chat.completions.create(
                model=SERVED_MODEL, messages=messages, max_tokens=MAX_TOKENS, temperature=0
            )
            text = reply.choices[0].message.content or ""
            finish, usage = reply.choices[0].finish_reason, reply.usage
        await probe.settle(disaggregated)

    prefill_cached = int(probe.prefill(LOCAL_HITS))
    assert prefill_cached > 0, "the warm-up should have left a full block cached on P"
    assert_kv_pulled(probe, tokens)  # includes: D found nothing in its own cache
    assert text
    assert finish == "length"
    assert usage is not None
    assert usage.prompt_tokens == tokens
    assert usage.completion_tokens == MAX_TOKENS
    assert usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.cached_tokens == prefill_cached


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
async def test_completions_pull_kv(
    real_pd: RealPd, client: openai.AsyncOpenAI, stream: bool
) -> None:
    prompt = story(f"completions-{stream}")
    tokens = await token_count(real_pd, prompt=prompt)
    async with Probe(real_pd) as probe:
        if stream:
            events = await client.completions.create(
                model=SERVED_MODEL,
                prompt=prompt,
                max_tokens=MAX_TOKENS,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
            chunks = [chunk async for chunk in events]
            text = "".join(c.choices[0].text for c in chunks if c.choices)
            usage = chunks[-1].usage
        else:
            reply = await client.completions.create(
                model=SERVED_MODEL, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0
            )
            text, usage = reply.choices[0].text, reply.usage
        await probe.settle(disaggregated)

    assert_kv_pulled(probe, tokens)
    assert text
    assert usage is not None
    assert usage.prompt_tokens == tokens
    assert usage.completion_tokens == MAX_TOKENS
    assert usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.cached_tokens == probe.prefill(LOCAL_HITS) == 0


async def test_short_prompt_is_decode_only(real_pd: RealPd, client: openai.AsyncOpenAI) -> None:
    async with Probe(real_pd) as probe:
        reply = await client.completions.create(
            model=SERVED_MODEL, prompt="hi there", max_tokens=4, temperature=0
        )
        await probe.settle(decoded)
    assert_decode_only(probe)
    assert reply.usage is not None
    assert reply.usage.prompt_tokens == await token_count(real_pd, prompt="hi there")
    assert reply.usage.completion_tokens == 4


async def test_repeated_prompt_is_decode_only_from_the_decode_cache(
    real_pd: RealPd, client: openai.AsyncOpenAI
) -> None:
    messages: Any = [{"role": "user", "content": story("repeat")}]
    first = await client.chat.completions.create(
        model=SERVED_MODEL, messages=messages, max_tokens=MAX_TOKENS, temperature=0
    )
    async with Probe(real_pd) as probe:
        again = await client.chat.completions.create(
            model=SERVED_MODEL, messages=messages, max_tokens=MAX_TOKENS, temperature=0
        )
        await probe.settle(decoded)
    # The EPP remembers where the prefix went, and the decode engine really holds it.
    assert_decode_only(probe)
    local_hits = int(probe.decode(LOCAL_HITS))
    assert local_hits > 0
    assert again.usage is not None
    assert again.usage.prompt_tokens_details is not None
    assert again.usage.prompt_tokens_details.cached_tokens == local_hits
    assert again.choices[0].message.content == first.choices[0].message.content
