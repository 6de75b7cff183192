"""An EndpointPickerConfig with file discovery over recording backends, for the real Director."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import yaml

if TYPE_CHECKING:
    from pathlib import Path

    from tests.epp_gateway.backends import RecordingBackend

ROLE_LABEL = "llm-d.ai/role"

# Every request gets a prefill pod when one exists (always-disagg-pd-decider).
ALWAYS_DISAGG_PLUGINS = """\
- type: decode-filter
- type: prefill-filter
- type: queue-scorer
- type: max-score-picker
- type: always-disagg-pd-decider
- type: disagg-profile-handler
  parameters:
    deciders: {prefill: always-disagg-pd-decider}
schedulingProfiles:
- name: decode
  plugins: [{pluginRef: decode-filter}, {pluginRef: queue-scorer}]
- name: prefill
  plugins: [{pluginRef: prefill-filter}, {pluginRef: queue-scorer}]
"""


def always_disagg_config(endpoints_file: Path) -> str:
    return (
        "apiVersion: llm-d.ai/v1alpha1\n"
        "kind: EndpointPickerConfig\n"
        "plugins:\n"
        "- type: file-discovery\n"
        f"  parameters: {{path: '{endpoints_file}', watchFile: true, watchIntervalSeconds: 0.02}}\n"
        + ALWAYS_DISAGG_PLUGINS
    )


def write_endpoints(path: Path, pods: list[tuple[RecordingBackend, str]]) -> None:
    """Atomically (re)write the discovery file: (backend, role) pairs."""
    entries = [
        {
            "name": f"pod-{pod.name}",
            "namespace": "default",
            "address": pod.host,
            "port": str(pod.port),
            "labels": {ROLE_LABEL: role},
        }
        for pod, role in pods
    ]
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump({"endpoints": entries}))
    tmp.replace(path)


async def wait_until(cond: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Poll a condition with a deadline."""
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(0.01)
