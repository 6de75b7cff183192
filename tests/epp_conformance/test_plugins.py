"""The conformance test plugins on their own: selection by header, the served report."""

from __future__ import annotations

import dataclasses
import json

import pytest

from epp.config import ConfigError, load_config
from epp.datastore import Endpoint
from epp.plugins.conformance import (
    SELECTION_HEADER,
    SERVED_ENDPOINT_HEADER,
    DestinationEndpointServedVerifier,
    HeaderBasedTestingFilter,
)
from epp.request import parse_request
from epp.scheduling.cycle import CycleState

BODY = json.dumps({"model": "m", "prompt": "hi"}).encode()

ENDPOINTS = [
    Endpoint("a0", "10.0.0.1", 3000),
    Endpoint("a2", "10.0.0.1", 3002),
    Endpoint("b0", "10.0.0.2", 3000),
    Endpoint("c4", "10.0.0.3", 3004),
    Endpoint("v6", "fd00::1", 3002),
]


def _cycle(headers: dict[str, str]) -> CycleState:
    return CycleState(parse_request("/v1/completions", headers, BODY), 0.0, 1.0)


def _selected(value: str | None) -> list[str]:
    headers = {} if value is None else {SELECTION_HEADER: value}
    return [ep.name for ep in HeaderBasedTestingFilter().filter(_cycle(headers), ENDPOINTS)]


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, []),
        ("", []),
        (" , ", []),
        ("10.9.9.9", []),
        ("10.0.0.1:3004", []),  # a port the address does not serve
        ("10.0.0.2", ["b0"]),
        ("10.0.0.1", ["a0", "a2"]),  # an address alone: every rank on it
        ("10.0.0.1:3002", ["a2"]),
        ("10.0.0.3:3004, 10.0.0.2", ["c4", "b0"]),  # the header's order
        ("10.0.0.1:3000,10.0.0.1", ["a0", "a2"]),  # each endpoint once
        ("[fd00::1]:3002", ["v6"]),
        ("fd00:0::1", ["v6"]),
        ("[fd00::1]:3000", []),
    ],
)
def test_the_header_names_the_candidates(header: str | None, expected: list[str]) -> None:
    assert _selected(header) == expected


@pytest.mark.parametrize(
    ("lb", "expected"),
    [
        (None, "fail: missing envoy lb metadata"),
        ({}, "fail: missing destination endpoint served metadata"),
        ({"x-gateway-destination-endpoint": "10.0.0.1:3000"},
         "fail: missing destination endpoint served metadata"),
        ({"x-gateway-destination-endpoint-served": 7},
         "fail: missing destination endpoint served metadata"),
        ({"x-gateway-destination-endpoint-served": "10.0.0.2:3000"}, "10.0.0.2:3000"),
        ({"x-gateway-destination-endpoint-served": ["10.0.0.2:3000"]}, "10.0.0.2:3000"),
    ],
)  # fmt: skip
def test_the_verifier_echoes_the_gateway_report(
    lb: dict[str, object] | None, expected: str
) -> None:
    headers = DestinationEndpointServedVerifier().response_headers(_cycle({}), lb)
    assert headers == {SERVED_ENDPOINT_HEADER: expected}


CONFIG = """\
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: header-based-testing-filter
- type: destination-endpoint-served-verifier
- type: random-picker
schedulingProfiles:
- name: default
  plugins: [{pluginRef: header-based-testing-filter}, {pluginRef: random-picker}]
"""


def test_a_configuration_wires_both_plugins() -> None:
    cfg = load_config(CONFIG)
    scheduler = cfg.scheduler
    [verifier] = scheduler.responders
    assert isinstance(verifier, DestinationEndpointServedVerifier)
    cycle = _cycle({SELECTION_HEADER: "10.0.0.3"})
    result = scheduler.schedule(cycle, ENDPOINTS)
    assert [ep.name for ep in result.targets(result.primary)] == ["c4"]
    report = {"x-gateway-destination-endpoint-served": "10.0.0.3:3004"}
    assert scheduler.response_headers(cycle, report) == {SERVED_ENDPOINT_HEADER: "10.0.0.3:3004"}


@pytest.mark.parametrize(
    "plugin", ["header-based-testing-filter", "destination-endpoint-served-verifier"]
)
def test_the_plugins_take_no_parameters(plugin: str) -> None:
    text = CONFIG.replace(f"- type: {plugin}\n", f"- type: {plugin}\n  parameters: {{header: x}}\n")
    with pytest.raises(ConfigError, match="header"):
        load_config(text)


class _Broken(DestinationEndpointServedVerifier):
    type_name = "broken-verifier-for-tests"

    def response_headers(self, cycle: CycleState, lb_metadata: object) -> dict[str, str]:  # type: ignore[override]
        raise RuntimeError("boom")


def test_a_failing_response_plugin_adds_nothing_and_spares_the_others() -> None:
    scheduler = load_config(CONFIG).scheduler
    scheduler = dataclasses.replace(
        scheduler, responders=(_Broken(name="broken"), *scheduler.responders)
    )
    report = {"x-gateway-destination-endpoint-served": "10.0.0.2:3000"}
    assert scheduler.response_headers(_cycle({}), report) == {
        SERVED_ENDPOINT_HEADER: "10.0.0.2:3000"
    }
