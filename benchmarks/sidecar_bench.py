"""Sidecar benchmark: pd-sidecar against the client doing both legs itself, and against
vLLM's Rust ``vllm-router`` (PyPI ``vllm-router``) when it is installed, in one run.

By default the engines are a zero-cost fake (``_fake_engine.py``: uvloop, canned JSON/SSE
answers, the NIXL handshake answered on prefill), so the proxy is the bottleneck;
``--engine sim`` uses two ``vllm-sim`` at zero latency instead. For each scenario the
same closed-loop load runs, interleaved over ``--reps`` repetitions (medians reported):

- ``two-leg``: the client sends the prefill leg, then the decode leg with the returned
  ``kv_transfer_params`` (the no-proxy limit);
- ``pd-sidecar``: one request with ``x-prefiller-host-port``;
- ``vllm-router``: ``--vllm-pd-disaggregation --policy round_robin``.

Reported per proxy: throughput as a multiple of two-leg's, CPU milliseconds per request
(from /proc of the proxy process and its children), the p50 latency added to two-leg's,
and the p50 spread of the token burst in streams (a proxy that stretches streams shows
it there).

    python benchmarks/sidecar_bench.py                    # ~3 minutes
    python benchmarks/sidecar_bench.py --workers 1,2 --json out.json
    git archive <commit> sidecar | tar -x -C /tmp/base
    python benchmarks/sidecar_bench.py --baseline-src /tmp/base   # before/after, one run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _loadgen import Result, Sample, read_stream, run_closed_loop

BIN = Path(sys.executable).parent
HERE = Path(__file__).resolve().parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
OUTPUT_TOKENS = 16


@dataclass(frozen=True)
class Scenario:
    label: str
    prompt_bytes: int
    stream: bool
    concurrency: int


SCENARIOS = (
    Scenario("JSON, 1 KB, c=1", 1024, False, 1),
    Scenario("JSON, 1 KB, c=256", 1024, False, 256),
    Scenario("SSE, 1 KB, c=256", 1024, True, 256),
    Scenario("SSE, 64 KB, c=256", 65536, True, 256),
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _process_tree(pid: int) -> list[int]:
    pids = [pid]
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for child in children:
            pids.extend(_process_tree(int(child)))
    return pids


def cpu_seconds(pid: int) -> float:
    """User + system CPU of ``pid`` and its live descendants."""
    total = 0
    for each in _process_tree(pid):
        try:
            fields = Path(f"/proc/{each}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime + stime
    return total / CLK_TCK


async def wait_ready(url: str, timeout: float = 60.0) -> None:
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
            await asyncio.sleep(0.1)


def router_binary() -> str | None:
    local = BIN / "vllm-router"
    return str(local) if local.exists() else shutil.which("vllm-router")


@contextmanager
def processes(args: argparse.Namespace) -> Iterator[dict[str, Any]]:
    p_port, d_port, r_port, rm_port = (free_port() for _ in range(4))
    procs: list[subprocess.Popen[bytes]] = []
    quiet = subprocess.DEVNULL
    if args.engine == "fake":
        procs.append(
            subprocess.Popen(
                [sys.executable, str(HERE / "_fake_engine.py"), f"--prefill-port={p_port}",
                 f"--decode-port={d_port}", f"--output-tokens={OUTPUT_TOKENS}"]
            )
        )  # fmt: skip
    else:
        sim = [str(BIN / "vllm-sim"), "--zero-latency", "--max-model-len=16384",
               "--num-blocks=400000", f"--natural-output-tokens={OUTPUT_TOKENS * 4}"]  # fmt: skip
        procs.append(subprocess.Popen([*sim, f"--port={p_port}", "--role=prefill"]))
        procs.append(subprocess.Popen([*sim, f"--port={d_port}", "--role=decode"]))
    ports: dict[str, Any] = {"p": p_port, "d": d_port, "sidecars": {}, "pids": {}}
    variants: dict[str, tuple[Path | None, int]] = {}
    for count in args.workers:
        variants["pd-sidecar" if count == 1 else f"pd-sidecar w{count}"] = (None, count)
    if args.baseline_src:
        variants["pd-sidecar@base"] = (args.baseline_src, 1)
    for name, (source, workers) in variants.items():
        port, metrics_port = free_port(), free_port()
        env = os.environ | ({"PYTHONPATH": str(source)} if source else {})
        # ``-m`` puts the working directory first on sys.path, ahead of PYTHONPATH: the
        # baseline runs from its own tree (else a run from a checkout measured the
        # checkout twice), the others from a directory without a sidecar package.
        cwd = str(source) if source else str(HERE)
        sidecar = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "sidecar",
                f"--port={port}",
                f"--metrics-port={metrics_port}",
                "--listen-host=127.0.0.1",
                "--secure-proxy=false",
                f"--model-server-port={d_port}",
                "--log-level=warning",
                f"--max-body-bytes={4 << 20}",
                *([f"--workers={workers}"] if workers > 1 else []),
            ],
            stderr=quiet,
            env=env,
            cwd=cwd,
        )
        procs.append(sidecar)
        ports["sidecars"][name] = port
        ports["pids"][name] = sidecar.pid
    router = router_binary() if not args.no_router else None
    if router is not None:
        proc = subprocess.Popen(
            [router, "--vllm-pd-disaggregation", "--policy=round_robin",
             f"--prefill=http://127.0.0.1:{p_port}", f"--decode=http://127.0.0.1:{d_port}",
             "--host=127.0.0.1", f"--port={r_port}", f"--prometheus-port={rm_port}",
             "--log-level=warning"],
            stdout=quiet, stderr=quiet,
        )  # fmt: skip
        procs.append(proc)
        ports["r"] = r_port
        ports["pids"]["vllm-router"] = proc.pid
    try:
        yield ports
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


def client_body(prompt: str, stream: bool) -> dict[str, Any]:
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
    body = client_body(prompt, stream)
    prefill = {k: v for k, v in body.items() if k != "stream_options"}
    prefill.update(
        stream=False,
        max_tokens=1,
        kv_transfer_params={"do_remote_decode": True, "do_remote_prefill": False,
                            "remote_engine_id": None, "remote_block_ids": None,
                            "remote_host": None, "remote_port": None},
    )  # fmt: skip
    prefill_raw = json.dumps(prefill).encode()
    headers = {"Content-Type": "application/json"}

    async def scenario(session: aiohttp.ClientSession) -> Sample:
        started = time.perf_counter()
        rid = secrets.token_hex(8)
        async with session.post(
            p_url, data=prefill_raw, headers={**headers, "x-request-id": rid}
        ) as resp:
            answer = json.loads(await resp.read())
            if resp.status != 200 or not answer.get("kv_transfer_params"):
                raise ValueError(f"prefill failed: {resp.status}")
        decode = json.dumps({**body, "kv_transfer_params": answer["kv_transfer_params"]})
        async with session.post(
            d_url, data=decode.encode(), headers={**headers, "x-request-id": rid}
        ) as resp:
            if resp.status != 200:
                raise ValueError(f"decode failed: {resp.status}")
            if stream:
                return await read_stream(resp, started)
            await resp.read()
        elapsed = time.perf_counter() - started
        return Sample(ttft=elapsed, total=elapsed)

    return scenario


def via_proxy(url: str, extra_headers: dict[str, str], prompt: str, stream: bool) -> Any:
    body = json.dumps(client_body(prompt, stream)).encode()
    headers = {**extra_headers, "Content-Type": "application/json"}

    async def scenario(session: aiohttp.ClientSession) -> Sample:
        started = time.perf_counter()
        async with session.post(url, data=body, headers=headers) as resp:
            if resp.status != 200:
                raise ValueError(f"proxy answered {resp.status}")
            if stream:
                return await read_stream(resp, started)
            await resp.read()
        elapsed = time.perf_counter() - started
        return Sample(ttft=elapsed, total=elapsed)

    return scenario


def peers(ports: dict[str, Any], prompt: str, stream: bool) -> dict[str, Any]:
    found = {
        "two-leg": two_leg_client(ports, prompt, stream),
    }
    for name, port in ports["sidecars"].items():
        found[name] = via_proxy(
            f"http://127.0.0.1:{port}/v1/completions",
            {"x-prefiller-host-port": f"127.0.0.1:{ports['p']}"},
            prompt,
            stream,
        )
    if "r" in ports:
        found["vllm-router"] = via_proxy(
            f"http://127.0.0.1:{ports['r']}/v1/completions", {}, prompt, stream
        )
    return found


def summary(result: Result, cpu_s: float | None) -> dict[str, float]:
    done = result.completed
    return {
        "rps": result.rps,
        "ttft_p50_ms": result.p("ttft", 50) * 1000,
        "total_p50_ms": result.p("total", 50) * 1000,
        "total_p99_ms": result.p("total", 99) * 1000,
        "spread_p50_ms": result.p("spread", 50) * 1000,
        "errors": result.errors,
        # CPU covers warm-up and tail too, so divide by every completed request.
        "cpu_ms_per_req": (cpu_s / done * 1000 if done else float("nan"))
        if cpu_s is not None
        else float("nan"),
    }


def median_of(runs: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


async def bench(args: argparse.Namespace) -> list[dict[str, Any]]:
    duration = args.duration
    records: list[dict[str, Any]] = []
    with processes(args) as ports:
        await wait_ready(f"http://127.0.0.1:{ports['p']}/health")
        await wait_ready(f"http://127.0.0.1:{ports['d']}/health")
        for port in ports["sidecars"].values():
            await wait_ready(f"http://127.0.0.1:{port}/ready")
        if "r" in ports:
            await wait_ready(f"http://127.0.0.1:{ports['r']}/health")
        for scenario in SCENARIOS:
            if args.only and args.only not in scenario.label:
                continue
            prompt = make_prompt(scenario.prompt_bytes)
            runs: dict[str, list[dict[str, float]]] = {}
            for _ in range(args.reps):
                for name, client in peers(ports, prompt, scenario.stream).items():
                    pid = ports["pids"].get(name)
                    before = cpu_seconds(pid) if pid else 0.0
                    result = await run_closed_loop(
                        client,
                        concurrency=scenario.concurrency,
                        duration=duration,
                        warmup=args.warmup,
                    )
                    spent = cpu_seconds(pid) - before if pid else None
                    runs.setdefault(name, []).append(summary(result, spent))
            medians = {name: median_of(each) for name, each in runs.items()}
            records.append({"scenario": scenario.label, **medians})
            print_scenario(scenario, medians)
    return records


def print_scenario(scenario: Scenario, medians: dict[str, dict[str, float]]) -> None:
    base = medians["two-leg"]
    print(f"\n== {scenario.label} (medians)")
    print(
        f"{'peer':<16}{'req/s':>9}{'x 2-leg':>9}{'cpu ms/req':>11}{'p50 ms':>8}"
        f"{'+p50 ms':>9}{'p99 ms':>8}{'spread50':>9}{'err':>5}"
    )
    for name, m in medians.items():
        print(
            f"{name:<16}{m['rps']:9.1f}{m['rps'] / base['rps']:9.2f}{m['cpu_ms_per_req']:11.3f}"
            f"{m['total_p50_ms']:8.2f}{m['total_p50_ms'] - base['total_p50_ms']:+9.2f}"
            f"{m['total_p99_ms']:8.2f}{m['spread_p50_ms']:9.2f}{int(m['errors']):5d}"
        )
    router = medians.get("vllm-router")
    if router is not None:
        ratios = ", ".join(
            f"{name} {m['cpu_ms_per_req'] / router['cpu_ms_per_req']:.2f}x"
            for name, m in medians.items()
            if name not in ("two-leg", "vllm-router")
        )
        print(f"CPU per request against vllm-router's: {ratios}")


def markdown(records: list[dict[str, Any]]) -> str:
    proxies = [name for name in records[0] if name not in ("scenario", "two-leg")]
    lines = [
        "| scenario | "
        + " | ".join(f"{p}: x two-leg / CPU ms per request" for p in proxies)
        + " |",
        "|---|" + "---|" * len(proxies),
    ]
    for record in records:
        base = record["two-leg"]
        cells = []
        for name in proxies:
            m = record[name]
            cell = f"{m['rps'] / base['rps']:.2f} / {m['cpu_ms_per_req']:.3f}"
            if record["scenario"].endswith("c=1"):
                cell += f" ({m['total_p50_ms'] - base['total_p50_ms']:+.2f} ms p50)"
            cells.append(cell)
        lines.append(f"| {record['scenario']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", choices=("fake", "sim"), default="fake")
    parser.add_argument("--duration", type=float, default=4.0, help="seconds per cell")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds before each cell")
    parser.add_argument("--reps", type=int, default=3, help="interleaved repetitions")
    parser.add_argument(
        "--workers",
        type=lambda text: [int(n) for n in text.split(",")],
        default=[1],
        help="pd-sidecar --workers; a comma list measures each (e.g. 1,2)",
    )
    parser.add_argument("--no-router", action="store_true", help="skip vllm-router")
    parser.add_argument(
        "--baseline-src",
        type=Path,
        help="also measure the sidecar package found in this directory (pd-sidecar@base)",
    )
    parser.add_argument("--only", default="", help="run the scenarios whose label has this")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    try:
        import uvloop
    except ImportError:
        records = asyncio.run(bench(args))
    else:
        records = uvloop.run(bench(args))
    if records:
        print("\n" + markdown(records))
    if args.json:
        args.json.write_text(json.dumps(records, indent=2))


if __name__ == "__main__":
    main()
