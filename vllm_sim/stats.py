"""Counters that tests read to prove what an engine did (``GET /sim/stats``)."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

__all__ = ["RecordedRequest", "SimStats"]

_RECORDED_MAX = 256


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: Any
    role: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "path": self.path,
            "headers": self.headers,
            "body": self.body,
            "role": self.role,
        }


@dataclass
class SimStats:
    requests_total: int = 0
    requests_by_role: dict[str, int] = field(
        default_factory=lambda: {"prefill": 0, "decode": 0, "aggregated": 0, "encode": 0}
    )
    kv_pulls_ok: int = 0
    kv_pulls_failed: int = 0
    kv_pulls_served: int = 0
    kv_pulls_rejected: int = 0
    kv_params_invalid: int = 0  # decode kv_transfer_params missing fields: computed here
    recomputes: int = 0
    leases_expired: int = 0
    aborts: int = 0
    errors: int = 0
    bootstrap_timeouts: int = 0
    bootstrap_queries: int = 0
    storage_hit_tokens: int = 0
    cache_threshold_rejections: int = 0
    encodes: int = 0
    ec_loads_ok: int = 0
    ec_loads_failed: int = 0
    # MoRI-IO write mode: notifies served (prefill), writes sent / failed (prefill) and
    # writes taken in (decode).
    moriio_notifies: int = 0
    moriio_writes_sent: int = 0
    moriio_writes_failed: int = 0
    moriio_writes_received: int = 0
    # OffloadingConnector P2P tier: remote_kv_source pulls made, failed, blocks moved.
    p2p_source_pulls: int = 0
    p2p_source_pulls_failed: int = 0
    p2p_blocks_pulled: int = 0
    p2p_blocks_served: int = 0
    requests_by_dp_rank: dict[int, int] = field(default_factory=dict)
    recorded: deque[RecordedRequest] = field(default_factory=lambda: deque(maxlen=_RECORDED_MAX))

    def record(self, request: RecordedRequest) -> None:
        self.requests_total += 1
        self.requests_by_role[request.role] = self.requests_by_role.get(request.role, 0) + 1
        self.recorded.append(request)

    def as_dict(self, *, engine_id: str, leases_active: int) -> dict[str, Any]:
        return {
            "engine_id": engine_id,
            "requests_total": self.requests_total,
            "requests_by_role": dict(self.requests_by_role),
            "kv_pulls_ok": self.kv_pulls_ok,
            "kv_pulls_failed": self.kv_pulls_failed,
            "kv_pulls_served": self.kv_pulls_served,
            "kv_pulls_rejected": self.kv_pulls_rejected,
            "kv_params_invalid": self.kv_params_invalid,
            "recomputes": self.recomputes,
            "leases_active": leases_active,
            "leases_expired": self.leases_expired,
            "aborts": self.aborts,
            "errors": self.errors,
            "bootstrap_timeouts": self.bootstrap_timeouts,
            "bootstrap_queries": self.bootstrap_queries,
            "storage_hit_tokens": self.storage_hit_tokens,
            "cache_threshold_rejections": self.cache_threshold_rejections,
            "encodes": self.encodes,
            "ec_loads_ok": self.ec_loads_ok,
            "ec_loads_failed": self.ec_loads_failed,
            "moriio_notifies": self.moriio_notifies,
            "moriio_writes_sent": self.moriio_writes_sent,
            "moriio_writes_failed": self.moriio_writes_failed,
            "moriio_writes_received": self.moriio_writes_received,
            "p2p_source_pulls": self.p2p_source_pulls,
            "p2p_source_pulls_failed": self.p2p_source_pulls_failed,
            "p2p_blocks_pulled": self.p2p_blocks_pulled,
            "p2p_blocks_served": self.p2p_blocks_served,
            "requests_by_dp_rank": {str(k): v for k, v in sorted(self.requests_by_dp_rank.items())},
            "recorded": [r.as_dict() for r in self.recorded],
        }
