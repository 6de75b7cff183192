"""Body edits several connectors share."""

from __future__ import annotations

from typing import Any

from sidecar.connectors.base import LegContext
from sidecar.p2p import REMOTE_KV_SOURCE, P2PTier

__all__ = ["add_pull_source", "one_token_prefill"]

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


def add_pull_source(params: dict[str, Any], ctx: LegContext, tier: P2PTier) -> dict[str, Any]:
    """``params`` (a prefill leg's ``kv_transfer_params``) plus ``remote_kv_source`` when
    the leg has a pull source other than the prefiller."""
    source = ctx.pull_source()
    if source is not None:
        params[REMOTE_KV_SOURCE] = tier.source_params(source)
    return params
