"""Closed-loop HTTP load generator (aiohttp): N workers, each sends its next request as soon
as the previous one finished, for a fixed duration after a warm-up.

A *scenario* is an async callable that performs one logical request and returns its
:class:`Sample` (time to first token, total time, spread of the token burst).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp

__all__ = ["Result", "Sample", "Scenario", "percentile", "read_stream", "run_closed_loop"]


@dataclass(slots=True)
class Sample:
    ttft: float  # request sent -> first token (for JSON: the whole answer)
    total: float  # request sent -> response complete
    spread: float = 0.0  # first token -> last token (streams)


Scenario = Callable[[aiohttp.ClientSession], Awaitable[Sample]]


@dataclass
class Result:
    concurrency: int
    duration: float
    samples: list[Sample] = field(default_factory=list)  # completed inside the window
    errors: int = 0
    completed: int = 0  # every success, warm-up and tail included (for CPU per request)

    @property
    def rps(self) -> float:
        return len(self.samples) / self.duration if self.duration else 0.0

    def p(self, attr: str, q: float) -> float:
        return percentile(sorted(getattr(s, attr) for s in self.samples), q)


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return math.nan
    index = min(len(sorted_values) - 1, max(0, math.ceil(q / 100 * len(sorted_values)) - 1))
    return sorted_values[index]


async def read_stream(response: aiohttp.ClientResponse, started: float) -> Sample:
    """Consume an SSE body; first/last token times are those of the first/last data event."""
    first = last = None
    async for chunk in response.content.iter_any():
        now = time.perf_counter()
        if b"data:" in chunk:
            if first is None:
                first = now
            last = now
    end = time.perf_counter()
    first = first if first is not None else end
    last = last if last is not None else end
    return Sample(ttft=first - started, total=end - started, spread=last - first)


async def run_closed_loop(
    scenario: Scenario, *, concurrency: int, duration: float, warmup: float
) -> Result:
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=4.0)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        loop = asyncio.get_running_loop()
        start = loop.time()
        measure_from = start + warmup
        stop_at = measure_from + duration
        result = Result(concurrency=concurrency, duration=duration)

        async def worker() -> None:
            while loop.time() < stop_at:
                try:
                    sample = await scenario(session)
                except (aiohttp.ClientError, TimeoutError, ValueError):
                    if measure_from <= loop.time() <= stop_at:
                        result.errors += 1
                    continue
                result.completed += 1
                if measure_from <= loop.time() <= stop_at:
                    result.samples.append(sample)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return result
