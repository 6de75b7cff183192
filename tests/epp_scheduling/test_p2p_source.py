"""p2p-source-producer: a peer that out-caches the computing pod is named in
``x-kv-cache-source-host-port`` (unit tests, then through the Director with simulated
engines behind file discovery)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pydantic
import pytest

from common.routing_headers import KV_CACHE_SOURCE_HOST_PORT
from epp.decision import Decision
from epp.extproc.responses import routing_mutation
from epp.plugins.base import PluginSet
from epp.plugins.p2p_source_producer import (
    P2PSourceProducer,
    SourceCandidate,
    pick_source,
    spread_fraction,
)
from epp.plugins.prefix_producer import PREFIX_MATCH, PrefixMatch, match_key
from epp.plugins.registry import create_plugin
from epp.scheduling.cycle import REQUEST_HEADERS
from epp.scheduling.result import ProfileResult, SchedulingResult
from tests.epp_scheduling.fixtures import MakePool, make_pool, pd_config
from tests.epp_scheduling.helpers import chat_body, cycle, endpoint

__all__ = ["make_pool"]

BLOCK = 64
D1, D2, P1 = (
    endpoint("d1", 8000, "decode"),
    endpoint("d2", 8001, "decode", waiting=3),
    endpoint("p1", 8002, "prefill"),
)


def _match(blocks: dict[str, int], total: int = 10) -> PrefixMatch:
    return PrefixMatch(
        hashes=[bytes([i]) for i in range(total)],
        matched=blocks,
        block_bytes=BLOCK,
        prompt_bytes=total * BLOCK,
        prompt_tokens=total * BLOCK,
        block_tokens=BLOCK,
    )


def _scheduled(
    producer: P2PSourceProducer, blocks: dict[str, int], result: SchedulingResult, rid: str = "r"
) -> str | None:
    c = cycle(headers={"x-request-id": rid})
    c.put(PREFIX_MATCH, _match(blocks))
    producer.prepare(c, [D1, D2, P1])
    producer.track(c, result)
    headers = c.get(REQUEST_HEADERS) or {}
    return headers.get(KV_CACHE_SOURCE_HOST_PORT)


def _decode_only(ep: object) -> SchedulingResult:
    return SchedulingResult(results={"decode": ProfileResult([ep])}, primary="decode")  # type: ignore[list-item]


def test_the_peer_holding_more_than_the_pick_is_named() -> None:
    producer = P2PSourceProducer()
    assert _scheduled(producer, {D1.key: 6}, _decode_only(D2)) == D1.key
    # The pick holds as much: nothing to pull.
    assert _scheduled(producer, {D1.key: 6, D2.key: 6}, _decode_only(D2)) is None
    # The pick itself holds the most: never a pull from oneself.
    assert _scheduled(producer, {D1.key: 6}, _decode_only(D1)) is None
    # Nobody holds anything.
    assert _scheduled(producer, {}, _decode_only(D1)) is None


def test_under_pd_the_prefill_pick_is_the_computing_pod() -> None:
    producer = P2PSourceProducer()
    result = SchedulingResult(
        results={"decode": ProfileResult([D2]), "prefill": ProfileResult([P1])},
        primary="decode",
        prefill_profile="prefill",
    )
    # The decode pick holds the prefix, the prefill pick does not: pull to the prefill.
    assert _scheduled(producer, {D2.key: 5}, result) == D2.key
    # The prefill pick holds it: nothing to pull.
    assert _scheduled(producer, {D2.key: 5, P1.key: 5}, result) is None
    # A renamed prefill profile is read through prefillProfileName.
    renamed = SchedulingResult(
        results={"decode": ProfileResult([D2]), "pf": ProfileResult([P1])}, primary="decode"
    )
    named = create_plugin("p2p-source-producer", None, {"prefillProfileName": "pf"})
    assert isinstance(named, P2PSourceProducer)
    assert _scheduled(named, {D2.key: 5}, renamed) == D2.key
    # Without the name the primary pick (D2, holding the most) computes: no pull.
    assert _scheduled(producer, {D2.key: 5}, renamed) is None


def test_min_cached_token_delta_suppresses_short_prefixes() -> None:
    strict = create_plugin("p2p-source-producer", None, {"minCachedTokenDelta": 2 * BLOCK + 1})
    assert isinstance(strict, P2PSourceProducer)
    # Two blocks more (128 tokens) is below the threshold, three blocks is enough.
    assert _scheduled(strict, {D1.key: 4, D2.key: 2}, _decode_only(D2)) is None
    assert _scheduled(strict, {D1.key: 5, D2.key: 2}, _decode_only(D2)) == D1.key


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"minCachedTokenDelta": 0}, "minCachedTokenDelta"),
        ({"minCachedTokenDelta": "many"}, "minCachedTokenDelta"),
        ({"prefillProfile": "x"}, "prefillProfile"),
    ],
)
def test_bad_parameters_name_the_field(params: dict[str, object], field: str) -> None:
    with pytest.raises(pydantic.ValidationError, match=field):
        create_plugin("p2p-source-producer", None, params)


def test_a_named_producer_must_exist() -> None:
    producer = create_plugin(
        "p2p-source-producer", None, {"prefixMatchInfoProducerName": "precise"}
    )
    assert isinstance(producer, P2PSourceProducer) and not producer.needs_prefix_producer
    with pytest.raises(ValueError, match="prefixMatchInfoProducerName"):
        producer.bind(PluginSet())
    # It reads that producer's match, not the default one.
    c = cycle()
    c.put(PREFIX_MATCH, _match({D1.key: 9}))
    c.put(match_key("precise"), _match({}))
    producer.prepare(c, [D1, D2])
    assert producer.source_for(c, _decode_only(D2)) is None
    assert P2PSourceProducer().needs_prefix_producer


def test_sampling_stays_within_one_block_of_the_best_and_spreads_by_load() -> None:
    candidates = [
        SourceCandidate("a:1", 8, 8 * BLOCK, 0),
        SourceCandidate("b:1", 7, 7 * BLOCK, 0),  # one block short: in the band
        SourceCandidate("c:1", 6, 6 * BLOCK, 0),  # two blocks short: never
        SourceCandidate("d:1", 8, 8 * BLOCK, 9),  # in the band, deeply queued
    ]
    picks = Counter(
        chosen.key
        for i in range(2000)
        if (chosen := pick_source(candidates, f"req-{i}")) is not None
    )
    assert set(picks) == {"a:1", "b:1", "d:1"}
    # Weights 1 : 1 : 0.1 -> about 47.6 % : 47.6 % : 4.8 %; wide margins.
    assert 800 < picks["a:1"] < 1100 and 800 < picks["b:1"] < 1100
    assert 40 < picks["d:1"] < 160
    # The same request id always gets the same source.
    assert pick_source(candidates, "req-7") == pick_source(candidates, "req-7")
    assert pick_source([SourceCandidate("a:1", 0, 0, 0)], "x") is None
    assert 0.0 <= spread_fraction("") < 1.0


def test_the_gateway_drops_a_client_copy_of_the_header() -> None:
    removed = routing_mutation(Decision(decode="10.0.0.1:8000")).remove_headers
    assert KV_CACHE_SOURCE_HOST_PORT in removed
    decision = Decision(
        decode="10.0.0.1:8000", headers={KV_CACHE_SOURCE_HOST_PORT: "10.0.0.2:8000"}
    )
    mutation = routing_mutation(decision)
    assert KV_CACHE_SOURCE_HOST_PORT not in mutation.remove_headers
    assert {h.header.key: h.header.raw_value for h in mutation.set_headers}[
        KV_CACHE_SOURCE_HOST_PORT
    ] == b"10.0.0.2:8000"


P2P_PLUGINS = """
- type: header-based-testing-filter
- type: approx-prefix-cache-producer
  parameters: {blockSizeTokens: 64, autoTune: false}
- type: p2p-source-producer
- type: max-score-picker
- type: single-profile-handler
"""

P2P_PROFILES = """
- name: default
  plugins:
  - pluginRef: header-based-testing-filter
  - pluginRef: max-score-picker
"""

LONG = "the shared context every agent starts from " * 60


async def test_director_names_the_pod_that_served_the_prefix(
    make_pool: MakePool, tmp_path: Path
) -> None:
    config = pd_config(tmp_path / "endpoints.yaml", P2P_PLUGINS, P2P_PROFILES)
    pool = await make_pool({"d1": "decode", "d2": "decode"}, config=config)
    d1, d2 = pool.keys["d1"], pool.keys["d2"]

    async def decide(on: str, client_headers: dict[str, str] | None = None) -> Decision:
        headers = {"test-epp-endpoint-selection": on, **(client_headers or {})}
        decision = await pool.director.decide(
            "/v1/chat/completions", headers, chat_body(LONG), None
        )
        decision.on_finished()
        assert decision.decode == on
        return decision

    first = await decide(d1, {KV_CACHE_SOURCE_HOST_PORT: "10.9.9.9:1"})
    assert KV_CACHE_SOURCE_HOST_PORT not in first.headers  # nobody held it; client copy gone
    second = await decide(d2)
    assert second.headers[KV_CACHE_SOURCE_HOST_PORT] == d1  # d1 computed it first
    third = await decide(d1)
    assert KV_CACHE_SOURCE_HOST_PORT not in third.headers  # both hold it now
