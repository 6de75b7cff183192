"""Data-parallel ranks: ``--data-parallel-size N`` serves N ports, one per vLLM rank.

Rank ``r`` listens on ``--port`` + r and talks to the local vLLM on
``--model-server-port`` + r on every path (P/D decode leg, E/PD, passthrough, readiness).
A rank is found by the local port its request arrived on, so the ports need not be
contiguous (tests bind port 0). Each rank's :class:`Rank.base_url` is the one thing the
paths read; its ``/ready`` probes its own engine. The metrics port stays one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sidecar.errors import SidecarError
from sidecar.health import Readiness
from sidecar.orchestrator import Orchestrator
from sidecar.server import Request

__all__ = ["Rank", "Ranks"]


@dataclass(frozen=True, slots=True)
class Rank:
    index: int
    base_url: str  # this rank's local vLLM: the decode target of its requests
    orchestrator: Orchestrator  # shared by every rank
    readiness: Readiness


class Ranks:
    def __init__(self, ranks: Sequence[Rank]) -> None:
        if not ranks:
            raise ValueError("at least one rank")
        self.all = tuple(ranks)
        self._by_port: dict[int, Rank] = {}

    def bind(self, index: int, port: int) -> None:
        """Rank ``index`` serves on local port ``port`` (as bound)."""
        self._by_port[port] = self.all[index]

    def engine_urls(self) -> dict[int, str]:
        """Each rank's engine URL by the sidecar port it serves on (as bound)."""
        return {port: rank.base_url for port, rank in self._by_port.items()}

    def for_request(self, request: Request) -> Rank:
        if len(self.all) == 1:
            return self.all[0]
        transport = request.transport
        sockname = transport.get_extra_info("sockname") if transport is not None else None
        rank = self._by_port.get(sockname[1]) if sockname else None
        if rank is None:
            # Only reachable if a socket was bound outside start(): never guess a rank.
            raise SidecarError(f"no data-parallel rank serves local address {sockname}")
        return rank
