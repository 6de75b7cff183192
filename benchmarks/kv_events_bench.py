"""Precise prefix routing costs: KV-event ingest rate, index memory, lookup latency.

* ingest: msgpack batches as vLLM sends them (map encoding, 32-byte hashes, 16 blocks
  of 16 tokens per BlockStored) decoded and applied to the index on one core, in
  process; and the same through a real ZeroMQ PUB/SUB pair on loopback with the EPP's
  subscriber (publisher in the same process, so both share the core).
* memory: tracemalloc growth of the index holding 1,000,000 blocks (one engine, and
  spread over 8 engines).
* lookup: block hashing (vLLM's sha256_cbor) plus the index lookup over 8 engines for a
  4 KB and a 200 KB prompt (about 4 characters per token), prompt cached on one engine.
  Tokenizing is not included (it is the engine's /tokenize round trip, or a local
  tokenizer).

Run from the repository root:  .venv/bin/python -m benchmarks.kv_events_bench
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
import tracemalloc
from pathlib import Path
from typing import Any

import msgpack

from epp.kv_events import KvBlockIndex, block_hashes, decode_batch, external_hash
from epp.kv_events.subscriber import EngineSubscriber, StreamCounters

BLOCKS_PER_EVENT = 16
BLOCK_SIZE = 16


def _payloads(n: int) -> list[bytes]:
    out = []
    for i in range(n):
        hashes = [os.urandom(32) for _ in range(BLOCKS_PER_EVENT)]
        ev = {
            "type": "BlockStored",
            "block_hashes": hashes,
            "parent_block_hash": None,
            "token_ids": list(range(i, i + BLOCKS_PER_EVENT * BLOCK_SIZE)),
            "block_size": BLOCK_SIZE,
            "lora_id": None,
            "medium": "GPU",
            "lora_name": None,
        }
        out.append(msgpack.packb([time.time(), [ev]], use_bin_type=True))
    return out


def bench_ingest(n: int) -> dict[str, float]:
    payloads = _payloads(n)
    index = KvBlockIndex(10_000_000)
    t0 = time.process_time()
    for p in payloads:
        index.apply("e", decode_batch(p).events)
    cpu = time.process_time() - t0
    return {"events_per_cpu_s": n / cpu, "blocks_per_cpu_s": n * BLOCKS_PER_EVENT / cpu}


async def bench_zmq(n: int) -> dict[str, float]:
    import zmq
    import zmq.asyncio

    payloads = _payloads(n)
    ctx = zmq.asyncio.Context()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.SNDHWM, 0)
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    index = KvBlockIndex(10_000_000)
    counters = StreamCounters()
    sub = EngineSubscriber(ctx, "e", f"tcp://127.0.0.1:{port}", None, b"", index, counters)
    sub_sock = ctx.socket(zmq.SUB)
    sub_sock.setsockopt(zmq.SUBSCRIBE, b"")
    sub_sock.setsockopt(zmq.RCVHWM, 0)
    sub_sock.connect(f"tcp://127.0.0.1:{port}")
    # Wait for the connection with probe messages, then measure.
    while True:
        await pub.send_multipart([b"probe", b"\0" * 8, b""])
        try:
            await asyncio.wait_for(sub_sock.recv_multipart(), 0.05)
            break
        except TimeoutError:
            continue
    while await sub_sock.poll(10):
        await sub_sock.recv_multipart()
    t0 = time.perf_counter()
    c0 = time.process_time()

    async def produce() -> None:
        for seq, p in enumerate(payloads):
            await pub.send_multipart([b"kv@e@m", seq.to_bytes(8, "big"), p])

    async def consume() -> None:
        for _ in range(n):
            await sub.on_message(await sub_sock.recv_multipart())

    await asyncio.gather(produce(), consume())
    wall = time.perf_counter() - t0
    cpu = time.process_time() - c0
    sub_sock.close(0)
    pub.close(0)
    ctx.term()
    if counters.gaps or counters.events != n:
        raise RuntimeError(f"lost events: {counters}")
    return {"events_per_s": n / wall, "events_per_cpu_s_incl_publisher": n / cpu}


def bench_memory(blocks: int) -> dict[str, float]:
    out: dict[str, float] = {}
    for engines in (1, 8):
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        index = KvBlockIndex(blocks)
        per = blocks // engines
        h = 1 << 40
        for e in range(engines):
            name = f"10.0.0.{e}:8000"
            for start in range(0, per, 1000):
                index.store(name, range(h + start, h + min(start + 1000, per)))
            h += per
        used = tracemalloc.get_traced_memory()[0] - before
        tracemalloc.stop()
        assert index.total_blocks() == engines * per
        out[f"mib_per_million_blocks_{engines}_engines"] = used / 2**20 * 1_000_000 / blocks
        del index
    return out


def bench_lookup(prompt_bytes: int, rounds: int) -> dict[str, float]:
    tokens = [(i * 7919) % 50000 for i in range(prompt_bytes // 4)]
    index = KvBlockIndex(1_000_000)
    keys = [external_hash(h) for h in block_hashes(tokens, BLOCK_SIZE, max_blocks=4096)]
    engines = [f"10.0.0.{i}:8000" for i in range(8)]
    index.store(engines[0], keys)
    for e in engines[1:]:
        index.store(e, keys[:3])
    samples = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        ks = [external_hash(h) for h in block_hashes(tokens, BLOCK_SIZE, max_blocks=4096)]
        matched = index.match(ks, engines)
        samples.append(time.perf_counter() - t0)
    assert matched[engines[0]] == len(keys)
    samples.sort()
    return {
        "tokens": len(tokens),
        "blocks": len(keys),
        "p50_ms": statistics.median(samples) * 1000,
        "p99_ms": samples[int(len(samples) * 0.99) - 1] * 1000,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=20_000)
    ap.add_argument("--blocks", type=int, default=1_000_000)
    ap.add_argument("--rounds", type=int, default=200)
    args = ap.parse_args()
    results: dict[str, Any] = {
        "ingest_in_process": bench_ingest(args.events),
        "ingest_zmq": asyncio.run(bench_zmq(args.events)),
        "memory": bench_memory(args.blocks),
        "lookup_4kb": bench_lookup(4 * 1024, args.rounds),
        "lookup_200kb": bench_lookup(200 * 1024, max(20, args.rounds // 10)),
    }
    text = json.dumps(results, indent=2)
    print(text)
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    (out / f"kv_events_bench-{stamp}.json").write_text(text + "\n")


if __name__ == "__main__":
    main()
