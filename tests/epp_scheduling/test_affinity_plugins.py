"""Affinity plugins against their llm-d READMEs: topology, session, header-label, LoRA."""

from __future__ import annotations

import base64
import time

import pytest

from epp.datalayer.attributes import read_attribute, read_request_attribute
from epp.datalayer.topology import Level, Topology, TopologyExtractor, compare
from epp.datastore import Endpoint, EndpointMetrics
from epp.plugins import create_plugin
from epp.plugins.base import PluginSet
from epp.plugins.header_label_affinity_scorer import HeaderLabelAffinityScorer
from epp.plugins.lora_affinity_scorer import LoraAffinityScorer
from epp.plugins.session_affinity_filter import SessionAffinityFilter, session_token
from epp.plugins.session_id_producer import SessionIdProducer
from epp.plugins.topology_affinity import TopologyAffinityFilter, TopologyAffinityScorer
from epp.scheduling.cycle import PEER_ENDPOINT, RESPONSE_HEADERS, CycleState
from epp.scheduling.result import ProfileResult, SchedulingResult

from .helpers import cycle, endpoint

HOST = "kubernetes.io/hostname"
RACK = "topology.kubernetes.io/rack"
ZONE = "topology.kubernetes.io/zone"
REGION = "topology.kubernetes.io/region"


def _placed(name: str, port: int, **where: str) -> Endpoint:
    labels = {
        label: where[field]
        for field, label in (("host", HOST), ("rack", RACK), ("zone", ZONE), ("region", REGION))
        if field in where
    }
    return endpoint(name, port, labels=labels)


# -- topology ------------------------------------------------------------------------


def test_compare_takes_the_tightest_shared_level_and_empty_never_matches() -> None:
    a = Topology(hostname="h1", rack="r1", zone="z1", region="eu")
    assert compare(a, Topology(hostname="h1")) == Level.HOST
    assert compare(a, Topology(hostname="h2", rack="r1", zone="z1")) == Level.RACK
    assert compare(a, Topology(zone="z1")) == Level.ZONE
    assert compare(a, Topology(region="eu")) == Level.REGION
    assert compare(a, Topology(hostname="h9", region="us")) == Level.NONE
    assert compare(Topology(zone="z1"), Topology(zone="z1", hostname="")) == Level.ZONE
    assert compare(Topology(rack=""), Topology(rack="")) == Level.NONE
    assert compare(None, a) == Level.NONE


def test_topology_extractor_reads_labels_falls_back_to_spec_hostname_and_follows_relabels() -> None:
    ext = TopologyExtractor()
    labelled = _placed("a", 1, host="node-1", zone="z1")
    bare = endpoint("b", 2)
    bare.pod_hostname = "pod-b-host"
    nothing = endpoint("c", 3)
    ext.endpoints_changed([labelled, bare, nothing], [])
    now = time.monotonic()

    def topo(ep: Endpoint) -> Topology | None:
        return read_attribute(ep, ("Topology", "topology-extractor"), Topology, now)

    assert topo(labelled) == Topology(hostname="node-1", zone="z1")
    assert topo(bare) == Topology(hostname="pod-b-host")
    assert topo(nothing) is None  # no field at all: no attribute
    labelled.labels = {HOST: "node-2"}  # a relabel through discovery
    assert topo(labelled) == Topology(hostname="node-2")


def test_topology_extractor_custom_label_names() -> None:
    ext = create_plugin("topology-extractor", "topo", {"zone": "example.com/az", "hostname": ""})
    assert isinstance(ext, TopologyExtractor)
    ep = endpoint("a", 1, labels={"example.com/az": "az-3", HOST: "n1"})
    ext.endpoints_changed([ep], [])
    assert ext.topology_of(ep) == Topology(hostname="n1", zone="az-3")
    assert ("Topology", "topo") in ep.attributes


def _topology_cycle(peer: Endpoint | None) -> CycleState:
    c = cycle()
    if peer is not None:
        c.put(PEER_ENDPOINT, peer)
    return c


def _stamp(*eps: Endpoint) -> None:
    TopologyExtractor().endpoints_changed(list(eps), [])


def test_topology_filter_keeps_candidates_at_min_affinity_and_fails_open() -> None:
    decode = _placed("d", 1, host="h1", rack="r1", zone="z1")
    same_host = _placed("p1", 2, host="h1", rack="r1", zone="z1")
    same_rack = _placed("p2", 3, host="h2", rack="r1", zone="z1")
    same_zone = _placed("p3", 4, host="h3", rack="r2", zone="z1")
    unknown = endpoint("p4", 5)
    _stamp(decode, same_host, same_rack, same_zone, unknown)
    cands = [same_host, same_rack, same_zone, unknown]

    host = TopologyAffinityFilter()
    assert host.filter(_topology_cycle(decode), cands) == [same_host]
    rack = TopologyAffinityFilter(TopologyAffinityFilter.Params(min_affinity="rack"))
    assert rack.filter(_topology_cycle(decode), cands) == [same_host, same_rack]
    zone = TopologyAffinityFilter(TopologyAffinityFilter.Params(min_affinity="zone"))
    # A candidate without topology is dropped when others qualify.
    assert zone.filter(_topology_cycle(decode), cands) == [same_host, same_rack, same_zone]
    # Fail open: no peer; a peer without topology; no candidate at the level.
    assert host.filter(_topology_cycle(None), cands) == cands
    assert host.filter(_topology_cycle(unknown), cands) == cands
    far = [same_rack, same_zone]
    assert host.filter(_topology_cycle(decode), far) == far


def test_topology_scorer_uses_the_fixed_bandwidth_curve() -> None:
    decode = _placed("d", 1, host="h1", rack="r1", zone="z1", region="eu")
    cands = [
        _placed("a", 2, host="h1"),
        _placed("b", 3, host="h2", rack="r1"),
        _placed("c", 4, zone="z1"),
        _placed("d2", 5, region="eu"),
        _placed("e", 6, region="us"),
        endpoint("f", 7),
    ]
    _stamp(decode, *cands)
    scorer = TopologyAffinityScorer()
    assert scorer.score(_topology_cycle(decode), cands) == [1.0, 0.2, 0.05, 0.02, 0.0, 0.0]
    assert scorer.score(_topology_cycle(None), cands) == [0.0] * 6


def test_topology_reader_names_its_producer_and_rejects_bad_levels(
    caplog: pytest.LogCaptureFixture,
) -> None:
    scorer = create_plugin("topology-affinity-scorer", None, {"topologyProducerName": "topo-b"})
    assert isinstance(scorer, TopologyAffinityScorer)
    assert scorer.key == ("Topology", "topo-b")
    plugins = PluginSet()
    plugins.add(TopologyExtractor(name="topo-a"))
    with caplog.at_level("WARNING"):
        scorer.bind(plugins)
    assert "no topology-extractor named 'topo-b'" in caplog.text
    with pytest.raises(ValueError, match="minAffinity"):
        create_plugin("topology-affinity-filter", None, {"minAffinity": "datacenter"})


# -- session affinity filter ------------------------------------------------------------


def _result(decode: Endpoint, prefill: Endpoint | None = None) -> SchedulingResult:
    results: dict[str, ProfileResult | None] = {"decode": ProfileResult([decode])}
    if prefill is not None:
        results["prefill"] = ProfileResult([prefill])
    return SchedulingResult(results, "decode", "prefill" if prefill is not None else None)


def test_encoded_header_strategy_pins_to_the_token_pod_and_writes_the_token() -> None:
    f = SessionAffinityFilter()
    a, b = endpoint("pod-a", 1), endpoint("pod-b", 2)
    assert session_token(b) == base64.b64encode(b"default/pod-b").decode()
    c = cycle(headers={"x-session-token": session_token(b)})
    assert f.filter(c, [a, b]) == [b]
    # The pod is gone, no header, or an undecodable header: every candidate.
    assert f.filter(cycle(headers={"x-session-token": session_token(b)}), [a]) == [a]
    assert f.filter(cycle(), [a, b]) == [a, b]
    assert f.filter(cycle(headers={"x-session-token": "%%%not-base64"}), [a, b]) == [a, b]
    # After scheduling, the response carries the chosen pod's token.
    first = cycle()
    f.track(first, _result(a))
    assert first.get(RESPONSE_HEADERS) == {"x-session-token": session_token(a)}


def test_encoded_header_prefill_instance_writes_its_own_header_for_the_prefill_pod() -> None:
    f = create_plugin(
        "session-affinity-filter",
        "session-affinity-prefill",
        {
            "profileName": "prefill",
            "encodedEndpointHeaderConfig": {"header": "X-Session-Token-Prefill"},
        },
    )
    assert isinstance(f, SessionAffinityFilter)
    d, p = endpoint("d", 1), endpoint("p", 2)
    c = cycle()
    f.track(c, _result(d, p))
    assert c.get(RESPONSE_HEADERS) == {"x-session-token-prefill": session_token(p)}
    skipped = cycle()
    f.track(skipped, _result(d))  # no prefill ran: nothing to write
    assert skipped.get(RESPONSE_HEADERS) is None


def test_session_id_strategy_binds_pins_rebinds_and_expires() -> None:
    f = create_plugin(
        "session-affinity-filter",
        None,
        {
            "strategy": "session_id",
            "sessionIdConfig": {"evictionTtlSeconds": 30, "evictionSweepSeconds": 1},
        },
    )
    assert isinstance(f, SessionAffinityFilter)
    a, b = endpoint("pod-a", 1), endpoint("pod-b", 2)
    hdr = {"x-session-id": "s1"}
    first = cycle(headers=hdr)
    assert f.filter(first, [a, b]) == [a, b]  # unbound: no preference
    f.track(first, _result(b))
    second = cycle(headers=hdr)
    assert f.filter(second, [a, b]) == [b]
    # Nothing is written back to the client under session_id.
    f.track(second, _result(b))
    assert second.get(RESPONSE_HEADERS) is None
    # The bound pod is not a candidate: pass through, then rebind to where it went.
    third = cycle(headers=hdr)
    assert f.filter(third, [a]) == [a]
    f.track(third, _result(a))
    assert f.filter(cycle(headers=hdr), [a, b]) == [a]
    # A bound pod that was a candidate but lost to a later filter keeps the binding.
    fourth = cycle(headers=hdr)
    assert f.filter(fourth, [a, b]) == [a]
    f.track(fourth, _result(b))
    assert f.filter(cycle(headers=hdr), [a, b]) == [a]
    # Unused for longer than the TTL: forgotten.
    late = cycle(headers=hdr)
    late.now += 31
    assert f.filter(late, [a, b]) == [a, b]
    assert "s1" not in f.bindings


def test_session_id_sources_in_priority_order_including_a_producer_attribute() -> None:
    producer = create_plugin("session-id-producer", "sid", {"cookieName": "llm-d-session"})
    assert isinstance(producer, SessionIdProducer)
    f = create_plugin(
        "session-affinity-filter",
        None,
        {
            "strategy": "session_id",
            "sessionIdConfig": {
                "sources": [
                    {"header": "X-Conversation"},
                    {"attribute": "SessionIDDataKey", "producer": "sid"},
                ]
            },
        },
    )
    assert isinstance(f, SessionAffinityFilter)
    a, b = endpoint("pod-a", 1), endpoint("pod-b", 2)
    by_cookie = cycle(headers={"cookie": "theme=dark; llm-d-session=abc ; x=1"})
    producer.prepare(by_cookie, [a, b])
    assert read_request_attribute(by_cookie, ("SessionIDDataKey", "sid")) == "abc"
    f.filter(by_cookie, [a, b])
    f.track(by_cookie, _result(a))
    again = cycle(headers={"cookie": "llm-d-session=abc"})
    producer.prepare(again, [a, b])
    assert f.filter(again, [a, b]) == [a]
    # The header source comes first.
    header_wins = cycle(headers={"x-conversation": "other", "cookie": "llm-d-session=abc"})
    producer.prepare(header_wins, [a, b])
    assert f.filter(header_wins, [a, b]) == [a, b]


def test_session_parameters_are_validated() -> None:
    with pytest.raises(ValueError, match="exactly one of header and attribute"):
        create_plugin(
            "session-affinity-filter",
            None,
            {
                "strategy": "session_id",
                "sessionIdConfig": {"sources": [{"header": "a", "attribute": "b"}]},
            },
        )
    with pytest.raises(ValueError, match="strategy"):
        create_plugin("session-affinity-filter", None, {"strategy": "cookie"})
    with pytest.raises(ValueError, match="exactly one of headerName and cookieName"):
        create_plugin("session-id-producer", None, {"headerName": "a", "cookieName": "b"})
    with pytest.raises(ValueError, match="exactly one of headerName and cookieName"):
        create_plugin("session-id-producer", None, {})


def test_session_id_producer_header_is_case_insensitive_and_absent_is_nothing() -> None:
    producer = create_plugin("session-id-producer", None, {"headerName": "X-Session-ID"})
    assert isinstance(producer, SessionIdProducer)
    c = cycle(headers={"x-session-id": "  s-9 "})
    producer.prepare(c, [])
    assert read_request_attribute(c, ("SessionIDDataKey", "session-id-producer")) == "s-9"
    empty = cycle(headers={"x-session-id": "  "})
    producer.prepare(empty, [])
    assert read_request_attribute(empty, ("SessionIDDataKey", "session-id-producer")) is None


# -- header-label affinity, LoRA affinity ---------------------------------------------------


def test_header_label_affinity_scores_matching_label_1_else_0() -> None:
    scorer = create_plugin(
        "header-label-affinity-scorer",
        "slice",
        {"headerName": "X-Disagg-Slice", "labelKey": "disaggregatedset.x-k8s.io/slice"},
    )
    assert isinstance(scorer, HeaderLabelAffinityScorer)
    eps = [
        endpoint("a", 1, labels={"disaggregatedset.x-k8s.io/slice": "0"}),
        endpoint("b", 2, labels={"disaggregatedset.x-k8s.io/slice": "1"}),
        endpoint("c", 3),
    ]
    assert scorer.score(cycle(headers={"x-disagg-slice": "1"}), eps) == [0.0, 1.0, 0.0]
    assert scorer.score(cycle(headers={"x-disagg-slice": "7"}), eps) == [0.0, 0.0, 0.0]
    assert scorer.score(cycle(), eps) == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="labelKey"):
        create_plugin("header-label-affinity-scorer", None, {"headerName": "x"})


def test_lora_affinity_scores_active_capacity_waiting_full() -> None:
    def lora_ep(
        port: int, running: tuple[str, ...], waiting: tuple[str, ...], max_lora: int | None
    ) -> Endpoint:
        ep = endpoint(f"e{port}", port)
        ep.metrics = EndpointMetrics(
            running_loras=running,
            waiting_loras=waiting,
            max_lora=max_lora,
            updated_at=time.monotonic(),
        )
        return ep

    eps = [
        lora_ep(1, ("sql-lora",), (), 2),  # active
        lora_ep(2, ("other",), (), 4),  # room for another adapter
        lora_ep(3, ("x", "y"), ("sql-lora",), 3),  # waiting, full
        lora_ep(4, ("x", "y"), (), 2),  # full
        lora_ep(5, (), (), None),  # max_lora unknown: no room
    ]
    c = cycle(body=b'{"model": "sql-lora", "messages": [{"role": "user", "content": "q"}]}')
    assert LoraAffinityScorer().score(c, eps) == [1.0, 0.8, 0.6, 0.0, 0.0]
    stale = endpoint("s", 9, fresh=False)
    assert LoraAffinityScorer().score(c, [stale]) == [0.0]
