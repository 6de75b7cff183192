"""Sidecar benchmark: the client doing both legs itself vs. the same through pd-sidecar.

Starts a prefill and a decode ``vllm-sim`` at zero latency and a ``pd-sidecar``, each as
its own process, then for every cell of the matrix runs the same closed-loop load (a)
directly (prefill leg, then decode leg with the returned kv_transfer_params) and (b)
through the sidecar. Reports requests/s, p50/p99 time to first token and total latency,
the p50 spread of the token burst in streams, and the sidecar's CPU seconds per 1,000
requests (from /proc/<pid>/stat).

    python benchmarks/sidecar_bench.py            # short run (~1-2 minutes)
    python benchmarks/sidecar_bench.py --full     # 1 KB and 64 KB, longer cells
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _loadgen import Result, Sample, read_stream, run_closed_loop

BIN = Path(sys.executable).parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
OUTPUT_TOKENS = 16


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


async def wait_ready(url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while True:
            try:
                async with session.get(url) as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} not ready")
            await asyncio.sleep(0.05)


@contextmanager
def processes(prompt_bytes: int) -> Iterator[dict[str, Any]]:
    p_port, d_port, s_port, m_port = (free_port() for _ in range(4))
    sim = [
        str(BIN / "vllm-sim"),
        "--zero-latency",
        "--max-model-len=16384",
        "--num-blocks=400000",
        f"--natural-output-tokens={OUTPUT_TOKENS * 4}",
    ]
    procs = [
        subprocess.Popen([*sim, f"--port={p_port}", "--role=prefill"]),
        subprocess.Popen([*sim, f"--port={d_port}", "--role=decode"]),
        subprocess.Popen(
            [
                str(BIN / "pd-sidecar"),
                f"--port={s_port}",
                f"--metrics-port={m_port}",
                "--listen-host=127.0.0.1",
                f"--model-server-port={d_port}",
                "--log-level=warning",
                f"--max-body-bytes={max(prompt_bytes * 4, 1 << 20)}",
            ],
            stderr=subprocess.DEVNULL,
        ),
    ]
    try:
        yield {"p": p_port, "d": d_port, "s": s_port, "sidecar_pid": procs[2].pid}
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


def make_prompt(size: int) -> str:
    # Words of 15 characters plus a space: 16 bytes, one simulator token each.
    count = size // 16 + 1
    return " ".join(secrets.token_hex(7) + "z" for _ in range(count))[:size]


def bodies(prompt: str, stream: bool) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": "sim-model",
        "prompt": prompt,
        "max_tokens": OUTPUT_TOKENS,
        "ignore_eos": True,
    }
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return body


def two_leg_client(ports: dict[str, Any], prompt: str, stream: bool) -> Any:
    p_url = f"http://127.0.0.1:{ports['p']}/v1/completions"
    d_url = f"http://127.0.0.1:{ports['d']}/v1/completions"
    body = bodies(prompt, stream)
    prefill = {k: v for k, v in body.items() if k != "stream_options"}
    prefill.update(
        stream=False,
        max_tokens=1,
        kv_transfer_params={"do_remote_decode": True, "do_remote_prefill": False,
                            "remote_engine_id": None, "remote_block_ids": None,
                            "remote_host": None, "remote_port": None},
    )  # fmt: skip

    async def scenario(session: aiohttp.ClientSession) -> Sample:
        started = time.perf_counter()
        rid = secrets.token_hex(8)
        async with session.post(p_url, json=prefill, headers={"x-request-id": rid}) as resp:
            answer = await resp.json()
            if resp.status != 200 or not answer.get("kv_transfer_params"):
                raise ValueError(f"prefill failed: {resp.status}")
        decode = {**body, "kv_transfer_params": answer["kv_transfer_params"]}
        async with session.post(d_url, json=decode, headers={"x-request-id": rid}) as resp:
            if resp.status != 200:
                raise ValueError(f"decode failed: {resp.status}")
            if stream:
                return await read_stream(resp, started)
            await resp.read()
        elapsed = time.perf_counter() - started
        return Sample(ttft=elapsed, total=elapsed)

    return scenario


def via_sidecar(ports: dict[str, Any], prompt: str, stream: bool) -> Any:
    url = f"http://127.0.0.1:{ports['s']}/v1/completions"
    body = json.dumps(bodies(prompt, stream)).encode()
    headers = {
        "x-prefiller-host-port": f"127.0.0.1:{ports['p']}",
        "Content-Type": "application/json",
    }

    async def scenario(session: aiohttp.ClientSession) -> Sample:
        started = time.perf_counter()
        async with session.post(url, data=body, headers=headers) as resp:
            if resp.status != 200:
                raise ValueError(f"sidecar answered {resp.status}")
            if stream:
                return await read_stream(resp, started)
            await resp.read()
        elapsed = time.perf_counter() - started
        return Sample(ttft=elapsed, total=elapsed)

    return scenario


def fmt_ms(value: float) -> str:
    return f"{value * 1000:8.2f}"


def row(label: str, result: Result, cpu_per_1k: float | None) -> str:
    cpu = f"{cpu_per_1k:7.3f}" if cpu_per_1k is not None else "      -"
    return (
        f"{label:<8}{result.rps:9.1f}{fmt_ms(result.p('ttft', 50))}{fmt_ms(result.p('ttft', 99))}"
        f"{fmt_ms(result.p('total', 50))}{fmt_ms(result.p('total', 99))}"
        f"{fmt_ms(result.p('spread', 50))}{cpu}{result.errors:6d}"
    )


async def bench(args: argparse.Namespace) -> list[dict[str, Any]]:
    sizes = [1024, 65536] if args.full else [1024]
    concurrencies = [1, 64, 256]
    duration = args.duration or (8.0 if args.full else 3.0)
    warmup = 1.0
    records: list[dict[str, Any]] = []
    header = (
        f"{'mode':<8}{'req/s':>9}{'ttft50':>8}{'ttft99':>8}{'tot50':>8}{'tot99':>8}"
        f"{'spread50':>9}{'cpu/1k':>7}{'err':>6}   (ms; cpu = sidecar CPU s per 1000 req)"
    )
    for size in sizes:
        prompt = make_prompt(size)
        with processes(size) as ports:
            await wait_ready(f"http://127.0.0.1:{ports['p']}/health")
            await wait_ready(f"http://127.0.0.1:{ports['d']}/health")
            await wait_ready(f"http://127.0.0.1:{ports['s']}/ready")
            for stream in (False, True):
                for concurrency in concurrencies:
                    print(f"\n== prompt {size // 1024} KB, stream={stream}, c={concurrency}")
                    print(header)
                    direct = await run_closed_loop(
                        two_leg_client(ports, prompt, stream),
                        concurrency=concurrency,
                        duration=duration,
                        warmup=warmup,
                    )
                    print(row("direct", direct, None))
                    before = cpu_seconds(ports["sidecar_pid"])
                    proxied = await run_closed_loop(
                        via_sidecar(ports, prompt, stream),
                        concurrency=concurrency,
                        duration=duration,
                        warmup=warmup,
                    )
                    spent = cpu_seconds(ports["sidecar_pid"]) - before
                    # CPU covers warm-up and tail too, so divide by every completed request.
                    done = proxied.completed
                    cpu_per_1k = spent / done * 1000 if done else float("nan")
                    print(row("sidecar", proxied, cpu_per_1k))
                    records.append(
                        {
                            "prompt_bytes": size,
                            "stream": stream,
                            "concurrency": concurrency,
                            "direct": summary(direct),
                            "sidecar": summary(proxied) | {"cpu_s_per_1k": cpu_per_1k},
                        }
                    )
    return records


def summary(result: Result) -> dict[str, float]:
    return {
        "rps": result.rps,
        "ttft_p50_ms": result.p("ttft", 50) * 1000,
        "ttft_p99_ms": result.p("ttft", 99) * 1000,
        "total_p50_ms": result.p("total", 50) * 1000,
        "total_p99_ms": result.p("total", 99) * 1000,
        "spread_p50_ms": result.p("spread", 50) * 1000,
        "errors": result.errors,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="1 KB and 64 KB, 8 s per cell")
    parser.add_argument("--duration", type=float, default=0.0, help="seconds per cell")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    try:
        import uvloop
    except ImportError:
        records = asyncio.run(bench(args))
    else:
        records = uvloop.run(bench(args))
    if args.json:
        args.json.write_text(json.dumps(records, indent=2))


if __name__ == "__main__":
    main()
