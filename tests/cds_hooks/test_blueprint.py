"""The protocol edge with a stand-in service: routing, errors, CORS, uuids, card records and feedback.

These tests do not depend on the neutropenia rules; a fixed handler returns known cards.
"""

from __future__ import annotations

import gzip
import io
import itertools
import json
import logging
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from cds_hooks.blueprint import ProtocolOptions, create_blueprint
from cds_hooks.errors import ServiceUnavailable
from cds_hooks.models import Action, Card, Coding, ServiceResponse, Source, Suggestion
from cds_hooks.prefetch import FetchPolicy, KeyState
from cds_hooks.registry import HookCall, ServiceDefinition, ServiceRegistry
from cds_hooks.request_context import REQUEST_ID
from cds_hooks.store import FeedbackStore
from cds_hooks.testing.tokens import ClientKey, TokenSigner, write_issuer_config
from cds_hooks.auth import AuthPolicy, TokenVerifier, load_trusted_issuers

NOW = datetime(2025, 3, 10, 12, 0, tzinfo=timezone.utc)
BASE = "https://cds.example.org"
SERVICE = "stand-in"
CALLS: list[HookCall] = []


def _handler(call: HookCall) -> ServiceResponse:
    CALLS.append(call)
    card = Card(summary="Stand-in card", indicator="warning",
                source=Source(label="Test", topic=Coding("https://example.org/kind", "neutropenia")),
                suggestions=[Suggestion(label="Order CBC", actions=[Action(
                    type="create", description="CBC", resource={"resourceType": "ServiceRequest"})])],
                selection_behavior="any",
                override_reasons=[Coding("https://example.org/r", "treated", "Already treated")])
    return ServiceResponse(cards=[card], extension={"org.example.result": {"keys": sorted(call.data.keys),
                                                                           "findings": []}})


DEFINITION = ServiceDefinition(
    id=SERVICE, hook="patient-view", description="A stand-in", handler=_handler,
    prefetch={"patient": "Patient/{{context.patientId}}", "labs": "Observation?patient={{context.patientId}}"},
    required_prefetch=frozenset({"labs"}), required_context=frozenset({"patientId", "userId"}))
REQUEST: dict[str, Any] = {
    "hook": "patient-view", "hookInstance": "hi-1",
    "context": {"userId": "Practitioner/p1", "patientId": "pat-1"},
    "prefetch": {"patient": None, "labs": {"resourceType": "Bundle", "type": "searchset"}},
}


def build_app(tmp_path: Path, *, verifier: TokenVerifier | None = None, cors: tuple[str, ...] = (),
              max_body: int = 1024 * 1024, store: Any = None) -> Flask:
    app = Flask("test")
    app.config["MAX_CONTENT_LENGTH"] = max_body
    counter = itertools.count()
    app.register_blueprint(create_blueprint(
        ServiceRegistry([DEFINITION]),
        options=ProtocolOptions(public_base_url=BASE, max_body_bytes=max_body, cors_origins=cors,
                                fetch_policy=FetchPolicy()),
        store=store or _store(tmp_path), verifier=verifier, clock=lambda: NOW,
        new_uuid=lambda: f"uuid-{next(counter)}"))
    return app


def _store(tmp_path: Path) -> FeedbackStore:
    store = FeedbackStore(f"sqlite:///{tmp_path}/f.sqlite3")
    store.create_schema()
    return store


@pytest.fixture
def store(tmp_path: Path) -> Iterator[FeedbackStore]:
    s = _store(tmp_path)
    yield s
    s.dispose()


@pytest.fixture
def client(tmp_path: Path, store: FeedbackStore) -> FlaskClient:
    CALLS.clear()
    return build_app(tmp_path, store=store).test_client()


def test_discovery_returns_exactly_the_registry(client: FlaskClient) -> None:
    response = client.get("/cds-services")
    assert response.status_code == 200
    assert response.json == ServiceRegistry([DEFINITION]).discovery()


def test_invoke_stamps_uuids_and_records_each_card_without_patient_data(client: FlaskClient,
                                                                          store: FeedbackStore) -> None:
    response = client.post(f"/cds-services/{SERVICE}", json=REQUEST)
    assert response.status_code == 200, response.json
    card = response.json["cards"][0]
    assert card["uuid"] == "uuid-0" and card["suggestions"][0]["uuid"] == "uuid-1"
    record = store.card("uuid-0")
    assert record is not None
    assert record["service_id"] == SERVICE and record["hook_instance"] == "hi-1"
    assert record["kind"] == "neutropenia" and record["indicator"] == "warning"
    assert "pat-1" not in json.dumps(record, default=str)


def test_handler_gets_classified_prefetch_and_the_injected_clock(client: FlaskClient) -> None:
    client.post(f"/cds-services/{SERVICE}", json=REQUEST)
    call = CALLS[-1]
    assert call.now == NOW
    assert call.data.keys["patient"].state is KeyState.EMPTY
    assert call.data.keys["labs"].state is KeyState.EMPTY


@pytest.mark.parametrize("prefetch, status", [
    ({"labs": {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "timeout"}]}}, 412),
    ({}, 412),
    ({"labs": None}, 200),
    ({"labs": {"resourceType": "Bundle", "type": "searchset", "entry": []}}, 200),
], ids=["operation-outcome-required-key", "absent-without-fhirServer", "null", "empty-bundle"])
def test_prefetch_states_decide_412(client: FlaskClient, prefetch: dict[str, Any], status: int) -> None:
    response = client.post(f"/cds-services/{SERVICE}", json={**REQUEST, "prefetch": prefetch})
    assert response.status_code == status
    if status == 412:
        assert response.json["resourceType"] == "OperationOutcome"
        assert ["prefetch.labs"] in [issue.get("expression") for issue in response.json["issue"]]


@pytest.mark.parametrize("method, path, body, status, mentions", [
    ("POST", "/cds-services/nope", REQUEST, 404, "nope"),
    ("POST", f"/cds-services/{SERVICE}", {**REQUEST, "hook": "order-sign"}, 400, "order-sign"),
    ("POST", f"/cds-services/{SERVICE}", {k: v for k, v in REQUEST.items() if k != "hookInstance"}, 400,
     "hookInstance"),
    ("POST", f"/cds-services/{SERVICE}", {**REQUEST, "context": {"userId": "Practitioner/p1"}}, 400,
     "context.patientId"),
    ("POST", f"/cds-services/{SERVICE}", {**REQUEST, "context": {"patientId": "1"}}, 400, "context.userId"),
    ("POST", f"/cds-services/{SERVICE}", {**REQUEST, "context": {"patientId": "../Patient", "userId": "Practitioner/p"}},
     400, "context.patientId"),
    ("POST", f"/cds-services/{SERVICE}", {**REQUEST, "context": {"patientId": "1", "userId": "p1"}}, 400,
     "context.userId"),
    ("POST", f"/cds-services/{SERVICE}", {**REQUEST, "fhirAuthorization": {
        "access_token": "t", "token_type": "Bearer", "expires_in": 60, "scope": "s", "subject": "x"}}, 400,
     "fhirServer"),
    ("GET", f"/cds-services/{SERVICE}", None, 405, "method not allowed"),
    ("DELETE", "/cds-services", None, 405, "method not allowed"),
    ("GET", "/nothing-here", None, 404, "not found"),
    ("POST", f"/cds-services/nope/feedback", {"feedback": []}, 404, "nope"),
], ids=["unknown-service", "hook-not-handled", "missing-hookInstance", "missing-patientId", "missing-userId",
        "patientId-not-a-fhir-id", "userId-not-type-slash-id", "fhirAuthorization-without-fhirServer",
        "get-on-service", "delete-on-discovery", "unknown-path", "feedback-unknown-service"])
def test_errors_are_operation_outcomes_naming_the_problem(client: FlaskClient, method: str, path: str,
                                                          body: Any, status: int, mentions: str) -> None:
    response = client.open(path, method=method, json=body)
    assert response.status_code == status
    assert response.mimetype == "application/json"
    assert response.json["resourceType"] == "OperationOutcome"
    text = json.dumps(response.json)
    assert mentions in text
    assert "Traceback" not in text


@pytest.mark.parametrize("data, content_type, status, mentions", [
    (b"{}", "text/plain", 415, "text/plain"),
    (b"hook=patient-view", "application/x-www-form-urlencoded", 415, "x-www-form-urlencoded"),
    (b"", "application/json", 400, "empty"),
    (b"{\"hook\": ", "application/json", 400, "not valid JSON"),
    (b"[1, 2]", "application/json", 400, "JSON object"),
    (b"\xff\xfe", "application/json", 400, "UTF-8"),
    (b'{"hook": NaN}', "application/json", 400, "NaN"),
    (b"[" * 100_000 + b"]" * 100_000, "application/json", 400, "nested"),
    (b"{}", "application/fhir+json", 400, "hook"),
], ids=["text-plain", "form", "empty-body", "truncated-json", "array-body", "not-utf8", "nan", "deep-nesting",
        "fhir-json-accepted-then-validated"])
def test_body_errors(client: FlaskClient, data: bytes, content_type: str, status: int, mentions: str) -> None:
    response = client.post(f"/cds-services/{SERVICE}", data=data, content_type=content_type)
    assert response.status_code == status
    assert mentions in json.dumps(response.json)


FEEDBACK_BODY = json.dumps({"feedback": [{"card": "c1", "outcome": "overridden",
                                          "outcomeTimestamp": "2025-03-10T12:05:00Z"}]}).encode()


@pytest.mark.parametrize("path, data, encoding, shown", [
    (f"/cds-services/{SERVICE}", gzip.compress(json.dumps(REQUEST).encode()), "gzip", "'gzip'"),
    (f"/cds-services/{SERVICE}", json.dumps(REQUEST).encode(), "br", "'br'"),
    (f"/cds-services/{SERVICE}", json.dumps(REQUEST).encode(), "deflate", "'deflate'"),
    (f"/cds-services/{SERVICE}", json.dumps(REQUEST).encode(), "GZIP", "'GZIP'"),
    (f"/cds-services/{SERVICE}", json.dumps(REQUEST).encode(), "identity, gzip", "'gzip'"),
    (f"/cds-services/{SERVICE}", json.dumps(REQUEST).encode(), "x-\x1b[2Jevil", "'x- [2Jevil'"),
    (f"/cds-services/{SERVICE}/feedback", gzip.compress(FEEDBACK_BODY), "gzip", "'gzip'"),
    (f"/cds-services/{SERVICE}/feedback", FEEDBACK_BODY, "br", "'br'"),
    (f"/cds-services/{SERVICE}", json.dumps(REQUEST).encode(), "x" * 60, "'" + "x" * 60 + "'"),
    (f"/cds-services/{SERVICE}", json.dumps(REQUEST).encode(), "x" * 61, "'" + "x" * 59 + "…'"),
], ids=["invoke-gzip", "invoke-br-on-a-plain-body", "invoke-deflate", "invoke-upper-case", "invoke-identity-then-gzip",
        "invoke-control-characters", "feedback-gzip", "feedback-br-on-a-plain-body", "coding-of-60-shown-whole",
        "coding-of-61-cut"])
def test_content_encoding_other_than_identity_is_415(client: FlaskClient, path: str, data: bytes, encoding: str,
                                                      shown: str) -> None:
    # Regression: the body was read as if plain: gzip got 400 "not valid UTF-8", br on a plain body a 200.
    response = client.post(path, data=data, content_type="application/json",
                           headers={"Content-Encoding": encoding})
    assert response.status_code == 415, response.json
    assert response.headers["Accept-Encoding"] == "identity"
    [issue] = response.json["issue"]
    assert issue["code"] == "not-supported" and f"Content-Encoding {shown} is not supported" in issue["diagnostics"]


@pytest.mark.parametrize("path, data, encoding", [
    (f"/cds-services/{SERVICE}", json.dumps(REQUEST).encode(), "identity"),
    (f"/cds-services/{SERVICE}", json.dumps(REQUEST).encode(), "IDENTITY"),
    (f"/cds-services/{SERVICE}", json.dumps(REQUEST).encode(), " Identity , identity"),
    (f"/cds-services/{SERVICE}", json.dumps(REQUEST).encode(), ""),
    (f"/cds-services/{SERVICE}/feedback", FEEDBACK_BODY, "identity"),
], ids=["invoke-identity", "invoke-upper-case", "invoke-listed-twice", "invoke-empty-header", "feedback-identity"])
def test_content_encoding_identity_is_accepted(client: FlaskClient, path: str, data: bytes, encoding: str) -> None:
    response = client.post(path, data=data, content_type="application/json", headers={"Content-Encoding": encoding})
    assert response.status_code == 200, response.json
    assert "Accept-Encoding" not in response.headers


@pytest.mark.parametrize("context, field", [
    ({"patientId": "pat-1\n", "userId": "Practitioner/p1"}, "context.patientId"),
    ({"patientId": "pat-1", "userId": "Practitioner/p1\n"}, "context.userId"),
], ids=["patientId-trailing-newline", "userId-trailing-newline"])
def test_context_ids_with_a_trailing_newline_are_refused(client: FlaskClient, context: dict[str, str],
                                                         field: str) -> None:
    # Regression: the id patterns ended in `$`, which also matches before a final "\n", so "pat-1\n" passed
    # as a FHIR id and reached the cards' suggestion resources.
    response = client.post(f"/cds-services/{SERVICE}", json={**REQUEST, "context": context})
    assert response.status_code == 400
    assert [field] in [issue.get("expression") for issue in response.json["issue"]]


@pytest.mark.parametrize("path, body, field", [
    (f"/cds-services/{SERVICE}", {**REQUEST, "hook": "\ud800"}, "hook"),
    (f"/cds-services/{SERVICE}", {**REQUEST, "prefetch": {"labs": {"resourceType": "Observation", "id": "\udfff"}}},
     "prefetch.labs.id"),
    (f"/cds-services/{SERVICE}", {**REQUEST, "prefetch": {"labs": None, "\ud800": None}}, "prefetch"),
    (f"/cds-services/{SERVICE}/feedback", {"feedback": [{"card": "c", "outcome": "overridden",
                                                         "outcomeTimestamp": "2025-03-10T12:00:00Z",
                                                         "overrideReason": {"userComment": "a\ud83d"}}]},
     "feedback[0].overrideReason.userComment"),
], ids=["hook", "prefetch-resource-id", "prefetch-member-name", "feedback-comment"])
def test_lone_surrogate_escapes_are_400_naming_the_field(client: FlaskClient, path: str, body: Any,
                                                         field: str) -> None:
    # Regression: json.loads accepts "\ud800" and yields a str that cannot be encoded as UTF-8; echoed in a
    # diagnostic, or stored as a feedback comment, it raised UnicodeEncodeError and the caller got a 500.
    response = client.post(path, data=json.dumps(body, ensure_ascii=True), content_type="application/json")
    assert response.status_code == 400
    assert response.json["issue"][0]["expression"] == [field]
    assert "surrogate" in response.json["issue"][0]["diagnostics"]


def test_a_valid_surrogate_pair_is_just_a_character(client: FlaskClient) -> None:
    body = {**REQUEST, "hookInstance": "hi-\U0001F600"}
    response = client.post(f"/cds-services/{SERVICE}", data=json.dumps(body, ensure_ascii=True),
                           content_type="application/json")
    assert response.status_code == 200


class InvalidChunkSize(Exception):
    """Stands in for gunicorn.http.errors.InvalidChunkSize (a plain Exception subclass)."""


class _BrokenFraming(io.RawIOBase):
    """A wsgi.input whose reads fail as gunicorn's does on a malformed chunked body."""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        raise InvalidChunkSize("Invalid chunk size: b'ZZZ'")


def test_a_body_the_server_cannot_read_is_400_not_500(client: FlaskClient) -> None:
    # Regression: an exception from wsgi.input (gunicorn's chunked decoder) reached the catch-all handler: a 500.
    response = client.post(f"/cds-services/{SERVICE}", content_type="application/json",
                           environ_overrides={"wsgi.input": io.BufferedReader(_BrokenFraming()),
                                              "CONTENT_LENGTH": "64"})
    assert response.status_code == 400
    assert "could not be read" in response.json["issue"][0]["diagnostics"]


def test_body_over_the_limit_is_413(tmp_path: Path) -> None:
    client = build_app(tmp_path, max_body=2048).test_client()
    padded = {**REQUEST, "extension": {"org.example.pad": "x" * 4096}}
    response = client.post(f"/cds-services/{SERVICE}", json=padded)
    assert response.status_code == 413
    assert response.json["issue"][0]["code"] == "too-costly"
    assert response.json["issue"][0]["diagnostics"] == "request body exceeds 2048 bytes"


def test_body_of_exactly_the_limit_is_read(tmp_path: Path) -> None:
    client = build_app(tmp_path, max_body=2048).test_client()
    body = json.dumps({**REQUEST, "extension": {"org.example.pad": ""}})
    body = json.dumps({**REQUEST, "extension": {"org.example.pad": "x" * (2048 - len(body))}})
    assert len(body) == 2048
    response = client.post(f"/cds-services/{SERVICE}", data=body, content_type="application/json")
    assert response.status_code == 200, response.get_data(as_text=True)


@pytest.mark.parametrize(("coding", "shown"),
                         (("gzip, chunked", "gzip"), ("deflate", "deflate"), ("identity, gzip", "gzip"),
                          ("y" * 61 + ", chunked", "y" * 59 + "…")),
                         ids=("gzip-chunked", "deflate", "identity-then-gzip", "long-coding-cut"))
def test_a_transfer_coding_other_than_chunked_is_501(client: FlaskClient, coding: str, shown: str) -> None:
    response = client.post(f"/cds-services/{SERVICE}", data=json.dumps(REQUEST), content_type="application/json",
                           headers={"Transfer-Encoding": coding})
    assert response.status_code == 501
    assert response.json["issue"][0]["diagnostics"].startswith(f"Transfer-Encoding '{shown}' is not supported")


class _FailingBody(io.RawIOBase):
    """A request body whose read fails with ``error``."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        raise self.error


@pytest.mark.parametrize(("error", "diagnostics"), [
    (TimeoutError("timed out"), "the request body was not received in time: send it at once"),
    (ConnectionResetError("reset"), f"POST /cds-services/{SERVICE}: bad request"),
], ids=["timed-out", "client-went-away"])
def test_a_body_that_cannot_be_received_is_400_saying_why(client: FlaskClient, error: Exception,
                                                          diagnostics: str) -> None:
    # A read that waited out the server's limit is not the client disconnecting, which werkzeug reports it as.
    response = client.post(f"/cds-services/{SERVICE}", content_type="application/json",
                           environ_overrides={"wsgi.input": _FailingBody(error), "CONTENT_LENGTH": "100"})
    assert response.status_code == 400
    assert response.json["issue"][0]["diagnostics"] == diagnostics


def test_errors_are_logged_by_severity_without_the_token(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # A refused token is a warning naming the reason (never the token), a 5xx an error; a client's own 4xx is
    # not logged at all (the request line says it).
    key = ClientKey.generate("ES384")
    secured = build_app(tmp_path, verifier=_verifier(tmp_path, key)).test_client()
    down = build_app(tmp_path, store=_DownStore()).test_client()
    token = TokenSigner(key).sign("https://cds.example.org/elsewhere")
    feedback = {"feedback": [{"card": "c", "outcome": "overridden", "outcomeTimestamp": "2025-03-10T12:00:00Z"}]}
    caplog.set_level(logging.DEBUG, logger="cds_hooks.http")
    assert secured.get("/cds-services", headers={"Authorization": f"Bearer {token}"}).status_code == 401
    assert down.post(f"/cds-services/{SERVICE}/feedback", json=feedback).status_code == 503
    assert down.post("/cds-services/unknown", json=REQUEST).status_code == 404
    records = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "cds_hooks.http" and r.msg != "request"]
    assert [level for level, _ in records] == [logging.WARNING, logging.ERROR]
    assert records[0][1].startswith("authentication failed: aud-mismatch: ")
    assert records[1][1] == "request failed: feedback store unavailable"
    assert token not in caplog.text and token.split(".")[2] not in caplog.text


def test_unknown_fields_and_extensions_are_ignored(client: FlaskClient) -> None:
    body = {**REQUEST, "somethingNew": 1, "extension": {"com.example.x": {"y": 1}},
            "context": {**REQUEST["context"], "encounterId": "e1", "newContextField": True}}
    assert client.post(f"/cds-services/{SERVICE}", json=body).status_code == 200


@pytest.mark.parametrize("path, method", [
    ("/cds-services", "GET"), (f"/cds-services/{SERVICE}", "POST"), (f"/cds-services/{SERVICE}/feedback", "POST"),
], ids=["discovery", "invoke", "feedback"])
def test_preflight_is_answered_with_cors_and_never_authenticated(tmp_path: Path, path: str, method: str) -> None:
    verifier = _verifier(tmp_path, ClientKey.generate())
    client = build_app(tmp_path, verifier=verifier, cors=("https://sandbox.cds-hooks.org",)).test_client()
    response = client.options(path, headers={"Origin": "https://sandbox.cds-hooks.org",
                                             "Access-Control-Request-Method": method,
                                             "Access-Control-Request-Headers": "authorization,content-type"})
    assert response.status_code == 204 and response.get_data() == b""
    assert "Content-Type" not in response.headers
    assert response.headers["Access-Control-Allow-Origin"] == "https://sandbox.cds-hooks.org"
    assert "Authorization" in response.headers["Access-Control-Allow-Headers"]
    assert "Content-Type" in response.headers["Access-Control-Allow-Headers"]
    assert set(response.headers["Access-Control-Allow-Methods"].split(", ")) == {"GET", "POST", "OPTIONS"}
    assert "Origin" in response.headers["Vary"]


@pytest.mark.parametrize("path, cors, origin", [
    ("/cds-services", ("https://sandbox.cds-hooks.org",), "https://sandbox.cds-hooks.org"),
    (f"/cds-services/{SERVICE}", ("*",), "https://sandbox.cds-hooks.org"),
    (f"/cds-services/{SERVICE}/feedback", ("https://sandbox.cds-hooks.org",), "https://evil.example"),
    (f"/cds-services/{SERVICE}", (), None),
    ("/healthz", (), None),
], ids=["discovery-allowlisted", "invoke-wildcard", "feedback-origin-not-allowed", "invoke-cors-off", "healthz"])
def test_preflight_answer_is_204_without_a_content_type(tmp_path: Path, path: str, cors: tuple[str, ...],
                                                        origin: str | None) -> None:
    # Regression: Flask's automatic OPTIONS answer was an empty 200 typed text/html; charset=utf-8.
    client = build_app(tmp_path, cors=cors).test_client()
    response = client.options(path, headers={"Origin": origin} if origin else {})
    assert response.status_code == 204
    assert response.get_data() == b""
    assert "Content-Type" not in response.headers
    assert "OPTIONS" in response.headers["Allow"]


def test_options_on_an_unknown_path_is_still_a_json_404(tmp_path: Path) -> None:
    response = build_app(tmp_path).test_client().options("/cds-services/x/y")
    assert response.status_code == 404 and response.mimetype == "application/json"


@pytest.mark.parametrize("origin, allowed", [
    ("https://sandbox.cds-hooks.org", True), ("https://evil.example", False),
], ids=["allowlisted", "not-allowlisted"])
def test_cors_headers_on_errors_too_and_only_for_allowed_origins(tmp_path: Path, origin: str, allowed: bool) -> None:
    verifier = _verifier(tmp_path, ClientKey.generate())
    client = build_app(tmp_path, verifier=verifier, cors=("https://sandbox.cds-hooks.org",)).test_client()
    response = client.post(f"/cds-services/{SERVICE}", json=REQUEST, headers={"Origin": origin})
    assert response.status_code == 401
    assert (response.headers.get("Access-Control-Allow-Origin") == origin) is allowed


def test_wildcard_cors(tmp_path: Path) -> None:
    client = build_app(tmp_path, cors=("*",)).test_client()
    response = client.get("/nothing", headers={"Origin": "https://any.example"})
    assert response.status_code == 404
    assert response.headers["Access-Control-Allow-Origin"] == "*"


def _verifier(tmp_path: Path, key: ClientKey) -> TokenVerifier:
    signer = TokenSigner(key)
    config = write_issuer_config(tmp_path / "issuers.json", [signer.issuer_entry()])
    return TokenVerifier(AuthPolicy(issuers=load_trusted_issuers(config)))


@pytest.mark.parametrize(
    ("called", "aud", "status"),
    [(f"/cds-services//{SERVICE}", f"/cds-services//{SERVICE}", 200),
     (f"/cds-services//{SERVICE}", f"/cds-services/{SERVICE}", 401),
     ("/cds-services//caf\u00e9", "/cds-services//caf\u00e9", 404),
     (f"/cds-services/{SERVICE}", f"/cds-services/{SERVICE}", 200)],
    ids=["doubled-slash-signed-as-called", "doubled-slash-signed-as-merged", "doubled-slash-non-ascii",
         "plain"],
)
def test_a_doubled_slash_is_routed_and_the_audience_is_the_path_as_called(tmp_path: Path, called: str, aud: str,
                                                                          status: int) -> None:
    # The Sandbox calls '{discovery URL}/{id}', so a discovery URL typed with a trailing slash gives '//': it is
    # routed like '/', but the client signed the URL it called, and only that audience is accepted.
    key = ClientKey.generate()
    client = build_app(tmp_path, verifier=_verifier(tmp_path, key)).test_client()
    token = TokenSigner(key).sign(BASE + aud)
    response = client.post(called, json=REQUEST, headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == status, response.get_data(as_text=True)


@pytest.mark.parametrize("path, method, body", [
    ("/cds-services", "GET", None),
    (f"/cds-services/{SERVICE}", "POST", REQUEST),
    (f"/cds-services/{SERVICE}/feedback", "POST", {"feedback": [{"card": "c", "outcome": "overridden",
                                                                  "outcomeTimestamp": "2025-03-10T12:00:00Z"}]}),
], ids=["discovery", "invoke", "feedback"])
def test_auth_on_every_cds_route(tmp_path: Path, path: str, method: str, body: Any) -> None:
    key = ClientKey.generate()
    signer = TokenSigner(key)
    client = build_app(tmp_path, verifier=_verifier(tmp_path, key)).test_client()
    assert client.open(path, method=method, json=body).status_code == 401
    good = {"Authorization": f"Bearer {signer.sign(BASE + path)}"}
    assert client.open(path, method=method, json=body, headers=good).status_code == 200
    wrong_aud = {"Authorization": f"Bearer {signer.sign(BASE + '/cds-services/other')}"}
    denied = client.open(path, method=method, json=body, headers=wrong_aud)
    assert denied.status_code == 401
    assert denied.json == {"resourceType": "OperationOutcome",
                           "issue": [{"severity": "error", "code": "login", "diagnostics": "unauthorized"}]}


def test_health_routes_need_no_token(tmp_path: Path) -> None:
    client = build_app(tmp_path, verifier=_verifier(tmp_path, ClientKey.generate())).test_client()
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").json == {"status": "ready"}


def test_feedback_is_stored_and_duplicates_are_idempotent(client: FlaskClient, store: FeedbackStore) -> None:
    card = client.post(f"/cds-services/{SERVICE}", json=REQUEST).json["cards"][0]
    item = {"card": card["uuid"], "outcome": "accepted",
            "acceptedSuggestions": [{"id": card["suggestions"][0]["uuid"]}], "outcomeTimestamp": "2025-03-10T12:01:00Z"}
    for _ in range(2):
        response = client.post(f"/cds-services/{SERVICE}/feedback", json={"feedback": [item]})
        assert response.status_code == 200 and response.json == {}
    rows = store.feedback_for_card(card["uuid"])
    assert len(rows) == 1
    assert rows[0]["unknown_card"] is False


def test_feedback_for_an_unknown_card_is_kept_and_flagged(client: FlaskClient, store: FeedbackStore) -> None:
    item = {"card": "never-issued", "outcome": "overridden", "outcomeTimestamp": "2025-03-10T12:01:00Z"}
    assert client.post(f"/cds-services/{SERVICE}/feedback", json={"feedback": [item]}).status_code == 200
    assert store.feedback_for_card("never-issued")[0]["unknown_card"] is True


class _DownStore:
    """A store whose database is unreachable."""

    def save_feedback(self, *args: Any) -> Any:
        raise ServiceUnavailable("feedback store unavailable")

    def record_cards(self, *args: Any) -> Any:
        raise ServiceUnavailable("feedback store unavailable")

    def ping(self) -> bool:
        return False


def test_store_down_gives_503_for_feedback_but_cards_are_still_served(tmp_path: Path,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    client = build_app(tmp_path, store=_DownStore()).test_client()
    caplog.set_level(logging.ERROR)
    invoke = client.post(f"/cds-services/{SERVICE}", json=REQUEST)
    assert invoke.status_code == 200 and invoke.json["cards"]
    assert "could not record 1 card" in caplog.text
    feedback = client.post(f"/cds-services/{SERVICE}/feedback", json={"feedback": [
        {"card": "c", "outcome": "overridden", "outcomeTimestamp": "2025-03-10T12:01:00Z"}]})
    assert feedback.status_code == 503
    assert feedback.headers["Retry-After"]
    assert feedback.json["resourceType"] == "OperationOutcome"
    assert client.get("/readyz").status_code == 503


def test_a_bug_in_a_handler_is_logged_as_an_error_with_its_stack(caplog: pytest.LogCaptureFixture) -> None:
    def broken(call: HookCall) -> ServiceResponse:
        raise KeyError("boom")

    app = Flask("broken")
    app.register_blueprint(create_blueprint(
        ServiceRegistry([ServiceDefinition(id=SERVICE, hook="patient-view", description="d", handler=broken)]),
        options=ProtocolOptions(), store=_DownStore(), verifier=None))
    caplog.set_level(logging.INFO, logger="cds_hooks.http")
    assert app.test_client().post(f"/cds-services/{SERVICE}", json=REQUEST).status_code == 500
    records = [r for r in caplog.records if r.name == "cds_hooks.http" and r.msg != "request"]
    assert [(r.levelno, r.getMessage()) for r in records] == [
        (logging.ERROR, "unhandled error in POST /cds-services/<service_id>"),
        (logging.ERROR, "request failed: internal error; the request id in the logs identifies it")]
    assert records[0].exc_info is not None


def test_a_bug_in_a_handler_is_a_500_outcome_without_a_stack_trace() -> None:
    def broken(call: HookCall) -> ServiceResponse:
        raise KeyError("secret patient value")

    broken_definition = ServiceDefinition(id=SERVICE, hook="patient-view", description="d", handler=broken)
    app = Flask("broken")
    app.register_blueprint(create_blueprint(ServiceRegistry([broken_definition]), options=ProtocolOptions(),
                                            store=_DownStore(), verifier=None))
    response = app.test_client().post(f"/cds-services/{SERVICE}", json=REQUEST)
    assert response.status_code == 500
    assert response.json["issue"][0]["code"] == "exception"
    assert "secret" not in response.get_data(as_text=True)


def test_every_answer_is_uncached_unsniffed_and_logged_by_route_with_its_request_id(
        client: FlaskClient, caplog: pytest.LogCaptureFixture) -> None:
    # Cards and OperationOutcomes carry patient data: no cache may keep them. The request line names the route
    # template, never the path (ids), and carries the request's id like every line logged while it runs.
    ids: list[str] = []

    class RequestIds(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            ids.append(REQUEST_ID.get())
            return True

    logger = logging.getLogger("cds_hooks.http")
    capture = RequestIds()
    logger.addFilter(capture)
    caplog.set_level(logging.INFO, logger="cds_hooks.http")
    try:
        responses = [client.get("/cds-services", headers={"X-Request-ID": "rid-1"}),
                     client.post(f"/cds-services/{SERVICE}", json=REQUEST, headers={"X-Request-ID": "rid-2"}),
                     client.post("/cds-services/pat-1", json=REQUEST, headers={"X-Request-ID": "rid-3"}),
                     client.get("/nowhere/pat-1", headers={"X-Request-ID": "rid-4"})]
    finally:
        logger.removeFilter(capture)
    assert [r.status_code for r in responses] == [200, 200, 404, 404]
    for response in responses:
        assert (response.headers["Cache-Control"], response.headers["X-Content-Type-Options"]) == (
            "no-store", "nosniff")
    records = [r for r in caplog.records if r.name == "cds_hooks.http" and r.getMessage() == "request"]
    assert [(r.__dict__["route"], r.__dict__["status"]) for r in records] == [
        ("/cds-services", 200), ("/cds-services/<service_id>", 200), ("/cds-services/<service_id>", 404),
        ("<unmatched>", 404)]
    assert ids == ["rid-1", "rid-2", "rid-3", "rid-4"]
    assert all(0 <= r.__dict__["duration_ms"] < 60_000 for r in records) and records[1].__dict__["duration_ms"] > 0


def test_the_request_id_ends_with_the_request(client: FlaskClient) -> None:
    # A log line the worker thread writes after the request (or between requests) must not carry its id.
    assert client.get("/healthz", headers={"X-Request-ID": "abc-123"}).headers["X-Request-ID"] == "abc-123"
    assert REQUEST_ID.get() == "-"


def test_request_id_is_echoed_or_generated(client: FlaskClient) -> None:
    assert client.get("/healthz", headers={"X-Request-ID": "abc-123"}).headers["X-Request-ID"] == "abc-123"
    generated = client.get("/healthz", headers={"X-Request-ID": "bad id; drop table"}).headers["X-Request-ID"]
    assert generated and generated != "bad id; drop table" and " " not in generated
