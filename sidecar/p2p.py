"""vLLM's OffloadingConnector P2P tier: where a peer's tier listens, and the pull params.

Each engine serves its offloaded KV over a P2P tier on ``--p2p-connector-port``; with
``--data-parallel-size N`` rank r serves on ``--p2p-connector-port`` + r. A target named
by its sidecar port (``--port`` + r) is therefore pulled from on the tier port of the
same rank. A port outside the rank range (or data-parallel size 1, or ``--port 0``)
means rank 0's tier.

The ``kv_transfer_params`` keys name the remote party: ``remote_decoder`` on a prefill
leg, ``remote_prefiller`` on the decode leg of a P/D pair, ``remote_kv_source`` for a
pull of a cached prefix from any peer (``x-kv-cache-source-host-port``).
"""

from __future__ import annotations

import ipaddress
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sidecar.routing import HostPort

__all__ = [
    "KV_REQUEST_ID",
    "REMOTE_DECODER",
    "REMOTE_KV_SOURCE",
    "REMOTE_PREFILLER",
    "P2PTier",
    "same_endpoint",
]

REMOTE_DECODER = "remote_decoder"
REMOTE_PREFILLER = "remote_prefiller"
REMOTE_KV_SOURCE = "remote_kv_source"
KV_REQUEST_ID = "kv_request_id"


@dataclass(frozen=True, slots=True)
class P2PTier:
    port: int = 7777  # --p2p-connector-port: rank 0's tier
    data_parallel_size: int = 1
    base_port: int = 0  # this sidecar's --port (rank 0's); 0 turns rank derivation off

    def port_for(self, target: HostPort) -> int:
        """The tier port of the rank ``target`` (a sidecar endpoint) names."""
        if self.data_parallel_size <= 1 or self.base_port == 0:
            return self.port
        rank = target.port - self.base_port
        if not 0 <= rank < self.data_parallel_size:
            return self.port
        return self.port + rank

    def peer(self, target: HostPort, kv_request_id: str) -> dict[str, Any]:
        """``{kv_request_id, remote_host, remote_port}`` for a pull from ``target``."""
        return {
            KV_REQUEST_ID: kv_request_id,
            "remote_host": target.host,
            "remote_port": self.port_for(target),
        }

    def source_params(self, source: HostPort) -> dict[str, Any]:
        """The ``remote_kv_source`` block: its own fresh id (the puller's alone)."""
        return self.peer(source, str(uuid.uuid4()))


def _host_key(host: str) -> str:
    try:
        return ipaddress.ip_address(host.strip("[]")).compressed
    except ValueError:
        return host.lower().rstrip(".")


def same_endpoint(a: HostPort, b: HostPort) -> bool:
    """Whether two targets are one endpoint (however their hosts are spelled)."""
    return a.port == b.port and _host_key(a.host) == _host_key(b.host)
