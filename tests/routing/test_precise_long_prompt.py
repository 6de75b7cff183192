"""A long prompt's block hashes are computed in slices, the event loop turning between
them, and are the same."""

from __future__ import annotations

import asyncio
import json
from array import array

from epp.datastore import Endpoint
from epp.kv_events.hashing import BlockHashMemo, block_hashes, hash_keys
from epp.plugins.precise_prefix_producer import (
    HASH_SLICE_BLOCKS,
    PRECISE_PROMPT,
    PrecisePrefixCacheProducer,
)
from epp.request import parse_request
from epp.scheduling.cycle import CycleState


async def _prefetch(producer: PrecisePrefixCacheProducer, tokens: list[int]) -> CycleState:
    """The prompt's prefetch with an endpoint holding all its blocks (so all are hashed)."""
    ep = Endpoint("e", "127.0.0.1", 1)
    held = hash_keys(block_hashes(tokens, 16, max_blocks=4096))
    producer.index.store(ep.key, [1, *held])  # it has published: precise is used
    body = json.dumps({"model": "m", "prompt": tokens, "max_tokens": 1}).encode()
    cycle = CycleState(parse_request("/v1/completions", {}, body), 0.0, 1.0)
    await producer.prefetch(cycle, [ep])
    return cycle


async def test_long_prompt_hashes_match_and_the_loop_keeps_running() -> None:
    producer = PrecisePrefixCacheProducer(PrecisePrefixCacheProducer.Params(kvEventsPort=1))
    try:
        short = list(range(16 * 10 + 3))
        cycle = await _prefetch(producer, short)
        prompt = cycle.get(PRECISE_PROMPT)
        assert prompt is not None
        assert prompt.hashes == block_hashes(short, 16)

        long = [i % 31_000 for i in range(16 * 4096 * 2)]  # twice the match cap
        ticks = 0
        hashing = True

        async def tick() -> None:
            nonlocal ticks
            while hashing:
                ticks += 1
                await asyncio.sleep(0)

        ticker = asyncio.create_task(tick())
        await asyncio.sleep(0)
        start = ticks
        cycle = await _prefetch(producer, long)
        during = ticks - start
        hashing = False
        await ticker
        assert isinstance(cycle.request.body["prompt"], array)  # a long body: read packed
        prompt = cycle.get(PRECISE_PROMPT)
        assert prompt is not None
        assert len(prompt.hashes) == 4096 > HASH_SLICE_BLOCKS
        assert prompt.hashes == block_hashes(long, 16, max_blocks=4096)
        assert prompt.tokens == len(long)
        # Other work ran on the loop between every two slices of the 4096 blocks.
        assert during >= 4096 // HASH_SLICE_BLOCKS - 1
    finally:
        await producer.aclose()


async def test_a_prompt_that_starts_like_a_recent_one_is_hashed_from_where_it_departs() -> None:
    producer = PrecisePrefixCacheProducer(PrecisePrefixCacheProducer.Params(kvEventsPort=1))
    try:
        document = [(i * 7919) % 150_000 for i in range(16 * HASH_SLICE_BLOCKS * 3)]
        first = document + [1, 2, 3] * 700
        await _prefetch(producer, first)
        kept = len(producer._hashed)
        assert kept == 4  # three slices of the document, one of the first question

        # The same document, another question: only the question's slice is hashed.
        second = document + [4, 5, 6] * 700
        cycle = await _prefetch(producer, second)
        prompt = cycle.get(PRECISE_PROMPT)
        assert prompt is not None
        whole = block_hashes(second, 16)
        assert prompt.hashes == whole
        assert prompt.keys == hash_keys(whole)
        assert len(producer._hashed) == kept + 1

        # A prompt departing inside the first slice shares nothing: hashed whole.
        third = [9, *document[1:]]
        cycle = await _prefetch(producer, third)
        prompt = cycle.get(PRECISE_PROMPT)
        assert prompt is not None and prompt.hashes == block_hashes(third, 16)
        assert len(producer._hashed) == kept + 1 + 3
    finally:
        await producer.aclose()


def test_the_memo_is_exact_and_bounded() -> None:
    memo = BlockHashMemo(max_runs=2)
    ids = list(range(64))
    a = BlockHashMemo.key(ids, 16, None, None)
    assert a is not None
    assert BlockHashMemo.key(ids, 16, "seed", None) != a  # the seed is part of the key
    assert BlockHashMemo.key(ids, 16, None, b"\x01" * 32) != a  # so is the parent
    assert BlockHashMemo.key(ids, 32, None, None) != a
    assert BlockHashMemo.key([2**64, *ids], 16, None, None) is None  # not kept
    hashes = block_hashes(ids, 16)
    memo.put(a, hashes, hash_keys(hashes))
    same = BlockHashMemo.key(list(ids), 16, None, None)
    assert same == a and memo.get(same) == (hashes, hash_keys(hashes))
    for n in (1, 2):
        other = BlockHashMemo.key([*ids, n], 16, None, None)
        assert other is not None
        memo.put(other, [], [])
    assert len(memo) == 2 and memo.get(a) is None  # the least recently used went first


def test_memo_keys_of_32_and_64_bit_packings_stay_apart() -> None:
    # [-1] packs as eight 0xff bytes as a signed 64-bit int, as [2**32 - 1, 2**32 - 1]
    # does as two unsigned 32-bit ones: the same bytes, different runs.
    wide = BlockHashMemo.key([-1], 1, None, None)
    narrow = BlockHashMemo.key([2**32 - 1, 2**32 - 1], 1, None, None)
    assert wide is not None and narrow is not None
    assert wide[-1] == narrow[-1] and wide != narrow
    # [2**32] (64-bit) and [0, 1] (32-bit) pack to the same eight bytes too.
    assert BlockHashMemo.key([2**32], 1, None, None) != BlockHashMemo.key([0, 1], 1, None, None)
    # Ids read packed (64-bit) are keyed as their 64-bit packing: the same run as ids
    # that only fit 64 bits.
    assert BlockHashMemo.key(array("q", [-1]), 1, None, None) == wide
    assert BlockHashMemo.key(array("q", [5, 6]), 1, "s", b"p") == (
        "s",
        1,
        b"p",
        "q",
        array("q", [5, 6]).tobytes(),
    )


async def test_the_producer_encodes_every_vocabulary_id_before_the_first_prompt() -> None:
    from epp.kv_events import hashing
    from epp.kv_events.hashing import cbor_encode

    hashing._TOKEN_TABLE.clear()
    producer = PrecisePrefixCacheProducer(PrecisePrefixCacheProducer.Params(kvEventsPort=1))
    try:
        table = hashing._TOKEN_TABLE
        assert len(table) == hashing._TABLE_MAX
        assert all(table[t] == cbor_encode(t) for t in range(0, len(table), 4099))
    finally:
        await producer.aclose()


async def test_client_token_ids_are_shared_with_the_fallback_as_is() -> None:
    from epp.plugins.token_producer import TOKENIZED_PROMPT, tokenized_prompt

    producer = PrecisePrefixCacheProducer(PrecisePrefixCacheProducer.Params(kvEventsPort=1))
    try:
        tokens = [i % 500 for i in range(16 * 20)]
        cycle = await _prefetch(producer, tokens)
        shared = cycle.get(TOKENIZED_PROMPT)
        assert shared is not None and shared.backend == "request"
        assert shared.token_ids is cycle.request.body["prompt"]
        assert list(shared.token_ids) == tokens
        assert tokenized_prompt(cycle) is shared  # the fallback's estimate reuses it
        assert cycle.request.token_estimate == len(tokens)
    finally:
        await producer.aclose()


async def test_with_events_serving_the_fallback_hashes_the_prompt_after_the_decision() -> None:
    from epp.plugins.precise_prefix_producer import _APPROX_MATCH
    from epp.plugins.prefix_producer import PREFIX_MATCH
    from epp.scheduling.result import ProfileResult, SchedulingResult

    producer = PrecisePrefixCacheProducer(PrecisePrefixCacheProducer.Params(kvEventsPort=1))
    try:
        ep = Endpoint("e", "127.0.0.1", 1)
        tokens = [i % 900 for i in range(16 * 300)]
        cycle = await _prefetch(producer, tokens)
        expected = producer.fallback.compute(cycle, [ep])
        assert expected.hashes and expected.matched == {}
        producer.prepare(cycle, [ep])
        match = cycle.get(PREFIX_MATCH)
        assert match is not None and match.source == "precise"
        assert cycle.get(_APPROX_MATCH) is None  # nothing done for the fallback yet
        producer.track(cycle, SchedulingResult({"d": ProfileResult([ep])}, "d"))
        assert producer.fallback.index.match(expected.hashes) == {}  # not before the loop turns
        await asyncio.sleep(0)
        approx = cycle.get(_APPROX_MATCH)
        assert approx is not None and approx.hashes == expected.hashes
        assert approx.matched == {}  # the fallback was not looked up
        assert producer.fallback.index.match(expected.hashes) == {ep.key: len(expected.hashes)}

        # Without events for the candidates the fallback serves, and is looked up.
        other = Endpoint("o", "127.0.0.2", 1)
        fresh = await _prefetch(producer, tokens)
        producer.prepare(fresh, [other])
        served = fresh.get(PREFIX_MATCH)
        assert served is not None and served.source == "approximate"
        assert served.matched == {ep.key: len(expected.hashes)}
        producer.track(fresh, SchedulingResult({"d": ProfileResult([other])}, "d"))
        assert producer.fallback.index.match(expected.hashes) == {
            ep.key: len(expected.hashes),
            other.key: len(expected.hashes),
        }  # recorded at once: the blocks were there
    finally:
        await producer.aclose()


async def test_a_long_prompt_warms_the_fallback_in_slices_with_the_same_hashes() -> None:
    from epp.plugins.prefix_producer import HASH_SLICE_BLOCKS as APPROX_SLICE_BLOCKS
    from epp.scheduling.result import ProfileResult, SchedulingResult

    producer = PrecisePrefixCacheProducer(PrecisePrefixCacheProducer.Params(kvEventsPort=1))
    try:
        ep = Endpoint("e", "127.0.0.1", 1)
        tokens = [i % 31_000 for i in range(64 * 2048 + 5)]  # the fallback's 2048-block cap
        cycle = await _prefetch(producer, tokens)
        expected = producer.fallback.compute(cycle, [ep], match=False)
        assert len(expected.hashes) == 2048 > APPROX_SLICE_BLOCKS
        producer.prepare(cycle, [ep])
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while not producer.fallback.index.match(expected.hashes):
                ticks += 1
                await asyncio.sleep(0)

        ticker = asyncio.create_task(tick())
        await asyncio.sleep(0)
        start = ticks
        producer.track(cycle, SchedulingResult({"d": ProfileResult([ep])}, "d"))
        await asyncio.wait_for(ticker, 10)
        assert producer.fallback.index.match(expected.hashes) == {ep.key: 2048}
        assert await producer.fallback.blocks_in_slices(cycle, [ep]) == expected  # at the cap
        # The loop turned between every two slices of the 2048 blocks.
        assert ticks - start >= 2048 // APPROX_SLICE_BLOCKS - 1
        # A prompt that ends in a partial block, under the cap, is hashed the same way.
        short = await _prefetch(producer, tokens[: 64 * 700 + 9])
        producer.prepare(short, [ep])
        whole = producer.fallback.compute(short, [ep], match=False)
        assert len(whole.hashes) == 701
        sliced = await producer.fallback.blocks_in_slices(short, [ep])
        assert sliced == whole
    finally:
        await producer.aclose()


async def test_hashing_stops_where_no_run_can_go_on_and_ends_after_the_decision() -> None:
    from epp.plugins.prefix_producer import PREFIX_MATCH
    from epp.plugins.prefix_scorer import prefix_scores
    from epp.scheduling.result import ProfileResult, SchedulingResult

    ep, other = Endpoint("e", "127.0.0.1", 1), Endpoint("o", "127.0.0.2", 1)
    tokens = [(i * 7919) % 150_000 for i in range(16 * 4096 + 40)]
    whole = block_hashes(tokens, 16, max_blocks=4096)
    body = json.dumps({"model": "m", "prompt": tokens, "max_tokens": 1}).encode()

    def cycle_for() -> CycleState:
        return CycleState(parse_request("/v1/completions", {}, body), 0.0, 1.0)

    producer = PrecisePrefixCacheProducer(PrecisePrefixCacheProducer.Params(kvEventsPort=1))
    try:
        # One endpoint holds the first 300 blocks, a run that ends in the second slice.
        producer.index.store(ep.key, hash_keys(whole[:300]))
        producer.index.store(other.key, [1])
        cycle = cycle_for()
        await producer.prefetch(cycle, [ep, other])
        prompt = cycle.get(PRECISE_PROMPT)
        assert prompt is not None and prompt.blocks == 4096
        assert prompt.hashes == whole[: 2 * HASH_SLICE_BLOCKS]  # two slices hashed
        producer.prepare(cycle, [ep, other])
        match = cycle.get(PREFIX_MATCH)
        assert match is not None and match.source == "precise"
        assert match.matched == {ep.key: 300}  # what hashing every block gives
        assert match.total_blocks == 4096  # a share of the whole prompt
        assert prefix_scores(match, [ep, other]) == [300 / 4096, 0.0]
        assert len(producer._hashed) == 2

        # The rest is hashed once the decision is out, for the memo.
        producer.track(cycle, SchedulingResult({"d": ProfileResult([ep])}, "d"))
        assert len(producer._hashed) == 2

        await asyncio.wait_for(asyncio.gather(*producer._warming), 10)
        assert len(producer._hashed) == 4096 // HASH_SLICE_BLOCKS
        # Now the endpoint holds every block: all are looked up, from the memo.
        producer.index.store(ep.key, hash_keys(whole))
        again = cycle_for()
        await producer.prefetch(again, [ep, other])
        prompt = again.get(PRECISE_PROMPT)
        assert prompt is not None and prompt.hashes == whole
        assert len(producer._hashed) == 4096 // HASH_SLICE_BLOCKS  # nothing new hashed
        producer.prepare(again, [ep, other])
        match = again.get(PREFIX_MATCH)
        assert match is not None and match.matched == {ep.key: 4096}
    finally:
        await producer.aclose()

    # Speculative indexing predicts every block of the prompt: all are hashed at once.
    speculative = PrecisePrefixCacheProducer(
        PrecisePrefixCacheProducer.Params(kvEventsPort=1, speculativeIndexing=True)
    )
    try:
        speculative.index.store(other.key, [1])
        cycle = cycle_for()
        await speculative.prefetch(cycle, [other])
        prompt = cycle.get(PRECISE_PROMPT)
        assert prompt is not None and prompt.hashes == whole
    finally:
        await speculative.aclose()


async def test_at_most_a_few_prompts_are_hashed_after_their_decisions_at_once() -> None:
    from epp.plugins.precise_prefix_producer import MAX_HASHING_AFTER
    from epp.scheduling.result import ProfileResult, SchedulingResult

    ep = Endpoint("e", "127.0.0.1", 1)
    producer = PrecisePrefixCacheProducer(PrecisePrefixCacheProducer.Params(kvEventsPort=1))
    try:
        producer.index.store(ep.key, [1])  # live, holding none of the prompts
        cycles = []
        for n in range(MAX_HASHING_AFTER + 2):
            tokens = [(i * 7919 + n) % 150_000 for i in range(16 * 1024)]
            body = json.dumps({"model": "m", "prompt": tokens, "max_tokens": 1}).encode()
            cycle = CycleState(parse_request("/v1/completions", {}, body), 0.0, 1.0)
            await producer.prefetch(cycle, [ep])
            cycles.append(cycle)
        slices = 1024 // HASH_SLICE_BLOCKS
        assert len(producer._hashed) == len(cycles)  # one slice each before routing
        for cycle in cycles:  # decided in one turn of the loop
            producer.prepare(cycle, [ep])
            producer.track(cycle, SchedulingResult({"d": ProfileResult([ep])}, "d"))
        assert len(producer._hashing) == MAX_HASHING_AFTER
        await asyncio.wait_for(asyncio.gather(*producer._warming), 10)
        assert not producer._hashing
        assert len(producer._hashed) == MAX_HASHING_AFTER * slices + 2
    finally:
        await producer.aclose()
