"""Hypothesis properties over HTTP (the request envelope, feedback, raw bytes, messy prefetch) and on the engine.

Over HTTP, in process against the real app (auth off, SQLite, a fixed clock): for any body, the answer is never a
5xx, is JSON, is valid against ``openapi.yaml`` for its status, and a 200 carries ``cards`` and the assessment
extension. On the engine: ``assess`` never raises however hostile the *times* are (the evaluation instant and the
resources' dates at the ends of the calendar, odd offsets, every precision) and whatever the ``unavailable``
mapping holds. ``tests/service/test_properties.py`` already covers arbitrary JSON values and damaged realistic
resources at a fixed ``now``; nothing here repeats that.

Reproducible: derandomized, no example database, no deadline; a few hundred examples in all, well under 60 s.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from service.app import create_app
from service.assessment import Finding, assess, assessment_extension
from tests.test_openapi import conforms

NOW = datetime(2025, 3, 10, 12, 0, tzinfo=timezone.utc)
SERVICE = "neutropenia-patient-view"
INVOKE = f"/cds-services/{SERVICE}"
FEEDBACK = f"{INVOKE}/feedback"
EXTENSION = "org.neutropenia-cds.assessment"

HTTP = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.data_too_large])
ENGINE = settings(max_examples=300, deadline=None, derandomize=True, database=None,
                  suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Flask]:
    directory = tmp_path_factory.mktemp("properties")
    application = create_app({"AUTH": "disabled", "DATABASE_URL": f"sqlite:///{directory}/f.db",
                              "MAX_BODY_BYTES": 256 * 1024}, environ={}, clock=lambda: NOW)
    yield application
    application.extensions["neutropenia_cds"]["store"].dispose()


@pytest.fixture(scope="module")
def client(app: Flask) -> FlaskClient:
    return app.test_client()


# --- strategies --------------------------------------------------------------------------------------------------

#: Text that hits the edges: control characters, NUL, bidi overrides, astral characters. Lone surrogates (always a
#: 400 since 514e954) come in rarely, so that most examples get past the body check.
edgy_text = st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=12) | st.sampled_from(
    ["", " ", "\x00", "\n", "\u202e", "\U0001f600", "Patient/p1", "../..", "%00", "<script>", "null", "1e999"])
nasty_text = edgy_text | st.just("\ud800")
scalars = (st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
           | st.floats(allow_nan=False, allow_infinity=False) | edgy_text)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(edgy_text, inner, max_size=4), max_leaves=20)

ENVELOPE_KEYS = ["hook", "hookInstance", "context", "prefetch", "fhirServer", "fhirAuthorization", "extension"]
VALID_FIELDS: dict[str, Any] = {
    "hook": "patient-view",
    "hookInstance": "d1577c69-dfbe-44ad-ba6d-3e05e953b2ea",
    "context": {"userId": "Practitioner/u1", "patientId": "p1"},
    "prefetch": {"patient": None, "labs": None, "vitals": None, "conditions": None, "medications": None},
}
FIELD_VALUES: dict[str, Any] = {
    "hook": st.sampled_from(["patient-view", "order-sign", "patient-view "]) | json_values,
    "context": st.fixed_dictionaries({}, optional={
        "userId": st.sampled_from(["Practitioner/u1", "Device/x", "u1"]) | json_values,
        "patientId": st.sampled_from(["p1", "p-1.2", "a" * 65, "p1\n"]) | json_values,
        "encounterId": json_values}) | json_values,
    "fhirServer": st.sampled_from(["https://ehr.example.org/fhir", "http://127.0.0.1:9/fhir",
                                   "http://169.254.169.254/", "file:///etc/passwd"]) | json_values,
    "fhirAuthorization": st.fixed_dictionaries({}, optional={
        "access_token": json_values, "token_type": st.sampled_from(["Bearer", "MAC"]) | json_values,
        "expires_in": st.integers() | json_values, "scope": json_values, "subject": json_values}) | json_values,
}


@st.composite
def envelopes(draw: st.DrawFn) -> dict[str, Any]:
    """A valid envelope with 0-3 of its fields replaced by something hostile or removed, plus stray members."""
    body: dict[str, Any] = {key: value for key, value in VALID_FIELDS.items()}
    for key in draw(st.lists(st.sampled_from(ENVELOPE_KEYS), max_size=3, unique=True)):
        if draw(st.booleans()):
            body.pop(key, None)
        else:
            body[key] = draw(FIELD_VALUES.get(key, json_values) | nasty_text)
    body.update(draw(st.dictionaries(edgy_text, json_values, max_size=2)))
    return body


FEEDBACK_ITEM = {"card": "card-1", "outcome": "overridden", "outcomeTimestamp": "2025-03-10T12:05:00Z",
                 "acceptedSuggestions": [{"id": "s-1"}],
                 "overrideReason": {"reason": {"system": "urn:x", "code": "c"}, "userComment": "ok"}}
FEEDBACK_VALUES: dict[str, Any] = {
    "card": st.sampled_from(["", "\x00", "card-\u202e\U0001f600"]) | json_values,
    "outcome": st.sampled_from(["accepted", "ignored"]) | json_values,
    "outcomeTimestamp": st.sampled_from(["2025-03-10T12:05:00", "0001-01-01T00:00:00+14:00",
                                         "9999-12-31T23:59:59-14:00", "2025-02-29T00:00:00Z"]) | json_values,
    "acceptedSuggestions": st.lists(st.fixed_dictionaries({}, optional={"id": json_values}), max_size=2)
    | json_values,
    "overrideReason": st.fixed_dictionaries({}, optional={
        "reason": st.fixed_dictionaries({}, optional={"system": json_values, "code": json_values}) | json_values,
        "userComment": nasty_text}) | json_values,
}


@st.composite
def feedback_bodies(draw: st.DrawFn) -> Any:
    """Feedback: valid items with 0-2 members hostile or removed, sometimes any JSON at all."""
    if draw(st.integers(0, 9)) == 0:
        return draw(json_values)
    items = []
    for _ in range(draw(st.integers(1, 3))):
        item = dict(FEEDBACK_ITEM)
        for key in draw(st.lists(st.sampled_from(sorted(FEEDBACK_VALUES)), max_size=2, unique=True)):
            if draw(st.booleans()):
                item.pop(key)
            else:
                item[key] = draw(FEEDBACK_VALUES[key])
        items.append(item)
    return {"feedback": items}


FHIR_KEYS = ["resourceType", "id", "status", "code", "coding", "system", "valueQuantity", "value", "unit",
             "effectiveDateTime", "effectivePeriod", "issued", "subject", "reference", "entry", "resource", "meta",
             "versionId", "birthDate", "component", "hasMember", "link", "relation", "url", "issue", "diagnostics"]
FHIR_STRINGS = ["Observation", "Patient", "Bundle", "Condition", "MedicationRequest", "OperationOutcome",
                "DiagnosticReport", "final", "preliminary", "http://loinc.org", "751-8", "6690-2", "770-8", "8310-5",
                "/uL", "10*3/uL", "Cel", "[degF]", "Patient/p1", "Patient/p2", "2025-03-10T08:00:00Z", "2025",
                "next", "https://ehr.example.org/fhir/Observation?page=2"]
fhir_leaves = scalars | st.sampled_from(FHIR_STRINGS)
fhir_values = st.recursive(fhir_leaves, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.sampled_from(FHIR_KEYS) | edgy_text, inner, max_size=6),
                           max_leaves=30)
messy_resources = st.fixed_dictionaries({"resourceType": st.sampled_from(FHIR_STRINGS[:7]) | fhir_values},
                                        optional={k: fhir_values for k in FHIR_KEYS[1:]})


@st.composite
def damaged_observations(draw: st.DrawFn) -> dict[str, Any]:
    """A plausible lab or temperature Observation with 0-3 members replaced by messy values or removed."""
    loinc, unit, value = draw(st.sampled_from([("751-8", "/uL", 400), ("751-8", "10*3/uL", 0.4),
                                               ("6690-2", "10*3/uL", 2.0), ("770-8", "%", 20),
                                               ("8310-5", "Cel", 38.6), ("8310-5", "[degF]", 101.5)]))
    resource: dict[str, Any] = {
        "resourceType": "Observation", "id": draw(st.sampled_from(["o1", "o2", "o3"])), "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": loinc}]},
        "subject": {"reference": "Patient/p1"}, "effectiveDateTime": "2025-03-10T08:00:00Z",
        "valueQuantity": {"value": value, "unit": unit, "system": "http://unitsofmeasure.org", "code": unit}}
    for key in draw(st.lists(st.sampled_from(sorted(resource)), max_size=3, unique=True)):
        if draw(st.booleans()):
            resource.pop(key)
        else:
            resource[key] = draw(fhir_values)
    return resource


resources = damaged_observations() | messy_resources
prefetch_values = (st.none() | resources | st.builds(lambda rs: {"resourceType": "Bundle", "type": "searchset",
                                                                 "entry": [{"resource": r} for r in rs]},
                                                     st.lists(resources, max_size=4)) | fhir_values)


def post(client: FlaskClient, path: str, body: Any) -> Any:
    """POST ``body`` as JSON; lone surrogates travel as escapes, as a client library would send them."""
    return client.post(path, data=json.dumps(body), content_type="application/json")


def check_invoke(response: Any) -> None:
    """No 5xx; JSON valid against the document for its status; a 200 has cards and the assessment extension."""
    assert response.status_code < 500, response.get_data(as_text=True)[:1000]
    event(f"status {response.status_code}")
    body = conforms("/cds-services/{id}", "post", response, response.status_code)
    if response.status_code == 200:
        assert isinstance(body["cards"], list)
        assessment = body["extension"][EXTENSION]
        assert assessment["evaluatedAt"] == "2025-03-10T12:00:00Z"
        assert set(assessment.get("findings", [])) <= {f.value for f in Finding}
    else:
        assert body["resourceType"] == "OperationOutcome"


# --- properties over HTTP ----------------------------------------------------------------------------------------


@HTTP
@given(envelopes())
def test_any_envelope_gets_a_documented_json_answer_never_a_5xx(client: FlaskClient, body: dict[str, Any]) -> None:
    check_invoke(post(client, INVOKE, body))


searchsets = st.builds(lambda rs: {"resourceType": "Bundle", "type": "searchset",
                                   "entry": [{"resource": r} for r in rs]}, st.lists(resources, min_size=1, max_size=4))


@HTTP
@given(st.fixed_dictionaries({"labs": searchsets | prefetch_values, "vitals": searchsets | prefetch_values},
                             optional={key: prefetch_values for key in ("patient", "conditions", "medications",
                                                                        "other")}))
def test_any_prefetch_gets_a_200_or_412_never_a_5xx(client: FlaskClient, prefetch: dict[str, Any]) -> None:
    response = post(client, INVOKE, {**VALID_FIELDS, "prefetch": prefetch})
    check_invoke(response)
    assert response.status_code in (200, 400, 412)


@HTTP
@given(feedback_bodies())
def test_any_feedback_body_gets_a_documented_json_answer_never_a_5xx(client: FlaskClient, body: Any) -> None:
    response = post(client, FEEDBACK, body)
    assert response.status_code < 500, response.get_data(as_text=True)[:1000]
    event(f"status {response.status_code}")
    conforms("/cds-services/{id}/feedback", "post", response, response.status_code)


@settings(HTTP, max_examples=100)
@given(st.binary(max_size=300) | st.builds(lambda s: s.encode("utf-8", "surrogatepass"), st.text(max_size=100)),
       st.sampled_from(["application/json", "application/fhir+json", "text/plain", ""]),
       st.sampled_from([INVOKE, FEEDBACK]))
def test_any_bytes_get_a_json_answer_never_a_5xx(client: FlaskClient, data: bytes, content_type: str,
                                                 path: str) -> None:
    response = client.post(path, data=data, content_type=content_type or None)
    event(f"status {response.status_code}")
    assert response.status_code < 500 and response.status_code in (400, 412, 413, 415), response.status_code
    conforms("/cds-services/{id}" if path == INVOKE else "/cds-services/{id}/feedback", "post", response,
             response.status_code)


# --- properties on the engine: hostile times ---------------------------------------------------------------------

offsets = st.integers(min_value=-14 * 60, max_value=14 * 60).map(lambda m: timezone(timedelta(minutes=m)))
#: Resource times: anywhere in the calendar, its very ends included.
instants = st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30), timezones=offsets) \
    | st.sampled_from([datetime(1, 1, 1, tzinfo=timezone.utc),
                       datetime(9999, 12, 31, 23, 59, 59, tzinfo=timezone.utc),
                       datetime(2024, 2, 29, tzinfo=timezone(timedelta(hours=14))), NOW])
#: The evaluation instant is the server's clock: any offset, but a plausible era (the engine's windows reach back
#: years from it, so year 1 would be a test artefact, not an input).
clock_readings = st.datetimes(min_value=datetime(1990, 1, 1), max_value=datetime(2200, 1, 1), timezones=offsets)


def _fhir_time(moment: datetime, precision: int) -> str:
    """``moment`` written at one of the FHIR dateTime precisions (0: year ... 4: fractional seconds)."""
    offset = moment.strftime("%z")
    zone = "Z" if offset == "+0000" else f"{offset[:3]}:{offset[3:]}"
    return [f"{moment.year:04d}", f"{moment.year:04d}-{moment.month:02d}", f"{moment.year:04d}-{moment:%m-%d}",
            f"{moment.year:04d}-{moment:%m-%dT%H:%M:%S}{zone}",
            f"{moment.year:04d}-{moment:%m-%dT%H:%M:%S}.{moment.microsecond:06d}{zone}"][precision]


fhir_times = st.builds(_fhir_time, instants, st.integers(0, 4)) | st.sampled_from(
    ["0000-01-01", "2025-02-29", "2024-02-29T24:00:00Z", "2025-03-10T08:00:00+14:01", "2025-W11", ""])


@st.composite
def timed_resources(draw: st.DrawFn) -> list[dict[str, Any]]:
    """Realistic, valid-looking resources whose every time field is drawn from ``fhir_times``."""
    loinc = st.sampled_from(["751-8", "6690-2", "770-8", "769-0", "764-1", "8310-5"])
    unit = st.sampled_from(["/uL", "10*3/uL", "%", "Cel", "[degF]"])
    out: list[dict[str, Any]] = []
    for i in range(draw(st.integers(0, 6))):
        time_field = draw(st.sampled_from(["effectiveDateTime", "effectiveInstant", "issued", "effectivePeriod"]))
        when: Any = draw(fhir_times)
        if time_field == "effectivePeriod":
            when = {"start": when, "end": draw(fhir_times)}
        out.append({"resourceType": "Observation", "id": f"o{i}", "status": "final",
                    "code": {"coding": [{"system": "http://loinc.org", "code": draw(loinc)}]},
                    time_field: when, "valueQuantity": {"value": draw(st.integers(0, 5000) | st.floats(0, 100)),
                                                        "unit": draw(unit)}})
    if draw(st.booleans()):
        out.append({"resourceType": "Patient", "id": "p1", "birthDate": draw(fhir_times)})
    for i in range(draw(st.integers(0, 2))):
        out.append({"resourceType": "MedicationRequest", "id": f"m{i}", "status": "completed", "intent": "order",
                    "subject": {"reference": "Patient/p1"}, "authoredOn": draw(fhir_times),
                    "medicationCodeableConcept": {"coding": [{"system": "http://www.whocc.no/atc",
                                                              "code": "L03AA02"}]},
                    "dosageInstruction": [{"timing": {"event": [draw(fhir_times)],
                                                      "repeat": {"boundsPeriod": {"end": draw(fhir_times)}}}}]})
    return out


@ENGINE
@given(timed_resources(), clock_readings, st.dictionaries(nasty_text.filter(lambda t: "\ud800" not in t), nasty_text,
                                                    max_size=3))
def test_assess_never_raises_on_hostile_times(resources_: list[dict[str, Any]], now: datetime,
                                             unavailable: dict[str, str]) -> None:
    assessment = assess(resources_, now=now, unavailable=unavailable)
    extension = assessment_extension(assessment)
    json.dumps(extension, allow_nan=False)
    assert len(extension["evaluatedAt"]) == 20 and extension["evaluatedAt"].endswith("Z")
    assert {i.detail for i in assessment.data_issues if i.code == "data-unavailable"} >= {
        f"{k}: {v}" for k, v in unavailable.items()}

