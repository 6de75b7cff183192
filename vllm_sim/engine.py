"""One simulated engine: scheduling, prefix cache, latency, the KV handshake.

The HTTP layer (``server.py``) turns an API body into ``GenerationParams`` and drives
``SimEngine.run``; everything the engine does is visible in ``SimStats`` and ``/metrics``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from .config import SimConfig
from .faults import FaultTable
from .kv_transfer import LeaseTable, PullRejected, PullRequest
from .prefix_cache import PrefixCache, block_hashes
from .stats import SimStats
from .tokens import decode_token, output_token_ids

__all__ = [
    "EngineError",
    "GenerationParams",
    "KvLoadFailed",
    "Run",
    "SimEngine",
]

PULL_PATH = "/sim/nixl/pull"


class EngineError(Exception):
    """A request vLLM would refuse with 400 (bad parameters)."""


class KvLoadFailed(Exception):
    """The remote KV could not be loaded and the policy is ``fail``."""


@dataclass
class GenerationParams:
    prompt_ids: list[int]
    max_tokens: int | None = None
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    stream: bool = False
    include_usage: bool = False
    kv_transfer_params: dict[str, Any] | None = None
    seed: int | None = None

    @property
    def role(self) -> str:
        ktp = self.kv_transfer_params or {}
        if ktp.get("do_remote_decode"):
            return "prefill"
        if ktp.get("do_remote_prefill"):
            return "decode"
        return "aggregated"


@dataclass
class Run:
    """A request admitted to the engine; iterate ``tokens()`` once."""

    engine: SimEngine
    params: GenerationParams
    request_id: str
    max_tokens: int
    cached_tokens: int = 0
    block_ids: list[int] = field(default_factory=list)
    output_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    kv_transfer_params: dict[str, Any] | None = None
    omit_kv_transfer_params: bool = False
    _leased: bool = False

    @property
    def prompt_tokens(self) -> int:
        return len(self.params.prompt_ids)

    @property
    def completion_tokens(self) -> int:
        return len(self.output_ids)

    async def tokens(self) -> AsyncIterator[tuple[int, str]]:
        """Yield ``(token_id, text)`` pieces; sets ``finish_reason`` at the end."""
        cfg = self.engine.config
        p = self.params
        natural = None if p.ignore_eos else max(cfg.natural_output_tokens, p.min_tokens)
        limit = self.max_tokens if natural is None else min(self.max_tokens, natural)
        candidates = output_token_ids(p.prompt_ids, limit, p.seed)
        itl = cfg.delay_s(cfg.itl_ms)
        for i, token_id in enumerate(candidates):
            if i > 0 and itl:
                await asyncio.sleep(itl)
            piece = decode_token(token_id, first=not self.output_ids)
            if i >= p.min_tokens and piece.strip() in p.stop:
                self.finish_reason = "stop"
                return
            self.output_ids.append(token_id)
            self.text += piece
            self.engine.generation_tokens += 1
            yield token_id, piece
        self.finish_reason = "length" if limit == self.max_tokens else "stop"
        if p.role == "prefill" and self.finish_reason == "length":
            self._grant_lease()

    def _grant_lease(self) -> None:
        if self.omit_kv_transfer_params:
            return
        engine = self.engine
        engine.leases.grant(self.request_id, list(self.block_ids), list(self.params.prompt_ids))
        self._leased = True
        self.kv_transfer_params = {
            "do_remote_prefill": True,
            "do_remote_decode": False,
            "remote_engine_id": engine.config.engine_id,
            "remote_block_ids": list(self.block_ids),
            "remote_host": engine.config.remote_host,
            "remote_port": engine.port,
            "tp_size": 1,
            "remote_request_id": self.request_id,
        }

    def usage(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
        }


class SimEngine:
    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.port = config.port  # the bound port, set by the server once listening
        self.cache = PrefixCache(config.num_blocks, config.block_size)
        self.leases = LeaseTable(self.cache, config.kv_lease_seconds)
        self.stats = SimStats()
        self.faults = FaultTable()
        self.running = 0
        self.waiting = 0
        self.prompt_tokens_total = 0
        self.generation_tokens = 0
        self.finished: dict[str, int] = {}
        self._slots = asyncio.Semaphore(config.max_num_seqs)
        self._session: aiohttp.ClientSession | None = None
        self._sweeper: asyncio.Task[None] | None = None

    # -- lifetime ----------------------------------------------------------------
    async def start(self) -> None:
        timeout = aiohttp.ClientTimeout(total=self.config.kv_pull_timeout_seconds)
        self._session = aiohttp.ClientSession(timeout=timeout)
        self._sweeper = asyncio.create_task(self._sweep_leases())

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        if self._session is not None:
            await self._session.close()

    async def _sweep_leases(self) -> None:
        interval = min(1.0, self.config.kv_lease_seconds / 4)
        while True:
            await asyncio.sleep(interval)
            self.expire_leases()

    def expire_leases(self) -> None:
        self.stats.leases_expired += self.leases.expire()

    def stats_dict(self) -> dict[str, Any]:
        self.expire_leases()
        return self.stats.as_dict(engine_id=self.config.engine_id, leases_active=len(self.leases))

    # -- the request path ----------------------------------------------------------
    def admit(self, params: GenerationParams, request_id: str) -> Run:
        """Validate like vLLM does; raises ``EngineError`` for a 400."""
        cfg = self.config
        n_prompt = len(params.prompt_ids)
        if n_prompt == 0:
            raise EngineError("The prompt is empty.")
        room = cfg.max_model_len - n_prompt
        if room < 1:
            raise EngineError(
                f"This model's maximum context length is {cfg.max_model_len} tokens. However, "
                f"your request has {n_prompt} input tokens."
            )
        max_tokens = params.max_tokens if params.max_tokens is not None else room
        if max_tokens < 1:
            raise EngineError(f"max_tokens must be at least 1, got {max_tokens}.")
        if max_tokens > room:
            raise EngineError(
                f"This model's maximum context length is {cfg.max_model_len} tokens. However, "
                f"you requested {n_prompt + max_tokens} tokens ({n_prompt} in the messages, "
                f"{max_tokens} in the completion)."
            )
        if params.min_tokens > max_tokens:
            raise EngineError(
                f"min_tokens must be less than or equal to max_tokens={max_tokens}, "
                f"got {params.min_tokens}."
            )
        if params.role == "decode":
            _require_remote_fields(params.kv_transfer_params or {})
        return Run(self, params, request_id, max_tokens)

    @contextlib.asynccontextmanager
    async def running_slot(self, run: Run) -> AsyncIterator[Run]:
        """Queue for a slot, load or compute the prompt's KV, then let tokens flow."""
        self.waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self.waiting -= 1
        self.running += 1
        try:
            await self._prefill(run)
            yield run
        finally:
            self.running -= 1
            self._slots.release()
            if not run._leased:
                self.cache.release(run.block_ids)
            if run.finish_reason is not None:
                self.finished[run.finish_reason] = self.finished.get(run.finish_reason, 0) + 1

    async def _prefill(self, run: Run) -> None:
        cfg = self.config
        prompt = run.params.prompt_ids
        self.prompt_tokens_total += len(prompt)
        local_hits = self.cache.cached_prefix_blocks(block_hashes(prompt, cfg.block_size))
        if run.params.role == "decode":
            if await self._pull(run):
                # The remote KV is now ours; vLLM recomputes only the last prompt token.
                self.cache.insert_computed(prompt)
                self.cache.queries_tokens += len(prompt)
                self.cache.hits_tokens += local_hits * cfg.block_size
                run.block_ids = self.cache.allocate(prompt, record_query=False).block_ids
                run.cached_tokens = len(prompt) - 1
                await asyncio.sleep(cfg.delay_s(cfg.ttft_base_ms))
                return
            if cfg.kv_load_failure_policy == "fail":
                raise KvLoadFailed("failed to load KV from the remote engine")
            self.stats.recomputes += 1
        alloc = self.cache.allocate(prompt)
        run.block_ids = alloc.block_ids
        run.cached_tokens = min(alloc.hit_blocks * cfg.block_size, len(prompt))
        uncached = len(prompt) - run.cached_tokens
        await asyncio.sleep(cfg.delay_s(cfg.ttft_base_ms + uncached * cfg.prefill_ms_per_token))

    async def _pull(self, run: Run) -> bool:
        ktp = run.params.kv_transfer_params or {}
        body = {
            "remote_engine_id": ktp["remote_engine_id"],
            "remote_block_ids": ktp["remote_block_ids"],
            "remote_request_id": ktp.get("remote_request_id"),
        }
        url = f"http://{_host_for_url(str(ktp['remote_host']))}:{ktp['remote_port']}{PULL_PATH}"
        assert self._session is not None, "engine not started"
        try:
            async with self._session.post(url, json=body) as resp:
                payload = await resp.json(content_type=None)
                ok = resp.status == 200 and payload.get("token_ids") == run.params.prompt_ids
        except (TimeoutError, aiohttp.ClientError, ValueError):
            ok = False
        if ok:
            self.stats.kv_pulls_ok += 1
        else:
            self.stats.kv_pulls_failed += 1
        return ok

    # -- the owner's side of the pull ------------------------------------------------
    def serve_pull(self, pull: PullRequest) -> list[int]:
        try:
            lease = self.leases.claim(self.config.engine_id, pull)
        except PullRejected as exc:
            self.stats.kv_pulls_rejected += 1
            if exc.reason == "lease expired":
                self.stats.leases_expired += 1
            raise
        self.stats.kv_pulls_served += 1
        return lease.token_ids


def _require_remote_fields(ktp: dict[str, Any]) -> None:
    missing = [
        key
        for key in ("remote_engine_id", "remote_block_ids", "remote_host", "remote_port")
        if ktp.get(key) is None
    ]
    if missing:
        raise EngineError(
            "kv_transfer_params.do_remote_prefill is set but these fields are missing: "
            + ", ".join(missing)
        )


def _host_for_url(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host
