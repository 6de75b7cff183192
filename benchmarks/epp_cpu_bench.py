"""EPP CPU per streaming request, through real Envoy.

    .venv/bin/python -m benchmarks.epp_cpu_bench [--requests 300] [--concurrency 8]
    .venv/bin/python -m benchmarks.epp_cpu_bench --extproc-only [--streams 1200]

The local stack of ``benchmarks.flow_control_bench`` (two simulated decode engines, a
sidecar each, the EPP with that benchmark's EndpointPickerConfig, real Envoy streaming
bodies to the EPP in FULL_DUPLEX_STREAMED mode) serves a closed loop of streaming chat
requests (``max_tokens`` 24, so about 26 SSE chunks per response, each a gRPC round trip
through the EPP). The EPP process's CPU time (user + system, psutil) is read around the
load and, for the same wall time, around an idle window (metrics scraping, discovery and
flow control's timers): the difference divided by the requests is the CPU a request
costs the EPP.

``--extproc-only`` isolates the ext_proc layer: the ``ExtProcService`` with a fixed
decision (``benchmarks.epp_bench.FixedDecision``) in a child process, driven over
loopback gRPC the way Envoy drives it (headers, body, response headers, 27 SSE chunks,
the end of the response); ``--evictable`` gives every decision an eviction handle, and
``--echo`` swaps in a handler that answers every message with one constant message (the
cost of gRPC alone), and ``--loop asyncio`` serves on asyncio's own loop instead of
uvloop (which the EPP process runs on).
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
from typing import Any

import aiohttp
import grpc
import psutil
import uvloop

from benchmarks.epp_bench import FixedDecision, _headers
from benchmarks.flow_control_bench import OBJECTS, Shape, _body, epp_config
from epp._proto.disagg_extproc_pb2 import (
    BodyResponse,
    CommonResponse,
    HeaderMap,
    HeaderValue,
    HttpBody,
    HttpHeaders,
    ProcessingRequest,
    ProcessingResponse,
)
from epp.decision import Decision
from epp.extproc import EXTPROC_METHOD, EXTPROC_SERVICE, ExtProcConfig, ExtProcService
from epp.flowcontrol.eviction import EvictionItem
from epp.metrics import EppMetrics
from examples.local_stack import LocalStack, StackOptions

# Short prompts and 24 output tokens: about 26 SSE chunks per response, each one gRPC
# round trip through the EPP.
SHAPE = Shape(prompt_words=40, max_tokens=24)
_TOKEN = (
    b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,'
    b'"model":"sim-model","choices":[{"index":0,"delta":{"content":"word "},'
    b'"finish_reason":null}]}\n\n'
)
SSE_CHUNKS = [_TOKEN] * 25 + [
    b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,'
    b'"model":"sim-model","choices":[],"usage":{"prompt_tokens":50,'
    b'"completion_tokens":24,"total_tokens":74}}\n\n',
    b"data: [DONE]\n\n",
]
_CHAT = b'{"model":"m","messages":[{"role":"user","content":"hi"}],"stream":true}'
_ECHO = ProcessingResponse(response_body=BodyResponse(response=CommonResponse()))


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
                async with session.post(url, json=_body(rng, SHAPE), headers=headers) as r:
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
        decode=SHAPE.engines,
        gateway_port=0,
        workdir=workdir,
        sim_args=SHAPE.sim_args(),
        epp_args=[f"--api-objects-file={objects}", "--allow-experimental-plugins"],
        epp_config=epp_config(workdir, not args.flow_control_off, 0.5, batch=SHAPE.batch),
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


class _Evictable(FixedDecision):
    async def decide(self, *args: Any, **kwargs: Any) -> Decision:
        decision = await super().decide(*args, **kwargs)
        decision.eviction = EvictionItem("bench", -10, self.decode)
        return decision


async def _echo(_requests: Any, context: grpc.aio.ServicerContext) -> None:
    while await context.read() is not grpc.aio.EOF:
        await context.write(_ECHO)


async def serve(port_file: Path, evictable: bool, echo: bool) -> None:
    """The child process of ``--extproc-only``: writes its port, serves until killed."""
    server = grpc.aio.server()
    if echo:
        handler = grpc.stream_stream_rpc_method_handler(
            _echo,
            request_deserializer=ProcessingRequest.FromString,
            response_serializer=ProcessingResponse.SerializeToString,
        )
        server.add_registered_method_handlers(EXTPROC_SERVICE, {"Process": handler})
    else:
        maker = (_Evictable if evictable else FixedDecision)("127.0.0.1:9999")
        ExtProcService(maker, EppMetrics(), ExtProcConfig()).register(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    port_file.write_text(str(port))  # noqa: ASYNC240 - once, before serving
    await server.wait_for_termination()


def _sse_headers() -> ProcessingRequest:
    pairs = [(":status", b"200"), ("content-type", b"text/event-stream")]
    headers = HeaderMap(headers=[HeaderValue(key=k, raw_value=v) for k, v in pairs])
    return ProcessingRequest(response_headers=HttpHeaders(headers=headers))


async def _one_stream(channel: grpc.aio.Channel) -> None:
    call = channel.stream_stream(
        EXTPROC_METHOD,
        request_serializer=ProcessingRequest.SerializeToString,
        response_deserializer=ProcessingResponse.FromString,
    )()
    await call.write(_headers("/v1/chat/completions"))
    await call.write(ProcessingRequest(request_body=HttpBody(body=_CHAT, end_of_stream=True)))
    await call.read()  # the routing headers (the echo: its answer to the headers)
    await call.read()  # the body, sent back
    await call.write(_sse_headers())
    await call.read()
    for chunk in SSE_CHUNKS:
        await call.write(ProcessingRequest(response_body=HttpBody(body=chunk)))
        await call.read()
    await call.write(ProcessingRequest(response_body=HttpBody(end_of_stream=True)))
    await call.read()
    await call.done_writing()
    if await call.read() is not grpc.aio.EOF:
        raise RuntimeError("the ext_proc server sent more answers than expected")


async def measure_extproc(args: argparse.Namespace) -> dict[str, float]:
    workdir = Path(tempfile.mkdtemp(prefix="disagg-extproc-cpu-"))
    port_file = workdir / "port"
    flags = [
        *(["--evictable"] if args.evictable else []),
        *(["--echo"] if args.echo else []),
        f"--loop={args.loop}",
    ]
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "benchmarks.epp_cpu_bench", "--serve", str(port_file), *flags
    )
    try:
        for _ in range(600):
            if port_file.exists() and port_file.read_text():
                break
            await asyncio.sleep(0.05)
        else:
            raise RuntimeError("the ext_proc server did not start")
        server = psutil.Process(child.pid)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port_file.read_text()}") as channel:

            async def worker(streams: int) -> None:
                for _ in range(streams):
                    await _one_stream(channel)

            per_worker = max(1, args.streams // args.concurrency)
            await asyncio.gather(*(worker(5) for _ in range(args.concurrency)))  # warm-up
            cpu0 = _cpu(server)
            t0 = time.perf_counter()
            await asyncio.gather(*(worker(per_worker) for _ in range(args.concurrency)))
            wall = time.perf_counter() - t0
            busy = _cpu(server) - cpu0
    finally:
        child.kill()
        await child.wait()
    streams = per_worker * args.concurrency
    return {
        "streams": streams,
        "messages_per_stream": len(SSE_CHUNKS) + 4,
        "wall_s": wall,
        "server_cpu_ms_per_stream": busy / streams * 1000,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--flow-control-off", action="store_true")
    parser.add_argument("--repeat", type=int, default=1, help="runs, one after another")
    parser.add_argument("--extproc-only", action="store_true")
    parser.add_argument("--streams", type=int, default=1200, help="with --extproc-only")
    parser.add_argument("--evictable", action="store_true", help="with --extproc-only")
    parser.add_argument("--echo", action="store_true", help="with --extproc-only")
    parser.add_argument(
        "--loop",
        choices=("uvloop", "asyncio"),
        default="uvloop",
        help="with --extproc-only: the server's event loop (the EPP runs on uvloop)",
    )
    parser.add_argument("--serve", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve is not None:
        runner = uvloop.run if args.loop == "uvloop" else asyncio.run
        runner(serve(args.serve, args.evictable, args.echo))
        return
    for _ in range(args.repeat):
        run = measure_extproc if args.extproc_only else measure
        result = asyncio.run(run(args))
        print(json.dumps(result), file=sys.stdout, flush=True)


if __name__ == "__main__":
    main()
