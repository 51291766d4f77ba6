"""Conditions, medication orders and the Patient, read directly."""

from __future__ import annotations

from datetime import date

from service.drugs import MedicationRole
from service.records import birth, condition_fact, latest_order_date, medication_facts, medication_index
from tests.service.factories import ATC, NOW, ago, condition, medication_request, patient


def test_condition_fact_uses_our_display() -> None:
    fact, issue = condition_fact(condition("165517008", id="n"))
    assert issue is None and fact is not None and fact.ref.display == "Neutropenia"


def test_malformed_condition_is_an_issue() -> None:
    fact, issue = condition_fact(condition("165517008", id="n", note="bad"))
    assert fact is None and issue is not None and issue.source == "Condition/n"


def test_medication_index_and_reference() -> None:
    index = medication_index([{"resourceType": "Medication", "id": "m", "code": {"coding": [
        {"system": ATC, "code": "L01XA01"}]}}, {"resourceType": "Medication"}])
    order = medication_request("0")
    del order["medicationCodeableConcept"]
    order["medicationReference"] = {"reference": "https://ehr/fhir/Medication/m"}
    facts, issue = medication_facts(order, index)
    assert issue is None and {f.role for f in facts} == {MedicationRole.CHEMOTHERAPY}


def test_latest_order_date_uses_every_date() -> None:
    order = medication_request("338036", authored=ago(days=10),
                               dispenseRequest={"validityPeriod": {"end": ago(days=4)}},
                               dosageInstruction=[{"timing": {"event": [ago(days=6), ago(days=3)]}}, "junk"])
    assert latest_order_date(order) == NOW.replace(day=7)


def test_birth() -> None:
    assert birth(patient("2001-02-03")) == (("Patient/p1", date(2001, 2, 3)), None)
    assert birth(patient("garbage")) == (None, None)
    found, issue = birth(patient("2001-02-03", gender=5))
    assert found is None and issue is not None
