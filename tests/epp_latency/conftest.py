"""Fixtures of the latency tests: the predictor stand-in on 127.0.0.1 and a loader of
configurations with predicted-latency-producer pointed at it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from epp.config import SchedulerConfig, load_config
from epp.plugins.predicted_latency import PredictedLatencyProducer

from .predictor_server import PredictorServer

CONFIG = """\
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: predicted-latency-producer
  parameters: {params}
- type: queue-scorer
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins: [{{pluginRef: queue-scorer}}, {{pluginRef: max-score-picker}}]
"""

Loader = Callable[..., tuple[SchedulerConfig, PredictedLatencyProducer]]


@pytest.fixture
async def server() -> AsyncIterator[PredictorServer]:
    s = PredictorServer()
    await s.start()
    yield s
    await s.stop()


@pytest.fixture
async def loader(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Loader]:
    made: list[PredictedLatencyProducer] = []

    def load(url: str, params: str = "{}", timeout_s: int | None = None) -> Any:
        monkeypatch.setenv("PREDICTION_SERVER_URL", url)
        monkeypatch.setenv("TRAINING_SERVER_URL", url)
        if timeout_s is not None:
            monkeypatch.setenv("LATENCY_HTTP_TIMEOUT_SEC", str(timeout_s))
        c = load_config(CONFIG.format(params=params))
        producer = c.plugins.get("predicted-latency-producer")
        assert isinstance(producer, PredictedLatencyProducer)
        made.append(producer)
        return c, producer

    yield load
    for producer in made:
        await producer.aclose()
