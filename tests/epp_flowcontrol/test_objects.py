"""InferenceObjective and InferenceModelRewrite: parsing, precedence, and both sources
(the file, and a watch against the test Kubernetes API server)."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from epp.flowcontrol.config import FlowControlSetup
from epp.requestmgmt.file_source import ObjectsFile, read_objects
from epp.requestmgmt.kube_source import ObjectsWatch
from epp.requestmgmt.manager import RequestManager, rewrite_body
from epp.requestmgmt.objects import ObjectStore, choose_target, parse_object
from tests.epp_gateway.pool import wait_until
from tests.epp_scheduling.fake_kube import FakeKube


def objective(name: str, priority: int, pool: str = "pool") -> dict[str, Any]:
    return {
        "apiVersion": "llm-d.ai/v1alpha2",
        "kind": "InferenceObjective",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"priority": priority, "poolRef": {"name": pool}},
    }


def rewrite(
    name: str,
    rules: list[dict[str, Any]],
    created: str = "2026-01-01T00:00:00Z",
    pool: str = "pool",
) -> dict[str, Any]:
    return {
        "apiVersion": "llm-d.ai/v1alpha2",
        "kind": "InferenceModelRewrite",
        "metadata": {"name": name, "namespace": "default", "creationTimestamp": created},
        "spec": {"poolRef": {"name": pool}, "rules": rules},
    }


def exact(model: str, *targets: tuple[str, int | None]) -> dict[str, Any]:
    return {
        "matches": [{"model": {"type": "Exact", "value": model}}],
        "targets": [
            {"modelRewrite": t, **({"weight": w} if w is not None else {})} for t, w in targets
        ],
    }


def generic(*targets: str) -> dict[str, Any]:
    return {"targets": [{"modelRewrite": t} for t in targets]}


def test_exact_beats_generic_and_oldest_object_wins() -> None:
    store = ObjectStore()
    objs = [
        parse_object(rewrite("new", [exact("m", ("from-new", None))], "2026-02-01T00:00:00Z")),
        parse_object(rewrite("old", [generic("fallback"), exact("m", ("from-old", None))])),
    ]
    store.replace("file", objs)
    assert store.rewrite("m") == ("from-old", "old")
    assert store.rewrite("other") == ("fallback", "old")
    assert store.rewrite("") == ("fallback", "old")


def test_first_rule_in_list_order_wins_within_one_object() -> None:
    store = ObjectStore()
    store.replace(
        "file", [parse_object(rewrite("r", [exact("m", ("a", None)), exact("m", ("b", None))]))]
    )
    assert store.rewrite("m") == ("a", "r")


def test_weighted_targets_split_traffic() -> None:
    targets = (("stable", 90), ("canary", 10))
    assert choose_target(targets, 0.0) == "stable"
    assert choose_target(targets, 0.95) == "canary"
    store = ObjectStore(rng=random.Random(7))
    store.replace(
        "file", [parse_object(rewrite("r", [exact("m", ("stable", 90), ("canary", 10))]))]
    )
    counts = Counter(store.rewrite("m")[0] for _ in range(2000))  # type: ignore[index]
    assert 100 < counts["canary"] < 300


def test_invalid_objects_are_refused_with_the_field() -> None:
    bad = rewrite("r", [exact("m", ("a", 5), ("b", None))])
    with pytest.raises(ValueError, match="all must"):
        parse_object(bad)
    with pytest.raises(ValueError, match="poolRef"):
        parse_object({"kind": "InferenceObjective", "metadata": {"name": "x"}, "spec": {}})


def test_pool_ref_filtering_and_unknown_objective() -> None:
    store = ObjectStore(pool="pool")
    store.replace(
        "file", [parse_object(objective("a", 5)), parse_object(objective("b", 9, "other"))]
    )
    manager = RequestManager(FlowControlSetup(), store, lambda: [])
    assert manager.priority({"x-llm-d-inference-objective": "a"}) == 5
    assert manager.priority({"x-gateway-inference-objective": "a"}) == 5
    assert manager.priority({"x-llm-d-inference-objective": "b"}) == 0  # another pool's
    assert manager.rewrite_metrics.unknown_objectives._value.get() == 1


def test_rewrite_body_changes_only_the_model() -> None:
    out = rewrite_body(b'{"model": "m", "messages": [{"content": "h\\u00e9"}]}', "m2")
    import json

    assert json.loads(out) == {"model": "m2", "messages": [{"content": "hé"}]}


async def test_file_is_reread_on_change_and_a_bad_version_keeps_the_old(tmp_path: Path) -> None:
    import yaml

    path = tmp_path / "objects.yaml"
    path.write_text(yaml.safe_dump_all([objective("a", 1), rewrite("r", [generic("x")])]))
    store = ObjectStore()
    source = ObjectsFile(path, store, poll_s=0.02)
    await source.start()
    try:
        assert store.objective("a") is not None and store.objective("a").priority == 1  # type: ignore[union-attr]
        path.write_text(yaml.safe_dump_all([objective("a", 7)]))
        await wait_until(lambda: (o := store.objective("a")) is not None and o.priority == 7)
        assert store.rewrite("m") is None
        loads = source.loads
        path.write_text("kind: InferenceObjective\nmetadata: {}\n")
        with pytest.raises(TimeoutError):
            await wait_until(lambda: source.loads > loads, timeout_s=0.3)
        assert store.objective("a") is not None
    finally:
        await source.stop()


def test_bad_file_names_the_document(tmp_path: Path) -> None:
    path = tmp_path / "o.yaml"
    path.write_text("kind: Pod\n")
    with pytest.raises(ValueError, match="document 0"):
        read_objects(path)


async def test_kubernetes_watch_follows_adds_changes_and_deletes() -> None:
    kube = await FakeKube().start()
    store = ObjectStore(pool="pool")
    watch = ObjectsWatch(store, namespace="default", api_server=kube.url)
    kube.set_api_object(objective("critical", 100))
    await watch.start()
    try:
        await wait_until(lambda: store.objective("critical") is not None)
        kube.set_api_object(objective("critical", 50))
        await wait_until(lambda: store.objective("critical").priority == 50)  # type: ignore[union-attr]
        kube.set_api_object(rewrite("canary", [exact("m", ("m2", None))]))
        await wait_until(lambda: store.rewrite("m") == ("m2", "canary"))
        kube.set_api_object(objective("elsewhere", 1, pool="other"))
        kube.delete_api_object("InferenceObjective", "critical")
        await wait_until(lambda: store.objective("critical") is None)
        assert store.objective("elsewhere") is None
        kube.break_watches()  # a restarted API server: the watch resumes
        kube.delete_api_object("InferenceModelRewrite", "canary")
        await wait_until(lambda: store.rewrite("m") is None)
    finally:
        await watch.stop()
        await kube.stop()
