"""predicted-latency-producer against a real HTTP stand-in of llm-d's latency predictor:
bulk predictions mapped to the endpoints, validity against the SLO headers, the
requests it tracks, training samples after completion, and a predictor that is down,
failing or stalled."""

from __future__ import annotations

import asyncio
import time

import pytest
from prometheus_client import CollectorRegistry

from epp.config import SchedulerConfig
from epp.datalayer.latency import read_predictions
from epp.datastore import Endpoint
from epp.flowcontrol.latency_admitter import LatencySloAdmitter
from epp.plugins.token_producer import tokenized_prompt
from epp.scheduling.cycle import CycleState
from epp.scheduling.scheduler import Tracking
from tests.conftest import sample_sum
from tests.epp_scheduling.helpers import cycle, endpoint

from .conftest import Loader
from .predictor_server import PredictorServer


def pool() -> list[Endpoint]:
    return [
        endpoint("a", 8000, waiting=0, running=1, kv=0.3),
        endpoint("b", 8001, waiting=2, running=1, kv=0.4),
        endpoint("c", 8002, waiting=5, running=1, kv=0.9),
    ]


async def route(c: SchedulerConfig, cyc: CycleState, eps: list[Endpoint]) -> Tracking:
    await c.scheduler.produce(cyc, eps)
    result = c.scheduler.schedule(cyc, eps)
    return c.scheduler.track(cyc, result)


async def test_bulk_predictions_are_mapped_to_endpoints_and_checked_against_the_slo(
    server: PredictorServer, loader: Loader
) -> None:
    c, producer = loader(server.url)
    eps = pool()
    probe = cycle("what is the weather like")
    tokens = len(tokenized_prompt(probe).token_ids)
    slo = 20 + tokens + 250  # a: 250 ms headroom, b: 50, c: -250
    cyc = cycle("what is the weather like", headers={"x-llm-d-slo-ttft-ms": str(slo)})
    await c.scheduler.produce(cyc, eps)

    (rows,) = server.bulk_requests  # one bulk call for all candidates
    assert [r["num_request_waiting"] for r in rows] == [0, 2, 5]
    assert [r["kv_cache_percentage"] for r in rows] == [0.3, 0.4, 0.9]
    assert {r["input_token_length"] for r in rows} == {tokens}
    assert {r["num_tokens_generated"] for r in rows} == {1}
    assert {r["num_request_running"] for r in rows} == {0}  # nothing in flight from here
    assert {r["prefix_cache_score"] for r in rows} == {0.0}
    assert "pod_type" not in rows[0]

    infos = read_predictions(cyc, "predicted-latency-producer")
    assert set(infos) == {ep.key for ep in eps}
    a, b, cc = (infos[ep.key] for ep in eps)
    assert (a.ttft, b.ttft, cc.ttft) == (20 + tokens, 220 + tokens, 520 + tokens)
    assert (a.ttft_headroom, b.ttft_headroom, cc.ttft_headroom) == (250, 50, -250)
    assert (a.is_valid, b.is_valid, cc.is_valid) == (True, True, False)
    # Without streaming mode TPOT is neutral: valid, no headroom.
    assert a.tpot == 15.0 and a.tpot_valid and a.tpot_headroom == 0.0
    assert producer.client.predictions_ok == 1


async def test_without_an_slo_header_no_prediction_is_valid(
    server: PredictorServer, loader: Loader
) -> None:
    c, _ = loader(server.url)
    eps = pool()
    cyc = cycle("hi")
    await c.scheduler.produce(cyc, eps)
    infos = read_predictions(cyc, "predicted-latency-producer")
    assert len(infos) == 3 and not any(i.is_valid for i in infos.values())
    assert all(i.ttft_headroom < 0 for i in infos.values())


async def test_dispatched_requests_are_counted_until_the_request_ends(
    server: PredictorServer, loader: Loader
) -> None:
    c, producer = loader(server.url)
    eps = pool()
    first = cycle("one", headers={"x-llm-d-slo-ttft-ms": "1000"})
    tracking = await route(c, first, eps)
    picked = tracking.result.targets(tracking.result.primary)[0]
    assert picked.key == eps[0].key  # the shortest queue
    assert producer.dispatched(picked) == 1

    second = cycle("two", headers={"x-llm-d-slo-ttft-ms": "1000"})
    await c.scheduler.produce(second, eps)
    infos = read_predictions(second, "predicted-latency-producer")
    assert infos[picked.key].dispatched_request_count == 1
    assert infos[eps[1].key].dispatched_request_count == 0
    # The in-flight load producer's count is the running feature sent to the predictor.
    assert server.bulk_requests[-1][0]["num_request_running"] == 1

    tracking.release_all()  # the first request ended (any way)
    assert producer.dispatched(picked) == 0
    await producer.client.flush()
    assert server.training == []  # it never completed: no sample


async def test_a_completed_request_sends_its_end_to_end_latency_as_a_ttft_sample(
    server: PredictorServer, loader: Loader
) -> None:
    c, producer = loader(server.url)
    eps = pool()
    cyc = cycle("hello there", headers={"x-llm-d-slo-ttft-ms": "500"})
    tracking = await route(c, cyc, eps)
    c.scheduler.response_body(cyc, False)
    c.scheduler.response_body(cyc, True)
    tracking.release_all()
    await producer.client.flush()
    (entry,) = server.training
    assert entry["actual_ttft_ms"] > 0 and entry["actual_tpot_ms"] == 0
    assert entry["input_token_length"] == len(tokenized_prompt(cyc).token_ids)
    assert entry["kv_cache_percentage"] == 0.3 and entry["num_request_waiting"] == 0
    assert entry["timestamp"].endswith("Z")
    assert producer.client.training_sent == 1


async def test_streaming_mode_samples_ttft_and_tpot_and_checks_the_tightest_tpot_slo(
    server: PredictorServer, loader: Loader
) -> None:
    c, producer = loader(server.url, "{streamingMode: true}")
    eps = pool()
    headers = {"x-llm-d-slo-ttft-ms": "5000", "x-llm-d-slo-tpot-ms": "12"}
    held = cycle("held", headers=headers)
    tracking = await route(c, held, eps)
    picked = tracking.result.targets(tracking.result.primary)[0]
    infos = read_predictions(held, "predicted-latency-producer")
    # Predicted TPOT 15 ms against 12 ms: invalid, headroom -3.
    assert not infos[picked.key].tpot_valid and infos[picked.key].tpot_headroom == -3.0

    # A looser request: on the endpoint running the 12 ms request the bound is 12 ms.
    loose = cycle("loose", headers={"x-llm-d-slo-ttft-ms": "5000", "x-llm-d-slo-tpot-ms": "20"})
    await c.scheduler.produce(loose, eps)
    infos = read_predictions(loose, "predicted-latency-producer")
    assert not infos[picked.key].tpot_valid
    assert infos[eps[1].key].tpot_valid and infos[eps[1].key].tpot_headroom == 5.0

    for end in (False, False, False, True):
        c.scheduler.response_body(held, end)
    tracking.release_all()
    await producer.client.flush()
    ttft, tpot = server.training
    assert ttft["actual_ttft_ms"] > 0 and ttft["actual_tpot_ms"] == 0
    assert tpot["actual_ttft_ms"] == 0 and tpot["actual_tpot_ms"] > 0


async def test_prefill_endpoints_get_a_neutral_tpot(
    server: PredictorServer, loader: Loader
) -> None:
    c, _ = loader(server.url, "{streamingMode: true, endpointRoleLabel: llm-d.ai/role}")
    eps = [endpoint("p", 8000, "prefill", kv=0.3), endpoint("d", 8001, "decode", kv=0.3)]
    cyc = cycle("x", headers={"x-llm-d-slo-ttft-ms": "5000", "x-llm-d-slo-tpot-ms": "10"})
    await c.scheduler.produce(cyc, eps)
    (rows,) = server.bulk_requests
    assert [r["pod_type"] for r in rows] == ["prefill", "decode"]
    infos = read_predictions(cyc, "predicted-latency-producer")
    assert infos[eps[0].key].tpot_valid and infos[eps[0].key].tpot_headroom == 0.0
    assert not infos[eps[1].key].tpot_valid


async def test_predict_in_produce_false_only_trains(
    server: PredictorServer, loader: Loader
) -> None:
    c, producer = loader(server.url, "{predictInProduce: false}")
    eps = pool()
    cyc = cycle("hi", headers={"x-llm-d-slo-ttft-ms": "100"})
    await route(c, cyc, eps)
    assert server.bulk_requests == []
    assert read_predictions(cyc, "predicted-latency-producer") == {}
    c.scheduler.response_body(cyc, True)
    await producer.client.flush()
    assert len(server.training) == 1


async def test_a_predictor_that_is_down_gives_no_predictions_counted(
    server: PredictorServer, loader: Loader
) -> None:
    url = server.url
    await server.stop()  # nothing listens there any more
    c, producer = loader(url)
    registry = CollectorRegistry()
    producer.register_metrics(registry)
    eps = pool()
    admitter = LatencySloAdmitter()
    for _ in range(3):
        cyc = cycle("hi", headers={"x-llm-d-slo-ttft-ms": "1"})
        t0 = time.monotonic()
        await c.scheduler.produce(cyc, eps)
        assert time.monotonic() - t0 < 5.0
        assert read_predictions(cyc, "predicted-latency-producer") == {}
        # Without predictions the admitter fails open.
        assert admitter.admit_request(-1, cyc, eps) is None
    name = "disagg_epp_latency_predictions_total"
    assert sample_sum(registry, name, outcome="error") == 3
    assert sample_sum(registry, name, outcome="success") == 0
    # Scheduling goes on without predictions.
    tracking = await route(c, cycle("on"), eps)
    assert tracking.result.targets(tracking.result.primary)
    # Training samples that cannot be delivered are dropped, not kept for ever.
    c.scheduler.response_body(tracking.cycle, True)
    await producer.client.flush()
    assert producer.client.training_dropped == 1 and not producer.client._pending


async def test_a_failing_predictor_gives_no_predictions(
    server: PredictorServer, loader: Loader
) -> None:
    server.fail = True
    c, producer = loader(server.url)
    cyc = cycle("hi", headers={"x-llm-d-slo-ttft-ms": "100"})
    await c.scheduler.produce(cyc, pool())
    assert len(server.bulk_requests) == 1
    assert read_predictions(cyc, "predicted-latency-producer") == {}
    assert producer.client.predictions_failed == 1


async def test_a_stalled_predictor_is_cut_by_the_http_timeout(
    server: PredictorServer, loader: Loader
) -> None:
    server.stall = asyncio.Event()
    c, producer = loader(server.url, timeout_s=1)
    cyc = cycle("hi", headers={"x-llm-d-slo-ttft-ms": "100"})
    t0 = time.monotonic()
    await asyncio.wait_for(c.scheduler.produce(cyc, pool()), 10)
    took = time.monotonic() - t0
    assert 0.5 < took < 5.0
    assert read_predictions(cyc, "predicted-latency-producer") == {}
    assert producer.client.predictions_failed == 1
    server.stall.set()


async def test_after_a_failure_the_client_backs_off_then_probes_again(
    server: PredictorServer,
) -> None:
    from epp.plugins.latency_predictor_client import (
        LatencyPredictorClient,
        PredictionRequest,
        PredictorConfig,
        PredictorError,
    )

    now = [100.0]
    client = LatencyPredictorClient(
        PredictorConfig(training_url=server.url, prediction_urls=(server.url,)),
        clock=lambda: now[0],
    )
    row = [PredictionRequest(0.5, 10, 1, 1, 1, 0.0)]
    try:
        server.fail = True
        with pytest.raises(PredictorError, match="500"):
            await client.predict_bulk_strict(row)
        server.fail = False
        # Within the backoff: refused at once, the server is not asked.
        with pytest.raises(PredictorError, match="unavailable"):
            await client.predict_bulk_strict(row)
        assert len(server.bulk_requests) == 1
        now[0] += 1.5  # past the 1 s backoff: one probe, which succeeds
        (pred,) = await client.predict_bulk_strict(row)
        assert pred.ttft_ms == server.ttft(server.bulk_requests[-1][0])
        assert len(server.bulk_requests) == 2
        # Healthy again: no backoff left.
        await client.predict_bulk_strict(row)
        assert len(server.bulk_requests) == 3
        assert (client.predictions_ok, client.predictions_failed) == (2, 2)
        # A new failure backs off again; a failed probe doubles it (2 s).
        server.fail = True
        with pytest.raises(PredictorError, match="500"):
            await client.predict_bulk_strict(row)
        now[0] += 1.5
        with pytest.raises(PredictorError, match="500"):
            await client.predict_bulk_strict(row)
        assert len(server.bulk_requests) == 5
        now[0] += 1.5
        with pytest.raises(PredictorError, match="unavailable"):
            await client.predict_bulk_strict(row)
        assert len(server.bulk_requests) == 5
    finally:
        await client.aclose()
