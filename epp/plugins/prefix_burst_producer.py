"""burst-prefix-cache-producer: place bursts of prompt-sharing requests together, so a
shared prompt is prefilled once instead of on every replica of a cold pool.

Requests arriving within ``windowDurationMs`` form one batch (each waits for the window
to close). Their token blocks (``blockSizeTokens``, 64; at most
``maxPrefixTokensToMatch`` / block tokens, or 2048 blocks when that is 0) group them:

- requests with an identical prompt are one unit when there are at least two of them;
  a lone request is a unit only when ``minColocateBlocks`` > 0 and it shares at least
  that many leading blocks with another request of the batch;
- units are placed largest prefix first (identical groups before lone requests), each
  filling one replica up to ``maxPerReplica`` members (-1: unlimited) before spilling
  to the next least-loaded one; the first replica of a unit prefers one already
  holding a unit that shares ``minColocateBlocks`` leading blocks, while that replica
  is under its fair share of the batch;
- load is counted in requests, or with ``balanceBy: tokens`` in prefix blocks (a
  unit's prefix charged once per replica, less the leading blocks already placed
  there); ties go to the replica running fewer requests, then to the lower address.

The match it leaves (under its own name, for a ``prefix-cache-scorer`` whose
``prefixMatchInfoProducerName`` names it) is a full match on the assigned replica and
none elsewhere; a request that shares nothing gets no affinity. A batch holds at most
``maxBatchSize`` requests (-1: unlimited); a request beyond that gets no affinity.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from pydantic import Field, model_validator

from epp.datastore import Endpoint
from epp.plugins.base import DataProducer, PluginParams
from epp.plugins.prefix_index import token_block_hashes
from epp.plugins.prefix_producer import PrefixMatch, match_key
from epp.plugins.registry import register
from epp.plugins.token_producer import tokenized_prompt
from epp.scheduling.cycle import CycleState

__all__ = ["BurstEntry", "BurstPrefixCacheProducer", "assign"]

log = logging.getLogger(__name__)

UNLIMITED = -1
_DEFAULT_MAX_BLOCKS = 2048
_SEAL_MARGIN_S = 0.3


@dataclass(eq=False)
class BurstEntry:
    hashes: list[bytes]
    endpoints: Sequence[Endpoint]
    assigned: Endpoint | None = None


@dataclass
class _Batch:
    entries: list[BurstEntry] = field(default_factory=list)
    sealed: asyncio.Event = field(default_factory=asyncio.Event)


def _running(ep: Endpoint) -> float:
    return ep.metrics.running


def _less(a: Endpoint, b: Endpoint, load: dict[str, int]) -> bool:
    la, lb = load.get(a.key, 0), load.get(b.key, 0)
    if la != lb:
        return la < lb
    ra, rb = _running(a), _running(b)
    if ra != rb:
        return ra < rb
    return a.key < b.key


def _least_loaded(
    replicas: Sequence[Endpoint], per: dict[str, int], k: int, load: dict[str, int]
) -> Endpoint:
    best: Endpoint | None = None
    for r in replicas:
        if k != UNLIMITED and per.get(r.key, 0) >= k:
            continue
        if best is None or _less(r, best, load):
            best = r
    if best is not None:
        return best
    for r in replicas:  # every replica full: overflow onto the least loaded
        if best is None or _less(r, best, load):
            best = r
    assert best is not None
    return best


def _longest(held: dict[bytes, set[str]], hashes: Sequence[bytes]) -> dict[str, int]:
    out: dict[str, int] = {}
    for h in hashes:
        holders = held.get(h)
        if not holders:
            break
        for key in holders:
            out[key] = out.get(key, 0) + 1
    return out


def assign(
    entries: Sequence[BurstEntry],
    max_per_replica: int = UNLIMITED,
    min_colocate_blocks: int = 0,
    by_tokens: bool = False,
) -> None:
    """Set ``assigned`` on the entries that join a placement unit (pure but for that)."""
    groups: dict[tuple[bytes, ...], list[BurstEntry]] = {}
    replicas: Sequence[Endpoint] = ()
    for e in entries:
        if not e.hashes:
            continue
        groups.setdefault(tuple(e.hashes), []).append(e)
        if not replicas:
            replicas = e.endpoints
    if not replicas:
        return
    shared: set[tuple[bytes, ...]] = set()
    if min_colocate_blocks > 0:
        count: dict[tuple[bytes, ...], int] = {}
        for key, members in groups.items():
            if len(key) >= min_colocate_blocks:
                sig = key[:min_colocate_blocks]
                count[sig] = count.get(sig, 0) + len(members)
        shared = {
            key
            for key in groups
            if len(key) >= min_colocate_blocks and count[key[:min_colocate_blocks]] >= 2
        }
    group_units = [k for k, m in groups.items() if len(m) >= 2]
    single_units = [k for k, m in groups.items() if len(m) == 1 and k in shared]
    group_units.sort(key=len, reverse=True)
    single_units.sort(key=len, reverse=True)
    units = group_units + single_units
    if not units:
        return
    total = sum(len(k) if by_tokens else len(groups[k]) for k in units)
    fair = -(-total // len(replicas))
    held: dict[bytes, set[str]] = {}
    load: dict[str, int] = {}
    for key in units:
        members = groups[key]
        prefer = min_colocate_blocks > 0
        matches = _longest(held, key) if prefer or by_tokens else {}
        per: dict[str, int] = {}
        i = 0
        while i < len(members):
            target: Endpoint | None = None
            if prefer:
                best_match = 0
                for r in replicas:
                    if max_per_replica != UNLIMITED and per.get(r.key, 0) >= max_per_replica:
                        continue
                    if load.get(r.key, 0) >= fair:
                        continue
                    m = matches.get(r.key, 0)
                    if m < min_colocate_blocks:
                        continue
                    if (
                        target is None
                        or m > best_match
                        or (m == best_match and _less(r, target, load))
                    ):
                        target, best_match = r, m
            if target is None:
                target = _least_loaded(replicas, per, max_per_replica, load)
            run = len(members) - i
            if max_per_replica != UNLIMITED:
                run = min(run, max(1, max_per_replica - per.get(target.key, 0)))
            for m_ in members[i : i + run]:
                m_.assigned = target
            first = per.get(target.key, 0) == 0
            per[target.key] = per.get(target.key, 0) + run
            if not by_tokens:
                load[target.key] = load.get(target.key, 0) + run
            elif first:
                load[target.key] = load.get(target.key, 0) + max(
                    0, len(key) - matches.get(target.key, 0)
                )
            i += run
            prefer = False  # only the unit's first replica gets the prefix preference
        for m_ in members:
            if m_.assigned is not None:
                for h in key:
                    held.setdefault(h, set()).add(m_.assigned.key)


@register
class BurstPrefixCacheProducer(DataProducer):
    type_name = "burst-prefix-cache-producer"

    class Params(PluginParams):
        window_duration_ms: int = Field(default=100, ge=1, le=10000)
        max_per_replica: int = UNLIMITED
        block_size_tokens: int = Field(default=64, gt=0)
        max_prefix_tokens_to_match: int = Field(default=0, ge=0)
        min_colocate_blocks: int = Field(default=0, ge=0)
        max_batch_size: int = 1000
        balance_by: Literal["requests", "tokens"] = "requests"

        @model_validator(mode="after")
        def _check(self) -> BurstPrefixCacheProducer.Params:
            if self.max_per_replica != UNLIMITED and self.max_per_replica < 1:
                raise ValueError("maxPerReplica must be -1 (unlimited) or >= 1")
            if self.max_batch_size != UNLIMITED and self.max_batch_size < 1:
                raise ValueError("maxBatchSize must be -1 (unlimited) or >= 1")
            if 0 < self.max_prefix_tokens_to_match < self.block_size_tokens:
                raise ValueError(
                    f"maxPrefixTokensToMatch ({self.max_prefix_tokens_to_match}) must be 0 or "
                    f">= blockSizeTokens ({self.block_size_tokens})"
                )
            return self

    params: Params
    needs_tokens = True

    def __init__(self, params: Params | None = None, name: str | None = None) -> None:
        super().__init__(params, name)
        p = self.params
        self.key = match_key(self.name)
        self.max_blocks = (
            p.max_prefix_tokens_to_match // p.block_size_tokens
            if p.max_prefix_tokens_to_match
            else _DEFAULT_MAX_BLOCKS
        )
        self._batch: _Batch | None = None
        self.batches = 0

    def _seal(self, batch: _Batch) -> None:
        if self._batch is batch:
            self._batch = None
        p = self.params
        assign(batch.entries, p.max_per_replica, p.min_colocate_blocks, p.balance_by == "tokens")
        self.batches += 1
        batch.sealed.set()

    async def prefetch(self, cycle: CycleState, endpoints: Sequence[Endpoint]) -> None:
        p = self.params
        tokens = tokenized_prompt(cycle).token_ids
        hashes = token_block_hashes(
            tokens, p.block_size_tokens, self.max_blocks, cycle.request.model
        )
        entry = BurstEntry(hashes, endpoints)
        batch = self._batch
        if batch is None:
            batch = self._batch = _Batch()
            asyncio.get_running_loop().call_later(p.window_duration_ms / 1000, self._seal, batch)
        if p.max_batch_size != UNLIMITED and len(batch.entries) >= p.max_batch_size:
            log.warning(
                "plugin '%s': batch full (maxBatchSize %d); request %s gets no burst affinity",
                self.name,
                p.max_batch_size,
                cycle.request.request_id or "-",
            )
            return
        batch.entries.append(entry)
        try:
            await asyncio.wait_for(
                batch.sealed.wait(), p.window_duration_ms / 1000 + _SEAL_MARGIN_S
            )
        except TimeoutError:
            return
        total = len(hashes)
        matched: dict[str, int] = {}
        if (
            entry.assigned is not None
            and total
            and any(ep.key == entry.assigned.key for ep in endpoints)
        ):
            matched[entry.assigned.key] = total
        cycle.put(
            self.key,
            PrefixMatch(
                hashes=hashes,
                matched=matched,
                block_bytes=p.block_size_tokens,
                prompt_bytes=len(tokens),
                prompt_tokens=cycle.request.token_estimate,
                source="burst",
                block_tokens=p.block_size_tokens,
            ),
        )

    def prepare(self, cycle: CycleState, endpoints: Sequence[Endpoint]) -> None:
        return None
