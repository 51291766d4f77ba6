"""One error hierarchy for the protocol; each error knows its HTTP status and its OperationOutcome.

Every non-2xx response carries a FHIR OperationOutcome (CDS Hooks 3.0 ballot, harmless under 2.0) that
names the field and the reason, except 401, which by best practice says nothing beyond "unauthorized".
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

#: FHIR IssueType codes (http://hl7.org/fhir/R4/valueset-issue-type.html) by HTTP status.
_ISSUE_CODE_BY_STATUS = {
    400: "invalid",
    401: "login",
    403: "forbidden",
    404: "not-found",
    405: "not-supported",
    412: "processing",
    413: "too-costly",
    415: "not-supported",
    429: "throttled",
    500: "exception",
    501: "not-supported",
    503: "transient",
}


@dataclass(frozen=True)
class Issue:
    """One problem: what is wrong (`diagnostics`) and where (`expression`, a field path)."""

    diagnostics: str
    expression: str | None = None
    code: str | None = None
    severity: str = "error"


def operation_outcome(status: int, issues: Iterable[Issue]) -> dict[str, Any]:
    """A FHIR R4 OperationOutcome for ``issues``, with issue codes defaulted from ``status``."""
    default_code = _ISSUE_CODE_BY_STATUS.get(status, "processing")
    rendered = []
    for issue in issues:
        entry: dict[str, Any] = {
            "severity": issue.severity,
            "code": issue.code or default_code,
            "diagnostics": issue.diagnostics,
        }
        if issue.expression:
            entry["expression"] = [issue.expression]
        rendered.append(entry)
    return {"resourceType": "OperationOutcome", "issue": rendered}


class CDSHooksError(Exception):
    """Root of the protocol's errors: an HTTP status and the issues to report."""

    status_code = 500
    default_message = "internal error"

    def __init__(self, message: str | None = None, *, issues: Sequence[Issue] = (),
                 headers: Mapping[str, str] | None = None) -> None:
        self.message = message or self.default_message
        super().__init__(self.message)
        self.issues: tuple[Issue, ...] = tuple(issues) or (Issue(self.message),)
        self.headers = dict(headers or {})

    def to_outcome(self) -> dict[str, Any]:
        """The OperationOutcome body for this error."""
        return operation_outcome(self.status_code, self.issues)


class InvalidRequest(CDSHooksError):
    """400: the body is not a valid CDS Hooks request; each issue names a field and why."""

    status_code = 400
    default_message = "invalid request"

    @classmethod
    def from_messages(cls, messages: Mapping[str, Any], prefix: str = "") -> InvalidRequest:
        """Build from marshmallow's nested ``ValidationError.messages``."""
        issues = [Issue(f"{path}: {text}" if path else text, expression=path or None)
                  for path, text in _flatten(messages, prefix)]
        return cls("; ".join(i.diagnostics for i in issues), issues=issues)


def _flatten(messages: Any, prefix: str) -> Iterable[tuple[str, str]]:
    if isinstance(messages, Mapping):
        for key, value in messages.items():
            name = "" if key == "_schema" else str(key)
            path = f"{prefix}.{name}" if prefix and name else (name or prefix)
            if isinstance(key, int):
                path = f"{prefix}[{key}]"
            yield from _flatten(value, path)
    elif isinstance(messages, (list, tuple)) and all(isinstance(m, str) for m in messages):
        yield prefix, " ".join(messages)
    elif isinstance(messages, (list, tuple)):
        for item in messages:
            yield from _flatten(item, prefix)
    else:
        yield prefix, str(messages)


class Unauthorized(CDSHooksError):
    """401: missing or invalid bearer token. The reason is logged, never sent to the caller."""

    status_code = 401
    default_message = "unauthorized"

    def __init__(self, reason: str = "unauthorized") -> None:
        super().__init__("unauthorized", headers={"WWW-Authenticate": 'Bearer realm="cds-services"'})
        #: Why the token was refused; for the log only.
        self.reason = reason


class UnknownService(CDSHooksError):
    """404: no service, or no route, with that id."""

    status_code = 404
    default_message = "not found"


class MethodNotAllowed(CDSHooksError):
    """405: the route exists but not for this method."""

    status_code = 405
    default_message = "method not allowed"


class PreconditionFailed(CDSHooksError):
    """412: required data was neither prefetched nor retrievable from the FHIR server."""

    status_code = 412
    default_message = "required data could not be obtained"

    def __init__(self, missing: Mapping[str, str], *, sent: Collection[str] = ()) -> None:
        """``missing``: key -> why it is unavailable; ``sent``: those of them the client did send (unusable)."""
        issues = [Issue(f"prefetch key '{key}' was sent but cannot be used: {why}" if key in sent else
                        f"prefetch key '{key}' was not provided and could not be fetched: {why}",
                        expression=f"prefetch.{key}") for key, why in sorted(missing.items())]
        super().__init__("required prefetch data unavailable: " + ", ".join(sorted(missing)), issues=issues)
        self.missing = dict(missing)


class PayloadTooLarge(CDSHooksError):
    """413: the body exceeds the configured limit."""

    status_code = 413
    default_message = "request body too large"


class UnsupportedMediaType(CDSHooksError):
    """415: the body is not JSON, or is sent with a content coding (gzip, br, ...) other than identity."""

    status_code = 415
    default_message = "request body must be JSON (Content-Type: application/json)"


class TransferCodingNotImplemented(CDSHooksError):
    """501: the body is sent with a transfer coding other than chunked (gzip, deflate, ...), which is not decoded."""

    status_code = 501
    default_message = "the transfer coding is not supported"


class ServiceUnavailable(CDSHooksError):
    """503: a dependency (the feedback store) is down; the client may retry."""

    status_code = 503
    default_message = "service temporarily unavailable"

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message, headers={"Retry-After": "5"})


class InternalError(CDSHooksError):
    """500: a bug. Still an OperationOutcome, never a stack trace."""

    status_code = 500
    default_message = "internal error; the request id in the logs identifies it"
