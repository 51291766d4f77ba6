"""Every protocol error renders as an OperationOutcome with the right status and issue code."""

from __future__ import annotations

import pytest

from cds_hooks.errors import (
    CDSHooksError,
    InternalError,
    InvalidRequest,
    PayloadTooLarge,
    PreconditionFailed,
    ServiceUnavailable,
    Unauthorized,
    UnknownService,
    UnsupportedMediaType,
)


@pytest.mark.parametrize("error, status, code", [
    (InvalidRequest("bad"), 400, "invalid"),
    (Unauthorized("expired token"), 401, "login"),
    (UnknownService("no such service"), 404, "not-found"),
    (PreconditionFailed({"labs": "timed out"}), 412, "processing"),
    (PayloadTooLarge(), 413, "too-costly"),
    (UnsupportedMediaType(), 415, "not-supported"),
    (InternalError(), 500, "exception"),
    (ServiceUnavailable("store down"), 503, "transient"),
], ids=["400", "401", "404", "412", "413", "415", "500", "503"])
def test_error_status_and_outcome(error: CDSHooksError, status: int, code: str) -> None:
    outcome = error.to_outcome()
    assert error.status_code == status
    assert outcome["resourceType"] == "OperationOutcome"
    assert outcome["issue"][0]["code"] == code
    assert outcome["issue"][0]["severity"] == "error"
    assert outcome["issue"][0]["diagnostics"]


def test_unauthorized_sends_no_detail_but_keeps_the_reason_for_the_log() -> None:
    error = Unauthorized("aud 'https://evil' does not match")
    assert "evil" not in str(error.to_outcome())
    assert error.reason == "aud 'https://evil' does not match"
    assert error.headers["WWW-Authenticate"].startswith("Bearer")


def test_precondition_failed_names_each_key() -> None:
    outcome = PreconditionFailed({"vitals": "no fhirServer", "labs": "timed out"}).to_outcome()
    assert [i["expression"] for i in outcome["issue"]] == [["prefetch.labs"], ["prefetch.vitals"]]
    assert "timed out" in outcome["issue"][0]["diagnostics"]


def test_invalid_request_from_nested_marshmallow_messages() -> None:
    error = InvalidRequest.from_messages({"feedback": {0: {"card": ["Missing data for required field."]}},
                                          "_schema": ["Invalid input type."]})
    assert [(i.expression, i.diagnostics) for i in error.issues] == [
        ("feedback[0].card", "feedback[0].card: Missing data for required field."),
        (None, "Invalid input type."),
    ]
