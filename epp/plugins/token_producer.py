"""token-producer (older name ``tokenizer``): the request's prompt as token ids.

Runs before every other producer and writes ``TokenizedPrompt`` into the cycle state;
the prefix producers hash it and the P/D decider counts it. A prompt already
tokenized (by an earlier token producer, or token ids sent by the client) is kept.

Backends, exactly one:

- ``estimate`` (the default, and what the configuration adds when a plugin needs
  tokens and no token producer is declared): request bytes packed into 4-byte
  pseudo-tokens, multimodal items as estimated placeholder runs
  (``epp.plugins.token_estimate``). No model, no I/O.
- ``vllm`` (selected by ``vllm`` or by ``modelName``): POSTs the request body, with
  ``model`` set to ``modelName``, to ``{vllm.url}/v1/chat/completions/render`` (chat)
  or ``{vllm.url}/v1/completions/render`` (a string prompt; an Anthropic Messages
  request is converted to the chat request first) over plain HTTP, bounded
  by ``vllm.timeout`` (``vllm.mmTimeout`` when a message has a list of content
  parts). A failed or timed-out call logs a warning and the request continues with
  the estimate, as do APIs the render endpoints do not take.
- ``udsTokenizerConfig`` (llm-d's deprecated tokenizer sidecar) is refused at start:
  use ``vllm.url``.

With the vLLM backend the engine's token count replaces the request's estimate, so the
prefix-based P/D decider compares real token counts.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import aiohttp
from pydantic import Field, field_validator, model_validator

from common.durations import parse_duration
from epp.datastore import Endpoint
from epp.plugins.base import DataProducer, PluginParams
from epp.plugins.registry import register
from epp.plugins.token_anthropic import anthropic_to_chat
from epp.plugins.token_estimate import (
    EstimateParams,
    MultiModalFeature,
    TokenizedPrompt,
    estimate_prompt,
    request_token_ids,
)
from epp.scheduling.cycle import CycleState, StateKey

__all__ = [
    "TOKENIZED_PROMPT",
    "TokenProducer",
    "TokenProducerParams",
    "VllmRenderParams",
    "anthropic_to_chat",
    "tokenized_prompt",
]

log = logging.getLogger(__name__)

TOKENIZED_PROMPT: StateKey[TokenizedPrompt] = StateKey("tokenized-prompt")

CHAT_RENDER_PATH = "/v1/chat/completions/render"
COMPLETIONS_RENDER_PATH = "/v1/completions/render"
_ERROR_SNIPPET = 1024


def tokenized_prompt(cycle: CycleState) -> TokenizedPrompt:
    """The request's tokens from the token producer; the estimate when none ran (or
    its backend failed), computed once per request."""
    found = cycle.get(TOKENIZED_PROMPT)
    if found is None:
        found = estimate_prompt(cycle.request)
        cycle.put(TOKENIZED_PROMPT, found)
    return found


def _seconds(value: str | float, name: str) -> float:
    try:
        seconds = parse_duration(value)
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from None
    if seconds <= 0:
        raise ValueError(f"{name} must be positive")
    return seconds


class VllmRenderParams(PluginParams):
    url: str = "http://localhost:8000"
    # The older sample configs spell the base URL ``http``; it wins when set.
    http: str | None = None
    timeout: str | float = "5s"
    mm_timeout: str | float = "30s"

    @field_validator("url", "http")
    @classmethod
    def _plain_http(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not value.startswith("http://"):
            raise ValueError(f"'{value}': an http:// base URL (TLS is not supported)")
        return value.rstrip("/")

    @field_validator("timeout", "mm_timeout")
    @classmethod
    def _duration(cls, value: str | float) -> str | float:
        _seconds(value, "timeout")
        return value

    @property
    def base_url(self) -> str:
        return self.http or self.url

    @property
    def timeout_s(self) -> float:
        return _seconds(self.timeout, "timeout")

    @property
    def mm_timeout_s(self) -> float:
        return _seconds(self.mm_timeout, "mmTimeout")


class TokenProducerParams(PluginParams):
    model_name: str = ""
    vllm: VllmRenderParams | None = None
    estimate: EstimateParams | None = None
    uds_tokenizer_config: dict[str, Any] | None = Field(default=None, alias="udsTokenizerConfig")

    @model_validator(mode="after")
    def _one_backend(self) -> TokenProducerParams:
        if self.uds_tokenizer_config:
            raise ValueError(
                "udsTokenizerConfig (the deprecated tokenizer sidecar) is not supported; "
                "set vllm.url to a vLLM render endpoint instead"
            )
        vllm = self.vllm is not None or bool(self.model_name)
        if self.estimate is not None and vllm:
            raise ValueError("only one of 'estimate', 'vllm' or 'udsTokenizerConfig' may be set")
        if vllm and not self.model_name:
            raise ValueError("modelName must be set for the vllm backend")
        return self

    @property
    def backend(self) -> str:
        return "vllm" if self.vllm is not None or self.model_name else "estimate"


@register
class TokenProducer(DataProducer):
    type_name = "token-producer"
    Params = TokenProducerParams
    params: TokenProducerParams
    # Runs before the other producers, which read its output.
    produces_tokens = True

    def __init__(self, params: TokenProducerParams | None = None, name: str | None = None) -> None:
        super().__init__(params, name)
        self.vllm = self.params.vllm or VllmRenderParams()
        self._session: aiohttp.ClientSession | None = None
        self.renders = 0
        self.render_failures = 0

    @property
    def backend(self) -> str:
        return self.params.backend

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def prefetch(self, cycle: CycleState, endpoints: Sequence[Endpoint]) -> None:
        if cycle.get(TOKENIZED_PROMPT) is not None:
            return
        req = cycle.request
        ids = request_token_ids(req)
        if ids is not None:
            found: TokenizedPrompt | None = TokenizedPrompt(ids, "request")
        elif self.backend == "vllm":
            found = await self._render(req.body, req.api, req.request_id)
        else:
            found = None
        if found is None:
            found = estimate_prompt(req, self.params.estimate)
        cycle.put(TOKENIZED_PROMPT, found)
        if found.real:
            req.token_estimate = len(found.token_ids)

    def prepare(self, cycle: CycleState, endpoints: Sequence[Endpoint]) -> None:
        # A cycle whose prefetch did not run (unit tests, a direct schedule call).
        if cycle.get(TOKENIZED_PROMPT) is None:
            cycle.put(TOKENIZED_PROMPT, estimate_prompt(cycle.request, self.params.estimate))

    async def _render(
        self, body: Mapping[str, Any], api: str, request_id: str
    ) -> TokenizedPrompt | None:
        messages = body.get("messages")
        if api == "chat" and isinstance(messages, list):
            path = CHAT_RENDER_PATH
            has_parts = any(
                isinstance(m, Mapping) and isinstance(m.get("content"), list) and m["content"]
                for m in messages
            )
            timeout = self.vllm.mm_timeout_s if has_parts else self.vllm.timeout_s
        elif api == "completions" and isinstance(body.get("prompt"), str | list):
            path, timeout = COMPLETIONS_RENDER_PATH, self.vllm.timeout_s
        elif api == "messages" and isinstance(messages, list):
            body = anthropic_to_chat(body)
            path = CHAT_RENDER_PATH
            has_parts = any(isinstance(m.get("content"), list) for m in body["messages"])
            timeout = self.vllm.mm_timeout_s if has_parts else self.vllm.timeout_s
        else:
            return None  # other APIs: the estimate
        doc = dict(body)
        doc["model"] = self.params.model_name
        if self._session is None:
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit_per_host=16))
        url = f"{self.vllm.base_url}{path}"
        try:
            async with self._session.post(
                url, json=doc, timeout=aiohttp.ClientTimeout(total=timeout)
            ) as resp:
                if not 200 <= resp.status < 300:
                    snippet = (await resp.content.read(_ERROR_SNIPPET)).decode("utf-8", "replace")
                    raise ValueError(f"HTTP {resp.status}: {snippet}")
                answer = await resp.json(content_type=None)
            parsed = _parse_render(answer, path == CHAT_RENDER_PATH)
            self.renders += 1
            return parsed
        except (TimeoutError, aiohttp.ClientError, ValueError, KeyError, TypeError) as exc:
            self.render_failures += 1
            log.warning(
                "request %s: render at %s failed (%s); the token estimate is used",
                request_id or "-",
                url,
                exc or type(exc).__name__,
            )
            return None


def _token_list(value: Any) -> list[int]:
    if not isinstance(value, list):
        raise ValueError("'token_ids' is not a list of non-negative integers")
    if value and set(map(type, value)) == {int}:
        ok = min(value) >= 0  # in C: every item is an int
    else:
        ok = all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value)
    if not ok:
        raise ValueError("'token_ids' is not a list of non-negative integers")
    return value


def _parse_render(answer: Any, chat: bool) -> TokenizedPrompt:
    if not chat:
        # One entry per prompt; the first prompt is the one routed on.
        if not isinstance(answer, list) or not answer:
            raise ValueError("completions render returned no prompts")
        answer = answer[0]
    if not isinstance(answer, Mapping):
        raise ValueError("render answer is not an object")
    ids = _token_list(answer["token_ids"])
    return TokenizedPrompt(ids, "vllm", _features(answer.get("features")))


def _features(raw: Any) -> list[MultiModalFeature]:
    if not isinstance(raw, Mapping):
        return []
    hashes = raw.get("mm_hashes") or {}
    places = raw.get("mm_placeholders") or {}
    out: list[MultiModalFeature] = []
    if not isinstance(hashes, Mapping) or not isinstance(places, Mapping):
        return out
    for modality, items in hashes.items():
        ranges = places.get(modality)
        if not isinstance(items, list) or not isinstance(ranges, list):
            continue
        for h, r in zip(items, ranges, strict=False):
            if isinstance(h, str) and isinstance(r, Mapping):
                out.append(
                    MultiModalFeature(
                        str(modality), h, int(r.get("offset", 0)), int(r.get("length", 0))
                    )
                )
    out.sort(key=lambda f: f.offset)
    return out
