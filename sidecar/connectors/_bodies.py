"""Body edits several connectors share."""

from __future__ import annotations

from typing import Any

from sidecar.connectors.base import LegContext

__all__ = ["one_token_prefill"]

_MIN_FIELDS = ("min_tokens", "min_completion_tokens")


def one_token_prefill(ctx: LegContext) -> dict[str, Any]:
    """The client body (plus encode-stage fields), non-streaming, output capped to one token."""
    body = dict(ctx.body)
    body.update(ctx.extra)
    body["stream"] = False
    body.pop("stream_options", None)
    target = ctx.shape.cap_target(body)
    first, *optional = ctx.shape.cap_fields
    target[first] = 1
    for name in optional:
        if name in target:
            target[name] = 1
    # vLLM rejects min_tokens > max_tokens; with a cap of 1 there is nothing to keep.
    for holder in (body, target):
        for name in _MIN_FIELDS:
            holder.pop(name, None)
    return body
