"""Decoding vLLM's KV-event batches (msgpack).

A batch is ``[timestamp, [event, ...], dp_rank?]``. vLLM has encoded events two ways:
as tagged arrays (``["BlockStored", block_hashes, parent_block_hash, token_ids,
block_size, lora_id, medium, ...]``, trailing defaults omitted) and as maps tagged by a
``"type"`` key. Both decode to the same dataclasses; anything malformed raises
``EventDecodeError`` naming what was wrong, and unknown event types are skipped so a
newer engine does not stop the stream.

The index needs a BlockStored's hashes, not its token ids (16 per block: a 15,000-block
event carries 240,000 of them). ``decode_batch(payload, token_ids=False)`` reads the
batch with a streaming unpacker that checks the token-id field is an array and steps
over it in C without building its integers; the event's ``token_ids`` is then empty.
Whatever that reader does not expect (or any error) is decoded again in full, so the
result and the errors are the full decoder's; the one difference is that what is inside
the token-id array is not looked at.
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


def decode_batch(payload: bytes, *, token_ids: bool = True) -> EventBatch:
    """Decode one message's msgpack payload; without ``token_ids`` BlockStored events
    carry none (``token_ids == ()``), and the payload's token ids are not decoded."""
    if not token_ids:
        try:
            return _decode_skipping_tokens(payload)
        except Exception:  # the full decoder below says what is wrong
            pass
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


# msgpack's first byte of an array (fixarray, array 16, array 32) and of a map.
_ARRAY_HEADS = frozenset([*range(0x90, 0xA0), 0xDC, 0xDD])
_MAP_HEADS = frozenset([*range(0x80, 0x90), 0xDE, 0xDF])
_TOKEN_IDS_AT = 1 + _STORED_FIELDS.index("token_ids")  # in the array encoding


def _decode_skipping_tokens(payload: bytes) -> EventBatch:
    """``decode_batch`` for the usual shapes, token-id arrays skipped; raises on
    anything else (the caller then decodes in full)."""
    up = msgpack.Unpacker(raw=False, strict_map_key=False, max_buffer_size=len(payload))
    up.feed(payload)
    if payload[0] not in _ARRAY_HEADS:
        raise ValueError("not an array")
    size = up.read_array_header()
    if size not in (2, 3):
        raise ValueError("not a batch")
    ts = up.unpack()
    if not isinstance(ts, int | float) or payload[up.tell()] not in _ARRAY_HEADS:
        raise ValueError("not a batch")
    events: list[KvEvent] = []
    skipped = 0
    for _ in range(up.read_array_header()):
        ev = _event(_raw_event(up, payload))
        if ev is None:
            skipped += 1
        else:
            events.append(ev)
    dp_rank = up.unpack() if size == 3 else None
    if up.tell() != len(payload):
        raise ValueError("extra data")
    return EventBatch(
        ts=float(ts),
        events=tuple(events),
        dp_rank=dp_rank if isinstance(dp_rank, int) else None,
        skipped=skipped,
    )


def _raw_event(up: msgpack.Unpacker, payload: bytes) -> Any:
    """One event as ``unpackb`` would give it, but an array in its token-id place
    replaced by an empty list."""
    head = payload[up.tell()]
    if head in _ARRAY_HEADS:
        n = up.read_array_header()
        if n == 0:
            return []
        tag = up.unpack()
        raw: list[Any] = [tag]
        for i in range(1, n):
            if i == _TOKEN_IDS_AT and tag == "BlockStored" and payload[up.tell()] in _ARRAY_HEADS:
                up.skip()
                raw.append([])
            else:
                raw.append(up.unpack())
        return raw
    if head in _MAP_HEADS:
        doc: dict[Any, Any] = {}
        for _ in range(up.read_map_header()):
            key = up.unpack()
            if key == "token_ids" and payload[up.tell()] in _ARRAY_HEADS:
                up.skip()
                doc[key] = []
            else:
                doc[key] = up.unpack()
        return doc
    return up.unpack()
