"""utilization-detector as a scheduling filter through the Director: endpoints whose
scraped /metrics (real HTTP pages on 127.0.0.1) put them over the detector's limits are
not picked even when a scorer prefers them; headroom lets them back in; when every
endpoint is over, the filter keeps them all and the scorer decides."""

from __future__ import annotations

from pathlib import Path

import pytest

from epp.flowcontrol.detector_filter import UtilizationDetectorFilter

from .fixtures import FakeMetricsServer, MakePool, pd_config, wait_until
from .helpers import chat_body

CHAT = "/v1/chat/completions"

PROFILES = """
- name: default
  plugins:
  - pluginRef: decode-filter
  - pluginRef: shaper
  - pluginRef: kv-cache-utilization-scorer
"""


def plugins(headroom: float) -> str:
    # A wide staleness threshold: scrapes every 20 ms stay fresh on a busy machine.
    return f"""
- type: decode-filter
- type: kv-cache-utilization-scorer
- type: utilization-detector
  name: shaper
  parameters: {{queueDepthThreshold: 5, kvCacheUtilThreshold: 0.8, headroom: {headroom},
               metricsStalenessThreshold: 10s}}
"""


@pytest.mark.parametrize(("headroom", "expected"), [(0.0, "calm"), (0.5, "busy")])
async def test_the_filter_keeps_requests_off_an_endpoint_over_its_queue_limit(
    make_pool: MakePool, tmp_path: Path, headroom: float, expected: str
) -> None:
    # The KV scorer prefers "busy" (empty KV cache), whose queue of 7 is over the limit
    # 5 without headroom and under 5 x 1.5 = 7.5 with it.
    busy = FakeMetricsServer(waiting=7, kv=0.0)
    calm = FakeMetricsServer(waiting=0, kv=0.5)
    pool = await make_pool(
        {"busy": "decode", "calm": "decode"},
        fake={"busy": busy, "calm": calm},
        config=pd_config(tmp_path / "endpoints.yaml", plugins(headroom), PROFILES),
    )
    director = pool.director
    (flt,) = [
        f for f in director.config.scheduler.profiles["default"].filters if f.name == "shaper"
    ]
    assert isinstance(flt, UtilizationDetectorFilter)
    for i in range(10):
        decision = await director.decide(CHAT, {}, chat_body(f"q{i}"), None)
        assert decision.decode == pool.keys[expected]


async def test_when_every_endpoint_is_over_a_limit_all_are_kept(
    make_pool: MakePool, tmp_path: Path
) -> None:
    busy = FakeMetricsServer(waiting=7, kv=0.0)
    calm = FakeMetricsServer(waiting=0, kv=0.5)
    pool = await make_pool(
        {"busy": "decode", "calm": "decode"},
        fake={"busy": busy, "calm": calm},
        config=pd_config(tmp_path / "endpoints.yaml", plugins(0.0), PROFILES),
    )
    director = pool.director
    assert (await director.decide(CHAT, {}, chat_body("a"), None)).decode == pool.keys["calm"]
    # "calm" fills its KV cache past 0.8: both are over, so both stay candidates and the
    # KV scorer picks the emptier cache, the busy one's.
    calm.kv = 0.9
    calm_ep = director.datastore.get(pool.keys["calm"])
    assert calm_ep is not None
    await wait_until(lambda: calm_ep.metrics.kv_usage == 0.9)
    for i in range(5):
        decision = await director.decide(CHAT, {}, chat_body(f"b{i}"), None)
        assert decision.decode == pool.keys["busy"]
    # Its cache drains: it is the only one within the limits again.
    calm.kv = 0.3
    await wait_until(lambda: calm_ep.metrics.kv_usage == 0.3)
    assert (await director.decide(CHAT, {}, chat_body("c"), None)).decode == pool.keys["calm"]
