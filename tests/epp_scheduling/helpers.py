"""Small builders shared by the scheduling tests."""

from __future__ import annotations

import json
import time
from typing import Any

from epp.datastore import ROLE_LABEL, Endpoint, EndpointMetrics
from epp.request import parse_request
from epp.scheduling.cycle import CycleState

STALENESS_S = 2.0


def endpoint(
    name: str,
    port: int,
    role: str | None = None,
    *,
    waiting: float = 0.0,
    running: float = 0.0,
    kv: float = 0.0,
    fresh: bool = True,
    labels: dict[str, str] | None = None,
    address: str = "10.0.0.1",
) -> Endpoint:
    all_labels = dict(labels or {})
    if role is not None:
        all_labels[ROLE_LABEL] = role
    ep = Endpoint(name=name, address=address, port=port, labels=all_labels)
    ep.metrics = EndpointMetrics(
        waiting=waiting,
        running=running,
        kv_usage=kv,
        updated_at=time.monotonic() if fresh else 0.0,
    )
    return ep


def chat_body(
    text: str, *, model: str = "m", extra_parts: list[dict[str, Any]] | None = None
) -> bytes:
    content: Any = text
    if extra_parts is not None:
        content = [{"type": "text", "text": text}, *extra_parts]
    return json.dumps({"model": model, "messages": [{"role": "user", "content": content}]}).encode()


def cycle(
    text: str = "hello",
    *,
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
    path: str = "/v1/chat/completions",
) -> CycleState:
    req = parse_request(path, headers or {}, body if body is not None else chat_body(text))
    return CycleState(req, time.monotonic(), STALENESS_S)
