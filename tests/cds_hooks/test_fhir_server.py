"""The fixture FHIR server: REST surface, search semantics, CORS, faults, time shifting, loading, CLI, and the
service's own no-prefetch fetch against it."""

from __future__ import annotations

import argparse
import copy
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import pytest
import requests
from flask import Flask
from flask.testing import FlaskClient

from cds_hooks.fhir_client import FhirFetcher
from cds_hooks.registry import fill_template
from cds_hooks.testing.fhir_search import DEFAULT_COUNT, date_range
from cds_hooks.testing.fhir_server import (
    DEFAULT_FOREIGN_BASE,
    Fault,
    FixtureError,
    FixtureServer,
    add_arguments,
    create_fhir_app,
    load_fixture_resources,
    main,
    parse_fault_option,
    parse_faults,
    relative_birth_dates,
    run,
)
from cds_hooks.testing.fixtures import FIXTURE_BASE, to_now
from cds_hooks.testing.processes import free_port

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "fixtures"
LOINC = "http://loinc.org"
CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
CLINICAL = "http://terminology.hl7.org/CodeSystem/condition-clinical"
NOW = datetime(2026, 5, 1, 9, 30, tzinfo=timezone.utc)


def observation(id_: str, code: str, when: Mapping[str, Any], *, patient: str = "p1", system: str | None = LOINC,
                status: str = "final", category: str = "laboratory") -> dict[str, Any]:
    """An Observation at ``when`` (e.g. ``{"effectiveDateTime": ...}``)."""
    coding = {"code": code, **({"system": system} if system else {})}
    return {"resourceType": "Observation", "id": id_, "status": status,
            "category": [{"coding": [{"system": CATEGORY, "code": category}]}],
            "code": {"coding": [coding]}, "subject": {"reference": f"Patient/{patient}"}, **when}


def condition(id_: str, status: str, **when: Any) -> dict[str, Any]:
    """A Condition of p1 with a clinical status."""
    return {"resourceType": "Condition", "id": id_, "subject": {"reference": "Patient/p1"},
            "clinicalStatus": {"coding": [{"system": CLINICAL, "code": status}]},
            "code": {"coding": [{"system": "http://snomed.info/sct", "code": "91861009"}]}, **when}


RESOURCES: list[dict[str, Any]] = [
    {"resourceType": "Patient", "id": "p1", "name": [{"family": "One", "given": ["Pat"]}], "gender": "female",
     "birthDate": "1970-01-01"},
    {"resourceType": "Patient", "id": "p2", "name": [{"family": "Two", "given": ["Sam", "J"]}], "gender": "male",
     "birthDate": "2024-09-08"},
    observation("anc1", "751-8", {"effectiveDateTime": "2025-03-10T08:00:00Z"}),
    observation("anc2", "751-8", {"effectiveDateTime": "2025-03-09T08:00:00Z"}, status="preliminary"),
    observation("wbc", "6690-2", {"effectiveDateTime": "2025-02-15T10:00:00Z"}),
    observation("temp", "8310-5", {"effectiveDateTime": "2025-03-10T11:30:00Z"}, category="vital-signs"),
    observation("per", "26499-4", {"effectivePeriod": {"start": "2025-03-05T00:00:00Z",
                                                       "end": "2025-03-07T00:00:00Z"}}),
    observation("iss", "6690-2", {"issued": "2025-01-20T09:00:00Z"}),
    observation("nosys", "751-8", {"effectiveDateTime": "2024-12-31"}, system=None),
    observation("p2obs", "751-8", {"effectiveDateTime": "2025-03-10T09:00:00+01:00"}, patient="p2"),
    condition("c1", "active", onsetDateTime="2024-12-01T00:00:00Z"),
    condition("c2", "resolved", onsetDateTime="2020-05-01"),
    condition("c3", "recurrence", recordedDate="2025-03-01T10:00:00Z"),
    {"resourceType": "MedicationRequest", "id": "m1", "status": "active", "intent": "order",
     "subject": {"reference": "Patient/p1"}, "authoredOn": "2025-03-01T09:00:00Z",
     "medicationCodeableConcept": {"coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm",
                                               "code": "2555"}]}},
    {"resourceType": "MedicationRequest", "id": "m2", "status": "stopped", "intent": "order",
     "subject": {"reference": "Patient/p1"}, "authoredOn": "2024-11-01T09:00:00Z",
     "medicationReference": {"reference": "Medication/peg"}},
    {"resourceType": "MedicationRequest", "id": "m3", "status": "stopped", "intent": "order",
     "subject": {"reference": "Patient/p2"}, "authoredOn": "2024-10-01T09:00:00Z",
     "medicationReference": {"reference": "http://other.example/fhir/Medication/peg"}},
    {"resourceType": "Medication", "id": "peg", "code": {"text": "pegfilgrastim syringe"}},
    {"resourceType": "Medication", "id": "unused", "code": {"text": "not ordered"}},
]
P1_OBSERVATIONS = {"anc1", "anc2", "wbc", "temp", "per", "iss", "nosys"}


@pytest.fixture
def fhir_app() -> Flask:
    return create_fhir_app(RESOURCES, shift_to_now=False, new_uuid=lambda: "launch-1")


@pytest.fixture
def fhir(fhir_app: Flask) -> FlaskClient:
    return fhir_app.test_client()


@pytest.fixture(scope="module")
def live() -> Iterator[FixtureServer]:
    """A real server (admin endpoint on) over RESOURCES, unshifted."""
    with FixtureServer(create_fhir_app(RESOURCES, shift_to_now=False, enable_admin=True)) as server:
        yield server


@pytest.fixture
def live_faults(live: FixtureServer) -> Iterator[Any]:
    """Set faults on ``live`` through its admin endpoint; cleared afterwards."""
    def put(*faults: Mapping[str, Any]) -> None:
        response = requests.post(f"{live.url}/_faults", json=list(faults), timeout=5)
        assert response.status_code == 200, response.text

    yield put
    requests.delete(f"{live.url}/_faults", timeout=5)


def match_ids(bundle: Mapping[str, Any]) -> list[str]:
    """Ids of a searchset's match entries, in order."""
    return [e["resource"]["id"] for e in bundle.get("entry", []) if e["search"]["mode"] == "match"]


def is_outcome(response: Any, status: int) -> bool:
    body = json.loads(response.get_data() if hasattr(response, "get_data") else response.content)
    return (response.status_code == status and body["resourceType"] == "OperationOutcome"
            and bool(body["issue"][0]["diagnostics"]))


# --- metadata and read ----------------------------------------------------------------------------------------


def test_metadata_is_a_capability_statement(fhir: FlaskClient) -> None:
    response = fhir.get("/metadata")
    statement = response.json
    assert response.status_code == 200 and response.mimetype == "application/fhir+json"
    assert statement["resourceType"] == "CapabilityStatement" and statement["fhirVersion"] == "4.0.1"
    assert "json" in statement["format"] and statement["kind"] == "instance"
    resources = {r["type"]: r for r in statement["rest"][0]["resource"]}
    assert {"Patient", "Observation", "Condition", "MedicationRequest"} <= set(resources)
    params = {p["name"] for p in resources["Observation"]["searchParam"]}
    assert {"patient", "subject", "code", "status", "category", "date", "_id"} <= params
    assert "clinical-status" in {p["name"] for p in resources["Condition"]["searchParam"]}
    assert {i["code"] for i in resources["Patient"]["interaction"]} == {"read", "search-type"}


@pytest.mark.parametrize("path", ["/Patient/p1", "/Observation/anc1", "/Condition/c3", "/MedicationRequest/m1"],
                         ids=["patient", "observation", "condition", "medication-request"])
def test_read_returns_the_resource(fhir: FlaskClient, path: str) -> None:
    response = fhir.get(path)
    resource_type, resource_id = path.strip("/").split("/")
    expected = next(r for r in RESOURCES if (r["resourceType"], r["id"]) == (resource_type, resource_id))
    assert response.status_code == 200 and response.mimetype == "application/fhir+json"
    assert response.json == expected


@pytest.mark.parametrize(("method", "path", "kwargs", "status"), [
    ("GET", "/Patient/nobody", {}, 404),
    ("GET", "/Encounter", {}, 404),
    ("GET", "/Foo/1", {}, 404),
    ("GET", "/not/a/fhir/path/at/all", {}, 404),
    ("GET", "/", {}, 404),
    ("PUT", "/Patient/p1", {"json": {"resourceType": "Patient"}}, 405),
    ("POST", "/Patient", {"json": {"resourceType": "Patient"}}, 405),
    ("GET", "/Observation?date=yesterday", {}, 400),
    ("GET", "/Observation?date=ge2025-13", {}, 400),
    ("GET", "/Observation?_count=many", {}, 400),
    ("GET", "/Observation?_offset=-1", {}, 400),
    ("POST", "/Observation/_search", {"json": {"patient": "p1"}}, 415),
], ids=["unknown-id", "type-without-data", "unknown-type", "unknown-path", "root", "put", "create",
        "bad-date", "bad-month", "bad-count", "bad-offset", "search-json-body"])
def test_errors_are_operation_outcomes(fhir: FlaskClient, method: str, path: str, kwargs: dict[str, Any],
                                       status: int) -> None:
    response = fhir.open(path, method=method, **kwargs)
    assert is_outcome(response, status)
    assert response.mimetype == "application/fhir+json"
    assert response.headers["Access-Control-Allow-Origin"] == "*"


# --- search -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("query", "matches", "includes"), [
    ("MedicationRequest?patient=p1&_include=MedicationRequest:medication", {"m1", "m2"}, ["Medication/peg"]),
    ("MedicationRequest?_include=MedicationRequest:medication", {"m1", "m2", "m3"}, ["Medication/peg"]),
    ("MedicationRequest?patient=p1&status=active&_include=MedicationRequest:medication", {"m1"}, []),
    ("MedicationRequest?patient=p1&_include=MedicationRequest:medication:Medication", {"m1", "m2"},
     ["Medication/peg"]),
    ("MedicationRequest?patient=p1", {"m1", "m2"}, []),
    ("MedicationRequest?patient=p2&_include=MedicationRequest:medication", {"m3"}, []),
    ("Observation?patient=p1&_include=Observation:subject:Patient", P1_OBSERVATIONS, ["Patient/p1"]),
    ("Observation?patient=p1&_include=Observation:subject:Group", P1_OBSERVATIONS, []),
], ids=["orders-of-a-patient", "all-orders", "order-coded-inline", "typed", "no-include",
        "absolute-url-of-another-server", "untargeted-parameter-typed", "untargeted-parameter-other-type"])
def test_search_includes_the_medications_ordered(fhir: FlaskClient, query: str, matches: set[str],
                                                 includes: list[str]) -> None:
    # US Core: a server whose orders reference Medication resources SHALL support this _include, so the fixture
    # server, standing in for an EHR's, serves it.
    bundle = fhir.get(f"/{query}").json
    assert set(match_ids(bundle)) == matches and bundle["total"] == len(matches)
    included = [f"{e['resource']['resourceType']}/{e['resource']['id']}" for e in bundle.get("entry", [])
                if e["search"]["mode"] == "include"]
    assert included == includes
    assert not [e for e in bundle.get("entry", []) if e["search"]["mode"] == "outcome"]  # nothing ignored


@pytest.mark.parametrize("value", ["MedicationRequest:medication:Patient", "MedicationRequest:performer",
                                   "Observation:subject", "MedicationRequest:status"],
                         ids=["wrong-target-type", "unknown-parameter", "other-resource-type", "not-a-reference"])
def test_search_ignores_an_include_it_cannot_serve(fhir: FlaskClient, value: str) -> None:
    bundle = fhir.get(f"/MedicationRequest?patient=p1&_include={value}").json
    assert set(match_ids(bundle)) == {"m1", "m2"}
    modes = [e["search"]["mode"] for e in bundle["entry"]]
    assert "include" not in modes and modes.count("outcome") == 1  # the ignored parameter is listed


@pytest.mark.parametrize(("query", "expected"), [
    ("Observation?patient=p1", P1_OBSERVATIONS),
    ("Observation?patient=Patient/p1", P1_OBSERVATIONS),
    ("Observation?subject=Patient/p1", P1_OBSERVATIONS),
    ("Observation?subject=p1", P1_OBSERVATIONS),
    ("Observation?subject:Patient=p2", {"p2obs"}),
    ("Observation?patient=http://elsewhere.example/fhir/Patient/p2", {"p2obs"}),
    ("Observation?patient=p1,p2", P1_OBSERVATIONS | {"p2obs"}),
    ("Observation?patient=Group/p1", set()),
    ("Observation?patient=p3", set()),
    ("Observation?patient=p1&code=http://loinc.org|751-8", {"anc1", "anc2"}),
    ("Observation?patient=p1&code=|751-8", {"nosys"}),
    ("Observation?patient=p1&code=751-8", {"anc1", "anc2", "nosys"}),
    ("Observation?patient=p1&code=http://loinc.org|", P1_OBSERVATIONS - {"nosys"}),
    ("Observation?patient=p1&code=http://snomed.info/sct|751-8", set()),
    ("Observation?patient=p1&code=http://loinc.org|751-8,http://loinc.org|8310-5", {"anc1", "anc2", "temp"}),
    ("Observation?patient=p1&code=http://loinc.org|751-8&code=751-8", {"anc1", "anc2"}),
    ("Observation?patient=p1&code=http://loinc.org|751-8&status=final", {"anc1"}),
    ("Observation?patient=p1&status=final,preliminary", P1_OBSERVATIONS),
    ("Observation?patient=p1&status=http://hl7.org/fhir/observation-status|preliminary", {"anc2"}),
    ("Observation?patient=p1&status:not=final", {"anc2"}),
    ("Observation?patient=p1&category=vital-signs", {"temp"}),
    (f"Observation?patient=p1&category={CATEGORY}|laboratory", P1_OBSERVATIONS - {"temp"}),
    ("Observation?_id=anc1,temp", {"anc1", "temp"}),
    ("Condition?patient=p1&clinical-status=active,recurrence,relapse", {"c1", "c3"}),
    (f"Condition?patient=p1&clinical-status={CLINICAL}|resolved", {"c2"}),
    ("Condition?patient=p1&code=http://snomed.info/sct|91861009", {"c1", "c2", "c3"}),
    ("MedicationRequest?patient=p1&status=active", {"m1"}),
    ("MedicationRequest?patient=p1&code=2555", {"m1"}),
    ("Patient?_id=p2", {"p2"}),
    ("Patient?gender=female", {"p1"}),
    ("Patient?name=sa", {"p2"}),
    ("Patient/p1/Condition?clinical-status=active", {"c1"}),
], ids=["patient", "patient-typed", "subject-typed", "subject-bare", "subject-modifier", "patient-absolute-url",
        "patient-or", "patient-wrong-type", "patient-unknown", "code-system-code", "code-no-system", "code-any-system",
        "code-whole-system", "code-other-system", "code-or", "code-and", "code-and-status", "status-or",
        "status-with-system", "status-not", "category-bare", "category-system", "id-list", "clinical-status-list",
        "clinical-status-system", "condition-code", "medication-status", "medication-code", "patient-id",
        "patient-gender", "patient-name", "compartment"])
def test_search_filters(fhir: FlaskClient, query: str, expected: set[str]) -> None:
    response = fhir.get(f"/{query}")
    assert response.status_code == 200, response.json
    bundle = response.json
    assert bundle["resourceType"] == "Bundle" and bundle["type"] == "searchset"
    assert set(match_ids(bundle)) == expected and bundle["total"] == len(expected)


@pytest.mark.parametrize(("date", "expected"), [
    (["2025"], {"anc1", "anc2", "wbc", "temp", "per", "iss", "p2obs"}),
    (["2025-03"], {"anc1", "anc2", "temp", "per", "p2obs"}),
    (["2025-03-10"], {"anc1", "temp", "p2obs"}),
    (["eq2025-03-10"], {"anc1", "temp", "p2obs"}),
    (["2025-03-10T08:00Z"], {"anc1", "p2obs"}),
    (["2025-03-10T08:00:00Z"], {"anc1", "p2obs"}),
    (["2025-03-10T09:00:00+01:00"], {"anc1", "p2obs"}),
    (["ne2025-03"], {"wbc", "iss", "nosys"}),
    (["gt2025-03-09"], {"anc1", "temp", "p2obs"}),
    (["gt2025-03-06"], {"anc1", "anc2", "temp", "per", "p2obs"}),
    (["lt2025-03-09"], {"wbc", "per", "iss", "nosys"}),
    (["lt2025"], {"nosys"}),
    (["ge2025-03-09"], {"anc1", "anc2", "temp", "p2obs"}),
    (["le2025-03-09"], {"anc2", "wbc", "per", "iss", "nosys"}),
    (["sa2025-03-06"], {"anc1", "anc2", "temp", "p2obs"}),
    (["eb2025-03-06"], {"wbc", "iss", "nosys"}),
    (["ap2025-03-06"], {"per"}),
    (["gt2025-03-10T08:00:00Z"], {"temp"}),
    (["ge2025-03-10T08:00:00Z"], {"anc1", "temp", "p2obs"}),
    (["2025-01-20"], {"iss"}),
    (["ge2025-03-10", "lt2025-03-10T10:00Z"], {"anc1", "p2obs"}),
    (["2025-03-10,2025-02"], {"anc1", "temp", "p2obs", "wbc"}),
], ids=["year", "month", "day", "day-eq", "minute", "second", "zone", "ne-month", "gt-day", "gt-period-end",
        "lt-day", "lt-year", "ge-day", "le-day", "sa", "eb", "ap-overlap", "gt-second", "ge-second",
        "issued-fallback", "repeated-and", "comma-or"])
def test_search_observation_date_prefixes(fhir: FlaskClient, date: list[str], expected: set[str]) -> None:
    query = urlencode([("date", value) for value in date])
    response = fhir.get(f"/Observation?{query}")
    assert response.status_code == 200, response.json
    assert set(match_ids(response.json)) == expected


@pytest.mark.parametrize(("query", "expected"), [
    ("Condition?date=2024-12", {"c1"}),
    ("Condition?date=ge2025-03-01", {"c3"}),
    ("Condition?onset-date=lt2021", {"c2"}),
    ("Condition?recorded-date=2025-03-01", {"c3"}),
    ("MedicationRequest?date=ge2025", {"m1"}),
    ("MedicationRequest?authoredon=2024-11-01", {"m2"}),
    ("Patient?birthdate=lt2000", {"p1"}),
], ids=["condition-onset", "condition-recorded-fallback", "condition-onset-date", "condition-recorded-date",
        "medication-date", "medication-authoredon", "patient-birthdate"])
def test_search_dates_of_other_types(fhir: FlaskClient, query: str, expected: set[str]) -> None:
    assert set(match_ids(fhir.get(f"/{query}").json)) == expected


@pytest.mark.parametrize(("sort", "expected"), [
    ("-date", ["temp", "anc1", "anc2", "per", "wbc", "iss", "nosys"]),
    ("date", ["nosys", "iss", "wbc", "per", "anc2", "anc1", "temp"]),
    ("_id", sorted(P1_OBSERVATIONS)),
    ("-_id", sorted(P1_OBSERVATIONS, reverse=True)),
    ("-_lastUpdated", ["anc1", "anc2", "wbc", "temp", "per", "iss", "nosys"]),
    ("status,-date", ["temp", "anc1", "anc2", "per", "wbc", "iss", "nosys"]),
], ids=["date-desc", "date-asc", "id", "id-desc", "last-updated-harmless", "unknown-key-ignored"])
def test_search_sort(fhir: FlaskClient, sort: str, expected: list[str]) -> None:
    assert match_ids(fhir.get(f"/Observation?patient=p1&_sort={sort}").json) == expected


def test_sort_puts_resources_without_a_date_last(fhir: FlaskClient) -> None:
    assert match_ids(fhir.get("/MedicationRequest?_sort=-date").json) == ["m1", "m2", "m3"]
    resources = [*RESOURCES, observation("undated", "751-8", {})]
    client = create_fhir_app(resources, shift_to_now=False).test_client()
    for sort in ("date", "-date"):
        assert match_ids(client.get(f"/Observation?patient=p1&_sort={sort}").json)[-1] == "undated"


@pytest.mark.parametrize("count", [1, 2, 3, 7], ids=["count-1", "count-2", "count-3", "count-7"])
@pytest.mark.parametrize("base_url", ["http://localhost", "http://fhir.test:8080"], ids=["localhost", "other-host"])
def test_paging_follows_next_links_on_the_request_origin(fhir: FlaskClient, count: int, base_url: str) -> None:
    everything = match_ids(fhir.get("/Observation?patient=p1&_sort=-date").json)
    url: str | None = f"{base_url}/Observation?patient=p1&_sort=-date&_count={count}"
    pages: list[list[str]] = []
    while url:
        response = fhir.get(url)
        bundle = response.json
        assert bundle["total"] == len(everything)
        pages.append(match_ids(bundle))
        links = {link["relation"]: link["url"] for link in bundle["link"]}
        assert urlsplit(links["self"])[:2] == urlsplit(base_url)[:2]
        url = links.get("next")
        if url:
            assert urlsplit(url)[:2] == urlsplit(base_url)[:2] and "_offset=" in url and "_sort=-date" in url
    assert [i for page in pages for i in page] == everything
    assert all(len(page) == count for page in pages[:-1]) and len(pages) == -(-len(everything) // count)


def test_paging_limits(fhir: FlaskClient) -> None:
    summary = fhir.get("/Observation?patient=p1&_count=0").json
    assert summary["total"] == len(P1_OBSERVATIONS) and "entry" not in summary
    assert "entry" not in fhir.get("/Observation?_summary=count").json
    bundle = fhir.get("/Observation").json
    assert len(match_ids(bundle)) == 8 and not [l for l in bundle["link"] if l["relation"] == "next"]
    assert DEFAULT_COUNT >= 100
    assert match_ids(fhir.get("/Observation?patient=p1&_sort=_id&_offset=5").json) == sorted(P1_OBSERVATIONS)[5:]


def test_search_entries_and_self_link(fhir: FlaskClient) -> None:
    bundle = fhir.get("/Observation?patient=p1&code=http://loinc.org|751-8&_count=50").json
    assert bundle["link"][0] == {"relation": "self", "url": "http://localhost/Observation?patient=p1&code="
                                 "http://loinc.org|751-8&_count=50"}
    for entry in bundle["entry"]:
        assert entry["fullUrl"] == f"http://localhost/Observation/{entry['resource']['id']}"
        assert entry["search"] == {"mode": "match"}


def test_unknown_parameters_are_ignored_and_reported(fhir: FlaskClient) -> None:
    bundle = fhir.get("/Observation?patient=p1&foo=bar&code:text=neutrophils&_include=Observation:performer").json
    assert set(match_ids(bundle)) == P1_OBSERVATIONS
    (outcome,) = [e for e in bundle["entry"] if e["search"]["mode"] == "outcome"]
    diagnostics = outcome["resource"]["issue"][0]["diagnostics"]
    assert "foo" in diagnostics and "code:text" in diagnostics and "_include" in diagnostics
    assert outcome["resource"]["issue"][0]["severity"] == "warning"
    assert "foo" not in bundle["link"][0]["url"]  # the self link shows only the parameters applied


@pytest.mark.parametrize("query", [
    "Observation?patient=p1&code=http://loinc.org|751-8,http://loinc.org|8310-5&_sort=-date&_count=200",
    "Observation?patient=p1&_sort=-date&_count=2",
    "Condition?patient=p1&clinical-status=active,recurrence,relapse",
    "MedicationRequest?patient=p1&status=active,on-hold,completed,stopped&_count=200",
    "Observation?date=ge2025-03-09&date=lt2025-03-10T10:00Z",
], ids=["labs-template", "paged", "conditions-template", "medications-template", "repeated-date"])
def test_post_search_equals_get(fhir: FlaskClient, query: str) -> None:
    path, _, params = query.partition("?")
    get = fhir.get(f"/{query}")
    post = fhir.post(f"/{path}/_search", data=params, content_type="application/x-www-form-urlencoded")
    assert post.status_code == 200 and post.json == get.json
    first, _, rest = params.partition("&")
    merged = fhir.post(f"/{path}/_search?{first}", data=rest, content_type="application/x-www-form-urlencoded")
    assert set(match_ids(merged.json)) == set(match_ids(get.json))


# --- CORS, the Sandbox's needs, SMART launch -----------------------------------------------------------------


@pytest.mark.parametrize(("method", "path", "status"), [
    ("GET", "/metadata", 200), ("GET", "/Patient/p1", 200), ("GET", "/Observation?patient=p1", 200),
    ("POST", "/Observation/_search", 200), ("GET", "/Patient/nobody", 404), ("GET", "/Foo", 404),
    ("GET", "/Observation?date=x", 400), ("DELETE", "/Patient/p1", 405), ("POST", "/_services/smart/Launch", 200),
    ("OPTIONS", "/Observation/_search", 204), ("OPTIONS", "/Patient/p1", 204), ("OPTIONS", "/Foo/bar/baz", 204),
], ids=["metadata", "read", "search", "post-search", "404-read", "404-type", "400", "405", "smart-launch",
        "preflight-search", "preflight-read", "preflight-unknown"])
def test_cors_on_every_route(fhir: FlaskClient, method: str, path: str, status: int) -> None:
    headers = {"Origin": "https://sandbox.cds-hooks.org", "Access-Control-Request-Method": "POST",
               "Access-Control-Request-Headers": "authorization, content-type, x-custom"}
    response = fhir.open(path, method=method, headers=headers)
    assert response.status_code == status
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    allowed = {h.strip().lower() for h in response.headers["Access-Control-Allow-Headers"].split(",")}
    assert {"authorization", "content-type"} <= allowed
    methods = {m.strip() for m in response.headers["Access-Control-Allow-Methods"].split(",")}
    assert {"GET", "POST", "OPTIONS"} <= methods
    if method == "OPTIONS":
        assert "x-custom" in allowed and response.data == b""


def test_patient_list_is_open_and_keeps_given_names_as_arrays(fhir: FlaskClient) -> None:
    response = fhir.get("/Patient", headers={"Accept": "application/json+fhir"})
    assert response.status_code == 200
    patients = [e["resource"] for e in response.json["entry"]]
    assert [p["id"] for p in patients] == ["p1", "p2"]
    assert all(isinstance(p["name"][0]["given"], list) for p in patients)


def test_smart_launch_returns_a_launch_id(fhir: FlaskClient) -> None:
    body = {"launchUrl": "https://app.example/launch", "parameters": {"patient": "p1"}}
    response = fhir.post("/_services/smart/Launch", json=body)
    assert response.status_code == 200 and response.json == {"launch_id": "launch-1"}
    default = create_fhir_app(RESOURCES).test_client().post("/_services/smart/Launch", json=body)
    assert uuid.UUID(default.json["launch_id"])


def test_base_path(live: FixtureServer) -> None:
    client = create_fhir_app(RESOURCES, base_path="/fhir/r4/").test_client()
    assert client.get("/fhir/r4/Patient/p1").status_code == 200
    assert client.get("/Patient/p1").status_code == 404
    bundle = client.get("/fhir/r4/Observation?patient=p1&_count=1").json
    assert bundle["link"][1]["url"].startswith("http://localhost/fhir/r4/Observation?")
    assert client.post("/fhir/r4/_services/smart/Launch", json={}).status_code == 200


# --- faults ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("fault", "hit", "spared"), [
    ({"match": "Observation", "status": 503}, "/Observation?patient=p1", "/Patient/p1"),
    ({"match": "Observation", "status": 500}, "/Observation/anc1", "/Condition?patient=p1"),
    ({"match": "/Patient/p1", "status": 401}, "/Patient/p1", "/Patient/p2"),
    ({"match": "/Patient", "status": 403}, "/Patient/p1/Condition", "/Observation?patient=p1"),
    ({"match": "Observation", "params": {"patient": "p2"}, "status": 404}, "/Observation?patient=Patient/p2",
     "/Observation?patient=p1"),
    ({"match": "*", "method": "POST", "status": 500}, "/_services/smart/Launch", "/Patient/p1"),
    ({"match": "/metadata", "status": 503}, "/metadata", "/Patient"),
    # The vitals template's code list, hit by one of its codes with or without the system.
    ({"match": "Observation", "params": {"code": "8310-5"}, "status": 503},
     "/Observation?patient=p1&code=http://loinc.org|8331-1,http://loinc.org|8310-5",
     "/Observation?patient=p1&code=http://loinc.org|751-8"),
    ({"match": "Observation", "params": {"code": "http://loinc.org|8310-5"}, "status": 503},
     "/Observation?patient=p1&code=http://loinc.org|8310-5", "/Observation?patient=p1&code=http://snomed.info/sct|8310-5"),
], ids=["type-503", "type-read-500", "path-401", "path-prefix-403", "params-404", "method-post", "metadata",
        "params-code", "params-system-and-code"])
def test_fault_status_answers_an_operation_outcome(fault: dict[str, Any], hit: str, spared: str) -> None:
    client = create_fhir_app(RESOURCES, faults=[fault]).test_client()
    method = fault.get("method", "GET")
    response = client.open(hit, method=method, json={} if method == "POST" else None)
    assert is_outcome(response, fault["status"])
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    assert client.get(spared).status_code == 200


def test_fault_delay_sleeps_before_answering() -> None:
    client = create_fhir_app(RESOURCES, faults={"Condition": {"delay": 0.3}}).test_client()
    started = time.monotonic()
    assert client.get("/Condition?patient=p1").status_code == 200
    assert time.monotonic() - started >= 0.3
    started = time.monotonic()
    client.get("/Patient/p1")
    assert time.monotonic() - started < 0.3


@pytest.mark.parametrize(("fault", "path", "check"), [
    ({"malformed": True}, "/Observation?patient=p1", "not-json"),
    ({"malformed": True}, "/Patient/p1", "not-json"),
    ({"wrong_type": True}, "/Observation?patient=p1", "wrong-type"),
    ({"wrong_type": True}, "/Patient/p1", "wrong-type"),
    ({"loop": True}, "/Observation?patient=p1&_count=2", "loop"),
    ({"loop": True}, "/Observation?patient=p1", "loop"),
    ({"foreign_next": True}, "/Observation?patient=p1&_count=2", "foreign"),
    ({"foreign_next": "https://other.example:9443/base"}, "/Observation?patient=p1", "foreign"),
    ({"oversize": 50_000}, "/Observation?patient=p1", "oversize"),
], ids=["malformed-search", "malformed-read", "wrong-type-search", "wrong-type-read", "loop-paged",
        "loop-single-page", "foreign-next-default", "foreign-next-url", "oversize"])
def test_fault_body_effects(fault: dict[str, Any], path: str, check: str) -> None:
    client = create_fhir_app(RESOURCES, faults=[{"match": "*", **fault}]).test_client()
    response = client.get(path)
    assert response.status_code == 200 and response.mimetype == "application/fhir+json"
    if check == "not-json":
        with pytest.raises(ValueError):
            json.loads(response.data)
        return
    body = json.loads(response.data)
    if check == "wrong-type":
        assert body["resourceType"] not in ("Bundle", "Patient")
    elif check == "oversize":
        assert len(response.data) >= fault["oversize"] and body["resourceType"] == "Bundle"
    else:
        links = {link["relation"]: link["url"] for link in body["link"]}
        if check == "loop":
            assert links["next"] == links["self"]
        else:
            foreign = fault["foreign_next"] if isinstance(fault["foreign_next"], str) else DEFAULT_FOREIGN_BASE
            assert links["next"].startswith(foreign + "/Observation?")


@pytest.mark.parametrize(("fault", "limits", "reason", "note"), [
    ({"match": "Observation", "loop": True}, {}, None, "repeats an earlier page"),
    ({"match": "Observation", "foreign_next": True}, {}, None, "another origin"),
    ({"match": "Observation", "malformed": True}, {}, "not JSON", None),
    ({"match": "Observation", "wrong_type": True}, {}, "expected Bundle", None),
    ({"match": "Observation", "oversize": 20_000}, {"max_page_bytes": 10_000}, "larger than", None),
    ({"match": "Observation", "status": 503}, {}, "HTTP 503", None),
    ({"match": "Observation", "status": 401}, {}, "refused access (HTTP 401)", None),
    ({"match": "Observation", "delay": 1.0}, {"deadline": 0.3}, "timed out", None),
], ids=["loop", "foreign-next", "malformed", "wrong-type", "oversize", "503", "401", "delay"])
def test_faults_are_what_the_service_fetcher_detects(live: FixtureServer, live_faults: Any, fault: dict[str, Any],
                                                      limits: dict[str, Any], reason: str | None,
                                                      note: str | None) -> None:
    live_faults(fault)
    deadline = time.monotonic() + limits.pop("deadline", 5.0)
    with FhirFetcher() as fetcher:
        outcome = fetcher.fetch(live.url, "Observation?patient=p1&_count=3", token=None, deadline=deadline,
                                **limits)
    if reason:
        assert outcome.reason is not None and reason in outcome.reason
    else:
        assert outcome.ok and outcome.note is not None and note in outcome.note
        assert outcome.resources  # the first page's data is kept


@pytest.mark.parametrize(("data", "expected"), [
    ([{"match": "Observation", "status": 503}], [Fault("Observation", status=503)]),
    ({"faults": [{"match": "/Patient", "delay": 2}]}, [Fault("/Patient", delay=2.0)]),
    ({"Condition": {"malformed": True}, "*": {"oversize": 10}},
     [Fault("Condition", malformed=True), Fault("*", oversize=10)]),
    ([{"match": "Observation", "foreign_next": True, "params": {"patient": "p1"}}],
     [Fault("Observation", params={"patient": "p1"}, foreign_next=DEFAULT_FOREIGN_BASE)]),
    ({"match": "Observation", "status": 503}, [Fault("Observation", status=503)]),
], ids=["list", "faults-key", "mapping", "foreign-next-true", "one-fault-object"])
def test_parse_faults(data: Any, expected: list[Fault]) -> None:
    assert parse_faults(data) == expected
    assert parse_faults([fault.to_json() for fault in expected]) == expected


@pytest.mark.parametrize(("text", "expected"), [
    ("Observation:status=503", Fault("Observation", status=503)),
    ("/Patient/p1:delay=1.5,method=get", Fault("/Patient/p1", delay=1.5, method="GET")),
    ("Observation?patient=np-0003:malformed", Fault("Observation", params={"patient": "np-0003"}, malformed=True)),
    ("*:loop,oversize=100", Fault("*", loop=True, oversize=100)),
    ("Observation:foreign_next=http://x.example:81", Fault("Observation", foreign_next="http://x.example:81")),
    ("Condition:wrong_type=true", Fault("Condition", wrong_type=True)),
    # A token parameter's system is a URL: its ':' is not where the options start.
    ("Observation?code=http://loinc.org|8310-5:status=503",
     Fault("Observation", params={"code": "http://loinc.org|8310-5"}, status=503)),
    ("Observation?code=http://loinc.org|8310-5:foreign_next=http://x.example:81",
     Fault("Observation", params={"code": "http://loinc.org|8310-5"}, foreign_next="http://x.example:81")),
], ids=["status", "path-delay-method", "params", "flags", "foreign-url", "explicit-true", "params-with-url",
        "params-with-url-foreign-url"])
def test_parse_fault_option(text: str, expected: Fault) -> None:
    assert parse_fault_option(text) == expected


@pytest.mark.parametrize("data", [
    [{"match": "Observation", "colour": "red"}], [{"match": "Observation", "status": 42}],
    [{"match": "Observation", "status": True}], [{"match": "Observation", "delay": -1}],
    [{"match": "Observation"}], [{"status": 500}], [{"match": "", "status": 500}],
    [{"match": "Observation", "foreign_next": "ftp://x"}], [{"match": "Observation", "oversize": 0}],
    [{"match": "Observation", "loop": "yes"}], [{"match": "Observation", "method": "PUT", "status": 500}],
    [{"match": "Observation", "params": {"patient": 1}, "status": 500}], "Observation", [3],
], ids=["unknown-option", "bad-status", "bool-status", "negative-delay", "no-effect", "no-match", "empty-match",
        "foreign-not-http", "zero-oversize", "loop-not-bool", "bad-method", "param-not-string", "string", "number"])
def test_invalid_faults_are_rejected(data: Any) -> None:
    with pytest.raises(ValueError):
        parse_faults(data)


@pytest.mark.parametrize("text", ["Observation", "Observation:", "Observation:status=five", "Observation:delay=x",
                                  "Observation:bogus"],
                         ids=["no-options", "empty-options", "status-not-number", "delay-not-number", "unknown"])
def test_invalid_fault_options_are_rejected(text: str) -> None:
    with pytest.raises(ValueError):
        parse_fault_option(text)


def test_admin_endpoint_sets_lists_and_clears_faults(live: FixtureServer) -> None:
    url = f"{live.url}/_faults"
    try:
        set_ = requests.post(url, json={"Observation": {"status": 503}}, timeout=5)
        assert set_.status_code == 200 and set_.json() == {"faults": [{"match": "Observation", "status": 503}]}
        assert requests.get(url, timeout=5).json() == set_.json()
        assert requests.get(f"{live.url}/Observation?patient=p1", timeout=5).status_code == 503
        assert requests.get(f"{live.url}/Patient/p1", timeout=5).status_code == 200
        bad = requests.post(url, json=[{"match": "Observation", "colour": "red"}], timeout=5)
        assert is_outcome(bad, 400) and "colour" in bad.text
        not_json = requests.post(url, data=b"{not json", timeout=5)
        # werkzeug's own text ("The browser (or proxy) sent a request...") said nothing of what was wrong.
        assert is_outcome(not_json, 400) and "not JSON" in not_json.json()["issue"][0]["diagnostics"]
        preflight = requests.options(url, headers={"Access-Control-Request-Method": "DELETE"}, timeout=5)
        assert "DELETE" in preflight.headers["Access-Control-Allow-Methods"]
    finally:
        cleared = requests.delete(url, timeout=5)
    assert cleared.json() == {"faults": []}
    assert requests.get(f"{live.url}/Observation?patient=p1", timeout=5).status_code == 200


def test_admin_endpoint_exists_only_when_enabled(fhir: FlaskClient) -> None:
    assert is_outcome(fhir.post("/_faults", json=[{"match": "*", "status": 500}]), 405)
    assert is_outcome(fhir.get("/_faults"), 404)
    assert fhir.get("/Patient/p1").status_code == 200


# --- time shifting ------------------------------------------------------------------------------------------------


def test_times_are_shifted_to_now_by_default() -> None:
    client = create_fhir_app(RESOURCES, clock=lambda: NOW).test_client()
    delta = NOW - FIXTURE_BASE
    anc = client.get("/Observation/anc1").json
    assert anc["effectiveDateTime"] == "2026-05-01T05:30:00Z"  # 4 hours before "now", as before the base
    assert anc == to_now(next(r for r in RESOURCES if r["id"] == "anc1"), NOW)
    assert client.get("/Patient/p1").json["birthDate"] == "1970-01-01"  # plain dates stay
    searched = client.get("/Observation?patient=p1&_id=per").json["entry"][0]["resource"]
    start = datetime(2025, 3, 5, tzinfo=timezone.utc) + delta
    assert searched["effectivePeriod"]["start"] == start.strftime("%Y-%m-%dT%H:%M:%SZ")
    # Date searches see the shifted times: "the last 24 hours" holds now.
    recent = client.get(f"/Observation?date=ge{(NOW - timedelta(hours=24)).strftime('%Y-%m-%dT%H:%M:%SZ')}").json
    assert set(match_ids(recent)) == {"anc1", "temp", "p2obs"}
    assert match_ids(client.get("/Observation?date=2025-03-10").json) == []


def test_times_are_served_as_written_without_shift(fhir: FlaskClient) -> None:
    assert fhir.get("/Observation/anc1").json["effectiveDateTime"] == "2025-03-10T08:00:00Z"
    assert date_range("2025-03-10T08:00:00Z")[0] == datetime(2025, 3, 10, 8, tzinfo=timezone.utc)


def test_relative_birth_dates_move_by_whole_days(tmp_path: Path) -> None:
    write(tmp_path / "infant.bundle.json", bundle(RESOURCES[1]))
    write(tmp_path / "patient-view.infant.request.json", {"hook": "patient-view", "context": {"patientId": "p2"}})
    write(tmp_path / "patient-view.infant.expected.json", {"status": 200, "birthDateRelative": True})
    assert relative_birth_dates(tmp_path) == {"p2"}
    client = create_fhir_app(tmp_path, clock=lambda: NOW).test_client()
    moved = (datetime(2024, 9, 8) + timedelta(days=(NOW.date() - FIXTURE_BASE.date()).days)).date().isoformat()
    assert client.get("/Patient/p2").json["birthDate"] == moved
    assert client.get("/Patient?_id=p2").json["entry"][0]["resource"]["birthDate"] == moved
    unshifted = create_fhir_app(tmp_path, shift_to_now=False).test_client()
    assert unshifted.get("/Patient/p2").json["birthDate"] == "2024-09-08"


# --- loading fixtures ---------------------------------------------------------------------------------------------


def write(path: Path, data: Any) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def bundle(*resources: Mapping[str, Any]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": r} for r in resources]}


def hook_request(patient_id: str, **prefetch: Any) -> dict[str, Any]:
    return {"hook": "patient-view", "context": {"patientId": patient_id, "userId": "Practitioner/1"},
            "prefetch": prefetch}


def test_load_reads_bundles(tmp_path: Path) -> None:
    write(tmp_path / "a.bundle.json", bundle(*RESOURCES[:3]))
    write(tmp_path / "b.bundle.json", bundle(RESOURCES[2], *RESOURCES[3:5]))
    assert load_fixture_resources(tmp_path) == RESOURCES[:5]


def test_load_reads_request_prefetch_when_there_are_no_bundles(tmp_path: Path) -> None:
    outcome = {"resourceType": "OperationOutcome", "issue": []}
    write(tmp_path / "patient-view.a.request.json",
          hook_request("p1", patient=RESOURCES[0], labs=bundle(RESOURCES[2], RESOURCES[3]), vitals=None,
                       conditions=outcome))
    write(tmp_path / "patient-view.b.request.json", hook_request("p2", patient=RESOURCES[1],
                                                                 labs=bundle(RESOURCES[2])))
    write(tmp_path / "patient-view.c.request.json", {"hook": "patient-view", "context": {"patientId": "p9"}})
    assert load_fixture_resources(tmp_path) == [RESOURCES[0], RESOURCES[2], RESOURCES[3], RESOURCES[1]]


def test_load_mixes_bundles_and_requests_per_patient(tmp_path: Path) -> None:
    stale = {**RESOURCES[2], "status": "cancelled"}
    write(tmp_path / "one.bundle.json", bundle(RESOURCES[0], RESOURCES[2]))
    write(tmp_path / "patient-view.one.request.json", hook_request("p1", labs=bundle(stale, RESOURCES[3])))
    write(tmp_path / "patient-view.two.request.json", hook_request("p2", patient=RESOURCES[1]))
    loaded = load_fixture_resources(tmp_path)
    assert loaded == [RESOURCES[0], RESOURCES[2], RESOURCES[1]]  # p1 from its bundle only; p2 from its request


def test_load_one_file_and_skips_resources_without_id(tmp_path: Path) -> None:
    path = write(tmp_path / "x.bundle.json", bundle(RESOURCES[0], {"resourceType": "Observation"}))
    assert load_fixture_resources(path) == [RESOURCES[0]]


@pytest.mark.parametrize("setup", ["missing", "empty", "not-json", "no-resources", "request-not-object"],
                         ids=lambda s: s)
def test_load_errors(tmp_path: Path, setup: str) -> None:
    path = tmp_path / "fixtures"
    if setup != "missing":
        path.mkdir()
    if setup == "not-json":
        (path / "a.bundle.json").write_text("{oops", encoding="utf-8")
    elif setup == "no-resources":
        write(path / "a.bundle.json", bundle())
    elif setup == "request-not-object":
        write(path / "patient-view.a.request.json", [1, 2])
    with pytest.raises(FixtureError) as error:
        load_fixture_resources(path)
    assert str(path) in str(error.value)


# --- the command line ---------------------------------------------------------------------------------------------


def test_run_as_a_subcommand_serves_until_stopped(tmp_path: Path) -> None:
    faults = write(tmp_path / "faults.json", [{"match": "Condition", "status": 503}])
    parser = argparse.ArgumentParser(prog="neutropenia-cds")
    commands = parser.add_subparsers(dest="command", required=True)
    add_arguments(commands.add_parser("fhir-server"))
    args = parser.parse_args(["fhir-server", str(FIXTURES), "--port", "0", "--quiet", "--faults", str(faults),
                              "--fault", "/Patient/nobody:status=410", "--base-path", "/fhir", "--now",
                              "2026-05-01T09:30:00Z"])
    ready: list[FixtureServer] = []
    started = threading.Event()
    status: list[int] = []

    def on_ready(server: FixtureServer) -> None:
        ready.append(server)
        started.set()

    worker = threading.Thread(target=lambda: status.append(run(args, ready=on_ready)), daemon=True)
    worker.start()
    assert started.wait(10)
    (server,) = ready
    try:
        assert server.url.startswith("http://127.0.0.1:") and server.url.endswith("/fhir")
        assert requests.get(f"{server.url}/metadata", timeout=5).json()["fhirVersion"] == "4.0.1"
        anc = requests.get(f"{server.url}/Observation/fn-0001-anc-1", timeout=5).json()
        assert anc["effectiveDateTime"] == "2026-05-01T05:30:00Z"  # --now
        assert requests.get(f"{server.url}/Condition?patient=fn-0001", timeout=5).status_code == 503
        assert requests.get(f"{server.url}/Patient/nobody", timeout=5).status_code == 410
    finally:
        server.stop()
    worker.join(10)
    assert status == [0]


def test_main_in_a_subprocess_stops_cleanly_on_sigterm() -> None:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "cds_hooks.testing.fhir_server", str(FIXTURES), "--port", str(port), "--no-shift"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                response = requests.get(f"http://127.0.0.1:{port}/Patient", timeout=2)
                break
            except requests.ConnectionError:
                assert process.poll() is None and time.monotonic() < deadline
                time.sleep(0.1)
        assert response.status_code == 200 and response.json()["total"] >= 3
        preflight = requests.options(f"http://127.0.0.1:{port}/Observation/_search", timeout=2)
        assert preflight.headers["Access-Control-Allow-Origin"] == "*"
        labs = requests.get(f"http://127.0.0.1:{port}/Observation/fn-0001-anc-1", timeout=2).json()
        assert labs["effectiveDateTime"].startswith("2025-03-10")  # --no-shift
    finally:
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=10)
    assert process.returncode == 0, err
    assert f"http://127.0.0.1:{port}" in err and "Traceback" not in err


@pytest.mark.parametrize("argv", [
    [], ["--port"], [str(FIXTURES), "--port", "http"], [str(FIXTURES), "--port", "70000"],
    [str(FIXTURES), "--fault", "Observation"], [str(FIXTURES), "--fault", "Observation:colour=red"],
    [str(FIXTURES), "--now", "noon"], [str(FIXTURES), "--now", "2025-03-10T12:00:00"], [str(FIXTURES), "--bogus"],
], ids=["no-directory", "port-without-value", "port-not-number", "port-too-big", "fault-without-options",
        "fault-unknown-option", "now-not-time", "now-without-zone", "unknown-option"])
def test_bad_arguments_give_a_usage_message(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: neutropenia-cds fhir-server") and "Traceback" not in err


@pytest.mark.parametrize("setup", ["missing", "empty", "bad-faults-file", "missing-faults-file"], ids=lambda s: s)
def test_bad_fixtures_or_faults_exit_2(tmp_path: Path, setup: str, capsys: pytest.CaptureFixture[str]) -> None:
    argv = [str(tmp_path / "nowhere") if setup == "missing" else str(tmp_path), "--port", "0"]
    if setup in ("bad-faults-file", "missing-faults-file"):
        argv[0] = str(FIXTURES)
        faults = tmp_path / "faults.json"
        if setup == "bad-faults-file":
            write(faults, [{"match": "Observation", "status": "soon"}])
        argv += ["--faults", str(faults)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "neutropenia-cds fhir-server: error:" in err and "Traceback" not in err


def test_port_in_use_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main([str(FIXTURES), "--port", str(port)]) == 1
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port}" in err and "Traceback" not in err


# --- the service's own fetch against the server --------------------------------------------------------------


REQUESTS = sorted(FIXTURES.glob("patient-view.*.request.json"))


def load(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def fixture_client() -> FlaskClient:
    return create_fhir_app(FIXTURES, shift_to_now=False).test_client()


@pytest.mark.parametrize("request_path", REQUESTS, ids=[p.name.split(".")[1] for p in REQUESTS])
def test_server_answers_each_template_like_the_fixture_prefetch(fixture_client: FlaskClient,
                                                               request_path: Path) -> None:
    from service.definition import PREFETCH

    hook = load(request_path)
    for key, value in (hook.get("prefetch") or {}).items():
        if not isinstance(value, dict) or value.get("resourceType") == "OperationOutcome":
            continue  # null and error prefetch values are about the request, not the record
        relative = fill_template(PREFETCH[key], hook["context"])
        answer = fixture_client.get(f"/{relative}").json
        if value["resourceType"] == "Bundle":
            assert [e["resource"] for e in answer.get("entry", [])] == [e["resource"] for e in value.get("entry", [])]
        else:
            assert answer == value


def test_fixture_patients_suit_the_sandbox(fixture_client: FlaskClient) -> None:
    patients = [e["resource"] for e in fixture_client.get("/Patient").json["entry"]]
    assert len(patients) >= 3
    assert all(isinstance(p["name"][0]["given"], list) for p in patients if p.get("name"))


@pytest.fixture
def service(tmp_path: Path) -> Iterator[tuple[FlaskClient, FixtureServer]]:
    """The CDS service (auth off, anonymous fallback fetch to the fixture server) and the fixture server."""
    from service.app import create_app

    with FixtureServer(create_fhir_app(FIXTURES, clock=lambda: NOW)) as server:
        app = create_app({"AUTH": "disabled", "DATABASE_URL": f"sqlite:///{tmp_path}/f.db",
                          "FHIR_ALLOWED_BASES": server.url, "FHIR_ALLOW_ANONYMOUS": True,
                          "FHIR_DEADLINE_SECONDS": 2.0}, environ={}, clock=lambda: NOW)
        try:
            yield app.test_client(), server
        finally:
            app.extensions["neutropenia_cds"]["store"].dispose()


def test_service_gives_the_same_assessment_without_prefetch(service: tuple[FlaskClient, FixtureServer]) -> None:
    from service.definition import EXTENSION_KEY, SERVICE_ID

    client, server = service
    hook = load(FIXTURES / "patient-view.febrile-neutropenia.request.json")
    with_prefetch = client.post(f"/cds-services/{SERVICE_ID}", json=to_now(hook, NOW))
    without = copy.deepcopy(hook)
    del without["prefetch"]
    without["fhirServer"] = server.url
    fetched = client.post(f"/cds-services/{SERVICE_ID}", json=without)
    assert with_prefetch.status_code == fetched.status_code == 200, fetched.json
    assessment = fetched.json["extension"][EXTENSION_KEY]
    assert assessment == with_prefetch.json["extension"][EXTENSION_KEY]
    assert "febrile-neutropenia" in assessment["findings"]
    indicators = [card["indicator"] for card in fetched.json["cards"]]
    assert indicators == [card["indicator"] for card in with_prefetch.json["cards"]] and indicators[0] == "critical"


@pytest.mark.parametrize("fault", [
    {"match": "Observation", "status": 500},
    {"match": "Observation", "malformed": True},
    {"match": "Observation", "delay": 1.0},
], ids=["status-500", "malformed", "delay-past-deadline"])
def test_service_answers_412_when_the_fhir_server_fails(tmp_path: Path, fault: dict[str, Any]) -> None:
    from service.app import create_app
    from service.definition import SERVICE_ID

    with FixtureServer(create_fhir_app(FIXTURES, clock=lambda: NOW, faults=[fault])) as server:
        app = create_app({"AUTH": "disabled", "DATABASE_URL": f"sqlite:///{tmp_path}/f.db",
                          "FHIR_ALLOWED_BASES": server.url, "FHIR_ALLOW_ANONYMOUS": True,
                          "FHIR_DEADLINE_SECONDS": 0.3}, environ={}, clock=lambda: NOW)
        try:
            hook = load(FIXTURES / "patient-view.febrile-neutropenia.request.json")
            del hook["prefetch"]
            hook["fhirServer"] = server.url
            response = app.test_client().post(f"/cds-services/{SERVICE_ID}", json=hook)
        finally:
            app.extensions["neutropenia_cds"]["store"].dispose()
    assert response.status_code == 412
    assert {i["expression"][0] for i in response.json["issue"]} == {"prefetch.labs", "prefetch.vitals"}
