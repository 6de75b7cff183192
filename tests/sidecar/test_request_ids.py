"""Request ids: 128 random bits each, never repeated, not even by a forked process."""

from __future__ import annotations

import os
import re

from sidecar.exchange import new_request_id
from sidecar.routing import HostPort


def test_ids_are_128_bits_of_hex_and_unique() -> None:
    ids = [new_request_id() for _ in range(5000)]  # several draws from the system
    assert all(re.fullmatch(r"[0-9a-f]{32}", value) for value in ids)
    assert len(set(ids)) == len(ids)


def test_a_forked_child_does_not_hand_out_its_parents_ids() -> None:
    new_request_id()  # the parent holds ids drawn in advance
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next ids, to the parent
        os.close(read)
        os.write(write, "".join(new_request_id() for _ in range(8)).encode())
        os._exit(0)
    os.close(write)
    try:
        child = b""
        while chunk := os.read(read, 4096):
            child += chunk
    finally:
        os.close(read)
        os.waitpid(pid, 0)
    parent = "".join(new_request_id() for _ in range(8)).encode()
    child_ids = {child[i : i + 32] for i in range(0, len(child), 32)}
    parent_ids = {parent[i : i + 32] for i in range(0, len(parent), 32)}
    assert len(child_ids) == 8
    assert not child_ids & parent_ids


def test_host_port_names_itself_once_for_every_use() -> None:
    v4, v6 = HostPort("10.0.0.1", 8000), HostPort("fd00::1", 8000)
    assert (v4.authority, v4.base_url, str(v4)) == (
        "10.0.0.1:8000",
        "http://10.0.0.1:8000",
        "10.0.0.1:8000",
    )
    assert (v6.authority, v6.base_url) == ("[fd00::1]:8000", "http://[fd00::1]:8000")
    assert v4 == HostPort("10.0.0.1", 8000) and hash(v4) == hash(HostPort("10.0.0.1", 8000))
    assert repr(v4) == "HostPort(host='10.0.0.1', port=8000)"
