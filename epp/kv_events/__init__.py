"""Precise prefix-cache state from the engines' KV events (vLLM's ZeroMQ publisher).

``events`` decodes payloads, ``sequencing`` judges sequence numbers, ``subscriber``
follows one engine (with replay), ``pool`` follows discovery, ``index`` answers "which
engines hold this prompt's leading blocks", ``hashing`` computes the engine's block
hashes for a prompt.
"""

from __future__ import annotations

from epp.kv_events.events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EventBatch,
    EventDecodeError,
    KvEvent,
    decode_batch,
)
from epp.kv_events.hashing import DEFAULT_HASH_SEED, block_hashes, external_hash, none_hash
from epp.kv_events.index import KvBlockIndex
from epp.kv_events.pool import KvEventsPool
from epp.kv_events.sequencing import SeqAction, Sequencer
from epp.kv_events.subscriber import END_SEQ, EngineSubscriber, StreamCounters

__all__ = [
    "DEFAULT_HASH_SEED",
    "END_SEQ",
    "AllBlocksCleared",
    "BlockRemoved",
    "BlockStored",
    "EngineSubscriber",
    "EventBatch",
    "EventDecodeError",
    "KvBlockIndex",
    "KvEvent",
    "KvEventsPool",
    "SeqAction",
    "Sequencer",
    "StreamCounters",
    "block_hashes",
    "decode_batch",
    "external_hash",
    "none_hash",
]
