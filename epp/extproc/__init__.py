"""The Envoy ext_proc server of the EPP.

``ExtProcService`` serves Envoy's ``Process`` stream: ``service.py`` is the loop,
``handlers.py`` holds one handler per message kind over a per-request ``RequestContext``
(``context.py``), and ``responses.py`` builds the messages sent back (pure functions).
"""

from __future__ import annotations

from epp.extproc.config import MAX_CHUNK_BYTES, ExtProcConfig
from epp.extproc.headers import ROUTING_HEADERS
from epp.extproc.service import EXTPROC_METHOD, EXTPROC_SERVICE, ExtProcService

__all__ = [
    "EXTPROC_METHOD",
    "EXTPROC_SERVICE",
    "MAX_CHUNK_BYTES",
    "ROUTING_HEADERS",
    "ExtProcConfig",
    "ExtProcService",
]
