"""The EPP's Kubernetes-facing flags against the fake API server, reached by kubeconfig.

- ``--ha-enable-leader-election``: two replicas on one Lease; one ready, both with warm
  datastores; the other takes over when the lease lapses, and at once when the leader
  releases it on SIGTERM's drain.
- ``--metrics-endpoint-auth``: TokenReview then SubjectAccessReview; 401, 403, 200.
- ``--endpoint-selector`` / ``--endpoint-target-ports``: the pods a set-based selector
  picks, without an InferencePool; ``inference-extension`` is SERVING once the pods are
  listed, even when none match.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from epp.app import EppApp
from epp.leader import lease_name
from epp.settings import EppSettings
from tests.conftest import eventually
from tests.epp_gateway.pool import always_disagg_config, write_endpoints
from tests.epp_scheduling.fake_kube import FakeKube

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
APP = {"app": "vllm"}


@pytest.fixture
async def kube() -> AsyncIterator[FakeKube]:
    fake = await FakeKube().start()
    try:
        yield fake
    finally:
        await fake.stop()


def _settings(kubeconfig: str, **overrides: object) -> EppSettings:
    values: dict[str, object] = {
        "grpc_port": 0,
        "grpc_health_port": 0,
        "metrics_port": 0,
        "bind_address": "127.0.0.1",
        "secure_serving": False,
        "shutdown_grace": 1.0,
        "tracing": False,
        "metrics_endpoint_auth": False,
        "kubeconfig": kubeconfig,
        # Nothing answers on the fake pods' ports: scrape rarely.
        "refresh_metrics_interval": 30.0,
        "metrics_staleness_threshold": 60.0,
        **overrides,
    }
    return EppSettings.model_validate(values)


async def _health(port: int, service: str) -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        return int(reply.status)


async def _serving(app: EppApp, service: str = "readiness") -> bool:
    return await _health(app.health_port, service) == SERVING


async def _not_serving(app: EppApp, service: str = "readiness") -> bool:
    return await _health(app.health_port, service) == NOT_SERVING


@contextlib.asynccontextmanager
async def _apps(*settings: EppSettings) -> AsyncIterator[list[EppApp]]:
    apps = [EppApp(s) for s in settings]
    try:
        for app in apps:
            await app.start()
        yield apps
    finally:
        for app in apps:
            await app.stop()


def _pool(kube: FakeKube) -> None:
    kube.set_pool("pool", APP, [8000])
    kube.set_pod("d1", "10.0.0.1", {**APP, "llm-d.ai/role": "decode"})


async def _one_leader(apps: list[EppApp]) -> tuple[EppApp, EppApp]:
    async def exactly_one() -> bool:
        ready = [await _serving(app) for app in apps]
        return ready.count(True) == 1

    await eventually(exactly_one, "exactly one replica ready")
    leader = next(app for app in apps if app.elector is not None and app.elector.is_leader)
    follower = next(app for app in apps if app is not leader)
    return leader, follower


async def test_one_replica_leads_and_the_other_takes_over_when_the_lease_lapses(
    kube: FakeKube, tmp_path: Path
) -> None:
    _pool(kube)
    config = kube.kubeconfig(tmp_path / "kubeconfig")
    timing = {"leader_lease_duration": 3.0, "leader_renew_deadline": 2.0,
              "leader_retry_period": 0.2}  # fmt: skip
    replica = _settings(config, pool_name="pool", ha_enable_leader_election=True, **timing)
    async with _apps(replica, replica) as apps:
        leader, follower = await _one_leader(apps)
        name = lease_name("default", "pool")
        assert leader.elector is not None and follower.elector is not None
        assert kube.lease_holder("default", name) == leader.elector.identity
        # Both datastores are warm: the follower routes as soon as it leads.
        assert leader.director is not None and follower.director is not None
        assert len(leader.director.datastore) == len(follower.director.datastore) == 1
        assert await _health(follower.health_port, "liveness") == SERVING
        assert await _health(follower.health_port, "inference-extension") == NOT_SERVING

        # The leader stops renewing without releasing (as a crashed pod would).
        await leader.elector.stop(release=False)
        took = await eventually(lambda: _serving(follower), "the follower takes over")
        # Not before the lease lapsed (3 s after the follower last saw it renewed).
        assert took >= 2.0, took
        assert kube.lease_holder("default", name) == follower.elector.identity
        lease = kube.leases[("default", name)]
        assert lease["spec"]["leaseTransitions"] == 1
        assert lease["spec"]["leaseDurationSeconds"] == 3
        assert not await _serving(leader)


async def test_a_draining_leader_releases_the_lease_at_once(kube: FakeKube, tmp_path: Path) -> None:
    _pool(kube)
    config = kube.kubeconfig(tmp_path / "kubeconfig")
    timing = {"leader_lease_duration": 15.0, "leader_renew_deadline": 10.0,
              "leader_retry_period": 0.2}  # fmt: skip
    replica = _settings(config, pool_name="pool", ha_enable_leader_election=True, **timing)
    async with _apps(replica, replica) as apps:
        leader, follower = await _one_leader(apps)
        await leader.drain()  # what SIGTERM does first
        assert not await _serving(leader)
        took = await eventually(lambda: _serving(follower), "the follower takes over")
        assert took < 10.0, "waited for the lease to lapse instead of taking the released one"


async def test_a_leader_that_cannot_renew_steps_down(kube: FakeKube, tmp_path: Path) -> None:
    _pool(kube)
    config = kube.kubeconfig(tmp_path / "kubeconfig")
    replica = _settings(
        config, pool_name="pool", ha_enable_leader_election=True,
        leader_lease_duration=3.0, leader_renew_deadline=1.0, leader_retry_period=0.2,
    )  # fmt: skip
    async with _apps(replica) as (app,):
        await eventually(lambda: _serving(app), "the only replica leads")
        kube.leases_unavailable = True
        await eventually(lambda: _not_serving(app), "a leader without renewals is not ready")
        kube.leases_unavailable = False
        await eventually(lambda: _serving(app), "leads again once the API answers")


async def _get_metrics(app: EppApp, token: str | None) -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{app.metrics_port}/metrics", headers=headers) as r,
    ):
        return r.status, await r.text()


async def test_metrics_need_a_token_the_api_server_accepts_and_authorises(
    kube: FakeKube, tmp_path: Path
) -> None:
    kube.tokens = {
        "prometheus-token": {"username": "system:serviceaccount:mon:prometheus", "uid": "u1",
                             "groups": ["system:serviceaccounts"]},
        "other-token": {"username": "system:serviceaccount:default:other"},
    }  # fmt: skip
    kube.allowed = {("system:serviceaccount:mon:prometheus", "/metrics", "get")}
    endpoints = tmp_path / "endpoints.yaml"
    write_endpoints(endpoints, [])
    settings = _settings(
        kube.kubeconfig(tmp_path / "kubeconfig"),
        config_text=always_disagg_config(endpoints),
        metrics_endpoint_auth=True,
    )
    async with _apps(settings) as (app,):
        assert (await _get_metrics(app, None))[0] == 401
        assert (await _get_metrics(app, "forged"))[0] == 401
        status, text = await _get_metrics(app, "other-token")
        assert status == 403
        assert "system:serviceaccount:default:other" in text
        status, text = await _get_metrics(app, "prometheus-token")
        assert status == 200
        assert "llm_d_epp_info" in text
        sar = [r for r in kube.reviews if r["kind"] == "SubjectAccessReview"][-1]
        assert sar["spec"]["nonResourceAttributes"] == {"path": "/metrics", "verb": "get"}
        assert sar["spec"]["groups"] == ["system:serviceaccounts"]
        # Answers are cached: a second scrape costs no review.
        reviews = len(kube.reviews)
        assert (await _get_metrics(app, "prometheus-token"))[0] == 200
        assert len(kube.reviews) == reviews


async def test_metrics_auth_without_an_api_server_stops_the_start(tmp_path: Path) -> None:
    from epp.app import StartupError

    endpoints = tmp_path / "endpoints.yaml"
    write_endpoints(endpoints, [])
    missing = tmp_path / "no-kubeconfig"
    app = EppApp(
        _settings(str(missing), config_text=always_disagg_config(endpoints),
                  metrics_endpoint_auth=True)
    )  # fmt: skip
    with pytest.raises(StartupError, match="--metrics-endpoint-auth") as info:
        await app.start()
    assert info.value.exit_code == 2


async def test_endpoint_selector_discovers_pods_without_a_pool(
    kube: FakeKube, tmp_path: Path
) -> None:
    kube.set_pod("p1", "10.0.0.1", {**APP, "tier": "a", "llm-d.ai/role": "decode"})
    kube.set_pod("p2", "10.0.0.2", {**APP, "tier": "c"})
    kube.set_pod("p3", "10.0.0.3", {**APP, "tier": "b", "legacy": "yes"})
    kube.set_pod("p4", "10.0.0.4", {"app": "other", "tier": "a"})
    settings = _settings(
        kube.kubeconfig(tmp_path / "kubeconfig"),
        endpoint_selector="app=vllm,tier in (a,b),!legacy",
        endpoint_target_ports=(8000, 8001),
    )
    async with _apps(settings) as (app,):
        assert app.director is not None
        datastore = app.director.datastore
        await eventually(lambda: _serving(app), "ready once the selected pods are known")
        assert {ep.key for ep in datastore.snapshot()} == {"10.0.0.1:8000", "10.0.0.1:8001"}
        assert {ep.name for ep in datastore.snapshot()} == {"p1-rank-0", "p1-rank-1"}
        kube.set_pod("p5", "10.0.0.5", {**APP, "tier": "b"})

        async def five_added() -> bool:
            return "10.0.0.5:8000" in {ep.key for ep in datastore.snapshot()}

        await eventually(five_added, "a new matching pod is watched in")
        kube.delete_pod("p1")
        kube.delete_pod("p5")
        await eventually(lambda: _not_serving(app), "not ready without endpoints")
        # The pool is listed and empty: no reason to restart the EPP.
        assert await _serving(app, "inference-extension")
        assert await _serving(app, "liveness")
