"""The neutropenia service's hook handler: what it hands the engine besides the resources; the references it
follows (an order's Medication), end to end through the app and a stub FHIR server."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest
from flask import Flask

from cds_hooks.prefetch import KeyResult, KeyState, PrefetchResult
from cds_hooks.registry import HookCall
from cds_hooks.schemas import HookRequest
from cds_hooks.testing.fixtures import FIXTURE_BASE
from service.app import create_app
from service.cards import CardSettings
from service.definition import EXTENSION_KEY, neutropenia_service
from service.thresholds import ClinicalPolicy
from tests.support.fhir_stub_server import FhirStub, operation_outcome, searchset

NOW = datetime(2025, 3, 10, 12, 0, tzinfo=timezone.utc)
ANC = {"resourceType": "Observation", "id": "anc-1", "status": "final",
       "code": {"coding": [{"system": "http://loinc.org", "code": "751-8"}]},
       "effectiveDateTime": "2025-03-10T08:00:00Z",
       "valueQuantity": {"value": 2500, "unit": "/uL", "system": "http://unitsofmeasure.org", "code": "/uL"}}


def _call(labs: KeyResult) -> HookCall:
    keys = {"labs": labs, "vitals": KeyResult("vitals", KeyState.EMPTY, origin="prefetch")}
    request = HookRequest(hook="patient-view", hook_instance="hi",
                          context={"patientId": "p", "userId": "Practitioner/u"})
    return HookCall(service_id="neutropenia-patient-view", request=request,
                    data=PrefetchResult(MappingProxyType(keys)), now=NOW)


def _issues(call: HookCall) -> list[dict[str, Any]]:
    response = neutropenia_service().handler(call)
    return list(response.extension[EXTENSION_KEY].get("dataIssues", []))


@pytest.mark.parametrize("reason", ["3 Bundle entries without a resource were dropped",
                                    "its next link was not followed: no fhirServer in the request"],
                         ids=["dropped-entries", "next-link-not-followed"])
def test_incomplete_prefetch_keys_become_data_issues(reason: str) -> None:
    # Regression: only unavailable keys reached the engine; a key that delivered part of its data (entries that
    # were not resources, pagination stopped) was assessed silently, so "ANC normal" could rest on half the labs.
    labs = KeyResult("labs", KeyState.DATA, (ANC,), origin="prefetch", reason=reason)
    assert {"code": "data-unavailable", "detail": f"labs: {reason}"} in _issues(_call(labs))


def test_complete_prefetch_keys_add_no_issue() -> None:
    assert _issues(_call(KeyResult("labs", KeyState.DATA, (ANC,), origin="prefetch"))) == []


@pytest.mark.parametrize(
    ("policy_cut_off", "card_cut_off", "accepted"),
    [(1000, 1000, True), (500, 500, True), (500, 1000, False), (1000, 1500, False)],
    ids=["defaults", "both-500", "rules-500-cards-1000", "rules-1000-cards-1500"],
)
def test_service_refuses_cards_quoting_another_febrile_neutropenia_cut_off(policy_cut_off: int, card_cut_off: int,
                                                                           accepted: bool) -> None:
    # The cards quote the febrile-neutropenia cut-off ("an ANC below 1000/uL makes this febrile neutropenia") from
    # CardSettings, the rules apply ClinicalPolicy's: a policy of 500 with the default settings told the clinician
    # 1000 while the rules called a fever with ANC 800 not febrile neutropenia. Fail when the service is built.
    policy = ClinicalPolicy(fn_anc_cutoff=Decimal(policy_cut_off))
    settings = CardSettings(febrile_neutropenia_anc_below=Decimal(card_cut_off))
    if accepted:
        assert neutropenia_service(policy, settings).id == "neutropenia-patient-view"
    else:
        with pytest.raises(ValueError, match="cut-off"):
            neutropenia_service(policy, settings)


# --- an order that names its medicine by medicationReference, end to end --------------------------------------

SERVICE_URL = "/cds-services/neutropenia-patient-view"
FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
GCSF_FIXTURE = FIXTURES / "patient-view.presumed-febrile-neutropenia-gcsf.request.json"
FHIR_TOKEN = "tok-medref-5c1e"
#: The Medication the order names: a pegfilgrastim product coded locally, its ingredient by RxNorm (338036).
PEGFILGRASTIM = {
    "resourceType": "Medication", "id": "epic-med-4471",
    "code": {"coding": [{"system": "urn:example:ehr:medications", "code": "4471"}],
             "text": "Pegfilgrastim 6 mg/0.6 mL prefilled syringe"},
    "ingredient": [{"isActive": True, "itemCodeableConcept": {"coding": [
        {"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": "338036", "display": "pegfilgrastim"}]}}],
}


def _by_reference_request(fhir_server: str | None) -> dict[str, Any]:
    """The presumed-febrile-neutropenia G-CSF fixture (sustained fever, no ANC), its only order a completed
    pegfilgrastim order naming its Medication by reference, as Epic sends them (not contained, not prefetched)."""
    request = json.loads(GCSF_FIXTURE.read_text())
    order = next(entry["resource"] for entry in request["prefetch"]["medications"]["entry"]
                 if entry["resource"]["id"] == "fx-0009-med-1")
    order.pop("contained")
    order["medicationReference"] = {"reference": f"Medication/{PEGFILGRASTIM['id']}"}
    request["prefetch"]["medications"] = {"resourceType": "Bundle", "type": "searchset",
                                          "entry": [{"resource": order}]}
    if fhir_server is not None:
        request["fhirServer"] = fhir_server
        request["fhirAuthorization"] = {"access_token": FHIR_TOKEN, "token_type": "Bearer", "expires_in": 300,
                                        "scope": "user/Medication.read", "subject": "neutropenia-cds"}
    return request


@pytest.fixture
def fhir_app(tmp_path: Path, fhir_stub: FhirStub) -> Iterator[Flask]:
    """The service, its clock at the fixtures' base time, allowed to fetch from the stub FHIR server."""
    application = create_app({"AUTH": "disabled", "DATABASE_URL": f"sqlite:///{tmp_path}/feedback.sqlite3",
                              "FHIR_ALLOWED_BASES": fhir_stub.url("/fhir"), "LOG_LEVEL": "WARNING"},
                             environ={}, clock=lambda: FIXTURE_BASE)
    yield application
    application.extensions["neutropenia_cds"]["store"].dispose()


@pytest.mark.parametrize(
    ("server", "findings", "indicator", "issue"),
    (
        ("serves", ["presumed-febrile-neutropenia"], "critical", None),
        ("absent", ["fever-no-anc"], "warning",
         "medications: 1 Medication(s) named by medicationReference could not be obtained: "
         "no fhirServer in the request"),
        ("fails", ["fever-no-anc"], "warning",
         "medications: 1 Medication(s) named by medicationReference could not be obtained: "
         "the FHIR server failed (HTTP 500)"),
        ("not-found", ["fever-no-anc"], "warning",
         "medications: 1 Medication(s) named by medicationReference could not be obtained: "
         "the FHIR server did not return them"),
    ),
    ids=("medication-fetched", "no-fhir-server", "fhir-server-fails", "medication-not-found"),
)
def test_order_by_medication_reference_end_to_end(fhir_app: Flask, fhir_stub: FhirStub, server: str,
                                                  findings: list[str], indicator: str, issue: str | None) -> None:
    # Regression: the order's medicine was known only when its Medication was contained or prefetched, so a
    # pegfilgrastim order by reference was silently nobody's chemotherapy context: fever-no-anc (warning)
    # instead of presumed febrile neutropenia (critical, R2), and no word that the medicines were unknown.
    body = {"serves": searchset([PEGFILGRASTIM]), "fails": operation_outcome("down"),
            "not-found": searchset([])}.get(server)
    fhir_stub.add("/fhir/Medication", body, status=500 if server == "fails" else 200,
                  query={"_id": PEGFILGRASTIM["id"]})
    request = _by_reference_request(None if server == "absent" else fhir_stub.url("/fhir"))
    response = fhir_app.test_client().post(SERVICE_URL, json=request)
    assert response.status_code == 200, response.json
    assessment = response.json["extension"][EXTENSION_KEY]
    assert assessment.get("findings") == findings
    assert response.json["cards"][0]["indicator"] == indicator
    unavailable = [i["detail"] for i in assessment.get("dataIssues", []) if i["code"] == "data-unavailable"]
    assert unavailable == ([issue] if issue else [])
    assert PEGFILGRASTIM["id"] not in json.dumps(assessment.get("dataIssues", []))
    if server == "absent":
        assert fhir_stub.requests == []
    else:
        assert [(r.path, r.params, r.authorization) for r in fhir_stub.requests] == [
            ("/fhir/Medication", {"_id": (PEGFILGRASTIM["id"],)}, f"Bearer {FHIR_TOKEN}")]
