"""Log output as llm-d's EPP writes it: controller-runtime's zap encoders.

``--zap-encoder json`` writes one JSON object per line with zap's production keys
(``level``, ``ts``, ``logger``, ``caller``, ``msg``, ``error``, ``stacktrace``);
``console`` (the default, as ``--zap-devel`` defaults to true) writes tab-separated
``time LEVEL logger caller message``. The level comes from ``--zap-log-level`` or,
unset, from ``-v`` (llm-d: 2 is the default, 4 and up is debug). ``--zap-time-encoding``
picks the time format; ``--zap-stacktrace-level`` the level from which records carry
the stack where they were logged.
"""

from __future__ import annotations

import datetime
import json
import logging
import sys
import traceback
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from epp.settings import EppSettings

__all__ = ["configure_logging", "python_level"]

# zap's level names for the Python levels.
_ZAP_NAMES = {
    logging.DEBUG: "debug",
    logging.INFO: "info",
    logging.WARNING: "warn",
    logging.ERROR: "error",
    logging.CRITICAL: "fatal",
}
_FROM_ZAP = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "error": logging.ERROR,
    "dpanic": logging.CRITICAL,
    "panic": logging.CRITICAL,
    "fatal": logging.CRITICAL,
}
# llm-d logs at V(4) for debug: verbosity 4 and up shows them.
_DEBUG_VERBOSITY = 4
# Attributes every LogRecord has; anything else was passed as ``extra`` and is a field.
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


def python_level(zap_level: str | None, verbosity: int) -> int:
    """The Python logging level for ``--zap-log-level`` (or, unset, ``-v``)."""
    if zap_level is None:
        return logging.DEBUG if verbosity >= _DEBUG_VERBOSITY else logging.INFO
    if zap_level.isdigit():
        return logging.DEBUG if int(zap_level) >= _DEBUG_VERBOSITY else logging.INFO
    return _FROM_ZAP[zap_level]


def _time(created: float, encoding: str) -> Any:
    if encoding == "epoch":
        return created
    if encoding == "millis":
        return created * 1000.0
    if encoding == "nano":
        return int(created * 1e9)
    moment = datetime.datetime.fromtimestamp(created, datetime.UTC).astimezone()
    if encoding == "iso8601":
        return moment.isoformat(timespec="milliseconds")
    if encoding == "rfc3339nano":
        return moment.isoformat(timespec="microseconds")
    return moment.isoformat(timespec="seconds")  # rfc3339


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD}


class ZapJsonFormatter(logging.Formatter):
    """One JSON object per record, keys as zap's production encoder names them."""

    def __init__(self, time_encoding: str) -> None:
        super().__init__()
        self.time_encoding = time_encoding

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "level": _ZAP_NAMES.get(record.levelno, record.levelname.lower()),
            "ts": _time(record.created, self.time_encoding),
            "logger": record.name,
            "caller": f"{record.filename}:{record.lineno}",
            "msg": record.getMessage(),
        }
        entry.update(_fields(record))
        if record.exc_info and record.exc_info[1] is not None:
            entry["error"] = str(record.exc_info[1]) or type(record.exc_info[1]).__name__
            entry["stacktrace"] = self.formatException(record.exc_info)
        elif record.stack_info:
            entry["stacktrace"] = record.stack_info
        return json.dumps(entry, default=str, ensure_ascii=False)


class ZapConsoleFormatter(logging.Formatter):
    """Tab-separated ``time LEVEL logger caller message {fields}``, as zap's console."""

    def __init__(self, time_encoding: str) -> None:
        super().__init__()
        self.time_encoding = time_encoding

    def format(self, record: logging.LogRecord) -> str:
        parts = [
            str(_time(record.created, self.time_encoding)),
            _ZAP_NAMES.get(record.levelno, record.levelname.lower()).upper(),
            record.name,
            f"{record.filename}:{record.lineno}",
            record.getMessage(),
        ]
        fields = _fields(record)
        if fields:
            parts.append(json.dumps(fields, default=str, ensure_ascii=False))
        line = "\t".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        elif record.stack_info:
            line += "\n" + record.stack_info
        return line


class _StackFrom(logging.Filter):
    """Records at or above a level carry the stack they were logged from."""

    def __init__(self, level: int) -> None:
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= self.level and not record.exc_info and not record.stack_info:
            # Drop the logging module's own frames at the end.
            frames = [f for f in traceback.format_stack() if "/logging/" not in f]
            record.stack_info = "".join(frames).rstrip()
        return True


def configure_logging(settings: EppSettings, stream: TextIO | None = None) -> logging.Handler:
    """Install the root handler the flags describe; returns it."""
    encoder = settings.zap_encoder or ("console" if settings.zap_devel else "json")
    time_encoding = settings.zap_time_encoding or "rfc3339"
    formatter: logging.Formatter = (
        ZapJsonFormatter(time_encoding) if encoder == "json" else ZapConsoleFormatter(time_encoding)
    )
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(formatter)
    stack_level = settings.zap_stacktrace_level or ("warn" if settings.zap_devel else "error")
    handler.addFilter(_StackFrom(_FROM_ZAP[stack_level]))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(python_level(settings.zap_log_level, settings.v))
    return handler
