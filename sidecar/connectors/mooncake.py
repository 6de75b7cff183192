"""Mooncake (reference section 3): a bootstrap ``/query`` per prefiller, then concurrent legs.

:meth:`MooncakeConnector.prepare` asks ``http://<P host>:<--mooncake-bootstrap-port>/query``
for the prefiller's engine id (the orchestrator caches it per prefiller and asks again
after a failed prefill). The prefill leg publishes its KV under a fresh
``transfer_id`` ("xfer-<uuid>"); the decode leg, sent at the same time, pulls it from
``remote_bootstrap_addr`` after checking ``remote_engine_id``.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import aiohttp

from sidecar._json import loads
from sidecar.connectors._bodies import one_token_prefill
from sidecar.connectors.base import Connector, LegContext, LegOrder, PrefillResult
from sidecar.errors import PrepareError

if TYPE_CHECKING:
    from sidecar.routing import HostPort

__all__ = ["MooncakeConnector", "MooncakePeer"]

_QUERY_TIMEOUT_S = 10.0
_MAX_QUERY_ANSWER = 1024 * 1024


@dataclass(frozen=True, slots=True)
class MooncakePeer:
    """What the bootstrap server said about one prefiller."""

    bootstrap_addr: str
    engine_id: str


def _engine_id(answer: object, url: str) -> str:
    """The engine id of the lowest data-parallel rank in a ``/query`` answer."""
    if isinstance(answer, Mapping) and answer:
        ranks = sorted(answer, key=lambda key: (not str(key).isdigit(), str(key).zfill(8)))
        entry = answer[ranks[0]]
        engine_id = entry.get("engine_id") if isinstance(entry, Mapping) else None
        if isinstance(engine_id, str) and engine_id:
            return engine_id
    raise PrepareError(f"mooncake bootstrap {url} answered without an engine_id")


class MooncakeConnector(Connector):
    name: ClassVar[str] = "mooncake"
    order: ClassVar[LegOrder] = LegOrder.CONCURRENT

    async def prepare(self, prefiller: HostPort, session: aiohttp.ClientSession) -> MooncakePeer:
        host = f"[{prefiller.host}]" if ":" in prefiller.host else prefiller.host
        addr = f"http://{host}:{self.options.mooncake_bootstrap_port}"
        url = addr + "/query"
        timeout = aiohttp.ClientTimeout(total=_QUERY_TIMEOUT_S)
        async with session.get(url, timeout=timeout) as response:
            raw = await response.content.read(_MAX_QUERY_ANSWER)
            if response.status != 200:
                raise PrepareError(f"mooncake bootstrap {url} answered {response.status}")
        try:
            answer = loads(raw)
        except ValueError:
            raise PrepareError(f"mooncake bootstrap {url} answered malformed JSON") from None
        return MooncakePeer(bootstrap_addr=addr, engine_id=_engine_id(answer, url))

    @staticmethod
    def _transfer_id(ctx: LegContext) -> str:
        return f"xfer-{uuid.UUID(int=ctx.pairing, version=4)}"

    @staticmethod
    def _peer(ctx: LegContext) -> MooncakePeer:
        if not isinstance(ctx.prepared, MooncakePeer):
            raise PrepareError(f"no mooncake bootstrap answer for prefiller {ctx.prefiller}")
        return ctx.prepared

    def prefill_body(self, ctx: LegContext) -> dict[str, Any]:
        body = one_token_prefill(ctx)
        body["kv_transfer_params"] = {
            "do_remote_decode": True,
            "do_remote_prefill": False,
            "transfer_id": self._transfer_id(ctx),
        }
        return body

    def read_prefill(self, ctx: LegContext, payload: object) -> PrefillResult:
        return PrefillResult(transfer_params=None)

    def decode_body(self, ctx: LegContext, prefill: PrefillResult | None) -> dict[str, Any]:
        peer = self._peer(ctx)
        body = dict(ctx.body)
        body["kv_transfer_params"] = {
            "do_remote_prefill": True,
            "do_remote_decode": False,
            "transfer_id": self._transfer_id(ctx),
            "remote_bootstrap_addr": peer.bootstrap_addr,
            "remote_engine_id": peer.engine_id,
        }
        return body
