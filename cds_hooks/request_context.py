"""Per-request values the log formatter can read without importing Flask."""

from __future__ import annotations

from contextvars import ContextVar

#: The current request's id (from a valid `X-Request-ID` header, else generated); "-" outside requests.
REQUEST_ID: ContextVar[str] = ContextVar("request_id", default="-")
