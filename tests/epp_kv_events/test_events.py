"""Every event shape in both encodings, batches with and without dp rank, bad input."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest

from epp.kv_events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EventDecodeError,
    decode_batch,
)

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
