"""Client TLS per stage: which upstreams are reached over https, and how they are verified.

A stage in ``--enable-tls`` (prefiller, decoder, encoder) is reached over https with a
context that verifies the server against ``--ca-file`` (or the system's CAs without
it), unless the stage is also in ``--tls-insecure-skip-verify``. ``--client-cert-file``
and ``--client-key-file`` are presented to every TLS upstream that asks (mutual TLS).
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping

from sidecar.settings import Settings

__all__ = ["TLS_STAGES", "client_context", "stage_contexts"]

# --enable-tls stage names -> the sidecar's stage names.
TLS_STAGES: Mapping[str, str] = {"prefiller": "prefill", "decoder": "decode", "encoder": "encode"}


def client_context(
    *,
    ca_file: str = "",
    skip_verify: bool = False,
    client_cert_file: str = "",
    client_key_file: str = "",
) -> ssl.SSLContext:
    """One stage's client context; ``ValueError`` naming the flag when a file is unusable."""
    try:
        context = ssl.create_default_context(cafile=ca_file or None)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"--ca-file {ca_file}: {exc}") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if skip_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if client_cert_file:
        try:
            context.load_cert_chain(client_cert_file, client_key_file or None)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(
                f"--client-cert-file {client_cert_file} / --client-key-file: {exc}"
            ) from None
    return context


def stage_contexts(settings: Settings) -> dict[str, ssl.SSLContext]:
    """Client contexts by sidecar stage (prefill, decode, encode) for the TLS stages.

    Reads files: call it off the event loop.
    """
    return {
        TLS_STAGES[name]: client_context(
            ca_file=settings.ca_file,
            skip_verify=name in settings.tls_insecure_skip_verify,
            client_cert_file=settings.client_cert_file,
            client_key_file=settings.client_key_file,
        )
        for name in settings.enable_tls
    }
