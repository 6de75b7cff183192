"""In-flight accounting of the requests the EPP let through, per endpoint.

The concurrency detector reads it; the admission path writes it: ``reserve`` when a
request leaves admission (it is not on an endpoint yet), ``place`` once the scheduler
picked its endpoints, ``release_prefill``/``release`` as the request's stages end.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["EndpointLoad", "InflightLedger"]


@dataclass(slots=True)
class EndpointLoad:
    requests: int = 0
    tokens: int = 0


@dataclass
class InflightLedger:
    loads: dict[str, EndpointLoad] = field(default_factory=dict)
    # Admitted but not yet scheduled: counted against the pool, not one endpoint.
    pending_requests: int = 0
    pending_tokens: int = 0

    def load(self, key: str) -> EndpointLoad:
        return self.loads.get(key) or EndpointLoad()

    def reserve(self, tokens: int) -> None:
        self.pending_requests += 1
        self.pending_tokens += tokens

    def unreserve(self, tokens: int) -> None:
        self.pending_requests = max(0, self.pending_requests - 1)
        self.pending_tokens = max(0, self.pending_tokens - tokens)

    def add(self, key: str, tokens: int) -> None:
        load = self.loads.setdefault(key, EndpointLoad())
        load.requests += 1
        load.tokens += tokens

    def remove(self, key: str, tokens: int) -> None:
        load = self.loads.get(key)
        if load is None:
            return
        load.requests = max(0, load.requests - 1)
        load.tokens = max(0, load.tokens - tokens)
        if load.requests == 0 and load.tokens == 0:
            del self.loads[key]

    @property
    def total_requests(self) -> int:
        return self.pending_requests + sum(v.requests for v in self.loads.values())
