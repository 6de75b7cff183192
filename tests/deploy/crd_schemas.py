"""JSON Schemas for the custom resources the manifests use, restricted to the fields we use.

Written from the published API references of ``inference.networking.k8s.io/v1``
(InferencePool) and ``gateway.networking.k8s.io/v1`` (Gateway, HTTPRoute): field names,
required fields, enums, patterns and bounds as those references state them. Anything
outside these fields is rejected (``additionalProperties: false``), so a misspelt or
unsupported field fails the tests instead of being silently dropped by the cluster.
"""

from __future__ import annotations

from typing import Any

__all__ = ["CRD_SCHEMAS"]

Schema = dict[str, Any]

_DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
_GROUP = r"^$|^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
_KIND = r"^[a-zA-Z]([-a-zA-Z0-9]*[a-zA-Z0-9])?$"
_LABEL_KEY = (
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9]$"
)
_LABEL_VALUE = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"
_DURATION = r"^([0-9]{1,5}(h|m|s|ms)){1,4}$"


def _obj(properties: Schema, required: tuple[str, ...] = ()) -> Schema:
    return {
        "type": "object",
        "properties": properties,
        "required": list(required),
        "additionalProperties": False,
    }


_STR = {"type": "string"}
_PORT = {"type": "integer", "minimum": 1, "maximum": 65535}
_NAME = {"type": "string", "minLength": 1, "maxLength": 253}
_LABELS = {
    "type": "object",
    "propertyNames": {"pattern": _LABEL_KEY, "maxLength": 253},
    "additionalProperties": {"type": "string", "maxLength": 63, "pattern": _LABEL_VALUE},
}
_METADATA = _obj(
    {
        "name": {"type": "string", "pattern": _DNS_LABEL, "maxLength": 63},
        "namespace": {"type": "string", "pattern": _DNS_LABEL, "maxLength": 63},
        "labels": _LABELS,
        "annotations": {"type": "object", "additionalProperties": _STR},
    },
    ("name",),
)


def _document(api_version: str, kind: str, spec: Schema) -> Schema:
    return _obj(
        {
            "apiVersion": {"const": api_version},
            "kind": {"const": kind},
            "metadata": _METADATA,
            "spec": spec,
        },
        ("apiVersion", "kind", "metadata", "spec"),
    )


_INFERENCE_POOL = _document(
    "inference.networking.k8s.io/v1",
    "InferencePool",
    _obj(
        {
            "selector": _obj(
                {"matchLabels": {**_LABELS, "minProperties": 1, "maxProperties": 64}},
                ("matchLabels",),
            ),
            "targetPorts": {
                "type": "array",
                "minItems": 1,
                "maxItems": 1,
                "items": _obj({"number": _PORT}, ("number",)),
            },
            "endpointPickerRef": _obj(
                {
                    "group": {"type": "string", "maxLength": 253, "pattern": _GROUP},
                    "kind": {"type": "string", "minLength": 1, "maxLength": 63, "pattern": _KIND},
                    "name": _NAME,
                    "port": _obj({"number": _PORT}, ("number",)),
                    "failureMode": {"enum": ["FailOpen", "FailClose"]},
                },
                ("name",),
            ),
        },
        ("selector", "targetPorts", "endpointPickerRef"),
    ),
)

_PARENT_REF = _obj(
    {
        "group": {"type": "string", "maxLength": 253, "pattern": _GROUP},
        "kind": {"type": "string", "minLength": 1, "maxLength": 63, "pattern": _KIND},
        "name": _NAME,
        "namespace": {"type": "string", "pattern": _DNS_LABEL, "maxLength": 63},
        "sectionName": {"type": "string", "pattern": _DNS_LABEL},
        "port": _PORT,
    },
    ("name",),
)

_HTTP_ROUTE = _document(
    "gateway.networking.k8s.io/v1",
    "HTTPRoute",
    _obj(
        {
            "parentRefs": {"type": "array", "maxItems": 32, "items": _PARENT_REF},
            "hostnames": {"type": "array", "maxItems": 16, "items": _STR},
            "rules": {
                "type": "array",
                "maxItems": 16,
                "items": _obj(
                    {
                        "matches": {
                            "type": "array",
                            "maxItems": 64,
                            "items": _obj(
                                {
                                    "path": _obj(
                                        {
                                            "type": {
                                                "enum": [
                                                    "Exact",
                                                    "PathPrefix",
                                                    "RegularExpression",
                                                ]
                                            },
                                            "value": {"type": "string", "maxLength": 1024},
                                        }
                                    )
                                }
                            ),
                        },
                        "backendRefs": {
                            "type": "array",
                            "maxItems": 16,
                            "items": _obj(
                                {
                                    "group": {"type": "string", "pattern": _GROUP},
                                    "kind": {"type": "string", "pattern": _KIND},
                                    "name": _NAME,
                                    "namespace": {"type": "string", "pattern": _DNS_LABEL},
                                    "port": _PORT,
                                    "weight": {"type": "integer", "minimum": 0},
                                },
                                ("name",),
                            ),
                        },
                        "timeouts": _obj(
                            {
                                "request": {"type": "string", "pattern": _DURATION},
                                "backendRequest": {"type": "string", "pattern": _DURATION},
                            }
                        ),
                    }
                ),
            },
        }
    ),
)

_GATEWAY = _document(
    "gateway.networking.k8s.io/v1",
    "Gateway",
    _obj(
        {
            "gatewayClassName": {"type": "string", "minLength": 1, "maxLength": 253},
            "listeners": {
                "type": "array",
                "minItems": 1,
                "maxItems": 64,
                "items": _obj(
                    {
                        "name": {"type": "string", "pattern": _DNS_LABEL},
                        "hostname": _STR,
                        "port": _PORT,
                        "protocol": {"enum": ["HTTP", "HTTPS", "TLS", "TCP", "UDP"]},
                    },
                    ("name", "port", "protocol"),
                ),
            },
        },
        ("gatewayClassName", "listeners"),
    ),
)

#: (apiVersion, kind) -> JSON Schema.
CRD_SCHEMAS: dict[tuple[str, str], Schema] = {
    ("inference.networking.k8s.io/v1", "InferencePool"): _INFERENCE_POOL,
    ("gateway.networking.k8s.io/v1", "HTTPRoute"): _HTTP_ROUTE,
    ("gateway.networking.k8s.io/v1", "Gateway"): _GATEWAY,
}
