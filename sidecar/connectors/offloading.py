"""vLLM OffloadingConnector with its P2P tier: concurrent legs paired by ``kv_request_id``.

Prefill leg: the client body, non-streaming, output capped to one token, with
``kv_transfer_params = {"remote_decoder": {"kv_request_id": id}}``: store the prompt's KV
under ``id``, no peer address. Decode leg, sent at the same time: the client body with
``kv_transfer_params = {"remote_prefiller": {"kv_request_id": id, "remote_host": <P host>,
"remote_port": <P's tier port>}}``; the tier port is ``--p2p-connector-port``, offset by
the prefiller's data-parallel rank (:class:`sidecar.p2p.P2PTier`). The connector parks
blocks stored before the decode binds the session, so the legs need no ordering. The
prefill's answer is only checked for errors; a prefill still running when the decode
has answered is left to finish rather than aborted.

With ``x-kv-cache-source-host-port`` the prefill leg also carries ``remote_kv_source``
(a pull of the cached prefix from that peer), unless the source is the prefiller.
"""

from __future__ import annotations

import uuid
from typing import Any, ClassVar

from sidecar.connectors._bodies import add_pull_source, one_token_prefill
from sidecar.connectors.base import Connector, LegContext, LegOrder, PrefillResult
from sidecar.p2p import KV_REQUEST_ID, REMOTE_DECODER, REMOTE_PREFILLER

__all__ = ["OffloadingConnector"]


class OffloadingConnector(Connector):
    name: ClassVar[str] = "offloading"
    order: ClassVar[LegOrder] = LegOrder.CONCURRENT
    # The prefill's stored KV must not be aborted because the decode finished first.
    prefill_outlives_decode: ClassVar[bool] = True

    @staticmethod
    def kv_request_id(ctx: LegContext) -> str:
        return str(uuid.UUID(int=ctx.pairing, version=4))

    def prefill_body(self, ctx: LegContext) -> dict[str, Any]:
        body = one_token_prefill(ctx)
        params: dict[str, Any] = {REMOTE_DECODER: {KV_REQUEST_ID: self.kv_request_id(ctx)}}
        body["kv_transfer_params"] = add_pull_source(params, ctx, self.options.p2p)
        return body

    def read_prefill(self, ctx: LegContext, payload: object) -> PrefillResult:
        return PrefillResult(transfer_params=None)

    def decode_body(self, ctx: LegContext, prefill: PrefillResult | None) -> dict[str, Any]:
        body = dict(ctx.body)
        body["kv_transfer_params"] = {
            REMOTE_PREFILLER: self.options.p2p.peer(ctx.prefiller, self.kv_request_id(ctx))
        }
        return body
