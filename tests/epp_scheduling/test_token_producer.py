"""token-producer as llm-d documents it: the estimate backend (4-byte pseudo-tokens,
multimodal placeholder estimates) and the vLLM render backend over HTTP (against the
simulator's render endpoints), its parameters and its fallbacks."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import struct
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from pydantic import ValidationError

from epp.config import load_config
from epp.plugins.deciders import PrefixBasedPdDecider
from epp.plugins.deprecated_aliases import LegacyTokenizer
from epp.plugins.registry import create_plugin
from epp.plugins.token_estimate import EstimateParams, estimate_prompt, pack_bytes
from epp.plugins.token_producer import (
    TOKENIZED_PROMPT,
    TokenProducer,
    TokenProducerParams,
    anthropic_to_chat,
)
from epp.request import parse_request
from epp.scheduling.cycle import CycleState
from tests.conftest import StartSim
from vllm_sim.tokens import chat_prompt, tokenize

from .helpers import STALENESS_S, chat_body, cycle

HEAD = "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\n"


def _png(width: int, height: int) -> str:
    header = b"\x89PNG\r\n\x1a\n" + b"\0\0\0\rIHDR" + struct.pack(">II", width, height)
    return "data:image/png;base64," + base64.b64encode(header + b"\x08\x02\0\0\0").decode()


def _mm_cycle(parts: list[dict[str, Any]], headers: dict[str, str] | None = None) -> CycleState:
    return cycle(body=chat_body("look", extra_parts=parts), headers=headers)


# -- estimate -------------------------------------------------------------------------


def test_pack_bytes_is_four_bytes_per_token_zero_padded() -> None:
    assert pack_bytes(b"") == []
    assert pack_bytes(b"abcd") == [int.from_bytes(b"abcd", "little")]
    assert pack_bytes(b"abcde") == [int.from_bytes(b"abcd", "little"), ord("e")]


def test_estimate_of_a_chat_is_roles_and_text_packed() -> None:
    c = cycle("hello world")
    found = estimate_prompt(c.request)
    assert found.backend == "estimate" and not found.real
    assert list(found.token_ids) == pack_bytes(b"userhello world")


def test_estimate_keeps_client_token_ids() -> None:
    body = json.dumps({"model": "m", "prompt": [5, 6, 7]}).encode()
    c = cycle(body=body, path="/v1/completions")
    found = estimate_prompt(c.request)
    assert list(found.token_ids) == [5, 6, 7] and found.backend == "request" and found.real


def test_image_placeholders_dynamic_default_and_decoded_and_static() -> None:
    url = "https://example.com/cat.jpg"
    found = estimate_prompt(_mm_cycle([{"type": "image_url", "image_url": {"url": url}}]).request)
    [feature] = found.features
    # 640x360 / 1024 = 225 placeholder tokens, aligned after "userlook" (2 tokens).
    assert (feature.modality, feature.offset, feature.length) == ("image", 2, 225)
    assert len(found.token_ids) == 2 + 225
    assert len(set(found.token_ids[2:])) == 1  # the item's hash, repeated

    png = _png(64, 64)
    found = estimate_prompt(_mm_cycle([{"type": "image_url", "image_url": {"url": png}}]).request)
    assert found.features[0].length == 4  # 64*64/1024, from the image's own header

    static = EstimateParams.model_validate(
        {"image": {"mode": "static", "static": {"staticToken": 7}}}
    )
    req = _mm_cycle([{"type": "image_url", "image_url": {"url": url}}]).request
    assert estimate_prompt(req, static).features[0].length == 7


def test_video_placeholders_sampled_strided_and_headers() -> None:
    part = [{"type": "video_url", "video_url": {"url": "https://example.com/v.mp4"}}]
    # Default: 10 s sampled at 1 fps, 640x360/1024 = 225 tokens per frame.
    assert estimate_prompt(_mm_cycle(part).request).features[0].length == 10 * 225
    params = EstimateParams.model_validate(
        {
            "video": {
                "tokensPerFrame": {"mode": "static", "static": {"numTokensPerFrame": 3}},
                "frames": {"mode": "strided", "strided": {"frameStride": 4}, "maxFrames": 50},
                "maxVideoTokens": 1000,
            }
        }
    )
    # 5 s x 24 fps / 4 = 30 frames x 3.
    req = _mm_cycle(part, {"x-llm-d-video-duration-seconds": "5"}).request
    assert estimate_prompt(req, params).features[0].length == 90
    # 100 s: 600 frames capped at 50.
    req = _mm_cycle(part, {"x-llm-d-video-duration-seconds": "100"}).request
    assert estimate_prompt(req, params).features[0].length == 150
    dynamic = EstimateParams.model_validate({"video": {"frames": {"sampled": {"sampleFPS": 2}}}})
    req = _mm_cycle(part, {"x-llm-d-video-resolution": "320x320"}).request
    assert estimate_prompt(req, dynamic).features[0].length == 20 * 100


def test_estimate_params_reject_unknown_modes() -> None:
    with pytest.raises(ValidationError, match="mode"):
        EstimateParams.model_validate({"image": {"mode": "fancy"}})
    with pytest.raises(ValidationError, match="mode"):
        EstimateParams.model_validate({"video": {"frames": {"mode": "all"}}})


# -- parameters -----------------------------------------------------------------------


def test_backend_selection_and_validation() -> None:
    assert TokenProducerParams().backend == "estimate"
    assert TokenProducerParams.model_validate({"estimate": {}}).backend == "estimate"
    assert TokenProducerParams.model_validate({"modelName": "m"}).backend == "vllm"
    params = TokenProducerParams.model_validate(
        {"modelName": "m", "vllm": {"url": "http://r:8000/", "timeout": "2s", "mmTimeout": "9s"}}
    )
    assert params.vllm is not None
    assert (params.vllm.base_url, params.vllm.timeout_s, params.vllm.mm_timeout_s) == (
        "http://r:8000",
        2.0,
        9.0,
    )
    # The older sample configs' spelling of the URL.
    older = TokenProducerParams.model_validate({"modelName": "m", "vllm": {"http": "http://o:1"}})
    assert older.vllm is not None and older.vllm.base_url == "http://o:1"
    assert TokenProducer(older).vllm.timeout_s == 5.0
    for bad, field in (
        ({"vllm": {}}, "modelName"),
        ({"modelName": "m", "estimate": {}}, "only one"),
        ({"modelName": "m", "vllm": {"url": "https://r"}}, "TLS"),
        ({"modelName": "m", "vllm": {"timeout": "soon"}}, "duration"),
        ({"modelName": "m", "udsTokenizerConfig": {"socketFile": "/tmp/s"}}, "vllm.url"),
        ({"modelName": "m", "extra": 1}, "extra"),
    ):
        with pytest.raises(ValidationError, match=field):
            TokenProducerParams.model_validate(bad)


def test_tokenizer_is_the_deprecated_name(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        plugin = create_plugin("tokenizer", None, {"modelName": "m"})
    assert isinstance(plugin, LegacyTokenizer) and isinstance(plugin, TokenProducer)
    assert plugin.backend == "vllm"
    assert "deprecated" in caplog.text and "token-producer" in caplog.text


def test_configuration_adds_an_estimate_producer_and_runs_token_producers_first() -> None:
    config = load_config(
        HEAD
        + """plugins:
- type: prefix-cache-scorer
schedulingProfiles:
- name: default
  plugins: [{pluginRef: prefix-cache-scorer}]
"""
    )
    producers = config.scheduler.producers
    assert isinstance(producers[0], TokenProducer) and producers[0].backend == "estimate"
    declared = load_config(
        HEAD
        + """plugins:
- type: approx-prefix-cache-producer
- type: prefix-cache-scorer
- type: token-producer
  parameters: {modelName: m}
schedulingProfiles:
- name: default
  plugins: [{pluginRef: prefix-cache-scorer}]
"""
    )
    first = declared.scheduler.producers[0]
    assert isinstance(first, TokenProducer) and first.backend == "vllm"
    assert sum(isinstance(p, TokenProducer) for p in declared.scheduler.producers) == 1


# -- the vLLM render backend -----------------------------------------------------------


async def _produce(producer: TokenProducer, c: CycleState) -> None:
    await producer.prefetch(c, [])
    producer.prepare(c, [])


async def test_render_backend_uses_the_engines_chat_tokens(start_sim: StartSim) -> None:
    sim = await start_sim()
    producer = TokenProducer(
        TokenProducerParams.model_validate({"modelName": "sim-model", "vllm": {"url": sim.url}})
    )
    try:
        c = cycle("the engine renders this prompt", headers={})
        await _produce(producer, c)
        found = c.get(TOKENIZED_PROMPT)
        assert found is not None and found.backend == "vllm"
        messages = [{"role": "user", "content": "the engine renders this prompt"}]
        assert list(found.token_ids) == tokenize(chat_prompt(messages))
        # The decider's token count is now the engine's.
        assert c.request.token_estimate == len(found.token_ids)

        body = json.dumps({"model": "anything", "prompt": "a completion prompt"}).encode()
        c = cycle(body=body, path="/v1/completions")
        await _produce(producer, c)
        found = c.get(TOKENIZED_PROMPT)
        assert found is not None and list(found.token_ids) == tokenize("a completion prompt")
    finally:
        await producer.aclose()


async def test_render_backend_reports_multimodal_features(start_sim: StartSim) -> None:
    sim = await start_sim()
    producer = TokenProducer(
        TokenProducerParams.model_validate({"modelName": "sim-model", "vllm": {"url": sim.url}})
    )
    image = {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}
    try:
        c = _mm_cycle([image, image])
        await _produce(producer, c)
        found = c.get(TOKENIZED_PROMPT)
        assert found is not None and found.backend == "vllm"
        assert [f.modality for f in found.features] == ["image", "image"]
        assert found.features[0].hash == found.features[1].hash
        assert found.features[0].offset < found.features[1].offset
    finally:
        await producer.aclose()


@pytest.fixture
async def stalled() -> AsyncIterator[tuple[str, asyncio.Event]]:
    """A render endpoint that answers only once released (or 404s for another model)."""
    release = asyncio.Event()

    async def handler(request: web.Request) -> web.Response:
        body = await request.json()
        if body.get("model") != "m":
            return web.json_response({"error": "no such model"}, status=404)
        await release.wait()
        return web.json_response({"token_ids": [1, 2, 3]})

    app = web.Application()
    app.router.add_post("/v1/chat/completions/render", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}", release
    finally:
        release.set()
        await runner.cleanup()


async def test_render_timeout_falls_back_to_the_estimate(
    stalled: tuple[str, asyncio.Event],
) -> None:
    url, _ = stalled
    producer = TokenProducer(
        TokenProducerParams.model_validate(
            {"modelName": "m", "vllm": {"url": url, "timeout": "200ms", "mmTimeout": "30s"}}
        )
    )
    try:
        c = cycle("slow engine")
        t0 = time.monotonic()
        await _produce(producer, c)
        assert time.monotonic() - t0 < 5.0  # bounded by the 200 ms timeout (wide margin)
        found = c.get(TOKENIZED_PROMPT)
        assert found is not None and found.backend == "estimate"
        assert producer.render_failures == 1
    finally:
        await producer.aclose()


async def test_render_error_falls_back_and_an_unreachable_engine_too(
    stalled: tuple[str, asyncio.Event],
) -> None:
    url, _ = stalled
    wrong_model = TokenProducer(
        TokenProducerParams.model_validate({"modelName": "other", "vllm": {"url": url}})
    )
    nobody = TokenProducer(
        TokenProducerParams.model_validate(
            {"modelName": "m", "vllm": {"url": "http://127.0.0.1:9"}}
        )
    )
    try:
        for producer in (wrong_model, nobody):
            c = cycle("fallback")
            await _produce(producer, c)
            found = c.get(TOKENIZED_PROMPT)
            assert found is not None and found.backend == "estimate"
            assert producer.render_failures == 1
    finally:
        await wrong_model.aclose()
        await nobody.aclose()


async def test_an_earlier_producers_tokens_are_kept(stalled: tuple[str, asyncio.Event]) -> None:
    url, release = stalled
    release.set()
    producer = TokenProducer(
        TokenProducerParams.model_validate({"modelName": "m", "vllm": {"url": url}})
    )
    try:
        c = cycle("already tokenized")
        await _produce(producer, c)
        first = c.get(TOKENIZED_PROMPT)
        assert first is not None and list(first.token_ids) == [1, 2, 3]
        estimate = TokenProducer()
        await _produce(estimate, c)
        assert c.get(TOKENIZED_PROMPT) is first
    finally:
        await producer.aclose()


def test_parse_request_then_estimate_matches_the_producer() -> None:
    req = parse_request("/v1/chat/completions", {}, chat_body("same text"))
    c = CycleState(req, time.monotonic(), STALENESS_S)
    TokenProducer().prepare(c, [])
    found = c.get(TOKENIZED_PROMPT)
    assert found is not None
    assert list(found.token_ids) == list(estimate_prompt(req).token_ids)


async def test_the_pd_deciders_token_count_is_the_rendered_one(start_sim: StartSim) -> None:
    sim = await start_sim()
    producer = TokenProducer(
        TokenProducerParams.model_validate({"modelName": "sim-model", "vllm": {"url": sim.url}})
    )
    decider = PrefixBasedPdDecider(PrefixBasedPdDecider.Params(prompt_tokens=35))
    text = "a " * 40  # 80 bytes (about 22 estimated tokens), 40+ engine tokens
    try:
        c = cycle(text)
        assert c.request.token_estimate < 35
        assert not decider.approve(c, None)
        await _produce(producer, c)
        assert c.request.token_estimate >= 40
        assert decider.approve(c, None)
    finally:
        await producer.aclose()


ANTHROPIC = {
    "model": "claude",
    "max_tokens": 10,
    "system": [
        {"type": "text", "text": "x-anthropic-billing-header: cc=1;"},
        {"type": "text", "text": "You are terse."},
    ],
    "tools": [{"name": "get", "description": "fetch", "input_schema": {"type": "object"}}],
    "messages": [
        {"role": "user", "content": "what is in the file?"},
        {
            "role": "assistant",
            "content": [
                {"type": "thinking", "thinking": "look it up"},
                {"type": "tool_use", "id": "t1", "name": "get", "input": {"path": "/a"}},
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "t1", "content": "a cat picture"},
                {"type": "text", "text": "describe it"},
                {"type": "image", "source": {"type": "base64", "data": "QUJD"}},
            ],
        },
    ],
}


def test_anthropic_messages_become_the_chat_request_render_takes() -> None:
    chat = anthropic_to_chat(ANTHROPIC)
    assert chat["messages"][0] == {"role": "system", "content": "You are terse."}
    assert chat["messages"][1] == {"role": "user", "content": "what is in the file?"}
    assistant = chat["messages"][2]
    assert assistant["reasoning"] == "look it up"
    assert assistant["tool_calls"][0]["function"] == {"name": "get", "arguments": '{"path": "/a"}'}
    assert chat["messages"][3] == {"role": "tool", "tool_call_id": "t1", "content": "a cat picture"}
    assert chat["messages"][4]["content"] == [
        {"type": "text", "text": "describe it"},
        {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,QUJD"}},
    ]
    assert chat["tools"][0]["function"]["parameters"] == {"type": "object"}


async def test_anthropic_messages_are_rendered_as_chat(start_sim: StartSim) -> None:
    sim = await start_sim()
    producer = TokenProducer(
        TokenProducerParams.model_validate({"modelName": "sim-model", "vllm": {"url": sim.url}})
    )
    try:
        c = cycle(body=json.dumps(ANTHROPIC).encode(), path="/v1/messages")
        await _produce(producer, c)
        found = c.get(TOKENIZED_PROMPT)
        assert found is not None and found.backend == "vllm"
        expected = tokenize(chat_prompt(anthropic_to_chat(ANTHROPIC)["messages"]))
        assert list(found.token_ids) == expected
    finally:
        await producer.aclose()


def test_the_estimate_of_anthropic_messages_counts_their_images() -> None:
    c = cycle(body=json.dumps(ANTHROPIC).encode(), path="/v1/messages")
    found = estimate_prompt(c.request)
    assert found.backend == "estimate"
    [image] = found.features
    assert image.modality == "image" and image.length == 225
