"""Every event shape in both encodings, batches with and without dp rank, bad input."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import msgpack
import pytest

from epp.kv_events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EventDecodeError,
    KvBlockIndex,
    decode_batch,
)
from epp.kv_events.events import EventBatch

H1 = bytes([1]) * 32
H2 = bytes([2]) * 32


def _pack(doc: Any) -> bytes:
    data: bytes = msgpack.packb(doc, use_bin_type=True)
    return data


def _stored_map(**over: Any) -> dict[str, Any]:
    ev = {
        "type": "BlockStored",
        "block_hashes": [H1, H2],
        "parent_block_hash": None,
        "token_ids": list(range(32)),
        "block_size": 16,
        "lora_id": None,
        "medium": "GPU",
        "lora_name": None,
    }
    ev.update(over)
    return ev


def test_block_stored_map_encoding() -> None:
    batch = decode_batch(_pack([1.5, [_stored_map()]]))
    (ev,) = batch.events
    assert isinstance(ev, BlockStored)
    assert ev.block_hashes == (int.from_bytes(H1[-8:], "big"), int.from_bytes(H2[-8:], "big"))
    assert ev.parent_block_hash is None
    assert ev.token_ids == tuple(range(32))
    assert ev.block_size == 16
    assert ev.medium == "GPU"
    assert batch.ts == 1.5
    assert batch.dp_rank is None


def test_block_stored_array_encoding_with_trailing_fields_omitted() -> None:
    raw = ["BlockStored", [7, 8], 6, [1, 2], 1]  # lora_id, medium omitted
    batch = decode_batch(_pack([2, [raw], 3]))
    (ev,) = batch.events
    assert ev == BlockStored((7, 8), 6, (1, 2), 1, None, "GPU")
    assert batch.dp_rank == 3


def test_block_stored_cpu_medium_and_int_hashes() -> None:
    batch = decode_batch(_pack([0, [_stored_map(block_hashes=[1, 2], medium="CPU")]]))
    (ev,) = batch.events
    assert isinstance(ev, BlockStored)
    assert ev.block_hashes == (1, 2)
    assert ev.medium == "CPU"


def test_block_removed_both_encodings() -> None:
    m = {"type": "BlockRemoved", "block_hashes": [H1], "medium": None}
    a = ["BlockRemoved", [H1], "CPU"]
    batch = decode_batch(_pack([0, [m, a]]))
    assert batch.events == (
        BlockRemoved((int.from_bytes(H1[-8:], "big"),), "GPU"),
        BlockRemoved((int.from_bytes(H1[-8:], "big"),), "CPU"),
    )


def test_all_blocks_cleared_both_encodings() -> None:
    batch = decode_batch(_pack([0, [{"type": "AllBlocksCleared"}, ["AllBlocksCleared"]]]))
    assert batch.events == (AllBlocksCleared(), AllBlocksCleared())


def test_unknown_event_type_is_skipped_not_fatal() -> None:
    batch = decode_batch(_pack([0, [{"type": "SomethingNew", "x": 1}, ["AllBlocksCleared"]]]))
    assert batch.events == (AllBlocksCleared(),)
    assert batch.skipped == 1


@pytest.mark.parametrize(
    "payload",
    [
        b"\xc1",  # never used in msgpack
        _pack({"ts": 1}),
        _pack([1]),
        _pack(["x", []]),
        _pack([0, [5]]),
        _pack([0, [[3, 4]]]),
        _pack([0, [_stored_map(block_hashes="nope")]]),
        _pack([0, [_stored_map(block_hashes=[1.5])]]),
        _pack([0, [_stored_map(token_ids=None)]]),
        _pack([0, [_stored_map(parent_block_hash="x")]]),
    ],
)
def test_malformed_payloads_raise_decode_error(payload: bytes) -> None:
    with pytest.raises(EventDecodeError):
        decode_batch(payload)


def test_hash_lists_of_every_kind_decode_as_external_hash_does() -> None:
    from epp.kv_events.events import _hashes
    from epp.kv_events.hashing import external_hash

    digest = bytes(range(32))
    for value in (
        [1, 2**64 + 5, -1, 0],
        [digest, b"\x01" * 32],
        [digest, 7, True],
        [],
        (3, 4),
    ):
        assert _hashes(value, "x") == tuple(external_hash(h) for h in value)


def _without_tokens(batch: EventBatch) -> EventBatch:
    events = tuple(
        replace(ev, token_ids=()) if isinstance(ev, BlockStored) else ev for ev in batch.events
    )
    return replace(batch, events=events)


_LONG = ["BlockStored", list(range(1, 15_001)), None, [i % 32_000 for i in range(240_000)], 16]
_VALID = [
    _pack([1.5, [_stored_map()]]),
    _pack([2, [["BlockStored", [7, 8], 6, [1, 2], 1]], 3]),
    _pack([2, [["BlockStored", [7, 8], H1, [1, 2], 16, 5, "CPU", "lora", [["x"]]]], None]),
    _pack([0, [_stored_map(block_hashes=[1, -2], medium="CPU"), ["AllBlocksCleared"]]]),
    # token_ids ahead of the tag; an event without token ids; an empty event list
    _pack(
        [0, [{"token_ids": [1, 2], "type": "BlockStored", "block_hashes": [3], "block_size": 1}]]
    ),
    _pack([0, [{"type": "BlockRemoved", "block_hashes": [H1], "token_ids": [9]}]]),
    _pack([0, [{"type": "SomethingNew", "token_ids": [1]}, ["Other", [1], None, [2]]]]),
    _pack([0.5, []]),
    _pack([3, [_LONG, ["BlockRemoved", [5]], _LONG]]),
]


@pytest.mark.parametrize("payload", _VALID)
def test_decoding_without_token_ids_gives_the_same_events(payload: bytes) -> None:
    from epp.kv_events.events import _decode_skipping_tokens

    full = decode_batch(payload)
    assert decode_batch(payload, token_ids=False) == _without_tokens(full)
    # The streaming reader handled it (not the full decoder as a fallback).
    assert _decode_skipping_tokens(payload) == _without_tokens(full)
    # ... and so the same index entries.
    a, b = KvBlockIndex(100_000), KvBlockIndex(100_000)
    a.apply("e", full.events)
    b.apply("e", decode_batch(payload, token_ids=False).events)
    assert a.engine_blocks("e") == b.engine_blocks("e")
    for ev in full.events:
        if isinstance(ev, BlockStored):
            assert b.match(ev.block_hashes, ["e"], 1 | 2) == a.match(ev.block_hashes, ["e"], 1 | 2)


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\x92\x01",  # truncated
        _pack([0, [], 1]) + b"\x01",  # extra data
        _pack([0, [_stored_map(token_ids=5)]]),
        _pack([0, [["BlockStored", [1], None]]]),  # no token ids at all
        _pack([0, [["BlockStored", [1], None, [1], "16"]]]),
        _pack([0, [{"type": "BlockStored", "block_hashes": [1], "token_ids": {}}]]),
        _pack([[], [_stored_map()]]),
        _pack([0, {"a": 1}]),
        _pack([0, [_stored_map()], 1, 2]),
    ],
)
def test_malformed_payloads_fail_the_same_without_token_ids(payload: bytes) -> None:
    with pytest.raises(EventDecodeError) as full:
        decode_batch(payload)
    with pytest.raises(EventDecodeError) as fast:
        decode_batch(payload, token_ids=False)
    assert str(fast.value) == str(full.value)


def test_token_ids_are_stepped_over_not_decoded() -> None:
    # A string in the token ids that is not UTF-8 fails the full decoder; the token-id
    # array is skipped whole, so its content is never built (nor checked).
    bad = b"\xa1\xff"  # msgpack fixstr of one byte, invalid UTF-8
    packed = _pack([0, [["BlockStored", [1, 2], None, [0], 16]]])
    payload = packed.replace(b"\x91\x00", b"\x91" + bad)
    with pytest.raises(EventDecodeError):
        decode_batch(payload)
    (ev,) = decode_batch(payload, token_ids=False).events
    assert ev == BlockStored((1, 2), None, (), 16)
