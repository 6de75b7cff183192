"""The approximate prefix index, its producer and the prefix-cache scorer."""

from __future__ import annotations

from epp.plugins.prefix_index import PrefixIndex, block_hashes
from epp.plugins.prefix_producer import PREFIX_MATCH, ApproxPrefixCacheProducer, PrefixParams
from epp.plugins.prefix_scorer import PrefixCacheScorer
from epp.scheduling.result import ProfileResult, SchedulingResult

from .helpers import cycle, endpoint


def test_block_hashes_chain_and_cap() -> None:
    a = block_hashes(b"A" * 64 + b"B" * 64 + b"C" * 10, 64, 100)
    assert len(a) == 2  # the partial block is not hashed
    b = block_hashes(b"Z" * 64 + b"B" * 64, 64, 100)
    # Same second block, different first: the chain makes the second hash differ.
    assert a[1] != b[1]
    assert block_hashes(b"A" * 64 + b"B" * 64, 64, 100) == a
    assert len(block_hashes(b"x" * 6400, 64, 10)) == 10
    assert block_hashes(b"short", 64, 10) == []


def test_index_longest_leading_run() -> None:
    idx = PrefixIndex(capacity_per_endpoint=100)
    h = [bytes([i]) * 16 for i in range(6)]
    idx.record("a", h[:4])
    idx.record("b", h[:2])
    idx.record("c", h[1:6])  # holds later blocks but not the first: no leading run
    assert idx.match(h) == {"a": 4, "b": 2}
    assert idx.match(h[:1]) == {"a": 1, "b": 1}
    assert idx.match([]) == {}
    assert idx.match([b"?" * 16]) == {}


def test_index_full_match() -> None:
    idx = PrefixIndex(10)
    h = [bytes([i]) * 16 for i in range(3)]
    idx.record("a", h)
    assert idx.match(h) == {"a": 3}


def test_index_lru_is_bounded_and_evicts_oldest() -> None:
    idx = PrefixIndex(capacity_per_endpoint=3)
    old = [b"o" * 16]
    idx.record("a", old)
    new = [bytes([i]) * 16 for i in range(3)]
    idx.record("a", new)
    assert idx.size("a") == 3
    assert idx.match(old) == {}
    assert idx.match(new) == {"a": 3}
    assert idx.total_blocks() == 3


def test_index_remove_endpoint_frees_memory() -> None:
    idx = PrefixIndex(10)
    h = [b"1" * 16, b"2" * 16]
    idx.record("a", h)
    idx.record("b", h)
    idx.remove_endpoint("a")
    assert idx.match(h) == {"b": 2}
    idx.remove_endpoint("b")
    assert idx.total_blocks() == 0


def _result(decode: object, prefill: object | None = None) -> SchedulingResult:
    results = {"decode": ProfileResult([decode])}  # type: ignore[list-item]
    if prefill is not None:
        results["prefill"] = ProfileResult([prefill])  # type: ignore[list-item]
    return SchedulingResult(results, "decode", "prefill" if prefill is not None else None)  # type: ignore[arg-type]


def test_producer_records_decode_and_prefill_then_scorer_sees_it() -> None:
    producer = ApproxPrefixCacheProducer(PrefixParams(hash_block_size=16))
    scorer = PrefixCacheScorer()
    d, p, other = endpoint("d", 1, "decode"), endpoint("p", 2, "prefill"), endpoint("o", 3)
    text = "the quick brown fox jumps over the lazy dog " * 10
    c1 = cycle(text)
    producer.prepare(c1, [d, p, other])
    assert list(scorer.score(c1, [d, p, other])) == [0.0, 0.0, 0.0]
    producer.track(c1, _result(d, p))

    c2 = cycle(text)
    producer.prepare(c2, [d, p, other])
    assert list(scorer.score(c2, [d, p, other])) == [1.0, 1.0, 0.0]
    match = c2.get(PREFIX_MATCH)
    assert match is not None
    assert match.cached_tokens(d) > 0.8 * c2.request.token_estimate
    assert match.cached_tokens(other) == 0

    # A prompt sharing only the first half scores about one half.
    c3 = cycle(text[: len(text) // 2] + "completely different continuation " * 5)
    producer.prepare(c3, [d])
    score = scorer.score(c3, [d])[0]
    assert 0.2 < score < 0.8


def test_producer_drops_removed_endpoints() -> None:
    producer = ApproxPrefixCacheProducer()
    d = endpoint("d", 1)
    c = cycle("x" * 1000)
    producer.prepare(c, [d])
    producer.track(c, _result(d))
    assert producer.index.size(d.key) > 0
    producer.endpoints_changed([], [d])
    assert producer.index.size(d.key) == 0


def test_scorer_without_match_data_scores_zero() -> None:
    assert list(PrefixCacheScorer().score(cycle("abc"), [endpoint("a", 1)])) == [0.0]


def test_prefix_params_llm_d_names() -> None:
    params = PrefixParams.model_validate(
        {"hashBlockSize": 5, "maxPrefixBlocksToMatch": 256, "lruCapacityPerServer": 31250}
    )
    assert params.hash_block_size == 5


def test_block_size_is_the_deprecated_name_of_block_size_tokens() -> None:
    params = PrefixParams.model_validate({"blockSize": 96, "autoTune": True})
    assert params.block_size_tokens == 96
    producer = ApproxPrefixCacheProducer(params)
    c = cycle("z" * 1000)  # 250 estimated tokens
    producer.prepare(c, [])
    match = c.get(PREFIX_MATCH)
    assert match is not None and match.block_tokens == 96
    assert len(match.hashes) == 3  # two full blocks and the partial tail
