"""Both sides read the wire contract from ``common``: the same names on each side."""

from __future__ import annotations

from common import multimodal, routing_headers
from epp.extproc import headers as epp_headers
from epp.plugins.dp_profile_handler import DATA_PARALLEL_HEADER
from sidecar import routing as sidecar_routing
from sidecar.encode import multimodal_items


def test_routing_headers_are_one_list() -> None:
    names = set(routing_headers.ROUTING_HEADERS)
    assert len(names) == len(routing_headers.ROUTING_HEADERS) == 6
    assert set(epp_headers.ROUTING_HEADERS) == names
    assert names == sidecar_routing.ROUTING_HEADERS
    assert epp_headers.PREFILLER == sidecar_routing.PREFILLER_HOST_PORT == "x-prefiller-host-port"
    assert epp_headers.ENCODERS == sidecar_routing.ENCODER_HOSTS_PORTS == "x-encoder-hosts-ports"
    assert DATA_PARALLEL_HEADER == sidecar_routing.DATA_PARALLEL_HOST_PORT
    assert all(name == name.lower() for name in names)


def test_every_multimodal_part_type_needs_an_encoder() -> None:
    assert set(multimodal.MODALITY) == set(multimodal.MULTIMODAL_PART_TYPES)
    for kind in multimodal.MULTIMODAL_PART_TYPES:
        part = {"type": kind, kind: {"url": "http://media/x"}}
        body = {"messages": [{"role": "user", "content": [part]}]}
        assert len(multimodal_items(body)) == 1, kind
    text = {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}
    assert multimodal_items(text) == []
