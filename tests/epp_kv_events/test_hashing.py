"""Block hashes equal vLLM's sha256_cbor (vectors computed with vLLM 0.32 and cbor2)."""

from __future__ import annotations

import pytest

from epp.kv_events import block_hashes, external_hash, none_hash
from epp.kv_events.hashing import cbor_encode, hash_keys
from vllm_sim.block_hash import chain_hashes

NONE_HASH_DEFAULT = "9bd96a485ad84efdafb72ee48a1d7a69bcead0f8f0433173941b276b9581eef0"
FIRST_TWO = [
    "dc918a88b139e5afe60b88eda27508d4aee16c10fdc354791efea06206ac0749",
    "c300ec275d7bf08af8fc63e76cdc0086911bbc7091e03c5cf892553bef84ef0c",
]
WITH_EXTRA_SEED0 = "4abbb03cca806081faae3204dbe21d66ec49f2136610a880ce3901b2db13af07"


def test_none_hash_default_seed() -> None:
    assert none_hash().hex() == NONE_HASH_DEFAULT
    assert none_hash("0") != none_hash()


def test_block_chain_matches_vllm() -> None:
    hashes = block_hashes(list(range(40)), 16)
    assert [h.hex() for h in hashes] == FIRST_TWO  # the partial third block is not hashed


def test_extra_keys_and_seed() -> None:
    (h,) = block_hashes([1, 2, 3, 4], 4, "0", extra_keys=[("lora", "x")])
    assert h.hex() == WITH_EXTRA_SEED0


def test_simulator_hashes_the_same_way() -> None:
    tokens = [5, 300, 70000, 2**33, *range(60)]
    for seed in (None, "0", "1234"):
        assert chain_hashes(tokens, 16, seed) == block_hashes(tokens, 16, seed)


def test_max_blocks() -> None:
    assert len(block_hashes(list(range(100)), 16, max_blocks=2)) == 2


def test_external_hash_bytes_and_int_agree() -> None:
    h = bytes(range(32))
    as_int = int.from_bytes(h, "big") & ((1 << 64) - 1)
    assert external_hash(h) == external_hash(as_int) == int.from_bytes(h[-8:], "big")


@pytest.mark.parametrize(
    ("value", "encoded"),
    [
        (None, "f6"),
        (23, "17"),
        (24, "1818"),
        (65536, "1a00010000"),
        (-1, "20"),
        ("a", "6161"),
        (b"\x01", "4101"),
        ((1, [2]), "82018102"),
    ],
)
def test_cbor_subset(value: object, encoded: str) -> None:
    assert cbor_encode(value).hex() == encoded


def test_cbor_rejects_other_types() -> None:
    with pytest.raises(TypeError):
        cbor_encode(1.5)


def test_block_hashes_equal_the_triples_hashed_one_by_one() -> None:
    """The one-stream encoding equals CBOR of (parent, block tokens, extra) per block,
    whatever the tokens' CBOR widths (1, 2, 3, 5 and 9 bytes) and block sizes."""
    import hashlib
    import random

    rng = random.Random(5)
    for trial in range(40):
        widths = [24, 256, 65_536, 2**32, 2**40]
        tokens = [rng.randrange(rng.choice(widths)) for _ in range(rng.randrange(0, 600))]
        size = rng.choice([1, 3, 16, 17])
        extra = [rng.choice([None, ("lora", 7)]) for _ in tokens] if trial % 3 == 0 else None
        seed = rng.choice([None, "0"])
        parent = none_hash(seed)
        want = []
        for i in range(len(tokens) // size):
            key = extra[i] if extra is not None else None
            triple = (parent, tokens[i * size : (i + 1) * size], key)
            parent = hashlib.sha256(cbor_encode(triple)).digest()
            want.append(parent)
        assert block_hashes(tokens, size, seed, extra_keys=extra) == want
        assert block_hashes(tokens, size, seed, max_blocks=2, extra_keys=extra) == want[:2]


def _one_by_one(tokens: list[int], size: int, blocks: int) -> list[bytes]:
    import hashlib

    parent = none_hash()
    want = []
    for i in range(min(len(tokens) // size, blocks)):
        parent = hashlib.sha256(cbor_encode((parent, tokens[i * size : (i + 1) * size], None)))
        parent = parent.digest()
        want.append(parent)
    return want


def test_a_long_prompt_hashes_as_block_by_block_up_to_the_cap() -> None:
    import random

    rng = random.Random(7)
    # Ids of every CBOR width, ones beyond the encoding table, some repeated.
    pool = [0, 23, 24, 255, 256, 65_535, 65_536, 2**18 + 3, 2**32, 2**40]
    tokens = [rng.choice(pool) if i % 7 == 0 else rng.randrange(150_000) for i in range(40_000)]
    hashes = block_hashes(tokens, 16, max_blocks=2048)
    assert len(hashes) == 2048
    assert hashes == _one_by_one(tokens, 16, 2048)
    assert hash_keys(hashes) == [external_hash(h) for h in hashes]


def test_a_chain_hashed_in_pieces_is_the_chain() -> None:
    tokens = [(i * 7919) % 150_000 for i in range(16 * 50 + 5)]
    whole = block_hashes(tokens, 16, "0")
    head = block_hashes(tokens[: 16 * 13], 16, "0")
    tail = block_hashes(tokens[16 * 13 :], 16, "0", parent=head[-1])
    assert head + tail == whole
    assert block_hashes(tokens[16 * 13 :], 16, "0") != tail  # the parent is what chains


def test_negative_ids_encode_as_cbor_does() -> None:
    tokens = [-1, -25, 3, 70_000] * 8
    assert block_hashes(tokens, 16) == _one_by_one(tokens, 16, 10)


def test_ids_beyond_64_bits_are_refused() -> None:
    with pytest.raises(ValueError):
        block_hashes([1, 2**64, 3, 4], 2)


def test_threads_growing_the_encoding_table_agree() -> None:
    from concurrent.futures import ThreadPoolExecutor

    from epp.kv_events import hashing

    hashing._TOKEN_TABLE.clear()
    prompts = [list(range(40_000 + 20_000 * i, 40_200 + 20_000 * i)) * 4 for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda p: block_hashes(p, 16), prompts))
    assert got == [_one_by_one(p, 16, 10**6) for p in prompts]
    table = hashing._TOKEN_TABLE
    assert all(table[t] == cbor_encode(t) for t in range(0, len(table), 997))


def test_encodings_made_a_range_at_a_time_are_cbors() -> None:
    from epp.kv_events.hashing import _token_cbor, _token_cbors

    for start, stop in ((0, 70_000), (20, 300), (65_530, 65_540), (200_000, 200_010), (5, 5)):
        assert _token_cbors(start, stop) == [cbor_encode(t) for t in range(start, stop)]
        assert _token_cbors(start, stop) == [_token_cbor(t) for t in range(start, stop)]
    assert _token_cbors(2**32 - 2, 2**32) == [cbor_encode(2**32 - 2), cbor_encode(2**32 - 1)]
