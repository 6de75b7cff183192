"""The dataLayer section: sources wired to extractors, checked when the config loads."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.tls import self_signed
from epp.config import ConfigError, load_config
from epp.datalayer.dcgm import DcgmDataSource, DcgmExtractor
from epp.datalayer.metrics_source import CoreMetricsExtractor, MetricsDataSource
from epp.datalayer.notifications import EndpointNotificationSource
from epp.plugins import create_plugin
from epp.plugins.endpoint_attribute import EndpointAttributeFilter

LLM_D = Path(__file__).resolve().parents[2] / ".." / "shared" / "llm-d" / "configs"

HEAD = "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\n"
PROFILE = """
schedulingProfiles:
- name: default
  plugins: [{pluginRef: decode-filter}]
"""


def _config(plugins: str, data_layer: str = "") -> str:
    return f"{HEAD}plugins:\n- type: decode-filter\n{plugins}{data_layer}{PROFILE}"


def test_llm_d_gpu_config_wires_the_dcgm_pipeline() -> None:
    cfg = load_config(config_file=str(LLM_D / "llm-d-router" / "sim-epp-gpu-config.yaml"))
    source = cfg.plugins.get("dcgm-source")
    assert isinstance(source, DcgmDataSource)
    assert source.params.port == 9400
    assert source.params.interval == 1.0
    assert [e.name for e in source.extractors] == ["dcgm-extractor"]
    assert isinstance(source.extractors[0], DcgmExtractor)
    gpu_filter = cfg.plugins.get("gpu-utilization-filter")
    assert isinstance(gpu_filter, EndpointAttributeFilter)
    assert gpu_filter.key == ("GPUUtilization", "dcgm-extractor")
    assert [f.name for f in cfg.scheduler.profiles["default"].filters] == [
        "decode-filter",
        "gpu-utilization-filter",
    ]


DCGM = """- type: dcgm-data-source
  name: dcgm
- type: dcgm-extractor
"""


@pytest.mark.parametrize(
    ("plugins", "data_layer", "message"),
    [
        (
            DCGM,
            "",
            "data source 'dcgm' .* is not listed in dataLayer.sources",
        ),
        (
            DCGM,
            "dataLayer:\n  sources:\n  - pluginRef: dcgm\n",
            "extractor 'dcgm-extractor' .* is not listed under any",
        ),
        (
            DCGM + "- type: models-data-extractor\n",
            "dataLayer:\n  sources:\n  - pluginRef: dcgm\n    extractors: [{pluginRef: dcgm-extractor}, {pluginRef: models-data-extractor}]\n",
            r"dataLayer.sources\[0\].extractors\[1\]: plugin 'models-data-extractor' .* cannot extract from 'dcgm'",
        ),
        (
            DCGM,
            "dataLayer:\n  sources:\n  - pluginRef: dcgm\n    extractors: [{pluginRef: nope}]\n",
            r"dataLayer.sources\[0\].extractors\[0\].pluginRef: 'nope' names no plugin",
        ),
        (
            DCGM,
            "dataLayer:\n  sources:\n  - pluginRef: decode-filter\n",
            r"dataLayer.sources\[0\].pluginRef: 'decode-filter' .* is not a data source",
        ),
        (
            DCGM,
            "dataLayer:\n  sources:\n  - pluginRef: dcgm\n    extractors: [{pluginRef: dcgm-extractor}, {pluginRef: dcgm-extractor}]\n",
            "listed twice",
        ),
        (
            "- type: endpoint-notification-source\n- type: dcgm-extractor\n",
            "dataLayer:\n  sources:\n  - pluginRef: endpoint-notification-source\n    extractors: [{pluginRef: dcgm-extractor}]\n",
            "reads a polled payload",
        ),
        ("", "dataLayer:\n  peerDiscovery: {pluginRef: x}\n", "dataLayer.peerDiscovery"),
        ("", "dataLayer:\n  crossReplicaSyncerPluginRef: x\n", "crossReplicaSyncerPluginRef"),
        ("", "dataLayer:\n  injectDefaults: false\n", "dataLayer.injectDefaults"),
        ("", "dataLayer:\n  sources: [{pluginRef: x, extra: 1}]\n", r"sources.0.extra"),
        ("", "dataLayer: {}\ndata: {}\n", "only one of 'dataLayer' and its older name 'data'"),
        (
            "- type: metrics-data-source\n- type: metrics-data-source\n  name: second\n",
            "",
            "one metrics-data-source at most",
        ),
    ],
)
def test_wiring_errors_name_the_field(plugins: str, data_layer: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(_config(plugins, data_layer))


def test_older_data_section_and_event_extractors() -> None:
    text = _config(
        "- type: endpoint-notification-source\n- type: approx-prefix-cache-producer\n",
        "data:\n  sources:\n  - pluginRef: endpoint-notification-source\n"
        "    extractors: [{pluginRef: approx-prefix-cache-producer}]\n",
    )
    cfg = load_config(text)
    source = cfg.plugins.get("endpoint-notification-source")
    assert isinstance(source, EndpointNotificationSource)
    assert [e.name for e in source.extractors] == ["approx-prefix-cache-producer"]


def test_metrics_source_and_core_extractor_wire_themselves_as_in_llm_d() -> None:
    cfg = load_config(_config("- type: metrics-data-source\n- type: core-metrics-extractor\n"))
    source = cfg.plugins.get("metrics-data-source")
    assert isinstance(source, MetricsDataSource)
    assert [e.name for e in source.extractors] == ["core-metrics-extractor"]
    # A core extractor alone (for its custom metrics) gets the default source.
    alone = load_config(_config("- type: core-metrics-extractor\n"))
    implicit = alone.plugins.get("metrics-data-source")
    assert isinstance(implicit, MetricsDataSource)
    assert isinstance(implicit.extractors[0], CoreMetricsExtractor)
    # injectDefaults: false is fine when a metrics source configures the scrape.
    load_config(_config("- type: metrics-data-source\n", "dataLayer:\n  injectDefaults: false\n"))


def test_core_metrics_extractor_parameters() -> None:
    ok = create_plugin(
        "core-metrics-extractor",
        None,
        {
            "engineConfigs": [
                {
                    "name": "vllm",
                    "queuedRequestsSpec": "vllm:num_requests_waiting",
                    "customMetrics": [
                        {
                            "attributeKey": "custom.queue_depth",
                            "metricSpec": "custom_queue_depth{tier=gold}",
                        }
                    ],
                }
            ]
        },
    )
    assert isinstance(ok, CoreMetricsExtractor)
    assert ok.reads_page
    for params, message in (
        (
            {"engineConfigs": [{"name": "vllm", "queuedRequestsSpec": "my_queue"}]},
            "queuedRequestsSpec 'my_queue': the standard signals are read under their built-in names",
        ),
        (
            {"engineConfigs": [{"name": "my-engine", "kvUsageSpec": "cache_util"}]},
            "kvUsageSpec 'cache_util'",
        ),
        ({"engineLabelKey": "example.com/engine"}, "engine_label_key|engineLabelKey"),
        ({"defaultEngine": "sglang"}, "unlabelled pods are read as vLLM"),
        (
            {
                "engineConfigs": [
                    {
                        "name": "vllm",
                        "customMetrics": [{"attributeKey": "a", "metricSpec": "bad spec{"}],
                    }
                ]
            },
            "not a valid metric specification",
        ),
        ({"engineConfigs": [{"name": "x"}, {"name": "x"}]}, "configured twice"),
    ):
        with pytest.raises(ValueError, match=message):
            create_plugin("core-metrics-extractor", None, params)


def test_http_source_parameters(tmp_path: Path) -> None:
    for type_name in ("metrics-data-source", "dcgm-data-source", "models-data-source"):
        for params, message in (
            ({"scheme": "ftp"}, "scheme"),
            ({"path": "metrics"}, "path must start with '/'"),
            ({"interval": "soon"}, "not a duration"),
            ({"clientCertPath": "/a.crt"}, "clientCertPath and clientKeyPath must be set together"),
            (
                {
                    "scheme": "https",
                    "insecureSkipVerify": False,
                    "caCertPath": str(tmp_path / "none.pem"),
                },
                "caCertPath",
            ),
        ):
            with pytest.raises(ValueError, match=message):
                create_plugin(type_name, None, params)
    with pytest.raises(ValueError, match="port"):
        create_plugin("dcgm-data-source", None, {"port": 70000})
    pair = self_signed()
    (tmp_path / "ca.pem").write_bytes(pair.cert_pem)
    source = create_plugin(
        "metrics-data-source",
        None,
        {"scheme": "https", "insecureSkipVerify": False, "caCertPath": str(tmp_path / "ca.pem")},
    )
    assert isinstance(source, MetricsDataSource)
    assert source.ssl is not None
