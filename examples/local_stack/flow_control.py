"""``./dev stack --flow-control``: the default EPP config with flow control on, and
example InferenceObjective and InferenceModelRewrite objects (``--api-objects-file``)."""

from __future__ import annotations

from pathlib import Path

import yaml

__all__ = ["OBJECTS", "flow_control_config", "write_objects"]

OBJECTS = """\
# Priority per request: send x-llm-d-inference-objective: <name>.
apiVersion: llm-d.ai/v1alpha2
kind: InferenceObjective
metadata: {name: critical}
spec: {priority: 100, poolRef: {name: local}}
---
apiVersion: llm-d.ai/v1alpha2
kind: InferenceObjective
metadata: {name: standard}
spec: {priority: 0, poolRef: {name: local}}
---
apiVersion: llm-d.ai/v1alpha2
kind: InferenceObjective
metadata: {name: batch}
spec: {priority: -10, poolRef: {name: local}}
---
# Requests for model "chat" are served by the stack's model.
apiVersion: llm-d.ai/v1alpha2
kind: InferenceModelRewrite
metadata: {name: chat-alias}
spec:
  poolRef: {name: local}
  rules:
  - matches: [{model: {type: Exact, value: chat}}]
    targets: [{modelRewrite: MODEL}]
"""


def flow_control_config(base: str, batch: int = 256) -> str:
    """``base`` (an EndpointPickerConfig) with the flowControl gate and section."""
    config = yaml.safe_load(base)
    config["featureGates"] = ["flowControl"]
    config["plugins"] += [
        {"type": "concurrency-detector", "parameters": {"maxConcurrency": batch}},
        {"type": "round-robin-fairness-policy"},
    ]
    config["flowControl"] = {
        "defaultRequestTTL": "30s",
        "noEndpointRequestTTL": "2m",
        "defaultPriorityBand": {"fairnessPolicyRef": "round-robin-fairness-policy"},
        "defaultNegativePriorityBand": {"maxRequests": 100},
    }
    return yaml.safe_dump(config, sort_keys=False)


def write_objects(path: Path, model: str) -> Path:
    path.write_text(OBJECTS.replace("MODEL", model))
    return path
