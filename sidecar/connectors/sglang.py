"""SGLang disaggregation (reference section 3): the same body to P and D, concurrently.

Both legs carry the top-level rendezvous fields ``bootstrap_host`` (the prefiller's
host), ``bootstrap_port`` (its bootstrap server, ``--sglang-bootstrap-port``) and
``bootstrap_room`` (a random 63-bit integer shared by the two legs). The prefill blocks
until the decode joins the room, hence concurrent legs. The prefill's answer is only
checked for errors; the decode's goes to the client.
"""

from __future__ import annotations

from typing import Any, ClassVar

from sidecar.connectors.base import Connector, LegContext, LegOrder, PrefillResult

__all__ = ["SGLangConnector"]

_ROOM_BITS = 63


class SGLangConnector(Connector):
    name: ClassVar[str] = "sglang"
    order: ClassVar[LegOrder] = LegOrder.CONCURRENT

    def _rendezvous(self, ctx: LegContext) -> dict[str, Any]:
        return {
            "bootstrap_host": ctx.prefiller.host,
            "bootstrap_port": self.options.sglang_bootstrap_port,
            "bootstrap_room": ctx.pairing >> (128 - _ROOM_BITS),
        }

    def prefill_body(self, ctx: LegContext) -> dict[str, Any]:
        body = dict(ctx.body)
        body.update(ctx.extra)
        # The answer is only checked for errors: one JSON object is all it needs to be.
        body["stream"] = False
        body.pop("stream_options", None)
        body.update(self._rendezvous(ctx))
        return body

    def read_prefill(self, ctx: LegContext, payload: object) -> PrefillResult:
        return PrefillResult(transfer_params=None)

    def decode_body(self, ctx: LegContext, prefill: PrefillResult | None) -> dict[str, Any]:
        body = dict(ctx.body)
        body.update(self._rendezvous(ctx))
        return body
