"""The request headers the EPP writes and the pd-sidecar (and the gateway) obey.

Both sides of the contract read the names from here. Values are ``host:port`` (IPv6
literals bracketed); ``x-encoder-hosts-ports`` is a comma-separated list. A client must
never choose a target: every copy a client sends is dropped, by the EPP before it writes
its own and by the sidecar before it forwards anything.
"""

from __future__ import annotations

__all__ = [
    "DATA_PARALLEL_HOST_PORT",
    "DATA_PARALLEL_RANK",
    "DESTINATION_ENDPOINT",
    "ENCODER_HOSTS_PORTS",
    "KV_CACHE_SOURCE_HOST_PORT",
    "PREFILLER_HOST_PORT",
    "ROUTING_HEADERS",
]

# The decode (or only) endpoint; the gateway's original-destination cluster reads it.
DESTINATION_ENDPOINT = "x-gateway-destination-endpoint"
# The prefill endpoint the sidecar sends the prompt to first.
PREFILLER_HOST_PORT = "x-prefiller-host-port"
# The encoders of a multimodal request (E/P/D).
ENCODER_HOSTS_PORTS = "x-encoder-hosts-ports"
# A peer holding more of the prompt's prefix (the EPP's p2p-source-producer): the
# sidecar has the engine pull it over the OffloadingConnector P2P tier.
KV_CACHE_SOURCE_HOST_PORT = "x-kv-cache-source-host-port"
# The data-parallel rank's own port (data-parallel-profile-handler), and vLLM's rank pin.
DATA_PARALLEL_HOST_PORT = "x-data-parallel-host-port"
DATA_PARALLEL_RANK = "x-data-parallel-rank"

# Every header that steers a request to a pod.
ROUTING_HEADERS: tuple[str, ...] = (
    DESTINATION_ENDPOINT,
    PREFILLER_HOST_PORT,
    ENCODER_HOSTS_PORTS,
    KV_CACHE_SOURCE_HOST_PORT,
    DATA_PARALLEL_HOST_PORT,
    DATA_PARALLEL_RANK,
)
