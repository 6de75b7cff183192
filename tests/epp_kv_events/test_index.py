"""The block index: store/remove/clear per engine and medium, leading-run lookups, caps."""

from __future__ import annotations

import pytest

from epp.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KvBlockIndex
from epp.kv_events.index import medium_bit

GPU = medium_bit("GPU")
CPU = medium_bit("CPU")


def test_leading_run_per_engine() -> None:
    idx = KvBlockIndex(100)
    idx.store("a", [1, 2, 3])
    idx.store("b", [1, 3])
    assert idx.match([1, 2, 3, 4], ["a", "b", "c"]) == {"a": 3, "b": 1}
    assert idx.match([9, 1], ["a", "b"]) == {}
    assert idx.match([], ["a"]) == {}


def test_apply_events_and_media() -> None:
    idx = KvBlockIndex(100)
    idx.apply(
        "a",
        [
            BlockStored((1, 2), None, (), 16),
            BlockStored((1, 2), None, (), 16, medium="CPU"),
            BlockRemoved((2,), "GPU"),
        ],
    )
    assert idx.match([1, 2], ["a"], GPU) == {"a": 1}
    assert idx.match([1, 2], ["a"], CPU) == {"a": 2}
    assert idx.match([1, 2], ["a"], GPU | CPU) == {"a": 2}
    idx.apply("a", [AllBlocksCleared()])
    assert idx.match([1], ["a"], GPU | CPU) == {}
    assert idx.knows("a")  # cleared, still a live publisher


def test_remove_unknown_is_harmless() -> None:
    idx = KvBlockIndex(10)
    idx.remove("x", [1])
    idx.store("a", [1])
    idx.remove("a", [2, 1])
    assert idx.engine_blocks("a") == 0


def test_capacity_evicts_oldest_stored() -> None:
    idx = KvBlockIndex(3)
    idx.store("a", [1, 2, 3])
    idx.store("a", [1])  # refreshes 1
    idx.store("a", [4])
    assert idx.engine_blocks("a") == 3
    assert idx.evicted == 1
    assert idx.match([1], ["a"]) == {"a": 1}
    assert idx.match([2], ["a"]) == {}


def test_drop_engine_and_totals() -> None:
    idx = KvBlockIndex(10)
    idx.store("a", [1, 2])
    idx.store("b", [1])
    assert idx.total_blocks() == 3
    idx.drop_engine("a")
    assert not idx.knows("a")
    assert idx.engines() == ["b"]
    assert idx.total_blocks() == 1


def test_capacity_must_be_positive() -> None:
    with pytest.raises(ValueError):
        KvBlockIndex(0)


def test_leading_runs_equal_a_block_by_block_walk() -> None:
    import random

    rng = random.Random(9)
    idx = KvBlockIndex(10_000)
    engines = [f"e{i}" for i in range(12)]
    prompt = list(range(1, 400))
    for e in engines:
        idx.store(e, prompt[: rng.randrange(0, 400)], rng.choice(["GPU", "CPU"]))
        idx.store(e, rng.sample(prompt, 50), rng.choice(["GPU", "CPU"]))
        idx.remove(e, rng.sample(prompt, 3), rng.choice(["GPU", "CPU"]))
    for media in (GPU, CPU, GPU | CPU):
        want = {}
        for e in engines:
            n = 0
            for h in prompt:
                if not idx._engines[e].get(h, 0) & media:
                    break
                n += 1
            if n:
                want[e] = n
        assert idx.match(prompt, engines, media) == want
