"""Real vLLM P/D through the sidecar's ``shared-storage`` connector, with KV moved by
vLLM's ExampleConnector (the shared-storage example connector) through a directory.

The prefill engine writes the prompt's KV to the directory as one safetensors file per
layer; the decode engine finds it there by the prompt's token hash and loads it instead
of computing those tokens. Nothing about the transfer travels in the bodies. Every claim
is checked on the engines' own counters (``vllm:prompt_tokens_by_source`` splits each
prompt into locally computed, locally cached and externally loaded tokens) and on the
files in the directory.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import openai
import pytest
import pytest_asyncio

from .conftest import RealPd, running_pd
from .engines import SERVED_MODEL, by_source
from .test_real_pd import (
    EXTERNAL_HITS,
    LOCAL_HITS,
    MAX_TOKENS,
    PROMPT_TOKENS,
    REQUESTS,
    Probe,
    decoded,
    direct_completion,
    disaggregated,
    story,
    token_count,
)

pytestmark = [
    pytest.mark.vllm_e2e,
    pytest.mark.envoy,
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.timeout(900),
]

BY_SOURCE = "vllm:prompt_tokens_by_source_total"
COMPUTED = by_source(BY_SOURCE, "local_compute")
LOADED = by_source(BY_SOURCE, "external_kv_transfer")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def storage_pd(
    vllm_python: str, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[tuple[RealPd, Path]]:
    workdir = tmp_path_factory.mktemp("real-shared-storage")
    storage = workdir / "kv"
    storage.mkdir()
    config = {
        "kv_connector": "ExampleConnector",
        "kv_role": "kv_both",
        "kv_connector_extra_config": {"shared_storage_path": str(storage)},
    }
    async with running_pd(
        vllm_python, tiny_model, workdir, kv_transfer_config=config, kv_connector="shared-storage"
    ) as pd:
        yield pd, storage


async def block_size(pd: RealPd) -> int:
    """The engine's KV block size, from the labels of ``vllm:cache_config_info``."""
    async with pd.session.get(f"{pd.decode.url}/metrics") as resp:
        resp.raise_for_status()
        text = await resp.text()
    found = re.search(r'^vllm:cache_config_info\{[^}]*block_size="(\d+)"', text, re.MULTILINE)
    assert found, "vllm:cache_config_info has no block_size label"
    return int(found.group(1))


def stored_tokens(prompt_tokens: int, block: int) -> int:
    """Prompt tokens ExampleConnector stores and loads: whole blocks, leaving at least one
    token to compute (and only when its store and lookup keys agree, see the caller)."""
    return (prompt_tokens - 2) // block * block


async def long_prompt(pd: RealPd, topic: str, block: int) -> tuple[str, int]:
    """A ~220-token prompt whose token count ExampleConnector handles consistently: its
    store key covers ``(n-1)//block`` blocks and its lookup key ``(n-2)//block`` blocks,
    which differ (no hit, ever) when ``n-1`` is a multiple of the block size."""
    for sentences in (12, 11, 13):
        prompt = story(topic, sentences)
        tokens = await token_count(pd, prompt=prompt)
        if (tokens - 1) % block:
            return prompt, tokens
    raise AssertionError(f"no prompt length usable with block size {block}")


async def test_decode_loads_the_prefills_kv_from_shared_storage(
    storage_pd: tuple[RealPd, Path],
) -> None:
    pd, storage = storage_pd
    block = await block_size(pd)

    # Baseline: a prompt sent straight to the decode engine is computed there in full.
    baseline, baseline_tokens = await long_prompt(pd, "baseline", block)
    async with Probe(pd) as alone:
        await direct_completion(
            pd.decode,
            pd,
            "/v1/completions",
            {"model": SERVED_MODEL, "prompt": baseline, "max_tokens": 1},
        )
        await alone.settle(decoded)
    assert alone.decode(COMPUTED) == baseline_tokens
    assert alone.decode(LOADED) == alone.decode(EXTERNAL_HITS) == 0
    stores_before = {p.name for p in storage.iterdir()}

    prompt, tokens = await long_prompt(pd, "shared-storage", block)
    loaded = stored_tokens(tokens, block)
    assert loaded >= block
    async with (
        openai.AsyncOpenAI(
            base_url=f"{pd.stack.gateway_url}/v1", api_key="unused", max_retries=0, timeout=120
        ) as client,
        Probe(pd) as probe,
    ):
        reply = await client.completions.create(
            model=SERVED_MODEL, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0
        )
        await probe.settle(disaggregated)

    # P computed the whole prompt (one-token leg) and wrote its KV: one new key directory
    # holding a safetensors file per attention layer.
    assert probe.prefill(REQUESTS) == 1
    assert probe.prefill(COMPUTED) == probe.prefill(PROMPT_TOKENS) == tokens
    new_keys = [p for p in storage.iterdir() if p.name not in stores_before]
    assert len(new_keys) == 1, f"expected one stored prompt, found {new_keys}"
    layers = sorted(new_keys[0].glob("*.safetensors"))
    assert layers, f"no KV files under {new_keys[0]}"
    assert all(f.stat().st_size > 0 for f in layers)

    # D loaded those blocks from the directory and computed only the rest.
    assert probe.decode(REQUESTS) == 1
    assert probe.decode(EXTERNAL_HITS) == probe.decode(LOADED) == loaded
    assert probe.decode(LOCAL_HITS) == 0
    assert probe.decode(COMPUTED) == tokens - loaded < alone.decode(COMPUTED)

    assert reply.choices[0].finish_reason == "length"
    assert reply.usage is not None
    assert reply.usage.prompt_tokens == tokens
    assert reply.usage.completion_tokens == MAX_TOKENS
    # Decoding from the loaded KV gives exactly what one engine computes alone.
    local: Any = await direct_completion(
        pd.prefill,
        pd,
        "/v1/completions",
        {"model": SERVED_MODEL, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0},
    )
    assert reply.choices[0].text == local["choices"][0]["text"]
    assert reply.choices[0].text
