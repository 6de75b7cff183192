"""Data-parallel fixtures: the sidecar fixtures, and engines on contiguous ports."""

from __future__ import annotations

import random
from typing import Any

from tests.sidecar.conftest import client, start_sidecar

__all__ = ["client", "contiguous", "start_sidecar"]


async def contiguous(start: Any, n: int, **kwargs: Any) -> list[Any]:
    """``n`` servers on ports base..base+n-1 (``start(port=..., **kwargs)``); retries on
    a port already taken."""
    rng = random.Random()
    for _ in range(50):
        base = rng.randrange(20000, 60000 - n)
        started: list[Any] = []
        try:
            for index in range(n):
                started.append(await start(port=base + index, **kwargs))
        except OSError:
            continue  # the fixture stops whatever did start at teardown
        return started
    raise AssertionError(f"no {n} contiguous free ports found")
