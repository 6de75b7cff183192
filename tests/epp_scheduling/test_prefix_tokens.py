"""Token-based prefix matching as llm-d documents it: blockSizeTokens (raised to 64),
maxPrefixTokensToMatch / maxPrefixBlocksToMatch (both 0 = the whole prompt), autoTune
from engine metrics; the prefix-cache scorer's producer name and match-length weight;
the precise producer's nested llm-d settings and the deprecated precise scorer."""

from __future__ import annotations

import json
import logging

import pytest
from prometheus_client import CollectorRegistry
from pydantic import ValidationError

from epp.config import ConfigError, load_config
from epp.datastore import Endpoint
from epp.kv_events.hashing import block_hashes, external_hash
from epp.plugins.deprecated_aliases import PrecisePrefixCacheScorer
from epp.plugins.precise_prefix_producer import PreciseParams, PrecisePrefixCacheProducer
from epp.plugins.prefix_index import token_block_hashes
from epp.plugins.prefix_producer import (
    PREFIX_MATCH,
    ApproxPrefixCacheProducer,
    PrefixMatch,
    PrefixParams,
    match_key,
)
from epp.plugins.prefix_scorer import PrefixCacheScorer, PrefixScorerParams, prefix_scores
from epp.plugins.registry import create_plugin
from epp.plugins.token_estimate import TokenizedPrompt
from epp.plugins.token_producer import TOKENIZED_PROMPT
from epp.scheduling.cycle import CycleState
from epp.scheduling.result import ProfileResult, SchedulingResult
from tests.conftest import sample_sum

from .helpers import cycle, endpoint

HEAD = "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\n"


def _result(ep: Endpoint) -> SchedulingResult:
    return SchedulingResult(results={"default": ProfileResult([ep])}, primary="default")


def _match(c: CycleState, producer: str | None = None) -> PrefixMatch:
    found = c.get(match_key(producer) if producer else PREFIX_MATCH)
    assert found is not None
    return found


def _tokens(n: int, model: str = "m", start: int = 1000) -> CycleState:
    body = json.dumps({"model": model, "prompt": list(range(start, start + n))}).encode()
    return cycle(body=body, path="/v1/completions")


def test_token_block_hashes_include_the_tail_and_chain_on_the_model() -> None:
    ids = list(range(150))
    hashes = token_block_hashes(ids, 64, None, "m")
    assert len(hashes) == 3  # 64 + 64 + a partial 22
    assert token_block_hashes(ids[:128], 64, None, "m") == hashes[:2]
    assert token_block_hashes(ids, 64, None, "other")[0] != hashes[0]
    assert len(token_block_hashes(ids, 64, 1, "m")) == 1
    assert token_block_hashes([], 64, None, "m") == []
    # Hashed in pieces, each starting from the hash of the block before it: the same.
    head = token_block_hashes(ids[:128], 64, None, "m")
    assert head + token_block_hashes(ids[128:], 64, None, "m", parent=head[-1]) == hashes


def test_defaults_are_llm_ds() -> None:
    p = PrefixParams()
    assert (p.auto_tune, p.block_size_tokens, p.max_prefix_tokens_to_match) == (True, 16, 131072)
    assert (p.max_prefix_blocks_to_match, p.lru_capacity_per_server) == (2048, 31250)


def test_block_size_below_64_is_raised_to_64() -> None:
    producer = ApproxPrefixCacheProducer(PrefixParams(block_size_tokens=16, auto_tune=False))
    c = _tokens(200)
    producer.prepare(c, [])
    match = c.get(PREFIX_MATCH)
    assert match is not None and match.block_tokens == 64
    assert len(match.hashes) == 4  # 64 * 3 + 8
    big = ApproxPrefixCacheProducer(PrefixParams(block_size_tokens=100, auto_tune=False))
    c = _tokens(200)
    big.prepare(c, [])
    assert len(_match(c).hashes) == 2


@pytest.mark.parametrize(
    ("tokens_cap", "blocks_cap", "expected"),
    [
        (128, 1, 2),  # the token cap wins when > 0: 128 / 64
        (0, 3, 3),  # then the block cap
        (0, 0, 16),  # both 0: the whole prompt (1000 tokens -> 16 blocks)
    ],
)
def test_match_caps(tokens_cap: int, blocks_cap: int, expected: int) -> None:
    params = PrefixParams.model_validate(
        {
            "blockSizeTokens": 64,
            "autoTune": False,
            "maxPrefixTokensToMatch": tokens_cap,
            "maxPrefixBlocksToMatch": blocks_cap,
        }
    )
    producer = ApproxPrefixCacheProducer(params)
    c = _tokens(1000)
    producer.prepare(c, [])
    assert len(_match(c).hashes) == expected


def test_a_token_cap_below_one_block_is_refused() -> None:
    with pytest.raises(ValidationError, match="maxPrefixTokensToMatch"):
        PrefixParams.model_validate({"blockSizeTokens": 64, "maxPrefixTokensToMatch": 10})


def test_auto_tune_takes_the_engines_block_size_and_block_count() -> None:
    ep = endpoint("a", 1)
    ep.metrics.block_size = 128
    ep.metrics.num_gpu_blocks = 2
    tuned = ApproxPrefixCacheProducer(PrefixParams(auto_tune=True, block_size_tokens=64))
    c = _tokens(512)
    tuned.prepare(c, [ep])
    match = _match(c)
    assert match.block_tokens == 128 and len(match.hashes) == 4
    tuned.track(c, _result(ep))
    assert tuned.index.size(ep.key) == 2  # the engine's 2 GPU blocks bound its LRU
    fixed = ApproxPrefixCacheProducer(PrefixParams(auto_tune=False, block_size_tokens=64))
    c = _tokens(512)
    fixed.prepare(c, [ep])
    assert _match(c).block_tokens == 64
    fixed.track(c, _result(ep))
    assert fixed.index.size(ep.key) == 8


def test_estimate_tokens_route_repeats_to_the_same_endpoint() -> None:
    producer = ApproxPrefixCacheProducer()
    a, b = endpoint("a", 1), endpoint("b", 2)
    shared = "a long shared system prompt " * 40
    c = cycle(shared + "first question")
    producer.prepare(c, [a, b])
    producer.track(c, _result(a))
    c = cycle(shared + "second question")
    producer.prepare(c, [a, b])
    match = c.get(PREFIX_MATCH)
    assert match is not None and match.blocks(a) >= 3 and match.blocks(b) == 0
    assert c.get(TOKENIZED_PROMPT) is not None  # the estimate, computed once and kept
    scores = PrefixCacheScorer().score(c, [a, b])
    assert scores[0] > 0.5 and scores[1] == 0.0


def test_scorer_formula_with_match_length_weight() -> None:
    a, b = endpoint("a", 1), endpoint("b", 2)
    match = PrefixMatch(
        hashes=[b"x"] * 10,
        matched={a.key: 5},
        block_bytes=64,
        prompt_bytes=640,
        prompt_tokens=640,
        block_tokens=64,
    )
    assert prefix_scores(match, [a, b]) == [0.5, 0.0]
    # 5 blocks * 64 = 320 tokens of a 640 scale: (0.5)^2 = 0.25; 0.5*0.25 + 0.5*0.5.
    assert prefix_scores(match, [a], 0.5, 640) == [pytest.approx(0.375)]
    assert prefix_scores(match, [a], 1.0, 100) == [1.0]  # the length term saturates at 1
    assert prefix_scores(None, [a]) == [0.0]
    with pytest.raises(ValidationError, match="matchLengthWeight"):
        PrefixScorerParams.model_validate({"matchLengthWeight": 1.5})


def test_scorer_reads_the_named_producer() -> None:
    a = endpoint("a", 1)
    scorer = PrefixCacheScorer(
        PrefixScorerParams.model_validate({"prefixMatchInfoProducerName": "gpu"})
    )
    assert not scorer.needs_prefix_producer
    c = cycle("x")
    c.put(PREFIX_MATCH, PrefixMatch([b"1"], {a.key: 1}, 64, 64, 16, block_tokens=64))
    assert list(scorer.score(c, [a])) == [0.0]  # the default slot is not read
    c.put(match_key("gpu"), PrefixMatch([b"1", b"2"], {a.key: 1}, 64, 128, 32, block_tokens=64))
    assert list(scorer.score(c, [a])) == [0.5]


def test_two_named_producers_with_their_own_scorers() -> None:
    config = load_config(
        HEAD
        + """plugins:
- {name: gpuPrefixProducer, type: approx-prefix-cache-producer, parameters: {blockSizeTokens: 64, autoTune: false}}
- {name: cpuPrefixProducer, type: approx-prefix-cache-producer, parameters: {blockSizeTokens: 128, autoTune: false}}
- {name: gpuPrefixScorer, type: prefix-cache-scorer, parameters: {prefixMatchInfoProducerName: gpuPrefixProducer}}
- {name: cpuPrefixScorer, type: prefix-cache-scorer, parameters: {prefixMatchInfoProducerName: cpuPrefixProducer}}
schedulingProfiles:
- name: default
  plugins: [{pluginRef: gpuPrefixScorer}, {pluginRef: cpuPrefixScorer}]
"""
    )
    gpu = config.plugins.get("gpuPrefixProducer")
    cpu = config.plugins.get("cpuPrefixProducer")
    assert isinstance(gpu, ApproxPrefixCacheProducer) and isinstance(cpu, ApproxPrefixCacheProducer)
    c = _tokens(256)
    for producer in config.scheduler.producers:
        producer.prepare(c, [])
    assert len(_match(c, "gpuPrefixProducer").hashes) == 4
    assert len(_match(c, "cpuPrefixProducer").hashes) == 2


def test_a_scorer_naming_a_missing_producer_fails_at_start() -> None:
    with pytest.raises(ConfigError, match="prefixMatchInfoProducerName"):
        load_config(
            HEAD
            + """plugins:
- {type: prefix-cache-scorer, parameters: {prefixMatchInfoProducerName: nowhere}}
schedulingProfiles:
- name: default
  plugins: [{pluginRef: prefix-cache-scorer}]
"""
        )


def test_scorer_with_older_prefix_parameters_configures_the_implicit_producer() -> None:
    config = load_config(
        HEAD
        + """plugins:
- {type: prefix-cache-scorer, parameters: {blockSizeTokens: 96, autoTune: false, maxPrefixBlocksToMatch: 256}}
schedulingProfiles:
- name: default
  plugins: [{pluginRef: prefix-cache-scorer}]
"""
    )
    [producer] = config.plugins.of_kind(ApproxPrefixCacheProducer)
    assert type(producer.params) is PrefixParams
    assert producer.params.block_size_tokens == 96 and not producer.params.auto_tune


# -- precise ------------------------------------------------------------------------


def test_precise_nested_llm_d_settings_apply() -> None:
    params = PreciseParams.model_validate(
        {
            "tokenProcessorConfig": {"blockSize": 64, "hashSeed": "42"},
            "indexerConfig": {
                "kvBlockIndexConfig": {"enableMetrics": True, "metricsLoggingInterval": 6e10}
            },
            "kvEventsConfig": {
                "zmqEndpoint": "tcp://0.0.0.0:5557",
                "topicFilter": "kv@",
                "podDiscoveryConfig": {"socketPort": 5600, "replaySocketPort": 5601},
            },
            "speculativeIndexing": False,
        }
    ).resolved()
    assert (params.block_size, params.hash_seed) == (64, "42")
    assert (params.kv_events_port, params.replay_port) == (5600, 5601)
    older = PreciseParams.model_validate(
        {
            "indexerConfig": {
                "tokenProcessorConfig": {"blockSize": 5},
                "kvBlockIndexConfig": {"maxPrefixBlocksToMatch": 256},
            }
        }
    ).resolved()
    assert (older.block_size, older.max_prefix_blocks_to_match) == (5, 256)
    assert (
        PreciseParams.model_validate({"tokenProcessorConfig": {"blockSizeTokens": 5}})
        .resolved()
        .block_size
        == 5
    )
    with pytest.raises(ValidationError, match="engineType"):
        PreciseParams.model_validate({"kvEventsConfig": {"engineType": "trtllm"}})


async def test_precise_producer_uses_a_token_producers_real_tokens() -> None:
    producer = PrecisePrefixCacheProducer(PreciseParams(block_size=4))
    try:
        held, other = endpoint("a", 1), endpoint("b", 2)
        tokens = list(range(300, 312))  # three 4-token blocks
        keys = [external_hash(h) for h in block_hashes(tokens, 4, None)]
        producer.index.store(held.key, keys[:2])  # the engine reported two of them
        producer.index.store(other.key, [12345])
        c = cycle("text the engine would have rendered as those tokens")
        c.put(TOKENIZED_PROMPT, TokenizedPrompt(tokens, "vllm"))
        await producer.prefetch(c, [held, other])
        producer.prepare(c, [held, other])
        assert c.request.token_estimate == 12
        match = c.get(PREFIX_MATCH)
        assert match is not None and match.source == "precise"
        assert (match.blocks(held), match.blocks(other)) == (2, 0)
        assert c.get(match_key(producer.name)) is match
        # Pseudo-tokens of the estimate are not the engine's: not used for the lookup.
        c = cycle("estimate only")
        c.put(TOKENIZED_PROMPT, TokenizedPrompt([1, 2, 3, 4], "estimate"))
        producer._tokenize = _no_tokenize  # type: ignore[method-assign,assignment]
        await producer.prefetch(c, [held, other])
        producer.prepare(c, [held, other])
        match = c.get(PREFIX_MATCH)
        assert match is not None and match.source == "approximate"
    finally:
        await producer.aclose()


async def _no_tokenize(*_: object) -> None:
    return None


def test_deprecated_precise_scorer_alone_and_with_a_peer(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        alone = load_config(
            HEAD
            + """plugins:
- {type: precise-prefix-cache-scorer, parameters: {tokenProcessorConfig: {blockSize: 16}}}
schedulingProfiles:
- name: default
  plugins: [{pluginRef: precise-prefix-cache-scorer}]
"""
        )
    [scorer] = alone.plugins.of_kind(PrecisePrefixCacheScorer)
    assert scorer.peer is None and scorer.params.block_size == 16
    assert scorer in alone.scheduler.producers
    assert "deprecated" in caplog.text
    assert not alone.plugins.of_kind(ApproxPrefixCacheProducer)  # it provides the match
    both = load_config(
        HEAD
        + """plugins:
- {type: precise-prefix-cache-producer}
- {type: precise-prefix-cache-scorer}
schedulingProfiles:
- name: default
  plugins: [{pluginRef: precise-prefix-cache-scorer}]
"""
    )
    [scorer] = both.plugins.of_kind(PrecisePrefixCacheScorer)
    assert scorer.peer is both.plugins.get("precise-prefix-cache-producer")
    a = endpoint("a", 1)
    c = cycle("x")
    c.put(match_key("precise-prefix-cache-producer"), PrefixMatch([b"1"], {a.key: 1}, 16, 16, 16))
    assert list(scorer.score(c, [a])) == [1.0]
    assert isinstance(
        create_plugin("precise-prefix-cache-scorer", None, {}), PrecisePrefixCacheProducer
    )


async def test_speculative_indexing_predicts_the_pick_until_the_ttl() -> None:
    params = PreciseParams.model_validate(
        {"blockSize": 4, "speculativeIndexing": True, "speculativeTTL": "2s"}
    )
    producer = PrecisePrefixCacheProducer(params)
    plain = PrecisePrefixCacheProducer(PreciseParams(block_size=4))
    try:
        a, b = endpoint("a", 1), endpoint("b", 2)
        tokens = list(range(500, 512))
        for p in (producer, plain):
            for ep in (a, b):
                p.index.store(ep.key, [99])  # both publish events, neither holds the prompt

        async def match(p: PrecisePrefixCacheProducer, later: float = 0.0) -> dict[str, int]:
            c = cycle("x")
            c.now += later
            c.put(TOKENIZED_PROMPT, TokenizedPrompt(tokens, "vllm"))
            await p.prefetch(c, [a, b])
            p.prepare(c, [a, b])
            p.track(c, _result(a))
            return _match(c).matched

        assert await match(producer) == {}
        # The decision predicted the 3 blocks on a, before any event says so.
        assert await match(producer, 0.5) == {a.key: 3}
        # Refreshed by the second decision (expires at 2.5 s): gone at 10 s.
        assert await match(producer, 10.0) == {}
        # Without the setting only events count.
        assert await match(plain) == {}
        assert await match(plain, 0.5) == {}
    finally:
        await producer.aclose()
        await plain.aclose()


def test_the_legacy_byte_mode_keeps_its_256_block_cap() -> None:
    config = load_config(
        HEAD
        + """plugins:
- {type: prefix-cache-scorer, parameters: {hashBlockSize: 64}}
schedulingProfiles:
- name: default
  plugins: [{pluginRef: prefix-cache-scorer}]
"""
    )
    [producer] = config.plugins.of_kind(ApproxPrefixCacheProducer)
    c = cycle("x" * 64 * 300)
    producer.prepare(c, [])
    assert len(_match(c).hashes) == 256
    wider = ApproxPrefixCacheProducer(
        PrefixParams.model_validate({"hashBlockSize": 64, "maxPrefixBlocksToMatch": 0})
    )
    c = cycle("x" * 64 * 300)
    wider.prepare(c, [])
    assert len(_match(c).hashes) == len(c.request.prompt) // 64


def test_prefix_indexer_metrics_as_llm_d_names_them() -> None:
    registry = CollectorRegistry()
    first = ApproxPrefixCacheProducer(PrefixParams(auto_tune=False), name="gpu")
    second = ApproxPrefixCacheProducer(PrefixParams(auto_tune=False), name="cpu")
    first.register_metrics(registry)
    second.register_metrics(registry)  # one set of families per registry
    a = endpoint("a", 1)
    for _ in range(2):
        c = _tokens(128)  # two 64-token blocks
        first.prepare(c, [a])
        first.track(c, _result(a))
    labels = {"plugin_name": "gpu", "plugin_type": "approx-prefix-cache-producer"}
    assert sample_sum(registry, "llm_d_epp_prefix_indexer_size", **labels) == 2
    # The first lookup matched nothing, the second both blocks (2 x 64 tokens x 4 bytes).
    assert sample_sum(registry, "llm_d_epp_prefix_indexer_hit_bytes_sum", **labels) == 512
    assert sample_sum(registry, "llm_d_epp_prefix_indexer_hit_ratio_count", **labels) == 2
    assert sample_sum(registry, "llm_d_epp_prefix_indexer_hit_ratio_sum", **labels) == 1.0
    assert sample_sum(registry, "inference_extension_prefix_indexer_hit_bytes_sum") == 512
