"""Every protocol error renders as an OperationOutcome with the right status and issue code."""

from __future__ import annotations

import pytest

from cds_hooks.errors import (
    CDSHooksError,
    InternalError,
    InvalidRequest,
    Issue,
    MethodNotAllowed,
    PayloadTooLarge,
    PreconditionFailed,
    ServiceUnavailable,
    TransferCodingNotImplemented,
    Unauthorized,
    UnknownService,
    UnsupportedMediaType,
    operation_outcome,
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


@pytest.mark.parametrize(
    ("error", "status", "message", "headers"),
    [
        (CDSHooksError(), 500, "internal error", {}),
        (InvalidRequest(), 400, "invalid request", {}),
        (Unauthorized(), 401, "unauthorized", {"WWW-Authenticate": 'Bearer realm="cds-services"'}),
        (UnknownService(), 404, "not found", {}),
        (MethodNotAllowed(), 405, "method not allowed", {}),
        (PayloadTooLarge(), 413, "request body too large", {}),
        (UnsupportedMediaType(), 415, "request body must be JSON (Content-Type: application/json)", {}),
        (TransferCodingNotImplemented(), 501, "the transfer coding is not supported", {}),
        (ServiceUnavailable(), 503, "service temporarily unavailable", {"Retry-After": "5"}),
        (InternalError(), 500, "internal error; the request id in the logs identifies it", {}),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, Exception) else "",
)
def test_each_error_default_status_message_and_headers(error: CDSHooksError, status: int, message: str,
                                                       headers: dict[str, str]) -> None:
    # What a client receives when a view just raises: the status, one issue saying what failed, and the headers
    # the status needs (a 401's challenge, a 503's retry delay).
    assert (error.status_code, error.message, str(error), error.headers) == (status, message, message, headers)
    assert error.to_outcome()["issue"] == [
        {"severity": "error", "code": operation_outcome(status, [Issue("x")])["issue"][0]["code"],
         "diagnostics": message}]


@pytest.mark.parametrize(
    ("status", "code"),
    [(400, "invalid"), (401, "login"), (403, "forbidden"), (404, "not-found"), (405, "not-supported"),
     (412, "processing"), (413, "too-costly"), (415, "not-supported"), (429, "throttled"), (500, "exception"),
     (501, "not-supported"), (503, "transient"), (418, "processing")],
    ids=lambda value: str(value) if isinstance(value, int) else "",
)
def test_operation_outcome_issue_code_by_status(status: int, code: str) -> None:
    outcome = operation_outcome(status, [Issue("what failed", expression="context.patientId"),
                                         Issue("explicit", code="security", severity="warning")])
    assert outcome == {"resourceType": "OperationOutcome", "issue": [
        {"severity": "error", "code": code, "diagnostics": "what failed", "expression": ["context.patientId"]},
        {"severity": "warning", "code": "security", "diagnostics": "explicit"}]}


def test_precondition_failed_says_whether_each_key_was_sent() -> None:
    error = PreconditionFailed({"labs": "timed out", "vitals": "an OperationOutcome"}, sent={"vitals"})
    assert [i.diagnostics for i in error.issues] == [
        "prefetch key 'labs' was not provided and could not be fetched: timed out",
        "prefetch key 'vitals' was sent but cannot be used: an OperationOutcome"]
    assert error.message == "required prefetch data unavailable: labs, vitals"
    assert error.missing == {"labs": "timed out", "vitals": "an OperationOutcome"}


def test_invalid_request_flattens_lists_of_objects_and_other_values() -> None:
    error = InvalidRequest.from_messages({"cards": [{"uuid": ["Not a valid UUID.", "Required."]}, 7],
                                          "extension": {"x": ("a", 5)}})
    assert [(i.expression, i.diagnostics) for i in error.issues] == [
        ("cards.uuid", "cards.uuid: Not a valid UUID. Required."),
        ("cards", "cards: 7"),
        ("extension.x", "extension.x: a"),
        ("extension.x", "extension.x: 5"),
    ]
    assert error.message == "; ".join(i.diagnostics for i in error.issues)
