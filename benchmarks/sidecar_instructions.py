"""Instructions the sidecar executes per request, counted by valgrind's callgrind.

CPU time on a shared machine moves with whatever else runs on it; an instruction count
does not (the same count within 0.1% from run to run), so a change of a few percent in
the sidecar's per-request work shows in one run. The sidecar runs under callgrind in
front of the zero-cost fake engines (``_fake_engine.py``); after a warm-up the counters
are zeroed, ``--requests`` P/D requests are served (closed loop, 1 KB prompt, 16 output
tokens), and the count is dumped. What is counted is the sidecar process's user space
(Python, aiohttp, uvloop, the parsers), not the kernel's side of its system calls.
valgrind slows the process about 50x: a run takes about a minute per tree.

    python benchmarks/sidecar_instructions.py [--requests 1000] [--concurrency 8] [--stream]
    git archive <commit> sidecar common | tar -x -C /tmp/base
    python benchmarks/sidecar_instructions.py --baseline-src /tmp/base   # before/after
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
from asyncio.subprocess import PIPE
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))
from sidecar_bench import OUTPUT_TOKENS, free_port, make_prompt, wait_ready

from examples.local_stack.processes import ManagedProcess

HERE = Path(__file__).resolve().parent
# Start-up under valgrind (imports included) takes tens of seconds on a busy machine.
READY_TIMEOUT_S = 300.0


async def serve(url: str, body: bytes, prefill: str, requests: int, concurrency: int) -> None:
    """``requests`` requests over ``concurrency`` connections; every answer must be 200."""
    left = requests
    headers = {"Content-Type": "application/json", "x-prefiller-host-port": prefill}
    timeout = aiohttp.ClientTimeout(total=120)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:

        async def worker() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                async with session.post(url, data=body, headers=headers) as resp:
                    await resp.read()
                    if resp.status != 200:
                        raise RuntimeError(f"the sidecar answered {resp.status}")

        await asyncio.gather(*(worker() for _ in range(concurrency)))


async def control(action: str, pid: int) -> None:
    """``callgrind_control -z`` (zero) or ``-d`` (dump) for the process ``pid``."""
    proc = await asyncio.create_subprocess_exec(
        "callgrind_control", action, str(pid), stdout=PIPE, stderr=PIPE
    )
    _, err = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"callgrind_control {action} {pid}: {err.decode()}")


def dumped_total(outdir: Path) -> int:
    """The instruction total of the dump made after zeroing (part 1)."""
    for line in (outdir / "callgrind.out.1").read_text().splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    raise RuntimeError(f"no instruction total in {outdir / 'callgrind.out.1'}")


async def count(
    source: Path | None, args: argparse.Namespace, engine: tuple[int, int], workdir: Path
) -> float:
    """Instructions per request of the sidecar from ``source`` (None: this tree)."""
    prefill_port, decode_port = engine
    port, metrics_port = free_port(), free_port()
    outdir = Path(tempfile.mkdtemp(prefix="callgrind-", dir=workdir))
    # ``-m`` puts the working directory first on sys.path: the baseline runs from its
    # own tree, this tree from a directory without a sidecar package.
    proc = ManagedProcess(
        "sidecar-base" if source else "sidecar",
        ["valgrind", "--tool=callgrind", f"--callgrind-out-file={outdir}/callgrind.out",
         sys.executable, "-m", "sidecar", f"--port={port}", f"--metrics-port={metrics_port}",
         "--listen-host=127.0.0.1", "--secure-proxy=false",
         f"--model-server-port={decode_port}", "--log-level=warning"],
        workdir,
        env={"PYTHONPATH": str(source)} if source else None,
        cwd=source or HERE,
    )  # fmt: skip
    await proc.start()
    assert proc.pid is not None
    try:
        await wait_ready(f"http://127.0.0.1:{port}/health", READY_TIMEOUT_S)
        body = json.dumps(
            {"model": "sim-model", "prompt": make_prompt(1024),
             "max_tokens": OUTPUT_TOKENS, "stream": args.stream}
        ).encode()  # fmt: skip
        url = f"http://127.0.0.1:{port}/v1/completions"
        prefill = f"127.0.0.1:{prefill_port}"
        await serve(url, body, prefill, args.warmup, args.concurrency)
        await control("-z", proc.pid)
        await serve(url, body, prefill, args.requests, args.concurrency)
        await control("-d", proc.pid)
        return dumped_total(outdir) / args.requests
    finally:
        await proc.stop(grace_s=60)


async def run(args: argparse.Namespace) -> dict[str, float]:
    prefill_port, decode_port = free_port(), free_port()
    workdir = Path(tempfile.mkdtemp(prefix="sidecar-instructions-"))
    engine = ManagedProcess(
        "fake-engine",
        [sys.executable, str(HERE / "_fake_engine.py"), f"--prefill-port={prefill_port}",
         f"--decode-port={decode_port}", f"--output-tokens={OUTPUT_TOKENS}"],
        workdir,
    )  # fmt: skip
    await engine.start()
    try:
        await wait_ready(f"http://127.0.0.1:{prefill_port}/health")
        results = {"pd-sidecar": await count(None, args, (prefill_port, decode_port), workdir)}
        if args.baseline_src:
            results["pd-sidecar@base"] = await count(
                args.baseline_src, args, (prefill_port, decode_port), workdir
            )
        return results
    finally:
        await engine.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--stream", action="store_true", help="SSE answers instead of JSON")
    parser.add_argument("--baseline-src", type=Path, default=None,
                        help="a tree with the sidecar to compare (git archive of a commit)")  # fmt: skip
    args = parser.parse_args(argv)
    for tool in ("valgrind", "callgrind_control"):
        if shutil.which(tool) is None:
            parser.error(f"{tool} not found (Debian: apt-get install valgrind)")
    results = asyncio.run(run(args))
    shape = "SSE" if args.stream else "JSON"
    for name, per_request in results.items():
        print(f"{name}: {per_request:,.0f} instructions per request "
              f"({shape}, 1 KB prompt, concurrency {args.concurrency})")  # fmt: skip
    if "pd-sidecar@base" in results:
        ratio = results["pd-sidecar"] / results["pd-sidecar@base"]
        print(f"this tree / base: {ratio:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
