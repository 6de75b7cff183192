"""SSRF protection against a fake Kubernetes API: the InferencePool and its pods."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest

from tests.conftest import eventually
from tests.epp_scheduling.fake_kube import FakeKube
from tests.sidecar.conftest import RunningSidecar, StartSidecar

SELECTOR = {"app": "disagg"}
BODY = {"model": "sim-model", "prompt": "hello there", "max_tokens": 3}


async def post(
    client: aiohttp.ClientSession, sidecar: RunningSidecar, **headers: str
) -> tuple[int, dict[str, Any]]:
    hdrs = {k.replace("_", "-"): v for k, v in headers.items()}
    async with client.post(sidecar.url + "/v1/completions", json=BODY, headers=hdrs) as resp:
        return resp.status, await resp.json()


async def guarded(start_sidecar: StartSidecar, kube: FakeKube, decode_port: int) -> RunningSidecar:
    return await start_sidecar(
        model_server_port=decode_port,
        enable_ssrf_protection=True,
        inference_pool="default/pool",
        kube_api_server=kube.url,
        kube_sync_timeout=5.0,
    )


async def test_pool_member_in_prefill_role_is_served(
    start_sim: Any, start_sidecar: StartSidecar, kube: FakeKube, client: aiohttp.ClientSession
) -> None:
    prefill = await start_sim(role="prefill", zero_latency=True)
    decode = await start_sim(role="decode", zero_latency=True)
    kube.set_pool("pool", SELECTOR, [prefill.port])
    kube.set_pod("p0", "127.0.0.1", {**SELECTOR, "llm-d.ai/role": "prefill"})
    sidecar = await guarded(start_sidecar, kube, decode.port)
    status, body = await post(client, sidecar, x_prefiller_host_port=prefill.host_port)
    assert status == 200, body
    assert (await prefill.stats())["requests_by_role"]["prefill"] == 1
    assert (
        sidecar.sample(
            "pd_sidecar_ssrf_decisions_total", stage="prefill", decision="allow", rule="allowed"
        )
        == 1
    )


async def test_each_rule_names_itself(
    start_sim: Any,
    start_sidecar: StartSidecar,
    kube: FakeKube,
    client: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    prefill = await start_sim(role="prefill", zero_latency=True)
    decode = await start_sim(role="decode", zero_latency=True)
    kube.set_pool("pool", SELECTOR, [prefill.port])
    kube.set_pod("p0", "127.0.0.1", {**SELECTOR, "llm-d.ai/role": "prefill"})
    kube.set_pod("d0", "127.0.0.3", {**SELECTOR, "llm-d.ai/role": "decode"})
    kube.set_pod("e0", "127.0.0.4", {**SELECTOR, "llm-d.ai/role": "encode"})
    kube.set_pod("outsider", "127.0.0.5", {"app": "other", "llm-d.ai/role": "prefill"})
    sidecar = await guarded(start_sidecar, kube, decode.port)
    port = prefill.port
    cases = [
        ({"x_prefiller_host_port": f"127.0.0.5:{port}"}, "not-in-pool", "prefill"),
        ({"x_prefiller_host_port": f"169.254.169.254:{port}"}, "not-in-pool", "prefill"),
        ({"x_prefiller_host_port": f"127.0.0.1:{port + 1}"}, "port-not-target-port", "prefill"),
        ({"x_prefiller_host_port": f"127.0.0.3:{port}"}, "role-not-prefill", "prefill"),
        ({"x_prefiller_host_port": f"127.0.0.4:{port}"}, "role-not-prefill", "prefill"),
        (
            {"x_encoder_hosts_ports": f"127.0.0.4:{port},127.0.0.1:{port}"},
            "role-not-encode",
            "encode",
        ),
        # One bad entry in a fallback list refuses the request.
        (
            {"x_prefiller_host_port": f"127.0.0.1:{port},10.0.0.1:{port}"},
            "not-in-pool",
            "prefill",
        ),
    ]
    for headers, rule, stage in cases:
        status, body = await post(client, sidecar, x_request_id=f"req-{rule}", **headers)
        assert status == 403, (headers, body)
        assert body["error"]["rule"] == rule, (headers, body)
        assert body["error"]["stage"] == "ssrf"
        assert body["error"]["request_id"] == f"req-{rule}"
        assert stage in body["error"]["message"]
        # The decision is logged with the request id, the target and the rule.
        logged = [
            r.msg
            for r in caplog.records
            if isinstance(r.msg, dict) and r.msg.get("event") == "ssrf_denied"
        ]
        assert logged[-1]["client_request_id"] == f"req-{rule}" and logged[-1]["rule"] == rule
    assert (
        sidecar.sample(
            "pd_sidecar_ssrf_decisions_total", stage="prefill", decision="deny", rule="not-in-pool"
        )
        == 3
    )  # the two outsiders and the fallback list's second entry
    assert (
        sidecar.sample(
            "pd_sidecar_ssrf_decisions_total",
            stage="encode",
            decision="deny",
            rule="role-not-encode",
        )
        == 1
    )
    # Nothing was sent to the prefill engine, nor to the decode engine.
    assert (await prefill.stats())["requests_total"] == 0
    assert (await decode.stats())["requests_total"] == 0


async def test_encode_target_with_encode_role_passes(
    start_sim: Any, start_sidecar: StartSidecar, kube: FakeKube, client: aiohttp.ClientSession
) -> None:
    decode = await start_sim(role="decode", zero_latency=True)
    kube.set_pool("pool", SELECTOR, [8000])
    kube.set_pod("e0", "127.0.0.4", {**SELECTOR, "llm-d.ai/role": "encode-prefill"})
    sidecar = await guarded(start_sidecar, kube, decode.port)
    status, body = await post(client, sidecar, x_encoder_hosts_ports="127.0.0.4:8000")
    assert status == 200, body
    assert (
        sidecar.sample(
            "pd_sidecar_ssrf_decisions_total", stage="encode", decision="allow", rule="allowed"
        )
        == 1
    )


async def test_pod_leaving_the_pool_and_relabelled_pod(
    start_sim: Any, start_sidecar: StartSidecar, kube: FakeKube, client: aiohttp.ClientSession
) -> None:
    prefill = await start_sim(role="prefill", zero_latency=True)
    decode = await start_sim(role="decode", zero_latency=True)
    kube.set_pool("pool", SELECTOR, [prefill.port])
    kube.set_pod("p0", "127.0.0.1", {**SELECTOR, "llm-d.ai/role": "prefill"})
    sidecar = await guarded(start_sidecar, kube, decode.port)
    target = {"x_prefiller_host_port": prefill.host_port}

    async def status_is(code: int, rule: str | None = None) -> bool:
        status, body = await post(client, sidecar, **target)
        return status == code and (rule is None or body["error"]["rule"] == rule)

    assert await status_is(200)
    # Relabelled to decode: no longer a prefill target.
    kube.set_pod("p0", "127.0.0.1", {**SELECTOR, "llm-d.ai/role": "decode"})
    await eventually(lambda: status_is(403, "role-not-prefill"), what="relabel seen")
    kube.set_pod("p0", "127.0.0.1", {**SELECTOR, "llm-d.ai/role": "prefill-decode"})
    await eventually(lambda: status_is(200), what="relabel back seen")
    # No longer ready: it left the pool's endpoints. (A pod relabelled out of the
    # selector reaches a label-selector watch as DELETED: the deletion case below.)
    kube.set_pod("p0", "127.0.0.1", {**SELECTOR, "llm-d.ai/role": "prefill"}, ready=False)
    await eventually(lambda: status_is(403, "not-in-pool"), what="pod not ready seen")
    kube.set_pod("p0", "127.0.0.1", {**SELECTOR, "llm-d.ai/role": "prefill"})
    await eventually(lambda: status_is(200), what="pod back")
    # Deleted.
    kube.delete_pod("p0")
    await eventually(lambda: status_is(403, "not-in-pool"), what="pod deletion seen")
    # The pool's target port changes: the old port is refused.
    kube.set_pod("p0", "127.0.0.1", {**SELECTOR, "llm-d.ai/role": "prefill"})
    await eventually(lambda: status_is(200), what="pod re-added")
    kube.set_pool("pool", SELECTOR, [prefill.port + 1])
    await eventually(lambda: status_is(403, "port-not-target-port"), what="target port change")


async def test_unsynced_pool_answers_503(
    start_sim: Any, start_sidecar: StartSidecar, client: aiohttp.ClientSession
) -> None:
    decode = await start_sim(role="decode", zero_latency=True)
    # An API server that is not there: the first listing never arrives.
    sidecar = await start_sidecar(
        model_server_port=decode.port,
        enable_ssrf_protection=True,
        inference_pool="pool",
        kube_api_server="http://127.0.0.1:9",
        kube_sync_timeout=0.05,
    )
    status, body = await post(client, sidecar, x_prefiller_host_port="127.0.0.1:8000")
    assert status == 503
    assert body["error"]["rule"] == "pool-not-synced"
    assert "InferencePool default/pool" in body["error"]["message"]
    # Requests without routing targets are not affected.
    async with client.post(sidecar.url + "/v1/completions", json=BODY) as resp:
        assert resp.status == 200


async def test_missing_pool_refuses_everything(
    start_sim: Any, start_sidecar: StartSidecar, kube: FakeKube, client: aiohttp.ClientSession
) -> None:
    decode = await start_sim(role="decode", zero_latency=True)
    kube.set_pod("p0", "127.0.0.1", {**SELECTOR, "llm-d.ai/role": "prefill"})
    sidecar = await guarded(start_sidecar, kube, decode.port)
    status, body = await post(client, sidecar, x_prefiller_host_port="127.0.0.1:8000")
    assert (status, body["error"]["rule"]) == (403, "not-in-pool")
