"""Every routing-benchmark configuration is an EndpointPickerConfig the EPP loads."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from benchmarks.routing_bench import CONFIGS, epp_config
from epp.config import load_config
from epp.plugins.prefill_backlog_scorer import PrefillBacklogScorer


@pytest.mark.parametrize("name", CONFIGS)
def test_configuration_loads(name: str, tmp_path: Path) -> None:
    endpoints = tmp_path / "endpoints.yaml"
    endpoints.write_text("endpoints: []\n")
    loaded = load_config(yaml.safe_dump(epp_config(name, endpoints, kv_events_port=5557)))
    scorers = [
        ws.scorer for profile in loaded.scheduler.profiles.values() for ws in profile.scorers
    ]
    uses_backlog = any(isinstance(s, PrefillBacklogScorer) for s in scorers)
    assert uses_backlog == ("backlog" in name)
    if "backlog" in name:
        # The backlog is charged and released by the scheduler's trackers.
        assert any(isinstance(t, PrefillBacklogScorer) for t in loaded.scheduler.trackers)
