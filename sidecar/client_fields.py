"""Body fields a client may never send: only the sidecar writes them, from answers it got.

``kv_transfer_params`` tells an engine where to open its KV side channel (a NIXL/ZMQ
handshake, a Mooncake ``GET <remote_bootstrap_addr>/query``) and what to bill as cached;
``ec_transfer_params`` where to pull encoder outputs; SGLang's ``bootstrap_*`` fields
which bootstrap server to join. vLLM also reads the first two from ``vllm_xargs``. A
client copy of any of them, on any route (P/D, decode-only, fallback, E/PD), would let
the request choose a host the engine connects to, so it is refused, not stripped: a
silent strip would change the meaning of the request without telling anyone.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["FORBIDDEN_FIELDS", "forbidden_field"]

FORBIDDEN_FIELDS: tuple[str, ...] = (
    "kv_transfer_params",
    "ec_transfer_params",
    "bootstrap_host",
    "bootstrap_port",
    "bootstrap_room",
)
# vLLM copies vllm_xargs into SamplingParams.extra_args, where the connectors look too.
_XARGS = "vllm_xargs"
_XARGS_FORBIDDEN = ("kv_transfer_params", "ec_transfer_params")


def forbidden_field(body: Mapping[str, Any]) -> str | None:
    """The first forbidden field ``body`` carries (dotted for nested ones), or None.

    A field present with the value ``null`` is refused too: the engine treats it as
    absent, but a client that sends it is asking for something only the sidecar does.
    """
    for name in FORBIDDEN_FIELDS:
        if name in body:
            return name
    xargs = body.get(_XARGS)
    if isinstance(xargs, Mapping):
        for name in _XARGS_FORBIDDEN:
            if name in xargs:
                return f"{_XARGS}.{name}"
    return None
