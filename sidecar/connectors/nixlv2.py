"""vLLM NixlConnector, protocol v2 (reference section 2): prefill, then decode.

Prefill leg: the client body, non-streaming, output capped to one token, ``min_tokens``
removed, and ``kv_transfer_params`` asking for a remote decode (plus ``remote_kv_source``
with ``--enable-p2p-pull`` and a pull source). Decode leg: the client
body as sent, with ``kv_transfer_params`` replaced by the prefill's answer, verbatim.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from sidecar.api_shapes import Finish
from sidecar.connectors._bodies import add_pull_source, one_token_prefill
from sidecar.connectors.base import Connector, LegContext, LegOrder, PrefillResult
from sidecar.errors import PrefillIncomplete

__all__ = ["NixlV2Connector"]


def _request_remote_decode() -> dict[str, Any]:
    return {
        "do_remote_decode": True,
        "do_remote_prefill": False,
        "remote_engine_id": None,
        "remote_block_ids": None,
        "remote_host": None,
        "remote_port": None,
    }


class NixlV2Connector(Connector):
    name: ClassVar[str] = "nixlv2"
    order: ClassVar[LegOrder] = LegOrder.SEQUENTIAL

    def prefill_body(self, ctx: LegContext) -> dict[str, Any]:
        body = one_token_prefill(ctx)
        # With --enable-p2p-pull the engines run MultiConnector(Nixl + Offloading): the
        # remote_kv_source key reaches the OffloadingConnector, the rest the NixlConnector.
        body["kv_transfer_params"] = add_pull_source(
            _request_remote_decode(), ctx, self.options.p2p
        )
        return body

    def read_prefill(self, ctx: LegContext, payload: object) -> PrefillResult:
        params = payload.get("kv_transfer_params") if isinstance(payload, Mapping) else None
        if isinstance(params, Mapping) and params:
            return PrefillResult(transfer_params=params)
        finish = ctx.shape.finish(payload)
        if finish is Finish.STOPPED:
            # vLLM hands over KV only for a prefill that reached the cap (0.32: or EOS);
            # one that met a stop string finished the whole generation instead.
            return PrefillResult(transfer_params=None, generation_finished=True)
        ended = "at the length cap" if finish is Finish.LENGTH else "without a usable finish"
        raise PrefillIncomplete(
            f"prefill at {ctx.prefiller} ended {ended} but answered without "
            "kv_transfer_params; the decode would recompute the prompt"
        )

    def decode_body(self, ctx: LegContext, prefill: PrefillResult | None) -> dict[str, Any]:
        # ctx.extra (encode-stage output) belongs to the prefill leg only: the decode
        # gets the KV, and with it what the prefill made of the encoder outputs.
        body = dict(ctx.body)
        if prefill is not None:
            body["kv_transfer_params"] = prefill.transfer_params
        return body
