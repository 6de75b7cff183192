"""The gateway's reports about a request: where it may go (the subset hint) and where it
was really served (the served-endpoint report), through the Director and its trackers."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

from epp.datastore import Datastore, Endpoint, address_host, split_address
from epp.decision import InternalError
from epp.director import subset_endpoints
from epp.plugins.active_request_scorer import ActiveRequestScorer
from epp.plugins.base import ProfileHandler
from epp.plugins.filters import DecodeFilter, PrefillFilter
from epp.plugins.pickers import MaxScorePicker
from epp.plugins.prefix_producer import ApproxPrefixCacheProducer
from epp.plugins.profile_handlers import DisaggProfileHandler
from epp.plugins.session_affinity_scorer import SessionAffinityScorer
from epp.scheduling import Profile, ProfileResult, Scheduler, SchedulingResult
from epp.scheduling.cycle import CycleState

from .fixtures import MakePool, pd_config
from .helpers import chat_body, cycle, endpoint

CHAT = "/v1/chat/completions"
LONG = "Tell me everything about the harbour and its ships. " * 20


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [
        ("10.0.0.1:8000", "10.0.0.1", 8000),
        ("10.0.0.1", "10.0.0.1", None),
        ("[fd00::1]:8000", "fd00::1", 8000),
        ("[FD00:0::1]:8000", "fd00::1", 8000),
        ("fd00::1", "fd00::1", None),
        ("[fd00::1]", "fd00::1", None),
        ("Pod.NS:80", "pod.ns", 80),
        (" 10.0.0.1:x ", "10.0.0.1", None),
    ],
)
def test_split_address(text: str, host: str, port: int | None) -> None:
    assert split_address(text) == (host, port)
    assert address_host(text) == host


def test_find_matches_however_the_address_is_spelled() -> None:
    ds = Datastore()
    v4, v6 = Endpoint("a", "10.0.0.1", 8000), Endpoint("b", "fd00::1", 9000)
    ds.replace_source("t", [v4, v6])
    assert ds.find("10.0.0.1:8000") is v4
    assert ds.find("[fd00:0:0::1]:9000") is v6
    assert ds.find("[fd00::1]:8000") is None
    assert ds.find("10.0.0.1") is None  # no port: not one endpoint
    assert ds.find("garbage") is None


def test_subset_matches_hosts_and_ignores_ports() -> None:
    a1 = Endpoint("a1", "10.0.0.1", 8000)
    a2 = Endpoint("a2", "10.0.0.1", 8001)  # a second port of the same pod
    b = Endpoint("b", "fd00::2", 8000)
    eps = [a1, a2, b]
    assert subset_endpoints(eps, ["10.0.0.1:1"]) == [a1, a2]
    assert subset_endpoints(eps, ["[fd00:0::2]:5"]) == [b]
    assert subset_endpoints(eps, ["fd00::2", "10.9.9.9:8000"]) == [b]
    assert subset_endpoints(eps, []) == []


def _pd_scheduler(handler: ProfileHandler) -> Scheduler:
    picker = MaxScorePicker()
    profiles = {
        "decode": Profile("decode", (DecodeFilter(),), (), picker),
        "prefill": Profile("prefill", (PrefillFilter(),), (), picker),
    }
    handler.check_profiles(list(profiles))
    return Scheduler(handler=handler, profiles=profiles)


def test_subset_scopes_only_the_destination_profile() -> None:
    d1, d2 = endpoint("d1", 1, "decode"), endpoint("d2", 2, "decode")
    p = endpoint("p", 3, "prefill")
    scheduler = _pd_scheduler(DisaggProfileHandler())
    for _ in range(5):
        result = scheduler.schedule(cycle(), [d1, d2, p], [d2])
        assert result.targets(result.primary) == [d2]
        assert result.targets(result.prefill_profile) == [p]


class _Undeclared(DisaggProfileHandler):
    """A handler that does not say which profile is the destination."""

    def destination_profile(self, cycle: CycleState, profiles: Mapping[str, Profile]) -> None:
        return None


class _Misdeclared(DisaggProfileHandler):
    """A handler that names the wrong profile as the destination."""

    def destination_profile(self, cycle: CycleState, profiles: Mapping[str, Profile]) -> str:
        return "prefill"


def test_a_handler_that_does_not_name_its_destination_gets_every_profile_scoped() -> None:
    d1, d2 = endpoint("d1", 1, "decode"), endpoint("d2", 2, "decode")
    p = endpoint("p", 3, "prefill")
    result = _pd_scheduler(_Undeclared()).schedule(cycle(), [d1, d2, p], [d2])
    assert result.targets(result.primary) == [d2]
    assert result.prefill_profile is None  # the conservative reading of the hint


def test_a_destination_outside_the_subset_is_an_internal_error() -> None:
    d1, d2 = endpoint("d1", 1, "decode"), endpoint("d2", 2, "decode")
    p = endpoint("p", 3, "prefill")
    with pytest.raises(InternalError, match="outside the gateway's subset hint"):
        # The hint is applied to the prefill profile only, so decode may pick d1.
        for _ in range(20):
            _pd_scheduler(_Misdeclared()).schedule(cycle(), [d1, d2, p], [d2])


def _served_config(endpoints_file: Path) -> str:
    plugins = """
- type: decode-filter
- type: prefill-filter
- type: prefix-cache-scorer
  parameters: {hashBlockSize: 16}
- type: active-request-scorer
- type: session-affinity-scorer
- type: max-score-picker
- type: always-disagg-pd-decider
- type: disagg-profile-handler
  parameters:
    deciders: {prefill: always-disagg-pd-decider}
"""
    profiles = """
- name: decode
  plugins:
  - pluginRef: decode-filter
  - pluginRef: prefix-cache-scorer
  - pluginRef: active-request-scorer
  - pluginRef: session-affinity-scorer
- name: prefill
  plugins:
  - pluginRef: prefill-filter
"""
    return pd_config(endpoints_file, plugins, profiles)


def _plugins(
    pool_plugins: Sequence[object],
) -> tuple[ActiveRequestScorer, ApproxPrefixCacheProducer, SessionAffinityScorer]:
    [active] = [p for p in pool_plugins if isinstance(p, ActiveRequestScorer)]
    [prefix] = [p for p in pool_plugins if isinstance(p, ApproxPrefixCacheProducer)]
    [affinity] = [p for p in pool_plugins if isinstance(p, SessionAffinityScorer)]
    return active, prefix, affinity


async def test_served_report_moves_load_prefix_and_session(
    make_pool: MakePool, tmp_path: Path
) -> None:
    pool = await make_pool(
        {"d1": "decode", "d2": "decode", "p1": "prefill"},
        config=_served_config(tmp_path / "endpoints.yaml"),
    )
    active, prefix, affinity = _plugins(list(pool.director.config.plugins))
    headers = {"x-session-token": "s1", "x-request-id": "r1"}
    d = await pool.director.decide(CHAT, headers, chat_body(LONG), None)
    picked, p1 = d.decode, pool.keys["p1"]
    other = pool.keys["d2"] if picked == pool.keys["d1"] else pool.keys["d1"]
    assert d.prefill == p1
    assert active.in_flight == {picked: 1, p1: 1}
    assert prefix.index.size(picked) > 0 and prefix.index.size(other) == 0
    blocks = prefix.index.size(picked)

    d.on_served(other)
    assert active.in_flight == {other: 1, p1: 1}  # the prefill keeps its own charge
    assert prefix.index.size(picked) == 0 and prefix.index.size(other) == blocks
    assert prefix.index.size(p1) == blocks  # the prefill pod did compute the prompt
    assert affinity.sessions["s1"] == other
    d.on_served(picked)  # only the first report counts
    assert active.in_flight == {other: 1, p1: 1}

    d.on_response_started()
    assert active.in_flight == {other: 1}
    d.on_finished()
    assert active.in_flight == {} and active.outstanding() == 0
    # The next request of the session, with the same prompt, goes where the KV is.
    again = await pool.director.decide(CHAT, headers, chat_body(LONG), None)
    assert again.decode == other
    again.on_finished()


async def test_served_report_of_the_pick_or_unknown_changes_nothing(
    make_pool: MakePool, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pool = await make_pool(
        {"d1": "decode", "d2": "decode", "p1": "prefill"},
        config=_served_config(tmp_path / "endpoints.yaml"),
    )
    active, prefix, _ = _plugins(list(pool.director.config.plugins))
    d = await pool.director.decide(CHAT, {"x-request-id": "r2"}, chat_body(LONG), None)
    d.on_served(d.decode)
    assert active.in_flight == {d.decode: 1, pool.keys["p1"]: 1}
    d.on_finished()

    d = await pool.director.decide(CHAT, {"x-request-id": "r3"}, chat_body("x" + LONG), None)
    with caplog.at_level(logging.WARNING, logger="epp.director"):
        d.on_served("10.99.0.1:8000")
    assert "request r3" in caplog.text and "10.99.0.1:8000" in caplog.text
    assert "not a known endpoint" in caplog.text
    assert active.in_flight == {d.decode: 1, pool.keys["p1"]: 1}
    assert prefix.index.size(d.decode) > 0
    d.on_finished()
    d.on_served(pool.keys["d1"])  # after the end: nothing left to move
    assert active.in_flight == {}


def test_default_reassign_releases_the_pick_and_tracks_the_served_endpoint() -> None:
    scorer = ActiveRequestScorer()
    d1, d2, p = endpoint("d1", 1, "decode"), endpoint("d2", 2, "decode"), endpoint("p", 3)
    result = SchedulingResult(
        {"decode": ProfileResult([d1]), "prefill": ProfileResult([p])},
        "decode",
        prefill_profile="prefill",
    )
    c = cycle()
    release_stages, release_decode = scorer.track(c, result)
    release_served = scorer.reassign(c, result.served_by(d2), release_decode)
    assert scorer.in_flight == {d2.key: 1, p.key: 1}
    release_stages()
    release_served()
    assert scorer.in_flight == {} and scorer.outstanding() == 0
