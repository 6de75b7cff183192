"""precise-prefix-cache-producer: which endpoints hold the prompt's prefix, from the
engines' own KV events.

Per request: the prompt's token ids (from the engine's ``/tokenize``, or the request's
own token ids), the engine's block hashes over them (vLLM's sha256_cbor with the
engines' seed), and the leading run each endpoint holds according to its events. The
result is the same ``PrefixMatch`` the approximate producer writes, so the prefix-cache
scorer and the prefix-based P/D decider work unchanged. When no candidate publishes
events, or tokenizing fails, the approximate producer (always run, always kept warm)
serves the request; ``PrefixMatch.source`` and a metric label say which one did.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import aiohttp
from prometheus_client import CollectorRegistry
from pydantic import Field, model_validator

from epp.datastore import Endpoint
from epp.kv_events.hashing import block_hashes, external_hash
from epp.kv_events.index import KvBlockIndex, medium_bit
from epp.kv_events.metrics import KvEventsMetrics
from epp.kv_events.pool import KvEventsPool
from epp.kv_events.tokenizer import LocalTokenizer, TokenizerError
from epp.plugins.base import DataProducer, PluginParams, Release, RequestTracker
from epp.plugins.prefix_producer import (
    PREFIX_MATCH,
    ApproxPrefixCacheProducer,
    PrefixMatch,
    PrefixParams,
)
from epp.plugins.registry import register
from epp.scheduling.cycle import CycleState, StateKey
from epp.scheduling.result import SchedulingResult

__all__ = ["PRECISE_PROMPT", "PrecisePrefixCacheProducer", "PrecisePrompt"]

log = logging.getLogger(__name__)

_CHAT_OPTIONS = (
    "add_generation_prompt",
    "continue_final_message",
    "chat_template_kwargs",
    "tools",
    "documents",
    "chat_template",
)


@dataclass(frozen=True, slots=True)
class PrecisePrompt:
    """The prompt as the engine sees it: token count and full block hashes."""

    tokens: int
    hashes: list[bytes]
    keys: list[int]


PRECISE_PROMPT: StateKey[PrecisePrompt] = StateKey("precise-prompt")
_APPROX_MATCH: StateKey[PrefixMatch] = StateKey("approx-prefix-match")


class PreciseParams(PluginParams):
    # Must equal the engines' --block-size and PYTHONHASHSEED (None: vLLM's default seed).
    block_size: int = Field(default=16, gt=0)
    hash_seed: str | None = None
    # Where each engine publishes (vLLM --kv-events-config endpoint / replay_endpoint).
    kv_events_port: int = Field(default=5557, ge=1, le=65535)
    replay_port: int | None = Field(default=None, ge=1, le=65535)
    topic_filter: str = "kv@"
    # How to reach an engine's sockets: {host}, {port}, {name}; e.g. an ipc:// path for
    # engines that bind a local socket instead of TCP.
    endpoint_template: str = "tcp://{host}:{port}"
    replay_timeout_seconds: float = Field(default=2.0, gt=0)
    # Index bound: blocks remembered per engine (oldest stored forgotten first).
    max_blocks_per_engine: int = Field(default=1_000_000, gt=0)
    max_prefix_blocks_to_match: int = Field(default=4096, gt=0)
    media: tuple[str, ...] = ("GPU",)
    # "engine": POST the prompt to a candidate engine's /tokenize; "local": the model's
    # tokenizer and chat template from tokenizerPath (a model directory).
    tokenizer: Literal["engine", "local"] = "engine"
    tokenizer_path: str | None = None
    tokenize_timeout_seconds: float = Field(default=1.0, gt=0)
    # The approximate producer used when events are not available.
    fallback: PrefixParams = Field(default_factory=PrefixParams)

    @model_validator(mode="after")
    def _local_needs_a_path(self) -> PreciseParams:
        if self.tokenizer == "local" and not self.tokenizer_path:
            raise ValueError("tokenizer 'local' needs tokenizerPath (a model directory)")
        return self


@register
class PrecisePrefixCacheProducer(DataProducer, RequestTracker):
    type_name = "precise-prefix-cache-producer"
    Params = PreciseParams
    params: PreciseParams
    # Replaces the approximate producer the configuration would otherwise add.
    provides_prefix_match = True

    def __init__(self, params: PreciseParams | None = None, name: str | None = None) -> None:
        super().__init__(params, name)
        p = self.params
        self.fallback = ApproxPrefixCacheProducer(p.fallback, f"{self.name}/fallback")
        self.index = KvBlockIndex(p.max_blocks_per_engine)
        self.pool = KvEventsPool(
            self.index,
            port=p.kv_events_port,
            replay_port=p.replay_port,
            topic_filter=p.topic_filter,
            replay_timeout_s=p.replay_timeout_seconds,
            endpoint_template=p.endpoint_template,
        )
        self._media = 0
        for m in p.media:
            self._media |= medium_bit(m)
        self._session: aiohttp.ClientSession | None = None
        self._local: LocalTokenizer | None = None
        if p.tokenizer == "local":
            assert p.tokenizer_path is not None  # checked by the params
            try:
                self._local = LocalTokenizer(p.tokenizer_path)
            except (TokenizerError, OSError) as exc:
                raise ValueError(f"{self.name}: {exc}") from None
        self.metrics: KvEventsMetrics | None = None
        self.served: dict[str, int] = {"precise": 0, "approximate": 0}

    # -- lifecycle ---------------------------------------------------------------
    def register_metrics(self, registry: CollectorRegistry) -> None:
        self.metrics = KvEventsMetrics(self.pool, registry)

    def endpoints_changed(self, added: Sequence[Endpoint], removed: Sequence[Endpoint]) -> None:
        self.fallback.endpoints_changed(added, removed)
        self.pool.sync(added, removed)

    async def aclose(self) -> None:
        await self.pool.close()
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- per request -------------------------------------------------------------
    async def prefetch(self, cycle: CycleState, endpoints: Sequence[Endpoint]) -> None:
        live = [ep for ep in endpoints if self.index.knows(ep.key)]
        if not live:
            return
        req = cycle.request
        tokens = _request_token_ids(req.body)
        if tokens is None and self._local is not None:
            tokens = await self._local_tokens(req.body, req.api, req.request_id)
        elif tokens is None:
            tokens = await self._tokenize(live[0], req.body, req.api, req.request_id)
        if tokens is None:
            return
        t0 = time.perf_counter()
        p = self.params
        blocks = min(len(tokens) // p.block_size, p.max_prefix_blocks_to_match)
        hashes = await _hash_blocks(tokens, p.block_size, p.hash_seed, blocks)
        cycle.put(
            PRECISE_PROMPT, PrecisePrompt(len(tokens), hashes, [external_hash(h) for h in hashes])
        )
        # The decider compares token counts: the engine's count beats the estimate.
        req.token_estimate = len(tokens)
        if self.metrics is not None:
            self.metrics.lookup.observe(time.perf_counter() - t0)

    def prepare(self, cycle: CycleState, endpoints: Sequence[Endpoint]) -> None:
        self.fallback.prepare(cycle, endpoints)
        approx = cycle.get(PREFIX_MATCH)
        if approx is not None:
            cycle.put(_APPROX_MATCH, approx)
        prompt = cycle.get(PRECISE_PROMPT)
        if prompt is None:
            return
        live = [ep.key for ep in endpoints if self.index.knows(ep.key)]
        if not live:
            return
        p = self.params
        cycle.put(
            PREFIX_MATCH,
            PrefixMatch(
                hashes=prompt.hashes,
                matched=self.index.match(prompt.keys, live, self._media),
                block_bytes=p.block_size,
                prompt_bytes=prompt.tokens,
                prompt_tokens=prompt.tokens,
                source="precise",
            ),
        )

    def track(self, cycle: CycleState, result: SchedulingResult) -> tuple[Release, Release]:
        approx = cycle.get(_APPROX_MATCH)
        if approx is not None and approx.hashes:
            # Keep the fallback warm: it must be useful the moment events stop.
            for target in result.targets(result.primary)[:1]:
                self.fallback.index.record(target.key, approx.hashes)
            for target in result.targets(result.prefill_profile)[:1]:
                self.fallback.index.record(target.key, approx.hashes)
        match = cycle.get(PREFIX_MATCH)
        source = match.source if match is not None else "approximate"
        self.served[source] = self.served.get(source, 0) + 1
        if self.metrics is not None:
            self.metrics.decisions.labels(producer=source).inc()
        log.debug(
            "request %s: prefix match from the %s producer",
            cycle.request.request_id or "-",
            source,
        )
        return _noop, _noop

    def reassign(
        self, cycle: CycleState, served: SchedulingResult, release_decode: Release
    ) -> Release:
        """The engines' KV events report where the blocks really are; only the warm
        fallback index learns the endpoint that served the request."""
        approx = cycle.get(_APPROX_MATCH)
        if approx is not None and approx.hashes:
            for target in served.targets(served.primary)[:1]:
                self.fallback.index.record(target.key, approx.hashes)
        return release_decode

    async def _local_tokens(
        self, body: Mapping[str, Any], api: str, request_id: str
    ) -> list[int] | None:
        assert self._local is not None
        doc = _tokenize_body(body, api)
        if doc is None:
            return None
        try:
            return await self._local.encode_body(doc)
        except (TokenizerError, TypeError, ValueError) as exc:
            log.warning(
                "request %s: local tokenizing failed (%s); approximate prefix match used",
                request_id or "-",
                exc,
            )
            return None

    async def _tokenize(
        self, ep: Endpoint, body: Mapping[str, Any], api: str, request_id: str
    ) -> list[int] | None:
        doc = _tokenize_body(body, api)
        if doc is None:
            return None
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.params.tokenize_timeout_seconds)
            )
        try:
            async with self._session.post(f"{ep.url}/tokenize", json=doc) as resp:
                if resp.status != 200:
                    raise ValueError(f"HTTP {resp.status}")
                answer = await resp.json()
            tokens = answer["tokens"]
            if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
                raise ValueError("'tokens' is not a list of integers")
        except (TimeoutError, aiohttp.ClientError, ValueError, KeyError, TypeError) as exc:
            log.warning(
                "request %s: tokenize at %s failed (%s); approximate prefix match used",
                request_id or "-",
                ep.key,
                exc,
            )
            return None
        return tokens


# Above this many blocks a prompt is hashed on a worker thread: the hashing releases the
# event loop at every interpreter switch, so other requests keep being served meanwhile.
OFF_LOOP_BLOCKS = 256


async def _hash_blocks(
    tokens: list[int], block_size: int, seed: str | None, blocks: int
) -> list[bytes]:
    if blocks <= OFF_LOOP_BLOCKS:
        return block_hashes(tokens, block_size, seed, max_blocks=blocks)
    return await asyncio.to_thread(block_hashes, tokens, block_size, seed, max_blocks=blocks)


def _request_token_ids(body: Mapping[str, Any]) -> list[int] | None:
    """A completions prompt given as token ids is already what the engine hashes."""
    prompt = body.get("prompt")
    if (
        isinstance(prompt, list)
        and prompt
        and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
    ):
        return prompt
    return None


def _tokenize_body(body: Mapping[str, Any], api: str) -> dict[str, Any] | None:
    model = body.get("model")
    if isinstance(body.get("messages"), list) and api != "messages":
        doc: dict[str, Any] = {"messages": body["messages"]}
        doc.update({k: body[k] for k in _CHAT_OPTIONS if k in body})
    elif isinstance(body.get("prompt"), str):
        doc = {"prompt": body["prompt"]}
    else:
        return None  # other APIs: the approximate producer serves
    if isinstance(model, str):
        doc["model"] = model
    return doc


def _noop() -> None:
    return None
