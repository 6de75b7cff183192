"""llm-d's deprecated plugin types: by-label, by-label-selector, disagg-headers-handler."""

from __future__ import annotations

import pytest

from epp.config import ConfigError, load_config
from epp.plugins import create_plugin
from epp.plugins.deprecated_aliases import ByLabelFilter, ByLabelSelectorFilter

from .helpers import cycle, endpoint


def test_by_label_keeps_valid_values_and_optionally_unlabelled(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level("WARNING"):
        f = create_plugin("by-label", "gpu", {"label": "gpu.type", "validValues": ["a100", "h100"]})
    assert "type 'by-label' is deprecated" in caplog.text
    assert isinstance(f, ByLabelFilter)
    a100 = endpoint("a", 1, labels={"gpu.type": "a100"})
    l4 = endpoint("b", 2, labels={"gpu.type": "l4"})
    none = endpoint("c", 3)
    assert f.filter(cycle(), [a100, l4, none]) == [a100]
    g = create_plugin("by-label", None, {"label": "gpu.type", "allowsNoLabel": True})
    assert isinstance(g, ByLabelFilter)
    assert g.filter(cycle(), [a100, l4, none]) == [none]
    with pytest.raises(ValueError, match="validValues must be non-empty"):
        create_plugin("by-label", None, {"label": "gpu.type"})
    with pytest.raises(ValueError, match="label"):
        create_plugin("by-label", None, {"validValues": ["x"]})


def test_by_label_selector_is_label_selector_filter() -> None:
    f = create_plugin(
        "by-label-selector",
        None,
        {
            "matchLabels": {"hardware-type": "H100"},
            "matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}],
        },
    )
    assert isinstance(f, ByLabelSelectorFilter)
    match = endpoint("a", 1, labels={"hardware-type": "H100", "zone": "a"})
    other = endpoint("b", 2, labels={"hardware-type": "H100", "zone": "b"})
    assert f.filter(cycle(), [match, other]) == [match]


PD = """
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: prefill-filter
- type: decode-filter
- type: {headers}
  parameters: {params}
- type: disagg-profile-handler
  parameters:
    profiles: {{decode: d, prefill: p}}
schedulingProfiles:
- name: d
  plugins: [{{pluginRef: decode-filter}}]
- name: p
  plugins: [{{pluginRef: prefill-filter}}]
"""


@pytest.mark.parametrize("headers", ["disagg-headers-handler", "prefill-header-handler"])
def test_headers_handler_profile_names_must_be_the_profile_handlers(headers: str) -> None:
    cfg = load_config(PD.format(headers=headers, params="{prefillProfile: p}"))
    assert cfg.plugins.get(headers) is not None
    with pytest.raises(ConfigError, match="prefillProfile: 'prefill' differs"):
        load_config(PD.format(headers=headers, params="{}"))
    with pytest.raises(ConfigError, match="Extra inputs"):
        load_config(PD.format(headers=headers, params="{prefill: p}"))
