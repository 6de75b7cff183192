"""``--workers N``: N processes serving the same ports (SO_REUSEPORT), one metrics endpoint.

The first process binds the ports (any free one when ``--port`` is 0) with SO_REUSEPORT
and then starts N-1 workers (spawned, so no event loop crosses a fork) that bind the very
same ports; the kernel spreads new connections over them. Each worker serves its own
metrics on an ephemeral loopback port and reports it back; the first process's
``--metrics-port`` answers with the sum of every process's series (``_created``
timestamps take the earliest), so a scrape sees one sidecar.

The workers stop with the first process: it sends them SIGTERM and each drains like a
single sidecar does.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import multiprocessing.connection
import signal
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess

import aiohttp
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from sidecar.log import configure_logging, log
from sidecar.settings import Settings

__all__ = ["WorkerError", "Workers", "merge_exposition"]

_READY_TIMEOUT_S = 60.0
_SCRAPE_TIMEOUT_S = 5.0


class WorkerError(Exception):
    """A worker process failed to start."""


def merge_exposition(texts: Iterable[str]) -> list[Metric]:
    """Sum the series of several Prometheus text expositions (earliest ``_created``)."""
    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(
                    family.name, family.documentation, family.type, family.unit
                )
                values[family.name] = {}
            into = values[family.name]
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                if key not in into:
                    into[key] = sample.value
                elif sample.name.endswith("_created"):
                    into[key] = min(into[key], sample.value)
                else:
                    into[key] += sample.value
    for name, merged in families.items():
        for (sample_name, labels), value in values[name].items():
            merged.add_sample(sample_name, dict(labels), value)
    return list(families.values())


class _Merged:
    """A collector yielding already merged families (for ``generate_latest``)."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        yield from self._families


@dataclass
class Workers:
    """The extra worker processes of one sidecar and their metrics ports."""

    processes: list[BaseProcess] = field(default_factory=list)
    metrics_ports: list[int] = field(default_factory=list)

    @classmethod
    async def spawn(cls, settings: Settings, ports: Sequence[int]) -> Workers:
        """Start ``settings.workers - 1`` workers on ``ports`` (one per rank, as bound)."""
        context = multiprocessing.get_context("spawn")
        workers = cls()
        pipes: list[multiprocessing.connection.Connection] = []
        for index in range(1, settings.workers):
            parent_end, child_end = context.Pipe(duplex=False)
            process = context.Process(
                target=_worker_main,
                args=(settings, tuple(ports), index, child_end),
                name=f"pd-sidecar-worker-{index}",
                daemon=True,
            )
            process.start()
            child_end.close()
            workers.processes.append(process)
            pipes.append(parent_end)
        try:
            for pipe in pipes:
                ready = await asyncio.to_thread(pipe.poll, _READY_TIMEOUT_S)
                message = pipe.recv() if ready else None
                if not isinstance(message, int):
                    raise WorkerError(f"a worker did not start: {message or 'no answer'}")
                workers.metrics_ports.append(message)
        except BaseException:
            await workers.stop(5.0)
            raise
        finally:
            for pipe in pipes:
                pipe.close()
        return workers

    async def scrape(self, session: aiohttp.ClientSession) -> list[str]:
        """Every worker's metrics text (a worker that does not answer is left out)."""

        async def one(port: int) -> str:
            try:
                async with session.get(
                    f"http://127.0.0.1:{port}/metrics",
                    timeout=aiohttp.ClientTimeout(total=_SCRAPE_TIMEOUT_S),
                ) as response:
                    return await response.text()
            except (aiohttp.ClientError, TimeoutError) as exc:
                log.warning(
                    {"event": "worker_metrics_unavailable", "port": port, "error": repr(exc)}
                )
                return ""

        return list(await asyncio.gather(*(one(port) for port in self.metrics_ports)))

    async def stop(self, grace_s: float) -> None:
        """SIGTERM every worker (each drains), then wait for them; kill what outlives it."""
        for process in self.processes:
            if process.is_alive() and process.pid is not None:
                process.terminate()
        for process in self.processes:
            await asyncio.to_thread(process.join, grace_s)
            if process.is_alive():
                process.kill()
                await asyncio.to_thread(process.join, 5.0)


def merged_collector(texts: Iterable[str]) -> _Merged:
    return _Merged(merge_exposition(texts))


def _worker_main(
    settings: Settings,
    ports: tuple[int, ...],
    index: int,
    report: multiprocessing.connection.Connection,
) -> None:
    """Entry point of one worker process."""
    configure_logging(settings.effective_log_level)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the first process decides when to stop
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        runner = asyncio.run
    else:
        runner = uvloop.run
    from sidecar.app import run_worker

    try:
        runner(run_worker(settings, ports, index, report))
    except Exception as exc:
        with contextlib.suppress(OSError):
            report.send(repr(exc))
        sys.exit(2)
