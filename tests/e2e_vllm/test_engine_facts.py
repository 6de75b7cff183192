"""The facts the simulator copies, read from real vLLM (see ``tests/engine_facts.py``)."""

from __future__ import annotations

import pytest

from examples.local_stack.processes import wait_until
from tests.engine_facts import VLLM_0_32, PairUnderTest, first_token, observe

from .conftest import STALL_S, RealPd
from .engines import SERVED_MODEL, scrape

pytestmark = [
    pytest.mark.vllm_e2e,
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.timeout(900),
]


async def test_real_vllm_handshake_edges_are_as_recorded(real_pd: RealPd) -> None:
    pair = PairUnderTest(real_pd.session, real_pd.prefill.url, real_pd.decode.url, SERVED_MODEL)
    facts = await observe(pair, "real")
    print(facts)  # the observation itself, for the record
    assert facts == VLLM_0_32


async def test_a_first_token_stop_string_through_the_stack_answers_like_one_engine(
    real_pd: RealPd,
) -> None:
    pair = PairUnderTest(real_pd.session, real_pd.prefill.url, real_pd.decode.url, SERVED_MODEL)
    prompt, text, _ = await first_token(pair, "stack")
    body = {"model": SERVED_MODEL, "prompt": prompt, "max_tokens": 8, "temperature": 0,
            "stop": [text.strip()]}  # fmt: skip
    async with real_pd.session.post(f"{real_pd.decode.url}/v1/completions", json=body) as resp:
        assert resp.status == 200
        alone = await resp.json()
    before = await scrape(real_pd.session, real_pd.prefill.url)
    url = f"{real_pd.stack.gateway_url}/v1/completions"
    async with real_pd.session.post(url, json=body) as resp:
        assert resp.status == 200, await resp.text()
        through = await resp.json()

    async def prefilled() -> bool:  # engine counters trail the answer slightly
        after = await scrape(real_pd.session, real_pd.prefill.url)
        return after.delta(before, "vllm:request_success_total") == 1

    # it was disaggregated
    await wait_until(prefilled, "the prefill leg", STALL_S, real_pd.prefill.check_alive)
    assert through["choices"][0]["text"] == alone["choices"][0]["text"]
    assert through["choices"][0]["finish_reason"] == alone["choices"][0]["finish_reason"] == "stop"
    assert through["usage"]["completion_tokens"] == alone["usage"]["completion_tokens"]
