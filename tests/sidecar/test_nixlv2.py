"""nixlv2 body translation per API shape (pure functions, no I/O)."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from sidecar.api_shapes import API_SHAPES
from sidecar.connectors import (
    ConnectorOptions,
    LegContext,
    LegOrder,
    PrefillResult,
    available_connectors,
    create_connector,
)
from sidecar.connectors.nixlv2 import NixlV2Connector
from sidecar.errors import PrefillIncomplete
from sidecar.routing import HostPort

REMOTE_DECODE = {
    "do_remote_decode": True,
    "do_remote_prefill": False,
    "remote_engine_id": None,
    "remote_block_ids": None,
    "remote_host": None,
    "remote_port": None,
}


def _ctx(path: str, body: dict[str, Any]) -> LegContext:
    return LegContext(
        shape=API_SHAPES[path], body=body, request_id="rid", prefiller=HostPort("p", 1)
    )


@pytest.fixture
def nixl() -> NixlV2Connector:
    connector = create_connector("nixlv2", ConnectorOptions())
    assert isinstance(connector, NixlV2Connector)
    return connector


def test_registry() -> None:
    assert "nixlv2" in available_connectors()
    assert NixlV2Connector.order is LegOrder.SEQUENTIAL
    with pytest.raises(ValueError, match="unknown KV connector"):
        create_connector("teleport", ConnectorOptions())


@pytest.mark.parametrize(
    ("path", "body", "capped"),
    [
        (
            "/v1/chat/completions",
            {"messages": [], "max_tokens": 50, "max_completion_tokens": 40, "min_tokens": 5},
            {"max_tokens": 1, "max_completion_tokens": 1},
        ),
        ("/v1/chat/completions", {"messages": []}, {"max_tokens": 1}),
        ("/v1/completions", {"prompt": "x", "max_tokens": 9, "min_tokens": 3}, {"max_tokens": 1}),
        ("/v1/responses", {"input": "x", "max_output_tokens": 9}, {"max_output_tokens": 1}),
        ("/v1/messages", {"messages": [], "max_tokens": 9}, {"max_tokens": 1}),
    ],
)
def test_prefill_body_caps_and_requests_remote_decode(
    nixl: NixlV2Connector, path: str, body: dict[str, Any], capped: dict[str, int]
) -> None:
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    original = copy.deepcopy(body)
    out = nixl.prefill_body(_ctx(path, body))
    assert body == original  # the client's body is never mutated
    assert out["stream"] is False
    assert "stream_options" not in out
    assert "min_tokens" not in out
    for name, value in capped.items():
        assert out[name] == value
    assert "max_completion_tokens" not in out or "max_completion_tokens" in original
    assert out["kv_transfer_params"] == REMOTE_DECODE


def test_generate_caps_inside_sampling_params(nixl: NixlV2Connector) -> None:
    body: dict[str, Any] = {
        "token_ids": [1, 2],
        "sampling_params": {"max_tokens": 9, "min_tokens": 4},
    }
    out = nixl.prefill_body(_ctx("/inference/v1/generate", body))
    assert out["sampling_params"] == {"max_tokens": 1}
    assert body["sampling_params"] == {"max_tokens": 9, "min_tokens": 4}
    created = nixl.prefill_body(_ctx("/inference/v1/generate", {"token_ids": [1]}))
    assert created["sampling_params"] == {"max_tokens": 1}


def test_decode_body_restores_client_fields_and_relays_params_verbatim(
    nixl: NixlV2Connector,
) -> None:
    body = {"messages": [], "max_tokens": 50, "stream": True, "min_tokens": 3,
            "kv_transfer_params": {"client": "junk"}}  # fmt: skip
    params = {"do_remote_prefill": True, "remote_block_ids": [[1, 2], [3]], "transfer_mode": "x"}
    out = nixl.decode_body(_ctx("/v1/chat/completions", body), PrefillResult(params))
    assert out == {**body, "kv_transfer_params": params}
    assert out["kv_transfer_params"] is params


@pytest.mark.parametrize(
    "answer", [{}, {"kv_transfer_params": None}, {"kv_transfer_params": {}}, [], "x"]
)
def test_missing_params_is_a_prefill_failure(nixl: NixlV2Connector, answer: object) -> None:
    with pytest.raises(PrefillIncomplete):
        nixl.read_prefill(_ctx("/v1/completions", {}), answer)


def test_encode_stage_output_goes_to_the_prefill_leg_only(nixl: NixlV2Connector) -> None:
    extra = {"ec_transfer_params": {"hash-1": {"peer_host": "10.0.0.9", "peer_port": 1}}}
    ctx = LegContext(
        shape=API_SHAPES["/v1/chat/completions"],
        body={"messages": []},
        request_id="rid",
        prefiller=HostPort("p", 1),
        extra=extra,
    )
    assert nixl.prefill_body(ctx)["ec_transfer_params"] == extra["ec_transfer_params"]
    assert "ec_transfer_params" not in nixl.decode_body(ctx, PrefillResult({"x": 1}))
