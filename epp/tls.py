"""gRPC's TLS cipher suites from the EPP's ``--tls-cipher-suites`` (the certificates
themselves come from :mod:`common.tls`)."""

from __future__ import annotations

__all__ = ["grpc_cipher_suites"]


def grpc_cipher_suites(go_names: tuple[str, ...]) -> str | None:
    """``GRPC_SSL_CIPHER_SUITES`` for ``--tls-cipher-suites`` (Go names -> OpenSSL names).

    gRPC reads the variable once, when it first sets up TLS: it must be in the
    environment before any TLS credentials exist (``epp``'s ``main`` sets it first).
    TLS 1.3 suites are not configurable and are left out.
    """
    from epp.settings import GO_CIPHER_SUITES

    names = [GO_CIPHER_SUITES[n] for n in go_names if GO_CIPHER_SUITES.get(n)]
    return ":".join(n for n in names if n) or None
