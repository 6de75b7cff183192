"""Our ext_proc messages are byte-compatible with Envoy's (xds-protos is the oracle)."""

from __future__ import annotations

import ast
import base64
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.unknown_fields import UnknownFieldSet

from epp._proto import disagg_extproc_pb2 as ours

if TYPE_CHECKING:
    from google.protobuf.message import Message

envoy_ep = pytest.importorskip("envoy.service.ext_proc.v3.external_processor_pb2")
envoy_core = pytest.importorskip("envoy.config.core.v3.base_pb2")
envoy_mode = pytest.importorskip("envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2")
envoy_status = pytest.importorskip("envoy.type.v3.http_status_pb2")

# Our message -> Envoy's message of the same shape.
_COUNTERPARTS: dict[str, Descriptor] = {
    "HeaderValue": envoy_core.HeaderValue.DESCRIPTOR,
    "HeaderValueOption": envoy_core.HeaderValueOption.DESCRIPTOR,
    "HeaderMap": envoy_core.HeaderMap.DESCRIPTOR,
    "Metadata": envoy_core.Metadata.DESCRIPTOR,
    "HttpStatus": envoy_status.HttpStatus.DESCRIPTOR,
    "ProcessingMode": envoy_mode.ProcessingMode.DESCRIPTOR,
    "ProtocolConfiguration": envoy_ep.ProtocolConfiguration.DESCRIPTOR,
    "ProcessingRequest": envoy_ep.ProcessingRequest.DESCRIPTOR,
    "ProcessingResponse": envoy_ep.ProcessingResponse.DESCRIPTOR,
    "HttpHeaders": envoy_ep.HttpHeaders.DESCRIPTOR,
    "HttpBody": envoy_ep.HttpBody.DESCRIPTOR,
    "HttpTrailers": envoy_ep.HttpTrailers.DESCRIPTOR,
    "HeadersResponse": envoy_ep.HeadersResponse.DESCRIPTOR,
    "BodyResponse": envoy_ep.BodyResponse.DESCRIPTOR,
    "TrailersResponse": envoy_ep.TrailersResponse.DESCRIPTOR,
    "CommonResponse": envoy_ep.CommonResponse.DESCRIPTOR,
    "HeaderMutation": envoy_ep.HeaderMutation.DESCRIPTOR,
    "BodyMutation": envoy_ep.BodyMutation.DESCRIPTOR,
    "StreamedBodyResponse": envoy_ep.StreamedBodyResponse.DESCRIPTOR,
    "ImmediateResponse": envoy_ep.ImmediateResponse.DESCRIPTOR,
    "GrpcStatus": envoy_ep.GrpcStatus.DESCRIPTOR,
}

# Wire types that carry identical bytes although the declared types differ.
_WIRE_EQUIVALENT = {(FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_ENUM)}


def _shape(field: FieldDescriptor) -> tuple[int, bool]:
    return field.number, field.is_repeated


def _same_type(a: FieldDescriptor, b: FieldDescriptor) -> bool:
    if a.type != b.type:
        return (a.type, b.type) in _WIRE_EQUIVALENT
    if a.type == FieldDescriptor.TYPE_MESSAGE:
        a_name, b_name = a.message_type.full_name, b.message_type.full_name
        if a_name.startswith("google.protobuf.") or b_name.startswith("google.protobuf."):
            return a_name == b_name
        if a.message_type.GetOptions().map_entry:
            return _same_fields(a.message_type, b.message_type)
        return _COUNTERPARTS[a.message_type.name].full_name == b_name
    if a.type == FieldDescriptor.TYPE_ENUM:
        return [(v.name, v.number) for v in a.enum_type.values] == [
            (v.name, v.number) for v in b.enum_type.values
        ]
    return True


def _same_fields(a: Descriptor, b: Descriptor) -> bool:
    a_fields = {f.name: f for f in a.fields}
    b_fields = {f.name: f for f in b.fields}
    return a_fields.keys() == b_fields.keys() and all(
        _shape(a_fields[n]) == _shape(b_fields[n]) and _same_type(a_fields[n], b_fields[n])
        for n in a_fields
    )


@pytest.mark.parametrize("name", sorted(_COUNTERPARTS))
def test_every_field_matches_envoy(name: str) -> None:
    mine = ours.DESCRIPTOR.message_types_by_name[name]
    theirs = _COUNTERPARTS[name]
    mine_fields = {f.name: f for f in mine.fields}
    their_fields = {f.name: f for f in theirs.fields}
    assert mine_fields.keys() == their_fields.keys(), name
    for field_name, field in mine_fields.items():
        other = their_fields[field_name]
        assert _shape(field) == _shape(other), f"{name}.{field_name}"
        assert _same_type(field, other), f"{name}.{field_name}"
    mine_oneofs = {o.name: sorted(f.name for f in o.fields) for o in mine.oneofs}
    their_oneofs = {o.name: sorted(f.name for f in o.fields) for o in theirs.oneofs}
    assert mine_oneofs == their_oneofs, name


def test_counterparts_cover_all_our_messages() -> None:
    assert set(ours.DESCRIPTOR.message_types_by_name) == set(_COUNTERPARTS)


# ---- populated messages, both directions ----


def _headers(pairs: list[tuple[str, bytes]]) -> dict[str, Any]:
    return {"headers": [{"key": k, "raw_value": v} for k, v in pairs]}


def _metadata() -> dict[str, Any]:
    return {
        "filter_metadata": {
            "envoy.lb.subset_hint": {
                "x-gateway-destination-endpoint-subset": ["10.0.0.1:8000", "[fd00::1]:8000"]
            }
        }
    }


def _received() -> list[tuple[str, dict[str, Any]]]:
    """Every kind of message Envoy sends us."""
    proto = {
        "request_body_mode": "FULL_DUPLEX_STREAMED",
        "response_body_mode": "BUFFERED",
        "send_body_without_waiting_for_header_response": True,
    }
    return [
        (
            "request_headers",
            {
                "request_headers": {
                    "headers": _headers([(":path", b"/v1/chat"), ("x-prefiller-host-port", b"x")]),
                    "end_of_stream": False,
                    "attributes": {"k": {"fields": {"a": {"string_value": "b"}}}},
                },
                "metadata_context": _metadata(),
                "attributes": {"request.path": {"fields": {"v": {"number_value": 1.5}}}},
                "protocol_config": proto,
                "observability_mode": True,
            },
        ),
        ("request_body", {"request_body": {"body": b"\x00\xff{}", "end_of_stream": True}}),
        ("request_trailers", {"request_trailers": {"trailers": _headers([("t", b"v")])}}),
        (
            "response_headers",
            {
                "response_headers": {
                    "headers": _headers([(":status", b"200")]),
                    "end_of_stream": True,
                }
            },
        ),
        (
            "response_body",
            {
                "response_body": {
                    "body": b"data: x\n\n",
                    "end_of_stream": False,
                    "end_of_stream_without_message": True,
                    "grpc_message_compressed": True,
                }
            },
        ),
        (
            "response_trailers",
            {"response_trailers": {"trailers": _headers([("grpc-status", b"0")])}},
        ),
    ]


def _mutation() -> dict[str, Any]:
    return {
        "set_headers": [
            {
                "header": {"key": "x-gateway-destination-endpoint", "raw_value": b"10.0.0.1:8000"},
                "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                "append": False,
                "keep_empty_value": True,
            }
        ],
        "remove_headers": ["x-prefiller-host-port", "x-encoder-hosts-ports"],
    }


def _sent() -> list[tuple[str, dict[str, Any]]]:
    """Every kind of message we send Envoy."""
    return [
        (
            "headers_with_decision",
            {
                "request_headers": {
                    "response": {
                        "status": "CONTINUE",
                        "header_mutation": _mutation(),
                        "clear_route_cache": True,
                        "trailers": _headers([("x", b"y")]),
                    }
                },
                "dynamic_metadata": {
                    "fields": {
                        "envoy.lb": {
                            "struct_value": {
                                "fields": {
                                    "x-gateway-destination-endpoint": {
                                        "string_value": "10.0.0.1:8000"
                                    }
                                }
                            }
                        }
                    }
                },
                "mode_override": {
                    "request_header_mode": "SEND",
                    "response_header_mode": "SKIP",
                    "request_body_mode": "FULL_DUPLEX_STREAMED",
                    "response_body_mode": "STREAMED",
                    "request_trailer_mode": "SEND",
                    "response_trailer_mode": "DEFAULT",
                },
                "override_message_timeout": "3.000000005s",
                "request_drain": True,
            },
        ),
        (
            "streamed_body",
            {
                "request_body": {
                    "response": {
                        "body_mutation": {
                            "streamed_response": {
                                "body": b"chunk\x00",
                                "end_of_stream": True,
                                "end_of_stream_without_message": True,
                                "grpc_message_compressed": True,
                            }
                        }
                    }
                }
            },
        ),
        ("response_headers", {"response_headers": {"response": {}}}),
        (
            "response_body_replace",
            {
                "response_body": {
                    "response": {
                        "status": "CONTINUE_AND_REPLACE",
                        "body_mutation": {"body": b"new"},
                    }
                }
            },
        ),
        ("clear_body", {"response_body": {"response": {"body_mutation": {"clear_body": True}}}}),
        ("request_trailers", {"request_trailers": {"header_mutation": _mutation()}}),
        ("response_trailers", {"response_trailers": {}}),
        (
            "immediate",
            {
                "immediate_response": {
                    "status": {"code": 503},
                    "headers": _mutation(),
                    "body": b'{"error": "no endpoints"}',
                    "grpc_status": {"status": 14},
                    "details": "no_endpoints",
                }
            },
        ),
    ]


def _build(cls: type[Message], spec: dict[str, Any]) -> Message:
    msg = cls()
    json_format.ParseDict(_jsonable(spec), msg)
    return msg


def _jsonable(value: Any) -> Any:
    # ParseDict wants base64 for bytes and the JSON forms of well-known types.
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    if isinstance(value, dict):
        if set(value) == {"fields"}:
            return {k: _struct_value(v) for k, v in value["fields"].items()}
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


def _struct_value(value: dict[str, Any]) -> Any:
    if "struct_value" in value:
        return _jsonable(value["struct_value"])
    if "string_value" in value:
        return value["string_value"]
    return value["number_value"]


def _as_dict(msg: Message) -> dict[str, Any]:
    # Integers for enums: our HttpStatus code is an int32 where Envoy declares an enum.
    return json_format.MessageToDict(msg, use_integers_for_enums=True)


def _roundtrip(a: type[Message], b: type[Message], spec: dict[str, Any]) -> None:
    sent = _build(a, spec)
    wire = sent.SerializeToString(deterministic=True)
    assert wire, "the populated message must not be empty"
    parsed = b.FromString(wire)
    assert len(UnknownFieldSet(parsed)) == 0, "every field must be known to the other side"
    assert parsed.SerializeToString(deterministic=True) == wire
    assert _as_dict(parsed) == _as_dict(sent)
    # and our builder and theirs produce the same bytes from the same description
    assert _build(b, spec).SerializeToString(deterministic=True) == wire


@pytest.mark.parametrize(("label", "spec"), _received(), ids=[n for n, _ in _received()])
def test_received_messages_roundtrip(label: str, spec: dict[str, Any]) -> None:
    _roundtrip(envoy_ep.ProcessingRequest, ours.ProcessingRequest, spec)
    _roundtrip(ours.ProcessingRequest, envoy_ep.ProcessingRequest, spec)


@pytest.mark.parametrize(("label", "spec"), _sent(), ids=[n for n, _ in _sent()])
def test_sent_messages_roundtrip(label: str, spec: dict[str, Any]) -> None:
    _roundtrip(ours.ProcessingResponse, envoy_ep.ProcessingResponse, spec)
    _roundtrip(envoy_ep.ProcessingResponse, ours.ProcessingResponse, spec)


def test_committed_stubs_match_the_proto(tmp_path: Path) -> None:
    """protos/generate.sh was run after the last change to the .proto file."""
    grpc_tools = pytest.importorskip("grpc_tools")
    from grpc_tools import protoc

    root = Path(__file__).resolve().parents[2]
    wkt = Path(grpc_tools.__file__).parent / "_proto"
    rc = protoc.main(
        [
            "protoc",
            f"-I{root / 'protos'}",
            f"-I{wkt}",
            f"--python_out={tmp_path}",
            f"--pyi_out={tmp_path}",
            str(root / "protos" / "disagg_extproc.proto"),
        ]
    )
    assert rc == 0
    # The serialized descriptor is what the proto defines, whatever the generator version.
    generated = _serialized_descriptor(tmp_path / "disagg_extproc_pb2.py")
    committed = _serialized_descriptor(root / "epp" / "_proto" / "disagg_extproc_pb2.py")
    assert generated == committed, "run protos/generate.sh"


def _serialized_descriptor(path: Path) -> bytes:
    match = re.search(r"AddSerializedFile\((b'.*?')\)\n", path.read_text())
    assert match is not None, path
    value = ast.literal_eval(match.group(1))
    assert isinstance(value, bytes)
    return value
