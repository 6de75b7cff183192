"""disagg-prefill-backlog-scorer: uncached prompt tokens in flight until the first token."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from epp.config import ConfigError, load_config
from epp.plugins import create_plugin
from epp.plugins.prefill_backlog_scorer import PrefillBacklogScorer, backlog_scores
from epp.plugins.prefix_producer import PREFIX_MATCH, PrefixMatch
from epp.scheduling.cycle import CycleState
from epp.scheduling.result import ProfileResult, SchedulingResult

from .fixtures import MakePool, pd_config
from .helpers import chat_body, cycle, endpoint


def _prompt(tokens: int, cached: dict[str, int] | None = None) -> CycleState:
    """A request of ``tokens`` prompt tokens; ``cached``: blocks of 16 held per endpoint."""
    body = {"model": "m", "messages": [{"role": "user", "content": "abcd" * tokens}]}
    c = cycle(body=json.dumps(body).encode())
    c.request.token_estimate = tokens
    if cached is not None:
        c.put(
            PREFIX_MATCH,
            PrefixMatch(
                hashes=[],
                matched=cached,
                block_bytes=16,
                prompt_bytes=tokens,
                prompt_tokens=tokens,
                source="precise",
                block_tokens=16,
            ),
        )
    return c


def _to(ep: object) -> SchedulingResult:
    return SchedulingResult({"decode": ProfileResult([ep])}, "decode")  # type: ignore[list-item]


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_scores_are_the_least_backlog_over_each_backlog() -> None:
    assert backlog_scores([], 0) == []
    assert backlog_scores([100, 200, 400], 0) == [1.0, 0.5, 0.25]
    assert backlog_scores([0, 0], 0) == [1.0, 1.0]
    assert backlog_scores([0, 100], 0) == [1.0, 0.0]
    # Smoothing keeps a small difference small.
    assert backlog_scores([0, 100], 100) == [1.0, 0.5]


def test_backlog_counts_uncached_prompt_until_the_first_token() -> None:
    scorer = PrefillBacklogScorer()
    a, b = endpoint("a", 1), endpoint("b", 2)
    first = _prompt(1000)
    release_stages, release_all = scorer.track(first, _to(a))
    assert scorer.backlog == {a.key: 1000}
    release_stages()  # the response headers: the prompt may not be computed yet
    assert scorer.backlog == {a.key: 1000}
    # A second request of 1000 tokens: a would have 2000 to compute first, b 1000.
    second = _prompt(1000)
    scores = scorer.score(second, [a, b])
    assert scores[1] == 1.0
    assert scores[0] == pytest.approx((1000 + 256) / (2000 + 256))
    scorer.first_token(first)
    assert scorer.backlog == {}
    scorer.first_token(first)  # idempotent
    release_all()
    assert scorer.backlog == {} and scorer.outstanding() == 0


def test_a_pd_request_is_charged_where_its_prompt_is_computed() -> None:
    scorer = PrefillBacklogScorer()
    prefiller, decoder = endpoint("p", 1), endpoint("d", 2)
    pd = SchedulingResult(
        {"prefill": ProfileResult([prefiller]), "decode": ProfileResult([decoder])},
        "decode",
        prefill_profile="prefill",
    )
    # 1000 tokens, 25 blocks of them cached on the prefiller: it computes 600.
    c = _prompt(1000, {prefiller.key: 25})
    _, release_decode = scorer.track(c, pd)
    assert scorer.backlog == {prefiller.key: 600}  # the decoder only receives the KV
    # Another decoder serves it (the gateway's fallback): the prefiller still computes.
    other = endpoint("d2", 3)
    release_served = scorer.reassign(c, pd.served_by(other), release_decode)
    assert scorer.backlog == {prefiller.key: 600}
    scorer.first_token(c)
    assert scorer.backlog == {}
    release_served()
    assert scorer.outstanding() == 0
    # Decided without a prefill stage, the decoder computes the prompt itself.
    local = SchedulingResult(
        {"prefill": None, "decode": ProfileResult([decoder])}, "decode", prefill_profile=None
    )
    alone = _prompt(300)
    _, release_decode = scorer.track(alone, local)
    assert scorer.backlog == {decoder.key: 300}
    # Served by another decoder, which then computes the prompt: the charge moves there.
    other = endpoint("d2", 3)
    scorer.reassign(alone, local.served_by(other), release_decode)
    assert scorer.backlog == {other.key: 300}


def test_a_cached_prefix_outweighs_a_short_queue() -> None:
    scorer = PrefillBacklogScorer(PrefillBacklogScorer.Params(smoothing_tokens=0))
    warm, cold = endpoint("warm", 1), endpoint("cold", 2)
    scorer.track(_prompt(500), _to(warm))  # 500 tokens ahead on warm
    # 2000 tokens, 1600 of them (100 blocks) cached on warm: 500 + 400 < 0 + 2000.
    c = _prompt(2000, {warm.key: 100})
    assert scorer.score(c, [warm, cold]) == [1.0, pytest.approx(900 / 2000)]
    # The charge is what the chosen endpoint computes: the uncached part.
    scorer.track(c, _to(warm))
    assert scorer.backlog == {warm.key: 900}
    # Once the queue there is long enough, the cold endpoint wins.
    scorer.track(_prompt(3000), _to(warm))
    assert scorer.score(_prompt(2000, {warm.key: 100}), [warm, cold])[1] == 1.0


def test_the_end_of_a_request_releases_what_no_token_released() -> None:
    scorer = PrefillBacklogScorer()
    a = endpoint("a", 1)
    _, release_all = scorer.track(_prompt(700), _to(a))
    release_all()
    release_all()
    assert scorer.backlog == {}


def test_charges_expire_after_the_request_timeout() -> None:
    clock = _Clock()
    params = PrefillBacklogScorer.Params.model_validate({"requestTimeout": "10s"})
    scorer = PrefillBacklogScorer(params, clock=clock)
    a, b = endpoint("a", 1), endpoint("b", 2)
    scorer.track(_prompt(700), _to(a))
    clock.now += 9
    assert scorer.score(_prompt(10), [a, b])[1] == 1.0
    clock.now += 2
    assert scorer.score(_prompt(10), [a, b]) == [1.0, 1.0]
    assert scorer.backlog == {} and scorer.outstanding() == 0


def test_a_removed_endpoint_loses_its_backlog_and_its_charges() -> None:
    scorer = PrefillBacklogScorer()
    a = endpoint("a", 1)
    first = _prompt(700)
    scorer.track(first, _to(a))
    scorer.endpoints_changed([], [a])
    assert scorer.backlog == {}
    scorer.track(_prompt(300), _to(a))  # the endpoint is back
    scorer.first_token(first)  # the old charge no longer counts against it
    assert scorer.backlog == {a.key: 300}


def test_params_are_checked_and_named() -> None:
    plugin = create_plugin(
        "disagg-prefill-backlog-scorer", None, {"smoothingTokens": 16, "requestTimeout": "1m"}
    )
    assert isinstance(plugin, PrefillBacklogScorer)
    assert plugin.params.smoothing_tokens == 16 and plugin.params.request_timeout == 60
    with pytest.raises(ValueError, match="smoothingTokens"):
        create_plugin("disagg-prefill-backlog-scorer", None, {"smoothingTokens": -1})
    with pytest.raises(ValueError, match="requestTimeout"):
        create_plugin("disagg-prefill-backlog-scorer", None, {"requestTimeout": "0s"})
    with pytest.raises(ConfigError, match="smoothingTokens"):
        load_config(
            "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n"
            "- type: disagg-prefill-backlog-scorer\n  parameters: {smoothingTokens: x}\n"
            "- type: max-score-picker\nschedulingProfiles:\n- name: default\n  plugins:\n"
            "  - pluginRef: disagg-prefill-backlog-scorer\n"
        )


BACKLOG_PLUGINS = """
- type: decode-filter
- type: approx-prefix-cache-producer
- type: disagg-prefill-backlog-scorer
- type: max-score-picker
- type: single-profile-handler
"""

BACKLOG_PROFILES = """
- name: default
  plugins:
  - pluginRef: decode-filter
  - pluginRef: disagg-prefill-backlog-scorer
  - pluginRef: max-score-picker
"""


async def test_decisions_charge_and_the_first_token_releases(
    make_pool: MakePool, tmp_path: Path
) -> None:
    # make_pool writes the pool's endpoints to tmp_path / "endpoints.yaml".
    config = pd_config(tmp_path / "endpoints.yaml", BACKLOG_PLUGINS, BACKLOG_PROFILES)
    pool = await make_pool({"d1": "decode", "d2": "decode"}, config=config)
    scorer = pool.director.config.plugins.get("disagg-prefill-backlog-scorer")
    assert isinstance(scorer, PrefillBacklogScorer)
    first = await pool.director.decide("/v1/chat/completions", {}, chat_body("x" * 4000), None)
    assert sum(scorer.backlog.values()) >= 1000
    # The next cold request goes where nothing is being computed.
    second = await pool.director.decide("/v1/chat/completions", {}, chat_body("y" * 4000), None)
    assert second.decode != first.decode
    first.on_response_started()
    assert len(scorer.backlog) == 2  # the headers are no token
    first.on_first_token()
    second.on_finished()
    assert scorer.backlog == {}
    first.on_finished()
    assert scorer.outstanding() == 0


PD_BACKLOG_PLUGINS = """
- type: decode-filter
- type: prefill-filter
- type: approx-prefix-cache-producer
- type: disagg-prefill-backlog-scorer
- type: max-score-picker
- type: prefix-based-pd-decider
  parameters: {nonCachedTokens: 16}
- type: disagg-profile-handler
  parameters:
    deciders: {prefill: prefix-based-pd-decider}
"""

PD_BACKLOG_PROFILES = """
- name: decode
  plugins:
  - pluginRef: decode-filter
  - pluginRef: disagg-prefill-backlog-scorer
  - pluginRef: max-score-picker
- name: prefill
  plugins:
  - pluginRef: prefill-filter
  - pluginRef: disagg-prefill-backlog-scorer
  - pluginRef: max-score-picker
"""


async def test_pd_decisions_charge_the_prefillers_and_spread_prompts_over_them(
    make_pool: MakePool, tmp_path: Path
) -> None:
    config = pd_config(tmp_path / "endpoints.yaml", PD_BACKLOG_PLUGINS, PD_BACKLOG_PROFILES)
    pool = await make_pool({"p1": "prefill", "p2": "prefill", "d1": "decode"}, config=config)
    scorer = pool.director.config.plugins.get("disagg-prefill-backlog-scorer")
    assert isinstance(scorer, PrefillBacklogScorer)
    first = await pool.director.decide("/v1/chat/completions", {}, chat_body("x" * 4000), None)
    assert first.prefill is not None
    assert set(scorer.backlog) == {first.prefill}  # not the decoder, which gets the KV
    # The second cold prompt is computed on the other prefiller, where nothing waits.
    second = await pool.director.decide("/v1/chat/completions", {}, chat_body("y" * 4000), None)
    assert second.prefill is not None and second.prefill != first.prefill
    assert set(scorer.backlog) == {first.prefill, second.prefill}
    first.on_first_token()
    second.on_first_token()
    assert scorer.backlog == {}
    first.on_finished()
    second.on_finished()
    assert scorer.outstanding() == 0
