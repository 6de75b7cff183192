"""The OffloadingConnector P2P tier stand-in: KV stored by id, prefixes looked up by hash.

vLLM's OffloadingConnector with a ``p2p`` secondary tier serves offloaded blocks to
peers. ``kv_transfer_params`` name the remote party:

- ``remote_decoder: {kv_request_id}`` (a P/D prefill): store the prompt's KV under the
  id, for the decode to take once;
- ``remote_prefiller: {kv_request_id, remote_host, remote_port}`` (its decode): take the
  KV stored under the id from that peer's tier, waiting for it to be stored;
- ``remote_kv_source: {kv_request_id, remote_host, remote_port}`` (any request): pull
  whatever leading blocks of the prompt the peer holds, then compute the rest.

The simulated tier is the engine's side channel (``--nixl-side-channel-port``):
``POST /sim/p2p/take`` and ``POST /sim/p2p/lookup``. A source pull that fails is not an
error: the prompt is computed, as vLLM does when a lookup misses.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["P2P_LOOKUP_PATH", "P2P_TAKE_PATH", "missing_peer_fields", "peer_block"]

P2P_TAKE_PATH = "/sim/p2p/take"
P2P_LOOKUP_PATH = "/sim/p2p/lookup"

REMOTE_DECODER = "remote_decoder"
REMOTE_PREFILLER = "remote_prefiller"
REMOTE_KV_SOURCE = "remote_kv_source"
_PEER_FIELDS = ("kv_request_id", "remote_host", "remote_port")


def peer_block(ktp: Mapping[str, Any] | None, key: str) -> Mapping[str, Any] | None:
    """``kv_transfer_params[key]`` when it is an object, else None."""
    block = (ktp or {}).get(key)
    return block if isinstance(block, Mapping) else None


def missing_peer_fields(block: Mapping[str, Any]) -> list[str]:
    """The fields a pull from a peer's tier needs that are absent."""
    return [name for name in _PEER_FIELDS if block.get(name) in (None, "")]
