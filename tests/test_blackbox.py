"""Black-box: the real service under gunicorn on loopback, driven by the Sandbox-like client harness.

Auth is on, as in production. Trusted issuers: the Sandbox (ES384, pinned JWKS, its `jku` allowlisted but
never reachable offline), an EHR whose keys are fetched from an allowlisted `jku` on a loopback server, and an
Epic-like issuer (RS384, `nbf`, `sub`, an extra configured audience).
"""

from __future__ import annotations

import gzip
import json
import re
import socket
import time
import uuid
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import requests

from cds_hooks.store import FeedbackStore
from cds_hooks.testing.client import SANDBOX_ORIGIN, SandboxClient
from cds_hooks.testing.tokens import SANDBOX_JKU, ClientKey, TokenSigner, tamper_payload, write_issuer_config
from tests.support.fhir_stub_server import FhirStub, operation_outcome, searchset
from tests.support.gunicorn import GunicornServer
from tests.test_openapi import assert_valid, documented_json_schema

pytestmark = pytest.mark.gunicorn

SERVICE = "neutropenia-patient-view"
PATIENT = "bb-patient-7319"
CONTEXT = {"userId": "Practitioner/bb-user-1", "patientId": PATIENT}
EHR_ISS = "https://ehr.example.org/fhir"
EPIC_ISS = "https://epic.example.org/api/FHIR/R4"
EPIC_AUDIENCE = "https://example.com/savecdshooksrequest"
ACCESS_TOKEN = "fhir-access-token-" + uuid.uuid4().hex


def _iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def febrile_prefetch() -> dict[str, Any]:
    """ANC 400/uL two hours ago and 38.6 °C one hour ago: febrile neutropenia."""
    now = datetime.now(timezone.utc)
    anc = {"resourceType": "Observation", "id": "bb-anc-1", "status": "final",
           "code": {"coding": [{"system": "http://loinc.org", "code": "751-8"}]},
           "subject": {"reference": f"Patient/{PATIENT}"}, "effectiveDateTime": _iso(now - timedelta(hours=2)),
           "valueQuantity": {"value": 0.4, "unit": "10*3/uL", "system": "http://unitsofmeasure.org",
                             "code": "10*3/uL"}}
    temp = {"resourceType": "Observation", "id": "bb-temp-1", "status": "final",
            "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                      "code": "vital-signs"}]}],
            "code": {"coding": [{"system": "http://loinc.org", "code": "8310-5"}]},
            "subject": {"reference": f"Patient/{PATIENT}"}, "effectiveDateTime": _iso(now - timedelta(hours=1)),
            "valueQuantity": {"value": 38.6, "unit": "Cel", "system": "http://unitsofmeasure.org", "code": "Cel"}}
    patient = {"resourceType": "Patient", "id": PATIENT, "birthDate": "1970-05-01",
               "name": [{"family": "Doe", "given": ["Jan"]}]}
    return {"patient": patient, "labs": searchset([anc]), "vitals": searchset([temp]),
            "conditions": searchset([]), "medications": searchset([])}


@dataclass
class Deployment:
    """A running service with its clients, keys and store."""

    server: GunicornServer
    sandbox: SandboxClient
    ehr: SandboxClient
    epic: SandboxClient
    ehr_signer: TokenSigner
    jwks_stub: FhirStub
    database_url: str

    def client(self, signer: TokenSigner | None) -> SandboxClient:
        """Another client on the same service."""
        return SandboxClient(self.server.base_url, signer)


def _deploy(tmp_path: Path, start: Callable[[dict[str, str]], GunicornServer], jwks_stub: FhirStub,
            fhir_stub: FhirStub | None, database_url: str) -> Deployment:
    sandbox_signer = TokenSigner(ClientKey.generate("ES384"), jku=SANDBOX_JKU)
    ehr_jku = jwks_stub.url("/ehr/jwks.json")
    ehr_signer = TokenSigner(ClientKey.generate("ES384"), iss=EHR_ISS, jku=ehr_jku)
    jwks_stub.add("/ehr/jwks.json", ehr_signer.jwks(), content_type="application/json")
    epic_signer = TokenSigner(ClientKey.generate("RS384"), iss=EPIC_ISS)
    issuers = write_issuer_config(tmp_path / "issuers.json", [
        sandbox_signer.issuer_entry(),
        ehr_signer.issuer_entry(pinned=False),
        epic_signer.issuer_entry(audiences=[EPIC_AUDIENCE]),
    ])
    env = {
        "CDS_AUTH": "required",
        "CDS_PUBLIC_BASE_URL": "{base_url}",
        "CDS_TRUSTED_ISSUERS_FILE": str(issuers),
        "CDS_DATABASE_URL": database_url,
        "CDS_CORS_ORIGINS": SANDBOX_ORIGIN,
        "CDS_FHIR_ALLOWED_BASES": fhir_stub.url("/fhir") if fhir_stub else "",
        "CDS_FHIR_DEADLINE_SECONDS": "2.0",
    }
    server = start(env)
    return Deployment(server, SandboxClient(server.base_url, sandbox_signer),
                      SandboxClient(server.base_url, ehr_signer), SandboxClient(server.base_url, epic_signer),
                      ehr_signer, jwks_stub, database_url)


@pytest.fixture
def deployment(tmp_path: Path, gunicorn_factory: Any, make_fhir_stub: Any) -> Iterator[Deployment]:
    jwks_stub, fhir_stub = make_fhir_stub(), make_fhir_stub()
    deployment = _deploy(tmp_path, gunicorn_factory, jwks_stub, fhir_stub,
                         f"sqlite:///{tmp_path}/feedback.sqlite3")
    deployment.fhir_stub = fhir_stub  # type: ignore[attr-defined]
    yield deployment


def _store(deployment: Deployment) -> FeedbackStore:
    return FeedbackStore(deployment.database_url)


def test_sandbox_flow_preflight_discovery_invoke_feedback(deployment: Deployment) -> None:
    client = deployment.sandbox
    discovery = client.discover()
    assert discovery.status_code == 200
    service = next(s for s in discovery.json()["services"] if s["id"] == SERVICE)
    assert service["hook"] == "patient-view" and service["prefetch"]

    response = client.invoke(SERVICE, CONTEXT, prefetch=febrile_prefetch())
    assert response.status_code == 200, response.text
    body = response.json()
    assessment = body["extension"]["org.neutropenia-cds.assessment"]
    assert assessment["evaluatedAt"]
    assert assessment["findings"][0] == "febrile-neutropenia"
    cards = body["cards"]
    assert cards[0]["indicator"] == "critical"
    assert all(card["uuid"] for card in cards)

    # Every call was preceded by a preflight without a token, and every preflight allowed the Sandbox.
    preflights = [entry for entry in client.sent if entry[0] == "OPTIONS"]
    assert len(preflights) == 2 and all(status == 204 for _, _, status in preflights)
    options = requests.options(f"{client.discovery_url}/{SERVICE}", headers={
        "Origin": SANDBOX_ORIGIN, "Access-Control-Request-Method": "POST"}, timeout=5)
    assert options.headers["Access-Control-Allow-Origin"] == SANDBOX_ORIGIN
    assert options.status_code == 204 and "Content-Type" not in options.headers
    assert response.headers["Access-Control-Allow-Origin"] == SANDBOX_ORIGIN

    store = _store(deployment)
    try:
        for card in cards:
            record = store.card(card["uuid"])
            assert record is not None and record["service_id"] == SERVICE
        critical = cards[0]
        reason = critical["overrideReasons"][0]
        assert client.dismiss(SERVICE, critical, reason=reason).status_code == 200
        rows = store.feedback_for_card(critical["uuid"])
        assert len(rows) == 1 and rows[0]["outcome"] == "overridden" and rows[0]["unknown_card"] is False
        assert rows[0]["override_code"] == reason["code"]
        with_suggestions = next(card for card in cards if card.get("suggestions"))
        assert client.accept(SERVICE, with_suggestions, with_suggestions["suggestions"][0]).status_code == 200
        accepted = store.feedback_for_card(with_suggestions["uuid"])
        assert [row["outcome"] for row in accepted].count("accepted") == 1
    finally:
        store.dispose()


def test_no_prefetch_fetches_from_the_fhir_server_with_the_bearer_token(deployment: Deployment) -> None:
    fhir: FhirStub = deployment.fhir_stub  # type: ignore[attr-defined]
    data = febrile_prefetch()
    fhir.add(f"/fhir/Patient/{PATIENT}", data["patient"])
    # Labs and vitals are both Observation searches; the service classifies what comes back by content.
    fhir.add("/fhir/Observation", searchset([data["labs"]["entry"][0]["resource"],
                                             data["vitals"]["entry"][0]["resource"]]))
    fhir.add("/fhir/Condition", data["conditions"])
    fhir.add("/fhir/MedicationRequest", data["medications"])
    authorization = {"access_token": ACCESS_TOKEN, "token_type": "Bearer", "expires_in": 300,
                     "scope": "user/Observation.read user/Patient.read", "subject": "cds-service"}
    response = deployment.sandbox.invoke(SERVICE, CONTEXT, fhir_server=fhir.url("/fhir"),
                                         fhir_authorization=authorization)
    assert response.status_code == 200, response.text
    assert fhir.requests, "the service fetched nothing"
    assert all(r.authorization == f"Bearer {ACCESS_TOKEN}" for r in fhir.requests)
    assessment = response.json()["extension"]["org.neutropenia-cds.assessment"]
    assert assessment["findings"][0] == "febrile-neutropenia"
    assert "Observation/bb-anc-1" in assessment["anc"]["sources"]


def test_prefetch_null_is_no_data_and_operation_outcome_is_unavailable(deployment: Deployment) -> None:
    empty = {"patient": None, "labs": None, "vitals": searchset([]), "conditions": None, "medications": None}
    assert deployment.sandbox.invoke(SERVICE, CONTEXT, prefetch=empty).status_code == 200
    failed = {**empty, "labs": operation_outcome("the lab system timed out", code="timeout")}
    response = deployment.sandbox.invoke(SERVICE, CONTEXT, prefetch=failed)
    assert response.status_code == 412
    assert response.json()["resourceType"] == "OperationOutcome"
    assert ["prefetch.labs"] in [i.get("expression") for i in response.json()["issue"]]


def test_no_fhir_server_and_no_prefetch_is_412_naming_the_keys(deployment: Deployment) -> None:
    response = deployment.sandbox.invoke(SERVICE, CONTEXT)
    assert response.status_code == 412
    expressions = [i.get("expression", [None])[0] for i in response.json()["issue"]]
    assert {"prefetch.labs", "prefetch.vitals"} <= set(expressions)


def test_fhir_server_not_on_the_allowlist_is_never_called(deployment: Deployment, make_fhir_stub: Any) -> None:
    elsewhere: FhirStub = make_fhir_stub()
    response = deployment.sandbox.invoke(SERVICE, CONTEXT, fhir_server=elsewhere.url("/fhir"),
                                         fhir_authorization={"access_token": ACCESS_TOKEN, "token_type": "Bearer",
                                                             "expires_in": 300, "scope": "s", "subject": "x"})
    assert response.status_code == 412
    assert elsewhere.requests == []


def test_jku_issuer_keys_are_fetched_from_the_allowlisted_url(deployment: Deployment) -> None:
    assert deployment.ehr.discover().status_code == 200
    assert deployment.jwks_stub.requests_for("/ehr/jwks.json")


def test_rs384_with_nbf_sub_and_a_configured_audience(deployment: Deployment) -> None:
    now = int(time.time())
    claims = {"nbf": now - 300, "sub": "epic-cds-client"}
    assert deployment.epic.discover(extra_claims=claims).status_code == 200
    assert deployment.epic.discover(aud=EPIC_AUDIENCE, extra_claims=claims).status_code == 200


def _attacks(deployment: Deployment) -> dict[str, tuple[SandboxClient, dict[str, Any]]]:
    signer = deployment.sandbox.signer
    assert signer is not None
    url = deployment.sandbox.discovery_url
    stranger = TokenSigner(ClientKey.generate("ES384"), iss="https://unknown.example.org")
    unlisted = TokenSigner(signer.key, jku=deployment.jwks_stub.url("/not-listed/jwks.json"))
    return {
        "alg-none": (deployment.sandbox, {"token": signer.unsigned(url)}),
        "hs256-public-key-as-secret": (deployment.sandbox, {"token": signer.hs256_with_public_key(url)}),
        "expired": (deployment.sandbox, {"token": signer.sign(url, now=time.time() - 3600)}),
        "wrong-aud": (deployment.sandbox, {"token": signer.sign(url + "/other")}),
        "localhost-is-not-127": (deployment.sandbox, {"token": signer.sign(url.replace("127.0.0.1", "localhost"))}),
        "unknown-iss": (deployment.sandbox, {"token": stranger.sign(url)}),
        "unlisted-jku": (deployment.sandbox, {"token": unlisted.sign(url)}),
        "tampered-signature": (deployment.sandbox, {"token": tamper_payload(signer.sign(url), {"iss": EHR_ISS})}),
        "no-token": (deployment.sandbox, {"token": None}),
    }


ATTACKS = ["alg-none", "hs256-public-key-as-secret", "expired", "wrong-aud", "localhost-is-not-127",
           "unknown-iss", "unlisted-jku", "tampered-signature", "no-token"]


@pytest.mark.parametrize("attack", ATTACKS)
def test_bad_tokens_get_401_without_detail(deployment: Deployment, attack: str) -> None:
    _, spec = _attacks(deployment)[attack]
    headers = {"Authorization": f"Bearer {spec['token']}"} if spec["token"] else {}
    response = requests.get(deployment.sandbox.discovery_url, headers=headers, timeout=5)
    assert response.status_code == 401
    assert response.json() == {"resourceType": "OperationOutcome", "issue": [
        {"severity": "error", "code": "login", "diagnostics": "unauthorized"}]}
    assert deployment.jwks_stub.requests_for("/not-listed/jwks.json") == []
    if spec["token"]:
        assert spec["token"] not in deployment.server.log()
        assert spec["token"].split(".")[1] not in deployment.server.log()


def test_replayed_jti_is_refused(deployment: Deployment) -> None:
    signer = deployment.sandbox.signer
    assert signer is not None
    token = signer.sign(deployment.sandbox.discovery_url)
    headers = {"Authorization": f"Bearer {token}"}
    assert requests.get(deployment.sandbox.discovery_url, headers=headers, timeout=5).status_code == 200
    # Two workers, one shared replay store: whichever worker gets a replay refuses it.
    replays = [requests.get(deployment.sandbox.discovery_url, headers=headers, timeout=5).status_code
               for _ in range(6)]
    assert replays == [401] * 6


def test_logs_hold_no_tokens_and_no_patient_data(deployment: Deployment) -> None:
    data = febrile_prefetch()
    client = deployment.sandbox
    tokens_seen: list[str] = []
    original = client.token

    def recording_token(url: str, **options: Any) -> str | None:
        token = original(url, **options)
        if token:
            tokens_seen.append(token)
        return token

    client.token = recording_token  # type: ignore[method-assign]
    client.invoke(SERVICE, CONTEXT, prefetch=data)
    client.invoke(SERVICE, CONTEXT, prefetch={**data, "labs": {"resourceType": "Bundle", "entry": [{"x": 1}]}})
    client.invoke(SERVICE, {"userId": "Practitioner/x", "patientId": "../../etc"}, prefetch=data)
    client.invoke(SERVICE, CONTEXT, fhir_server="https://not-allowed.example.org/fhir",
                  fhir_authorization={"access_token": ACCESS_TOKEN, "token_type": "Bearer", "expires_in": 300,
                                      "scope": "s", "subject": "x"})
    client.feedback(SERVICE, [{"card": "x", "outcome": "overridden", "outcomeTimestamp": "2025-01-01T00:00:00Z",
                               "overrideReason": {"userComment": "patient Jan Doe refused"}}])
    log = deployment.server.log()
    assert '"route": "/cds-services/<service_id>"' in log, "the access log line is missing"
    forbidden = [ACCESS_TOKEN, PATIENT, "bb-anc-1", "bb-temp-1", "Jan Doe", "38.6", "1970-05-01"]
    forbidden += [part for token in tokens_seen for part in token.split(".")]
    leaked = [value for value in forbidden if value in log]
    assert leaked == []


def test_feedback_is_durable_in_postgresql(tmp_path: Path, gunicorn_factory: Any, make_fhir_stub: Any,
                                          postgres_server: Any) -> None:
    with postgres_server.fresh_schema() as url:
        deployment = _deploy(tmp_path, gunicorn_factory, make_fhir_stub(), None, url)
        sent = []
        for index in range(20):
            item = {"card": f"pg-card-{index}", "outcome": "overridden",
                    "outcomeTimestamp": "2025-03-10T12:00:00Z"}
            response = deployment.sandbox.feedback(SERVICE, [item])
            assert response.status_code == 200
            sent.append(item["card"])
        store = FeedbackStore(url)
        try:
            assert all(len(store.feedback_for_card(card)) == 1 for card in sent)
            assert deployment.server.process.poll() is None
            assert requests.get(deployment.server.base_url + "/readyz", timeout=5).status_code == 200
        finally:
            store.dispose()
        deployment.server.stop()


def test_chunked_body_over_the_limit_is_413_under_gunicorn(tmp_path: Path, gunicorn_factory: Any) -> None:
    server = gunicorn_factory({"CDS_AUTH": "disabled", "CDS_DATABASE_URL": f"sqlite:///{tmp_path}/f.sqlite3",
                               "CDS_MAX_BODY_BYTES": "512"})
    url = f"{server.base_url}/cds-services/{SERVICE}"

    def chunks(size: int) -> Iterator[bytes]:  # a generator body makes requests send Transfer-Encoding: chunked
        yield json.dumps({"hook": "patient-view", "pad": "x" * size}).encode()

    big = requests.post(url, data=chunks(2048), headers={"Content-Type": "application/json"}, timeout=10)
    assert big.status_code == 413 and big.json()["issue"][0]["code"] == "too-costly"
    small = requests.post(url, data=chunks(10), headers={"Content-Type": "application/json"}, timeout=10)
    assert small.status_code == 400 and "hookInstance" in small.text


def test_auth_disabled_start_logs_a_loud_warning(tmp_path: Path, gunicorn_factory: Any) -> None:
    server = gunicorn_factory({"CDS_AUTH": "disabled", "CDS_DATABASE_URL": f"sqlite:///{tmp_path}/f.sqlite3"})
    assert requests.get(server.base_url + "/cds-services", timeout=5).status_code == 200
    assert "AUTHENTICATION IS DISABLED" in server.log()


def test_every_log_line_is_json_including_gunicorns_own(tmp_path: Path, gunicorn_factory: Any) -> None:
    server = gunicorn_factory({"CDS_AUTH": "disabled", "CDS_DATABASE_URL": f"sqlite:///{tmp_path}/f.sqlite3"})
    assert requests.get(server.base_url + "/cds-services", timeout=5).status_code == 200
    server.stop()
    lines = [line for line in server.log().splitlines() if line.strip()]
    loggers = {json.loads(line)["logger"] for line in lines}  # raises on a line that is not JSON
    assert {"gunicorn.error", "cds_hooks.http"} <= loggers, loggers


def test_no_gunicorn_control_socket_is_opened(tmp_path: Path, gunicorn_factory: Any) -> None:
    # gunicorn >= 25.1 opens a control socket (worker count, reload, shutdown) under $HOME by default.
    home = tmp_path / "home"
    home.mkdir()
    server = gunicorn_factory({"CDS_AUTH": "disabled", "CDS_DATABASE_URL": f"sqlite:///{tmp_path}/f.sqlite3",
                               "HOME": str(home)})
    assert requests.get(server.base_url + "/healthz", timeout=5).status_code == 200
    assert not (home / ".gunicorn").exists()


def test_bad_configuration_stops_the_start_with_a_clear_message(tmp_path: Path, gunicorn_factory: Any) -> None:
    with pytest.raises(RuntimeError, match="CDS_PUBLIC_BASE_URL is required"):
        gunicorn_factory({"CDS_DATABASE_URL": f"sqlite:///{tmp_path}/f.sqlite3"})


def _raw_http(base_url: str, request: bytes) -> bytes:
    """Send ``request`` verbatim on a new connection and read the whole answer (the server closes it)."""
    host, port = base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


@pytest.mark.parametrize("request_bytes, status, operation", [
    (b"GET /cds-services HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + b"A" * 40 * 1024 + b"\r\n\r\n", 431,
     ("/cds-services", "get")),
    (b"POST /cds-services/" + b"x" * 5000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414, ("/cds-services/{id}", "post")),
    (b"GET /cds-services HTTP/1.1\r\nHost: x\r\nBearer {token}\r\n\r\n", 400, ("/cds-services", "get")),
    (b"POST /cds-services/x HTTP/1.1\r\nHost: x\r\nExpect: 200-ok {token}\r\nContent-Length: 2\r\n\r\n{}", 417,
     ("/cds-services/{id}", "post")),
    (b"POST /cds-services/x/feedback HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: br {token}\r\n\r\n", 501,
     ("/cds-services/{id}/feedback", "post")),
    (b"GET /healthz HTTP/1.1\r\nHost: x\r\nExpect: 200-ok {token}\r\n\r\n", 417, ("/healthz", "get")),
    (b"OPTIONS /cds-services HTTP/1.1\r\nHost: x\r\nBearer {token}\r\n\r\n", 400, ("/cds-services", "options")),
], ids=["header-over-limit", "request-line-over-limit", "header-line-without-colon", "unknown-expectation",
        "unknown-transfer-coding", "probe-unknown-expectation", "preflight-header-line-without-colon"])
def test_requests_gunicorn_cannot_parse_get_an_operation_outcome_and_leave_no_trace_in_the_log(
        deployment: Deployment, request_bytes: bytes, status: int, operation: tuple[str, str]) -> None:
    # Regression: gunicorn answered these with an HTML page, and logged the offending line verbatim, so a header
    # line "Bearer <jwt>" (no colon) put the client's JWT in the log. gunicorn.conf.py's JsonErrorWorker fixes both.
    signer = deployment.sandbox.signer
    assert signer is not None
    token = signer.sign(deployment.sandbox.discovery_url)
    answer = _raw_http(deployment.server.base_url, request_bytes.replace(b"{token}", token.encode()))
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(f"HTTP/1.1 {status} ".encode())
    assert b"Content-Type: application/json" in head
    outcome = json.loads(body)
    assert outcome["resourceType"] == "OperationOutcome" and outcome["issue"][0]["severity"] == "error"
    assert_valid(outcome, documented_json_schema(*operation, status))  # openapi.yaml lists the answer
    request_id = re.search(rb"\r\nX-Request-ID: ([0-9a-f]{32})\r\n", head)
    assert request_id is not None and b"Cache-Control: no-store" in head  # like every answer (openapi.yaml)
    log = deployment.server.log()
    assert f"refused with {status}" in log
    assert f'"request_id": "{request_id.group(1).decode()}"' in log
    assert all(part not in log for part in token.split(".")) and "AAAAAAAAAAAAAAAA" not in log


def test_a_malformed_chunked_body_is_400_under_gunicorn(tmp_path: Path, gunicorn_factory: Any) -> None:
    # Regression: gunicorn raises InvalidChunkSize from wsgi.input while the app reads the body; that was a 500.
    server = gunicorn_factory({"CDS_AUTH": "disabled", "CDS_DATABASE_URL": f"sqlite:///{tmp_path}/f.sqlite3"})
    answer = _raw_http(server.base_url, f"POST /cds-services/{SERVICE} HTTP/1.1\r\nHost: x\r\n"
                       "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n"
                       "\r\nZZZ\r\n{}\r\n0\r\n\r\n".encode())
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ")
    assert "could not be read" in json.loads(body)["issue"][0]["diagnostics"]


def test_expect_100_continue_is_answered_before_the_body_is_sent(deployment: Deployment) -> None:
    # .NET's HttpWebRequest (ServicePointManager.Expect100Continue defaults to true) and curl, for a body over
    # 1 MiB, send the headers with "Expect: 100-continue" and wait for "100 Continue" before the body; an
    # answer that never comes costs every call the client's wait (350 ms in .NET, 1 s in curl).
    body = json.dumps({"hook": "patient-view", "hookInstance": str(uuid.uuid4()), "context": CONTEXT,
                       "prefetch": febrile_prefetch()}).encode()
    url = f"{deployment.sandbox.discovery_url}/{SERVICE}"
    signer = deployment.sandbox.signer
    assert signer is not None
    host, port = deployment.server.base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(f"POST /cds-services/{SERVICE} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json"
                     f"\r\nAuthorization: Bearer {signer.sign(url)}\r\nExpect: 100-continue\r\nContent-Length: "
                     f"{len(body)}\r\nConnection: close\r\n\r\n".encode())
        sock.settimeout(0.3)  # below .NET's wait: the interim answer comes at once, or the client goes on without it
        assert sock.recv(64) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.settimeout(10)
        sock.sendall(body)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, payload = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), answer[:300]
    assert json.loads(payload)["cards"][0]["indicator"] == "critical"


class _SlashTypedSandbox(SandboxClient):
    """The Sandbox with its discovery URL typed with a trailing slash: it calls ``.../cds-services//{id}``."""

    @property
    def discovery_url(self) -> str:
        return self.base_url.rstrip("/") + "/cds-services/"


def test_sandbox_with_a_discovery_url_typed_with_a_trailing_slash(deployment: Deployment) -> None:
    # Regression: '//' in the service and feedback URLs got a 308 redirect (HTML; on the preflight a CORS failure).
    client = _SlashTypedSandbox(deployment.server.base_url, deployment.sandbox.signer)
    assert client.discover().status_code == 200
    response = client.invoke(SERVICE, CONTEXT, prefetch=febrile_prefetch())
    assert response.status_code == 200, response.text
    assert response.headers["Access-Control-Allow-Origin"] == SANDBOX_ORIGIN
    critical = response.json()["cards"][0]
    assert client.dismiss(SERVICE, critical, reason=critical["overrideReasons"][0]).status_code == 200
    assert [(method, url.removeprefix(deployment.server.base_url), status) for method, url, status in client.sent] == [
        ("OPTIONS", "/cds-services/", 204), ("GET", "/cds-services/", 200),
        ("OPTIONS", f"/cds-services//{SERVICE}", 204), ("POST", f"/cds-services//{SERVICE}", 200),
        ("OPTIONS", f"/cds-services//{SERVICE}/feedback", 204), ("POST", f"/cds-services//{SERVICE}/feedback", 200)]


@pytest.mark.parametrize(("method", "path", "aud_path", "status"), [
    ("GET", "//cds-services", "//cds-services", 200),
    ("GET", "//cds-services", "/cds-services", 401),
    ("POST", f"//cds-services/{SERVICE}", f"//cds-services/{SERVICE}", 200),
    ("POST", f"//cds-services/{SERVICE}", f"/cds-services/{SERVICE}", 401),
    ("POST", f"//cds-services//{SERVICE}", f"//cds-services//{SERVICE}", 200),
    ("POST", f"//cds-services//{SERVICE}", f"/cds-services//{SERVICE}", 401),
], ids=["discovery-aud-as-called", "discovery-aud-merged", "invoke-aud-as-called", "invoke-aud-merged",
        "invoke-both-aud-as-called", "invoke-both-aud-leading-merged"])
def test_aud_is_the_url_as_called_with_leading_repeated_slashes(deployment: Deployment, method: str, path: str,
                                                                 aud_path: str, status: int) -> None:
    # A client configured with the base URL typed with a trailing slash ('http://host/') calls '//cds-services...'
    # and signs aud with that URL. Repeated slashes inside the path were kept for aud (39d1234), leading ones were
    # stripped: the token for the URL as called was refused, and one for another URL string accepted.
    base = deployment.server.base_url
    token = deployment.sandbox.signer.sign(base + aud_path)
    body = {"hook": "patient-view", "hookInstance": str(uuid.uuid4()), "context": CONTEXT,
            "prefetch": febrile_prefetch()} if method == "POST" else None
    response = requests.request(method, base + path, json=body, timeout=10,
                                headers={"Authorization": f"Bearer {token}", "Accept": "application/json"})
    assert response.request.path_url == path  # sent as typed, not normalised by the client library
    assert response.status_code == status, response.text


def _chunked(payload: bytes) -> bytes:
    return f"{len(payload):x}\r\n".encode() + payload + b"\r\n0\r\n\r\n"


@pytest.mark.parametrize(("path", "transfer_encoding", "compress"), [
    (f"/cds-services/{SERVICE}", "gzip, chunked", gzip.compress),
    (f"/cds-services/{SERVICE}/feedback", "gzip, chunked", gzip.compress),
    (f"/cds-services/{SERVICE}", "deflate, chunked", zlib.compress),
    (f"/cds-services/{SERVICE}", "GZIP , chunked", gzip.compress),
], ids=["invoke-gzip", "feedback-gzip", "invoke-deflate", "invoke-gzip-upper-case"])
def test_a_transfer_coding_gunicorn_passes_undecoded_is_501(deployment: Deployment, path: str,
                                                            transfer_encoding: str,
                                                            compress: Callable[[bytes], bytes]) -> None:
    # gunicorn answers an unknown transfer coding with 501 (openapi.yaml), but passes gzip, deflate and compress
    # to the app undecoded: the compressed bytes were read as the JSON text, a 400 'not valid UTF-8' that sent the
    # client looking at its JSON. RFC 9112 §6.1: a transfer coding the server does not decode is a 501.
    token = deployment.sandbox.signer.sign(deployment.server.base_url + path)
    payload = compress(json.dumps({"hook": "patient-view", "hookInstance": str(uuid.uuid4()), "context": CONTEXT,
                                   "prefetch": febrile_prefetch()}).encode())
    answer = _raw_http(deployment.server.base_url, (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\n"
        f"Transfer-Encoding: {transfer_encoding}\r\nConnection: close\r\n\r\n").encode() + _chunked(payload))
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 501 "), answer[:300]
    outcome = json.loads(body)
    operation = "/cds-services/{id}/feedback" if path.endswith("/feedback") else "/cds-services/{id}"
    assert_valid(outcome, documented_json_schema(operation, "post", 501))
    assert "Transfer-Encoding" in outcome["issue"][0]["diagnostics"]
