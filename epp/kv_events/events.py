"""Decoding vLLM's KV-event batches (msgpack).

A batch is ``[timestamp, [event, ...], dp_rank?]``. vLLM has encoded events two ways:
as tagged arrays (``["BlockStored", block_hashes, parent_block_hash, token_ids,
block_size, lora_id, medium, ...]``, trailing defaults omitted) and as maps tagged by a
``"type"`` key. Both decode to the same dataclasses; anything malformed raises
``EventDecodeError`` naming what was wrong, and unknown event types are skipped so a
newer engine does not stop the stream.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack

from epp.kv_events.hashing import external_hash

_MASK64 = (1 << 64) - 1

__all__ = [
    "MEDIUM_GPU",
    "AllBlocksCleared",
    "BlockRemoved",
    "BlockStored",
    "EventBatch",
    "EventDecodeError",
    "KvEvent",
    "decode_batch",
]

MEDIUM_GPU = "GPU"

# Field order of the array encoding (after the tag).
_STORED_FIELDS = (
    "block_hashes",
    "parent_block_hash",
    "token_ids",
    "block_size",
    "lora_id",
    "medium",
    "lora_name",
    "extra_keys",
)
_REMOVED_FIELDS = ("block_hashes", "medium")


class EventDecodeError(ValueError):
    """A payload that is not a KV-event batch."""


@dataclass(frozen=True, slots=True)
class BlockStored:
    block_hashes: tuple[int, ...]
    parent_block_hash: int | None
    token_ids: tuple[int, ...]
    block_size: int
    lora_id: int | None = None
    medium: str = MEDIUM_GPU


@dataclass(frozen=True, slots=True)
class BlockRemoved:
    block_hashes: tuple[int, ...]
    medium: str = MEDIUM_GPU


@dataclass(frozen=True, slots=True)
class AllBlocksCleared:
    pass


KvEvent = BlockStored | BlockRemoved | AllBlocksCleared


@dataclass(frozen=True, slots=True)
class EventBatch:
    ts: float
    events: tuple[KvEvent, ...]
    dp_rank: int | None = None
    # Events of a type this decoder does not know (counted, not applied).
    skipped: int = 0


def _hashes(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, list | tuple):
        raise EventDecodeError(f"{what}: block_hashes must be a list")
    kinds = set(map(type, value))
    if kinds <= {int}:  # the usual (int hashes): the masking runs in C
        return tuple(map(_MASK64.__and__, value))
    if kinds == {bytes}:
        return tuple(int.from_bytes(h[-8:], "big") for h in value)
    try:
        return tuple(external_hash(h) for h in value)
    except (TypeError, AttributeError):
        raise EventDecodeError(f"{what}: block hashes must be bytes or integers") from None


def _medium(value: Any) -> str:
    # vLLM leaves the medium unset for its own GPU cache.
    return value if isinstance(value, str) and value else MEDIUM_GPU


def _fields(raw: Any, names: Sequence[str], what: str) -> dict[str, Any]:
    if isinstance(raw, Mapping):
        return {k: raw.get(k) for k in names}
    values = list(raw[1:])
    return {k: (values[i] if i < len(values) else None) for i, k in enumerate(names)}


def _event(raw: Any) -> KvEvent | None:
    if isinstance(raw, Mapping):
        tag = raw.get("type")
    elif isinstance(raw, list | tuple) and raw:
        tag = raw[0]
    else:
        raise EventDecodeError("an event must be a tagged array or a map")
    if tag == "BlockStored":
        f = _fields(raw, _STORED_FIELDS, "BlockStored")
        parent = f["parent_block_hash"]
        tokens = f["token_ids"]
        size = f["block_size"]
        if not isinstance(tokens, list | tuple) or not isinstance(size, int):
            raise EventDecodeError("BlockStored: token_ids must be a list, block_size an int")
        if parent is not None and not isinstance(parent, bytes | int):
            raise EventDecodeError("BlockStored: parent_block_hash must be bytes or an int")
        lora = f["lora_id"]
        return BlockStored(
            block_hashes=_hashes(f["block_hashes"], "BlockStored"),
            parent_block_hash=None if parent is None else external_hash(parent),
            token_ids=tuple(tokens),
            block_size=size,
            lora_id=lora if isinstance(lora, int) else None,
            medium=_medium(f["medium"]),
        )
    if tag == "BlockRemoved":
        f = _fields(raw, _REMOVED_FIELDS, "BlockRemoved")
        return BlockRemoved(_hashes(f["block_hashes"], "BlockRemoved"), _medium(f["medium"]))
    if tag == "AllBlocksCleared":
        return AllBlocksCleared()
    if isinstance(tag, str):
        return None
    raise EventDecodeError(f"event tag must be a string, got {type(tag).__name__}")


def decode_batch(payload: bytes) -> EventBatch:
    """Decode one message's msgpack payload."""
    try:
        doc = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types
        raise EventDecodeError(f"payload is not msgpack: {type(exc).__name__}") from None
    if not isinstance(doc, list | tuple) or len(doc) not in (2, 3):
        raise EventDecodeError("a batch must be [timestamp, events, dp_rank?]")
    ts, raw_events = doc[0], doc[1]
    dp_rank = doc[2] if len(doc) == 3 else None
    if not isinstance(ts, int | float) or not isinstance(raw_events, list | tuple):
        raise EventDecodeError("a batch must be [timestamp, events, dp_rank?]")
    events: list[KvEvent] = []
    skipped = 0
    for raw in raw_events:
        ev = _event(raw)
        if ev is None:
            skipped += 1
        else:
            events.append(ev)
    return EventBatch(
        ts=float(ts),
        events=tuple(events),
        dp_rank=dp_rank if isinstance(dp_rank, int) else None,
        skipped=skipped,
    )
