"""Process-level Prometheus series every server of this project exports."""

from __future__ import annotations

import asyncio

from prometheus_client import CollectorRegistry, Gauge

__all__ = ["register_asyncio_tasks"]


def _asyncio_tasks() -> float:
    try:
        return float(len(asyncio.all_tasks()))
    except RuntimeError:  # scraped outside the serving loop (tests collecting directly)
        return 0.0


def register_asyncio_tasks(registry: CollectorRegistry) -> None:
    """``python_asyncio_tasks``: live tasks in the serving loop, the analogue of Go's
    ``go_goroutines``; a count that keeps growing under steady load is a leak."""
    Gauge(
        "python_asyncio_tasks", "Asyncio tasks alive in the serving event loop.", registry=registry
    ).set_function(_asyncio_tasks)
