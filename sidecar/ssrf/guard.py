"""The per-request check: parse the routing headers, run the rules, log, count, raise.

Until the source knows its members (the first pool listing has not arrived, e.g. the
API server is unreachable or RBAC is missing) every checked request is answered 503
``pool-not-synced``: the answer is retryable and says what is wrong, where a 403 would
blame the request. ``x-kv-cache-source-host-port`` is checked only where it is used
(the engines have the P2P tier): the app calls :meth:`TargetGuard.check` with stage
``kv-source``; elsewhere it is stripped like every routing header.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Protocol

from prometheus_client import Counter

from sidecar.errors import TargetCheckUnavailable, TargetForbidden
from sidecar.metrics import Metrics
from sidecar.routing import (
    DATA_PARALLEL_HOST_PORT,
    ENCODER_HOSTS_PORTS,
    PREFILLER_HOST_PORT,
    HostPort,
    parse_host_ports,
)
from sidecar.ssrf.rules import Members, Stage, decide

__all__ = ["MemberSource", "TargetGuard"]

log = logging.getLogger("pd_sidecar.ssrf")

_HEADER_STAGES: tuple[tuple[str, Stage], ...] = (
    (PREFILLER_HOST_PORT, "prefill"),
    (ENCODER_HOSTS_PORTS, "encode"),
    # The decode rank named by the EPP: no role rule, the pool's target ports apply.
    (DATA_PARALLEL_HOST_PORT, "data-parallel"),
)


class MemberSource(Protocol):
    description: str

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def members(self) -> Members | None:
        """The current members, or None while they are not known yet."""


class TargetGuard:
    def __init__(self, source: MemberSource, metrics: Metrics) -> None:
        self.source = source
        self._metrics = metrics
        # Label children by (stage, decision, rule): a bounded set, looked up per target.
        self._counters: dict[tuple[str, str, str], Counter] = {}

    async def start(self) -> None:
        await self.source.start()

    async def stop(self) -> None:
        await self.source.stop()

    def check_headers(self, headers: Mapping[str, str], ids: Mapping[str, str | None]) -> None:
        """Check every target of the routing headers present; raise on the first refusal.

        ``ids`` identify the request in log lines (our request id, the client's)."""
        for header, stage in _HEADER_STAGES:
            value = headers.get(header)
            if value is not None:
                self.check(parse_host_ports(value, header), stage, ids)

    def check(self, targets: list[HostPort], stage: Stage, ids: Mapping[str, str | None]) -> None:
        members = self.source.members()
        if members is None:
            self._count(stage, "deny", "pool-not-synced")
            message = f"{self.source.description} is not known yet; {stage} target refused"
            log.warning(
                {
                    "event": "ssrf_denied",
                    **ids,
                    "stage": stage,
                    "rule": "pool-not-synced",
                    "targets": [t.authority for t in targets],
                }
            )
            raise TargetCheckUnavailable(message, "pool-not-synced")
        for target in targets:
            decision = decide(members, target, stage, self.source.description)
            self._count(stage, decision.label, decision.rule)
            if decision.allowed and not log.isEnabledFor(logging.DEBUG):
                continue
            record = {
                "event": "ssrf_allowed" if decision.allowed else "ssrf_denied",
                **ids,
                "stage": stage,
                "target": target.authority,
                "rule": decision.rule,
                "reason": decision.reason,
            }
            if decision.allowed:
                log.debug(record)
                continue
            log.warning(record)
            raise TargetForbidden(
                f"{stage} target refused: {decision.reason}", decision.rule, target.authority
            )

    def _count(self, stage: str, decision: str, rule: str) -> None:
        key = (stage, decision, rule)
        counter = self._counters.get(key)
        if counter is None:
            counter = self._metrics.ssrf_decisions.labels(stage=stage, decision=decision, rule=rule)
            self._counters[key] = counter
        counter.inc()
