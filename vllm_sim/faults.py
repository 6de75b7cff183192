"""Faults armed by flag (``--fault``) or at run time (``POST /sim/faults``).

A fault matches requests by path and role and fires ``count`` times (-1: until cleared).

The side channels (the KV pull, ``POST /sim/nixl/pull`` on the prefill engine, and
``GET /metrics``) only fire faults whose ``paths`` name them, so that a fault meant for
generation requests never breaks a pull or a scrape by accident; there ``roles``
matches the serving engine's ``--role``. On a side channel, ``status``, ``delay``,
``hang``, ``disconnect`` and ``malformed_json`` act as on a generation request;
``truncate`` and ``omit_kv_transfer_params`` do nothing.
"""

from __future__ import annotations

from enum import Enum

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["Fault", "FaultKind", "FaultTable"]


class FaultKind(str, Enum):
    STATUS = "status"  # answer `status` with a JSON error body
    DELAY = "delay"  # wait `delay_ms`, then answer normally
    HANG = "hang"  # never answer; ends only when the client goes away
    DISCONNECT = "disconnect"  # close the connection after `after_chunks` stream chunks
    # 200, then the connection drops mid-body: a JSON answer after half its bytes (its
    # Content-Length promised all of them), a stream halfway through chunk `after_chunks`.
    TRUNCATE = "truncate"
    MALFORMED_JSON = "malformed_json"  # 200 with a body that is not JSON
    OMIT_KV_TRANSFER_PARAMS = "omit_kv_transfer_params"  # prefill answers without params


class Fault(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: FaultKind
    count: int = Field(default=1, ge=-1)
    status: int = Field(default=503, ge=100, le=599)
    delay_ms: float = Field(default=0.0, ge=0)
    after_chunks: int = Field(default=0, ge=0)
    paths: list[str] | None = None
    roles: list[str] | None = None

    def matches(self, path: str, role: str) -> bool:
        if self.count == 0:
            return False
        if self.paths is not None and path not in self.paths:
            return False
        return self.roles is None or role in self.roles


class FaultTable:
    def __init__(self) -> None:
        self._faults: list[Fault] = []

    def add(self, fault: Fault) -> None:
        self._faults.append(fault)

    def clear(self) -> None:
        self._faults.clear()

    def take(self, path: str, role: str, *, named_only: bool = False) -> Fault | None:
        """The first armed fault for this request, consuming one of its shots.

        ``named_only``: only a fault whose ``paths`` lists ``path`` (for ``/metrics``, so
        scrapes never use up faults meant for generation requests).
        """
        for fault in self._faults:
            if named_only and not fault.paths:
                continue
            if fault.matches(path, role):
                if fault.count > 0:
                    fault.count -= 1
                self._faults = [f for f in self._faults if f.count != 0]
                return fault
        return None
