"""Per-request record: identity, mode, targets and stage timings (the access log line)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

from sidecar.headers import TraceContext

__all__ = ["Exchange", "client_request_id", "new_request_id"]

_MAX_CLIENT_ID = 256


_ID_BYTES = 16
_POOL_IDS = 256  # ids drawn from the system's random source at once
_pool: list[bytes] = []


def new_request_id() -> str:
    """The id every leg of one client request carries: fresh, never the client's own
    (two clients may send the same id, and an engine keys its state by it), and
    unpredictable (it is echoed to clients): 128 bits from the system's random source,
    drawn for many ids at once."""
    if not _pool:
        block = os.urandom(_ID_BYTES * _POOL_IDS)
        _pool.extend(block[i : i + _ID_BYTES] for i in range(0, len(block), _ID_BYTES))
    return _pool.pop().hex()


# A forked process must not hand out the ids its parent still holds.
os.register_at_fork(after_in_child=_pool.clear)


def client_request_id(value: str | None) -> str | None:
    """The client's ``x-request-id`` when sane (logged and echoed back), else None."""
    if value and len(value) <= _MAX_CLIENT_ID and value.isprintable():
        return value
    return None


@dataclass(slots=True)
class Exchange:
    request_id: str
    method: str
    path: str
    trace: TraceContext
    client_request_id: str | None = None
    start: float = field(default_factory=time.perf_counter)
    mode: str = "passthrough"  # pd | epd | local | fallback | passthrough | health
    status: int = 0
    prefiller: str | None = None
    prefill_attempts: int = 0
    prefill_s: float | None = None
    decode_wait_s: float | None = None  # decode leg sent -> its first byte
    ttft_s: float | None = None  # request received -> first byte to the client
    total_s: float | None = None
    fallback_reason: str | None = None
    prefill_finish: str | None = None  # "stopped": the prefill's generation was complete
    decode_first: str | None = None  # a decode-first attempt was "accepted" or "declined"
    encode_items: int = 0
    encode_s: float | None = None
    cached_tokens: int | None = None
    error: str | None = None
    response_started: bool = False
    # Set when a concurrent leg failed and the stream being relayed must end with it.
    abort: BaseException | None = None

    def log_ids(self) -> dict[str, str | None]:
        """How log lines name this request: our id (the engines') and the client's."""
        return {"request_id": self.request_id, "client_request_id": self.client_request_id}

    @property
    def reply_id(self) -> str:
        """The ``x-request-id`` the client gets back: its own, or ours when it sent none."""
        return self.client_request_id or self.request_id

    def first_byte(self) -> None:
        if self.ttft_s is None:
            self.ttft_s = time.perf_counter() - self.start
        self.response_started = True

    def finish(self) -> None:
        self.total_s = time.perf_counter() - self.start

    @property
    def overhead_s(self) -> float | None:
        """Time to first byte minus time spent waiting on upstreams."""
        if self.ttft_s is None:
            return None
        waited = (self.prefill_s or 0.0) + (self.decode_wait_s or 0.0) + (self.encode_s or 0.0)
        return max(self.ttft_s - waited, 0.0)

    def record(self) -> dict[str, Any]:
        def ms(value: float | None) -> float | None:
            return None if value is None else round(value * 1000, 3)

        return {
            "event": "request",
            **self.log_ids(),
            "trace_id": self.trace.trace_id,
            "method": self.method,
            "path": self.path,
            "mode": self.mode,
            "status": self.status,
            "prefiller": self.prefiller,
            "prefill_attempts": self.prefill_attempts,
            "prefill_ms": ms(self.prefill_s),
            "decode_first_byte_ms": ms(self.decode_wait_s),
            "ttft_ms": ms(self.ttft_s),
            "total_ms": ms(self.total_s),
            "overhead_ms": ms(self.overhead_s),
            "fallback_reason": self.fallback_reason,
            "prefill_finish": self.prefill_finish,
            "decode_first": self.decode_first,
            "encode_items": self.encode_items,
            "encode_ms": ms(self.encode_s),
            "cached_tokens": self.cached_tokens,
            "error": self.error,
        }
