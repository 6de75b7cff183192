"""The orchestrator's settings for one sidecar: limits, retries, timeouts, fallback."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["MAX_PREFILL_ANSWER", "Policy"]

# The largest answer read whole from a prefill leg (or a declined decode-first attempt).
MAX_PREFILL_ANSWER = 16 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Policy:
    max_body_bytes: int = 32 * 1024 * 1024
    request_body_timeout: float = 60.0
    prefill_max_retries: int = 3
    prefill_retry_backoff: float = 0.1
    prefiller_sampling: bool = False
    prefill_fallback: Literal["error", "local"] = "error"
    prefill_timeout: float = 300.0
    decode_first_byte_timeout: float = 600.0
    stream_idle_timeout: float = 120.0
    # Trusted clients only: let bodies carry kv_transfer_params & co (client_fields).
    allow_client_transfer_params: bool = False
    decode_chunk_size: int = 0  # > 0: chat decodes in chunks of this many tokens
