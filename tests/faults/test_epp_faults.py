"""EPP-side faults over the local stack: the EPP restarts (crash, graceful) under load,
the EPP freezes, endpoints leave discovery, engines' metrics go stale, and ext_proc
streams end early.

Chosen behaviours (see epp/envoy_config.py): while the EPP is down, frozen or its stream
breaks, Envoy fails closed with a 503 whose JSON error body has type
``endpoint_picker_unavailable`` (a frozen EPP is noticed by HTTP/2 pings within a ping
interval plus the ping timeout, while an EPP stalled for less than the timeout only
delays requests); a graceful restart drains routed requests; a request whose response
was already passing through a crashed EPP's stream may be cut (the connection ends; no
hang). An endpoint that leaves discovery gets no new requests once the EPP has reloaded,
while its in-flight ones finish; with none left the EPP is not ready and refuses with a
503 ``no_endpoints``. An endpoint whose /metrics stops answering is scored as fully
loaded but stays routable, no decision waits for a scrape, and the EPP logs the move
both ways. Every test ends by checking that the EPP, sidecars and Envoy are healthy.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio

from tests.conftest import eventually
from tests.epp_gateway.fakes import (
    ExtProcClient,
    request_body,
    request_headers,
    response_body,
    response_headers,
)
from tests.faults.epp_support import (
    EPP_PING_INTERVAL_S,
    EPP_PING_TIMEOUT_S,
    STALENESS_S,
    EppStack,
    Outcome,
    start_epp_stack,
)

pytestmark = [
    pytest.mark.faults,
    pytest.mark.envoy,
    pytest.mark.asyncio(loop_scope="module"),
]

_CLIENTS = 4
_CHAT = "/v1/chat/completions"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def shared(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[EppStack]:
    running = await start_epp_stack(Path(tmp_path_factory.mktemp("epp-faults")))
    try:
        yield running
    finally:
        await running.session.close()
        await running.stack.stop()


@pytest_asyncio.fixture(loop_scope="module")
async def env(shared: EppStack) -> AsyncIterator[EppStack]:
    """The shared stack, with its logs marked; faults and endpoints restored afterwards."""
    shared.mark_logs()
    yield shared
    await shared.clear_faults()
    if shared.endpoints_changed:
        await shared.set_endpoints(None)


# -- EPP restarts under load -----------------------------------------------------------


def _classify(outcome: Outcome) -> str:
    if outcome.ok:
        return "ok"
    if outcome.error == "hang":
        return "hang"
    if outcome.error is None and outcome.status is not None and outcome.status >= 500:
        error = outcome.json_error()
        assert error is not None, f"a refusal without a JSON error body: {outcome}"
        assert error["type"] == "endpoint_picker_unavailable", outcome
        assert outcome.status == 503, outcome
        return "refused"
    return "cut"


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["crash", "graceful"])
async def test_epp_restart_under_load(env: EppStack, sig: signal.Signals) -> None:
    outcomes: list[Outcome] = []
    stop = asyncio.Event()

    async def client(i: int) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            outcome = await env.complete(env.prompt(long=n % 3 == 0), stream=n % 2 == 0)
            outcomes.append(outcome)
            if not outcome.ok:
                await asyncio.sleep(0.02)  # a client's back-off, keeps the loop from spinning

    async def served_since(t: float, n: int) -> bool:
        return sum(1 for o in outcomes if o.ok and o.started >= t) >= n

    held_prompt = env.prompt()

    async def held_arrived() -> bool:
        return any([await env.received(u, held_prompt) for u in env.stack.decode_engine_urls])

    clients = [asyncio.create_task(client(i)) for i in range(_CLIENTS)]
    held: asyncio.Task[Outcome] | None = None
    try:
        await eventually(lambda: served_since(0.0, 2 * _CLIENTS), "load flows before the restart")
        # One (chat) request is held at its decode engine across the restart.
        for url in env.stack.decode_engine_urls:
            await env.add_fault(url, kind="delay", delay_ms=2000, count=1, paths=[_CHAT])
        held = asyncio.create_task(env.complete(held_prompt, chat=True))
        await eventually(held_arrived, "the held request reaches a decode engine")
        await env.clear_faults()
        before = len(outcomes)
        await env.stack.restart_epp(sig)
        back = time.monotonic()
        recovery = await eventually(
            lambda: served_since(back, _CLIENTS), "served again", timeout=5.0
        )
        stop.set()
        async with asyncio.timeout(15):
            await asyncio.gather(*clients)
        async with asyncio.timeout(10):
            held_outcome = await held
    finally:
        stop.set()
        for task in [*clients, *([held] if held else [])]:
            task.cancel()

    kinds = [_classify(o) for o in outcomes]
    assert "hang" not in kinds
    during = kinds[before:]
    assert during.count("refused") > 0, "no request met the EPP while it was down"
    if sig == signal.SIGTERM:
        # In-flight streams drain on SIGTERM: nothing is cut, new requests are refused.
        assert "cut" not in kinds, [o for o in outcomes if _classify(o) == "cut"]
        assert held_outcome.ok, held_outcome
    else:
        # A crash fails the routed request still waiting for its response: Envoy's
        # failure mode answers it, as it answers new ones.
        assert _classify(held_outcome) == "refused", held_outcome
    assert max(o.elapsed for o in outcomes) < 10.0
    assert recovery < 5.0
    await env.assert_healthy()


async def test_frozen_epp_is_a_503_not_a_hang(env: EppStack) -> None:
    # A hung EPP (here: stopped) keeps its port open, so nothing fails fast; Envoy's
    # pings on the connection to it bound the wait.
    proc = env.stack.epp.proc if env.stack.epp is not None else None
    assert proc is not None
    proc.send_signal(signal.SIGSTOP)
    try:
        async with asyncio.timeout(2 * (EPP_PING_INTERVAL_S + EPP_PING_TIMEOUT_S) + 5):
            outcomes = await asyncio.gather(
                env.complete(env.prompt()), env.complete(env.prompt(long=True), stream=True)
            )
    finally:
        proc.send_signal(signal.SIGCONT)
    for outcome in outcomes:
        assert _classify(outcome) == "refused", outcome
        assert outcome.elapsed < EPP_PING_INTERVAL_S + EPP_PING_TIMEOUT_S + 2, outcome
    resumed = time.monotonic()

    async def served_again() -> bool:
        return (await env.complete(env.prompt())).ok

    await eventually(served_again, "requests succeed once the EPP runs again", timeout=5.0)
    assert time.monotonic() - resumed < 5.0


async def test_stalled_epp_only_delays_requests(env: EppStack) -> None:
    # A healthy EPP can get no CPU for a while (throttling, a starved node). Pings that
    # go unanswered for less than the timeout must not cost the connection, and with it
    # every request on it.
    proc = env.stack.epp.proc if env.stack.epp is not None else None
    assert proc is not None and env.stack.envoy is not None
    stall_s = EPP_PING_TIMEOUT_S / 2
    assert stall_s > EPP_PING_INTERVAL_S, "the stall must leave a ping unanswered"
    before = await env.stack.envoy.counters(env.session)
    proc.send_signal(signal.SIGSTOP)
    try:
        pending = [
            asyncio.ensure_future(env.complete(env.prompt(long), stream=long))
            for long in (False, True)
        ]
        await asyncio.sleep(stall_s)  # the fault itself: how long the EPP gets no CPU
    finally:
        proc.send_signal(signal.SIGCONT)
    for outcome in await asyncio.gather(*pending):
        assert outcome.ok, outcome
        assert outcome.elapsed > stall_s / 2, f"not held by the stalled EPP: {outcome}"
    after = await env.stack.envoy.counters(env.session)
    for counter in ("cluster.epp.http2.keepalive_timeout", "cluster.epp.upstream_cx_total"):
        assert after[counter] == before[counter], counter
    await env.assert_healthy()


# -- an endpoint disappears from discovery ------------------------------------------------


async def _first_grown(env: EppStack, urls: list[str], before: dict[str, int]) -> str | None:
    for url in urls:
        if await env.requests_total(url) > before[url]:
            return url
    return None


@pytest.mark.parametrize("role", ["decode", "prefill"])
async def test_endpoint_leaves_discovery(env: EppStack, role: str) -> None:
    stack = env.stack
    urls = stack.decode_engine_urls if role == "decode" else stack.prefill_engine_urls
    engines = stack.decode_engine_urls + stack.prefill_engine_urls
    # Hold the next request on whichever engine of ``role`` gets it, so that it is in
    # flight while its endpoint leaves.
    for url in urls:
        await env.add_fault(url, kind="delay", delay_ms=3000, count=1, roles=[role, "aggregated"])
    before = {url: await env.requests_total(url) for url in engines}
    inflight = asyncio.create_task(env.complete(env.prompt(long=role == "prefill")))
    victim: str | None = None

    async def arrived() -> bool:
        nonlocal victim
        victim = await _first_grown(env, urls, before)
        return victim is not None

    await eventually(arrived, f"the held request reaches a {role} engine")
    assert victim is not None
    await env.clear_faults()
    name = f"{role}-{urls.index(victim)}"
    await env.set_endpoints([ep.name for ep in stack.endpoints if ep.name != name])
    assert not inflight.done(), "the held request ended before its endpoint left"
    held = await env.requests_total(victim)

    outcomes = [
        await env.complete(env.prompt(long=i % 2 == 0), stream=i % 3 == 0) for i in range(8)
    ]
    assert all(o.ok for o in outcomes), [o for o in outcomes if not o.ok]
    assert await env.requests_total(victim) == held, f"{name} got requests after it left"
    async with asyncio.timeout(10):
        finished = await inflight
    assert finished.ok, f"the in-flight request to {name} failed: {finished}"
    assert await env.requests_total(victim) == held
    if role == "decode":
        [other] = [u for u in urls if u != victim]
        assert await env.requests_total(other) >= before[other] + len(outcomes)
    else:
        # No prefill endpoint left: long prompts are computed on the decode engines.
        assert sum([await env.requests_total(u) for u in stack.decode_engine_urls]) >= sum(
            before[u] for u in stack.decode_engine_urls
        ) + len(outcomes)
    assert "reloaded" in env.log_since("epp")

    await env.set_endpoints(None)
    await env.assert_healthy()


async def test_every_endpoint_leaves_discovery(env: EppStack) -> None:
    await env.set_endpoints([])

    async def not_ready() -> bool:
        return not await env.stack.epp_ready()

    await eventually(not_ready, "the EPP reports not ready with no endpoints")
    outcome = await env.complete(env.prompt())
    assert outcome.status == 503, outcome
    error = outcome.json_error()
    assert error is not None, outcome
    assert error["type"] == "no_endpoints"
    await env.set_endpoints(None)
    await env.stack.wait_epp_ready(10)
    await env.assert_healthy()


# -- stale metrics ------------------------------------------------------------------------


def _key(url: str) -> str:
    return url.removeprefix("http://")


async def test_stale_metrics_keep_routing(env: EppStack) -> None:
    stack = env.stack
    [prefill] = stack.prefill_engine_urls
    fresh_decode, stale_decode = stack.decode_engine_urls
    stale_sidecar = next(f"127.0.0.1:{ep.port}" for ep in stack.endpoints if ep.name == "decode-1")

    async def ready_endpoints(n: int) -> bool:
        return await env.epp_metric("llm_d_epp_ready_endpoints") == n

    await eventually(lambda: ready_endpoints(3), "every endpoint's metrics fresh")
    # The prefill engine's /metrics and decode-1's (scraped through its sidecar) hang.
    for url in (prefill, stale_decode):
        await env.add_fault(url, kind="hang", count=-1, paths=["/metrics"])
    took = await eventually(lambda: ready_endpoints(1), "the EPP marks two endpoints stale")
    assert took < STALENESS_S + 5
    log = env.log_since("epp")
    for key in (_key(prefill), stale_sidecar):
        assert f"endpoint {key} " in log, log
        assert "metrics stale" in log

    async def bucket(le: str) -> float:
        return await env.epp_metric("llm_d_epp_scheduler_e2e_duration_seconds_bucket", {"le": le})

    decided = await env.epp_metric(
        "llm_d_epp_disagg_decision_total", {"decision_type": "prefill-decode"}
    )
    # llm-d's buckets end at 0.1 s; a hung scrape would cost seconds.
    fast, total = await bucket("0.1"), await bucket("+Inf")
    prefills = (await env.engine_stats(prefill))["requests_by_role"].get("prefill", 0)
    stale_before = await env.requests_total(stale_decode)
    fresh_before = await env.requests_total(fresh_decode)
    async with asyncio.timeout(20):
        outcomes = await asyncio.gather(*(env.complete(env.prompt(long=True)) for _ in range(6)))
    assert all(o.ok for o in outcomes), [o for o in outcomes if not o.ok]
    # Decisions kept flowing: P/D through the stale-but-only prefill engine, decode on the
    # fresh decode engine (a stale one is scored as fully loaded), none waiting on a scrape.
    n = len(outcomes)
    assert (
        await env.epp_metric("llm_d_epp_disagg_decision_total", {"decision_type": "prefill-decode"})
        == decided + n
    )
    assert (await env.engine_stats(prefill))["requests_by_role"]["prefill"] == prefills + n
    assert await env.requests_total(stale_decode) == stale_before
    assert await env.requests_total(fresh_decode) == fresh_before + n
    assert await bucket("+Inf") - total == n
    assert await bucket("0.1") - fast == n, "a decision waited for a hung scrape"

    await env.clear_faults()
    await eventually(lambda: ready_endpoints(3), "metrics fresh again once /metrics answers")
    await eventually(
        lambda: _logged(env, "metrics fresh again", 2), "the EPP logs the recovery", timeout=3.0
    )
    await env.assert_healthy()


async def _logged(env: EppStack, text: str, times: int) -> bool:
    return env.log_since("epp").count(text) >= times


# -- Envoy's ext_proc stream ends early ---------------------------------------------------

_BODY = json.dumps({"model": "sim-model", "prompt": "hello there", "max_tokens": 2}).encode()


async def _early_end(client: ExtProcClient, case: str) -> None:
    """Play Envoy's side up to ``case``'s point, then end the stream that way."""
    await client.send(request_headers())
    if case.endswith("mid_body"):
        await client.send(request_body(_BODY[:10], end_of_stream=False))
    if case.endswith("after_routing") or case.endswith("mid_response"):
        await client.send(request_body(_BODY, end_of_stream=True))
        routed = await client.recv()
        assert routed.request_headers.response.header_mutation.set_headers
        await client.recv()  # the re-sent request body
    if case.endswith("mid_response"):
        await client.send(response_headers())
        await client.recv()
        await client.send(response_body(b'{"id": "x", ', end_of_stream=False))
        await client.recv()
    if case.startswith("half_close"):
        await client.close()
        await client.expect_end()
    else:
        client.call.cancel()


async def _normal_conversation(client: ExtProcClient) -> None:
    await client.send(request_headers(), request_body(_BODY, end_of_stream=True))
    routed = await client.recv()
    assert routed.request_headers.response.header_mutation.set_headers
    await client.recv()
    await client.send(response_headers(end_of_stream=True))
    await client.recv()
    await client.close()
    await client.expect_end()


EARLY_ENDS = {
    # case: the stage the EPP counts it under
    "half_close_after_headers": "before_routing",
    "half_close_mid_body": "before_routing",
    "cancel_after_headers": "before_routing",
    "cancel_mid_body": "before_routing",
    "cancel_after_routing": "after_routing",
    "cancel_mid_response": "after_routing",
}


async def test_extproc_stream_ends_early(env: EppStack) -> None:
    async def ended_early(stage: str) -> float:
        return await env.epp_metric(
            "disagg_epp_extproc_streams_ended_early_total", {"stage": stage}
        )

    async def no_open_streams() -> bool:
        return await env.epp_metric("llm_d_epp_extproc_streams_inflight") == 0

    await eventually(no_open_streams, "no ext_proc stream open before the test")
    expected = {stage: await ended_early(stage) for stage in set(EARLY_ENDS.values())}
    async with grpc.aio.insecure_channel(f"127.0.0.1:{env.stack.epp_grpc_port}") as channel:
        for case, stage in EARLY_ENDS.items():
            async with asyncio.timeout(10):
                # Several at once, each beside a normal stream that must not notice.
                await asyncio.gather(
                    *(_early_end(ExtProcClient(channel), case) for _ in range(5)),
                    _normal_conversation(ExtProcClient(channel)),
                )
            expected[stage] += 5

            async def counted(stage: str = stage) -> bool:
                return await ended_early(stage) == expected[stage]

            await eventually(counted, f"the EPP counts {case}")
        # Nothing stuck: every stream is closed, and a normal one still works.
        await eventually(no_open_streams, "every ext_proc stream closed")
        async with asyncio.timeout(10):
            await _normal_conversation(ExtProcClient(channel))
    # The normal conversations were not counted as ended early.
    for stage, value in expected.items():
        assert await ended_early(stage) == value, stage
    log = env.log_since("epp")
    assert "ended the ext_proc stream before it was routed" in log
    await env.assert_healthy()
    # Envoy's own streams for those normal requests ended complete, and none stays open.
    for stage, value in expected.items():
        assert await ended_early(stage) == value, stage
    await eventually(no_open_streams, "every ext_proc stream closed")
