"""burst-prefix-cache-producer as llm-d's README describes it: batching window,
identical groups kept whole, maxPerReplica spill, minColocateBlocks co-location
bounded by fair share, token balancing, maxBatchSize, and the match it leaves."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from pydantic import ValidationError

from epp.config import load_config
from epp.datastore import Endpoint
from epp.plugins.prefix_burst_producer import BurstEntry, BurstPrefixCacheProducer, assign
from epp.plugins.prefix_producer import PREFIX_MATCH, match_key
from epp.plugins.prefix_scorer import PrefixCacheScorer, PrefixScorerParams
from epp.scheduling.cycle import CycleState

from .helpers import cycle, endpoint

HEAD = "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\n"


def _h(*blocks: str) -> list[bytes]:
    return [b.encode() for b in blocks]


def _replicas(n: int = 3) -> list[Endpoint]:
    return [endpoint(f"r{i}", 8000 + i) for i in range(n)]


def _assigned(entries: list[BurstEntry]) -> list[str | None]:
    return [e.assigned.name if e.assigned is not None else None for e in entries]


def test_an_identical_group_goes_whole_to_one_replica() -> None:
    eps = _replicas()
    group = [BurstEntry(_h("a", "b"), eps) for _ in range(5)]
    assign(group)
    assert len(set(_assigned(group))) == 1 and None not in _assigned(group)


def test_max_per_replica_fills_one_then_spills_to_the_least_loaded() -> None:
    eps = _replicas()
    group = [BurstEntry(_h("a"), eps) for _ in range(5)]
    assign(group, max_per_replica=2)
    names = _assigned(group)
    assert names[:2] == ["r0", "r0"] and names[2:4] == ["r1", "r1"] and names[4] == "r2"


def test_lone_and_empty_requests_get_no_affinity() -> None:
    eps = _replicas()
    lone = BurstEntry(_h("x", "y"), eps)
    empty = BurstEntry([], eps)
    pair = [BurstEntry(_h("p"), eps), BurstEntry(_h("p"), eps)]
    assign([lone, empty, *pair])
    assert lone.assigned is None and empty.assigned is None
    assert pair[0].assigned is pair[1].assigned is not None


def test_groups_are_balanced_across_replicas() -> None:
    eps = _replicas()
    g1 = [BurstEntry(_h("g1"), eps) for _ in range(2)]
    g2 = [BurstEntry(_h("g2"), eps) for _ in range(2)]
    g3 = [BurstEntry(_h("g3"), eps) for _ in range(2)]
    assign([*g1, *g2, *g3])
    assert {g[0].assigned.name for g in (g1, g2, g3) if g[0].assigned} == {"r0", "r1", "r2"}


def test_min_colocate_blocks_places_prefix_sharing_units_together() -> None:
    eps = _replicas(2)
    longest = [BurstEntry(_h("b1", "b2", "b3", "b4"), eps) for _ in range(3)]
    group = [BurstEntry(_h("s1", "s2", "g"), eps) for _ in range(3)]
    # A distinct prompt sharing the group's two leading blocks: a unit of its own,
    # placed with the group although the other replica is as loaded.
    sharer = BurstEntry(_h("s1", "s2", "other"), eps)
    stranger = BurstEntry(_h("z1", "z2"), eps)
    assign([*longest, *group, sharer, stranger], min_colocate_blocks=2)
    assert _assigned(longest) == ["r0"] * 3 and _assigned(group) == ["r1"] * 3
    assert sharer.assigned is group[0].assigned
    assert stranger.assigned is None  # shares nothing: no affinity
    # Without the setting only identical groups are placed.
    again = [BurstEntry(_h("s1", "s2", "g"), eps) for _ in range(2)]
    sharer2 = BurstEntry(_h("s1", "s2", "other"), eps)
    assign([*again, sharer2])
    assert sharer2.assigned is None


def test_colocation_stops_at_the_fair_share() -> None:
    eps = _replicas(2)
    # Four units sharing a prefix: fair share is 2 of 4 per replica.
    units = [BurstEntry(_h("s", str(i)), eps) for i in range(4)]
    assign(units, min_colocate_blocks=1)
    names = _assigned(units)
    assert names.count("r0") == 2 and names.count("r1") == 2


def test_balance_by_tokens_spreads_long_prefixes() -> None:
    eps = _replicas(2)
    long = [BurstEntry(_h(*[f"l{i}" for i in range(10)]), eps) for _ in range(2)]
    short1 = [BurstEntry(_h("a"), eps) for _ in range(3)]
    short2 = [BurstEntry(_h("b"), eps) for _ in range(3)]
    assign([*long, *short1, *short2], by_tokens=True)
    # The 10-block group loads one replica; both short groups go to the other.
    assert long[0].assigned is not short1[0].assigned
    assert short1[0].assigned is short2[0].assigned
    assign(new := [*[BurstEntry(e.hashes, eps) for e in (*long, *short1, *short2)]])
    by_requests = _assigned(new)
    assert by_requests[2] != by_requests[5]  # by requests the short groups split


def test_ties_prefer_the_replica_running_fewer_requests() -> None:
    busy = endpoint("busy", 1, running=5)
    idle = endpoint("idle", 2, running=0)
    group = [BurstEntry(_h("g"), [busy, idle]) for _ in range(2)]
    assign(group)
    assert group[0].assigned is idle


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"windowDurationMs": 0}, "windowDurationMs"),
        ({"windowDurationMs": 10001}, "windowDurationMs"),
        ({"maxPerReplica": 0}, "maxPerReplica"),
        ({"maxBatchSize": 0}, "maxBatchSize"),
        ({"blockSizeTokens": 64, "maxPrefixTokensToMatch": 10}, "maxPrefixTokensToMatch"),
        ({"balanceBy": "bytes"}, "balanceBy"),
        ({"minColocateBlocks": -1}, "minColocateBlocks"),
    ],
)
def test_bad_parameters_are_refused(params: dict[str, object], field: str) -> None:
    with pytest.raises(ValidationError, match=field):
        BurstPrefixCacheProducer.Params.model_validate(params)


def _same_prompt(n: int) -> list[CycleState]:
    text = "rollout prompt shared by every sample of the group " * 10
    return [cycle(text) for _ in range(n)]


async def test_a_burst_within_the_window_is_placed_on_one_replica() -> None:
    producer = BurstPrefixCacheProducer(
        BurstPrefixCacheProducer.Params.model_validate({"windowDurationMs": 50})
    )
    eps = _replicas()
    cycles = _same_prompt(4)
    t0 = time.monotonic()
    await asyncio.gather(*(producer.prefetch(c, eps) for c in cycles))
    waited = time.monotonic() - t0
    assert 0.04 <= waited < 5.0  # every request waited for the window to close
    assert producer.batches == 1
    scorer = PrefixCacheScorer(
        PrefixScorerParams.model_validate({"prefixMatchInfoProducerName": producer.name})
    )
    winners = set()
    for c in cycles:
        match = c.get(match_key(producer.name))
        assert match is not None and match.source == "burst"
        assert c.get(PREFIX_MATCH) is None  # the default slot is the approximate producer's
        scores = list(scorer.score(c, eps))
        assert sorted(scores) == [0.0, 0.0, 1.0]
        winners.add(scores.index(1.0))
    assert len(winners) == 1


async def test_a_request_past_max_batch_size_gets_no_affinity() -> None:
    producer = BurstPrefixCacheProducer(
        BurstPrefixCacheProducer.Params.model_validate({"windowDurationMs": 50, "maxBatchSize": 2})
    )
    eps = _replicas()
    cycles = _same_prompt(3)
    await asyncio.gather(*(producer.prefetch(c, eps) for c in cycles))
    assert [c.get(match_key(producer.name)) is not None for c in cycles] == [True, True, False]


async def test_a_later_window_is_a_new_batch() -> None:
    producer = BurstPrefixCacheProducer(
        BurstPrefixCacheProducer.Params.model_validate({"windowDurationMs": 20})
    )
    eps = _replicas()
    first = cycle(json.dumps("only one"))
    await producer.prefetch(first, eps)
    await producer.prefetch(cycle("another"), eps)
    assert producer.batches == 2
    match = first.get(match_key(producer.name))
    assert match is not None and not match.matched  # alone in its window: no affinity


def test_the_shipped_burst_config_wires_token_burst_and_scorer() -> None:
    config = load_config(
        HEAD
        + """plugins:
- {type: token-producer}
- {type: burst-prefix-cache-producer, parameters: {windowDurationMs: 100, maxPerReplica: -1, minColocateBlocks: 0}}
- {type: prefix-cache-scorer, parameters: {prefixMatchInfoProducerName: burst-prefix-cache-producer}}
schedulingProfiles:
- name: default
  plugins: [{pluginRef: prefix-cache-scorer}]
"""
    )
    names = [p.type_name for p in config.scheduler.producers]
    assert names == ["token-producer", "burst-prefix-cache-producer"]
