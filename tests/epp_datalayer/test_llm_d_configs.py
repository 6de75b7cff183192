"""Every llm-d config in ../shared/llm-d/configs that names a plugin type of the data
layer or of the catalogue added here: those plugins accept the file's parameters with
their meaning, and the file's dataLayer section wires."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from epp.config import ConfigError, load_config
from epp.datalayer.base import DataSource
from epp.datalayer.wiring import wire_data_layer
from epp.plugins import Plugin, PluginSet, create_plugin, lookup

CONFIGS = sorted(
    (Path(__file__).resolve().parents[2] / ".." / "shared" / "llm-d" / "configs").glob("*/*.yaml")
)

TYPES = {
    "topology-extractor",
    "topology-affinity-filter",
    "topology-affinity-scorer",
    "dcgm-data-source",
    "dcgm-extractor",
    "endpoint-attribute-filter",
    "endpoint-attribute-scorer",
    "models-data-source",
    "models-data-extractor",
    "metrics-data-source",
    "core-metrics-extractor",
    "endpoint-notification-source",
    "lora-affinity-scorer",
    "running-requests-size-scorer",
    "token-load-scorer",
    "inflight-load-producer",
    "session-affinity-filter",
    "session-id-producer",
    "utilization-filter",
    "header-label-affinity-scorer",
    "by-label",
    "by-label-selector",
    "disagg-headers-handler",
    "prefill-header-handler",
}


def _doc(path: Path) -> dict[str, Any]:
    doc = yaml.safe_load(path.read_text())
    assert isinstance(doc, dict)
    return doc


def _ours(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in doc.get("plugins") or [] if p["type"] in TYPES]


USING = [p for p in CONFIGS if _ours(_doc(p))]


def test_the_reference_configs_are_there() -> None:
    assert len(CONFIGS) == 32
    names = {f"{p.parent.name}/{p.name}" for p in USING}
    assert {
        "llm-d-router/sim-epp-gpu-config.yaml",
        "llm-d-router/pd-topology-epp-config.yaml",
        "llm-d-router/epp-mm-embeddings-cache-config.yaml",
        "llm-d-router/epp-precise-prefix-cache-config.yaml",
        "llm-d-inference-scheduler/epp-precise-prefix-cache-config.yaml",
    } <= names


@pytest.mark.parametrize("path", USING, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_plugins_accept_the_files_parameters(path: Path) -> None:
    for spec in _ours(_doc(path)):
        plugin = create_plugin(spec["type"], spec.get("name"), spec.get("parameters"))
        assert plugin.type_name == spec["type"]


class _StandIn(Plugin):
    """A plugin of a type this test does not build (another module's), by name only."""

    type_name = "stand-in"


@pytest.mark.parametrize("path", USING, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_the_files_data_layer_section_wires(path: Path) -> None:
    doc = _doc(path)
    plugins = PluginSet()
    for spec in doc["plugins"]:
        name = spec.get("name") or spec["type"]
        if spec["type"] in TYPES:
            plugins.add(create_plugin(spec["type"], name, spec.get("parameters")))
        else:
            plugins.add(_StandIn(name=name))
    wired = wire_data_layer(doc.get("dataLayer"), doc.get("data"), plugins)
    for entry in (doc.get("dataLayer") or {}).get("sources", []):
        source = plugins.get(entry["pluginRef"])
        assert isinstance(source, DataSource)
        assert source in wired
        assert [e.name for e in source.extractors] == [x["pluginRef"] for x in entry["extractors"]]


@pytest.mark.parametrize("path", USING, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_the_file_loads_or_stops_on_another_modules_plugin(path: Path) -> None:
    """Whole-file loading: succeeds, or fails on a plugin type or parameter outside
    this list (those are implemented elsewhere)."""
    try:
        load_config(config_file=str(path))
    except ConfigError as exc:
        message = str(exc)
        assert message.startswith("plugins["), message
        failed_type = message.split("(type '", 1)[1].split("'", 1)[0]
        assert failed_type not in TYPES, message
        assert lookup(failed_type) is None or "parameters" in message, message
