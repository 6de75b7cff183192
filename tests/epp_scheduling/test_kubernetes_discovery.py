"""InferencePool discovery against a fake Kubernetes API server (list + watch)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from epp.config import ConfigError
from epp.datastore import Datastore
from epp.director import DirectorSettings, build_director
from epp.discovery.kubernetes import InferencePoolDiscovery, PoolSpec, pod_endpoints
from epp.metrics import EppMetrics

from .fake_kube import FakeKube
from .fixtures import wait_until
from .helpers import chat_body

APP = {"app": "llama"}


@pytest.fixture
async def kube() -> AsyncIterator[FakeKube]:
    fake = await FakeKube().start()
    try:
        yield fake
    finally:
        await fake.stop()


def keys(ds: Datastore) -> set[str]:
    return {ep.key for ep in ds.snapshot()}


def test_pool_spec_and_pod_endpoints() -> None:
    spec = PoolSpec.from_object(
        {
            "spec": {
                "selector": {"matchLabels": {"b": "2", "a": "1"}},
                "targetPorts": [{"number": 8000}, {"number": 8001}],
            }
        }
    )
    assert spec.label_selector == "a=1,b=2"
    pod = {
        "metadata": {"name": "p", "namespace": "ns", "labels": {"llm-d.ai/role": "decode"}},
        "status": {
            "phase": "Running",
            "podIP": "10.1.1.1",
            "conditions": [{"type": "Ready", "status": "True"}],
        },
    }
    eps = pod_endpoints(pod, spec.ports)
    assert [(e.name, e.key, e.role) for e in eps] == [
        ("p-rank-0", "10.1.1.1:8000", "decode"),
        ("p-rank-1", "10.1.1.1:8001", "decode"),
    ]
    alpha = PoolSpec.from_object(
        {"spec": {"selector": {"matchLabels": {}}, "targetPortNumber": 8200}}
    )
    assert alpha.ports == (8200,)
    not_ready = {**pod, "status": {**pod["status"], "conditions": []}}
    assert pod_endpoints(not_ready, spec.ports) == []
    deleting = {**pod, "metadata": {**pod["metadata"], "deletionTimestamp": "x"}}
    assert pod_endpoints(deleting, spec.ports) == []


async def test_watch_adds_updates_and_removes(kube: FakeKube) -> None:
    kube.set_pool("pool", APP, [8000])
    kube.set_pod("d1", "10.0.0.1", {**APP, "llm-d.ai/role": "decode"})
    kube.set_pod("other", "10.0.0.9", {"app": "else"})
    ds = Datastore()
    disc = InferencePoolDiscovery(pool_name="pool", api_server=kube.url)
    await disc.start(ds)
    try:
        assert keys(ds) == {"10.0.0.1:8000"}
        kube.set_pod("p1", "10.0.0.2", {**APP, "llm-d.ai/role": "prefill"})
        await wait_until(lambda: keys(ds) == {"10.0.0.1:8000", "10.0.0.2:8000"})
        # Readiness lost -> removed; regained -> back.
        kube.set_pod("p1", "10.0.0.2", {**APP, "llm-d.ai/role": "prefill"}, ready=False)
        await wait_until(lambda: keys(ds) == {"10.0.0.1:8000"})
        kube.set_pod("p1", "10.0.0.2", {**APP, "llm-d.ai/role": "prefill"})
        await wait_until(lambda: "10.0.0.2:8000" in keys(ds))
        kube.delete_pod("d1")
        await wait_until(lambda: keys(ds) == {"10.0.0.2:8000"})
        # The pool changes its ports: one endpoint per target port.
        kube.set_pool("pool", APP, [8000, 8001])
        await wait_until(lambda: keys(ds) == {"10.0.0.2:8000", "10.0.0.2:8001"})
        # ... and its selector.
        kube.set_pool("pool", {"app": "else"}, [9000])
        await wait_until(lambda: keys(ds) == {"10.0.0.9:9000"})
    finally:
        await disc.stop()


async def test_director_with_pool(kube: FakeKube) -> None:
    kube.set_pool("pool", APP, [8000], ns="llm")
    kube.set_pod("d1", "10.0.0.1", {**APP, "llm-d.ai/role": "decode"}, ns="llm")
    settings = DirectorSettings(pool_name="pool", pool_namespace="llm", kube_api_server=kube.url)
    director = await build_director(settings, EppMetrics())
    await director.start()
    try:
        assert director.is_ready()
        decision = await director.decide("/v1/chat/completions", {}, chat_body("x"), None)
        assert decision.decode == "10.0.0.1:8000"
        kube.delete_pod("d1", ns="llm")
        await wait_until(lambda: not director.is_ready())
    finally:
        await director.stop()


async def test_missing_pool_then_created(kube: FakeKube) -> None:
    ds = Datastore()
    disc = InferencePoolDiscovery(pool_name="late", api_server=kube.url)
    await disc.start(ds)
    try:
        assert keys(ds) == set()
        kube.set_pod("d1", "10.0.0.1", APP)
        kube.set_pool("late", APP, [8000])
        await wait_until(lambda: keys(ds) == {"10.0.0.1:8000"})
    finally:
        await disc.stop()


async def test_unusable_kubeconfig_is_a_config_error(tmp_path: Path) -> None:
    bad = tmp_path / "kubeconfig"
    bad.write_text("not: [a kubeconfig")
    settings = DirectorSettings(pool_name="pool", kubeconfig=str(bad))
    director = await build_director(settings, EppMetrics())
    with pytest.raises(ConfigError, match="kubeconfig"):
        await director.start()
    await director.stop()


async def test_watch_resumes_after_timeout_and_relists_after_gone(kube: FakeKube) -> None:
    kube.set_pool("pool", APP, [8000])
    kube.set_pod("d1", "10.0.0.1", APP)
    ds = Datastore()
    disc = InferencePoolDiscovery(pool_name="pool", api_server=kube.url, watch_timeout_s=1)
    await disc.start(ds)
    try:
        first_watches = kube.watch_requests
        # Server-side watch timeouts end the streams; the client resumes watching.
        await wait_until(lambda: kube.watch_requests >= first_watches + 2)
        kube.set_pod("d2", "10.0.0.2", APP)
        await wait_until(lambda: keys(ds) == {"10.0.0.1:8000", "10.0.0.2:8000"})
        lists = kube.list_requests["pod"]
        # 410 Gone on the next watch: the client relists and carries on.
        kube.gone_next_watch = True
        kube.break_watches()
        await wait_until(lambda: kube.gone_sent == 1)
        await wait_until(lambda: kube.list_requests["pod"] > lists)
        kube.delete_pod("d1")
        await wait_until(lambda: keys(ds) == {"10.0.0.2:8000"})
    finally:
        await disc.stop()
