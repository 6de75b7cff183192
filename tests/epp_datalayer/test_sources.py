"""Data sources polling real servers: the simulator's DCGM series and model list, an
exporter's DaemonSet page, and the metrics scrape configured by metrics-data-source."""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from common.tls import self_signed
from epp.config import ConfigError
from epp.datalayer.attributes import read_scalar
from epp.datalayer.base import PrometheusExtractor
from epp.datalayer.dcgm import GPU_UTILIZATION, DcgmDataSource, DcgmExtractor
from epp.datalayer.models import ModelsDataSource, ModelsExtractorPlugin, served_models
from epp.datalayer.prom_text import PrometheusPage
from epp.datastore import Datastore, Endpoint
from tests.conftest import RunningSim, StartSim, eventually

from .pool import HEAD, StartDirector
from .servers import VLLM_PAGE, PageServer


def _gpu(ep: Endpoint) -> float | None:
    return read_scalar(ep, GPU_UTILIZATION, time.monotonic())


@asynccontextmanager
async def _busy(sim: RunningSim) -> AsyncIterator[None]:
    """One generation in progress on ``sim`` (a batch slot held) for the block."""
    body = {
        "model": "sim-model",
        "messages": [{"role": "user", "content": "hold a slot"}],
        "max_tokens": 2000,
        "stream": True,
    }
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{sim.url}/v1/chat/completions", json=body) as resp:
            assert resp.status == 200
            await resp.content.readline()
            yield


async def test_dcgm_source_follows_the_simulators_gpu_utilization(start_sim: StartSim) -> None:
    sim = await start_sim(max_num_seqs=2, itl_ms=20.0)
    store = Datastore()
    ep = Endpoint("pod-a", "127.0.0.1", sim.port)
    store.replace_source("test", [ep])
    source = DcgmDataSource(DcgmDataSource.Params(port=sim.port, path="/dcgm/metrics"))
    source.add_extractor(DcgmExtractor())
    await source.start(store, 0.02)
    try:

        async def util_is(value: float) -> bool:
            return _gpu(ep) == value

        await eventually(lambda: util_is(0.0), "an idle GPU")
        async with _busy(sim):
            await eventually(lambda: util_is(0.5), "one of two batch slots in use")
        await eventually(lambda: util_is(0.0), "the GPU idle again")
    finally:
        await source.stop()
    assert source.polls_ok > 0
    assert source.polls_failed == 0


DAEMONSET_PAGE = """\
# HELP DCGM_FI_DEV_GPU_UTIL GPU utilization (in %).
# TYPE DCGM_FI_DEV_GPU_UTIL gauge
DCGM_FI_DEV_GPU_UTIL{gpu="0",UUID="GPU-1",pod="pod-a",namespace="default"} 30
DCGM_FI_DEV_GPU_UTIL{gpu="1",UUID="GPU-2",pod="pod-a",namespace="default"} 70
DCGM_FI_DEV_GPU_UTIL{gpu="2",UUID="GPU-3",pod="pod-b",namespace="default"} 99
DCGM_FI_DEV_GPU_UTIL{gpu="3",UUID="GPU-4"} 10
DCGM_FI_DEV_FB_USED{gpu="0",UUID="GPU-1",pod="pod-a"} 1000
"""


async def test_dcgm_daemonset_page_node_address_pod_samples_max(
    caplog: pytest.LogCaptureFixture,
) -> None:
    exporter = await PageServer(body=DAEMONSET_PAGE).start()
    store = Datastore()
    # The pod IP is not routable here: only the node address can answer.
    rank = Endpoint("pod-a-rank-1", "10.255.255.1", 8001, node_address="127.0.0.1")
    other = Endpoint("pod-c", "10.255.255.2", 8000, node_address="127.0.0.1")
    no_node = Endpoint("pod-b", "127.0.0.1", 8000)
    store.replace_source("test", [rank, other, no_node])
    source = DcgmDataSource(DcgmDataSource.Params(port=exporter.port, use_node_address=True))
    source.add_extractor(DcgmExtractor())
    try:
        with caplog.at_level(logging.WARNING, logger="epp.datalayer.dcgm"):
            await source.start(store, 0.02)

            async def all_read() -> bool:
                return None not in (_gpu(rank), _gpu(other), _gpu(no_node))

            await eventually(all_read, "every endpoint's GPU utilization")
        # pod-a: the busier of its two GPUs, plus the unlabelled sample (kept for all).
        assert _gpu(rank) == 0.7
        assert _gpu(other) == 0.1  # only the unlabelled sample is not another pod's
        assert _gpu(no_node) == 0.99
        assert caplog.text.count("has no known node address") == 1
    finally:
        await source.stop()
        await exporter.stop()


async def test_dcgm_reading_expires_when_the_exporter_fails_and_comes_back(
    caplog: pytest.LogCaptureFixture,
) -> None:
    exporter = await PageServer(body=DAEMONSET_PAGE.replace('pod="pod-a",', "")).start()
    store = Datastore()
    ep = Endpoint("pod-x", "127.0.0.1", 8000)
    store.replace_source("test", [ep])
    source = DcgmDataSource(DcgmDataSource.Params(port=exporter.port))
    source.add_extractor(DcgmExtractor())
    try:
        with caplog.at_level(logging.INFO, logger="epp.datalayer.polling"):
            await source.start(store, 0.02)

            async def read() -> bool:
                return _gpu(ep) is not None

            async def gone() -> bool:
                return _gpu(ep) is None

            await eventually(read, "a first reading")
            exporter.status = 503
            started = time.monotonic()
            await eventually(gone, "the reading to expire")
            # It outlived the failures for its lifetime (at least 1 s), not for ever.
            assert time.monotonic() - started >= 0.5
            assert source.polls_failed >= 3
            exporter.status = 200
            await eventually(read, "a reading again")
        assert caplog.text.count("failed: HTTP 503") == 1
        assert "answers again" in caplog.text
    finally:
        await source.stop()
        await exporter.stop()


async def test_dcgm_page_without_the_series_is_an_extract_error() -> None:
    exporter = await PageServer(body="DCGM_FI_DEV_FB_USED 3\n").start()
    store = Datastore()
    ep = Endpoint("pod-x", "127.0.0.1", 8000)
    store.replace_source("test", [ep])
    source = DcgmDataSource(DcgmDataSource.Params(port=exporter.port))
    source.add_extractor(DcgmExtractor())
    try:
        await source.start(store, 0.02)

        async def counted() -> bool:
            return source.extract_errors >= 2

        await eventually(counted, "extract errors")
        assert _gpu(ep) is None
        assert source.polls_failed == 0  # the poll worked; the page lacked the series
    finally:
        await source.stop()
        await exporter.stop()


async def test_models_source_reads_each_endpoints_model_list(start_sim: StartSim) -> None:
    sim = await start_sim(served_model_name="llama-3-8b", zero_latency=True)
    broken = await PageServer(path="/v1/models", body="<html>not json</html>").start()
    store = Datastore()
    good = Endpoint("a", "127.0.0.1", sim.port)
    bad = Endpoint("b", "127.0.0.1", broken.port)
    store.replace_source("test", [good, bad])
    source = ModelsDataSource(ModelsDataSource.Params(interval=0.02))
    source.add_extractor(ModelsExtractorPlugin())
    try:
        await source.start(store, 0.02)

        async def listed() -> bool:
            return served_models(good, time.monotonic()) is not None and source.polls_failed > 0

        await eventually(listed, "the model list")
        models = served_models(good, time.monotonic())
        assert models is not None
        assert [m.id for m in models] == ["llama-3-8b"]
        assert models[0].owned_by == "vllm"
        assert served_models(bad, time.monotonic()) is None
    finally:
        await source.stop()
        await broken.stop()


CUSTOM_PAGE = VLLM_PAGE + (
    'custom_queue_depth{tier="gold"} 7\ncustom_queue_depth{tier="silver"} 2\n'
)


def _metrics_config(params: str, extractor: str = "") -> str:
    return (
        HEAD
        + "plugins:\n- type: decode-filter\n- type: queue-scorer\n"
        + f"- type: metrics-data-source\n  parameters: {params}\n"
        + extractor
        + "schedulingProfiles:\n- name: default\n"
        + "  plugins: [{pluginRef: decode-filter}, {pluginRef: queue-scorer}]\n"
    )


CUSTOM_EXTRACTOR = """- type: core-metrics-extractor
  parameters:
    engineConfigs:
    - name: vllm
      customMetrics:
      - {attributeKey: custom.queue_depth, metricSpec: "custom_queue_depth{tier=gold}"}
"""


async def test_metrics_source_sets_path_port_interval_and_custom_metrics(
    start_director: StartDirector,
) -> None:
    engine = await PageServer(path="/engine/metrics", body=CUSTOM_PAGE).start()
    try:
        director = await start_director(
            _metrics_config(
                f"{{path: /engine/metrics, port: {engine.port}, interval: 100ms}}",
                CUSTOM_EXTRACTOR,
            ),
            # The inference port answers nothing: only the override can be scraped.
            [{"name": "pod-a", "port": 1}],
        )
        assert director.scraper.interval_s == pytest.approx(0.1)

        async def scraped() -> bool:
            eps = director.datastore.snapshot()
            return bool(eps) and eps[0].metrics.updated_at > 0

        await eventually(scraped, "a scrape through the configured path and port")
        [ep] = director.datastore.snapshot()
        assert (ep.metrics.waiting, ep.metrics.running, ep.metrics.kv_usage) == (3, 2, 0.25)
        now = time.monotonic()
        assert read_scalar(ep, ("custom.queue_depth", "core-metrics-extractor"), now) == 7.0
    finally:
        await engine.stop()


async def test_metrics_source_interval_must_stay_below_the_staleness_threshold(
    start_director: StartDirector,
) -> None:
    with pytest.raises(ConfigError, match="interval 5s is not below --metrics-staleness-threshold"):
        await start_director(_metrics_config("{interval: 5s}"), [{"name": "a", "port": 1}])


@pytest.mark.parametrize("verify", [True, False])
async def test_metrics_source_scrapes_https(
    start_director: StartDirector, tmp_path: Path, verify: bool
) -> None:
    pair = self_signed()
    (tmp_path / "tls.crt").write_bytes(pair.cert_pem)
    (tmp_path / "tls.key").write_bytes(pair.key_pem)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(tmp_path / "tls.crt", tmp_path / "tls.key")
    engine = await PageServer(body=VLLM_PAGE, ssl_context=server_ctx).start()
    params: dict[str, Any] = {"scheme": "https"}
    if verify:
        params |= {"insecureSkipVerify": False, "caCertPath": str(tmp_path / "tls.crt")}
    try:
        director = await start_director(
            _metrics_config(str(params).replace("'", '"').replace("False", "false")),
            [{"name": "pod-a", "port": engine.port}],
        )

        async def scraped() -> bool:
            return director.datastore.snapshot()[0].metrics.waiting == 3

        await eventually(scraped, "an https scrape")
    finally:
        await engine.stop()


class _Broken(PrometheusExtractor):
    type_name = "test-broken-extractor"

    def extract_page(self, endpoint: Endpoint, page: PrometheusPage, expires_at: float) -> None:
        raise RuntimeError("a bug")


async def test_a_failing_extractor_neither_stops_the_others_nor_the_polls(
    caplog: pytest.LogCaptureFixture,
) -> None:
    exporter = await PageServer(body=DAEMONSET_PAGE).start()
    store = Datastore()
    ep = Endpoint("pod-b", "127.0.0.1", 8000)
    store.replace_source("test", [ep])
    source = DcgmDataSource(DcgmDataSource.Params(port=exporter.port))
    source.add_extractor(_Broken(name="broken"))
    source.add_extractor(DcgmExtractor())
    try:
        with caplog.at_level(logging.ERROR, logger="epp.datalayer.base"):
            await source.start(store, 0.02)

            async def several() -> bool:
                return source.extract_errors >= 3 and _gpu(ep) == 0.99

            await eventually(several, "polls go on past the failing extractor")
        assert caplog.text.count("broken for 127.0.0.1:8000: extractor failed") == 1
        assert "RuntimeError: a bug" in caplog.text
    finally:
        await source.stop()
        await exporter.stop()
