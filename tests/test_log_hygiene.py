"""Log hygiene: a run of real requests against gunicorn, then a scan of every byte the server logged.

The run covers what carries secrets or patient data: invokes with a prefetch full of distinctive values, the FHIR
fallback fetch with a ``fhirAuthorization`` token (a FHIR server that answers, one that fails and echoes the
token, one not on the allowlist; an order's Medication read by reference from both), a client-sent
OperationOutcome quoting the patient, feedback with comments,
bad tokens of every kind (including a header line gunicorn cannot parse, a token in the query string and an
oversized one), malformed bodies quoting patient data, and a log-forging attempt.

At the default level (INFO) none of these may appear anywhere in the output: the FHIR access token, any JWT or any
of its three segments, the patient id, resource ids, observation values (as sent and as converted), names, birth
date, user comments, override reasons. At DEBUG the access token and the JWTs still must not. Every line our
loggers write is one JSON object (so a value cannot forge a line).
"""

from __future__ import annotations

import json
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests

from cds_hooks.testing.tokens import ClientKey, TokenSigner, tamper_payload, write_issuer_config
from tests.support.fhir_stub_server import FhirStub, operation_outcome, searchset

pytestmark = pytest.mark.gunicorn

SERVICE = "neutropenia-patient-view"
PATIENT = "lh-patient-7341"
ACCESS_TOKEN = "lh-fhir-access-" + uuid.uuid4().hex
GIVEN, FAMILY = "Zebulon", "Quixtrapova"
BIRTH_DATE = "1931-07-23"
COMMENT = "Zebulon declined filgrastim, lh-comment-" + uuid.uuid4().hex[:8]
REASON_DISPLAY = "Quixtrapova family asked to wait"
CLIENT_DIAGNOSTICS = "lab feed down for Quixtrapova lh-oo-" + uuid.uuid4().hex[:8]
ANC_ID, TEMP_ID, WBC_ID, CONDITION_ID, MEDICATION_ID = ("lh-anc-55821", "lh-temp-90417", "lh-wbc-31337",
                                                        "lh-cond-2718", "lh-med-16180")
FETCHED_ANC_ID = "lh-fetched-anc-8080"
#: An order naming its medicine by reference, and that Medication (read by id from the FHIR server).
ORDER_BY_REFERENCE_ID, MEDICATION_REF_ID = "lh-med-order-4242", "lh-medref-27182"
#: Values nobody would log by chance: as sent, and as the engine converts them (cells/uL, degrees Celsius).
ANC_VALUE, ANC_PER_UL = "0.41977", "419.77"
TEMP_F = "101.9331"
WBC_VALUE = "2.31459"


def _iso(seconds_ago: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - seconds_ago))


def resources(anc_id: str = ANC_ID) -> dict[str, dict[str, Any]]:
    """The patient's resources: every value, id, name and date is a string the scan looks for."""
    subject = {"reference": f"Patient/{PATIENT}", "display": f"{GIVEN} {FAMILY}"}
    return {
        "patient": {"resourceType": "Patient", "id": PATIENT, "birthDate": BIRTH_DATE,
                    "name": [{"family": FAMILY, "given": [GIVEN]}],
                    "telecom": [{"system": "phone", "value": "+1-555-0199-7341"}]},
        "anc": {"resourceType": "Observation", "id": anc_id, "status": "final", "subject": subject,
                "code": {"coding": [{"system": "http://loinc.org", "code": "751-8"}]}, "effectiveDateTime": _iso(3600),
                "valueQuantity": {"value": float(ANC_VALUE), "unit": "10*3/uL", "system": "http://unitsofmeasure.org",
                                  "code": "10*3/uL"}},
        "wbc": {"resourceType": "Observation", "id": WBC_ID, "status": "final", "subject": subject,
                "code": {"coding": [{"system": "http://loinc.org", "code": "6690-2"}]}, "effectiveDateTime": _iso(3600),
                "valueQuantity": {"value": float(WBC_VALUE), "unit": "10*3/uL", "system": "http://unitsofmeasure.org",
                                  "code": "10*3/uL"}},
        "temp": {"resourceType": "Observation", "id": TEMP_ID, "status": "final", "subject": subject,
                 "code": {"coding": [{"system": "http://loinc.org", "code": "8310-5"}]},
                 "effectiveDateTime": _iso(1800),
                 "valueQuantity": {"value": float(TEMP_F), "unit": "[degF]", "system": "http://unitsofmeasure.org",
                                   "code": "[degF]"}},
        "condition": {"resourceType": "Condition", "id": CONDITION_ID, "subject": subject,
                      "clinicalStatus": {"coding": [{"code": "active"}]},
                      "code": {"coding": [{"system": "http://snomed.info/sct", "code": "363346000"}],
                               "text": f"malignancy of {FAMILY}"}},
        "medication": {"resourceType": "MedicationRequest", "id": MEDICATION_ID, "status": "active",
                       "intent": "order", "subject": subject, "authoredOn": _iso(86400),
                       "medicationCodeableConcept": {"coding": [{"system": "http://www.whocc.no/atc",
                                                                 "code": "L01XA01"}]}},
        "order_by_reference": {"resourceType": "MedicationRequest", "id": ORDER_BY_REFERENCE_ID, "status": "active",
                               "intent": "order", "subject": subject, "authoredOn": _iso(86400),
                               "medicationReference": {"reference": f"Medication/{MEDICATION_REF_ID}"}},
        "referenced_medication": {"resourceType": "Medication", "id": MEDICATION_REF_ID, "ingredient": [
            {"itemCodeableConcept": {"coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm",
                                                 "code": "338036"}]}}]},
    }


def prefetch() -> dict[str, Any]:
    r = resources()
    return {"patient": r["patient"], "labs": searchset([r["anc"], r["wbc"]]), "vitals": searchset([r["temp"]]),
            "conditions": searchset([r["condition"]]),
            "medications": searchset([r["medication"], r["order_by_reference"]])}


AUTHORIZATION = {"access_token": ACCESS_TOKEN, "token_type": "Bearer", "expires_in": 300,
                 "scope": "user/Observation.read user/Patient.read", "subject": "cds-service"}


@dataclass
class Run:
    """A running service and what was sent to it."""

    base_url: str
    log: Callable[[], str]
    signer: TokenSigner
    ehr: TokenSigner
    fhir: FhirStub
    tokens: list[str] = field(default_factory=list)

    def sign(self, url: str, signer: TokenSigner | None = None, **options: Any) -> str:
        token = (signer or self.signer).sign(url, **options)
        self.tokens.append(token)
        return token

    def post(self, path: str, body: Any, token: str | None = None, *, raw: bytes | None = None) -> requests.Response:
        url = self.base_url + path
        token = self.sign(url) if token is None else token
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        data = raw if raw is not None else json.dumps(body).encode()
        return requests.post(url, data=data, headers=headers, timeout=15)

    def get(self, path: str, authorization: str | None) -> requests.Response:
        headers = {} if authorization is None else {"Authorization": authorization}
        return requests.get(self.base_url + path, headers=headers, timeout=15)


def start(tmp_path: Path, gunicorn_factory: Any, fhir: FhirStub, level: str | None) -> Run:
    signer = TokenSigner(ClientKey.generate("ES384"))
    ehr = TokenSigner(ClientKey.generate("ES384"), iss="https://ehr.example.org", jku=fhir.url("/jwks/ehr.json"))
    fhir.add("/jwks/ehr.json", ehr.jwks(), content_type="application/json")
    issuers = write_issuer_config(tmp_path / "issuers.json", [signer.issuer_entry(), ehr.issuer_entry(pinned=False)])
    env = {"CDS_AUTH": "required", "CDS_PUBLIC_BASE_URL": "{base_url}", "CDS_TRUSTED_ISSUERS_FILE": str(issuers),
           "CDS_DATABASE_URL": f"sqlite:///{tmp_path}/f.sqlite3",
           "CDS_FHIR_ALLOWED_BASES": f"{fhir.url('/fhir')},{fhir.url('/broken')}"}
    if level is not None:
        env["CDS_LOG_LEVEL"] = level
    server = gunicorn_factory(env)
    return Run(server.base_url, server.log, signer, ehr, fhir)


def serve_fhir(fhir: FhirStub) -> None:
    """A FHIR server with the patient's data, and a broken one that echoes the token and the patient."""
    r = resources(FETCHED_ANC_ID)
    fhir.add(f"/fhir/Patient/{PATIENT}", r["patient"])
    fhir.add("/fhir/Observation", searchset([r["anc"], r["wbc"], r["temp"]]))
    fhir.add("/fhir/Condition", searchset([r["condition"]]))
    fhir.add("/fhir/MedicationRequest", searchset([r["medication"], r["order_by_reference"]]))
    fhir.add("/fhir/Medication", searchset([r["referenced_medication"]]))
    echo = operation_outcome(f"token {ACCESS_TOKEN} not valid for {PATIENT} {GIVEN} {FAMILY}")
    for path in (f"/broken/Patient/{PATIENT}", "/broken/Observation", "/broken/Condition",
                 "/broken/MedicationRequest", "/broken/Medication"):
        fhir.add(path, echo, status=500)


def raw_http(base_url: str, request: bytes) -> bytes:
    host, port = base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def run_series(run: Run) -> dict[int, int]:
    """Send the whole series; returns how many requests got each status (for the record, and a sanity check)."""
    invoke, feedback = f"/cds-services/{SERVICE}", f"/cds-services/{SERVICE}/feedback"
    context = {"userId": "Practitioner/lh-user-1", "patientId": PATIENT}
    envelope = {"hook": "patient-view", "hookInstance": str(uuid.uuid4()), "context": context}
    statuses: list[int] = []

    def record(response: requests.Response) -> requests.Response:
        statuses.append(response.status_code)
        assert response.status_code < 500, response.text[:500]
        return response

    record(run.get("/cds-services", f"Bearer {run.sign(run.base_url + '/cds-services')}"))
    answer = record(run.post(invoke, {**envelope, "prefetch": prefetch()}))
    assert answer.status_code == 200 and answer.json()["cards"], answer.text[:500]
    cards = answer.json()["cards"]
    # The FHIR fallback: a server that answers, one that fails echoing the token and patient, one not allowed.
    fetched = record(run.post(invoke, {**envelope, "fhirServer": run.fhir.url("/fhir"),
                                       "fhirAuthorization": AUTHORIZATION}))
    assert fetched.status_code == 200 and run.fhir.requests_for("/fhir/Observation"), fetched.text[:500]
    assert all(r.authorization == f"Bearer {ACCESS_TOKEN}" for r in run.fhir.requests_for("/fhir/Observation"))
    assert run.fhir.requests_for("/fhir/Medication"), "the order's Medication was not read"
    record(run.post(invoke, {**envelope, "fhirServer": run.fhir.url("/broken"), "fhirAuthorization": AUTHORIZATION}))
    # Everything prefetched but an order's Medication: read by id from the broken server, which echoes the token.
    record(run.post(invoke, {**envelope, "prefetch": prefetch(), "fhirServer": run.fhir.url("/broken"),
                             "fhirAuthorization": AUTHORIZATION}))
    assert run.fhir.requests_for("/broken/Medication"), "the order's Medication was not read"
    record(run.post(invoke, {**envelope, "fhirServer": "https://elsewhere.example.org/fhir",
                             "fhirAuthorization": AUTHORIZATION}))
    # Client-sent trouble: an OperationOutcome quoting the patient, Bundle entries that are not resources.
    broken_prefetch = {**prefetch(), "conditions": operation_outcome(CLIENT_DIAGNOSTICS),
                       "labs": {"resourceType": "Bundle", "entry": [{"x": FAMILY}, ANC_VALUE,
                                                                    {"resource": resources()["anc"]}]}}
    record(run.post(invoke, {**envelope, "prefetch": broken_prefetch}))
    record(run.post(invoke, {**envelope, "prefetch": {**prefetch(), "labs": operation_outcome(CLIENT_DIAGNOSTICS)}}))
    # Malformed requests that quote patient data: a bad context, a truncated body, a bad hook, an unknown path.
    record(run.post(invoke, {**envelope, "context": {**context, "patientId": f"{PATIENT}/{FAMILY}"}}))
    record(run.post(invoke, None, raw=json.dumps({**envelope, "prefetch": prefetch()}).encode()[:700]))
    record(run.post(invoke, {**envelope, "hook": f"{FAMILY}-view", "prefetch": prefetch()}))
    record(run.post(f"/cds-services/{PATIENT}", {**envelope, "prefetch": prefetch()}))
    record(run.post(invoke, {**envelope, "prefetch": prefetch(),
                             "fhirAuthorization": {**AUTHORIZATION, "expires_in": "soon"},
                             "fhirServer": run.fhir.url("/fhir")}))
    # Feedback with comments and reasons, valid and not.
    reason = {"reason": {"system": "urn:lh", "code": "wait", "display": REASON_DISPLAY}, "userComment": COMMENT}
    for card in cards:
        record(run.post(feedback, {"feedback": [{"card": card["uuid"], "outcome": "overridden",
                                                 "outcomeTimestamp": _iso(0), "overrideReason": reason}]}))
    record(run.post(feedback, {"feedback": [{"card": cards[0]["uuid"], "outcome": "maybe",
                                             "outcomeTimestamp": _iso(0), "overrideReason": reason}]}))
    record(run.post(feedback, {"feedback": [{"card": cards[0]["uuid"], "outcome": "overridden",
                                             "outcomeTimestamp": COMMENT}]}))
    # Bad tokens: each a 401 whose reason is logged, and whose token must not be.
    url = run.base_url + "/cds-services"
    stranger = TokenSigner(ClientKey.generate("ES384"), iss="https://stranger.example.org")
    bad = [run.sign(url, now=time.time() - 3600), run.sign(url + "/x"), run.sign(url, lifetime=7200),
           run.signer.unsigned(url), run.signer.hs256_with_public_key(url),
           tamper_payload(run.sign(url), {"sub": PATIENT}), run.sign(url, signer=stranger),
           run.sign(url, jku=run.fhir.url("/jwks/unlisted.json")), run.sign(url, signer=run.ehr, kid="unknown-kid"),
           run.sign(url, extra_claims={"pad": "x" * 15_000}),
           run.sign(url, headers={"kid": 'k"}\n{"level": "ERROR", "message": "forged line'})]
    run.tokens += bad
    for token in bad:
        assert record(run.get("/cds-services", f"Bearer {token}")).status_code == 401
    replayed = run.sign(url)
    record(run.get("/cds-services", f"Bearer {replayed}"))
    assert record(run.get("/cds-services", f"Bearer {replayed}")).status_code == 401
    assert record(run.get("/cds-services", f"Token {run.sign(url)}")).status_code == 401
    assert record(run.get("/cds-services", run.sign(url))).status_code == 401
    assert record(run.get(f"/cds-services?access_token={run.sign(url)}", None)).status_code == 401
    # Requests gunicorn itself refuses: a header line without a colon, and a header over its size limit.
    for line in (f"Bearer {run.sign(url)}".encode(), b"Authorization: Bearer " + run.sign(url, extra_claims={
            "pad": "y" * 40_000}).encode()):
        answer_bytes = raw_http(run.base_url, b"GET /cds-services HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                                + line + b"\r\n\r\n")
        statuses.append(int(answer_bytes.split(b" ", 2)[1]))
    time.sleep(0.5)  # let the workers flush
    counts: dict[int, int] = {}
    for status in statuses:
        counts[status] = counts.get(status, 0) + 1
    return counts


def jwt_parts(tokens: list[str]) -> list[str]:
    """Every JWT and each of its segments (skipping empty or trivially short ones, like alg-none's signature)."""
    return list(tokens) + [part for t in tokens for part in t.split(".") if len(part) > 8]


PATIENT_DATA = [PATIENT, ANC_ID, TEMP_ID, WBC_ID, CONDITION_ID, MEDICATION_ID, ORDER_BY_REFERENCE_ID, MEDICATION_REF_ID,
                FETCHED_ANC_ID, ANC_VALUE, ANC_PER_UL,
                TEMP_F, WBC_VALUE, GIVEN, FAMILY, BIRTH_DATE, COMMENT, REASON_DISPLAY, CLIENT_DIAGNOSTICS,
                "+1-555-0199-7341"]


def our_lines(log: str) -> list[str]:
    """The lines our loggers wrote (gunicorn's own start-up lines are plain text)."""
    return [line for line in log.splitlines() if line.startswith("{")]


def test_default_level_logs_no_token_and_no_patient_data(tmp_path: Path, gunicorn_factory: Any,
                                                         make_fhir_stub: Any) -> None:
    fhir = make_fhir_stub()
    serve_fhir(fhir)
    run = start(tmp_path, gunicorn_factory, fhir, level=None)
    counts = run_series(run)
    log = run.log()
    assert counts.get(200, 0) >= 5 and counts.get(401, 0) >= 15 and counts.get(400, 0) >= 4, counts
    assert '"route": "/cds-services/<service_id>"' in log and "CDS client token refused" in log
    leaked = [value for value in [ACCESS_TOKEN, *jwt_parts(run.tokens), *PATIENT_DATA] if value in log]
    assert leaked == [], leaked
    assert not [line for line in log.splitlines() if '"level": "DEBUG"' in line]
    lines = our_lines(log)
    assert all(isinstance(json.loads(line), dict) for line in lines)
    assert not [line for line in lines if json.loads(line).get("message") == "forged line"]


def test_debug_level_logs_no_access_token_and_no_jwt(tmp_path: Path, gunicorn_factory: Any,
                                                      make_fhir_stub: Any) -> None:
    fhir = make_fhir_stub()
    serve_fhir(fhir)
    run = start(tmp_path, gunicorn_factory, fhir, level="DEBUG")
    run_series(run)
    # A client that sends its headers, token included, and hangs up before their end: gunicorn's own DEBUG line
    # ("Ignored premature client disconnection. No more data after: b'...'") quoted every byte it had read.
    host, port = run.base_url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"GET /cds-services HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                     + run.sign(run.base_url + "/cds-services").encode() + b"\r\n")
        time.sleep(0.3)
    time.sleep(0.5)  # let the worker notice and flush
    log = run.log()
    assert '"level": "DEBUG"' in log, "the server did not log at DEBUG"
    leaked = [value for value in [ACCESS_TOKEN, *jwt_parts(run.tokens)] if value in log]
    assert leaked == [], leaked
    assert all(isinstance(json.loads(line), dict) for line in our_lines(log))
