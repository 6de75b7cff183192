"""TLS for the sidecar: serving (``--secure-proxy``) and per-stage upstream clients.

- ``serving``  the server's certificate: ``--cert-path`` (re-read on change, swapped
               for new connections only) or a self-signed one for the pod IP
- ``client``   one client context per stage in ``--enable-tls``: ``--ca-file``,
               ``--tls-insecure-skip-verify``, client certificate for mutual TLS
"""

from __future__ import annotations

from sidecar.tls.client import TLS_STAGES, client_context, stage_contexts
from sidecar.tls.serving import ServingTLS

__all__ = ["TLS_STAGES", "ServingTLS", "client_context", "stage_contexts"]
