"""Engines other than vLLM: the engine-type label picks the metric names a pod is read
with (SGLang's, trtllm's, ...), so their load is seen and they never look idle."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from epp.datastore import Datastore, Endpoint
from epp.engine_metrics import (
    BUILTIN_ENGINES,
    ENGINE_LABEL,
    LEGACY_ENGINE_LABEL,
    EngineMappings,
    EngineMetricsParams,
    MetricSpec,
)
from epp.scraper import MetricsScraper, parse_metrics

from .fixtures import FakeMetricsServer, MakePool, pd_config, wait_until
from .helpers import chat_body

SGLANG_PAGE = """\
# HELP sglang:num_queue_reqs The number of requests in the waiting queue.
# TYPE sglang:num_queue_reqs gauge
sglang:num_queue_reqs{dp_rank="0",engine_type="unified",model_name="m",tp_rank="0"} 3.0
sglang:num_queue_reqs{dp_rank="1",engine_type="unified",model_name="m",tp_rank="0"} 2.0
sglang:num_queue_reqs_by_priority{priority="1"} 99.0
# TYPE sglang:num_running_reqs gauge
sglang:num_running_reqs{dp_rank="0",engine_type="unified",model_name="m",tp_rank="0"} 7.0
sglang:num_running_reqs{dp_rank="1",engine_type="unified",model_name="m",tp_rank="0"} 1.0
# TYPE sglang:token_usage gauge
sglang:token_usage{dp_rank="0",engine_type="unified",model_name="m",tp_rank="0"} 0.25
sglang:token_usage{dp_rank="1",engine_type="unified",model_name="m",tp_rank="0"} 0.5
# TYPE sglang:cache_config_info gauge
sglang:cache_config_info{num_pages="11147",page_size="64"} 1.0
# TYPE sglang:prompt_tokens_total counter
sglang:prompt_tokens_total{model_name="m"} 1234.0
"""

TRITON_PAGE = """\
nv_trt_llm_request_metrics{model="m",request_type="waiting",version="1"} 4
nv_trt_llm_request_metrics{model="m",request_type="scheduled",version="1"} 6
nv_trt_llm_request_metrics{model="m",request_type="max",version="1"} 512
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="fraction",model="m"} 0.75
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="tokens_per",model="m"} 32
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="max",model="m"} 2048
"""


@pytest.mark.parametrize(
    ("text", "name", "labels"),
    [
        ("vllm:num_requests_waiting", "vllm:num_requests_waiting", ()),
        (" m{a=b} ", "m", (("a", "b"),)),
        ('m{a="b c", d = e}', "m", (("a", "b c"), ("d", "e"))),
        ("m{}", "m", ()),
    ],
)
def test_metric_spec_parses_selectors(
    text: str, name: str, labels: tuple[tuple[str, str], ...]
) -> None:
    spec = MetricSpec.parse(text)
    assert spec is not None
    assert (spec.name, spec.labels) == (name, labels)


@pytest.mark.parametrize("text", ["9bad", "m{a}", "m{a=b", "m{=b}", "m n"])
def test_metric_spec_refuses_what_is_not_a_selector(text: str) -> None:
    with pytest.raises(ValueError, match=r"selector|matcher"):
        MetricSpec.parse(text)


def test_an_empty_spec_reads_nothing() -> None:
    assert MetricSpec.parse("") is None
    assert MetricSpec.parse("  ") is None


def test_sglang_page_read_with_sglang_names() -> None:
    parsed = parse_metrics(SGLANG_PAGE, BUILTIN_ENGINES["sglang"], 5.0)
    m = parsed.metrics
    assert (m.waiting, m.running) == (5.0, 8.0)  # summed over the data-parallel ranks
    assert m.kv_usage == 0.5  # the fullest rank
    assert (m.block_size, m.num_gpu_blocks) == (64, 11147)
    assert m.updated_at == 5.0
    assert parsed.missing == {} and not parsed.no_load_signal


def test_sglang_page_read_with_vllm_names_has_no_load_signal() -> None:
    parsed = parse_metrics(SGLANG_PAGE, BUILTIN_ENGINES["vllm"], 5.0)
    assert parsed.no_load_signal
    assert set(parsed.missing) == {"waiting", "running", "kv_usage"}


def test_label_matchers_pick_the_series() -> None:
    parsed = parse_metrics(TRITON_PAGE, BUILTIN_ENGINES["triton-tensorrt-llm"], 1.0)
    m = parsed.metrics
    assert (m.waiting, m.running, m.kv_usage) == (4.0, 6.0, 0.75)
    assert (m.block_size, m.num_gpu_blocks) == (32, 2048)


def test_a_partly_missing_page_names_what_is_missing() -> None:
    page = 'vllm:num_requests_running{model_name="m"} 2\n'
    parsed = parse_metrics(page, BUILTIN_ENGINES["vllm"], 1.0)
    assert parsed.metrics.running == 2.0
    assert parsed.missing == {
        "waiting": "vllm:num_requests_waiting",
        "kv_usage": "vllm:kv_cache_usage_perc",
    }
    assert not parsed.no_load_signal


def test_the_older_vllm_usage_name_still_counts() -> None:
    page = (
        "vllm:num_requests_waiting 1\nvllm:num_requests_running 1\nvllm:gpu_cache_usage_perc 0.3\n"
    )
    parsed = parse_metrics(page, BUILTIN_ENGINES["vllm"], 1.0)
    assert parsed.metrics.kv_usage == 0.3 and parsed.missing == {}


def test_engine_label_picks_the_mapping() -> None:
    engines = EngineMappings()
    assert engines.for_labels({}).name == "vllm"
    assert engines.for_labels({ENGINE_LABEL: "sglang"}).name == "sglang"
    assert engines.for_labels({LEGACY_ENGINE_LABEL: "sglang"}).name == "sglang"
    assert engines.for_labels({ENGINE_LABEL: "trtllm-serve"}).name == "trtllm-serve"
    assert engines.for_labels({ENGINE_LABEL: "no-such-engine"}).name == "vllm"  # as llm-d


def test_engine_configs_in_llm_d_form() -> None:
    params = EngineMetricsParams.model_validate(
        {
            "engineLabelKey": "example.com/engine",
            "defaultEngine": "sglang",
            "engineConfigs": [
                {
                    "name": "my-engine",
                    "queuedRequestsSpec": "custom_queue_size{status=waiting}",
                    "runningRequestsSpec": "custom_running_size",
                    "kvUsageSpec": "custom_cache_utilization",
                },
                {"name": "sglang", "queuedRequestsSpec": "sglang:num_queue_reqs{tp_rank=0}"},
            ],
        }
    )
    engines = params.build()
    assert engines.for_labels({}).name == "sglang"
    assert engines.default.queued == MetricSpec("sglang:num_queue_reqs", (("tp_rank", "0"),))
    assert engines.default.running is None  # a replaced engine is replaced whole
    mine = engines.for_labels({"example.com/engine": "my-engine"})
    assert mine.queued == MetricSpec("custom_queue_size", (("status", "waiting"),))
    assert engines.for_labels({ENGINE_LABEL: "my-engine"}).name == "sglang"  # other key


@pytest.mark.parametrize(
    ("doc", "says"),
    [
        ({"defaultEngine": "nope"}, "defaultEngine: no engine named 'nope'"),
        ({"engineConfigs": [{"name": "default"}]}, "reserved"),
        ({"engineConfigs": [{"name": "a"}, {"name": "a"}]}, "more than once"),
        ({"engineConfigs": [{"name": "a", "kvUsageSpec": "x{y"}]}, "not a metric selector"),
        (
            {"engineConfigs": [{"name": "a", "customMetrics": [{"attributeKey": "k"}]}]},
            "customMetrics is not supported",
        ),
        ({"engineConfigs": [{"name": "a", "queueSpec": "x"}]}, "queueSpec"),
    ],
)
def test_engine_configs_refused_with_the_field_named(doc: dict[str, Any], says: str) -> None:
    with pytest.raises(ValidationError, match=says):
        EngineMetricsParams.model_validate(doc)


def test_metric_name_flags_change_the_default_engine() -> None:
    engines = EngineMappings().with_default_names(
        queued="my_queue{pool=a}",
        running="my_running",
        kv_usage="my_usage",
        lora="",
        cache_info="vllm:cache_config_info",
    )
    default = engines.for_labels({})
    assert default.queued == MetricSpec("my_queue", (("pool", "a"),))
    assert default.kv_usage == (MetricSpec("my_usage"),)
    assert default.lora is None
    assert engines.for_labels({ENGINE_LABEL: "sglang"}) == BUILTIN_ENGINES["sglang"]
    same = EngineMappings().with_default_names(
        queued="vllm:num_requests_waiting",
        running="vllm:num_requests_running",
        kv_usage="vllm:kv_cache_usage_perc",
        lora="vllm:lora_requests_info",
        cache_info="vllm:cache_config_info",
    )
    assert same.default == BUILTIN_ENGINES["vllm"]  # the defaults keep the old usage name


async def test_scraper_reads_each_pod_with_its_engine(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Two SGLang pods: the labelled one is read and fresh; the unlabelled one is read
    with vLLM's names, finds no load signal, says so once, and stays stale."""
    labelled = await FakeMetricsServer(engine="sglang", waiting=4, kv=0.5).start()
    unlabelled = await FakeMetricsServer(engine="sglang", waiting=4, kv=0.5).start()
    ds = Datastore()
    good = Endpoint("good", "127.0.0.1", labelled.port, labels={ENGINE_LABEL: "sglang"})
    bad = Endpoint("bad", "127.0.0.1", unlabelled.port, labels={})
    ds.replace_source("t", [good, bad])
    scraper = MetricsScraper(ds, interval_s=0.02)
    await scraper.start()
    try:
        with caplog.at_level(logging.WARNING, logger="epp.scraper"):
            await wait_until(lambda: good.metrics.updated_at > 0 and unlabelled.hits >= 3)
        assert (good.metrics.waiting, good.metrics.running, good.metrics.kv_usage) == (4, 1, 0.5)
        assert bad.metrics.updated_at == 0.0
        assert not bad.is_fresh(time.monotonic(), 2.0)  # scored as busy, never idle
        warnings = [r.getMessage() for r in caplog.records if "bad" in r.getMessage()]
        assert len(warnings) == 1, warnings
        assert "vllm:num_requests_waiting" in warnings[0]
        assert "read as engine 'vllm' (no engine label)" in warnings[0]
        assert "stale" in warnings[0]
    finally:
        await scraper.stop()
        await labelled.stop()
        await unlabelled.stop()


async def test_a_busy_sglang_pod_is_not_picked_as_idle(make_pool: MakePool, tmp_path: Path) -> None:
    """A queue-scored pool of an idle vLLM pod and a queued SGLang pod, then the other
    way round: the queue decides both times."""
    plugins = """
- type: decode-filter
- type: queue-scorer
- type: max-score-picker
"""
    profiles = """
- name: decode
  plugins: [{pluginRef: decode-filter}, {pluginRef: queue-scorer}]
"""
    sglang = FakeMetricsServer(engine="sglang", waiting=9)
    vllm = FakeMetricsServer(waiting=0)
    pool = await make_pool(
        {"sg": "decode", "vl": "decode"},
        config=pd_config(tmp_path / "endpoints.yaml", plugins, profiles),
        fake={"sg": sglang, "vl": vllm},
        labels={"sg": {ENGINE_LABEL: "sglang"}},
    )
    [sg] = [ep for ep in pool.director.datastore.snapshot() if ep.name == "sg"]
    assert sg.metrics.waiting == 9
    for _ in range(3):
        d = await pool.director.decide("/v1/chat/completions", {}, chat_body("hi"), None)
        assert d.decode == pool.keys["vl"]
        d.on_finished()
    sglang.waiting, vllm.waiting = 0, 9
    await wait_until(lambda: sg.metrics.waiting == 0)
    [vl] = [ep for ep in pool.director.datastore.snapshot() if ep.name == "vl"]
    await wait_until(lambda: vl.metrics.waiting == 9)
    d = await pool.director.decide("/v1/chat/completions", {}, chat_body("hi"), None)
    assert d.decode == pool.keys["sg"]
