"""precise-prefix-cache-producer: which endpoints hold the prompt's prefix, from the
engines' own KV events.

Per request: the prompt's token ids (from the engine's ``/tokenize``, or the request's
own token ids), the engine's block hashes over them (vLLM's sha256_cbor with the
engines' seed), and the leading run each endpoint holds according to its events. The
result is the same ``PrefixMatch`` the approximate producer writes, so the prefix-cache
scorer and the prefix-based P/D decider work unchanged. When no candidate publishes
events, or tokenizing fails, the approximate producer (always run, always kept warm)
serves the request; ``PrefixMatch.source`` and a metric label say which one did.

llm-d's nested settings are taken as well: ``tokenProcessorConfig`` (``blockSizeTokens``
or the older ``blockSize``, ``hashSeed``; also under ``indexerConfig``),
``indexerConfig.kvBlockIndexConfig.maxPrefixBlocksToMatch`` and
``kvEventsConfig`` (``topicFilter``, ``podDiscoveryConfig.socketPort`` /
``replaySocketPort``). With ``speculativeIndexing`` a routing decision predicts that
the chosen decode and prefill engines hold the prompt's blocks for ``speculativeTTL``
(2s), until their events confirm it. A prompt a token producer rendered at an engine
is used as is.
"""

from __future__ import annotations

import asyncio
import logging
import time
from array import array
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import aiohttp
from prometheus_client import CollectorRegistry
from pydantic import Field, model_validator

from common.durations import parse_duration
from common.json_codec import loads_packed
from epp.datastore import Endpoint
from epp.kv_events.hashing import BlockHashMemo, block_hashes, fill_token_table, hash_keys
from epp.kv_events.index import KvBlockIndex, medium_bit
from epp.kv_events.metrics import KvEventsMetrics
from epp.kv_events.pool import KvEventsPool
from epp.kv_events.tokenizer import LocalTokenizer, TokenizerError
from epp.plugins.base import DataProducer, PluginParams, Release, RequestTracker
from epp.plugins.prefix_producer import HASH_SLICE_BLOCKS as APPROX_SLICE_BLOCKS
from epp.plugins.prefix_producer import (
    PREFIX_MATCH,
    ApproxPrefixCacheProducer,
    PrefixMatch,
    PrefixParams,
    match_key,
)
from epp.plugins.registry import register
from epp.plugins.token_estimate import TokenizedPrompt
from epp.plugins.token_producer import TOKENIZED_PROMPT
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
    """The prompt as the engine sees it: token count and full block hashes (the leading
    ``len(hashes)`` of its ``blocks`` up to the match cap)."""

    tokens: int
    hashes: list[bytes]
    keys: list[int]
    blocks: int = 0


PRECISE_PROMPT: StateKey[PrecisePrompt] = StateKey("precise-prompt")
_APPROX_MATCH: StateKey[PrefixMatch] = StateKey("approx-prefix-match")
# The candidates, when the fallback's blocks are to be computed after the decision.
_APPROX_LATER: StateKey[Sequence[Endpoint]] = StateKey("approx-prefix-later")
# The prompt's ids and block count, when its blocks past the last one an endpoint may
# hold are to be hashed after the decision (for the memo only).
_HASH_LATER: StateKey[tuple[Sequence[int], int]] = StateKey("precise-hash-later")


class TokenProcessorConfig(PluginParams):
    """llm-d's KV-block hashing settings: here they must equal the engines' own
    (--block-size and PYTHONHASHSEED), as the index keys on the engines' hashes."""

    block_size_tokens: int | None = Field(default=None, gt=0)
    # Deprecated name of blockSizeTokens.
    block_size: int | None = Field(default=None, gt=0)
    hash_seed: str | None = None
    hash_algorithm: str = ""

    @property
    def tokens(self) -> int | None:
        return self.block_size_tokens or self.block_size


class KvBlockIndexConfig(PluginParams):
    # This EPP's index is in memory and always exports its metrics; the other
    # backends' settings are accepted and not used.
    enable_metrics: bool = False
    metrics_logging_interval: int | str | None = None
    in_memory_config: dict[str, Any] | None = None
    redis_config: dict[str, Any] | None = None
    cost_aware_memory_config: dict[str, Any] | None = None
    max_prefix_blocks_to_match: int | None = Field(default=None, gt=0)


class IndexerConfig(PluginParams):
    kv_block_index_config: KvBlockIndexConfig | None = None
    # Older configs put the hashing settings here.
    token_processor_config: TokenProcessorConfig | None = None
    tokenizers_pool_config: dict[str, Any] | None = None
    kv_cache_backend_configs: list[dict[str, Any]] | None = None


class PodDiscoveryConfig(PluginParams):
    pod_label_selector: str = ""
    pod_namespace: str = ""
    socket_port: int | None = Field(default=None, ge=1, le=65535)
    replay_socket_port: int | None = Field(default=None, ge=1, le=65535)


class KvEventsConfig(PluginParams):
    # A central address engines publish to; this EPP subscribes to each engine's own
    # publisher instead (at the pod discovery socket port, else kvEventsPort).
    zmq_endpoint: str = ""
    topic_filter: str | None = None
    concurrency: int = Field(default=0, ge=0)
    engine_type: Literal["vllm", "sglang", ""] = ""
    discover_pods: bool = True
    pod_discovery_config: PodDiscoveryConfig | None = None


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
    # llm-d's nested settings; where they overlap the flat ones above, they win.
    token_processor_config: TokenProcessorConfig | None = None
    indexer_config: IndexerConfig | None = None
    kv_events_config: KvEventsConfig | None = None
    speculative_indexing: bool = False
    speculative_ttl: str | float = Field(default="2s", alias="speculativeTTL")

    @model_validator(mode="after")
    def _local_needs_a_path(self) -> PreciseParams:
        if self.tokenizer == "local" and not self.tokenizer_path:
            raise ValueError("tokenizer 'local' needs tokenizerPath (a model directory)")
        parse_duration(self.speculative_ttl)
        return self

    def resolved(self) -> PreciseParams:
        """The flat settings with llm-d's nested ones applied."""
        update: dict[str, Any] = {}
        indexer = self.indexer_config or IndexerConfig()
        for tpc in (indexer.token_processor_config, self.token_processor_config):
            if tpc is None:
                continue
            if tpc.tokens:
                update["block_size"] = tpc.tokens
            if tpc.hash_seed:
                update["hash_seed"] = tpc.hash_seed
        kvb = indexer.kv_block_index_config
        if kvb is not None and kvb.max_prefix_blocks_to_match:
            update["max_prefix_blocks_to_match"] = kvb.max_prefix_blocks_to_match
        events = self.kv_events_config
        if events is not None:
            if events.topic_filter is not None:
                update["topic_filter"] = events.topic_filter
            pods = events.pod_discovery_config
            if pods is not None and pods.socket_port:
                update["kv_events_port"] = pods.socket_port
            if pods is not None and pods.replay_socket_port:
                update["replay_port"] = pods.replay_socket_port
        return self.model_copy(update=update) if update else self


@register
class PrecisePrefixCacheProducer(DataProducer, RequestTracker):
    type_name = "precise-prefix-cache-producer"
    Params = PreciseParams
    params: PreciseParams
    # Replaces the approximate producer the configuration would otherwise add.
    provides_prefix_match = True

    def __init__(self, params: PreciseParams | None = None, name: str | None = None) -> None:
        super().__init__((params or PreciseParams()).resolved(), name)
        p = self.params
        self.key = match_key(self.name)
        if p.kv_events_config is not None and p.kv_events_config.zmq_endpoint:
            log.info(
                "plugin '%s': kvEventsConfig.zmqEndpoint %s is not bound; each engine's "
                "publisher is read at port %d",
                self.name,
                p.kv_events_config.zmq_endpoint,
                p.kv_events_port,
            )
        if p.indexer_config is not None and p.indexer_config.tokenizers_pool_config:
            log.warning(
                "plugin '%s': indexerConfig.tokenizersPoolConfig (a tokenizer sidecar) is "
                "not used; prompts are tokenized by a token-producer or the engine",
                self.name,
            )
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
        # speculativeIndexing: engine -> block key -> expiry (monotonic seconds).
        self._speculative: dict[str, dict[int, float]] = {}
        self._speculative_ttl = parse_duration(p.speculative_ttl)
        self.served: dict[str, int] = {"precise": 0, "approximate": 0}
        # Fallback warm-ups under way (hashing a long prompt in slices).
        self._warming: set[asyncio.Task[None]] = set()
        # Of those, the prompts being hashed past where their decision stopped (for the
        # memo): at most ``MAX_HASHING_AFTER`` at once, the others are not.
        self._hashing: set[asyncio.Task[None]] = set()
        self._hashed = BlockHashMemo(HASH_MEMO_SLICES)
        # Token ids' encodings made once at start, not in the first long prompt's decision.
        fill_token_table()

    # -- lifecycle ---------------------------------------------------------------
    def register_metrics(self, registry: CollectorRegistry) -> None:
        self.metrics = KvEventsMetrics(self.pool, registry)

    def endpoints_changed(self, added: Sequence[Endpoint], removed: Sequence[Endpoint]) -> None:
        for ep in removed:
            self._speculative.pop(ep.key, None)
        self.fallback.endpoints_changed(added, removed)
        self.pool.sync(added, removed)

    async def aclose(self) -> None:
        for task in self._warming:
            task.cancel()
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
        tokens = req.client_token_ids()
        produced = cycle.get(TOKENIZED_PROMPT)
        if tokens is not None and produced is None:
            # What any token producer (or the fallback's estimate) makes of client ids:
            # the list is checked once per request, not again by each of them.
            cycle.put(TOKENIZED_PROMPT, TokenizedPrompt(tokens, "request"))
        if tokens is None and produced is not None and produced.real:
            tokens = list(produced.token_ids)  # a token producer's render of the prompt
        if tokens is None and self._local is not None:
            tokens = await self._local_tokens(req.body, req.api, req.request_id)
        elif tokens is None:
            tokens = await self._tokenize(live[0], req.body, req.api, req.request_id)
        if tokens is None:
            return
        t0 = time.perf_counter()
        p = self.params
        blocks = min(len(tokens) // p.block_size, p.max_prefix_blocks_to_match)
        # A match is a leading run: once no candidate holds a slice's last block, the
        # blocks after it change no match, and are hashed after the decision (so that
        # the next prompt starting the same way finds them in the memo). Speculative
        # indexing predicts every block of the prompt, so it needs them all now.
        held = None
        if not p.speculative_indexing:
            held = partial(self.index.holds, engines=[ep.key for ep in live], media=self._media)
        hashes, keys = await _hash_blocks(
            tokens, p.block_size, p.hash_seed, blocks, self._hashed, held
        )
        if len(hashes) < blocks:
            cycle.put(_HASH_LATER, (tokens, blocks))
        cycle.put(PRECISE_PROMPT, PrecisePrompt(len(tokens), hashes, keys, blocks))
        # The decider compares token counts: the engine's count beats the estimate.
        req.token_estimate = len(tokens)
        if self.metrics is not None:
            self.metrics.lookup.observe(time.perf_counter() - t0)

    def prepare(self, cycle: CycleState, endpoints: Sequence[Endpoint]) -> None:
        prompt = cycle.get(PRECISE_PROMPT)
        live = [] if prompt is None else [ep.key for ep in endpoints if self.index.knows(ep.key)]
        if prompt is None or not live:
            self.fallback.prepare(cycle, endpoints)  # the approximate producer serves
            approx = cycle.get(PREFIX_MATCH)
            if approx is not None:
                cycle.put(_APPROX_MATCH, approx)
                cycle.put(self.key, approx)
            return
        # The events serve: the fallback needs only the prompt's blocks, to stay warm,
        # and they are computed once the decision is made (see ``track``).
        cycle.put(_APPROX_LATER, endpoints)
        p = self.params
        matched = self.index.match(prompt.keys, live, self._media)
        if p.speculative_indexing:
            self._add_speculative(prompt.keys, live, matched, cycle.now)
        match = PrefixMatch(
            hashes=prompt.hashes,
            matched=matched,
            block_bytes=p.block_size,
            prompt_bytes=prompt.tokens,
            prompt_tokens=prompt.tokens,
            source="precise",
            block_tokens=p.block_size,
            blocks_total=prompt.blocks,
        )
        cycle.put(PREFIX_MATCH, match)
        cycle.put(self.key, match)

    def _add_speculative(
        self, keys: Sequence[int], live: Sequence[str], matched: dict[str, int], now: float
    ) -> None:
        """Leading runs of blocks predicted on an engine by recent routing decisions
        (not yet confirmed by its events), where longer than the events' run."""
        for engine in live:
            predicted = self._speculative.get(engine)
            if not predicted:
                continue
            n = 0
            for k in keys:
                expiry = predicted.get(k)
                if expiry is None or expiry <= now:
                    break
                n += 1
            if n > matched.get(engine, 0):
                matched[engine] = n

    def _predict(self, engine: str, keys: Sequence[int], now: float) -> None:
        predicted = self._speculative.setdefault(engine, {})
        if len(predicted) + len(keys) > self.params.max_blocks_per_engine:
            for k in [k for k, e in predicted.items() if e <= now]:
                del predicted[k]
        expiry = now + self._speculative_ttl
        for k in keys:
            predicted.pop(k, None)
            predicted[k] = expiry
        while len(predicted) > self.params.max_blocks_per_engine:
            del predicted[next(iter(predicted))]

    def track(self, cycle: CycleState, result: SchedulingResult) -> tuple[Release, Release]:
        prompt = cycle.get(PRECISE_PROMPT)
        if self.params.speculative_indexing and prompt is not None and prompt.keys:
            for profile in (result.primary, result.prefill_profile):
                for target in result.targets(profile)[:1]:
                    self._predict(target.key, prompt.keys, cycle.now)
        # Keep the fallback warm: it must be useful the moment events stop. When the
        # events served, hashing the prompt for it waits until the decision is out, and
        # a long prompt is hashed in slices, the loop serving other requests meanwhile.
        picked = [
            target.key
            for profile in (result.primary, result.prefill_profile)
            for target in result.targets(profile)[:1]
        ]
        if picked and cycle.get(_APPROX_MATCH) is None:
            self._after_decision(self._warm_in_slices(cycle, picked), cycle, picked)
        elif picked:
            self._warm(cycle, picked)
        rest = cycle.get(_HASH_LATER)
        if rest is not None and len(self._hashing) < MAX_HASHING_AFTER:
            task = self._after_decision(self._hash_rest(*rest))
            if task is not None:
                self._hashing.add(task)
                task.add_done_callback(self._hashing.discard)
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
        self._warm(cycle, [target.key for target in served.targets(served.primary)[:1]])
        return release_decode

    def _after_decision(
        self,
        work: Coroutine[Any, Any, None],
        cycle: CycleState | None = None,
        picked: Sequence[str] = (),
    ) -> asyncio.Task[None] | None:
        """``work`` from the event loop's next turn on; when no loop runs, it is dropped
        (and the fallback warmed at once when ``cycle`` is given)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            work.close()
            if cycle is not None:
                self._warm(cycle, picked)
            return None
        task = loop.create_task(work)
        self._warming.add(task)
        task.add_done_callback(self._warming.discard)
        return task

    async def _hash_rest(self, tokens: Sequence[int], blocks: int) -> None:
        p = self.params
        await asyncio.sleep(0)  # after the decision is out
        await _hash_blocks(tokens, p.block_size, p.hash_seed, blocks, self._hashed)

    async def _warm_in_slices(self, cycle: CycleState, picked: Sequence[str]) -> None:
        endpoints = cycle.get(_APPROX_LATER)
        if endpoints is None:
            return
        approx = await self.fallback.blocks_in_slices(cycle, endpoints)
        if len(approx.hashes) > APPROX_SLICE_BLOCKS:
            await asyncio.sleep(0)  # recording them is a slice of its own
        if cycle.get(_APPROX_MATCH) is None:  # else ``reassign`` computed it meanwhile
            cycle.put(_APPROX_MATCH, approx)
        self._warm(cycle, picked)

    def _warm(self, cycle: CycleState, picked: Sequence[str]) -> None:
        """Record the prompt's blocks in the fallback's index for the picked endpoints."""
        approx = cycle.get(_APPROX_MATCH)
        if approx is None:
            endpoints = cycle.get(_APPROX_LATER)
            if endpoints is None:
                return
            approx = self.fallback.compute(cycle, endpoints, match=False)
            cycle.put(_APPROX_MATCH, approx)
        if approx.hashes:
            for key in picked:
                self.fallback.index.record(key, approx.hashes)

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
    ) -> Sequence[int] | None:
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
                # A long prompt's ids come packed (64-bit ints), as a client's would.
                answer = loads_packed(await resp.read(), ("tokens",))
            tokens = answer["tokens"]
            if not isinstance(tokens, array) and (
                not isinstance(tokens, list)
                or not (
                    set(map(type, tokens)) <= {int, bool} or all(isinstance(t, int) for t in tokens)
                )
            ):
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


# A long prompt is hashed this many blocks at a time, the event loop turning between two
# slices (about a millisecond each), so other requests keep being served meanwhile. On
# the loop rather than on a worker thread: the GIL handovers made a 240K-token prompt's
# hashing take 2.5x longer there.
HASH_SLICE_BLOCKS = 256
# Slices whose hashes are kept for prompts that start the same way (a slice's entry is
# about 46 KB, 62 KB when its ids were read packed and key as 64-bit ints: 1,024 slices
# are 4M tokens of prefixes in at most about 63 MB).
HASH_MEMO_SLICES = 1024
# Prompts hashed after their decision at once, at most (about 15 ms of slices each for a
# 64K-token prefix); beyond, a prompt's later blocks are hashed when a request needs them.
MAX_HASHING_AFTER = 4


async def _hash_blocks(
    tokens: Sequence[int],
    block_size: int,
    seed: str | None,
    blocks: int,
    memo: BlockHashMemo,
    held: Callable[[int], bool] | None = None,
) -> tuple[list[bytes], list[int]]:
    """The prompt's first ``blocks`` block hashes and their index keys; a slice hashed
    for a recent prompt (the same ids after the same parent) is taken from ``memo``.
    ``held``: whether some endpoint holds a block (by key); hashing stops after the
    first slice whose last block none holds."""
    hashes: list[bytes] = []
    keys: list[int] = []
    parent: bytes | None = None
    for start in range(0, blocks, HASH_SLICE_BLOCKS):
        stop = min(start + HASH_SLICE_BLOCKS, blocks)
        piece = tokens[start * block_size : stop * block_size]
        key = memo.key(piece, block_size, seed, parent)
        found = memo.get(key) if key is not None else None
        if found is None:
            if start:
                await asyncio.sleep(0)
            computed = block_hashes(piece, block_size, seed, parent=parent)
            found = (computed, hash_keys(computed))
            if key is not None:
                memo.put(key, *found)
        hashes += found[0]
        keys += found[1]
        parent = hashes[-1]
        if held is not None and not held(keys[-1]):
            break
    return hashes, keys


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
