"""Shared-storage KV (LMCache style, reference section 3): prefill, then decode.

The prefill leg computes the prompt with output capped to one token, which stores its KV
where every engine reads it; the decode leg gets the client's body unchanged and finds
the prefix there. Nothing about the transfer travels in the bodies.

Decode first: a request carrying ``cache_hit_threshold`` goes to the decode engine
before any prefill. When the decode's cached share of the prompt is below the threshold
it finishes at once with ``finish_reason: "cache_threshold"``; then the prefill runs and
the decode is asked again. The prefill and the decode after it always carry
``cache_hit_threshold: 0`` (not no field), so that an engine-wide default threshold
cannot make them decline too.

The prefill must have computed the prompt: an answer that stopped at the cap or
finished its generation stored the KV; any other ending (an abort, an error, a decline)
fails the request instead of sending the decode to recompute it.
"""

from __future__ import annotations

from typing import Any, ClassVar

from sidecar.api_shapes import Finish
from sidecar.connectors._bodies import one_token_prefill
from sidecar.connectors.base import Connector, LegContext, LegOrder, PrefillResult
from sidecar.errors import PrefillIncomplete

__all__ = ["SharedStorageConnector"]

THRESHOLD_FIELD = "cache_hit_threshold"


def _no_threshold(body: dict[str, Any]) -> dict[str, Any]:
    """``body`` with a threshold of 0, whatever the client sent: the leg must not decline."""
    body[THRESHOLD_FIELD] = 0
    return body


class SharedStorageConnector(Connector):
    name: ClassVar[str] = "shared-storage"
    order: ClassVar[LegOrder] = LegOrder.SEQUENTIAL
    decline_reason: ClassVar[str | None] = "cache_threshold"

    def prefill_body(self, ctx: LegContext) -> dict[str, Any]:
        # The prefill must compute: a threshold would make it decline too.
        return _no_threshold(one_token_prefill(ctx))

    def read_prefill(self, ctx: LegContext, payload: object) -> PrefillResult:
        if ctx.shape.finish(payload) is Finish.OTHER:
            raise PrefillIncomplete(
                f"prefill at {ctx.prefiller} did not finish computing the prompt "
                "(no length or stop finish reason); the KV may not be stored"
            )
        return PrefillResult(transfer_params=None)

    def decode_body(self, ctx: LegContext, prefill: PrefillResult | None) -> dict[str, Any]:
        return _no_threshold(dict(ctx.body))

    def local_body(self, ctx: LegContext) -> dict[str, Any]:
        return _no_threshold(super().local_body(ctx))

    def decode_first_body(self, ctx: LegContext) -> dict[str, Any] | None:
        if ctx.body.get(THRESHOLD_FIELD) is None:
            return None
        # No prefill has run: whatever the encode stage produced is for this leg.
        body = dict(ctx.body)
        body.update(ctx.extra)
        return body
