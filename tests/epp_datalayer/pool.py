"""A Director over file-discovered endpoints with any labels, for data-layer tests."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from epp.director import Director, DirectorSettings, build_director
from epp.metrics import EppMetrics

HEAD = "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\n"


def write_pods(path: Path, pods: list[dict[str, Any]]) -> None:
    """Each pod: name, address, port, labels (the llm-d endpoints file)."""
    entries = [
        {
            "name": pod["name"],
            "namespace": "default",
            "address": pod.get("address", "127.0.0.1"),
            "port": str(pod["port"]),
            "labels": pod.get("labels", {}),
        }
        for pod in pods
    ]
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump({"endpoints": entries}))
    tmp.replace(path)


def with_discovery(config: str, endpoints_file: Path) -> str:
    """``config`` (a whole EndpointPickerConfig) with a watched file-discovery plugin."""
    head, _, rest = config.partition("plugins:\n")
    disc = (
        "- type: file-discovery\n"
        f"  parameters: {{path: '{endpoints_file}', watchFile: true, watchIntervalSeconds: 0.02}}\n"
    )
    return f"{head}plugins:\n{disc}{rest}"


StartDirector = Callable[..., Awaitable[Director]]


@pytest.fixture
async def start_director(tmp_path: Path) -> AsyncIterator[StartDirector]:
    """``director = await start_director(config_text, pods)``; stopped at teardown."""
    started: list[Director] = []

    async def start(config: str, pods: list[dict[str, Any]], **settings: Any) -> Director:
        endpoints = tmp_path / f"endpoints-{len(started)}.yaml"
        write_pods(endpoints, pods)
        settings.setdefault("refresh_metrics_interval_s", 0.02)
        director = await build_director(
            DirectorSettings(config_text=with_discovery(config, endpoints), **settings),
            EppMetrics(),
        )
        started.append(director)
        await director.start()
        return director

    try:
        yield start
    finally:
        for director in reversed(started):
            await director.stop()
