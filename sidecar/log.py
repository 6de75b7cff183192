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

from aiohttp.http_exceptions import HttpProcessingError

__all__ = ["access_log", "configure_logging", "http_log", "log"]

log = logging.getLogger("pd_sidecar")
access_log = logging.getLogger("pd_sidecar.access")
# The HTTP server's own log (aiohttp's "server" logger for the main port).
http_log = logging.getLogger("pd_sidecar.http")


class _UnparsableRequests(logging.Filter):
    """A request aiohttp cannot parse (a CR or NUL in a header, a header line over the
    limit, a broken chunk) is the client's fault: aiohttp answers it 400 itself but logs
    it as a server error with a traceback. Logged here as one warning line instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            remote = record.args[0] if isinstance(record.args, tuple) and record.args else None
            record.msg = {
                "event": "unparsable_request",
                "remote": remote,
                "status": exc.code,
                "error": exc.message.strip().splitlines()[0] if exc.message else repr(exc),
            }
            record.args = ()
            record.exc_info = None
            record.exc_text = None
            record.levelno = min(record.levelno, logging.WARNING)
            record.levelname = logging.getLevelName(record.levelno)
        return True


http_log.addFilter(_UnparsableRequests())


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
