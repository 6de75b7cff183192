"""One generation request as it moves through the orchestrator's stages.

Built once the client's body is read and checked; every stage takes it whole instead of
a bundle of positional values. The access-log record and the stage timings stay on its
:class:`~sidecar.exchange.Exchange`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from multidict import CIMultiDict

from sidecar.api_shapes import ApiShape
from sidecar.exchange import Exchange
from sidecar.plan import Plan
from sidecar.routing import HostPort
from sidecar.server import Request

__all__ = ["RequestContext"]


@dataclass(slots=True)
class RequestContext:
    request: Request
    shape: ApiShape
    plan: Plan
    ex: Exchange
    decode_url: str  # this request's decode target: its rank's engine and the path
    raw: bytes  # the client's body as it came
    body: dict[str, Any]  # ... parsed: read it, never mutate it
    headers: CIMultiDict[str]  # headers of the legs whose body is rewritten
    extra: Mapping[str, Any] = field(default_factory=dict)  # the encode stage's output
    kv_source: HostPort | None = None  # a checked P2P pull source (x-kv-cache-source-...)
