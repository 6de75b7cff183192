"""The EPP, configured exactly as the manifests configure it, schedules the manifests' pods.

A fake Kubernetes API serves the kustomization's own InferencePool and one ready pod per
Deployment it selects (the pod template's labels, a loopback IP). The EPP's director is
built from the EPP container's args and the EndpointPickerConfig its ConfigMap mounts,
discovers the pods through the pool, and must route the way the example promises: short
prompts decode-only, long ones prefill on a prefill pod, images through an encoder.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest

from epp.datastore import ROLE_LABEL
from epp.director import DirectorSettings, build_director
from epp.metrics import EppMetrics
from epp.settings import parse_args
from tests.deploy.kube import Built, build, containers, mounted_file, resolve_args
from tests.epp_scheduling.fake_kube import FakeKube
from tests.epp_scheduling.fixtures import wait_until

LONG_PROMPT = " ".join(f"w{i}" for i in range(4000))
IMAGE = {"type": "image_url", "image_url": {"url": "https://example.invalid/cat.png"}}


@pytest.fixture
async def kube() -> AsyncIterator[FakeKube]:
    fake = await FakeKube().start()
    try:
        yield fake
    finally:
        await fake.stop()


def _chat(content: object) -> bytes:
    return json.dumps(
        {"model": "m", "messages": [{"role": "user", "content": content}], "max_tokens": 8}
    ).encode()


def _serve_manifests(kube: FakeKube, built: Built) -> tuple[str, dict[str, str]]:
    """Load the pool and a pod per selected Deployment; returns namespace and ip -> role."""
    (pool,) = built.of_kind("InferencePool")
    namespace = pool["metadata"]["namespace"]
    # The fake keeps what it is given: the manifest's pool object, verbatim.
    kube._emit("pool", "ADDED", pool)
    selector = pool["spec"]["selector"]["matchLabels"]
    roles: dict[str, str] = {}
    for i, workload in enumerate(built.workloads(), start=20):
        labels = workload["spec"]["template"]["metadata"]["labels"]
        if not selector.items() <= labels.items():
            continue
        ip = f"127.0.0.{i}"
        kube.set_pod(workload["metadata"]["name"] + "-0", ip, labels, ns=namespace)
        roles[ip] = labels[ROLE_LABEL]
    return namespace, roles


@pytest.mark.parametrize("directory", ["manifests/base", "examples/epd"])
async def test_epp_schedules_the_manifests_pods(kube: FakeKube, directory: str) -> None:
    built = build(directory)
    (epp,) = [c for c in containers(built) if c.program == "epp"]
    namespace, roles = _serve_manifests(kube, built)
    # $(POD_NAMESPACE) comes from the downward API: the namespace the EPP runs in.
    flags = parse_args(resolve_args(built, epp, {"metadata.namespace": namespace}))
    assert flags.namespace == namespace
    assert flags.config_file is not None and flags.pool_name is not None
    settings = DirectorSettings(
        config_text=mounted_file(built, epp, flags.config_file),
        pool_name=flags.pool_name,
        pool_namespace=flags.namespace,
        kube_api_server=kube.url,
        # Nothing listens on the pods' ports: scrape rarely, and do not wait for it.
        refresh_metrics_interval_s=30.0,
        metrics_staleness_threshold_s=60.0,
    )
    director = await build_director(settings, EppMetrics())
    await director.start()
    try:
        await wait_until(lambda: len(director.datastore) == len(roles))
        (port,) = {p["number"] for p in built.of_kind("InferencePool")[0]["spec"]["targetPorts"]}
        keys = {ep.key for ep in director.datastore.snapshot()}
        assert keys == {f"{ip}:{port}" for ip in roles}

        def role_of(key: str | None) -> str | None:
            return None if key is None else roles[key.rsplit(":", 1)[0]]

        short = await director.decide("/v1/chat/completions", {}, _chat("Hi"), None)
        assert short.decision_type == "decode-only"
        assert role_of(short.decode) == "decode"
        short.release_all()

        long = await director.decide("/v1/chat/completions", {}, _chat(LONG_PROMPT), None)
        assert long.decision_type == "prefill-decode"
        assert (role_of(long.decode), role_of(long.prefill)) == ("decode", "prefill")
        long.release_all()

        if "encode" in roles.values():
            content = [{"type": "text", "text": LONG_PROMPT}, IMAGE]
            mm = await director.decide("/v1/chat/completions", {}, _chat(content), None)
            assert mm.decision_type == "encode-prefill-decode"
            assert {role_of(e) for e in mm.encoders} == {"encode"}
            mm.release_all()
    finally:
        await director.stop()
