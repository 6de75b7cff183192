"""vllm-sim: a simulated vLLM engine, faithful to the protocols disagg speaks.

OpenAI and Anthropic API shapes with SSE streaming and usage accounting, a paged prefix
cache, a latency model with a bounded batch, vLLM's metrics, the NIXL KV-transfer
handshake over a stand-in side channel, fault injection, and counters that prove what
happened.
"""

from __future__ import annotations

from .config import SimConfig
from .engine import SimEngine
from .faults import Fault, FaultKind
from .server import SimServer, create_app

__all__ = ["Fault", "FaultKind", "SimConfig", "SimEngine", "SimServer", "create_app"]
