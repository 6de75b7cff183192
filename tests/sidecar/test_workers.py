"""``--workers N``: several processes on one port, one metrics endpoint summing them all."""

from __future__ import annotations

import asyncio
import re
import signal
from typing import Any

import aiohttp

from tests.sidecar.test_process import SCRIPT, Process

REQUESTS = 40


def requests_total(text: str) -> float:
    return sum(
        float(match.group(1))
        for match in re.finditer(
            r'^pd_sidecar_requests_total\{[^}]*mode="pd"[^}]*\} (\S+)$', text, re.M
        )
    )


async def test_workers_share_the_port_and_one_metrics_endpoint(start_sim: Any) -> None:
    prefill = await start_sim(role="prefill", zero_latency=True)
    decode = await start_sim(role="decode", zero_latency=True)
    proc = await asyncio.create_subprocess_exec(
        SCRIPT,
        "--port=0",
        "--metrics-port=0",
        "--listen-host=127.0.0.1",
        f"--model-server-port={decode.port}",
        "--workers=2",
        "--secure-proxy=false",
        stderr=asyncio.subprocess.PIPE,
    )
    sidecar = Process(proc)
    try:
        listening = await asyncio.wait_for(sidecar.listening, 60)
        assert listening["workers"] == 2
        (worker_metrics,) = listening["worker_metrics_ports"]
        url = f"http://127.0.0.1:{listening['port']}/v1/completions"
        body = {"model": "sim-model", "prompt": "hi", "max_tokens": 2}
        headers = {"x-prefiller-host-port": prefill.host_port}
        # A new connection per request: the kernel spreads connections over the processes.
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=connector) as session:
            for _ in range(REQUESTS):
                async with session.post(url, json=body, headers=headers) as resp:
                    assert resp.status == 200
                    assert (await resp.json())["choices"]
            metrics = f"http://127.0.0.1:{listening['metrics_port']}/metrics"
            async with session.get(metrics) as resp:
                merged = requests_total(await resp.text())
            async with session.get(f"http://127.0.0.1:{worker_metrics}/metrics") as resp:
                worker = requests_total(await resp.text())
        assert merged == REQUESTS
        assert 0 < worker < REQUESTS  # both processes served, the endpoint counts both
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 60) == 0
        await sidecar.reader
        # The worker stopped with the first process.
        async with aiohttp.ClientSession() as session:
            try:
                async with session.get(f"http://127.0.0.1:{worker_metrics}/metrics") as resp:
                    stopped = False
            except aiohttp.ClientConnectionError:
                stopped = True
        assert stopped
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
