"""Tunables of the ext_proc server, as one immutable value object."""

from __future__ import annotations

from dataclasses import dataclass

from epp._proto.disagg_extproc_pb2 import ProcessingMode

__all__ = ["MAX_CHUNK_BYTES", "BodyMode", "ExtProcConfig"]

BodyMode = ProcessingMode.BodySendMode

# Envoy's gateway ecosystem re-sends request bodies in chunks of at most ~62 KB: small
# enough for any gRPC frame budget Envoy applies to a single streamed mutation.
MAX_CHUNK_BYTES = 62 * 1024


@dataclass(frozen=True, slots=True)
class ExtProcConfig:
    # A request body larger than this is refused with 413 instead of being buffered.
    max_body_bytes: int = 32 * 1024 * 1024
    chunk_bytes: int = MAX_CHUNK_BYTES
    # Bounds one scheduling decision; past it the request ends with a 500.
    decision_timeout_s: float = 10.0
    # Used when Envoy does not announce its body modes (protocol_config is absent only in
    # Envoy versions older than the ones this project supports).
    default_request_body_mode: BodyMode = ProcessingMode.FULL_DUPLEX_STREAMED
    default_response_body_mode: BodyMode = ProcessingMode.FULL_DUPLEX_STREAMED

    def __post_init__(self) -> None:
        if not 0 < self.chunk_bytes <= MAX_CHUNK_BYTES:
            raise ValueError(f"chunk_bytes must be in (0, {MAX_CHUNK_BYTES}]")
        if self.max_body_bytes <= 0:
            raise ValueError("max_body_bytes must be positive")
        if self.decision_timeout_s <= 0:
            raise ValueError("decision_timeout_s must be positive")
