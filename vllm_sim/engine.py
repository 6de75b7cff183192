"""One simulated engine: scheduling, prefix cache, latency, the KV and encoder handshakes.

The HTTP layer (``server.py``) turns an API body into ``GenerationParams``, admits it
(``SimEngine.admit``), holds a batch slot (``SimEngine.running_slot``) and drains
``Run.tokens()``. Everything the engine does shows in ``SimStats`` and ``/metrics``.

Where a request's KV comes from, by what its body carries:

- ``kv_transfer_params.do_remote_prefill`` with ``remote_block_ids``: NIXL pull;
- ``kv_transfer_params.do_remote_prefill`` with ``transfer_id``: Mooncake pull;
- either of the two on an engine in ``--moriio-mode``: MoRI-IO (read: a pull from the
  prefill engine's handshake port; write: a notify to the prefill engine, which then
  writes the KV here, see ``moriio.py``);
- ``kv_transfer_params.remote_prefiller``: OffloadingConnector P2P take (``p2p.py``);
- ``kv_transfer_params.remote_kv_source`` (any role): the peer's cached prefix first;
- ``bootstrap_room`` on an engine in ``--disaggregation-mode decode``: SGLang rendezvous;
- otherwise computed here, helped by the local prefix cache and the shared storage.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import secrets
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from .config import SimConfig
from .faults import FaultTable
from .kv_events import KvEventPublisher
from .mooncake import TransferTable
from .moriio import Outgoing, WriteTable
from .nixl import LeaseTable, PullRejected, PullRequest
from .p2p import (
    P2P_LOOKUP_PATH,
    P2P_TAKE_PATH,
    REMOTE_DECODER,
    REMOTE_KV_SOURCE,
    REMOTE_PREFILLER,
    missing_peer_fields,
    peer_block,
)
from .prefix_cache import PrefixCache, block_hashes
from .sglang import BootstrapTimeout, RoomTable
from .shared_storage import SharedStorage
from .stats import SimStats
from .tokens import decode_token, mm_hash, output_token_ids

__all__ = [
    "EC_PULL_PATH",
    "MOONCAKE_PULL_PATH",
    "MORIIO_NOTIFY_PATH",
    "MORIIO_WRITE_PATH",
    "PULL_PATH",
    "SGLANG_JOIN_PATH",
    "EngineError",
    "GenerationParams",
    "KvLoadFailed",
    "Run",
    "SimEngine",
]

log = logging.getLogger("vllm_sim")

PULL_PATH = "/sim/nixl/pull"
EC_PULL_PATH = "/sim/ec/pull"
# Served by the bootstrap server (see server.py), not the engine's HTTP port.
SGLANG_JOIN_PATH = "/sim/sglang/join"
MOONCAKE_PULL_PATH = "/sim/mooncake/pull"
# Encoder-output connectors that go through the shared storage.
_STORAGE_EC = frozenset({"ec-example", "ec-shared-storage"})
# MoRI-IO write mode, on the side channel (which stands in for both MoRI-IO ports).
MORIIO_NOTIFY_PATH = "/sim/moriio/notify"
MORIIO_WRITE_PATH = "/sim/moriio/write"


class EngineError(Exception):
    """A request vLLM would refuse with 400 (bad parameters)."""


class KvLoadFailed(Exception):
    """The request cannot run: remote KV or encoder output missing, or a peer timed out."""


@dataclass
class GenerationParams:
    prompt_ids: list[int]
    max_tokens: int | None = None
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    stream: bool = False
    include_usage: bool = False
    kv_transfer_params: dict[str, Any] | None = None
    seed: int | None = None
    # SGLang disaggregation fields (top-level in the body).
    bootstrap_host: str | None = None
    bootstrap_port: int | None = None
    bootstrap_room: int | None = None
    # Decode-first shared-storage path: minimum fraction of the prompt already cached.
    cache_hit_threshold: float | None = None
    # Encoder outputs handed in (ec-nixl) and the request's multimodal items.
    ec_transfer_params: dict[str, Any] | None = None
    mm_items: list[str] = field(default_factory=list)
    # X-data-parallel-rank: the rank this request is pinned to (None: any rank).
    dp_rank: int | None = None
    return_token_ids: bool = False
    # The output continues text already in the prompt (chat continue_final_message):
    # its first piece is joined to that text like any later piece.
    continuation: bool = False


@dataclass
class Run:
    """A request admitted to the engine; iterate ``tokens()`` once."""

    engine: SimEngine
    params: GenerationParams
    request_id: str
    max_tokens: int
    role: str
    cached_tokens: int = 0
    block_ids: list[int] = field(default_factory=list)
    output_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    kv_transfer_params: dict[str, Any] | None = None
    ec_transfer_params: dict[str, Any] | None = None
    omit_kv_transfer_params: bool = False
    below_cache_threshold: bool = False
    # Decode-side kv_transfer_params that cannot be used (fields missing): vLLM warns
    # and computes the prompt itself.
    invalid_kv_params: list[str] = field(default_factory=list)
    dp_rank: int = 0
    _leased: bool = False

    @property
    def prompt_tokens(self) -> int:
        return len(self.params.prompt_ids)

    @property
    def completion_tokens(self) -> int:
        return len(self.output_ids)

    async def tokens(self) -> AsyncIterator[tuple[int, str]]:
        """Yield ``(token_id, text)`` pieces; sets ``finish_reason`` at the end.

        How a generation ends decides whether a prefill's KV is handed over, as in vLLM
        0.32: the engine core finishes a request at the length cap or as stopped (EOS,
        a stop token id), and the NixlConnector keeps the blocks for both (for the
        latter only with ``kv_params_on_stop``). A stop string is found by the
        front end, which aborts the request in the core: no KV, unless that token was
        also the last one allowed (the core had already finished it at the cap).
        """
        if self.below_cache_threshold:
            self.finish_reason = "cache_threshold"
            return
        cfg = self.engine.config
        p = self.params
        natural = None if p.ignore_eos else max(cfg.natural_output_tokens, p.min_tokens)
        limit = self.max_tokens if natural is None else min(self.max_tokens, natural)
        candidates = output_token_ids(p.prompt_ids, limit, p.seed)
        core_end = "length" if limit == self.max_tokens else "stopped"
        every = cfg.stream_interval_tokens
        owed = 0.0  # model time of the tokens since the last wake-up
        for i, token_id in enumerate(candidates):
            if i > 0:
                owed += self.engine.itl_s()
                if owed and (i % every == 0 or i == len(candidates) - 1):
                    await asyncio.sleep(owed)
                    owed = 0.0
            piece = decode_token(token_id, first=not self.output_ids and not p.continuation)
            if i >= p.min_tokens:
                if any(s and s in self.text + piece for s in p.stop):
                    self.finish_reason = "stop"
                    self._finished(core_end if i == self.max_tokens - 1 else "aborted")
                    return
                if token_id in p.stop_token_ids:
                    self.output_ids.append(token_id)
                    self.engine.generation_tokens += 1
                    self.finish_reason = "stop"
                    self._finished("stopped")
                    return
            self.output_ids.append(token_id)
            self.text += piece
            self.engine.generation_tokens += 1
            yield token_id, piece
        self.finish_reason = "length" if core_end == "length" else "stop"
        self._finished(core_end)

    def _finished(self, core_end: str) -> None:
        """The engine core's view of the end: "length", "stopped" or "aborted"."""
        if self.role == "prefill":
            self.engine.hand_over(self, core_end)

    def usage(self) -> dict[str, Any]:
        usage: dict[str, Any] = {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }
        if self.reports_cached_tokens:
            usage["prompt_tokens_details"] = {"cached_tokens": self.cached_tokens}
        return usage

    @property
    def reports_cached_tokens(self) -> bool:
        """Whether usage carries the cached count (vLLM's --enable-prompt-tokens-details)."""
        cfg = self.engine.config
        if not cfg.enable_prompt_tokens_details:
            return False
        return self.cached_tokens > 0 or not cfg.omit_zero_cached_tokens


class SimEngine:
    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.port = config.port  # the bound port, set by the server once listening
        # The KV and encoder-output side channel's bound port (never the HTTP port).
        self.side_channel_port = config.nixl_side_channel_port
        self.bootstrap_port = config.bootstrap_port
        self.cache = PrefixCache(config.num_blocks, config.block_size, config.hash_seed)
        self.kv_events: KvEventPublisher | None = None
        self.leases = LeaseTable(self.cache, config.kv_lease_seconds)
        self.rooms = RoomTable(config.bootstrap_timeout_seconds)
        self.transfers = TransferTable(config.kv_lease_seconds, config.bootstrap_timeout_seconds)
        self.writes = WriteTable(config.kv_lease_seconds, config.kv_pull_timeout_seconds)
        self._writing: set[asyncio.Task[None]] = set()
        # The OffloadingConnector P2P tier: KV stored under kv_request_id for a decode.
        self.p2p_store = TransferTable(config.kv_lease_seconds, config.bootstrap_timeout_seconds)
        self.storage = (
            SharedStorage(config.shared_storage_path) if config.shared_storage_path else None
        )
        self.encoded: dict[str, int] = {}  # mm_hash -> size in bytes, held for consumers
        self.stats = SimStats()
        self.faults = FaultTable()
        self.running = 0
        # Uncached prompt tokens being computed now (they slow decode steps, with a budget).
        self.prefilling_tokens = 0
        self.waiting = 0
        self.prompt_tokens_total = 0
        self.generation_tokens = 0
        self.finished: dict[str, int] = {}
        self.external_queries_tokens = 0
        self.external_hits_tokens = 0
        self.nixl_failed_transfers = 0
        self.tokens_by_source = {
            "local_compute": 0,
            "local_cache_hit": 0,
            "external_kv_transfer": 0,
        }
        self._slots = asyncio.Semaphore(config.max_num_seqs)
        self._compute = asyncio.Lock()  # FIFO: one prompt computed at a time (serial_prefill)
        # Set by a fleet: the most leading blocks of a prompt any engine of the pool holds.
        self.oracle: Callable[[Sequence[bytes]], int] | None = None
        self.oracle_hit_tokens = 0
        self.computed_queries_tokens = 0
        # Model milliseconds spent computing prompts (the fleet's busy share comes from it).
        self.prompt_compute_ms = 0.0
        self._session: aiohttp.ClientSession | None = None
        self._sweeper: asyncio.Task[None] | None = None

    # -- lifetime ----------------------------------------------------------------
    async def start(self) -> None:
        timeout = aiohttp.ClientTimeout(
            total=self.config.kv_pull_timeout_seconds + self.config.bootstrap_timeout_seconds
        )
        self._session = aiohttp.ClientSession(timeout=timeout)
        self._sweeper = asyncio.create_task(self._sweep_leases())
        cfg = self.config
        if cfg.kv_events_port is not None:
            topic = cfg.kv_events_topic or f"kv@{cfg.engine_id}@{cfg.served_model_name}"
            self.kv_events = KvEventPublisher(
                cfg.host,
                cfg.kv_events_port,
                cfg.kv_events_replay_port,
                topic,
                encoding=cfg.kv_events_encoding,
                int_hashes=cfg.kv_events_int_hashes,
            )
            await self.kv_events.start()
            self.cache.event_sink = self.kv_events.add

    async def close(self) -> None:
        if self.kv_events is not None:
            self.cache.event_sink = None
            await self.kv_events.close()
        for task in list(self._writing):
            task.cancel()
        await asyncio.gather(*self._writing, return_exceptions=True)
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
        expired = (
            self.leases.expire()
            + self.transfers.expire()
            + self.writes.expire()
            + self.p2p_store.expire()
        )
        self.stats.leases_expired += expired

    def stats_dict(self) -> dict[str, Any]:
        self.expire_leases()
        return self.stats.as_dict(
            engine_id=self.config.engine_id,
            leases_active=len(self.leases)
            + len(self.transfers)
            + len(self.writes)
            + len(self.p2p_store),
        )

    def itl_s(self) -> float:
        """One decode step at the current batch size, in seconds; with a step budget
        (``max_num_batched_tokens``), a step taken while prompts are computed also computes
        a chunk of them and takes that much longer (what disaggregation takes away)."""
        cfg = self.config
        ms = cfg.itl_ms + cfg.itl_ms_per_running * self.running
        if cfg.max_num_batched_tokens and self.prefilling_tokens:
            room = max(cfg.max_num_batched_tokens - self.running, 0)
            ms += min(self.prefilling_tokens, room) * cfg.prefill_ms_per_token
        return cfg.delay_s(ms)

    async def _compute_prompt(self, tokens: int, seconds: float) -> None:
        """Compute a prompt's ``tokens`` uncached tokens, which takes ``seconds``."""
        if not self.config.serial_prefill:
            await self._computing(tokens, seconds)
            return
        # Not scheduled until its prompt's turn comes: vLLM counts such a request as
        # waiting (its prompt does not fit in the step's token budget), not running.
        self.running -= 1
        self.waiting += 1
        try:
            await self._compute.acquire()
        finally:
            self.waiting -= 1
            self.running += 1
        try:
            await self._computing(tokens, seconds)
        finally:
            self._compute.release()

    async def _computing(self, tokens: int, seconds: float) -> None:
        self.prefilling_tokens += tokens
        try:
            await asyncio.sleep(seconds)
        finally:
            self.prefilling_tokens -= tokens

    # -- the request path ----------------------------------------------------------
    def role_of(self, params: GenerationParams) -> str:
        if self.config.role == "encode":
            return "encode"
        ktp = params.kv_transfer_params or {}
        if ktp.get("do_remote_decode") or REMOTE_DECODER in ktp:
            return "prefill"
        if ktp.get("do_remote_prefill") or REMOTE_PREFILLER in ktp:
            return "decode"
        if params.bootstrap_room is not None and self.config.disaggregation_mode != "null":
            return self.config.disaggregation_mode
        return "aggregated"

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
                f"your request has {n_prompt} input tokens. Please reduce the length of the "
                "input messages."
            )
        max_tokens = params.max_tokens if params.max_tokens is not None else room
        if max_tokens < 1:
            raise EngineError(f"max_tokens must be at least 1, got {max_tokens}.")
        if max_tokens > room:
            raise EngineError(
                f"'max_tokens' or 'max_completion_tokens' is too large: {max_tokens}. This "
                f"model's maximum context length is {cfg.max_model_len} tokens and your request "
                f"has {n_prompt} input tokens ({max_tokens} > {cfg.max_model_len} - {n_prompt})."
            )
        if params.min_tokens > max_tokens:
            raise EngineError(
                f"min_tokens must be less than or equal to max_tokens={max_tokens}, "
                f"got {params.min_tokens}."
            )
        role = self.role_of(params)
        missing: list[str] = []
        if role == "decode" and params.bootstrap_room is None:
            missing = _missing_remote_fields(params.kv_transfer_params or {}, cfg.moriio_mode)
        ktp = params.kv_transfer_params or {}
        if cfg.moriio_mode == "write" and role == "prefill" and not ktp.get("transfer_id"):
            raise EngineError("MoRI-IO write mode needs kv_transfer_params.transfer_id.")
        sglang = params.bootstrap_room is not None and role in ("prefill", "decode")
        if sglang and (params.bootstrap_host is None or params.bootstrap_port is None):
            raise EngineError("bootstrap_room needs bootstrap_host and bootstrap_port.")
        if role == "encode" and len(params.mm_items) != 1:
            raise EngineError("An encode request carries exactly one multimodal item.")
        rank = params.dp_rank
        if rank is None or not 0 <= rank < cfg.data_parallel_size:
            rank = secrets.randbelow(cfg.data_parallel_size)
        self.stats.requests_by_dp_rank[rank] = self.stats.requests_by_dp_rank.get(rank, 0) + 1
        return Run(self, params, request_id, max_tokens, role, invalid_kv_params=missing,
                   dp_rank=rank)  # fmt: skip

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
            if run.params.bootstrap_room is not None and run.role == "prefill":
                self.rooms.abandon(run.params.bootstrap_room)  # no-op once handed over
            if run.role == "prefill" and run.finish_reason is None:
                self.hand_over(run, "aborted")  # e.g. the client left: nothing to pull
            if not run._leased:
                self.cache.release(run.block_ids)
            if run.finish_reason is not None:
                self.finished[run.finish_reason] = self.finished.get(run.finish_reason, 0) + 1

    async def _prefill(self, run: Run) -> None:
        cfg = self.config
        prompt = run.params.prompt_ids
        self.prompt_tokens_total += len(prompt)
        await self._check_encoder_outputs(run)
        hashes = block_hashes(prompt, cfg.block_size, cfg.hash_seed)
        # Blocks pulled from a remote_kv_source peer cost no prefill time and land in the
        # prefix cache; like NIXL's, usage reports them nowhere (external counters only).
        pulled = await self._pull_from_source(run, hashes) if run.role != "decode" else 0
        local_hits = self.cache.cached_prefix_blocks(hashes)
        if run.role == "decode" and run.invalid_kv_params:
            # vLLM logs "Got invalid KVTransferParams ... will not utilize KVTransfer"
            # and computes the prompt itself: no error for the client.
            log.warning(
                "request %s: invalid kv_transfer_params (missing %s); computing the prompt",
                run.request_id,
                ", ".join(run.invalid_kv_params),
            )
            self.stats.kv_params_invalid += 1
        elif run.role == "decode":
            if await self._load_remote(run):
                # The remote KV is now ours. Like vLLM, usage reports only the local
                # prefix-cache hits as cached; the pulled tokens show in the external
                # prefix-cache and by-source metrics.
                local = min(local_hits * cfg.block_size, len(prompt))
                self.cache.insert_computed(prompt)
                self.cache.queries_tokens += len(prompt)
                self.cache.hits_tokens += local
                self.external_queries_tokens += len(prompt) - local
                self.external_hits_tokens += len(prompt) - local
                self.tokens_by_source["local_cache_hit"] += local
                self.tokens_by_source["external_kv_transfer"] += len(prompt) - local
                run.block_ids = self.cache.allocate(prompt, record_query=False).block_ids
                run.cached_tokens = local
                await asyncio.sleep(cfg.delay_s(cfg.ttft_base_ms))
                return
            if cfg.kv_load_failure_policy == "fail" or run.params.bootstrap_room is not None:
                raise KvLoadFailed("failed to load KV from the remote engine")
            self.stats.recomputes += 1
        stored = 0 if self.storage is None else await self.storage.cached_blocks(hashes)
        threshold = run.params.cache_hit_threshold
        if threshold is not None:
            reachable = min(max(local_hits, stored) * cfg.block_size, len(prompt))
            if reachable < threshold * len(prompt):
                # Declined before anything is computed or cached.
                run.below_cache_threshold = True
                run.cached_tokens = reachable
                self.stats.cache_threshold_rejections += 1
                return
        if self.oracle is not None:
            self.computed_queries_tokens += len(prompt)
            best = max(self.oracle(hashes), local_hits)
            self.oracle_hit_tokens += min(best * cfg.block_size, len(prompt))
        alloc = self.cache.allocate(prompt)
        run.block_ids = alloc.block_ids
        self.stats.storage_hit_tokens += max(0, stored - alloc.hit_blocks) * cfg.block_size
        run.cached_tokens = min(max(alloc.hit_blocks, stored) * cfg.block_size, len(prompt))
        pulled = max(0, min(pulled, len(prompt) - run.cached_tokens))
        uncached = len(prompt) - run.cached_tokens - pulled
        self.tokens_by_source["local_cache_hit"] += run.cached_tokens
        self.tokens_by_source["external_kv_transfer"] += pulled
        self.tokens_by_source["local_compute"] += uncached
        compute_ms = cfg.ttft_base_ms + uncached * cfg.prefill_ms_per_token
        await self._compute_prompt(uncached, cfg.delay_s(compute_ms))
        self.prompt_compute_ms += compute_ms
        if self.storage is not None:
            await self.storage.store_blocks(hashes)
        await self._publish(run)

    async def _publish(self, run: Run) -> None:
        """Prefill side of the concurrent protocols, and an encoder's outputs."""
        p = run.params
        prompt = list(p.prompt_ids)
        if run.role == "encode":
            await self._encode(run)
        elif run.role == "prefill" and peer_block(p.kv_transfer_params, REMOTE_DECODER):
            stored = peer_block(p.kv_transfer_params, REMOTE_DECODER) or {}
            engine_id = self.config.rank_engine_id(run.dp_rank)
            self.p2p_store.publish(str(stored.get("kv_request_id")), prompt, engine_id)
        elif run.role == "prefill" and p.bootstrap_room is not None:
            try:
                await self.rooms.wait_for_decode(p.bootstrap_room)
            except BootstrapTimeout as exc:
                self.stats.bootstrap_timeouts += 1
                raise KvLoadFailed(str(exc)) from None
            self.rooms.hand_over(p.bootstrap_room, prompt)
            self.stats.kv_pulls_served += 1

    def hand_over(self, run: Run, core_end: str) -> None:
        """A prefill finished ("length", "stopped" or "aborted" in the core): offer its KV.

        Mooncake publishes only a prefill stopped at the cap and tells a waiting decode
        at once otherwise; NIXL (0.32) keeps the blocks for a stopped one too.
        """
        if run.omit_kv_transfer_params:
            return
        if self.config.moriio_mode:
            # vLLM's MoRIIOConnector hands KV over only for a prefill capped at length.
            if core_end == "length":
                self.moriio_finished(run)
            return
        stored = peer_block(run.params.kv_transfer_params, REMOTE_DECODER)
        if stored is not None:
            # Stored once the prompt was computed (_publish); a prefill that failed
            # before that tells a waiting decode at once.
            self.p2p_store.refuse(str(stored.get("kv_request_id")))
            return
        transfer_id = (run.params.kv_transfer_params or {}).get("transfer_id")
        if transfer_id:
            if core_end == "length":
                engine_id = self.config.rank_engine_id(run.dp_rank)
                self.transfers.publish(str(transfer_id), list(run.params.prompt_ids), engine_id)
            else:
                self.transfers.refuse(str(transfer_id))
        elif core_end == "length" or (core_end == "stopped" and self.config.kv_params_on_stop):
            self.grant_nixl_lease(run)

    # -- NIXL ----------------------------------------------------------------------
    def grant_nixl_lease(self, run: Run) -> None:
        ktp = run.params.kv_transfer_params or {}
        # Only a NIXL prefill (do_remote_decode) is pulled from: an SGLang-mode prefill
        # hands its KV over in the bootstrap room instead, and a lease nobody claims
        # would pin its blocks until it expires.
        if not ktp.get("do_remote_decode"):
            return
        # vLLM suffixes the id so that a retried request id never meets a stale lease.
        lease_id = f"{run.request_id}-{secrets.token_hex(4)}"
        self.leases.grant(lease_id, list(run.block_ids), list(run.params.prompt_ids))
        run._leased = True
        run.kv_transfer_params = {
            "do_remote_prefill": True,
            "do_remote_decode": False,
            # One list per KV-cache group, as newer vLLM sends them.
            "remote_block_ids": [list(run.block_ids)],
            "remote_engine_id": self.config.engine_id,
            "remote_request_id": lease_id,
            "remote_host": self.config.remote_host,
            "remote_port": self.side_channel_port,
            "tp_size": 1,
            "dcp_size": 1,
            "pp_size": 1,
            "remote_num_tokens": len(run.params.prompt_ids),
            "remote_blocks_expiry_time": None,
            "transfer_mode": "pull",
            "remote_prefill_cached_tokens": run.cached_tokens,
        }

    def serve_pull(self, pull: PullRequest) -> list[int]:
        own = self.config.engine_id
        if self.config.moriio_mode and pull.remote_engine_id == self.moriio_engine_id:
            own = self.moriio_engine_id
        try:
            lease = self.leases.claim(own, pull)
        except PullRejected as exc:
            self.stats.kv_pulls_rejected += 1
            if exc.reason == "lease expired":
                self.stats.leases_expired += 1
            raise
        self.stats.kv_pulls_served += 1
        return lease.token_ids

    # -- MoRI-IO -------------------------------------------------------------------
    @property
    def moriio_engine_id(self) -> str:
        """vLLM's MoRI-IO engine id: "<host>:<handshake port>"."""
        return f"{self.config.remote_host}:{self.side_channel_port}"

    def moriio_finished(self, run: Run) -> None:
        """Producer side: what vLLM's MoRIIOConnector returns for a finished prefill."""
        ktp = run.params.kv_transfer_params or {}
        if not ktp.get("do_remote_decode"):
            return
        transfer_id = ktp.get("transfer_id")
        prompt = list(run.params.prompt_ids)
        if self.config.moriio_mode == "read":
            suffix = secrets.token_hex(4)
            lease_id = str(transfer_id) if transfer_id else f"{run.request_id}-{suffix}"
            self.leases.grant(lease_id, list(run.block_ids), prompt)
            run._leased = True
        else:
            dest = _url(str(ktp.get("remote_host")), ktp.get("remote_handshake_port"), "")
            self._write_if_due(self.writes.ready(str(transfer_id), prompt, dest), str(transfer_id))
        run.kv_transfer_params = {
            "do_remote_prefill": True,
            "do_remote_decode": False,
            "remote_block_ids": list(run.block_ids),
            "remote_engine_id": self.moriio_engine_id,
            "remote_host": self.config.remote_host,
            "remote_handshake_port": self.side_channel_port,
            "remote_notify_port": self.side_channel_port,
            "remote_dp_size": self.config.data_parallel_size,
            "tp_size": 1,
            "transfer_id": transfer_id,
            # The rank this prefill ran on (router-authoritative DP-rank routing).
            "remote_dp_rank": run.dp_rank,
            "remote_dp_rank_override": True,
        }

    def moriio_notify(self, transfer_id: str) -> None:
        """Producer side: a decode engine's blocks for ``transfer_id`` are ready."""
        self.stats.moriio_notifies += 1
        self._write_if_due(self.writes.notified(transfer_id), transfer_id)

    def moriio_received(self, transfer_id: str, token_ids: list[int]) -> bool:
        """Consumer side: a prefill engine wrote KV here."""
        ok = self.writes.received(transfer_id, token_ids)
        if ok:
            self.stats.moriio_writes_received += 1
        return ok

    def _write_if_due(self, due: Outgoing | None, transfer_id: str) -> None:
        if due is None:
            return
        task = asyncio.get_running_loop().create_task(self._moriio_write(due, transfer_id))
        self._writing.add(task)
        task.add_done_callback(self._writing.discard)

    async def _moriio_write(self, due: Outgoing, transfer_id: str) -> None:
        body = {"transfer_id": transfer_id, "token_ids": due.token_ids}
        answer = await self._post(f"{due.dest}{MORIIO_WRITE_PATH}", body)
        if answer is None:
            self.stats.moriio_writes_failed += 1
            log.warning("MoRI-IO write of %s to %s failed", transfer_id, due.dest)
        else:
            self.stats.moriio_writes_sent += 1

    async def _moriio_load(self, run: Run) -> list[int] | None:
        """Consumer side: the prompt's KV from the prefill engine, or None."""
        ktp = run.params.kv_transfer_params or {}
        host = str(ktp["remote_host"])
        if self.config.moriio_mode == "read":
            body = {
                "remote_engine_id": ktp["remote_engine_id"],
                "remote_block_ids": ktp["remote_block_ids"],
                "remote_request_id": ktp.get("transfer_id"),
            }
            payload = await self._post(_url(host, ktp["remote_handshake_port"], PULL_PATH), body)
            tokens = None if payload is None else payload.get("token_ids")
            return tokens if isinstance(tokens, list) else None
        transfer_id = str(ktp["transfer_id"])
        self.writes.expect(transfer_id)
        notify = {"transfer_id": transfer_id, "decode_rank": run.dp_rank}
        url = _url(host, ktp["remote_notify_port"], MORIIO_NOTIFY_PATH)
        if await self._post(url, notify) is None:
            self.writes.forget(transfer_id)
            return None
        return await self.writes.wait(transfer_id)

    # -- the decode side of every protocol -------------------------------------------
    async def _load_remote(self, run: Run) -> bool:
        p = run.params
        ktp = p.kv_transfer_params or {}
        if self.config.moriio_mode and p.bootstrap_room is None:
            tokens = await self._moriio_load(run)
            ok = tokens == p.prompt_ids
            if ok:
                self.stats.kv_pulls_ok += 1
            else:
                self.stats.kv_pulls_failed += 1
                self.nixl_failed_transfers += 1
            return ok
        prefiller = peer_block(ktp, REMOTE_PREFILLER)
        if p.bootstrap_room is not None:
            url = _url(str(p.bootstrap_host), p.bootstrap_port, SGLANG_JOIN_PATH)
            body: dict[str, Any] = {"room": p.bootstrap_room}
        elif prefiller is not None:
            url = _url(str(prefiller["remote_host"]), prefiller["remote_port"], P2P_TAKE_PATH)
            body = {"kv_request_id": prefiller["kv_request_id"]}
        elif ktp.get("transfer_id"):
            url = f"{str(ktp.get('remote_bootstrap_addr', '')).rstrip('/')}{MOONCAKE_PULL_PATH}"
            body = {"transfer_id": ktp["transfer_id"], "engine_id": ktp.get("remote_engine_id")}
        else:
            url = _url(str(ktp["remote_host"]), ktp["remote_port"], PULL_PATH)
            body = {
                "remote_engine_id": ktp["remote_engine_id"],
                "remote_block_ids": ktp["remote_block_ids"],
                "remote_request_id": ktp.get("remote_request_id"),
            }
        payload = await self._post(url, body)
        ok = payload is not None and payload.get("token_ids") == p.prompt_ids
        if ok:
            self.stats.kv_pulls_ok += 1
        else:
            self.stats.kv_pulls_failed += 1
            self.nixl_failed_transfers += 1
        return ok

    async def _post(self, url: str, body: dict[str, Any]) -> dict[str, Any] | None:
        assert self._session is not None, "engine not started"
        try:
            async with self._session.post(url, json=body) as resp:
                payload = await resp.json(content_type=None)
        except (TimeoutError, aiohttp.ClientError, ValueError):
            return None
        return payload if resp.status == 200 and isinstance(payload, dict) else None

    # -- the OffloadingConnector P2P tier ----------------------------------------------
    async def _pull_from_source(self, run: Run, hashes: list[bytes]) -> int:
        """``remote_kv_source``: the prompt tokens pulled from the peer (the leading blocks
        it holds beyond ours); 0 when there is nothing to pull or the pull failed."""
        source = peer_block(run.params.kv_transfer_params, REMOTE_KV_SOURCE)
        if source is None:
            return 0
        if missing_peer_fields(source):
            self.stats.kv_params_invalid += 1
            return 0
        have = self.cache.cached_prefix_blocks(hashes)
        if have >= len(hashes):
            return 0
        url = _url(str(source["remote_host"]), source["remote_port"], P2P_LOOKUP_PATH)
        payload = await self._post(url, {"block_hashes": [h.hex() for h in hashes]})
        blocks = payload.get("blocks") if payload is not None else None
        if not isinstance(blocks, int) or not 0 <= blocks <= len(hashes):
            self.stats.p2p_source_pulls_failed += 1
            return 0
        self.stats.p2p_source_pulls += 1
        size = self.config.block_size
        self.external_queries_tokens += (len(hashes) - have) * size
        if blocks <= have:
            return 0
        self.stats.p2p_blocks_pulled += blocks - have
        self.external_hits_tokens += (blocks - have) * size
        return (blocks - have) * size

    def serve_lookup(self, hex_hashes: list[str]) -> int:
        """How many leading blocks of these hashes this engine's tier can serve."""
        hashes = [bytes.fromhex(h) for h in hex_hashes]
        blocks = self.cache.cached_prefix_blocks(hashes)
        self.stats.p2p_blocks_served += blocks
        return blocks

    async def p2p_take(self, kv_request_id: str) -> list[int] | None:
        """The KV a prefill stored under ``kv_request_id`` (waits for it), taken once."""
        taken = await self.p2p_store.take(kv_request_id)
        if taken is None:
            self.stats.kv_pulls_rejected += 1
            return None
        self.stats.kv_pulls_served += 1
        return taken[0]

    # -- bootstrap server handlers (prefill engine) --------------------------------------
    async def sglang_join(self, room: int) -> list[int]:
        return await self.rooms.join(room)

    def rank_engine_ids(self) -> dict[int, str]:
        return {r: self.config.rank_engine_id(r) for r in range(self.config.data_parallel_size)}

    async def mooncake_take(self, transfer_id: str, engine_id: str | None) -> list[int] | None:
        """The published KV, if ``engine_id`` names the rank that published it."""
        if engine_id is not None and engine_id not in self.rank_engine_ids().values():
            self.stats.kv_pulls_rejected += 1
            return None
        taken = await self.transfers.take(transfer_id)
        if taken is None or (engine_id is not None and taken[1] != engine_id):
            # A decode sent to another rank's engine finds nothing there.
            self.stats.kv_pulls_rejected += 1
            return None
        self.stats.kv_pulls_served += 1
        return taken[0]

    # -- encoder outputs ---------------------------------------------------------------
    async def _encode(self, run: Run) -> None:
        [source] = run.params.mm_items
        key = mm_hash(source)
        size = 4096 + len(source) * 8
        self.encoded[key] = size
        self.stats.encodes += 1
        if self.config.ec_connector in _STORAGE_EC and self.storage is not None:
            await self.storage.store_item(key)
        elif self.config.ec_connector == "ec-nixl":
            metadata = base64.b64encode(f"{self.config.engine_id}:{key}".encode()).decode()
            run.ec_transfer_params = {
                key: {
                    "peer_host": self.config.remote_host,
                    "peer_port": self.side_channel_port,
                    "size_bytes": size,
                    "nixl_agent_metadata_b64": metadata,
                }
            }

    def serve_encoded(self, key: str) -> int | None:
        return self.encoded.get(key)

    async def _check_encoder_outputs(self, run: Run) -> None:
        """A consumer of encoder outputs needs every item's output, or fails."""
        connector = self.config.ec_connector
        if run.role == "encode" or not connector or not run.params.mm_items:
            return
        given = run.params.ec_transfer_params or {}
        for source in run.params.mm_items:
            key = mm_hash(source)
            if connector in _STORAGE_EC:
                ok = self.storage is not None and await self.storage.has_item(key)
            else:
                desc = given.get(key)
                ok = isinstance(desc, dict) and await self._pull_encoded(key, desc)
            if not ok:
                self.stats.ec_loads_failed += 1
                raise KvLoadFailed(f"encoder output missing for multimodal item {key}")
            self.stats.ec_loads_ok += 1

    async def _pull_encoded(self, key: str, desc: dict[str, Any]) -> bool:
        url = _url(str(desc.get("peer_host")), desc.get("peer_port"), EC_PULL_PATH)
        payload = await self._post(url, {"mm_hash": key})
        return payload is not None and payload.get("size_bytes") == desc.get("size_bytes")


def _missing_remote_fields(ktp: dict[str, Any], moriio_mode: str = "") -> list[str]:
    """The fields a decode needs to pull (NIXL protocol v2, Mooncake, P2P, MoRI-IO) that
    are absent (for MoRI-IO: those vLLM cannot do without when the request id carries no
    peer address, as it does not from a router)."""
    prefiller = peer_block(ktp, REMOTE_PREFILLER)
    if REMOTE_PREFILLER in ktp:
        missing = missing_peer_fields(prefiller or {})
        return [f"{REMOTE_PREFILLER}.{name}" for name in missing]
    needed = (
        ("remote_engine_id", "remote_block_ids", "remote_host", "remote_handshake_port")
        if moriio_mode == "read"
        else ("transfer_id", "remote_host", "remote_notify_port")
        if moriio_mode == "write"
        else ("transfer_id", "remote_bootstrap_addr", "remote_engine_id")
        if ktp.get("transfer_id")
        else (
            "remote_engine_id",
            "remote_request_id",
            "remote_block_ids",
            "remote_host",
            "remote_port",
        )
    )
    return [key for key in needed if ktp.get(key) in (None, "", [])]


def _url(host: str, port: object, path: str) -> str:
    bracketed = f"[{host}]" if ":" in host and not host.startswith("[") else host
    return f"http://{bracketed}:{port}{path}"
