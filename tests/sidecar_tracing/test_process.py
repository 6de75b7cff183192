"""The real ``pd-sidecar --tracing`` process: configured by the OTEL_* environment, its
spans batched until SIGTERM are flushed on the way out."""

from __future__ import annotations

import asyncio
import os
import signal
from typing import Any

import aiohttp

from tests.sidecar.test_process import SCRIPT, Process
from tests.sidecar_tracing.conftest import Collector, attributes
from tests.sidecar_tracing.test_tracing import BODY, CALLER, PARENT_ID, TRACE_ID


async def test_spans_batched_until_sigterm_are_flushed_on_exit(
    collector: Collector, start_sim: Any
) -> None:
    prefill = await start_sim(role="prefill", zero_latency=True)
    decode = await start_sim(role="decode", zero_latency=True)
    env = {
        **os.environ,
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{collector.port}",
        "OTEL_TRACES_SAMPLER": "parentbased_always_on",
        "OTEL_SERVICE_NAME": "pd-sidecar-under-test",
        "OTEL_BSP_SCHEDULE_DELAY": "600000",  # nothing leaves before the exit flush
    }
    proc = await asyncio.create_subprocess_exec(
        SCRIPT,
        "--port=0",
        "--metrics-port=0",
        "--listen-host=127.0.0.1",
        f"--model-server-port={decode.port}",
        "--secure-proxy=false",
        "--tracing",
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    sidecar = Process(proc)
    try:
        listening = await asyncio.wait_for(sidecar.listening, 30)
        url = f"http://127.0.0.1:{listening['port']}/v1/completions"
        headers = {"x-prefiller-host-port": prefill.host_port, "traceparent": CALLER}
        async with aiohttp.ClientSession() as session:
            async with session.post(url, json=BODY, headers=headers) as resp:
                assert resp.status == 200
                await resp.read()
        assert collector.spans == []  # still batched
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
        await asyncio.wait_for(sidecar.reader, 10)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()

    (server,) = collector.named("llm_d.pd_proxy.POST /v1/completions")
    (request,) = collector.named("forward_request")
    assert request.trace_id.hex() == TRACE_ID
    assert server.parent_span_id.hex() == PARENT_ID
    assert request.parent_span_id == server.span_id
    assert attributes(request)["llm_d.pd_proxy.prefill_target"] == prefill.host_port
    assert len(collector.named("prefill")) == len(collector.named("decode")) == 1
    assert collector.services == {"pd-sidecar-under-test"}
    (logged,) = [line for line in sidecar.lines if line.get("event") == "request"]
    assert logged["trace_id"] == TRACE_ID
