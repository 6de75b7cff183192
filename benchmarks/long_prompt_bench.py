"""In-process cost of a precise-prefix decision for very long prompts (llm-d-router #2390).

The EPP's Director with the ``precise-prefix`` configuration of ``routing_bench`` over
96 file-discovered endpoints (unreachable: their scrapes fail fast, so they are scored
as stale), each known to the KV-event index with 15,000 blocks, four of them also
holding one of four 240K-token documents. Measured, on this process's one event loop:

* ``decide``: ``Director.decide`` for a completions body of 240K token ids (1.6 MB of
  JSON), wall time and CPU time per decision. Work a decision leaves for after it is
  returned (keeping the approximate fallback warm) runs between decisions and is in
  the CPU per request, not in the decision's times.
* ``first_sight``: ``decide`` for a document no endpoint holds and no earlier decision
  hashed (its hashing after the decision finishes before the next).
* ``event``: decoding one vLLM KV-event batch holding a 15,000-block BlockStored (with
  its 240,000 token ids), with and without building the token ids.

Run from the repository root:  .venv/bin/python -m benchmarks.long_prompt_bench
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import logging
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgpack
import yaml

sys.path.insert(0, os.getcwd())  # the tree this is run from (for before/after runs)

from benchmarks.routing_bench import epp_config
from common import heap
from epp.director import DirectorSettings, build_director
from epp.kv_events import block_hashes, decode_batch, external_hash
from epp.metrics import EppMetrics
from epp.plugins.precise_prefix_producer import PrecisePrefixCacheProducer

ENDPOINTS = 96
PROMPT_TOKENS = 240_000
EVENT_BLOCKS = 15_000
BLOCK_SIZE = 16
FIRST_SIGHTS = 10


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def bench_decide(requests: int, workdir: Path, *, settle: bool = True) -> dict[str, float]:
    endpoints_file = workdir / "endpoints.yaml"
    entries = [
        {
            "name": f"e{i}",
            "namespace": "default",
            "address": "127.0.0.1",
            "port": str(1 + i),  # nothing listens: scrapes are refused at once
            "labels": {"llm-d.ai/role": "decode"},
        }
        for i in range(ENDPOINTS)
    ]
    endpoints_file.write_text(yaml.safe_dump({"endpoints": entries}))
    config = epp_config("precise-prefix", endpoints_file, kv_events_port=1)
    settings = DirectorSettings(
        config_text=yaml.safe_dump(config),
        refresh_metrics_interval_s=1.0,
        metrics_staleness_threshold_s=2.0,
    )
    director = await build_director(settings, EppMetrics())
    producer = next(p for p in director.config.plugins if isinstance(p, PrecisePrefixCacheProducer))
    await director.start()
    if settle:
        heap.settle()  # as the EPP process does once started
    try:
        for _ in range(200):
            if len(director.datastore) == ENDPOINTS:
                break
            await asyncio.sleep(0.05)
        keys = [ep.key for ep in director.datastore.snapshot()]
        rng = random.Random(3)
        docs = [[rng.randrange(150_000) for _ in range(PROMPT_TOKENS)] for _ in range(4)]
        for key in keys:
            producer.index.store(key, [rng.getrandbits(64) for _ in range(EVENT_BLOCKS)])
        for key, doc in zip(keys, docs, strict=False):
            hashes = block_hashes(doc, BLOCK_SIZE, max_blocks=8192)
            producer.index.store(key, [external_hash(h) for h in hashes])
        bodies = [
            json.dumps({"model": "m", "prompt": [*doc, 5, 6, 7], "max_tokens": 1}).encode()
            for doc in docs
        ]
        walls: list[float] = []
        cpus: list[float] = []
        for i in range(4):  # warm-up
            await director.decide("/v1/completions", {}, bodies[i], None)
        cpu0 = time.process_time()
        for i in range(requests):
            t0, c0 = time.perf_counter(), time.process_time()
            decision = await director.decide("/v1/completions", {}, bodies[i % 4], None)
            walls.append((time.perf_counter() - t0) * 1000)
            cpus.append((time.process_time() - c0) * 1000)
            decision.on_finished()
            for _ in range(16):  # what the decision left for later runs here (a long
                await asyncio.sleep(0)  # prompt's fallback warm-up takes a few turns)
        per_request = (time.process_time() - cpu0) / requests * 1000
        # First sights: documents no endpoint holds and the memo has not seen.
        firsts: list[float] = []
        for _ in range(FIRST_SIGHTS):
            doc = [rng.randrange(150_000) for _ in range(PROMPT_TOKENS)]
            body = json.dumps({"model": "m", "prompt": doc, "max_tokens": 1}).encode()
            t0 = time.perf_counter()
            decision = await director.decide("/v1/completions", {}, body, None)
            firsts.append((time.perf_counter() - t0) * 1000)
            decision.on_finished()
            await asyncio.gather(*producer._warming)  # its hashing after the decision
    finally:
        await director.stop()
    return {
        "decide_wall_p50_ms": statistics.median(walls),
        "decide_wall_p99_ms": quantile(walls, 0.99),
        "first_sight_wall_p50_ms": statistics.median(firsts),
        "first_sight_wall_max_ms": max(firsts),
        "decide_cpu_p50_ms": statistics.median(cpus),
        "decide_cpu_p99_ms": quantile(cpus, 0.99),
        "cpu_per_request_ms": per_request,
        "body_mb": len(bodies[0]) / 1e6,
    }


def bench_event(repeats: int) -> dict[str, float]:
    rng = random.Random(1)
    event = [
        "BlockStored",
        [rng.getrandbits(64) for _ in range(EVENT_BLOCKS)],
        None,
        [rng.randrange(150_000) for _ in range(EVENT_BLOCKS * BLOCK_SIZE)],
        BLOCK_SIZE,
        None,
        "GPU",
    ]
    payload = msgpack.packb([time.time(), [event]], use_bin_type=True)
    out: dict[str, float] = {"event_mb": len(payload) / 1e6}
    variants: list[tuple[str, dict[str, Any]]] = [("event_decode_ms", {})]
    if "token_ids" in inspect.signature(decode_batch).parameters:
        variants.append(("event_decode_without_token_ids_ms", {"token_ids": False}))
    for name, kwargs in variants:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            decode_batch(payload, **kwargs)
            times.append((time.perf_counter() - t0) * 1000)
        out[name] = statistics.median(times)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--event-repeats", type=int, default=15)
    parser.add_argument(
        "--no-settle",
        action="store_true",
        help="leave the garbage collector as CPython sets it (the EPP settles it once started)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    results = bench_event(args.event_repeats)
    with tempfile.TemporaryDirectory(prefix="long-prompt-bench-") as tmp:
        decide = bench_decide(args.requests, Path(tmp), settle=not args.no_settle)
        results.update(asyncio.run(decide))
    for name, value in results.items():
        print(f"{name:36s} {value:8.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
