"""Coalescing of concurrent prediction calls into one bulk HTTP request, against the
real HTTP stand-in of the latency predictor: one request for a window's calls, each
caller's own predictions, the row cap, and a batch that fails or stalls."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import pytest
from prometheus_client import CollectorRegistry

from epp.datalayer.latency import read_predictions
from epp.plugins.latency_predictor_client import (
    LatencyPredictorClient,
    PredictionRequest,
    PredictorConfig,
    PredictorError,
)
from tests.conftest import eventually, sample_sum
from tests.epp_scheduling.helpers import cycle

from .conftest import Loader
from .predictor_server import PredictorServer
from .test_producer import pool

# Wide enough that every call started in one loop turn joins the same batch.
WINDOW_S = 0.2


def _async(check: Callable[[], bool]) -> Callable[[], Awaitable[bool]]:
    async def wrapped() -> bool:
        return check()

    return wrapped


def rows(caller: int, n: int) -> list[PredictionRequest]:
    """``n`` rows whose waiting count names the caller and the row."""
    return [PredictionRequest(0.5, 10, 100 * caller + i, 1, 1, 0.0) for i in range(n)]


def make(server: PredictorServer, **config: float) -> LatencyPredictorClient:
    return LatencyPredictorClient(
        PredictorConfig(
            training_url=server.url,
            prediction_urls=(server.url,),
            coalesce_window_s=config.get("window", WINDOW_S),
            max_coalesced_rows=int(config.get("max_rows", 0)),
            http_timeout_s=config.get("timeout", 10.0),
        )
    )


async def test_concurrent_calls_share_one_bulk_request_and_get_their_own_predictions(
    server: PredictorServer,
) -> None:
    client = make(server)
    try:
        calls = [rows(caller, 1 + caller % 3) for caller in range(6)]
        found = await asyncio.gather(*(client.predict_bulk_strict(c) for c in calls))
        (sent,) = server.bulk_requests  # one HTTP request for all six calls
        assert len(sent) == sum(len(c) for c in calls)
        for call, preds in zip(calls, found, strict=True):
            assert len(preds) == len(call)
            for row, pred in zip(call, preds, strict=True):
                assert pred.ttft_ms == server.ttft(row.to_json())
        assert (client.predictions_ok, client.predictions_failed) == (6, 0)
        assert (client.requests_ok, client.requests_failed) == (1, 0)
    finally:
        await client.aclose()


async def test_calls_after_the_window_go_in_the_next_batch(server: PredictorServer) -> None:
    client = make(server, window=0.001)
    try:
        for caller in range(3):
            (pred,) = await client.predict_bulk_strict(rows(caller, 1))
            assert pred.ttft_ms == server.ttft(rows(caller, 1)[0].to_json())
        assert [len(r) for r in server.bulk_requests] == [1, 1, 1]
    finally:
        await client.aclose()


async def test_a_lone_call_waits_no_longer_than_the_window(server: PredictorServer) -> None:
    client = make(server, window=0.001)
    try:
        await client.predict_bulk_strict(rows(0, 1))  # the session is opened once
        t0 = time.monotonic()
        await client.predict_bulk_strict(rows(1, 1))
        assert time.monotonic() - t0 < 0.5
    finally:
        await client.aclose()


async def test_the_row_cap_splits_batches(server: PredictorServer) -> None:
    client = make(server, max_rows=4)
    try:
        calls = [rows(caller, 2) for caller in range(5)]
        found = await asyncio.gather(*(client.predict_bulk_strict(c) for c in calls))
        assert sorted(len(r) for r in server.bulk_requests) == [2, 4, 4]
        for call, preds in zip(calls, found, strict=True):
            assert [p.ttft_ms for p in preds] == [server.ttft(r.to_json()) for r in call]
        # A call that would overflow the queued batch starts the next one.
        server.bulk_requests.clear()
        await asyncio.gather(
            client.predict_bulk_strict(rows(0, 3)), client.predict_bulk_strict(rows(1, 3))
        )
        assert [len(r) for r in server.bulk_requests] == [3, 3]
    finally:
        await client.aclose()


async def test_without_a_window_each_call_sends_its_own_request(server: PredictorServer) -> None:
    client = make(server, window=0)
    try:
        await asyncio.gather(*(client.predict_bulk_strict(rows(c, 2)) for c in range(3)))
        assert [len(r) for r in server.bulk_requests] == [2, 2, 2]
    finally:
        await client.aclose()


async def test_a_failed_batch_fails_every_caller_once_and_backs_off(
    server: PredictorServer,
) -> None:
    server.fail = True
    client = make(server)
    try:
        outcomes = await asyncio.gather(
            *(client.predict_bulk_strict(rows(c, 2)) for c in range(4)), return_exceptions=True
        )
        assert all(isinstance(o, PredictorError) and "500" in str(o) for o in outcomes)
        assert len({id(o) for o in outcomes}) == 4  # each caller its own error
        assert len(server.bulk_requests) == 1
        assert (client.predictions_failed, client.requests_failed) == (4, 1)
        # One failed request, one backoff step: the next call is refused at once.
        with pytest.raises(PredictorError, match="unavailable"):
            await client.predict_bulk_strict(rows(9, 1))
        assert len(server.bulk_requests) == 1
    finally:
        await client.aclose()


async def test_a_stalled_batch_is_cut_for_every_caller(server: PredictorServer) -> None:
    server.stall = asyncio.Event()
    client = make(server, timeout=1.0)
    try:
        t0 = time.monotonic()
        outcomes = await asyncio.wait_for(
            asyncio.gather(
                *(client.predict_bulk_strict(rows(c, 1)) for c in range(3)),
                return_exceptions=True,
            ),
            10,
        )
        took = time.monotonic() - t0
        assert 0.5 < took < 5.0
        assert all(isinstance(o, PredictorError) for o in outcomes)
        assert len(server.bulk_requests) == 1
        assert client.predictions_failed == 3
    finally:
        server.stall.set()
        await client.aclose()


async def test_a_caller_that_gives_up_leaves_the_others_their_answers(
    server: PredictorServer,
) -> None:
    server.stall = asyncio.Event()
    client = make(server)
    try:
        calls = [asyncio.create_task(client.predict_bulk_strict(rows(c, 1))) for c in range(3)]
        await eventually(_async(lambda: bool(server.bulk_requests)), "the batch at the server")
        calls[1].cancel()
        server.stall.set()
        first, third = await calls[0], await calls[2]
        assert first[0].ttft_ms == server.ttft(rows(0, 1)[0].to_json())
        assert third[0].ttft_ms == server.ttft(rows(2, 1)[0].to_json())
        with pytest.raises(asyncio.CancelledError):
            await calls[1]
    finally:
        await client.aclose()


async def test_closing_fails_the_queued_calls(server: PredictorServer) -> None:
    client = make(server, window=5.0)
    call = asyncio.create_task(client.predict_bulk_strict(rows(0, 1)))
    coalescer = client._coalescer
    assert coalescer is not None
    await eventually(_async(lambda: bool(coalescer._pending)), "the call queued")
    await client.aclose()
    with pytest.raises(PredictorError, match="closed"):
        await asyncio.wait_for(call, 5)
    assert not server.bulk_requests


def test_the_window_and_the_row_cap_come_from_the_environment() -> None:
    d = PredictorConfig.from_env({})
    assert (d.coalesce_window_s, d.max_coalesced_rows) == (0.001, 0)
    c = PredictorConfig.from_env(
        {"LATENCY_COALESCE_WINDOW_MS": "5", "LATENCY_MAX_COALESCED_ROWS": "64"}
    )
    assert (c.coalesce_window_s, c.max_coalesced_rows) == (0.005, 64)
    off = PredictorConfig.from_env({"LATENCY_COALESCE_WINDOW_MS": "0"})
    assert off.coalesce_window_s == 0
    bad = PredictorConfig.from_env(
        {"LATENCY_COALESCE_WINDOW_MS": "-1", "LATENCY_MAX_COALESCED_ROWS": "x"}
    )
    assert (bad.coalesce_window_s, bad.max_coalesced_rows) == (0.001, 0)


async def test_concurrent_scheduling_cycles_share_one_bulk_request(
    server: PredictorServer, loader: Loader, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LATENCY_COALESCE_WINDOW_MS", "200")
    c, producer = loader(server.url)
    registry = CollectorRegistry()
    producer.register_metrics(registry)
    eps = pool()
    cycles = [cycle(f"prompt {i}", headers={"x-llm-d-slo-ttft-ms": "5000"}) for i in range(4)]
    await asyncio.gather(*(c.scheduler.produce(cyc, eps) for cyc in cycles))
    (sent,) = server.bulk_requests
    assert len(sent) == 4 * len(eps)
    for cyc in cycles:
        infos = read_predictions(cyc, "predicted-latency-producer")
        assert set(infos) == {ep.key for ep in eps}
        assert infos[eps[2].key].ttft > infos[eps[0].key].ttft  # c waits longer than a
    # Four prediction calls, one HTTP request.
    assert sample_sum(registry, "disagg_epp_latency_predictions_total", outcome="success") == 4
    requests = "disagg_epp_latency_prediction_requests_total"
    assert sample_sum(registry, requests, outcome="success") == 1
    assert sample_sum(registry, requests, outcome="error") == 0
