"""Quick in-process measurement of Director.decide (not a test; not collected).

.venv/bin/python -m tests.epp_scheduling.perf_decide
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import string
import time

from epp.datastore import ROLE_LABEL, Endpoint, EndpointMetrics
from epp.director import Director, DirectorSettings, build_director
from epp.metrics import EppMetrics

CONFIG = """
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: file-discovery
  parameters: {path: /dev/null}
- type: prefill-filter
- type: decode-filter
- type: prefix-cache-scorer
- type: queue-scorer
- type: kv-cache-utilization-scorer
- type: active-request-scorer
- type: max-score-picker
- type: prefix-based-pd-decider
  parameters: {nonCachedTokens: 256}
- type: disagg-profile-handler
  parameters: {deciders: {prefill: prefix-based-pd-decider}}
schedulingProfiles:
- name: prefill
  plugins: [{pluginRef: prefill-filter}, {pluginRef: queue-scorer}]
- name: decode
  plugins:
  - {pluginRef: decode-filter}
  - {pluginRef: prefix-cache-scorer, weight: 2}
  - {pluginRef: queue-scorer}
  - {pluginRef: kv-cache-utilization-scorer}
  - {pluginRef: active-request-scorer}
"""


def populate(director: Director, n: int) -> None:
    rng = random.Random(1)
    eps = []
    for i in range(n):
        role = "prefill" if i % 4 == 0 else "decode"
        ep = Endpoint(f"pod-{i}", f"10.0.{i // 250}.{i % 250}", 8000, labels={ROLE_LABEL: role})
        ep.metrics = EndpointMetrics(
            waiting=rng.randint(0, 20), kv_usage=rng.random(), updated_at=time.monotonic() + 3600
        )
        eps.append(ep)
    director.datastore.replace_source("perf", eps)


def body(size: int, rng: random.Random) -> bytes:
    words = " ".join("".join(rng.choices(string.ascii_lowercase, k=7)) for _ in range(size // 8))
    return json.dumps({"model": "m", "messages": [{"role": "user", "content": words}]}).encode()


async def measure(n: int, size: int, iters: int, distinct: int) -> tuple[float, float]:
    director = await build_director(DirectorSettings(config_text=CONFIG), EppMetrics())
    populate(director, n)
    rng = random.Random(2)
    bodies = [body(size, rng) for _ in range(distinct)]
    samples = []
    for i in range(iters):
        b = bodies[i % len(bodies)]
        t0 = time.perf_counter()
        d = await director.decide("/v1/chat/completions", {}, b, None)
        samples.append(time.perf_counter() - t0)
        d.on_finished()
    samples.sort()
    return statistics.median(samples) * 1e3, samples[int(len(samples) * 0.99) - 1] * 1e3


async def main() -> None:
    for n in (8, 64, 256):
        for size, iters in ((4096, 2000), (200_000, 100)):
            # "new": every prompt unseen (P/D path); "repeat": 10 prompts cycled (cached).
            for label, distinct in (("new", iters), ("repeat", 10)):
                p50, p99 = await measure(n, size, iters, distinct)
                print(
                    f"endpoints={n:4d} prompt={size // 1024:4d}KB {label:6s} "
                    f"p50={p50:.3f} ms  p99={p99:.3f} ms"
                )


if __name__ == "__main__":
    asyncio.run(main())
