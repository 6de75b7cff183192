"""Logging: every record is one JSON object on one line (stderr).

The access record (one per request) carries the request id, mode, targets and stage
timings; it is emitted by the request boundary in ``sidecar.app``.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

__all__ = ["access_log", "configure_logging", "http_log", "log"]

log = logging.getLogger("pd_sidecar")
access_log = logging.getLogger("pd_sidecar.access")
# The HTTP server's own log (``sidecar.server``, the main port): unparsable requests
# (one warning each) and unhandled errors.
http_log = logging.getLogger("pd_sidecar.http")


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        if isinstance(record.msg, dict):
            entry.update(record.msg)
        else:
            entry["msg"] = record.getMessage()
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, separators=(",", ":"), default=str)


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter())
    root = logging.getLogger("pd_sidecar")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
    logging.Formatter.converter = time.gmtime
