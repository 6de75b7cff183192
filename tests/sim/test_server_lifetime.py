"""A simulator that cannot listen leaves nothing running behind it."""

from __future__ import annotations

import socket

import pytest

from vllm_sim.config import SimConfig
from vllm_sim.server import SimServer


async def test_a_taken_port_closes_what_start_opened() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = SimServer(SimConfig(host="127.0.0.1", port=port))
        with pytest.raises(OSError):
            await server.start()
    session = server.engine._session
    assert session is not None
    assert session.closed  # was left open, and reported unclosed at garbage collection
    assert server.engine._sweeper is not None
    assert server.engine._sweeper.done()
