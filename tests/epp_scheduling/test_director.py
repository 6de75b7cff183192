"""The P/D scenarios end to end through Director.decide, with file discovery and
simulated engines' /metrics."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from epp.config import ConfigError
from epp.decision import BadRequest, NoEndpoints
from epp.director import DirectorSettings, build_director
from epp.metrics import EppMetrics
from epp.plugins.active_request_scorer import ActiveRequestScorer
from epp.plugins.file_discovery import FileDiscovery
from tests.conftest import sample_sum

from .fixtures import FakeMetricsServer, MakePool, pd_config, wait_until, write_endpoints
from .helpers import chat_body

CHAT = "/v1/chat/completions"
LONG = "Summarise the following report in detail. " + "lorem ipsum dolor sit amet " * 80
SHORT = "hi"
IMAGE = [{"type": "image_url", "image_url": {"url": "http://images.local/cat.png"}}]


def counter(metrics: EppMetrics, decision_type: str) -> float:
    return sample_sum(
        metrics.registry, "llm_d_epp_disagg_decision_total", decision_type=decision_type
    )


async def test_long_prompt_prefills_then_cached_prompt_is_decode_only(make_pool: MakePool) -> None:
    pool = await make_pool({"d1": "decode", "d2": "decode", "p1": "prefill"})
    director = pool.director
    first = await director.decide(CHAT, {}, chat_body(LONG), None)
    assert first.decision_type == "prefill-decode"
    assert first.prefill == pool.keys["p1"]
    assert first.decode in (pool.keys["d1"], pool.keys["d2"])
    first.on_finished()

    again = await director.decide(CHAT, {}, chat_body(LONG), None)
    assert again.decision_type == "decode-only"
    assert again.prefill is None
    # The prefix scorer sends it back to the pod that now holds the prefix.
    assert again.decode == first.decode
    again.on_finished()

    assert counter(pool.metrics, "prefill-decode") == 1
    assert counter(pool.metrics, "decode-only") == 1
    reg = pool.metrics.registry
    assert counter(pool.metrics, "prefill-decode") == sample_sum(
        reg, "llm_d_epp_disagg_decision_total", model_name="m", decision_type="prefill-decode"
    )
    assert reg.get_sample_value("llm_d_epp_scheduler_e2e_duration_seconds_count") == 2
    assert sample_sum(reg, "llm_d_epp_scheduler_attempts_total", status="success") == 2
    assert (
        reg.get_sample_value(
            "llm_d_epp_plugin_duration_seconds_count",
            {
                "extension_point": "Scorer",
                "plugin_type": "prefix-cache-scorer",
                "plugin_name": "prefix-cache-scorer",
            },
        )
        == 2
    )


async def test_short_prompt_is_decode_only(make_pool: MakePool) -> None:
    pool = await make_pool({"d1": "decode", "p1": "prefill"})
    decision = await pool.director.decide(CHAT, {}, chat_body(SHORT), None)
    assert decision.decision_type == "decode-only"
    assert decision.decode == pool.keys["d1"]


async def test_no_prefill_pods_is_decode_only(make_pool: MakePool) -> None:
    pool = await make_pool({"d1": "decode", "d2": "decode"})
    decision = await pool.director.decide(CHAT, {}, chat_body(LONG), None)
    assert decision.decision_type == "decode-only"
    assert decision.prefill is None


async def test_no_decode_pods_is_no_endpoints(make_pool: MakePool) -> None:
    pool = await make_pool({"p1": "prefill", "e1": "encode"})
    with pytest.raises(NoEndpoints) as info:
        await pool.director.decide(CHAT, {}, chat_body(LONG), None)
    assert info.value.status == 503


async def test_unlabelled_pod_serves_as_decode(make_pool: MakePool) -> None:
    pool = await make_pool({"plain": None, "p1": "prefill"})
    decision = await pool.director.decide(CHAT, {}, chat_body(LONG), None)
    assert decision.decode == pool.keys["plain"]
    assert decision.prefill == pool.keys["p1"]


async def test_multimodal_goes_to_encode_pod(make_pool: MakePool) -> None:
    pool = await make_pool({"d1": "decode", "p1": "prefill", "e1": "encode"})
    short_mm = await pool.director.decide(CHAT, {}, chat_body(SHORT, extra_parts=IMAGE), None)
    assert short_mm.decision_type == "encode-decode"
    assert short_mm.encoders == [pool.keys["e1"]]
    assert short_mm.prefill is None
    long_mm = await pool.director.decide(
        CHAT, {}, chat_body(LONG + " new", extra_parts=IMAGE), None
    )
    assert long_mm.decision_type == "encode-prefill-decode"
    assert long_mm.encoders == [pool.keys["e1"]]
    assert long_mm.prefill == pool.keys["p1"]
    text_only = await pool.director.decide(CHAT, {}, chat_body(SHORT), None)
    assert text_only.encoders == []
    assert counter(pool.metrics, "encode-decode") == 1
    assert counter(pool.metrics, "encode-prefill-decode") == 1


async def test_multimodal_without_encode_pods_is_served_by_decode(make_pool: MakePool) -> None:
    pool = await make_pool({"d1": "decode"})
    decision = await pool.director.decide(CHAT, {}, chat_body(SHORT, extra_parts=IMAGE), None)
    assert decision.decision_type == "decode-only" and decision.encoders == []


async def test_subset_hint_is_honoured(make_pool: MakePool) -> None:
    pool = await make_pool(
        {"d1": "decode", "d2": "decode", "p1": "prefill"},
        hosts={"d1": "127.0.0.2", "d2": "127.0.0.3", "p1": "127.0.0.4"},
    )
    director = pool.director
    for _ in range(5):
        d = await director.decide(CHAT, {}, chat_body(SHORT), [pool.keys["d2"]])
        assert d.decode == pool.keys["d2"]
    with pytest.raises(NoEndpoints):
        await director.decide(CHAT, {}, chat_body(SHORT), [])
    with pytest.raises(NoEndpoints):
        await director.decide(CHAT, {}, chat_body(SHORT), ["10.9.9.9:1"])


async def test_subset_hint_matches_by_ip_and_scopes_only_the_decode(make_pool: MakePool) -> None:
    """The hint lists decode pods only (as a gateway that knows nothing of P/D does); the
    prefill pod stays available, and the hint's port does not matter (llm-d matches by IP)."""
    pool = await make_pool(
        {"d1": "decode", "d2": "decode", "p1": "prefill"},
        hosts={"d1": "127.0.0.2", "d2": "127.0.0.3", "p1": "127.0.0.4"},
    )
    for hint in (["127.0.0.3:1"], ["127.0.0.3"], ["[::1]:80", "127.0.0.3:9"]):
        # A prompt of its own each time, so no cached prefix makes it decode-only.
        d = await pool.director.decide(CHAT, {}, chat_body(str(hint) + LONG), hint)
        assert d.decode == pool.keys["d2"], hint
        assert d.prefill == pool.keys["p1"], hint
        assert d.decision_type == "prefill-decode"
    # A hint naming only the prefill pod leaves no decode endpoint: 503, not a prefill pod
    # as the destination.
    with pytest.raises(NoEndpoints):
        await pool.director.decide(CHAT, {}, chat_body(LONG), ["127.0.0.4:1"])


async def test_malformed_request_is_bad_request(make_pool: MakePool) -> None:
    pool = await make_pool({"d1": "decode"})
    with pytest.raises(BadRequest):
        await pool.director.decide(CHAT, {}, b"{oops", None)
    with pytest.raises(BadRequest):
        await pool.director.decide("/v1/embeddings", {}, b"{}", None)
    # A path no parser claims goes to the passthrough parser: not refused.
    decision = await pool.director.decide("/v1/nothing", {}, b"{oops", None)
    assert decision.decode == pool.keys["d1"]
    decision.on_finished()


async def test_in_flight_counts_released_by_decision_hooks(make_pool: MakePool) -> None:
    pool = await make_pool({"d1": "decode", "p1": "prefill"})
    scorer = pool.director.config.plugins.get("active-request-scorer")
    assert isinstance(scorer, ActiveRequestScorer)
    d = await pool.director.decide(CHAT, {}, chat_body(LONG), None)
    assert d.prefill is not None
    assert scorer.in_flight == {pool.keys["d1"]: 1, pool.keys["p1"]: 1}
    d.on_response_started()
    assert scorer.in_flight == {pool.keys["d1"]: 1}
    d.on_finished()
    d.on_finished()
    assert scorer.in_flight == {}


async def test_active_requests_spread_load(make_pool: MakePool) -> None:
    config_plugins = """
- type: decode-filter
- type: active-request-scorer
- type: max-score-picker
"""
    profiles = """
- name: default
  plugins: [{pluginRef: decode-filter}, {pluginRef: active-request-scorer}]
"""
    pool = await make_pool({"d1": "decode", "d2": "decode"}, config=None)
    file = pool.endpoints_file
    metrics = EppMetrics()
    director = await build_director(
        DirectorSettings(config_text=pd_config(file, config_plugins, profiles)), metrics
    )
    await director.start()
    try:
        a = await director.decide(CHAT, {}, chat_body("x"), None)
        b = await director.decide(CHAT, {}, chat_body("y"), None)
        assert {a.decode, b.decode} == {pool.keys["d1"], pool.keys["d2"]}
        a.on_finished()
        c = await director.decide(CHAT, {}, chat_body("z"), None)
        assert c.decode == a.decode
    finally:
        await director.stop()


QUEUE_ONLY_PLUGINS = """
- type: decode-filter
- type: queue-scorer
- type: kv-cache-utilization-scorer
"""
QUEUE_ONLY_PROFILES = """
- name: default
  plugins:
  - pluginRef: decode-filter
  - pluginRef: queue-scorer
  - pluginRef: kv-cache-utilization-scorer
"""


async def test_scraped_queue_steers_and_stale_endpoint_never_looks_idle(
    make_pool: MakePool, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="epp.director")
    busy = FakeMetricsServer(waiting=10, kv=0.5)
    idle = FakeMetricsServer(waiting=0, kv=0.0)
    pool = await make_pool(
        {"busy": "decode", "idle": "decode"},
        fake={"busy": busy, "idle": idle},
        config=pd_config(tmp_path / "endpoints.yaml", QUEUE_ONLY_PLUGINS, QUEUE_ONLY_PROFILES),
        staleness_s=0.3,
    )
    director = pool.director
    for _ in range(5):
        assert (await director.decide(CHAT, {}, chat_body("q"), None)).decode == pool.keys["idle"]
    # The idle pod's /metrics breaks: its last page said idle, but once stale it must
    # look busy, and the (fresh, loaded) other pod wins.
    idle.broken = True
    ep = director.datastore.get(pool.keys["idle"])
    assert ep is not None
    await wait_until(lambda: not ep.is_fresh(director.datastore.clock(), 0.3))
    for _ in range(5):
        assert (await director.decide(CHAT, {}, chat_body("q"), None)).decode == pool.keys["busy"]
    # The move is logged once, naming the endpoint (the busy one never went stale).
    stale = f"endpoint {pool.keys['idle']} (idle): metrics stale (last scraped"
    await wait_until(lambda: any(stale in r.getMessage() for r in caplog.records))
    # Recovery: fresh metrics again, and it wins again.
    idle.broken = False
    await wait_until(lambda: ep.is_fresh(director.datastore.clock(), 0.3))
    assert (await director.decide(CHAT, {}, chat_body("q"), None)).decode == pool.keys["idle"]
    fresh = f"endpoint {pool.keys['idle']} (idle): metrics fresh again"
    await wait_until(lambda: any(fresh in r.getMessage() for r in caplog.records))
    messages = [r.getMessage() for r in caplog.records]
    assert sum(stale in m for m in messages) == 1
    assert not any(pool.keys["busy"] in m for m in messages if "metrics" in m)


async def test_file_watch_adds_and_removes_endpoints(
    make_pool: MakePool, start_sim: object
) -> None:
    pool = await make_pool({"d1": "decode"})
    director = pool.director
    sim2 = await start_sim(zero_latency=True, role="decode")  # type: ignore[operator]
    d1_port = int(pool.keys["d1"].rsplit(":", 1)[1])
    write_endpoints(
        pool.endpoints_file,
        [("d1", "127.0.0.1", d1_port, "decode"), ("d2", "127.0.0.1", sim2.port, "decode")],
    )
    await wait_until(lambda: director.datastore.get(sim2.host_port) is not None)
    new = director.datastore.get(sim2.host_port)
    assert new is not None
    await wait_until(lambda: new.metrics.updated_at > 0)
    write_endpoints(pool.endpoints_file, [("d2", "127.0.0.1", sim2.port, "decode")])
    await wait_until(lambda: director.datastore.get(pool.keys["d1"]) is None)
    d = await director.decide(CHAT, {}, chat_body("x"), None)
    assert d.decode == sim2.host_port
    # A broken rewrite keeps the previous endpoints.
    discovery = director.discovery
    assert isinstance(discovery, FileDiscovery)
    pool.endpoints_file.write_text("endpoints: [ {name: broken")
    await wait_until(lambda: discovery.watcher.reload_errors >= 1)
    assert director.datastore.get(sim2.host_port) is not None
    assert director.is_ready()


async def test_readiness_and_stop(make_pool: MakePool, tmp_path: Path) -> None:
    file = tmp_path / "empty.yaml"
    write_endpoints(file, [])
    director = await build_director(DirectorSettings(config_text=pd_config(file)), EppMetrics())
    assert not director.is_ready()
    await director.start()
    assert not director.is_ready()  # no endpoints yet
    with pytest.raises(NoEndpoints):
        await director.decide(CHAT, {}, chat_body("x"), None)
    await director.stop()
    await director.stop()
    pool = await make_pool({"d1": "decode"})
    assert pool.director.is_ready()
    reg = pool.metrics.registry
    await wait_until(lambda: sample_sum(reg, "llm_d_epp_ready_endpoints") == 1)
    assert reg.get_sample_value("disagg_epp_endpoints", {"role": "decode"}) == 1


async def test_build_director_errors() -> None:
    with pytest.raises(ConfigError, match="no endpoint discovery"):
        await build_director(DirectorSettings(), EppMetrics())
    with pytest.raises(ConfigError, match="bogus"):
        await build_director(
            DirectorSettings(
                config_text=json.dumps(
                    {
                        "apiVersion": "llm-d.ai/v1alpha1",
                        "kind": "EndpointPickerConfig",
                        "plugins": [{"type": "queue-scorer", "parameters": {"bogus": 1}}],
                    }
                )
            ),
            EppMetrics(),
        )


async def test_model_label_cardinality_is_bounded(make_pool: MakePool) -> None:
    pool = await make_pool({"d1": "decode"})
    pool.metrics.models.cap = 64
    for i in range(80):
        decision = await pool.director.decide(CHAT, {}, chat_body("x", model=f"model-{i}"), None)
        decision.on_finished()
    reg = pool.metrics.registry

    def decisions(model: str) -> float:
        return sample_sum(reg, "llm_d_epp_disagg_decision_total", model_name=model)

    assert decisions("model-0") == 1
    assert decisions("other") == 16
    assert decisions("model-79") == 0


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (None, "No such file"),
        ("endpoints:\n- {name: a, address: 10.0.0.1, port: '80', zone: x}\n", "zone"),
        ("endpoints:\n- {name: a, address: 10.0.0.1, port: 'http'}\n", "port"),
        ("endpoints: [\n", "not valid YAML"),
    ],
)
async def test_bad_endpoints_file_is_a_config_error(
    tmp_path: Path, content: str | None, needle: str
) -> None:
    file = tmp_path / "endpoints.yaml"
    if content is not None:
        file.write_text(content)
    director = await build_director(DirectorSettings(config_text=pd_config(file)), EppMetrics())
    try:
        with pytest.raises(ConfigError, match=needle) as info:
            await director.start()
        assert str(file) in str(info.value)
    finally:
        await director.stop()
