"""Structured (one JSON object per line) logging with the request id, and nothing sensitive.

Only the message, the logger, the level, the request id and a fixed set of safe fields are written.
Exception messages can carry input values (pydantic and JSON errors quote what they were given), so below
DEBUG an exception is logged by type and stack frames only, never by its message.
"""

from __future__ import annotations

import json
import logging
import sys
import traceback
from datetime import datetime, timezone
from typing import Any

from cds_hooks.request_context import REQUEST_ID

#: `extra=` fields that may appear in a log line: counts, codes and timings, never values from a request.
SAFE_FIELDS = frozenset({"http_method", "route", "status", "duration_ms", "stored", "duplicates",
                         "unknown_cards", "service_id", "cards", "findings", "keys", "iss", "kid", "jti",
                         "tenant", "reason", "pid"})


class JsonFormatter(logging.Formatter):
    """Format a record as one JSON line."""

    def __init__(self, *, include_exception_messages: bool = False) -> None:
        super().__init__()
        self.include_exception_messages = include_exception_messages

    def format(self, record: logging.LogRecord) -> str:
        """The record as a JSON object on one line."""
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "request_id": REQUEST_ID.get(),
            "message": record.getMessage(),
        }
        for name in SAFE_FIELDS:
            if name in record.__dict__:
                entry[name] = record.__dict__[name]
        if record.exc_info and record.exc_info[0] is not None:
            exc_type, exc, tb = record.exc_info
            entry["exception"] = exc_type.__name__
            entry["stack"] = "".join(traceback.format_tb(tb))
            if self.include_exception_messages:
                entry["exception_message"] = str(exc)
        return json.dumps(entry, ensure_ascii=False, default=str)


def configure_logging(level: str) -> None:
    """Send every logger's records to stderr as JSON lines at ``level``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(include_exception_messages=level == "DEBUG"))
    root = logging.getLogger()
    for existing in list(root.handlers):
        if getattr(existing, "_cds_handler", False):
            root.removeHandler(existing)
    handler._cds_handler = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level)
    # urllib3 logs full URLs (with patient ids in the query) at DEBUG; keep it quiet even then.
    logging.getLogger("urllib3").setLevel(logging.WARNING)
