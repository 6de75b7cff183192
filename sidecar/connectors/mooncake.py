"""Mooncake (reference section 3): a bootstrap ``/query`` per prefiller, then concurrent legs.

:meth:`MooncakeConnector.prepare` asks ``http://<P host>:<--mooncake-bootstrap-port>/query``
for the prefiller's engine id (the orchestrator caches it per prefiller and asks again
after a failed prefill). The prefill leg publishes its KV under a fresh
``transfer_id`` ("xfer-<uuid>"); the decode leg, sent at the same time, pulls it from
``remote_bootstrap_addr`` after checking ``remote_engine_id``.

A prefill pod running data-parallel ranks lists one engine id per rank in ``/query``.
Each request picks one rank (at random, from its pairing bits), pins the prefill to it
with ``X-data-parallel-rank`` and gives the decode that rank's engine id, so the KV is
published where the decode looks for it.

vLLM publishes KV only for a prefill that stopped at the cap; one whose generation
ended on the first token leaves the decode nothing to pull (``generation_finished``).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import aiohttp

from common.json_codec import loads
from sidecar.api_shapes import Finish
from sidecar.connectors._bodies import one_token_prefill
from sidecar.connectors.base import Connector, LegContext, LegOrder, PrefillResult
from sidecar.errors import PrefillIncomplete, PrepareError

if TYPE_CHECKING:
    from sidecar.routing import HostPort

__all__ = ["DATA_PARALLEL_RANK", "MooncakeConnector", "MooncakePeer"]

DATA_PARALLEL_RANK = "X-data-parallel-rank"
_QUERY_TIMEOUT_S = 10.0
_MAX_QUERY_ANSWER = 1024 * 1024
_MAX_RANKS = 1024


@dataclass(frozen=True, slots=True)
class MooncakePeer:
    """What the bootstrap server said about one prefiller: engine id by DP rank."""

    bootstrap_addr: str
    ranks: tuple[tuple[int, str], ...]  # (data-parallel rank, engine id), by rank

    def rank_for(self, pairing: int) -> tuple[int, str]:
        return self.ranks[pairing % len(self.ranks)]


def _ranks(answer: object, url: str) -> tuple[tuple[int, str], ...]:
    """Every (rank, engine id) in a ``/query`` answer; entries without an id are skipped."""
    found: list[tuple[int, str]] = []
    if isinstance(answer, Mapping):
        for key, entry in answer.items():
            engine_id = entry.get("engine_id") if isinstance(entry, Mapping) else None
            rank = str(key)
            if rank.isdigit() and len(rank) <= 6 and isinstance(engine_id, str) and engine_id:
                found.append((int(rank), engine_id))
    if not found:
        raise PrepareError(f"mooncake bootstrap {url} answered without an engine_id")
    if len(found) > _MAX_RANKS:
        raise PrepareError(f"mooncake bootstrap {url} listed {len(found)} ranks")
    return tuple(sorted(found))


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
        return MooncakePeer(bootstrap_addr=addr, ranks=_ranks(answer, url))

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

    def prefill_headers(self, ctx: LegContext) -> dict[str, str]:
        rank, _ = self._peer(ctx).rank_for(ctx.pairing)
        return {DATA_PARALLEL_RANK: str(rank)}

    def read_prefill(self, ctx: LegContext, payload: object) -> PrefillResult:
        finish = ctx.shape.finish(payload)
        if finish is Finish.STOPPED:
            return PrefillResult(transfer_params=None, generation_finished=True)
        if finish is not Finish.LENGTH:
            raise PrefillIncomplete(
                f"prefill at {ctx.prefiller} did not stop at the length cap, so it "
                "published no KV for the decode"
            )
        return PrefillResult(transfer_params=None)

    def decode_body(self, ctx: LegContext, prefill: PrefillResult | None) -> dict[str, Any]:
        peer = self._peer(ctx)
        _, engine_id = peer.rank_for(ctx.pairing)
        body = dict(ctx.body)
        body["kv_transfer_params"] = {
            "do_remote_prefill": True,
            "do_remote_decode": False,
            "transfer_id": self._transfer_id(ctx),
            "remote_bootstrap_addr": peer.bootstrap_addr,
            "remote_engine_id": engine_id,
        }
        return body
