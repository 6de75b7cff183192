"""EPP CPU per streaming request, through real Envoy.

    .venv/bin/python -m benchmarks.epp_cpu_bench [--requests 300] [--concurrency 8]

The local stack of ``benchmarks.flow_control_bench`` (two simulated decode engines, a
sidecar each, the EPP with that benchmark's EndpointPickerConfig, real Envoy streaming
bodies to the EPP in FULL_DUPLEX_STREAMED mode) serves a closed loop of streaming chat
requests (``max_tokens`` 24, so about 26 SSE chunks per response, each a gRPC round trip
through the EPP). The EPP process's CPU time (user + system, psutil) is read around the
load and, for the same wall time, around an idle window (metrics scraping, discovery and
flow control's timers): the difference divided by the requests is the CPU a request
costs the EPP.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import psutil

from benchmarks.flow_control_bench import ENGINES, OBJECTS, SIM_ARGS, _body, epp_config
from examples.local_stack import LocalStack, StackOptions


def _cpu(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return float(times.user + times.system)


async def _load(url: str, requests: int, concurrency: int) -> tuple[int, int, float]:
    """Closed loop: (successes, SSE data chunks seen, wall seconds)."""
    rng = random.Random(7)
    left = requests
    ok = 0
    chunks = 0
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def worker() -> None:
            nonlocal left, ok, chunks
            while left > 0:
                left -= 1
                headers = {
                    "x-llm-d-inference-objective": "standard",
                    "x-llm-d-inference-fairness-id": f"tenant-{rng.randrange(2)}",
                }
                async with session.post(url, json=_body(rng), headers=headers) as r:
                    data = await r.read()
                if r.status == 200:
                    ok += 1
                    chunks += data.count(b"data:")

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return ok, chunks, time.perf_counter() - t0


async def measure(args: argparse.Namespace) -> dict[str, float]:
    workdir = Path(tempfile.mkdtemp(prefix="disagg-epp-cpu-"))
    objects = workdir / "objects.yaml"
    objects.write_text(OBJECTS)
    options = StackOptions(
        prefill=0,
        decode=ENGINES,
        gateway_port=0,
        workdir=workdir,
        sim_args=SIM_ARGS,
        epp_args=[f"--api-objects-file={objects}", "--allow-experimental-plugins"],
        epp_config=epp_config(workdir, not args.flow_control_off, 0.5),
    )
    stack = LocalStack(options)
    await stack.start()
    try:
        url = f"{stack.gateway_url}/v1/chat/completions"
        assert stack.epp is not None
        assert stack.epp.pid is not None
        epp = psutil.Process(stack.epp.pid)
        await _load(url, 2 * args.concurrency, args.concurrency)  # warm-up
        cpu0 = _cpu(epp)
        ok, chunks, wall = await _load(url, args.requests, args.concurrency)
        busy = _cpu(epp) - cpu0
        cpu0 = _cpu(epp)
        await asyncio.sleep(wall)
        idle = _cpu(epp) - cpu0
    finally:
        await stack.stop()
    n = max(1, ok)
    return {
        "requests": args.requests,
        "ok": ok,
        "sse_chunks_per_request": chunks / n,
        "wall_s": wall,
        "epp_cpu_ms_per_request": busy / n * 1000,
        "epp_idle_cpu_ms_same_window": idle * 1000,
        "epp_cpu_ms_per_request_net": (busy - idle) / n * 1000,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--flow-control-off", action="store_true")
    parser.add_argument("--repeat", type=int, default=1, help="stacks to run, one after another")
    args = parser.parse_args()
    for _ in range(args.repeat):
        result = asyncio.run(measure(args))
        print(json.dumps(result), file=sys.stdout, flush=True)


if __name__ == "__main__":
    main()
