"""no-hit-lru-scorer and the multimodal embeddings cache producer/scorer, as llm-d's
READMEs describe them."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from epp.config import load_config
from epp.datastore import Endpoint
from epp.plugins.mm_embeddings_cache import (
    ENCODER_CACHE_MATCH,
    MmEmbeddingsCacheProducer,
    MmEmbeddingsCacheScorer,
)
from epp.plugins.no_hit_lru_scorer import NoHitLruScorer, lru_scores
from epp.plugins.prefix_producer import PREFIX_MATCH, ApproxPrefixCacheProducer, PrefixMatch
from epp.plugins.registry import create_plugin
from epp.plugins.token_estimate import MultiModalFeature, TokenizedPrompt
from epp.plugins.token_producer import TOKENIZED_PROMPT
from epp.scheduling.cycle import CycleState
from epp.scheduling.result import ProfileResult, SchedulingResult
from tests.conftest import sample_sum

from .helpers import chat_body, cycle, endpoint

HEAD = "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\n"


def _pick(decode: Endpoint, prefill: Endpoint | None = None) -> SchedulingResult:
    results = {"decode": ProfileResult([decode])}
    if prefill is not None:
        results["prefill"] = ProfileResult([prefill])
    return SchedulingResult(
        results=results,  # type: ignore[arg-type]
        primary="decode",
        prefill_profile="prefill" if prefill is not None else None,
    )


def _schedule(
    scorer: NoHitLruScorer, eps: list[Endpoint], pick: int, warm: bool = False
) -> list[float]:
    c = cycle("q")
    if warm:
        c.put(PREFIX_MATCH, PrefixMatch([b"1"], {eps[0].key: 1}, 64, 64, 16))
    scores = list(scorer.score(c, eps))
    scorer.track(c, _pick(eps[pick]))
    return scores


# -- no-hit-lru -----------------------------------------------------------------------


def test_lru_scores_rank_never_used_first_then_oldest() -> None:
    eps = [endpoint(n, i) for i, n in enumerate("abcd")]
    # b and d used, b least recently: a, c (never used) then b then d.
    assert lru_scores(eps, [eps[1].key, eps[3].key]) == pytest.approx([1.0, 1 / 3, 2 / 3, 0.0])
    assert lru_scores(eps[:1], []) == [1.0]


def test_cold_requests_rotate_over_the_endpoints() -> None:
    eps = [endpoint(n, i) for i, n in enumerate("abc")]
    scorer = NoHitLruScorer()
    assert _schedule(scorer, eps, 0) == pytest.approx([1.0, 0.5, 0.0])
    # a was just used for a cold request: it ranks last now.
    assert _schedule(scorer, eps, 1) == pytest.approx([0.0, 1.0, 0.5])
    # c never used; a used longer ago than b.
    assert _schedule(scorer, eps, 2) == pytest.approx([0.5, 0.0, 1.0])
    assert _schedule(scorer, eps, 0) == pytest.approx([1.0, 0.5, 0.0])


def test_warm_requests_score_neutral_and_leave_the_lru_alone() -> None:
    eps = [endpoint(n, i) for i, n in enumerate("ab")]
    scorer = NoHitLruScorer()
    assert _schedule(scorer, eps, 0, warm=True) == [0.5, 0.5]
    assert list(scorer.lru) == []


def test_prefill_and_decode_picks_of_a_cold_request_are_used() -> None:
    d, p = endpoint("d", 1), endpoint("p", 2)
    scorer = NoHitLruScorer()
    c = cycle("cold")
    scorer.score(c, [d, p])
    scorer.track(c, _pick(d, p))
    assert list(scorer.lru) == [d.key, p.key]


def test_lru_size_bounds_the_tracked_endpoints_and_removal_forgets() -> None:
    eps = [endpoint(n, i) for i, n in enumerate("abc")]
    scorer = NoHitLruScorer(NoHitLruScorer.Params(lru_size=2))
    for i in range(3):
        _schedule(scorer, eps, i)
    assert list(scorer.lru) == [eps[1].key, eps[2].key]
    scorer.endpoints_changed([], [eps[1]])
    assert list(scorer.lru) == [eps[2].key]
    assert NoHitLruScorer(NoHitLruScorer.Params(lru_size=0)).size == 1024


def test_no_hit_lru_in_a_config_reads_the_precise_or_approx_match() -> None:
    config = load_config(
        HEAD
        + """plugins:
- {type: no-hit-lru-scorer, parameters: {lruSize: 2048, prefixPluginName: x, prefixPluginType: y}}
schedulingProfiles:
- name: default
  plugins: [{pluginRef: no-hit-lru-scorer}]
"""
    )
    # It needs a prefix match: the approximate producer is added, as for the scorer.
    assert config.plugins.of_kind(ApproxPrefixCacheProducer)
    [scorer] = config.plugins.of_kind(NoHitLruScorer)
    assert scorer.size == 2048


# -- mm embeddings cache --------------------------------------------------------------


def _image(url: str) -> dict[str, object]:
    return {"type": "image_url", "image_url": {"url": url}}


def _mm(*urls: str) -> CycleState:
    return cycle(body=chat_body("see", extra_parts=[_image(u) for u in urls]))


def test_items_seen_on_an_endpoint_raise_its_score() -> None:
    producer, scorer = MmEmbeddingsCacheProducer(), MmEmbeddingsCacheScorer()
    registry = CollectorRegistry()
    producer.register_metrics(registry)
    a, b = endpoint("a", 1), endpoint("b", 2)
    c = _mm("https://x/1.png", "https://x/2.png")
    producer.prepare(c, [a, b])
    assert list(scorer.score(c, [a, b])) == [0.0, 0.0]
    producer.track(c, _pick(a))
    # The same image twice counts once; one of the two request items is on a.
    c = _mm("https://x/1.png", "https://x/1.png", "https://x/3.png")
    producer.prepare(c, [a, b])
    match = c.get(ENCODER_CACHE_MATCH)
    assert match is not None and len(match.items) == 2
    assert list(scorer.score(c, [a, b])) == [0.5, 0.0]
    assert sample_sum(registry, "llm_d_epp_encoder_cache_queries_total", modality="image") == 4
    assert sample_sum(registry, "llm_d_epp_encoder_cache_hits_total", pod=a.key) == 1
    # A text-only request has no items: 0 everywhere.
    c = cycle("text only")
    producer.prepare(c, [a, b])
    assert list(scorer.score(c, [a, b])) == [0.0, 0.0]
    assert list(MmEmbeddingsCacheScorer().score(cycle("none"), [a])) == [0.0]


def test_token_producer_features_are_the_items() -> None:
    producer = MmEmbeddingsCacheProducer()
    a = endpoint("a", 1)
    c = cycle("x")
    c.put(
        TOKENIZED_PROMPT,
        TokenizedPrompt(
            [1] * 20,
            "vllm",
            [MultiModalFeature("image", "h1", 0, 5), MultiModalFeature("video", "h2", 5, 9)],
        ),
    )
    producer.prepare(c, [a])
    match = c.get(ENCODER_CACHE_MATCH)
    assert match is not None and match.items == (("h1", "image"), ("h2", "video"))


def test_capacity_is_the_mib_budget_over_two_and_the_sample_configs_name() -> None:
    assert MmEmbeddingsCacheProducer().capacity == 2048
    p = create_plugin("mm-embeddings-cache-producer", None, {"cacheSizeInMB": 4})
    assert isinstance(p, MmEmbeddingsCacheProducer) and p.capacity == 2
    p = create_plugin("mm-embeddings-cache-producer", None, {"cacheSizeInMBPerServer": 0})
    assert isinstance(p, MmEmbeddingsCacheProducer) and p.capacity == 2048
    a = endpoint("a", 1)
    small = MmEmbeddingsCacheProducer(
        MmEmbeddingsCacheProducer.Params.model_validate({"cacheSizeInMBPerServer": 4})
    )
    for url in ("u1", "u2", "u3"):
        c = _mm(f"https://x/{url}")
        small.prepare(c, [a])
        small.track(c, _pick(a))
    assert list(small.caches[a.key]) == ["https://x/u2", "https://x/u3"]
    small.endpoints_changed([], [a])
    assert a.key not in small.caches
