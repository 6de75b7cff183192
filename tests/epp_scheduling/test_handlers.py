"""Deciders, profile handlers and the profile run (filter -> score -> pick)."""

from __future__ import annotations

import json
from collections.abc import Sequence

import pytest

from epp.datastore import Endpoint
from epp.decision import InternalError, NoEndpoints
from epp.plugins.base import PluginSet, Scorer
from epp.plugins.deciders import (
    AlwaysDisaggMultimodalDecider,
    AlwaysDisaggPdDecider,
    PrefixBasedPdDecider,
)
from epp.plugins.filters import DecodeFilter, EncodeFilter, PrefillFilter
from epp.plugins.pickers import MaxScorePicker
from epp.plugins.prefix_producer import ApproxPrefixCacheProducer, PrefixParams
from epp.plugins.profile_handlers import DisaggProfileHandler, SingleProfileHandler
from epp.scheduling.cycle import CycleState
from epp.scheduling.profile import Profile, WeightedScorer
from epp.scheduling.result import ProfileResult, SchedulingResult
from epp.scheduling.scheduler import Scheduler

from .helpers import chat_body, cycle, endpoint


class FixedScorer(Scorer):
    type_name = "fixed-test-scorer"

    def __init__(self, scores: dict[str, float]) -> None:
        super().__init__()
        self.scores = scores

    def score(self, cycle: CycleState, endpoints: Sequence[Endpoint]) -> Sequence[float]:
        return [self.scores.get(ep.name, 0.0) for ep in endpoints]


def test_profile_clamps_scores_and_weights() -> None:
    eps = [endpoint("a", 1), endpoint("b", 2)]
    # 'a' reports 7 (clamped to 1) on a weight-1 scorer; 'b' gets 0.8 x 2.
    wild = FixedScorer({"a": 7.0, "b": -3.0})
    good = FixedScorer({"a": 0.0, "b": 0.8})
    profile = Profile(
        "p", (), (WeightedScorer(wild, 1.0), WeightedScorer(good, 2.0)), MaxScorePicker()
    )
    result = profile.run(cycle(), eps)
    assert result is not None and result.targets[0].name == "b"


def test_profile_treats_nan_as_zero_and_rejects_wrong_lengths() -> None:
    eps = [endpoint("a", 1), endpoint("b", 2)]
    nan = FixedScorer({"a": float("nan"), "b": 0.1})
    profile = Profile("p", (), (WeightedScorer(nan, 1.0),), MaxScorePicker())
    result = profile.run(cycle(), eps)
    assert result is not None and result.targets[0].name == "b"

    class Short(FixedScorer):
        def score(self, cycle: CycleState, endpoints: Sequence[Endpoint]) -> Sequence[float]:
            return [1.0]

    short = Profile("p", (), (WeightedScorer(Short({}), 1.0),), MaxScorePicker())
    with pytest.raises(InternalError, match="returned 1 scores for 2 endpoints"):
        short.run(cycle(), eps)


def test_profile_returns_none_when_filtered_out() -> None:
    profile = Profile("p", (PrefillFilter(),), (), MaxScorePicker())
    assert profile.run(cycle(), [endpoint("d", 1, "decode")]) is None


def test_prefix_based_decider_thresholds() -> None:
    decider = PrefixBasedPdDecider(
        PrefixBasedPdDecider.Params.model_validate({"nonCachedTokens": 50, "promptTokens": 100})
    )
    d = endpoint("d", 1)
    assert not decider.approve(cycle("x" * 200), d)  # ~55 tokens < promptTokens
    assert decider.approve(cycle("x" * 800), d)  # ~205 tokens, nothing cached
    # Cached on d: only the uncached remainder counts.
    producer = ApproxPrefixCacheProducer(PrefixParams(hash_block_size=16))
    c = cycle("y" * 800)
    producer.prepare(c, [d])
    producer.track(c, SchedulingResult({"decode": ProfileResult([d])}, "decode"))
    c2 = cycle("y" * 800)
    producer.prepare(c2, [d])
    assert not decider.approve(c2, d)
    c3 = cycle("y" * 800 + "z" * 800)
    producer.prepare(c3, [d])
    assert decider.approve(c3, d)


def test_prefix_based_decider_zero_disables_checks() -> None:
    decider = PrefixBasedPdDecider()
    assert decider.approve(cycle("x"), endpoint("d", 1))


def test_always_deciders() -> None:
    assert AlwaysDisaggPdDecider().approve(cycle("x"), None)
    mm = AlwaysDisaggMultimodalDecider()
    assert not mm.approve(cycle("x"), None)
    body = chat_body("x", extra_parts=[{"type": "image_url", "image_url": {"url": "u"}}])
    assert mm.approve(cycle(body=body), None)


def _disagg(
    params: dict[str, object] | None = None,
    plugins: PluginSet | None = None,
    profiles: tuple[str, ...] = ("decode", "prefill", "encode"),
) -> Scheduler:
    handler = DisaggProfileHandler(DisaggProfileHandler.Params.model_validate(params or {}))
    handler.bind(plugins or PluginSet())
    filters = {"decode": DecodeFilter(), "prefill": PrefillFilter(), "encode": EncodeFilter()}
    names = {"decode": "decode", "prefill": "prefill", "encode": "encode"}
    names.update((params or {}).get("profiles") or {})  # type: ignore[arg-type]
    built = {}
    for role in profiles:
        built[names[role]] = Profile(names[role], (filters[role],), (), MaxScorePicker())
    handler.check_profiles(list(built))
    return Scheduler(handler=handler, profiles=built)


EPS = [endpoint("d", 1, "decode"), endpoint("p", 2, "prefill"), endpoint("e", 3, "encode")]
MM = chat_body("x", extra_parts=[{"type": "image_url", "image_url": {"url": "u"}}])


def test_disagg_handler_default_runs_prefill_when_profile_exists() -> None:
    result = _disagg().schedule(cycle("hi"), EPS)
    assert result.targets(result.primary)[0].name == "d"
    assert result.targets(result.prefill_profile)[0].name == "p"
    assert result.encode_profile is None


def test_disagg_handler_multimodal_runs_encode_then_prefill() -> None:
    result = _disagg().schedule(cycle(body=MM), EPS)
    assert result.targets(result.encode_profile)[0].name == "e"
    assert result.targets(result.prefill_profile)[0].name == "p"


def test_disagg_handler_no_decode_is_no_endpoints() -> None:
    with pytest.raises(NoEndpoints):
        _disagg().schedule(cycle("hi"), [endpoint("p", 2, "prefill")])


def test_disagg_handler_no_prefill_pods_is_decode_only() -> None:
    result = _disagg().schedule(cycle("hi"), [endpoint("d", 1, "decode")])
    assert result.prefill_profile is None and result.targets("decode")[0].name == "d"


def test_disagg_handler_same_pod_for_both_stages_skips_prefill() -> None:
    result = _disagg().schedule(cycle("hi"), [endpoint("pd", 1, "prefill-decode")])
    assert result.prefill_profile is None


def test_disagg_handler_custom_profile_and_decider_names() -> None:
    plugins = PluginSet()
    plugins.add(
        PrefixBasedPdDecider(PrefixBasedPdDecider.Params(non_cached_tokens=1000), name="big-only")
    )
    sched = _disagg(
        {"profiles": {"decode": "dec", "prefill": "pre"}, "deciders": {"prefill": "big-only"}},
        plugins,
        profiles=("decode", "prefill"),
    )
    assert sched.schedule(cycle("short"), EPS).prefill_profile is None
    long_result = sched.schedule(cycle("w" * 8000), EPS)
    assert long_result.prefill_profile == "pre"


def test_disagg_handler_bind_errors_name_the_reference() -> None:
    handler = DisaggProfileHandler(
        DisaggProfileHandler.Params.model_validate({"deciders": {"prefill": "missing"}})
    )
    with pytest.raises(ValueError, match=r"deciders\.prefill: no plugin named 'missing'"):
        handler.bind(PluginSet())
    plugins = PluginSet()
    plugins.add(DecodeFilter())
    handler = DisaggProfileHandler(
        DisaggProfileHandler.Params.model_validate({"deciders": {"encode": "decode-filter"}})
    )
    with pytest.raises(ValueError, match="not a decider"):
        handler.bind(plugins)
    with pytest.raises(ValueError, match=r"profiles\.decode"):
        DisaggProfileHandler().check_profiles(["prefill"])


def test_single_profile_handler() -> None:
    handler = SingleProfileHandler()
    with pytest.raises(ValueError, match="exactly one"):
        handler.check_profiles(["a", "b"])
    sched = Scheduler(
        handler=handler,
        profiles={"default": Profile("default", (DecodeFilter(),), (), MaxScorePicker())},
    )
    assert sched.schedule(cycle("x"), EPS).targets("default")[0].name == "d"
    with pytest.raises(NoEndpoints, match="default"):
        sched.schedule(cycle("x"), [endpoint("p", 2, "prefill")])


def test_cycle_body_helper_is_json() -> None:
    assert json.loads(MM)["messages"][0]["content"][1]["type"] == "image_url"
