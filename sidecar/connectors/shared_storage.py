"""Shared-storage KV (LMCache style, reference section 3): prefill, then decode.

The prefill leg computes the prompt with output capped to one token, which stores its KV
where every engine reads it; the decode leg gets the client's body unchanged and finds
the prefix there. Nothing about the transfer travels in the bodies.

Decode first: a request carrying ``cache_hit_threshold`` goes to the decode engine
before any prefill. When the decode's cached share of the prompt is below the threshold
it finishes at once with ``finish_reason: "cache_threshold"``; then the prefill runs and
the decode is asked again (without the threshold: the prefix is now stored).
"""

from __future__ import annotations

from typing import Any, ClassVar

from sidecar.connectors._bodies import one_token_prefill
from sidecar.connectors.base import Connector, LegContext, LegOrder, PrefillResult

__all__ = ["SharedStorageConnector"]

THRESHOLD_FIELD = "cache_hit_threshold"


class SharedStorageConnector(Connector):
    name: ClassVar[str] = "shared-storage"
    order: ClassVar[LegOrder] = LegOrder.SEQUENTIAL
    decline_reason: ClassVar[str | None] = "cache_threshold"

    def prefill_body(self, ctx: LegContext) -> dict[str, Any]:
        body = one_token_prefill(ctx)
        # The prefill must compute: a threshold would make it decline too.
        body.pop(THRESHOLD_FIELD, None)
        return body

    def read_prefill(self, ctx: LegContext, payload: object) -> PrefillResult:
        return PrefillResult(transfer_params=None)

    def decode_body(self, ctx: LegContext, prefill: PrefillResult | None) -> dict[str, Any]:
        body = dict(ctx.body)
        body.pop(THRESHOLD_FIELD, None)
        return body

    def decode_first_body(self, ctx: LegContext) -> dict[str, Any] | None:
        if ctx.body.get(THRESHOLD_FIELD) is None:
            return None
        # No prefill has run: whatever the encode stage produced is for this leg.
        body = dict(ctx.body)
        body.update(ctx.extra)
        return body
