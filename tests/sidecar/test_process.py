"""The real ``pd-sidecar`` process: bad configuration exits 2; SIGTERM drains and exits 0."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

SCRIPT = str(Path(sys.executable).with_name("pd-sidecar"))


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--port=eighty"], "--port"),
        (["--kv-connector=teleport"], "--kv-connector"),
        (["--secure-proxy=yes please"], "--secure-proxy"),
        (["--prefill-retry-backoff=10"], "--prefill-retry-backoff"),
        (["--bogus"], "--bogus"),
        (["--configuration", "prefill-max-retriez: 3"], "prefill-max-retriez"),
        (["--configuration-file=/nonexistent/sidecar.yaml"], "--configuration-file"),
    ],
)
def test_bad_configuration_exits_2_naming_the_field(args: list[str], named: str) -> None:
    done = subprocess.run([SCRIPT, *args], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2, done.stderr
    assert named in done.stderr


class Process:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[dict[str, Any]] = []
        self.listening = asyncio.get_running_loop().create_future()
        self.reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        assert self.proc.stderr is not None
        async for raw in self.proc.stderr:
            try:
                line = json.loads(raw)
            except ValueError:
                continue
            self.lines.append(line)
            if line.get("event") == "listening" and not self.listening.done():
                self.listening.set_result(line)
        if not self.listening.done():
            self.listening.set_exception(RuntimeError("pd-sidecar exited before listening"))


async def test_sigterm_drains_in_flight_requests_and_exits_0(start_sim: Any) -> None:
    prefill = await start_sim(role="prefill", zero_latency=True)
    decode = await start_sim(role="decode", itl_ms=20.0, ttft_base_ms=0.0)
    proc = await asyncio.create_subprocess_exec(
        SCRIPT,
        "--port=0",
        "--metrics-port=0",
        "--listen-host=127.0.0.1",
        f"--model-server-port={decode.port}",
        "--drain-timeout=20s",
        "--secure-proxy=false",
        stderr=asyncio.subprocess.PIPE,
    )
    sidecar = Process(proc)
    try:
        listening = await asyncio.wait_for(sidecar.listening, 30)
        url = f"http://127.0.0.1:{listening['port']}"
        body = {"model": "sim-model", "prompt": "hi " * 10, "max_tokens": 30, "stream": True}
        headers = {"x-prefiller-host-port": prefill.host_port, "x-request-id": "drain-1"}
        async with aiohttp.ClientSession() as session:
            async with session.get(url + "/ready") as resp:
                assert resp.status == 200
            async with session.get(f"http://127.0.0.1:{listening['metrics_port']}/metrics") as r:
                assert "pd_sidecar_in_flight_requests" in await r.text()
            resp = await session.post(url + "/v1/completions", json=body, headers=headers)
            assert resp.status == 200
            await resp.content.readuntil(b"\n\n")
            proc.send_signal(signal.SIGTERM)
            rest = await resp.content.read()
            assert rest.endswith(b"data: [DONE]\n\n")
            assert rest.count(b'"choices"') >= 29
        assert await asyncio.wait_for(proc.wait(), 30) == 0
        await sidecar.reader
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    events = [line.get("event") for line in sidecar.lines]
    assert events.index("draining") < events.index("stopped")
    (access,) = [line for line in sidecar.lines if line.get("client_request_id") == "drain-1"]
    assert access["mode"] == "pd" and access["status"] == 200
    assert access["prefiller"] == prefill.host_port
    assert access["prefill_ms"] is not None and access["ttft_ms"] is not None
    assert access["total_ms"] >= access["ttft_ms"]
    assert len(access["trace_id"]) == 32


def test_help_lists_every_flag() -> None:
    done = subprocess.run(
        [SCRIPT, "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0
    for flag in ("--model-server-port", "--prefill-fallback", "--prefill-retry-backoff"):
        assert flag in done.stdout
