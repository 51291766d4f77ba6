"""Hostile input catalogue: one test id per case, each with the one outcome it must get, in process.

The real app (``service.app.create_app``, auth off, SQLite in a temporary directory, a fixed clock) receives
malformed and truncated JSON, wrong content types, empty and oversized bodies, deep nesting, wrong types for
every envelope field, unknown hooks, bad context ids, prefetch values of the wrong shape, Bundles of
non-resources, broken Observations (no code, value, subject or time; string, negative, huge values; every date
precision, invalid dates, time zones), duplicate ids, unicode and control characters, and bad feedback.

Every case says exactly what it must get:

* ``Rejected(status, field)``: a 4xx OperationOutcome whose issue names ``field`` (its ``expression``, or in its
  ``diagnostics`` when the problem has no field, like a truncated body);
* ``Issue(code, source)``: a 200 whose assessment extension carries that ``dataIssues`` code (for ``source``);
* ``Assessed(findings)``: a 200 with exactly these findings and no data issue, for input that is odd but valid
  FHIR (a date with a time zone of +14:00, a display text with emoji) or irrelevant (an Observation without a
  code cannot be an ANC, and the clinical brief §2 says to ignore results without a value).

And every answer, whatever the case: never a 5xx, always ``application/json``, never HTML or a stack trace.
A few cases run with authentication on, to show the token is checked before the body is read.
"""

from __future__ import annotations

import copy
import gzip
import hashlib
import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from werkzeug.test import TestResponse

from cds_hooks.testing.tokens import ClientKey, TokenSigner, write_issuer_config
from service.app import create_app

NOW = datetime(2025, 3, 10, 12, 0, tzinfo=timezone.utc)
SERVICE = "neutropenia-patient-view"
INVOKE = f"/cds-services/{SERVICE}"
FEEDBACK = f"{INVOKE}/feedback"
EXTENSION = "org.neutropenia-cds.assessment"
MAX_BODY = 64 * 1024
LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
DROP = object()  # a field removed from the request


# --- what a case must get ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rejected:
    """A 4xx OperationOutcome naming ``field`` (an issue's expression, or in its diagnostics when fieldless)."""

    status: int
    field: str


@dataclass(frozen=True)
class Issue:
    """A 200 with the data issue ``code`` in the assessment extension (from ``source``, when given), and exactly
    ``findings`` when given."""

    code: str
    source: str | None = None
    findings: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Assessed:
    """A 200 with exactly these findings and no data issue: odd but valid (or irrelevant) input."""

    findings: tuple[str, ...] = ()


Outcome = Rejected | Issue | Assessed


@dataclass(frozen=True)
class Send:
    """One request: ``body`` is JSON-encoded unless it is bytes."""

    body: Any
    path: str = INVOKE
    method: str = "POST"
    content_type: str | None = "application/json"
    headers: Mapping[str, str] = field(default_factory=dict)


# --- request builders --------------------------------------------------------------------------------------------


def observation(loinc: str = "751-8", value: Any = 400, unit: str | None = "/uL", *, id: Any = "anc-1",
                **changes: Any) -> dict[str, Any]:
    """A final lab Observation (default: ANC 400/uL at 08:00, four hours before NOW); ``changes`` override
    fields, and a ``DROP`` value removes one."""
    quantity: dict[str, Any] = {"value": value}
    if unit is not None:
        quantity.update(unit=unit, system=UCUM, code=unit)
    resource: dict[str, Any] = {
        "resourceType": "Observation", "id": id, "status": "final",
        "code": {"coding": [{"system": LOINC, "code": loinc}]},
        "subject": {"reference": "Patient/p1"},
        "effectiveDateTime": "2025-03-10T08:00:00Z",
        "valueQuantity": quantity,
    }
    for name, change in changes.items():
        if change is DROP:
            resource.pop(name, None)
        else:
            resource[name] = change
    return resource


def temperature(value: Any = 38.6, unit: str = "Cel", **changes: Any) -> dict[str, Any]:
    """A body temperature one hour before NOW."""
    return observation("8310-5", value, unit, id="temp-1", effectiveDateTime="2025-03-10T11:00:00Z", **changes)


def bundle(*resources: Any) -> dict[str, Any]:
    """A searchset Bundle of ``resources``."""
    return {"resourceType": "Bundle", "type": "searchset", "entry": [{"resource": r} for r in resources]}


def request(*, labs: Any = None, vitals: Any = None, patient: Any = None, conditions: Any = None,
            **envelope: Any) -> dict[str, Any]:
    """A valid hook request whose prefetch has every key (None: no data), so no data issue comes from a missing
    key; ``labs``/``vitals`` lists become Bundles. ``envelope`` overrides top-level fields (``DROP`` removes)."""
    body: dict[str, Any] = {
        "hook": "patient-view", "hookInstance": "d1577c69-dfbe-44ad-ba6d-3e05e953b2ea",
        "context": {"userId": "Practitioner/u1", "patientId": "p1"},
        "prefetch": {"patient": patient, "conditions": conditions, "medications": None,
                     "labs": bundle(*labs) if isinstance(labs, list) else labs,
                     "vitals": bundle(*vitals) if isinstance(vitals, list) else vitals},
    }
    for name, value in envelope.items():
        if value is DROP:
            body.pop(name, None)
        else:
            body[name] = value
    return body


def context(**ids: Any) -> dict[str, Any]:
    """A context with ``ids`` over the valid userId and patientId (``DROP`` removes one)."""
    base: dict[str, Any] = {"userId": "Practitioner/u1", "patientId": "p1"}
    for name, value in ids.items():
        if value is DROP:
            base.pop(name)
        else:
            base[name] = value
    return base


AUTHORIZATION = {"access_token": "opaque-fhir-token", "token_type": "Bearer", "expires_in": 300,
                 "scope": "user/Observation.read", "subject": "cds-service"}


def authorization(**changes: Any) -> dict[str, Any]:
    """A fhirAuthorization with ``changes`` (``DROP`` removes a field)."""
    value = dict(AUTHORIZATION)
    for name, change in changes.items():
        if change is DROP:
            value.pop(name)
        else:
            value[name] = change
    return value


OVERRIDDEN = {"card": "card-1", "outcome": "overridden", "outcomeTimestamp": "2025-03-10T12:05:00Z"}
ACCEPTED = {"card": "card-1", "outcome": "accepted", "acceptedSuggestions": [{"id": "s-1"}],
            "outcomeTimestamp": "2025-03-10T12:05:00Z"}


def incompressible(length: int) -> str:
    """``length`` hex digits that no compression shortens (PostgreSQL compresses an index entry before measuring it)."""
    return "".join(hashlib.sha256(str(i).encode()).hexdigest() for i in range(length // 64 + 1))[:length]


def feedback(*items: Any, **changes: Any) -> Send:
    """A feedback request; with no ``items``, one overridden item with ``changes`` (``DROP`` removes a field)."""
    if not items:
        item: dict[str, Any] = dict(OVERRIDDEN)
        for name, change in changes.items():
            if change is DROP:
                item.pop(name)
            else:
                item[name] = change
        items = (item,)
    return Send({"feedback": list(items)}, path=FEEDBACK)


def raw(data: bytes, content_type: str | None = "application/json", path: str = INVOKE) -> Send:
    """Bytes sent as they are."""
    return Send(data, path=path, content_type=content_type)


VALID = json.dumps(request(labs=[observation()])).encode()
SEVERE = ("neutropenia-severe", "medication-review")  # ANC 400/uL, no fever, no context (brief §4 R7, R15)
NORMAL = ("anc-normal",)


# --- the catalogue -----------------------------------------------------------------------------------------------

Case = tuple[str, Send, Outcome]

BODY_CASES: list[Case] = [
    ("empty-body", raw(b""), Rejected(400, "empty")),
    ("whitespace-body", raw(b" \r\n\t "), Rejected(400, "empty")),
    ("truncated-json", raw(VALID[: len(VALID) // 2]), Rejected(400, "not valid JSON")),
    ("truncated-after-one-byte", raw(b"{"), Rejected(400, "not valid JSON")),
    ("trailing-comma", raw(b'{"hook": "patient-view",}'), Rejected(400, "not valid JSON")),
    ("single-quotes", raw(b"{'hook': 'patient-view'}"), Rejected(400, "not valid JSON")),
    ("comment-in-json", raw(b'{"hook": "patient-view" /* x */}'), Rejected(400, "not valid JSON")),
    ("two-json-documents", raw(VALID + VALID), Rejected(400, "not valid JSON")),
    ("nan-literal", raw(VALID.replace(b'"value": 400', b'"value": NaN')), Rejected(400, "NaN")),
    ("infinity-literal", raw(VALID.replace(b'"value": 400', b'"value": Infinity')), Rejected(400, "Infinity")),
    ("minus-infinity-literal", raw(VALID.replace(b'"value": 400', b'"value": -Infinity')),
     Rejected(400, "-Infinity")),
    ("integer-of-5000-digits", raw(VALID.replace(b'"value": 400', b'"value": ' + b"9" * 5000)),
     Rejected(400, "not valid JSON")),
    ("array-body", raw(b"[]"), Rejected(400, "JSON object")),
    ("string-body", raw(b'"patient-view"'), Rejected(400, "JSON object")),
    ("null-body", raw(b"null"), Rejected(400, "JSON object")),
    ("not-utf8", raw(b'{"hook": "\xff\xfe"}'), Rejected(400, "UTF-8")),
    ("utf16-body", raw(VALID.decode().encode("utf-16")), Rejected(400, "UTF-8")),
    ("utf8-bom", raw(b"\xef\xbb\xbf" + VALID), Rejected(400, "BOM")),
    ("deeply-nested-arrays", raw(b'{"x": ' + b"[" * 20_000 + b"]" * 20_000 + b"}"), Rejected(400, "nested")),
    ("deeply-nested-prefetch-objects",
     raw(VALID.replace(b'"conditions": null', b'"conditions": ' + b'{"a": ' * 5_000 + b"1" + b"}" * 5_000)),
     Rejected(400, "nested")),
    ("body-over-the-limit", Send(request(labs=[observation()], extension={"org.example.pad": "x" * MAX_BODY})),
     Rejected(413, "exceeds")),
    ("lone-surrogate-escape", raw(VALID.replace(b'"anc-1"', b'"anc-\\ud800"')),
     Rejected(400, "prefetch.labs.entry[0].resource.id")),
    ("text-plain", raw(VALID, "text/plain"), Rejected(415, "text/plain")),
    ("no-content-type", raw(VALID, None), Rejected(415, "Content-Type")),
    ("form-urlencoded", raw(b"hook=patient-view", "application/x-www-form-urlencoded"),
     Rejected(415, "x-www-form-urlencoded")),
    ("multipart", raw(b"--b\r\n\r\n{}\r\n--b--", "multipart/form-data; boundary=b"), Rejected(415, "multipart")),
    ("xml", raw(b"<hook>patient-view</hook>", "application/xml"), Rejected(415, "application/xml")),
    # No content coding is decoded (RFC 9110 §15.5.16): gzip was a 400 "not valid UTF-8", br on plain JSON a 200.
    ("content-encoding-gzip", Send(gzip.compress(VALID), headers={"Content-Encoding": "gzip"}),
     Rejected(415, "Content-Encoding 'gzip'")),
    ("content-encoding-br-on-plain-json", Send(VALID, headers={"Content-Encoding": "br"}),
     Rejected(415, "Content-Encoding 'br'")),
    ("content-encoding-deflate", Send(VALID, headers={"Content-Encoding": "deflate"}),
     Rejected(415, "Content-Encoding 'deflate'")),
    ("content-encoding-identity", Send(VALID, headers={"Content-Encoding": "identity"}), Assessed(SEVERE)),
    ("content-encoding-identity-upper-case", Send(VALID, headers={"Content-Encoding": "IDENTITY"}),
     Assessed(SEVERE)),
    ("fhir-json-content-type", raw(VALID, "application/fhir+json"), Assessed(SEVERE)),
    ("json-with-charset", raw(VALID, "application/json; charset=utf-8"), Assessed(SEVERE)),
    ("duplicate-member-last-wins", raw(VALID.replace(b'"hook": "patient-view"',
                                                     b'"hook": "order-sign", "hook": "patient-view"')),
     Assessed(SEVERE)),
]

ENVELOPE_CASES: list[Case] = [
    ("hook-missing", Send(request(hook=DROP)), Rejected(400, "hook")),
    ("hook-number", Send(request(hook=42)), Rejected(400, "hook")),
    ("hook-null", Send(request(hook=None)), Rejected(400, "hook")),
    ("hook-array", Send(request(hook=["patient-view"])), Rejected(400, "hook")),
    ("hook-empty", Send(request(hook="")), Rejected(400, "hook")),
    ("hook-unknown", Send(request(hook="order-sign")), Rejected(400, "hook")),
    ("hook-unicode-lookalike", Send(request(hook="patient\u2010view")), Rejected(400, "hook")),
    ("hookInstance-missing", Send(request(hookInstance=DROP)), Rejected(400, "hookInstance")),
    ("hookInstance-number", Send(request(hookInstance=7)), Rejected(400, "hookInstance")),
    ("hookInstance-blank", Send(request(hookInstance="   ")), Rejected(400, "hookInstance")),
    ("hookInstance-nul", Send(request(hookInstance="hi-\x00")), Rejected(400, "hookInstance")),
    ("context-missing", Send(request(context=DROP)), Rejected(400, "context")),
    ("context-string", Send(request(context="patientId=p1")), Rejected(400, "context")),
    ("context-array", Send(request(context=[])), Rejected(400, "context")),
    ("context-null", Send(request(context=None)), Rejected(400, "context")),
    ("context-without-patientId", Send(request(context=context(patientId=DROP))), Rejected(400, "context.patientId")),
    ("context-without-userId", Send(request(context=context(userId=DROP))), Rejected(400, "context.userId")),
    ("patientId-number", Send(request(context=context(patientId=1288992))), Rejected(400, "context.patientId")),
    ("patientId-empty", Send(request(context=context(patientId=""))), Rejected(400, "context.patientId")),
    ("patientId-path-traversal", Send(request(context=context(patientId="../../metadata"))),
     Rejected(400, "context.patientId")),
    ("patientId-query-smuggling", Send(request(context=context(patientId="p1&_count=100000"))),
     Rejected(400, "context.patientId")),
    ("patientId-65-characters", Send(request(context=context(patientId="a" * 65))),
     Rejected(400, "context.patientId")),
    ("patientId-unicode", Send(request(context=context(patientId="p\u00e4tient"))),
     Rejected(400, "context.patientId")),
    ("patientId-control-character", Send(request(context=context(patientId="p1\x1b[2J"))),
     Rejected(400, "context.patientId")),
    ("patientId-trailing-newline", Send(request(context=context(patientId="p1\n"))),
     Rejected(400, "context.patientId")),
    ("userId-without-type", Send(request(context=context(userId="u1"))), Rejected(400, "context.userId")),
    ("userId-device", Send(request(context=context(userId="Device/d1"))), Rejected(400, "context.userId")),
    ("context-extra-fields-ignored", Send(request(labs=[observation()], context=context(encounterId="e1", x=[1]))),
     Assessed(SEVERE)),
    ("prefetch-string", Send(request(prefetch="labs")), Rejected(400, "prefetch")),
    ("prefetch-array", Send(request(prefetch=[])), Rejected(400, "prefetch")),
    ("prefetch-null-means-nothing-prefetched", Send(request(prefetch=None)), Rejected(412, "prefetch.labs")),
    ("fhirServer-number", Send(request(fhirServer=8080)), Rejected(400, "fhirServer")),
    ("fhirServer-not-a-url", Send(request(fhirServer="ehr fhir")), Rejected(400, "fhirServer")),
    ("fhirServer-file-scheme", Send(request(fhirServer="file:///etc/passwd")), Rejected(400, "fhirServer")),
    ("fhirServer-javascript-scheme", Send(request(fhirServer="javascript:alert(1)")), Rejected(400, "fhirServer")),
    ("fhirServer-cloud-metadata-not-fetched",
     Send(request(fhirServer="http://169.254.169.254/latest/meta-data", prefetch={})), Rejected(412, "prefetch.labs")),
    ("fhirAuthorization-without-fhirServer", Send(request(fhirAuthorization=AUTHORIZATION)),
     Rejected(400, "fhirServer")),
    # An optional member sent as null is absent, every one alike (fhirServer: null was a 400 "may not be null").
    ("fhirServer-null-means-absent", Send(request(labs=[observation()], fhirServer=None)), Assessed(SEVERE)),
    ("optional-members-all-null", Send(request(labs=[observation()], fhirServer=None, fhirAuthorization=None,
                                               extension=None)), Assessed(SEVERE)),
    ("fhirAuthorization-with-null-fhirServer", Send(request(fhirServer=None, fhirAuthorization=AUTHORIZATION)),
     Rejected(400, "fhirServer")),
    ("fhirAuthorization-string", Send(request(fhirServer="https://ehr.example.org/fhir", fhirAuthorization="x")),
     Rejected(400, "fhirAuthorization")),
    # Required members left out are tolerated (real clients leave out expires_in): the prefetch is still read, and
    # without an access_token nothing is fetched (a missing required key is a 412 saying why).
    ("fhirAuthorization-without-access_token",
     Send(request(labs=[observation()], fhirServer="https://ehr.example.org/fhir",
                  fhirAuthorization=authorization(access_token=DROP))), Assessed(SEVERE)),
    ("fhirAuthorization-without-expires_in",
     Send(request(labs=[observation()], fhirServer="https://ehr.example.org/fhir",
                  fhirAuthorization=authorization(expires_in=DROP))), Assessed(SEVERE)),
    ("fhirAuthorization-without-access_token-nothing-prefetched",
     Send(request(prefetch={}, fhirServer="https://ehr.example.org/fhir",
                  fhirAuthorization=authorization(access_token=DROP))), Rejected(412, "prefetch.labs")),
    ("fhirAuthorization-empty-access_token",
     Send(request(fhirServer="https://ehr.example.org/fhir", fhirAuthorization=authorization(access_token=""))),
     Rejected(400, "fhirAuthorization.access_token")),
    ("fhirAuthorization-expires_in-string",
     Send(request(fhirServer="https://ehr.example.org/fhir", fhirAuthorization=authorization(expires_in="5 min"))),
     Rejected(400, "fhirAuthorization.expires_in")),
    # Digits in a string, as some OAuth servers write expires_in and clients copy it: read as the number.
    ("fhirAuthorization-expires_in-digits-in-a-string",
     Send(request(labs=[observation()], fhirServer="https://ehr.example.org/fhir",
                  fhirAuthorization=authorization(expires_in="3599"))), Assessed(SEVERE)),
    ("fhirAuthorization-expires_in-negative",
     Send(request(fhirServer="https://ehr.example.org/fhir", fhirAuthorization=authorization(expires_in=-1))),
     Rejected(400, "fhirAuthorization.expires_in")),
    ("fhirAuthorization-expires_in-absurd",
     Send(request(fhirServer="https://ehr.example.org/fhir", fhirAuthorization=authorization(expires_in=2**62))),
     Rejected(400, "fhirAuthorization.expires_in")),
    ("fhirAuthorization-expires_in-boolean",
     Send(request(fhirServer="https://ehr.example.org/fhir", fhirAuthorization=authorization(expires_in=True))),
     Rejected(400, "fhirAuthorization.expires_in")),
    ("fhirAuthorization-token_type-mac",
     Send(request(fhirServer="https://ehr.example.org/fhir", fhirAuthorization=authorization(token_type="MAC"))),
     Rejected(400, "fhirAuthorization.token_type")),
    ("extension-string", Send(request(extension="x")), Rejected(400, "extension")),
    ("extension-array", Send(request(extension=[1])), Rejected(400, "extension")),
    ("unknown-top-level-fields-ignored", Send(request(labs=[observation()], somethingNew={"a": 1})),
     Assessed(SEVERE)),
    ("unknown-service", Send(request(), path="/cds-services/no-such-service"), Rejected(404, "no-such-service")),
    ("get-on-the-service", Send(None, method="GET", content_type=None), Rejected(405, "method not allowed")),
    ("put-on-the-service", Send(request(), method="PUT"), Rejected(405, "method not allowed")),
    ("unknown-path", Send(None, path="/cds-services/x/y/z", method="GET", content_type=None),
     Rejected(404, "not found")),
]

PREFETCH_CASES: list[Case] = [
    ("labs-array", Send(request(labs=[observation()]) | {"prefetch": {"labs": [observation()], "vitals": None}}),
     Rejected(412, "prefetch.labs")),
    ("labs-string", Send(request(labs="Observation/anc-1")), Rejected(412, "prefetch.labs")),
    ("labs-number", Send(request(labs=400)), Rejected(412, "prefetch.labs")),
    ("labs-resourceType-number", Send(request(labs={"resourceType": 5})), Rejected(412, "prefetch.labs")),
    ("labs-without-resourceType", Send(request(labs={"entry": []})), Rejected(412, "prefetch.labs")),
    ("labs-operation-outcome", Send(request(labs={"resourceType": "OperationOutcome", "issue": [
        {"severity": "error", "code": "timeout", "diagnostics": "lab system down"}]})), Rejected(412, "prefetch.labs")),
    ("vitals-boolean", Send(request(labs=[observation()], vitals=True)), Rejected(412, "prefetch.vitals")),
    ("bundle-entry-not-a-list", Send(request(labs={"resourceType": "Bundle", "entry": {"resource": observation()}})),
     Rejected(412, "prefetch.labs")),
    # Resources are classified by content, not key (design.md §4): a Patient under `labs` is just the Patient.
    ("labs-holds-a-patient", Send(request(labs={"resourceType": "Patient", "id": "p1", "birthDate": "1970-01-01"})),
     Assessed(())),
    ("labs-holds-a-bare-observation", Send(request(labs=observation())), Assessed(SEVERE)),
    ("patient-key-holds-an-observation", Send(request(labs=[], patient=observation())), Assessed(SEVERE)),
    ("optional-key-string", Send(request(labs=[observation()], patient="Patient/p1")), Issue("data-unavailable")),
    ("optional-key-operation-outcome", Send(request(labs=[observation()], conditions={
        "resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "forbidden"}]})),
     Issue("data-unavailable")),
    ("bundle-entries-not-resources", Send(request(labs={"resourceType": "Bundle", "type": "searchset", "entry": [
        1, "x", None, [], {"resource": 5}, {"resource": {"no": "resourceType"}}, {"fullUrl": "urn:uuid:1"},
        {"resource": observation()}]})), Issue("data-unavailable")),
    ("bundle-next-link-without-fhirServer", Send(request(labs=bundle(observation()) | {"link": [
        {"relation": "next", "url": "https://ehr.example.org/fhir/Observation?page=2"}]})), Issue("data-unavailable")),
    # An empty first page whose next link cannot be followed is not "no data": the labs lie behind the link.
    ("bundle-empty-first-page-next-link-without-fhirServer", Send(request(labs=bundle() | {"link": [
        {"relation": "next", "url": "https://ehr.example.org/fhir/Observation?page=2"}]})),
     Rejected(412, "prefetch.labs")),
    ("optional-key-empty-first-page-next-link", Send(request(labs=[observation()], conditions=bundle() | {"link": [
        {"relation": "next", "url": "https://ehr.example.org/fhir/Condition?page=2"}]})), Issue("data-unavailable")),
    ("bundle-total-without-entries", Send(request(labs=bundle() | {"total": 4})), Rejected(412, "prefetch.labs")),
    ("bundle-total-zero-without-entries", Send(request(labs=bundle() | {"total": 0})), Assessed(())),
    ("bundle-in-bundle", Send(request(labs=bundle(bundle(observation())))), Assessed(SEVERE)),
    # The prefetch layer opens the outer Bundle and the engine four more (service/fhir.py MAX_BUNDLE_DEPTH): the
    # ANC inside the next one is not read, and a data issue says so (no silent empty assessment).
    ("bundles-nested-at-the-limit", Send(request(labs=bundle(bundle(bundle(bundle(bundle(observation()))))))),
     Assessed(SEVERE)),
    ("bundles-nested-past-the-limit",
     Send(request(labs=bundle(bundle(bundle(bundle(bundle(bundle(bundle(observation()))))))))),
     Issue("malformed-resource", "Bundle/(no id)", ())),
    ("unknown-prefetch-key-ignored", Send(request(labs=[observation()]) | {
        "prefetch": {**request(labs=[observation()])["prefetch"], "somethingElse": {"resourceType": "Basic"}}}),
     Assessed(SEVERE)),
]

OBSERVATION_CASES: list[Case] = [
    ("observation-without-code", Send(request(labs=[observation(code=DROP)])), Assessed(())),
    ("observation-code-not-a-concept", Send(request(labs=[observation(code="751-8")])), Assessed(())),
    ("observation-coding-not-a-list", Send(request(labs=[observation(code={"coding": {"system": LOINC,
                                                                                        "code": "751-8"}})])),
     Assessed(())),
    ("observation-code-with-spaces", Send(request(labs=[observation(code={"coding": [{"system": LOINC,
                                                                                       "code": " 751-8 "}]})])),
     Issue("malformed-resource", "Observation/anc-1")),
    # Brief §2: "Ignore Observations ... without value."
    ("observation-without-value", Send(request(labs=[observation(valueQuantity=DROP)])), Assessed(())),
    ("observation-without-subject", Send(request(labs=[observation(subject=DROP)])), Assessed(SEVERE)),
    ("observation-without-time", Send(request(labs=[observation(effectiveDateTime=DROP)])),
     Issue("missing-effective-time", "Observation/anc-1")),
    ("observation-without-status", Send(request(labs=[observation(status=DROP)])),
     Issue("malformed-resource", "Observation/anc-1")),
    ("observation-status-unknown-value", Send(request(labs=[observation(status="FINAL")])),
     Issue("malformed-resource", "Observation/anc-1")),
    ("observation-status-entered-in-error", Send(request(labs=[observation(status="entered-in-error")])),
     Assessed(())),
    ("value-string-not-a-number", Send(request(labs=[observation(value="four hundred")])),
     Issue("malformed-resource", "Observation/anc-1")),
    # FHIR JSON decimals are JSON numbers (R4 §2.6.2); fhir.resources' lax mode alone would read "0.4" as 0.4.
    ("value-numeric-string", Send(request(labs=[observation(value="0.4", unit="10*3/uL")])),
     Issue("malformed-resource", "Observation/anc-1", ())),
    # Neither makes an emergency out of an unreadable temperature nor hides that one was sent.
    ("temperature-numeric-string", Send(request(labs=[observation()], vitals=[temperature(value="38.6")])),
     Issue("malformed-resource", "Observation/temp-1", SEVERE)),
    ("value-boolean", Send(request(labs=[observation(value=True)])), Issue("malformed-resource", "Observation/anc-1")),
    ("value-array", Send(request(labs=[observation(value=[400])])), Issue("malformed-resource", "Observation/anc-1")),
    ("valueQuantity-array", Send(request(labs=[observation(valueQuantity=[{"value": 400}])])),
     Issue("malformed-resource", "Observation/anc-1")),
    ("value-is-valueString", Send(request(labs=[observation(valueQuantity=DROP, valueString="400")])),
     Issue("anc-uninterpretable", "Observation/anc-1")),
    ("value-negative", Send(request(labs=[observation(value=-400)])),
     Issue("anc-uninterpretable", "Observation/anc-1")),
    ("value-zero", Send(request(labs=[observation(value=0)])),
     Assessed(("neutropenia-severe", "neutropenia-profound", "medication-review"))),
    ("value-negative-zero", Send(request(labs=[observation(value=-0.0)])),
     Assessed(("neutropenia-severe", "neutropenia-profound", "medication-review"))),
    ("value-1e308", Send(request(labs=[observation(value=1e308)])), Issue("anc-uninterpretable", "Observation/anc-1")),
    ("value-overflows-to-infinity", raw(json.dumps(request(labs=[observation(value=400)])).encode()
                                        .replace(b'"value": 400', b'"value": 1e999')),
     Issue("malformed-resource", "Observation/anc-1")),
    ("value-integer-of-400-digits", Send(request(labs=[observation(value=10**400)])),
     Issue("anc-uninterpretable", "Observation/anc-1")),
    ("value-1e-300", Send(request(labs=[observation(value=1e-300)])),
     Issue("anc-uninterpretable", "Observation/anc-1")),
    ("value-without-unit", Send(request(labs=[observation(unit=None)])),
     Issue("anc-uninterpretable", "Observation/anc-1")),
    ("unit-unknown", Send(request(labs=[observation(unit="furlongs")])),
     Issue("anc-uninterpretable", "Observation/anc-1")),
    ("unit-and-code-disagree", Send(request(labs=[observation(valueQuantity={"value": 400, "unit": "/uL",
                                                                             "system": UCUM, "code": "10*3/uL"})])),
     Issue("anc-uninterpretable", "Observation/anc-1")),
    ("unit-superscript-unicode", Send(request(labs=[observation(value=0.4, unit="10\u00b3/\u00b5L")])),
     Issue("anc-uninterpretable", "Observation/anc-1")),
    ("unit-micro-sign-is-known", Send(request(labs=[observation(valueQuantity={"value": 400, "unit": "/\u00b5L"})])),
     Assessed(SEVERE)),
    ("unit-with-nul", Send(request(labs=[observation(valueQuantity={"value": 400, "unit": "/uL\x00"})])),
     Issue("anc-uninterpretable", "Observation/anc-1")),
    ("unit-with-escape-sequence", Send(request(labs=[observation(valueQuantity={"value": 400,
                                                                                "unit": "\x1b[31m/uL"})])),
     Issue("anc-uninterpretable", "Observation/anc-1")),
    ("temperature-without-unit",
     Send(request(labs=[observation()], vitals=[temperature(valueQuantity={"value": 38.6})])),
     Issue("temperature-uninterpretable", "Observation/temp-1")),
    ("temperature-in-kelvin", Send(request(labs=[observation()], vitals=[temperature(311.75, "K")])),
     Issue("temperature-uninterpretable", "Observation/temp-1")),
    ("temperature-fahrenheit", Send(request(labs=[observation()], vitals=[temperature(101.5, "[degF]")])),
     Assessed(("febrile-neutropenia", "neutropenia-severe", "medication-review"))),
    # Plausible ranges (service/thresholds.py, DESIGN): outside them a value is reported, never graded.
    ("temperature-1000-celsius", Send(request(labs=[observation()], vitals=[temperature(1000)])),
     Issue("temperature-uninterpretable", "Observation/temp-1", SEVERE)),
    ("temperature-below-absolute-zero", Send(request(labs=[observation()], vitals=[temperature(-300)])),
     Issue("temperature-uninterpretable", "Observation/temp-1", SEVERE)),
    ("temperature-fahrenheit-number-as-celsius", Send(request(labs=[observation()], vitals=[temperature(101.5)])),
     Issue("temperature-uninterpretable", "Observation/temp-1", SEVERE)),
    ("temperature-celsius-number-as-fahrenheit",
     Send(request(labs=[observation()], vitals=[temperature(38.6, "[degF]")])),
     Issue("temperature-uninterpretable", "Observation/temp-1", SEVERE)),
    ("value-absurdly-large-anc", Send(request(labs=[observation(value=1e9, unit="10*3/uL")])),
     Issue("anc-uninterpretable", "Observation/anc-1", ("anc-uninterpretable",))),
]

#: Every FHIR dateTime precision (R4 §2.24.0.1: YYYY, YYYY-MM, YYYY-MM-DD, and with a time, seconds and zone).
DATE_CASES: list[Case] = [
    ("date-year", Send(request(labs=[observation(effectiveDateTime="2025")])), Assessed(SEVERE)),
    ("date-year-month", Send(request(labs=[observation(effectiveDateTime="2025-03")])), Assessed(SEVERE)),
    ("date-day", Send(request(labs=[observation(effectiveDateTime="2025-03-10")])), Assessed(SEVERE)),
    ("date-seconds-utc", Send(request(labs=[observation(effectiveDateTime="2025-03-10T08:00:00Z")])),
     Assessed(SEVERE)),
    ("date-nanoseconds", Send(request(labs=[observation(effectiveDateTime="2025-03-10T08:00:00.123456789Z")])),
     Assessed(SEVERE)),
    ("date-zone-plus-14", Send(request(labs=[observation(effectiveDateTime="2025-03-10T20:00:00+14:00")])),
     Assessed(SEVERE)),
    ("date-zone-minus-12", Send(request(labs=[observation(effectiveDateTime="2025-03-09T20:00:00-12:00")])),
     Assessed(SEVERE)),
    ("date-zone-minus-00", Send(request(labs=[observation(effectiveDateTime="2025-03-10T08:00:00-00:00")])),
     Assessed(SEVERE)),
    ("date-zone-half-hour", Send(request(labs=[observation(effectiveDateTime="2025-03-10T13:30:00+05:30")])),
     Assessed(SEVERE)),
    ("effectiveInstant", Send(request(labs=[observation(effectiveDateTime=DROP,
                                                        effectiveInstant="2025-03-10T08:00:00Z")])),
     Assessed(SEVERE)),
    ("effectivePeriod", Send(request(labs=[observation(effectiveDateTime=DROP, effectivePeriod={
        "start": "2025-03-10T07:00:00Z", "end": "2025-03-10T08:00:00Z"})])), Assessed(SEVERE)),
    ("issued-only", Send(request(labs=[observation(effectiveDateTime=DROP, issued="2025-03-10T08:00:00Z")])),
     Assessed(SEVERE)),
    ("date-without-zone", Send(request(labs=[observation(effectiveDateTime="2025-03-10T08:00:00")])),
     Issue("missing-effective-time", "Observation/anc-1")),
    ("date-without-seconds", Send(request(labs=[observation(effectiveDateTime="2025-03-10T08:00Z")])),
     Issue("malformed-resource", "Observation/anc-1")),
    ("date-february-30", Send(request(labs=[observation(effectiveDateTime="2025-02-30T08:00:00Z")])),
     Issue("missing-effective-time", "Observation/anc-1")),
    ("date-month-13", Send(request(labs=[observation(effectiveDateTime="2025-13-01")])),
     Issue("missing-effective-time", "Observation/anc-1")),
    ("date-hour-24", Send(request(labs=[observation(effectiveDateTime="2025-03-10T24:00:00Z")])),
     Issue("missing-effective-time", "Observation/anc-1")),
    # A leap second (FHIR and RFC 3339 allow second 60) is read as 59.999999 s (service/timing.py): a real one
    # (the last, 2016) is a stale ANC, and a fever in one still makes the emergency.
    ("date-leap-second", Send(request(labs=[observation(effectiveDateTime="2016-12-31T23:59:60Z")])),
     Assessed(("anc-stale",))),
    ("date-leap-second-fever", Send(request(labs=[observation()], vitals=[
        temperature() | {"effectiveDateTime": "2025-03-09T23:59:60.5Z"}])),
     Assessed(("febrile-neutropenia", "neutropenia-severe", "medication-review"))),
    ("date-second-61", Send(request(labs=[observation(effectiveDateTime="2016-12-31T23:59:61Z")])),
     Issue("missing-effective-time", "Observation/anc-1")),
    # A date has no zone: at 12:00Z it is 11 March from UTC+12:00 on, so a fever dated so may have been taken.
    ("date-fever-tomorrow-in-utc", Send(request(labs=[observation()], vitals=[
        temperature() | {"effectiveDateTime": "2025-03-11"}])),
     Assessed(("febrile-neutropenia", "neutropenia-severe", "medication-review"))),
    ("date-fever-two-days-ahead", Send(request(labs=[observation()], vitals=[
        temperature() | {"effectiveDateTime": "2025-03-12"}])),
     Issue("future-dated", "Observation/temp-1", SEVERE)),
    ("date-zone-plus-25", Send(request(labs=[observation(effectiveDateTime="2025-03-10T08:00:00+25:00")])),
     Issue("missing-effective-time", "Observation/anc-1")),
    ("date-zone-without-colon", Send(request(labs=[observation(effectiveDateTime="2025-03-10T08:00:00+0000")])),
     Issue("missing-effective-time", "Observation/anc-1")),
    ("date-lowercase-z", Send(request(labs=[observation(effectiveDateTime="2025-03-10T08:00:00z")])),
     Issue("missing-effective-time", "Observation/anc-1")),
    ("date-us-format", Send(request(labs=[observation(effectiveDateTime="03/10/2025")])),
     Issue("missing-effective-time", "Observation/anc-1")),
    ("date-epoch-number", Send(request(labs=[observation(effectiveDateTime=1741593600)])),
     Issue("missing-effective-time", "Observation/anc-1")),
    ("date-year-zero", Send(request(labs=[observation(effectiveDateTime="0000-01-01T00:00:00Z")])),
     Issue("missing-effective-time", "Observation/anc-1")),
    ("date-past-year-9999-in-utc", Send(request(labs=[observation(effectiveDateTime="9999-12-31T23:59:59-14:00")])),
     Issue("missing-effective-time", "Observation/anc-1")),
    ("date-in-the-future", Send(request(labs=[observation(effectiveDateTime="2030-01-01T00:00:00Z")])),
     Issue("future-dated", "Observation/anc-1")),
    ("date-decades-old", Send(request(labs=[observation(effectiveDateTime="1999-01-01T00:00:00Z")])),
     Assessed(("anc-stale",))),
    # Patient.birthDate picks the ANC cut-off (brief §1.5): 3000/uL is neutropenia at 5 days old, normal in an
    # adult. An unusable birthDate leaves the age unknown, so the adult cut-offs apply, and a data issue says so.
    ("patient-birthDate-newborn", Send(request(labs=[observation(value=3000)], patient={
        "resourceType": "Patient", "id": "p1", "birthDate": "2025-03-05"})),
     Assessed(("neutropenia-mild", "medication-review"))),
    ("patient-birthDate-tomorrow-in-utc", Send(request(labs=[observation(value=3000)], patient={
        "resourceType": "Patient", "id": "p1", "birthDate": "2025-03-11"})),
     Assessed(("neutropenia-mild", "medication-review"))),
    ("patient-birthDate-invalid", Send(request(labs=[observation(value=3000)], patient={
        "resourceType": "Patient", "id": "p1", "birthDate": "2025-02-30"})),
     Issue("malformed-resource", "Patient/p1", NORMAL)),
    ("patient-birthDate-in-the-future", Send(request(labs=[observation(value=3000)], patient={
        "resourceType": "Patient", "id": "p1", "birthDate": "2026-01-01"})),
     Issue("malformed-resource", "Patient/p1", NORMAL)),
]

IDENTITY_CASES: list[Case] = [
    ("duplicate-id-identical-copies", Send(request(labs=[observation(), observation()])), Assessed(SEVERE)),
    ("duplicate-id-newer-version-wins", Send(request(labs=[
        observation(value=3000, meta={"versionId": "1"}), observation(value=400, meta={"versionId": "2"})])),
     Assessed(SEVERE)),
    # Nothing says which copy is current: both are used (the lower ANC is graded, whatever the order; see
    # test_conflicting_copies_of_one_resource_give_one_answer_in_any_order) and the contradiction is reported.
    ("duplicate-id-conflicting-copies", Send(request(labs=[observation(value=3000), observation(value=400)])),
     Issue("conflicting-duplicates", "Observation/anc-1", SEVERE)),
    ("duplicate-id-same-resource-in-two-keys", Send(request(labs=[observation()], vitals=[observation()])),
     Assessed(SEVERE)),
    ("observation-about-another-patient", Send(request(labs=[observation(subject={"reference": "Patient/p2"})])),
     Issue("data-unavailable")),
    ("patient-resource-of-another-patient", Send(request(labs=[observation()], patient={
        "resourceType": "Patient", "id": "p2", "birthDate": "2025-03-08"})), Issue("data-unavailable")),
    ("id-empty", Send(request(labs=[observation(id="")])), Issue("malformed-resource", "Observation/(no id)")),
    ("id-number", Send(request(labs=[observation(id=7)])), Issue("malformed-resource", "Observation/(no id)")),
    ("id-unicode", Send(request(labs=[observation(id="anc-\u00e9")])),
     Issue("malformed-resource", "Observation/anc-\u00e9")),
    ("id-control-character", Send(request(labs=[observation(id="anc\x07")])),
     Issue("malformed-resource", "Observation/anc\x07")),
    ("id-bidi-override", Send(request(labs=[observation(id="anc\u202e1")])),
     Issue("malformed-resource", "Observation/anc\u202e1")),
    ("id-with-slash", Send(request(labs=[observation(id="../Patient/p2")])),
     Issue("malformed-resource", "Observation/../Patient/p2")),
    ("code-unicode-hyphen-lookalike", Send(request(labs=[observation(loinc="751\u20118")])), Assessed(())),
    ("code-with-nul", Send(request(labs=[observation(loinc="751-8\x00")])), Assessed(())),
    ("display-emoji-bidi-and-markup", Send(request(labs=[observation(code={"coding": [{
        "system": LOINC, "code": "751-8", "display": "\U0001f9a0\u202e<script>alert(1)</script>"}]})])),
     Assessed(SEVERE)),
    ("display-control-characters", Send(request(labs=[observation(code={"coding": [{
        "system": LOINC, "code": "751-8", "display": "\x00\x1b[2J\r\n"}]})])), Assessed(SEVERE)),
    ("condition-display-unicode", Send(request(labs=[observation()], conditions={
        "resourceType": "Condition", "id": "c1", "subject": {"reference": "Patient/p1"},
        "clinicalStatus": {"coding": [{"code": "active"}]},
        "code": {"coding": [{"system": "http://snomed.info/sct", "code": "363346000",
                             "display": "\u65e5\u672c\u8a9e \U0001f489"}]}})),
     Assessed(("neutropenia-severe", "medication-review"))),
    ("patient-with-unicode-name", Send(request(labs=[observation()], patient={
        "resourceType": "Patient", "id": "p1", "name": [{"family": "\u00d8stergaard\u202e", "given": ["Z\u0308oe"]}],
        "birthDate": "1970-01-01"})), Assessed(SEVERE)),
]

FEEDBACK_CASES: list[Case] = [
    ("feedback-empty-body", raw(b"", path=FEEDBACK), Rejected(400, "empty")),
    ("feedback-truncated-json", raw(b'{"feedback": [{"card": "c', path=FEEDBACK), Rejected(400, "not valid JSON")),
    ("feedback-text-plain", raw(b'{"feedback": []}', "text/plain", path=FEEDBACK), Rejected(415, "text/plain")),
    ("feedback-content-encoding-gzip", Send(gzip.compress(json.dumps({"feedback": [OVERRIDDEN]}).encode()),
                                            path=FEEDBACK, headers={"Content-Encoding": "gzip"}),
     Rejected(415, "Content-Encoding 'gzip'")),
    ("feedback-array-body", raw(b"[]", path=FEEDBACK), Rejected(400, "JSON object")),
    ("feedback-key-missing", Send({}, path=FEEDBACK), Rejected(400, "feedback")),
    ("feedback-empty-list", Send({"feedback": []}, path=FEEDBACK), Rejected(400, "feedback")),
    ("feedback-not-a-list", Send({"feedback": OVERRIDDEN}, path=FEEDBACK), Rejected(400, "feedback")),
    ("feedback-item-not-an-object", feedback(42), Rejected(400, "feedback[0]")),
    ("feedback-card-missing", feedback(card=DROP), Rejected(400, "feedback[0].card")),
    ("feedback-card-number", feedback(card=12), Rejected(400, "feedback[0].card")),
    ("feedback-card-empty", feedback(card=" "), Rejected(400, "feedback[0].card")),
    ("feedback-card-nul", feedback(card="card\x00"), Rejected(400, "feedback[0].card")),
    ("feedback-card-too-long", feedback(card="c" * 513), Rejected(400, "feedback[0].card")),
    ("feedback-outcome-missing", feedback(outcome=DROP), Rejected(400, "feedback[0].outcome")),
    ("feedback-outcome-unknown", feedback(outcome="rejected"), Rejected(400, "feedback[0].outcome")),
    ("feedback-timestamp-missing", feedback(outcomeTimestamp=DROP), Rejected(400, "feedback[0].outcomeTimestamp")),
    ("feedback-timestamp-words", feedback(outcomeTimestamp="yesterday"),
     Rejected(400, "feedback[0].outcomeTimestamp")),
    ("feedback-timestamp-without-zone", feedback(outcomeTimestamp="2025-03-10T12:05:00"),
     Rejected(400, "feedback[0].outcomeTimestamp")),
    ("feedback-timestamp-date-only", feedback(outcomeTimestamp="2025-03-10"),
     Rejected(400, "feedback[0].outcomeTimestamp")),
    ("feedback-timestamp-epoch-number", feedback(outcomeTimestamp=1741608300),
     Rejected(400, "feedback[0].outcomeTimestamp")),
    ("feedback-timestamp-year-zero", feedback(outcomeTimestamp="0000-01-01T00:00:00Z"),
     Rejected(400, "feedback[0].outcomeTimestamp")),
    ("feedback-timestamp-past-year-9999", feedback(outcomeTimestamp="9999-12-31T23:59:59-14:00"),
     Rejected(400, "feedback[0].outcomeTimestamp")),
    ("feedback-timestamp-trailing-newline", feedback(outcomeTimestamp="2025-03-10T12:05:00Z\n"),
     Rejected(400, "feedback[0].outcomeTimestamp")),
    ("feedback-timestamp-second-61", feedback(outcomeTimestamp="2016-12-31T23:59:61Z"),
     Rejected(400, "feedback[0].outcomeTimestamp")),
    ("feedback-accepted-without-suggestions", feedback(outcome="accepted"),
     Rejected(400, "feedback[0].acceptedSuggestions")),
    ("feedback-accepted-suggestions-not-a-list", feedback(outcome="accepted", acceptedSuggestions="s-1"),
     Rejected(400, "feedback[0].acceptedSuggestions")),
    ("feedback-accepted-suggestion-without-id", feedback(outcome="accepted", acceptedSuggestions=[{}]),
     Rejected(400, "feedback[0].acceptedSuggestions[0].id")),
    ("feedback-overrideReason-string", feedback(overrideReason="not relevant"),
     Rejected(400, "feedback[0].overrideReason")),
    ("feedback-overrideReason-coding-without-code", feedback(overrideReason={"reason": {"system": "urn:x"}}),
     Rejected(400, "feedback[0].overrideReason.reason.code")),
    ("feedback-userComment-number", feedback(overrideReason={"userComment": 5}),
     Rejected(400, "feedback[0].overrideReason.userComment")),
    ("feedback-userComment-nul", feedback(overrideReason={"userComment": "a\x00b"}),
     Rejected(400, "feedback[0].overrideReason.userComment")),
    ("feedback-userComment-lone-surrogate", raw(json.dumps({"feedback": [OVERRIDDEN | {
        "overrideReason": {"userComment": "\ud800"}}]}).encode(), path=FEEDBACK),
     Rejected(400, "feedback[0].overrideReason.userComment")),
    ("feedback-second-item-bad", feedback(OVERRIDDEN, {**ACCEPTED, "card": None}), Rejected(400, "feedback[1].card")),
    ("feedback-unknown-service", Send({"feedback": [OVERRIDDEN]}, path="/cds-services/nope/feedback"),
     Rejected(404, "nope")),
    ("feedback-body-over-the-limit", Send({"feedback": [OVERRIDDEN | {"overrideReason": {
        "userComment": "x" * MAX_BODY}}]}, path=FEEDBACK), Rejected(413, "exceeds")),
]

#: A 200 for feedback: stored (unknown cards are kept and flagged). ``Assessed`` means "200" for feedback.
FEEDBACK_STORED_CASES: list[Case] = [
    ("feedback-unicode-card-uuid", feedback(card="card-\u00fc-\U0001f600-\u202e"), Assessed()),
    ("feedback-control-characters-in-comment", feedback(overrideReason={"userComment": "a\x01\x1b[31m\r\nb"}),
     Assessed()),
    ("feedback-duplicate-report", feedback(OVERRIDDEN, OVERRIDDEN), Assessed()),
    ("feedback-unknown-fields", feedback(OVERRIDDEN | {"x": {"y": [1]}}), Assessed()),
    ("feedback-timestamp-leap-second", feedback(outcomeTimestamp="2016-12-31T23:59:60Z"), Assessed()),
    ("feedback-optional-members-null", feedback(overrideReason=None, acceptedSuggestions=None), Assessed()),
    ("feedback-override-reason-members-null", feedback(overrideReason={"reason": None, "userComment": None}),
     Assessed()),
]

CASES: list[Case] = (BODY_CASES + ENVELOPE_CASES + PREFETCH_CASES + OBSERVATION_CASES + DATE_CASES
                     + IDENTITY_CASES + FEEDBACK_CASES)


# --- running a case ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Flask]:
    """The real app: auth off, SQLite, a small body limit, the clock at NOW."""
    directory = tmp_path_factory.mktemp("hostile")
    application = create_app({"AUTH": "disabled", "DATABASE_URL": f"sqlite:///{directory}/f.db",
                              "MAX_BODY_BYTES": MAX_BODY}, environ={}, clock=lambda: NOW)
    yield application
    application.extensions["neutropenia_cds"]["store"].dispose()


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


def send(client: FlaskClient, spec: Send, headers: Mapping[str, str] | None = None) -> TestResponse:
    """Send ``spec`` (JSON-encoding a non-bytes body, keeping lone surrogates as escapes)."""
    data = spec.body if isinstance(spec.body, bytes) or spec.body is None else json.dumps(spec.body).encode()
    return client.open(spec.path, method=spec.method, data=data, content_type=spec.content_type,
                       headers={**spec.headers, **(headers or {})})


def assert_well_formed(response: TestResponse) -> Any:
    """Never a 5xx, always JSON, never HTML or a stack trace; returns the parsed body."""
    text = response.get_data(as_text=True)
    assert response.status_code < 500, text[:500]
    assert response.mimetype == "application/json", response.mimetype
    assert "Traceback" not in text and "<html" not in text.lower() and 'File "' not in text
    return json.loads(text)


def check(response: TestResponse, expected: Outcome) -> None:
    """Assert that ``response`` is exactly ``expected`` (and well formed)."""
    body = assert_well_formed(response)
    if isinstance(expected, Rejected):
        assert response.status_code == expected.status, body
        assert body["resourceType"] == "OperationOutcome" and body["issue"], body
        assert all(issue["severity"] == "error" for issue in body["issue"])
        named = [e for issue in body["issue"] for e in issue.get("expression", [])]
        if expected.field not in named:
            assert any(expected.field in issue["diagnostics"] for issue in body["issue"]), body
        return
    assert response.status_code == 200, body
    if response.request.path == FEEDBACK:
        assert body == {}
        return
    assert isinstance(body["cards"], list)
    assessment = body["extension"][EXTENSION]
    assert assessment["evaluatedAt"] == "2025-03-10T12:00:00Z"
    issues = assessment.get("dataIssues", [])
    if isinstance(expected, Issue):
        matching = [i for i in issues if i["code"] == expected.code
                    and (expected.source is None or i.get("source") == expected.source)]
        assert matching, issues
        assert any(card["source"]["topic"]["code"] == "data-quality" for card in body["cards"]), body["cards"]
        if expected.findings is not None:
            assert tuple(assessment.get("findings", ())) == expected.findings, assessment
    else:
        assert issues == [], issues
        assert tuple(assessment.get("findings", ())) == expected.findings, assessment


@pytest.mark.parametrize(("spec", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_hostile_input(client: FlaskClient, spec: Send, expected: Outcome) -> None:
    check(send(client, spec), expected)


@pytest.mark.parametrize(("spec", "expected"), [c[1:] for c in FEEDBACK_STORED_CASES],
                         ids=[c[0] for c in FEEDBACK_STORED_CASES])
def test_odd_but_valid_feedback_is_stored(client: FlaskClient, app: Flask, spec: Send, expected: Outcome) -> None:
    check(send(client, spec), expected)
    store = app.extensions["neutropenia_cds"]["store"]
    for item in spec.body["feedback"]:
        assert store.feedback_for_card(item["card"]), item


def test_conflicting_copies_of_one_resource_give_one_answer_in_any_order(client: FlaskClient) -> None:
    # Regression (cds_hooks/prefetch.py, 26e1a45): only the first copy of an id reached the engine, so the order
    # of the prefetch chose between ANC 3000 (anc-normal) and 400 (neutropenia-severe).
    answers = [send(client, Send(request(labs=labs))).json["extension"][EXTENSION]  # type: ignore[index]
               for labs in ([observation(value=3000), observation(value=400)],
                            [observation(value=400), observation(value=3000)])]
    assert answers[0] == answers[1] and answers[0]["anc"]["cellsPerMicroliter"] == 400


# --- with authentication on: the token is checked before the body is read ---------------------------------------

AUTH_BASE = "http://localhost"


@pytest.fixture(scope="module")
def auth_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Flask, TokenSigner]]:
    directory = tmp_path_factory.mktemp("hostile-auth")
    signer = TokenSigner(ClientKey.generate("ES384"))
    issuers = write_issuer_config(directory / "issuers.json", [signer.issuer_entry()])
    application = create_app({"AUTH": "required", "PUBLIC_BASE_URL": AUTH_BASE, "TRUSTED_ISSUERS_FILE": str(issuers),
                              "DATABASE_URL": f"sqlite:///{directory}/f.db", "MAX_BODY_BYTES": MAX_BODY},
                             environ={}, clock=lambda: NOW)
    yield application, signer
    application.extensions["neutropenia_cds"]["store"].dispose()


UNAUTHORIZED = {"resourceType": "OperationOutcome",
                "issue": [{"severity": "error", "code": "login", "diagnostics": "unauthorized"}]}

AUTH_CASES: list[tuple[str, Send, bool, Outcome]] = [
    ("no-token-truncated-json", raw(VALID[:40]), False, Rejected(401, "unauthorized")),
    ("no-token-body-over-the-limit", Send(request(extension={"x": "y" * MAX_BODY})), False,
     Rejected(401, "unauthorized")),
    ("no-token-wrong-content-type", raw(VALID, "text/plain"), False, Rejected(401, "unauthorized")),
    ("no-token-feedback-garbage", raw(b"\xff\xfe", path=FEEDBACK), False, Rejected(401, "unauthorized")),
    ("token-truncated-json", raw(VALID[:40]), True, Rejected(400, "not valid JSON")),
    ("token-body-over-the-limit", Send(request(extension={"x": "y" * MAX_BODY})), True, Rejected(413, "exceeds")),
    ("token-wrong-content-type", raw(VALID, "text/plain"), True, Rejected(415, "text/plain")),
    ("token-bad-context", Send(request(context=context(patientId="../x"))), True, Rejected(400, "context.patientId")),
    ("token-bad-feedback", feedback(outcome="maybe"), True, Rejected(400, "feedback[0].outcome")),
    ("token-valid-request", Send(request(labs=[observation()])), True, Assessed(SEVERE)),
]


@pytest.mark.parametrize(("spec", "with_token", "expected"), [c[1:] for c in AUTH_CASES],
                         ids=[c[0] for c in AUTH_CASES])
def test_hostile_input_with_auth_on(auth_app: tuple[Flask, TokenSigner], spec: Send, with_token: bool,
                                    expected: Outcome) -> None:
    app, signer = auth_app
    headers = {"Authorization": f"Bearer {signer.sign(AUTH_BASE + spec.path)}"} if with_token else {}
    response = send(app.test_client(), spec, headers)
    if expected == Rejected(401, "unauthorized"):
        assert_well_formed(response)
        assert (response.status_code, response.json) == (401, UNAUTHORIZED)
    else:
        check(response, expected)


# --- PostgreSQL: what the store cannot hold is refused before it gets there --------------------------------------

POSTGRES_CASES: list[Case] = [
    ("hookInstance-nul", Send(request(labs=[observation()], hookInstance="hi\x00")), Rejected(400, "hookInstance")),
    ("feedback-card-nul", feedback(card="c\x00"), Rejected(400, "feedback[0].card")),
    # The card uuid is indexed: an entry over 2704 bytes was ProgramLimitExceeded, a 503 the client retried for ever.
    ("feedback-card-too-long", feedback(card=incompressible(3000)), Rejected(400, "feedback[0].card")),
    ("feedback-card-longest-stored", feedback(card="".join(  # 512 four-byte characters: 2048 bytes
        chr(0x10000 + int(incompressible(4 * 512)[i:i + 4], 16)) for i in range(0, 4 * 512, 4))), Assessed()),
    ("feedback-comment-nul", feedback(overrideReason={"userComment": "\x00"}),
     Rejected(400, "feedback[0].overrideReason.userComment")),
    ("feedback-suggestion-id-nul", feedback(outcome="accepted", acceptedSuggestions=[{"id": "\x00"}]),
     Rejected(400, "feedback[0].acceptedSuggestions[0].id")),
    ("feedback-control-characters-stored", feedback(overrideReason={"userComment": "\x01\x1b\r\n"}), Assessed()),
]


@pytest.mark.postgres
def test_hostile_input_against_postgresql(postgres_server: Any) -> None:
    with postgres_server.fresh_schema() as url:
        app = create_app({"AUTH": "disabled", "DATABASE_URL": url}, environ={}, clock=lambda: NOW)
        try:
            client = app.test_client()
            for name, spec, expected in POSTGRES_CASES:
                try:
                    check(send(client, spec), expected)
                except AssertionError as error:
                    raise AssertionError(f"case {name}: {error}") from error
        finally:
            app.extensions["neutropenia_cds"]["store"].dispose()


def test_the_catalogue_is_large_and_its_ids_unique() -> None:
    names = [c[0] for c in CASES + FEEDBACK_STORED_CASES] + [c[0] for c in AUTH_CASES]
    assert len(names) == len(set(names))
    assert len(CASES) >= 60
