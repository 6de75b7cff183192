"""The NIXL stand-in: KV leases on the prefill engine, pulls from the decode engine.

The prefill engine pins a finished prefill's blocks under a lease and advertises them in
``kv_transfer_params``. The decode engine reads them once over a side channel
(``POST /sim/nixl/pull`` on the owner), which checks engine id, block ids and lease, then
frees the blocks. Unclaimed leases expire and free their blocks too.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict

from .prefix_cache import PrefixCache

__all__ = ["KvLease", "LeaseTable", "PullRejected", "PullRequest"]


class PullRejected(Exception):
    """The owner refused a pull; ``reason`` says which check failed."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class PullRequest(BaseModel):
    """Body of ``POST /sim/nixl/pull``."""

    model_config = ConfigDict(extra="forbid")

    remote_engine_id: str
    remote_block_ids: list[Any]
    remote_request_id: str | None = None


@dataclass
class KvLease:
    request_id: str
    block_ids: list[int]
    token_ids: list[int]
    expires_at: float


class LeaseTable:
    def __init__(
        self,
        cache: PrefixCache,
        lease_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._cache = cache
        self._lease_seconds = lease_seconds
        self._clock = clock
        self._leases: dict[str, KvLease] = {}

    def __len__(self) -> int:
        return len(self._leases)

    def grant(self, request_id: str, block_ids: list[int], token_ids: list[int]) -> KvLease:
        lease = KvLease(request_id, block_ids, token_ids, self._clock() + self._lease_seconds)
        # A retried request id replaces its stale lease rather than leaking it.
        old = self._leases.pop(request_id, None)
        if old is not None:
            self._cache.release(old.block_ids)
        self._leases[request_id] = lease
        return lease

    def claim(self, engine_id: str, pull: PullRequest) -> KvLease:
        """Hand the blocks over exactly once, or raise ``PullRejected``."""
        if pull.remote_engine_id != engine_id:
            raise PullRejected("unknown remote_engine_id")
        lease = self._find(pull)
        if lease is None:
            raise PullRejected("no lease for these blocks (already pulled or never granted)")
        if self._clock() >= lease.expires_at:
            self._drop(lease)
            raise PullRejected("lease expired")
        if _flatten(pull.remote_block_ids) != lease.block_ids:
            raise PullRejected("remote_block_ids do not match the lease")
        self._drop(lease)
        return lease

    def expire(self) -> int:
        """Free every lease past its deadline; returns how many."""
        now = self._clock()
        expired = [lease for lease in self._leases.values() if now >= lease.expires_at]
        for lease in expired:
            self._drop(lease)
        return len(expired)

    def _find(self, pull: PullRequest) -> KvLease | None:
        if pull.remote_request_id is not None:
            return self._leases.get(pull.remote_request_id)
        wanted = _flatten(pull.remote_block_ids)
        return next((le for le in self._leases.values() if le.block_ids == wanted), None)

    def _drop(self, lease: KvLease) -> None:
        if self._leases.pop(lease.request_id, None) is not None:
            self._cache.release(lease.block_ids)


def _flatten(block_ids: list[Any]) -> list[Any]:
    """Newer vLLM sends one list per KV-cache group; the simulator has one group."""
    if block_ids and all(isinstance(group, list) for group in block_ids):
        return [b for group in block_ids for b in group]
    return list(block_ids)
