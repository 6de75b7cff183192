"""vLLM's MoRIIOConnector (AMD MoRI-IO), as llm-d's sidecar drives it.

llm-d spells it ``--kv-connector=nixlv2`` with ``--moriio-*`` flags; ``moriio`` is the
same connector under its own name. Three ways to run, by flag:

read (no ``--moriio-write-mode``)
    NIXL protocol v2 bodies (see ``nixlv2``): the decode engine reads the KV. With
    ``--moriio-dp-size`` > 1 the prefill leg is pinned to a data-parallel rank
    (``x-data-parallel-rank``, a hash of the request id).
write, serial (``--moriio-write-mode``)
    the prefill engine RDMA-writes the KV into the decode engine: its leg names the
    decode pod (``remote_host`` = ``--moriio-local-pod-ip``, the decode handshake and
    notify ports, ``transfer_id`` "tx<uuid>", ``tp_size``, ``remote_dp_size``, the
    pinned ``remote_dp_rank`` with ``remote_dp_rank_override``, and for Wide-EP
    ``remote_hosts`` = ``--moriio-decode-hosts`` with ``remote_dp_size_local``). The
    decode leg takes the prefill's answer, pinned to the rank the prefill reports (a
    valid ``remote_dp_rank``, else the hash) on both its body and its header, and
    filled in where the answer lacks a field (``transfer_id``, the decode notify and
    handshake ports, ``remote_dp_size``, ``remote_hosts`` = ``--moriio-remote-hosts``).
write, parallel (``--moriio-parallel-dispatch``)
    both legs at once; the decode body is built from the flags (the prefill pod's host,
    ``--moriio-prefill-handshake-port`` and ``--moriio-prefill-notify-port``, empty
    ``remote_block_ids``, engine id "<host>:<handshake port>") and both legs are pinned
    to the hashed rank. The decode answer is held until the prefill succeeded (a failed
    prefill is the client's answer), and a prefill not done within
    ``--moriio-parallel-decode-wait-timeout`` fails the request with 504.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Mapping
from typing import Any, ClassVar

from sidecar.api_shapes import Finish
from sidecar.connectors._bodies import one_token_prefill
from sidecar.connectors._peers import PeerResolver
from sidecar.connectors.base import (
    Connector,
    ConnectorOptions,
    LegContext,
    LegOrder,
    MoriioOptions,
    PrefillResult,
)
from sidecar.connectors.nixlv2 import NixlV2Connector
from sidecar.errors import PrefillIncomplete

__all__ = [
    "DATA_PARALLEL_RANK",
    "MoriioConnector",
    "MoriioParallelConnector",
    "decode_rank",
    "pick_dp_rank",
]

DATA_PARALLEL_RANK = "x-data-parallel-rank"
PARAMS = "kv_transfer_params"


def pick_dp_rank(request_id: str, dp_size: int) -> int:
    """The data-parallel rank of a request: BLAKE2s of its id, first 8 bytes big-endian,
    modulo the size (0 for a single rank), as llm-d computes it."""
    if dp_size <= 1:
        return 0
    digest = hashlib.blake2s(request_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") % dp_size


def decode_rank(prefill_params: object, request_id: str, dp_size: int) -> tuple[int, bool]:
    """The decode leg's rank: the prefill's ``remote_dp_rank`` when it is a whole number
    in range, else the hash. The flag says whether the prefill's value was used."""
    fallback = pick_dp_rank(request_id, dp_size)
    if dp_size <= 1 or not isinstance(prefill_params, Mapping):
        return fallback, False
    value = prefill_params.get("remote_dp_rank")
    if isinstance(value, bool) or not isinstance(value, int | float):
        return fallback, False
    if isinstance(value, float) and not value.is_integer():
        return fallback, False
    rank = int(value)
    return (rank, True) if 0 <= rank < dp_size else (fallback, False)


class MoriioConnector(NixlV2Connector):
    name: ClassVar[str] = "moriio"
    order: ClassVar[LegOrder] = LegOrder.SEQUENTIAL

    def __init__(self, options: ConnectorOptions) -> None:
        super().__init__(options)
        self.moriio: MoriioOptions = options.moriio
        m = self.moriio
        self.peers = PeerResolver(ttl=m.dns_ttl, timeout=m.dns_timeout)
        self.peers.seed([m.local_pod_ip, *m.remote_hosts, *m.decode_hosts])

    @classmethod
    def create(cls, options: ConnectorOptions) -> Connector:
        m = options.moriio
        if m.parallel_dispatch and m.write_mode:
            return MoriioParallelConnector(options)
        return cls(options)

    # -- shared pieces -----------------------------------------------------------------

    @staticmethod
    def transfer_id(ctx: LegContext) -> str:
        """MoRI-IO routes messages by a transfer id starting with "tx"."""
        return f"tx{uuid.UUID(int=ctx.pairing, version=4)}"

    def rank(self, ctx: LegContext) -> int:
        return pick_dp_rank(ctx.request_id, self.moriio.dp_size)

    def _rank_header(self, rank: int) -> dict[str, str]:
        return {DATA_PARALLEL_RANK: str(rank)} if self.moriio.dp_size > 1 else {}

    def _fan_out(self, params: dict[str, Any], hosts: tuple[str, ...]) -> None:
        """Wide-EP: the peer pods, each serving ``dp_size_local`` ranks."""
        if not hosts:
            return
        params["remote_hosts"] = [self.peers.current(host) for host in hosts]
        if self.moriio.dp_size_local > 0:
            params["remote_dp_size_local"] = self.moriio.dp_size_local

    def write_prefill_params(self, ctx: LegContext) -> dict[str, Any]:
        """The prefill leg's ``kv_transfer_params`` in write mode: where to write the KV."""
        m = self.moriio
        params: dict[str, Any] = {
            "do_remote_decode": True,
            "do_remote_prefill": False,
            "remote_engine_id": None,
            "remote_block_ids": None,
            "remote_host": self.peers.current(m.local_pod_ip),
            "remote_port": None,
            "remote_notify_port": m.decode_notify_port,
            "remote_dp_rank": self.rank(ctx),
            "remote_dp_rank_override": True,
            "remote_handshake_port": m.decode_handshake_port,
            "transfer_id": self.transfer_id(ctx),
            "tp_size": m.tp_size,
            "remote_dp_size": m.dp_size,
        }
        self._fan_out(params, m.decode_hosts)
        return params

    # -- the contract ------------------------------------------------------------------

    def prefill_body(self, ctx: LegContext) -> dict[str, Any]:
        if not self.moriio.write_mode:
            return super().prefill_body(ctx)
        body = one_token_prefill(ctx)
        body[PARAMS] = self.write_prefill_params(ctx)
        return body

    def prefill_headers(self, ctx: LegContext) -> Mapping[str, str]:
        return self._rank_header(self.rank(ctx))

    def decode_body(self, ctx: LegContext, prefill: PrefillResult | None) -> dict[str, Any]:
        body = super().decode_body(ctx, prefill)
        if not self.moriio.write_mode or prefill is None:
            return body
        returned = prefill.transfer_params
        if not isinstance(returned, Mapping):
            return body
        m = self.moriio
        params = dict(returned)
        params["remote_dp_rank"], _ = decode_rank(returned, ctx.request_id, m.dp_size)
        params["remote_dp_rank_override"] = True
        params.setdefault("transfer_id", self.transfer_id(ctx))
        params.setdefault("remote_notify_port", m.decode_notify_port)
        params.setdefault("remote_handshake_port", m.decode_handshake_port)
        params.setdefault("remote_dp_size", m.dp_size)
        if m.remote_hosts:
            if "remote_hosts" not in params:
                params["remote_hosts"] = [self.peers.current(host) for host in m.remote_hosts]
            if m.dp_size_local > 0:
                params.setdefault("remote_dp_size_local", m.dp_size_local)
        body[PARAMS] = params
        return body

    def decode_headers(self, ctx: LegContext, prefill: PrefillResult | None) -> Mapping[str, str]:
        if not self.moriio.write_mode or prefill is None:
            return {}
        rank, _ = decode_rank(prefill.transfer_params, ctx.request_id, self.moriio.dp_size)
        return self._rank_header(rank)


class MoriioParallelConnector(MoriioConnector):
    """Write mode with both legs dispatched at once (``--moriio-parallel-dispatch``)."""

    order: ClassVar[LegOrder] = LegOrder.CONCURRENT

    def __init__(self, options: ConnectorOptions) -> None:
        super().__init__(options)
        self.commit_timeout = options.moriio.parallel_decode_wait_timeout or 30.0

    def prefill_body(self, ctx: LegContext) -> dict[str, Any]:
        body = one_token_prefill(ctx)
        body[PARAMS] = self.write_prefill_params(ctx)
        return body

    def read_prefill(self, ctx: LegContext, payload: object) -> PrefillResult:
        finish = ctx.shape.finish(payload)
        if finish is Finish.STOPPED:
            # The prefill's generation ended: it writes no KV, the decode would wait.
            return PrefillResult(transfer_params=None, generation_finished=True)
        params = payload.get(PARAMS) if isinstance(payload, Mapping) else None
        if finish is not Finish.LENGTH and not params:
            raise PrefillIncomplete(
                f"prefill at {ctx.prefiller} did not stop at the length cap, so it "
                "writes no KV for the decode"
            )
        return PrefillResult(transfer_params=params if isinstance(params, Mapping) else None)

    def decode_body(self, ctx: LegContext, prefill: PrefillResult | None) -> dict[str, Any]:
        m = self.moriio
        host = ctx.prefiller.host
        body = dict(ctx.body)
        params: dict[str, Any] = {
            "do_remote_prefill": True,
            "do_remote_decode": False,
            "remote_engine_id": f"{host}:{m.prefill_handshake_port}",
            "remote_block_ids": [],  # the decode allocates its own blocks in write mode
            "remote_host": host,
            "remote_port": m.prefill_handshake_port,
            "remote_notify_port": m.prefill_notify_port,
            "remote_dp_rank": self.rank(ctx),
            "remote_dp_rank_override": True,
            "remote_handshake_port": m.prefill_handshake_port,
            "transfer_id": self.transfer_id(ctx),
            "tp_size": m.tp_size,
            "remote_dp_size": m.dp_size,
        }
        self._fan_out(params, m.remote_hosts)
        body[PARAMS] = params
        return body

    def decode_headers(self, ctx: LegContext, prefill: PrefillResult | None) -> Mapping[str, str]:
        return self._rank_header(self.rank(ctx))
