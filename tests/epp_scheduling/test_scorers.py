"""Formulas and edge cases of the scorers."""

from __future__ import annotations

import pytest

from epp.plugins.active_request_scorer import ActiveRequestScorer
from epp.plugins.kv_cache_scorer import KvCacheUtilizationScorer
from epp.plugins.load_aware_scorer import LoadAwareScorer
from epp.plugins.queue_scorer import QueueScorer
from epp.plugins.session_affinity_scorer import SessionAffinityScorer
from epp.scheduling.result import ProfileResult, SchedulingResult

from .helpers import cycle, endpoint


def test_queue_scorer_min_max() -> None:
    eps = [endpoint("a", 1, waiting=0), endpoint("b", 2, waiting=5), endpoint("c", 3, waiting=10)]
    assert list(QueueScorer().score(cycle(), eps)) == [1.0, 0.5, 0.0]


def test_queue_scorer_all_equal_is_one() -> None:
    eps = [endpoint("a", 1, waiting=3), endpoint("b", 2, waiting=3)]
    assert list(QueueScorer().score(cycle(), eps)) == [1.0, 1.0]


def test_queue_scorer_stale_endpoint_never_looks_idle() -> None:
    # The stale endpoint reported an empty queue long ago; it must not win.
    eps = [endpoint("fresh", 1, waiting=20), endpoint("stale", 2, waiting=0, fresh=False)]
    fresh, stale = QueueScorer().score(cycle(), eps)
    assert fresh > stale
    assert stale == 0.0


def test_kv_cache_utilization() -> None:
    eps = [
        endpoint("a", 1, kv=0.0),
        endpoint("b", 2, kv=0.25),
        endpoint("c", 3, kv=1.0),
        endpoint("s", 4, kv=0.0, fresh=False),
    ]
    assert list(KvCacheUtilizationScorer().score(cycle(), eps)) == [1.0, 0.75, 0.0, 0.0]


@pytest.mark.parametrize(
    ("q", "expected"), [(0, 0.5), (64, 0.25), (128, 0.0), (500, 0.0), (1, 0.5 * (1 - 1 / 128))]
)
def test_load_aware_default_threshold(q: int, expected: float) -> None:
    assert LoadAwareScorer().score(cycle(), [endpoint("a", 1, waiting=q)])[0] == pytest.approx(
        expected
    )


def test_load_aware_custom_threshold_and_validation() -> None:
    scorer = LoadAwareScorer(LoadAwareScorer.Params(threshold=10))
    assert scorer.score(cycle(), [endpoint("a", 1, waiting=5)])[0] == pytest.approx(0.25)
    with pytest.raises(ValueError, match="threshold"):
        LoadAwareScorer.Params.model_validate({"threshold": 0})


def _result(decode: list[object], prefill: list[object] | None = None) -> SchedulingResult:
    results: dict[str, ProfileResult | None] = {"decode": ProfileResult(decode)}  # type: ignore[arg-type]
    if prefill is not None:
        results["prefill"] = ProfileResult(prefill)  # type: ignore[arg-type]
    return SchedulingResult(results, "decode", "prefill" if prefill else None)


def test_active_request_counts_and_release_hooks() -> None:
    scorer = ActiveRequestScorer()
    a, b, p = endpoint("a", 1), endpoint("b", 2), endpoint("p", 3, "prefill")
    assert list(scorer.score(cycle(), [a, b])) == [1.0, 1.0]
    rel_prefill, rel_all = scorer.track(cycle(), _result([a], [p]))
    scorer.track(cycle(), _result([a]))
    scorer.track(cycle(), _result([b]))
    assert scorer.in_flight == {a.key: 2, b.key: 1, p.key: 1}
    assert list(scorer.score(cycle(), [a, b])) == [0.0, 0.5]
    rel_prefill()
    rel_prefill()  # idempotent
    assert p.key not in scorer.in_flight
    rel_all()
    rel_all()
    assert scorer.in_flight == {a.key: 1, b.key: 1}
    # Fully released requests are forgotten at once (bounded memory).
    assert scorer.outstanding() == 2


def test_active_request_forgets_removed_endpoints() -> None:
    scorer = ActiveRequestScorer()
    a = endpoint("a", 1)
    scorer.track(cycle(), _result([a]))
    scorer.endpoints_changed([], [a])
    assert scorer.in_flight == {}


def test_session_affinity_sticks_and_is_bounded() -> None:
    scorer = SessionAffinityScorer(SessionAffinityScorer.Params(max_sessions=2))
    a, b = endpoint("a", 1), endpoint("b", 2)
    hdr = {"x-session-token": "s1"}
    assert list(scorer.score(cycle(headers=hdr), [a, b])) == [0.0, 0.0]
    scorer.track(cycle(headers=hdr), _result([b]))
    assert list(scorer.score(cycle(headers=hdr), [a, b])) == [0.0, 1.0]
    # No session header: no preference.
    assert list(scorer.score(cycle(), [a, b])) == [0.0, 0.0]
    scorer.track(cycle(headers={"x-session-token": "s2"}), _result([a]))
    scorer.track(cycle(headers={"x-session-token": "s3"}), _result([a]))
    assert "s1" not in scorer.sessions and len(scorer.sessions) == 2
    scorer.endpoints_changed([], [a])
    assert scorer.sessions == {}


def test_session_affinity_custom_header() -> None:
    scorer = SessionAffinityScorer(
        SessionAffinityScorer.Params.model_validate({"headerName": "X-Conversation"})
    )
    a = endpoint("a", 1)
    scorer.track(cycle(headers={"x-conversation": "c"}), _result([a]))
    assert list(scorer.score(cycle(headers={"x-conversation": "c"}), [a])) == [1.0]


def test_active_request_timeout_expires_forgotten_requests() -> None:
    now = [100.0]
    scorer = ActiveRequestScorer(
        ActiveRequestScorer.Params.model_validate({"requestTimeout": "2m"}), clock=lambda: now[0]
    )
    assert scorer.params.request_timeout == 120.0
    a = endpoint("a", 1)
    _, release_all = scorer.track(cycle(), _result([a]))
    scorer.track(cycle(), _result([a]))
    release_all()
    now[0] += 119.0
    scorer.score(cycle(), [a])
    assert scorer.in_flight == {a.key: 1}
    now[0] += 2.0
    scorer.score(cycle(), [a])
    assert scorer.in_flight == {}
    assert scorer.outstanding() == 0


@pytest.mark.parametrize("bad", ["soon", "-1s", 0, "", True])
def test_active_request_timeout_validation(bad: object) -> None:
    with pytest.raises(ValueError, match=r"requestTimeout|duration"):
        ActiveRequestScorer.Params.model_validate({"requestTimeout": bad})


def test_parse_duration() -> None:
    from common.durations import parse_duration

    assert parse_duration("1h30m") == 5400.0
    assert parse_duration("500ms") == 0.5
    assert parse_duration(3) == 3.0
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration("5 minutes")
